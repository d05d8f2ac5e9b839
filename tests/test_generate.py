"""The generation engine (model.generate): ragged batches equal prompts alone, per-sample seeds, stop tokens and stop
strings, log-probs against a full-sequence forward, budgets and finish reasons, one prefill per prompt.

Everything runs in fp32 on CPU, whose kernels are deterministic: "the same sample" is asserted as identical token ids;
log-probs computed through differently shaped batches agree to 1e-5 (float rounding of different matmul shapes)."""
import pytest
import torch

from model import ModelConfig, NanbeigeForCausalLM, Request, SamplingParams, generate
from model import generation
from model.generation import nucleus_threshold

CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rope_theta=10000.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = NanbeigeForCausalLM(CFG).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(10.0)    # peakier next-token distributions than the init's: greedy has no near-ties
    return m


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def one(model, prompt, params, seed=0, **kw):
    (c,), = generate(model, [Request(prompt, (seed,))], params, **kw)
    return c


def test_ragged_batch_equals_each_prompt_alone(model):
    ps = prompts([3, 11, 1, 7, 20])
    params = SamplingParams(12, temperature=0.0)
    batch = generate(model, [Request(p) for p in ps], params)
    for p, (c,) in zip(ps, batch):
        alone = one(model, p, params)
        assert c.token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=1e-5)
    assert len({tuple(c.token_ids) for (c,) in batch}) == len(ps)


def test_positions_are_per_row_so_a_short_prompt_keeps_its_budget_beside_a_long_one(model):
    # RoPE is relative, so only the table's range tells per-row positions from shared columns: the short row's
    # columns run past the context (the long prompt's padding), its positions do not.
    long, short = prompts([CFG.max_position_embeddings - 3, 2], seed=9)
    params = SamplingParams(20, temperature=0.0)
    (a,), (b,) = generate(model, [Request(long), Request(short)], params)
    assert (len(a.token_ids), a.finish_reason) == (3, "length") and len(b.token_ids) == 20
    assert b.token_ids == one(model, short, params).token_ids and a.token_ids == one(model, long, params).token_ids


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_a_full_sequence_forward(model, temperature, top_p):
    ps = prompts([4, 9, 6], seed=1)
    out = generate(model, [Request(p, (5, 6)) for p in ps], SamplingParams(10, temperature, top_p))
    for p, samples in zip(ps, out):
        for c in samples:
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                logits = model(ids)[0, len(p) - 1:-1].float()
            x = torch.tensor(c.token_ids)
            raw = torch.log_softmax(logits, -1)[torch.arange(len(x)), x]
            assert torch.allclose(torch.tensor(c.logprobs), raw, atol=1e-5)
            with torch.no_grad():
                assert torch.allclose(model.token_logprobs(ids[:, :-1], ids[:, 1:])[0, len(p) - 1:], raw, atol=1e-5)
            if temperature == 0:
                assert c.sampling_logprobs == [0.0] * len(x) and x.tolist() == logits.argmax(-1).tolist()
                continue
            q = torch.softmax(logits / temperature, -1)
            keep = q >= nucleus_threshold(q, top_p)[:, None]
            assert keep[torch.arange(len(x)), x].all()
            want = torch.log(q[torch.arange(len(x)), x] / torch.where(keep, q, 0).sum(-1))
            assert torch.allclose(torch.tensor(c.sampling_logprobs), want, atol=1e-5)
            if temperature == 1 and top_p == 1:
                assert torch.allclose(torch.tensor(c.sampling_logprobs), raw, atol=1e-5)


def test_nucleus_is_the_fewest_most_likely_tokens_reaching_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.25, 0.25, 0.25, 0.25]])
    tau = lambda top_p: nucleus_threshold(probs, top_p).tolist()
    assert tau(0.7) == [probs[0, 3], 0.25]          # {0.5, 0.25}; the second row's four tokens all tie at 0.25
    assert tau(0.75) == [probs[0, 3], 0.25]         # 0.5 + 0.25 reaches 0.75 exactly
    assert tau(0.76) == [probs[0, 2], 0.25]
    assert tau(1e-9) == [probs[0, 1], 0.25]         # the most likely token alone


