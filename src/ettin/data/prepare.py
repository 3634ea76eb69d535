"""Corpus files -> tokenized, chunked MDS shards plus ``stats.json`` (``ettin data prepare``).

Inputs
    Which files are read and how, document ids and bad records: :mod:`ettin.data.inputs` (the
    formats are its ``INPUT_FORMATS``). Samples are written in sorted input name order, then
    record order. Sample ``k`` of a document has id ``<doc id>#<k>``.

Chunking (docs/RECIPE.md "Data"; :func:`plan_chunks`, :func:`chunk_document`), ``body = seq_len - 2``
    1. The document's tokens are cut into consecutive pieces of ``body`` tokens; only the last
       piece (the tail) can be shorter.
    2. Drop: a piece under 128 tokens is dropped unless it is the document's first piece. Only a
       tail can be that short, so this drops short tails of multi-piece documents.
    3. Back-fill: a kept tail under 512 tokens that is not the first piece takes the last tokens
       of the piece before it, so that it holds exactly 512 tokens. The tokens *move* (the piece
       before gets shorter), so no token is duplicated and every kept token of the document is
       in exactly one sample, in order. This happens only if the piece before keeps at least 512
       tokens (``body + tail >= 1024``), which holds for every ``seq_len >= 1024`` (1024 and 7999
       in the recipe); at shorter ``seq_len`` a tail is left as it is rather than creating
       another short chunk. The reference Ettin pipeline moved a random number of tokens; a
       fixed target of 512 makes the output reproducible.
    4. Each piece is wrapped ``[CLS] … [SEP]``, so a sample holds at most ``seq_len`` tokens.
    Documents are never packed together. ``seq_len`` must be at least 130 (a 128-token piece
    plus the two specials), so that only a tail can be under 128 tokens.

Bad records
    Skipped and counted by kind (:mod:`ettin.data.inputs`), with file and line for the first
    few; a document whose text gives no tokens is one more ``empty_text``. A file that cannot
    be read at all (a truncated ``.gz``, a broken ``.parquet``) stops the run with one error
    naming it; finished files are kept for the rerun. Inputs that give no sample at all (empty
    files, or every record bad) are an error, ``no usable documents in …`` with the skip
    counts: nothing is written and the staging folder is removed.

Output, parallelism and resumability
    Each input file is tokenized by a worker process into a *part* in ``OUT/.prepare-staging/``
    (the samples' tokens, their ids and the file's counts), written under a temporary name and
    renamed when complete; a part is named after its file's name, path, size and mtime. The
    main process appends the parts to one ``streaming.MDSWriter`` strictly in input order while
    the workers run ahead, so the shards, ``index.json`` and ``stats.json`` are byte-identical
    for any number of workers. The finished MDS files go to ``.prepare-staging/merged-<key>/``
    (the key names the input list and shard size) and are then moved into ``OUT``,
    ``stats.json`` last, and the staging folder is removed: ``stats.json`` in ``OUT`` without a
    staging folder means a finished dataset. index.json records an xxh3_64 hash of every
    shard, compressed and raw (streaming's ``hashes``), which the reader checks.
    A rerun after a kill (even SIGKILL; workers die with the main process) keeps every complete
    part of an unchanged input file, tokenizes only the rest and rewrites the shards (cheap
    next to tokenizing) or finishes moving them, giving the same bytes as an uninterrupted run.
    The input list may change between the runs (a broken file fixed or removed); the tokenizer
    and the chunk settings may not (``plan.json`` in the staging folder records them).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from ettin.data.inputs import BAD_RECORD_KINDS, BadRecord, Document, InputFile, find_inputs, iter_records
from ettin.data.tokenizer import load_tokenizer, resolve_tokenizer_path, special_token_ids, tokenizer_identity
from ettin.errors import EttinError
from ettin.fileio import write_json_atomic

# numpy is imported where tokens are handled: ``ettin data``'s parser reads this module's
# defaults and must stay light.

MIN_CHUNK_TOKENS = 128  # shorter pieces are dropped, except a document's first
BACKFILL_TOKENS = 512  # a shorter tail is back-filled to this many tokens
DEFAULT_SEQ_LEN = 1024
MIN_SEQ_LEN = MIN_CHUNK_TOKENS + 2
DEFAULT_SHARD_SIZE = 1 << 26  # bytes of uncompressed samples per shard (streaming's default)
COLUMNS = {"input_ids": "ndarray:uint32", "id": "str"}
COMPRESSION = "zstd"
# Shard hashes streaming records in index.json, for the compressed and the raw file: xxh3_64 is
# the fastest streaming knows (GB/s, ~10 ms for a 64 MB shard), and the reader checks it once.
SHARD_HASHES = ["xxh3_64"]
EXAMPLES_PER_KIND = 5  # bad records reported with file and line, per kind
STAGING_DIR = ".prepare-staging"
STATS_FILE = "stats.json"
INDEX_FILE = "index.json"
STATS_VERSION = 1
# encode_batch works on this many documents (or bytes of text) at a time: large enough to
# amortize the per-call overhead, small enough to keep a worker's memory flat.
BATCH_DOCUMENTS = 256
BATCH_BYTES = 4 << 20


class PrepareError(EttinError):
    """A user-facing problem with inputs, settings or the output directory (one line)."""


class NoUsableDocuments(PrepareError):
    """Every record was bad or there were none: an empty dataset is a failure, not a result."""


# ---------------------------------------------------------------------------------------------
# Chunking


class ChunkPlan(NamedTuple):
    spans: list  # (start, end) token ranges of the kept pieces, in order
    dropped_tokens: int  # tokens of a dropped tail (0 or the tail's length)
    moved_tokens: int  # tokens moved from the second-to-last piece into a back-filled tail


def plan_chunks(num_tokens: int, seq_len: int) -> ChunkPlan:
    """Which token ranges of a ``num_tokens``-token document become samples (module docstring)."""
    if seq_len < MIN_SEQ_LEN:
        raise PrepareError(
            f"seq_len {seq_len} is too short: a sample must hold a "
            f"{MIN_CHUNK_TOKENS}-token chunk plus [CLS] and [SEP] "
            f"(seq_len >= {MIN_SEQ_LEN})"
        )
    body = seq_len - 2
    spans = [(start, min(start + body, num_tokens)) for start in range(0, num_tokens, body)]
    if len(spans) < 2:
        return ChunkPlan(spans, 0, 0)
    tail_start, tail_end = spans[-1]
    tail = tail_end - tail_start
    if tail < MIN_CHUNK_TOKENS:
        return ChunkPlan(spans[:-1], tail, 0)
    if tail < BACKFILL_TOKENS and body + tail >= 2 * BACKFILL_TOKENS:
        moved = BACKFILL_TOKENS - tail
        prev_start, _ = spans[-2]
        spans[-2] = (prev_start, tail_start - moved)
        spans[-1] = (tail_start - moved, tail_end)
        return ChunkPlan(spans, 0, moved)
    return ChunkPlan(spans, 0, 0)


def chunk_document(tokens: Sequence[int], seq_len: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """A document's samples: its kept pieces, each wrapped ``[CLS] … [SEP]``."""
    return [[cls_id, *map(int, tokens[start:end]), sep_id] for start, end in plan_chunks(len(tokens), seq_len).spans]


