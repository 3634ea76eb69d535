"""Samples -> unpadded batches with labels; every random choice is keyed by the sample's position.

MLM: tokens other than [CLS]/[SEP]/[PAD] are chosen at the phase's mask rate; of those, 80%
become [MASK], 10% a random token and 10% stay, and only they carry labels. CLM: [CLS] is the
BOS, the stored trailing [SEP] is dropped (no forced EOS), and each token predicts the next one
of its own sample, so no label crosses a document boundary. The MLM draw for sample ``p`` comes
from a Philox generator keyed by (seed, p), so a batch is the same whichever rank, worker or
replay builds it. Each sample also gets a digest for the ledger.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ettin.data.order import _mix, derive_key

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [tokens] int32 (half the bytes between loader processes), documents end to end
    labels: torch.Tensor  # [tokens] int32, IGNORE where there is no loss
    cu_seqlens: torch.Tensor  # [docs + 1] int32
    max_seqlen: int
    positions: torch.Tensor  # [docs] global sample positions
    digests: list[bytes]  # per-sample sha256, in position order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE).sum())


def step_hash(digests: list[bytes]) -> str:
    """The ledger's hash of a global batch: its samples' digests in position order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


class Collator:
    def __init__(self, objective: str, seed: int, vocab_size: int, cls_id: int, sep_id: int, pad_id: int, mask_id: int,
                 mask_rate: float = 0.3, mask_token_prob: float = 0.8, random_token_prob: float = 0.1):
        if objective not in ("mlm", "clm"):
            raise ValueError(f"objective must be mlm or clm, got {objective!r}")
        self.objective, self.seed, self.vocab_size = objective, int(seed), int(vocab_size)
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = cls_id, sep_id, pad_id, mask_id
        self.mask_rate, self.mask_token_prob, self.random_token_prob = mask_rate, mask_token_prob, random_token_prob

    @classmethod
    def from_config(cls, cfg) -> "Collator":
        m, o = cfg.model, cfg.objective
        return cls(o.name, cfg.phase.seed, m.vocab_size, m.cls_token_id, m.sep_token_id, m.pad_token_id, m.mask_token_id,
                   o.mask_rate, o.mask_token_prob, o.random_token_prob)

    def sample(self, ids: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of one stored sample at global ``position``."""
        batch = self([ids], [position])
        return batch.input_ids.numpy(), batch.labels.numpy()

    def _mlm(self, ids: np.ndarray, positions: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask a whole batch at once; token ``index`` of the sample at ``position`` draws from
        counter-based hashes of (seed, position, index), never from shared generator state."""
        key = (positions.astype(np.uint64) << np.uint64(24)) | index.astype(np.uint64)
        bits = _mix(key, derive_key(self.seed, "mlm"))  # one 64-bit draw per token, cut in three
        choose = (bits & np.uint64(0xFFFFF)).astype(np.float64) / (1 << 20)
        action = ((bits >> np.uint64(20)) & np.uint64(0xFFFFF)).astype(np.float64) / (1 << 20)
        random_tokens = ((bits >> np.uint64(40)) * np.uint64(self.vocab_size) >> np.uint64(24)).astype(np.int32)
        candidates = (ids != self.cls_id) & (ids != self.sep_id) & (ids != self.pad_id)
        chosen = (choose < self.mask_rate) & candidates
        labels = np.where(chosen, ids, np.int32(IGNORE))
        inputs = np.where(chosen & (action < self.mask_token_prob), np.int32(self.mask_id), ids)
        swap = chosen & (action >= self.mask_token_prob) & (action < self.mask_token_prob + self.random_token_prob)
        return np.where(swap, random_tokens, inputs), labels

    def __call__(self, samples: list[np.ndarray], positions: list[int]) -> Batch:
        if self.objective == "clm":  # [CLS] is the BOS; the stored trailing [SEP] is not a target
            samples = [ids[:-1] if len(ids) > 1 and ids[-1] == self.sep_id else ids for ids in samples]
        lengths = np.array([len(x) for x in samples], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.concatenate(samples).astype(np.int32) if samples else np.zeros(0, np.int32)
        if self.objective == "mlm":
            starts = np.repeat(cu[:-1], lengths)
            inputs, labels = self._mlm(ids, np.repeat(np.asarray(positions, np.int64), lengths),
                                       np.arange(len(ids)) - starts)
        else:  # next token of the same sample: the last token of each sample has no label
            inputs, labels = ids, np.roll(ids, -1)
            labels[cu[1:] - 1] = IGNORE
        digests = [hashlib.sha256(int(p).to_bytes(8, "little") + inputs[a:b].astype("<i4", copy=False).tobytes()
                                  + labels[a:b].astype("<i4", copy=False).tobytes()).digest()
                   for p, a, b in zip(positions, cu[:-1], cu[1:])]
        return Batch(
            input_ids=torch.from_numpy(inputs), labels=torch.from_numpy(labels),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)), max_seqlen=int(lengths.max(initial=0)),
            positions=torch.tensor(list(positions), dtype=torch.int64), digests=digests,
        )
