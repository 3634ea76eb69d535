"""The one front door (issue #14): ``ettin`` builds its parser without heavy imports, ``ettin launch``
and ``python -m launch.*`` are one parser, and ``pip install .`` gives ``ettin``, ``python -m launch.*``
and ``python -m data_tools`` that work from any folder, not only the repo root."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the code under test, not whatever checkout the venv's editable install points at
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
}
# what a login node must not pay for just to print --help
HEAVY = ("torch", "transformers", "deepspeed", "megatron", "streaming", "numba", "pyarrow")


def imported(argv: list[str]) -> tuple[dict[str, int], subprocess.CompletedProcess]:
    """Run ``python -X importtime -m ettin.cli ARGV``; {module: self microseconds} of every import it made."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ettin.cli", *argv],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, _, name = line[len("import time:") :].split("|")
            modules[name.strip()] = int(own)
    return modules, proc


@pytest.mark.parametrize(
    "argv", [["--help"], ["launch", "--help"], ["launch", "submit", "--help"], ["data", "--help"]], ids=" ".join
)
def test_help_imports_nothing_heavy(argv):
    modules, proc = imported(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: ettin"), proc.stdout
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    print(f"ettin {' '.join(argv)}: {len(modules)} modules imported in {sum(modules.values()) / 1e6:.2f} s")
    assert not heavy, f"building the parser imported {heavy[:10]}"


def test_every_package_is_installed():
    """setup.cfg lists its packages (find: searches one folder only): a new subpackage must join the list."""
    from setuptools import find_packages
    from setuptools.config.setupcfg import read_configuration

    options = read_configuration(ROOT / "setup.cfg")["options"]
    assert set(options["packages"]) == {*find_packages(ROOT / "src"), "data_tools", "launch", "ettin.configs"}
    assert options["package_dir"] == {
        "": "src",
        "data_tools": "data_tools",
        "launch": "launch",
        "ettin.configs": "configs",
    }


def test_launch_commands_are_one_parser(tmp_path, capsys):
    """``ettin launch X`` and ``python -m launch.X`` share flags, help and exit codes (one add_X_parser)."""
    from ettin.cli import build_parser, main
    from ettin.launch.status import cancel_main, status_main
    from ettin.launch.submit import main as submit_main

    launch = build_parser()._subparsers._group_actions[0].choices["launch"]
    commands = launch._subparsers._group_actions[0].choices
    assert list(commands) == ["submit", "status", "cancel"]
    for name, alone in (("submit", submit_main), ("status", status_main), ("cancel", cancel_main)):
        with pytest.raises(SystemExit) as exit_:
            alone(["--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: python -m launch.{name} ")
        assert text.split("\n\n", 1)[1] == commands[name].format_help().split("\n\n", 1)[1]  # all but the usage
    missing = str(tmp_path / "none")
    for name, alone in (("status", status_main), ("cancel", cancel_main)):
        for argv in (["launch", name, "--run-root", missing], ["--run-root", missing]):
            assert (main if argv[0] == "launch" else alone)(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: run root {missing} does not exist") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "submit", "--objectives", "mlm"])  # --sizes is required: argparse's exit 2
    assert exit_.value.code == 2


# ----------------------------------------------------------------------------- pip install . into a fresh venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A throwaway venv holding ``pip install .`` of this checkout (no dependencies, no network).

    Its dependencies come from this test's own venv through a .pth line (a path only: that venv's own .pth
    files, an editable ettin among them, are not read). The build runs on a copy of the sources, so it
    leaves no build/ or *.egg-info in the checkout.
    """
    tmp = tmp_path_factory.mktemp("installed")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_ettin_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    source = tmp / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "data_tools", "launch", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.rmtree(source)  # what runs below must come from the venv
    work = tmp / "elsewhere"  # a folder with no ettin, launch or data_tools in it
    work.mkdir()
    return {"venv": venv, "purelib": Path(purelib), "env": env, "cwd": work}


def run_installed(installed, *argv) -> subprocess.CompletedProcess:
    """A program of the throwaway venv (bin/ettin, bin/python), from outside the repo, without PYTHONPATH."""
    return subprocess.run(
        [str(installed["venv"] / "bin" / argv[0]), *map(str, argv[1:])],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_installed_ettin_launch_and_old_spellings_run_anywhere(installed):
    where = json.loads(
        ok(
            run_installed(
                installed,
                "python",
                "-c",
                "import json, ettin, launch, data_tools; "
                "print(json.dumps([m.__file__ for m in (ettin, launch, data_tools)]))",
            )
        )
    )
    for path in map(Path, where):
        assert path.is_relative_to(installed["purelib"]) and not path.is_relative_to(ROOT), where

    runs = installed["cwd"] / "runs"
    proc = run_installed(
        installed,
        "ettin",
        "launch",
        "submit",
        "--sizes",
        "17m",
        "--objectives",
        "mlm,clm",
        "--phases",
        "pretrain,extension",
        "--dry-run",
        "--run-root",
        runs,
    )
    from ettin.launch.submit import DRY_RUN_MARK

    assert ok(proc).count(DRY_RUN_MARK) == 4 and "4 sbatch scripts, nothing submitted" in proc.stderr
    assert not runs.exists()
    assert ok(run_installed(installed, "ettin", "--help")).startswith("usage: ettin")
    assert ok(run_installed(installed, "python", "-m", "launch.submit", "--help")).startswith(
        "usage: python -m launch.submit "
    )
    proc = run_installed(installed, "python", "-m", "launch.status", "--run-root", runs)
    assert proc.returncode == 2 and proc.stderr.startswith("error: run root") and proc.stderr.count("\n") == 1
    assert ok(run_installed(installed, "python", "-m", "data_tools", "--help")).startswith(
        "usage: python -m data_tools"
    )


@pytest.mark.slow
def test_installed_ettin_data_prepares_a_corpus(installed):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(80)]
    corpus = installed["cwd"] / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n"
            for _ in range(60)
        )
    )
    tokenizer = installed["cwd"] / "tokenizer.json"
    ok(
        run_installed(
            installed, "ettin", "data", "train-tokenizer", corpus, "--vocab-size", 300, "--out", tokenizer, "-q"
        )
    )
    out = installed["cwd"] / "data" / "tiny"
    ok(
        run_installed(
            installed,
            "ettin",
            "data",
            "prepare",
            corpus,
            "--tokenizer",
            tokenizer,
            "--seq-len",
            256,
            "--out",
            out,
            "--quiet",
        )
    )
    assert (out / "index.json").is_file() and (out / "stats.json").is_file()
    assert re.search(r"^samples +60$", ok(run_installed(installed, "ettin", "data", "inspect", out)), re.M)
