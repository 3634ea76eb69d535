"""Held-out validation parts of the training sources: a keyed choice the training order never yields."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from ettin.config import ConfigError, load_config
from ettin.data.loader import DataPipeline
from ettin.data.order import GlobalOrder, HeldOut, validation_count
from ettin.testing import run_distributed_test

from conftest import Source


def test_held_out_choice_and_training_map():
    held = HeldOut([1000, 37, 5], [100, 0, 4], [11, 12, 13])
    for s, (m, v) in enumerate(zip(held.samples, held.counts)):
        val = held.validation[s]
        assert len(val) == len(set(val.tolist())) == v and (val >= 0).all() and (val < m).all()
        train = held.stored_index(s, np.arange(m - v))
        assert (np.diff(train) > 0).all(), "monotone: training reads keep their shard locality"
        assert sorted(train.tolist() + val.tolist()) == list(range(m)), "training and validation split the source"
    assert held.stored_index(1, np.arange(37)).tolist() == list(range(37)), "no validation part: the identity"
    assert held.training_samples() == [900, 37, 1]
    assert [validation_count(x, 1000) for x in (0, 0.05, 0.0001, 7)] == [0, 50, 1, 7]


def test_the_choice_is_the_same_in_another_process():
    code = (
        "from ettin.data.order import HeldOut, derive_key; import hashlib; "
        "h = HeldOut([10**6], [1000], [derive_key(0, 'web', 10**6, 'validation')]); "
        "print(hashlib.sha256(h.validation[0].tobytes()).hexdigest())"
    )
    from ettin.data.order import HeldOut as H
    from ettin.data.order import derive_key

    here = H([10**6], [1000], [derive_key(0, "web", 10**6, "validation")])
    import hashlib

    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == hashlib.sha256(here.validation[0].tobytes()).hexdigest()


@pytest.fixture(scope="module")
def experiment(tiny_corpus):
    """Source a (150 samples) weighted 2, source b (60 longer, raw) holding 7 out; 10% held out by default."""
    return tiny_corpus(
        Source("a", 150, seed=1, weight=2),
        Source("b", 60, seed=2, min_len=30, max_len=120, compression=None, validation=7),
        name="validation",
        phase={"tokens": 3000, "seq_len": 128, "checkpoint_every_tokens": 1500},
        lr_schedule={"warmup_tokens": 500},
        batch={"global_size": 8, "micro_tokens": 600},
        train={"collective_timeout_s": 60},
        data={"workers": 0, "validation": 0.1},
    ).exp


def test_the_training_order_never_yields_a_validation_sample(experiment):
    pipeline = DataPipeline.from_config(load_config(experiment))
    held = pipeline.held_out
    assert held.counts == [15, 7]
    total = sum(held.training_samples())
    seen = {"a": [], "b": []}
    for row in pipeline.samples(0, 3 * total):  # about three epochs of each source
        seen[row["source"]].append(row["sample_index"])
    for s, name in enumerate(["a", "b"]):
        val = set(held.validation[s].tolist())
        assert not val & set(seen[name]), f"source {name}: a validation sample was trained on"
        m = held.training_samples()[s]
        first_epoch = seen[name][:m]
        assert sorted(first_epoch) == sorted(set(range(held.samples[s])) - val), "each training sample once per epoch"
    # a source without a validation part keeps its order exactly
    plain = DataPipeline.from_config(load_config(experiment, ["data.validation=0", PLAIN_SOURCES]))
    assert plain.held_out.counts == [0, 0]
    alone = GlobalOrder([150, 60], plain.manifest.sample_shares(), 21, plain.order.block, plain.order.shuffle_block)
    for got, want in zip(plain.locate(0, 500), alone(0, 500)):
        assert np.array_equal(got, want)


PLAIN_SOURCES = "data.sources=[{name: a, path: a, weight: 2}, {name: b, path: b}]"


def _train(exp, overrides, expect):
    from ettin.train.trainer import train

    assert train(load_config(exp, overrides)) == expect


def _resumes_refused(exp, run_dir, changes):
    from ettin.train.trainer import train

    for change in changes:
        with pytest.raises(ConfigError, match="validation"):
            train(load_config(exp, [f"run_dir={run_dir}", *change]))


@pytest.mark.distributed
def test_a_resume_refuses_a_changed_validation_part(experiment, runs):
    run_distributed_test(
        _resumes_refused,
        1,
        args=(
            experiment,
            str(runs / "clm"),
            [
                ["objective=clm", "data.validation=0.2"],
                ["objective=clm", "data.validation=0", PLAIN_SOURCES],
                ["objective=clm", "eval.seed=1"],
            ],
        ),
    )


def test_validation_settings_are_checked(experiment):
    with pytest.raises(ConfigError, match=r"data.validation must be a fraction in \(0, 1\), a whole count"):
        load_config(experiment, ["data.validation=2.5"])
    with pytest.raises(Exception, match="leaves none of its 60 samples"):
        DataPipeline.from_config(
            load_config(experiment, [PLAIN_SOURCES.replace("path: b}", "path: b, validation: 60}")])
        )


def _eval_to_file(target, out, overrides=(), like=None):
    import json
    from pathlib import Path

    import torch.distributed as dist

    from ettin.train.evaluate import evaluate_checkpoints

    rows = evaluate_checkpoints(target, list(overrides), like=like)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def _scores(row):
    return {k: v for k, v in row.items() if k.startswith("eval/") and not k.endswith(("seconds", "time_fraction"))}


@pytest.fixture(scope="module")
def runs(experiment, tmp_path_factory):
    """The paired models, trained once: the encoder evaluated every 1,000 tokens with an extra set."""
    root = tmp_path_factory.mktemp("runs")
    run_distributed_test(
        _train,
        1,
        args=(
            experiment,
            [f"run_dir={root / 'mlm'}", "eval.every_tokens=1000", "eval.sets.extra=b", "train.log_every=1"],
            0,
        ),
    )
    run_distributed_test(_train, 1, args=(experiment, [f"run_dir={root / 'clm'}", "objective=clm"], 0))
    return root


@pytest.mark.distributed
def test_in_loop_evaluation_and_ettin_eval_agree_for_any_dp_size(runs, tmp_path):
    """In-loop numbers land in metrics.jsonl and the checkpoint; `ettin eval` on that checkpoint
    gives them again on 1 process, and within 1e-6 on 2 DP ranks and on TP 2."""
    import json

    from ettin.train.metrics import read_all_metrics

    run = runs / "mlm"
    rows = [r for r in read_all_metrics(run) if "eval/a/loss" in r]
    assert len(rows) >= 3 and all(0 < r["eval/time_fraction"] < 1 for r in rows)
    first = rows[0]
    assert first["eval/a/labels"] > 0 and 0 <= first["eval/a/accuracy"] <= 1
    assert first["eval/a/perplexity"] == pytest.approx(np.exp(first["eval/a/loss"]))
    assert first["eval/total/loss"] == pytest.approx(
        sum(first[f"eval/{s}/loss"] * first[f"eval/{s}/labels"] for s in ("a", "b", "extra"))
        / first["eval/total/labels"],
        rel=1e-12,
    )
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    saved = json.loads((ckpt / "state.json").read_text())["eval"]
    assert _scores(saved) == _scores(rows[-1])

    for world, tp in ((1, 1), (2, 1), (2, 2)):  # one process, DP 2, TP 2
        out = tmp_path / f"eval{world}{tp}.json"
        run_distributed_test(_eval_to_file, world, args=(str(ckpt), str(out), (f"parallel.tensor={tp}",)))
        (again,) = json.loads(out.read_text())
        for key, value in _scores(saved).items():
            assert again[key] == pytest.approx(value, rel=1e-6 if world > 1 else 1e-12), (world, tp, key)


@pytest.mark.distributed
def test_ettin_eval_on_a_run_writes_a_table_and_a_plot_and_compares_runs(runs, tmp_path, capsys):
    from ettin.cli import main

    assert main(["eval", str(runs / "clm"), "--sets", "a", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| step | tokens | a loss | a acc |" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"eval.csv", "eval.md", "eval.png"}
    assert len((tmp_path / "eval.csv").read_text().splitlines()) == 1 + 2  # two checkpoints
    assert main(["eval", "--compare", str(runs / "mlm"), str(runs / "clm")]) == 0
    table = capsys.readouterr().out
    assert "a: validation loss (accuracy)" in table and "| tokens | mlm | clm |" in table
    assert main(["eval", str(runs / "clm"), "--sets", "nope"]) == 2
    assert "--sets nope: not among this run's sets (a, b)" in capsys.readouterr().err
    _destroy_groups()  # `ettin eval` ran in this process


def _destroy_groups():
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
def test_an_exported_model_scores_through_transformers_what_the_checkpoint_scored(runs, tmp_path):
    """`ettin eval HF_DIR --like RUN`: the released format, loaded by transformers, on the run's sets."""
    import json

    from ettin.cli import main

    for objective in ("mlm", "clm"):
        ckpt = sorted((runs / objective / "checkpoints").iterdir())[-1]
        saved = json.loads((ckpt / "state.json").read_text())["eval"]
        assert main(["hf", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / f"hf-{objective}")]) == 0
        out = tmp_path / f"hf-{objective}.json"
        run_distributed_test(_eval_to_file, 1, args=(str(tmp_path / f"hf-{objective}"), str(out), (), str(ckpt)))
        (got,) = json.loads(out.read_text())
        for key, value in _scores(saved).items():
            assert got[key] == pytest.approx(value, rel=1e-5), (objective, key)


def test_validation_masks_are_keyed_by_set_and_sample_never_by_step_or_phase_seed(experiment):
    from ettin.train.evaluate import Evaluator, eval_sets

    def inputs(overrides):
        cfg = load_config(experiment, overrides)
        pipeline = DataPipeline.from_config(cfg)
        (a, b) = eval_sets(cfg, pipeline)
        evaluator = Evaluator(cfg, [a, b], 600, torch.device("cpu"))
        return evaluator.collators["a"](a.reader.input_ids_many(a.indices), a.indices.tolist()).tokens

    first = inputs([])
    assert torch.equal(first, inputs(["phase.seed=99"])), "the phase seed (and so the step) does not move them"
    assert (first[1] != -100).sum() > 0
    assert not torch.equal(first, inputs(["eval.seed=1"])), "eval.seed does (it also picks other samples)"
