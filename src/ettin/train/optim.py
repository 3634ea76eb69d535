"""StableAdamW that gives the same update at every TP and DP size (the LR schedule: ettin.train.lr_schedule).

The math is torch-optimi's ``StableAdamW`` (debiased betas folded into the moving averages,
fully decoupled weight decay, no gradient clipping): each parameter's learning rate is divided
by ``max(1, RMS(g² / max(v, eps²)))``, an RMS over the whole parameter. Under ZeRO the optimizer
only sees this rank's slice of a flat buffer, and under TP only a shard of the parameter, so a
plain per-tensor RMS would change with the topology. Here the optimizer is told which slices
belong to which parameter (``set_layout``), sums its partial RMS terms, and all-reduces one small
vector per step over the data-parallel group (and the TP group for TP-split parameters). Without
a layout every tensor is its own parameter, which is optimi's behaviour exactly.

``last_grad_norm`` is the global gradient norm of the last step, a 0-dim float64 tensor on the
parameters' device: it comes from the same reduction, and reading it is left to the caller (one
host sync per step, together with the loss). DeepSpeed calls ``step()`` in two patterns: ZeRO
(stage_1_and_2.py ``_optimizer_step``) once per parameter group with the other groups hidden,
BF16_Optimizer and plain torch once with every group; the norm counts each group once in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def debias_beta(beta: float, step: int) -> float:
    """Adam's bias correction folded into the EMA coefficient (as torch-optimi does)."""
    return (beta**step - beta) / (beta**step - 1)


@dataclass(frozen=True)
class Segment:
    start: int
    numel: int
    param: int  # index of the logical parameter


@dataclass
class Layout:
    """Which slice of which optimizer tensor belongs to which logical parameter."""

    segments: dict[int, list[Segment]]  # id(optimizer tensor) -> its segments
    numel: list[int]  # full size of each logical parameter (all TP shards)
    tp_split: list[bool]  # the parameter is split across TP ranks
    dp_group: object = None
    tp_group: object = None
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def device_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(numel as float64, tp_split as bool) on ``device``, made once: building them every step
        would be a host-to-device copy from pageable memory, which waits for the device."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (
                torch.tensor(self.numel, dtype=torch.float64, device=device),
                torch.tensor(self.tp_split, dtype=torch.bool, device=device),
            )
        return self._on_device[key]


class StableAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_lr: float | None = None,
    ):
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_lr=max_lr or lr, step=0)
        )
        self.layout: Layout | None = None
        self.last_grad_norm = torch.tensor(float("nan"), dtype=torch.float64)
        self._all_groups: list[dict] | None = None  # ZeRO hides all but one group during step()
        self._grad_sq: dict[int, torch.Tensor] = {}  # id(param group) -> its squared gradient norm

    def set_layout(self, layout: Layout) -> None:
        self.layout = layout
        self._all_groups = list(self.param_groups)

    def init_state(self) -> None:
        """Create zero moments now (not at the first step), so a checkpoint can be loaded into them."""
        for group in self.param_groups:
            for p in group["params"]:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)

    def _segments(self, p: torch.Tensor) -> list[Segment]:
        if self.layout is None:
            return [Segment(0, p.numel(), -1)]
        return self.layout.segments.get(id(p), [])

    @torch.no_grad()
    def step(self, closure=None):
        self.init_state()
        # ZeRO calls step() once per parameter group (the others hidden), BF16_Optimizer once with all;
        # every logical parameter lives in exactly one group, so each call's reductions are complete
        # for the groups it sees.
        tensors = []  # (group, param, grad, exp_avg, exp_avg_sq, segments)
        for group in self.param_groups:
            group["step"] += 1
            b1, b2 = group["betas"]
            beta1_hat, beta2_hat = debias_beta(b1, group["step"]), debias_beta(b2, group["step"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                state["exp_avg"].lerp_(grad, 1 - beta1_hat)
                state["exp_avg_sq"].mul_(beta2_hat).addcmul_(grad, grad, value=1 - beta2_hat)
                tensors.append((group, p, grad, state["exp_avg"], state["exp_avg_sq"], self._segments(p)))

        scales = self._rms_scales(tensors)
        for k, (group, p, _grad, exp_avg, exp_avg_sq, segments) in enumerate(tensors):
            update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
            flat_p, flat_u = p.view(-1), update.view(-1)
            for seg in segments:
                lr = group["lr"] * (scales[seg.param] if seg.param >= 0 else scales[("tensor", k)])
                part = flat_p.narrow(0, seg.start, seg.numel)
                if group["weight_decay"]:
                    part.mul_(1 - lr / group["max_lr"] * group["weight_decay"])
                part.sub_(flat_u.narrow(0, seg.start, seg.numel) * lr)

    def _rms_scales(self, tensors) -> dict:
        """1 / max(1, RMS) per logical parameter (tensors on the parameters' device, no host sync);
        also sets ``last_grad_norm``, the global gradient norm, from the same reduction."""
        device = tensors[0][1].device if tensors else torch.device("cpu")
        if self.layout is None:
            out, grad_sq = {}, torch.zeros((), dtype=torch.float64, device=device)
            for k, (group, _p, grad, _, exp_avg_sq, _) in enumerate(tensors):
                rms = grad.pow(2).div_(exp_avg_sq.clamp(min=group["eps"] ** 2)).mean().sqrt()
                out[("tensor", k)] = 1 / rms.clamp(min=1)
                grad_sq += grad.float().pow(2).sum(dtype=torch.float64)
            self._record_grad_sq(grad_sq)
            return out
        lay = self.layout
        numel, split = lay.device_tensors(device)
        sums = torch.zeros(2, len(lay.numel), dtype=torch.float64, device=device)  # [RMS terms, grad squares]
        for group, _p, grad, _, exp_avg_sq, segments in tensors:
            g = grad.float().view(-1)
            ratio = g.pow(2) / exp_avg_sq.float().view(-1).clamp(min=group["eps"] ** 2)
            for seg in segments:
                sums[0, seg.param] += ratio.narrow(0, seg.start, seg.numel).sum(dtype=torch.float64)
                sums[1, seg.param] += g.narrow(0, seg.start, seg.numel).pow(2).sum(dtype=torch.float64)
        if lay.dp_group is not None and dist.get_world_size(lay.dp_group) > 1:
            dist.all_reduce(sums, group=lay.dp_group)
        if lay.tp_group is not None and dist.get_world_size(lay.tp_group) > 1 and any(lay.tp_split):
            tp_sums = torch.where(split, sums, torch.zeros_like(sums))
            dist.all_reduce(tp_sums, group=lay.tp_group)
            sums = torch.where(split, tp_sums, sums)
        # only this call's groups have non-zero sums: their squared norm, complete over DP and TP
        self._record_grad_sq(sums[1].sum())
        rms = (sums[0] / numel).sqrt()
        return (1 / rms.clamp(min=1)).float()

    def _record_grad_sq(self, grad_sq: torch.Tensor) -> None:
        """``grad_sq`` covers every group this call sees. It is kept under the first of them (the
        others get zero), so the sum over all groups counts each group once whether one call sees
        every group (BF16_Optimizer, plain torch) or one group per call (ZeRO)."""
        for k, group in enumerate(self.param_groups):
            self._grad_sq[id(group)] = grad_sq if k == 0 else torch.zeros_like(grad_sq)
        total = torch.zeros_like(grad_sq)
        for group in self._all_groups or self.param_groups:
            if id(group) in self._grad_sq:
                total = total + self._grad_sq[id(group)].to(total.device)
        self.last_grad_norm = total.sqrt()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (docs/RECIPE.md "Shared by every run")."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "norm" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
