"""The generation engine: evaluation, SFT data generation and RL rollouts all sample through `generate`.

    generate(model, [Request(prompt_ids, seeds), ...], SamplingParams(...), decode, batch_size)
        -> one list of Completions per request, one Completion per seed

Rows are (request, sample) pairs, batch_size of them at a time, requests sorted by prompt length. A batch's distinct
prompts are left-padded to the longest and prefilled once through a KVCache that records each row's padding: per-row
RoPE positions, padding never attended, so a padded row computes what its prompt alone would (up to float rounding).
The n samples of a prompt copy its prefilled cache row (KVCache.select). Then one token per live row per step, z the
row's fp32 logits:
    logprobs           log softmax(z)[x]: temperature 1, whole vocabulary (the model's log p, for RL ratios and KL)
    sampling dist      q = softmax(z / T) restricted to the top-p nucleus, renormalized; T = 0 is argmax (greedy)
    sampling_logprobs  log q(x) (0 under greedy: a point mass)
The nucleus is {i : p_i >= tau}, p = softmax(z / T), tau the k-th largest p with k the fewest tokens holding top_p of
the mass (tokens tied with tau stay in). The draw is inverse-CDF: x = the first token id whose cumulative q (summed in
token-id order, fp64) exceeds u * sum(q), u in [0, 1) the step's uniform from the row's own torch.Generator seeded
with the sample's seed. So a sample depends on its prompt, seed and the params alone, not on its batch (up to float
rounding) nor on when it runs: a resumed run draws the same samples.

A row finishes at a stop token (the last of token_ids; not in text), at a stop string (looked for in the completion's
text, decoded incrementally after every token: the token completing it is the last of token_ids, text is cut before
the stop string), or after min(max_new_tokens, context - prompt length) tokens (finish_reason "length"). A finished
row leaves the batch (its cache row is dropped), so the others decode without it.

Decoding (one new token per row) does not go through the model's modules: `_DecodeStep` runs the same computation
as NanbeigeForCausalLM.forward with a KVCache (the same ops.* norms, RoPE and SwiGLU, so fused kernels still apply
on CUDA) from weights fused once per `generate` call (q/k/v into one matrix, gate/up into one; on CPU the gate/up
and lm_head matrices also reordered once for oneDNN, see _cpu_linear), with attention as two batched matmuls over
each kv head's query group and an additive mask for the padding. At the tiny shape on 2 CPU threads that halves a
step's matmul calls and drops ~50 module calls per step; it equals the module forward up to float rounding of the
differently shaped matmuls (tests/test_generate.py compares both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from model import ops
from model.llama import KVCache, NanbeigeForCausalLM


@dataclass(frozen=True)
class SamplingParams:
    """How every sample of a call is drawn. temperature 0 is greedy; top_p 1 keeps the whole vocabulary."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.max_new_tokens}, {self.temperature}, {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingParams: an empty stop string would stop every completion at once")


@dataclass(frozen=True)
class Request:
    """One prompt (token ids) and the seed of each of its samples: n = len(seeds) samples share one prefill."""
    prompt_ids: Sequence[int]
    seeds: Sequence[int] = (0,)


@dataclass(frozen=True)
class Completion:
    """One sample. token_ids: every token sampled, the stop token or the token completing a stop string included (the
    trajectory RL trains on); logprobs[t] = log softmax(z_t)[token_ids[t]] (the raw model, temperature 1);
    sampling_logprobs[t] = log q_t(token_ids[t]) under the distribution actually sampled (0.0 when greedy); text: the
    decoded completion cut before the stop (None without a decode function); finish_reason "stop" (stop: the token
    id or string that fired) or "length" (stop None)."""
    token_ids: list[int]
    logprobs: list[float]
    sampling_logprobs: list[float]
    text: str | None
    finish_reason: str
    stop: int | str | None


