"""Peak GPU memory per rank of a training run, predicted from the config: micro-batch budgets
(``batch.micro_tokens = 0`` picks the largest that fits ``train.device_memory_gb``) and a check
that refuses a run that would not fit, before anything is allocated.

The model of one rank (``P`` = this rank's parameters: the TP-split matrices, the embedding and
the vocab bias divided by ``tp``, norms and the head's dense layer whole; ``dp`` = data-parallel
ranks; bytes):

- **weights**: the bf16 working copy, ``2P`` (DeepSpeed flattens the parameters into one buffer
  per group; the parameters are views of it).
- **master_and_moments**: fp32 master weights and StableAdamW's two fp32 moments, ``12P / dp`` —
  ZeRO stage 1 and 2 both partition them over DP (``bf16_optimizer.py:182``,
  ``stage_1_and_2.py:577``; the moments live on those flat partitions, ``train/optim.py``).
- **grads**, by which DeepSpeed optimizer runs (``engine.py:2305``, ``_do_optimizer_sanity_check``):

  - ZeRO-1 with ``train.grad_accum_dtype = fp32`` is ``BF16_Optimizer``: a full, *unpartitioned*
    fp32 accumulation buffer of every gradient (``bf16_optimizer.py:191``, ``zeros_like`` of the
    whole flat bf16 group) plus the bf16 ``param.grad``s, which stay allocated between steps
    (``clear_lp_grads`` zeroes them, ``bf16_optimizer.py:612``; ``immediate_grad_update`` is off
    by default, ``precision_config.py:51``): ``6P``.
  - ZeRO-2 with fp32 accumulation is ``DeepSpeedZeroOptimizer`` with ``partition_grads``: bf16
    gradients are copied into a reduce bucket (``reduce_bucket_size`` elements, bf16,
    ``stage_1_and_2.py:3266``), reduce-scattered, and accumulated into this rank's fp32 partition
    (``stage_1_and_2.py:1270``): ``4P / dp`` + the bucket + the bf16 gradient of any parameter
    larger than the bucket (it bypasses it, ``stage_1_and_2.py:1449``: the embeddings of 400m and 1b);
    train/engine.py turns on ``overlap_comm`` at ZeRO-2, so there are two buckets, and casts one to
    fp32 for the wire (``communication_data_type = grad_accum_dtype``).
  - ``grad_accum_dtype = bf16``: ZeRO-1 keeps full bf16 ``param.grad``s and a bf16 copy of its
    partition (``2P + 2P / dp``); ZeRO-2 the buckets and a bf16 partition (``2P / dp``).
- **activations**: what autograd keeps for the backward (``activation_bytes_per_token``) times
  ``max(micro_tokens, seq_len)`` tokens (a sample longer than the budget gets a micro-batch of its
  own), plus one layer's worth again as the backward's working space (activation gradients,
  flash-attn's fp32 ``dq`` accumulator).
- **head**: the fused vocab head + cross-entropy keeps ``grad_w [V/tp, h]`` and ``grad_b`` in
  fp32 from the forward to the backward, with a ``[1024, V/tp]`` fp32 chunk buffer in the forward;
  its backward makes an fp32 and a bf16 copy of ``grad_w`` while the saved one still exists: the
  larger of the two moments counts. (Per labelled token it also keeps an fp32 ``grad_x``: that is
  in ``activation_bytes_per_token``.)
- **step transient**: after the backward (activations freed) the step makes temporaries:
  ``BF16_Optimizer``'s all-reduce flattens up to 500M fp32 gradient elements per bucket
  (``engine.py:151``, ``engine.py:3796``; sent in fp32, no cast: train/engine.py sets
  ``communication_data_type``), StableAdamW a few fp32 tensors of the partition's size. The total
  takes ``max(activations + head, step transient)``.
- **overhead**: a fixed ``FIXED_OVERHEAD_GB`` (CUDA context, cuBLAS/cuDNN workspaces, NCCL
  communicators and buffers for the DP and TP groups) plus ``FRAGMENTATION`` of everything else
  (the caching allocator's fragmentation and rounding).

GB here are 1e9 bytes (an "80GB" H100 holds 80 GiB, 85.9e9 bytes: ``device_memory_gb=80`` leaves it
a little spare). DeepSpeed line numbers are of deepspeed 0.19.8 (runtime/…).

``default_micro_tokens`` leaves ``HEADROOM`` of the device free on top of that; ``check_fits``
refuses only what is predicted not to fit at all. The activation count is checked against what a
real forward keeps (tests/test_memory.py); the rest is the accounting above.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ettin.config import ConfigError, ModelConfig
from ettin.errors import EttinError
from ettin.flops import label_fraction

GB = 1e9
HEADROOM = 0.10  # default budgets leave this fraction of train.device_memory_gb unplanned
FIXED_OVERHEAD_GB = 2.5  # CUDA context + library workspaces (~1 GB), NCCL communicators and buffers (~1 GB), slack
FRAGMENTATION = 0.05  # caching-allocator fragmentation, as a fraction of the allocated peak
BUDGET_MULTIPLE = 1024  # default budgets are rounded down to this many tokens
REDUCE_BUCKET_ELEMENTS = 50_000_000  # train/engine.py's zero_optimization.reduce_bucket_size
ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (engine.py:151): BF16_Optimizer's reduce
OPTIMIZER_TEMPORARIES = 4  # fp32 partition-sized temporaries of a StableAdamW step (g², ratio, sqrt, update)
HEAD_CHUNK = 1024  # linear_cross_entropy's token chunk
PARAM_BYTES = 2  # bf16 working weights and activations on the GPU


def local_parameters(cfg: ModelConfig, tp: int) -> int:
    """Parameters on one rank: the TP-split ones divided by ``tp`` (= ``num_parameters`` at tp=1)."""
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    split = v * h + v + n * (4 * h * h + 3 * h * i)  # embedding, vocab bias, qkv, attn out, Wi, Wo
    whole = (
        n * h + (n - 1) * h + 3 * h + h * h
    )  # mlp norms, attn norms (not layer 0), embed/final/head norms, head dense
    return split // tp + whole


def layer_bytes_per_token(
    cfg: ModelConfig, dtype_bytes: int, tp: int, first: bool = False, attention: str = "flash"
) -> float:
    """What one block's forward keeps for the backward, per token (see :func:`activation_bytes_per_token`)."""
    h, i, b = cfg.hidden_size, cfg.intermediate_size, dtype_bytes
    stats = 2 * 4  # a LayerNorm's fp32 mean and rstd per token
    whole = 4 * h * b + 2 * stats  # attn_norm's input (the residual) and output, mlp_norm's input and output
    split = (
        (6 * h + 4 * i) * b / tp
    )  # qkv (whole storage, v is a view), rope'd q and k, attention out; Wi out, gelu, product
    if first:  # layer 0 has no attention norm: the embedding norm's output goes straight to qkv
        whole -= h * b + stats
    out = whole + split + attention_saved_bytes_per_token(cfg, dtype_bytes, tp, attention)
    if cfg.attn_out_dropout > 0:
        out += h  # dropout's bool mask, after the row-parallel all-reduce (whole h)
    if dtype_bytes != 4:
        out += 4 * cfg.head_dim * b  # rotate(): cos/sin cast from fp32 per call, saved by the two muls, for q and k
    return out