# ---------------------------------------------------------------------------------------------
# Counts


COUNT_FIELDS = (
    "records",
    "documents",
    "chunks",
    "tokens",
    "dropped_chunks",
    "dropped_tokens",
    "moved_tokens",
    "text_bytes",
)


def _no_bad_records() -> dict:
    return {kind: {"count": 0, "examples": []} for kind in BAD_RECORD_KINDS}


@dataclass
class Counts:
    records: int = 0  # non-blank lines / rows / plain-text files read
    documents: int = 0  # records that gave at least one sample
    chunks: int = 0  # samples written
    tokens: int = 0  # tokens in samples written, [CLS]/[SEP] included
    dropped_chunks: int = 0
    dropped_tokens: int = 0
    moved_tokens: int = 0  # moved into back-filled tails (not duplicated)
    text_bytes: int = 0  # UTF-8 bytes of the documents' text
    bad_records: dict = field(default_factory=_no_bad_records)  # kind -> {count, examples}

    def add_bad(self, file: str, bad: BadRecord) -> None:
        entry = self.bad_records[bad.kind]
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_KIND:
            entry["examples"].append({"file": file, "line": bad.line, "detail": bad.detail})

    def add(self, other: Counts) -> None:
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, entry in other.bad_records.items():
            mine = self.bad_records[kind]
            mine["count"] += entry["count"]
            room = EXAMPLES_PER_KIND - len(mine["examples"])
            mine["examples"].extend(entry["examples"][: max(room, 0)])

    @property
    def bad_records_total(self) -> int:
        return sum(entry["count"] for entry in self.bad_records.values())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Counts:
        return cls(**obj)


