"""Random access to the samples of one MDS source folder (Ettin's released layout).

A source folder holds ``index.json`` and shards written by mosaicml-streaming's ``MDSWriter``
(columns ``input_ids: ndarray:uint32`` and ``id: str``, zstd-compressed or raw). Compressed or
remote shards are fetched (streaming's downloaders) and decompressed once into a cache folder,
written aside and renamed, so concurrent ranks and workers never see half a file. Samples are then
read straight from the memory-mapped raw shard. Decoding uses streaming's own MDS decoders.

Integrity: where index.json records shard hashes (``MDSWriter(hashes=...)``; prepare writes
xxh3_64), each process checks a shard once, when it first opens it: the compressed file before
decompressing it, the raw file (or the cached decompressed copy) before mapping it. A cached copy
is named after what it was made from (the compressed file's size and mtime and the index's
hashes), so a shard edited after a run is decompressed again, never served from a stale copy.
A source without hashes is said to be unchecked, once per process, and read as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ettin.errors import EttinError


class DataError(EttinError):
    """Missing, corrupt or inconsistent data; str() names the file and the fix."""


def is_remote(path: str) -> bool:
    return urllib.parse.urlparse(str(path)).scheme not in ("", "file")


def default_cache_dir() -> Path:
    return Path(
        os.environ.get(
            "ETTIN_DATA_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ettin" / "mds"
        )
    )


# Shard hash algorithms we check, fastest first; any other hashlib name streaming may have
# recorded (sha1, md5, ...) is checked too, after these.
FAST_HASHES = ("xxh3_64", "xxh64", "xxh3_128", "xxh128", "xxh32")


def _hasher(algo: str):
    """A fresh hash object for ``algo``, or None for a name we cannot compute."""
    if algo in xxhash.algorithms_available:
        return getattr(xxhash, algo)()
    if algo in hashlib.algorithms_available and not algo.startswith("shake_"):
        return hashlib.new(algo)
    return None


def pick_hash(file_info: dict | None) -> tuple[str, str] | None:
    """(algorithm, hex digest) to check a file against: the fastest of those index.json records."""
    hashes = (file_info or {}).get("hashes") or {}
    for algo in [*FAST_HASHES, *sorted(hashes)]:
        if algo in hashes and _hasher(algo) is not None:
            return algo, str(hashes[algo])
    return None


def digest_bytes(algo: str, data) -> str:
    h = _hasher(algo)
    h.update(data)
    return h.hexdigest()


def digest_file(algo: str, path: Path) -> str:
    """Hash a file through a read-only map: no copy, and its pages stay cached for the reads after."""
    h = _hasher(algo)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                h.update(mapped)
    return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    raw_name: str
    raw_bytes: int
    zip_name: str | None
    zip_bytes: int | None
    compression: str | None
    samples: int
    raw_hash: tuple[str, str] | None = None  # (algorithm, hex digest) from index.json
    zip_hash: tuple[str, str] | None = None

    @property
    def checked(self) -> bool:
        """Whether index.json lets us check the file we read first (compressed, else raw)."""
        return (self.zip_hash if self.zip_name else self.raw_hash) is not None


_SAID_UNCHECKED: set[str] = set()  # sources already reported as unchecked by this process


def say_unchecked_once(path: str, count: int, total: int) -> None:
    """One stderr line per source, from the first rank's process only (every rank reads the same
    index): Ettin's released folders may carry no hashes."""
    if path in _SAID_UNCHECKED or os.environ.get("RANK", "0") != "0":
        return
    _SAID_UNCHECKED.add(path)
    which = "its shards" if count == total else f"{count} of its {total} shards"
    print(
        f"warning: {path}/index.json records no hashes for {which}: their integrity is unchecked (prepare writes them)",
        file=sys.stderr,
        flush=True,
    )


_CACHED_COPY = re.compile(r"\.[0-9a-f]{16}$")  # the identity suffix of a cached decompressed copy