@pytest.mark.parametrize("fused", [True, False])
def test_the_decode_step_equals_the_module_forward_on_a_ragged_cache(model, fused):
    # generate decodes through _DecodeStep (fused weights on CPU, the separate ones elsewhere): the same logits as
    # NanbeigeForCausalLM.forward with the same cache, step after step, padding rows included.
    from model import KVCache
    ps = prompts([3, 9, 6], seed=11)
    width = max(map(len, ps))
    pad = [width - len(p) for p in ps]
    ids = torch.tensor([[0] * k + p for k, p in zip(pad, ps)])
    with torch.inference_mode():
        caches = [KVCache(CFG, len(ps), width + 5, pad=pad) for _ in range(2)]
        for cache in caches:
            model(ids, cache, last_only=True)
        step = generation._DecodeStep(model)
        step.fused = fused
        if not fused:
            step.layers = [(w_in, tuple(qkv[0].split([CFG.num_attention_heads * CFG.head_dim] +
                                                       [CFG.num_key_value_heads * CFG.head_dim] * 2)), w_o, w_post,
                            tuple(gate_up[0].chunk(2)), w_down)
                           for w_in, qkv, w_o, w_post, gate_up, w_down in step.layers]
        token = torch.tensor([5, 17, 200])
        for _ in range(5):
            want = model(token[:, None], caches[0], last_only=True)
            got = step(token, caches[1])
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
            assert caches[0].pos == caches[1].pos
            token = want.argmax(-1)


@pytest.mark.parametrize("rows", [1, 7, 32, 45])
def test_the_prepacked_cpu_linear_equals_the_torch_linear_at_any_row_count(rows):
    # The decode step's gate/up and lm_head matmuls run on a weight reordered once for oneDNN, packed for 32 rows:
    # any row count (rows finish and leave the batch) gives torch.nn.functional.linear's result up to rounding.
    if not generation.PREPACKED:
        pytest.skip("this torch build has no oneDNN (mkldnn): _cpu_linear is torch.nn.functional.linear itself")
    g = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(1000, 192, generator=g) * 0.05, torch.randn(rows, 192, generator=g)
    with torch.inference_mode():
        got = generation._cpu_linear(weight, 32)(x)
        want = torch.nn.functional.linear(x, weight)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(generation._cpu_linear(weight.flip(0), 32)(x), want)   # it reads the weight it was given


def _tau_by_full_sort(probs, top_p):
    """tau [B] by definition: sort the whole row, sum it in fp64, take the value where the sum reaches top_p."""
    desc = probs.double().sort(dim=-1, descending=True).values
    k = torch.searchsorted(desc.cumsum(-1), torch.full_like(desc[:, :1], top_p)).clamp_(max=desc.shape[-1] - 1)
    return desc.gather(-1, k).squeeze(-1).float()


def test_nucleus_threshold_equals_a_full_sort(model):
    # The CPU path buckets the row by its fp32 bits instead of sorting it: the same tau as sorting the whole row and
    # summing in fp64, from near-uniform rows (thousands of tokens in the nucleus) to peaked ones, zeros included.
    g = torch.Generator().manual_seed(3)
    for scale in (0.01, 1.0, 10.0, 100.0):
        probs = torch.softmax(torch.randn(16, 4096, generator=g) * scale, -1)
        probs[:4, :100] = 0.0
        for top_p in (1e-9, 0.3, 0.9, 0.95, 0.999, 1.0):
            assert nucleus_threshold(probs, top_p).equal(_tau_by_full_sort(probs, top_p)), (scale, top_p)


def _draw_over_the_vocabulary(q, top_p, u):
    """The reference draw: tau from a full sort summed in fp64, then the fp64 cumsum over the whole row in token-id
    order and the first token past u * total."""
    kept = q * (q >= _tau_by_full_sort(q, top_p)[:, None])
    cdf = kept.double().cumsum(-1)
    total = cdf[:, -1]
    return torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(-1).clamp_(max=q.shape[-1] - 1), total