def attention_saved_bytes_per_token(cfg: ModelConfig, dtype_bytes: int, tp: int, attention: str = "flash") -> float:
    """What the attention kernel keeps beyond q, k, v and its output (counted in the layer): the
    fp32 logsumexp per head. ``attention="flash"``: the GPU kernels (flash-attn varlen, torch's
    ``varlen_attn``, FlexAttention) save q, k, v, out and the logsumexp, never the n² matrix; ``v``
    goes in as a strided view of the qkv output, so that whole storage stays (a kernel that copied
    ``v`` contiguous would free it: ``2h/tp`` less, so this errs high). ``attention="sdpa"``: the CPU SDPA
    backend's per-document path (global layers), whose per-document outputs are copied into a
    fresh tensor, so the output is kept twice. SDPA's blocked local path (gathered key blocks, a
    mask) is not modelled: compare all-global configs (``model.global_every=1``) on the CPU."""
    lse = 4 * cfg.num_heads / tp
    if attention == "flash":
        return lse
    if attention == "sdpa":
        return lse + cfg.hidden_size * dtype_bytes / tp
    raise EttinError(f"attention must be flash or sdpa, got {attention!r}")


def activation_bytes_per_token(
    model_cfg: ModelConfig, dtype_bytes: int, tp: int, label_fraction: float, attention: str = "flash"
) -> float:
    """Bytes autograd keeps from the forward for the backward, per token of a micro-batch, with
    ``label_fraction`` of the tokens labelled (the head runs only there). Parameters are not
    counted, nor the head's per-micro-batch ``grad_w``/``grad_b`` (see :func:`head_bytes`).

    Per block (``Block.forward``, ``b`` = dtype bytes, TP splits heads and the GLU): the two
    LayerNorms' inputs and outputs (``4h·b``, replicated over TP, plus fp32 mean/rstd), the qkv
    output (``3h/tp·b``; the attention keeps ``v``, a view of it, so all of it stays), rotated q
    and k (``2h/tp·b``), the attention output and its fp32 logsumexp, the GLU input (``2i/tp·b``,
    the GELU's input and the gate are views of it), the GELU output and the product (``2i/tp·b``),
    the dropout mask (1 byte × h) when ``attn_out_dropout > 0``, and in bf16 the RoPE cos/sin cast
    per call. Once per forward: the token ids (int64), the embedding (the embedding norm's input)
    and the last block's output (the final norm's input) with their norm statistics, in fp32 the
    cos/sin of each kind of layer in use. Per labelled token: the head's dense, GELU and norm
    inputs (``3h·b``), its norm statistics, the gather index (int64), and the fused loss's fp32
    ``grad_x`` (``4h``)."""
    m, b = model_cfg, dtype_bytes
    h, stats = m.hidden_size, 2 * 4
    if attention == "sdpa" and not all(m.is_global(layer) for layer in range(m.num_layers)):
        raise EttinError("attention='sdpa' models SDPA's per-document (global) path only: set model.global_every=1")
    layers = sum(
        layer_bytes_per_token(m, b, tp, first=layer == 0, attention=attention) for layer in range(m.num_layers)
    )
    once = 8 + 2 * (
        h * b + stats
    )  # ids; embedding (embed_norm's input) and the last block's output (final_norm's input)
    if tp > 1:
        once += 1  # VocabParallelEmbedding's out-of-shard mask
    if b == 4:  # fp32: rotate()'s .to() is a no-op, so each kind's cos and sin are saved once, shared by its layers
        kinds = {m.is_global(layer) for layer in range(m.num_layers)}
        once += len(kinds) * 2 * m.head_dim * 4
    head = 3 * h * b + stats + 8 + 4 * h  # dense/GELU/norm inputs, norm stats, the x[keep] index, fp32 grad_x
    return layers + once + label_fraction * head


