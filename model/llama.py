"""The Nanbeige decoder (Llama-style), read top to bottom: norms, attention, MLP, block, model, generate.

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
    of positions already written. A forward writes each layer's new keys at [pos, pos + T), then advances pos by T."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = ops.attention(q, k, v, causal=True)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
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

    def _hidden(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]; with a cache, input_ids continue from position cache.pos."""
        t = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if start + t > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {start + t} exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"KVCache batch {cache.batch_size} != input batch {input_ids.shape[0]}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(t)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] (continuing the cache's positions when one is given)."""
        return self.lm_head(self._hidden(input_ids, cache))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32, L = -1/|M| sum_{t in M} log softmax(logits_t)[labels_t], where
        labels are already aligned (labels[t] is the target for position t) and M = {t : labels_t != ignore_index}."""
        return ops.linear_cross_entropy(self._hidden(input_ids, None), self.lm_head.weight, labels, ignore_index)

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets_t | input_ids_<=t) in fp32, [B, T] (targets aligned as `loss`'s labels), never keeping the
        [B, T, vocab] log-softmax beyond the LM-head op (fused kernels chunk it away)."""
        return ops.linear_token_logprobs(self._hidden(input_ids, None), self.lm_head.weight, targets)

    def topk_logprobs(self, input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next tokens at every position: (log-probs [B, T, k] fp32, token ids [B, T, k])."""
        return ops.linear_topk_logprobs(self._hidden(input_ids, None), self.lm_head.weight, k)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue a batch of prompts; returns [B, T + n_new] (the prompts, then the new tokens).

        Prompts must all have the same length T (no padding: every row shares positions and the KV cache).
        temperature == 0 is greedy decoding; otherwise sample from softmax(logits / temperature) restricted to the
        top-p nucleus. After a row emits eos_token_id it keeps emitting it; generation stops when every row has."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if max_new_tokens <= 0:
            return input_ids
        b, t = input_ids.shape
        cache = KVCache(self.config, b, t + max_new_tokens, device=input_ids.device, dtype=self.lm_head.weight.dtype)
        h = self._hidden(input_ids, cache)[:, -1]
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = [input_ids]
        for step in range(max_new_tokens):
            token = _sample(self.lm_head(h).float(), temperature, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            out.append(token[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            h = self._hidden(token[:, None], cache)[:, -1]
        return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from fp32 logits [B, V]: argmax at temperature 0, else a draw from the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely ones already hold top_p of the mass (the first is always kept).
        sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
