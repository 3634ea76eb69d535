"""The benchmark scripts run (tiny --smoke sizes) so they cannot rot; their figures are not checked."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow  # each test runs a benchmark script (or all of gpu_check) in a subprocess


@pytest.mark.parametrize(
    "script, header",
    [
        ("bench_train_step.py", "ours tok/s"),
        ("bench_loader.py", "ratio ettin / streaming"),
    ],
)
def test_benchmark_smoke(script, header):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert header in proc.stdout


def test_gpu_check_smoke_writes_the_whole_table(tmp_path):
    """`make gpu-check SMOKE=1`: every section runs on tiny CPU shapes and passes its own checks
    (reference attention, the trainer's syncs and skipped steps, resume bit-equality, throughput)."""
    proc = subprocess.run(
        ["make", "-s", "gpu-check", "SMOKE=1", f"OUT={tmp_path}"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu-check.md").read_text()
    for section in ("### attention", "### trainer", "### throughput", "resume bit-equal: model.safetensors"):
        assert section in report, report
    assert "FAILED" not in report, report
