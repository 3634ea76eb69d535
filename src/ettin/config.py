"""Typed configuration: dataclasses for every component, composed from YAML files.

An experiment (``configs/experiment/<name>.yaml``) names one file per group (model size,
objective, phase, data mixture); they are merged in that order over the dataclass defaults,
then the phase's ``rules`` (size/objective-specific recipe values), the experiment's own body,
and finally ``key=value`` overrides from the command line. ``group=name`` on the command line
swaps a group file. Every mistake becomes one :class:`ConfigError` line naming the key and fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ettin.errors import EttinError

GROUPS = ("model", "objective", "phase", "data")  # in merge order
FROM_CHECKPOINT = "from_checkpoint"  # model=from_checkpoint: no preset, the checkpoint's model (ettin.pretrained)


class ConfigError(EttinError):
    """A user mistake in a config file or override; str() is the one-line message."""


# Choices: a field annotated ``Literal[...]`` takes exactly those values (checked by _coerce when a
# layer is read and by validate, whose message lists them). The open ones are tables next to their
# code, so a new one is a one-file change: model.attn_backend (ettin.attention.BACKENDS),
# lr_schedule.shape (ettin.train.lr_schedule.SHAPES) and objective.name (OBJECTIVE_CAUSAL below).


@dataclass
class ModelConfig:
    vocab_size: int = 50368
    hidden_size: int = 256
    intermediate_size: int = 384
    num_layers: int = 7
    num_heads: int = 4
    max_position_embeddings: int = 7999
    causal: bool = False  # the encoder/decoder switch (set by the objective)
    global_every: int = 3  # layer i is global when i % global_every == 0
    # Local layers attend to keys j with i - window_left <= j <= i + window_right.
    window_left: int = 64
    window_right: int = 64
    global_rope_theta: float = 10000.0
    local_rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attn_out_dropout: float = 0.1
    init_std: float = 0.02
    init_cutoff: float = 2.0  # truncate the normal at this many std
    attn_backend: str = "auto"  # auto or a name in ettin.attention.BACKENDS
    cls_token_id: int = 50281  # also BOS for the decoder
    sep_token_id: int = 50282  # also EOS
    pad_token_id: int = 50283
    mask_token_id: int = 50284

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_global(self, layer: int) -> bool:
        return layer % self.global_every == 0

    def build(self, **kwargs):
        from ettin.model import Transformer

        return Transformer(self, **kwargs)


# Training objectives (objective.name accepts exactly these) and the attention each needs
# (model.causal). mntp is masked next-token prediction (LLM2Vec): MLM's masks, each masked token
# predicted from the position before it, bidirectional attention; Ettin's authors used it to turn
# the decoders into encoders.
OBJECTIVE_CAUSAL = {"mlm": False, "clm": True, "mntp": False}
# The label of positions without a loss: the collator writes it, the model's loss skips it
# (cross_entropy's ignore_index). Here, not in either, so neither imports the other.
IGNORE = -100


@dataclass
class ObjectiveConfig:
    name: str = "mlm"  # a key of OBJECTIVE_CAUSAL
    mask_rate: float = 0.30
    mask_token_prob: float = 0.8  # of masked positions: [MASK]
    random_token_prob: float = 0.1  # of masked positions: a random token (rest unchanged)


@dataclass
class PhaseConfig:
    name: str = "pretrain"  # pretrain | extension | decay | cross
    tokens: int = 1_700_000_000_000  # real tokens, padding excluded
    seq_len: int = 1024
    # How the phase starts (Trainer._restore, ettin.pretrained): from scratch, the previous phase's final
    # checkpoint (weights and optimizer), the other objective's (weights only), or released weights
    # (phase.init_checkpoint: a Hugging Face folder or a run folder; fresh optimizer).
    init: Literal["scratch", "previous", "other_objective", "pretrained"] = "scratch"
    previous: str | None = None  # the phase whose final checkpoint this one starts from
    seed: int = 21
    checkpoint_every_tokens: int = 8_500_000_000
    keep_checkpoints: int = 0  # 0 keeps all
    # init != scratch: what to start from: a run folder (its newest checkpoint) or a checkpoint, or a
    # Hugging Face model folder (weights only; model settings reconciled in ettin.pretrained)
    init_checkpoint: str | None = None


@dataclass
class LRScheduleConfig:
    """The learning-rate schedule (ettin.train.lr_schedule); not the batch-size ramp (``batch.warmup_*``)."""

    shape: str = "constant"  # a name in ettin.train.lr_schedule.SHAPES
    warmup_tokens: int = 0
    start_factor: float = 1.0  # LR after warmup, as a fraction of optim.lr
    end_factor: float = 1.0  # LR at the end of the phase, as a fraction of optim.lr
    decay_tokens: int = 0  # wsd: length of the linear tail


@dataclass
class OptimConfig:
    name: Literal["stableadamw"] = "stableadamw"  # the one optimizer (ettin.train.optim)
    lr: float = 8e-4
    weight_decay: float = 1e-5  # fully decoupled; never on norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6


@dataclass
class BatchConfig:
    global_size: int = 4608  # sequences per optimizer step, every phase and size
    # Tokens per forward/backward on one rank: each rank's share of a step is cut, in order, into
    # micro-batches of at most this many tokens (a longer sample gets one of its own). 0: the
    # largest budget the memory model (ettin.memory) fits into train.device_memory_gb.
    micro_tokens: int = 0
    warmup_tokens: int = 0  # ramp the global batch up to global_size over these tokens (pretrain)
    # Ettin began at one micro-batch per GPU; a fixed start keeps the order independent of the GPU count.
    warmup_start_size: int = 256
    warmup_stages: int = 16  # the ramp is a staircase of this many equal steps


@dataclass
class SourceConfig:
    name: str = "???"
    path: str = "???"  # relative to data.root unless absolute or a URI
    weight: float = 1.0  # relative share of the mixture (the recipe uses billions of tokens)
    validation: float | None = None  # this source's held-out part (None: data.validation)


@dataclass
class DataConfig:
    root: str = "data"
    mixture: str = "custom"
    tokenizer: str | None = None  # path to tokenizer.json
    sources: list[SourceConfig] = field(default_factory=list)
    cache_dir: str | None = None  # where compressed/remote shards are decompressed (default ~/.cache/ettin/mds)
    mixture_block: int = 8192  # positions per mixture block: each source's share holds in every block
    shuffle_block: int = 65536  # samples shuffled together (a few shards): bounds what a rank reads at once
    workers: int = 2  # DataLoader workers per rank (the output does not depend on it)
    prefetch: int = 2  # steps (this rank's share of each) prefetched per worker
    allow_fingerprint_change: bool = False  # resume even if the data manifest changed (breaks the ledger)
    # Per source, the samples set aside for validation (never trained on): a fraction in (0, 1) or a
    # count >= 1; 0 none. Chosen by a keyed rule (eval.seed), so the same on every machine and phase.
    validation: float = 0.0


@dataclass
class ParallelConfig:
    tensor: int = 1
    zero_stage: Literal[1, 2] = 1  # ettin.train.engine


@dataclass
class TrainConfig:
    max_runtime_s: float = 0.0  # 0: no limit; else save and exit with the requeue code after this long
    collective_timeout_s: float = 600.0  # a dead rank makes the others fail after this long, not hang
    max_steps: int = 0  # 0: run until phase.tokens; else stop (and checkpoint) after this many steps
    log_every: int = 10  # progress line every N steps (metrics are written every step)
    # for MFU: the accelerator's dense bf16 datasheet peak; 0 looks it up by device name (ettin.flops)
    peak_flops_per_device: float = 0.0
    device: Literal["auto", "cuda", "cpu"] = "auto"  # ettin.train.trainer.pick_device
    device_memory_gb: float = 80.0  # the memory each rank may plan for (micro budgets, the fit check)
    # bf16 runs: the precision of gradient accumulation and the DP reduction (ettin.train.engine, ettin.memory)
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    # CUDA: count and place every step's host<->device waits (metrics: host_syncs, host_sync_sites,
    # sync_calls); it profiles every step, so it is slow
    sync_debug: bool = False
    # torch.use_deterministic_algorithms: a rerun or a resume on a GPU is bit-equal (attention and
    # embedding backwards without atomics), at some cost in speed; CPU runs are deterministic anyway
    deterministic: bool = False
    # what a resume or a phase start checks of a checkpoint against its manifest.json: "small" (sizes,
    # safetensors headers, digests of files up to 64 MiB) or "all" (the weights' digests too: reads it twice)
    verify_checkpoints: Literal["small", "all"] = "small"  # ettin.train.checkpoint.resume_hash_limit


@dataclass
class EvalConfig:
    """Held-out evaluation: the sources' validation parts (data.validation) and separate MDS folders."""

    every_tokens: int = 0  # evaluate every N training tokens (0: only at checkpoints and the phase's end)
    # per set, about this many tokens, from shards spread over the source (0: all of it, which on a
    # large corpus reads every shard at start-up)
    max_tokens: int = 2_000_000
    seed: int = 0  # keys the held-out choice and the validation masks, never the step
    sets: dict[str, str] = field(default_factory=dict)  # name -> MDS folder (relative to data.root)


