"""What an MDS dataset directory holds: shards, samples, tokens, sample lengths, a decoded sample.

Samples are read through streaming's own shard reader (``MDSReader``), so the summary sees the
data exactly as training will. Compressed shards are decompressed into a temporary directory,
never into the dataset: reading with ``remote=None`` would decompress them *into* the dataset
directory and double its size (shared/notes/streaming.md).

It is also the integrity check of a dataset: every shard is checked against the hashes index.json
records (compressed and raw; a mismatch is an error naming the shard), and stats.json's counts
against what was read (a disagreement is printed as a warning).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ettin.data.prepare import COUNT_FIELDS, INDEX_FILE, STATS_FILE
from ettin.errors import EttinError


class SummaryError(EttinError):
    """A directory that is not a readable MDS dataset; str() is the one-line message."""


@dataclass
class Sample:
    index: int  # global sample index
    id: str
    input_ids: np.ndarray


@dataclass
class DatasetSummary:
    directory: str
    shards: int
    samples: int
    tokens: int
    compressed_bytes: int  # of the shard files as stored
    histogram: list = field(default_factory=list)  # (low, high, count): low <= length <= high
    min_length: int = 0
    max_length: int = 0
    stats: dict | None = None  # stats.json, if present
    examples: list = field(default_factory=list)  # the first few Samples
    hashed: list = field(default_factory=list)  # the hash algorithms shards were checked with


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Counts of sample lengths in power-of-two bins [2^k, 2^(k+1) - 1], empty bins inside kept."""
    if len(lengths) == 0:
        return []
    bins = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(bins - bins.min())
    return [(2 ** (k + int(bins.min())), 2 ** (k + int(bins.min()) + 1) - 1, int(c)) for k, c in enumerate(counts)]


def _read_index(directory: Path) -> dict:
    if not directory.is_dir():
        raise SummaryError(f"dataset {directory} is not a directory; pass the prepare --out DIR")
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
    except FileNotFoundError:
        raise SummaryError(
            f"{directory} has no {INDEX_FILE}; is it an MDS dataset (prepare --out) and finished?"
        ) from None
    except ValueError as e:
        raise SummaryError(f"{directory / INDEX_FILE} is not valid JSON ({e})") from None
    if index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise SummaryError(f"{directory / INDEX_FILE} is not a version-2 streaming index")
    return index


