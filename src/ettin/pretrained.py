"""Start a phase from a released model: a Hugging Face folder as ``phase.init_checkpoint``.

``phase.init_checkpoint`` names either one of our run folders (or one checkpoint) or a Hugging
Face model folder (``ModernBertForMaskedLM`` / ``ModernBertDecoderForCausalLM``, as ``ettin hf
export`` or transformers' ``save_pretrained`` write it). The kind is read from the folder's
contents (:func:`folder_kind`): ``config.json`` with a ModernBERT ``model_type`` is Hugging Face;
``checkpoints/`` or ``state.json`` is ours. From a Hugging Face folder a phase takes the weights
only (there are no optimizer moments to take): fresh optimizer, clock reset, as the cross phase.

The model a phase trains is the composed ``cfg.model``; :func:`adopt_checkpoint_model` (called by
``load_config``) reconciles it with the checkpoint's, field by field:

- architecture (:data:`ARCHITECTURE`): what the weights' shapes and meaning fix (sizes, layer
  pattern, norm eps, special-token ids). The preset must agree with the checkpoint: every
  difference is one error line, unless ``model=from_checkpoint`` (take the checkpoint's) or an
  override gives the checkpoint's value.
- attention (:data:`ATTENTION`): ``causal`` and the window are the objective's. Training the
  checkpoint's own objective they are architecture; in the cross direction (an encoder trained
  as a decoder or back, only with ``phase.init=other_objective``) the objective's values win.
- phase (:data:`PHASE`): RoPE θ and the position limit, which phases change on purpose (the
  extension phase: θ 160k, 7,999 positions). The value the phase file (its rules included), the
  experiment file or an override sets wins; a field none of them sets keeps the checkpoint's.
- the rest (dropout, init, attention backend) are training settings: the config's.

Before the first step the trainer also checks the data's tokenizer against the model's
(:func:`check_tokenizer`) and loads the weights, each TP rank slicing its share of the whole
tensors (:func:`start_from_hf`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ettin.config import FROM_CHECKPOINT, ConfigError, ExperimentConfig, ModelConfig
from ettin.layout import MODEL_JSON, checkpoints_dir, is_checkpoint

HF, RUN = "Hugging Face folder", "run folder"
HF_MODEL_TYPES = ("modernbert", "modernbert-decoder")

ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "global_every",
    "norm_eps",
    "cls_token_id",
    "sep_token_id",
    "pad_token_id",
    "mask_token_id",
)
ATTENTION = ("causal", "window_left", "window_right")
PHASE = ("global_rope_theta", "local_rope_theta", "max_position_embeddings")
SPECIALS = {"[CLS]": "cls_token_id", "[SEP]": "sep_token_id", "[PAD]": "pad_token_id", "[MASK]": "mask_token_id"}


def folder_kind(path: str | Path | None) -> str | None:
    """HF, RUN, or None when ``path`` is neither (e.g. a run folder that does not exist yet)."""
    if not path:
        return None
    p = Path(path)
    config = p / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"phase.init_checkpoint={path}: config.json is not a JSON object") from None
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(
                f"phase.init_checkpoint={path}: config.json has model_type '{model_type}'; only "
                "ModernBERT encoders and ModernBERT decoders (modernbert, modernbert-decoder) can start a phase"
            )
        return HF
    if checkpoints_dir(p).is_dir() or is_checkpoint(p):
        return RUN
    return None


def hf_model_config(path: str | Path) -> tuple[ModelConfig, set[str]]:
    """The folder's model config, and the fields it does not say (then left out of the comparison).

    config.json has no [MASK] id; it comes from the folder's tokenizer when there is one."""
    from transformers import AutoConfig

    from ettin.hf import model_config_from_hf

    cfg = model_config_from_hf(AutoConfig.from_pretrained(path))
    mask = folder_tokenizer(path).get("[MASK]")
    if mask is None:
        return cfg, {"mask_token_id"}
    return replace(cfg, mask_token_id=mask), set()


