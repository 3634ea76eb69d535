"""Corpus files -> documents: which files are inputs, and how each format is read.

Used by ``prepare`` (:mod:`ettin.data.prepare`) and ``train-tokenizer``
(:mod:`ettin.data.tokenizer`), so both read exactly the same documents from the same arguments.

Formats
    :data:`INPUT_FORMATS` is the one list of input formats: each row names the file suffixes it
    claims and the reader that turns a file into records. File discovery, the readers and the
    command-line help all come from it, so a new format is one new row (and its reader) here.
    ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` (one JSON object per line) and
    ``.parquet`` files hold one document per record, in the field ``text_field`` (default
    ``text``). A ``.txt`` file, or any file given with ``plain_text`` (itself or anywhere under a
    directory), is one document.

Discovery (:func:`find_inputs`)
    Directories are walked recursively, skipping hidden entries (names starting with ``.``);
    ``include`` globs, if given, filter the files found there by base name. Each input file gets
    a *name*: a file given directly is its base name, a file found under a directory ``D`` is
    ``<D's name>/<path inside D>``. Names must be unique; inputs come back in sorted name order.

Document ids
    A document's id is its record's ``id`` field when present, else ``<name>:<n>`` where ``n``
    is the 1-based line (JSONL) or row (parquet) number; a plain-text document's id is its name.

Bad records (:func:`iter_records`) are yielded as :class:`BadRecord`, one of
:data:`BAD_RECORD_KINDS`: ``invalid_json`` (a JSONL line that does not parse), ``missing_text``
(no text field, or a null / non-string one, or a JSON value that is not an object), ``non_utf8``
(bytes that are not UTF-8, or a lone surrogate escape), ``empty_text`` (empty or whitespace-only
text; prepare also counts text that gives no tokens). Blank JSONL lines are skipped silently
(they still count in line numbers). A file that cannot be read at all (a truncated ``.gz``, a
broken ``.parquet``) is an :class:`InputError` naming it.

Light on purpose: nothing heavy at import (pyarrow and zstandard are imported by the readers that
need them), so the command-line parsers can use :data:`INPUT_FORMATS` for their help.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ettin.errors import EttinError

BAD_RECORD_KINDS = ("invalid_json", "missing_text", "non_utf8", "empty_text")
PLAIN_TEXT_KIND = "text"  # the kind of every file given with plain_text


class InputError(EttinError):
    """Inputs that cannot be found, named or read (one line, naming the file)."""


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    name: str  # relative name: document ids, order, stats
    kind: str  # an InputFormat.kind: jsonl | parquet | text
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, name: str, kind: str) -> InputFile:
        st = path.stat()
        return cls(str(path.resolve()), name, kind, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# Records


class Document(NamedTuple):
    line: int  # 1-based line (JSONL) or row (parquet); 1 for a plain-text file
    doc_id: str
    text: str
    text_bytes: int  # UTF-8 size of text


class BadRecord(NamedTuple):
    kind: str  # one of BAD_RECORD_KINDS
    line: int
    detail: str


Record = Document | BadRecord


def _clean_id(raw_id) -> str:
    text = str(raw_id)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: keep it visible, not fatal
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _document(source: InputFile, line: int, text, raw_id, text_field: str):
    if text is None:
        return BadRecord("missing_text", line, f"no {text_field!r} field (or it is null)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return BadRecord("non_utf8", line, f"invalid UTF-8 at byte {e.start} of {text_field!r}")
    if not isinstance(text, str):
        return BadRecord("missing_text", line, f"{text_field!r} is a {type(text).__name__}, not a string")
    if not text or text.isspace():
        return BadRecord("empty_text", line, f"{text_field!r} is empty or whitespace")
    try:
        text_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        return BadRecord(
            "non_utf8",
            line,
            f"{text_field!r} holds a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}",
        )
    doc_id = f"{source.name}:{line}" if raw_id is None or raw_id == "" else _clean_id(raw_id)
    return Document(line, doc_id, text, text_bytes)


# ---------------------------------------------------------------------------------------------
# Readers: (input file, text field) -> its records in order


@contextmanager
def _open_lines(path: str):
    """A binary file object over the decompressed bytes of a .jsonl[.gz|.zst] file."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw:
            # read_across_frames: concatenated .zst files (common for sharded dumps) are valid
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader, buffer_size=1 << 20) as f:
                yield f
    else:
        with open(path, "rb", buffering=1 << 20) as f:
            yield f


