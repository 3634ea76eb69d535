"""Throughput of ``data_tools prepare`` against the tokenizer it wraps, on the same text.

The text is the Python standard library's own sources (``Lib/*.py``), written as JSONL
documents; the tokenizer is trained on it by ``train-tokenizer``'s library function. The raw
rate is ``Tokenizer.encode_batch`` on one core (``TOKENIZERS_PARALLELISM=false``, as each
prepare worker runs); prepare's rate counts the same document tokens over its whole run:
reading, tokenizing, chunking, staging and writing zstd MDS shards (worker start-up included,
streaming's import not). Target: prepare with 1 worker >= 0.8x the raw rate.

    .venv/bin/python benchmarks/bench_prepare.py [--copies 2] [--vocab-size 8192] [--workers 1 2]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is used: one core

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

from ettin.data.prepare import BATCH_DOCUMENTS, prepare
from ettin.data.tokenizer import load_tokenizer, train_bpe


def stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) of every top-level ``Lib/*.py`` that is valid UTF-8, sorted by name."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            docs.append((path.name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return docs


def raw_rate(tokenizer, texts: list[str], repeats: int) -> tuple[float, int]:
    """Best seconds over ``repeats`` for encode_batch over all texts, in prepare's batch size."""
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), BATCH_DOCUMENTS):
            for encoding in tokenizer.encode_batch(texts[i : i + BATCH_DOCUMENTS], add_special_tokens=False):
                tokens += len(encoding.ids)
        best = min(best, time.perf_counter() - started)
    return best, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=2, help="copies of Lib/*.py (default 2)")
    p.add_argument("--files", type=int, default=4, help="JSONL files to spread them over")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import streaming  # noqa: F401  (pulls in torch: seconds that are not prepare's work)

    docs = stdlib_documents() * args.copies
    texts = [text for _, text in docs]
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        tokenizer_path = tmp / "tokenizer.json"
        train_bpe(texts[: len(texts) // args.copies], args.vocab_size).save(str(tokenizer_path))
        corpus = tmp / "corpus"
        corpus.mkdir()
        for f in range(args.files):
            with open(corpus / f"part{f:02d}.jsonl", "w", encoding="utf-8") as out:
                for n, (name, text) in enumerate(docs[f :: args.files]):
                    out.write(json.dumps({"id": f"{name}/{f}/{n}", "text": text}) + "\n")

        tokenizer = load_tokenizer(tokenizer_path)
        raw_s, tokens = raw_rate(tokenizer, texts, args.repeats)
        rows = [("raw encode_batch, 1 core", raw_s, "")]
        for workers in args.workers:
            best = float("inf")
            for r in range(args.repeats):
                started = time.perf_counter()
                prepare([corpus], tmp / f"out-{workers}-{r}", tokenizer_path, seq_len=args.seq_len, workers=workers)
                best = min(best, time.perf_counter() - started)
            rows.append((f"prepare --workers {workers}", best, f"{workers}"))

    print(
        f"text: {len(texts)} documents, {text_mb:.1f} MB ({args.copies}x Lib/*.py), "
        f"{tokens:,} tokens, vocab {args.vocab_size}, seq_len {args.seq_len}, "
        f"best of {args.repeats}"
    )
    print(f"{'':<28}{'seconds':>9}{'tokens/s':>13}{'MB/s':>8}{'x raw':>8}{'x raw/worker':>14}")
    for label, seconds, workers in rows:
        ratio = raw_s / seconds
        per_worker = f"{ratio / int(workers):.2f}" if workers else ""
        print(
            f"{label:<28}{seconds:>9.2f}{tokens / seconds:>13,.0f}{text_mb / seconds:>8.2f}"
            f"{ratio:>8.2f}{per_worker:>14}"
        )


if __name__ == "__main__":  # guarded: prepare's spawned workers import this module
    main()
