"""Training engine on CPU with gloo: exact resume, topology changes, exits, phase chains."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ettin.config import load_config
from ettin.data.ledger import read_ledger
from ettin.layout import list_checkpoints
from ettin.parallel import free_port
from ettin.testing import run_distributed_test
from ettin.train.lr_schedule import lr_factor
from ettin.train.optim import StableAdamW

from conftest import Source


@pytest.fixture(scope="module")
def corpus(tiny_corpus):
    """Two sources mixed 3:1 (zstd, and raw with longer samples), a 3-layer model, a batch-size ramp."""
    return tiny_corpus(
        Source("a", 400, seed=1, weight=3),
        Source("b", 200, seed=2, min_len=30, max_len=120, compression=None, weight=1),
        name="train",
        model={"num_layers": 3},
        phase={"tokens": 12000, "seq_len": 128, "checkpoint_every_tokens": 3000},
        lr_schedule={"warmup_tokens": 2000},
        optim={"lr": "3e-3", "weight_decay": 0.01},
        batch={
            "global_size": 10,
            "micro_tokens": 300,
            "warmup_tokens": 2560,
            "warmup_start_size": 4,
            "warmup_stages": 2,
        },
        train={"log_every": 1000, "collective_timeout_s": 60},
        data={"workers": 0},
    )


def _train(exp, overrides, expect):
    from ettin.config import load_config
    from ettin.train.trainer import train

    code = train(load_config(exp, overrides))
    assert code == expect, f"exit {code}, expected {expect}"


def train(corpus, run_dir, world=2, expect=0, *overrides):
    run_distributed_test(_train, world, args=(corpus["exp"], [f"run_dir={run_dir}", *overrides], expect))


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def logged(text: str) -> list[str]:
    """A training process's log lines without their timestamps."""
    return [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", line) for line in text.splitlines()]


def ledger(run_dir):
    entries = []
    for ckpt in list_checkpoints(run_dir):
        entries += read_ledger(ckpt)[1]
    return entries


def final_weights(run_dir):
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


# ----------------------------------------------------------------------------- pure pieces


def test_stableadamw_matches_torch_optimi_per_tensor():
    from optimi import StableAdamW as Reference

    torch.manual_seed(0)
    params = [torch.randn(40, 30), torch.randn(30)]
    ours_p = [p.clone().requires_grad_() for p in params]
    ref_p = [p.clone().requires_grad_() for p in params]
    ours = StableAdamW(
        [{"params": ours_p, "weight_decay": 0.01}], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01
    )
    ref = Reference(
        [{"params": ref_p, "weight_decay": 0.01}],
        lr=1e-2,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.01,
        decouple_lr=True,
        max_lr=1e-2,
        foreach=False,
    )
    for step in range(6):
        g = [torch.randn_like(p) * (10 if step == 3 else 1) for p in params]  # a spike: update clipping acts
        for p, q, gi in zip(ours_p, ref_p, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lr_schedules_follow_their_formulas():
    for phase in ("pretrain", "extension", "decay", "cross"):
        cfg = load_config("ettin", [f"phase={phase}", "model=150m"])
        s, total = cfg.lr_schedule, cfg.phase.tokens
        if phase == "pretrain":
            assert lr_factor(1.5e9, s, total) == pytest.approx(0.5)  # half way through the 3B warmup
            assert lr_factor(1e12, s, total) == 1.0
        elif phase == "extension":
            assert lr_factor(0, s, total) == 1.0 and lr_factor(total, s, total) == pytest.approx(0.5)
            assert lr_factor(total / 4, s, total) == pytest.approx(0.5 + 0.5 * (1 - math.sqrt(0.25)))
        elif phase == "decay":
            assert lr_factor(0, s, total) == 0.5 and lr_factor(total, s, total) == pytest.approx(0.02)
        else:  # warmup to half the peak, constant, a linear tail to 0.02 of that (0.01 x peak)
            assert lr_factor(1.5e9, s, total) == pytest.approx(0.25) and lr_factor(20e9, s, total) == 0.5
            assert lr_factor(45e9, s, total) == pytest.approx(0.5 - 0.49 * 0.5)
            assert lr_factor(total, s, total) == pytest.approx(0.01)


def test_slurm_environment_becomes_torch_distributed():
    from ettin.train.env import first_host, setup_distributed_env

    assert first_host("gpu[003-010,012],cpu1") in ("gpu003",)
    assert first_host("127.0.0.[1-2]") == "127.0.0.1" and first_host("node7") == "node7"
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_ID": "12345",
    }
    out = setup_distributed_env(env)
    assert out == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": str(15000 + 12345),
    }


