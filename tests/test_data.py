"""Data pipeline on real MDS shards: reading, the global order, schedules, collation, loader, ledger."""

import json
import logging
import multiprocessing
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from ettin.config import IGNORE, load_config, to_yaml
from ettin.data.collate import Collator, step_hash, token_budget_cut
from ettin.data.ledger import CONFIG_FILE, Ledger, read_ledger, replay
from ettin.data.loader import DataPipeline, RankSteps, build_loader
from ettin.data.manifest import build_manifest
from ettin.data.mds import DataError, MDSSource
from ettin.data.order import GlobalOrder, derive_key, permute
from ettin.data.schedule import BatchSchedule
from ettin.errors import EttinError
from ettin.testing import synthetic_corpus, write_mds_source

from conftest import Source

VOCAB = 512


@pytest.fixture(scope="module")
def corpus(tiny_corpus):
    """Two real MDS sources (zstd with shard hashes, raw without) and an experiment file that mixes
    them 3:1 by tokens (the default phase, schedule and batch of conftest.write_experiment)."""
    return tiny_corpus(
        Source("alpha", 300, seed=1, weight=3),
        Source("beta", 120, seed=2, min_len=30, max_len=120, compression=None, hashes=(), weight=1),
        data={"mixture_block": 16, "shuffle_block": 32},
    )


def cfg_of(corpus, *overrides):
    return load_config(corpus["exp"], list(overrides))


def test_reads_back_what_streaming_wrote(corpus):
    for name in ("alpha", "beta"):
        src = MDSSource(corpus["root"] / name, corpus["root"] / "cache")
        assert len(src) == len(corpus[name]) and len(src.shards) > 1
        for i in (0, 7, len(src) - 1):
            row = src[i]
            assert row["input_ids"].dtype == np.uint32 and row["input_ids"].tolist() == corpus[name][i]
            assert src.input_ids(i).tolist() == corpus[name][i]  # the loader's decoder-free path
            assert row["id"] == f"doc{i}#0"
        picks = np.random.default_rng(3).permutation(len(src))  # across shards, in any order, repeats
        picks = np.concatenate([picks, picks[:5]])
        assert [x.tolist() for x in src.input_ids_many(picks)] == [corpus[name][i] for i in picks]
        with pytest.raises(IndexError, match=f"sample {len(src)} out of range"):
            src.input_ids_many(np.array([0, len(src)]))


def test_missing_and_corrupt_shards_are_named(tmp_path):
    # without hashes: the reader's own checks are all an unhashed (released) source has
    write_mds_source(tmp_path / "s", synthetic_corpus(50, VOCAB, 3), compression=None, size_limit=1 << 10, hashes=())
    src = MDSSource(tmp_path / "s")
    victim = tmp_path / "s" / src.shards[1].raw_name
    data = victim.read_bytes()
    first = int.from_bytes(data[4:8], "little")  # where sample 0 begins: its column sizes (id, input_ids)
    for offset, value in ((4, 1 << 30), (first + 4, 1 << 20)):  # a sample offset; a column size
        bent = bytearray(data)  # same size, so only the reader's own checks can notice
        bent[offset : offset + 4] = int(value).to_bytes(4, "little")
        victim.write_bytes(bytes(bent))
        with pytest.raises(DataError, match=f"{victim.name}: sample 0 of this shard is corrupt"):
            MDSSource(tmp_path / "s").input_ids(int(src.offsets[1]))
    victim.write_bytes(data[:-3])
    with pytest.raises(DataError, match=f"{victim.name}: .* bytes, index.json says"):
        MDSSource(tmp_path / "s")[src.offsets[1]]
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim.name}: missing shard listed in index.json"):
        MDSSource(tmp_path / "s")[src.offsets[1]]
    with pytest.raises(DataError, match="no index.json"):
        MDSSource(tmp_path)


def test_manifest_errors_name_the_source(corpus, tmp_path):
    cfg = cfg_of(corpus)
    cfg.data.sources[1].path = "nope"
    with pytest.raises(DataError, match=r"data.sources\[1\] \(beta\): .*nope does not exist"):
        build_manifest(cfg.data, 128)
    cfg.data.sources = []
    with pytest.raises(DataError, match="data.sources is empty"):
        build_manifest(cfg.data, 128)
    with pytest.raises(Exception, match="weight must be positive"):
        cfg_of(corpus, "data.sources=[{name: a, path: alpha, weight: 0}]")


