"""Configs: every preset resolves to RECIPE.md's numbers; every mistake is one clear error."""

import subprocess
import sys

import pytest

from ettin.config import ConfigError, list_configs, load_config

SIZES = ["17m", "32m", "68m", "150m", "400m", "1b"]
PHASES = ["pretrain", "extension", "decay", "cross"]

# RECIPE.md "Sizes": layers, hidden, GLU inner, heads, peak LR, weight decay, LR warmup, batch warmup
SHAPES = {
    "17m": (7, 256, 384, 4, 3e-3, 3e-4, 4e9, 125e9),
    "32m": (10, 384, 576, 6, 3e-3, 3e-4, 4e9, 100e9),
    "68m": (19, 512, 768, 8, 3e-3, 3e-4, 3e9, 75e9),
    "150m": (22, 768, 1152, 12, 8e-4, 1e-5, 3e9, 50e9),
    "400m": (28, 1024, 2624, 16, 5e-4, 1e-5, 2e9, 10e9),
    "1b": (28, 1792, 3840, 28, 5e-4, 5e-5, 2e9, 3e9),
}


def test_lists_every_group():
    found = list_configs()
    assert set(SIZES) <= set(found["model"])
    assert set(PHASES) == set(found["phase"])
    assert {"mlm", "clm", "mntp"} == set(found["objective"])
    assert {"ettin", "tiny"} <= set(found["experiment"])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("phase", PHASES)
def test_every_preset_resolves(size, objective, phase):
    cfg = load_config("ettin", [f"model={size}", f"objective={objective}", f"phase={phase}"])
    layers, hidden, inner, heads, lr, wd, warmup, batch_warmup = SHAPES[size]
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads) == (layers, hidden, inner, heads)
    assert m.head_dim == 64 and m.vocab_size == 50368
    assert (m.cls_token_id, m.sep_token_id, m.pad_token_id, m.mask_token_id) == (50281, 50282, 50283, 50284)
    assert m.causal == (objective == "clm")
    assert (m.window_left, m.window_right) == ((63, 0) if objective == "clm" else (64, 64))
    assert cfg.optim.lr == lr and cfg.optim.weight_decay == wd
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.eps == 1e-6
    assert cfg.batch.global_size == 4608
    assert cfg.batch.warmup_tokens == {"pretrain": batch_warmup, "cross": 10e9}.get(phase, 0)
    assert cfg.phase.seq_len == (1024 if phase == "pretrain" else 7999)
    assert cfg.phase.seed == (210 if phase == "cross" else 21)
    assert cfg.data.mixture == {"pretrain": "pretrain", "extension": "extension"}.get(phase, "decay")
    big = size == "1b"
    expected_tokens = {
        "pretrain": 1.7e12,
        "extension": 83_333_000_000 if big else 250e9,
        "decay": 16_666_666_667 if big else 50e9,
        "cross": 16_666_666_667 if big else 50e9,
    }[phase]
    assert cfg.phase.tokens == int(expected_tokens)
    assert cfg.phase.checkpoint_every_tokens == int({"cross": 3_333_333_333 if big else 10e9}.get(phase, 8.5e9))
    g, loc = (m.global_rope_theta, m.local_rope_theta)
    if phase == "pretrain":
        assert (g, loc) == (10000, 10000)
    else:
        local_10k = (phase == "extension" and size == "17m") or (
            phase == "decay" and objective == "clm" and size in ("17m", "32m", "68m", "400m")
        )
        assert (g, loc) == (160000, 10000 if local_10k else 160000)
    s = cfg.lr_schedule
    if phase == "pretrain":
        assert (s.shape, s.warmup_tokens, s.start_factor, s.end_factor) == ("constant", warmup, 1.0, 1.0)
        assert cfg.objective.mask_rate == 0.30
    elif phase == "extension":
        assert (s.shape, s.warmup_tokens, s.start_factor, s.end_factor) == ("one_minus_sqrt", 0, 1.0, 0.5)
        assert cfg.objective.mask_rate == 0.30
    elif phase == "decay":
        assert (s.shape, s.warmup_tokens, s.start_factor, s.end_factor) == ("one_minus_sqrt", 0, 0.5, 0.02)
        assert cfg.objective.mask_rate == 0.15
    else:
        assert (s.shape, s.start_factor, s.end_factor) == ("wsd", 0.5, 0.01)
        assert (s.warmup_tokens, s.decay_tokens) == ((1e9, 3_333_000_000) if big else (3e9, 10e9))
        assert cfg.phase.init == "other_objective"


