"""The DeepSpeed engine (ZeRO 1/2 over megatron-core's groups) and its topology-free state.

DeepSpeed gets the megatron TP x DP groups through a small ``mpu`` adapter. Checkpoints do not use
DeepSpeed's per-rank files: every parameter's fp32 master weight and optimizer moments are
gathered whole (DeepSpeed's ``safe_get_full_*`` across DP, our all-gather across TP) and written
once, by name. Loading slices them for whatever TP x DP the new run has, so a checkpoint resumes
on any topology (our own consolidation, in the spirit of DeepSpeed's universal checkpoint).

Gradient precision under bf16 (``train.grad_accum_dtype``; DeepSpeed 0.19.8 as read):
- ``fp32`` (default): ``data_types.grad_accum_dtype=fp32`` and ``communication_data_type=fp32``.
  Each micro-batch's bf16 gradient is added into fp32 right after its backward, and the DP
  reduction runs in fp32. At ZeRO-1 DeepSpeed then picks ``BF16_Optimizer``
  (engine.py ``_do_optimizer_sanity_check``): a full fp32 gradient buffer per rank
  (bf16_optimizer.py ``_update_hp_grad``), all-reduced once per step by the engine
  (``buffered_allreduce_fallback`` -> ``allreduce_bucket``, which casts to
  ``communication_data_type``; left at its bf16 default that rounds the fp32 sums to bf16, even
  at DP=1, where it all-reduces over a group of one: measured ~3e-3 relative). At ZeRO-2 it stays
  ``DeepSpeedZeroOptimizer`` with an fp32 partition buffer: every micro-batch's bf16 gradients
  are bucketed, reduced in ``communication_data_type`` to their owner and added into that buffer
  (stage_1_and_2.py ``_add_to_grad_partition_buffer``). Left in bf16: each micro-batch's own
  gradient (the bf16 backward makes it), and at ZeRO-2 the bucket is divided by the DP size in
  bf16 before the cast (exact for a power-of-two DP size).
- ``bf16``: ZeRO's optimizer at both stages, gradients summed and reduced in bf16 (the old
  behaviour: ~1e-2 of the largest entry after only 6 micro-batches in tests/test_engine.py).
Either way DeepSpeed makes the fp32 masters from the bf16 copy of the weights, so a fresh run
starts from bf16-rounded weights; ``restore_training_state`` restores full fp32 masters.

Why ZeRO-1 is the default: ZeRO-1 reduces once per optimizer step; ZeRO-2 owns gradient
partitions, so every micro-batch's backward must hand its gradients to their owners: with tens of
micro-batches per step that is tens of times the traffic, to save a gradient buffer (4 bytes per
parameter under fp32 accumulation) that ettin's model sizes do not need. ZeRO-2 is for when memory
is short; it then runs with ``overlap_comm``: the per-micro-batch reduction overlaps the backward
on a side stream, but DeepSpeed's epilogue waits for the device at the end of every micro-batch
(stage_1_and_2.py ``independent_gradient_partition_epilogue``), one more reason for ZeRO-1 (on
the CPU DeepSpeed has no streams and reduces inline; it runs and is tested).

Skipped steps: DeepSpeed skips every optimizer step whose gradient norm is not finite, in each
configuration here. BF16_Optimizer.step always does (``is_invalid_grad_norm``); ZeRO's step does
when ``bf16.check_grad_overflow`` (default true, set explicitly) or the dtype is not bf16
(stage_1_and_2.py ``step``). There is no loss scaling under bf16 (ZeRO asserts a scale of 1).
A skip zeroes the gradients, leaves weights, moments and the step counter alone, and counts in
``engine.skipped_steps`` (engine.py ``_take_model_step``); StableAdamW.step does not run, so read
``skipped_steps`` / ``grad_norm`` below rather than the optimizer's stale norm.
"""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state as ps

from ettin.errors import EttinError
from ettin.parallel import gather_tp, is_tp_sharded, tp_rank, tp_size
from ettin.train.optim import Layout, Segment, StableAdamW, param_groups

MOMENTS = ("exp_avg", "exp_avg_sq")


class MegatronMPU:
    """What DeepSpeed asks of an ``mpu``: model(=tensor)-parallel and data-parallel groups."""

    def get_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size()


def deepspeed_config(cfg, bf16: bool) -> dict:
    stage = cfg.parallel.zero_stage
    config = {
        "train_micro_batch_size_per_gpu": 1,  # informational: we cut micro-batches by tokens ourselves
        "gradient_accumulation_steps": 1,  # we mark accumulation boundaries ourselves (batch sizes vary)
        # ZeRO-2 reduces every micro-batch: overlap that with the backward (see the module docstring)
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": stage == 2,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "gradient_clipping": 0.0,  # StableAdamW's update clipping replaces it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # on by default, its timer calls torch.cuda.synchronize() around every micro-batch's forward
        # when DeepSpeed was given no dataloader (engine.py forward pre-hook, utils/timer.py)
        "timers": {"throughput": {"enabled": False}},
    }
    if bf16:  # accumulation and the DP reduction in one precision (fp32 by default)
        config["data_types"] = {"grad_accum_dtype": cfg.train.grad_accum_dtype}
        config["communication_data_type"] = cfg.train.grad_accum_dtype
    return config


