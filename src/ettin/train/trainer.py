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
import logging
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
from ettin.errors import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, EttinError
from ettin.layout import CONFIG_FILE, LEDGER_FILE, latest_checkpoint
from ettin.logs import setup_logging
from ettin.pretrained import HF, folder_kind, start_from_hf
from ettin.train.checkpoint import (
    TrainState,
    prune,
    read_checkpoint,
    resume_hash_limit,
    resume_point,
    unverified_note,
    verify_checkpoint,
    write_checkpoint,
)
from ettin.train.env import cuda_environment, setup_distributed_env
from ettin.train.evaluate import Evaluator, eval_sets, headline
from ettin.train.lr_schedule import lr_factor
from ettin.train.metrics import MetricsLogger, progress_line
from ettin.train.signals import StopFlag


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

    with (
        warnings.catch_warnings(record=True) as caught,
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
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
    found.update(
        host_syncs=len(sites),
        host_sync_sites=sorted(set(sites)),
        sync_calls=sum(e.name in SYNC_CALLS for e in prof.events()),
    )


def _crossed(every: int, before: int, now: int) -> bool:
    """Whether going from ``before`` to ``now`` tokens passed a multiple of ``every`` (0: never)."""
    return bool(every) and now // every > before // every


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
        self.log = setup_logging(self.rank)
        self.run_dir = Path(cfg.run_dir)
        self._on_main(lambda: check_run_dir(self.run_dir))  # before minutes of start-up
        self.micro_tokens = resolve_micro_tokens(cfg, self.dp_size)
        check_fits(cfg, self.dp_size, micro_tokens=self.micro_tokens)  # before any weights exist
        device_name = torch.cuda.get_device_name(self.device) if use_cuda else "cpu"
        self.peak_flops = resolve_peak_flops(cfg, device_name)
        if use_cuda and math.isnan(self.peak_flops):
            self._say(
                f"note: no bf16 peak known for '{device_name}', so no MFU is reported; "
                "set train.peak_flops_per_device to its dense bf16 FLOP/s"
            )

        torch.manual_seed(cfg.phase.seed)  # the same initial weights on every rank and TP size
        self.model = cfg.model.build(device_type=self.device.type).to(self.device)
        self.engine, self.optimizer = build_engine(self.model, cfg, bf16=use_cuda)
        self.pipeline = DataPipeline.from_config(cfg)
        self.fingerprint = self.pipeline.manifest.fingerprint()
        vocab = self.pipeline.manifest.tokenizer.get("vocab_size")
        if vocab and vocab > cfg.model.vocab_size:
            raise ConfigError(f"the data's tokenizer has {vocab} tokens but model.vocab_size is {cfg.model.vocab_size}")
        self.state, self.last_checkpoint = self._restore()
        self.evaluator = Evaluator(
            cfg,
            eval_sets(cfg, self.pipeline),
            self.micro_tokens,
            self.device,
            self.dp_rank,
            self.dp_size,
            self.dp_group,
        )
        # the last evaluation (for the checkpoint at that step) and its loss until a progress line shows it
        self.last_evaluation, self.evaluated_at, self.fresh_eval_loss, self.eval_seconds = {}, -1, None, 0.0
        self.ledger = Ledger.for_pipeline(self.pipeline, cfg)
        # rank 0's sinks (a W&B login that fails there must fail every rank, not leave them waiting)
        self.metrics = self._on_main(
            lambda: MetricsLogger.for_run(
                self.run_dir,
                True,
                cfg.metrics,
                name=self.run_dir.name,
                config={**asdict(cfg), "data_fingerprint": self.fingerprint},
            ),
            share=False,
        ) or MetricsLogger([])

    # ------------------------------------------------------------------ starting points

    def _restore(self) -> tuple[TrainState, str | None]:
        from ettin.train.engine import restore_training_state

        cfg = self.cfg
        # rank 0 picks the newest sound checkpoint (hashing it once), every rank loads that one
        resume = self._on_main(lambda: resume_point(self.run_dir, self._say, resume_hash_limit(cfg)))
        if resume is not None:  # our own run: everything, clock included
            meta, weights, moments = read_checkpoint(resume)
            if meta["fingerprint"] != self.fingerprint and not cfg.data.allow_fingerprint_change:
                raise ConfigError(
                    f"{resume}: the data manifest changed since this checkpoint (fingerprint "
                    f"{meta['fingerprint'][:12]} -> {self.fingerprint[:12]}); restore the data, or set "
                    "data.allow_fingerprint_change=true to continue on the new data (the order changes)"
                )
            key = order_key(cfg, self.pipeline.schedule)
            changed = {
                k: (meta["order"].get(k), key.get(k))
                for k in key.keys() | meta["order"].keys()
                if meta["order"].get(k) != key.get(k)
            }
            if changed:
                raise ConfigError(
                    f"{resume}: these settings changed since the checkpoint and would change which "
                    f"samples each step sees: {changed}; resume with the checkpoint's values "
                    "(its config.yaml) or start a new run_dir"
                )
            state = TrainState(**{f.name: meta[f.name] for f in fields(TrainState)})
            if self.pipeline.schedule.bounds(state.step)[0] != state.samples:
                raise ConfigError(
                    f"{resume}: step {state.step} would start at sample "
                    f"{self.pipeline.schedule.bounds(state.step)[0]}, the checkpoint stopped at {state.samples}"
                )
            restore_training_state(self.model, self.optimizer, weights, moments, meta["optimizer_step"])
            self._say(f"resumed from {resume} (step {state.step}, {state.tokens:,} tokens)")
            return state, resume.name
        if cfg.phase.init == "scratch":
            return TrainState(), None
        if not cfg.phase.init_checkpoint:
            raise ConfigError(
                f"phase.init={cfg.phase.init} needs phase.init_checkpoint (the {cfg.phase.previous} run folder)"
            )
        if folder_kind(cfg.phase.init_checkpoint) == HF:  # a released model: weights only (ettin.pretrained)
            start_from_hf(self.model, self.optimizer, cfg, self.pipeline.manifest, self._say)
            return TrainState(), None
        source = latest_checkpoint(cfg.phase.init_checkpoint)
        if source is None:
            raise ConfigError(f"phase.init_checkpoint={cfg.phase.init_checkpoint} holds no complete checkpoint")
        if not self._on_main(lambda: verify_checkpoint(source, resume_hash_limit(cfg))):  # named, not passed over
            self._say(unverified_note(source))
        carry = cfg.phase.init == "previous"  # the next phase keeps the optimizer; cross-objective starts fresh
        meta, weights, moments = read_checkpoint(source, moments=carry)
        if not meta.get("final"):
            self._say(f"warning: {source} is not the final checkpoint of its phase")
        restore_training_state(
            self.model, self.optimizer, weights, moments if carry else None, meta["optimizer_step"] if carry else 0
        )
        self._say(
            f"phase {cfg.phase.name}: starting from {source} ({'weights and optimizer' if carry else 'weights only'}), clock reset"
        )
        return TrainState(optimizer_step=meta["optimizer_step"] if carry else 0), None

    def _say(self, text: str) -> None:
        """Rank 0 tells the user (what it says holds for every rank); a line starting with warning: or
        error: is logged at that level. A rank's own trouble goes to ``self.log``, which names the rank."""
        if self.main:
            level = (
                logging.ERROR
                if text.startswith("error:")
                else logging.WARNING
                if text.startswith("warning:")
                else logging.INFO
            )
            self.log.log(level, text)

    def _on_main(self, fn, share: bool = True):
        """``fn()`` run on rank 0 only, its result given to every rank (``share=False``: kept on rank 0,
        the others get None). A failure there is raised on every rank (rank 0 keeps the original, with
        its traceback), so none waits at a collective."""
        box, failure, result = [None, None, False], None, None
        if self.main:
            try:
                result = fn()
                box[0] = result if share else None
            except Exception as e:  # re-raised below, on every rank
                failure, box[1], box[2] = e, str(e), isinstance(e, EttinError)
        dist.broadcast_object_list(box, src=0, group=self.host_world)
        if failure is not None:
            raise failure
        if box[1] is not None:
            raise EttinError(box[1]) if box[2] else RuntimeError(f"rank 0 failed: {box[1]}")
        return result if self.main else box[0]

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
        loader = build_loader(
            dataset, state.step, None, cfg.data.workers, cfg.data.prefetch, pin_memory=self.device.type == "cuda"
        )
        self._say(
            f"micro-batches of at most {self.micro_tokens:,} tokens per rank"
            + ("" if cfg.batch.micro_tokens else " (batch.micro_tokens=0: from the memory model)")
        )
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
                self._say(
                    f"error: non-finite loss ({loss}) at step {step}; the last good checkpoint is "
                    f"{self.last_checkpoint or 'none'}; lower optim.lr or inspect the batch with "
                    f"`ettin data-order show` (nothing was saved)"
                )
                return EXIT_NONFINITE
            if skipped_steps(self.engine) > skipped:
                skipped = skipped_steps(self.engine)
                self._say(
                    f"warning: step {step}: DeepSpeed skipped the update (non-finite gradient norm); "
                    f"{skipped} skipped in this process"
                )
            start, end = self.pipeline.schedule.bounds(step)
            self.ledger.record(step, start, end, tokens, step_hash(digests))
            before = state.tokens
            state.step, state.tokens, state.samples = step + 1, state.tokens + tokens, end
            state.optimizer_step = int(self.optimizer.param_groups[0]["step"])
            seconds = time.perf_counter() - t0
            row = {
                "step": state.step,
                "tokens": state.tokens,
                "samples": state.samples,
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "labels": labels,
                "step_tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "samples_per_s": (end - start) / seconds,
                "flops": flops,
                "mfu": None if math.isnan(self.peak_flops) else flops / seconds / (self.peak_flops * self.world),
                "skipped_steps": skipped_steps(self.engine),
                "data_wait_s": data_wait,
                "step_s": seconds,
                "memory_gb": self._memory_gb(),
                "time": time.time(),
                **syncs,
            }
            self.metrics.log(row)

            finished = state.tokens >= cfg.phase.tokens
            capped = bool(cfg.train.max_steps) and state.step >= cfg.train.max_steps
            flags = torch.tensor(
                [
                    stop.signal is not None,
                    bool(cfg.train.max_runtime_s) and time.time() - started > cfg.train.max_runtime_s,
                ],
                dtype=torch.int32,
            )
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.host_world)  # every rank leaves at the same step
            saving = finished or capped or flags.any() or _crossed(every, before, state.tokens)
            # evaluate every eval.every_tokens and before each save, but not when a signal or the time
            # limit asks to stop: then the save must be quick
            if (
                self.evaluator
                and (finished or capped or not flags.any())
                and (saving or _crossed(cfg.eval.every_tokens, before, state.tokens))
            ):
                self._evaluate(started)
            if state.step % max(1, cfg.train.log_every) == 0:
                self._say(progress_line(row, cfg.phase.tokens, self.fresh_eval_loss))
                self.fresh_eval_loss = None
            if saving:
                state.final = finished
                self._save()
            if finished or capped:
                self._say(f"done: {state.step} steps, {state.tokens:,} tokens; checkpoint {self.last_checkpoint}")
                return EXIT_OK
            if flags.any():
                why = f"signal {stop.signal}" if stop.signal else f"train.max_runtime_s={cfg.train.max_runtime_s:g}"
                self._say(
                    f"stopping for {why} at step {state.step}; saved {self.last_checkpoint}; exit {EXIT_REQUEUE} (requeue me)"
                )
                # saved: the TERM srun sends when the first rank leaves must not kill this one's 75
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                return EXIT_REQUEUE

    def _evaluate(self, started: float) -> None:
        """Score the held-out sets now; log them with the step, keep them for the next checkpoint."""
        t0 = time.perf_counter()
        metrics = self.evaluator(self.model)
        self.eval_seconds += time.perf_counter() - t0
        self.last_evaluation, self.evaluated_at, self.fresh_eval_loss = metrics, self.state.step, headline(metrics)
        self.metrics.log(
            {
                "step": self.state.step,
                "tokens": self.state.tokens,
                **metrics,
                "eval/time_fraction": self.eval_seconds / max(time.time() - started, 1e-9),
            }
        )
        self._say(
            f"eval at step {self.state.step}: "
            + ", ".join(f"{k.split('/')[1]} loss {v:.4f}" for k, v in metrics.items() if k.endswith("/loss"))
        )

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
        own = (
            len(label_index),
            batch.num_tokens,
            len(token_budget_cut(bounds, self.micro_tokens)),
            flops,
            batch.digests,
        )
        dist.all_gather_object(shares, own, group=self.host_dp)
        labels, tokens = sum(s[0] for s in shares), sum(s[1] for s in shares)
        micro_count, flops = max(s[2] for s in shares), sum(s[3] for s in shares)
        # dropout masks: a function of (seed, step, DP rank), so a resumed run draws the same ones
        torch.manual_seed(derive_key(cfg.phase.seed, "dropout", step, self.dp_rank) % 2**63)
        lr = cfg.optim.lr * lr_factor(self.state.tokens, cfg.lr_schedule, cfg.phase.tokens)
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
        from ettin.train.engine import gather_training_state

        weights, moments = gather_training_state(self.model, keep=self.main)  # collective: every rank takes part
        window = self.ledger.take_window(self.last_checkpoint)  # every rank recorded it; rank 0 writes it

        def write() -> str:
            path = write_checkpoint(
                self.run_dir,
                self.state,
                weights,
                moments,
                {CONFIG_FILE: to_yaml(self.cfg), LEDGER_FILE: json.dumps(window, indent=1) + "\n"},
                asdict(self.cfg.model),
                {
                    "fingerprint": self.fingerprint,
                    "order": order_key(self.cfg, self.pipeline.schedule),
                    "seed": self.cfg.phase.seed,
                    "phase": self.cfg.phase.name,
                    "objective": self.cfg.objective.name,
                    "world_size": self.world,
                    "tensor_parallel": self.cfg.parallel.tensor,
                    "rng": "dropout reseeded every step from (phase.seed, step, DP rank): no state to save",
                    **({"eval": self.last_evaluation} if self.evaluated_at == self.state.step else {}),
                },
            )
            prune(self.run_dir, self.cfg.phase.keep_checkpoints)
            return path.name

        self.last_checkpoint = self._on_main(write)  # a full disk on rank 0 fails every rank, none waits

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def close(self) -> None:
        self.metrics.close()


def check_run_dir(run_dir: Path) -> None:
    """The run folder exists and takes files: found now, not at the first checkpoint hours later."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run_dir={run_dir} is not writable ({e.strerror or e}): pick another run_dir "
            "or fix the folder's permissions"
        ) from None


def train(cfg: ExperimentConfig, stop: StopFlag | None = None) -> int:
    stop = stop or StopFlag()
    trainer = Trainer(cfg)
    try:
        return trainer.run(stop)
    finally:
        trainer.close()