def test_mixtures_carry_the_recipe_totals():
    totals = {"pretrain": 1704.7, "extension": 249.3, "decay": 76.3}
    for phase, total in totals.items():
        cfg = load_config("ettin", [f"phase={phase}"])
        assert sum(s.weight for s in cfg.data.sources) == pytest.approx(total, abs=0.05)


def test_overrides_apply_last_and_accept_readable_numbers():
    cfg = load_config("ettin", ["model=1b", "phase=extension", "phase.tokens=1e9", "optim.lr=2e-4"])
    assert cfg.phase.tokens == 1_000_000_000 and isinstance(cfg.phase.tokens, int)
    assert cfg.optim.lr == 2e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_layer=3"], "unknown key 'model.num_layer' (did you mean 'num_layers'?)"),
        (["optim.lrr=1e-3"], "did you mean 'lr'?"),
        (["model.num_layers=abc"], "'model.num_layers' must be an integer, got 'abc'"),
        (["model.causal=maybe"], "'model.causal' must be true or false"),
        (["parallel.tensor=5"], "model.num_heads (12) is not divisible by parallel.tensor (5)"),
        (["parallel.tensor=8"], "model.num_heads (12) is not divisible by parallel.tensor (8)"),
        (
            ["model.vocab_size=50369", "parallel.tensor=2"],
            "model.vocab_size (50369) is not divisible by parallel.tensor (2)",
        ),
        (["phase.seq_len=9000"], "phase.seq_len (9000) exceeds model.max_position_embeddings (7999)"),
        (["phase.tokens=0"], "phase.tokens must be positive, got 0"),
        (["phase.tokens=-5"], "phase.tokens must be positive, got -5"),
        (["phase.checkpoint_every_tokens=0"], "phase.checkpoint_every_tokens must be positive"),
        (["batch.warmup_tokens=-1"], "batch.warmup_tokens must be >= 0"),
        (["model=15m"], "unknown model '15m' (did you mean '150m'?)"),
        (["phase=decy"], "unknown phase 'decy' (did you mean 'decay'?)"),
        (["optim.lr"], "must look like key=value"),
        (["model.attn_backend=flsh"], "did you mean 'flash'?"),
    ],
)
def test_each_mistake_has_its_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("ettin", overrides)
    assert message in str(err.value)


def test_unknown_experiment_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment 'tyny' \\(did you mean 'tiny'\\?\\)"):
        load_config("tyny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {model: 17m}\nmodel:\n  hiden_size: 12\n")
    with pytest.raises(
        ConfigError, match="bad.yaml: unknown key 'model.hiden_size' \\(did you mean 'hidden_size'\\?\\)"
    ):
        load_config(str(bad))


def test_cli_prints_one_error_line_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "ettin.cli", "config", "show", "ettin", "model.num_hedas=3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: override model.num_hedas: unknown key 'model.num_hedas' (did you mean 'num_heads'?)"
    ]


@pytest.mark.slow
def test_cli_show_prints_resolved_yaml():
    proc = subprocess.run(
        [sys.executable, "-m", "ettin.cli", "config", "show", "ettin", "model=400m", "phase=decay"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "model=400m objective=mlm phase=decay data=decay" in proc.stdout
    assert "hidden_size: 1024" in proc.stdout and "mask_rate: 0.15" in proc.stdout