def summarize(directory: str | Path, *, examples: int = 1, progress: bool = False) -> DatasetSummary:
    """Read every sample of the dataset in ``directory`` once (lengths) and keep the first few."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    from tqdm import tqdm

    from ettin.data.mds import digest_bytes, pick_hash

    def check(data: bytes, info: dict | None, where: Path) -> bytes:
        expected = pick_hash(info)
        if expected is not None:
            if digest_bytes(expected[0], data) != expected[1]:
                raise SummaryError(
                    f"{where}: contents do not match the {expected[0]} hash in "
                    f"{directory / INDEX_FILE}; the shard is corrupt or was changed after it "
                    "was written: restore it"
                )
            hashed.append(expected[0])
        return data

    directory = Path(directory)
    index = _read_index(directory)
    stats_path = directory / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    lengths, kept, compressed_bytes, hashed = [], [], 0, []
    with tempfile.TemporaryDirectory(prefix="ettin-inspect-") as scratch:
        for shard in tqdm(index["shards"], desc="inspect", unit="shard", disable=not progress):
            raw, zipped = shard["raw_data"], shard.get("zip_data")
            stored = directory / (zipped or raw)["basename"]
            if not stored.exists():
                raise SummaryError(f"shard {stored} listed in {INDEX_FILE} is missing")
            compressed_bytes += stored.stat().st_size
            dirname = directory
            if (directory / raw["basename"]).exists():
                check((directory / raw["basename"]).read_bytes(), raw, directory / raw["basename"])
            else:
                dirname = Path(scratch)
                data = check(stored.read_bytes(), zipped, stored)
                try:
                    data = decompress(shard["compression"], data)
                except Exception as e:  # noqa: BLE001 - zstd raises its own error types
                    raise SummaryError(f"{stored}: cannot decompress ({e}); the shard is corrupt, restore it") from None
                (dirname / raw["basename"]).write_bytes(check(data, raw, stored))
            reader = reader_from_json(str(dirname), None, shard)
            for i in range(reader.samples):
                sample = reader.get_item(i)
                if len(kept) < examples:
                    kept.append(Sample(len(lengths), sample["id"], sample["input_ids"]))
                lengths.append(len(sample["input_ids"]))
            if dirname != directory:
                (dirname / raw["basename"]).unlink()
    lengths = np.array(lengths, dtype=np.int64)
    return DatasetSummary(
        directory=str(directory),
        shards=len(index["shards"]),
        samples=len(lengths),
        tokens=int(lengths.sum()),
        compressed_bytes=compressed_bytes,
        histogram=length_histogram(lengths),
        min_length=int(lengths.min()) if len(lengths) else 0,
        max_length=int(lengths.max()) if len(lengths) else 0,
        stats=stats,
        examples=kept,
        hashed=hashed,
    )


def format_summary(
    summary: DatasetSummary, tokenizer=None, *, tokenizer_sha256: str = "", max_chars: int = 400, bar_width: int = 40
) -> str:
    """The summary as text; samples are decoded when a ``tokenizers.Tokenizer`` is given."""
    s = summary
    mean = s.tokens / s.samples if s.samples else 0.0
    lines = [
        f"dataset  {s.directory}",
        f"shards   {s.shards} ({s.compressed_bytes / 1e6:.2f} MB stored)",
        f"samples  {s.samples:,}",
        f"tokens   {s.tokens:,} (per sample: mean {mean:.1f}, min {s.min_length}, max {s.max_length})",
    ]
    algos = sorted(set(s.hashed))
    lines.append(
        f"hashes   {len(s.hashed)} shard files match their {', '.join(algos)} hashes in {INDEX_FILE}"
        if s.hashed
        else f"hashes   none in {INDEX_FILE}: the shards' integrity is unchecked"
    )
    if s.histogram:
        lines.append("sample lengths (tokens)")
        peak = max(count for _, _, count in s.histogram)
        for low, high, count in s.histogram:
            bar = "#" * max(1 if count else 0, round(bar_width * count / peak))
            lines.append(f"  {low:>6}-{high:<6} {count:>10,}  {bar}")
    if s.stats is not None:
        st = s.stats
        lines.append("stats.json")
        lines.append("  " + ", ".join(f"{name} {st[name]:,}" for name in COUNT_FIELDS if name in st))
        tok = st.get("tokenizer", {})
        lines.append(
            f"  seq_len {st.get('seq_len')}, [CLS] {st.get('cls_id')}, [SEP] "
            f"{st.get('sep_id')}, tokenizer sha256 {tok.get('sha256', '?')[:16]}… "
            f"vocab {tok.get('vocab_size')}, {len(st.get('inputs', []))} input files"
        )
        counted = {"chunks": s.samples, "tokens": s.tokens, "shards": s.shards}
        for name, value in counted.items():
            if name in st and st[name] != value:
                lines.append(
                    f"  warning: stats.json says {name} {st[name]}, the shards hold {value:,}; "
                    "they are from different prepare runs or were edited"
                )
        bad = {k: v["count"] for k, v in st.get("bad_records", {}).items() if v["count"]}
        lines.append("  bad records: " + (", ".join(f"{k} {v:,}" for k, v in bad.items()) if bad else "none"))
        if tokenizer_sha256 and tok.get("sha256") and tok["sha256"] != tokenizer_sha256:
            lines.append("  warning: the given tokenizer is not the one in stats.json; decoded text below may be wrong")
    for sample in s.examples:
        lines.append(f"sample {sample.index}: id {sample.id!r}, {len(sample.input_ids)} tokens")
        if tokenizer is not None:
            text = tokenizer.decode([int(t) for t in sample.input_ids], skip_special_tokens=False)
            if len(text) > max_chars:
                text = text[:max_chars] + " …"
            lines += ["  " + line for line in text.splitlines()]
        else:
            head = " ".join(str(int(t)) for t in sample.input_ids[:32])
            lines.append(f"  ids: {head}{' …' if len(sample.input_ids) > 32 else ''}  (pass --tokenizer to decode)")
    return "\n".join(lines)