@dataclass
class WandbConfig:
    # offline: a run folder under <run_dir>/wandb, `wandb sync` it later
    mode: Literal["disabled", "online", "offline"] = "disabled"
    project: str | None = None
    entity: str | None = None


@dataclass
class MetricsConfig:
    """Where the metrics go besides <run_dir>/metrics.jsonl (always written)."""

    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    groups: dict[str, str] = field(default_factory=dict)  # which file each group came from (informational)


# ----------------------------------------------------------------------------- locating files


def config_dir() -> Path:
    """ETTIN_CONFIG_DIR, else the recipe's configs/: shipped inside the package by ``pip install .``
    (setup.cfg maps it to ``ettin/configs``), or the checkout's own for an editable install."""
    env = os.environ.get("ETTIN_CONFIG_DIR")
    here = Path(__file__).resolve().parent
    installed, checkout = here / "configs", here.parents[1] / "configs"
    path = Path(env) if env else installed if installed.is_dir() else checkout
    if not path.is_dir():
        raise ConfigError(f"config directory {path} not found: set ETTIN_CONFIG_DIR to the repo's configs/")
    return path


def list_configs() -> dict[str, list[str]]:
    root = config_dir()
    out = {"experiment": sorted(p.stem for p in (root / "experiment").glob("*.yaml"))}
    for group in GROUPS:
        out[group] = sorted(p.stem for p in (root / group).glob("*.yaml"))
    return out


