"""Checkpoints (contract 6, docs/DESIGN.md): written aside, committed by one rename, newest complete one wins.

A checkpoint folder ``checkpoints/step_NNNNNNNN/`` holds (file names and the folder reader:
ettin.layout)
- ``model.safetensors`` + ``model.json``: fp32 weights by name, whole (any TP size), and the model
  config, so ``ettin hf export --checkpoint`` reads it directly;
- ``optimizer.safetensors``: the StableAdamW moments, whole, by name;
- ``state.json``: step, tokens, data position (samples consumed), optimizer step, fingerprint,
  package versions and git revision;
- ``config.yaml`` (the resolved config) and ``ledger.json`` (the steps since the last checkpoint);
- ``manifest.json``, written after every other file and before the rename that commits the folder:
  the size and XXH3-128 digest of each file, so a checkpoint damaged later (a copy cut short, a
  disk error, a hand edit) is found before it is trained on or exported.
Nothing is unpickled on load: safetensors and JSON only.

How much is verified (``verify_checkpoint``): sizes and the safetensors headers always, which
catches any truncation; the digests of files up to ``SMALL_FILE_BYTES`` always (the JSON and YAML
files); the digests of the large tensor files only when asked, because that reads the whole
checkpoint once more (about 0.5 s per GiB from the page cache, more from a network file system):
``ettin checkpoint verify`` always does, ``ettin hf export --verify-all`` does, and a resume does
with ``train.verify_checkpoints=all``. A checkpoint from before manifests loads, unverified.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ettin.fileio import FileError, UnreadableFile, open_safetensors, read_json, write_json_atomic
from ettin.layout import (
    MANIFEST,
    MODEL_JSON,
    MOMENTS_FILE,
    STATE_FILE,
    STEP_PREFIX,
    WEIGHTS_FILE,
    checkpoints_dir,
    list_checkpoints,
    step_folder_name,
)

DIGEST = "xxh3_128"
SMALL_FILE_BYTES = 64 << 20  # files up to this size are always hashed when a checkpoint is verified
# what the user can do about a damaged checkpoint file
RESTORE = (
    "restore it from a copy or start from an earlier checkpoint (`ettin checkpoint verify RUN` lists the sound ones)"
)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done in this phase
    tokens: int = 0  # real tokens consumed in this phase
    samples: int = 0  # the data position: samples consumed in this phase
    optimizer_step: int = 0  # StableAdamW's step (bias correction); carried across phases
    final: bool = False  # the phase's planned tokens are done


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("ettin", "torch", "deepspeed", "megatron-core", "transformers", "mosaicml-streaming"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        out["git"] = rev.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["git"] = None
    return out


def write_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    weights: dict,
    moments: dict,
    extra_files: dict[str, str],
    model_json: dict,
    meta: dict,
) -> Path:
    """Write everything into a hidden folder, then rename it into place (the commit)."""
    root = checkpoints_dir(run_dir)
    final = root / step_folder_name(state.step)
    tmp = root / f".{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS_FILE))
    save_file(moments, str(tmp / MOMENTS_FILE))
    (tmp / MODEL_JSON).write_text(json.dumps(model_json, indent=2) + "\n")
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state) | meta | {"versions": versions()}, indent=2) + "\n")
    write_manifest(tmp)  # after every other file; the rename below is what makes the folder count
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


def file_digest(path: Path, chunk: int = 8 << 20) -> str:
    """XXH3-128 of a file's bytes, read in chunks (the fast digest the ledger uses too)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and digest of every file in ``folder`` in ``folder/manifest.json``."""
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            files[f.name] = {"size": f.stat().st_size, DIGEST: file_digest(f)}
    write_json_atomic(folder / MANIFEST, {"version": 1, "files": files})


def verify_checkpoint(path: Path, hash_limit: int | None = SMALL_FILE_BYTES) -> bool:
    """Check a checkpoint (or model) folder; raise a :class:`FileError` naming the first bad file.

    With a manifest: every listed file exists with its size, and files up to ``hash_limit`` bytes
    (all when None) have their digest. With or without one: every ``*.safetensors`` header covers
    its file exactly and every ``*.json`` parses. Returns False when there is no manifest (a
    checkpoint written before manifests): it was only checked for truncation.
    """
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        listed = read_json(manifest, RESTORE).get("files")
        if not isinstance(listed, dict):
            raise FileError(manifest, "lists no files", RESTORE)
        for name, entry in listed.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and DIGEST in entry):
                raise FileError(manifest, f"its entry for {name} is malformed", RESTORE)
            _check_listed(path / name, entry, hash_limit)
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            open_safetensors(f, RESTORE)
        elif f.suffix == ".json":
            read_json(f, RESTORE)
    return manifest.is_file()


