"""Training FLOPs (ettin.flops): exact per-step counts from real document lengths, and MFU peaks."""

import math
import time

import numpy as np
import pytest
import torch

from ettin.attention import MaskSpec, allowed
from ettin.config import load_config
from ettin.flops import (
    attention_pairs,
    flops_per_token,
    label_fraction,
    peak_flops,
    resolve_peak_flops,
    step_flops,
    window,
)


def small(causal: bool):
    """h=8, GLU inner 12, 2 layers (layer 0 global, layer 1 local with window (1, 1); causal: (1, 0)), vocab 16."""
    return load_config(
        "tiny",
        [
            f"objective={'clm' if causal else 'mlm'}",
            "model.hidden_size=8",
            "model.intermediate_size=12",
            "model.num_heads=2",
            "model.num_layers=2",
            "model.global_every=2",
            "model.window_left=1",
            f"model.window_right={0 if causal else 1}",
            "model.vocab_size=16",
        ],
    ).model


def test_step_flops_by_hand_encoder():
    m = small(causal=False)
    # two documents of 3 and 2 tokens (5 tokens), 2 labelled tokens
    # matmuls per token per layer: 2 * (4h² + 3h·i) = 2 * (4*64 + 3*8*12) = 2 * (256 + 288) = 1088
    matmul = 1088 * 2 * 5  # 2 layers, 5 tokens = 10880
    # global layer, bidirectional: every (query, key) pair of a document: 3² + 2² = 13
    # local layer, |i - j| <= 1: doc of 3 -> 3 + 2 + 2 = 7 pairs (offsets 0, +1, -1); doc of 2 -> 2 + 1 + 1 = 4
    attention = 4 * 8 * (13 + 11)  # 4h per pair (QK^T and PV, 2 FLOPs per MAC) = 768
    # head on the 2 labelled tokens only: dense 2h² + vocab 2hV = 2*64 + 2*8*16 = 128 + 256 = 384 each
    head = 2 * 384  # = 768
    forward = matmul + attention + head  # 12416
    assert step_flops(m, [3, 2], 2, training=False) == forward == 12416
    assert step_flops(m, [3, 2], 2) == 3 * forward == 37248  # forward + 2x backward
    assert step_flops(m, np.array([3, 2], dtype=np.int32), 2) == 37248


def test_step_flops_by_hand_decoder():
    m = small(causal=True)  # local window (1, 0): the key before and the query itself
    # global, keys j <= i: 3·4/2 + 2·3/2 = 6 + 3 = 9 pairs; local j in {i-1, i}: (3 + 2) + (2 + 1) = 8 pairs
    forward = 10880 + 4 * 8 * (9 + 8) + 2 * 384  # 10880 + 544 + 768 = 12192
    assert step_flops(m, [3, 2], 2, training=False) == forward == 12192
    assert step_flops(m, [3, 2], 2) == 3 * 12192


@pytest.mark.parametrize(
    "causal, win",
    [(False, None), (True, None), (False, (64, 64)), (True, (63, 0)), (False, (3, 1)), (True, (5, 0)), (False, (0, 2))],
)
def test_attention_pairs_match_the_model_mask(causal, win):
    """The closed form against the attention module's own rule (``allowed``), brute force per document."""
    lengths = [1, 2, 5, 64, 65, 130, 300]
    spec = MaskSpec(causal, win)
    brute = 0
    for n in lengths:
        i = torch.arange(n)
        brute += int(allowed(i[:, None], i[None, :], spec).sum())
    windows = [f"model.window_left={win[0]}", f"model.window_right={win[1]}"] if win else []
    m = load_config("tiny", [f"objective={'clm' if causal else 'mlm'}", *windows]).model
    assert attention_pairs(lengths, *window(m, win is None)) == brute


def test_flops_per_token_is_step_flops_of_full_documents():
    for objective in ("mlm", "clm"):
        cfg = load_config("ettin", ["model=150m", f"objective={objective}", "phase=extension"])
        frac, seq = label_fraction(cfg), cfg.phase.seq_len
        per_token = flops_per_token(cfg.model, seq, label_fraction=frac)["total"]
        docs = 6
        assert step_flops(cfg.model, [seq] * docs, frac * seq * docs) / (seq * docs) == pytest.approx(
            per_token, rel=1e-12
        )
    # the default label fraction: CLM every token, MLM pretraining's 30%
    enc = m = load_config("ettin", ["model=150m"]).model
    head_all = 3 * 2 * (m.hidden_size**2 + m.hidden_size * m.vocab_size)
    assert flops_per_token(enc, 1024)["head"] == pytest.approx(0.3 * head_all)
    assert flops_per_token(load_config("ettin", ["model=150m", "objective=clm"]).model, 1024)["head"] == head_all


def test_step_flops_is_fast_for_thousands_of_documents():
    m = load_config("ettin", ["model=1b"]).model
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8000, size=5000)
    start = time.perf_counter()
    for _ in range(10):
        f = step_flops(m, lengths, int(lengths.sum() * 0.3))
    assert (time.perf_counter() - start) / 10 < 0.01
    assert math.isfinite(f) and f > 0


def test_peak_flops_by_device_name():
    # dense bf16 datasheet peaks (ettin.flops.PEAK_BF16_FLOPS)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None


def test_resolve_peak_flops():
    cfg = load_config("tiny")
    assert cfg.train.peak_flops_per_device == 0
    assert resolve_peak_flops(cfg, "NVIDIA H100 80GB HBM3") == 989e12
    assert math.isnan(resolve_peak_flops(cfg, "cpu"))  # MFU means nothing on the CPU
    assert math.isnan(resolve_peak_flops(cfg, "Mystery GPU"))  # no MFU, no refusal
    assert resolve_peak_flops(cfg, "NVIDIA H200 NVL") == 835e12 and resolve_peak_flops(cfg, "NVIDIA H200") == 989e12
    given = load_config("tiny", ["train.peak_flops_per_device=1e15"])
    assert resolve_peak_flops(given, "Mystery GPU") == 1e15 and resolve_peak_flops(given, "cpu") == 1e15