@torch.inference_mode()
def generate(model: NanbeigeForCausalLM, requests: Sequence[Request], params: SamplingParams,
             decode: Callable[[list[int]], str] | None = None, batch_size: int = 32) -> list[list[Completion]]:
    """Complete every request: result[r][i] is the sample of requests[r] drawn with seed requests[r].seeds[i].
    decode(token_ids) -> text is needed for stop strings and for Completion.text; batch_size caps the rows decoded
    together (a request with more seeds spans several batches, one prefill each)."""
    if params.stop_strings and decode is None:
        raise ValueError("generate: stop strings need a decode function")
    context = model.config.max_position_embeddings
    for i, req in enumerate(requests):
        if not 0 < len(req.prompt_ids) < context or not req.seeds:
            raise ValueError(f"generate: request {i} needs 1 to {context - 1} prompt tokens and a seed, got "
                             f"{len(req.prompt_ids)} tokens and {len(req.seeds)} seeds")
    order = sorted(range(len(requests)), key=lambda r: (len(requests[r].prompt_ids), r))
    rows = [(r, s) for r in order for s in range(len(requests[r].seeds))]
    out: list[list[Completion | None]] = [[None] * len(req.seeds) for req in requests]
    step = _DecodeStep(model, batch_size)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        distinct = list(dict.fromkeys(r for r, _ in batch))
        completions = _generate_batch(model, [list(requests[r].prompt_ids) for r in distinct],
                                      [distinct.index(r) for r, _ in batch],
                                      [int(requests[r].seeds[s]) for r, s in batch], params, decode, step)
        for (r, s), completion in zip(batch, completions):
            out[r][s] = completion
    return out


