"""data_tools prepare / train-tokenizer / inspect, on real files, real shards and real processes.

Shards are read back through streaming's StreamingDataset with the output directory as its
*remote* and a scratch *local*, so reading never decompresses into (changes) the checked output.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ettin.data.inputs import InputError, find_inputs
from ettin.data.prepare import STAGING_DIR, PrepareError, chunk_document, plan_chunks, prepare
from ettin.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

from conftest import WORDS, make_text

REPO = Path(__file__).resolve().parents[1]
CLS, SEP = 1, 2


def text_of_tokens(tokenizer, rng: random.Random, at_least: int) -> str:
    """The shortest random text of at least ``at_least`` tokens (word-aligned, so a few more)."""
    words = [rng.choice(WORDS) for _ in range(at_least)]  # every word is at least one token
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=False).ids) >= at_least:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


def write_jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record))
            f.write("\n")


def child_env() -> dict:
    """This process's environment for a child, REPO on its path after any PYTHONPATH already set
    (a worktree's src/ must win over an installed copy)."""
    paths = (os.environ.get("PYTHONPATH"), str(REPO))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_samples(out: Path, scratch: Path) -> list[tuple[str, list[int]]]:
    """(id, input_ids) of every sample, in order, through streaming's StreamingDataset."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    before = sorted(p.name for p in out.iterdir())
    dataset = StreamingDataset(
        remote=str(out), local=str(scratch / f"local-{uuid.uuid4().hex}"), shuffle=False, batch_size=1
    )
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(s["input_ids"].dtype.name == "uint32" for s in samples)
    del dataset
    assert sorted(p.name for p in out.iterdir()) == before, "reading changed the output directory"
    return [(s["id"], s["input_ids"].tolist()) for s in samples]


def expected_samples(tokenizer, docs: list[tuple[str, str]], seq_len: int):
    """What prepare must write for (doc id, text) documents: encode, chunk_document, ids."""
    samples = []
    for doc_id, text in docs:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        samples += [(f"{doc_id}#{k}", chunk) for k, chunk in enumerate(chunk_document(ids, seq_len, CLS, SEP))]
    return samples


def dir_bytes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):  # tokenizer_path: conftest.py's session tokenizer
    return load_tokenizer(tokenizer_path)


# ---------------------------------------------------------------------------------------------
# Chunking on hand-made token lists


@pytest.mark.parametrize(
    "seq_len, n, spans, dropped, moved",
    [
        # one piece, however short: a document's first chunk is always kept
        (1024, 1, [(0, 1)], 0, 0),
        (1024, 127, [(0, 127)], 0, 0),
        (1024, 1022, [(0, 1022)], 0, 0),
        # full pieces of seq_len - 2; a tail of >= 512 stays as it is
        (1024, 2044, [(0, 1022), (1022, 2044)], 0, 0),
        (1024, 2044 + 600, [(0, 1022), (1022, 2044), (2044, 2644)], 0, 0),
        (1024, 1022 + 512, [(0, 1022), (1022, 1534)], 0, 0),
        # a tail under 128 is dropped
        (1024, 1022 + 127, [(0, 1022)], 127, 0),
        (1024, 2044 + 1, [(0, 1022), (1022, 2044)], 1, 0),
        # a tail of 128..511 takes tokens from the end of the piece before, up to 512
        (1024, 1022 + 128, [(0, 638), (638, 1150)], 0, 384),
        (1024, 1022 + 300, [(0, 810), (810, 1322)], 0, 212),
        (1024, 2044 + 511, [(0, 1022), (1022, 2043), (2043, 2555)], 0, 1),
        # seq_len 7999: pieces of 7997
        (7999, 7997, [(0, 7997)], 0, 0),
        (7999, 7997 * 2 + 100, [(0, 7997), (7997, 15994)], 100, 0),
        (7999, 7997 + 200, [(0, 7685), (7685, 8197)], 0, 312),
        (7999, 7997 + 4000, [(0, 7997), (7997, 11997)], 0, 0),
        # seq_len 256 (tiny.yaml): back-filling would leave the piece before under 512: no back-fill
        (256, 254 + 200, [(0, 254), (254, 454)], 0, 0),
        (256, 254 + 100, [(0, 254)], 100, 0),
    ],
)
def test_plan_chunks(seq_len, n, spans, dropped, moved):
    plan = plan_chunks(n, seq_len)
    assert (plan.spans, plan.dropped_tokens, plan.moved_tokens) == (spans, dropped, moved)


@pytest.mark.parametrize("seq_len", [1024, 7999, 256])
@pytest.mark.parametrize("n", [0, 1, 100, 127, 128, 1000, 1022, 1023, 1150, 1400, 2044, 2100, 2600, 8100, 16000, 20000])
def test_chunk_document_wraps_and_keeps_every_kept_token_once(seq_len, n):
    tokens = [10 + i for i in range(n)]  # distinct, so duplicates and reorderings would show
    chunks = chunk_document(tokens, seq_len, CLS, SEP)
    plan = plan_chunks(n, seq_len)
    assert len(chunks) == len(plan.spans) and (chunks == []) == (n == 0)
    for chunk in chunks:
        assert chunk[0] == CLS and chunk[-1] == SEP and len(chunk) <= seq_len
        assert CLS not in chunk[1:-1] and SEP not in chunk[1:-1]
    for k, chunk in enumerate(chunks):
        if k > 0:  # only a first chunk may be under 128 tokens
            assert len(chunk) - 2 >= 128
        if k < len(chunks) - 1:  # only a tail may be short; a back-fill leaves >= 512 before it
            assert len(chunk) - 2 >= min(512, seq_len - 2)
    body = [t for chunk in chunks for t in chunk[1:-1]]
    assert body == tokens[: len(body)], "tokens duplicated, reordered or skipped"
    assert len(body) + plan.dropped_tokens == n
    if seq_len >= 1024 and len(chunks) > 1:
        assert len(chunks[-1]) - 2 >= 512  # a kept tail is back-filled to at least 512


def test_chunk_document_uses_the_given_specials():
    assert chunk_document([7, 8, 9], 1024, 50281, 50282) == [[50281, 7, 8, 9, 50282]]
    assert chunk_document([], 1024, CLS, SEP) == []


def test_seq_len_below_130_is_refused():
    with pytest.raises(PrepareError, match="seq_len 129"):
        plan_chunks(10, 129)


# ---------------------------------------------------------------------------------------------
# Every input format, read back from the shards


def test_every_input_format_round_trips(tmp_path, tokenizer, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(1)
    corpus, notes = tmp_path / "corpus", tmp_path / "notes"
    (corpus / "sub").mkdir(parents=True)
    (notes / "deep").mkdir(parents=True)
    docs = {}  # input name -> [(doc id, text)]

    def texts(k):  # lengths that give one chunk, a dropped tail, a back-filled tail, several
        return [make_text(rng, rng.choice([3, 200, 700, 1300, 2500])) for _ in range(k)]

    # 1022 + ~60 tokens: the tail is dropped; 1022 + ~300: the tail is back-filled to 512
    a = texts(4) + [text_of_tokens(tokenizer, rng, 1022 + 60), text_of_tokens(tokenizer, rng, 1322)]
    write_jsonl(corpus / "a.jsonl", [{"text": t, "id": f"doc-{i}"} if i % 2 else {"text": t} for i, t in enumerate(a)])
    docs["corpus/a.jsonl"] = [(f"doc-{i}" if i % 2 else f"corpus/a.jsonl:{i + 1}", t) for i, t in enumerate(a)]
    b = texts(4)
    write_jsonl(corpus / "sub" / "b.jsonl.gz", [{"text": t} for t in b], opener=gzip.open)
    docs["corpus/sub/b.jsonl.gz"] = [(f"corpus/sub/b.jsonl.gz:{i + 1}", t) for i, t in enumerate(b)]
    c = texts(4)
    frames = [
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in half).encode())
        for half in (c[:2], c[2:])
    ]
    (corpus / "c.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as `cat` makes them
    docs["corpus/c.jsonl.zst"] = [(f"corpus/c.jsonl.zst:{i + 1}", t) for i, t in enumerate(c)]
    d = texts(5)
    pq.write_table(pa.table({"text": d, "id": ["p0", None, "p2", "p3", "p4"]}), corpus / "d.parquet", row_group_size=2)
    docs["corpus/d.parquet"] = [(f"corpus/d.parquet:{i + 1}" if i == 1 else f"p{i}", t) for i, t in enumerate(d)]
    e = texts(1)[0]
    (corpus / "e.txt").write_text(e)
    docs["corpus/e.txt"] = [("corpus/e.txt", e)]
    (corpus / "ignored.csv").write_text("not an input format\n")
    (corpus / ".hidden.jsonl").write_text('{"text": "hidden files are skipped"}\n')
    f, g = texts(2)
    (notes / "README").write_text(f)
    (notes / "deep" / "code.py").write_text(g)
    docs["notes/README"] = [("notes/README", f)]
    docs["notes/deep/code.py"] = [("notes/deep/code.py", g)]

    out = tmp_path / "out"
    stats = prepare([corpus], out, tokenizer_path, plain_text=[notes], seq_len=1024)
    names = [s["name"] for s in stats["inputs"]]
    assert names == sorted(docs)
    want = expected_samples(tokenizer, [doc for name in names for doc in docs[name]], 1024)
    got = read_samples(out, tmp_path)
    assert [i for i, _ in got] == [i for i, _ in want]
    assert got == want

    # --text-field names another field (here a parquet column) and ids follow the file name
    body = texts(2)
    pq.write_table(pa.table({"body": body}), tmp_path / "other.parquet")
    prepare([tmp_path / "other.parquet"], tmp_path / "out-body", tokenizer_path, text_field="body", seq_len=7999)
    assert read_samples(tmp_path / "out-body", tmp_path) == expected_samples(
        tokenizer, [(f"other.parquet:{i + 1}", t) for i, t in enumerate(body)], 7999
    )

    assert {p.name for p in out.iterdir()} == {"index.json", "stats.json", "shard.00000.mds.zstd"}
    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["chunks"] == len(want) and stats["tokens"] == sum(len(s) for _, s in want)
    assert stats["dropped_chunks"] >= 1 and stats["moved_tokens"] >= 200  # both rules ran
    assert stats["bad_records_total"] == 0 and stats["documents"] == 22
    assert stats["seq_len"] == 1024 and (stats["cls_id"], stats["sep_id"]) == (CLS, SEP)
    assert stats["tokenizer"] == {
        "sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
        "vocab_size": tokenizer.get_vocab_size(),
    }


def test_input_names_must_be_unique(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="would both be named 'a.jsonl'"):
        find_inputs([tmp_path / "x" / "a.jsonl", tmp_path / "y" / "a.jsonl"])
    found = find_inputs([tmp_path / "y", tmp_path / "x"])
    assert [s.name for s in found] == ["x/a.jsonl", "y/a.jsonl"]


# ---------------------------------------------------------------------------------------------
# Determinism across workers, and resuming a killed run


def write_corpus(directory: Path, files: int, docs_per_file: int, seed: int) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for f in range(files):
        write_jsonl(
            directory / f"part-{f:03d}.jsonl",
            [{"text": make_text(rng, rng.choice([5, 150, 900, 1600]))} for _ in range(docs_per_file)],
        )


def test_output_is_identical_for_1_and_3_workers(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", files=7, docs_per_file=12, seed=2)
    runs = {}
    for workers in (1, 3):
        out = tmp_path / f"out-{workers}"
        prepare([tmp_path / "corpus"], out, tokenizer_path, workers=workers, shard_size="32kb")
        runs[workers] = dir_bytes(out)
    assert runs[1] == runs[3]
    assert sum(name.startswith("shard.") for name in runs[1]) > 3  # several shards to compare


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(tmp_path, tokenizer_path):
    # Enough text for the worker to take a second or more, so that the kill lands mid-run.
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=24, docs_per_file=12, seed=3)
    reference = tmp_path / "reference"
    prepare([corpus], reference, tokenizer_path, shard_size="64kb")

    out = tmp_path / "out"
    staging = out / STAGING_DIR
    args = [
        "data_tools",
        "prepare",
        str(corpus),
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer_path),
        "--shard-size",
        "64kb",
        "--quiet",
    ]
    env = child_env()

    def parts() -> list[str]:
        return [p.name for p in staging.glob("*") if re.fullmatch(r"[0-9a-f]{16}", p.name)]

    def start_and_kill(ready) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[1].decode()
        proc.send_signal(signal.SIGKILL)  # the main process only: its workers must die with it
        proc.wait()

    # 1. Killed while tokenizing: some files have finished parts, others not.
    start_and_kill(lambda: len(parts()) >= 1)
    done_after_kill = len(parts())
    assert 1 <= done_after_kill < 24, done_after_kill
    assert not (out / "stats.json").exists()

    # A different setting must not be resumed into the half-finished run.
    changed = r"unfinished run with other settings \(seq_len 1024 -> 512\)"
    with pytest.raises(PrepareError, match=changed):
        prepare([corpus], out, tokenizer_path, shard_size="64kb", seq_len=512)

    # 2. Killed again once shards are being written: all parts are kept, the shards redone.
    start_and_kill(lambda: any(staging.glob("merged-*.tmp/shard.*")))
    assert len(parts()) >= done_after_kill

    # 3. Finished by a third run, which reports what it reused.
    finished = run_cli(*args)
    assert finished.returncode == 0, finished.stderr
    match = re.search(r"resuming: (\d+) of 24 input files already tokenized", finished.stdout)
    assert match and int(match.group(1)) >= done_after_kill, finished.stdout
    assert not staging.exists()
    assert dir_bytes(out) == dir_bytes(reference)


# ---------------------------------------------------------------------------------------------
# Bad records and errors


def test_bad_records_are_counted_and_reported(tmp_path, tokenizer_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.prepare import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(
        b"\n".join(
            [
                b'{"text": "fine document one"}',
                b'{"text": "unterminated',  # 2 invalid_json
                b'{"body": "no text field"}',  # 3 missing_text
                b'{"text": "caf\xe9 latin-1"}',  # 4 non_utf8
                b'{"text": "   "}',  # 5 empty_text
                b"",  # 6 blank: skipped silently
                b'["an", "array"]',  # 7 missing_text
                b'{"text": 42}',  # 8 missing_text
                b'{"text": "lone \\ud800 surrogate"}',  # 9 non_utf8
                b'{"text": ""}',  # 10 empty_text
                b'{"text": "fine document two"}',
            ]
        )
        + b"\n"
    )
    write_jsonl(corpus / "b.jsonl.gz", ['{"text": "ok"}', "{oops"], opener=gzip.open)
    pq.write_table(pa.table({"text": ["ok", None, ""]}), corpus / "c.parquet")
    (corpus / "d.txt").write_bytes(b"line one\nline two \xff\xfe\n")
    (corpus / "e.txt").write_bytes(b"")

    out = tmp_path / "out"
    assert main([str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_path), "-q"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    examples = {
        kind: [(e["file"], e["line"]) for e in entry["examples"]] for kind, entry in stats["bad_records"].items()
    }
    assert examples == {
        "invalid_json": [("corpus/a.jsonl", 2), ("corpus/b.jsonl.gz", 2)],
        "missing_text": [("corpus/a.jsonl", 3), ("corpus/a.jsonl", 7), ("corpus/a.jsonl", 8), ("corpus/c.parquet", 2)],
        "non_utf8": [("corpus/a.jsonl", 4), ("corpus/a.jsonl", 9), ("corpus/d.txt", 2)],
        "empty_text": [("corpus/a.jsonl", 5), ("corpus/a.jsonl", 10), ("corpus/c.parquet", 3), ("corpus/e.txt", 1)],
    }
    assert {k: v["count"] for k, v in stats["bad_records"].items()} == {
        "invalid_json": 2,
        "missing_text": 4,
        "non_utf8": 3,
        "empty_text": 4,
    }
    assert stats["bad_records_total"] == 13 and stats["documents"] == 4
    assert [s["bad_records"] for s in stats["inputs"]] == [8, 1, 2, 1, 1]
    printed = capsys.readouterr().out
    assert "skipped 13 bad records: invalid_json 2, missing_text 4, non_utf8 3, empty_text 4" in printed
    assert "invalid_json: corpus/a.jsonl:2:" in printed and "non_utf8: corpus/d.txt:2:" in printed
    ids = [i for i, _ in read_samples(out, tmp_path)]
    assert ids == ["corpus/a.jsonl:1#0", "corpus/a.jsonl:11#0", "corpus/b.jsonl.gz:1#0", "corpus/c.parquet:1#0"]


def test_unreadable_file_stops_the_run_and_a_rerun_without_it_reuses_the_rest(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", files=3, docs_per_file=4, seed=6)
    truncated = gzip.compress((tmp_path / "corpus" / "part-000.jsonl").read_bytes())[:-40]
    (tmp_path / "corpus" / "part-001.jsonl.gz").write_bytes(truncated)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"cannot read input .*part-001\.jsonl\.gz"):
        prepare([tmp_path / "corpus"], out, tokenizer_path, workers=2)
    assert (out / STAGING_DIR).is_dir() and not (out / "stats.json").exists()

    (tmp_path / "corpus" / "part-001.jsonl.gz").unlink()
    messages = []
    prepare([tmp_path / "corpus"], out, tokenizer_path, log=messages.append)
    assert messages and messages[0].startswith("resuming: ") and " of 3 input files" in messages[0]
    prepare([tmp_path / "corpus"], tmp_path / "fresh", tokenizer_path)
    assert dir_bytes(out) == dir_bytes(tmp_path / "fresh")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_missing_input_and_bad_tokenizer_are_one_line_errors(tmp_path, tokenizer_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    prepare([good], out, tokenizer_path)
    finished = dir_bytes(out)

    line = one_error_line(
        run_cli(
            "data_tools",
            "prepare",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(out),
            "--tokenizer",
            str(tokenizer_path),
        )
    )
    assert "missing.jsonl does not exist" in line
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{ not a tokenizer")
    for bad in (garbage, tmp_path / "nowhere.json"):
        line = one_error_line(
            run_cli("data_tools", "prepare", str(good), "--out", str(out), "--tokenizer", str(bad), "--overwrite")
        )
        assert str(bad) in line
    line = one_error_line(
        run_cli("data_tools", "prepare", str(good), "--out", str(out), "--tokenizer", str(tokenizer_path))
    )
    assert "already holds a finished dataset" in line and "--overwrite" in line
    assert dir_bytes(out) == finished, "a failed run changed an existing dataset"
    assert not (tmp_path / "missing.jsonl").exists()

    stats = prepare([good, good], out, tokenizer_path, overwrite=True, seq_len=512)
    assert stats["seq_len"] == 512 and len(stats["inputs"]) == 1


# ---------------------------------------------------------------------------------------------
# train-tokenizer, inspect, --help


def test_train_tokenizer_is_deterministic_with_specials_first(tmp_path):
    rng = random.Random(5)
    write_jsonl(tmp_path / "a.jsonl", [{"text": make_text(rng, 300)} for _ in range(30)])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.rst").write_text(make_text(rng, 500))
    shas = []
    for name in ("one.json", "two.json"):
        result = run_cli(
            "data_tools",
            "train-tokenizer",
            str(tmp_path / "a.jsonl"),
            "--plain-text",
            str(tmp_path / "docs"),
            "--vocab-size",
            "320",
            "--out",
            str(tmp_path / name),
            "-q",
        )
        assert result.returncode == 0, result.stderr
        assert "trained on 31 documents" in result.stdout
        shas.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert shas[0] == shas[1]
    tok = load_tokenizer(tmp_path / "one.json")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() == 320
    assert tok.encode("the model").ids[0] == 1 and tok.encode("the model").ids[-1] == 2
    text = "naïve café 数据 — def return"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    one_error_line(
        run_cli(
            "data_tools",
            "train-tokenizer",
            str(tmp_path / "a.jsonl"),
            "--vocab-size",
            "100",
            "--out",
            str(tmp_path / "small.json"),
        )
    )


def test_inspect_prints_the_summary(tmp_path, tokenizer_path, capsys):
    from data_tools.inspect import main

    write_corpus(tmp_path / "corpus", files=2, docs_per_file=10, seed=4)
    out = tmp_path / "out"
    stats = prepare([tmp_path / "corpus"], out, tokenizer_path, shard_size="16kb")
    before = dir_bytes(out)
    assert main([str(out), "--tokenizer", str(tokenizer_path), "--decode", "2", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"shards   {stats['shards']} " in printed and stats["shards"] > 1
    assert f"samples  {stats['chunks']:,}" in printed
    assert f"tokens   {stats['tokens']:,}" in printed
    assert "sample lengths (tokens)" in printed and re.search(r"512-1023 +\d", printed)
    assert "stats.json" in printed and "bad records: none" in printed
    first = json.loads((tmp_path / "corpus" / "part-000.jsonl").read_text().splitlines()[0])
    assert "sample 0: id 'corpus/part-000.jsonl:1#0'" in printed
    assert "[CLS]" + first["text"][:60] in printed.replace("\n  ", "\n")
    assert "sample 1:" in printed and "sample 2:" not in printed
    assert dir_bytes(out) == before, "inspect wrote into the dataset"
    assert main([str(tmp_path / "corpus"), "-q"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize(
    "command",
    [
        ["data_tools", "--help"],
        ["data_tools", "prepare", "--help"],
        ["data_tools", "train-tokenizer", "--help"],
        ["data_tools", "inspect", "--help"],
        ["data_tools.prepare", "--help"],
        ["data_tools.train_tokenizer", "--help"],
        ["data_tools.inspect", "--help"],
    ],
)
def test_help(command):
    result = run_cli(*command)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_unknown_tool_is_an_error():
    assert "unknown tool 'prep'" in one_error_line(run_cli("data_tools", "prep"))


# ---------------------------------------------------------------------------------------------
# ettin data …: the same handlers behind the ettin command line


def run_ettin_data(argv: list[str]) -> int:
    """What the ettin command line does with ``ettin data …`` (ettin.cli wires add_data_parser)."""
    import argparse

    from ettin.data.commands import add_data_parser
    from ettin.errors import run_reporting

    parser = argparse.ArgumentParser(prog="ettin")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return run_reporting(lambda: args.func(args))


def test_ettin_data_runs_the_same_tools(tmp_path, tokenizer_path, capsys):
    from data_tools.prepare import main

    write_corpus(tmp_path / "corpus", files=3, docs_per_file=6, seed=8)
    common = [str(tmp_path / "corpus"), "--tokenizer", str(tokenizer_path), "--shard-size", "16kb", "-q"]
    assert main([*common, "--out", str(tmp_path / "tools")]) == 0
    tools = capsys.readouterr().out
    assert run_ettin_data(["prepare", *common, "--out", str(tmp_path / "ettin")]) == 0
    ettin = capsys.readouterr().out
    assert dir_bytes(tmp_path / "ettin") == dir_bytes(tmp_path / "tools")
    assert (
        tools.replace(str(tmp_path / "tools"), "OUT").splitlines()[:-1]
        == ettin.replace(str(tmp_path / "ettin"), "OUT").splitlines()[:-1]
    )  # not "done in"

    assert run_ettin_data(["inspect", str(tmp_path / "ettin"), "-q"]) == 0
    assert "samples  " in capsys.readouterr().out
    assert (
        run_ettin_data(
            [
                "prepare",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "x"),
                "--tokenizer",
                str(tokenizer_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.jsonl" in err[0]


@pytest.mark.slow
def test_ettin_data_prepare_reports_ctrl_c_as_resumable(tmp_path, tokenizer_path):
    """A real SIGINT to `ettin data prepare` mid-run: one line saying how to resume, exit 130, and the
    rerun finishes what the first run left."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=24, docs_per_file=12, seed=3)
    out = tmp_path / "out"
    args = ["ettin.cli", "data", "prepare", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", *args, "--quiet"],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not any((out / STAGING_DIR).glob("*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.communicate()[1].decode()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert err.decode().splitlines()[-1] == "error: interrupted; rerun the same command to resume"
    assert not (out / "stats.json").exists()
    finished = run_cli(*args, "--quiet")
    assert finished.returncode == 0, finished.stderr
    assert (out / "stats.json").is_file()
