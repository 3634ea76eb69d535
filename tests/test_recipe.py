"""The golden recipe: every resolved recipe value of the 48 size x objective x phase runs, pinned against a
table written from Ettin's published training YAMLs (JHU-CLSP/ettin-encoder-vs-decoder, pretraining/configs/),
not from our configs. docs/RECIPE.md explains each value, its source and every deliberate deviation.

Published file per run (<n> is the size's name there: very_tiny, tiny, mini, base, large, huge):
  pretrain   standard/<n>/{encoder,decoder}_<n>.yaml
  extension  standard/<n>/de_decay/{encoder,decoder}_<n>.yaml       (250B at 7,999, LR peak -> 0.5x)
  decay      standard/<n>/prolong_decay/{encoder,decoder}_<n>.yaml  (50B, ProLong data, 15% masking)
  cross      cross-train/<n>/encoder_<n>.yaml is encoder -> decoder (our objective=clm, phase=cross);
             cross-train/<n>/decoder_<n>.yaml is decoder -> encoder (our objective=mlm, phase=cross)
"""

from __future__ import annotations

import pytest

from ettin.cli import config_diff, main
from ettin.config import load_config

OBJECTIVES = ["mlm", "clm"]
PHASES = ["pretrain", "extension", "decay", "cross"]
GPUS = 4  # every Ettin model trained on 4 H100s (pretraining/README.md); batch warmup starts at one micro-batch each

# --------------------------------------------------------------------------- the published YAMLs, per size
# num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, optimizer.lr and weight_decay of the
# pretrain file, its scheduler.t_warmup and train_loader.batch_size_warmup_tokens, and
# device_train_microbatch_size (= batch_size_warmup_min_size per GPU) of the pretrain and the cross files.
# fmt: off
SIZES = {  # size: (name, layers, hidden, inner, heads, lr, wd, t_warmup, bs_warmup_tokens, micro pretrain, micro cross)
    "17m": ("very_tiny", 7, 256, 384, 4, 3e-3, 3e-4, 4_000_000_000, 125_000_000_000, 144, 12),
    "32m": ("tiny", 10, 384, 576, 6, 3e-3, 3e-4, 4_000_000_000, 100_000_000_000, 128, 12),
    "68m": ("mini", 19, 512, 768, 8, 3e-3, 3e-4, 3_000_000_000, 75_000_000_000, 96, 8),
    "150m": ("base", 22, 768, 1152, 12, 8e-4, 1e-5, 3_000_000_000, 50_000_000_000, 72, 12),
    "400m": ("large", 28, 1024, 2624, 16, 5e-4, 1e-5, 2_000_000_000, 10_000_000_000, 48, 4),
    "1b": ("huge", 28, 1792, 3840, 28, 5e-4, 5e-5, 2_000_000_000, 3_000_000_000, 24, 2),
}

# --------------------------------------------------------------------------- the published YAMLs, per phase
# max_seq_len, max_duration, optimizer.lr as a multiple of the pretrain lr, scheduler (name, t_warmup, alpha_f,
# t_decay), batch_size_warmup_tokens, seed, save_interval, the encoder's mlm_probability, rotary_emb_base and
# local_attn_rotary_emb_base (None: unset, so bert24's local layers use rotary_emb_base). "size" marks a
# per-size value from SIZES; "all" marks one_minus_sqrt's t_decay = t_max = ${max_duration}.
PHASE = {
    "pretrain": dict(seq=1024, tokens=1_700_000_000_000, lr=1.0, sched="warmup_stable_decay", t_warmup="size",
                     alpha_f=0.02, t_decay=0, bs_warmup="size", seed=21, save=8_500_000_000, mlm=0.30,
                     rope=10_000.0, local_rope=None, data="ettin_tokenized_data"),
    "extension": dict(seq=7999, tokens=250_000_000_000, lr=1.0, sched="one_minus_sqrt", t_warmup=0, alpha_f=0.5,
                      t_decay="all", bs_warmup=0, seed=21, save=8_500_000_000, mlm=0.30,
                      rope=160_000.0, local_rope=None, data="sample_250B"),
    "decay": dict(seq=7999, tokens=50_000_000_000, lr=0.5, sched="one_minus_sqrt", t_warmup=0, alpha_f=0.04,
                  t_decay="all", bs_warmup=0, seed=21, save=8_500_000_000, mlm=0.15,
                  rope=160_000.0, local_rope=160_000.0, data="ProLong"),
    "cross": dict(seq=7999, tokens=50_000_000_000, lr=0.5, sched="warmup_stable_decay", t_warmup=3_000_000_000,
                  alpha_f=0.02, t_decay=10_000_000_000, bs_warmup=10_000_000_000, seed=210, save=10_000_000_000,
                  mlm=0.15, rope=160_000.0, local_rope=160_000.0, data="ProLong"),
}

