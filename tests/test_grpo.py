"""GRPO (stages/grpo_loss.py, stages/rl.py) and the pass-rate filter (stages/pass_filter.py) on the micro checkpoint:
advantages and the clipped loss by hand, an update independent of the micro-batch split, no gradient from truncated
samples, zero-variance groups dropped, exact resume across rollouts, the filter's strict bounds and its artifacts.
Rewards are a seeded coin per (prompt, text) except in the verifier test, so groups have variance on a random policy."""
from __future__ import annotations

import copy
import hashlib
import math

import pyarrow.parquet as pq
import pytest
import torch

from fixtures_checkpoint import make_checkpoint
from stages import common, pass_filter, rl, tasks
from stages.grpo_loss import GRPOConfig, GRPOLoss, Sample, grpo_advantages, grpo_micro_batches
from stages.training import optimizer_step

CPU = torch.device("cpu")
TASKS = {"seed": 1234,
         "math": {"levels": [1, 2], "train_per_level": 12, "heldout_per_level": 4, "max_heldout_fraction": 0.4},
         "code": {"levels": [1], "train_per_level": 3, "heldout_per_level": 2, "max_heldout_fraction": 0.4,
                  "public_tests": 2, "hidden_tests": 3}}
VERIFY = {"sympy_timeout_s": 5.0, "sandbox_timeout_s": 5.0, "sandbox_memory_mb": 1024, "sandbox_workers": 1}
FILTER = {"seed": 1234, "scale": "tiny", "k": 4, "low": 0.1, "high": 0.9, "max_prompts_per_level": 6,
          "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "batch_size": 32, "cpu_threads": 1,
          "rollout_engine": "native", **VERIFY}
RL = {"seed": 1234, "scale": "tiny", "min_prompts": 1, "steps": 4, "prompts_per_step": 2, "group_size": 4,
      "max_rounds": 3,
      "ppo_epochs": 1, "micro_batch_size": 4, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 16,
      "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0, "scale_std": True, "adv_eps": 1e-6, "optimizer": "adamw",
      "lr_peak": 1e-3, "lr_final": 1e-4, "warmup_steps": 1, "lr_shape": "cosine", "adam_betas": [0.9, 0.95],
      "adam_eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0, "checkpoint_every": 100, "log_every": 1,
      "progress_every_steps": 10, "progress_every_s": 30, "cpu_threads": 1, "rollout_engine": "native", **VERIFY}
