"""bf16 train-step throughput and MFU on one GPU: ours (each attention backend) vs transformers.

    python benchmarks/gpu_step.py                 # on an H100/H200: the full table, well under 10 min
    python benchmarks/gpu_step.py --smoke         # anywhere (CPU included): tiny shapes, one step each

For 150m, 400m and 1b (and 150m at 7,999), encoder and decoder: the same batch of full-length
documents through our model with every available backend (flash-attn varlen if installed,
FlexAttention, SDPA) and through transformers' ModernBERT class with SDPA. A step is forward +
backward + fused AdamW on bf16 weights, timed after warm-up with CUDA events. MFU is against the
bf16 matmul peak measured here (printed), with FLOPs from ``ettin.flops.flops_per_token``.
Needs only torch, transformers, megatron-core and this repository (no registry on GPU machines).
"""
from __future__ import annotations

import argparse
import time

import torch

CASES = [("150m", 1024), ("150m", 7999), ("400m", 1024), ("1b", 1024)]
TOKENS_PER_STEP = 16384


def measured_peak(device, dtype) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - start)


def timed(step, device, repeats: int) -> float:
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed, one timed step")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin.attention import available_backends
    from ettin.config import load_config
    from ettin.data.collate import IGNORE
    from ettin.flops import flops_per_token
    from ettin.hf import hf_config
    from ettin.parallel import init_process_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("error: no CUDA device here; run with --smoke to check the script on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_process_groups(1)
    peak = measured_peak(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}; measured {dtype} matmul peak {peak / 1e12:.0f} TFLOP/s; {TOKENS_PER_STEP} tokens per step")
    cases = [("17m", 256)] if args.smoke else CASES
    repeats = 1 if args.smoke else args.repeats
    tiny = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=96", "model.num_heads=2",
            "model.num_layers=3", "model.pad_token_id=0", "model.cls_token_id=1", "model.sep_token_id=2",
            "model.mask_token_id=3"] if args.smoke else []
    print(f"{'size':<5} {'seq':>5} {'model':<7} {'impl':<12} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8}")
    for size, seq in cases:
        for objective in ("mlm", "clm"):
            cfg = load_config("ettin", [f"model={size}", f"objective={objective}", f"phase.seq_len={seq}",
                                        "model.attn_out_dropout=0.0", *tiny])
            m = cfg.model
            docs = max(1, (TOKENS_PER_STEP if not args.smoke else 512) // seq)
            ids = torch.randint(5, m.vocab_size, (docs * seq,), device=device)
            cu = torch.arange(0, docs + 1, device=device, dtype=torch.int32) * seq
            if objective == "mlm":
                labels = torch.where(torch.rand(ids.shape, device=device) < 0.3, ids, IGNORE)
            else:
                labels = torch.roll(ids, -1)
                labels[cu[1:].long() - 1] = IGNORE
            fpt = flops_per_token(m, seq)["total"]
            impls = {f"ours/{b}": b for b in available_backends() if not (b == "flex" and device.type != "cuda")}
            impls["hf/sdpa"] = None
            for impl, backend in impls.items():
                torch.manual_seed(0)
                if backend is not None:
                    model = m.build(attn_backend=backend).to(device, dtype)

                    def forward(model=model):
                        return model(ids, cu, seq, labels=labels)
                else:
                    cls = ModernBertForMaskedLM if objective == "mlm" else ModernBertDecoderForCausalLM
                    hf = hf_config(m)
                    hf._attn_implementation = "sdpa"
                    model = cls(hf).to(device, dtype)
                    hf_ids, hf_labels = ids.view(docs, seq), (labels if objective == "mlm" else ids).view(docs, seq)

                    def forward(model=model, hf_ids=hf_ids, hf_labels=hf_labels):
                        return model(input_ids=hf_ids, labels=hf_labels).loss
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

                def step(forward=forward, opt=opt):
                    forward().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    seconds = timed(step, device, repeats)
                except torch.OutOfMemoryError:
                    print(f"{size:<5} {seq:>5} {objective:<7} {impl:<12} {'out of memory':>10}")
                    continue
                rate = docs * seq / seconds
                memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                print(f"{size:<5} {seq:>5} {objective:<7} {impl:<12} {rate:>10,.0f} {fpt * rate / peak:>6.1%} {memory:>8.1f}",
                      flush=True)
                del model, opt


if __name__ == "__main__":
    main()
