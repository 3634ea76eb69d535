"""The ``ettin`` command line. Every user mistake ends as one ``error:`` line and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

# torch warns "No CUDA runtime is found" on every CPU machine; keep stderr for what matters
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from ettin.config import ConfigError, list_configs, load_config, to_yaml


def _overrides_help() -> str:
    return "key=value overrides (e.g. model=400m objective=clm optim.lr=1e-3)"


def cmd_config_list(args) -> int:
    for group, names in list_configs().items():
        print(f"{group:<11} {' '.join(names)}")
    return 0


def cmd_config_show(args) -> int:
    from ettin.flops import flops_per_token, num_parameters

    cfg = load_config(args.experiment, args.overrides)
    m = cfg.model
    print(f"# {cfg.name}: {' '.join(f'{k}={v}' for k, v in cfg.groups.items())}")
    print(f"# parameters {num_parameters(m) / 1e6:.1f}M, training FLOPs/token at seq {cfg.phase.seq_len}: "
          f"{flops_per_token(m, cfg.phase.seq_len)['total'] / 1e9:.3f} GFLOP")
    print(to_yaml(cfg), end="")
    return 0


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
        model_cfg, state = hf.load_weights(args.checkpoint)
    else:
        cfg = load_config(args.config, args.overrides)
        model_cfg, state = cfg.model, full_state_dict(_build(cfg, args.init_seed))
    out = hf.export(model_cfg, state, args.out, tokenizer=args.tokenizer)
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
    print(f"{result['model']}: documents of {result['lengths']} tokens; largest |logit| {result['max_abs_logit']:.3g}; "
          f"largest difference {result['max_abs_diff']:.3g} (tolerance {args.tolerance:g}); "
          f"{'all finite' if result['finite'] else 'NON-FINITE logits'} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def cmd_demo(args) -> int:
    """Build the model from a config and run one forward/backward per objective on random documents."""
    import torch

    from ettin.flops import num_parameters
    from ettin.model import IGNORE

    print(f"{'objective':<9} {'params':>8} {'tokens':>7} {'loss':>7} {'grad norm':>9} {'fwd+bwd s':>9} {'tokens/s':>9}")
    for objective in ("mlm", "clm"):
        cfg = load_config(args.experiment, [*args.overrides, f"objective={objective}"])
        model = _build(cfg, args.seed)
        g = torch.Generator().manual_seed(args.seed)
        lengths = torch.randint(cfg.phase.seq_len // 8, cfg.phase.seq_len + 1, (args.docs,), generator=g)
        ids = torch.randint(0, cfg.model.vocab_size, (int(lengths.sum()),), generator=g)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        if objective == "mlm":
            labels = torch.where(torch.rand(ids.shape, generator=g) < cfg.objective.mask_rate, ids, IGNORE)
        else:  # next token, never across a document boundary
            labels = torch.roll(ids, -1)
            labels[cu[1:] - 1] = IGNORE
        start = time.perf_counter()
        loss = model(ids, cu, labels=labels)
        loss.backward()
        seconds = time.perf_counter() - start
        grad = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        print(f"{objective:<9} {num_parameters(cfg.model) / 1e6:>7.1f}M {len(ids):>7} {loss.item():>7.3f} "
              f"{grad.item():>9.3f} {seconds:>9.2f} {len(ids) / seconds:>9.0f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ettin", description="Train paired encoder (MLM) / decoder (CLM) models.")
    sub = p.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="list and show configurations").add_subparsers(dest="action", required=True)
    config.add_parser("list", help="list experiments and group files").set_defaults(func=cmd_config_list)
    show = config.add_parser("show", help="print the resolved config of an experiment")
    show.add_argument("experiment", help="name in configs/experiment/ or a YAML path")
    show.add_argument("overrides", nargs="*", help=_overrides_help())
    show.set_defaults(func=cmd_config_show)

    hfp = sub.add_parser("hf", help="Hugging Face export, import and parity check").add_subparsers(dest="action", required=True)
    exp = hfp.add_parser("export", help="write a ModernBertForMaskedLM / ModernBertDecoderForCausalLM directory")
    exp.add_argument("--checkpoint", help="an ettin model folder (model.safetensors + model.json)")
    exp.add_argument("--config", help="build from this experiment instead, randomly initialized")
    exp.add_argument("--init-seed", type=int, default=21, help="seed for --config initialization (default 21)")
    exp.add_argument("--tokenizer", help="tokenizer.json to ship with the model")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("overrides", nargs="*", help=_overrides_help() + " (with --config)")
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

    demo = sub.add_parser("demo", help="build a model from a config and run a forward/backward")
    demo.add_argument("experiment", nargs="?", default="tiny")
    demo.add_argument("overrides", nargs="*", help=_overrides_help())
    demo.add_argument("--docs", type=int, default=8, help="random documents in the batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ettin.hf import ConversionError

    try:
        return args.func(args)
    except (ConfigError, ConversionError, FileNotFoundError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
