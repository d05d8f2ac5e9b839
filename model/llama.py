"""The Nanbeige decoder (Llama-style), read top to bottom: KV cache, norms, attention, MLP, block, model.

x = embed(ids); for each layer: x += attn(rms_norm(x)); x += mlp(rms_norm(x)); logits = lm_head(rms_norm(x)).
Attention is GQA with RoPE (HF rotate_half layout); the MLP is SwiGLU; no biases anywhere.
Parameter names are exactly Hugging Face `LlamaForCausalLM`'s, so a state dict loads there unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model import ops
from model.config import ModelConfig


class KVCache:
    """Preallocated keys and values for every layer, k and v [n_layers, B, Hkv, max_len, D], and `pos`, the number
    of columns already written. A forward writes each layer's new keys at columns [pos, pos + T), then advances pos.

    Ragged batches are left-padded: row b's first pad[b] columns are padding. Its token at column c has RoPE position
    c - pad[b], and no real query reads a padding key, so a padded row computes what its prompt alone would."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, pad: list[int] | None = None):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self._set_pad([0] * batch_size if pad is None else pad)
        self.mask: torch.Tensor | None = None

    def _set_pad(self, pad: list[int]) -> None:
        if len(pad) != self.batch_size or min(pad, default=0) < 0:
            raise ValueError(f"KVCache: need {self.batch_size} non-negative pad counts, got {pad}")
        self.pad_list = list(pad)
        self.pad = torch.tensor(pad, dtype=torch.long, device=self.k.device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def ragged(self) -> bool:
        return any(self.pad_list)

    def begin(self, t: int) -> torch.Tensor:
        """Prepare a forward of t new columns of a ragged cache (an unpadded one keeps mask None: plain causal
        attention): set `mask` [B, 1, t, pos + t], what the layers' attention uses, True where a query may read a key
        (causal, never a padding key, except that a padding query reads itself: no softmax row is empty, so padding
        columns hold finite values that no real query reads); return the per-row RoPE positions [B, t]."""
        cols = torch.arange(self.pos + t, device=self.k.device)
        queries = cols[self.pos:]
        real_key = cols[None, :] >= self.pad[:, None]
        self.mask = ((real_key[:, None, :] | (cols[None, None, :] == queries[None, :, None]))
                     & (cols[None, None, :] <= queries[None, :, None]))[:, None]
        return (queries[None, :] - self.pad[:, None]).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's k, v [B, Hkv, T, D] at the current position; return all keys and values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed the preallocated max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def select(self, rows: list[int], max_len: int | None = None) -> "KVCache":
        """A new cache whose row i is a copy of this cache's row rows[i] (rows may repeat: n samples of one prefill),
        with the written columns [0, pos) copied and room for max_len columns (default: this cache's max_len)."""
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.pos:
            raise ValueError(f"KVCache.select: max_len {max_len} < the {self.pos} columns written")
        out = KVCache.__new__(KVCache)
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        shape = (self.k.shape[0], len(rows), self.k.shape[2], max_len, self.k.shape[4])
        out.k = self.k.new_zeros(shape)
        out.v = self.v.new_zeros(shape)
        out.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos].index_select(1, index)
        out.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos].index_select(1, index)
        out.pos, out.mask = self.pos, None
        out._set_pad([self.pad_list[r] for r in rows])
        return out


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document [B, T]: t minus the start of the run of equal doc_ids holding t."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values


