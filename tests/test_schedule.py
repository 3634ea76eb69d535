"""The batch-size ramp counted in real tokens: the mixture's mean tokens per sample, the ramp's
boundaries as a pure function, the constant in the ledger's order key, and a resume that refuses
data with another mean. Recipe values of the ramp per size and phase are pinned here too."""

import json
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest

from ettin.config import load_config
from ettin.data.ledger import Ledger, order_key
from ettin.data.loader import DataPipeline
from ettin.data.manifest import Manifest, SourceEntry
from ettin.data.schedule import BatchSchedule, warmup_samples
from ettin.testing import write_mds_source

VOCAB = 512
SHORT, LONG = 30, 80  # tokens per sample of the two sources


def _samples(n: int, length: int, first: int) -> list[list[int]]:
    """``n`` samples of exactly ``length`` tokens, [CLS] ... [SEP] (ids >= 5 are ordinary)."""
    return [[1, *(5 + (first + i + j) % (VOCAB - 5) for j in range(length - 2)), 2] for i in range(n)]


def _write_corpus(root):
    tok = {"tokenizer": {"sha256": "t", "vocab_size": VOCAB}}
    write_mds_source(root / "short", _samples(60, SHORT, 0), stats=tok)
    write_mds_source(root / "long", _samples(40, LONG, 7), compression=None, stats=tok)
    exp = root / "exp.yaml"
    exp.write_text(
        textwrap.dedent(f"""\
        defaults: {{model: 17m, objective: mlm, phase: pretrain}}
        model: {{vocab_size: {VOCAB}, hidden_size: 32, intermediate_size: 48, num_heads: 2, num_layers: 1,
                 pad_token_id: 0, cls_token_id: 1, sep_token_id: 2, mask_token_id: 3}}
        phase: {{tokens: 20000, seq_len: 128, checkpoint_every_tokens: 1e9}}
        lr_schedule: {{warmup_tokens: 1000}}
        batch: {{global_size: 20, micro_tokens: 400, warmup_tokens: 4000, warmup_start_size: 4, warmup_stages: 2}}
        train: {{log_every: 1000, collective_timeout_s: 60}}
        data:
          root: {root}
          cache_dir: {root / "cache"}
          workers: 0
          mixture_block: 10
          shuffle_block: 16
          sources: [{{name: short, path: short, weight: 3}}, {{name: long, path: long, weight: 2}}]
        """)
    )
    return str(exp)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Weights 3 : 2 by tokens over samples of 30 and 80 tokens: sample shares 3/30 : 2/80 = 4 : 1,
    so the mixture's mean is (3 + 2) / (3/30 + 2/80) = 40 tokens per sample (by hand)."""
    return _write_corpus(tmp_path_factory.mktemp("schedule"))


def test_mean_tokens_per_sample_by_hand():
    def manifest(*sources):
        return Manifest([SourceEntry(f"s{i}", "", w, n, t, []) for i, (w, n, t) in enumerate(sources)], 128, {})

    assert manifest((3.0, 60, 60 * SHORT), (2.0, 40, 40 * LONG)).mean_tokens_per_sample() == 40.0
    # 1 : 1 by tokens over 10 and 100 tokens per sample: 2 / (1/10 + 1/100) = 200/11, rounded to 6 decimals
    mean = manifest((1.0, 5, 50), (1.0, 3, 300)).mean_tokens_per_sample()
    assert mean == 18.181818 == float(round(Fraction(200, 11), 6))
    assert json.loads(json.dumps(mean)) == mean  # survives the checkpoint's JSON bit for bit
    assert manifest((3.0, 60, None), (2.0, 40, None)).mean_tokens_per_sample() is None  # no stats.json counts


