"""CPU train step (forward + backward + optimizer) of ours vs transformers' ModernBERT classes.

    .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--repeats 2] [--smoke]

The same 17m-shaped config (vocab 50,368) and the same batch of 8 documents of 130-1,024 tokens:
ours unpadded (cu_seqlens; MLM head only on masked tokens), transformers padded as its users
would (attention_mask, labels -100 on padding), two ways: to the longest document of the batch
(``padding="longest"``), and to the sequence length 1,024 (``padding="max_length"``, the setup the
issue's baseline of "half of it padding" describes). Prints non-pad tokens/s and the ratios, for
the encoder (MLM, 30% masking) and the decoder (CLM). Figures only; no thresholds.
"""

from __future__ import annotations

import argparse
import time

import torch


def batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(5, vocab, (n,), generator=g) for n in lengths]
    return docs


def time_steps(step, repeats):
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model and batch, to check the script runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin.config import IGNORE, load_config
    from ettin.hf import hf_config
    from ettin.parallel import init_process_groups
    from ettin.train.optim import StableAdamW

    init_process_groups(1)
    overrides = ["model.attn_out_dropout=0.0"]
    if args.smoke:
        overrides += [
            "model.vocab_size=512",
            "model.hidden_size=64",
            "model.intermediate_size=96",
            "model.num_heads=2",
            "model.num_layers=2",
            "model.pad_token_id=0",
            "model.cls_token_id=1",
            "model.sep_token_id=2",
            "model.mask_token_id=3",
        ]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(130, 1025, (8,), generator=g).tolist() if not args.smoke else [40, 70, 20]
    seq_len = 1024 if not args.smoke else 80
    rows = []
    for objective in ("mlm", "clm"):
        cfg = load_config("ettin", ["model=17m", f"objective={objective}", *overrides])
        m = cfg.model
        docs = batch(lengths, m.vocab_size)
        ids = torch.cat(docs)
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        if objective == "mlm":
            labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, IGNORE)
        else:
            labels = torch.roll(ids, -1)
            labels[cu[1:] - 1] = IGNORE
        torch.manual_seed(0)
        ours = m.build(attn_backend="sdpa").train()
        opt = StableAdamW(ours.parameters(), lr=1e-4)

        def ours_step():
            loss = ours(ids, cu, labels=labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        cls = ModernBertForMaskedLM if objective == "mlm" else ModernBertDecoderForCausalLM
        hf_cfg = hf_config(m)
        hf_cfg._attn_implementation = "sdpa"
        theirs = cls(hf_cfg).train()
        hf_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

        def hf_step(padded, mask, hf_labels):
            loss = theirs(input_ids=padded, attention_mask=mask, labels=hf_labels).loss
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        t_ours = time_steps(ours_step, args.repeats)
        t_hf = [
            time_steps(lambda: hf_step(*pad(docs, labels, cu, width, m.pad_token_id, objective)), args.repeats)
            for width in (max(lengths), seq_len)
        ]
        rows.append((objective, int(ids.numel()), t_ours, t_hf))

    print(f"batch: {len(lengths)} documents, {sum(lengths)} tokens ({lengths}); threads {args.threads}")
    print(f"HF padded to the longest document ({max(lengths)}) and to the sequence length ({seq_len})")
    print(
        f"{'model':<8} {'ours s/step':>11} {'HF longest':>11} {'HF max_len':>11} {'ours tok/s':>11} "
        f"{'ratio longest':>14} {'ratio max_len':>14}"
    )
    for objective, n, t_ours, (t_longest, t_max) in rows:
        name = "encoder" if objective == "mlm" else "decoder"
        print(
            f"{name:<8} {t_ours:>11.2f} {t_longest:>11.2f} {t_max:>11.2f} {n / t_ours:>11,.0f} "
            f"{t_longest / t_ours:>13.2f}x {t_max / t_ours:>13.2f}x"
        )


def pad(docs, labels, cu, width, pad_id, objective):
    """The batch as transformers' users feed it: [docs, width] ids, attention mask, labels."""
    from ettin.config import IGNORE

    padded = torch.full((len(docs), width), pad_id)
    mask = torch.zeros_like(padded)
    hf_labels = torch.full_like(padded, IGNORE)
    for row, (d, s, e) in enumerate(zip(docs, cu[:-1].tolist(), cu[1:].tolist())):
        padded[row, : len(d)], mask[row, : len(d)] = d, 1
        hf_labels[row, : len(d)] = labels[s:e] if objective == "mlm" else d  # HF shifts CLM labels itself
    return padded, mask, hf_labels


if __name__ == "__main__":
    main()