def packed_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where query t may read key s: s <= t and both in the same document (block-diagonal
    causal). Every row holds its diagonal, so no softmax row is empty (padding reads padding, which nobody else
    reads)."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention: num_attention_heads query heads share num_key_value_heads k/v heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rotary(q, k, cos, sin)
        if cache is None:
            y = ops.attention(q, k, v, causal=True, mask=mask)
        else:
            k, v = cache.update(self.layer_idx, k, v)
            y = ops.attention(q, k, v, causal=True, mask=cache.mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The trunk HF calls `model`: token embeddings, the layers, the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NanbeigeForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """Init, deterministic given torch.manual_seed: every Linear and Embedding weight ~ N(0, initializer_range),
        except the residual output projections (o_proj, down_proj) ~ N(0, initializer_range / sqrt(2 * n_layers)),
        as GPT-2 does: 2 * n_layers branches add into the residual stream, so its variance stays independent of
        depth. RMSNorm weights start at 1."""
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_weights()
        self.reset_rope_cache()

    def _init_weights(self) -> None:
        residual_std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range)

    def reset_rope_cache(self) -> None:
        """(Re)build the fp32 cos/sin tables for every position on the weights' device (not in the state dict)."""
        cos, sin = ops.rope_cache(self.config.max_position_embeddings, self.config.head_dim, self.config.rope_theta,
                                  device=self.lm_head.weight.device, dtype=torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the RoPE tables fp32 and real across .to(dtype), .to(device) and .to_empty(), as HF recomputes them.
        super()._apply(fn, recurse)
        self.reset_rope_cache()
        return self

    def set_rope_theta(self, theta: float, max_position_embeddings: int | None = None) -> None:
        """ABF in place: raise the RoPE base (and optionally the context length); the weights are unchanged."""
        self.config = self.config.with_rope_theta(theta, max_position_embeddings)
        self.reset_rope_cache()

    def _hidden(self, input_ids: torch.Tensor, cache: KVCache | None, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]; with a cache, input_ids continue at column cache.pos, row b at RoPE
        position cache.pos - cache.pad[b] (left padding: see KVCache).

        Packed rows (no cache): doc_ids [B, T] gives each position's document (padding: any id of its own, -1 in
        stages/chat.pack_examples); query t reads key s iff s <= t and doc_ids[s] == doc_ids[t] (block-diagonal
        causal), and RoPE positions restart at 0 per document (`positions` [B, T] when given, else derived from the
        runs of doc_ids), so each document computes what it computes alone. Both None: plain causal, positions
        0..T-1."""
        t = input_ids.shape[1]
        if cache is not None and (doc_ids is not None or positions is not None):
            raise ValueError("doc_ids / positions are for the no-cache (training) forward only")
        if doc_ids is not None and positions is None:
            positions = document_positions(doc_ids)
        start = cache.pos - min(cache.pad_list) if cache is not None else 0
        end = start + t if positions is None else int(positions.max()) + 1
        if end > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {end} exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        mask = None if doc_ids is None else packed_causal_mask(doc_ids)
        if positions is not None:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        elif cache is None:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        elif cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"KVCache batch {cache.batch_size} != input batch {input_ids.shape[0]}")
        elif cache.ragged:
            positions = cache.begin(t)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        else:
            cos, sin = self.rope_cos[cache.pos:cache.pos + t], self.rope_sin[cache.pos:cache.pos + t]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(t)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] (continuing the cache's positions when one is given); with
        last_only, the logits [B, vocab] of the last position alone (decoding needs no others). doc_ids / positions:
        packed rows (see _hidden)."""
        h = self._hidden(input_ids, cache, doc_ids, positions)
        return self.lm_head(h[:, -1] if last_only else h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
             doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32, L = -1/|M| sum_{t in M} log softmax(logits_t)[labels_t], where
        labels are already aligned (labels[t] is the target for position t) and M = {t : labels_t != ignore_index}.
        doc_ids / positions: packed rows (see _hidden)."""
        return ops.linear_cross_entropy(self._hidden(input_ids, None, doc_ids, positions), self.lm_head.weight,
                                        labels, ignore_index)

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """log p(targets_t | input_ids_<=t) in fp32, [B, T] (targets aligned as `loss`'s labels), never keeping the
        [B, T, vocab] log-softmax beyond the LM-head op (fused kernels chunk it away). doc_ids / positions: packed
        rows, where <=t means the earlier positions of t's own document (see _hidden)."""
        return ops.linear_token_logprobs(self._hidden(input_ids, None, doc_ids, positions), self.lm_head.weight,
                                         targets)

    def topk_logprobs(self, input_ids: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next tokens at every position: (log-probs [B, T, k] fp32, token ids [B, T, k]).
        doc_ids / positions: packed rows (see _hidden)."""
        return ops.linear_topk_logprobs(self._hidden(input_ids, None, doc_ids, positions), self.lm_head.weight, k)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, seeds: list[int] | None = None) -> torch.Tensor:
        """Continue a batch of same-length prompts [B, T] through the generation engine (model.generate); returns
        [B, T + n], n the most tokens any row generated. Row b samples with seed seeds[b] (default b); a row that
        emitted eos_token_id is filled with it up to n. Ragged prompts, stop strings and log-probs: model.generate."""
        from model.generation import Request, SamplingParams, generate
        b, t = input_ids.shape
        seeds = list(range(b)) if seeds is None else seeds
        params = SamplingParams(max_new_tokens, temperature, top_p,
                                stop_token_ids=() if eos_token_id is None else (eos_token_id,))
        out = generate(self, [Request(row, (seed,)) for row, seed in zip(input_ids.tolist(), seeds)], params,
                       batch_size=b)
        new = [c.token_ids for (c,) in out]
        n = max(map(len, new), default=0)
        return torch.cat([input_ids, torch.tensor([ids + [eos_token_id] * (n - len(ids)) for ids in new],
                                                  dtype=input_ids.dtype, device=input_ids.device).view(b, n)], dim=1)