def test_fingerprint_covers_shards_seq_len_and_tokenizer(corpus, tmp_path):
    cfg = cfg_of(corpus)
    base = build_manifest(cfg.data, 128)[0].fingerprint()
    assert build_manifest(cfg.data, 128)[0].fingerprint() == base
    assert build_manifest(cfg.data, 256)[0].fingerprint() != base
    cfg.data.sources[0].weight = 2
    assert build_manifest(cfg.data, 128)[0].fingerprint() != base
    write_mds_source(
        tmp_path / "alpha", corpus["alpha"][:-1], stats={"tokenizer": {"sha256": "t", "vocab_size": VOCAB}}
    )
    cfg = cfg_of(
        corpus,
        f"data.sources=[{{name: alpha, path: {tmp_path / 'alpha'}, weight: 3}}, {{name: beta, path: beta, weight: 1}}]",
    )
    assert build_manifest(cfg.data, 128)[0].fingerprint() != base


# ----------------------------------------------------------------------------- the order


def test_permute_is_a_bijection_for_awkward_sizes():
    for n in (1, 2, 3, 17, 1000, 4097):
        out = permute(np.arange(n), n, key=9)
        assert sorted(out.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, 1), permute(np.arange(100), 100, 2))


def test_every_sample_appears_once_per_epoch():
    order = GlobalOrder([97, 40, 13], [5, 2, 1], seed=4, block=32, shuffle_block=16)
    sources, indices = order(0, 3000)
    for s, m in enumerate([97, 40, 13]):
        drawn = indices[sources == s]
        for epoch in range(len(drawn) // m):
            assert sorted(drawn[epoch * m : (epoch + 1) * m].tolist()) == list(range(m))
        assert not np.array_equal(drawn[:m], drawn[m : 2 * m])  # each epoch reshuffles


def test_the_mixture_holds_in_every_window():
    shares = [837.2, 356.6, 263.9, 80.3, 57.3, 28.0, 19.6, 16.6, 12.7, 12.6, 7.3, 7.3, 5.3]
    order = GlobalOrder([10**6] * len(shares), shares, seed=21, block=8192)
    sources, _ = order(0, 8192 * 6)
    expected = np.array(shares) / sum(shares)
    for window in (512, 4608, 8192):
        for start in range(0, len(sources) - window, 3001):  # windows that straddle blocks too
            counts = np.bincount(sources[start : start + window], minlength=len(shares))
            assert np.all(np.abs(counts - expected * window) <= 3), (window, counts - expected * window)


def test_order_is_a_pure_function_of_its_inputs():
    args = ([1000, 300], [2.0, 1.0], 21)
    a, b = GlobalOrder(*args)(0, 5000), GlobalOrder(*args)(0, 5000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    pieces = [GlobalOrder(*args)(s, s + 333) for s in range(0, 4995, 333)]
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), a[1][:4995])
    assert not np.array_equal(GlobalOrder([1000, 300], [2.0, 1.0], 22)(0, 5000)[1], a[1])  # seed
    assert not np.array_equal(GlobalOrder([1001, 300], [2.0, 1.0], 21)(0, 5000)[1], a[1])  # manifest
    code = (
        "from ettin.data.order import GlobalOrder; import hashlib; s, i = GlobalOrder([1000, 300], [2.0, 1.0], 21)(0, 5000); "
        "print(hashlib.sha256(s.tobytes() + i.tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert other == hashlib.sha256(a[0].tobytes() + a[1].tobytes()).hexdigest()


def test_memory_does_not_grow_with_the_dataset():
    shares = [837.2, 356.6, 263.9, 80.3, 57.3, 28.0, 19.6, 16.6, 12.7, 12.6, 7.3, 7.3, 5.3]
    peaks = {}
    for total in (2 * 10**6, 2 * 10**9):
        order = GlobalOrder([total // len(shares)] * len(shares), shares, seed=21)
        tracemalloc.start()
        for position in (0, total // 2, total - 5000):
            order(position, position + 4608)
        peaks[total] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[2 * 10**9] < 1.5 * peaks[2 * 10**6] + 1e6, peaks


# ----------------------------------------------------------------------------- schedule


def test_batch_warmup_covers_positions_without_gap_or_overlap():
    s = BatchSchedule(global_size=4608, warmup_samples=20_000, start_size=96, stages=8)
    sizes, expected_start = [], 0
    for step in range(200):
        start, end = s.bounds(step)
        assert start == expected_start and end - start == s.size(step)
        assert s.step_at(start) == step and s.step_at(end - 1) == step
        expected_start = end
        sizes.append(end - start)
    assert sizes[0] == 96 and sizes[-1] == 4608 and sizes == sorted(sizes)
    for world in (1, 2, 3, 4):
        slices = [s.rank_bounds(7, r, world) for r in range(world)]
        assert slices[0][0] == s.bounds(7)[0] and slices[-1][1] == s.bounds(7)[1]
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))


# ----------------------------------------------------------------------------- collation


def test_mlm_masks_are_keyed_by_position_and_follow_80_10_10():
    c = Collator("mlm", seed=21, vocab_size=VOCAB, cls_id=1, sep_id=2, pad_id=0, mask_id=3, mask_rate=0.3)
    ids = np.array([1, *np.random.default_rng(0).integers(5, VOCAB, 20000), 2], dtype=np.uint32)
    x1, y1 = c.sample(ids, 77)
    x2, y2 = c.sample(ids, 77)
    x3, _ = c.sample(ids, 78)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    chosen = y1 != IGNORE
    assert chosen.mean() == pytest.approx(0.3, abs=0.015)
    assert not chosen[0] and not chosen[-1]  # [CLS] and [SEP] never masked
    assert np.array_equal(y1[chosen], ids[chosen].astype(np.int64))
    masked, same = (x1[chosen] == 3).mean(), (x1[chosen] == ids[chosen]).mean()
    assert masked == pytest.approx(0.8, abs=0.02) and same == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.02)
    assert np.array_equal(x1[~chosen], ids[~chosen].astype(np.int64))


def reference_mlm(ids, positions, cu, seed, rate, vocab, p_mask, p_random, specials=(1, 2, 0), mask_id=3):
    """The masking rule written the slow, obvious way: splitmix64 of (p << 24 | j) + key per token."""
    key, m64 = derive_key(seed, "mlm"), (1 << 64) - 1
    inputs, labels = ids.astype(np.int64), np.full(len(ids), IGNORE)
    for d, p in enumerate(positions):
        for t in range(cu[d], cu[d + 1]):
            z = (((p << 24) | (t - cu[d])) + key) & m64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
            z ^= z >> 31
            choose, action = (z & 0xFFFFF) / 2**20, ((z >> 20) & 0xFFFFF) / 2**20
            if choose < rate and ids[t] not in specials:
                labels[t] = ids[t]
                if action < p_mask:
                    inputs[t] = mask_id
                elif action < p_mask + p_random:
                    inputs[t] = ((z >> 40) * vocab) >> 24
    return inputs, labels


@pytest.mark.parametrize(
    "seed,rate,p_mask,p_random", [(21, 0.3, 0.8, 0.1), (7, 0.15, 1 / 3, 0.1 + 0.2), (2**40 + 3, 0.05, 0.5, 0.5)]
)
def test_mlm_kernel_matches_the_written_rule(seed, rate, p_mask, p_random):
    rng = np.random.default_rng(seed % 1000)
    docs = [np.array([1, *rng.integers(0, VOCAB, n), 2], dtype=np.uint32) for n in (0, 1, 300, 1500)]
    positions = [0, 5, 2**35 + 1, 2**36 - 1]
    batch = Collator("mlm", seed, VOCAB, 1, 2, 0, 3, rate, p_mask, p_random)(docs, positions)
    inputs, labels = reference_mlm(
        np.concatenate(docs), positions, batch.cu_seqlens.tolist(), seed, rate, VOCAB, p_mask, p_random
    )
    assert batch.input_ids.tolist() == inputs.tolist() and batch.labels.tolist() == labels.tolist()
    assert (batch.labels != IGNORE).any()


def test_clm_labels_stay_inside_each_document():
    c = Collator("clm", seed=21, vocab_size=VOCAB, cls_id=1, sep_id=2, pad_id=0, mask_id=3)
    docs = [np.array([1, 10, 11, 12, 2]), np.array([1, 20, 21, 2]), np.array([1, 30, 31])]
    batch = c(docs, [5, 6, 7])
    assert batch.input_ids.tolist() == [1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 31]  # stored as is: nothing added
    # the stored trailing [SEP] is each document's last target; no label crosses a boundary
    assert batch.labels.tolist() == [10, 11, 12, 2, IGNORE, 20, 21, 2, IGNORE, 30, 31, IGNORE]
    assert batch.cu_seqlens.tolist() == [0, 5, 9, 12] and batch.max_seqlen == 5
    assert batch.num_labels == sum(len(d) - 1 for d in docs)


# ----------------------------------------------------------------------------- loader


def global_batches(cfg, dp_size, workers, steps=range(0, 5), budget=100):
    """Concatenate every rank's micro-batches per step, in rank order (padded with empty ones)."""
    pipeline = DataPipeline.from_config(cfg)
    out = {}
    for rank in range(dp_size):
        ds = RankSteps(pipeline, rank, dp_size)
        for step, batch in build_loader(ds, steps.start, steps.stop, workers=workers, prefetch=2):
            micro = [m for m in batch.micro_batches(budget) if m.docs.total]
            assert all(m.docs.total <= budget or len(m.docs.bounds) == 2 for m in micro)
            out.setdefault(step, {})[rank] = (micro, batch.digests)
    result = {}
    for step, ranks in out.items():
        micro = [m for r in sorted(ranks) for m in ranks[r][0]]
        result[step] = (
            torch.cat([m.input_ids for m in micro]),
            torch.cat([m.labels for m in micro]),
            step_hash([d for r in sorted(ranks) for d in ranks[r][1]]),
        )
    return result


def test_token_budget_cut_by_hand():
    #            lengths: 3  4  10 2  2  1
    bounds = [0, 3, 7, 17, 19, 21, 22]
    assert token_budget_cut(bounds, 7) == [(0, 2), (2, 3), (3, 6)]  # the 10-token document gets its own
    assert token_budget_cut(bounds, 6) == [(0, 1), (1, 2), (2, 3), (3, 6)]
    assert token_budget_cut(bounds, 100) == [(0, 6)]
    assert token_budget_cut(bounds, 1) == [(d, d + 1) for d in range(6)]
    assert token_budget_cut([0], 5) == []
    with pytest.raises(ValueError, match="positive"):
        token_budget_cut(bounds, 0)


def test_micro_batches_keep_every_token_and_label_in_order(corpus):
    batch = DataPipeline.from_config(cfg_of(corpus)).batch(0, 12)
    for budget in (1, 37, 120, 10**6):
        runs = len(token_budget_cut(batch.bounds, budget))
        micro = batch.micro_batches(budget, count=20)
        real, fillers = micro[:runs], micro[runs:]
        assert len(micro) == 20 and all(m.label_index.numel() == 0 and m.labels.tolist() == [IGNORE] for m in fillers)
        assert torch.equal(torch.cat([m.input_ids for m in real]), batch.input_ids.long())
        assert torch.equal(torch.cat([m.labels for m in real]), batch.labels.long())
        starts = np.cumsum([0] + [m.docs.total for m in real])
        assert [int(s) + b for s, m in zip(starts, real) for b in m.docs.bounds[1:]] == batch.bounds[1:]
        assert torch.equal(torch.cat([m.label_index + int(s) for s, m in zip(starts, real)]), batch.label_index())
        for m in real:
            assert m.docs.cu_seqlens.tolist() == list(m.docs.bounds) and m.docs.total == m.input_ids.numel()
            assert torch.equal(m.label_index, torch.nonzero(m.labels != IGNORE).squeeze(1))
            assert m.docs.total <= budget or len(m.docs.bounds) == 2
            assert m.docs.max_seqlen == max(np.diff(m.docs.bounds))


@pytest.mark.slow
def test_same_global_batches_at_any_dp_size_and_worker_count(corpus):
    cfg = cfg_of(corpus, "batch.global_size=10")
    ref = global_batches(cfg, dp_size=1, workers=0)
    for dp, workers, budget in [(2, 0, 100), (4, 1, 7), (2, 2, 10_000), (1, 2, 64)]:
        got = global_batches(cfg, dp, workers, budget=budget)
        assert got.keys() == ref.keys()
        for step in ref:
            assert torch.equal(got[step][0], ref[step][0]) and torch.equal(got[step][1], ref[step][1])
            assert got[step][2] == ref[step][2]
    # more ranks than samples: empty ranks and empty trailing micro-batches, also through workers
    tiny = cfg_of(corpus, "batch.global_size=3")
    ref = global_batches(tiny, dp_size=1, workers=0, steps=range(0, 3))
    got = global_batches(tiny, dp_size=4, workers=2, steps=range(0, 3))
    assert all(torch.equal(got[s][0], ref[s][0]) and got[s][2] == ref[s][2] for s in ref)


def test_resume_seeks_directly_to_a_step(corpus):
    cfg = cfg_of(corpus)
    full = global_batches(cfg, 1, 0, range(0, 8))
    resumed = global_batches(cfg, 1, 0, range(5, 8))
    assert all(resumed[s][2] == full[s][2] for s in range(5, 8))


def test_the_mixture_reaches_the_loader(corpus):
    pipeline = DataPipeline.from_config(cfg_of(corpus))
    rows = pipeline.samples(0, 4000)
    tokens = {"alpha": 0, "beta": 0}
    for r in rows:
        tokens[r["source"]] += len(r["input_ids"])
    assert tokens["alpha"] / tokens["beta"] == pytest.approx(3.0, rel=0.1)  # weights are token shares


# ----------------------------------------------------------------------------- ledger and replay


def write_checkpoint(cfg, path, steps, dp_size=2):
    """What the trainer does: record every step's global hash, flush the window into a checkpoint."""
    pipeline = DataPipeline.from_config(cfg)
    ledger = Ledger.for_pipeline(pipeline, cfg)
    batches = global_batches(cfg, dp_size, 0, steps)
    for step in steps:
        start, end = pipeline.schedule.bounds(step)
        ledger.record(step, start, end, int(batches[step][0].numel()), batches[step][2])
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text(to_yaml(cfg))
    (path / "state.json").write_text(json.dumps({"step": steps.stop}))  # marks the folder complete
    ledger.flush(path)


def test_replay_reproduces_the_ledger_and_catches_a_tampered_shard(corpus, tmp_path):
    cfg = cfg_of(corpus)
    ckpt = tmp_path / "step_000006"
    write_checkpoint(cfg, ckpt, range(0, 6))
    header, entries = read_ledger(ckpt)
    assert [e.step for e in entries] == list(range(6)) and header["fingerprint"]
    for step in (0, 3, 5):
        result = replay(ckpt, step)
        assert result["match"] and result["fingerprint_ok"], result
    # tamper with one token of a sample that step 2 reads, in the (raw, uncompressed) beta source
    pipeline = result["pipeline"]
    rows = [r for r in pipeline.samples(*pipeline.schedule.bounds(2)) if r["source"] == "beta"]
    src = pipeline.readers[1]
    k, j = src.locate(rows[0]["sample_index"])
    shard = src.shard_file(k)
    data = bytearray(shard.read_bytes())
    begin, end = np.frombuffer(bytes(data[4 + 4 * j : 12 + 4 * j]), np.uint32)
    data[end - 8] ^= 0xFF  # flip bits inside that sample's token ids
    shard.write_bytes(bytes(data))
    try:
        assert not replay(ckpt, 2)["match"]
        ledger = json.loads((ckpt / "ledger.json").read_text())  # a ledger from another digest is named, not "mismatch"
        ledger["header"]["sample_digest"] = "sha256"
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "ledger.json").write_text(json.dumps(ledger))
        with pytest.raises(EttinError, match="digests samples with sha256"):
            replay(tmp_path / "other", 2)
        assert replay(ckpt, 0)["match"] == all(
            r["source"] != "beta" or r["sample_index"] != rows[0]["sample_index"]
            for r in pipeline.samples(*pipeline.schedule.bounds(0))
        )
    finally:
        data[end - 8] ^= 0xFF
        shard.write_bytes(bytes(data))


