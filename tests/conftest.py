import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ["HF_HUB_OFFLINE"] = "1"  # parity tests must never reach a hub
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"


# ----------------------------------------------------------------------------- tiny corpora
# One way to build the small datasets the tests train and read: real MDS sources (streaming's
# MDSWriter, via ettin.testing) of synthetic token ids and an experiment file over them. Tests ask
# the session-scoped `tiny_corpus` factory for the shape they need; `tokenizer_path` is one real
# tokenizer.json (a small BPE) for the tests that prepare text.

VOCAB = 512
# stats.json's record of the tokenizer the ids came from (synthetic ids: no tokenizer file is read)
TOKENIZER_STATS = {"tokenizer": {"sha256": "t", "vocab_size": VOCAB}}
TINY_MODEL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_heads": 2,
    "num_layers": 2,
    "pad_token_id": 0,
    "cls_token_id": 1,
    "sep_token_id": 2,
    "mask_token_id": 3,
}
WORDS = (
    "the model reads tokens and writes shards while workers run ahead ; naïve café "
    "数据 données — quick brown fox 12345 def return class { } ( ) = + \n"
).split(" ")


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass(frozen=True)
class Source:
    """One MDS source of ``synthetic_corpus(n, VOCAB, seed, min_len, max_len)`` samples, written with
    ``compression``/``hashes``/``size_limit``, and its entry in ``data.sources`` (``weight`` and
    ``validation`` are written only when given)."""

    name: str
    n: int = 40
    seed: int = 0
    min_len: int = 8
    max_len: int = 64
    compression: str | None = "zstd"
    hashes: tuple[str, ...] = ("xxh3_64",)
    size_limit: int = 1 << 14
    weight: float | None = None
    validation: float | None = None

    def entry(self) -> dict:
        extra = {k: v for k, v in (("weight", self.weight), ("validation", self.validation)) if v is not None}
        return {"name": self.name, "path": self.name, **extra}


def write_sources(root: Path, sources) -> dict[str, list[list[int]]]:
    """Write each ``Source`` under ``root``; the samples written, by source name."""
    from ettin.testing import synthetic_corpus, write_mds_source

    written = {}
    for s in sources:
        samples = synthetic_corpus(s.n, VOCAB, s.seed, s.min_len, s.max_len)
        write_mds_source(
            root / s.name,
            samples,
            compression=s.compression,
            size_limit=s.size_limit,
            stats=TOKENIZER_STATS,
            hashes=s.hashes,
        )
        written[s.name] = samples
    return written


def _flow(value) -> str:
    """``value`` as YAML flow text; strings are written as they are (``1e6``, ``3e-3``, paths)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_experiment(
    path: Path,
    root: Path,
    sources,
    *,
    objective: str = "mlm",
    model: dict | None = None,
    phase: dict | None = None,
    lr_schedule: dict | None = None,
    optim: dict | None = None,
    batch: dict | None = None,
    train: dict | None = None,
    data: dict | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """An experiment file over ``sources`` (``Source`` entries) under ``root``: the 17m recipe with
    the tiny model (``model`` entries change it), ``phase``/``lr_schedule``/``batch`` as given (these
    defaults otherwise), ``optim``/``train`` only when given, and ``data`` entries (workers, blocks,
    validation, ...) next to root, cache_dir (``root/cache`` unless given) and the sources."""
    sections = {
        "defaults": {"model": "17m", "objective": objective, "phase": "pretrain"},
        "model": {**TINY_MODEL, **(model or {})},
        "phase": phase or {"tokens": "1e6", "seq_len": 128},
        "lr_schedule": lr_schedule or {"warmup_tokens": 1000},
        "optim": optim,
        "batch": batch or {"global_size": 12, "micro_tokens": 200, "warmup_tokens": 0},
        "train": train,
        "data": {
            "root": root,
            "cache_dir": cache_dir or root / "cache",
            **(data or {}),
            "sources": [s.entry() for s in sources],
        },
    }
    path.write_text("".join(f"{key}: {_flow(value)}\n" for key, value in sections.items() if value is not None))
    return path


@dataclass(frozen=True)
class TinyCorpus:
    """What ``tiny_corpus`` made: the data root, the experiment file, the samples of each source.
    ``corpus["root"]``, ``corpus["exp"]`` and ``corpus[<source name>]`` read the same."""

    root: Path
    exp: str
    samples: dict

    def __getitem__(self, key):
        return {"root": self.root, "exp": self.exp}[key] if key in ("root", "exp") else self.samples[key]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Factory: ``tiny_corpus(*sources, name="corpus", exp_name="exp.yaml", **experiment)`` writes the
    ``Source`` entries under a fresh folder ``name`` with an experiment file over them
    (``write_experiment``'s keywords) and returns a ``TinyCorpus``. One spec is written once per
    session; a test that changes the files must ask for a ``name`` of its own."""
    made = {}

    def make(*sources: Source, name: str = "corpus", exp_name: str = "exp.yaml", **experiment) -> TinyCorpus:
        key = (name, sources, exp_name, repr(sorted(experiment.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(name)
            samples = write_sources(root, sources)
            exp = write_experiment(root / exp_name, root, sources, **experiment)
            made[key] = TinyCorpus(root, str(exp), samples)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A small byte-level BPE (vocab 400, specials first) trained on WORDS text: a real tokenizer.json."""
    from ettin.data.tokenizer import train_bpe

    rng = random.Random(7)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe([make_text(rng, 400) for _ in range(100)], vocab_size=400).save(str(path))
    return path


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
    env = {
        **os.environ,
        "ETTIN_SLURM_DIR": str(state),
        "ETTIN_SLURM_NODES": "2",
        "ETTIN_SLURM_PORT": str(free_port_block(3)),
        "ETTIN_SLURM_CPUS": "2",
    }
    installed = subprocess.run([str(LOCAL / "install.sh")], env=env, capture_output=True, text=True)
    if installed.returncode != 0:  # in CI (this kind of machine, apt reachable) it must work: fail, don't skip
        why = f"Slurm cannot be installed on this machine: {(installed.stderr or installed.stdout).strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    up = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(
            line[len("export ") :].split("=", 1) for line in up.stdout.splitlines() if line.startswith("export ")
        )
        assert set(exports) == {"SLURM_CONF", "PATH"}, up.stdout
        again = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stderr  # idempotent
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", exports["SLURM_CONF"])
            mp.setenv("PATH", f"{LOCAL / 'bin'}:{os.environ['PATH']}")  # the sacct stand-in
            mp.setenv("OMP_NUM_THREADS", "1")  # 2 cores, up to 4 ranks
            mp.setenv("ETTIN_PYTHON", sys.executable)  # for the sbatch template
            mp.setenv(
                "PYTHONPATH",
                os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            )
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                mp.delenv(name, raising=False)
            where = subprocess.run(
                [
                    "srun",
                    "-N1",
                    "-n1",
                    sys.executable,
                    "-c",
                    "import ettin, launch; print(ettin.__file__, launch.__file__)",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert where.stdout.split() == [
                str(REPO / "src" / "ettin" / "__init__.py"),
                str(REPO / "launch" / "__init__.py"),
            ], where.stdout + where.stderr
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