@contextlib.contextmanager
def _exclusive(lock: Path):
    """An advisory lock between processes (one fetches or decompresses a shard, the rest wait). Where
    the filesystem has no locks, each process does it itself: still correct, as writes are renames."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


class MDSSource:
    """Samples ``0 .. len-1`` of one source folder, in shard order."""

    def __init__(self, path: str, cache_dir: str | Path | None = None):
        self.path = str(path)
        key = hashlib.sha256(os.path.abspath(self.path).encode() if not is_remote(self.path) else self.path.encode())
        self.cache = Path(cache_dir or default_cache_dir()) / key.hexdigest()[:16]
        index = self._read_index()
        self.shards: list[Shard] = []
        for i, s in enumerate(index.get("shards", [])):
            if s.get("format") != "mds":
                raise DataError(f"{self.path}/index.json: shard {i} is format {s.get('format')!r}, expected 'mds'")
            zip_data = s.get("zip_data") or {}
            self.shards.append(
                Shard(
                    s["raw_data"]["basename"],
                    int(s["raw_data"]["bytes"]),
                    zip_data.get("basename"),
                    zip_data.get("bytes"),
                    s.get("compression"),
                    int(s["samples"]),
                    pick_hash(s["raw_data"]),
                    pick_hash(zip_data),
                )
            )
            if i == 0:
                self.columns = list(zip(s["column_names"], s["column_encodings"], s["column_sizes"]))
        if not self.shards:
            raise DataError(f"{self.path}/index.json lists no shards: an empty source; remove it from data.sources")
        names = [c[0] for c in self.columns]
        if "input_ids" not in names:
            raise DataError(f"{self.path}/index.json: no 'input_ids' column (columns: {names})")
        self.offsets = np.concatenate([[0], np.cumsum([s.samples for s in self.shards])]).astype(np.int64)
        # the common layout (every column variable-size, input_ids as ndarray:uint32) is read without decoders
        variable = [c for c in self.columns if c[2] is None]
        self._fast_ids = len(variable) == len(self.columns) and ("input_ids", "ndarray:uint32", None) in self.columns
        self._ids_column = names.index("input_ids")
        self._open: dict[int, np.ndarray] = {}
        self._ready: dict[int, Path] = {}  # shard -> its raw file, checked by this process
        unchecked = sum(not s.checked for s in self.shards)
        if unchecked:
            say_unchecked_once(self.path, unchecked, len(self.shards))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _read_index(self) -> dict:
        if is_remote(self.path):
            local = self.cache / "index.json"
            if not local.exists():
                self._download("index.json", local)
        else:
            local = Path(self.path) / "index.json"
            if not local.is_file():
                raise DataError(
                    f"{self.path}: no index.json; point data.sources[].path at an MDS folder "
                    "(written by `ettin data prepare`)"
                )
        try:
            return json.loads(local.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{local}: unreadable index.json ({e})") from None

    def _download(self, name: str, local: Path, expected: tuple[str, str] | None = None) -> None:
        """Fetch remote ``name`` into a private folder, check it against ``expected`` (algorithm,
        digest), then rename it to ``local``: ranks and workers fetching the same file at once never
        share or see a half-written one, and a bad download never lands in the cache."""
        from streaming.base.storage import CloudDownloader

        local.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(dir=local.parent, prefix=".fetch-"))
        remote = f"{self.path.rstrip('/')}/{name}"
        try:
            try:
                CloudDownloader.direct_download(remote, str(private / name))
            except Exception as e:  # noqa: BLE001 - any transport failure is the same user-facing problem
                raise DataError(f"{remote}: download failed ({e})") from None
            if expected and digest_file(expected[0], private / name) != expected[1]:
                raise self._hash_error(remote, expected[0])
            os.replace(private / name, local)
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def shard_file(self, k: int) -> Path:
        """The raw (decompressed) file of shard ``k``, fetched, decompressed and checked on first use
        (in this process); later calls return it without touching the disk."""
        ready = self._ready.get(k)
        if ready is not None:
            return ready
        shard = self.shards[k]
        if not is_remote(self.path):
            raw = Path(self.path) / shard.raw_name
            if raw.is_file():
                self._check_size(raw, shard)
                if shard.raw_hash and digest_file(shard.raw_hash[0], raw) != shard.raw_hash[1]:
                    raise self._hash_error(raw, shard.raw_hash[0])
                self._ready[k] = raw
                return raw
        raw = self.cache / f"{shard.raw_name}.{self._made_from(shard)}"
        lock = self.cache / f".{shard.raw_name}.lock"
        filled = False
        if not raw.is_file():
            with _exclusive(lock):  # the ranks and workers sharing a cache
                if not raw.is_file():  # wait for the one that fetches, then find the file
                    self._materialize(shard, raw)
                    filled = True
        if not filled and not self._intact(raw, shard):
            with _exclusive(lock):  # the cached copy rotted or was cut short: it is ours to rebuild
                self._materialize(shard, raw)
        self._check_size(raw, shard)
        self._ready[k] = raw
        return raw

    @staticmethod
    def _intact(raw: Path, shard: Shard) -> bool:
        """Whether a cached copy still holds what it held when it was made (size, then hash)."""
        if raw.stat().st_size != shard.raw_bytes:
            return False
        return shard.raw_hash is None or digest_file(shard.raw_hash[0], raw) == shard.raw_hash[1]

    def _made_from(self, shard: Shard) -> str:
        """What a cached decompressed copy is made from, as 16 hex digits in its file name: the
        index's sizes and hashes and, for a local compressed file, its size and mtime. A shard edited
        in place (same length) gets a new mtime and so a new copy; the stale one is never read."""
        identity = [shard.raw_name, shard.raw_bytes, shard.raw_hash, shard.zip_name, shard.zip_bytes, shard.zip_hash]
        if shard.zip_name is not None and not is_remote(self.path):
            zipped = Path(self.path) / shard.zip_name
            try:
                st = zipped.stat()
            except FileNotFoundError:
                raise DataError(f"{zipped}: missing shard listed in index.json; re-run prepare or restore it") from None
            identity += [st.st_size, st.st_mtime_ns, st.st_ino]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def _hash_error(self, where, algo: str) -> DataError:
        return DataError(
            f"{where}: contents do not match the {algo} hash in {self.path}/index.json (source "
            f"{self.path}); the shard is corrupt or was changed after it was written: restore it"
        )

    def _materialize(self, shard: Shard, raw: Path) -> None:
        """Fetch and/or decompress ``shard`` into the cache file ``raw`` (checked, written aside, then
        renamed) and remove the copies made from earlier versions of it."""
        if shard.zip_name is None:
            if not is_remote(self.path):
                raise DataError(
                    f"{self.path}/{shard.raw_name}: missing shard listed in index.json; re-run prepare or restore it"
                )
            self._download(shard.raw_name, raw, shard.raw_hash)
            self._drop_stale_copies(shard, raw)
            return
        if is_remote(self.path):  # the compressed copy is fetched into a private folder, gone once read
            self.cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.cache, prefix=".fetch-") as private:
                zipped = Path(private) / shard.zip_name
                self._download(shard.zip_name, zipped)
                compressed, where = zipped.read_bytes(), f"{self.path}/{shard.zip_name}"
        else:
            where = Path(self.path) / shard.zip_name
            if not where.is_file():
                raise DataError(f"{where}: missing shard listed in index.json; re-run prepare or restore it")
            compressed = where.read_bytes()
        if shard.zip_hash and digest_bytes(shard.zip_hash[0], compressed) != shard.zip_hash[1]:
            raise self._hash_error(where, shard.zip_hash[0])
        from streaming.base.compression import decompress

        try:
            data = decompress(shard.compression, compressed)
        except Exception as e:  # noqa: BLE001 - zstd raises its own error types
            raise DataError(f"{where}: cannot decompress ({e}); the shard is corrupt, restore it") from None
        if shard.raw_hash and digest_bytes(shard.raw_hash[0], data) != shard.raw_hash[1]:
            raise self._hash_error(f"{where} (decompressed)", shard.raw_hash[0])
        raw.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=raw.parent, prefix=f".{shard.raw_name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, raw)  # atomic: other ranks see the whole file or none
        self._drop_stale_copies(shard, raw)

    def _drop_stale_copies(self, shard: Shard, current: Path) -> None:
        """Copies made from earlier versions of this shard (or by an ettin that named them plainly)
        are never read again; a process that still maps one keeps its pages until it closes them."""
        (current.parent / shard.raw_name).unlink(missing_ok=True)
        for old in current.parent.glob(f"{glob.escape(shard.raw_name)}.*"):
            if old != current and _CACHED_COPY.search(old.name) and old.name[:-17] == shard.raw_name:
                old.unlink(missing_ok=True)

    def _check_size(self, raw: Path, shard: Shard) -> None:
        size = raw.stat().st_size
        if size != shard.raw_bytes:
            raise DataError(
                f"{raw}: {size} bytes, index.json says {shard.raw_bytes}; the shard is corrupt or "
                "from another dataset, restore it (and clear the cache folder if it is there)"
            )

    def _mapped(self, k: int) -> np.ndarray:
        mm = self._open.get(k)
        if mm is None:
            if len(self._open) >= 64:  # bound open files: the order reads a few shards at a time
                self._open.pop(next(iter(self._open)))
            mm = np.memmap(self.shard_file(k), dtype=np.uint8, mode="r").view(
                np.ndarray
            )  # plain views: cheaper slicing
            count = int(mm[:4].view(np.uint32)[0])
            if count != self.shards[k].samples:
                raise DataError(
                    f"{self.shard_file(k)}: holds {count} samples, index.json says {self.shards[k].samples}"
                )
            self._open[k] = mm
        return mm

    def max_tokens(self) -> int:
        """The most tokens the shards' raw bytes can hold: each shard spends 4 bytes on its sample
        count and 4 per sample offset (plus one), each sample 4 per variable-size column and at
        least 2 on the ids' header and shape; the rest, at the ids' dtype size per token, is the bound."""
        encoding = dict((name, enc) for name, enc, _ in self.columns)["input_ids"]
        try:
            itemsize = np.dtype(encoding.split(":", 1)[1]).itemsize if ":" in encoding else 1
        except TypeError:
            itemsize = 1
        variable = sum(size is None for _, _, size in self.columns)
        others = sum(size or 0 for name, _, size in self.columns if name != "input_ids")
        header = 2 if encoding.startswith("ndarray") and self.columns[self._ids_column][2] is None else 0
        per_sample = 4 * variable + others + header
        room = sum(s.raw_bytes - 4 - 4 * (s.samples + 1) - s.samples * per_sample for s in self.shards)
        return max(room, 0) // itemsize

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.path} ({len(self)} samples)")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def _span(self, i: int) -> tuple[np.ndarray, int, int]:
        k, j = self.locate(i)
        mm = self._mapped(k)
        begin, end = mm[4 + 4 * j : 12 + 4 * j].view(np.uint32)
        return mm, int(begin), int(end)

    def raw(self, i: int) -> bytes:
        mm, begin, end = self._span(i)
        return mm[begin:end].tobytes()

    def input_ids(self, i: int) -> np.ndarray:
        """Sample ``i``'s token ids."""
        return self.input_ids_many(np.array([i]))[0]

    def input_ids_many(self, indices: np.ndarray) -> list[np.ndarray]:
        """The token ids of samples ``indices``, read straight from the mapped shards, one shard's
        samples at a time and vectorized (the loader's hot path)."""
        if not self._fast_ids:
            return [self[int(i)]["input_ids"] for i in indices]
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"sample {bad} out of range for {self.path} ({len(self)} samples)")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        out: list[np.ndarray | None] = [None] * len(indices)
        columns = len(self.columns)
        for k in np.unique(shard).tolist():
            which = np.flatnonzero(shard == k)
            mm, samples = self._mapped(k), self.shards[k].samples
            j = indices[which] - self.offsets[k]
            table = mm[4 : 8 + 4 * samples].view("<u4")  # where each sample's bytes begin (and the last one ends)
            begin, stop = table[j].astype(np.int64), table[j + 1].astype(np.int64)
            self._check(k, j, (begin < 8 + 4 * samples) | (stop > len(mm)) | (begin + 4 * columns > stop))
            # each sample starts with the byte sizes of its variable-size columns (all of them, here)
            sizes = mm[begin[:, None] + np.arange(4 * columns)].view("<u4").astype(np.int64)
            start = begin + 4 * columns + sizes[:, : self._ids_column].sum(axis=1)
            end = start + sizes[:, self._ids_column]
            self._check(k, j, (start >= stop) | (end > stop))
            header = mm[start].astype(
                np.int64
            )  # ndarray with a dynamic shape: (ndim << 2 | shape dtype), then the shape
            values = start + 1 + (header >> 2) * (1 << (header & 3))
            self._check(k, j, (values > end) | ((end - values) % 4 != 0))
            for w, a, b in zip(which.tolist(), values.tolist(), end.tolist()):
                out[w] = mm[a:b].view(np.uint32)
        return out

    def _check(self, k: int, samples: np.ndarray, bad: np.ndarray) -> None:
        if bad.any():
            raise DataError(
                f"{self.shard_file(k)}: sample {int(samples[bad][0])} of this shard is corrupt (its offsets "
                "or sizes point outside it); restore the shard from its source"
            )

    def __getitem__(self, i: int) -> dict:
        from streaming.base.format.mds.encodings import mds_decode

        data = self.raw(i)
        sizes, pos = [], 0
        for _, _, size in self.columns:
            if size is None:
                size = int(np.frombuffer(data[pos : pos + 4], np.uint32)[0])
                pos += 4
            sizes.append(size)
        out = {}
        for (name, encoding, _), size in zip(self.columns, sizes):
            out[name] = mds_decode(encoding, data[pos : pos + size])
            pos += size
        return out

    def __getstate__(self):  # workers reopen their own memory maps (of files already checked)
        state = dict(self.__dict__)
        state["_open"] = {}
        return state
