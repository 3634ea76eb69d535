"""A phase's data as a manifest: its sources, their shards and weights, and one fingerprint.

The fingerprint covers what changes the meaning of a sample position: every source's name,
shard names, byte sizes and sample counts, its weight, the tokenizer identity and vocab, the
sequence length and the order algorithm version. A resume that finds another fingerprint stops
(unless ``data.allow_fingerprint_change``). Shard hashes are not in it (they check the bytes, they
do not place samples), and stats.json must agree with index.json (:func:`check_stats`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from ettin.data.mds import DataError, MDSSource, is_remote
from ettin.data.order import ORDER_VERSION

MEAN_DECIMALS = 6  # Manifest.mean_tokens_per_sample is rounded to this many decimals


@dataclass
class SourceEntry:
    name: str
    path: str
    weight: float
    samples: int
    tokens: int | None  # from stats.json, when prepare wrote one
    shards: list[tuple[str, int, int]]  # (raw name, raw bytes, samples)


@dataclass
class Manifest:
    sources: list[SourceEntry]
    seq_len: int
    tokenizer: dict  # {"sha256": ..., "vocab_size": ...} or {} when unknown

    def fingerprint(self) -> str:
        blob = json.dumps(
            {
                "sources": [asdict(s) | {"path": None} for s in self.sources],
                "seq_len": self.seq_len,
                "tokenizer": self.tokenizer,
                "order_version": ORDER_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def sample_shares(self) -> list[float]:
        """Weights are shares of tokens (the recipe's budgets): convert them to shares of samples with
        each source's tokens per sample. Without any stats.json, weights are taken as sample shares."""
        if all(s.tokens for s in self.sources):
            return [s.weight / (s.tokens / s.samples) for s in self.sources]
        return [s.weight for s in self.sources]

    def mean_tokens_per_sample(self) -> float | None:
        """The mixture's mean tokens per sample, from stats.json: with sample shares proportional to
        ``weight / (tokens / samples)``, it is ``sum(weight) / sum(weight * samples / tokens)``.
        Computed exactly and rounded to 6 decimals, so every machine gets the same float (the batch
        ramp's token -> sample constant, recorded in the ledger's order key). None without token counts."""
        if not self.sources or not all(s.tokens and s.samples for s in self.sources):
            return None
        weights = [Fraction(s.weight) for s in self.sources]
        mean = sum(weights) / sum(w * s.samples / s.tokens for w, s in zip(weights, self.sources))
        return float(round(mean, MEAN_DECIMALS))


def resolve_path(root: str, path: str) -> str:
    if is_remote(path) or Path(path).is_absolute():
        return path
    return f"{root.rstrip('/')}/{path}" if is_remote(root) else str(Path(root) / path)


def check_stats(stats: dict, stats_file: str, reader: MDSSource) -> None:
    """stats.json (prepare's counts) against index.json (the shards): written by one run, they must
    agree. Sample and shard counts exactly; the token total at most what the shards' bytes can hold
    (each token takes its dtype's bytes, besides the fixed offsets and sizes of every sample). A
    folder that mixes two runs, or a hand-edited stats.json, would otherwise skew the mixture (its
    weights are token shares) without a word. Keys stats.json lacks are not checked."""
    index_file = f"{reader.path}/index.json"

    def disagree(what: str) -> DataError:
        return DataError(
            f"{stats_file} and {index_file} disagree: {what}; they come from different prepare runs "
            "or one was edited: re-run prepare or restore both"
        )

    try:
        if "chunks" in stats and int(stats["chunks"]) != len(reader):
            raise disagree(f"{stats['chunks']} samples (chunks) against {len(reader)} in the shards")
        if "shards" in stats and int(stats["shards"]) != len(reader.shards):
            raise disagree(f"{stats['shards']} shards against {len(reader.shards)}")
        if "tokens" in stats and not 0 <= int(stats["tokens"]) <= reader.max_tokens():
            raise disagree(
                f"{stats['tokens']} tokens, but the shards' {sum(s.raw_bytes for s in reader.shards)} bytes "
                f"hold at most {reader.max_tokens()}"
            )
    except (TypeError, ValueError):
        raise DataError(f"{stats_file}: chunks, shards and tokens must be integers; re-run prepare") from None


def _stats(path: str, reader: MDSSource) -> dict:
    if is_remote(path):
        f = reader.cache / "stats.json"
        if not f.exists():
            try:
                reader._download("stats.json", f)
            except DataError:
                return {}
    else:
        f = Path(path) / "stats.json"
    try:
        stats = json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: unreadable stats.json ({e})") from None
    if not isinstance(stats, dict):
        raise DataError(f"{f}: stats.json is not a JSON object; re-run prepare")
    check_stats(stats, f"{path.rstrip('/')}/stats.json", reader)
    return stats


def build_manifest(data_cfg, seq_len: int, cache_dir: str | None = None) -> tuple[Manifest, list[MDSSource]]:
    """Open every source of ``data_cfg`` (a DataConfig) and describe them; errors name the source."""
    if not data_cfg.sources:
        raise DataError("data.sources is empty: list at least one source folder (see configs/data/)")
    names = [s.name for s in data_cfg.sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources has duplicate names: {sorted({n for n in names if names.count(n) > 1})}")
    entries, readers, tokenizers = [], [], {}
    for i, src in enumerate(data_cfg.sources):
        if not src.weight > 0:
            raise DataError(f"data.sources[{i}] ({src.name}): weight must be positive, got {src.weight}")
        path = resolve_path(data_cfg.root, src.path)
        if not is_remote(path) and not Path(path).exists():
            raise DataError(f"data.sources[{i}] ({src.name}): {path} does not exist; fix data.root or the source path")
        reader = MDSSource(path, cache_dir or data_cfg.cache_dir)
        stats = _stats(path, reader)
        if stats.get("tokenizer"):
            tokenizers[src.name] = stats["tokenizer"]
        if stats.get("seq_len") and int(stats["seq_len"]) > seq_len:
            raise DataError(
                f"{path}: prepared for seq_len {stats['seq_len']}, longer than phase.seq_len {seq_len}; "
                "prepare it again for this sequence length"
            )
        entries.append(
            SourceEntry(
                src.name,
                path,
                float(src.weight),
                len(reader),
                stats.get("tokens"),
                [(s.raw_name, s.raw_bytes, s.samples) for s in reader.shards],
            )
        )
        readers.append(reader)
    counted = [e.name for e in entries if e.tokens]
    if counted and len(counted) < len(entries):
        lacking = [e.name for e in entries if not e.tokens]
        raise DataError(
            f"sources {lacking} have no stats.json token count but {counted} do: the mixture weights "
            "(token shares) cannot be converted consistently; add stats.json (prepare writes it)"
        )
    distinct = {json.dumps(t, sort_keys=True) for t in tokenizers.values()}
    if len(distinct) > 1:
        raise DataError(
            f"sources were tokenized with different tokenizers: {sorted(tokenizers)}; prepare them with one"
        )
    tokenizer = next(iter(tokenizers.values())) if tokenizers else {}
    return Manifest(entries, seq_len, tokenizer), readers
