"""Integrity of data end to end (#13 §1): shard hashes written by prepare and checked by the reader,
a decompressed-shard cache that cannot serve a stale copy, stats.json checked against index.json,
an empty prepare that fails instead of publishing nothing, and errors from loader workers that reach
the user as one plain line. Real shards (streaming's MDSWriter), real processes, no mocks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard

from ettin.config import load_config, to_yaml
from ettin.data.collate import step_hash
from ettin.data.ledger import CONFIG_FILE, Ledger, replay
from ettin.data.loader import DataPipeline, RankSteps, build_loader
from ettin.data.manifest import build_manifest
from ettin.data.mds import DataError, MDSSource
from ettin.data.prepare import prepare
from ettin.errors import run_reporting
from ettin.testing import synthetic_corpus, write_mds_source

from conftest import TOKENIZER_STATS, VOCAB, Source, write_sources
from conftest import write_experiment as experiment_file

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    paths = [os.environ.get("PYTHONPATH", ""), str(REPO / "src"), str(REPO)]  # this process's first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a run that exited 2 (warnings about unchecked sources aside)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def index_of(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def token_spans(raw: bytes) -> list[tuple[int, int]]:
    """Per sample of a raw MDS shard (columns id, input_ids), the byte range of its token ids: the
    last column, so the sample's last ``4 * tokens`` bytes (read from the ndarray's 1-d header)."""
    count = int.from_bytes(raw[:4], "little")
    offsets = np.frombuffer(raw[4 : 8 + 4 * count], "<u4").astype(int)
    spans = []
    for begin, end in zip(offsets[:-1], offsets[1:]):
        id_size, ids_size = np.frombuffer(raw[begin : begin + 8], "<u4").astype(int)
        header = raw[begin + 8 + id_size]
        shape_bytes = (header >> 2) * (1 << (header & 3))
        spans.append((begin + 8 + id_size + 1 + shape_bytes, end))
    return spans


def bent_shard(zipped: Path) -> tuple[bytes, int]:
    """The bytes of a zstd shard with one bit flipped such that it still decompresses, to the same
    length, and only token ids change: a size check cannot see it. Also the first shard-local
    sample whose tokens changed."""
    data = zipped.read_bytes()
    raw = zstandard.ZstdDecompressor().decompress(data)
    spans = token_spans(raw)
    for pos in range(len(data) - 4, 16, -1):  # from the end: the last samples' literals
        bent = bytearray(data)
        bent[pos] ^= 0x01
        try:
            out = zstandard.ZstdDecompressor().decompress(bytes(bent))
        except zstandard.ZstdError:
            continue
        if len(out) != len(raw) or out == raw:
            continue
        diff = np.flatnonzero(np.frombuffer(out, np.uint8) != np.frombuffer(raw, np.uint8))
        inside = [[a <= d < b for a, b in spans] for d in diff]
        if all(any(row) for row in inside):
            return bytes(bent), min(row.index(True) for row in inside)
    raise AssertionError(f"no single-bit flip of {zipped} decompresses cleanly")


def flip_one_byte(path: Path, mask: int = 0x10) -> None:
    """Same length, one byte changed, in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= mask
    path.write_bytes(bytes(data))


def write_experiment(tmp_path: Path, root: Path, source: str) -> Path:
    """tmp_path/exp.yaml: a CLM run over the one source ``source`` under ``root``, its cache in tmp_path."""
    return experiment_file(
        tmp_path / "exp.yaml", root, [Source(source, weight=1)], objective="clm", cache_dir=tmp_path / "cache"
    )


# ----------------------------------------------------------------------------- prepare writes hashes


def write_docs(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = "alpha beta gamma delta shard token model reads writes".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))


