"""The planner (`ettin plan`) and the run graph of a submission: pure, no Slurm needed."""

from __future__ import annotations

import math

import pytest

from ettin.config import ConfigError, load_config
from ettin.data.schedule import BatchSchedule
from ettin.errors import EttinError
from ettin.flops import flops_per_token
from ettin.launch.plan import estimate, published_tokens_per_gpu_s
from ettin.launch.plan import main as plan_main
from ettin.launch.runs import CHAIN, known_sizes, parse_list, parse_phases, plan_runs
from ettin.launch.slurm_job import JobSpec, parse_time, requeue_lines

# ----------------------------------------------------------------------------- the planner


def test_default_throughput_is_the_published_timings():
    # RECIPE.md: about 985k, 655k, 463k, 296k, 146k, 64k tokens/s per GPU
    expected = {"17m": 985e3, "32m": 655e3, "68m": 463e3, "150m": 296e3, "400m": 146e3, "1b": 64e3}
    for size, rate in expected.items():
        assert published_tokens_per_gpu_s(size) == pytest.approx(rate, rel=0.005), size


def test_estimate_counts_steps_with_the_batch_size_ramp():
    cfg = load_config("ettin", ["model=17m", "objective=mlm", "phase=pretrain"])
    out = estimate(cfg, gpus=4, tokens_per_gpu_s_at_1024=1e6)
    schedule = BatchSchedule.from_config(cfg)
    samples = math.ceil(cfg.phase.tokens / cfg.phase.seq_len)
    assert out["tokens"] == 1_700_000_000_000 and out["seq_len"] == 1024
    assert out["steps"] == schedule.step_at(samples - 1) + 1
    # the ramp: every step before it is smaller than the global batch, the one at its end is full
    ramp = out["warmup_steps"]
    assert schedule.size(ramp - 1) < 4608 == schedule.size(ramp)
    # more steps than at the full batch alone, because the ramp's steps are small
    assert out["steps"] > samples / 4608
    assert out["checkpoints"] == 200  # 1.7T / 8.5B
    assert out["gpu_hours"] == pytest.approx(1.7e12 / 1e6 / 3600)
    assert out["days"] == pytest.approx(out["gpu_hours"] / 4 / 24)


def test_estimate_scales_throughput_to_the_phase_sequence_length():
    cfg = load_config("ettin", ["model=1b", "objective=clm", "phase=extension"])
    out = estimate(cfg, gpus=8, tokens_per_gpu_s_at_1024=64e3)
    # the published rate is for pretraining (seq 1024, CLM: every token labelled); this run labels every token too
    ratio = flops_per_token(cfg.model, 1024)["total"] / flops_per_token(cfg.model, 7999, label_fraction=1.0)["total"]
    assert out["tokens"] == 83_333_000_000 and out["seq_len"] == 7999 and out["warmup_steps"] == 0
    assert out["tokens_per_gpu_s"] == pytest.approx(64e3 * ratio) and ratio < 1
    assert out["checkpoints"] == math.ceil(83_333_000_000 / 8.5e9)
    assert out["steps"] == math.ceil(math.ceil(83_333_000_000 / 7999) / 4608)


