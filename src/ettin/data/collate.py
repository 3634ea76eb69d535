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

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [tokens] int64, documents end to end
    labels: torch.Tensor  # [tokens] int64, IGNORE where there is no loss
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
        ids = ids.astype(np.int64)
        if self.objective == "clm":
            if len(ids) > 1 and ids[-1] == self.sep_id:
                ids = ids[:-1]
            labels = np.empty_like(ids)
            labels[:-1], labels[-1] = ids[1:], IGNORE
            return ids, labels
        rng = np.random.Generator(np.random.Philox(key=[self.seed, position]))
        candidates = (ids != self.cls_id) & (ids != self.sep_id) & (ids != self.pad_id)
        chosen = (rng.random(len(ids)) < self.mask_rate) & candidates
        action = rng.random(len(ids))
        random_tokens = rng.integers(0, self.vocab_size, len(ids))
        labels = np.where(chosen, ids, IGNORE)
        inputs = np.where(chosen & (action < self.mask_token_prob), self.mask_id, ids)
        swap = chosen & (action >= self.mask_token_prob) & (action < self.mask_token_prob + self.random_token_prob)
        inputs = np.where(swap, random_tokens, inputs)
        return inputs, labels

    def __call__(self, samples: list[np.ndarray], positions: list[int]) -> Batch:
        inputs, labels, digests = [], [], []
        for ids, p in zip(samples, positions):
            x, y = self.sample(ids, p)
            inputs.append(x)
            labels.append(y)
            digests.append(hashlib.sha256(int(p).to_bytes(8, "little") + x.astype("<i4").tobytes()
                                          + y.astype("<i4").tobytes()).digest())
        lengths = [len(x) for x in inputs]
        cat = (lambda arrs: torch.from_numpy(np.concatenate(arrs))) if inputs else (lambda arrs: torch.zeros(0, dtype=torch.int64))
        return Batch(
            input_ids=cat(inputs), labels=cat(labels),
            cu_seqlens=torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32),
            max_seqlen=max(lengths, default=0), positions=torch.tensor(list(positions), dtype=torch.int64),
            digests=digests,
        )
