"""Parameter counts, training FLOPs (per step from the real documents, or per token for planning),
and accelerator peaks for MFU.

What is counted (model FLOPs, 2 per multiply-add; training = forward + 2x backward = 3x forward):

- every token: the layers' matmuls, ``2 · (4h² + 3h·i)`` per layer (qkv 3h², attention output h²,
  Wi 2h·i, Wo h·i); the embedding is a lookup (0).
- attention, per layer: ``4·h`` per (query, key) pair the mask allows (QK^T and PV), with the
  pairs summed exactly over the real documents: a global layer sees its whole document (causal:
  keys ``j <= i``), a local layer the window ``i - left <= j <= i + right`` clipped at the
  document's edges (causal: ``right`` is 0). Kernels that compute whole blocks or recompute
  QK^T in the backward (flash) do more work than this; MFU counts the useful FLOPs only.
- the prediction head (dense ``h → h`` and the vocab projection ``h → V``), only on labelled
  tokens: ``Transformer.forward`` runs both only where there is a loss (MLM: the masked tokens).

Norms, GELU, RoPE, softmax and the loss are elementwise and not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ettin.config import ModelConfig

# The MLM label fraction ``flops_per_token`` assumes when none is given: pretraining's 30% masking,
# where about 1.7T of the recipe's ~2T tokens are spent (extension 30%, decay and cross 15%).
DEFAULT_MLM_LABEL_FRACTION = 0.30


def num_parameters(cfg: ModelConfig) -> int:
    """Exactly the model's parameters, with the prediction head tied to the embedding."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = 4 * h * h + 3 * h * i + h  # qkv, attn out, Wi (2x), Wo; mlp norm
    norms = (n - 1) * h + h + h + h  # attention norms (not layer 0), embedding, final, head norms
    return cfg.vocab_size * h + n * per_layer + norms + h * h + cfg.vocab_size  # + head dense, vocab bias


def window(cfg: ModelConfig, is_global: bool) -> tuple[float, float]:
    """(left, right): how far back and ahead a query sees (global: unbounded; causal: never ahead)."""
    left, right = (math.inf, math.inf) if is_global else (cfg.window_left, cfg.window_right)
    return left, 0 if cfg.causal else right


def attention_pairs(doc_lengths: Sequence[int] | np.ndarray, left: float, right: float) -> int:
    """(query, key) pairs with ``-right <= i - j <= left`` inside each document, summed exactly.

    A document of length L has ``L - d`` pairs at distance ``d < L``; one side of width ``w``
    reaching ``m = min(w, L - 1)`` holds ``m·L - m(m+1)/2`` of them. (Global non-causal: L²;
    causal: L(L+1)/2.)"""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]

    def side(w: float) -> np.ndarray:
        m = np.minimum(lengths - 1, w if math.isfinite(w) else np.iinfo(np.int64).max).astype(np.int64)
        return m * lengths - m * (m + 1) // 2

    return int((lengths + side(left) + side(right)).sum())


def _layer_kinds(cfg: ModelConfig) -> tuple[int, int]:
    n_global = sum(cfg.is_global(layer) for layer in range(cfg.num_layers))
    return n_global, cfg.num_layers - n_global


def _layer_matmul(cfg: ModelConfig) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return 2 * (4 * h * h + 3 * h * i)


def _head(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    return 2 * (h * h + h * cfg.vocab_size)


def step_flops(
    model_cfg: ModelConfig, doc_lengths: Sequence[int] | np.ndarray, num_labels: float, training: bool = True
) -> float:
    """The FLOPs of one forward(+backward) over these documents (all of a step's micro-batches
    together, or one) with ``num_labels`` labelled tokens. Vectorized: a few numpy passes over
    the lengths, cheap for thousands of documents every step."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    tokens = int(lengths.sum())
    n_global, n_local = _layer_kinds(model_cfg)
    attn_per_pair = 4 * model_cfg.hidden_size
    pairs = n_global * attention_pairs(lengths, *window(model_cfg, True)) + (
        n_local * attention_pairs(lengths, *window(model_cfg, False)) if n_local else 0
    )
    forward = (
        model_cfg.num_layers * _layer_matmul(model_cfg) * tokens
        + attn_per_pair * pairs
        + _head(model_cfg) * float(num_labels)
    )
    return float((3 if training else 1) * forward)


def default_label_fraction(cfg: ModelConfig) -> float:
    """Labelled tokens per token when nothing says otherwise: CLM all, MLM pretraining's 30%."""
    return 1.0 if cfg.causal else DEFAULT_MLM_LABEL_FRACTION


def label_fraction(cfg) -> float:
    """An experiment's labelled tokens per token, for planning: CLM 1 (every token but a sample's
    last: ``1 − 1/seq_len``, rounded up), MLM the mask rate (``cfg.objective.mask_rate``)."""
    return 1.0 if cfg.objective.name == "clm" else float(cfg.objective.mask_rate)


def flops_per_token(
    cfg: ModelConfig, seq_len: int, training: bool = True, label_fraction: float | None = None
) -> dict[str, float]:
    """FLOPs per token for documents of exactly ``seq_len`` tokens, split by layer type and head
    (training = forward + 2x backward); the head runs on ``label_fraction`` of the tokens (default
    :func:`default_label_fraction`; pass :func:`label_fraction` of an experiment for its objective
    and phase). The same counting as :func:`step_flops`, divided by the tokens."""
    fraction = default_label_fraction(cfg) if label_fraction is None else label_fraction
    mult = 3 if training else 1
    n_global, n_local = _layer_kinds(cfg)
    per_pair = 4 * cfg.hidden_size
    keys = {kind: attention_pairs([seq_len], *window(cfg, kind == "global")) / seq_len for kind in ("global", "local")}
    out = {
        "global_layers": mult * n_global * (_layer_matmul(cfg) + per_pair * keys["global"]),
        "local_layers": mult * n_local * (_layer_matmul(cfg) + per_pair * keys["local"]),
        "head": mult * _head(cfg) * fraction,
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- peaks, for MFU

# Dense (no sparsity) bf16 tensor-core peaks per GPU, FLOP/s, from NVIDIA's datasheets: the H100
# datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671 TFLOPS "with sparsity", halved for dense), the H200
# datasheet (same as H100 SXM: 1,979 with sparsity) and the A100 datasheet (312 TFLOPS dense, SXM and
# PCIe alike). Checked in order: the first substring of the upper-cased device name that matches wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM / HBM3 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 datasheet peak of a device named as ``torch.cuda.get_device_name()`` says
    (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"); None when unknown."""
    name = " ".join(device_name.upper().replace("-", " ").split())
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def resolve_peak_flops(cfg, device_name: str | None) -> float:
    """The peak MFU divides by: ``train.peak_flops_per_device`` when set (> 0), else the datasheet
    peak of ``device_name``; NaN on the CPU (MFU means nothing there) and for an accelerator not in
    the table (no MFU is reported; a metric is no reason to refuse a run)."""
    if cfg.train.peak_flops_per_device > 0:
        return float(cfg.train.peak_flops_per_device)
    if not device_name or device_name.strip().lower().startswith("cpu"):
        return float("nan")
    peak = peak_flops(device_name)
    return float("nan") if peak is None else peak