@pytest.mark.slow
def test_cli_data_order_show_replay_and_export(corpus, tmp_path):
    cfg = cfg_of(corpus)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    write_checkpoint(cfg, ckpt, range(0, 4))
    run = lambda *a: subprocess.run([sys.executable, "-m", "ettin.cli", *a], capture_output=True, text=True)  # noqa: E731
    show = run("data-order", "show", corpus["exp"], "--steps", "2:4")
    assert show.returncode == 0, show.stderr
    assert "step 2" in show.stdout and "step 3" in show.stdout and "alpha" in show.stdout
    rep = run("replay", str(ckpt), "--step", "3")
    assert rep.returncode == 0 and "MATCH" in rep.stdout, rep.stdout + rep.stderr
    bad = run("replay", str(ckpt), "--step", "9")
    assert bad.returncode == 2 and "step 9 is not in" in bad.stderr
    out = tmp_path / "order"
    exp = run("data-order", "export", str(tmp_path / "run"), "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out / "checkpoint_000001" / "samples.parquet").to_pydict()
    assert sorted(set(table["step"])) == [0, 1, 2, 3] and len(table["step"]) == 4 * cfg.batch.global_size
    pipeline = DataPipeline.from_config(cfg)
    first = pipeline.samples(0, 1)[0]
    assert table["input_ids"][0] == first["input_ids"].tolist() and table["id"][0] == first["id"]
    assert json.loads((ckpt / "ledger.json").read_text())["header"]["phase"] == "pretrain"


# ----------------------------------------------------------------------------- remote sources


@pytest.fixture
def s3_bucket(monkeypatch):
    """A local S3-compatible server (moto's; no object store is reachable here) and a bucket on it;
    the client side is the real thing: boto3 through streaming's S3Downloader, over HTTP."""
    import boto3
    from moto.server import ThreadedMotoServer

    from ettin.parallel import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="corpus")
    yield client
    server.stop()


