"""Samples -> unpadded batches with labels; every random choice is keyed by the sample's position.

MLM: tokens other than [CLS]/[SEP]/[PAD] are chosen at the phase's mask rate; of those, 80%
become [MASK], 10% a random token of the whole vocabulary and 10% stay, and only they carry
labels. MNTP: the same masks, each label moved to the position before it. CLM: [CLS] is the BOS,
nothing is added, and each token predicts the next one of its own sample, so no label crosses a
document boundary and the stored trailing [SEP] is a target (decoders learn to end documents).
Token ``j`` of the sample at position ``p`` draws from a counter-based hash of (seed, p, j),
never from generator state, so a batch is the same whichever rank, worker or replay builds it.
Each sample also gets a digest (XXH3-128 of its position, input ids and labels) for the ledger.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from ettin.attention import Documents
from ettin.config import IGNORE, OBJECTIVE_CAUSAL
from ettin.data.order import derive_key


@dataclass
class Batch:
    tokens: torch.Tensor  # [2, tokens] int32: input ids, then labels (IGNORE: no loss); documents end to end
    cu_seqlens: torch.Tensor  # [docs + 1] int32
    max_seqlen: int
    positions: torch.Tensor  # [docs] global sample positions
    digests: list[bytes]  # per-sample XXH3-128 digests, in position order
    _label_index: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[1]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def bounds(self) -> list[int]:
        """``cu_seqlens`` on the host (it lives on the CPU: no device sync)."""
        return self.cu_seqlens.tolist()

    def label_index(self) -> torch.Tensor:
        """Positions of the tokens that carry a label (int64), found on the host once per batch,
        so the model never needs a device-side boolean index (a host sync on a GPU)."""
        if self._label_index is None:
            self._label_index = torch.nonzero(self.labels != IGNORE).squeeze(1)
        return self._label_index

    def micro_batches(self, budget: int, count: int = 0, device: torch.device | str = "cpu") -> list[MicroBatch]:
        """This batch cut by ``token_budget_cut`` into model inputs on ``device``, then one-token
        fillers up to ``count`` (every DP rank must run as many micro-batches as the busiest).

        The batch goes to the device once, asynchronously from pinned memory, and is widened to
        int64 there; the micro-batches are views, cut at offsets the host already knows, so
        nothing here waits for the device."""
        bounds, index = self.bounds, self.label_index()
        tokens = self.tokens.to(device, non_blocking=True).long()
        cu = self.cu_seqlens.to(device, non_blocking=True)
        where = index.to(device, non_blocking=True)
        cuts = np.searchsorted(index.numpy(), bounds).tolist()  # label positions at each document start
        out = []
        for a, b in token_budget_cut(bounds, budget):
            lo, hi = bounds[a], bounds[b]
            docs = Documents(
                cu[a : b + 1] - lo,
                tuple(x - lo for x in bounds[a : b + 1]),
                max(bounds[d + 1] - bounds[d] for d in range(a, b)),
            )
            out.append(MicroBatch(tokens[0, lo:hi], tokens[1, lo:hi], docs, where[cuts[a] : cuts[b]] - lo))
        return out + [MicroBatch.filler(device) for _ in range(count - len(out))]

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader's pin thread calls this), so host-to-device copies are
        asynchronous; the label index is found here too, off the training loop's critical path."""
        pinned = Batch(
            self.tokens.pin_memory(), self.cu_seqlens.pin_memory(), self.max_seqlen, self.positions, self.digests
        )
        pinned._label_index = self.label_index().pin_memory()
        return pinned

    def __getstate__(self):
        # between loader processes the tokens go as shared memory and the small parts by value;
        # anywhere else (torch.save, all_gather_object) a view sends only its own part
        tokens = self.tokens if self.tokens.is_shared() else self.tokens.clone()
        return {
            "tokens": tokens,
            "cu_seqlens": self.cu_seqlens.numpy(),
            "max_seqlen": self.max_seqlen,
            "positions": self.positions.numpy(),
            "digests": self.digests,
        }

    def __setstate__(self, state):
        self.__dict__.update(state, _label_index=None)
        self.cu_seqlens, self.positions = torch.from_numpy(state["cu_seqlens"]), torch.from_numpy(state["positions"])


@dataclass
class MicroBatch:
    """One forward/backward's inputs, on the compute device."""

    input_ids: torch.Tensor  # [tokens] int64
    labels: torch.Tensor  # [tokens] int64, IGNORE where there is no loss
    docs: Documents  # the documents' offsets, on the device and on the host
    label_index: torch.Tensor  # [labels] int64: where the labels are, found on the host

    @classmethod
    def filler(cls, device) -> MicroBatch:
        """One token without a label: runs the collectives of a micro-batch, adds nothing. Made by
        kernels on the device (no host-to-device copy)."""
        docs = Documents(torch.arange(2, dtype=torch.int32, device=device), (0, 1), 1)
        return cls(
            torch.zeros(1, dtype=torch.long, device=device),
            torch.full((1,), IGNORE, device=device),
            docs,
            torch.zeros(0, dtype=torch.long, device=device),
        )