def _group_file(group: str, name: str) -> Path:
    path = config_dir() / group / f"{name}.yaml"
    if not path.is_file():
        known = list_configs()[group]
        raise ConfigError(f"unknown {group} '{name}'{_did_you_mean(name, known)}; known: {', '.join(known)}")
    return path


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _either(options) -> str:
    """'a', 'a or b', 'a, b or c'."""
    words = [str(o) for o in options]
    return " or ".join(words) if len(words) <= 2 else f"{', '.join(words[:-1])} or {words[-1]}"


def _allowed(value: Any, allowed) -> bool:
    """``value`` is one of ``allowed``, of the same type too (1 is not True, "1" is not 1)."""
    return any(value == a and type(value) is type(a) for a in allowed)


def _not_allowed(path: str, value: Any, allowed) -> str:
    """The message for a value outside a closed choice (a Literal field)."""
    return f"{path} must be {_either(allowed)}, got {value!r}{_did_you_mean(str(value), [str(a) for a in allowed])}"


def _literal_errors(node: Any, path: str = "") -> list[str]:
    """A message for every Literal-annotated field of the dataclass tree ``node`` outside its values."""
    errors = []
    hints = get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, hint, full = getattr(node, f.name), hints[f.name], f"{path}{f.name}"
        if get_origin(hint) is Literal:
            allowed = get_args(hint)
            if not _allowed(value, allowed):
                errors.append(_not_allowed(full, value, allowed))
        elif dataclasses.is_dataclass(value):
            errors += _literal_errors(value, f"{full}.")
    return errors


# ----------------------------------------------------------------------------- renamed keys

# old top-level key -> (new key, the release that drops the old name)
RENAMED_KEYS = {"schedule": ("lr_schedule", "0.3")}
_renames_said: set[str] = set()  # each rename is told once per process, by the first rank only
log = logging.getLogger("ettin.config")


def _renamed(old: str) -> str:
    new, until = RENAMED_KEYS[old]
    return f"config key '{old}' is renamed '{new}'; the old name works until ettin {until}"


def _rename_old_keys(node: dict, where: str) -> dict:
    """A layer (a YAML file, a rule, an override, a checkpoint's config.yaml) that uses an old
    top-level key gets it under its new name, with one warning per process."""
    if not any(old in node for old in RENAMED_KEYS):
        return node
    out = {}
    for key, value in node.items():
        if key in RENAMED_KEYS:
            new = RENAMED_KEYS[key][0]
            if new in node:
                raise ConfigError(f"{where}: both '{key}' and '{new}' are set: {_renamed(key)}, keep only '{new}'")
            # torchrun sets RANK, srun SLURM_PROCID; the config is read before logging knows the rank
            first_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
            if key not in _renames_said and first_rank:
                _renames_said.add(key)
                log.warning(f"warning: {_renamed(key)} (in {where})")
            key = new
        out[key] = value
    return out


