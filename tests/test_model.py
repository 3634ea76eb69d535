"""The model on one process: shapes, counts, masks, padded vs unpadded, attention backends."""

import math

import pytest
import torch
import torch.nn.functional as F

from ettin.attention import AUTO_ON_CUDA, Documents, MaskSpec, allowed, available_backends, build_attention
from ettin.config import IGNORE, load_config
from ettin.errors import EttinError
from ettin.flops import flops_per_token, num_parameters
from ettin.parallel import init_process_groups

# RECIPE.md: parameter counts with tied embeddings
RECIPE_PARAMS = {"17m": 16.9e6, "32m": 32e6, "68m": 68e6, "150m": 149.6e6, "400m": 395e6, "1b": 1.03e9}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_process_groups(1)


def tiny(objective="mlm", *overrides):
    return load_config("tiny", [f"objective={objective}", "model.attn_out_dropout=0.0", *overrides])


def build(cfg, seed=0, backend=None):
    torch.manual_seed(seed)
    model = cfg.model.build(attn_backend=backend)
    with torch.no_grad():  # move norms and the bias off their init so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return ids, cu


@pytest.mark.parametrize("size", list(RECIPE_PARAMS))
def test_parameter_counts_match_the_recipe(size):
    cfg = load_config("ettin", [f"model={size}"])
    assert abs(num_parameters(cfg.model) - RECIPE_PARAMS[size]) / RECIPE_PARAMS[size] < 0.01


def test_parameter_count_formula_matches_the_built_model():
    for objective in ("mlm", "clm"):
        cfg = tiny(objective)
        assert sum(p.numel() for p in build(cfg).parameters()) == num_parameters(cfg.model)


def test_flops_per_token():
    cfg = load_config("ettin", ["model=150m"])
    f = flops_per_token(cfg.model, 1024)
    dense = 6 * (num_parameters(cfg.model) - cfg.model.vocab_size * cfg.model.hidden_size)  # 6N, embedding lookup free
    assert f["total"] > dense  # attention adds to the matmuls
    assert f["total"] == pytest.approx(f["global_layers"] + f["local_layers"] + f["head"])
    # local layers see ~129 keys, global ones 1024: attention FLOPs differ accordingly
    enc_attn = flops_per_token(cfg.model, 1024)["global_layers"] - flops_per_token(cfg.model, 1)["global_layers"]
    assert enc_attn == pytest.approx(3 * 8 * 4 * 768 * 1023)  # 8 global layers, 4h per key, x3 for training
    dec = load_config("ettin", ["model=150m", "objective=clm"]).model
    assert flops_per_token(dec, 1024)["global_layers"] < f["global_layers"]


def test_layer_pattern_and_init_statistics():
    cfg = load_config("ettin", ["model=68m"]).model
    assert [cfg.is_global(i) for i in range(7)] == [True, False, False, True, False, False, True]
    m = build(tiny())
    std = m.cfg.init_std
    w = m.layers[1].qkv.weight
    assert w.abs().max() <= 2 * std + 1e-7 and abs(w.std().item() - std * 0.88) < 0.004  # truncated at 2 std
    out_std = std / math.sqrt(2 * m.cfg.num_layers)
    assert m.layers[1].wo.weight.abs().max() <= 2 * out_std + 1e-7
    assert isinstance(m.layers[0].attn_norm, torch.nn.Identity) and not isinstance(
        m.layers[1].attn_norm, torch.nn.Identity
    )


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_documents_never_see_each_other(objective):
    cfg = tiny(objective)
    m = build(cfg).eval()
    ids, cu = batch([40, 70, 30], cfg.model.vocab_size)
    ref = m(ids, cu)
    changed = ids.clone()
    changed[40:110] = (changed[40:110] + 1) % cfg.model.vocab_size  # rewrite the middle document
    out = m(changed, cu)
    torch.testing.assert_close(out[:40], ref[:40], rtol=0, atol=0)
    torch.testing.assert_close(out[110:], ref[110:], rtol=0, atol=0)
    assert not torch.allclose(out[40:110], ref[40:110])


def test_decoder_is_causal_and_encoder_is_not():
    for objective, future_matters in (("clm", False), ("mlm", True)):
        cfg = tiny(objective)
        m = build(cfg).eval()
        ids, cu = batch([100], cfg.model.vocab_size)
        ref = m(ids, cu)
        changed = ids.clone()
        changed[60:] = (changed[60:] + 1) % cfg.model.vocab_size
        assert (not torch.equal(m(changed, cu)[:60], ref[:60])) == future_matters