def read_source(path, cache):
    src = MDSSource(path, cache)
    return [x.tolist() for x in src.input_ids_many(np.arange(len(src)))]


@pytest.mark.slow
def test_remote_sources_read_through_the_cache(corpus, s3_bucket, tmp_path):
    for name in ("alpha", "beta"):  # zstd and raw shards
        for f in (corpus["root"] / name).iterdir():
            s3_bucket.upload_file(str(f), "corpus", f"mds/{name}/{f.name}")
    remote = cfg_of(corpus, "data.root=s3://corpus/mds", f"data.cache_dir={tmp_path / 'cache'}")
    local, far = DataPipeline.from_config(cfg_of(corpus)), DataPipeline.from_config(remote)
    assert far.manifest.sources[0].path == "s3://corpus/mds/alpha"
    assert far.manifest.fingerprint() == local.manifest.fingerprint()  # same shards, sizes, counts, tokenizer
    for step in range(4):
        bounds = local.schedule.bounds(step)
        assert step_hash(far.batch(*bounds).digests) == step_hash(local.batch(*bounds).digests)
    src = far.readers[0]
    assert [x.tolist() for x in src.input_ids_many(np.arange(len(src)))] == corpus["alpha"]
    assert src[7]["id"] == "doc7#0"
    kept = sorted(p.name for p in src.cache.iterdir() if not p.name.endswith(".lock"))
    copies = [name for name in kept if name.startswith("shard.")]  # raw shards only, named <raw>.<made from>
    assert sorted(set(kept) - set(copies)) == ["index.json", "stats.json"]
    assert [name.rsplit(".", 1)[0] for name in copies] == [s.raw_name for s in src.shards]
    # processes sharing a cold cache (ranks, loader workers): each shard is fetched once, all read it
    gets = []
    handler = logging.Handler()
    handler.emit = lambda record: gets.append(record.getMessage())
    logging.getLogger("werkzeug").addHandler(handler)
    try:
        with multiprocessing.get_context("fork").Pool(4) as pool:
            read = pool.starmap(read_source, [("s3://corpus/mds/alpha", tmp_path / "shared")] * 4)
    finally:
        logging.getLogger("werkzeug").removeHandler(handler)
    assert all(r == corpus["alpha"] for r in read)
    for shard in src.shards:
        assert sum(f"GET /corpus/mds/alpha/{shard.zip_name} " in line for line in gets) == 1, shard.zip_name
    # a shard gone from the bucket: one error naming the remote file (a fresh cache must fetch it)
    s3_bucket.delete_object(Bucket="corpus", Key=f"mds/alpha/{src.shards[1].zip_name}")
    fresh = MDSSource("s3://corpus/mds/alpha", tmp_path / "fresh")
    with pytest.raises(DataError, match=f"s3://corpus/mds/alpha/{src.shards[1].zip_name}: download failed"):
        fresh.input_ids(int(src.offsets[1]))
