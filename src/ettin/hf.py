"""Hugging Face interop: our weights <-> ModernBertForMaskedLM / ModernBertDecoderForCausalLM.

Our layout differs from transformers' in two places, both so that any contiguous tensor-parallel
split keeps related rows together: the attention projection is laid out per head as (q, k, v)
and the GLU projection per unit as (input, gate). Everything else maps one to one.

What the head's logits at position ``i`` predict depends on the objective the weights were
trained with, which the architecture cannot say, so the export writes it into config.json as
``ettin_objective`` and ``ettin_label_shift`` (transformers keeps unknown fields and ignores them):

- mlm  -> ModernBertForMaskedLM, shift 0: logits at ``i`` predict the token at ``i`` (fill-mask).
- mntp -> ModernBertForMaskedLM, shift 1: bidirectional, but logits at ``i`` predict the token at
  ``i + 1``; to fill a [MASK] at ``i``, read the logits at ``i - 1``. transformers' fill-mask
  pipeline reads position ``i`` and gives the wrong answer for these models.
- clm  -> ModernBertDecoderForCausalLM, shift 1: next-token prediction; generation starts from
  [CLS] (BOS) and ends at [SEP] (EOS), written to generation_config.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from ettin.config import ModelConfig
from ettin.errors import EttinError
from ettin.fileio import FileError, load_safetensors, read_json, read_yaml
from ettin.layout import CONFIG_FILE, MODEL_JSON, WEIGHTS_FILE, checkpoints_at

ENCODER, DECODER = "ModernBertForMaskedLM", "ModernBertDecoderForCausalLM"
# per objective: how far ahead of its position the head's logits predict (config.json: ettin_label_shift)
LABEL_SHIFT = {"mlm": 0, "mntp": 1, "clm": 1}


class ConversionError(EttinError):
    """A checkpoint or config that cannot be converted; str() says what and how to fix it."""


def _heads_to_hf(w: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our per-head (q, k, v) rows -> [q, k, v], each [hidden, hidden]."""
    w = w.view(cfg.num_heads, 3, cfg.head_dim, cfg.hidden_size).transpose(0, 1)
    return [part.reshape(cfg.hidden_size, cfg.hidden_size) for part in w]


def _heads_from_hf(q, k, v, cfg: ModelConfig) -> torch.Tensor:
    w = torch.stack([t.view(cfg.num_heads, cfg.head_dim, cfg.hidden_size) for t in (q, k, v)], dim=1)
    return w.reshape(3 * cfg.hidden_size, cfg.hidden_size)


