"""Chaos soak on the local 2-node Slurm: one tiny run survives random faults and ends as if none happened.

A 2-rank run (1 node x 2 tasks or 2 nodes x 1 task, data-parallel 2 either way, dropout 0) is
submitted with ``launch.submit`` and hit, in a seeded random order, by at least 8 faults:

- ``kill``: kill -9 of a random rank mid-run (srun --kill-on-bad-exit=1 ends the job: FAILED);
- ``save``: kill -9 of rank 0 while it writes a checkpoint (caught with SIGSTOP while the hidden
  folder exists, so the kill lands mid-write);
- ``usr2``: ``scancel --signal=USR2`` (the time-limit warning): every rank saves, exits 75, the
  job script requeues the job and it resumes by itself on the same nodes;
- ``preempt``: ``scancel`` (TERM): every rank saves at the step boundary, the job is cancelled.

After a ``kill``, ``save`` or ``preempt`` the run is resubmitted on the other topology
(1x2 <-> 2x1) and resumes from its newest complete checkpoint. At the end: the planned tokens are
done; the ledgers of all checkpoints form one sequence (no sample position missing or repeated);
``ettin replay`` matches a random step of every checkpoint; the final weights are bitwise those of
an uninterrupted run (started at the same time, outside Slurm, DP=2). The seed is printed;
``ETTIN_CHAOS_SEED=N`` replays its fault order, topologies and target ranks (not the steps they
land on: those depend on timing). Sized to take about 4 minutes on 2 cores (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ettin.cli import main as ettin_main
from ettin.data.ledger import read_ledger
from ettin.launch.cluster import job_info
from ettin.launch.registry import read_jobs
from ettin.launch.runs import newest_checkpoint
from ettin.launch.submit import main as submit_main
from ettin.layout import list_checkpoints
from ettin.parallel import free_port

from conftest import Source, job_pids

pytestmark = pytest.mark.slurm

KEY = "17m-mlm-pretrain"
PLANNED_TOKENS = 30000  # about 44 steps of about 680 tokens
TOPOLOGY = {"1x2": ("1", "2"), "2x1": ("2", "1")}  # nodes, tasks per node
OTHER = {"1x2": "2x1", "2x1": "1x2"}
FAULTS = ["kill", "kill", "kill", "save", "save", "usr2", "usr2", "preempt"]  # 8, every kind


@pytest.fixture(scope="module")
def tiny(tiny_corpus):
    return tiny_corpus(
        Source("a", 3000, seed=7, min_len=40, max_len=126, weight=1),
        name="chaos-data",
        exp_name="tiny.yaml",
        model={"attn_out_dropout": 0.0},
        phase={"tokens": PLANNED_TOKENS, "seq_len": 128, "checkpoint_every_tokens": 1400, "keep_checkpoints": 0},
        lr_schedule={"warmup_tokens": 3000, "decay_tokens": 3000},
        optim={"lr": "3e-3", "weight_decay": 0.01},
        batch={"global_size": 8, "micro_tokens": 200, "warmup_tokens": 0},
        train={"log_every": 1000},
        data={"workers": 0},
    ).exp


class Soak:
    """Drives one run through its faults; every wait is bounded."""

    def __init__(self, exp: str, root: Path, rng: random.Random):
        self.exp, self.root, self.rng = exp, root, rng
        self.run_dir = root / KEY
        self.log: list[str] = []
        self.detection_s: list[float] = []

    def say(self, text: str) -> None:
        line = f"[chaos {time.strftime('%H:%M:%S')}] {text}"
        self.log.append(line)
        print(line, flush=True)

    def logs(self) -> str:
        return "".join(p.read_text()[-1500:] for p in sorted((self.run_dir / "slurm").glob("*_log.out")))

    def submit(self, topology: str) -> str:
        nodes, tasks = TOPOLOGY[topology]
        code = submit_main(
            [
                "--sizes",
                "17m",
                "--objectives",
                "mlm",
                "--phases",
                "pretrain",
                "--nodes",
                nodes,
                "--gpus-per-node",
                tasks,
                "--cpu",
                "--time",
                "00:10:00",
                "--max-requeues",
                "5",
                "--experiment",
                self.exp,
                "--run-root",
                str(self.root),
            ]
        )
        assert code == 0
        self.job, self.topology = read_jobs(self.root)[KEY]["job_id"], topology
        self.say(f"submitted job {self.job} on {topology}")
        return self.job

    def steps(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def newest_step(self) -> int:
        found = newest_checkpoint(self.run_dir)
        return found[1]["step"] if found else -1

    def wait(self, condition, what: str, timeout: float = 120) -> None:
        deadline, polls = time.time() + timeout, 0
        while not condition():
            if polls % 10 == 0:  # scontrol once a second: the 2 cores are the ranks'
                info = job_info([self.job])[self.job]
                assert time.time() < deadline and info.active, (
                    f"waiting for {what}: job {self.job} is {info.state}\n{self.logs()}"
                )
                assert not (newest_checkpoint(self.run_dir) or (0, {}))[1].get("final"), (
                    "the run finished before its faults"
                )
            polls += 1
            time.sleep(0.1)

    def ranks(self) -> dict[int, int]:
        want = 2
        self.wait(lambda: len(job_pids(self.job)) == want, "both ranks")
        return job_pids(self.job)

    def ended(self, expected: str) -> float:
        """Seconds from now until the job is no longer live; its state must be ``expected``."""
        start = time.time()
        while job_info([self.job])[self.job].active:
            assert time.time() - start < 120, f"job {self.job} still live 2 minutes after the fault\n{self.logs()}"
            time.sleep(0.1)
        state = job_info([self.job])[self.job].state
        assert state == expected, f"job {self.job} ended {state}, expected {expected}\n{self.logs()}"
        return time.time() - start

    def fault(self, kind: str) -> bool:
        """Inject one fault into the live job; True when it hit as intended (``save``: mid-write)."""
        base_steps, base_ckpt = self.steps(), self.newest_step()
        if kind == "kill":  # mid-run: past a checkpoint of this attempt, between two steps' collectives
            self.wait(lambda: self.newest_step() > base_ckpt and self.steps() >= base_steps + 3, "progress")
            rank = self.rng.randrange(2)
            os.kill(self.ranks()[rank], signal.SIGKILL)
            seconds = self.ended("FAILED")
            self.detection_s.append(seconds)
            self.say(f"kill -9 rank {rank} at {self.steps()} steps logged: job FAILED {seconds:.1f} s later")
        elif kind == "save":
            writer = self.ranks()[0]
            self.wait(lambda: self.steps() > base_steps, "a step")  # a checkpoint comes every 2-3 steps
            folder = self.run_dir / "checkpoints"

            def writing() -> set[str]:  # hidden folders: writes in progress, or abandoned by an earlier kill
                return {e.name for e in (os.scandir(folder) if folder.is_dir() else ()) if e.name.startswith(".step_")}

            abandoned, deadline, caught = writing(), time.time() + 60, None
            while caught is None and time.time() < deadline:  # the write takes milliseconds (fsyncs): poll each one
                caught = next(iter(writing() - abandoned), None)
                time.sleep(0.001)
            assert caught, f"no checkpoint write seen\n{self.logs()}"
            os.kill(
                writer, signal.SIGSTOP
            )  # frozen where it is: the kill lands mid-write if the folder is still hidden
            hit = (folder / caught).exists()
            os.kill(writer, signal.SIGKILL)
            self.detection_s.append(self.ended("FAILED"))
            self.say(f"kill -9 rank 0 writing {caught}: {'mid-write' if hit else 'just after the commit'}; job FAILED")
            return hit
        elif kind == "usr2":
            self.wait(lambda: self.steps() >= base_steps + 2, "progress")
            restarts = job_info([self.job])[self.job].restarts
            subprocess.run(["scancel", "--signal=USR2", self.job], check=True)
            self.wait(lambda: job_info([self.job])[self.job].restarts > restarts, "the requeue")
            self.say(f"scancel --signal=USR2: saved, exit 75, requeued (restart {restarts + 1}) on {self.topology}")
        elif kind == "preempt":
            self.wait(lambda: self.steps() >= base_steps + 2, "progress")
            subprocess.run(["scancel", self.job], check=True)
            self.ended("CANCELLED")
            self.say(
                f"scancel (TERM): job CANCELLED at {self.steps()} steps logged, newest checkpoint step {self.newest_step()}"
            )
        return True


def reference_run(exp: str, run_dir: Path) -> list[subprocess.Popen]:
    """The same run, uninterrupted, as 2 plain processes (DP=2, what srun would start)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "ettin.cli", "train", exp, f"run_dir={run_dir}", "train.device=cpu"],
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]


