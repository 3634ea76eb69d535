"""Damaged files are the user's to fix and are named; checkpoints carry a manifest that finds them.

Real checkpoints written by ``write_checkpoint`` (tiny tensors, no training), damaged the ways disks
and kills damage them: cut short, one byte flipped, not JSON any more.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from ettin.cli import main
from ettin.data.ledger import read_ledger
from ettin.errors import EttinError
from ettin.fileio import FileError, read_json, write_json_atomic
from ettin.layout import MANIFEST, list_checkpoints
from ettin.train.checkpoint import (
    TrainState,
    read_checkpoint,
    resume_point,
    verify_checkpoint,
    write_checkpoint,
)


def write_run(run_dir: Path, steps=(2, 4, 6)) -> list[Path]:
    """A run folder with one real checkpoint per step, as the trainer writes them."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        weights = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
        moments = {f"{k}.{m}": torch.randn_like(v) for k, v in weights.items() for m in ("exp_avg", "exp_avg_sq")}
        ledger = {
            "header": {"fingerprint": "f"},
            "steps": [{"step": step - 1, "start": 0, "end": 1, "tokens": 5, "hash": "h"}],
        }
        write_checkpoint(
            run_dir,
            TrainState(step=step, tokens=10 * step),
            weights,
            moments,
            {"config.yaml": "objective: {name: mlm}\n", "ledger.json": json.dumps(ledger)},
            {"hidden_size": 32},
            {"fingerprint": "f"},
        )
    return list_checkpoints(run_dir)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path: Path) -> None:
    """Same size, one byte of tensor data changed: only a digest sees it."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_other_file_and_a_fresh_checkpoint_verifies(tmp_path):
    ckpt = write_run(tmp_path / "run", steps=(2,))[0]
    listed = read_json(ckpt / MANIFEST)["files"]
    on_disk = {p.name for p in ckpt.iterdir()} - {MANIFEST}
    assert (
        set(listed)
        == on_disk
        >= {"model.safetensors", "optimizer.safetensors", "state.json", "ledger.json", "config.yaml", "model.json"}
    )
    assert all(listed[n]["size"] == (ckpt / n).stat().st_size for n in listed)
    assert verify_checkpoint(ckpt, hash_limit=None) is True
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # nothing left half written


def test_a_truncated_tensor_file_is_named_with_or_without_a_manifest(tmp_path):
    ckpt = write_run(tmp_path / "run", steps=(2,))[0]
    truncate(ckpt / "model.safetensors")
    with pytest.raises(FileError, match=r"model\.safetensors: has [\d,]+ bytes, its manifest says [\d,]+"):
        verify_checkpoint(ckpt, hash_limit=0)
    (ckpt / MANIFEST).unlink()  # an old checkpoint: safetensors' own header check still finds the cut
    with pytest.raises(FileError, match=r"model\.safetensors: is damaged or truncated"):
        verify_checkpoint(ckpt)
    with pytest.raises(FileError, match=r"model\.safetensors: is damaged or truncated"):
        read_checkpoint(ckpt)


def test_large_files_are_hashed_only_when_asked(tmp_path):
    """A flipped byte keeps the size: the default check (sizes, small files' digests) passes a file
    over the limit, the full check finds it."""
    ckpt = write_run(tmp_path / "run", steps=(2,))[0]
    flip_last_byte(ckpt / "optimizer.safetensors")
    size = (ckpt / "optimizer.safetensors").stat().st_size
    assert verify_checkpoint(ckpt, hash_limit=size - 1) is True
    with pytest.raises(FileError, match=r"optimizer\.safetensors: its content differs from the xxh3_128 digest"):
        verify_checkpoint(ckpt, hash_limit=None)
    with pytest.raises(FileError, match="optimizer.safetensors"):
        verify_checkpoint(ckpt, hash_limit=size)  # at the limit: small, hashed


def test_resume_falls_back_past_damaged_checkpoints_says_which_file_and_moves_them_aside(tmp_path):
    run = tmp_path / "run"
    ckpts = write_run(run)
    truncate(ckpts[0] / "optimizer.safetensors")
    truncate(ckpts[1] / "optimizer.safetensors")
    truncate(ckpts[2] / "model.safetensors")
    with pytest.raises(
        FileError,
        match=r"checkpoints: all 3 checkpoints are damaged \(the newest: .*step_00000006/model"
        r"\.safetensors: has .*move the folder aside",
    ):
        resume_point(run, print)
    assert list_checkpoints(run) == ckpts  # nothing moved: the user decides
    ckpts = write_run(tmp_path / "run2")
    size = (ckpts[2] / "model.safetensors").stat().st_size
    truncate(ckpts[2] / "model.safetensors")
    (ckpts[1] / MANIFEST).unlink()  # an old checkpoint: its state.json is still parsed before use
    (ckpts[1] / "state.json").write_text('{"step": 4, "tok')  # cut by a full disk
    said = []
    assert resume_point(tmp_path / "run2", said.append) == ckpts[0]
    assert said == [
        f"warning: {ckpts[2] / 'model.safetensors'} is damaged (has {size // 2:,} bytes, its manifest says "
        f"{size:,} (truncated or replaced)); moved step_00000006 aside to damaged-step_00000006, "
        "resuming from step_00000002",
        f"warning: {ckpts[1] / 'state.json'} is damaged (is not valid JSON (Unterminated string starting "
        "at: line 1 column 13 (char 12))); moved step_00000004 aside to damaged-step_00000004, resuming from step_00000002",
    ]
    assert list_checkpoints(tmp_path / "run2") == ckpts[:1]
    assert (ckpts[2].parent / "damaged-step_00000006" / "manifest.json").is_file()  # kept for a look
    assert resume_point(tmp_path / "fresh", said.append) is None


def test_an_old_checkpoint_without_a_manifest_loads_unverified_said_once(tmp_path):
    run = tmp_path / "run"
    ckpts = write_run(run, steps=(2, 4))
    for c in ckpts:
        (c / MANIFEST).unlink()
    said = []
    assert resume_point(run, said.append) == ckpts[1]
    assert said == [f"note: {ckpts[1]} has no manifest.json (written before ettin kept one): loading it unverified"]
    meta, weights, moments = read_checkpoint(ckpts[1])
    assert meta["step"] == 4 and weights.keys() == {"w", "b"} and moments.read("w.exp_avg").shape == (64, 32)


def test_corrupt_json_files_are_named(tmp_path):
    ckpt = write_run(tmp_path / "run", steps=(2,))[0]
    (ckpt / "ledger.json").write_text("")
    with pytest.raises(FileError, match=r"ledger\.json: is not valid JSON \(empty\); restore it"):
        read_ledger(ckpt)
    (ckpt / "ledger.json").write_text('{"steps": []}')
    with pytest.raises(FileError, match=r"ledger\.json: is not a ledger"):
        read_ledger(ckpt)
    (ckpt / "state.json").write_text("[1, 2]")
    with pytest.raises(FileError, match=r"state\.json: holds a JSON list, not a dict"):
        read_checkpoint(ckpt)
    with pytest.raises(FileError, match=r"missing\.json: not found; do this"):
        read_json(tmp_path / "missing.json", "do this")


def test_write_json_atomic_replaces_in_one_rename(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert read_json(path) == {"a": 2} and [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_write_json_atomic_gives_the_mode_of_any_new_file(tmp_path):
    """Not mkstemp's private 0600: stats.json and run folders are read by other users of a cluster."""
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "shared.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644


def test_checkpoint_verify_prints_one_line_per_checkpoint_and_exits_2_on_damage(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = write_run(run)
    assert main(["checkpoint", "verify", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{c}: OK" for c in ckpts]
    (ckpts[0] / MANIFEST).unlink()
    flip_last_byte(ckpts[2] / "model.safetensors")  # only a full digest finds this
    assert main(["checkpoint", "verify", str(run)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{ckpts[0]}: unverified") and lines[1] == f"{ckpts[1]}: OK"
    assert lines[2].startswith(f"{ckpts[2]}: BAD model.safetensors: its content differs")
    assert (
        captured.err == "error: 1 of 3 checkpoint(s) damaged: resume and export fall back to or name them; "
        "restore them from a copy or delete them\n"
    )
    assert main(["checkpoint", "verify", str(ckpts[1])]) == 0  # one checkpoint folder
    assert capsys.readouterr().out == f"{ckpts[1]}: OK\n"
    assert main(["checkpoint", "verify", str(tmp_path / "nothing")]) == 2
    assert "holds no complete checkpoints" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_not_exit_2(tmp_path, monkeypatch):
    """Only EttinError means bad input. An internal ValueError, RuntimeError or OSError raised on the
    way is a bug in ettin: it propagates out of ettin.cli.main (traceback, exit 1), never as exit 2."""
    import ettin.cli
    import ettin.train.checkpoint

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(ettin.cli, "list_configs", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["config", "list"])
    run = tmp_path / "run"
    write_run(run, steps=(2,))
    monkeypatch.setattr(ettin.train.checkpoint, "file_digest", lambda *a: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        main(["checkpoint", "verify", str(run)])
    assert not issubclass(FileError, (ValueError, OSError)) and issubclass(FileError, EttinError)