def _jsonl_records(source: InputFile, text_field: str) -> Iterator[Record]:
    with _open_lines(source.path) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord("non_utf8", line_no, f"invalid UTF-8 at byte {e.start}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord("invalid_json", line_no, f"{e.msg} at column {e.colno}")
                continue
            if not isinstance(record, dict):
                yield BadRecord("missing_text", line_no, f"the line is a JSON {type(record).__name__}, not an object")
                continue
            yield _document(source, line_no, record.get(text_field), record.get("id"), text_field)


def _parquet_records(source: InputFile, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(source.path)
    names = file.schema_arrow.names
    if text_field not in names:
        for row in range(1, file.metadata.num_rows + 1):
            yield BadRecord("missing_text", row, f"no {text_field!r} column")
        return
    columns = [text_field] + (["id"] if "id" in names and text_field != "id" else [])
    row = 0
    for batch in file.iter_batches(batch_size=1024, columns=columns):
        texts = batch.column(text_field)
        # As bytes, so that invalid UTF-8 is one bad row rather than a failed batch.
        if pa.types.is_string(texts.type):
            texts = texts.cast(pa.binary())
        elif pa.types.is_large_string(texts.type):
            texts = texts.cast(pa.large_binary())
        ids = batch.column("id").to_pylist() if "id" in columns else [None] * batch.num_rows
        for text, raw_id in zip(texts.to_pylist(), ids):
            row += 1
            yield _document(source, row, text, raw_id, text_field)


def _text_records(source: InputFile, text_field: str) -> Iterator[Record]:
    with open(source.path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield BadRecord("non_utf8", data.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}")
        return
    if not text or text.isspace():
        yield BadRecord("empty_text", 1, "the file is empty or whitespace")
        return
    yield Document(1, source.name, text, len(data))


# ---------------------------------------------------------------------------------------------
# The formats


class InputFormat(NamedTuple):
    kind: str  # InputFile.kind, recorded per input in stats.json
    suffixes: tuple[str, ...]  # file names ending in one of these are this format
    read: Callable[[InputFile, str], Iterator[Record]]  # (file, text field) -> records in order


INPUT_FORMATS: tuple[InputFormat, ...] = (
    # one JSON object per line, one document each (plain, gzip or zstd)
    InputFormat("jsonl", (".jsonl", ".jsonl.gz", ".jsonl.zst"), _jsonl_records),
    InputFormat("parquet", (".parquet",), _parquet_records),  # one document per row
    InputFormat(PLAIN_TEXT_KIND, (".txt",), _text_records),  # the whole file is one document
)


def input_suffixes() -> str:
    """The suffixes of :data:`INPUT_FORMATS` for messages: ``.jsonl, …, .parquet or .txt``."""
    suffixes = [suffix for fmt in INPUT_FORMATS for suffix in fmt.suffixes]
    return f"{', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]


def _kind_of(filename: str) -> str | None:
    for fmt in INPUT_FORMATS:
        if filename.endswith(fmt.suffixes):
            return fmt.kind
    return None


# ---------------------------------------------------------------------------------------------
# Discovery


def _walk(directory: Path) -> Iterator[Path]:
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith("."):
                yield Path(root) / filename


def find_inputs(
    paths: Sequence[str | Path], *, plain_text: Sequence[str | Path] = (), include: Sequence[str] = ()
) -> list[InputFile]:
    """Expand files and directories into input files, sorted by name (module docstring)."""
    found: dict[str, InputFile] = {}

    def add(source: InputFile) -> None:
        other = found.get(source.name)
        if other is not None and other.path != source.path:
            raise InputError(
                f"inputs {other.path} and {source.path} would both be named "
                f"{source.name!r}; pass a directory above them instead"
            )
        found[source.name] = source

    args = [(Path(p), False) for p in paths] + [(Path(p), True) for p in plain_text]
    if not args:
        raise InputError("no inputs given; pass files or directories (or --plain-text DIR)")
    for path, as_text in args:
        if not path.exists():
            raise InputError(f"input {path} does not exist; check the path")
        if path.is_dir():
            for file in _walk(path):
                if include and not any(fnmatch.fnmatch(file.name, p) for p in include):
                    continue
                kind = PLAIN_TEXT_KIND if as_text else _kind_of(file.name)
                if kind is not None:
                    rel = file.relative_to(path).as_posix()
                    add(InputFile.of(file, f"{path.resolve().name}/{rel}", kind))
        else:
            kind = PLAIN_TEXT_KIND if as_text else _kind_of(path.name)
            if kind is None:
                raise InputError(
                    f"input {path}: unknown format; expected {input_suffixes()} (or pass it with --plain-text)"
                )
            add(InputFile.of(path, path.name, kind))
    if not found:
        raise InputError(
            f"no input files found under {', '.join(str(p) for p, _ in args)}; expected {input_suffixes()} files"
        )
    return [found[name] for name in sorted(found)]


# ---------------------------------------------------------------------------------------------
# Reading


def _read_errors() -> tuple:
    import pyarrow
    import zstandard

    return (OSError, EOFError, zstandard.ZstdError, pyarrow.ArrowException)


def iter_records(source: InputFile, text_field: str = "text") -> Iterator[Record]:
    """Every record of one input file, in order: a :class:`Document` or a :class:`BadRecord`."""
    read = next(fmt.read for fmt in INPUT_FORMATS if fmt.kind == source.kind)
    try:
        yield from read(source, text_field)
    except Exception as e:
        if not isinstance(e, _read_errors()):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read input {source.path}: {reason}; fix or remove the file and rerun") from None