def build_engine(model: torch.nn.Module, cfg, bf16: bool):
    """Wrap ``model`` in a DeepSpeed engine with our StableAdamW; returns (engine, optimizer)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    o = cfg.optim
    optimizer = StableAdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, max_lr=o.lr
    )
    engine, zero, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16), mpu=MegatronMPU()
    )
    optimizer.set_layout(_layout(model, master_partitions(zero)))
    optimizer.init_state()
    zero._lazy_init_hp_params_optimizer_state()  # link each parameter to its moments' fragments
    return engine, optimizer


def master_partitions(zero) -> list[torch.Tensor]:
    """This rank's flat fp32 master partition of each parameter group: the tensors StableAdamW
    steps. ZeRO and BF16_Optimizer keep the same thing under different names."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return zero.fp32_groups_flat_partition if isinstance(zero, BF16_Optimizer) else zero.single_partition_of_fp32_groups


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed skipped for a non-finite gradient norm since the engine was built."""
    return int(engine.skipped_steps)


def grad_norm(engine, optimizer: StableAdamW) -> torch.Tensor:
    """The last step's global gradient norm, a 0-dim tensor on the device (no host sync); inf when
    DeepSpeed skipped that step (the optimizer did not run, its own norm is the step before's)."""
    if engine.was_step_applied():
        return optimizer.last_grad_norm
    return torch.full((), float("inf"), dtype=torch.float64, device=optimizer.last_grad_norm.device)


def _layout(model: torch.nn.Module, flat_partitions: list[torch.Tensor]) -> Layout:
    """Where each parameter's slice sits in this rank's flat ZeRO partition of its group."""
    segments: dict = {}
    numel, split = [], []
    for i, p in enumerate(model.parameters()):
        sharded = is_tp_sharded(p)
        numel.append(p.numel() * (tp_size() if sharded else 1))
        split.append(sharded)
        m = getattr(p, "_hp_mapping", None)
        if m is not None:
            a = m.get_hp_fragment_address()
            flat = flat_partitions[m.param_group_index]
            segments.setdefault(id(flat), []).append(Segment(a.start, a.numel, i))
    return Layout(segments, numel, split, ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group())


def gather_training_state(model: torch.nn.Module, keep: bool) -> tuple[dict, dict]:
    """(weights, moments) of a model inside the DeepSpeed engine, for a checkpoint: the fp32 master
    weights and StableAdamW's moments, every tensor whole (all DP and TP pieces), by name, on the CPU.
    (ettin.parallel.full_state_dict is the other thing: a plain model's working weights, no engine.)

    Every rank must call it (the gathers are collective); only ``keep`` ranks hold the result."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, moments = {}, {}
    for name, p in model.named_parameters():
        pieces = {"": safe_get_full_fp32_param(p)} | {f".{k}": safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        for suffix, t in pieces.items():
            t = gather_tp(t.float(), p.partition_dim) if is_tp_sharded(p) else t.float()
            if keep:
                (weights if suffix == "" else moments)[name + suffix] = t.detach().cpu().contiguous()
    return weights, moments


@torch.no_grad()
def restore_training_state(model: torch.nn.Module, optimizer: StableAdamW, weights, moments, step: int | None) -> None:
    """The inverse of :func:`gather_training_state`: load whole tensors (``TensorFile``s) into this
    rank's pieces of the fp32 masters, the working weights and the moments; ``moments=None`` keeps a
    fresh optimizer; ``step`` sets the optimizer's step (bias correction)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {n for n, _ in model.named_parameters()}
    missing, unexpected = names - weights.keys(), weights.keys() - names
    if missing or unexpected:
        raise EttinError(
            f"{weights.path}: does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); check model.* against the checkpoint's model.json"
        )
    for name, p in model.named_parameters():

        def local(source, key):
            t = source.read(key, p.partition_dim if is_tp_sharded(p) else None, tp_rank(), tp_size())
            if t.shape != p.shape:
                raise EttinError(
                    f"{source.path}: {name} has shape {tuple(t.shape)}, this rank's piece of the model "
                    f"needs {tuple(p.shape)}; check model.* and parallel.tensor against the checkpoint"
                )
            return t.to(p.device, torch.float32)

        w = local(weights, name)
        safe_set_full_fp32_param(p, w)  # the fp32 master slice
        p.data.copy_(w)  # and the working copy every DP rank holds under ZeRO 1/2
        if moments is not None:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, local(moments, f"{name}.{k}"), k)
    if step is not None:
        for group in optimizer.param_groups:
            group["step"] = step