def test_chaos_soak(slurm, tiny, tmp_path, capsys):
    seed = int(os.environ.get("ETTIN_CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    rng = random.Random(seed)
    started = time.time()
    with capsys.disabled():
        print(f"\nchaos soak: seed {seed} (ETTIN_CHAOS_SEED={seed} replays it)", flush=True)
    reference = reference_run(tiny, tmp_path / "reference")
    soak = Soak(tiny, tmp_path / "runs", rng)
    plan = FAULTS[:]
    rng.shuffle(plan)
    soak.submit(rng.choice(sorted(TOPOLOGY)))
    done, mid_write = [], 0
    with capsys.disabled():
        while plan:
            kind = plan.pop(0)
            hit = soak.fault(kind)
            done.append(kind)
            mid_write += kind == "save" and hit
            if kind == "save" and not hit and done.count("save") < 5:
                plan.append("save")  # missed the write window: try again later
            if kind != "usr2":
                soak.submit(OTHER[soak.topology])
        soak.say(f"{len(done)} faults done ({', '.join(done)}); letting the run finish")
        deadline = time.time() + 240
        while job_info([soak.job])[soak.job].active:
            assert time.time() < deadline, soak.logs()
            time.sleep(0.5)
        info = job_info([soak.job])[soak.job]
    assert info.state == "COMPLETED", soak.logs()
    assert len(done) >= 8 and set(done) == {"kill", "save", "usr2", "preempt"} and mid_write >= 1, (done, mid_write)

    # the planned tokens, one continuous ledger over every checkpoint
    checkpoints = list_checkpoints(soak.run_dir)
    entries = [e for c in checkpoints for e in read_ledger(c)[1]]
    assert [e.step for e in entries] == list(range(len(entries)))
    assert entries[0].start == 0 and all(a.end == b.start for a, b in zip(entries, entries[1:]))
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["final"] and state["tokens"] >= PLANNED_TOKENS and state["samples"] == entries[-1].end
    assert not [
        p.name for p in (soak.run_dir / "checkpoints").iterdir() if p.name.startswith(".")
    ]  # abandoned writes pruned

    # ettin replay: a random step of every checkpoint rebuilds to its ledger hash
    for ckpt in checkpoints:
        step = rng.choice(read_ledger(ckpt)[1]).step
        assert ettin_main(["replay", str(ckpt), "--step", str(step)]) == 0
        out = capsys.readouterr().out
        assert out.rstrip().endswith("-> MATCH"), (ckpt, out)

    # bitwise the uninterrupted run's weights
    codes = [p.wait(timeout=240) for p in reference]
    assert codes == [0, 0], reference[0].communicate()[0][-3000:]
    ref = list_checkpoints(tmp_path / "reference")[-1]
    assert json.loads((ref / "state.json").read_text())["step"] == state["step"]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(checkpoints[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    wall = time.time() - started
    summary = {
        "seed": seed,
        "faults": done,
        "mid_write_kills": mid_write,
        "detection_s": [round(s, 1) for s in soak.detection_s],
        "checkpoints": len(checkpoints),
        "steps": state["step"],
        "attempts": len(read_jobs(soak.root)[KEY]["history"]) + 1 + done.count("usr2"),
        "wall_s": round(wall),
    }
    with capsys.disabled():
        print(f"chaos soak passed: {json.dumps(summary)}", flush=True)