def test_plan_cli_prints_every_run_and_says_what_a_sample_is(capsys):
    assert plan_main(["--sizes", "17m,1b", "--objectives", "clm", "--gpus", "8", "--tokens-per-gpu-s", "17m=2e6"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("17m ", "1b "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("17m", "clm", "pretrain"),
        ("17m", "clm", "extension"),
        ("17m", "clm", "decay"),
        ("17m", "clm", "cross"),
        ("1b", "clm", "pretrain"),
        ("1b", "clm", "extension"),
        ("1b", "clm", "decay"),
        ("1b", "clm", "cross"),
        ("17m", "all", "total"),
        ("1b", "all", "total"),
    ]
    assert rows[0][9] == "2M" and rows[4][9] == "64k"  # the given rate; the published one for 1b
    assert "days on 8 GPUs" in out and "a sample is about seq_len tokens" in out


def test_estimate_scales_mlm_by_its_labelled_tokens():
    """The head runs only on labelled tokens: decay's 15% masking costs less per token than 30%."""
    pretrain = load_config("ettin", ["model=150m", "phase=pretrain"])
    decay, extension = (load_config("ettin", ["model=150m", f"phase={p}"]) for p in ("decay", "extension"))
    assert estimate(pretrain, 4, 1e6)["tokens_per_gpu_s"] == pytest.approx(1e6)  # the reference itself
    rate = {cfg.phase.name: estimate(cfg, 4, 1e6)["tokens_per_gpu_s"] for cfg in (decay, extension)}
    assert rate["extension"] < rate["decay"] < 1e6  # same length, fewer labels: faster; long: slower
    ratio = (
        flops_per_token(pretrain.model, 1024, label_fraction=0.30)["total"]
        / flops_per_token(decay.model, 7999, label_fraction=0.15)["total"]
    )
    assert rate["decay"] == pytest.approx(1e6 * ratio)


def _ramp_tables(out: str) -> dict[str, list[list[str]]]:
    """``ettin plan --ramp`` output -> {"150m pretrain": rows of the stage table (header left out)}."""
    tables, name = {}, None
    for line in out.splitlines():
        if ": the global batch ramps from " in line:
            name = line.split(":")[0]
            tables[name] = []
        elif name and line.split() and line.split()[0] != "stage" and not line.startswith("Notes"):
            tables[name].append(line.split())
    return tables


def test_plan_ramp_shows_each_stage_batch_steps_and_tokens(capsys):
    assert plan_main(["--ramp", "--sizes", "150m", "--phases", "pretrain,extension,cross"]) == 0
    out = capsys.readouterr().out
    tables = _ramp_tables(out)
    assert list(tables) == ["150m pretrain", "150m cross"]  # the extension has no ramp
    assert "from 288 to 4,608 sequences in 16 stages over 50B tokens (1,024 tokens per sample)" in out
    assert "from 48 to 4,608 sequences in 16 stages over 10B tokens (7,999 tokens per sample)" in out
    for name, phase in (("150m pretrain", "pretrain"), ("150m cross", "cross")):
        cfg = load_config("ettin", ["model=150m", f"phase={phase}"])
        schedule = BatchSchedule.from_config(cfg)
        *stages, total, full = tables[name]
        num = [[int(x.replace(",", "")) for x in row[1:5]] for row in stages]  # batch, first step, steps, samples
        assert [row[0] for row in stages] == [str(i) for i in range(1, 17)]
        assert [b for b, *_ in num] == sorted(b for b, *_ in num) and num[0][0] == cfg.batch.warmup_start_size
        for batch, first, steps, samples in num:
            assert schedule.size(first) == batch == schedule.size(first + steps - 1) and samples == batch * steps
        assert total[0] == "ramp" and int(total[1].replace(",", "")) == sum(n[2] for n in num)
        assert int(total[2].replace(",", "")) == sum(n[3] for n in num) >= cfg.batch.warmup_tokens / cfg.phase.seq_len
        assert full[:3] == ["full", "4,608", total[1]] and schedule.size(int(total[1].replace(",", ""))) == 4608
    # at a data's mean tokens per sample the same tokens take more, smaller-sample steps
    assert plan_main(["--ramp", "--sizes", "150m", "--phases", "cross", "--tokens-per-sample", "2000"]) == 0
    out = capsys.readouterr().out
    assert "(2,000 tokens per sample)" in out
    assert int(_ramp_tables(out)["150m cross"][-2][1].replace(",", "")) > int(
        tables["150m cross"][-2][1].replace(",", "")
    )
    assert plan_main(["--ramp", "--phases", "decay"]) == 0 and "no batch-size ramp" in capsys.readouterr().out
    assert plan_main(["--ramp", "--tokens-per-sample", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --tokens-per-sample must be positive")


@pytest.mark.slow
def test_plan_memory_every_size_and_phase_fits_80gb_on_four_gpus(capsys):
    """``ettin plan --memory --sizes all``: the published setup (4 GPUs, TP 1, ZeRO-1) with the default
    micro budgets fits every size, objective and phase into 80 GB."""
    assert plan_main(["--memory", "--sizes", "all"]) == 0
    out = capsys.readouterr().out
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["size", "objective", "phase"] and header.endswith("fits")
    sizes = known_sizes()
    rows = [line.split() for line in lines if line.split() and line.split()[0] in sizes]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (s, o, p) for s in sizes for o in ("mlm", "clm") for p in ("pretrain", "extension", "decay", "cross")
    ]
    for r in rows:
        assert r[4:7] == ["1", "1", "4"]  # TP, ZeRO, DP
        assert r[-1] == "yes" and float(r[-3]) <= 80 * 0.9 and r[-2] == "80", r
        assert int(r[7].replace(",", "")) >= int(r[3])  # the budget holds at least one full sample
    assert "predicted peak GB" in out


def test_plan_memory_given_budget_and_layout(capsys):
    assert (
        plan_main(
            ["--memory", "--sizes", "1b", "--objectives", "clm", "--phases", "decay", "--micro-tokens", "2000000"]
        )
        == 0
    )
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("1b ")]
    assert row[7] == "2,000,000" and row[-1] == "NO" and float(row[-3]) > 80
    assert (
        plan_main(
            [
                "--memory",
                "--sizes",
                "150m",
                "--phases",
                "pretrain",
                "--gpus",
                "8",
                "parallel.tensor=2",
                "parallel.zero_stage=2",
                "train.device_memory_gb=141",
            ]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("150m ")]
    assert len(rows) == 2 and all(r[4:7] == ["2", "2", "4"] and r[-2] == "141" and r[-1] == "yes" for r in rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--memory", "--gpus", "3", "parallel.tensor=2"], "--gpus 3 is not divisible by parallel.tensor=2"),
        (["--memory", "--micro-tokens", "-5"], "--micro-tokens must be >= 0"),
    ],
)
def test_plan_memory_bad_input_is_one_line(capsys, argv, message):
    assert plan_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "17m,99m"], "--sizes: unknown size '99m'"),
        (["--phases", "pretrain,warmup"], "--phases: unknown phase 'warmup'"),
        (["--tokens-per-gpu-s", "fast"], "--tokens-per-gpu-s 'fast' must be a number"),
    ],
)
def test_plan_bad_input_is_one_line(capsys, argv, message):
    assert plan_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- the run graph