def test_gpu_binding_and_cuda_settings():
    from ettin.train.env import cuda_environment
    from ettin.train.trainer import local_device_index

    # --gpus-per-task=1: every task sees one device, 0; DeepSpeed must be told 0, not the task's LOCAL_RANK
    env = {"LOCAL_RANK": "3"}
    assert local_device_index(env, 1) == 0 and env["LOCAL_RANK"] == "0"
    env = {"LOCAL_RANK": "3"}
    assert local_device_index(env, 4) == 3 and env["LOCAL_RANK"] == "3"
    assert local_device_index({}, 8) == 0
    env = {}
    assert cuda_environment(1, environ=env) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "CUDA_DEVICE_MAX_CONNECTIONS": None,
        "CUBLAS_WORKSPACE_CONFIG": None,
    }
    assert cuda_environment(2, environ=env)["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert cuda_environment(1, deterministic=True, environ=env)["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}  # the user's own setting wins
    assert cuda_environment(2, environ=env)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


# ----------------------------------------------------------------------------- resume


@pytest.mark.distributed
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_n_steps_equal_half_plus_resume_plus_half_bitwise(corpus, tmp_path, objective):
    """fp32 on CPU, DP=2, dropout on: every loss and every final weight identical."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(corpus, whole, 2, 0, f"objective={objective}", "train.max_steps=8")
    train(corpus, split, 2, 0, f"objective={objective}", "train.max_steps=4")
    train(corpus, split, 2, 0, f"objective={objective}", "train.max_steps=8")
    a, b = metrics(whole), metrics(split)
    assert sorted(a) == list(range(1, 9))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    assert [e.hash for e in ledger(whole)] == [e.hash for e in ledger(split)]
    wa, wb = final_weights(whole), final_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = load_file(str(list_checkpoints(whole)[-1] / "optimizer.safetensors"))
    mb = load_file(str(list_checkpoints(split)[-1] / "optimizer.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.distributed
def test_resume_on_another_topology(corpus, tmp_path):
    """Saved at TP1xDP2, resumed at TP1xDP1 and at TP2xDP1: same ledger, losses within 1e-5."""
    common = ["model.attn_out_dropout=0.0", "model.num_heads=4"]  # dropout masks depend on the DP rank
    whole = tmp_path / "whole"
    train(corpus, whole, 2, 0, *common, "train.max_steps=8")
    half = tmp_path / "half"
    train(corpus, half, 2, 0, *common, "train.max_steps=4")
    for name, world, extra in [("dp1", 1, []), ("tp2", 2, ["parallel.tensor=2"])]:
        run = tmp_path / name
        shutil.copytree(half, run)
        train(corpus, run, world, 0, *common, *extra, "train.max_steps=8")
        a, b = metrics(whole), metrics(run)
        for step in range(5, 9):
            assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), (name, step)
        assert [e.hash for e in ledger(whole)] == [e.hash for e in ledger(run)], name
        wa, wb = final_weights(whole), final_weights(run)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_the_micro_budget_changes_no_sample_and_no_step(corpus, tmp_path):
    """batch.micro_tokens cuts each rank's share differently (60 tokens: many micro-batches, some
    samples alone over the budget; 0: the memory model's budget, one micro-batch) and changes
    nothing else: the same ledger, the same losses to fp32 rounding."""
    runs = {}
    for budget in (60, 0):
        runs[budget] = tmp_path / f"budget{budget}"
        train(
            corpus,
            runs[budget],
            2,
            0,
            "model.attn_out_dropout=0.0",
            "train.max_steps=4",
            f"batch.micro_tokens={budget}",
        )
    a, b = metrics(runs[60]), metrics(runs[0])
    assert [e.hash for e in ledger(runs[60])] == [e.hash for e in ledger(runs[0])]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
        assert a[step]["labels"] == b[step]["labels"] and a[step]["step_tokens"] == b[step]["step_tokens"]
        assert a[step]["flops"] == b[step]["flops"] > 0


@pytest.mark.slow
def test_a_config_that_cannot_fit_is_refused_before_the_first_step(corpus, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ettin.cli",
            "train",
            corpus["exp"],
            f"run_dir={run}",
            "train.device_memory_gb=0.5",
            "batch.micro_tokens=100000000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "batch.micro_tokens" in errors[0], proc.stderr
    assert not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------- exits


def launch(corpus, run_dir, world, *overrides, env_extra=None):
    """Start ``world`` real `ettin train` processes (what srun would start), one per rank."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            **(env_extra or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ettin.cli", "train", corpus["exp"], f"run_dir={run_dir}", *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def wait_for_step(run_dir, step, procs, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(run_dir) / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early: " + "".join(p.communicate()[0][-2000:] for p in procs))
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.distributed
def test_usr2_saves_and_requeues_then_the_restart_completes_the_phase(corpus, tmp_path):
    run = tmp_path / "run"
    slow = ["train.max_steps=0", "phase.tokens=30000", "phase.checkpoint_every_tokens=100000"]
    procs = launch(corpus, run, 2, *slow)
    wait_for_step(run, 3, procs)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    codes = [p.wait(timeout=120) for p in procs]
    out = procs[0].communicate()[0]
    assert codes == [75, 75], out
    assert "requeue me" in out
    first = list_checkpoints(run)
    assert len(first) == 1
    stopped_at = json.loads((first[0] / "state.json").read_text())["step"]
    procs = launch(corpus, run, 2, *slow)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], procs[0].communicate()[0][-3000:]
    entries = ledger(run)
    assert [e.step for e in entries] == list(range(len(entries))) and len(entries) > stopped_at
    assert entries[0].start == 0 and all(a.end == b.start for a, b in zip(entries, entries[1:]))
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert state["final"] and state["tokens"] >= 30000 and state["samples"] == entries[-1].end


