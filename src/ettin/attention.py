"""Attention over unpadded token streams, behind one interface.

Inputs are ``q, k, v`` of shape ``[tokens, heads, head_dim]`` for documents laid end to end. The
documents come as ``Documents``: their offsets ``cu_seqlens`` (int32, ``[docs + 1]``) on the compute
device, the same offsets on the host and the longest length, so that no backend has to read anything
back from the device. A token at position ``i`` may see key ``j`` of the same document when
``j <= i`` (if causal) and, for local layers, ``i - left <= j <= i + right``.

Backends:

- ``varlen``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; its flash
  kernel takes the sliding window as ``window_size``). The CUDA default.
- ``flash``: the flash-attn package's varlen kernel (CUDA, optional extra ``.[flash]``).
- ``flex``: FlexAttention with a block mask built from the offsets in O(tokens / 128) blocks, on a
  stream padded to a multiple of 128 tokens; compiled once (dynamic shapes) on CUDA, eager elsewhere.
- ``sdpa``: ``scaled_dot_product_attention`` (any device; the CPU default): per document for global
  layers, in blocks of the window for local ones.

``BACKENDS`` maps each name to its implementation (and when it is usable): ``model.attn_backend``
takes ``auto`` or any name there, so a new backend is one entry in that table.

A backend first ``prepare``s a plan for one batch and one mask kind, once per forward; every layer of
that kind then reuses it. ``reference_check`` compares a backend with a dense fp64 reference on a
fixed set of documents, for the tests here and for acceptance runs on a GPU.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ettin.errors import EttinError


@dataclass(frozen=True)
class MaskSpec:
    causal: bool
    window: tuple[int, int] | None  # (left, right) in tokens; None = global


# eq=False: equality of two batches would compare tensors elementwise; identity is what is meant
@dataclass(frozen=True, eq=False)
class Documents:
    """One batch's documents: ``cu_seqlens`` (int32 ``[docs + 1]``) on the compute device, the same
    offsets as host ints in ``bounds``, and the longest document (exact, or at least an upper
    bound: kernels and flex's block lists are sized by it). The trainer knows all three on the
    host, so a forward never waits on the device to learn its own shapes."""

    cu_seqlens: torch.Tensor
    bounds: tuple[int, ...]
    max_seqlen: int

    def __post_init__(self):
        # plain ints, whatever the caller had (numpy integers, a list): they end up in shapes
        object.__setattr__(self, "bounds", tuple(int(b) for b in self.bounds))
        object.__setattr__(self, "max_seqlen", int(self.max_seqlen))
        if (
            self.cu_seqlens.dim() != 1
            or self.cu_seqlens.numel() != len(self.bounds)
            or not self.bounds
            or self.bounds[0] != 0
        ):
            raise ValueError(
                f"Documents: cu_seqlens {tuple(self.cu_seqlens.shape)} and bounds of length {len(self.bounds)} "
                "must both be the [docs + 1] offsets, starting at 0"
            )

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> Documents:
        """For tools and tests: reads the offsets back with one ``.tolist()`` (a device sync)."""
        bounds = cu_seqlens.tolist()
        if max_seqlen is None:
            max_seqlen = max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0)
        return cls(cu_seqlens.to(torch.int32), tuple(bounds), max_seqlen)


def allowed(q_idx: torch.Tensor, k_idx: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """Whether query position q_idx may attend to key k_idx (same document assumed). Only the
    difference of the two matters, so stream positions work as well as positions in the document."""
    ok = torch.ones_like(q_idx - k_idx, dtype=torch.bool)
    if spec.causal:
        ok = ok & (k_idx <= q_idx)
    if spec.window is not None:
        left, right = spec.window
        ok = ok & (q_idx - k_idx <= left) & (k_idx - q_idx <= right)
    return ok


class SdpaAttention:
    """``scaled_dot_product_attention``: per document for global layers (causal via ``is_causal``);
    for local layers, every document is cut into blocks of ``max(left, right)`` queries that see
    only their neighbouring blocks, and all blocks of the batch go through one call. That costs
    O(tokens · window) instead of O(length²) per document."""

    name = "sdpa"

    def prepare(self, docs: Documents, spec: MaskSpec):
        if spec.window is None:
            return "documents", docs.bounds, spec
        return ("blocks", *local_blocks(docs, spec))

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        if plan[0] == "documents":
            _, bounds, spec = plan
            out = torch.empty_like(q)
            for s, e in zip(bounds[:-1], bounds[1:]):
                if e == s:
                    continue
                qd, kd, vd = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
                out[s:e] = F.scaled_dot_product_attention(
                    qd, kd, vd, is_causal=spec.causal, dropout_p=dropout_p
                ).transpose(0, 1)
            return out
        _, queries, keys, mask, slots = plan
        qb, kb, vb = (t[idx].transpose(1, 2) for t, idx in ((q, queries), (k, keys), (v, keys)))
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)  # [blocks, heads, B, dim]
        return out.transpose(1, 2).flatten(0, 1)[slots]


def local_blocks(docs: Documents, spec: MaskSpec):
    """Gather indices for blocked local attention: query block ``i`` of a document holds tokens
    ``[i·B, (i+1)·B)`` and sees the key blocks ``i - 1 .. i + 1`` (only the sides the window
    reaches). Returns query and key indices into the token stream (slots past a document's end
    point at token 0 and are masked or dropped), the [blocks, 1, B, keys] mask, and each token's
    slot in the blocked output. Built on the device; sizes come from the host offsets."""
    left, right = spec.window
    size = max(left, right, 1)
    before, after = int(left > 0), int(right > 0)
    cu, bounds = docs.cu_seqlens, docs.bounds
    device = cu.device
    total = sum(-(-(e - s) // size) for s, e in zip(bounds[:-1], bounds[1:]))
    lengths = (cu[1:] - cu[:-1]).long()
    blocks = (lengths + size - 1) // size
    first = torch.cumsum(blocks, 0) - blocks  # each document's first block
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), blocks, output_size=total)
    block = torch.arange(total, device=device) - first[doc]  # block number inside its document
    q_pos = block[:, None] * size + torch.arange(size, device=device)  # position inside the document
    k_pos = (block[:, None] - before) * size + torch.arange((before + 1 + after) * size, device=device)
    start, length = cu[:-1][doc][:, None].long(), lengths[doc][:, None]
    q_ok, k_ok = q_pos < length, (k_pos >= 0) & (k_pos < length)
    queries, keys = torch.where(q_ok, start + q_pos, 0), torch.where(k_ok, start + k_pos, 0)
    mask = k_ok[:, None, :] & allowed(q_pos[:, :, None], k_pos[:, None, :], spec)
    mask |= ~q_ok[:, :, None]  # padding queries see everything (never an all-masked row); they are dropped
    slots = torch.repeat_interleave(first * size - cu[:-1].long(), lengths, output_size=docs.total)
    return queries, keys, mask[:, None], slots + torch.arange(docs.total, device=device)


FLEX_BLOCK = 128  # FlexAttention's sparse block (tokens per block row and column)
_compiled_flex = None


def flex_kernel(device: torch.device):
    """``flex_attention``, compiled once per process on CUDA. ``dynamic=True``: the token count
    changes every micro-batch and must not cost a compilation each time. Elsewhere it runs eager
    (an unfused reference implementation that materializes the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def flex_padded_length(total: int, block: int = FLEX_BLOCK) -> int:
    """Tokens after padding: a whole number of blocks, and at least two, so that neither the
    stream nor any block-mask dimension is ever 0 or 1, sizes ``torch.compile`` specializes on
    (the trainer's one-token filler micro-batch included)."""
    return max(2, -(-total // block)) * block


def flex_block_mask(docs: Documents, spec: MaskSpec, block: int = FLEX_BLOCK):
    """The FlexAttention ``BlockMask`` for these documents, from their offsets alone.

    The stream is padded to ``flex_padded_length`` tokens; the padding is one more document, so
    its queries see themselves (no empty softmax row, no NaN) and real tokens never see it. Token
    ``i`` of a document ``[s, e)`` sees the keys ``[max(s, i - before), min(e - 1, i + after)]``:
    both ends only grow with ``i``, so for a block of queries the kv blocks with some allowed pair
    and those where every pair is allowed are two nested ranges, found from the block's first and
    last token (``block_ranges``). Partial blocks get ``mask_mod``; full ones skip it. The
    backward's q-side lists come the same way from the keys' point of view (the mask transposed:
    ``before`` and ``after`` swap), instead of densifying and sorting a blocks × blocks matrix."""
    from torch.nn.attention.flex_attention import BlockMask

    size = flex_padded_length(docs.total, block)
    cu = F.pad(docs.cu_seqlens.long(), (0, 1), value=size)  # the padding document ends the stream
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1], output_size=size)
    before = spec.window[0] if spec.window is not None else size
    after = 0 if spec.causal else (spec.window[1] if spec.window is not None else size)
    longest = max(docs.max_seqlen, size - docs.total, 1)
    kv_side = block_ranges(doc, cu, before, after, longest, block)
    q_side = block_ranges(doc, cu, after, before, longest, block)
    return BlockMask(
        seq_lengths=(size, size),
        **kv_side,
        **_rename(q_side, "kv", "q"),
        BLOCK_SIZE=(block, block),
        mask_mod=document_mask_mod(doc, spec),
    )


def _rename(lists: dict, old: str, new: str) -> dict:
    return {key.replace(old, new): value for key, value in lists.items()}


def block_ranges(doc: torch.Tensor, cu: torch.Tensor, before: int, after: int, longest: int, block: int) -> dict:
    """For every block of ``block`` rows (tokens that attend over the columns ``[i - before,
    i + after]`` of their own document): the column blocks where some pair is allowed, split into
    partial and full ones, as BlockMask's ordered lists (``kv_num_blocks``, ``kv_indices``,
    ``full_kv_num_blocks``, ``full_kv_indices``, shaped ``[1, 1, rows, width]``).

    Every list is at most ``width`` long, known on the host: a row block reaches ``before`` (at
    most the longest document) to one side and ``after`` to the other. All tensor work is
    O(rows · width) on the device, without a sync."""
    size = doc.numel()
    rows = size // block
    before, after = min(before, longest - 1), min(after, longest - 1)
    width = min(rows, max(2, -(-before // block) + -(-after // block) + 1))

    def reach(i):  # first and last column token i sees
        d = doc[i]
        return torch.maximum(cu[d], i - before), torch.minimum(cu[d + 1] - 1, i + after)

    first = (torch.arange(rows, device=doc.device) * block).view(1, 1, rows)  # [1, 1, rows]: BlockMask's layout
    lo_first, hi_first = reach(first)
    lo_last, hi_last = reach(first + block - 1)
    lo, hi = lo_first // block, hi_last // block  # some pair allowed
    full_lo, full_hi = -(-lo_last // block), (hi_first + 1) // block - 1  # every pair allowed
    none_full = full_lo > full_hi
    full_lo, full_hi = torch.where(none_full, hi + 1, full_lo), torch.where(none_full, hi, full_hi)
    left, right = full_lo - lo, hi - full_hi  # partial blocks on each side of the full ones
    k = torch.arange(width, device=doc.device)
    partial = torch.where(k < left[..., None], lo[..., None] + k, (full_hi - left)[..., None] + 1 + k)
    full = full_lo[..., None] + k

    def ordered(count, indices):  # entries past count are unused: keep them valid block numbers
        return count.to(torch.int32), indices.clamp(0, rows - 1).to(torch.int32)

    kv_num_blocks, kv_indices = ordered(left + right, partial)
    full_kv_num_blocks, full_kv_indices = ordered(full_hi - full_lo + 1, full)
    return dict(
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
    )


def document_mask_mod(doc: torch.Tensor, spec: MaskSpec):
    """The per-token rule for partial blocks: same document (the padding counts as one), then the
    causal/window rule on stream positions. Captures only the doc-id tensor and the spec, so a new
    batch reuses the compiled kernel of its mask kind."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & allowed(q_idx, kv_idx, spec)

    return mask_mod


class FlexAttention:
    """PyTorch FlexAttention with a block mask built from the documents' offsets (compiled on
    CUDA). Inputs are padded to the mask's length and the padding's outputs dropped.

    The kernel runs without duck sizing: by default ``torch.compile`` gives sizes that are equal
    at its first compilation one shared symbol (say 2 heads, 2 rows of blocks and lists 2 wide),
    and the next batch, where they differ, compiles again. ``kernel`` replaces ``flex_kernel``
    (tests count compilations with it)."""

    name = "flex"

    def __init__(self, kernel=None):
        self._kernel = kernel

    def prepare(self, docs: Documents, spec: MaskSpec):
        return flex_block_mask(docs, spec)

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        from torch.fx.experimental import _config as fx_config

        if dropout_p:
            raise EttinError("flex attention backend has no attention-probability dropout")
        n, pad = q.shape[0], plan.seq_lengths[0] - q.shape[0]
        q, k, v = (
            F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(0, 1).unsqueeze(0) for t in (q, k, v)
        )  # [1, heads, padded, dim]
        kernel = self._kernel or flex_kernel(q.device)
        with fx_config.patch(use_duck_shape=False):
            out = kernel(q, k, v, block_mask=plan)
        return out[0, :, :n].transpose(0, 1)


class VarlenAttention:
    """PyTorch's ``varlen_attn`` (``torch.nn.attention.varlen``): the flash kernel shipped with
    torch. CUDA only, fp16/bf16 only, no attention dropout (torch hard-codes it to 0).

    Left to itself torch sends global non-causal batches longer than 128 tokens to cuDNN on
    Hopper, whose graph cache is keyed by the shapes: with a new token count every micro-batch
    that is a graph build per call. A window of ``max_seqlen`` on both sides allows exactly the
    same keys, and flash treats a window that long as unbounded, so every layer stays on flash."""

    name = "varlen"

    def __init__(self):
        from torch.nn.attention.varlen import varlen_attn

        self._fn = varlen_attn

    def prepare(self, docs: Documents, spec: MaskSpec):
        window = varlen_window(spec)
        if window == (-1, -1):
            window = (docs.max_seqlen, docs.max_seqlen)
        return docs.cu_seqlens.to(torch.int32), docs.max_seqlen, window

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        if dropout_p:
            raise EttinError(
                "varlen attention backend has no attention-probability dropout (torch's varlen_attn fixes it at 0)"
            )
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"varlen attention needs fp16 or bf16 inputs, got {q.dtype}: run under autocast or use another backend"
            )
        cu, max_len, window = plan
        return self._fn(q, k, v, cu, cu, max_len, max_len, window_size=window)


def varlen_window(spec: MaskSpec) -> tuple[int, int]:
    """``window_size`` for ``varlen_attn``: (left, right), -1 for unbounded. It switches causal
    masking on exactly when given (-1, 0); a right reach of 0 is causal for local layers too."""
    left, right = spec.window if spec.window is not None else (-1, -1)
    return (left, 0) if spec.causal else (left, right)


class FlashAttention:
    """flash-attn's varlen kernel (CUDA, optional extra ``pip install .[flash]``)."""

    name = "flash"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func

        self._fn = flash_attn_varlen_func

    def prepare(self, docs: Documents, spec: MaskSpec):
        window = spec.window if spec.window is not None else (-1, -1)
        return docs.cu_seqlens.to(torch.int32), docs.max_seqlen, spec.causal, window

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        cu, max_len, causal, window = plan
        return self._fn(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, causal=causal, window_size=window)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _varlen_usable() -> bool:
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)):
        return False
    if not _has_module("torch.nn.attention.varlen"):
        return False
    from torch.nn.attention import varlen

    return hasattr(varlen, "varlen_attn")


@dataclass(frozen=True)
class Backend:
    """One entry of :data:`BACKENDS`: ``build()`` makes the implementation (an object with ``name``,
    ``prepare(docs, spec)`` and ``__call__(q, k, v, plan, dropout_p)``, like the classes above);
    ``usable()`` says whether it runs here, and ``needs`` what it needs when it does not."""

    build: Callable[[], object]
    usable: Callable[[], bool] = lambda: True
    needs: str = ""


AUTO = "auto"  # model.attn_backend's default: chosen by build_attention from AUTO_ON_CUDA, else sdpa
# The backends model.attn_backend may name (ettin.config validates against this table): adding one
# is one entry here.
BACKENDS: dict[str, Backend] = {
    "sdpa": Backend(SdpaAttention),
    "flex": Backend(
        FlexAttention, lambda: _has_module("torch.nn.attention.flex_attention"), "torch.nn.attention.flex_attention"
    ),
    "flash": Backend(
        FlashAttention,
        lambda: torch.cuda.is_available() and _has_module("flash_attn"),
        "CUDA and the flash-attn package (pip install .[flash])",
    ),
    "varlen": Backend(
        VarlenAttention, _varlen_usable, "CUDA (compute capability 8.0 or newer) and torch.nn.attention.varlen"
    ),
}
AUTO_ON_CUDA = ("varlen", "flash", "flex")  # auto's preference for a model on CUDA; sdpa when none is available


def backend_names() -> list[str]:
    """Every name model.attn_backend accepts: auto, then the registered backends."""
    return [AUTO, *BACKENDS]


def available_backends() -> list[str]:
    return [name for name, backend in BACKENDS.items() if backend.usable()]


def build_attention(name: str = AUTO, device_type: str | None = None):
    """``auto``: for a model on CUDA (``device_type``; by default, wherever CUDA is available),
    torch's varlen kernel, else flash-attn when installed, else FlexAttention; SDPA elsewhere (a
    CPU run on a GPU node included)."""
    names = available_backends()
    if name == AUTO:
        on_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
        preferred = AUTO_ON_CUDA if on_cuda else ()
        name = next((n for n in preferred if n in names), "sdpa")
    if name not in BACKENDS:
        raise EttinError(f"unknown attention backend '{name}': use one of {', '.join(backend_names())}")
    if name not in names:
        raise EttinError(
            f"attention backend '{name}' is not available here (it needs {BACKENDS[name].needs}; "
            f"available: {', '.join(names)}); set model.attn_backend to one of those"
        )
    return BACKENDS[name].build()


def reference_attention(q, k, v, docs: Documents, spec: MaskSpec) -> torch.Tensor:
    """Plain softmax attention, one document at a time, with the mask written out by ``allowed``:
    what every backend must reproduce. Computes in the inputs' dtype (the checks use fp64)."""
    outs = []
    for s, e in zip(docs.bounds[:-1], docs.bounds[1:]):
        pos = torch.arange(e - s, device=q.device)
        mask = allowed(pos[:, None], pos[None, :], spec)
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / math.sqrt(q.shape[-1])
        outs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v[s:e]))
    return torch.cat(outs) if outs else torch.zeros_like(q)


CHECK_MASKS = {
    "encoder global": MaskSpec(False, None),
    "encoder local": MaskSpec(False, (64, 64)),
    "decoder global": MaskSpec(True, None),
    "decoder local": MaskSpec(True, (63, 0)),
}
# a lone token, exactly one block, one past it, a document spanning several blocks and windows...
CHECK_LENGTHS = (1, 128, 129, 7, 300, 255, 2)
# largest error allowed, relative to the reference's largest magnitude (at least 1)
CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def reference_check(
    backend_name: str, device, dtype: torch.dtype, seed: int = 0, heads: int = 2, head_dim: int = 64
) -> list[dict]:
    """Run one backend on ``CHECK_LENGTHS`` for the four mask kinds of ``CHECK_MASKS`` and compare
    outputs and q/k/v gradients with ``reference_attention`` in fp64 on the CPU, fed the very same
    (rounded) inputs, so only the backend's own error is measured. One row per mask:
    backend, mask, device, dtype, max_abs_out, max_abs_grad (None where the backend has no backward
    on that device: flex on the CPU), tol, ok."""
    attend, device = build_attention(backend_name), torch.device(device)
    bounds = (0, *itertools.accumulate(CHECK_LENGTHS))
    docs = Documents(torch.tensor(bounds, dtype=torch.int32, device=device), bounds, max(CHECK_LENGTHS))
    host_docs = Documents(torch.tensor(bounds, dtype=torch.int32), bounds, max(CHECK_LENGTHS))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(docs.total, heads, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    tol = CHECK_TOLERANCE[dtype]
    # FlexAttention has no backward on the CPU (torch refuses inputs that require grad there)
    differentiable = not (attend.name == "flex" and device.type == "cpu")
    rows = []
    for mask_name, spec in CHECK_MASKS.items():
        inputs = [t.clone().requires_grad_(differentiable) for t in (q, k, v)]
        out = attend(*inputs, attend.prepare(docs, spec))
        exact = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*exact, host_docs, spec)
        err_out = (out.detach().cpu().double() - ref).abs().max().item()
        ok = err_out <= tol * max(1.0, ref.abs().max().item())
        err_grad = None
        if differentiable:
            grads = torch.autograd.grad(out, inputs, grad)
            ref_grads = torch.autograd.grad(ref, exact, grad.cpu().double())
            err_grad = max((g.cpu().double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
            ok = ok and err_grad <= tol * max(1.0, max(r.abs().max().item() for r in ref_grads))
        rows.append(
            {
                "backend": attend.name,
                "mask": mask_name,
                "device": str(device),
                "dtype": str(dtype).replace("torch.", ""),
                "max_abs_out": err_out,
                "max_abs_grad": err_grad,
                "tol": tol,
                "ok": ok,
            }
        )
    return rows
