"""Attention backends against a dense fp64 reference, the FlexAttention block mask built from the
offsets against the mask it stands for, and backend selection. CPU only, except the CUDA checks."""

import itertools

import numpy as np
import pytest
import torch

from ettin.attention import (
    CHECK_MASKS,
    Documents,
    FlexAttention,
    MaskSpec,
    SdpaAttention,
    VarlenAttention,
    allowed,
    available_backends,
    build_attention,
    flex_block_mask,
    flex_padded_length,
    reference_attention,
    reference_check,
    varlen_window,
)
from ettin.errors import EttinError

ENCODER_GLOBAL, ENCODER_LOCAL = MaskSpec(False, None), MaskSpec(False, (64, 64))
DECODER_GLOBAL, DECODER_LOCAL = MaskSpec(True, None), MaskSpec(True, (63, 0))
SMALL_WINDOWS = [MaskSpec(False, (4, 4)), MaskSpec(True, (3, 0))]
# a lone token, exactly a (flex) block, one past it, empty documents, several documents with one
# spanning block boundaries
LENGTHS = {
    "one": [1],
    "block": [128],
    "block+1": [129],
    "empty docs": [0, 5, 0, 1, 0],
    "mixed": [1, 128, 129, 7, 300, 2],
}
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (varlen/flash/compiled flex are GPU kernels)"
)


def documents(lengths, device="cpu") -> Documents:
    bounds = (0, *itertools.accumulate(lengths))
    return Documents(torch.tensor(bounds, dtype=torch.int32, device=device), bounds, max(lengths))


def reference_mask(bounds, spec: MaskSpec, size: int) -> torch.Tensor:
    """The dense [size, size] mask of a stream; tokens past the last document are one more
    document (flex's padding)."""
    ends = [*bounds, size] if size > bounds[-1] else list(bounds)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for s, e in zip(ends[:-1], ends[1:]):
        pos = torch.arange(e - s)
        mask[s:e, s:e] = allowed(pos[:, None], pos[None, :], spec)
    return mask


def dense_blocks(num_blocks: torch.Tensor, indices: torch.Tensor, rows: int) -> torch.Tensor:
    """An ordered block list ([1, 1, rows], [1, 1, rows, width]) as a rows x rows count matrix."""
    dense = torch.zeros(rows, rows, dtype=torch.int64)
    for r in range(rows):
        taken = indices[0, 0, r, : num_blocks[0, 0, r]].long()
        dense[r].index_add_(0, taken, torch.ones_like(taken))
    return dense