def _check_listed(f: Path, entry: dict, hash_limit: int | None) -> None:
    """One manifest entry: the file is there, has its size, and (up to ``hash_limit``) its digest."""
    if not f.is_file():
        raise FileError(f, "is missing (listed in manifest.json)", RESTORE)
    try:
        size = f.stat().st_size
        if size != entry["size"]:
            raise FileError(
                f, f"has {size:,} bytes, its manifest says {entry['size']:,} (truncated or replaced)", RESTORE
            )
        if (hash_limit is None or size <= hash_limit) and file_digest(f) != entry[DIGEST]:
            raise FileError(f, f"its content differs from the {DIGEST} digest in manifest.json (corrupted)", RESTORE)
    except OSError as e:  # a disk error or a permission: the file is there but cannot be checked
        raise UnreadableFile(f, f"cannot be read ({e.strerror or e})", RESTORE) from None


def resume_hash_limit(cfg) -> int | None:
    """How much a resume hashes: the small files, or everything with ``train.verify_checkpoints=all``."""
    return None if cfg.train.verify_checkpoints == "all" else SMALL_FILE_BYTES


def unverified_note(path: Path) -> str:
    return f"note: {path} has no {MANIFEST} (written before ettin kept one): loading it unverified"


def resume_point(
    run_dir: str | Path, say: Callable[[str], None], hash_limit: int | None = SMALL_FILE_BYTES
) -> Path | None:
    """The newest checkpoint of the run that verifies, or None when the run has none yet.

    Damaged newer checkpoints are reported through ``say`` and renamed ``damaged-step_...`` (kept
    for a look, no longer counted), so the run goes on from the last sound one and its ledger stays
    one unbroken chain. When every checkpoint is damaged nothing is moved and the run stops, rather
    than silently start over."""
    found, damaged = list_checkpoints(run_dir), []
    for path in reversed(found):
        try:
            verified = verify_checkpoint(path, hash_limit)
        except UnreadableFile:  # an I/O or permission error says nothing about the checkpoint: stop, move nothing
            raise
        except FileError as e:
            damaged.append((path, e))
            continue
        for bad, e in damaged:
            aside = bad.with_name(f"damaged-{bad.name}")
            if aside.exists():
                aside = bad.with_name(f"damaged-{bad.name}.{uuid.uuid4().hex[:8]}")
            os.rename(bad, aside)
            say(
                f"warning: {e.path} is damaged ({e.problem}); moved {bad.name} aside to {aside.name}, "
                f"resuming from {path.name}"
            )
        if not verified:
            say(unverified_note(path))
        return path
    if found:
        newest = damaged[0][1]
        raise FileError(
            checkpoints_dir(run_dir),
            f"all {len(found)} checkpoints are damaged (the newest: {newest.path}: {newest.problem})",
            "restore one, or move the folder aside to start this run_dir over",
        )
    return None


class TensorFile:
    """A safetensors file read lazily: each rank reads only its own slice of each tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open_safetensors(self.path, RESTORE)
        self._names = set(self._file.keys())

    def keys(self) -> set[str]:
        return set(self._names)

    def read(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """Tensor ``name``, or its ``rank``-th of ``parts`` equal slices along ``dim``."""
        if name not in self._names:
            raise FileError(self.path, f"has no tensor '{name}'", "it was not written by this model's training run")
        if dim is None or parts == 1:
            return self._file.get_tensor(name)
        piece = self._file.get_slice(name)
        size = piece.get_shape()[dim] // parts
        index = [slice(None)] * len(piece.get_shape())
        index[dim] = slice(rank * size, (rank + 1) * size)
        return piece[tuple(index)]


def read_checkpoint(path: Path, moments: bool = True) -> tuple[dict, TensorFile, TensorFile | None]:
    """(state.json, weights, moments) of a complete checkpoint; tensors are read on demand."""
    meta = read_json(Path(path) / STATE_FILE, RESTORE)
    weights = TensorFile(path / WEIGHTS_FILE)
    opt = TensorFile(path / MOMENTS_FILE) if moments else None
    return meta, weights, opt


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all); remove abandoned hidden folders."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(f".{STEP_PREFIX}"):
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