def test_all_sizes_both_objectives_three_phases_and_cross_make_48_runs(tmp_path):
    sizes = parse_list("all", known_sizes(), "size", "--sizes")
    assert sizes == ["17m", "32m", "68m", "150m", "400m", "1b"]
    runs = plan_runs(sizes, ["mlm", "clm"], list(CHAIN), True, tmp_path)
    assert len(runs) == 48 and len({r.key for r in runs}) == 48
    seen = set()
    for run in runs:
        if run.phase == "pretrain":
            assert run.starts_from is None
        elif run.phase == "cross":  # from the OTHER objective's final (decay) run
            other = "clm" if run.objective == "mlm" else "mlm"
            assert run.starts_from == f"{run.size}-{other}-decay"
        else:
            assert run.starts_from == f"{run.size}-{run.objective}-{CHAIN[CHAIN.index(run.phase) - 1]}"
        assert run.starts_from is None or run.starts_from in seen  # listed after what it starts from
        assert run.run_dir == tmp_path / run.key
        seen.add(run.key)
    cross = next(r for r in runs if r.key == "150m-clm-cross")
    assert cross.overrides(tmp_path) == [
        "model=150m",
        "objective=clm",
        "phase=cross",
        f"run_dir={tmp_path / '150m-clm-cross'}",
        f"phase.init_checkpoint={tmp_path / '150m-mlm-decay'}",
    ]


