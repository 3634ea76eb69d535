"""``ettin train``: one phase of one model, on TP x DP ranks, resumable on any topology.

Per step: fetch this rank's share of the global batch, cut it into micro-batches by a token budget
(``batch.micro_tokens``, sized by ``ettin.memory`` when 0), agree with the other DP ranks on the
label count and on the number of micro-batches (over a gloo group, on the host), copy the share
to the device once, run forward/backward per micro-batch (loss summed and normalized by the
global count, so the gradient is the same at any DP size and budget), take one optimizer step,
record the step in the ledger. On a GPU our code waits for the device once per step, for the
loss and gradient norm at its end; DeepSpeed's overflow check adds a wait or two of its own
(``train.sync_debug`` counts and places them all). Checkpoint every
``phase.checkpoint_every_tokens`` and at the end. Signals (Slurm's USR2, TERM) and
``train.max_runtime_s`` only raise a flag; ranks agree on it at the step boundary, save, and exit
with EXIT_REQUEUE. A non-finite loss stops the run before anything is saved.

Failure detection. A rank that dies must end the job in bounded time, without cutting short a
slow first step (compiles, warm-up) or a checkpoint write. Under Slurm this is srun's
``--kill-on-bad-exit=1`` (ettin.launch.slurm_job): the first rank to exit non-zero or die gets
the others TERM at once and KILL after the cluster's KillWait: seconds, at any point of the run,
with no timeout to tune against the slowest step. gloo notices a peer's closed sockets by itself,
but NCCL does not, and a process on another node that has not died (hung) sends nothing at all:
``train.collective_timeout_s`` on every process group remains the backstop for hangs. torchrun
does the same as kill-on-bad-exit by itself (it stops a node's workers when one fails).
Exit 75 stays safe under it: a rank returns EXIT_REQUEUE only after ``_save``, whose last
collective follows rank 0's commit (the rename), so the checkpoint is complete before any rank
leaves; and each rank ignores TERM from then on. Until then TERM only raises the flag, but
Python resets its handlers while the interpreter shuts down, so the TERM Slurm sends when the
first rank leaves could otherwise turn a peer's 75 into 143 (a failed job, not a requeue).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ettin.config import ConfigError, ExperimentConfig, to_yaml, validate
from ettin.data.collate import Batch, step_hash, token_budget_cut
from ettin.data.ledger import Ledger, order_key
from ettin.data.loader import DataPipeline, RankSteps, build_loader
from ettin.data.order import derive_key
from ettin.train.checkpoint import TrainState, latest_checkpoint, prune, read_checkpoint, write_checkpoint
from ettin.train.env import cuda_environment, setup_distributed_env
from ettin.train.metrics import MetricsLogger
from ettin.train.optim import lr_factor
from ettin.train.signals import StopFlag

EXIT_OK, EXIT_NONFINITE, EXIT_REQUEUE = 0, 3, 75  # 75 = EX_TEMPFAIL: "try again"


def local_device_index(environ, device_count: int) -> int:
    """``LOCAL_RANK`` modulo the visible devices; ``LOCAL_RANK`` is rewritten to match (see pick_device)."""
    index = int(environ.get("LOCAL_RANK", 0)) % device_count
    environ["LOCAL_RANK"] = str(index)
    return index


def pick_device(cfg, environ=os.environ) -> torch.device:
    """This rank's device: its local GPU, or the CPU.

    The GPU is ``LOCAL_RANK`` modulo the visible devices: with one GPU per node-local rank that is
    the rank's own; with per-task binding (``--gpus-per-task``, ``--gpu-bind``) each task sees one
    device, number 0. DeepSpeed picks its device from ``LOCAL_RANK`` by itself, so the variable is
    rewritten to the index chosen here: otherwise every rank with LOCAL_RANK >= 1 fails there."""
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        index = local_device_index(environ, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


# CUDA runtime calls that make the host wait for the device
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


@contextlib.contextmanager
def count_syncs(enabled: bool, found: dict):
    """Record in ``found`` the host<->device waits made inside, two ways: ``host_sync_sites``, the
    Python "file:line" of every implicit sync torch's sync debug mode reports (``.item()``, a
    boolean index, a copy from pageable memory...); and ``sync_calls``, the CUDA runtime's
    synchronize calls seen by the profiler, which also catches explicit waits that mode does not
    see (``torch.cuda.synchronize``, as in DeepSpeed's overflow check). A debugging and acceptance
    aid (``train.sync_debug``): profiling every step costs time."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CPU,
                                                                             ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = []
    for w in caught:
        if "synchroniz" in str(w.message):
            sites.append(f"{w.filename}:{w.lineno}")
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    found.update(host_syncs=len(sites), host_sync_sites=sorted(set(sites)),
                 sync_calls=sum(e.name in SYNC_CALLS for e in prof.events()))


class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        from megatron.core import parallel_state as ps

        from ettin.flops import resolve_peak_flops
        from ettin.memory import check_fits, resolve_micro_tokens
        from ettin.parallel import host_group, init_process_groups
        from ettin.train.engine import build_engine

        self.cfg = cfg
        setup_distributed_env()
        cuda_environment(cfg.parallel.tensor, cfg.train.deterministic)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = pick_device(cfg)
        use_cuda = self.device.type == "cuda"
        init_process_groups(cfg.parallel.tensor, "nccl" if use_cuda else "gloo", cfg.train.collective_timeout_s)
        validate(cfg, dist.get_world_size())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.host_dp, self.host_world = host_group(self.dp_group), host_group()
        self.main = self.rank == 0
        self.run_dir = Path(cfg.run_dir)
        self.micro_tokens = resolve_micro_tokens(cfg, self.dp_size)
        check_fits(cfg, self.dp_size, micro_tokens=self.micro_tokens)  # before any weights exist
        device_name = torch.cuda.get_device_name(self.device) if use_cuda else "cpu"
        self.peak_flops = resolve_peak_flops(cfg, device_name)
        if use_cuda and math.isnan(self.peak_flops):
            self._say(f"note: no bf16 peak known for '{device_name}', so no MFU is reported; "
                      "set train.peak_flops_per_device to its dense bf16 FLOP/s")

        torch.manual_seed(cfg.phase.seed)  # the same initial weights on every rank and TP size
        self.model = cfg.model.build(device_type=self.device.type).to(self.device)
        self.engine, self.optimizer = build_engine(self.model, cfg, bf16=use_cuda)
        self.pipeline = DataPipeline.from_config(cfg)
        self.fingerprint = self.pipeline.manifest.fingerprint()
        vocab = self.pipeline.manifest.tokenizer.get("vocab_size")
        if vocab and vocab > cfg.model.vocab_size:
            raise ConfigError(f"the data's tokenizer has {vocab} tokens but model.vocab_size is {cfg.model.vocab_size}")
        self.state, self.last_checkpoint = self._restore()
        self.ledger = Ledger.for_pipeline(self.pipeline, cfg)
        self.metrics = MetricsLogger(self.run_dir, self.main, cfg.train.log_every)

    # ------------------------------------------------------------------ starting points

    def _restore(self) -> tuple[TrainState, str | None]:
        from ettin.train.engine import load_full_state

        cfg = self.cfg
        resume = latest_checkpoint(self.run_dir) if (self.run_dir / "checkpoints").is_dir() else None
        if resume is not None:  # our own run: everything, clock included
            meta, weights, moments = read_checkpoint(resume)
            if meta["fingerprint"] != self.fingerprint and not cfg.data.allow_fingerprint_change:
                raise ConfigError(f"{resume}: the data manifest changed since this checkpoint (fingerprint "
                                  f"{meta['fingerprint'][:12]} -> {self.fingerprint[:12]}); restore the data, or set "
                                  "data.allow_fingerprint_change=true to continue on the new data (the order changes)")
            key = order_key(cfg, self.pipeline.schedule)
            changed = {k: (meta["order"].get(k), v) for k, v in key.items() if meta["order"].get(k) != v}
            if changed:
                raise ConfigError(f"{resume}: these settings changed since the checkpoint and would change which "
                                  f"samples each step sees: {changed}; resume with the checkpoint's values "
                                  "(its config.yaml) or start a new run_dir")
            state = TrainState(**{f.name: meta[f.name] for f in fields(TrainState)})
            if self.pipeline.schedule.bounds(state.step)[0] != state.samples:
                raise ConfigError(f"{resume}: step {state.step} would start at sample "
                                  f"{self.pipeline.schedule.bounds(state.step)[0]}, the checkpoint stopped at {state.samples}")
            load_full_state(self.model, self.optimizer, weights, moments, meta["optimizer_step"])
            self._say(f"resumed from {resume} (step {state.step}, {state.tokens:,} tokens)")
            return state, resume.name
        if cfg.phase.init == "scratch":
            return TrainState(), None
        if not cfg.phase.init_checkpoint:
            raise ConfigError(f"phase.init={cfg.phase.init} needs phase.init_checkpoint (the {cfg.phase.previous} run folder)")
        source = latest_checkpoint(cfg.phase.init_checkpoint)
        if source is None:
            raise ConfigError(f"phase.init_checkpoint={cfg.phase.init_checkpoint} holds no complete checkpoint")
        carry = cfg.phase.init == "previous"  # the next phase keeps the optimizer; cross-objective starts fresh
        meta, weights, moments = read_checkpoint(source, moments=carry)
        if not meta.get("final"):
            self._say(f"warning: {source} is not the final checkpoint of its phase")
        load_full_state(self.model, self.optimizer, weights, moments if carry else None,
                        meta["optimizer_step"] if carry else 0)
        self._say(f"phase {cfg.phase.name}: starting from {source} ({'weights and optimizer' if carry else 'weights only'}), clock reset")
        return TrainState(optimizer_step=meta["optimizer_step"] if carry else 0), None

    def _say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    # ------------------------------------------------------------------ the loop

    def run(self, stop: StopFlag | None = None) -> int:
        from ettin.train.engine import skipped_steps

        cfg, state = self.cfg, self.state
        if state.final:
            self._say(f"{self.run_dir}: phase already complete ({state.tokens:,} tokens)")
            return EXIT_OK
        stop, started, skipped = stop or StopFlag(), time.time(), 0
        every = cfg.phase.checkpoint_every_tokens
        dataset = RankSteps(self.pipeline, self.dp_rank, self.dp_size)
        loader = build_loader(dataset, state.step, None, cfg.data.workers, cfg.data.prefetch,
                              pin_memory=self.device.type == "cuda")
        self._say(f"micro-batches of at most {self.micro_tokens:,} tokens per rank"
                  + ("" if cfg.batch.micro_tokens else " (batch.micro_tokens=0: from the memory model)"))
        while True:
            step = state.step
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                self._say(f"train.max_steps={cfg.train.max_steps} already reached at step {step}")
                return EXIT_OK
            t0 = time.perf_counter()
            loaded, batch = next(loader)
            assert loaded == step, (loaded, step)
            data_wait = time.perf_counter() - t0
            syncs = {}
            with count_syncs(cfg.train.sync_debug and self.device.type == "cuda", syncs):
                loss, grad_norm, labels, tokens, flops, digests = self._step(step, batch)
            if not math.isfinite(loss):
                self._say(f"error: non-finite loss ({loss}) at step {step}; the last good checkpoint is "
                          f"{self.last_checkpoint or 'none'}; lower optim.lr or inspect the batch with "
                          f"`ettin data-order show` (nothing was saved)")
                return EXIT_NONFINITE
            if skipped_steps(self.engine) > skipped:
                skipped = skipped_steps(self.engine)
                self._say(f"warning: step {step}: DeepSpeed skipped the update (non-finite gradient norm); "
                          f"{skipped} skipped in this process")
            start, end = self.pipeline.schedule.bounds(step)
            self.ledger.record(step, start, end, tokens, step_hash(digests))
            before = state.tokens
            state.step, state.tokens, state.samples = step + 1, state.tokens + tokens, end
            state.optimizer_step = int(self.optimizer.param_groups[0]["step"])
            seconds = time.perf_counter() - t0
            self.metrics.log({
                "step": state.step, "tokens": state.tokens, "samples": state.samples, "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                "labels": labels, "step_tokens": tokens, "tokens_per_s": tokens / seconds,
                "samples_per_s": (end - start) / seconds, "flops": flops,
                "mfu": None if math.isnan(self.peak_flops) else flops / seconds / (self.peak_flops * self.world),
                "skipped_steps": skipped_steps(self.engine), "data_wait_s": data_wait, "step_s": seconds,
                "memory_gb": self._memory_gb(), "time": time.time(),
                **syncs})

            finished = state.tokens >= cfg.phase.tokens
            capped = bool(cfg.train.max_steps) and state.step >= cfg.train.max_steps
            flags = torch.tensor([stop.signal is not None,
                                  bool(cfg.train.max_runtime_s) and time.time() - started > cfg.train.max_runtime_s],
                                 dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.host_world)  # every rank leaves at the same step
            if finished or capped or flags.any() or state.tokens // every > before // every:
                state.final = finished
                self._save()
            if finished or capped:
                self._say(f"done: {state.step} steps, {state.tokens:,} tokens; checkpoint {self.last_checkpoint}")
                return EXIT_OK
            if flags.any():
                why = f"signal {stop.signal}" if stop.signal else f"train.max_runtime_s={cfg.train.max_runtime_s:g}"
                self._say(f"stopping for {why} at step {state.step}; saved {self.last_checkpoint}; exit {EXIT_REQUEUE} (requeue me)")
                # saved: the TERM srun sends when the first rank leaves must not kill this one's 75
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                return EXIT_REQUEUE

    def _step(self, step: int, batch: Batch) -> tuple[float, float, int, int, float, list[bytes]]:
        """One optimizer step over this rank's share: (loss, grad norm, labels, tokens and FLOPs of the
        global batch, the global batch's sample digests in position order)."""
        from ettin.flops import step_flops
        from ettin.train.engine import grad_norm

        cfg, engine, bounds = self.cfg, self.engine, batch.bounds
        label_index = batch.label_index()
        flops = step_flops(cfg.model, np.diff(bounds), len(label_index))
        # one host-side exchange: counts for the normalization, the micro-batch count every rank
        # must run (ZeRO reduces per micro-batch), FLOPs for MFU and the digests for the ledger
        shares = [None] * self.dp_size
        own = (len(label_index), batch.num_tokens, len(token_budget_cut(bounds, self.micro_tokens)), flops, batch.digests)
        dist.all_gather_object(shares, own, group=self.host_dp)
        labels, tokens = sum(s[0] for s in shares), sum(s[1] for s in shares)
        micro_count, flops = max(s[2] for s in shares), sum(s[3] for s in shares)
        # dropout masks: a function of (seed, step, DP rank), so a resumed run draws the same ones
        torch.manual_seed(derive_key(cfg.phase.seed, "dropout", step, self.dp_rank) % 2**63)
        lr = cfg.optim.lr * lr_factor(self.state.tokens, cfg.schedule, cfg.phase.tokens)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = self.dp_size / max(labels, 1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        micro = batch.micro_batches(self.micro_tokens, micro_count, self.device)
        for i, m in enumerate(micro):
            engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            loss = engine(m.input_ids, m.docs, labels=m.labels, label_index=m.label_index, reduction="sum")
            engine.backward(loss * scale, scale_wrt_gas=False)
            total += loss.detach().double()
        engine.step()
        dist.all_reduce(total, group=self.dp_group)
        loss, norm = torch.stack([total, grad_norm(engine, self.optimizer).to(total)]).tolist()  # the step's one wait
        return loss / max(labels, 1), norm, labels, tokens, flops, [d for s in shares for d in s[4]]

    def _save(self) -> None:
        from ettin.train.engine import full_state

        weights, moments = full_state(self.model, keep=self.main)  # collective: every rank takes part
        window = self.ledger.take_window(self.last_checkpoint)  # every rank recorded it; rank 0 writes it
        if self.main:
            path = write_checkpoint(
                self.run_dir, self.state, weights, moments,
                {"config.yaml": to_yaml(self.cfg), "ledger.json": json.dumps(window, indent=1) + "\n"},
                asdict(self.cfg.model),
                {"fingerprint": self.fingerprint, "order": order_key(self.cfg, self.pipeline.schedule),
                 "seed": self.cfg.phase.seed, "phase": self.cfg.phase.name,
                 "objective": self.cfg.objective.name, "world_size": self.world, "tensor_parallel": self.cfg.parallel.tensor,
                 "rng": "dropout reseeded every step from (phase.seed, step, DP rank): no state to save"})
            prune(self.run_dir, self.cfg.phase.keep_checkpoints)
            name = path.name
        else:
            name = None
        names = [name]
        dist.broadcast_object_list(names, src=0)
        self.last_checkpoint = names[0]

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def close(self) -> None:
        self.metrics.close()


def train(cfg: ExperimentConfig, stop: StopFlag | None = None) -> int:
    stop = stop or StopFlag()
    trainer = Trainer(cfg)
    try:
        return trainer.run(stop)
    finally:
        trainer.close()
