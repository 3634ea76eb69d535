"""Slurm integration: a real Slurm cluster of 2 emulated nodes, started here by slurm/local/up.sh.

Jobs are tiny CPU runs (gloo) of real MDS data: a 2-node x 2-task run, the same run on 1 node x 2
tasks from the sbatch template (identical ledgers; started together with an empty extensions
folder, they compile nothing), a run warned by its time limit that saves, requeues itself and
finishes, a run whose rank is killed (-9) that fails within seconds and resumes when resubmitted,
and a 2 sizes x 2 objectives x 2 phases chain. The cluster (the ``slurm`` fixture, conftest.py)
is stopped at the end of the session (slurm/local/down.sh). Skipped, with the reason, only when
Slurm cannot be installed on this machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ettin.data.ledger import read_ledger
from ettin.launch.cluster import job_info
from ettin.launch.registry import read_jobs
from ettin.launch.runs import newest_checkpoint
from ettin.launch.status import cancel_main, collect, status_main
from ettin.launch.submit import DRY_RUN_MARK
from ettin.launch.submit import main as submit_main

from conftest import REPO, Source, free_port_block, job_pids

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def corpus(tiny_corpus):
    """Real MDS shards and a tiny experiment: every size's recipe file is overridden to the same tiny model."""
    return tiny_corpus(
        Source("a", 3000, seed=1, min_len=40, max_len=126, weight=1),
        name="slurm-data",
        exp_name="tiny.yaml",
        phase={"tokens": 6000, "seq_len": 128, "checkpoint_every_tokens": 2000},
        lr_schedule={"warmup_tokens": 1000, "decay_tokens": 1000},
        optim={"lr": "3e-3", "weight_decay": 0.01},
        batch={"global_size": 8, "micro_tokens": 200, "warmup_tokens": 0},
        train={"log_every": 1000, "collective_timeout_s": 60},
        data={"workers": 0},
    )


# ----------------------------------------------------------------------------- helpers


def submit(capsys, *argv) -> dict[str, str]:
    """Run launch.submit in this process; return {run key: job id} from its jobs.json."""
    code = submit_main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    root = Path(argv[argv.index("--run-root") + 1])
    return {k: r["job_id"] for k, r in read_jobs(root).items()}