CFG = GRPOConfig(clip_low=0.2, clip_high=0.2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def coin_reward(records, texts, p):
    """1 or 0 by a hash of (prompt id, completion text): variance on any policy, deterministic."""
    return [float(hashlib.sha256(f"{r['id']}/{t}".encode()).digest()[0] % 2) for r, t in zip(records, texts)]


def mostly_coin_reward(records, texts, p):
    """coin_reward, except a third of the prompts always score 0: their groups have no variance."""
    coins = coin_reward(records, texts, p)
    return [0.0 if hashlib.sha256(r["id"].encode()).digest()[0] % 3 == 0 else c for r, c in zip(records, coins)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The micro checkpoint made to stop often (a constant embedding feature read by the <|im_end|> logit: about a
    third of 8-token samples are truncated), the task ladder, and the rl_stem pass filter run with coin rewards."""
    from model import load_pretrained, save_pretrained
    from stages.chat import load_chat_tokenizer
    root = tmp_path_factory.mktemp("grpo")
    init = make_checkpoint(root / "init")
    model = load_pretrained(init)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        model.lm_head.weight[load_chat_tokenizer(init).token_to_id("<|im_end|>"), 0] = 1.4
    save_pretrained(model, init)
    tasks.write_tasks(root / "tasks", TASKS)
    manifest = pass_filter.run_pass_filter("rl_stem", root / "tasks", init, root / "kept", dict(FILTER),
                                           reward_fn=coin_reward)
    return {"root": root, "init": init, "tasks": root / "tasks", "kept": root / "kept", "filter": manifest}


def sample(prompt: list[int], completion: list[int], reward: float) -> Sample:
    return Sample(prompt, completion, [-2.0] * len(completion), reward, False)


def random_groups(seed: int = 0) -> list[list[Sample]]:
    """2 groups of 4: ragged prompts and completions, rewards with variance, one truncated sample, old log-probs
    off the policy so ratios reach the clip."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for q in range(2):
        prompt = torch.randint(10, 600, (5 + 3 * q,), generator=g).tolist()
        rows = []
        for i in range(4):
            completion = torch.randint(10, 600, (3 + i + q,), generator=g).tolist()
            old = (-6.5 + 0.8 * torch.randn(len(completion), generator=g)).tolist()
            rows.append(Sample(prompt, completion, old, float((i + q) % 2), truncated=(q, i) == (1, 2)))
        groups.append(rows)
    return groups


def sgd_update(model, micros, cfg=CFG):
    """Weights after one SGD step at lr 1 (w - g: the gradient itself shows)."""
    model = copy.deepcopy(model)
    losses, _ = optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micros, GRPOLoss(cfg), 1.0, 1e9,
                               CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


# ----------------------------------------------------------------------------- the loss by hand

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # Group 1: mean 1/4, sample std sqrt((9/16 + 3/16) / 3) = 1/2; group 2: mean 1/2, std sqrt(1 / 3).
    scaled = grpo_advantages(rewards, scale_std=True, eps=0.0)
    s2 = math.sqrt(1 / 3)
    assert scaled.tolist() == [pytest.approx([1.5, -0.5, -0.5, -0.5]),
                               pytest.approx([-0.5 / s2, 0.5 / s2, 0.5 / s2, -0.5 / s2])]
    assert grpo_advantages(rewards, scale_std=False, eps=1e-6).tolist() == [[0.75, -0.25, -0.25, -0.25],
                                                                            [-0.5, 0.5, 0.5, -0.5]]


class FixedPolicy:
    """A model whose token log-probs are a given leaf tensor: the loss's arithmetic alone."""

    def __init__(self, logp):
        self.logp = logp

    def token_logprobs(self, input_ids, targets):
        return self.logp


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_clipped_loss_and_k3_penalty_by_hand(kl_coef):
    """Three rows: A = +1 with rho = e^0.3 (clipped at 1.2), A = -1 with rho = e^-0.5 (clipped at 0.8), A = 1/2 with
    rho = 1 and e^0.1 (inside the clip); eps 0.2; the last position of rows 0 and 1 is masked. N = 4."""
    logp = torch.tensor([[0.3, 5.0], [-0.5, 5.0], [0.0, 0.1]], requires_grad=True)
    micro = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "targets": torch.zeros(3, 2, dtype=torch.long),
             "mask": torch.tensor([[1, 0], [1, 0], [1, 1]], dtype=torch.bool), "old_logprobs": torch.zeros(3, 2),
             "advantages": torch.tensor([1.0, -1.0, 0.5]), "ref_logprobs": torch.zeros(3, 2)}
    loss_fn = GRPOLoss(GRPOConfig(clip_low=0.2, clip_high=0.2, kl_coef=kl_coef))
    assert loss_fn.units(micro) == {"tokens": 4}
    out = loss_fn(FixedPolicy(logp), micro, {"tokens": 4})
    pg = [-1.2 * 1.0, -(0.8 * -1.0), -0.5 * 1.0, -0.5 * math.exp(0.1)]
    k3 = [math.exp(-d) + d - 1 for d in (0.3, -0.5, 0.0, 0.1)]  # d = l_theta - l_ref, l_ref = 0
    assert out["pg"].item() == pytest.approx(sum(pg) / 4, rel=1e-6)
    assert out["loss"].item() == pytest.approx(sum(pg) / 4 + kl_coef * sum(k3) / 4, rel=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(0.5)
    assert ("kl" in out) == bool(kl_coef)
    out["loss"].backward()
    # Clipped tokens and masked positions get no gradient; the others -A rho / N (+ beta (1 - e^-d) / N).
    want = [[kl_coef * (1 - math.exp(-0.3)) / 4, 0.0], [kl_coef * (1 - math.exp(0.5)) / 4, 0.0],
            [-0.5 / 4, -0.5 * math.exp(0.1) / 4 + kl_coef * (1 - math.exp(-0.1)) / 4]]
    assert [pytest.approx(row, abs=1e-7) for row in want] == logp.grad.tolist()


# ----------------------------------------------------------------------------- batching

def test_one_by_eight_equals_four_by_two_micro_batches(world):
    """The same 8 samples as 1 micro-batch of 8 or 4 of 2: the same update (SGD at lr 1, so the weights show the
    gradient; fp32, atol 1e-6 / rtol 1e-5) and the same loss, since N is the step's token count."""
    from model import load_pretrained
    model = load_pretrained(world["init"])
    groups = random_groups()
    one, _ = grpo_micro_batches(groups, CFG, 8, 0)
    four, _ = grpo_micro_batches(groups, CFG, 2, 0)
    assert len(one) == 1 and len(four) == 4
    w_one, l_one = sgd_update(model, one)
    w_four, l_four = sgd_update(model, four)
    for k in w_one:
        assert torch.allclose(w_one[k], w_four[k], atol=1e-6, rtol=1e-5), k
    assert l_one["loss"] == pytest.approx(l_four["loss"], rel=1e-5)
    assert 0 < l_one["clip_fraction"] < 1  # the old log-probs are off-policy: the clip is exercised
    assert not torch.equal(w_one["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_truncated_samples_give_no_gradient_but_count_in_the_group(world):
    from model import load_pretrained
    model = load_pretrained(world["init"])
    groups = random_groups()
    micros, _ = grpo_micro_batches(groups, CFG, 8, 0)
    (micro,) = micros
    assert not micro["mask"][6].any()  # group 1, sample 2: truncated
    stopped = sum(len(s.completion_ids) for g in groups for s in g if not s.truncated)
    assert GRPOLoss(CFG).units(micro) == {"tokens": stopped}
    # Its reward still enters the baseline: group 1's rewards [1, 0, 1, 0] centre on 1/2.
    assert micro["advantages"][4:].tolist() == pytest.approx([0.5 / math.sqrt(1 / 3), -0.5 / math.sqrt(1 / 3)] * 2,
                                                             rel=1e-5)
    # Any other tokens and log-probs for the truncated sample: bit-identical weights after the step.
    t = groups[1][2]
    changed = [g[:] for g in groups]
    changed[1][2] = Sample(t.prompt_ids, [7] * len(t.completion_ids), [-0.1] * len(t.completion_ids), t.reward, True)
    w_a, _ = sgd_update(model, micros)
    w_b, _ = sgd_update(model, grpo_micro_batches(changed, CFG, 8, 0)[0])
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    # Not truncated, the same sample moves the weights.
    changed[1][2] = Sample(t.prompt_ids, t.completion_ids, t.logprobs, t.reward, False)
    w_c, _ = sgd_update(model, grpo_micro_batches(changed, CFG, 8, 0)[0])
    assert not all(torch.equal(w_a[k], w_c[k]) for k in w_a)


def test_zero_variance_groups_are_dropped_before_batching():
    prompt = [11, 12, 13]
    solved = [sample(prompt, [20, 21], 1.0) for _ in range(4)]
    mixed = [sample(prompt, [30 + i] * (i + 1), r) for i, r in enumerate((0.0, 1.0, 0.0, 0.0))]
    failed = [sample(prompt, [40, 41, 42], 0.0) for _ in range(4)]
    micros, dropped = grpo_micro_batches([solved, mixed, failed], CFG, 3, 0)
    assert dropped == 2 and [m["input_ids"].shape[0] for m in micros] == [3, 1]
    assert sum(GRPOLoss(CFG).units(m)["tokens"] for m in micros) == 1 + 2 + 3 + 4  # the mixed group's tokens only
    assert {m["input_ids"].shape[1] for m in micros} == {3 + 4 - 1}  # one width per step (data-parallel regrouping)
    assert grpo_micro_batches([solved, failed], CFG, 3, 0) == ([], 2)


# ----------------------------------------------------------------------------- the stage

def run(world, tmp, name: str, max_steps=None, reward_fn=mostly_coin_reward, **over):
    p = {**RL, **over}
    return rl.run_rl("rl_stem", world["kept"], world["init"], tmp / name, tmp / f"{name}_resume", tmp / f"{name}_live",
                     p, max_steps=max_steps, reward_fn=reward_fn)


@pytest.mark.parametrize("ppo_epochs,stop", [(1, 2), (2, 1)])
def test_resume_is_exact_across_rollouts(world, tmp_path, ppo_epochs, stop):
    """4 steps == `stop` steps + a stop + resume to 4 (torch.equal weights, equal totals, zero-variance groups dropped
    and resampled the same way); with ppo_epochs 2 the stop falls inside a rollout's epochs, whose rollout comes back
    from the resume state."""
    from model import load_pretrained
    whole = run(world, tmp_path, "a", ppo_epochs=ppo_epochs)
    assert run(world, tmp_path, "b", max_steps=stop, ppo_epochs=ppo_epochs) is None
    resumed = run(world, tmp_path, "b", ppo_epochs=ppo_epochs)
    a, b = load_pretrained(tmp_path / "a" / "final"), load_pretrained(tmp_path / "b" / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert whole["counts"] == resumed["counts"] and whole["loss_end"] == resumed["loss_end"]
    c = whole["counts"]
    assert c["steps"] == 4 and c["rounds"] >= 4 // ppo_epochs
    assert c["samples"] == c["rounds"] * RL["prompts_per_step"] * RL["group_size"]
    assert c["groups_kept"] + c["groups_dropped"] == c["rounds"] * RL["prompts_per_step"]
    assert c["groups_dropped"] > 0 and c["truncated"] > 0
    assert (tmp_path / "a" / "final" / "tokenizer.json").is_file()
    assert not torch.equal(a.lm_head.weight, load_pretrained(world["init"]).lm_head.weight)


def test_logged_metrics_and_the_kl_penalty(world, tmp_path):
    """Every step logs the rl/ metrics and the loss parts; with kl_coef > 0 the KL to the init is 0 at the first
    step (the policy is the reference) and positive after an update."""
    run(world, tmp_path, "kl", steps=2, kl_coef=0.05)
    state = next((tmp_path / "kl_resume").iterdir())
    payload = torch.load(next(state.glob("state-*")) / "trainer.pt", weights_only=True)["payload"]
    rows = [r["metrics"] for r in payload["loop"]["history"]]
    assert len(rows) == 2
    for name in ("reward_mean", "pass_rate", "response_length", "entropy", "truncation_rate", "groups_dropped"):
        assert all(f"rl/{name}" in m for m in rows)
    assert all("train/clip_fraction" in m and "train/pg" in m for m in rows)
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["train/kl"] > 1e-5
    assert all(r["rl/entropy"] > 0 and 0 <= r["rl/truncation_rate"] <= 1 for r in rows)


def test_a_step_with_nothing_to_train_stops_after_max_rounds(world, tmp_path):
    with pytest.raises(common.StageError, match="3 rounds of 2 prompts left nothing to train"):
        run(world, tmp_path, "flat", reward_fn=lambda records, texts, p: [1.0] * len(texts))


# ----------------------------------------------------------------------------- the pass-rate filter

@pytest.mark.parametrize("passes,k,verdict", [
    (0, 10, "too_hard"), (1, 10, "too_hard"), (2, 10, "kept"), (8, 10, "kept"), (9, 10, "too_easy"),
    (10, 10, "too_easy"), (1, 4, "kept"), (3, 4, "kept"), (0, 4, "too_hard"), (4, 4, "too_easy"),
    (1, 16, "too_hard"), (2, 16, "kept"), (14, 16, "kept"), (15, 16, "too_easy"),
])
def test_pass_filter_bounds_are_strict(passes, k, verdict):
    """0.1 < rate < 0.9: exactly 1/10 and 9/10 drop (at k = 16, 1/16 and 15/16 fall outside the bounds)."""
    assert pass_filter.pass_verdict(passes, k, 0.1, 0.9) == verdict


def test_pass_filter_writes_kept_rates_and_histogram(world):
    kept_dir, m = world["kept"], world["filter"]
    rates = pq.read_table(kept_dir / "pass_rates.parquet").to_pylist()
    kept = pq.read_table(kept_dir / "kept.parquet").to_pylist()
    hist = common.read_manifest(kept_dir / "histogram.json")
    c = m["counts"]
    assert c["candidates"] == len(rates) == 12 and c["samples"] == 48  # 6 per level x 2 levels, k = 4
    assert c["kept"] + c["too_hard"] + c["too_easy"] == c["candidates"] and 0 < c["kept"] < c["candidates"]
    assert len(hist["passes"]) == 5 and sum(hist["passes"]) == c["candidates"]
    assert hist["verdicts"]["kept"] == len(kept) == c["kept"]
    assert {r["id"] for r in kept} == {q["id"] for q in rates if q["verdict"] == "kept"}
    assert all(0.1 < r["pass_rate"] < 0.9 and r["domain"] == "math" for r in kept)
    assert {"answer", "solution", "template_id"} <= set(kept[0])  # the ladder record as is, + pass_rate
    assert m["role"] == "rl_stem" and c["truncated"] > 0
    with pytest.raises(common.StageError, match="not the pass_filter manifest of rl_code"):
        rl.load_kept(kept_dir, "rl_code")


def test_the_code_filter_keeps_code_records(world, tmp_path):
    m = pass_filter.run_pass_filter("rl_code", world["tasks"], world["init"], tmp_path, dict(FILTER),
                                    reward_fn=coin_reward)
    kept = pq.read_table(tmp_path / "kept.parquet").to_pylist()
    assert m["domain"] == "code" and m["counts"]["candidates"] == 3 and len(kept) == m["counts"]["kept"]
    assert all(r["domain"] == "code" and {"test", "entry_point", "pass_rate"} <= set(r) for r in kept)
    assert pq.read_schema(tmp_path / "kept.parquet").field("pass_rate").type == "double"


def test_task_rewards_are_the_ladder_verifier():
    """The default reward: math by the first final answer, code by the task's tests in the sandbox."""
    rows = tasks.build_tasks(TASKS)
    m, c = rows["math_train"][0], rows["code_train"][0]
    good_code = f"```python\n{c['prompt'].splitlines()[0]}\n{c['canonical_solution']}```"
    bad_code = f"```python\n{c['prompt'].splitlines()[0]}\n    return None\n```"
    texts = [f"#### {m['answer']}", f"#### {int(m['answer']) + 1}\n#### {m['answer']}", good_code, bad_code]
    assert pass_filter.task_rewards([m, m, c, c], texts, VERIFY) == [1.0, 0.0, 1.0, 0.0]


def test_rl_pref_filter_mixes_domains_and_needs_the_judge(world, tmp_path):
    """rl_pref's candidates are math and code (per domain and level); the kept table unifies the two schemas; its
    reward is the judge, so without --judge-dir it is refused."""
    m = pass_filter.run_pass_filter("rl_pref", world["tasks"], world["init"], tmp_path, dict(FILTER),
                                    reward_fn=coin_reward)
    rates = pq.read_table(tmp_path / "pass_rates.parquet").to_pylist()
    assert m["domain"] == "math+code" and m["reward"] == "judge" and m["counts"]["candidates"] == 12 + 3
    assert {q["domain"] for q in rates} == {"math", "code"}
    hist = common.read_manifest(tmp_path / "histogram.json")
    assert set(hist["by_level"]) == {"math/1", "math/2", "code/1"}
    assert {"test", "entry_point", "answer"} <= set(pq.read_schema(tmp_path / "kept.parquet").names)
    with pytest.raises(common.StageError, match="pass --judge-dir"):
        pass_filter.role_rewarder("rl_pref", None, FILTER)
    assert pass_filter.role_rewarder("rl_code", None, FILTER) is pass_filter.task_rewards


def test_nothing_kept_passes_the_init_through_only_with_min_prompts_zero(world, tmp_path):
    pass_filter.run_pass_filter("rl_stem", world["tasks"], world["init"], tmp_path / "kept", dict(FILTER),
                                reward_fn=lambda records, texts, p: [0.0] * len(texts))
    with pytest.raises(common.StageError, match="0 prompts kept, fewer than min_prompts 1"):
        rl.run_rl("rl_stem", tmp_path / "kept", world["init"], tmp_path / "a", tmp_path / "ra", tmp_path / "la",
                  dict(RL))
    m = rl.run_rl("rl_stem", tmp_path / "kept", world["init"], tmp_path / "b", tmp_path / "rb", tmp_path / "lb",
                  {**RL, "min_prompts": 0})
    assert m["counts"]["trained"] is False and m["counts"]["steps"] == 0 and m["reward_start"] is None
    from model import load_pretrained
    a, b = load_pretrained(world["init"]), load_pretrained(tmp_path / "b" / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (tmp_path / "b" / "final" / "tokenizer.json").is_file()
    assert (tmp_path / "lb" / "plots").is_dir()  # dvc.yaml declares dvclive/<stage>/plots: it must exist


def test_rl_pref_trains_against_a_judge_directory(world, tmp_path):
    """The judge a reward_model run writes, read by --judge-dir: rl_pref's rewards are R(y, r) in (0, 1), so its
    groups have variance and a step trains."""
    from stages import reward_model as rm
    pass_filter.run_pass_filter("rl_pref", world["tasks"], world["init"], tmp_path / "kept", dict(FILTER),
                                reward_fn=coin_reward)
    judge = tmp_path / "judge"
    from model import load_pretrained
    rm.write_judge(judge, load_pretrained(world["init"]), rm.JudgeFormat("full", 512), world["init"])
    m = rl.run_rl("rl_pref", tmp_path / "kept", world["init"], tmp_path / "o", tmp_path / "r", tmp_path / "l",
                  {**RL, "steps": 1}, judge_dir=judge)
    assert m["counts"]["trained"] is True and m["counts"]["tokens_trained"] > 0 and m["judge"] == str(judge)
    assert 0.0 < m["reward_start"] < 1.0 and m["counts"]["groups_dropped"] == 0
    assert str(judge / "model.safetensors") in m["inputs"]


class RecordingEngine:
    """A stand-in for model.vllm_engine.VLLMEngine with its contract (generate, sync_weights): it samples with our
    engine on a private copy of the weights, which only sync_weights updates, as vLLM's would be."""

    def __init__(self, checkpoint):
        from model import load_pretrained
        self.model, self.syncs = load_pretrained(checkpoint).eval(), []

    def sync_weights(self, policy):
        self.model.load_state_dict(policy.state_dict())
        self.syncs.append(sum(float(t.double().sum()) for t in policy.state_dict().values()))

    def generate(self, requests, params, decode):
        from model import generate
        return generate(self.model, requests, params, decode, 16)


def test_rollout_engine_vllm_syncs_the_policy_before_every_rollout(world, tmp_path, monkeypatch):
    """rollout_engine vllm: the rollouts come from the engine, which gets the policy's current weights before each
    step's rollout; an engine that samples like ours then gives the native run's weights exactly."""
    engines = []

    def fake_engine(checkpoint, p):
        if p["rollout_engine"] == "native":
            return None
        engines.append(RecordingEngine(checkpoint))
        return engines[-1]
    monkeypatch.setattr(rl, "rollout_engine", fake_engine)
    native = run(world, tmp_path, "native")
    via_engine = run(world, tmp_path, "engine", rollout_engine="vllm")
    (engine,) = engines
    assert len(engine.syncs) == RL["steps"] and len(set(engine.syncs)) == RL["steps"]  # new weights every step
    assert native["counts"]["samples"] == via_engine["counts"]["samples"]
    from model import load_pretrained
    a, b = load_pretrained(tmp_path / "native" / "final"), load_pretrained(tmp_path / "engine" / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