def head_saved_bytes(model_cfg: ModelConfig, tp: int) -> float:
    """What the fused vocab head keeps per micro-batch whatever its size: fp32 ``grad_w`` and ``grad_b``."""
    return 4 * (model_cfg.vocab_size // tp) * (model_cfg.hidden_size + 1)


def head_bytes(model_cfg: ModelConfig, tp: int, labels: float) -> float:
    """The fused vocab head's memory beyond per-token activations (fp32 ``grad_w``/``grad_b`` and
    the chunk buffer in the forward; ``grad_w``'s fp32 and bf16 casts at the start of the backward)."""
    rows, h = model_cfg.vocab_size // tp, model_cfg.hidden_size
    saved = head_saved_bytes(model_cfg, tp)
    forward = saved + 4 * min(HEAD_CHUNK, max(1, int(labels))) * rows
    backward = saved + (4 + PARAM_BYTES) * rows * h
    return max(forward, backward)


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one rank, GB (1e9 bytes), with the inputs it was computed for."""

    dp: int
    tp: int
    zero_stage: int
    grad_accum_dtype: str
    micro_tokens: int  # the budget
    tokens: int  # tokens the activations are sized for: max(micro_tokens, seq_len)
    label_fraction: float
    parameters: int  # on this rank
    device_memory_gb: float
    weights: float
    master_and_moments: float
    grads: float
    activations: float
    head: float
    step_transient: float  # after the backward; the total counts max(activations + head, this)
    overhead: float
    total: float

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory_gb

    def as_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


def _tp(cfg, tp: int | None) -> int:
    return cfg.parallel.tensor if tp is None else tp


def _static_bytes(cfg, dp: int, tp: int) -> dict[str, float]:
    """Weights, master + moments, grads and the step transient: independent of the micro budget."""
    p = local_parameters(cfg.model, tp)
    stage, fp32_accum = cfg.parallel.zero_stage, cfg.train.grad_accum_dtype == "fp32"
    shard = p / dp  # ZeRO 1 and 2 partition the optimizer state over DP
    largest = max(
        cfg.model.vocab_size // tp * cfg.model.hidden_size,
        2 * cfg.model.intermediate_size // tp * cfg.model.hidden_size,
    )
    # train/engine.py: communication_data_type = grad_accum_dtype; overlap_comm (two reduce buckets) at ZeRO-2
    comm = 4 if fp32_accum else PARAM_BYTES
    bucket = PARAM_BYTES * REDUCE_BUCKET_ELEMENTS  # contiguous_gradients' bf16 staging bucket
    oversized = PARAM_BYTES * largest if largest > REDUCE_BUCKET_ELEMENTS else 0
    if stage <= 1 and fp32_accum:  # BF16_Optimizer
        grads = (PARAM_BYTES + 4) * p
        reduce = comm * min(p, ALLREDUCE_ELEMENTS + largest)  # the flattened fp32 all-reduce bucket
    elif stage <= 1:  # DeepSpeedZeroOptimizer, stage 1, bf16 accumulation
        grads = PARAM_BYTES * p + PARAM_BYTES * shard + bucket
        reduce = 4 * shard  # the partition's fp32 cast at the step
    else:  # stage 2: partitioned, reduced every micro-batch from two buckets (cast to the wire dtype)
        grads = (4 if fp32_accum else PARAM_BYTES) * shard + 2 * bucket + comm * REDUCE_BUCKET_ELEMENTS + oversized
        reduce = 0 if fp32_accum else 4 * shard
    return {
        "parameters": p,
        "weights": PARAM_BYTES * p,
        "master_and_moments": 12 * shard,
        "grads": grads,
        "step_transient": max(reduce, OPTIMIZER_TEMPORARIES * 4 * shard),
    }


def estimate(cfg, dp: int, tp: int | None = None, micro_tokens: int | None = None) -> MemoryEstimate:
    """The predicted peak of one rank of ``cfg`` with ``dp`` data-parallel ranks (``tp`` defaults to
    ``parallel.tensor``, ``micro_tokens`` to :func:`resolve_micro_tokens`)."""
    tp = _tp(cfg, tp)
    if dp < 1 or tp < 1:
        raise ConfigError(f"memory estimate needs dp >= 1 and tp >= 1, got dp={dp}, tp={tp}")
    budget = resolve_micro_tokens(cfg, dp, tp) if micro_tokens is None else int(micro_tokens)
    fraction = label_fraction(cfg)
    tokens = max(budget, cfg.phase.seq_len)
    static = _static_bytes(cfg, dp, tp)
    per_token = activation_bytes_per_token(cfg.model, PARAM_BYTES, tp, fraction)
    workspace = layer_bytes_per_token(cfg.model, PARAM_BYTES, tp)  # the backward's working space
    activations = tokens * (per_token + workspace)
    head = head_bytes(cfg.model, tp, fraction * tokens)
    allocated = (
        static["weights"]
        + static["master_and_moments"]
        + static["grads"]
        + max(activations + head, static["step_transient"])
    )
    overhead = FIXED_OVERHEAD_GB * GB + FRAGMENTATION * allocated
    return MemoryEstimate(
        dp=dp,
        tp=tp,
        zero_stage=cfg.parallel.zero_stage,
        grad_accum_dtype=cfg.train.grad_accum_dtype,
        micro_tokens=budget,
        tokens=tokens,
        label_fraction=fraction,
        parameters=static["parameters"],
        device_memory_gb=cfg.train.device_memory_gb,
        weights=static["weights"] / GB,
        master_and_moments=static["master_and_moments"] / GB,
        grads=static["grads"] / GB,
        activations=activations / GB,
        head=head / GB,
        step_transient=static["step_transient"] / GB,
        overhead=overhead / GB,
        total=(allocated + overhead) / GB,
    )


def rank_share_tokens(cfg, dp: int) -> int:
    """Tokens one DP rank gets in a full step (``global_size`` samples of at most ``seq_len``)."""
    return math.ceil(cfg.batch.global_size * cfg.phase.seq_len / dp)


def default_micro_tokens(cfg, dp: int, tp: int | None = None) -> int:
    """The largest budget whose predicted peak stays under ``(1 - HEADROOM)`` of
    ``train.device_memory_gb``, rounded down to ``BUDGET_MULTIPLE`` tokens, at most one rank's share
    of a full step (rounded up: a larger budget changes nothing), and at least ``phase.seq_len``
    (one full sample) even when that does not fit (``check_fits`` refuses it)."""
    tp = _tp(cfg, tp)
    limit = (1 - HEADROOM) * cfg.train.device_memory_gb
    # the predicted total never decreases with the budget: bisect over multiples of BUDGET_MULTIPLE
    low, high = 0, math.ceil(rank_share_tokens(cfg, dp) / BUDGET_MULTIPLE)  # low fits (or is the floor)
    while low < high:
        mid = (low + high + 1) // 2
        if estimate(cfg, dp, tp, mid * BUDGET_MULTIPLE).total <= limit:
            low = mid
        else:
            high = mid - 1
    return max(low * BUDGET_MULTIPLE, cfg.phase.seq_len)


def resolve_micro_tokens(cfg, dp: int, tp: int | None = None) -> int:
    """``batch.micro_tokens`` when set (> 0), else :func:`default_micro_tokens`."""
    return cfg.batch.micro_tokens if cfg.batch.micro_tokens > 0 else default_micro_tokens(cfg, dp, tp)


def check_fits(cfg, dp: int, tp: int | None = None, micro_tokens: int | None = None) -> None:
    """Raise a one-line :class:`ConfigError` when the predicted peak exceeds ``train.device_memory_gb``."""
    e = estimate(cfg, dp, tp, micro_tokens)
    if e.fits:
        return
    knobs = []
    if e.micro_tokens > cfg.phase.seq_len:
        knobs.append(f"lower batch.micro_tokens (now {e.micro_tokens}; 0 picks the largest that fits)")
    if e.zero_stage < 2 and e.dp > 1:
        knobs.append("raise parallel.zero_stage to 2")
    knobs.append(f"raise parallel.tensor (now {e.tp})")
    knobs.append("or set train.device_memory_gb if the device has more")
    raise ConfigError(
        f"predicted peak memory {e.total:.1f} GB per GPU exceeds train.device_memory_gb={e.device_memory_gb:g} "
        f"(weights {e.weights:.1f}, optimizer {e.master_and_moments:.1f}, grads {e.grads:.1f}, activations "
        f"{e.activations:.1f} for {e.tokens} tokens, head {e.head:.1f}, overhead {e.overhead:.1f}): {', '.join(knobs)}"
    )