def _glu_to_hf(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return w.view(cfg.intermediate_size, 2, cfg.hidden_size).transpose(0, 1).reshape(-1, cfg.hidden_size)


def _glu_from_hf(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return w.view(2, cfg.intermediate_size, cfg.hidden_size).transpose(0, 1).reshape(-1, cfg.hidden_size)


def _renames(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> transformers' name, for the tensors that map one to one."""
    head = "lm_head" if cfg.causal else "head"
    names = {
        "embed.weight": "model.embeddings.tok_embeddings.weight",
        "embed_norm.weight": "model.embeddings.norm.weight",
        "final_norm.weight": "model.final_norm.weight",
        "head_dense.weight": f"{head}.dense.weight",
        "head_norm.weight": f"{head}.norm.weight",
        "head_bias": "decoder.bias",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in [
            ("attn_norm", "attn_norm"),
            ("attn_out", "attn.Wo"),
            ("mlp_norm", "mlp_norm"),
            ("wo", "mlp.Wo"),
        ]:
            if ours != "attn_norm" or i > 0:
                names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def to_hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {theirs: state[ours] for ours, theirs in _renames(cfg).items()}
    for i in range(cfg.num_layers):
        q, k, v = _heads_to_hf(state[f"layers.{i}.qkv.weight"], cfg)
        if cfg.causal:
            out.update({f"model.layers.{i}.attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))})
        else:
            out[f"model.layers.{i}.attn.Wqkv.weight"] = torch.cat([q, k, v])
        out[f"model.layers.{i}.mlp.Wi.weight"] = _glu_to_hf(state[f"layers.{i}.wi.weight"], cfg)
    return {name: t.contiguous() for name, t in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [n for n in _renames(cfg).values() if n not in hf]
    if missing:
        raise ConversionError(
            f"Hugging Face weights lack {missing[0]} (and {len(missing) - 1} more): not a matching ModernBERT checkpoint"
        )
    out = {ours: hf[theirs].clone() for ours, theirs in _renames(cfg).items()}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.attn."
        q, k, v = [hf[f"{p}{n}_proj.weight"] for n in "qkv"] if cfg.causal else hf[f"{p}Wqkv.weight"].chunk(3)
        out[f"layers.{i}.qkv.weight"] = _heads_from_hf(q, k, v, cfg)
        out[f"layers.{i}.wi.weight"] = _glu_from_hf(hf[f"model.layers.{i}.mlp.Wi.weight"], cfg)
    return out


def layer_types(cfg: ModelConfig) -> list[str]:
    return ["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.num_layers)]


def hf_config(cfg: ModelConfig):
    """The transformers config that reproduces ``cfg``; refuses what transformers cannot express."""
    from transformers import ModernBertConfig, ModernBertDecoderConfig

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_activation="gelu",
        classifier_activation="gelu",
        norm_eps=cfg.norm_eps,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        decoder_bias=True,
        classifier_bias=False,
        initializer_range=cfg.init_std,
        initializer_cutoff_factor=cfg.init_cutoff,
        global_rope_theta=cfg.global_rope_theta,
        local_rope_theta=cfg.local_rope_theta,
        global_attn_every_n_layers=cfg.global_every,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.cls_token_id,
        eos_token_id=cfg.sep_token_id,
        cls_token_id=cfg.cls_token_id,
        sep_token_id=cfg.sep_token_id,
        tie_word_embeddings=True,
    )
    if cfg.causal:
        if cfg.window_right != 0:
            raise ConversionError("a decoder export needs model.window_right=0")
        # transformers' decoder attends to j > i - sliding_window, sliding_window = local_attention // 2
        hf = ModernBertDecoderConfig(**common, local_attention=2 * (cfg.window_left + 1), layer_types=layer_types(cfg))
        hf.architectures = [DECODER]
        if cfg.local_rope_theta != cfg.global_rope_theta and not _decoder_honours_local_theta():
            warnings.warn(
                f"this transformers version applies global_rope_theta ({cfg.global_rope_theta:g}) to the decoder's "
                f"local layers, not local_rope_theta ({cfg.local_rope_theta:g}): its logits will differ from ours; "
                "`ettin hf check` measures by how much",
                stacklevel=2,
            )
    else:
        if cfg.window_left != cfg.window_right:
            raise ConversionError(
                "an encoder export needs a symmetric window (model.window_left == model.window_right)"
            )
        hf = ModernBertConfig(**common, local_attention=2 * cfg.window_left)
        hf.layer_types = layer_types(cfg)  # informational: ModernBertConfig derives them the same way
        hf.architectures = [ENCODER]
    return hf


def _decoder_honours_local_theta() -> bool:
    from transformers import ModernBertDecoderConfig, ModernBertDecoderModel

    tiny = ModernBertDecoderConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        cls_token_id=0,
        sep_token_id=0,
    )
    model = ModernBertDecoderModel(tiny)
    return not torch.equal(model.local_rotary_emb.inv_freq, model.global_rotary_emb.inv_freq)


def model_config_from_hf(hf) -> ModelConfig:
    causal = hf.model_type == "modernbert-decoder"
    if hf.model_type not in ("modernbert", "modernbert-decoder"):
        raise ConversionError(f"model_type '{hf.model_type}' is not ModernBERT or ModernBERT-decoder")
    cfg = ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        causal=causal,
        global_every=hf.global_attn_every_n_layers,
        window_left=hf.sliding_window - 1 if causal else hf.local_attention // 2,
        window_right=0 if causal else hf.local_attention // 2,
        global_rope_theta=float(hf.global_rope_theta),
        local_rope_theta=float(hf.local_rope_theta if hf.local_rope_theta is not None else hf.global_rope_theta),
        norm_eps=hf.norm_eps,
        init_std=hf.initializer_range,
        init_cutoff=hf.initializer_cutoff_factor,
        pad_token_id=hf.pad_token_id,
        cls_token_id=hf.cls_token_id,
        sep_token_id=hf.sep_token_id,
    )
    types = getattr(hf, "layer_types", None)
    if causal and types is not None and list(types) != layer_types(cfg):
        raise ConversionError(f"layer_types {types} do not follow 'global every {cfg.global_every} from layer 0'")
    if (
        hf.hidden_activation not in ("gelu", "gelu_python")
        or getattr(hf, "norm_bias", False)
        or getattr(hf, "attention_bias", False)
    ):
        raise ConversionError("only the Ettin/ModernBERT layout is supported (exact GELU, no norm or attention biases)")
    return cfg


def export(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer: str | None = None,
    objective: str | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ generation_config.json for a decoder, + tokenizer
    files) that transformers loads offline. ``objective`` (mlm, mntp or clm; see
    :func:`checkpoint_objective`) records what the head predicts; an MNTP model must pass it."""
    out = _output_folder(out_dir)
    hf = hf_config(cfg)
    hf.torch_dtype = "float32"
    if objective is not None:
        _record_objective(hf, objective, cfg.causal)
    hf.save_pretrained(out)
    if cfg.causal:
        generation_config(cfg).save_pretrained(out)
    save_file(
        {k: v.float() for k, v in to_hf_state_dict(cfg, state).items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if tokenizer:
        save_tokenizer(tokenizer, cfg, out)
    return out


def _output_folder(path: str | Path) -> Path:
    """``--out``, created; a folder that cannot be is the user's to fix, named."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"--out {out} cannot be created ({e.strerror or e}): pick another folder") from None
    return out


def _record_objective(hf, objective: str, causal: bool) -> None:
    """Write the objective and its label shift into the transformers config (see the module doc)."""
    if objective not in LABEL_SHIFT:
        raise ConversionError(f"unknown objective '{objective}': use one of {', '.join(LABEL_SHIFT)}")
    if (objective == "clm") != causal:
        raise ConversionError(
            f"objective {objective} does not match {'a decoder' if causal else 'an encoder'} (model.causal={causal})"
        )
    hf.ettin_objective, hf.ettin_label_shift = objective, LABEL_SHIFT[objective]


def generation_config(cfg: ModelConfig):
    """A decoder's generation settings: start at [CLS] (BOS), stop at [SEP] (EOS), pad with [PAD].
    Ettin's decoders learn to emit [SEP] as the last target of each document (ettin.data.collate)."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id)


def checkpoint_objective(path: str | Path) -> str | None:
    """The objective a checkpoint folder was trained with, from its resolved ``config.yaml``
    (written beside model.json by the trainer); None when there is none (e.g. an imported model)."""
    config = checkpoint_folder(path) / CONFIG_FILE
    if not config.is_file():
        return None
    return (read_yaml(config, "restore it from a copy of the checkpoint").get("objective") or {}).get("name")


def save_tokenizer(tokenizer_json: str, cfg: ModelConfig, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_json)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"tokenizer file {path} not found: pass a tokenizer.json (or a folder holding one)")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise ConversionError(
            f"tokenizer file {path} cannot be read ({str(e).splitlines()[0]}): pass a tokenizer.json "
            "written by `data_tools train-tokenizer` or transformers"
        ) from None
    names = {
        "cls_token": cfg.cls_token_id,
        "sep_token": cfg.sep_token_id,
        "pad_token": cfg.pad_token_id,
        "mask_token": cfg.mask_token_id,
        "bos_token": cfg.cls_token_id,
        "eos_token": cfg.sep_token_id,
    }
    special = {k: tok.convert_ids_to_tokens(i) for k, i in names.items() if i < len(tok)}
    tok.add_special_tokens(special)
    tok.save_pretrained(out)
    if path.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(path, out / "tokenizer.json")  # the exact file we trained with


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers ModernBERT(-decoder) directory into our config and weights (no pickles)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json: pass a Hugging Face model directory")
    read_json(
        path / "config.json", "restore it from the model's source"
    )  # names a damaged file; transformers would not
    try:
        hf_cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(
            f"{path / 'config.json'}: transformers cannot read it ({str(e).splitlines()[0]})"
        ) from None
    cfg = model_config_from_hf(hf_cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path} has no *.safetensors weights (convert .bin checkpoints with transformers first)")
    hf = {}
    for f in files:
        hf.update(load_safetensors(f, "download or copy the model again"))
    return cfg, from_hf_state_dict(cfg, hf)


def load_hf_model(path: str | Path):
    """The transformers model class for a directory, in fp32 eval mode, SDPA attention."""
    from transformers import AutoConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    kind = AutoConfig.from_pretrained(path).model_type
    cls = ModernBertDecoderForCausalLM if kind == "modernbert-decoder" else ModernBertForMaskedLM
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@torch.no_grad()
def compare_with_transformers(path: str | Path, lengths=(1, 5, 64, 129, 300), seed: int = 0) -> dict:
    """Run transformers and our model on the same random documents; return the logit differences."""
    from ettin.parallel import init_process_groups, load_full_state_dict

    init_process_groups(1)
    cfg, state = load_hf(path)
    lengths = [min(n, cfg.max_position_embeddings) for n in lengths]
    ours = cfg.build(attn_backend="sdpa").eval()
    load_full_state_dict(ours, state)
    theirs = load_hf_model(path)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
    # transformers: one padded row per document; ours: the documents end to end
    ids = torch.full((len(docs), max(lengths)), cfg.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, d in enumerate(docs):
        ids[row, : len(d)], mask[row, : len(d)] = d, 1
    ref = theirs(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    got = ours(torch.cat(docs), cu)
    diff = (got - ref).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "finite": bool(torch.isfinite(got).all() and torch.isfinite(ref).all()),
        "max_abs_logit": float(ref.abs().max()),
        "lengths": lengths,
        "model": DECODER if cfg.causal else ENCODER,
    }


def save_weights(path: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Our own model format: a folder with model.safetensors (TP-independent names) and model.json."""
    from dataclasses import asdict

    from ettin.train.checkpoint import write_manifest

    out = _output_folder(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    (out / MODEL_JSON).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    write_manifest(out)  # checked like a checkpoint when exported again
    return out


def checkpoint_folder(path: str | Path) -> Path:
    """``path``, or the newest complete checkpoint when ``path`` is a run folder: exporting a run
    (e.g. one continued from a released model) needs no checkpoint name."""
    path = Path(path)
    if (path / MODEL_JSON).is_file():
        return path
    found, _ = checkpoints_at(path)
    return found[-1] if found else path


def load_weights(path: str | Path, verify_all: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights of an ettin model folder (a checkpoint, or an ``hf import``; a run folder
    means its newest checkpoint), verified against its manifest first: sizes and small files always,
    the weights' digest with ``verify_all``."""
    from ettin.train.checkpoint import RESTORE, SMALL_FILE_BYTES, unverified_note, verify_checkpoint

    path = checkpoint_folder(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / MODEL_JSON).is_file():
        raise ConversionError(f"{path} is not an ettin model folder (needs model.safetensors and model.json)")
    if not verify_checkpoint(path, None if verify_all else SMALL_FILE_BYTES):
        print(unverified_note(path), file=sys.stderr)
    body = read_json(path / MODEL_JSON, RESTORE)
    known = {f.name for f in fields(ModelConfig)}
    if set(body) - known:
        raise FileError(
            path / MODEL_JSON,
            f"has keys this ettin does not know: {sorted(set(body) - known)}",
            "export it with the ettin version that wrote it",
        )
    return ModelConfig(**body), load_safetensors(path / WEIGHTS_FILE, RESTORE)
