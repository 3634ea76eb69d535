"""Parameter counts and training FLOPs per token, from the config alone (for MFU reporting)."""
from __future__ import annotations

from ettin.config import ModelConfig


def num_parameters(cfg: ModelConfig) -> int:
    """Exactly the model's parameters, with the prediction head tied to the embedding."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = 4 * h * h + 3 * h * i + h  # qkv, attn out, Wi (2x), Wo; mlp norm
    norms = (n - 1) * h + h + h + h  # attention norms (not layer 0), embedding, final, head norms
    return cfg.vocab_size * h + n * per_layer + norms + h * h + cfg.vocab_size  # + head dense, vocab bias


def attended_keys(cfg: ModelConfig, seq_len: int, is_global: bool) -> float:
    """Average number of keys a query attends to in a full sequence of ``seq_len`` tokens."""
    if is_global:
        return (seq_len + 1) / 2 if cfg.causal else float(seq_len)
    left, right = min(cfg.window_left, seq_len - 1), min(cfg.window_right, seq_len - 1)
    # edges see fewer keys: a query near the start has fewer than ``left`` tokens behind it
    lost = (left * (left + 1) + right * (right + 1)) / 2 / seq_len
    return 1 + left + right - lost


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> dict[str, float]:
    """Matmul and attention FLOPs per token, split by layer type (training = forward + 2x backward)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    mult = 3 if training else 1
    layer_matmul = 2 * (4 * h * h + 3 * h * i)
    n_global = sum(cfg.is_global(layer) for layer in range(cfg.num_layers))
    n_local = cfg.num_layers - n_global
    attn = {kind: 2 * 2 * h * attended_keys(cfg, seq_len, kind == "global") for kind in ("global", "local")}
    out = {
        "global_layers": mult * n_global * (layer_matmul + attn["global"]),
        "local_layers": mult * n_local * (layer_matmul + attn["local"]),
        "head": mult * 2 * (h * h + h * cfg.vocab_size),
    }
    out["total"] = sum(out.values())
    return out
