"""Each set of allowed config values is written once: the open ones are tables next to their code
(attention backends, LR-schedule shapes) that the config reads; the closed ones are Literal
annotations that drive the loader's and validate's checks. Plus the renamed ``schedule`` key."""

import dataclasses
import logging
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import torch

from ettin import attention, config
from ettin.config import ConfigError, ExperimentConfig, load_config, to_yaml, validate
from ettin.data.ledger import checkpoint_config
from ettin.errors import EttinError
from ettin.train import lr_schedule
from ettin.train.lr_schedule import lr_factor


@pytest.fixture(scope="module")
def process_group():
    from ettin.parallel import init_process_groups

    init_process_groups(1)


# ----------------------------------------------------------------------------- attention backends


class CountingAttention(attention.SdpaAttention):
    """SDPA under another name, counting its calls."""

    name = "counting"
    calls = 0

    def __call__(self, q, k, v, plan, dropout_p: float = 0.0):
        type(self).calls += 1
        return super().__call__(q, k, v, plan, dropout_p)


def test_a_registered_attention_backend_is_accepted_and_used(monkeypatch, process_group):
    with pytest.raises(ConfigError, match="model.attn_backend 'counting' unknown"):
        load_config("tiny", ["model.attn_backend=counting"])
    monkeypatch.setitem(attention.BACKENDS, "counting", attention.Backend(CountingAttention))
    monkeypatch.setattr(CountingAttention, "calls", 0)
    cfg = load_config("tiny", ["model.attn_backend=counting", "model.attn_out_dropout=0.0"])
    assert cfg.model.attn_backend == "counting" and "counting" in attention.available_backends()
    torch.manual_seed(0)
    model = cfg.model.build(device_type="cpu").eval()
    assert model.attend.name == "counting"
    ids = torch.randint(4, cfg.model.vocab_size, (40,))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    with torch.no_grad():
        out = model(ids, cu)
    assert CountingAttention.calls == cfg.model.num_layers
    torch.manual_seed(0)
    reference = cfg.model.build(attn_backend="sdpa", device_type="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(out, reference(ids, cu))


def test_an_unusable_backend_is_refused_with_what_it_needs(monkeypatch):
    monkeypatch.setitem(attention.BACKENDS, "never", attention.Backend(CountingAttention, lambda: False, "a miracle"))
    load_config("tiny", ["model.attn_backend=never"])  # a valid name: whether it runs is the machine's business
    with pytest.raises(EttinError, match=r"'never' is not available here \(it needs a miracle"):
        attention.build_attention("never")


# ----------------------------------------------------------------------------- LR-schedule shapes


def test_a_registered_schedule_shape_is_accepted_and_drives_lr_factor(monkeypatch):
    with pytest.raises(ConfigError, match="lr_schedule.shape must be constant, one_minus_sqrt or wsd, got 'half'"):
        load_config("tiny", ["lr_schedule.shape=half"])
    monkeypatch.setitem(
        lr_schedule.SHAPES, "half", lambda t, s, phase_tokens: s.start_factor * (1 - t / phase_tokens / 2)
    )
    cfg = load_config("tiny", ["lr_schedule.shape=half", "lr_schedule.warmup_tokens=1000", "phase.tokens=10000"])
    s, total = cfg.lr_schedule, cfg.phase.tokens
    assert s.shape == "half"
    assert lr_factor(500, s, total) == pytest.approx(0.5)  # the warmup is the schedule's, whatever the shape
    assert lr_factor(5000, s, total) == pytest.approx(0.75)
    assert lr_factor(total, s, total) == pytest.approx(0.5)


def test_the_built_in_shapes_keep_their_numbers():
    s = config.LRScheduleConfig(shape="wsd", warmup_tokens=100, start_factor=0.5, end_factor=0.01, decay_tokens=400)
    assert [lr_factor(t, s, 1000) for t in (50, 100, 600, 800, 1000)] == pytest.approx([0.25, 0.5, 0.5, 0.255, 0.01])
    s = config.LRScheduleConfig(shape="one_minus_sqrt", start_factor=1.0, end_factor=0.5)
    assert lr_factor(250, s, 1000) == pytest.approx(0.5 + 0.5 * (1 - 0.5))
    with pytest.raises(ValueError, match="unknown lr_schedule.shape 'nope'"):
        lr_factor(1, dataclasses.replace(s, shape="nope"), 1000)


# ----------------------------------------------------------------------------- closed choices (Literal)


def literal_fields(schema=ExperimentConfig, path=""):
    """(dotted key, allowed values) of every Literal-annotated field."""
    out = []
    for f in dataclasses.fields(schema):
        hint = get_type_hints(schema)[f.name]
        if get_origin(hint) is Literal:
            out.append((f"{path}{f.name}", get_args(hint)))
        elif dataclasses.is_dataclass(hint):
            out += literal_fields(hint, f"{path}{f.name}.")
    return out


LITERALS = literal_fields()


def test_the_closed_choices_are_literals():
    keys = {key for key, _ in LITERALS}
    assert {
        "phase.init",
        "train.device",
        "train.grad_accum_dtype",
        "train.verify_checkpoints",
        "metrics.wandb.mode",
        "parallel.zero_stage",
        "optim.name",
    } <= keys


@pytest.mark.parametrize("key, allowed", LITERALS, ids=[k for k, _ in LITERALS])
def test_every_literal_value_is_accepted(key, allowed):
    for value in allowed:
        checked = config._check_layer(config._nest(key, value), ExperimentConfig, "test")
        assert checked == config._nest(key, value)
        cfg = ExperimentConfig()
        section, name = key.rsplit(".", 1)
        setattr(config_node(cfg, section), name, value)
        assert not [e for e in config._literal_errors(cfg) if e.startswith(key)]
        try:  # through the loader too; other rules may still object (e.g. phase.init=previous needs phase.previous)
            loaded = load_config("tiny", [f"{key}={value}"])
            assert getattr(config_node(loaded, section), name) == value
        except ConfigError as e:
            assert f"{key} must be" not in str(e)


@pytest.mark.parametrize("key, allowed", LITERALS, ids=[k for k, _ in LITERALS])
def test_a_value_outside_a_literal_is_one_error_line(key, allowed):
    bad = f"{allowed[0]}x" if isinstance(allowed[0], str) else 7
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"{key}={bad}"])
    message = str(err.value)
    assert "\n" not in message
    assert f"{key} must be " in message and f"got {bad!r}" in message
    assert all(str(a) in message for a in allowed)
    if isinstance(allowed[0], str):
        assert f"(did you mean '{allowed[0]}'?)" in message
    # a config built in code is checked by validate, with the same words
    cfg = ExperimentConfig()
    section, name = key.rsplit(".", 1)
    setattr(config_node(cfg, section), name, bad)
    with pytest.raises(ConfigError, match=f"{key} must be "):
        validate(cfg)


