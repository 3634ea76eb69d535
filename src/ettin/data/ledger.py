"""The data-order ledger (contract 5, docs/DESIGN.md) and the tools that read it back.

The trainer records, for every step, the positions it consumed, its real token count and the
hash of its global batch (every sample's input ids and labels, masks included). Each checkpoint
holds the steps since the previous one plus a header (fingerprint, seed, schedule), so "the data
between checkpoint k-1 and k" is exact, and ``replay`` proves it by rebuilding and re-hashing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ettin.data.order import validation_settings
from ettin.errors import EttinError
from ettin.fileio import FileError, read_json, write_json_atomic
from ettin.layout import CONFIG_FILE, LEDGER_FILE


@dataclass
class LedgerEntry:
    step: int
    start: int
    end: int
    tokens: int
    hash: str


class Ledger:
    """Steps recorded since the last checkpoint; ``flush`` writes them into a checkpoint folder."""

    def __init__(self, header: dict):
        self.header = dict(header)
        self.entries: list[LedgerEntry] = []

    @classmethod
    def for_pipeline(cls, pipeline, cfg) -> Ledger:
        from ettin.data.collate import SAMPLE_DIGEST
        from ettin.data.order import ORDER_VERSION

        return cls(
            {
                "fingerprint": pipeline.manifest.fingerprint(),
                "order_version": ORDER_VERSION,
                "sample_digest": SAMPLE_DIGEST,
                "phase": cfg.phase.name,
                "sources": [x.name for x in pipeline.manifest.sources],
                "order": order_key(cfg, pipeline.schedule),
            }
        )

    def record(self, step: int, start: int, end: int, tokens: int, digest: str) -> None:
        if self.entries and step != self.entries[-1].step + 1:
            raise ValueError(f"ledger: step {step} does not follow step {self.entries[-1].step}")
        self.entries.append(LedgerEntry(step, start, end, tokens, digest))

    def body(self, previous: str | None = None) -> dict:
        """This window as the content of ``ledger.json``."""
        return {"header": self.header | {"previous_checkpoint": previous}, "steps": [asdict(e) for e in self.entries]}

    def take_window(self, previous: str | None = None) -> dict:
        """This window's ``ledger.json`` content; the next window starts empty."""
        body = self.body(previous)
        self.entries = []
        return body

    def flush(self, checkpoint_dir: str | Path, previous: str | None = None) -> None:
        """Write this window into ``checkpoint_dir/ledger.json`` (atomically) and start a new window."""
        write_json_atomic(Path(checkpoint_dir) / LEDGER_FILE, self.take_window(previous))


def order_key(cfg, schedule) -> dict:
    """Everything besides the data manifest that decides which samples a step sees, and how masked.
    ``warmup_tokens_per_sample`` is the data-derived constant that turned the batch ramp's tokens into
    ``warmup_samples`` (None without a ramp): a resume whose data gives another mean is refused."""
    return {
        "seed": cfg.phase.seed,
        "mixture_block": cfg.data.mixture_block,
        "shuffle_block": cfg.data.shuffle_block,
        "global_size": schedule.global_size,
        "warmup_samples": schedule.warmup_samples,
        "warmup_start_size": schedule.start_size,
        "warmup_stages": schedule.stages,
        "warmup_tokens_per_sample": schedule.tokens_per_sample,
        "objective": cfg.objective.name,
        "mask_rate": cfg.objective.mask_rate,
        **held_out_key(cfg),
    }


def held_out_key(cfg) -> dict:
    """The settings that choose each source's validation part; absent when no source sets one aside,
    so the keys of runs without one are what they were before validation existed."""
    settings = validation_settings(cfg.data)
    return {"validation": {"eval_seed": cfg.eval.seed, "sources": settings}} if any(settings.values()) else {}