# ----------------------------------------------------------------------------- checking layers


def _check_layer(node: Any, schema: type, where: str, path: str = "") -> Any:
    """Reject unknown keys (with a suggestion) and turn integral floats like 1.7e12 into ints."""
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{path or '<root>'}' must be a mapping, got {node!r}")
    if schema is ExperimentConfig:
        node = _rename_old_keys(node, where)
    hints = get_type_hints(schema)
    out = {}
    for key, value in node.items():
        full = f"{path}.{key}" if path else key
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{full}'{_did_you_mean(key, hints)}")
        out[key] = _coerce(value, hints[key], where, full)
    return out


def _coerce(value: Any, hint: Any, where: str, path: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _check_layer(value, hint, where, path)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{path}' must be a list, got {value!r}")
        return [_check_layer(v, args[0], where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:  # a closed choice: its values, and nothing else
        kind = type(args[0])
        value = _coerce(value, kind, where, path) if all(type(a) is kind for a in args) else value
        if not _allowed(value, args):
            raise ConfigError(f"{where}: {_not_allowed(path, value, args)}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int and number and float(value).is_integer():
        return int(value)
    if hint is float and number:
        return float(value)
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, float, bool, str):
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
        raise ConfigError(f"{where}: '{path}' must be {kind}, got {value!r}")
    return value


def _load_yaml(path: Path) -> dict:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    return data or {}


# ----------------------------------------------------------------------------- composing


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    groups, values = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. model=150m, optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in GROUPS:
            groups[key] = raw.strip()
            continue
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"_v={raw}"]))["_v"]
        except Exception as e:  # noqa: BLE001 - yaml and OmegaConf grammar errors alike
            raise ConfigError(f"override {key}: cannot parse value {raw!r} ({str(e).splitlines()[0]})") from None
        values.append((key, parsed))
    return groups, values


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _rule_matches(when: dict, selected: dict[str, str], where: str) -> bool:
    for group, wanted in when.items():
        if group not in GROUPS:
            raise ConfigError(f"{where}: rule condition on unknown group '{group}' (groups: {', '.join(GROUPS)})")
        wanted = wanted if isinstance(wanted, list) else [wanted]
        if selected.get(group) not in [str(w) for w in wanted]:
            return False
    return True