# --------------------------------------------------------------------------- the published exceptions
EXCEPTIONS = [  # (size, objective, phase) patterns (None: any) -> published values that replace the row's
    # the 1b ("huge") files run a third of the tokens after pretraining, written out in full
    (("1b", None, "extension"), dict(tokens=83_333_000_000)),
    (("1b", None, "decay"), dict(tokens=16_666_666_667)),
    (("1b", None, "cross"), dict(tokens=16_666_666_667, t_warmup=1_000_000_000, t_decay=3_333_000_000,
                                 save=3_333_333_333)),
    # local_attn_rotary_emb_base: 10000.0 in these files
    (("17m", None, "extension"), dict(local_rope=10_000.0)),
    *[((size, "clm", "decay"), dict(local_rope=10_000.0)) for size in ("17m", "32m", "68m", "400m")],
    (("150m", "clm", "decay"), dict(local_rope=None)),  # standard/base/prolong_decay/decoder_base.yaml: unset
]
# fmt: on

# --------------------------------------------------------------------------- our deliberate deviations
# (docs/RECIPE.md "Deliberate deviations"). Sliding window 128 is bert24's flash window (64, 64): the encoder's
# local layers see |i - j| <= 64, which we keep; the causal decoder saw 64 keys back plus itself, but we follow
# transformers' ModernBertDecoder (sliding_window 64: 63 back plus itself), so exported models score as trained.
WINDOW = {"mlm": (64, 64), "clm": (63, 0)}
# issue 11: the decoder -> encoder cross phase trains MNTP (masked next-token prediction, the authors' description;
# their code is unpublished): MLM masks, labels shifted by one, bidirectional attention.
CROSS_MLM_OBJECTIVE = "mntp"
# The batch-size ramp is fixed in sequences (one micro-batch per GPU on Ettin's 4 GPUs), so the order never depends
# on our GPU count; where a phase has no ramp the start size is unused and stays the size's pretraining one.
OUR_MIXTURE = {"ettin_tokenized_data": "pretrain", "sample_250B": "extension", "ProLong": "decay"}
OUR_INIT = {"pretrain": "scratch", "extension": "previous", "decay": "previous", "cross": "other_objective"}
OUR_SHAPE = {"one_minus_sqrt": "one_minus_sqrt"}  # warmup_stable_decay: "constant" with t_decay 0, else "wsd"


def published(size: str, objective: str, phase: str) -> dict:
    """The published row for one run: the phase row, the size's values, then the exceptions."""
    name, layers, hidden, inner, heads, lr, wd, t_warmup, bs_warmup, micro, micro_cross = SIZES[size]
    row = dict(PHASE[phase], name=name, layers=layers, hidden=hidden, inner=inner, heads=heads, peak=lr, wd=wd)
    row["t_warmup"] = t_warmup if row["t_warmup"] == "size" else row["t_warmup"]
    row["bs_warmup"] = bs_warmup if row["bs_warmup"] == "size" else row["bs_warmup"]
    row["micro"] = micro_cross if phase == "cross" else micro
    for (s, o, p), values in EXCEPTIONS:
        if s in (None, size) and o in (None, objective) and p in (None, phase):
            row.update(values)
    return row


def expected(size: str, objective: str, phase: str) -> dict:
    """The published row in our config's keys and conventions."""
    row = published(size, objective, phase)
    wsd = row["sched"] == "warmup_stable_decay"
    constant = wsd and row["t_decay"] == 0  # pretraining: warmup, then the peak until the end
    start = row["lr"]  # optimizer.lr / peak: our schedule levels are fractions of optim.lr (the size's peak)
    out = {
        "model.num_layers": row["layers"],
        "model.hidden_size": row["hidden"],
        "model.intermediate_size": row["inner"],
        "model.num_heads": row["heads"],
        "model.vocab_size": 50368,
        "optim.lr": row["peak"],
        "optim.weight_decay": row["wd"],
        "optim.betas": [0.9, 0.98],
        "optim.eps": 1e-6,
        "lr_schedule.shape": "constant" if constant else ("wsd" if wsd else OUR_SHAPE[row["sched"]]),
        "lr_schedule.warmup_tokens": row["t_warmup"],
        "lr_schedule.start_factor": start,
        "lr_schedule.end_factor": start if constant else start * row["alpha_f"],  # alpha_f is relative to lr
        # one_minus_sqrt decays over the whole phase (t_decay = t_max); ours has no knob for it and keeps 0
        "lr_schedule.decay_tokens": row["t_decay"] if wsd else 0,
        "batch.global_size": 4608,
        "batch.warmup_tokens": row["bs_warmup"],
        "batch.warmup_start_size": GPUS * (row["micro"] if row["bs_warmup"] else SIZES[size][9]),
        "phase.tokens": row["tokens"],
        "phase.seq_len": row["seq"],
        "phase.seed": row["seed"],
        "phase.init": OUR_INIT[phase],
        "phase.checkpoint_every_tokens": row["save"],
        "model.global_rope_theta": row["rope"],
        "model.local_rope_theta": row["rope"] if row["local_rope"] is None else row["local_rope"],
        "objective.name": objective if not (objective == "mlm" and phase == "cross") else CROSS_MLM_OBJECTIVE,
        "model.causal": objective == "clm",
        "model.window_left": WINDOW[objective][0],
        "model.window_right": WINDOW[objective][1],
        "model.global_every": 3,  # global_attn_every_n_layers
        "data.mixture": OUR_MIXTURE[row["data"]],
    }
    if objective == "mlm":  # decoders have mlm_probability 0.0 (suppress_masking); our mask_rate is unused there
        out["objective.mask_rate"] = row["mlm"]
    return out


