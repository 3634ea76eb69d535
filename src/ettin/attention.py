"""Attention over unpadded token streams, behind one interface.

Inputs are ``q, k, v`` of shape ``[tokens, heads, head_dim]`` for documents laid end to end, with
``cu_seqlens`` (int32, ``[docs + 1]``) marking where each starts. A token at position ``i`` may see
key ``j`` of the same document when ``j <= i`` (if causal) and, for local layers,
``i - left <= j <= i + right``. Backends: flash-attn varlen (CUDA), FlexAttention (any device,
compiled on CUDA), and SDPA (any device; the CPU default): per document for global layers, in
blocks of the window for local ones.

A backend first ``prepare``s a plan for one batch and one mask kind (masks, doc ids), once per
forward; every layer of that kind then reuses it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskSpec:
    causal: bool
    window: Optional[tuple[int, int]]  # (left, right) in tokens; None = global


def allowed(q_idx: torch.Tensor, k_idx: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """Whether query position q_idx may attend to key k_idx (same document assumed)."""
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

    def prepare(self, cu_seqlens: torch.Tensor, max_seqlen: int, spec: MaskSpec):
        if spec.window is None:
            return "documents", cu_seqlens.tolist(), spec
        return ("blocks", *local_blocks(cu_seqlens, spec))

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        if plan[0] == "documents":
            _, bounds, spec = plan
            out = torch.empty_like(q)
            for s, e in zip(bounds[:-1], bounds[1:]):
                qd, kd, vd = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
                out[s:e] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=spec.causal,
                                                          dropout_p=dropout_p).transpose(0, 1)
            return out
        _, queries, keys, mask, slots = plan
        qb, kb, vb = (t[idx].transpose(1, 2) for t, idx in ((q, queries), (k, keys), (v, keys)))
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)  # [blocks, heads, B, dim]
        return out.transpose(1, 2).flatten(0, 1)[slots]


def local_blocks(cu_seqlens: torch.Tensor, spec: MaskSpec):
    """Gather indices for blocked local attention: query block ``i`` of a document holds tokens
    ``[i·B, (i+1)·B)`` and sees the key blocks ``i - 1 .. i + 1`` (only the sides the window
    reaches). Returns query and key indices into the token stream (slots past a document's end
    point at token 0 and are masked or dropped), the [blocks, 1, B, keys] mask, and each token's
    slot in the blocked output. Built on the device, without host syncs beyond the bounds."""
    left, right = spec.window
    size = max(left, right, 1)
    before, after = int(left > 0), int(right > 0)
    device, bounds = cu_seqlens.device, cu_seqlens.tolist()
    total = sum(-(-(e - s) // size) for s, e in zip(bounds[:-1], bounds[1:]))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    blocks = (lengths + size - 1) // size
    first = torch.cumsum(blocks, 0) - blocks  # each document's first block
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), blocks, output_size=total)
    block = torch.arange(total, device=device) - first[doc]  # block number inside its document
    q_pos = block[:, None] * size + torch.arange(size, device=device)  # position inside the document
    k_pos = (block[:, None] - before) * size + torch.arange((before + 1 + after) * size, device=device)
    start, length = cu_seqlens[:-1][doc][:, None].long(), lengths[doc][:, None]
    q_ok, k_ok = q_pos < length, (k_pos >= 0) & (k_pos < length)
    queries, keys = torch.where(q_ok, start + q_pos, 0), torch.where(k_ok, start + k_pos, 0)
    mask = k_ok[:, None, :] & allowed(q_pos[:, :, None], k_pos[:, None, :], spec)
    mask |= ~q_ok[:, :, None]  # padding queries see everything (never an all-masked row); they are dropped
    slots = torch.repeat_interleave(first * size - cu_seqlens[:-1].long(), lengths, output_size=bounds[-1])
    return queries, keys, mask[:, None], slots + torch.arange(bounds[-1], device=device)


class FlexAttention:
    """PyTorch FlexAttention with a block mask built from document ids (compiled on CUDA)."""

    name = "flex"

    def __init__(self):
        from torch.nn.attention import flex_attention as fa

        self._fa = fa
        # the token count changes every micro-batch: compile for dynamic shapes, not once per length
        self._attend = torch.compile(fa.flex_attention, dynamic=True) if torch.cuda.is_available() else fa.flex_attention

    def prepare(self, cu_seqlens: torch.Tensor, max_seqlen: int, spec: MaskSpec):
        n = int(cu_seqlens[-1])
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
        start = cu_seqlens[:-1][doc]

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return same & allowed(q_idx - start[q_idx], kv_idx - start[kv_idx], spec)

        device = "cuda" if cu_seqlens.is_cuda else "cpu"
        return self._fa.create_block_mask(mask_mod, None, None, n, n, device=device, _compile=cu_seqlens.is_cuda)

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        if dropout_p:
            raise ValueError("flex attention backend has no attention-probability dropout")
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, tokens, dim]
        return self._attend(q, k, v, block_mask=plan).squeeze(0).transpose(0, 1)


class FlashAttention:
    """flash-attn's varlen kernel (CUDA, optional extra ``pip install .[flash]``)."""

    name = "flash"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func

        self._fn = flash_attn_varlen_func

    def prepare(self, cu_seqlens, max_seqlen, spec: MaskSpec):
        window = spec.window if spec.window is not None else (-1, -1)
        return cu_seqlens.to(torch.int32), int(max_seqlen), spec.causal, window

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        cu, max_len, causal, window = plan
        return self._fn(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, causal=causal, window_size=window)


BACKENDS = {"sdpa": SdpaAttention, "flex": FlexAttention, "flash": FlashAttention}


def available_backends() -> list[str]:
    names = ["sdpa"]
    if hasattr(torch.nn.attention, "flex_attention") or importlib.util.find_spec("torch.nn.attention.flex_attention"):
        names.append("flex")
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash")
    return names


def build_attention(name: str = "auto"):
    """``auto`` picks flash-attn on CUDA when installed, FlexAttention on CUDA, else SDPA."""
    if name == "auto":
        names = available_backends()
        name = "flash" if "flash" in names else ("flex" if torch.cuda.is_available() and "flex" in names else "sdpa")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}': use one of auto, {', '.join(BACKENDS)}")
    if name not in available_backends():
        raise ValueError(f"attention backend '{name}' is not available here (available: {', '.join(available_backends())}); "
                         "set model.attn_backend to one of those")
    return BACKENDS[name]()
