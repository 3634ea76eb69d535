import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ["HF_HUB_OFFLINE"] = "1"  # parity tests must never reach a hub
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"


def pytest_configure(config):
    # registered here, not in pyproject.toml: a [tool.pytest.ini_options] table there would
    # replace setup.cfg's [tool:pytest] settings instead of adding to them
    config.addinivalue_line("markers", "slurm: runs jobs on the local 2-node Slurm cluster (slurm/local/)")


def free_port_block(n: int) -> int:
    """A base port with n free ports after it (slurmctld, then one slurmd per node)."""
    for _ in range(200):
        base = random.randrange(41000, 48000)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports for Slurm")


@pytest.fixture(scope="session")
def slurm():
    """Install (apt-get) and start a private 2-node cluster; export its SLURM_CONF; stop it afterwards.

    Jobs inherit this process's environment (sbatch exports it all), PYTHONPATH included: it is
    set to this checkout, so a job imports the code under test even where the venv's editable
    install points at another checkout (checked below with a one-task srun)."""
    state = Path(tempfile.mkdtemp(prefix="ettin-slurm-"))  # short: the munge socket path must be < 108 bytes
    env = {**os.environ, "ETTIN_SLURM_DIR": str(state), "ETTIN_SLURM_NODES": "2",
           "ETTIN_SLURM_PORT": str(free_port_block(3)), "ETTIN_SLURM_CPUS": "2"}
    installed = subprocess.run([str(LOCAL / "install.sh")], env=env, capture_output=True, text=True)
    if installed.returncode != 0:  # in CI (this kind of machine, apt reachable) it must work: fail, don't skip
        why = f"Slurm cannot be installed on this machine: {(installed.stderr or installed.stdout).strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    up = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(line[len("export "):].split("=", 1) for line in up.stdout.splitlines() if line.startswith("export "))
        assert set(exports) == {"SLURM_CONF", "PATH"}, up.stdout
        again = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stderr  # idempotent
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", exports["SLURM_CONF"])
            mp.setenv("PATH", f"{LOCAL / 'bin'}:{os.environ['PATH']}")  # the sacct stand-in
            mp.setenv("OMP_NUM_THREADS", "1")  # 2 cores, up to 4 ranks
            mp.setenv("ETTIN_PYTHON", sys.executable)  # for the sbatch template
            mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                mp.delenv(name, raising=False)
            where = subprocess.run(["srun", "-N1", "-n1", sys.executable, "-c", "import ettin, launch; print(ettin.__file__, launch.__file__)"],
                                   capture_output=True, text=True, timeout=120)
            assert where.stdout.split() == [str(REPO / "src" / "ettin" / "__init__.py"), str(REPO / "launch" / "__init__.py")], \
                where.stdout + where.stderr
            yield {"state": state, "env": env}
    finally:
        down = subprocess.run([str(LOCAL / "down.sh")], env=env, capture_output=True, text=True, timeout=120)
        print(down.stderr, end="")
        leftovers = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
        assert not leftovers, f"processes of the test cluster left running: {leftovers}"
        shutil.rmtree(state, ignore_errors=True)


def job_pids(job_id: str) -> dict[int, int]:
    """The `ettin train` process of each rank (SLURM_PROCID) of a running job, read from /proc.

    A rank's own forks (data-loader workers) share its command line and environment: the rank is
    the one whose parent is not itself a candidate."""
    candidates = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"ettin.cli" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if env.get(b"SLURM_JOB_ID") == str(job_id).encode() and b"SLURM_PROCID" in env:
            candidates[int(proc.name)] = (int(env[b"SLURM_PROCID"]), parent)
    return {rank: pid for pid, (rank, parent) in candidates.items() if parent not in candidates}