def load_config(experiment: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Compose ``experiment`` (a name in configs/experiment or a YAML path) with overrides."""
    path = Path(experiment)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = config_dir() / "experiment" / f"{experiment}.yaml"
        if not path.is_file():
            known = list_configs()["experiment"]
            raise ConfigError(
                f"unknown experiment '{experiment}'{_did_you_mean(experiment, known)}; known: {', '.join(known)}"
            )
    body = _load_yaml(path)
    selected = {k: str(v) for k, v in (body.pop("defaults", None) or {}).items()}
    for key in selected:
        if key not in GROUPS:
            raise ConfigError(f"{path}: defaults names unknown group '{key}'{_did_you_mean(key, GROUPS)}")
    cli_groups, cli_values = _parse_overrides(overrides or [])
    selected.update(cli_groups)

    layers: list[tuple[str, dict]] = []
    rules: list[tuple[str, dict]] = []
    for group in GROUPS:
        if group not in selected:
            continue
        if group == "model" and selected[group] == FROM_CHECKPOINT:  # no file: the checkpoint's model
            continue
        gpath = _group_file(group, selected[group])
        data = _load_yaml(gpath)
        nested = data.pop("defaults", None) or {}
        for sub, name in nested.items():  # a phase picks its data mixture unless told otherwise
            if sub not in GROUPS or GROUPS.index(sub) <= GROUPS.index(group):
                raise ConfigError(f"{gpath}: defaults may only name later groups, not '{sub}'")
            selected.setdefault(sub, str(name))
        rules += [(str(gpath), r) for r in data.pop("rules", None) or []]
        layers.append((str(gpath), data))
    for where, rule in rules:
        if not isinstance(rule, dict) or set(rule) != {"when", "set"}:
            raise ConfigError(f"{where}: each rule needs exactly 'when' and 'set'")
        if _rule_matches(rule["when"], selected, where):
            for key, value in rule["set"].items():
                layers.append((f"{where} (rule {rule['when']})", _nest(key, value)))
    layers.append((str(path), body))
    for key, value in cli_values:
        layers.append((f"override {key}", _nest(key, value)))

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.name = path.stem
    for where, layer in layers:
        checked = _check_layer(layer, ExperimentConfig, where)
        try:
            cfg = OmegaConf.merge(cfg, checked)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {_omegaconf_message(e)}") from None
    cfg.groups = dict(selected)
    try:
        obj: ExperimentConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_omegaconf_message(e)}") from None
    _adopt_checkpoint_model(obj, layers, selected, path)
    validate(obj)
    return obj


def _adopt_checkpoint_model(
    cfg: ExperimentConfig, layers: list[tuple[str, dict]], selected: dict[str, str], experiment: Path
) -> None:
    """Reconcile cfg.model with phase.init_checkpoint's (ettin.pretrained), told which model keys the
    phase file (its rules included), the experiment file and the overrides chose."""
    from ettin.pretrained import adopt_checkpoint_model

    phase_file = str(_group_file("phase", selected["phase"])) if "phase" in selected else None
    chosen, overridden = set(), set()
    for where, layer in layers:
        keys = set((layer.get("model") or {}) if isinstance(layer, dict) else ())
        if where.startswith("override "):
            overridden |= keys
        if where.startswith("override ") or where == str(experiment) or (phase_file and where.startswith(phase_file)):
            chosen |= keys
    adopt_checkpoint_model(cfg, chosen, overridden)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"'{key}': {msg}" if key else msg


# ----------------------------------------------------------------------------- validation


def validate(cfg: ExperimentConfig, world_size: int | None = None) -> None:
    """Raise one ConfigError listing every semantic mistake, one per line."""
    # the open tables live with their code, above this layer: read them here, never at import
    from ettin.attention import backend_names  # (imports torch)
    from ettin.train.lr_schedule import SHAPES

    m, tp = cfg.model, cfg.parallel.tensor
    errors = _literal_errors(cfg)

    def need(ok: bool, msg: str):
        if not ok:
            errors.append(msg)

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "global_every"):
        need(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    need(tp >= 1, f"parallel.tensor must be >= 1, got {tp}")
    if m.num_heads > 0 and tp >= 1:
        need(
            m.hidden_size % m.num_heads == 0,
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})",
        )
        need(m.head_dim % 2 == 0, f"head dim {m.head_dim} must be even for RoPE")
        need(
            m.num_heads % tp == 0,
            f"model.num_heads ({m.num_heads}) is not divisible by parallel.tensor ({tp}): pick a TP size that divides it",
        )
        need(
            m.vocab_size % tp == 0,
            f"model.vocab_size ({m.vocab_size}) is not divisible by parallel.tensor ({tp}): pad the vocab or pick another TP size",
        )
        need(
            m.intermediate_size % tp == 0,
            f"model.intermediate_size ({m.intermediate_size}) is not divisible by parallel.tensor ({tp})",
        )
    for key in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        need(
            0 <= getattr(m, key) < m.vocab_size,
            f"model.{key} ({getattr(m, key)}) must be a token id below model.vocab_size ({m.vocab_size})",
        )
    need(
        cfg.phase.seq_len <= m.max_position_embeddings,
        f"phase.seq_len ({cfg.phase.seq_len}) exceeds model.max_position_embeddings ({m.max_position_embeddings}): "
        "lower phase.seq_len or raise the limit",
    )
    need(cfg.phase.seq_len > 2, f"phase.seq_len must be > 2, got {cfg.phase.seq_len}")
    need(m.window_left >= 0 and m.window_right >= 0, "model.window_left/window_right must be >= 0")
    need(not m.causal or m.window_right == 0, "a causal model must have model.window_right = 0")
    backends = backend_names()
    need(
        m.attn_backend in backends,
        f"model.attn_backend '{m.attn_backend}' unknown{_did_you_mean(m.attn_backend, backends)}; "
        f"use one of {', '.join(backends)}",
    )
    name = cfg.objective.name
    need(
        name in OBJECTIVE_CAUSAL,
        f"objective.name must be one of {', '.join(OBJECTIVE_CAUSAL)}, got '{name}'"
        f"{_did_you_mean(name, OBJECTIVE_CAUSAL)}",
    )
    need(
        name not in OBJECTIVE_CAUSAL or OBJECTIVE_CAUSAL[name] == m.causal,
        f"objective {name} needs model.causal={str(OBJECTIVE_CAUSAL.get(name)).lower()}",
    )
    need(0 < cfg.objective.mask_rate < 1, f"objective.mask_rate must be in (0, 1), got {cfg.objective.mask_rate}")
    for key in ("tokens", "checkpoint_every_tokens"):
        need(getattr(cfg.phase, key) > 0, f"phase.{key} must be positive, got {getattr(cfg.phase, key)}")
    need(
        cfg.phase.init != "scratch" or not cfg.phase.init_checkpoint,
        f"phase.init=scratch ignores phase.init_checkpoint ({cfg.phase.init_checkpoint}): set phase.init=pretrained "
        "to start from its weights, or drop phase.init_checkpoint",
    )
    need(
        cfg.phase.init != "pretrained" or cfg.phase.init_checkpoint,
        "phase.init=pretrained needs phase.init_checkpoint (a Hugging Face model folder or a run folder)",
    )
    need(cfg.train.collective_timeout_s > 0, "train.collective_timeout_s must be positive")
    for where, value in [
        ("data.validation", cfg.data.validation),
        *((f"data.sources[{i}].validation", s.validation) for i, s in enumerate(cfg.data.sources)),
    ]:
        need(
            value is None or (value >= 0 and (value < 1 or float(value).is_integer())),
            f"{where} must be a fraction in (0, 1), a whole count >= 1, or 0, got {value}",
        )
    need(
        cfg.metrics.wandb.mode == "disabled" or bool(cfg.metrics.wandb.project),
        "metrics.wandb.mode is set: name the W&B project with metrics.wandb.project=NAME",
    )
    need(
        cfg.metrics.wandb.mode == "disabled" or importlib.util.find_spec("wandb") is not None,
        f"metrics.wandb.mode={cfg.metrics.wandb.mode} needs the wandb package: pip install '.[wandb]', "
        "or set metrics.wandb.mode=disabled",
    )
    need(
        cfg.phase.init in ("scratch", "pretrained") or cfg.phase.previous,
        f"phase.init={cfg.phase.init} needs phase.previous (the phase to start from)",
    )
    lrs = cfg.lr_schedule
    for key in ("warmup_tokens", "decay_tokens"):
        need(getattr(lrs, key) >= 0, f"lr_schedule.{key} must be >= 0, got {getattr(lrs, key)}")
    need(
        lrs.shape in SHAPES,
        f"lr_schedule.shape must be {_either(SHAPES)}, got '{lrs.shape}'{_did_you_mean(lrs.shape, SHAPES)}",
    )
    need(
        lrs.warmup_tokens + lrs.decay_tokens <= cfg.phase.tokens,
        "lr_schedule.warmup_tokens + lr_schedule.decay_tokens exceed phase.tokens",
    )
    need(cfg.optim.lr > 0, f"optim.lr must be positive, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    need(cfg.batch.global_size > 0, f"batch.global_size must be positive, got {cfg.batch.global_size}")
    need(
        cfg.batch.micro_tokens >= 0,
        f"batch.micro_tokens must be >= 0 (0: from the memory model), got {cfg.batch.micro_tokens}",
    )
    need(cfg.train.device_memory_gb > 0, f"train.device_memory_gb must be positive, got {cfg.train.device_memory_gb}")
    need(cfg.train.peak_flops_per_device >= 0, "train.peak_flops_per_device must be >= 0 (0: by device name)")
    need(cfg.batch.warmup_tokens >= 0, f"batch.warmup_tokens must be >= 0, got {cfg.batch.warmup_tokens}")
    need(
        cfg.batch.warmup_start_size > 0 and cfg.batch.warmup_stages > 0,
        "batch.warmup_start_size and batch.warmup_stages must be positive",
    )
    need(
        cfg.data.mixture_block >= 2 * max(1, len(cfg.data.sources)),
        f"data.mixture_block ({cfg.data.mixture_block}) must be at least twice the number of sources",
    )
    need(cfg.data.shuffle_block > 0, "data.shuffle_block must be positive")
    need(cfg.data.workers >= 0 and cfg.data.prefetch > 0, "data.workers must be >= 0 and data.prefetch > 0")
    for i, s in enumerate(cfg.data.sources):
        need(s.weight > 0, f"data.sources[{i}] ({s.name}): weight must be positive, got {s.weight}")
    if world_size is not None:
        need(world_size % tp == 0, f"world size {world_size} is not divisible by parallel.tensor ({tp})")
    if errors:
        raise ConfigError("\n".join(errors))


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