def test_prepare_records_shard_hashes_and_the_reader_checks_each_shard_once(
    tmp_path, tokenizer_path, capfd, monkeypatch
):
    write_docs(tmp_path / "docs.jsonl", 60, seed=1)
    out = tmp_path / "out"
    prepare([tmp_path / "docs.jsonl"], out, tokenizer_path, seq_len=256, shard_size=4096)
    index = index_of(out)
    assert len(index["shards"]) > 2
    for shard in index["shards"]:  # both files, as streaming records them, and true to the bytes
        assert shard["hashes"] == ["xxh3_64"]
        zipped = (out / shard["zip_data"]["basename"]).read_bytes()
        assert shard["zip_data"]["hashes"]["xxh3_64"] == xxhash.xxh3_64(zipped).hexdigest()
        raw = zstandard.ZstdDecompressor().decompress(zipped)
        assert shard["raw_data"]["hashes"]["xxh3_64"] == xxhash.xxh3_64(raw).hexdigest()

    import ettin.data.mds as mds

    hashed = []  # every hash the reader computes, by file: a spy around the real functions
    real_bytes, real_file = mds.digest_bytes, mds.digest_file
    monkeypatch.setattr(mds, "digest_bytes", lambda algo, data: hashed.append(algo) or real_bytes(algo, data))
    monkeypatch.setattr(mds, "digest_file", lambda algo, path: hashed.append(path.name) or real_file(algo, path))
    src = MDSSource(out, tmp_path / "cache")
    for _ in range(3):  # every sample, three times over: each shard is hashed when it is first filled, only
        src.input_ids_many(np.arange(len(src)))
    assert len(hashed) == 2 * len(src.shards)  # compressed + decompressed, once each
    hashed.clear()
    again = MDSSource(out, tmp_path / "cache")  # another process finds the filled cache: one raw hash per shard
    again.input_ids_many(np.arange(len(again)))
    again.input_ids_many(np.arange(len(again)))
    assert len(hashed) == len(src.shards)
    assert "warning" not in capfd.readouterr().err  # a hashed source says nothing

    # an edited shard (same length) is refused, naming the shard and its source
    victim = out / src.shards[1].zip_name
    flip_one_byte(victim)
    fresh = MDSSource(out, tmp_path / "cache")
    with pytest.raises(DataError) as caught:
        fresh.input_ids(int(fresh.offsets[1]))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and str(victim) in message and f"{out}/index.json" in message


def test_a_bit_flip_that_still_decompresses_to_the_same_length_is_refused(tmp_path):
    samples = synthetic_corpus(60, VOCAB, seed=4)
    write_mds_source(tmp_path / "s", samples, size_limit=1 << 12)
    src = MDSSource(tmp_path / "s", tmp_path / "cache")
    victim = tmp_path / "s" / src.shards[0].zip_name
    bent, j = bent_shard(victim)
    victim.write_bytes(bent)
    with pytest.raises(
        DataError,
        match=rf"^{victim}: contents do not match the xxh3_64 hash in "
        rf"{tmp_path / 's'}/index\.json \(source {tmp_path / 's'}\);",
    ):
        MDSSource(tmp_path / "s", tmp_path / "cache").input_ids(j)
    # the same kind of flip in a source without hashes is read without a word: only a ledger can tell
    write_mds_source(tmp_path / "bare", samples, size_limit=1 << 12, hashes=())
    bare = tmp_path / "bare" / src.shards[0].zip_name
    bent, j = bent_shard(bare)
    bare.write_bytes(bent)
    assert MDSSource(tmp_path / "bare", tmp_path / "cache").input_ids(j).tolist() != samples[j]


def test_a_source_without_hashes_is_said_to_be_unchecked_once(tmp_path, capfd):
    write_mds_source(tmp_path / "bare", synthetic_corpus(30, VOCAB, seed=5), hashes=())
    for _ in range(3):
        src = MDSSource(tmp_path / "bare", tmp_path / "cache")
        assert src.input_ids(0).tolist() == synthetic_corpus(30, VOCAB, 5)[0]
    err = capfd.readouterr().err.splitlines()
    assert err == [
        f"warning: {tmp_path / 'bare'}/index.json records no hashes for its shards: their integrity "
        "is unchecked (prepare writes them)"
    ]