def test_the_ramp_is_counted_in_real_tokens(corpus):
    cfg = load_config(corpus)
    pipeline = DataPipeline.from_config(cfg)
    s = pipeline.schedule
    assert s.tokens_per_sample == 40.0 and s.warmup_samples == 100  # 4000 tokens / 40
    # by hand: two stages of 50 samples at 4 and 12 sequences: 13 steps of 4, then 5 of 12, then 20 from step 18
    assert s.ramp() == [(4, 0, 13, 0), (12, 13, 5, 52)]
    assert [s.size(k) for k in (0, 12, 13, 17, 18)] == [4, 4, 12, 12, 20] and s.bounds(18) == (112, 132)
    ramp_tokens = sum(len(r["input_ids"]) for r in pipeline.samples(0, s.warmup_samples))
    assert abs(ramp_tokens - 4000) <= 3 * LONG  # the mixture holds to a few samples in any window
    # counted at seq_len per sample (a plan without data), the same ramp ends after a third of its tokens
    by_seq_len = BatchSchedule.from_config(cfg)
    assert by_seq_len.tokens_per_sample == 128 and by_seq_len.warmup_samples == 32  # ceil(4000 / 128)
    assert sum(len(r["input_ids"]) for r in pipeline.samples(0, 32)) < 4000 / 2
    assert warmup_samples(10_000_000_000, 7999) == 1_250_157  # exact: ceil, not a float quotient


def test_ramp_boundaries_are_a_pure_function(corpus):
    """The same boundaries however the run is laid out: DP size, workers, micro-batches, TP."""
    base = DataPipeline.from_config(load_config(corpus)).schedule
    for overrides in (["data.workers=2"], ["batch.micro_tokens=9000"], ["parallel.tensor=2"]):
        assert DataPipeline.from_config(load_config(corpus, overrides)).schedule == base
    assert BatchSchedule.from_config(load_config(corpus), 40.0) == base  # nothing but the constant comes from the data
    position = 0
    for step in range(25):
        start, end = base.bounds(step)
        assert start == position and base.step_at(start) == base.step_at(end - 1) == step
        for world in (1, 2, 3, 5, 8):  # ranks tile the global batch, whatever their number
            slices = [base.rank_bounds(step, r, world) for r in range(world)]
            assert slices[0][0] == start and slices[-1][1] == end
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        position = end


def test_the_order_key_carries_the_constant(corpus):
    cfg = load_config(corpus)
    pipeline = DataPipeline.from_config(cfg)
    key = Ledger.for_pipeline(pipeline, cfg).header["order"]
    assert key["warmup_tokens_per_sample"] == 40.0 and key["warmup_samples"] == 100
    assert key == order_key(cfg, pipeline.schedule)
    flat = load_config(corpus, ["batch.warmup_tokens=0"])  # no ramp: the data's mean decides nothing
    assert order_key(flat, DataPipeline.from_config(flat).schedule)["warmup_tokens_per_sample"] is None


def _train(exp, run_dir, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "ettin.cli", "train", exp, f"run_dir={run_dir}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_resume_with_another_mean_is_refused(tmp_path):
    exp = _write_corpus(tmp_path)
    run = tmp_path / "run"
    first = _train(exp, run, "train.max_steps=1")
    assert first.returncode == 0, first.stdout + first.stderr
    stats = tmp_path / "long" / "stats.json"  # the same shards, recounted: the mixture's mean moves
    body = json.loads(stats.read_text())
    stats.write_text(json.dumps(body | {"tokens": body["tokens"] // 2}))  # still within what the shards hold
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    proc = _train(exp, run, "train.max_steps=2", "data.allow_fingerprint_change=true")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "would change which samples each step sees" in errors[0], proc.stderr
    assert "'warmup_tokens_per_sample': (40.0, " in errors[0]


# ----------------------------------------------------------------------------- the recipe's ramps

# Ettin's first batch: one micro-batch on each of 4 GPUs (device_train_microbatch_size x 4) of the
# published pretraining configs (144, 128, 96, 72, 48, 24) and cross-train configs (12, 12, 8, 12, 4, 2)
START = {"17m": (576, 48), "32m": (512, 48), "68m": (384, 32), "150m": (288, 48), "400m": (192, 16), "1b": (96, 8)}
PRETRAIN_RAMP = {"17m": 125e9, "32m": 100e9, "68m": 75e9, "150m": 50e9, "400m": 10e9, "1b": 3e9}


@pytest.mark.parametrize("size", list(START))
def test_recipe_ramps_per_size_and_phase(size):
    for phase, tokens, start in (
        ("pretrain", PRETRAIN_RAMP[size], START[size][0]),
        ("extension", 0, None),
        ("decay", 0, None),
        ("cross", 10e9, START[size][1]),
    ):
        cfg = load_config("ettin", [f"model={size}", f"phase={phase}"])
        assert cfg.batch.warmup_tokens == tokens and cfg.batch.global_size == 4608, (size, phase)
        if start:
            assert cfg.batch.warmup_start_size == start, (size, phase)
