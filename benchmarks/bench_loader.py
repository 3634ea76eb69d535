"""Loader throughput vs mosaicml-streaming's StreamingDataset on the same shards, and resume cost.

    .venv/bin/python benchmarks/bench_loader.py [--samples 20000] [--workers 2] [--smoke]

Writes a synthetic corpus of ~1,000-token samples as zstd MDS shards (streaming's MDSWriter), then
measures in one process:
- ours: ettin's DataPipeline + RankSteps + DataLoader, MLM masking at 30%, global order on;
- peer: streaming.StreamingDataset over a decompressed copy of the same shards, through a
  DataLoader with the same worker count (no masking: the peer does less work);
- resume cost: computing the batch at position 0 vs near the end of a 2·10^9-sample phase.
Both loaders hand over 512 samples per item (ours: one step of this rank; the peer: a DataLoader
batch). Rates are steady state, timed from the first item on; the wait for that first item
(worker start-up) is printed beside them. Prints samples/s, tokens/s and the ratios. No
thresholds: figures only.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import torch


def write_corpus(root: Path, samples: int) -> None:
    from ettin.testing import synthetic_corpus, write_mds_source

    half = samples // 2
    tok = {"tokenizer": {"sha256": "bench", "vocab_size": 50368}}
    write_mds_source(root / "a", synthetic_corpus(half, 50368, 1, 600, 1400), size_limit=1 << 26, stats=tok)
    write_mds_source(root / "b", synthetic_corpus(samples - half, 50368, 2, 600, 1400), size_limit=1 << 26, stats=tok)


def bench_ours(root: Path, workers: int, steps: int) -> tuple[float, float, float]:
    from ettin.config import load_config
    from ettin.data.loader import DataPipeline, RankSteps, build_loader

    exp = root / "exp.yaml"
    exp.write_text(
        textwrap.dedent(f"""\
        defaults: {{model: 17m, objective: mlm, phase: pretrain}}
        phase: {{tokens: 1e12, seq_len: 1024}}
        batch: {{global_size: 512, warmup_tokens: 0}}
        data: {{root: {root}, cache_dir: {root / "cache"}, sources: [{{name: a, path: a, weight: 1}}, {{name: b, path: b, weight: 1}}]}}
        """)
    )
    cfg = load_config(str(exp))
    pipeline = DataPipeline.from_config(cfg)
    pipeline.batch(0, 1)  # decompress shards into the cache outside the timing
    for r in pipeline.readers:
        for k in range(len(r.shards)):
            r.shard_file(k)
    dataset = RankSteps(pipeline)
    return steady_rate(
        ((len(b.positions), b.num_tokens) for _, b in build_loader(dataset, 0, steps, workers=workers)), workers
    )


def steady_rate(batches, workers: int) -> tuple[float, float, float]:
    """(samples/s, tokens/s) from the ``workers``-th item on (the first ones were built during the
    start-up), and the seconds to the first item (worker start-up)."""
    start = time.perf_counter()
    samples = tokens = items = 0
    for i, (n, t) in enumerate(batches):
        if i == 0:
            first = time.perf_counter() - start
        if i == max(0, workers - 1):
            steady = time.perf_counter()
        elif i >= workers:
            samples, tokens, items = samples + n, tokens + t, items + 1
    if items < 2:
        raise SystemExit(f"bench_loader: only {items} timed items; pass a larger --samples")
    seconds = time.perf_counter() - steady
    return samples / seconds, tokens / seconds, first


def bench_streaming(root: Path, workers: int, limit: int) -> tuple[float, float, float]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    local = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    try:
        from streaming import Stream

        streams = [Stream(remote=str(root / s), local=str(local / s)) for s in ("a", "b")]
        ds = StreamingDataset(streams=streams, shuffle=True, shuffle_seed=21, batch_size=512, predownload=1024)
        for _ in torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers, collate_fn=list):
            pass  # first pass downloads and decompresses (not timed)
        loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers, collate_fn=list)
        return steady_rate(
            ((len(b), sum(len(x["input_ids"]) for x in b)) for b in itertools.islice(loader, limit // 512)), workers
        )
    finally:
        shutil.rmtree(local, ignore_errors=True)
        clean_stale_shared_memory()


def bench_resume() -> tuple[float, float]:
    from ettin.data.order import GlobalOrder

    shares = [837.2, 356.6, 263.9, 80.3, 57.3, 28.0, 19.6, 16.6, 12.7, 12.6, 7.3, 7.3, 5.3]
    order = GlobalOrder([2 * 10**9 // len(shares)] * len(shares), shares, seed=21)
    out = []
    for position in (0, 2 * 10**9 - 10_000):
        start = time.perf_counter()
        for _ in range(5):
            GlobalOrder(order.samples, shares, 21)(position, position + 4608)  # fresh: no cached block
        out.append((time.perf_counter() - start) / 5)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = p.parse_args()
    n = 3072 if args.smoke else args.samples
    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        write_corpus(root, n)
        steps = max(1, n // 512 - 1)
        ours = bench_ours(root, args.workers, steps)
        peer = bench_streaming(root, args.workers, steps * 512)
        r0, r_end = bench_resume()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{'loader (' + str(args.workers) + ' workers, steady state)':<34} {'samples/s':>10} {'tokens/s':>12} "
        f"{'first batch':>12}"
    )
    for name, (rate, tokens, first) in (("ettin (order + MLM masking)", ours), ("streaming.StreamingDataset", peer)):
        print(f"{name:<34} {rate:>10,.0f} {tokens:>12,.0f} {first * 1e3:>9,.0f} ms")
    print(f"{'ratio ettin / streaming':<34} {ours[0] / peer[0]:>10.2f}x")
    print(
        f"resume: one 4,608-sample batch at position 0 {r0 * 1e3:.1f} ms, at 2e9-1e4 {r_end * 1e3:.1f} ms "
        f"(ratio {r_end / r0:.2f})"
    )


if __name__ == "__main__":
    main()
