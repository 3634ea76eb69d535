"""Held-out evaluation: the same numbers in the training loop and in ``ettin eval``.

The sets are each training source's validation part (``data.validation``, never in the training
order) and any separate MDS folders (``eval.sets``). A set is a fixed list of stored samples,
capped at ``eval.max_tokens``. Its MLM masks are keyed by (``eval.seed``, set, sample index), never
by the step, so every evaluation and every run scores the same inputs; CLM needs none.

Each DP rank scores a contiguous slice of each set, in micro-batches of the training token
budget, and the sums (loss, exact predictions, labels, tokens) are all-reduced in float64: the
numbers are the same for any DP or TP size up to the order of float summation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from ettin.config import SourceConfig
from ettin.data.collate import Collator
from ettin.data.manifest import build_manifest
from ettin.data.mds import DataError, MDSSource
from ettin.data.order import derive_key, permute
from ettin.layout import STATE_FILE, WEIGHTS_FILE, is_checkpoint

TOTAL = "total"  # the name under which all sets are summed


@dataclass
class EvalSet:
    name: str
    reader: MDSSource
    indices: np.ndarray  # stored sample indices, in evaluation order
    tokens: int  # tokens in those samples


def _capped(reader: MDSSource, indices: np.ndarray, max_tokens: int, key: int) -> tuple[np.ndarray, int]:
    """The samples of ``indices`` to score under a cap of ``max_tokens`` (0: all), sorted, and their tokens.

    Under a cap, whole shards' worth of the set are taken in a keyed shard order until the cap is
    reached: the samples come from shards spread over the whole source (not only its first
    files, which may all be one domain), and scoring them reads only those few shards."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    if max_tokens:
        shard = np.searchsorted(reader.offsets, indices, side="right") - 1
        rank = permute(np.arange(len(reader.shards), dtype=np.uint64), len(reader.shards), key).astype(np.int64)
        indices = indices[np.lexsort((indices, rank[shard]))]
    total, kept = 0, len(indices)
    for start in range(0, len(indices), 4096):
        lengths = np.array([len(x) for x in reader.input_ids_many(indices[start : start + 4096])], dtype=np.int64)
        running = total + np.cumsum(lengths)
        if max_tokens and running[-1] > max_tokens:
            kept = max(start + int(np.searchsorted(running, max_tokens, side="right")), 1)  # never empty
            total = int(running[kept - start - 1]) if kept > start else total
            break
        total = int(running[-1])
    return np.sort(indices[:kept]), total


def eval_sets(cfg, pipeline) -> list[EvalSet]:
    """The run's evaluation sets: the sources' validation parts, then ``eval.sets`` (same tokenizer)."""
    sets = []
    for s, source in enumerate(pipeline.manifest.sources):
        if pipeline.held_out.counts[s]:
            indices, tokens = _capped(
                pipeline.readers[s],
                pipeline.held_out.validation[s],
                cfg.eval.max_tokens,
                derive_key(cfg.eval.seed, source.name, "eval shards"),
            )
            sets.append(EvalSet(source.name, pipeline.readers[s], indices, tokens))
    taken = {s.name for s in sets}
    for name, path in cfg.eval.sets.items():
        if name in taken or name == TOTAL:
            raise DataError(
                f"eval.sets.{name}: the name is taken (a source's validation part, or '{TOTAL}'); rename it"
            )
        data = replace(cfg.data, sources=[SourceConfig(name=name, path=str(path))])
        manifest, (reader,) = build_manifest(data, cfg.phase.seq_len)
        theirs, ours = manifest.tokenizer, pipeline.manifest.tokenizer
        if theirs and ours and theirs != ours:
            raise DataError(
                f"eval.sets.{name} ({path}) was tokenized with {theirs}, the training data with {ours}; "
                "prepare it with the training tokenizer"
            )
        indices, tokens = _capped(
            reader,
            np.arange(len(reader), dtype=np.int64),
            cfg.eval.max_tokens,
            derive_key(cfg.eval.seed, name, "eval shards"),
        )
        sets.append(EvalSet(name, reader, indices, tokens))
    return sets