@pytest.mark.distributed
def test_a_dead_rank_fails_the_others_in_bounded_time_and_the_run_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["phase.tokens=30000", "phase.checkpoint_every_tokens=2000", "train.collective_timeout_s=20"]
    procs = launch(corpus, run, 2, *args)
    deadline = time.time() + 120
    while not list_checkpoints(run) and time.time() < deadline:
        wait_for_step(run, 1, procs)
        time.sleep(0.2)
    done = len((run / "metrics.jsonl").read_text().splitlines())
    wait_for_step(run, done + 2, procs)  # mid-run, past a checkpoint
    procs[1].kill()  # kill -9
    killed_at = time.time()
    code = procs[0].wait(timeout=60)
    assert code != 0 and time.time() - killed_at < 45
    complete = list_checkpoints(run)
    assert complete, "a checkpoint should have been written before the kill"
    # a kill during a checkpoint write leaves only a hidden folder: the resume must ignore it
    (run / "checkpoints" / ".step_99999999.deadbeef").mkdir()
    procs = launch(corpus, run, 2, *args)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    assert f"resumed from {complete[-1]}" in outs[0]
    assert not (run / "checkpoints" / ".step_99999999.deadbeef").exists()


@pytest.mark.distributed
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    train(corpus, run, 1, 0, "train.max_steps=2")
    before = [p.name for p in list_checkpoints(run)]
    train(corpus, run, 1, 3, "train.max_steps=6", "optim.lr=1e30", "optim.weight_decay=0")
    assert [p.name for p in list_checkpoints(run)] == before


# ----------------------------------------------------------------------------- phases


@pytest.mark.distributed
def test_phase_chain_and_cross_objective(corpus, tmp_path):
    short = [
        "phase.tokens=3000",
        "phase.checkpoint_every_tokens=1e9",
        "lr_schedule.warmup_tokens=1000",
        "batch.warmup_tokens=0",
        "phase.seq_len=128",
    ]
    runs = {}
    for objective in ("mlm", "clm"):
        prev = None
        for phase in ("pretrain", "extension", "decay"):
            run = tmp_path / f"{objective}-{phase}"
            extra = [f"phase.init_checkpoint={prev}"] if prev else []
            train(corpus, run, 1, 0, f"objective={objective}", f"phase={phase}", *short, *extra)
            runs[(objective, phase)] = prev = run
    cross = tmp_path / "mlm-to-clm"
    train(
        corpus,
        cross,
        1,
        0,
        "objective=clm",
        "phase=cross",
        *short,
        "lr_schedule.decay_tokens=1000",
        f"phase.init_checkpoint={runs[('mlm', 'decay')]}",
    )
    for (objective, phase), run in runs.items():
        cfg = load_config(corpus["exp"], [f"objective={objective}", f"phase={phase}", *short])
        m = metrics(run)
        state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
        assert state["final"] and state["step"] == max(m)
        tokens_before = 0
        for step in sorted(m):  # the LR of each step is the schedule at the tokens seen before it
            expected = cfg.optim.lr * lr_factor(tokens_before, cfg.lr_schedule, cfg.phase.tokens)
            assert m[step]["lr"] == pytest.approx(expected, rel=1e-9), (objective, phase, step)
            tokens_before = m[step]["tokens"]
    pre = json.loads((list_checkpoints(runs[("mlm", "pretrain")])[-1] / "state.json").read_text())
    ext = json.loads((list_checkpoints(runs[("mlm", "extension")])[-1] / "state.json").read_text())
    assert ext["optimizer_step"] == pre["optimizer_step"] + ext["step"]  # optimizer carried, clock reset
    crossed = json.loads((list_checkpoints(cross)[-1] / "state.json").read_text())
    assert crossed["optimizer_step"] == crossed["step"] and crossed["seed"] == 210  # fresh optimizer
    cfg = load_config(corpus["exp"], ["objective=clm", "phase=cross", *short, "lr_schedule.decay_tokens=1000"])
    m, tokens_before = metrics(cross), 0
    for step in sorted(m):
        assert m[step]["lr"] == pytest.approx(
            cfg.optim.lr * lr_factor(tokens_before, cfg.lr_schedule, cfg.phase.tokens)
        )
        tokens_before = m[step]["tokens"]
    # decoder -> encoder: MNTP by default, with the cross phase's batch ramp
    ramp = ["lr_schedule.decay_tokens=1000", "batch.warmup_tokens=1500", "batch.warmup_start_size=4"]
    to_encoder = tmp_path / "clm-to-mntp"
    train(
        corpus,
        to_encoder,
        1,
        0,
        "objective=mlm",
        "phase=cross",
        *short,
        *ramp,
        f"phase.init_checkpoint={runs[('clm', 'decay')]}",
    )
    cfg = load_config(str(list_checkpoints(to_encoder)[-1] / "config.yaml"))
    assert cfg.objective.name == "mntp" and not cfg.model.causal and cfg.phase.seed == 210
    m = metrics(to_encoder)
    per_step = [m[s]["samples"] - m.get(s - 1, {"samples": 0})["samples"] for s in sorted(m)]
    assert per_step[0] == 4 and per_step[-1] == 10 and sorted(per_step) == per_step  # the ramp, then the full batch


