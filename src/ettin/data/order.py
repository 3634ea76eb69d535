"""The global sample order: position -> (source, sample index), a pure function.

Inputs are the sources' sample counts and shares, a seed and the algorithm version; nothing
about ranks, workers or batch sizes. Two levels:

1. **Mixture.** Positions are cut into mixture blocks of about ``block`` positions. Source ``s``
   owns ``floor((k+1)·B·w_s/W) - floor(k·B·w_s/W)`` slots of block ``k`` (integer weights, exact
   arithmetic), spread evenly through the block. So any window, of any length, holds each source's share to
   within a few samples (tested: 3), and the long-run shares are exact.
2. **Shuffle.** The ``n``-th draw of a source is sample ``n mod M`` of epoch ``n div M``, passed
   through a keyed bijection: first the order of shuffle blocks (``shuffle_block`` consecutive
   samples, a few shards) is permuted, then the samples inside each block. A reader therefore
   touches a bounded set of shards at a time, and every sample appears once per epoch.

The bijections are Feistel networks with cycle walking: O(1) time and memory for any position,
no permutation of the dataset is ever materialized, and they run vectorized over numpy arrays.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

ORDER_VERSION = 1
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@lru_cache(
    maxsize=1 << 16, typed=True
)  # the order asks for the same few keys over and over; typed: 1 and 1.0 repr apart
def derive_key(*parts) -> int:
    """A 64-bit key from any printable parts (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64-style mixing of a uint64 array with a key (array arithmetic wraps silently; updated
    in place on one fresh copy)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(key)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z ^= z >> np.uint64(shift)
        z *= np.uint64(multiplier)
    z ^= z >> np.uint64(31)
    return z


def permute(x: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of ``[0, n)`` applied to ``x`` (Feistel network + cycle walking)."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return x.copy()
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # the domain 2^(2·half) < 4n
    mask = np.uint64((1 << half) - 1)
    round_keys = [derive_key(key, r) for r in range(rounds)]
    out = x.copy()
    todo = np.ones(len(out), dtype=bool)
    while todo.any():  # cycle walking: re-apply until the value lands inside [0, n)
        y = out[todo]
        for rk in round_keys:
            left, right = y >> np.uint64(half), y & mask
            y = (right << np.uint64(half)) | (left ^ (_mix(right, rk) & mask))
        out[todo] = y
        todo[todo] = y >= np.uint64(n)
    return out


class GlobalOrder:
    """``order(start, end)`` -> (source ids, sample indices) for positions ``start .. end-1``."""

    def __init__(
        self,
        samples: list[int],
        shares: list[float],
        seed: int,
        block: int = 8192,
        shuffle_block: int = 65536,
        version: int = ORDER_VERSION,
    ):
        if version != ORDER_VERSION:
            raise ValueError(f"order algorithm version {version} is not this code's ({ORDER_VERSION})")
        if not samples or any(m <= 0 for m in samples):
            raise ValueError(f"every source needs samples, got counts {samples}")
        total = sum(shares)
        self.weights = [max(1, round(s / total * 2**40)) for s in shares]  # exact integer shares
        self.total_weight = sum(self.weights)
        self.samples, self.seed, self.block, self.shuffle_block = (
            list(samples),
            int(seed),
            int(block),
            int(shuffle_block),
        )
        self._slots = lru_cache(maxsize=8)(self._block_slots)

    def __getstate__(self):  # loader workers get a copy; the block cache is rebuilt there
        state = dict(self.__dict__)
        del state["_slots"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._slots = lru_cache(maxsize=8)(self._block_slots)

    def _draws_before(self, k: int) -> list[int]:
        """How many draws each source has made before mixture block ``k``."""
        return [(k * self.block * w) // self.total_weight for w in self.weights]

    def _block_start(self, k: int) -> int:
        return sum(self._draws_before(k))

    def _block_slots(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Source id and draw number of every position of block ``k``, sources spread evenly."""
        before, after = self._draws_before(k), self._draws_before(k + 1)
        sources, draws, times = [], [], []
        for s, (a, b) in enumerate(zip(before, after)):
            q = b - a
            sources.append(np.full(q, s, dtype=np.int64))
            draws.append(np.arange(a, b, dtype=np.int64))
            times.append((np.arange(q) + 0.5) / max(q, 1))
        sources, draws, times = (np.concatenate(v) for v in (sources, draws, times))
        order = np.lexsort((sources, times))
        return sources[order], draws[order]

    def _block_of(self, position: int) -> int:
        k = position // self.block  # block starts lie in (k·B - #sources, k·B]
        while self._block_start(k + 1) <= position:
            k += 1
        while self._block_start(k) > position:
            k -= 1
        return k

    def __call__(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        if start < 0 or end < start:
            raise ValueError(f"bad position range [{start}, {end})")
        sources, draws = [], []
        k = self._block_of(start) if end > start else 0
        pos = start
        while pos < end:
            first = self._block_start(k)
            src, drw = self._slots(k)
            lo, hi = pos - first, min(end - first, len(src))
            sources.append(src[lo:hi])
            draws.append(drw[lo:hi])
            pos += hi - lo
            k += 1
        if not sources:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        sources, draws = np.concatenate(sources), np.concatenate(draws)
        indices = np.empty_like(draws)
        for s in np.unique(sources):
            sel = sources == s
            indices[sel] = self._shuffled(int(s), draws[sel])
        return sources, indices

    def _shuffled(self, s: int, draws: np.ndarray) -> np.ndarray:
        """Sample index of each draw of source ``s`` (epoch = draw div samples)."""
        m, size = self.samples[s], self.shuffle_block
        epochs, i = np.divmod(draws, m)
        full = (m // size) * size  # the last partial block stays last, shuffled inside
        out = np.empty_like(draws)
        for e in np.unique(epochs):
            sel = epochs == e
            ie = i[sel]
            res = np.empty_like(ie)
            head = ie < full
            if head.any():
                block = permute(ie[head] // size, m // size, derive_key(self.seed, s, int(e), "blocks"))
                within = ie[head] % size
                got = np.empty_like(within)
                for b in np.unique(block):
                    bsel = block == b
                    got[bsel] = permute(within[bsel], size, derive_key(self.seed, s, int(e), int(b)))
                res[head] = block.astype(np.int64) * size + got.astype(np.int64)
            if (~head).any():
                res[~head] = full + permute(
                    ie[~head] - full, m - full, derive_key(self.seed, s, int(e), "tail")
                ).astype(np.int64)
            out[sel] = res
        return out


def validation_settings(data_cfg) -> dict[str, float]:
    """Source name -> its ``validation`` setting (the source's own, else ``data.validation``)."""
    return {s.name: data_cfg.validation if s.validation is None else s.validation for s in data_cfg.sources}


def validation_count(setting: float, samples: int) -> int:
    """``data.validation`` for a source of ``samples`` samples: 0 none, a fraction (0, 1) of them
    (at least one), or a count (>= 1)."""
    if setting <= 0:
        return 0
    return max(1, round(setting * samples)) if setting < 1 else int(setting)


class HeldOut:
    """Which stored samples of each source are set aside for validation, and the training index map.

    Source ``s`` sets aside ``counts[s]`` of its ``samples[s]`` samples: the images of ``0 .. v-1``
    under a keyed bijection of ``[0, M)`` (so a uniform choice, the same on every machine, and
    independent of the phase seed: a later phase on the same source holds out the same samples).
    The training order then draws from ``M - v`` samples, and training index ``i`` is the ``i``-th
    stored sample that is not held out. That map is monotone, so training reads keep their shard
    locality, and with ``v = 0`` it is the identity (orders without a validation part are unchanged).
    """

    def __init__(self, samples: list[int], counts: list[int], keys: list[int]):
        self.samples, self.counts = list(samples), list(counts)
        self.validation = [
            np.sort(permute(np.arange(v, dtype=np.uint64), m, key).astype(np.int64))
            for m, v, key in zip(samples, counts, keys)
        ]
        # gaps[k] = training samples stored before the k-th held-out one (non-decreasing)
        self._gaps = [v - np.arange(len(v), dtype=np.int64) for v in self.validation]

    def training_samples(self) -> list[int]:
        return [m - v for m, v in zip(self.samples, self.counts)]

    def stored_index(self, source: int, training_index: np.ndarray) -> np.ndarray:
        """Stored sample index of each training index of ``source``."""
        i = np.asarray(training_index, dtype=np.int64)
        if not self.counts[source]:
            return i
        return i + np.searchsorted(self._gaps[source], i, side="right")