def test_the_candidate_draw_equals_the_draw_over_the_whole_vocabulary():
    # _nucleus_draw_cpu sorts only the tokens within 2^-12 of the row's top probability; every row kind takes its
    # branch in one batch: peaked rows (candidates), near-uniform rows (more than MAX_CANDIDATES candidates), rows
    # whose candidates hold less than top_p (one big token over thousands just under the cut), ties, zeros; and a
    # batch of flat rows alone (the shortcut). Same token ids and nucleus masses, exactly.
    g = torch.Generator().manual_seed(7)
    v = 4096
    for trial in range(40):
        scale = torch.tensor([0.01, 0.5, 2.0, 5.0, 20.0, 60.0])[torch.randint(0, 6, (24, 1), generator=g)]
        probs = torch.softmax(torch.randn(24, v, generator=g) * scale, -1)
        probs[0] = 0.5 / (v - 1)
        probs[0, trial] = 0.5                          # candidates {trial}: mass 0.5 < top_p, the whole row decides
        probs[1] = 0.0
        probs[1, :3] = torch.tensor([0.5, 0.25, 0.25])  # ties at tau; top_p 0.75 is reached exactly
        probs[2, :100] = 0.0
        u = torch.rand(24, generator=g, dtype=torch.float64)
        for top_p in (1e-9, 0.5, 0.75, 0.9, 0.95, 0.999):
            for rows in (slice(None), slice(0, 1), slice(3, 6)):
                token, total = generation._nucleus_draw_cpu(probs[rows].contiguous(), top_p, u[rows])
                want_token, want_total = _draw_over_the_vocabulary(probs[rows], top_p, u[rows])
                assert token.equal(want_token) and total.equal(want_total), (trial, top_p, rows)
    flat = torch.softmax(torch.randn(8, v, generator=g) * 0.01, -1)
    u = torch.rand(8, generator=g, dtype=torch.float64)
    token, total = generation._nucleus_draw_cpu(flat, 0.95, u)
    want_token, want_total = _draw_over_the_vocabulary(flat, 0.95, u)
    assert token.equal(want_token) and total.equal(want_total)


def test_a_sample_depends_on_its_seed_not_its_batch(model):
    p, others = prompts([6], seed=2)[0], prompts([2, 15, 9], seed=3)
    # Two common stop tokens make rows finish at different steps, so rows leave the batch mid-way.
    params = SamplingParams(16, temperature=1.0, top_p=0.95, stop_token_ids=(3, 17))
    alone = one(model, p, params, seed=42)
    crowd = generate(model, [Request(others[0], (1, 2)), Request(p, (7, 42, 9)), Request(others[1], (42,)),
                             Request(others[2], (3,))], params, batch_size=3)
    c = crowd[1][1]
    assert c.token_ids == alone.token_ids and c.finish_reason == alone.finish_reason
    assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=1e-5)
    assert torch.allclose(torch.tensor(c.sampling_logprobs), torch.tensor(alone.sampling_logprobs), atol=1e-5)
    assert len({tuple(s.token_ids) for s in crowd[1]}) == 3       # other seeds, other samples
    assert crowd[2][0].token_ids != alone.token_ids                # the same seed on another prompt
    again = generate(model, [Request(p, (7, 42, 9))], params)
    assert [s.token_ids for s in again[0]] == [s.token_ids for s in crowd[1]]


def test_n_samples_share_one_prefill(model, monkeypatch):
    ps = prompts([5, 8], seed=4)
    shapes, steps = [], []
    forward, step = NanbeigeForCausalLM.forward, generation._DecodeStep.__call__
    monkeypatch.setattr(NanbeigeForCausalLM, "forward",
                        lambda self, ids, *a, **kw: shapes.append(tuple(ids.shape)) or forward(self, ids, *a, **kw))
    monkeypatch.setattr(generation._DecodeStep, "__call__",
                        lambda self, token, cache: steps.append(tuple(token.shape)) or step(self, token, cache))
    params = SamplingParams(4, temperature=1.0)
    out = generate(model, [Request(ps[0], (1, 2, 3)), Request(ps[1], (4, 5, 6))], params)
    assert shapes == [(2, 8)] and steps == [(6,), (6,), (6,)]     # one prefill of the 2 prompts, then 6 rows
    assert [len(s) for s in out] == [3, 3]
    monkeypatch.undo()
    assert out[1][2].token_ids == one(model, ps[1], params, seed=6).token_ids