def test_literal_messages_read_as_before():
    with pytest.raises(ConfigError, match="train.device must be auto, cuda or cpu, got 'gpu'"):
        load_config("tiny", ["train.device=gpu"])
    with pytest.raises(ConfigError, match="parallel.zero_stage must be 1 or 2, got 3"):
        load_config("tiny", ["parallel.zero_stage=3"])


def config_node(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_resolved_yaml_and_structured_round_trip_with_literals():
    from omegaconf import OmegaConf

    cfg = load_config("tiny", ["train.verify_checkpoints=all", "metrics.wandb.mode=disabled"])
    flat = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # what `ettin config diff` does
    assert flat["train"]["verify_checkpoints"] == "all" and flat["parallel"]["zero_stage"] == 1
    assert "verify_checkpoints: all" in to_yaml(cfg)


# ----------------------------------------------------------------------------- the renamed key


@pytest.fixture
def said(monkeypatch):
    """The warnings of ettin.config, each rename told afresh."""
    monkeypatch.setattr(config, "_renames_said", set())
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ettin.config")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


DEPRECATION = "config key 'schedule' is renamed 'lr_schedule'; the old name works until ettin 0.3"


def test_the_old_schedule_key_still_works_in_a_file_and_an_override(tmp_path, said):
    old = tmp_path / "old.yaml"
    old.write_text(
        "defaults: {model: 17m, objective: mlm, phase: pretrain}\n"
        "schedule: {warmup_tokens: 123, shape: wsd, decay_tokens: 1000}\n"
    )
    cfg = load_config(str(old), ["schedule.end_factor=0.25"])
    s = cfg.lr_schedule
    assert (s.warmup_tokens, s.shape, s.decay_tokens, s.end_factor) == (123, "wsd", 1000, 0.25)
    assert len(said) == 1 and DEPRECATION in said[0]  # once, however many layers use it
    assert load_config("tiny", ["schedule.shape=one_minus_sqrt"]).lr_schedule.shape == "one_minus_sqrt"
    assert len(said) == 1


def test_only_the_first_rank_says_it(said, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert load_config("tiny", ["schedule.shape=wsd"]).lr_schedule.shape == "wsd"
    assert said == []
    monkeypatch.setenv("RANK", "0")
    load_config("tiny", ["schedule.shape=wsd"])
    assert len(said) == 1 and DEPRECATION in said[0]


def test_an_old_checkpoint_config_loads_under_the_new_key(tmp_path, said):
    cfg = load_config("tiny", ["lr_schedule.shape=wsd", "lr_schedule.decay_tokens=1000"])
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    text = to_yaml(cfg)
    assert "\nlr_schedule:\n" in text
    (folder / "config.yaml").write_text(text.replace("\nlr_schedule:\n", "\nschedule:\n"))  # as ettin 0.1 wrote it
    old = checkpoint_config(folder)
    assert old.lr_schedule == cfg.lr_schedule
    assert [line for line in said if DEPRECATION in line] and len(said) == 1


def test_both_names_in_one_file_is_an_error(tmp_path, said):
    both = tmp_path / "both.yaml"
    both.write_text("defaults: {model: 17m}\nschedule: {warmup_tokens: 1}\nlr_schedule: {warmup_tokens: 2}\n")
    with pytest.raises(ConfigError, match="both 'schedule' and 'lr_schedule' are set"):
        load_config(str(both))
