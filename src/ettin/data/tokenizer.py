"""Tokenizers for the data tools: load a ``tokenizer.json``, identify it, train a small one.

Samples are token ids, so a dataset is only meaningful together with the exact tokenizer that
made it: :func:`tokenizer_identity` (sha256 of the ``tokenizer.json`` bytes and the vocabulary
size) is recorded in every dataset's ``stats.json`` and checked when a run is resumed.

:func:`train_tokenizer` builds a byte-level BPE for offline demos and tests (the real runs use
ModernBERT's tokenizer). Its special tokens come first, in the order ``[PAD] [CLS] [SEP] [MASK]
[UNK]`` = ids 0..4, which ``configs/experiment/tiny.yaml`` relies on; being byte-level, it never
needs ``[UNK]`` but keeps it so the special-token set matches ModernBERT's. Training is
deterministic: the same documents in the same order give the same ``tokenizer.json`` bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ettin.data.inputs import BadRecord, find_inputs, iter_records
from ettin.errors import EttinError

if TYPE_CHECKING:  # tokenizers is imported where it is used: parsers read SPECIAL_TOKENS
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")  # ids 0..4, in this order
BYTE_ALPHABET_SIZE = 256  # a byte-level BPE starts from one token per byte
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE


class TokenizerError(EttinError):
    """A tokenizer that cannot be read or used; str() is the one-line message."""


@dataclass(frozen=True)
class TokenizerIdentity:
    sha256: str  # of the tokenizer.json bytes
    vocab_size: int  # including added (special) tokens

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size}


def resolve_tokenizer_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` for a directory (a Hugging Face export)."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    if not path.exists():
        raise TokenizerError(
            f"tokenizer {path} does not exist; pass a tokenizer.json (ettin data train-tokenizer makes one)"
        )
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} is not a file; pass a tokenizer.json")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a ``tokenizer.json`` from a local path (never downloads anything)."""
    from tokenizers import Tokenizer

    path = resolve_tokenizer_path(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for every parse problem
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(
            f"cannot read tokenizer {path}: {reason}; it must be a tokenizers tokenizer.json"
        ) from None


def tokenizer_identity(path: str | Path) -> TokenizerIdentity:
    """The sha256 of the ``tokenizer.json`` bytes and its vocabulary size."""
    path = resolve_tokenizer_path(path)
    tokenizer = load_tokenizer(path)
    return TokenizerIdentity(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )


def special_token_ids(tokenizer: Tokenizer, cls_id: int | None = None, sep_id: int | None = None) -> tuple[int, int]:
    """The ids that wrap every sample: given ones win, else the tokenizer's [CLS] and [SEP]."""
    resolved = []
    for name, given, flag in (("[CLS]", cls_id, "--cls-id"), ("[SEP]", sep_id, "--sep-id")):
        token_id = given if given is not None else tokenizer.token_to_id(name)
        if token_id is None:
            raise TokenizerError(f"the tokenizer has no {name} token; pass its id with {flag}")
        if not 0 <= token_id < 2**32:
            raise TokenizerError(f"{name} id {token_id} does not fit uint32; pass a valid {flag}")
        resolved.append(int(token_id))
    return resolved[0], resolved[1]


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE whose encode() adds [CLS] … [SEP], like ModernBERT's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with the special tokens at ids 0..4."""
    from tokenizers import AddedToken, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at "
            f"least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + "
            f"{BYTE_ALPHABET_SIZE} bytes)"
        )
    # [MASK] swallows the space before it, as in ModernBERT, so "a [MASK]" fills like "a word".
    specials = [AddedToken(t, lstrip=(t == "[MASK]"), special=True) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer = new_bpe_tokenizer()
    tokenizer.train_from_iterator(texts, trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tokenizer


@dataclass
class TrainingInput:
    """What :func:`train_tokenizer` read: documents used, and bad records skipped by kind."""

    documents: int = 0
    text_bytes: int = 0
    bad_records: dict = field(default_factory=dict)  # kind -> count


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    *,
    plain_text: Sequence[str | Path] = (),
    include: Sequence[str] = (),
    text_field: str = "text",
    min_frequency: int = 2,
    progress: bool = False,
) -> tuple[Tokenizer, TrainingInput]:
    """Train on the documents ``ettin data prepare`` would read from the same arguments.

    Bad records are skipped and counted, as in prepare. Returns the tokenizer (not saved) and
    what was read; raises :class:`ettin.data.inputs.InputError` for missing or unreadable inputs.
    """
    sources = find_inputs(inputs, plain_text=plain_text, include=include)
    read = TrainingInput()

    def texts() -> Iterator[str]:
        from tqdm import tqdm

        with tqdm(
            total=sum(s.size for s in sources), unit="B", unit_scale=True, desc="train-tokenizer", disable=not progress
        ) as bar:
            for source in sources:
                for record in iter_records(source, text_field):
                    if isinstance(record, BadRecord):
                        read.bad_records[record.kind] = read.bad_records.get(record.kind, 0) + 1
                        continue
                    read.documents += 1
                    read.text_bytes += record.text_bytes
                    yield record.text
                bar.update(source.size)

    tokenizer = train_bpe(texts(), vocab_size, min_frequency=min_frequency)
    if read.documents == 0:
        raise TokenizerError("no usable documents in the inputs; check the paths and --text-field")
    return tokenizer, read