def _generate_batch(model: NanbeigeForCausalLM, prompts: list[list[int]], row_prompt: list[int], seeds: list[int],
                    params: SamplingParams, decode: Callable[[list[int]], str] | None,
                    step_fn: "_DecodeStep") -> list[Completion]:
    """Rows row_prompt[i] (an index into prompts) with seeds[i]: prefill the distinct prompts, then decode."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    budgets = [min(params.max_new_tokens, model.config.max_position_embeddings - len(prompts[p])) for p in row_prompt]
    width = max(map(len, prompts))
    pad = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * k + p for k, p in zip(pad, prompts)], device=device)
    prefill = KVCache(model.config, len(prompts), width, device=device, dtype=dtype, pad=pad)
    logits = model(ids, prefill, last_only=True).float()[torch.tensor(row_prompt, device=device)]
    cache = prefill.select(row_prompt, width + max(budgets))
    uniforms = None
    if params.temperature > 0:
        # Each row's uniforms are its own generator's first `budget` draws: a function of its seed alone.
        uniforms = torch.zeros(len(seeds), max(budgets), dtype=torch.float64, device=device)
        for i, (seed, budget) in enumerate(zip(seeds, budgets)):
            gen = torch.Generator(device=device).manual_seed(seed)
            uniforms[i, :budget] = torch.rand(budget, generator=gen, dtype=torch.float64, device=device)
    stop_ids = set(params.stop_token_ids)
    scans = [_StopScan(decode, params.stop_strings) for _ in seeds] if params.stop_strings else None
    tokens, raw, sampled = ([[] for _ in seeds] for _ in range(3))
    finish: list[tuple[str, int | str | None] | None] = [None] * len(seeds)
    live = list(range(len(seeds)))
    for step in range(max(budgets)):
        token, logprob, sampling_logprob = sample_step(logits, params.temperature, params.top_p,
                                                       None if uniforms is None else uniforms[:, step])
        # One host transfer per step for the whole batch (token ids are exact in fp64).
        host = torch.stack([token.double(), logprob.double(), sampling_logprob.double()]).tolist()
        for j, row in enumerate(live):
            t = int(host[0][j])
            tokens[row].append(t)
            raw[row].append(host[1][j])
            sampled[row].append(host[2][j])
            if t in stop_ids:
                finish[row] = ("stop", t)
            elif scans is not None and (hit := scans[row].push(t)) is not None:
                finish[row] = ("stop", hit)
            elif len(tokens[row]) == budgets[row]:
                finish[row] = ("length", None)
        keep = [j for j, row in enumerate(live) if finish[row] is None]
        if not keep:
            break
        if len(keep) < len(live):
            cache = cache.select(keep)
            index = torch.tensor(keep, device=device)
            token = token[index]
            uniforms = None if uniforms is None else uniforms[index]
            live = [live[j] for j in keep]
        logits = step_fn(token, cache).float()
    return [Completion(tokens[i], raw[i], sampled[i], _text(decode, tokens[i], finish[i], params.stop_strings),
                       *finish[i]) for i in range(len(seeds))]


class _DecodeStep:
    """step(token [B], cache) -> logits [B, vocab]: NanbeigeForCausalLM.forward(token[:, None], cache, last_only=True)
    without the module calls (see the module docstring). Row b's new token sits at column cache.pos, RoPE position
    cache.pos - pad[b], and reads the keys at columns pad[b] .. cache.pos (the padding never). On CPU the q/k/v and
    gate/up weights are fused once here (a copy of ~70% of the layer weights: the model must not change during the
    `generate` call, which holds under torch.inference_mode); on other devices the separate weights run as they are."""

    def __init__(self, model: NanbeigeForCausalLM, rows: int = 32):
        cfg = model.config
        self.model, self.eps = model, cfg.rms_norm_eps
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.fused = model.lm_head.weight.device.type == "cpu"
        self.layers, self.gate_up = [], []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            gate_up = (m.gate_proj.weight, m.up_proj.weight)
            if self.fused:
                qkv, gate_up = (torch.cat(qkv),), (torch.cat(gate_up),)
                self.gate_up.append(_cpu_linear(gate_up[0], rows))
            self.layers.append((layer.input_layernorm.weight, qkv, a.o_proj.weight,
                                layer.post_attention_layernorm.weight, gate_up, m.down_proj.weight))
        self.lm_head = _cpu_linear(model.lm_head.weight, rows) if self.fused else model.lm_head

    def __call__(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        model, (h, hkv, d), b, pos = self.model, (self.h, self.hkv, self.d), token.shape[0], cache.pos
        if cache.batch_size != b:
            raise ValueError(f"KVCache batch {cache.batch_size} != input batch {b}")
        g, s = h // hkv, pos + 1
        bias = None
        if cache.ragged:   # the cache's own positions and mask (KVCache.begin), as an additive [B * Hkv, G, S] mask
            positions = cache.begin(1)[:, 0]
            bias = torch.zeros(cache.mask.shape, device=token.device, dtype=torch.float32).masked_fill_(
                ~cache.mask, float("-inf")).expand(b, hkv, g, s).reshape(b * hkv, g, s)
        else:
            positions = torch.full((b,), pos, device=token.device)
        cos, sin = model.rope_cos[positions][:, None, None], model.rope_sin[positions][:, None, None]
        x = torch.nn.functional.embedding(token, model.model.embed_tokens.weight)
        linear, scale = torch.nn.functional.linear, d ** -0.5
        for i, (w_in, qkv, w_o, w_post, gate_up, w_down) in enumerate(self.layers):
            y = ops.rms_norm(x, w_in, self.eps)
            if self.fused:   # q and k sit side by side in the fused output: one rotation over both (elementwise)
                qk, v = linear(y, qkv[0]).split(((h + hkv) * d, hkv * d), dim=-1)
                qk, _ = ops.apply_rotary(qk.view(b, h + hkv, 1, d), qk.new_empty(b, 0, 1, d), cos, sin)
                q, k = qk[:, :h], qk[:, h:]
            else:
                q, k, v = (linear(y, w) for w in qkv)
                q, k = ops.apply_rotary(q.view(b, h, 1, d), k.view(b, hkv, 1, d), cos, sin)
            keys, values = cache.update(i, k, v.view(b, hkv, 1, d))      # [B, Hkv, S, D]: views, no copy
            scores = torch.bmm(q.reshape(b * hkv, g, d), keys.reshape(b * hkv, s, d).transpose(1, 2)).float()
            scores = scores.mul_(scale) if bias is None else scores.mul_(scale).add_(bias)
            attn = torch.bmm(scores.softmax(dim=-1).to(values.dtype), values.reshape(b * hkv, s, d))
            x = x + linear(attn.view(b, h * d), w_o)
            y = ops.rms_norm(x, w_post, self.eps)
            gate, up = self.gate_up[i](y).chunk(2, dim=-1) if self.fused else (linear(y, w) for w in gate_up)
            x = x + linear(ops.swiglu(gate, up), w_down)
        cache.advance(1)
        return self.lm_head(ops.rms_norm(x, model.model.norm.weight, self.eps))


PREPACKED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _cpu_linear(weight: torch.Tensor, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ weight.T for the decode step's wide CPU matmuls (gate/up, lm_head): from a copy of the weight reordered
    once into oneDNN's blocked layout for about `rows` input rows (any row count works), which PyTorch's own CPU
    linear does not keep between calls. Timed alone at the tiny shape on 2 threads, the lm_head matmul
    [32, 192] x [192, 8192] takes ~540 us instead of ~900 us, gate/up [32, 192] x [192, 1024] ~75 instead of ~105;
    the narrower q/k/v, o and down matmuls are no faster this way and stay on torch.nn.functional.linear. Without
    oneDNN, torch.nn.functional.linear. Equal to it up to float rounding (a different accumulation order)."""
    if not PREPACKED:
        return lambda x: torch.nn.functional.linear(x, weight)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def sample_step(logits: torch.Tensor, temperature: float, top_p: float,
                uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row from fp32 logits [B, V] (see the module docstring): (token ids [B], log softmax(z)[x] [B],
    log q(x) [B]). uniforms [B] in [0, 1), fp64, one per row; None (and ignored) when temperature is 0."""
    if temperature == 0:
        token = logits.argmax(dim=-1)
        raw = _at(torch.log_softmax(logits, dim=-1), token)
        return token, raw, torch.zeros_like(raw)
    tempered = torch.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    q = tempered.exp()
    if top_p < 1 and q.device.type == "cpu":
        token, total = _nucleus_draw_cpu(q, top_p, uniforms)
    else:
        token, total = _full_draw(q, top_p, uniforms)
    # The raw log-probs: log_softmax is one fused kernel, ~2x faster on CPU than logsumexp's passes (greedy too); at
    # temperature 1 it is `tempered` itself.
    raw = _at(tempered if temperature == 1 else torch.log_softmax(logits, dim=-1), token)
    return token, raw, _at(tempered, token) - total.log().float()


def _at(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """logp[b, token[b]] for every row b: [B, V], [B] -> [B]."""
    return logp.gather(-1, token[:, None]).squeeze(-1)


CANDIDATE_RATIO = 2.0 ** -12  # candidates: p >= this x the row's largest p (exact in fp32: a power of two)
MAX_CANDIDATES = 512          # a row with more (a flat distribution) takes the bucketed search over its whole row


def _nucleus_draw_cpu(q_t: torch.Tensor, top_p: float, u_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus draw of sample_step on CPU, q_t [B, V] fp32 probabilities, u_t [B] fp64 uniforms: (token ids [B]
    int64, the nucleus mass [B] fp64), equal to the computation over the whole vocabulary (nucleus_threshold, then
    the fp64 cumsum in token-id order and the search for u * total) without its passes over [B, V] in fp64.

    Candidates are the tokens with p >= CANDIDATE_RATIO * max p, in token-id order. When their fp64 mass reaches
    top_p, the nucleus (the most likely tokens until top_p) lies among them, so tau is found by sorting the
    candidates alone: their descending running sum is the full sort's running sum up to tau (fp64, same order). The
    kept tokens (p >= tau) are candidates too, so their cumulative mass in token-id order is the full cumsum at every
    kept token (the others add zeros), and the first one past u * total is the token. A row whose candidates hold less
    than top_p, or that has more than MAX_CANDIDATES of them (a flat distribution: a random init's), is drawn over its
    whole vocabulary (tau from _nucleus_threshold_cpu's bucketed search)."""
    q, u = q_t.numpy(), u_t.numpy()
    b, v = q.shape
    top = q.max(axis=1)
    if (top * MAX_CANDIDATES < top_p).all():     # no row can reach top_p in MAX_CANDIDATES tokens
        return _full_draw(q_t, top_p, u_t)
    candidate = q >= (top * np.float32(CANDIDATE_RATIO))[:, None]
    counts = np.count_nonzero(candidate, axis=1)
    flat = counts > MAX_CANDIDATES
    if flat.all():                               # before listing them: a flat batch's candidates are most of [B, V]
        return _full_draw(q_t, top_p, u_t)
    peaked = np.flatnonzero(~flat)
    flat_index = np.flatnonzero(candidate[peaked] if flat.any() else candidate)  # 2-D nonzero is ~10x slower
    local = flat_index // v
    rows, cols = peaked[local], flat_index - local * v
    counts[flat] = 0
    width = int(counts.max())
    pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    vals = np.zeros((b, width))                  # fp64, token-id order, zero-padded
    vals[rows, pos] = q[rows, cols]
    ids = np.zeros((b, width), dtype=np.int64)
    ids[rows, pos] = cols
    desc = -np.sort(-vals, axis=1)
    above = np.cumsum(desc, axis=1)
    at = np.arange(b)
    tau = desc[at, np.maximum(np.minimum((above < top_p).sum(axis=1), counts - 1), 0)]
    cdf = np.cumsum(np.where(vals >= tau[:, None], vals, 0.0), axis=1)
    total = cdf[:, -1].copy()
    token = ids[at, np.minimum((cdf <= (u * total)[:, None]).sum(axis=1), width - 1)]
    token, total = torch.from_numpy(token), torch.from_numpy(total)
    rest = np.flatnonzero(flat | (above[:, -1] < top_p))
    if rest.size:
        index = torch.from_numpy(rest)
        token[index], total[index] = _full_draw(q_t[index], top_p, u_t[index])
    return token, total


def _full_draw(q: torch.Tensor, top_p: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw over the whole vocabulary: (token ids [B], nucleus mass [B] fp64)."""
    if top_p < 1:
        q = q * (q >= nucleus_threshold(q, top_p)[:, None])   # torch.where(..., q, 0) is ~6x slower on CPU
    cdf = q.cumsum(dim=-1, dtype=torch.float64)   # = q.double().cumsum(-1), without the [B, V] fp64 copy
    total = cdf[:, -1]
    return torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(-1).clamp_(max=q.shape[-1] - 1), total


def nucleus_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """tau [B] per row of probs [B, V]: the k-th largest probability, k the fewest tokens whose mass reaches top_p
    (a token is kept while the more likely ones hold less than top_p; the most likely one always is; when rounding
    leaves the whole row short of top_p, tau is its smallest probability)."""
    if probs.device.type == "cpu":
        return torch.from_numpy(_nucleus_threshold_cpu(probs.float().numpy(), top_p)).to(probs.dtype)
    desc = probs.sort(dim=-1, descending=True).values
    # k - 1 = #{i < V - 1 : cumsum_i < top_p}: the cumulative mass is nondecreasing, so a search counts it.
    k = torch.searchsorted(desc.cumsum(dim=-1), torch.full_like(desc[:, :1], top_p)).clamp_(max=desc.shape[-1] - 1)
    return desc.gather(-1, k).squeeze(-1)


def _nucleus_threshold_cpu(p: np.ndarray, top_p: float, buckets: int = 1024) -> np.ndarray:
    """nucleus_threshold without sorting the vocabulary (a full sort of [32, 8192] costs ~4 ms on 2 CPU cores, about a
    third of a tiny decode step). The fp32 bit pattern of p >= 0, read as an integer, is monotone in p; its top 14 bits
    (exponent and 5 mantissa bits: buckets of ~2-3% relative width) bucket the row, counted down from the row's top
    bucket (0) and lumped from `buckets - 1` on (p below ~2^-32 of the row's largest). One weighted bincount gives each
    bucket's mass (fp64); summed from the top, the first bucket whose running mass reaches top_p holds tau, and only
    its tokens are sorted: the mass before it plus its sorted values' running sum locate tau. The [B, V] work is done
    in place in one integer buffer (fresh MB-sized arrays cost page faults on every step)."""
    b, v = p.shape
    idx = np.right_shift(p.view(np.int32), 18)
    np.subtract(idx.max(axis=1, keepdims=True), idx, out=idx)
    np.minimum(idx, buckets - 1, out=idx)
    idx += (np.arange(b, dtype=np.int32) * buckets)[:, None]  # row r's bucket j is bin r * buckets + j
    mass = np.bincount(idx.ravel(), weights=p.ravel(), minlength=b * buckets).reshape(b, buckets)
    above = np.cumsum(mass, axis=1)                           # above[:, j]: the mass of buckets 0..j (the top ones)
    crossing = (above < top_p).sum(axis=1)
    tau = np.empty(b, dtype=p.dtype)
    for r in range(b):
        j = int(crossing[r])
        if j >= buckets:                                      # rounding: the row never reaches top_p
            tau[r] = p[r].min()
            continue
        vals = np.sort(p[r][idx[r] == r * buckets + j])[::-1]
        cum = (above[r, j - 1] if j else 0.0) + np.cumsum(vals, dtype=np.float64)
        tau[r] = vals[min(int(np.searchsorted(cum, top_p)), len(vals) - 1)]
    return tau


class _StopScan:
    """Incremental detokenization of one completion (vLLM's prefix/read offsets: text is only extended once the
    newest tokens decode to whole characters) to see a stop string as soon as the token completing it is sampled."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode, self.stops, self.longest = decode, stops, max(map(len, stops))
        self.tokens: list[int] = []
        self.text = ""
        self.prefix = self.read = 0

    def push(self, token: int) -> str | None:
        """Add a token; return the stop string that now occurs in the text (the earliest one), else None."""
        self.tokens.append(token)
        prefix_text = self.decode(self.tokens[self.prefix:self.read])
        new_text = self.decode(self.tokens[self.prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        start = max(0, len(self.text) - self.longest + 1)
        self.text += new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.tokens)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(hits, key=lambda hit: hit[0])[1] if hits else None


def _text(decode: Callable[[list[int]], str] | None, tokens: list[int], finish: tuple[str, int | str | None],
          stop_strings: Sequence[str]) -> str | None:
    """The completion's text: its tokens without a stop token, decoded, cut before the first stop string."""
    if decode is None:
        return None
    text = decode(tokens[:-1] if finish[0] == "stop" and isinstance(finish[1], int) else tokens)
    return text[:min([i for s in stop_strings if (i := text.find(s)) >= 0], default=len(text))]