def test_documents_hold_host_offsets_and_check_their_shape():
    docs = Documents.from_cu_seqlens(torch.tensor([0, 3, 3, 10]))
    assert docs.bounds == (0, 3, 3, 10) and docs.total == 10 and docs.max_seqlen == 7
    assert docs.cu_seqlens.dtype == torch.int32
    numpy_bounds = Documents(torch.tensor([0, 4], dtype=torch.int32), np.array([0, 4]), np.int64(4))
    assert (
        numpy_bounds.bounds == (0, 4) and type(numpy_bounds.bounds[1]) is int and type(numpy_bounds.max_seqlen) is int
    )
    with pytest.raises(ValueError, match="offsets"):
        Documents(torch.tensor([0, 4], dtype=torch.int32), (0, 2, 4), 2)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("spec", [ENCODER_GLOBAL, DECODER_GLOBAL, *SMALL_WINDOWS], ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cpu_backends_match_the_reference(backend, spec, lengths):
    """fp64 outputs, and gradients where the backend has a CPU backward (FlexAttention has none)."""
    attend, docs = build_attention(backend), documents(lengths)
    torch.manual_seed(0)
    grad = backend == "sdpa"
    q, k, v = (torch.randn(docs.total, 2, 8, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    out, ref = attend(q, k, v, attend.prepare(docs, spec)), reference_attention(q, k, v, docs, spec)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref)
    if grad and docs.total:
        for got, want in zip(
            torch.autograd.grad(out.square().sum(), (q, k, v)), torch.autograd.grad(ref.square().sum(), (q, k, v))
        ):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_reference_check_passes_on_cpu_in_fp32(backend):
    """The acceptance check the GPU script runs, here on the CPU: the real windows (64, 64) and
    (63, 0) on documents of 1, 128, 129, ... 300 tokens, fp32 against fp64."""
    rows = reference_check(backend, "cpu", torch.float32)
    assert [r["mask"] for r in rows] == list(CHECK_MASKS)
    assert all(r["ok"] for r in rows), rows
    assert all((r["max_abs_grad"] is None) == (backend == "flex") for r in rows)


def test_reference_follows_the_whole_stream_mask():
    """The per-document reference equals one softmax over the whole stream under the dense mask
    (a different way of writing the same thing)."""
    docs, spec = documents([3, 130, 1, 20]), MaskSpec(True, (5, 0))
    torch.manual_seed(1)
    q, k, v = (torch.randn(docs.total, 2, 4, dtype=torch.float64) for _ in range(3))
    mask = reference_mask(docs.bounds, spec, docs.total)
    scores = torch.einsum("qhd,khd->hqk", q, k) / 2.0
    whole = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(reference_attention(q, k, v, docs, spec), whole)


STRUCTURE_LENGTHS = [[1], [16], [17], [1, 16, 17, 7, 70, 2], [0, 5, 0, 40], [127, 2, 127], [3] * 30, [200]]
STRUCTURE_SPECS = [
    ENCODER_GLOBAL,
    DECODER_GLOBAL,
    ENCODER_LOCAL,
    DECODER_LOCAL,
    *SMALL_WINDOWS,
    MaskSpec(False, (0, 0)),
    MaskSpec(False, (20, 3)),
    MaskSpec(True, (33, 0)),
    MaskSpec(True, (5, 9)),
]


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("lengths", STRUCTURE_LENGTHS, ids=str)
def test_flex_block_mask_is_exactly_the_reference_blocks(lengths, block):
    """Every block pair is listed as full when all its token pairs are allowed, as partial when some
    are, and not at all otherwise, once; the backward's q-side lists are the transpose; the
    padding's queries see only padding. Checked against the dense mask (block 16: many blocks)."""
    docs = documents(lengths)
    for spec in STRUCTURE_SPECS:
        plan = flex_block_mask(docs, spec, block)
        size = flex_padded_length(docs.total, block)
        rows = size // block
        assert plan.seq_lengths == (size, size) and plan.BLOCK_SIZE == (block, block)
        mask = reference_mask(docs.bounds, spec, size)
        tiles = mask.view(rows, block, rows, block)
        some, every = tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3))
        partial = dense_blocks(plan.kv_num_blocks, plan.kv_indices, rows)
        full = dense_blocks(plan.full_kv_num_blocks, plan.full_kv_indices, rows)
        assert partial.max() <= 1 and full.max() <= 1, (spec, "a block listed twice")
        assert torch.equal(full.bool(), every), spec
        assert torch.equal(partial.bool(), some & ~every), spec
        q_partial = dense_blocks(plan.q_num_blocks, plan.q_indices, rows)
        q_full = dense_blocks(plan.full_q_num_blocks, plan.full_q_indices, rows)
        assert torch.equal(q_partial, partial.T) and torch.equal(q_full, full.T), spec
        # partial blocks are resolved by mask_mod: it must give the reference on every pair
        idx = torch.arange(size)
        got = plan.mask_mod(None, None, idx[:, None], idx[None, :])
        assert torch.equal(got, mask), spec
        assert not mask[docs.total :, : docs.total].any() and not mask[: docs.total, docs.total :].any()


def test_flex_pads_to_at_least_two_blocks():
    """Sizes 0 and 1 would each cost a compilation: the padded stream and every block-list
    dimension stay at 2 or more, the one-token filler micro-batch included."""
    assert [flex_padded_length(n) for n in (0, 1, 128, 256, 257)] == [256, 256, 256, 256, 384]
    for spec in CHECK_MASKS.values():
        plan = flex_block_mask(documents([1]), spec)
        for t in (
            plan.kv_num_blocks,
            plan.kv_indices,
            plan.full_kv_num_blocks,
            plan.full_kv_indices,
            plan.q_num_blocks,
            plan.q_indices,
        ):
            assert min(t.shape[2:]) >= 2, (spec, t.shape)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_prepare_never_reads_the_device(backend):
    """Plans are built from the host offsets: with the device offsets on the meta device, where
    nothing can be read back, every prepare still succeeds."""
    attend = {"sdpa": SdpaAttention, "flex": FlexAttention, "varlen": VarlenAttention}[backend]()
    docs = documents([1, 128, 129, 7, 300, 0, 2], device="meta")
    for spec in [*CHECK_MASKS.values(), *SMALL_WINDOWS]:
        attend.prepare(docs, spec)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        docs.cu_seqlens.tolist()  # what a sync would need


