"""Metrics sinks and logs: JSONL always, TensorBoard, W&B for real (offline mode), timestamped progress."""

import json
import re
import struct
from pathlib import Path

import pytest

from ettin.config import ConfigError, load_config, validate
from ettin.testing import run_distributed_test
from ettin.train.metrics import MetricsLogger, loss_curves, plot, progress_line, read_all_metrics, read_metrics

from conftest import Source


def wandb_records(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline W&B run under run_dir, read from its .wandb file.

    The file is a LevelDB-style log (7-byte W&B header, then 32 KiB blocks of records: crc32c,
    length, type, payload) of ``wandb.proto.wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block, pos, parts, config, history = path.read_bytes(), 32768, 7, b"", {}, []
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif record.WhichOneof("record_type") in ("run", "config"):  # wandb.init's config rides on the run record
                updates = record.run.config.update if record.HasField("run") else record.config.update
                config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == 0:
            break
    return config, history


@pytest.fixture(scope="module")
def experiment(tiny_corpus):
    return tiny_corpus(
        Source("a", 120, seed=1),
        name="metrics",
        phase={"tokens": 3000, "seq_len": 128, "checkpoint_every_tokens": 100000},
        lr_schedule={"warmup_tokens": 500},
        batch={"global_size": 8, "micro_tokens": 600},
        train={"log_every": 2, "collective_timeout_s": 60},
        data={"workers": 0},
    ).exp


def _train(exp, overrides):
    from ettin.train.trainer import train

    assert train(load_config(exp, overrides)) == 0


@pytest.mark.distributed
def test_a_run_logs_to_jsonl_tensorboard_and_an_offline_wandb_run(experiment, tmp_path, capfd):
    run = tmp_path / "run"
    run_distributed_test(
        _train,
        1,
        args=(experiment, [f"run_dir={run}", "metrics.wandb.mode=offline", "metrics.wandb.project=ettin-test"]),
    )
    rows = read_metrics(run)
    assert rows and all(r["loss"] > 0 for r in rows)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    config, history = wandb_records(run)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows], rel=1e-12)
    assert {"tokens", "tokens_per_s", "lr", "grad_norm"} <= set(history[0])
    fingerprint = json.loads((sorted((run / "checkpoints").iterdir())[-1] / "state.json").read_text())["fingerprint"]
    assert config["data_fingerprint"] == fingerprint and config["phase"]["tokens"] == 3000
    # the progress line: timestamped, every train.log_every steps, with the time left in the phase
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if " | tokens " in line]
    assert len(lines) == len(rows) // 2
    assert all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step +\d+ \| tokens .* \| eta (\d\d:\d\d:\d\d|\?)$", line)
        for line in lines
    ), lines

    # a requeued job continues the same W&B run (the id lives in the run folder)
    run_id = (run / "wandb_run_id").read_text().strip()
    assert (run / "wandb" / "latest-run").resolve().name.endswith(run_id)


def test_the_container_fans_out_and_plot_draws_validation_curves(tmp_path):
    logger = MetricsLogger.for_run(tmp_path, enabled=True)
    for step in (1, 2, 3):
        logger.log({"step": step, "tokens": 100 * step, "loss": 3.0 / step, "tokens_per_s": 10.0})
    logger.log({"step": 3, "tokens": 300, "eval/a/loss": 2.5, "eval/a/accuracy": 0.1})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["step"] for r in read_all_metrics(tmp_path)] == [1, 2, 3, 3]
    assert plot(tmp_path).stat().st_size > 0
    assert loss_curves(read_all_metrics(tmp_path)) == {
        "train": ([100, 200, 300], [3.0, 1.5, 1.0]),
        "validation: a": ([300], [2.5]),
    }
    assert MetricsLogger.for_run(tmp_path / "other", enabled=False).sinks == []
    assert not (tmp_path / "other").exists()


def test_progress_line_names_the_time_left():
    row = {
        "step": 10,
        "tokens": 1000,
        "loss": 2.0,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 100.0,
        "mfu": None,
        "data_wait_s": 0.0,
    }
    assert progress_line(row, 1000 + 3600 * 100).endswith("eta 01:00:00")
    assert "val 1.5000" in progress_line(row, 2000, eval_loss=1.5)


def test_wandb_settings_are_checked(experiment):
    with pytest.raises(ConfigError, match="metrics.wandb.mode must be disabled, online or offline"):
        validate(load_config(experiment, ["metrics.wandb.mode=cloud"]))
    with pytest.raises(ConfigError, match="metrics.wandb.project"):
        validate(load_config(experiment, ["metrics.wandb.mode=offline"]))