class Evaluator:
    """Scores a model on every set; all ranks call it together (it all-reduces over the DP group)."""

    def __init__(
        self,
        cfg,
        sets: list[EvalSet],
        micro_tokens: int,
        device: torch.device,
        dp_rank: int = 0,
        dp_size: int = 1,
        dp_group=None,
    ):
        self.cfg, self.sets, self.micro_tokens, self.device = cfg, sets, micro_tokens, device
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        base = Collator.from_config(cfg)
        # masks keyed by (eval seed, set, sample index): the collator's "position" is the stored index
        self.collators = {
            s.name: Collator(
                base.objective,
                derive_key(cfg.eval.seed, "eval", s.name) % 2**63,
                base.vocab_size,
                base.cls_id,
                base.sep_id,
                base.pad_id,
                base.mask_id,
                base.mask_rate,
                base.mask_token_prob,
                base.random_token_prob,
            )
            for s in sets
        }

    def __bool__(self) -> bool:
        return bool(self.sets)

    def _rank_slice(self, n: int) -> slice:
        return slice(n * self.dp_rank // self.dp_size, n * (self.dp_rank + 1) // self.dp_size)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """``eval/<set>/<metric>`` for every set and for their total: loss (label-weighted), perplexity,
        accuracy (masked-token for MLM, next-token for CLM), labels, tokens, seconds."""
        was_training = model.training
        model.eval()
        out, sums = {}, []
        try:
            for s in self.sets:
                started = time.perf_counter()
                mine = s.indices[self._rank_slice(len(s.indices))]
                total = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, correct, labels, tokens
                for first in range(0, len(mine), 1024):  # collate a bounded number of samples at a time
                    chunk = mine[first : first + 1024]
                    batch = self.collators[s.name](s.reader.input_ids_many(chunk), chunk.tolist())
                    for m in batch.micro_batches(self.micro_tokens, device=self.device):
                        loss, correct = model.score(m.input_ids, m.docs, m.labels, m.label_index)
                        total += torch.stack(
                            [
                                loss.double(),
                                correct.double(),
                                torch.tensor(float(len(m.label_index)), dtype=torch.float64, device=self.device),
                                torch.tensor(float(m.input_ids.numel()), dtype=torch.float64, device=self.device),
                            ]
                        )
                if self.dp_size > 1:
                    dist.all_reduce(total, group=self.dp_group)
                sums.append(total.tolist())
                out.update(_metrics(s.name, *sums[-1], time.perf_counter() - started))
        finally:
            model.train(was_training)
        if len(self.sets) > 1:
            out.update(
                _metrics(TOTAL, *np.sum(sums, axis=0).tolist(), sum(out[f"eval/{s.name}/seconds"] for s in self.sets))
            )
        return out


def _metrics(name: str, loss: float, correct: float, labels: float, tokens: float, seconds: float) -> dict[str, float]:
    mean = loss / labels if labels else float("nan")
    return {
        f"eval/{name}/loss": mean,
        f"eval/{name}/perplexity": math.exp(mean) if mean < 700 else float("inf"),
        f"eval/{name}/accuracy": correct / labels if labels else float("nan"),
        f"eval/{name}/labels": int(labels),
        f"eval/{name}/tokens": int(tokens),
        f"eval/{name}/seconds": seconds,
    }


def headline(metrics: dict[str, float]) -> float | None:
    """The one validation loss to show in a progress line: the total, or the only set's."""
    if f"eval/{TOTAL}/loss" in metrics:
        return metrics[f"eval/{TOTAL}/loss"]
    losses = [v for k, v in metrics.items() if k.endswith("/loss")]
    return losses[0] if len(losses) == 1 else None


# ----------------------------------------------------------------------------- ettin eval


class TransformersScorer(torch.nn.Module):
    """An exported model, loaded by transformers, behind the interface the Evaluator scores. Its
    logits at position ``i`` meet our label at ``i`` for every objective (the export records the
    shift), so the released model is scored on exactly the training model's inputs and labels."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def score(self, input_ids, docs, labels, label_index):
        bounds = docs.bounds
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        ids = input_ids.new_zeros(len(lengths), max(lengths))
        mask = torch.zeros_like(ids)
        for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):  # one padded row per document
            ids[row, : b - a], mask[row, : b - a] = input_ids[a:b], 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits[mask.bool()]  # back to packed order
        chosen = logits.index_select(0, label_index).float()
        target = labels.index_select(0, label_index)
        loss = torch.nn.functional.cross_entropy(chosen, target, reduction="sum")
        correct = (chosen.gather(1, target[:, None]) >= chosen.amax(1, keepdim=True)).sum()
        return loss, correct


def is_hf_folder(path) -> bool:
    from pathlib import Path

    return (Path(path) / "config.json").is_file() and not is_checkpoint(path)


def checkpoints_of(target: str) -> tuple[list, bool]:
    """(checkpoint folders, whether ``target`` is a run folder)."""
    from ettin.layout import checkpoints_at

    found, run_folder = checkpoints_at(target)
    if not found:
        raise DataError(f"{target} holds no complete checkpoint: pass a checkpoint folder or a run folder")
    return found, run_folder


@torch.no_grad()
def _load_weights(model: torch.nn.Module, path) -> None:
    """This rank's TP piece of every parameter, from a checkpoint's model.safetensors."""
    from ettin.errors import EttinError
    from ettin.parallel import is_tp_sharded, tp_rank, tp_size
    from ettin.train.checkpoint import TensorFile

    weights = TensorFile(path / WEIGHTS_FILE)
    names = {n for n, _ in model.named_parameters()}
    if names != weights.keys():
        raise EttinError(f"{weights.path}: does not fit the model of its own config.yaml")
    for name, p in model.named_parameters():
        p.copy_(weights.read(name, p.partition_dim if is_tp_sharded(p) else None, tp_rank(), tp_size()))


def evaluate_checkpoints(
    target: str, overrides: list[str] | None = None, only: list[str] | None = None, like: str | None = None
) -> list[dict]:
    """Score every checkpoint of ``target`` (a checkpoint or a run folder) on its run's evaluation sets,
    in this process group (one process, or torchrun/srun ranks with the checkpoint's TP size or
    ``parallel.tensor=N``). Returns one row per checkpoint: step, tokens, eval/<set>/<metric>.

    ``target`` may also be an exported Hugging Face folder, scored through transformers; ``like``
    (a checkpoint or run folder) then says which sets, masks and budget to use."""
    from pathlib import Path

    from megatron.core import parallel_state as ps

    from ettin.data.ledger import checkpoint_config
    from ettin.data.loader import DataPipeline
    from ettin.fileio import read_json
    from ettin.memory import resolve_micro_tokens
    from ettin.parallel import init_process_groups
    from ettin.train.checkpoint import RESTORE
    from ettin.train.env import setup_distributed_env
    from ettin.train.trainer import pick_device

    hf_folder = is_hf_folder(target)
    if hf_folder and not like:
        raise DataError(
            f"{target} is a Hugging Face folder: name the run whose sets to score it on with --like RUN_OR_CHECKPOINT"
        )
    checkpoints, _ = checkpoints_of(like if hf_folder else target)
    cfg = checkpoint_config(checkpoints[-1], (["parallel.tensor=1"] if hf_folder else []) + list(overrides or []))
    setup_distributed_env()
    device = pick_device(cfg)
    init_process_groups(
        cfg.parallel.tensor, "nccl" if device.type == "cuda" else "gloo", cfg.train.collective_timeout_s
    )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    pipeline = DataPipeline.from_config(cfg)
    sets = eval_sets(cfg, pipeline)
    if only:
        unknown = sorted(set(only) - {s.name for s in sets})
        if unknown:
            raise DataError(
                f"--sets {','.join(unknown)}: not among this run's sets ({', '.join(s.name for s in sets) or 'none'})"
            )
        sets = [s for s in sets if s.name in only]
    if not sets:
        raise DataError(
            f"{checkpoints[-1]}: its run has no evaluation sets; set data.validation or eval.sets.NAME=PATH"
        )
    evaluator = Evaluator(
        cfg, sets, resolve_micro_tokens(cfg, dp_size), device, dp_rank, dp_size, ps.get_data_parallel_group()
    )
    if hf_folder:
        from ettin.hf import load_hf_model

        scorer = TransformersScorer(load_hf_model(target).to(device))
        return [{"checkpoint": Path(target).name, "step": None, "tokens": None, **evaluator(scorer)}]
    torch.manual_seed(0)
    model = cfg.model.build(device_type=device.type).to(device)
    if device.type == "cuda":  # the training engine runs the module in bf16 there
        model = model.to(torch.bfloat16)
    rows = []
    for ckpt in checkpoints:
        state = read_json(ckpt / STATE_FILE, RESTORE)
        _load_weights(model, ckpt)
        rows.append({"checkpoint": ckpt.name, "step": state["step"], "tokens": state["tokens"], **evaluator(model)})
    return rows


def write_table(rows: list[dict], out_dir) -> list:
    """eval.csv, eval.md and eval.png (validation loss against tokens) in ``out_dir``."""
    import csv
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out_dir / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "eval.md").write_text(format_table(rows) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in _set_names(rows):
        ax.plot([r["tokens"] for r in rows], [r[f"eval/{name}/loss"] for r in rows], marker="o", label=name)
    ax.set(xlabel="tokens", ylabel="validation loss", title=str(out_dir))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "eval.png", dpi=100)
    plt.close(fig)
    return [out_dir / n for n in ("eval.csv", "eval.md", "eval.png")]


def _set_names(rows: list[dict]) -> list[str]:
    return [k.split("/")[1] for k in rows[0] if k.startswith("eval/") and k.endswith("/loss")]


def format_table(rows: list[dict]) -> str:
    """A markdown table: one row per checkpoint, loss and accuracy per set."""
    names = _set_names(rows)
    head = ["step", "tokens"] + [f"{n} {m}" for n in names for m in ("loss", "acc")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [
            r["checkpoint"] if r["step"] is None else str(r["step"]),
            "-" if r["tokens"] is None else f"{r['tokens']:,}",
        ] + [f"{r[f'eval/{n}/{m}']:.4f}" for n in names for m in ("loss", "accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_runs(runs: list[str]) -> str:
    """Side by side, per set and token count: each run's in-loop validation loss and accuracy (from
    its metrics.jsonl), e.g. the encoder and the decoder of one size, or two sizes."""
    from pathlib import Path

    from ettin.train.metrics import read_all_metrics

    tables = {}
    for run in runs:
        rows = [r for r in read_all_metrics(run) if any(k.startswith("eval/") for k in r)]
        if not rows:
            raise DataError(
                f"{run}: its metrics.jsonl has no evaluation rows (set data.validation or eval.sets, "
                "or run `ettin eval` on it)"
            )
        tables[Path(run).name or run] = {r["tokens"]: r for r in rows}
    names = sorted(
        {
            k.split("/")[1]
            for t in tables.values()
            for r in t.values()
            for k in r
            if k.startswith("eval/") and k.endswith("/loss")
        }
    )
    labels = list(tables)
    lines = []
    for name in names:
        lines += [
            f"\n{name}: validation loss (accuracy)",
            "| tokens | " + " | ".join(labels) + " |",
            "|---:|" + "---:|" * len(labels),
        ]
        for tokens in sorted({t for table in tables.values() for t in table}):
            cells = []
            for label in labels:
                r = tables[label].get(tokens, {})
                cells.append(
                    f"{r[f'eval/{name}/loss']:.4f} ({r[f'eval/{name}/accuracy']:.3f})"
                    if f"eval/{name}/loss" in r
                    else ""
                )
            lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip()