def test_inspect_checks_every_shard_and_stats_json(tmp_path, tokenizer_path, capsys):
    from data_tools.inspect import main

    write_docs(tmp_path / "docs.jsonl", 40, seed=2)
    out = tmp_path / "out"
    stats = prepare([tmp_path / "docs.jsonl"], out, tokenizer_path, seq_len=256, shard_size=4096)
    assert main([str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"hashes   {2 * stats['shards']} shard files match their xxh3_64 hashes in index.json" in printed
    assert "warning" not in printed
    (out / "stats.json").write_text(json.dumps({**stats, "tokens": stats["tokens"] + 1}))
    assert main([str(out), "-q"]) == 0
    assert (
        f"warning: stats.json says tokens {stats['tokens'] + 1}, the shards hold {stats['tokens']:,}"
        in capsys.readouterr().out
    )
    victim = out / index_of(out)["shards"][-1]["zip_data"]["basename"]
    flip_one_byte(victim)
    assert main([str(out), "-q"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {victim}: contents do not match the xxh3_64 hash in {out}/index.json; the shard is corrupt or "
        "was changed after it was written: restore it"
    ]


# ----------------------------------------------------------------------------- the cache, through replay


def make_run(tmp_path: Path, hashes: tuple[str, ...]) -> tuple[Path, dict]:
    """One zstd source (40 samples, several shards) read 12 samples a step, and a checkpoint whose
    ledger covers steps 0..5 as the trainer writes it. Returns the checkpoint and, per sample index,
    the steps that read it."""
    root = tmp_path / "data"
    write_sources(root, [Source("only", 40, seed=6, size_limit=1 << 11, hashes=hashes)])
    cfg = load_config(str(write_experiment(tmp_path, root, "only")), [])
    pipeline = DataPipeline.from_config(cfg)
    ledger, readers = Ledger.for_pipeline(pipeline, cfg), {}
    for step in range(6):
        start, end = pipeline.schedule.bounds(step)
        batch = pipeline.batch(start, end)
        ledger.record(step, start, end, batch.num_tokens, step_hash(batch.digests))
        for row in pipeline.samples(start, end):
            readers.setdefault(row["sample_index"], []).append(step)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000006"
    ckpt.mkdir(parents=True)
    (ckpt / CONFIG_FILE).write_text(to_yaml(cfg))
    (ckpt / "state.json").write_text(json.dumps({"step": 6}))
    ledger.flush(ckpt)
    return ckpt, readers


@pytest.mark.slow
def test_replay_after_editing_a_shard_is_never_served_from_the_stale_cache(tmp_path):
    """Without hashes the cache is the only line of defence: a shard edited after one replay must be
    decompressed again, so that the ledger's hash sees the change."""
    ckpt, readers = make_run(tmp_path, hashes=())
    src = MDSSource(tmp_path / "data" / "only")
    victim = tmp_path / "data" / "only" / src.shards[1].zip_name
    bent, j = bent_shard(victim)
    step = readers[int(src.offsets[1]) + j][0]
    assert replay(ckpt, step)["match"]  # decompresses the shard into the run's cache
    victim.write_bytes(bent)  # same length, same inode: only its mtime tells
    again = run_cli("ettin.cli", "replay", str(ckpt), "--step", str(step))
    assert again.returncode == 1 and "-> MISMATCH" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
def test_replay_after_editing_a_hashed_shard_names_the_shard(tmp_path):
    ckpt, readers = make_run(tmp_path, hashes=("xxh3_64",))
    src = MDSSource(tmp_path / "data" / "only")
    step = readers[int(src.offsets[2])][0]  # a step that reads shard 2
    assert replay(ckpt, step)["match"]  # fills the cache
    victim = tmp_path / "data" / "only" / src.shards[2].zip_name
    flip_one_byte(victim)
    line = error_line(run_cli("ettin.cli", "replay", str(ckpt), "--step", str(step)))
    assert line.startswith(
        f"error: {victim}: contents do not match the xxh3_64 hash in {tmp_path / 'data' / 'only'}/index.json"
    ), line


# ----------------------------------------------------------------------------- stats.json against index.json


def test_stats_json_must_agree_with_index_json(tmp_path):
    write_mds_source(tmp_path / "s", synthetic_corpus(50, VOCAB, seed=7), stats=TOKENIZER_STATS)
    src = MDSSource(tmp_path / "s")
    stats_file = tmp_path / "s" / "stats.json"
    stats = {**json.loads(stats_file.read_text()), "shards": len(src.shards)}
    data_cfg = load_config(str(write_experiment(tmp_path, tmp_path, "s")), []).data

    def load(**changes):
        stats_file.write_text(json.dumps({**stats, **changes}))
        return build_manifest(data_cfg, 128)[0].sources[0]

    def refused(what: str, **changes) -> None:
        with pytest.raises(DataError) as caught:
            load(**changes)
        message = str(caught.value)
        assert message.startswith(f"{stats_file} and {tmp_path / 's'}/index.json disagree: {what}"), message
        assert len(message.splitlines()) == 1

    assert load().tokens == stats["tokens"]  # as written: they agree
    refused("49 samples (chunks) against 50 in the shards", chunks=49)
    refused(f"{len(src.shards) + 1} shards against {len(src.shards)}", shards=len(src.shards) + 1)
    most = src.max_tokens()  # what the shards' bytes can hold, at 4 bytes a token
    assert stats["tokens"] <= most < sum(s.raw_bytes for s in src.shards) // 4
    assert load(tokens=most).tokens == most  # the bound itself is allowed
    refused(f"{most + 1} tokens, but the shards'", tokens=most + 1)


# ----------------------------------------------------------------------------- an empty prepare fails


def test_prepare_of_nothing_usable_exits_2_and_leaves_nothing_that_looks_finished(tmp_path, tokenizer_path, capsys):
    from data_tools.prepare import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert main([str(empty), "--out", str(out), "--tokenizer", str(tokenizer_path), "-q"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: no usable documents in empty.jsonl: 0 records read, 0 skipped (invalid_json 0, missing_text 0, "
        "non_utf8 0, empty_text 0); nothing was written"
    ]
    assert not out.exists()  # prepare made it, prepare took it away

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "  "}\n{oops\n{"body": "no text"}\n{"text": ""}\n')
    out.mkdir()  # a folder that was there stays, empty
    assert main([str(bad), "--out", str(out), "--tokenizer", str(tokenizer_path), "-q"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "error: no usable documents in bad.jsonl: 4 records read, 4 skipped (invalid_json 1, "
        "missing_text 1, non_utf8 0, empty_text 2); first: invalid_json at bad.jsonl:2: "
    ), line
    assert list(out.iterdir()) == []  # no index.json, no stats.json, no staging folder

    good = tmp_path / "good.jsonl"  # --overwrite keeps the old dataset until the new one exists
    good.write_text('{"text": "hello there, a document"}\n')
    assert main([str(good), "--out", str(out), "--tokenizer", str(tokenizer_path), "-q"]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    assert main([str(bad), "--out", str(out), "--tokenizer", str(tokenizer_path), "-q", "--overwrite"]) == 2
    assert "no usable documents in bad.jsonl" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before, "a failed --overwrite lost the old dataset"


# ----------------------------------------------------------------------------- errors from loader workers


def test_a_data_error_in_a_loader_worker_reaches_the_user_as_one_plain_line(tmp_path, capsys):
    ckpt, _ = make_run(tmp_path, hashes=("xxh3_64",))
    cfg = load_config(str(ckpt / CONFIG_FILE), [])
    src = MDSSource(tmp_path / "data" / "only")
    for shard in src.shards:  # every shard edited: whatever step 0 reads is refused
        flip_one_byte(tmp_path / "data" / "only" / shard.zip_name)
    pipeline = DataPipeline.from_config(cfg, cache_dir=str(tmp_path / "cold"))
    with pytest.raises(DataError) as direct:  # what the main process says
        pipeline.batch(*pipeline.schedule.bounds(0))
    expected = str(direct.value)
    assert expected.startswith(f"{tmp_path / 'data' / 'only'}/shard.") and len(expected.splitlines()) == 1

    loader = build_loader(RankSteps(DataPipeline.from_config(cfg, cache_dir=str(tmp_path / "cold2"))), 0, 4, workers=2)
    seen = []

    def first_step():
        try:
            return next(loader)
        except DataError as e:  # re-raised by torch in this process, the worker's traceback in its text
            seen.append(str(e))
            raise

    try:
        assert run_reporting(first_step) == 2  # what every entry point does with an EttinError
    finally:
        # the re-raised exception holds torch's iterator in a reference cycle; stop its workers now
        # rather than whenever the garbage collector finds it (which costs seconds)
        loader._shutdown_workers()
    assert "Original Traceback" in seen[0] and "ettin.data.mds.DataError: " in seen[0]
    assert capsys.readouterr().err.splitlines() == [f"error: {expected}"]
