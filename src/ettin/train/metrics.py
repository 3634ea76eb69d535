"""Where a run's numbers go: one small logger interface and a container that fans out to sinks.

The training loop calls ``MetricsLogger.log(metrics)`` once per step (and once per evaluation)
and never knows which sinks exist. Sinks: ``metrics.jsonl`` in the run folder (always; the record
that ``ettin plot``, ``ettin plan`` and ``launch.status`` read), TensorBoard events
(``metrics.tensorboard``) and Weights & Biases (``metrics.wandb.mode`` online or offline; an
optional extra, ``pip install '.[wandb]'``). Only rank 0 logs.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

from ettin.errors import EttinError
from ettin.layout import METRICS_FILE

log = logging.getLogger("ettin")

WANDB_ID_FILE = "wandb_run_id"  # one W&B run per run folder, continued across requeues


def _scalars(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)
    }


class BaseLogger:
    """A metrics sink: ``log`` one row (it holds ``step``), ``close`` at the end."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlLogger(BaseLogger):
    """One JSON object per line, appended across requeues (readers keep a step's last row)."""

    def __init__(self, run_dir: Path):
        self.file = open(run_dir / METRICS_FILE, "a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger(BaseLogger):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(BaseLogger):
    """A W&B run per run folder: the id is kept in the folder, so a requeued job continues the same
    run rather than starting a second one. The run's config and data fingerprint go into its config."""

    def __init__(self, run_dir: Path, settings, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise EttinError(
                "metrics.wandb.mode is set but the wandb package is not installed: "
                "pip install '.[wandb]', or set metrics.wandb.mode=disabled"
            ) from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            mode=settings.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            name=name,
            config=config,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans each row out to every sink; a no-op on ranks other than 0."""

    def __init__(self, sinks: list[BaseLogger]):
        self.sinks = sinks

    @classmethod
    def for_run(
        cls, run_dir: str | Path, enabled: bool, metrics_cfg=None, config: dict | None = None, name: str = ""
    ) -> MetricsLogger:
        if not enabled:
            return cls([])
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        sinks: list[BaseLogger] = [JsonlLogger(run_dir)]
        if metrics_cfg is None or metrics_cfg.tensorboard:
            sinks.append(TensorBoardLogger(run_dir))
        if metrics_cfg is not None and metrics_cfg.wandb.mode != "disabled":
            sinks.append(WandbLogger(run_dir, metrics_cfg.wandb, config or {}, name))
        return cls(sinks)

    def log(self, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(metrics, metrics["step"])

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def progress_line(row: dict, phase_tokens: int, eval_loss: float | None = None) -> str:
    """The periodic one-line summary: step, tokens, losses, rate, MFU and the time left in the phase."""
    rate = row["tokens_per_s"]
    left = max(phase_tokens - row["tokens"], 0) / rate if rate > 0 else float("nan")
    eta = (
        "?"
        if not math.isfinite(left)
        else time.strftime("%H:%M:%S", time.gmtime(left))
        if left < 86400
        else f"{left / 86400:.1f}d"
    )
    return (
        f"step {row['step']:>6} | tokens {row['tokens']:>11,} | loss {row['loss']:.4f} | "
        + (f"val {eval_loss:.4f} | " if eval_loss is not None else "")
        + f"lr {row['lr']:.2e} | gnorm {row['grad_norm']:.3f} | {rate:>8,.0f} tok/s | "
        + (f"mfu {row['mfu']:.1%} | " if row.get("mfu") is not None else "")
        + f"data wait {row['data_wait_s']:.3f}s | eta {eta}"
    )


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The training rows of a run (one per step, the last written wins after a requeue)."""
    return [r for r in read_all_metrics(run_dir) if "loss" in r]


def read_all_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise EttinError(f"{path} not found: pass a run folder written by `ettin train`")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the step is logged again after the resume
            continue
    latest = {(r["step"], "loss" in r): r for r in rows}  # a requeued run may log a step twice; keep the last
    return [latest[k] for k in sorted(latest)]


def loss_curves(rows: list[dict]) -> dict[str, tuple[list, list]]:
    """Label -> (tokens, loss): the training loss and each validation set's."""
    curves = {"train": ([r["tokens"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r])}
    for name in sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/loss")}):
        key = f"eval/{name}/loss"
        curves[f"validation: {name}"] = ([r["tokens"] for r in rows if key in r], [r[key] for r in rows if key in r])
    return curves


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (with the validation curves, when the run has them) and throughput against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_all_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (x, y) in loss_curves(rows).items():
        ax1.plot(x, y, label=label, marker=None if label == "train" else "o")
    ax1.set(xlabel="tokens", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot([r["tokens"] for r in train], [r["tokens_per_s"] for r in train])
    ax2.set(xlabel="tokens", ylabel="tokens/s", title="throughput")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out or Path(run_dir) / "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