@pytest.mark.slow
def test_compiled_flex_keeps_one_graph_per_mask_kind():
    """What the CUDA run does, traced with the eager backend here: ``dynamic=True`` and the padding
    let every new batch, one-token filler included, reuse the graph of its mask kind."""
    from torch._dynamo.testing import CompileCounter
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    counter = CompileCounter()
    attend = FlexAttention(kernel=torch.compile(flex_attention, backend=counter, dynamic=True))
    # first a batch whose sizes coincide (2 heads, 2 block rows, lists 2 wide), then others
    batches = [[130, 5], [1], [300, 1, 40], [128], [7] * 20, [1], [1000, 3], [2, 2]]
    for spec in (ENCODER_GLOBAL, ENCODER_LOCAL):
        for lengths in batches:
            docs = documents(lengths)
            q, k, v = (torch.randn(docs.total, 2, 16) for _ in range(3))
            with torch.no_grad():
                attend(q, k, v, attend.prepare(docs, spec))
    assert counter.frame_count == 2, f"{counter.frame_count} compilations for 2 mask kinds"
    torch._dynamo.reset()


def test_varlen_window_follows_the_mask():
    """(left, right) with -1 for unbounded; varlen_attn turns causal on exactly for (-1, 0)."""
    assert varlen_window(ENCODER_GLOBAL) == (-1, -1)
    assert varlen_window(ENCODER_LOCAL) == (64, 64)
    assert varlen_window(DECODER_GLOBAL) == (-1, 0)
    assert varlen_window(DECODER_LOCAL) == (63, 0)
    assert varlen_window(MaskSpec(True, (63, 5))) == (63, 0)  # causal already cuts the right side
    # encoder-global layers pass a window as long as the longest document (the same keys): torch
    # would send (-1, -1) to cuDNN, which builds a graph for every new shape
    docs = documents([5, 300, 7])
    assert VarlenAttention().prepare(docs, ENCODER_GLOBAL)[2] == (300, 300)
    assert VarlenAttention().prepare(docs, DECODER_GLOBAL)[2] == (-1, 0)


def test_backends_without_dropout_say_so():
    x = torch.zeros(4, 1, 8)
    with pytest.raises(EttinError, match="no attention-probability dropout"):
        FlexAttention()(x, x, x, None, dropout_p=0.1)
    with pytest.raises(EttinError, match="no attention-probability dropout"):
        VarlenAttention()(x, x, x, None, dropout_p=0.1)


def test_unknown_backends_are_refused_and_auto_for_a_cpu_model_is_sdpa():
    with pytest.raises(EttinError, match="unknown attention backend 'nope'"):
        build_attention("nope")
    assert build_attention("auto", device_type="cpu").name == "sdpa"  # a CPU model on a GPU node too


def test_auto_is_sdpa_on_cpu_and_gpu_backends_are_refused_with_a_reason():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU backends are usable here (test_auto_prefers_varlen_on_cuda)")
    assert build_attention("auto").name == "sdpa"
    assert "varlen" not in available_backends() and "flash" not in available_backends()
    with pytest.raises(EttinError, match=r"attention backend 'varlen' is not available here \(it needs CUDA"):
        build_attention("varlen")


@CUDA
def test_auto_prefers_varlen_on_cuda():
    if "varlen" not in available_backends():
        pytest.skip("torch's varlen kernel is not usable on this CUDA device")
    assert build_attention("auto").name == "varlen"


@CUDA
@pytest.mark.parametrize("backend", ["varlen", "flex", "sdpa", "flash"])
def test_cuda_backends_match_the_reference_in_bf16(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available on this machine")
    rows = reference_check(backend, "cuda", torch.bfloat16)
    assert all(r["ok"] for r in rows), rows