def wait_for(job_ids, timeout: float, logs: list[Path] = ()) -> dict:
    """Poll until no job is live any more; their JobInfo by id."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        infos = job_info(list(job_ids))
        if not any(i.active for i in infos.values()):
            return infos
        time.sleep(2)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
    raise AssertionError(f"jobs still live after {timeout:.0f}s: {job_info(list(job_ids))}\n{tails}")


def job_logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "slurm").glob("*_log.out")) + sorted(run_dir.glob("*.out"))


def ledger(run_dir: Path):
    entries = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        entries += read_ledger(ckpt)[1]
    return entries


def assert_no_position_repeated_or_skipped(entries) -> None:
    assert [e.step for e in entries] == list(range(len(entries)))
    assert entries[0].start == 0 and all(a.end == b.start for a, b in zip(entries, entries[1:]))


def test_status_of_an_empty_run_root_needs_no_cluster(tmp_path):
    """launch.status on an empty run root is one error line, without Slurm (plan is tested in tests/test_plan.py)."""
    out = subprocess.run(
        [sys.executable, "-m", "launch.status", "--run-root", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.startswith("error: run root") and out.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- dry run


def test_dry_run_emits_48_valid_scripts_with_the_right_dependencies(slurm, tmp_path):
    root = tmp_path / "runs"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.submit",
            "--sizes",
            "all",
            "--objectives",
            "mlm,clm",
            "--phases",
            "pretrain,extension,decay",
            "--cross",
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--partition",
            "debug",
            "--dry-run",
            "--run-root",
            str(root),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not root.exists()  # nothing written, nothing submitted
    chunks = out.stdout.split(DRY_RUN_MARK)[1:]
    assert len(chunks) == 48
    scripts = {}
    for chunk in chunks:
        head, script = chunk.split("\n", 1)
        scripts[head.split()[0]] = script
    sizes = ["17m", "32m", "68m", "150m", "400m", "1b"]
    assert set(scripts) == {
        f"{s}-{o}-{p}" for s in sizes for o in ("mlm", "clm") for p in ("pretrain", "extension", "decay", "cross")
    }
    for key, script in scripts.items():
        size, objective, phase = key.split("-")
        sbatch = dict(
            line[len("#SBATCH --") :].split("=", 1) if "=" in line else (line[len("#SBATCH --") :], "")
            for line in script.splitlines()
            if line.startswith("#SBATCH --")
        )
        source = {
            "pretrain": None,
            "extension": f"{size}-{objective}-pretrain",
            "decay": f"{size}-{objective}-extension",
            "cross": f"{size}-{'clm' if objective == 'mlm' else 'mlm'}-decay",
        }[phase]
        expected = f"'afterok:<{source}>,singleton'" if source else "singleton"
        assert sbatch["dependency"] == expected, key
        assert sbatch["job-name"] == f"ettin-{key}" and sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "2"
        assert sbatch["gpus-per-node"] == "2" and sbatch["signal"] == "USR2@120" and sbatch["open-mode"] == "append"
        assert "requeue" in sbatch and sbatch["kill-on-invalid-dep"] == "yes"
        assert f"phase={phase}" in script and f"run_dir={root / key}" in script
        assert (f"phase.init_checkpoint={root / source}" in script) if source else "phase.init_checkpoint" not in script
        assert 'scontrol requeue "$SLURM_JOB_ID"' in script and '"$attempt" -lt 200' in script
        assert "--kill-on-bad-exit=1" in next(line for line in script.splitlines() if line.startswith("srun "))
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, key
    # and sbatch itself accepts them (without the placeholder dependency; this cluster has no GPUs: 2 CPU ranks per node)
    for key, script in scripts.items():
        script = "\n".join(line for line in script.splitlines() if not line.startswith("#SBATCH --dependency"))
        test = subprocess.run(
            ["sbatch", "--test-only", "--gpus-per-node=0"], input=script, capture_output=True, text=True
        )
        assert test.returncode == 0, (key, test.stderr)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_submits_nothing(slurm, corpus, tmp_path, capsys, monkeypatch):
    jobs_before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    dead_conf = tmp_path / "dead.conf"
    conf = Path(os.environ["SLURM_CONF"]).read_text()
    port = next(line.split("=")[1] for line in conf.splitlines() if line.startswith("SlurmctldPort="))
    dead_conf.write_text(conf.replace(f"SlurmctldPort={port}", f"SlurmctldPort={free_port_block(1)}"))
    base = ["--experiment", corpus["exp"], "--cpu", "--run-root", str(tmp_path / "runs"), "--time", "00:05:00"]
    cases = [
        (["--sizes", "17m,99m"], {}, "--sizes: unknown size '99m'; known: 17m, 32m, 68m, 150m, 400m, 1b (or all)"),
        (["--sizes", "17m", "--phases", "pretrain,warmup"], {}, "--phases: unknown phase 'warmup'"),
        (
            ["--sizes", "17m", "--nodes", "1", "--gpus-per-node", "3", "--tp", "2"],
            {},
            "--nodes 1 x --gpus-per-node 3 = 3 ranks is not divisible by --tp 2",
        ),
        (
            ["--sizes", "17m", "--run-root", str(not_a_dir / "runs")],
            {},
            f"run root {not_a_dir / 'runs'} is not writable",
        ),
        (["--sizes", "17m"], {"SLURM_CONF": str(dead_conf)}, "Slurm is not reachable (scontrol ping via"),
        (["--sizes", "17m"], {"PATH": "/nonexistent"}, "Slurm is not reachable: sbatch/scontrol not found on PATH"),
        (["--sizes", "17m", "--time", "00:02:00"], {}, "--time 00:02:00 leaves under 60 s to train"),
        (["--sizes", "17m", "model.num_hedas=3"], {}, "17m-mlm-pretrain: override model.num_hedas"),
        (["--sizes", "17m", "model=150m"], {}, "override 'model=150m': model is set per run by --sizes"),
        (
            ["--sizes", "17m", "--phases", "extension"],
            {},
            "17m-mlm-extension starts from 17m-mlm-pretrain, which is not in",
        ),
        (
            ["--sizes", "17m", "--partition", "nope"],
            {},
            "Slurm rejects the job (sbatch: error: invalid partition specified: nope)",
        ),
        (
            ["--sizes", "17m", "--nodes", "3"],
            {},
            "Slurm rejects the job (allocation failure: Requested node configuration",
        ),
    ]
    for argv, env, message in cases:
        with monkeypatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            code = submit_main(base + argv)
        out, err = capsys.readouterr()
        assert code == 2, (argv, out, err)
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (argv, err)
        assert out == ""
    assert not (tmp_path / "runs" / "jobs.json").exists()
    assert (
        subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout == jobs_before
    )


# ----------------------------------------------------------------------------- real jobs


@pytest.fixture(scope="session")
def two_topologies(slurm, corpus, tmp_path_factory):
    """The same tiny run at 2 nodes x 2 tasks (launch.submit, submitit) and 1 node x 2 tasks (the sbatch template)."""
    root = tmp_path_factory.mktemp("topologies")
    extensions = root / "torch_extensions"  # where torch would JIT-build a C++ op: empty, shared by both jobs
    extensions.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(extensions))  # sbatch hands the environment to the job
        code = submit_main(
            [
                "--sizes",
                "17m",
                "--objectives",
                "mlm",
                "--phases",
                "pretrain",
                "--nodes",
                "2",
                "--gpus-per-node",
                "2",
                "--cpu",
                "--time",
                "00:10:00",
                "--experiment",
                corpus["exp"],
                "--run-root",
                str(root / "dp4"),
            ]
        )
        assert code == 0
        dp4 = read_jobs(root / "dp4")["17m-mlm-pretrain"]
        dp2_dir = root / "dp2" / "17m-mlm-pretrain"
        dp2_dir.mkdir(parents=True)
        out = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--nodes=1",
                "--ntasks-per-node=2",
                "--gpus-per-node=0",
                "--cpus-per-task=1",
                "--time=10",
                "--job-name=ettin-dp2",
                f"--output={dp2_dir}/%x-%j.out",
                str(REPO / "slurm" / "ettin-train.sbatch"),
                corpus["exp"],
                "model=17m",
                f"run_dir={dp2_dir}",
                "train.device=cpu",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        dp2_job = out.stdout.strip().split(";")[0]
    infos = wait_for([dp4["job_id"], dp2_job], 300, job_logs(Path(dp4["run_dir"])) + job_logs(dp2_dir))
    return {
        "dp4": Path(dp4["run_dir"]),
        "dp4_job": dp4["job_id"],
        "dp4_root": root / "dp4",
        "dp2": dp2_dir,
        "dp2_job": dp2_job,
        "infos": infos,
        "extensions": extensions,
    }


def test_two_nodes_two_tasks_train_checkpoint_and_complete(two_topologies, capsys):
    t = two_topologies
    assert t["infos"][t["dp4_job"]].state == "COMPLETED", job_logs(t["dp4"])[0].read_text()[-3000:]
    checkpoints = sorted((t["dp4"] / "checkpoints").glob("step_*"))
    assert len(checkpoints) >= 3  # every 2000 tokens, and the final one
    _, state = newest_checkpoint(t["dp4"])
    assert state["final"] and state["tokens"] >= 6000 and state["world_size"] == 4
    log = (t["dp4"] / "slurm" / f"{t['dp4_job']}_0_log.out").read_text()
    assert "attempt 1 on 127.0.0.[1-2]" in log and "done:" in log
    assert len(list((t["dp4"] / "slurm").glob(f"{t['dp4_job']}_*_log.out"))) == 4  # one log per task
    [row] = collect(t["dp4_root"])
    assert row["state"] == "COMPLETED" and row["final"] and row["tokens"] >= row["planned_tokens"] == 6000
    assert row["loss"] is not None and row["checkpoint"] == checkpoints[-1].name
    # submitit sees the finished job too (through the sacct stand-in: there is no slurmdbd)
    import submitit

    assert submitit.SlurmJob(folder=t["dp4"] / "slurm", job_id=t["dp4_job"]).state == "COMPLETED"
    # and the planner measures its throughput
    from ettin.launch.plan import main as plan_main

    assert (
        plan_main(["--sizes", "17m", "--objectives", "mlm", "--phases", "pretrain", "--from-run", str(t["dp4"])]) == 0
    )
    assert f"measured in {t['dp4']}" in capsys.readouterr().out


def test_one_node_and_two_nodes_give_identical_ledgers(two_topologies):
    t = two_topologies
    assert t["infos"][t["dp2_job"]].state == "COMPLETED", job_logs(t["dp2"])[-1].read_text()[-3000:]
    assert newest_checkpoint(t["dp2"])[1]["world_size"] == 2
    dp2, dp4 = ledger(t["dp2"]), ledger(t["dp4"])
    assert len(dp2) == len(dp4) > 3
    assert [(e.step, e.start, e.end, e.tokens, e.hash) for e in dp2] == [
        (e.step, e.start, e.end, e.tokens, e.hash) for e in dp4
    ]
    assert_no_position_repeated_or_skipped(dp4)


def test_jobs_started_together_compile_nothing(two_topologies):
    """Both jobs (6 ranks) started at the same moment from an empty TORCH_EXTENSIONS_DIR: both
    complete and nothing was built there (DeepSpeed's CPU shm comm op is not JIT-compiled)."""
    t = two_topologies
    assert t["infos"][t["dp4_job"]].state == t["infos"][t["dp2_job"]].state == "COMPLETED"
    assert not any(t["extensions"].iterdir()), sorted(p.name for p in t["extensions"].rglob("*"))[:10]


def test_time_limit_warns_saves_requeues_and_completes(slurm, corpus, two_topologies, tmp_path, capsys):
    """USR2 90 s before a 3-minute limit: save, exit 75, scontrol requeue, resume, finish the planned tokens."""
    # About 130 s of training at the 1 node x 2 tasks speed just measured: the first attempt is warned
    # 60-90 s after it starts (Slurm checks limits every 30 s), long before its end, even on a faster machine.
    rows = [json.loads(line) for line in (two_topologies["dp2"] / "metrics.jsonl").read_text().splitlines()][1:]
    tokens = int(statistics.median(r["tokens_per_s"] for r in rows) * 130)
    root = tmp_path / "runs"
    jobs = submit(
        capsys,
        "--sizes",
        "17m",
        "--objectives",
        "mlm",
        "--phases",
        "pretrain",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--cpu",
        "--time",
        "00:03:00",
        "--signal-seconds",
        "90",
        "--max-requeues",
        "3",
        "--experiment",
        corpus["exp"],
        "--run-root",
        str(root),
        f"phase.tokens={tokens}",
        f"phase.checkpoint_every_tokens={10 * tokens}",
    )
    job = jobs["17m-mlm-pretrain"]
    run_dir = root / "17m-mlm-pretrain"
    deadline = time.time() + 300
    while job_info([job])[job].restarts == 0:  # the first attempt runs until it is warned
        assert time.time() < deadline and job_info([job])[job].active, job_logs(run_dir)[0].read_text()[-3000:]
        time.sleep(0.5)
    # Requeued. Give the next attempt time to finish whatever is left, however fast this machine is
    # today (else it may be warned again and take a third attempt: correct, but slow).
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
    info = wait_for([job], 600, job_logs(run_dir))[job]
    log = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    assert info.state == "COMPLETED", log[-4000:]
    assert info.restarts == 1
    assert "stopping for signal SIGUSR2" in log and "exit 75 (requeue me)" in log
    assert "requeue 1 of 3" in log and "attempt 2 on" in log and "resumed from" in log
    assert log.index("attempt 1 on") < log.index("stopping for signal SIGUSR2") < log.index("attempt 2 on")  # appended
    entries = ledger(run_dir)
    assert_no_position_repeated_or_skipped(entries)
    _, state = newest_checkpoint(run_dir)
    assert state["final"] and state["tokens"] >= tokens and state["samples"] == entries[-1].end
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 2  # the save at the warning, and the final one
    assert read_ledger(saved[1])[0]["previous_checkpoint"] == saved[0].name
    [row] = collect(root)
    assert row["state"] == "COMPLETED" and row["restarts"] == info.restarts


def test_two_sizes_two_objectives_two_phases_run_in_dependency_order(slurm, corpus, tmp_path, capsys):
    root = tmp_path / "runs"
    jobs = submit(
        capsys,
        "--sizes",
        "17m,32m",
        "--objectives",
        "mlm,clm",
        "--phases",
        "pretrain,extension",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--cpu",
        "--time",
        "00:10:00",
        "--experiment",
        corpus["exp"],
        "--run-root",
        str(root),
        "phase.tokens=3000",
        "phase.checkpoint_every_tokens=1500",
    )
    assert len(jobs) == 8 and (root / "jobs.txt").is_file()
    records = read_jobs(root)
    infos = wait_for(list(jobs.values()), 420, [p for r in records.values() for p in job_logs(Path(r["run_dir"]))])
    for key, job in jobs.items():
        assert infos[job].state == "COMPLETED", (key, job_logs(root / key)[0].read_text()[-3000:])
        assert newest_checkpoint(root / key)[1]["final"]
    for size in ("17m", "32m"):
        for objective in ("mlm", "clm"):
            pre, ext = f"{size}-{objective}-pretrain", f"{size}-{objective}-extension"
            assert records[pre]["dependency"] is None and records[ext]["dependency"] == f"afterok:{jobs[pre]}"
            assert infos[jobs[ext]].start_time >= infos[jobs[pre]].end_time  # ISO times compare as text
            final = newest_checkpoint(root / pre)[0]
            log = (root / ext / "slurm" / f"{jobs[ext]}_0_log.out").read_text()
            assert f"phase extension: starting from {final}" in log
    out = subprocess.run(
        [sys.executable, "-m", "launch.status", "--run-root", str(root)], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "phase", "job", "state"] and len(lines) == 9
    assert all(" COMPLETED " in line and ", final)" in line for line in lines[1:])


def test_cancel_stops_a_set_and_a_live_run_is_not_submitted_twice(slurm, corpus, tmp_path, capsys):
    root = tmp_path / "runs"
    common = [
        "--objectives",
        "mlm",
        "--phases",
        "pretrain",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--cpu",
        "--time",
        "00:05:00",
        "--experiment",
        corpus["exp"],
        "--run-root",
        str(root),
        "--sbatch",
        "begin=now+1hour",
    ]  # held: never starts
    jobs = submit(capsys, "--sizes", "17m,32m", *common)
    assert submit_main(["--sizes", "17m", *common]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: 17m-mlm-pretrain already has job {jobs['17m-mlm-pretrain']} (PENDING)")
        and err.count("\n") == 1
    )
    assert cancel_main(["--run-root", str(root), "--sizes", "17m"]) == 0
    assert f"cancelled 17m-mlm-pretrain (job {jobs['17m-mlm-pretrain']}, was PENDING)" in capsys.readouterr().out
    infos = job_info(list(jobs.values()))
    assert infos[jobs["17m-mlm-pretrain"]].state == "CANCELLED" and infos[jobs["32m-mlm-pretrain"]].state == "PENDING"
    assert status_main(["--run-root", str(root), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["17m-mlm-pretrain"]["state"] == "CANCELLED" and rows["32m-mlm-pretrain"]["state"] == "PENDING"
    # once cancelled, the run may be submitted again; its earlier job id is kept in the history
    again = submit(capsys, "--sizes", "17m", *common)
    assert read_jobs(root)["17m-mlm-pretrain"]["history"] == [jobs["17m-mlm-pretrain"]]
    assert cancel_main(["--run-root", str(root)]) == 0
    assert "2 job(s) cancelled" in capsys.readouterr().out
    assert {i.state for i in job_info([again["17m-mlm-pretrain"], jobs["32m-mlm-pretrain"]]).values()} == {"CANCELLED"}


def test_template_chain_script_submits_phases_with_afterok(slurm, corpus, tmp_path):
    """slurm/ettin-chain.sh: pretrain -> extension -> decay with the template, each waiting for the one before."""
    out = subprocess.run(
        [
            str(REPO / "slurm" / "ettin-chain.sh"),
            "17m",
            "clm",
            str(tmp_path / "runs"),
            "--hold",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--ntasks-per-node=1",
            "--",
            "train.device=cpu",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ETTIN_EXPERIMENT": corpus["exp"]},
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    try:
        assert [r[0] for r in rows] == ["17m-clm-pretrain", "17m-clm-extension", "17m-clm-decay"]
        for (_, before, _), (key, job, run_dir) in zip(rows, rows[1:]):
            show = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
            assert f"Dependency=afterok:{before}(unfulfilled)" in show and f"JobName=ettin-{key} " in show, show
            assert run_dir == str(tmp_path / "runs" / key)
    finally:
        subprocess.run(["scancel", *[r[1] for r in rows]])


def test_a_killed_rank_ends_the_job_in_seconds_and_a_resubmission_resumes(slurm, corpus, tmp_path, capsys):
    """kill -9 of one rank mid-run (2 nodes x 1 task), with the default 600 s collective timeout:
    Slurm ends the step at once (srun --kill-on-bad-exit=1), the job fails within 2 minutes, and
    the resubmitted run resumes from its newest complete checkpoint and finishes, its ledger whole."""
    root = tmp_path / "runs"
    args = [
        "--sizes",
        "17m",
        "--objectives",
        "mlm",
        "--phases",
        "pretrain",
        "--nodes",
        "2",
        "--gpus-per-node",
        "1",
        "--cpu",
        "--time",
        "00:10:00",
        "--experiment",
        corpus["exp"],
        "--run-root",
        str(root),
        "phase.tokens=30000",
        "phase.checkpoint_every_tokens=2000",
        "train.collective_timeout_s=600",
    ]
    job = submit(capsys, *args)["17m-mlm-pretrain"]
    run_dir = root / "17m-mlm-pretrain"
    deadline = time.time() + 300
    while newest_checkpoint(run_dir) is None or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 6:
        assert time.time() < deadline and job_info([job])[job].active, "\n".join(
            p.read_text()[-2000:] for p in job_logs(run_dir)
        )
        time.sleep(0.2)
    pids = job_pids(job)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], 9)
    killed = time.time()
    while job_info([job])[job].active:
        assert time.time() - killed < 120, "the job still runs 2 minutes after one of its ranks died"
        time.sleep(0.2)
    detected = time.time() - killed
    with capsys.disabled():
        print(f"\nkill -9 of rank 1: the job ended {detected:.1f} s later", flush=True)
    assert job_info([job])[job].state == "FAILED"
    logs = "".join(p.read_text() for p in job_logs(run_dir))
    assert "Terminating StepId" in logs, logs[-3000:]  # Slurm ended the step (not the transport, not a timeout)
    newest, state = newest_checkpoint(run_dir)
    assert not state["final"]
    again = submit(capsys, *args)["17m-mlm-pretrain"]
    info = wait_for([again], 300, job_logs(run_dir))[again]
    log = (run_dir / "slurm" / f"{again}_0_log.out").read_text()
    assert info.state == "COMPLETED", log[-3000:]
    assert f"resumed from {newest}" in log
    entries = ledger(run_dir)
    assert_no_position_repeated_or_skipped(entries)
    _, state = newest_checkpoint(run_dir)
    assert state["final"] and state["tokens"] >= 30000 and state["samples"] == entries[-1].end