def resolved(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


RUNS = [(s, o, p) for s in SIZES for o in OBJECTIVES for p in PHASES]


@pytest.mark.parametrize("size, objective, phase", RUNS, ids=["-".join(r) for r in RUNS])
def test_golden_recipe(size, objective, phase):
    cfg = load_config("ettin", [f"model={size}", f"objective={objective}", f"phase={phase}"])
    want = expected(size, objective, phase)
    wrong = [
        f"{key}: published {value!r}, resolved {resolved(cfg, key)!r}"
        for key, value in want.items()
        if resolved(cfg, key) != (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
    ]
    assert not wrong, f"{size} {objective} {phase} ({published(size, objective, phase)['name']}):\n" + "\n".join(wrong)


def test_the_table_matches_the_recipe_summary():
    """Spot checks of the table itself against RECIPE.md's prose numbers, so a typo in it cannot hide."""
    assert [GPUS * SIZES[s][9] for s in SIZES] == [576, 512, 384, 288, 192, 96]
    assert [published(s, "mlm", "cross")["lr"] * SIZES[s][5] for s in SIZES] == pytest.approx(
        [1.5e-3, 1.5e-3, 1.5e-3, 4e-4, 2.5e-4, 2.5e-4]
    )
    assert expected("1b", "clm", "cross")["lr_schedule.end_factor"] == pytest.approx(0.01)
    assert expected("400m", "mlm", "decay")["lr_schedule.end_factor"] == pytest.approx(0.02)
    assert len(RUNS) == 48


# --------------------------------------------------------------------------- ettin config diff


def test_config_diff_shows_only_what_overrides_change(capsys):
    assert (
        main(["config", "diff", "ettin", "model=400m", "phase=decay", "optim.lr=1e-3", "batch.global_size=2304"]) == 0
    )
    assert capsys.readouterr().out.splitlines() == ["batch.global_size: 4608 -> 2304", "optim.lr: 0.0005 -> 0.001"]


def test_config_diff_of_the_recipe_itself(capsys):
    assert main(["config", "diff", "ettin", "model=17m", "objective=clm", "phase=cross"]) == 0
    assert capsys.readouterr().out == "no differences\n"
    assert config_diff("tiny", []) == []


def test_config_diff_bare_shows_group_choices_too():
    lines = config_diff(
        "ettin", ["model=400m", "model.causal=true", "objective.name=clm", "model.window_right=0"], bare=True
    )
    assert "groups.model: 150m -> 400m" in lines and "model.num_layers: 22 -> 28" in lines
    assert "model.causal: false -> true" in lines and "objective.name: mlm -> clm" in lines
    assert all(" -> " in line for line in lines)


def test_config_diff_lists_sources_in_order_and_marks_absent_keys():
    lines = config_diff("ettin", ["phase=decay"], bare=True)
    sources = [line for line in lines if line.startswith("data.sources[")]
    assert sources.index("data.sources[2].weight: 263.9 -> 10.5") < sources.index(
        "data.sources[10].weight: 7.3 -> <absent>"
    )


def test_config_diff_reports_mistakes_as_one_error_line(capsys):
    assert main(["config", "diff", "ettin", "optim.lrr=1e-3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: override optim.lrr: unknown key 'optim.lrr' (did you mean 'lr'?)"
    ]


def test_config_diff_help_describes_it(capsys):
    with pytest.raises(SystemExit) as done:
        main(["config", "diff", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "key: recipe -> now" in text and "no differences" in text and "--bare" in text
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    assert "diff" in capsys.readouterr().out
