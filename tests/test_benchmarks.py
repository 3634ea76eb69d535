"""The benchmark scripts run (tiny --smoke sizes) so they cannot rot; their figures are not checked."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, header", [
    ("bench_train_step.py", "ours tok/s"),
    ("bench_loader.py", "ratio ettin / streaming"),
    ("gpu_step.py", "tokens/s"),
])
def test_benchmark_smoke(script, header):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert header in proc.stdout