def folder_tokenizer(path: str | Path) -> dict:
    """{"vocab_size", "[CLS]", ...} of the tokenizer.json in a model folder; {} without one."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return {}
    tok = Tokenizer.from_file(str(file))
    names = {name: name for name in SPECIALS}
    special_map = Path(path) / "special_tokens_map.json"
    if special_map.is_file():  # a tokenizer may spell them otherwise (<mask>, ...)
        for key, token in json.loads(special_map.read_text()).items():
            name = f"[{key.removesuffix('_token').upper()}]"
            if name in names:
                names[name] = token["content"] if isinstance(token, dict) else token
    out = {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    for name, token in names.items():
        if tok.token_to_id(token) is not None:
            out[name] = tok.token_to_id(token)
    return out


def _run_model_config(path: str | Path) -> ModelConfig | None:
    from ettin.layout import latest_checkpoint

    ckpt = latest_checkpoint(path)
    if ckpt is None or not (ckpt / MODEL_JSON).is_file():
        return None
    return ModelConfig(**json.loads((ckpt / MODEL_JSON).read_text()))


def adopt_checkpoint_model(cfg: ExperimentConfig, chosen: set[str], overridden: set[str]) -> None:
    """Reconcile ``cfg.model`` with the checkpoint's (module doc); raise one line per difference.

    ``chosen``: the model fields the phase file, the experiment file or an override set;
    ``overridden``: those an override (``model.x=...``) set. Does nothing for a phase from scratch
    or a run folder that does not exist yet (a phase chain configured before it runs)."""
    path, m = cfg.phase.init_checkpoint, cfg.model
    take_all = cfg.groups.get("model") == FROM_CHECKPOINT
    kind = folder_kind(path) if cfg.phase.init != "scratch" else None
    if kind is None or (kind == RUN and not take_all):
        if take_all:
            raise ConfigError(
                f"model={FROM_CHECKPOINT} needs phase.init_checkpoint to name a Hugging Face folder or a "
                f"run folder with a checkpoint (got {path!r}, with phase.init={cfg.phase.init})"
            )
        return
    if kind == HF:
        theirs, unknown = hf_model_config(path)
        where = f"{path}/config.json"
    else:
        theirs, unknown, where = _run_model_config(path), set(), f"{path} (model.json)"
        if theirs is None:
            raise ConfigError(f"model={FROM_CHECKPOINT}: {path} holds no complete checkpoint to take the model from")
    cross = theirs.causal != m.causal
    if cross and cfg.phase.init != "other_objective":
        raise ConfigError(
            f"phase.init_checkpoint={path} is {'a decoder' if theirs.causal else 'an encoder'} and objective "
            f"{cfg.objective.name} trains {'a decoder' if m.causal else 'an encoder'}: that is the cross direction, "
            "allowed only with phase.init=other_objective (phase=cross); or pick the checkpoint's objective"
        )
    fields = ARCHITECTURE + (() if cross else ATTENTION)
    differences = []
    for key in fields:
        if key in unknown:
            continue
        ours, ckpt = getattr(m, key), getattr(theirs, key)
        if take_all and key not in overridden:
            setattr(m, key, ckpt)
        elif ours != ckpt:
            source = "the override" if key in overridden else f"model={cfg.groups.get('model', '(experiment)')}"
            differences.append(
                f"model.{key}: {source} gives {ours} but {where} has {ckpt}; use model={FROM_CHECKPOINT} "
                f"or model.{key}={ckpt} to take the checkpoint's"
            )
    if differences:
        raise ConfigError("\n".join(differences))
    for key in PHASE:
        if key not in chosen:
            setattr(m, key, getattr(theirs, key))


def describe(tok: dict) -> str:
    parts = [f"vocab {tok['vocab_size']}"] if tok.get("vocab_size") else []
    return ", ".join(parts + [f"{name}={tok[name]}" for name in SPECIALS if name in tok]) or "unknown"


def data_tokenizer(cfg: ExperimentConfig, manifest) -> tuple[dict, str]:
    """What the prepared data says about its tokenizer: vocabulary size and [CLS]/[SEP] from each
    source's stats.json (``prepare`` records them), [PAD]/[MASK] from ``data.tokenizer`` when given."""
    tok, where = {}, []
    if manifest.tokenizer.get("vocab_size"):
        tok["vocab_size"] = int(manifest.tokenizer["vocab_size"])
    for source in manifest.sources:
        stats = Path(source.path) / "stats.json"
        if not stats.is_file():  # remote: the manifest's vocabulary is all we know
            continue
        body = json.loads(stats.read_text())
        for name, key in (("[CLS]", "cls_id"), ("[SEP]", "sep_id")):
            if key in body:
                tok.setdefault(name, int(body[key]))
        where.append(str(source.path))
    if cfg.data.tokenizer:
        from ettin.data.tokenizer import load_tokenizer

        file = load_tokenizer(cfg.data.tokenizer)
        for name in SPECIALS:
            if file.token_to_id(name) is not None:
                tok.setdefault(name, file.token_to_id(name))
        where.append(str(cfg.data.tokenizer))
    return tok, ", ".join(where[:2]) + (" ..." if len(where) > 2 else "")


def check_tokenizer(cfg: ExperimentConfig, manifest, path: str | Path) -> None:
    """Refuse, in one line naming both, data tokenized otherwise than the model at ``path`` expects.

    The model's side: its special ids (config.json, [MASK] from its tokenizer) and, when the folder
    holds a tokenizer, that tokenizer's vocabulary size (the embedding matrix may be padded past it)."""
    data, data_where = data_tokenizer(cfg, manifest)
    model = {name: getattr(cfg.model, key) for name, key in SPECIALS.items()}
    folder = folder_tokenizer(path)
    if folder.get("vocab_size"):
        model["vocab_size"] = folder["vocab_size"]
    bad = [name for name in SPECIALS if name in data and data[name] != model[name]]
    if data.get("vocab_size") and model.get("vocab_size") and data["vocab_size"] != model["vocab_size"]:
        bad.append("vocab")
    if data.get("vocab_size", 0) > cfg.model.vocab_size:
        bad.append("vocab")
    if bad:
        raise ConfigError(
            f"the data's tokenizer ({describe(data)}; {data_where}) does not match the model's "
            f"({describe(model)}; {path}): prepare the data with the model's tokenizer "
            f"(ettin data prepare ... --tokenizer {path})"
        )


class WholeTensors:
    """Whole tensors by name, read as our checkpoints' TensorFile is: each TP rank takes its slice."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str | Path):
        self.tensors, self.path = tensors, path

    def keys(self) -> set[str]:
        return set(self.tensors)

    def read(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        whole = self.tensors[name]
        return whole if dim is None or parts == 1 else whole.chunk(parts, dim=dim)[rank]


def start_from_hf(model: torch.nn.Module, optimizer, cfg: ExperimentConfig, manifest, say) -> None:
    """Check the data's tokenizer, then load the folder's weights into this rank's shards (fresh optimizer)."""
    from ettin.hf import DECODER, ENCODER, load_hf
    from ettin.train.engine import restore_training_state

    path = cfg.phase.init_checkpoint
    check_tokenizer(cfg, manifest, path)
    theirs, weights = load_hf(path)
    restore_training_state(model, optimizer, WholeTensors(weights, path), None, 0)
    say(
        f"phase {cfg.phase.name}: starting from {HF} {path} ({DECODER if theirs.causal else ENCODER}; "
        f"weights only, fresh optimizer), clock reset"
    )
