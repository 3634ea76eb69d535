"""The ``ettin`` command line. Every user mistake ends as one ``error:`` line and exit code 2.

One ``add_<command>_parser(sub)`` per command, next to its handlers; the launch, plan and data commands keep their
parsers beside their logic (ettin.launch, ettin.data.commands). Building the parser imports no torch (nor
transformers, deepspeed, ...): ``ettin --help`` stays fast on a login node, and handlers import what they need.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from ettin.config import GROUPS, ConfigError, list_configs, load_config, to_yaml
from ettin.errors import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, EXIT_USAGE, EttinError, run_reporting

# torch warns "No CUDA runtime is found" on every CPU machine; keep stderr for what matters
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


OVERRIDES_HELP = "key=value overrides (e.g. model=400m objective=clm optim.lr=1e-3)"


def _checkpoints_of(path: str):
    """The checkpoints a path names (itself, or a run folder's): shared by checkpoint verify and data-order export."""

    from ettin.layout import checkpoints_at

    found, _ = checkpoints_at(path)
    if not found:
        raise EttinError(f"{path} holds no complete checkpoints: pass a run folder or a checkpoint folder")
    return found


# ----------------------------------------------------------------------------- train


def add_train_parser(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train one phase (launch with torchrun or srun; resumes by itself)",
        description="Train one phase of one model. Start one process per device with torchrun "
        "or srun; the run folder (run_dir) is resumed from its newest complete checkpoint. "
        f"Exit codes: {EXIT_OK} done, {EXIT_USAGE} bad input, {EXIT_NONFINITE} non-finite loss, "
        f"{EXIT_REQUEUE} stopped early (requeue me).",
    )
    tr.add_argument("experiment")
    tr.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    tr.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ettin.train.signals import StopFlag

    stop = StopFlag()  # first: a USR2/TERM during the slow start-up must still lead to a clean stop
    from ettin.train.trainer import train

    return train(load_config(args.experiment, args.overrides), stop)


# ----------------------------------------------------------------------------- plot


def add_plot_parser(sub) -> None:
    pl = sub.add_parser("plot", help="write a PNG of a run's loss and throughput")
    pl.add_argument("run", help="run folder (with metrics.jsonl)")
    pl.add_argument("--out", help="output PNG (default: RUN/metrics.png)")
    pl.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from ettin.train.metrics import plot

    print(f"wrote {plot(args.run, args.out)}")
    return 0


# ----------------------------------------------------------------------------- launch


def add_launch_parser(sub) -> None:
    """``ettin launch submit|status|cancel``: the parsers of ettin.launch, which ``python -m launch.*`` use too."""
    from ettin.launch.status import add_cancel_parser, add_status_parser
    from ettin.launch.submit import add_submit_parser

    launch = sub.add_parser(
        "launch",
        help="submit, watch and cancel the Slurm jobs of the recipe",
        description="The recipe on a Slurm cluster: submit one chained job per (size, objective, "
        "phase), watch their state and progress, cancel them. Also runs as python -m "
        "launch.submit|status|cancel.",
    ).add_subparsers(dest="action", required=True)
    add_submit_parser(launch)
    add_status_parser(launch)
    add_cancel_parser(launch)


# ----------------------------------------------------------------------------- config


def add_config_parser(sub) -> None:
    config = sub.add_parser("config", help="list, show and diff configurations").add_subparsers(
        dest="action", required=True
    )
    config.add_parser("list", help="list experiments and group files").set_defaults(func=cmd_config_list)
    show = config.add_parser("show", help="print the resolved config of an experiment")
    show.add_argument("experiment", help="name in configs/experiment/ or a YAML path")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(func=cmd_config_show)
    diff = config.add_parser(
        "diff",
        help="print what overrides change against the recipe",
        description="Resolve the experiment twice, as the recipe and with the overrides, and print every key whose "
        "value differs as 'key: recipe -> now' (or 'no differences'). Group choices (model=, objective=, phase=, "
        "data=) pick the recipe point to compare against; the key=value overrides are the changes shown. "
        "Example: ettin config diff ettin model=400m phase=decay optim.lr=1e-3",
    )
    diff.add_argument("experiment", help="name in configs/experiment/ or a YAML path")
    diff.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    diff.add_argument(
        "--bare",
        action="store_true",
        help="compare against the experiment with no overrides at all, so group choices show too",
    )
    diff.set_defaults(func=cmd_config_diff)


def cmd_config_list(args) -> int:
    for group, names in list_configs().items():
        print(f"{group:<11} {' '.join(names)}")
    return 0


def cmd_config_show(args) -> int:
    from ettin.flops import flops_per_token, num_parameters

    cfg = load_config(args.experiment, args.overrides)
    m = cfg.model
    print(f"# {cfg.name}: {' '.join(f'{k}={v}' for k, v in cfg.groups.items())}")
    print(
        f"# parameters {num_parameters(m) / 1e6:.1f}M, training FLOPs/token at seq {cfg.phase.seq_len}: "
        f"{flops_per_token(m, cfg.phase.seq_len)['total'] / 1e9:.3f} GFLOP"
    )
    print(to_yaml(cfg), end="")
    return 0


def _flatten(node, prefix: str = "") -> dict:
    """Dotted key -> value for a resolved config; lists of mappings (data.sources) are indexed."""
    out = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(node, list) and any(isinstance(v, dict) for v in node):
        for i, value in enumerate(node):
            out.update(_flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix] = node
    return out


def _resolved(cfg) -> dict:
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def _natural(key: str) -> list:
    """Sort data.sources[2] before data.sources[10]."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def config_diff(experiment: str, overrides: list[str], bare: bool = False) -> list[str]:
    """``key: recipe -> now`` for every resolved key an override changes.

    The recipe is the experiment with its group choices (model=, objective=, phase=, data=) but without the
    key=value overrides; with ``bare`` it is the experiment with no overrides at all.
    """
    groups = [o for o in overrides if "=" in o and o.split("=", 1)[0].strip() in GROUPS]
    recipe = _resolved(load_config(experiment, [] if bare else groups))
    now = _resolved(load_config(experiment, overrides))
    absent = object()

    def show(value) -> str:  # as `config show` writes it: strings bare, true/false/null, numbers exact
        if value is absent:
            return "<absent>"
        if value is None or isinstance(value, bool):
            return {None: "null", True: "true", False: "false"}[value]
        return value if isinstance(value, str) else repr(value)

    return [
        f"{key}: {show(recipe.get(key, absent))} -> {show(now.get(key, absent))}"
        for key in sorted(set(recipe) | set(now), key=_natural)
        if recipe.get(key, absent) != now.get(key, absent)
    ]


def cmd_config_diff(args) -> int:
    lines = config_diff(args.experiment, args.overrides, bare=args.bare)
    print("\n".join(lines) if lines else "no differences")
    return 0


# ----------------------------------------------------------------------------- hf


def add_hf_parser(sub) -> None:
    hfp = sub.add_parser("hf", help="Hugging Face export, import and parity check").add_subparsers(
        dest="action", required=True
    )
    exp = hfp.add_parser("export", help="write a ModernBertForMaskedLM / ModernBertDecoderForCausalLM directory")
    exp.add_argument("--checkpoint", help="an ettin model folder (model.safetensors + model.json)")
    exp.add_argument("--config", help="build from this experiment instead, randomly initialized")
    exp.add_argument("--init-seed", type=int, default=21, help="seed for --config initialization (default 21)")
    exp.add_argument("--tokenizer", help="tokenizer.json to ship with the model")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument(
        "--verify-all",
        action="store_true",
        help="check the weights' digest against the checkpoint's manifest too (reads the file twice); "
        "sizes and the small files are always checked",
    )
    exp.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (with --config)")
    exp.set_defaults(func=cmd_hf_export)
    imp = hfp.add_parser("import", help="read a Hugging Face ModernBERT(-decoder) directory into ettin weights")
    imp.add_argument("dir", help="Hugging Face model directory")
    imp.add_argument("--out", required=True, help="output ettin model folder")
    imp.set_defaults(func=cmd_hf_import)
    chk = hfp.add_parser("check", help="compare transformers' logits with ours on random documents")
    chk.add_argument("dir", help="Hugging Face model directory")
    chk.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference| (default 1e-4)")
    chk.add_argument("--lengths", type=int, nargs="+", default=[1, 5, 64, 129, 300], help="document lengths to test")
    chk.add_argument("--seed", type=int, default=0)
    chk.set_defaults(func=cmd_hf_check)


def _build(cfg, seed: int):
    import torch

    from ettin.parallel import init_process_groups

    init_process_groups(cfg.parallel.tensor)
    torch.manual_seed(seed)
    return cfg.model.build()


def cmd_hf_export(args) -> int:
    from ettin import hf
    from ettin.parallel import full_state_dict

    if bool(args.checkpoint) == bool(args.config):
        raise ConfigError("hf export needs exactly one of --checkpoint PATH or --config EXPERIMENT")
    if args.checkpoint:
        model_cfg, state = hf.load_weights(args.checkpoint, verify_all=args.verify_all)
        objective = hf.checkpoint_objective(args.checkpoint)
    else:
        cfg = load_config(args.config, args.overrides)
        model_cfg, state, objective = cfg.model, full_state_dict(_build(cfg, args.init_seed)), cfg.objective.name
    out = hf.export(model_cfg, state, args.out, tokenizer=args.tokenizer, objective=objective)
    print(f"wrote {hf.DECODER if model_cfg.causal else hf.ENCODER} to {out}")
    return 0


def cmd_hf_import(args) -> int:
    from ettin import hf

    cfg, state = hf.load_hf(args.dir)
    out = hf.save_weights(args.out, cfg, state)
    print(f"wrote ettin weights ({'decoder' if cfg.causal else 'encoder'}, {cfg.num_layers} layers) to {out}")
    return 0


def cmd_hf_check(args) -> int:
    from ettin import hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = hf.compare_with_transformers(args.dir, lengths=args.lengths, seed=args.seed)
    ok = result["finite"] and result["max_abs_diff"] <= args.tolerance
    print(
        f"{result['model']}: documents of {result['lengths']} tokens; largest |logit| {result['max_abs_logit']:.3g}; "
        f"largest difference {result['max_abs_diff']:.3g} (tolerance {args.tolerance:g}); "
        f"{'all finite' if result['finite'] else 'NON-FINITE logits'} -> {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


# ----------------------------------------------------------------------------- data-order


def add_data_order_parser(sub) -> None:
    order = sub.add_parser("data-order", help="the global data order: predict it, or export a run's").add_subparsers(
        dest="action", required=True
    )
    oshow = order.add_parser("show", help="print the batches of steps A..B-1 without training")
    oshow.add_argument("experiment")
    oshow.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    oshow.add_argument("--steps", required=True, help="A:B")
    oshow.add_argument("--samples", action="store_true", help="list every sample (position, source, index, length, id)")
    oshow.set_defaults(func=cmd_data_order_show)
    oexp = order.add_parser("export", help="parquet rows (step, input_ids, source, sample_index, id) per checkpoint")
    oexp.add_argument("path", help="a run folder or one checkpoint folder")
    oexp.add_argument("--out", required=True)
    oexp.set_defaults(func=cmd_data_order_export)


def _step_range(text: str) -> range:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--steps '{text}' must look like A:B (steps A to B-1)") from None
    if not 0 <= a < b:
        raise ConfigError(f"--steps '{text}': need 0 <= A < B")
    return range(a, b)


def cmd_data_order_show(args) -> int:
    from collections import Counter

    from ettin.data.collate import step_hash
    from ettin.data.loader import DataPipeline

    cfg = load_config(args.experiment, args.overrides)
    pipeline = DataPipeline.from_config(cfg)
    print(f"# {cfg.name}: fingerprint {pipeline.manifest.fingerprint()[:16]}, seed {cfg.phase.seed}")
    for step in _step_range(args.steps):
        start, end = pipeline.schedule.bounds(step)
        rows = pipeline.samples(start, end)
        batch = pipeline.collator([r["input_ids"] for r in rows], [r["position"] for r in rows])
        mix = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["source"] for r in rows).items()))
        print(
            f"step {step}: positions [{start}, {end}), {end - start} samples, {batch.num_tokens} tokens, "
            f"hash {step_hash(batch.digests)[:16]} ({mix})"
        )
        if args.samples:
            for r in rows:
                print(
                    f"  {r['position']:>10} {r['source']:<20} {r['sample_index']:>10} {len(r['input_ids']):>6} "
                    f"{r['id']}"
                )
    return 0


def cmd_data_order_export(args) -> int:
    from ettin.data.ledger import export_order

    for folder in export_order(_checkpoints_of(args.path), args.out):
        print(f"wrote {folder}")
    return 0


# ----------------------------------------------------------------------------- checkpoint


def add_checkpoint_parser(sub) -> None:
    ckpt = sub.add_parser("checkpoint", help="check checkpoints").add_subparsers(dest="action", required=True)
    verify = ckpt.add_parser(
        "verify",
        help="check every file of a run's checkpoints against their manifests",
        description="Check every file of each checkpoint (size and XXH3-128 digest) against its manifest.json and "
        "print one line per checkpoint: OK, BAD with the damaged file, or unverified (written before manifests). "
        "Exit 2 when any is damaged.",
    )
    verify.add_argument("path", help="a run folder or one checkpoint folder")
    verify.set_defaults(func=cmd_checkpoint_verify)


def cmd_checkpoint_verify(args) -> int:
    """Every file of every checkpoint against its manifest, digests included; one line each."""
    from ettin.fileio import FileError
    from ettin.train.checkpoint import verify_checkpoint

    found, bad = _checkpoints_of(args.path), 0
    for path in found:
        try:
            verified = verify_checkpoint(path, hash_limit=None)
        except FileError as e:
            bad += 1
            print(f"{path}: BAD {e.path.name}: {e.problem}", flush=True)
            continue
        print(
            f"{path}: OK"
            if verified
            else f"{path}: unverified (no manifest.json: written before ettin kept one; its files open and parse)",
            flush=True,
        )
    if bad:
        raise EttinError(
            f"{bad} of {len(found)} checkpoint(s) damaged: resume and export fall back to or name them; "
            "restore them from a copy or delete them"
        )
    return 0


# ----------------------------------------------------------------------------- replay


def add_replay_parser(sub) -> None:
    rep = sub.add_parser("replay", help="rebuild a step's batch from the data and check it against the ledger")
    rep.add_argument("checkpoint")
    rep.add_argument("--step", type=int, required=True)
    rep.add_argument("--decode", action="store_true", help="print the batch's text")
    rep.add_argument("--tokenizer", help="tokenizer.json for --decode")
    rep.set_defaults(func=cmd_replay)


def cmd_replay(args) -> int:
    from ettin.data.ledger import replay

    r = replay(args.checkpoint, args.step)
    print(
        f"step {r['step']}: positions {r['positions']} (ledger {r['ledger_positions']}), {r['tokens']} tokens "
        f"(ledger {r['ledger_tokens']}), hash {r['hash'][:16]} (ledger {r['ledger_hash'][:16]}), "
        f"fingerprint {'same' if r['fingerprint_ok'] else 'CHANGED'} -> {'MATCH' if r['match'] else 'MISMATCH'}"
    )
    if args.decode:
        from tokenizers import Tokenizer

        from ettin.data.ledger import checkpoint_config

        tokenizer_path = args.tokenizer or checkpoint_config(args.checkpoint).data.tokenizer
        if not tokenizer_path:
            raise ConfigError("--decode needs --tokenizer PATH (tokenizer.json), or data.tokenizer in the run's config")
        if not os.path.isfile(tokenizer_path):
            raise ConfigError(f"tokenizer file {tokenizer_path} not found: pass --tokenizer PATH (a tokenizer.json)")
        try:
            tok = Tokenizer.from_file(tokenizer_path)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise ConfigError(f"tokenizer file {tokenizer_path} cannot be read ({str(e).splitlines()[0]})") from None
        b = r["batch"]
        for n, (s, e) in enumerate(zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist())):
            print(f"--- position {int(b.positions[n])}")
            print(tok.decode(b.input_ids[s:e].tolist(), skip_special_tokens=False))
    return 0 if r["match"] else 1


# ----------------------------------------------------------------------------- demo


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the main job end to end on this machine (what `make demo` runs)")
    demo.add_argument("--out", default="demo_out", help="working folder (recreated)")
    demo.add_argument("--steps", type=int, default=200, help="optimizer steps per model")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ettin.demo import main as demo

    return demo(["--out", args.out, "--steps", str(args.steps)])


# ----------------------------------------------------------------------------- eval


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score checkpoints on the run's held-out sets (the in-loop numbers, again)",
        description="Evaluate a checkpoint, or every checkpoint of a run folder, on the run's "
        "validation sets (data.validation parts and eval.sets), with the same numbers "
        "as the in-loop evaluation. One process, or torchrun/srun for DP x TP. A run "
        "folder gets eval.csv, eval.md and eval.png. An exported Hugging Face folder "
        "is scored through transformers on the sets of --like RUN. --compare puts the "
        "in-loop validation curves of several runs side by side.",
    )
    p.add_argument(
        "target", nargs="?", help="a checkpoint folder, a run folder, or a Hugging Face folder (with --like)"
    )
    p.add_argument("overrides", nargs="*", help="key=value over the checkpoint's config (e.g. eval.max_tokens=100000)")
    p.add_argument("--sets", help="comma-separated set names (default: all)")
    p.add_argument("--out", help="where a run folder's table goes (default: the run folder)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="runs to put side by side (e.g. encoder and decoder)")
    p.add_argument(
        "--like",
        metavar="RUN_OR_CHECKPOINT",
        help="for a Hugging Face folder: the run whose sets, masks and token budget to use",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import torch.distributed as dist

    from ettin.train.evaluate import (
        checkpoints_of,
        compare_runs,
        evaluate_checkpoints,
        format_table,
        is_hf_folder,
        write_table,
    )

    if args.compare:
        print(compare_runs(args.compare))
        return 0
    if not args.target:
        raise ConfigError("ettin eval needs a checkpoint or run folder (or --compare RUN_A RUN_B)")
    rows = evaluate_checkpoints(args.target, args.overrides, args.sets.split(",") if args.sets else None, args.like)
    if dist.get_rank() != 0:
        return 0
    print(format_table(rows))
    if not is_hf_folder(args.target) and checkpoints_of(args.target)[1]:
        for path in write_table(rows, args.out or args.target):
            print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The whole ``ettin`` parser; the order here is the order of ``ettin --help``."""
    from ettin.data.commands import add_data_parser
    from ettin.launch.plan import add_plan_parser

    p = argparse.ArgumentParser(prog="ettin", description="Train paired encoder (MLM) / decoder (CLM) models.")
    sub = p.add_subparsers(dest="command", required=True)
    add_data_parser(sub)
    add_train_parser(sub)
    add_plot_parser(sub)
    add_plan_parser(sub)
    add_launch_parser(sub)
    add_config_parser(sub)
    add_hf_parser(sub)
    add_data_order_parser(sub)
    add_checkpoint_parser(sub)
    add_replay_parser(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
