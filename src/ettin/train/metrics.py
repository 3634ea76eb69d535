"""Per-step metrics: a JSONL file and TensorBoard events (rank 0), a compact progress line, a plot."""
from __future__ import annotations

import json
import time
from pathlib import Path
from ettin.errors import EttinError


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, log_every: int = 10):
        self.enabled, self.log_every = enabled, max(1, log_every)
        self.start = time.time()
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")  # appended across requeues
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, metrics["step"])
        if metrics["step"] % self.log_every == 0:
            print(f"step {metrics['step']:>6} | tokens {metrics['tokens']:>11,} | loss {metrics['loss']:.4f} | "
                  f"lr {metrics['lr']:.2e} | gnorm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:>8,.0f} tok/s | "
                  + (f"mfu {metrics['mfu']:.1%} | " if metrics.get("mfu") is not None else "")
                  + f"data wait {metrics['data_wait_s']:.3f}s", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EttinError(f"{path} not found: pass a run folder written by `ettin train`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {r["step"]: r for r in rows}  # a requeued run may log a step twice; keep the last
    return [latest[s] for s in sorted(latest)]


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and throughput against tokens, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    tokens = [r["tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(tokens, [r["loss"] for r in rows])
    ax1.set(xlabel="tokens", ylabel="loss", title="training loss")
    ax2.plot(tokens, [r["tokens_per_s"] for r in rows])
    ax2.set(xlabel="tokens", ylabel="tokens/s", title="throughput")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out or Path(run_dir) / "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