# ---------------------------------------------------------------------------------------------
# Parts: one input file, tokenized and chunked (runs in worker processes)


@dataclass(frozen=True)
class ChunkSettings:
    seq_len: int
    cls_id: int
    sep_id: int
    text_field: str


def _part_name(source: InputFile) -> str:
    """A part is valid for one input file as it was (path, name, size, mtime) and is reused
    by any rerun with the same tokenizer and chunk settings, whatever the other inputs."""
    key = json.dumps([source.name, source.path, source.size, source.mtime_ns])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def write_part(source: InputFile, part_dir: Path, tokenizer, settings: ChunkSettings) -> Counts:
    """Tokenize and chunk one input file into ``part_dir`` (created atomically, by rename).

    ``tokens.u32`` holds the samples' tokens back to back (native uint32), ``samples.jsonl``
    one ``[num_tokens, sample_id]`` per sample, ``counts.json`` the file's :class:`Counts`.
    """
    part_dir = Path(part_dir)
    # The pid makes the temporary name private, should a killed run's worker still be writing.
    tmp = part_dir.with_name(f"{part_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = _tokenize_into(tmp, source, tokenizer, settings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, part_dir)
    except OSError:
        if not part_dir.is_dir():
            raise
        shutil.rmtree(tmp)  # a killed run's worker finished the same part first: same bytes
    return counts


def _tokenize_into(tmp: Path, source: InputFile, tokenizer, settings: ChunkSettings) -> Counts:
    import numpy as np

    counts = Counts()
    cls = np.array([settings.cls_id], dtype=np.uint32)
    sep = np.array([settings.sep_id], dtype=np.uint32)

    with (
        open(tmp / "tokens.u32", "wb") as tokens_out,
        open(tmp / "samples.jsonl", "w", encoding="utf-8") as samples_out,
    ):

        def flush(batch: list[Document]) -> None:
            encodings = tokenizer.encode_batch([doc.text for doc in batch], add_special_tokens=False)
            pieces, lines = [], []
            for doc, encoding in zip(batch, encodings):
                ids = np.array(encoding.ids, dtype=np.uint32)
                if ids.size == 0:
                    counts.add_bad(source.name, BadRecord("empty_text", doc.line, "no tokens"))
                    continue
                plan = plan_chunks(ids.size, settings.seq_len)
                counts.documents += 1
                counts.text_bytes += doc.text_bytes
                counts.dropped_chunks += plan.dropped_tokens > 0
                counts.dropped_tokens += plan.dropped_tokens
                counts.moved_tokens += plan.moved_tokens
                for k, (start, end) in enumerate(plan.spans):
                    pieces += (cls, ids[start:end], sep)
                    lines.append(json.dumps([end - start + 2, f"{doc.doc_id}#{k}"]))
                    counts.chunks += 1
                    counts.tokens += end - start + 2
            if pieces:
                tokens_out.write(np.concatenate(pieces).data)
                samples_out.write("\n".join(lines) + "\n")

        batch, batch_bytes = [], 0
        for record in iter_records(source, settings.text_field):
            counts.records += 1
            if isinstance(record, BadRecord):
                counts.add_bad(source.name, record)
                continue
            batch.append(record)
            batch_bytes += record.text_bytes
            if len(batch) >= BATCH_DOCUMENTS or batch_bytes >= BATCH_BYTES:
                flush(batch)
                batch, batch_bytes = [], 0
        if batch:
            flush(batch)

    (tmp / "counts.json").write_text(json.dumps(counts.to_json()))
    return counts


_WORKER: dict = {}


def _die_with_parent(parent_pid: int) -> None:
    """A SIGKILLed run must not leave workers behind that keep writing parts (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def _init_worker(tokenizer_path: str, settings: ChunkSettings, staging: str, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    _die_with_parent(parent_pid)
    # One core per worker unless the user says otherwise: --workers is the parallelism knob.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), settings=settings, staging=Path(staging))


def _tokenize_in_worker(source: InputFile) -> str:
    write_part(source, _WORKER["staging"] / _part_name(source), _WORKER["tokenizer"], _WORKER["settings"])
    return source.name


# ---------------------------------------------------------------------------------------------
# Output directory


def parse_size(size: int | str) -> int:
    """Bytes from ``67108864``, ``"64mb"``, ``"64MiB"``, ``"1g"`` (binary units, like streaming)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", str(size).lower())
        if not m:
            raise PrepareError(f"shard size {size!r} is not a size; use e.g. 67108864, 64mb or 1gb")
        value = int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ")
    if not 0 < value < 2**32:
        raise PrepareError(f"shard size {size!r} must be between 1 byte and 4 GiB (MDS stores offsets as uint32)")
    return value


def _is_dataset_file(name: str) -> bool:
    return (
        name in (STAGING_DIR, INDEX_FILE, STATS_FILE) or re.fullmatch(r"shard\.\d{5}\.mds(\.zstd)?", name) is not None
    )


def _plan_changes(previous: dict, plan: dict) -> str:
    changes = []
    if previous.get("tokenizer") != plan["tokenizer"]:
        changes.append("another tokenizer")
    old_settings = previous.get("settings") or {}
    for key, value in plan["settings"].items():
        if old_settings.get(key) != value:
            changes.append(f"{key} {old_settings.get(key)} -> {value}")
    return "; ".join(changes) or "another format version"


def _open_output(out: Path, plan: dict, overwrite: bool) -> None:
    """Make ``out`` ready: a fresh staging folder, or the matching one of a killed run.

    Raises before deleting anything when ``out`` holds something it must not replace.
    """
    staging = out / STAGING_DIR
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} is a file; --out must be a directory")
    if overwrite:
        others = sorted(p.name for p in out.iterdir() if not _is_dataset_file(p.name)) if out.exists() else []
        if others:
            raise PrepareError(
                f"--overwrite only replaces a dataset, but {out} also holds {others[0]!r}; choose another --out"
            )
        if staging.is_dir():  # the old dataset itself stays until the new one is written
            shutil.rmtree(staging)
    elif staging.is_dir():
        try:
            previous = json.loads((staging / "plan.json").read_text())
        except (OSError, ValueError):
            previous = None  # killed before the plan was saved: nothing to resume
        if previous is None:
            shutil.rmtree(staging)
        elif previous != plan:
            raise PrepareError(
                f"{out} holds an unfinished run with other settings "
                f"({_plan_changes(previous, plan)}); rerun it with the same "
                f"settings to finish it, or pass --overwrite to start over"
            )
        else:
            return
    elif (out / STATS_FILE).exists():
        raise PrepareError(
            f"{out} already holds a finished dataset ({STATS_FILE}); pass "
            f"--overwrite to replace it, or choose another --out"
        )
    elif out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out} is not empty and holds no dataset; choose an empty or new --out")
    staging.mkdir(parents=True)
    write_json_atomic(staging / "plan.json", plan, indent=2)


