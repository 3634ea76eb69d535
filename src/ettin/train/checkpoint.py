"""Checkpoints (contract 6): written aside, committed by one rename, newest complete one wins.

A checkpoint folder ``checkpoints/step_NNNNNNNN/`` holds
- ``model.safetensors`` + ``model.json``: fp32 weights by name, whole (any TP size), and the model
  config, so ``ettin hf export --checkpoint`` reads it directly;
- ``optimizer.safetensors``: the StableAdamW moments, whole, by name;
- ``state.json``: step, tokens, data position (samples consumed), optimizer step, fingerprint,
  package versions and git revision;
- ``config.yaml`` (the resolved config) and ``ledger.json`` (the steps since the last checkpoint).
Nothing is unpickled on load: safetensors and JSON only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "step_"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done in this phase
    tokens: int = 0  # real tokens consumed in this phase
    samples: int = 0  # the data position: samples consumed in this phase
    optimizer_step: int = 0  # StableAdamW's step (bias correction); carried across phases
    final: bool = False  # the phase's planned tokens are done


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders still being written start with a dot)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest complete one of the run at ``path``."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = list_checkpoints(p)
    return found[-1] if found else None


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("ettin", "torch", "deepspeed", "megatron-core", "transformers", "mosaicml-streaming"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        out["git"] = rev.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["git"] = None
    return out


def write_checkpoint(run_dir: str | Path, state: TrainState, weights: dict, moments: dict, extra_files: dict[str, str],
                     model_json: dict, meta: dict) -> Path:
    """Write everything into a hidden folder, then rename it into place (the commit)."""
    root = checkpoints_dir(run_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "model.json").write_text(json.dumps(model_json, indent=2) + "\n")
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    (tmp / "state.json").write_text(json.dumps(asdict(state) | meta | {"versions": versions()}, indent=2) + "\n")
    for f in tmp.iterdir():  # the data must be on disk before the rename makes the folder count
        _fsync(f, os.O_RDONLY)
    _fsync(tmp, os.O_RDONLY)
    old = None
    if final.exists():  # a checkpoint of the same step from an earlier attempt: move it aside first
        old = root / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(root, os.O_RDONLY)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TensorFile:
    """A safetensors file read lazily: each rank reads only its own slice of each tensor."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(str(path), framework="pt")

    def keys(self) -> set[str]:
        return set(self._file.keys())

    def read(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """Tensor ``name``, or its ``rank``-th of ``parts`` equal slices along ``dim``."""
        if dim is None or parts == 1:
            return self._file.get_tensor(name)
        piece = self._file.get_slice(name)
        size = piece.get_shape()[dim] // parts
        index = [slice(None)] * len(piece.get_shape())
        index[dim] = slice(rank * size, (rank + 1) * size)
        return piece[tuple(index)]


def read_checkpoint(path: Path, moments: bool = True) -> tuple[dict, TensorFile, TensorFile | None]:
    """(state.json, weights, moments) of a complete checkpoint; tensors are read on demand."""
    meta = json.loads((path / "state.json").read_text())
    weights = TensorFile(path / "model.safetensors")
    opt = TensorFile(path / "optimizer.safetensors") if moments else None
    return meta, weights, opt


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all); remove abandoned hidden folders."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(f".{PREFIX}"):
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