def test_max_new_tokens_stop_tokens_and_finish_reasons(model):
    p = prompts([5], seed=5)[0]
    free = one(model, p, SamplingParams(9, temperature=0.0), decode=lambda ids: " ".join(map(str, ids)))
    assert len(free.token_ids) == len(free.logprobs) == 9 and (free.finish_reason, free.stop) == ("length", None)
    assert free.text == " ".join(map(str, free.token_ids))
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    stopped = one(model, p, SamplingParams(9, temperature=0.0, stop_token_ids=(stop, 10 ** 6)),
                  decode=lambda ids: " ".join(map(str, ids)))
    assert stopped.token_ids == free.token_ids[:first + 1] and (stopped.finish_reason, stopped.stop) == ("stop", stop)
    assert stopped.text == " ".join(map(str, free.token_ids[:first]))      # the stop token is not in the text
    assert stopped.text is not None and one(model, p, SamplingParams(9, 0.0)).text is None
    near_end = one(model, prompts([CFG.max_position_embeddings - 3])[0], SamplingParams(50, temperature=0.0))
    assert len(near_end.token_ids) == 3 and near_end.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt tokens"):
        generate(model, [Request(prompts([CFG.max_position_embeddings])[0])], SamplingParams(1))
    with pytest.raises(ValueError, match="decode function"):
        generate(model, [Request(p)], SamplingParams(4, stop_strings=("x",)))


def test_stop_strings_cut_the_text_even_split_across_tokens(model):
    # A toy tokenizer: token i decodes to two letters, so most two-letter strings straddle a token boundary.
    pieces = [chr(97 + i % 26) + chr(97 + (i * 7 + 3) % 26) for i in range(CFG.vocab_size)]
    decode = lambda ids: "".join(pieces[i] for i in ids)
    p = prompts([4], seed=6)[0]
    params = dict(max_new_tokens=20, temperature=1.0)
    free = one(model, p, SamplingParams(**params), seed=3, decode=decode)
    text = free.text
    k = next(k for k in range(1, len(free.token_ids) - 1) if text.find(text[2 * k + 1:2 * k + 3]) == 2 * k + 1)
    stop = text[2 * k + 1:2 * k + 3]        # the second letter of token k, the first of token k + 1
    got = one(model, p, SamplingParams(**params, stop_strings=("zzzz", stop)), seed=3, decode=decode)
    assert got.token_ids == free.token_ids[:k + 2] and got.logprobs == free.logprobs[:k + 2]
    assert got.text == text[:2 * k + 1] and (got.finish_reason, got.stop) == ("stop", stop)


def test_stop_string_inside_a_multibyte_character_split_across_tokens(model):
    # Byte-level decoding (as BPE tokenizers do): a character's UTF-8 bytes may come from two tokens.
    p = prompts([3], seed=7)[0]
    free = one(model, p, SamplingParams(12, temperature=1.0), seed=11)
    k = next(k for k in range(2, 10) if free.token_ids[k] not in free.token_ids[:k]
             and free.token_ids[k + 1] not in free.token_ids[:k + 1])
    table = {i: b"a" for i in range(CFG.vocab_size)}
    table[free.token_ids[k]], table[free.token_ids[k + 1]] = "é".encode()[:1], "é".encode()[1:]
    decode = lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
    got = one(model, p, SamplingParams(12, temperature=1.0, stop_strings=("é",)), seed=11, decode=decode)
    assert got.token_ids == free.token_ids[:k + 2] and got.text == "a" * k and got.stop == "é"


def test_model_generate_wraps_the_engine(model):
    ids = torch.tensor(prompts([6, 6, 6], seed=8))
    out = model.generate(ids, 7, temperature=0.8, top_p=0.9, seeds=[4, 5, 6])
    engine = generate(model, [Request(r, (s,)) for r, s in zip(ids.tolist(), (4, 5, 6))],
                      SamplingParams(7, 0.8, 0.9))
    assert out[:, :6].equal(ids) and out[:, 6:].tolist() == [c.token_ids for (c,) in engine]


def test_bench_generate_smoke(tmp_path, capsys):
    import importlib.util
    from stages.common import REPO
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "bench" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--batch", "3", "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert "greedy rows identical: 3/3" in capsys.readouterr().out
    assert (tmp_path / "bench_generate.json").is_file()