def read_ledger(checkpoint_dir: str | Path) -> tuple[dict, list[LedgerEntry]]:
    path = Path(checkpoint_dir) / LEDGER_FILE
    if not path.is_file():
        raise EttinError(f"{path} not found: pass a checkpoint folder written by `ettin train`")
    fix = "restore it from a copy of the checkpoint (`ettin checkpoint verify` checks one)"
    body = read_json(path, fix)
    try:
        return dict(body["header"]), [LedgerEntry(**e) for e in body["steps"]]
    except (KeyError, TypeError, ValueError):
        raise FileError(path, "is not a ledger (needs a header and a list of steps)", fix) from None


def checkpoint_config(checkpoint_dir: str | Path, overrides: list[str] | None = None):
    from ettin.config import load_config

    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise EttinError(f"{path} not found: pass a checkpoint folder written by `ettin train`")
    return load_config(str(path), overrides)


def replay(checkpoint_dir: str | Path, step: int, overrides: list[str] | None = None) -> dict:
    """Rebuild ``step``'s global batch from the data alone and compare it with the ledger."""
    from ettin.data.collate import SAMPLE_DIGEST, step_hash
    from ettin.data.loader import DataPipeline

    header, entries = read_ledger(checkpoint_dir)
    if header.get("sample_digest") != SAMPLE_DIGEST:
        raise EttinError(
            f"{checkpoint_dir}: its ledger digests samples with {header.get('sample_digest', 'sha256')}, "
            f"this ettin with {SAMPLE_DIGEST}; replay it with the ettin version that trained it"
        )
    by_step = {e.step: e for e in entries}
    if step not in by_step:
        steps = f"{entries[0].step}..{entries[-1].step}" if entries else "none"
        raise EttinError(f"step {step} is not in {checkpoint_dir}'s ledger (it holds steps {steps})")
    entry = by_step[step]
    cfg = checkpoint_config(checkpoint_dir, overrides)
    pipeline = DataPipeline.from_config(cfg)
    fingerprint = pipeline.manifest.fingerprint()
    start, end = pipeline.schedule.bounds(step)
    batch = pipeline.batch(start, end)
    rebuilt = step_hash(batch.digests)
    return {
        "step": step,
        "positions": (start, end),
        "ledger_positions": (entry.start, entry.end),
        "tokens": batch.num_tokens,
        "ledger_tokens": entry.tokens,
        "hash": rebuilt,
        "ledger_hash": entry.hash,
        "fingerprint_ok": fingerprint == header["fingerprint"],
        "match": rebuilt == entry.hash
        and (start, end) == (entry.start, entry.end)
        and batch.num_tokens == entry.tokens,
        "batch": batch,
        "pipeline": pipeline,
    }


EXPORT_PREFIX = {"pretrain": "checkpoint", "extension": "ext", "decay": "decay", "cross": "cross"}


def export_order(checkpoints: list[Path], out_dir: str | Path) -> list[Path]:
    """Per checkpoint window, parquet rows (step, input_ids, source, sample_index, id), Ettin's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ettin.data.loader import DataPipeline

    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EttinError(f"--out {out_dir} cannot be created ({e.strerror or e}): pick another folder") from None
    written, pipeline = [], None
    for n, ckpt in enumerate(checkpoints, start=1):
        header, entries = read_ledger(ckpt)
        if pipeline is None:
            pipeline = DataPipeline.from_config(checkpoint_config(ckpt))
            if pipeline.manifest.fingerprint() != header["fingerprint"]:
                raise EttinError(f"{ckpt}: the data on disk is not the data this run trained on (fingerprint differs)")
        folder = Path(out_dir) / f"{EXPORT_PREFIX.get(header['phase'], header['phase'])}_{n:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = {"step": [], "input_ids": [], "source": [], "sample_index": [], "id": []}
        for e in entries:
            for r in pipeline.samples(e.start, e.end):
                rows["step"].append(e.step)
                rows["input_ids"].append(r["input_ids"].tolist())
                rows["source"].append(r["source"])
                rows["sample_index"].append(r["sample_index"])
                rows["id"].append(r["id"])
        pq.write_table(pa.table(rows), folder / "samples.parquet")
        written.append(folder)
    return written