def _append_part(writer, part: Path) -> Counts:
    """Write one part's samples to the MDS writer, in order."""
    import numpy as np

    counts = Counts.from_json(json.loads((part / "counts.json").read_text()))
    tokens_file = part / "tokens.u32"
    tokens = (
        np.memmap(tokens_file, dtype=np.uint32, mode="r")
        if tokens_file.stat().st_size
        else np.empty(0, dtype=np.uint32)
    )
    offset = 0
    with open(part / "samples.jsonl", encoding="utf-8") as f:
        for line in f:
            length, sample_id = json.loads(line)
            writer.write({"input_ids": tokens[offset : offset + length], "id": sample_id})
            offset += length
    if offset != tokens.size or offset != counts.tokens:
        raise PrepareError(f"staging part {part} is inconsistent; delete it and rerun")
    del tokens
    return counts


def _publish(merged: Path, out: Path) -> None:
    """Move the finished files into ``out``, stats.json last; repeatable after a kill."""
    for path in sorted(merged.iterdir()):
        if path.name != STATS_FILE:
            os.replace(path, out / path.name)
    if (merged / STATS_FILE).exists():
        os.replace(merged / STATS_FILE, out / STATS_FILE)


# ---------------------------------------------------------------------------------------------
# The job


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer: str | Path,
    *,
    plain_text: Sequence[str | Path] = (),
    include: Sequence[str] = (),
    seq_len: int = DEFAULT_SEQ_LEN,
    text_field: str = "text",
    cls_id: int | None = None,
    sep_id: int | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize, chunk and write ``inputs`` as MDS shards in ``out``; returns the stats.json dict.

    Resumes a killed run into the same ``out`` (module docstring). Raises :class:`PrepareError`,
    :class:`ettin.data.inputs.InputError` or :class:`ettin.data.tokenizer.TokenizerError` before
    touching ``out`` for bad arguments, and ``InputError`` for an input file it cannot read.
    """
    log = log or (lambda message: None)
    if workers < 1:
        raise PrepareError(f"workers must be at least 1, got {workers}")
    plan_chunks(0, seq_len)  # validates seq_len
    size_limit = parse_size(shard_size)
    sources = find_inputs(inputs, plain_text=plain_text, include=include)
    tokenizer_path = resolve_tokenizer_path(tokenizer)
    identity = tokenizer_identity(tokenizer_path)
    cls, sep = special_token_ids(load_tokenizer(tokenizer_path), cls_id, sep_id)
    settings = ChunkSettings(seq_len, cls, sep, text_field)
    # What the staged parts depend on; the input list may change between runs (a file fixed or
    # removed after an error) and only unchanged files' parts are reused.
    plan = {"version": STATS_VERSION, "tokenizer": identity.to_json(), "settings": asdict(settings)}
    out = Path(out)
    created = not out.exists()
    _open_output(out, plan, overwrite)
    staging = out / STAGING_DIR
    # The finished shards depend on the input list and the shard size too: a rerun that changed
    # them after a kill mid-publication must not publish the old ones.
    merge_key = json.dumps([[_part_name(s) for s in sources], size_limit])
    merged = staging / f"merged-{hashlib.sha256(merge_key.encode()).hexdigest()[:16]}"
    for old in staging.glob("merged-*"):
        if old != merged:
            shutil.rmtree(old)
    if merged.is_dir():
        log("resuming: the shards are written; moving them into place")
    else:
        try:
            _write_merged(
                sources, staging, merged, str(tokenizer_path), settings, identity, size_limit, workers, progress, log
            )
        except NoUsableDocuments:
            shutil.rmtree(staging)  # nothing to resume: the inputs themselves must change
            if created and not any(out.iterdir()):
                out.rmdir()
            raise
        # only now that the new shards exist: the dataset --overwrite replaces, or files left by
        # an interrupted publication of other inputs
        for name in os.listdir(out):
            if name != STAGING_DIR and _is_dataset_file(name):
                (out / name).unlink()
    _publish(merged, out)
    shutil.rmtree(staging)
    return json.loads((out / STATS_FILE).read_text())


def _wait_for_part(future) -> None:
    try:
        future.result()
    except BrokenProcessPool:
        raise PrepareError(
            "a tokenizer worker process died (killed, out of memory, or started "
            "from a script without an `if __name__ == '__main__':` guard); "
            "rerun to resume"
        ) from None


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop now, on an error or Ctrl-C: finished parts are kept, half-written ones redone."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API < 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _write_merged(
    sources,
    staging: Path,
    merged: Path,
    tokenizer_path: str,
    settings: ChunkSettings,
    identity,
    size_limit: int,
    workers: int,
    progress: bool,
    log,
) -> None:
    from tqdm import tqdm

    done = {i for i, s in enumerate(sources) if (staging / _part_name(s)).is_dir()}
    for stale in staging.glob("*.tmp*"):  # parts and shards a killed run left half-written
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if done:
        log(f"resuming: {len(done)} of {len(sources)} input files already tokenized")
    pending = [s for i, s in enumerate(sources) if i not in done]
    pool, parts = None, {}
    try:
        if pending:
            # spawn, not fork: workers start clean (no inherited threads or tokenizer state).
            # A ProcessPoolExecutor, not a Pool: a worker killed by the OOM killer breaks it
            # (an error) where a Pool would wait forever for the lost task.
            pool = ProcessPoolExecutor(
                min(workers, len(pending)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(tokenizer_path, settings, str(staging), os.getpid()),
            )
            parts = {s.name: pool.submit(_tokenize_in_worker, s) for s in pending}
        # Imported after the workers started: streaming pulls in torch, which takes seconds.
        from streaming import MDSWriter

        merged_tmp = merged.with_name(merged.name + ".tmp")
        writer = MDSWriter(
            out=str(merged_tmp), columns=COLUMNS, compression=COMPRESSION, size_limit=size_limit, hashes=SHARD_HASHES
        )
        total, per_input = Counts(), []
        with tqdm(
            total=sum(s.size for s in sources), unit="B", unit_scale=True, desc="prepare", disable=not progress
        ) as bar:
            for index, source in enumerate(sources):
                if index not in done:
                    _wait_for_part(parts[source.name])  # in input order
                counts = _append_part(writer, staging / _part_name(source))
                total.add(counts)
                per_input.append(
                    {
                        "name": source.name,
                        "kind": source.kind,
                        "bytes": source.size,
                        "documents": counts.documents,
                        "chunks": counts.chunks,
                        "tokens": counts.tokens,
                        "bad_records": counts.bad_records_total,
                    }
                )
                bar.update(source.size)
                bar.set_postfix(tokens=f"{total.tokens:,}", refresh=False)
        writer.finish()
        if pool is not None:
            pool.shutdown()
            pool = None
    finally:
        if pool is not None:
            _stop_workers(pool)

    if total.chunks == 0:  # before anything is published: no index.json, no stats.json
        raise NoUsableDocuments(_no_usable_message(sources, total))
    counts = total.to_json()
    stats = {
        "version": STATS_VERSION,
        "seq_len": settings.seq_len,
        "cls_id": settings.cls_id,
        "sep_id": settings.sep_id,
        "text_field": settings.text_field,
        "tokenizer": identity.to_json(),
        "columns": COLUMNS,
        "compression": COMPRESSION,
        "size_limit": size_limit,
        "shards": len(writer.shards),
        **{name: counts[name] for name in COUNT_FIELDS},
        "bad_records_total": total.bad_records_total,
        "bad_records": counts["bad_records"],
        "inputs": per_input,
    }
    write_json_atomic(merged_tmp / STATS_FILE, stats, indent=2)
    os.rename(merged_tmp, merged)


def _no_usable_message(sources: Sequence[InputFile], total: Counts) -> str:
    """One line: which inputs, how many records, the skip counts by kind and the first example."""
    names = ", ".join(s.name for s in sources[:3])
    if len(sources) > 3:
        names += f" and {len(sources) - 3} more"
    kinds = ", ".join(f"{kind} {entry['count']:,}" for kind, entry in total.bad_records.items())
    first = next(
        (
            f"; first: {kind} at {ex['file']}:{ex['line']}: {ex['detail']}"
            for kind, entry in total.bad_records.items()
            for ex in entry["examples"]
        ),
        "",
    )
    return (
        f"no usable documents in {names}: {total.records:,} records read, "
        f"{total.bad_records_total:,} skipped ({kinds}){first}; nothing was written"
    )


def format_report(stats: dict, out: str | Path) -> str:
    """A few lines for people: what was written, what was dropped, which records were bad."""
    lines = [
        f"wrote {stats['chunks']:,} samples ({stats['tokens']:,} tokens) from "
        f"{stats['documents']:,} documents in {len(stats['inputs'])} files to {out} "
        f"({stats['shards']} shards, seq_len {stats['seq_len']})"
    ]
    if stats["dropped_chunks"] or stats["moved_tokens"]:
        lines.append(
            f"dropped {stats['dropped_chunks']:,} short tail chunks "
            f"({stats['dropped_tokens']:,} tokens); back-filled tails with "
            f"{stats['moved_tokens']:,} moved tokens"
        )
    if stats["bad_records_total"]:
        kinds = ", ".join(
            f"{kind} {entry['count']:,}" for kind, entry in stats["bad_records"].items() if entry["count"]
        )
        lines.append(f"skipped {stats['bad_records_total']:,} bad records: {kinds}")
        for kind, entry in stats["bad_records"].items():
            for ex in entry["examples"]:
                lines.append(f"  {kind}: {ex['file']}:{ex['line']}: {ex['detail']}")
    return "\n".join(lines)
