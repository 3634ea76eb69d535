"""The Ettin transformer (ModernBERT-style): one architecture for the encoder and the decoder.

Embedding -> LayerNorm -> pre-norm blocks (layer 0 has no attention norm: the embedding norm
serves) -> final norm -> head (dense, GELU, norm) -> logits tied to the embedding, plus a bias.
Blocks alternate one global layer and two local (sliding-window) layers, each with its own RoPE
theta. The encoder/decoder switch is ``cfg.causal``: it changes the attention mask, nothing else
(the loss lives in the labels the data pipeline builds).

Inputs are unpadded: ``input_ids`` is a flat stream of documents laid end to end and
``cu_seqlens`` marks where each starts. Tensor-parallel layers come from ``ettin.parallel``;
at TP=1 they are the same layers over a group of one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ettin.attention import Documents, MaskSpec, build_attention
from ettin.config import IGNORE, ModelConfig
from ettin.parallel import column_linear, copy_to_tp, linear_cross_entropy, row_linear, vocab_bias, vocab_embedding

# The embedding row whose lookups pass no gradient (nn.Embedding's padding_idx), as in Ettin's
# training: bert24 builds the embedding as ``nn.Embedding(vocab, hidden,
# padding_idx=config.pad_token_id)`` (AnswerDotAI/bert24 ``src/bert_layers/embeddings.py``), and its
# FlexBertConfig comes from ``FlexBertConfig.from_pretrained("bert-base-uncased", **model_config)``
# (orionw/bert24 ``src/flex_bert.py``), whose pad_token_id is BERT's 0; Ettin's model_config never
# sets it (JHU-CLSP/ettin-encoder-vs-decoder ``pretraining/configs``). So it is row 0, not [PAD]
# (50283): [PAD]'s row was trained whenever MLM's random replacement drew it. Only the lookup is
# cut: the tied output projection still trains every row, row 0 included.
EMBEDDING_PADDING_IDX = 0


def trunc_normal(std: float, cutoff: float):
    return lambda w: nn.init.trunc_normal_(w, 0.0, std, -cutoff * std, cutoff * std)


class Rotary(nn.Module):
    """RoPE over the full head dim (rotate-half convention, as transformers' ModernBERT).

    The frequencies are recomputed in fp32 on every call (a few dozen numbers) rather than kept
    as a buffer, so casting the model to bf16 never rounds them."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float() / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [tokens, 1 (heads), head_dim]
        return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, init, out_init):
        super().__init__()
        h = cfg.hidden_size
        self.is_global = cfg.is_global(layer)
        self.head_dim = cfg.head_dim
        self.attn_norm = nn.LayerNorm(h, eps=cfg.norm_eps, bias=False) if layer > 0 else nn.Identity()
        # Rows are laid out per head as (q, k, v) and per GLU unit as (input, gate), so that any
        # contiguous TP split keeps whole heads and matching input/gate pairs together.
        self.qkv = column_linear(h, 3 * h, init)
        self.attn_out = row_linear(h, h, out_init)
        self.attn_drop = nn.Dropout(cfg.attn_out_dropout)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.norm_eps, bias=False)
        self.wi = column_linear(h, 2 * cfg.intermediate_size, init)
        self.wo = row_linear(cfg.intermediate_size, h, out_init)

    def forward(self, x, rope, attend, plan):
        n = x.shape[0]
        q, k, v = self.qkv(self.attn_norm(x)).view(n, -1, 3, self.head_dim).unbind(2)
        q, k = rotate(q, *rope), rotate(k, *rope)
        x = x + self.attn_drop(self.attn_out(attend(q, k, v, plan).reshape(n, -1)))
        glu = self.wi(self.mlp_norm(x)).view(n, -1, 2)
        return x + self.wo(F.gelu(glu[..., 0]) * glu[..., 1])


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str | None = None, device_type: str | None = None):
        super().__init__()
        self.cfg = cfg
        h, eps = cfg.hidden_size, cfg.norm_eps
        init = trunc_normal(cfg.init_std, cfg.init_cutoff)
        out_init = trunc_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers), cfg.init_cutoff)
        self.embed = vocab_embedding(cfg.vocab_size, h, init)
        self.embed_norm = nn.LayerNorm(h, eps=eps, bias=False)
        self.layers = nn.ModuleList(Block(cfg, i, init, out_init) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(h, eps=eps, bias=False)
        self.head_dense = nn.Linear(h, h, bias=False)
        init(self.head_dense.weight)
        self.head_norm = nn.LayerNorm(h, eps=eps, bias=False)
        self.head_bias = vocab_bias(cfg.vocab_size)
        self.rope = nn.ModuleDict(
            {
                "global": Rotary(cfg.head_dim, cfg.global_rope_theta),
                "local": Rotary(cfg.head_dim, cfg.local_rope_theta),
            }
        )
        self.masks = {
            "global": MaskSpec(cfg.causal, None),
            "local": MaskSpec(cfg.causal, (cfg.window_left, cfg.window_right)),
        }
        self.attend = build_attention(attn_backend or cfg.attn_backend, device_type)

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        label_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [tokens, vocab / TP] (this rank's vocab shard), or the loss over labelled tokens
        (``reduction``: mean, or sum for callers that normalize over a whole global batch).

        ``cu_seqlens`` may come as ``Documents`` (offsets on the device and on the host) and
        ``label_index`` as the positions that carry a label, found on the host: that is how the
        trainer calls it, so a forward never waits on the GPU. Without them they are read back
        from the device (one sync each), which is fine for tools and tests."""
        docs = cu_seqlens if isinstance(cu_seqlens, Documents) else Documents.from_cu_seqlens(cu_seqlens, max_seqlen)
        x = self.hidden(input_ids, docs)
        if labels is None:
            return self.logits(x)
        if label_index is None:
            label_index = torch.nonzero(labels != IGNORE).squeeze(1)
        # the head runs only where there is a loss (MLM: the masked tokens)
        total = linear_cross_entropy(
            self.head(x.index_select(0, label_index)),
            self.embed.weight,
            self.head_bias,
            labels.index_select(0, label_index),
        )
        return total if reduction == "sum" else total / max(label_index.numel(), 1)

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, docs: Documents, labels: torch.Tensor, label_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, labels predicted exactly) over the labelled tokens: evaluation's numbers,
        through the same head and loss as training."""
        x = self.hidden(input_ids, docs).index_select(0, label_index)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        total = linear_cross_entropy(
            self.head(x), self.embed.weight, self.head_bias, labels.index_select(0, label_index), correct=correct
        )
        return total, correct

    def hidden(self, input_ids: torch.Tensor, docs: Documents) -> torch.Tensor:
        """The final normalized hidden states [tokens, hidden]."""
        cu, n = docs.cu_seqlens, input_ids.shape[0]
        doc_start = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=n)
        positions = torch.arange(n, device=input_ids.device) - doc_start
        rope = {kind: r(positions) for kind, r in self.rope.items()}
        plans = {kind: self.attend.prepare(docs, spec) for kind, spec in self.masks.items()}

        x = self.embed_norm(self.lookup(input_ids))
        for layer in self.layers:
            kind = "global" if layer.is_global else "local"
            x = layer(x, rope[kind], self.attend, plans[kind])
        return self.final_norm(x)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; lookups of row ``EMBEDDING_PADDING_IDX`` pass it no gradient (a
        ``where`` on the device: no host sync, and the same under any TP split of the rows)."""
        x = self.embed(input_ids)
        if not torch.is_grad_enabled():
            return x
        return torch.where((input_ids == EMBEDDING_PADDING_IDX).unsqueeze(-1), x.detach(), x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction head up to the (tied) vocab projection."""
        return self.head_norm(F.gelu(self.head_dense(x)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(self.head(x)), self.embed.weight, self.head_bias)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None):
        """The same model on a padded [batch, length] batch: unpad, run, pad the logits back."""
        keep = attention_mask.bool()
        cu_seqlens = F.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        out = self(input_ids[keep], cu_seqlens, labels=None if labels is None else labels[keep])
        if labels is not None:
            return out
        padded = out.new_zeros(*input_ids.shape, out.shape[-1])
        padded[keep] = out
        return padded