def test_padded_batches_give_the_unpadded_outputs_and_loss():
    for objective in ("mlm", "clm"):
        cfg = tiny(objective)
        m = build(cfg).eval()
        lengths = [17, 150, 64, 3]
        ids, cu = batch(lengths, cfg.model.vocab_size)
        flat = m(ids, cu)
        padded = torch.full((len(lengths), max(lengths)), cfg.model.pad_token_id)
        mask = torch.zeros_like(padded)
        for row, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            padded[row, : e - s], mask[row, : e - s] = ids[s:e], 1
        out = m.forward_padded(padded, mask)
        torch.testing.assert_close(out[mask.bool()], flat, rtol=1e-5, atol=1e-5)
        assert torch.all(out[~mask.bool()] == 0)
        labels = torch.where(torch.rand(ids.shape) < 0.3, ids, IGNORE)
        padded_labels = torch.full_like(padded, IGNORE)
        padded_labels[mask.bool()] = labels
        torch.testing.assert_close(
            m.forward_padded(padded, mask, labels=padded_labels), m(ids, cu, labels=labels), rtol=1e-5, atol=1e-6
        )


def test_loss_is_cross_entropy_on_labelled_positions_only():
    cfg = tiny("mlm")
    m = build(cfg).eval()
    ids, cu = batch([50, 80], cfg.model.vocab_size)
    labels = torch.full_like(ids, IGNORE)
    labels[::7] = ids[::7]
    expected = F.cross_entropy(m(ids, cu)[labels != IGNORE], labels[labels != IGNORE])
    torch.testing.assert_close(m(ids, cu, labels=labels), expected, rtol=1e-6, atol=1e-6)


def reference_attention(q, k, v, cu, spec):
    """Plain softmax attention over the whole stream with an explicit document/causal/window mask."""
    n = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    pos = torch.arange(n) - cu[:-1].long()[doc]
    mask = (doc[:, None] == doc[None, :]) & allowed(pos[:, None], pos[None, :], spec)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


SPECS = [
    MaskSpec(False, None),
    MaskSpec(True, None),
    MaskSpec(False, (64, 64)),
    MaskSpec(True, (63, 0)),
    MaskSpec(False, (5, 5)),
    MaskSpec(True, (3, 0)),
]


# these run on fp32 CPU tensors; the CUDA-only kernels are checked in bf16 in test_attention.py
CPU_TENSOR_BACKENDS = [b for b in available_backends() if b in ("sdpa", "flex")]


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_backend_matches_the_reference(backend, spec):
    attend = build_attention(backend)
    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 130, 200, 460], dtype=torch.int32)
    q, k, v = (torch.randn(460, 2, 16) for _ in range(3))
    plan = attend.prepare(Documents.from_cu_seqlens(cu), spec)
    with torch.no_grad():  # FlexAttention has no CPU backward
        out = attend(q, k, v, plan)
    torch.testing.assert_close(out, reference_attention(q, k, v, cu, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        MaskSpec(True, (63, 0)),
        MaskSpec(False, (4, 4)),
        MaskSpec(False, (0, 3)),
        MaskSpec(True, (2, 0)),
        MaskSpec(False, (0, 0)),
    ],
    ids=str,
)
def test_blocked_local_sdpa_matches_the_reference_with_gradients(spec):
    """Local layers run in blocks of the window: empty documents, length 1, exact multiples of the
    block and one past it, in fp64, outputs and gradients."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 0, 1, 9, 17, 81, 145, 145], dtype=torch.int32)
    q, k, v = (torch.randn(145, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attend = build_attention("sdpa")
    out, ref = (
        attend(q, k, v, attend.prepare(Documents.from_cu_seqlens(cu), spec)),
        reference_attention(q, k, v, cu, spec),
    )
    torch.testing.assert_close(out, ref)
    for got, want in zip(
        torch.autograd.grad(out.square().sum(), (q, k, v)), torch.autograd.grad(ref.square().sum(), (q, k, v))
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
def test_every_backend_gives_the_same_model_outputs(backend):
    for objective in ("mlm", "clm"):
        cfg = tiny(objective)
        ids, cu = batch([1, 200, 90], cfg.model.vocab_size)
        with torch.no_grad():
            ref = build(cfg, backend="sdpa").eval()(ids, cu)
            out = build(cfg, backend=backend).eval()(ids, cu)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_a_cpu_only_machine_is_sdpa():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: auto picks a GPU kernel here (test_auto_backend_on_cuda_prefers_a_gpu_kernel)")
    assert build_attention("auto").name == "sdpa"


def test_auto_backend_on_cuda_prefers_a_gpu_kernel():
    if not torch.cuda.is_available():
        pytest.skip(
            "needs CUDA: on this CPU-only machine auto is sdpa (test_auto_backend_on_a_cpu_only_machine_is_sdpa)"
        )
    names = available_backends()
    assert build_attention("auto").name == next(n for n in (*AUTO_ON_CUDA, "sdpa") if n in names)
    assert build_attention("auto", device_type="cpu").name == "sdpa"  # a CPU model on a GPU node


def test_an_unknown_attention_backend_is_an_error():
    with pytest.raises(EttinError, match="unknown attention backend 'nope'"):
        build_attention("nope")