@pytest.mark.distributed
def test_keep_last_k_and_plot(corpus, tmp_path):
    from ettin.train.checkpoint import prune
    from ettin.train.metrics import plot

    run = tmp_path / "run"
    train(corpus, run, 1, 0, "train.max_steps=14", "phase.checkpoint_every_tokens=500", "phase.keep_checkpoints=2")
    kept = list_checkpoints(run)
    assert len(kept) == 2 and json.loads((kept[-1] / "state.json").read_text())["step"] == 14
    assert len(read_ledger(kept[-1])[1]) >= 1
    prune(run, 1)
    assert list_checkpoints(run) == kept[-1:]
    png = plot(run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.distributed
def test_resume_refuses_settings_that_would_change_the_order(corpus, tmp_path):
    run = tmp_path / "run"
    train(corpus, run, 1, 0, "train.max_steps=2")
    for change in ("batch.global_size=12", "phase.seed=22", "data.shuffle_block=7"):
        proc = subprocess.run(
            [sys.executable, "-m", "ettin.cli", "train", corpus["exp"], f"run_dir={run}", "train.max_steps=4", change],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "would change which samples each step sees" in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


# ----------------------------------------------------------------------------- damaged checkpoints, bad folders


def ettin_cli(*args):
    return subprocess.run([sys.executable, "-m", "ettin.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_a_truncated_newest_checkpoint_is_passed_over_on_resume_and_named_as_init(corpus, tmp_path):
    """A kill or a full disk cut the newest model.safetensors short. Resuming the run says which
    file is damaged and goes on from the checkpoint before it, with an unbroken ledger; the same
    checkpoint named by phase.init_checkpoint is one error line, exit 2."""
    from ettin.cli import main

    run = tmp_path / "run"
    train(corpus, run, 1, 0, "train.max_steps=4", "phase.checkpoint_every_tokens=250")
    ckpts = list_checkpoints(run)
    assert len(ckpts) >= 2 and all((c / "manifest.json").is_file() for c in ckpts)
    damaged = ckpts[-1] / "model.safetensors"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:1000])

    proc = ettin_cli(
        "train",
        corpus["exp"],
        f"run_dir={tmp_path / 'next'}",
        "phase=extension",
        f"phase.init_checkpoint={run}",
        "train.max_steps=1",
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {damaged}: has 1,000 bytes, its manifest says"), (
        proc.stderr
    )

    proc = ettin_cli("train", corpus["exp"], f"run_dir={run}", "train.max_steps=6", "phase.checkpoint_every_tokens=250")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in logged(proc.stdout) if line.startswith("warning:")]
    assert warnings == [
        f"warning: {damaged} is damaged (has 1,000 bytes, its manifest says {size:,} (truncated or "
        f"replaced)); moved {ckpts[-1].name} aside to damaged-{ckpts[-1].name}, resuming from "
        f"{ckpts[-2].name}"
    ], proc.stdout
    assert f"resumed from {ckpts[-2]} " in proc.stdout
    entries = ledger(run)
    assert [e.step for e in entries] == list(range(6)) and all(a.end == b.start for a, b in zip(entries, entries[1:]))
    assert main(["checkpoint", "verify", str(run)]) == 0  # the damaged step was written again


@pytest.mark.slow
def test_an_unwritable_run_dir_is_named_before_training(corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = ettin_cli("train", corpus["exp"], f"run_dir={blocker / 'run'}", "train.max_steps=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: run_dir={blocker / 'run'} is not writable ("), proc.stderr
    assert "Traceback" not in proc.stderr