def token_budget_cut(bounds: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Cut documents laid end to end (``bounds``: cu_seqlens on the host) into runs ``[first, last)``
    of consecutive documents holding at most ``budget`` tokens; a document longer than the budget
    gets a run of its own. Greedy and in order: a pure function of the lengths, so the cut of a
    rank's share of a step never depends on the worker count, and the global batch, the ledger and
    the step hash are the same whatever the budget."""
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    runs, first = [], 0
    for d in range(1, len(bounds)):
        if d - 1 > first and bounds[d] - bounds[first] > budget:
            runs.append((first, d - 1))
            first = d - 1
    if len(bounds) > 1:
        runs.append((first, len(bounds) - 1))
    return runs


def _token_buffer(n: int) -> torch.Tensor:
    """An empty [2, n] int32 tensor; in a loader worker it is born in shared memory, as torch's own
    ``default_collate`` does, so handing it to the trainer process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty((2, n), dtype=torch.int32)
    return torch.empty(0, dtype=torch.int32).set_(torch.UntypedStorage._new_shared(8 * n), 0, (2, n))


def step_hash(digests: list[bytes]) -> str:
    """The ledger's hash of a global batch: its samples' digests in position order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


SAMPLE_DIGEST = "xxh3_128"  # the per-sample digest; the ledger header records it


def _below(p: float) -> int:
    """The integer threshold t with ``v < t`` exactly when ``v / 2^20 < p``, for 20-bit integers v."""
    return math.ceil(p * (1 << 20))


def _mlm_rule(ids, labels, cu, positions, key, choose_below, mask_below, random_below, vocab, cls, sep, pad, mask_id):
    """MLM-mask ``ids`` in place and fill ``labels``, one pass. Token ``j`` of the sample at
    position ``p`` draws 64 bits: splitmix64 of ``(p << 24 | j) + key``, cut in three fields (20
    bits choose, 20 bits pick the action, 24 bits the random token). Integer thresholds
    ``ceil(prob · 2^20)`` decide exactly as ``field / 2^20 < prob`` would."""
    low20 = np.uint64(0xFFFFF)
    for d in range(len(positions)):
        base = (np.uint64(positions[d]) << np.uint64(24)) + key
        doc_ids, doc_labels = ids[cu[d] : cu[d + 1]], labels[cu[d] : cu[d + 1]]
        for j in range(len(doc_ids)):  # branch-free, non-negative indices: the compiler vectorizes it
            z = base + np.uint64(j)  # (p << 24 | j) + key, as j < 2^24
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            token = doc_ids[j]
            chosen = ((z & low20) < choose_below) & (token != cls) & (token != sep) & (token != pad)
            action = (z >> np.uint64(20)) & low20
            swapped = np.int32(((z >> np.uint64(40)) * vocab) >> np.uint64(24))
            replaced = mask_id if action < mask_below else (swapped if action < random_below else token)
            doc_ids[j] = replaced if chosen else token
            doc_labels[j] = token if chosen else np.int32(IGNORE)


_KERNEL = None


def mlm_kernel():
    """``_mlm_rule`` compiled by numba, once per process (and inherited by forked loader workers,
    which is why ``RankSteps`` asks for it up front). Compiled code is cached on disk when numba
    finds a writable cache folder (``NUMBA_CACHE_DIR``); otherwise it compiles (~0.5 s) each time."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        try:
            kernel = numba.njit(cache=True, nogil=True)(_mlm_rule)
        except RuntimeError:  # no writable cache location: "cannot cache function ..."
            kernel = numba.njit(nogil=True)(_mlm_rule)
        ids = np.zeros(1, np.int32)  # compile now, for exactly the argument types Collator passes
        one, zero = np.uint64(1), np.int32(0)
        kernel(
            ids, ids.copy(), np.array([0, 1]), np.zeros(1, np.int64), one, one, one, one, one, zero, zero, zero, zero
        )
        _KERNEL = kernel
    return _KERNEL


def next_token_labels(inputs: np.ndarray, labels: np.ndarray, cu: np.ndarray) -> None:
    """CLM: the label of each token is the next token of its own sample; a sample's last token has
    none. The stored trailing [SEP] stays in the sample, so it is the target of the token before
    it, as in Ettin's decoder loss (orionw/bert24 ``src/bert_layers/model.py``,
    ``FlexBertForCausalLM.forward``: ``shift_labels = input_ids[1:]``, then ``-100`` only at each
    ``cu_seqlens[i+1] - 1`` "so eos doesn't predict bos")."""
    if len(inputs):
        labels[:-1] = inputs[1:]
        labels[cu[1:] - 1] = IGNORE


def shift_to_previous(labels: np.ndarray, cu: np.ndarray) -> None:
    """MNTP: the label at position ``i`` moves to ``i - 1`` of the same sample, so the output at
    ``i - 1`` predicts the token masked at ``i`` (LLM2Vec: McGill-NLP/llm2vec
    ``experiments/run_mntp.py`` masks with transformers' MLM collator, and its ``*BiForMNTP``
    models take the causal-LM loss, ``logits[:, :-1]`` against ``labels[:, 1:]``). A sample's last
    position gets no label; a label at a sample's first position (never: it is [CLS]) is dropped,
    not moved into the previous document."""
    if len(labels):
        labels[:-1] = labels[1:]
        labels[cu[1:] - 1] = IGNORE


class Collator:
    """Builds a :class:`Batch` from stored samples for one objective (``mlm``, ``mntp``, ``clm``).

    MLM's random replacements are drawn from the whole vocabulary, special tokens ([PAD]
    included) too, as Ettin's collator did: its configs set ``sequence_packing: false``, which in
    orionw/bert24 ``src/text_data.py`` is transformers' ``DataCollatorForLanguageModeling``,
    whose random words are ``torch.randint(len(tokenizer))`` over all 50,368 ids."""

    def __init__(
        self,
        objective: str,
        seed: int,
        vocab_size: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        mask_id: int,
        mask_rate: float = 0.3,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
    ):
        if objective not in OBJECTIVE_CAUSAL:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVE_CAUSAL)}, got {objective!r}")
        self.objective, self.seed, self.vocab_size = objective, int(seed), int(vocab_size)
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = cls_id, sep_id, pad_id, mask_id
        self.mask_rate, self.mask_token_prob, self.random_token_prob = mask_rate, mask_token_prob, random_token_prob

    @classmethod
    def from_config(cls, cfg) -> Collator:
        m, o = cfg.model, cfg.objective
        return cls(
            o.name,
            cfg.phase.seed,
            m.vocab_size,
            m.cls_token_id,
            m.sep_token_id,
            m.pad_token_id,
            m.mask_token_id,
            o.mask_rate,
            o.mask_token_prob,
            o.random_token_prob,
        )

    @property
    def masks(self) -> bool:
        """Whether this objective masks tokens (MLM and MNTP, with the same kernel and keys)."""
        return self.objective in ("mlm", "mntp")

    def sample(self, ids: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of one stored sample at global ``position``."""
        batch = self([ids], [position])
        return batch.input_ids.numpy(), batch.labels.numpy()

    def apply_masks(self, inputs: np.ndarray, labels: np.ndarray, cu: np.ndarray, positions) -> None:
        """MLM-mask ``inputs`` in place and fill ``labels`` (the compiled ``_mlm_rule``). MNTP uses
        the same key ("mlm"), so its masks are exactly MLM's at the same seed and position."""
        mlm_kernel()(
            inputs,
            labels,
            cu,
            np.asarray(positions, np.int64),
            np.uint64(derive_key(self.seed, "mlm")),
            np.uint64(_below(self.mask_rate)),
            np.uint64(_below(self.mask_token_prob)),
            np.uint64(_below(self.mask_token_prob + self.random_token_prob)),
            np.uint64(self.vocab_size),
            *(np.int32(t) for t in (self.cls_id, self.sep_id, self.pad_id, self.mask_id)),
        )

    def __call__(self, samples: list[np.ndarray], positions: list[int]) -> Batch:
        lengths = np.array([len(x) for x in samples], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        tokens = _token_buffer(int(cu[-1]))
        inputs, labels = tokens.numpy()
        if samples:
            np.concatenate(samples, out=inputs, casting="unsafe")
        if self.masks:
            self.apply_masks(inputs, labels, cu, positions)
            if self.objective == "mntp":
                shift_to_previous(labels, cu)
        else:
            next_token_labels(inputs, labels, cu)
        return Batch(
            tokens=tokens,
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_seqlen=int(lengths.max(initial=0)),
            positions=torch.tensor(list(positions), dtype=torch.int64),
            digests=sample_digests(inputs, labels, cu, positions),
        )


def sample_digests(inputs: np.ndarray, labels: np.ndarray, cu: np.ndarray, positions) -> list[bytes]:
    """Per sample: XXH3-128 of its position (8 bytes, little-endian), input ids and labels (int32 LE)."""
    inputs_le, labels_le = inputs.astype("<i4", copy=False), labels.astype("<i4", copy=False)
    digests = []
    for p, a, b in zip(positions, cu[:-1].tolist(), cu[1:].tolist()):
        h = xxhash.xxh3_128(int(p).to_bytes(8, "little"))
        h.update(inputs_le[a:b])
        h.update(labels_le[a:b])
        digests.append(h.digest())
    return digests
