"""Process groups and tensor-parallel building blocks (megatron-core's layers) in one place, and
the fused vocab head + cross-entropy.

The model asks this module for its linear layers and embedding; at TP=1 they are the same
megatron-core layers over a group of one, so there is a single code path. Weights are created
on the CPU from a full "master" tensor and split, which makes every TP size start from the
same numbers for the same seed.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ettin.errors import EttinError

with warnings.catch_warnings():  # megatron-core announces, per module, that it falls back to torch
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel


def init_process_groups(tp: int = 1, backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialize torch.distributed (from RANK/WORLD_SIZE env, or a group of one) and TP x DP groups."""
    skip_deepspeed_shm_op()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun / srun / spawned ranks
            dist.init_process_group(backend, timeout=timeout)
        else:  # a lone process (tools, notebooks): a private in-memory group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tp:
            return
        parallel_state.destroy_model_parallel()
    if dist.get_world_size() % tp:
        raise EttinError(f"world size {dist.get_world_size()} is not divisible by parallel.tensor={tp}")
    # the TP and DP groups carry most collectives: give them the same bounded timeout. megatron's
    # own gloo groups go unused (ours are made by host_group, only where needed): not created.
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
        create_gloo_process_groups=False,
    )
    _HOST_GROUPS.clear()
    _HOST_GROUPS_TIMEOUT[0] = datetime.timedelta(seconds=timeout_s)


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from compiling anything at job start on the CPU.

    On the CPU accelerator DeepSpeed's comm backend (``TorchBackend.__init__``, reached from
    ``deepspeed.initialize``) loads the ``deepspeed_shm_comm`` C++ op, building it with ninja into
    ``$TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions``) the first time: slow, and concurrent
    jobs race on that shared folder (a fresh ``make test`` failed with "Error building extension
    'deepspeed_shm_comm'"). The op serves only ``inference_all_reduce``, which training never
    calls: gloo carries every collective. DeepSpeed builds it only if its table
    ``deepspeed.ops.__compatible_ops__`` says the op can be built; the table is filled on first
    read by probing every op (the C compiler run on test programs, ~1 s per process), and that
    check is its only reader (DeepSpeed 0.19.8). So the table is set here, before anything reads
    it, with the op marked unusable: no probe, no build. DeepSpeed keeps one table per process so
    that such edits persist. On CUDA the accelerator has no such builder and nothing is touched.
    Idempotent."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    import deepspeed.ops

    table = deepspeed.ops.__dict__.get("__compatible_ops__")
    if table is None:  # not probed yet: an op missing from the table counts as not buildable
        table = deepspeed.ops.__compatible_ops__ = {}
    table[builder.NAME] = False


_HOST_GROUPS: dict = {}  # ranks (or "world") -> a gloo group
_HOST_GROUPS_TIMEOUT = [datetime.timedelta(minutes=10)]  # the collective timeout given to init_process_groups


def host_group(group=None):
    """A gloo group over the same ranks as ``group`` (default: all ranks), for the small exchanges
    that live on the host: label counts, sample digests, stop flags. Over NCCL they would travel
    through the GPU and make the host wait for it. Where the default backend is gloo already, the
    group itself. Collective on first use: every rank makes every group of the same kind, in
    the same order (made once, then cached)."""
    if dist.get_backend() == "gloo":
        return group or dist.group.WORLD
    key = "world" if group is None else tuple(dist.get_process_group_ranks(group))
    if key not in _HOST_GROUPS:
        if group is None:
            _HOST_GROUPS[key] = dist.new_group(backend="gloo", timeout=_HOST_GROUPS_TIMEOUT[0])
        else:  # e.g. the DP groups: one per TP rank; every rank learns them all, then makes them in order
            mine, every = list(key), [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            for ranks in sorted({tuple(r) for r in every}):
                made = dist.new_group(list(ranks), backend="gloo", timeout=_HOST_GROUPS_TIMEOUT[0])
                if ranks == key:
                    _HOST_GROUPS[key] = made
    return _HOST_GROUPS[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def _mp_config():
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size(),
        use_cpu_initialization=True,  # full master weight on every rank, then split: TP-invariant init
        perform_initialization=True,
        params_dtype=torch.float32,
    )


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """y[..., local out] = x W_local^T: output dims split across TP ranks (no bias)."""

    def forward(self, x):
        return super().forward(x)[0]  # megatron returns (output, bias)


class RowLinear(tensor_parallel.RowParallelLinear):
    """y = sum over TP ranks of x_local W_local^T: input dims split, output replicated (no bias)."""

    def forward(self, x):
        return super().forward(x)[0]


def column_linear(in_features: int, out_features: int, init: Callable) -> nn.Module:
    return ColumnLinear(
        in_features,
        out_features,
        config=_mp_config(),
        init_method=init,
        bias=False,
        gather_output=False,
        tp_group=tp_group(),
    )


def row_linear(in_features: int, out_features: int, init: Callable) -> nn.Module:
    return RowLinear(
        in_features,
        out_features,
        config=_mp_config(),
        init_method=init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=tp_group(),
    )


def vocab_embedding(vocab_size: int, hidden: int, init: Callable) -> nn.Module:
    return tensor_parallel.VocabParallelEmbedding(
        vocab_size, hidden, init_method=init, config=_mp_config(), tp_group=tp_group()
    )


def vocab_bias(vocab_size: int) -> nn.Parameter:
    """The prediction head's bias, split like the embedding rows."""
    bias = nn.Parameter(torch.zeros(vocab_size // tp_size()))
    tensor_parallel.set_tensor_model_parallel_attributes(bias, is_parallel=True, dim=0, stride=1)
    return bias


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (entering a TP region)."""
    return tensor_parallel.copy_to_tensor_model_parallel_region(x, group=tp_group())


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
    correct: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i CE(x_i W^T + b, labels_i)`` for the vocab-split head ``W [V/tp, h]``, ``b [V/tp]``.

    The logits never exist whole: chunk by chunk of tokens they are computed into one reused
    fp32 buffer, turned in place into ``sumexp · (softmax - onehot)`` (in fp32, so a confident
    prediction does not cancel in bf16), and the gradients of x, W and b are taken right away; the
    ``1 / sumexp`` scales the small [tokens, h] factors, never the [tokens, V] block. Backward only
    scales them. Against autograd through materialized logits this saves the big intermediates
    and most passes over them (docs/PERFORMANCE.md). ``x`` is replicated over TP; the softmax
    statistics and grad x are all-reduced over the TP group. Without autograd only the loss is
    computed. ``correct`` (an int64 scalar), when given, is increased by the number of labels whose
    logit is the largest (argmax accuracy, for evaluation)."""
    if not weight.dtype == bias.dtype == x.dtype:
        raise TypeError(f"linear_cross_entropy: x {x.dtype}, weight {weight.dtype} and bias {bias.dtype} differ")
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    return _LinearCrossEntropy.apply(x, weight, bias, labels, chunk, grads, correct)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk, grads, correct=None):
        tp, rows = tp_size(), weight.shape[0]
        local = labels - tp_rank() * rows
        here = (local >= 0) & (local < rows)  # labels in this rank's vocab shard
        local = torch.where(here, local, 0)
        if grads:
            grad_x = torch.empty_like(x, dtype=torch.float32)
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
            grad_b = torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        buffer = torch.empty(min(chunk, x.shape[0]), rows, dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xc, lc, hc = x[s : s + chunk], local[s : s + chunk, None], here[s : s + chunk, None]
            logits = buffer[: len(xc)]
            if x.dtype == torch.float32:
                torch.addmm(bias, xc, weight.t(), out=logits)
            else:  # bf16 matmul, fp32 softmax
                logits.copy_(F.linear(xc, weight, bias))
            peak = logits.amax(1, keepdim=True)
            target = torch.where(hc, logits.gather(1, lc), 0.0)
            if tp > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group())
                dist.all_reduce(target, group=tp_group())
            if correct is not None:
                correct += (target >= peak).sum()
            logits.sub_(peak).exp_()  # unnormalized softmax
            sumexp = logits.sum(1, keepdim=True)
            if tp > 1:
                dist.all_reduce(sumexp, group=tp_group())
            total += (peak + sumexp.log() - target).sum()
            if not grads:
                continue
            logits.scatter_add_(1, lc, torch.where(hc, -sumexp, 0.0))  # sumexp · (softmax - onehot)
            inv, delta = sumexp.reciprocal(), logits.to(x.dtype)
            gx = torch.mm(delta, weight).float() * inv
            if tp > 1:
                dist.all_reduce(gx, group=tp_group())
            grad_x[s : s + len(xc)] = gx
            grad_w += torch.mm(delta.t(), (xc.float() * inv).to(x.dtype)).float()
            grad_b += torch.mv(logits.t(), inv[:, 0])
        if grads:
            ctx.save_for_backward(grad_x, grad_w, grad_b)
            ctx.dtype = x.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad_x, grad_w, grad_b = ((g * grad_total).to(ctx.dtype) for g in ctx.saved_tensors)
        return grad_x, grad_w, grad_b, None, None, None, None


def gather_tp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate the TP ranks' shards of ``x`` along ``dim`` (no gradient)."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous(), group=tp_group())
    return torch.cat(parts, dim=dim)


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The TP-independent state dict of a plain model (no DeepSpeed engine): its working weights, every
    sharded parameter gathered along its split dim (a checkpoint's masters and moments:
    ettin.train.engine.gather_training_state)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = gather_tp(p.detach(), p.partition_dim) if is_tp_sharded(p) else p.detach().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a TP-independent state dict, keeping this rank's shard of every split parameter."""
    params = dict(model.named_parameters())
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise EttinError(
            f"weights do not fit this model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; "
            "check the model config (size, vocab) against the checkpoint's model.json"
        )
    for name, p in params.items():
        full = state[name]
        if is_tp_sharded(p):
            full = full.chunk(tp_size(), dim=p.partition_dim)[tp_rank()]
        if full.shape != p.shape:
            raise EttinError(f"{name}: shape {tuple(full.shape)} does not fit parameter {tuple(p.shape)}")
        p.copy_(full)
