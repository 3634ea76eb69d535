"""The run folder's layout: file names and the one reader of its ``checkpoints/step_*`` folders.

A run folder holds ``metrics.jsonl`` and ``checkpoints/step_NNNNNNNN/`` (what each file of a
checkpoint is: ettin.train.checkpoint). Folders still being written start with a dot, and a
checkpoint counts once its ``state.json`` is there (the folder is committed by one rename).

Nothing here imports torch: the launch tools (ettin.launch.runs) read run folders on a login node.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"  # + the step, 8 digits
METRICS_FILE = "metrics.jsonl"
# a checkpoint folder's files
WEIGHTS_FILE = "model.safetensors"  # fp32 weights by name
MODEL_JSON = "model.json"  # the model config
MOMENTS_FILE = "optimizer.safetensors"  # the optimizer moments by name
STATE_FILE = "state.json"  # step, tokens, data position, ...
CONFIG_FILE = "config.yaml"  # the resolved experiment config
LEDGER_FILE = "ledger.json"  # the steps since the previous checkpoint
MANIFEST = "manifest.json"  # size and digest of every other file


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_folder_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_checkpoint(path: str | Path) -> bool:
    """``path`` is a complete checkpoint folder (its state.json is written)."""
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders still being written start with a dot)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest complete one of the run at ``path``."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    found = list_checkpoints(p)
    return found[-1] if found else None


def checkpoints_at(path: str | Path) -> tuple[list[Path], bool]:
    """(the complete checkpoints ``path`` names, whether it is a run folder): a checkpoint folder names
    itself; any other folder is read as a run folder, its checkpoints oldest first (none: ``[]``)."""
    p = Path(path)
    if is_checkpoint(p):
        return [p], False
    return list_checkpoints(p), True