def test_bad_names_and_resources_are_one_line():
    with pytest.raises(
        ConfigError, match=r"^--sizes: unknown size '2b'; known: 17m, 32m, 68m, 150m, 400m, 1b \(or all\)$"
    ):
        parse_list("17m,2b", known_sizes(), "size", "--sizes")
    with pytest.raises(ConfigError, match="added with --cross"):
        parse_phases("pretrain,cross")
    with pytest.raises(ConfigError, match=r"^--nodes 1 x --gpus-per-node 3 = 3 ranks is not divisible by --tp 2"):
        JobSpec(nodes=1, gpus_per_node=3, tp=2).check()
    with pytest.raises(ConfigError, match=r"^--time 00:02:00 leaves under 60 s to train .* at least 00:03:30$"):
        JobSpec(time="00:02:00", signal_s=120).check()
    with pytest.raises(ConfigError, match="needs >= 90 s"):
        JobSpec(signal_s=30).check()
    JobSpec(nodes=2, gpus_per_node=4, tp=8, time="00:03:00", signal_s=90).check()


def test_slurm_time_formats():
    assert parse_time("00:03:00") == 180 and parse_time("1-00:00:00") == 86400 and parse_time("90") == 5400
    assert parse_time("2-12") == 2 * 86400 + 12 * 3600 and parse_time("10:30") == 630
    with pytest.raises(ConfigError, match="not a Slurm time"):
        parse_time("3h")


def test_requeue_rule_is_the_same_in_the_template(request):
    """slurm/ettin-train.sbatch (for users without submitit) ends with the rule launch.submit writes."""
    from pathlib import Path

    template = (Path(request.config.rootpath) / "slurm" / "ettin-train.sbatch").read_text()
    assert "\n".join(requeue_lines("$MAX_REQUEUES")) in template
    for line in (
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --dependency=singleton",
    ):
        assert line in template


@pytest.mark.slow
def test_a_corrupt_jobs_json_is_one_line_naming_it_in_status_cancel_and_submit(tmp_path, request):
    """jobs.json cut short (a full disk, a kill mid-edit): each launch tool says which file and how
    to get going again, with no traceback."""
    import os
    import subprocess
    import sys

    root = tmp_path / "runs"
    root.mkdir()
    (root / "jobs.json").write_text('{"runs": {"17m-mlm-pretrain": {"job_id": "12')
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(request.config.rootpath / "src"), str(request.config.rootpath), os.environ.get("PYTHONPATH", "")]
        ),
    }
    for tool, extra in (("status", ["--no-slurm"]), ("cancel", []), ("submit", ["--sizes", "17m", "--dry-run"])):
        proc = subprocess.run(
            [sys.executable, "-m", f"launch.{tool}", "--run-root", str(root), *extra],
            capture_output=True,
            text=True,
            cwd=request.config.rootpath,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2, (tool, proc.stderr)
        assert proc.stderr.startswith(f"error: {root / 'jobs.json'}: is not valid JSON (Unterminated string "), (
            proc.stderr
        )
        assert (
            proc.stderr.endswith(
                "; restore it from a backup, or delete it (status then lists the runs from their "
                "folders; cancel their jobs with scancel)\n"
            )
            and proc.stderr.count("\n") == 1
        ), proc.stderr
    (root / "jobs.json").write_text('{"runs": {"17m-mlm-pretrain": {"job_id": "12"}}}')  # valid JSON, not a record
    from ettin.launch.registry import read_jobs
    from ettin.launch.status import status_main

    with pytest.raises(EttinError, match=r"jobs\.json: is not a job record"):
        read_jobs(root)
    assert status_main(["--run-root", str(root), "--no-slurm"]) == 2
