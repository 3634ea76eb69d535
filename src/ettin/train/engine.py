"""The DeepSpeed engine (ZeRO 1/2 over megatron-core's groups) and its topology-free state.

DeepSpeed gets the megatron TP x DP groups through a small ``mpu`` adapter. Checkpoints do not use
DeepSpeed's per-rank files: every parameter's fp32 master weight and optimizer moments are
gathered whole (DeepSpeed's ``safe_get_full_*`` across DP, our all-gather across TP) and written
once, by name. Loading slices them for whatever TP x DP the new run has, so a checkpoint resumes
on any topology (our own consolidation, in the spirit of DeepSpeed's universal checkpoint).
"""
from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state as ps

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
    return {
        "train_micro_batch_size_per_gpu": 1,  # informational: we cut micro-batches by tokens ourselves
        "gradient_accumulation_steps": 1,  # we mark accumulation boundaries ourselves (batch sizes vary)
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "overlap_comm": False,
                              "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
        "bf16": {"enabled": bf16},
        "gradient_clipping": 0.0,  # StableAdamW's update clipping replaces it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg, bf16: bool):
    """Wrap ``model`` in a DeepSpeed engine with our StableAdamW; returns (engine, optimizer)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    o = cfg.optim
    optimizer = StableAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                            weight_decay=o.weight_decay, max_lr=o.lr)
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16),
                                              mpu=MegatronMPU())
    optimizer.set_layout(_layout(model, zero.single_partition_of_fp32_groups))
    optimizer.init_state()
    zero._lazy_init_hp_params_optimizer_state()  # link each parameter to its moments' fragments
    return engine, optimizer


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


def full_state(model: torch.nn.Module, keep: bool) -> tuple[dict, dict]:
    """(weights, moments), every tensor whole (all DP and TP pieces), fp32, by name, on the CPU.

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
def load_full_state(model: torch.nn.Module, optimizer: StableAdamW, weights, moments, step: int | None) -> None:
    """Load whole tensors (``TensorFile``s) into this rank's pieces; ``moments=None`` keeps a fresh optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {n for n, _ in model.named_parameters()}
    missing, unexpected = names - weights.keys(), weights.keys() - names
    if missing or unexpected:
        raise ValueError(f"{weights.path}: does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}); check model.* against the checkpoint's model.json")
    for name, p in model.named_parameters():
        def local(source, key):
            t = source.read(key, p.partition_dim if is_tp_sharded(p) else None, tp_rank(), tp_size())
            if t.shape != p.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} does not fit {tuple(p.shape)}")
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
