"""Held-out validation parts of the training sources: a keyed choice the training order never yields."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ettin.config import ConfigError, load_config
from ettin.data.loader import DataPipeline
from ettin.data.order import HeldOut, validation_count
from ettin.testing import run_distributed_test, synthetic_corpus, write_mds_source


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
    code = ("from ettin.data.order import HeldOut, derive_key; import hashlib; "
            "h = HeldOut([10**6], [1000], [derive_key(0, 'web', 10**6, 'validation')]); "
            "print(hashlib.sha256(h.validation[0].tobytes()).hexdigest())")
    from ettin.data.order import HeldOut as H, derive_key
    here = H([10**6], [1000], [derive_key(0, "web", 10**6, "validation")])
    import hashlib
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == hashlib.sha256(here.validation[0].tobytes()).hexdigest()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    tok = {"tokenizer": {"sha256": "t", "vocab_size": 512}}
    write_mds_source(root / "a", synthetic_corpus(150, 512, 1), stats=tok)
    write_mds_source(root / "b", synthetic_corpus(60, 512, 2, 30, 120), compression=None, stats=tok)
    exp = root / "exp.yaml"
    exp.write_text(textwrap.dedent(f"""\
        defaults: {{model: 17m, objective: mlm, phase: pretrain}}
        model: {{vocab_size: 512, hidden_size: 64, intermediate_size: 96, num_heads: 2, num_layers: 2,
                 pad_token_id: 0, cls_token_id: 1, sep_token_id: 2, mask_token_id: 3}}
        phase: {{tokens: 3000, seq_len: 128, checkpoint_every_tokens: 1500}}
        schedule: {{warmup_tokens: 500}}
        batch: {{global_size: 8, micro_tokens: 600}}
        train: {{collective_timeout_s: 60}}
        data:
          root: {root}
          cache_dir: {root / "cache"}
          workers: 0
          validation: 0.1
          sources: [{{name: a, path: a, weight: 2}}, {{name: b, path: b, validation: 7}}]
        """))
    return str(exp)


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


PLAIN_SOURCES = "data.sources=[{name: a, path: a, weight: 2}, {name: b, path: b}]"


def _train(exp, overrides, expect):
    from ettin.train.trainer import train

    assert train(load_config(exp, overrides)) == expect


def _resume_refused(exp, overrides):
    from ettin.train.trainer import train

    with pytest.raises(ConfigError, match="validation"):
        train(load_config(exp, overrides))


def test_a_resume_refuses_a_changed_validation_part(experiment, tmp_path):
    run = f"run_dir={tmp_path / 'run'}"
    run_distributed_test(_train, 1, args=(experiment, [run, "train.max_steps=2"], 0))
    run_distributed_test(_resume_refused, 1, args=(experiment, [run, "data.validation=0.2"]))
    run_distributed_test(_resume_refused, 1, args=(experiment, [run, "data.validation=0", PLAIN_SOURCES]))
    run_distributed_test(_resume_refused, 1, args=(experiment, [run, "eval.seed=1"]))


def test_validation_settings_are_checked(experiment):
    with pytest.raises(ConfigError, match=r"data.validation must be a fraction in \(0, 1\), a whole count"):
        load_config(experiment, ["data.validation=2.5"])
    with pytest.raises(Exception, match="leaves none of its 60 samples"):
        DataPipeline.from_config(load_config(experiment, [PLAIN_SOURCES.replace("path: b}", "path: b, validation: 60}")]))
