"""stages/reward_model.py: the Bradley-Terry loss by hand, both orders of every pair trained, the order-symmetric RL
reward, an update independent of the micro-batch split, exact resume, a micro judge learning a separable pair set,
bad pairs rejected with reasons, the distill_targets adapter and the split by prompt. Micro shapes, one CPU thread."""
from __future__ import annotations

import copy
import json
import math
import random

import pyarrow as pa
import pytest
import torch

from fixtures_checkpoint import make_checkpoint
from model import load_pretrained
from stages import common, distill_targets, reward_model as rm, tasks
from stages.chat import encode_chat, load_chat_tokenizer
from stages.training import optimizer_step

CPU = torch.device("cpu")
RM = {"seed": 0, "scale": "tiny", "min_pairs": 1, "heldout_fraction": 0.25, "response_view": "full", "max_len": 512,
      "epochs": 6,
      "max_steps": 30, "pairs_per_step": 8, "micro_batch_pairs": 4, "optimizer": "adamw", "lr_peak": 3e-3,
      "lr_final": 1e-4, "warmup_steps": 2, "lr_shape": "cosine", "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
      "weight_decay": 0.0, "grad_clip": 1.0, "checkpoint_every": 100, "log_every": 1, "progress_every_steps": 10,
      "progress_every_s": 30, "cpu_threads": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rm") / "init")


def judge_of(init, view: str = "full", max_len: int = 512) -> rm.PairwiseJudge:
    return rm.PairwiseJudge(load_pretrained(init, dtype=torch.float32), load_chat_tokenizer(init),
                            rm.JudgeFormat(view, max_len))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reply(content: str, reasoning: str = "") -> dict:
    return {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}


def row(pair_id, prompt_id, prompt, chosen, rejected, source="unit") -> dict:
    enc = lambda x: x if isinstance(x, str) or x is None else json.dumps(x)  # noqa: E731
    return {"id": pair_id, "prompt_id": prompt_id, "prompt": enc(prompt), "chosen": enc(chosen),
            "rejected": enc(rejected), "source": source}


def separable_rows(n: int, seed: int = 0) -> list[dict]:
    """n prompts, one pair each: the chosen reply always reads "Good answer: <sum>.", the rejected one "bad"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        out.append(row(f"p{i}/0", f"p{i}", user(f"What is {a} + {b}?"), reply(f"Good answer: {a + b}.",
                                                                             f"{a} + {b} = {a + b}"), reply("bad")))
    return out


def write_pairs(path, rows: list[dict]):
    common.write_table(path, pa.Table.from_pylist(rows, schema=rm.PAIR_SCHEMA))
    return path


class FixedScores(torch.nn.Module):
    """A stand-in judge whose row n scores s_n = logit("1") - logit("2"), s a parameter (the loss by hand)."""

    def __init__(self, scores: list[float], verdicts: tuple[int, int]):
        super().__init__()
        self.s, self.verdicts, self.vocab = torch.nn.Parameter(torch.tensor(scores)), verdicts, max(verdicts) + 1

    def forward(self, input_ids, last_only=False, doc_ids=None, positions=None):
        assert last_only and doc_ids is not None and positions is not None
        logits = torch.zeros(input_ids.shape[0], self.vocab)
        return logits.index_put((torch.arange(len(self.s)), torch.tensor(self.verdicts[0])), self.s)


def stub_micro(b: int) -> dict:
    ids = torch.zeros(b, 2, 3, dtype=torch.long)
    return {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "positions": torch.arange(3).expand(b, 2, 3)}


# ----------------------------------------------------------------------------- the loss

def test_bradley_terry_loss_by_hand():
    """Rows (y1+ first, y1+ second, y2+ first, y2+ second) scoring s = (2, -1, 0.5, 1.5):
    L = 1/4 [log(1 + e^-2) + log(1 + e^-1) + log(1 + e^-0.5) + log(1 + e^1.5)] = 0.653920;
    3 of 4 comparisons prefer the chosen reply, pair 1 is consistent and pair 2 is not; dL/ds_n = -sigma(-s_n) / 4
    on chosen-first rows and +sigma(s_n) / 4 on chosen-second rows."""
    verdicts = (3, 5)
    model = FixedScores([2.0, -1.0, 0.5, 1.5], verdicts)
    loss_fn = rm.BradleyTerryLoss(verdicts)
    micro = stub_micro(2)
    totals = loss_fn.units(micro)
    assert totals == {"comparisons": 4, "pairs": 2}
    out = loss_fn(model, micro, totals)
    by_hand = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-0.5))
               + math.log1p(math.exp(1.5))) / 4
    assert by_hand == pytest.approx(0.653920, abs=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(by_hand, abs=1e-6)
    assert float(out["accuracy"]) == 0.75 and float(out["consistency"]) == 0.5
    assert float(out["margin"]) == pytest.approx((2 + 1 + 0.5 - 1.5) / 4)
    out["loss"].backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [-sig(-2.0) / 4, sig(-1.0) / 4, -sig(-0.5) / 4, sig(1.5) / 4]
    torch.testing.assert_close(model.s.grad, torch.tensor(want), atol=1e-7, rtol=1e-6)


def test_both_orders_of_every_pair_are_trained(init):
    """A micro-batch row pair is (chosen first, chosen second) of the same pair; a judge that only prefers position 1
    (s = b everywhere) is pushed back to b = 0: dL/db = (sigma(b) - sigma(-b)) / 2."""
    judge = judge_of(init)
    pairs, rejected = rm.encode_pairs(judge, rm.pairs_from_table(write_pairs(
        init.parent / "both.parquet", separable_rows(3)))[0])
    assert not rejected
    micro = rm.collate(pairs, judge.pad_id)
    assert micro["input_ids"].shape[:2] == (3, 2)
    for i, q in enumerate(pairs):
        for order, first, second in ((0, "Good answer", "bad"), (1, "bad", "Good answer")):
            real = micro["input_ids"][i, order][micro["doc_ids"][i, order] >= 0].tolist()
            text = judge.tok.decode(real, skip_special_tokens=False)
            assert "[Response 1]\n" in text and text.index(first) < text.index(second)
            assert text.endswith(rm.JUDGE_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
        assert rm.collate([q], judge.pad_id)["input_ids"][0, 0, -len(q.chosen_first):].tolist() == q.chosen_first
    b = 1.0
    biased = FixedScores([b, b], judge.verdicts)
    loss_fn = rm.BradleyTerryLoss(judge.verdicts)
    loss_fn(biased, stub_micro(1), {"comparisons": 2, "pairs": 1})["loss"].backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(biased.s.grad.sum()) == pytest.approx((sig(b) - sig(-b)) / 2, abs=1e-7)
    assert float(biased.s.grad.sum()) > 0


# ----------------------------------------------------------------------------- the RL reward

def test_reward_is_order_symmetric(init):
    """R(y, r) + R(r, y) == 1 and R(y, y) == 1/2 by construction (scores made large so it is not just 1/2 + 1/2);
    batched rewards equal the single ones; completion text with a <think> block reads like its message."""
    judge = judge_of(init)
    with torch.no_grad():
        judge.model.lm_head.weight.mul_(20.0)
    prompt = user("What is 3 + 4?")
    y, r = "<think>\n3 + 4 = 7\n</think>\n\n#### 7", reply("#### 8", "3 + 4 = 8")
    assert judge.reward(prompt, y, r) == pytest.approx(judge.reward(prompt, reply("#### 7", "3 + 4 = 7"), r), abs=1e-9)
    s = judge.score(prompt, y, r)
    assert abs(s) > 0.05 and abs(s + judge.score(prompt, r, y)) > 1e-4  # a position bias the average cancels
    cases = [(prompt, y, r), (user("Name a prime."), reply("7"), reply("8, because it is even")),
             (user("Write f."), reply("```python\ndef f():\n    return 1\n```"), reply("no"))]
    for x, a, b in cases:
        assert judge.reward(x, a, b) + judge.reward(x, b, a) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < judge.reward(x, a, b) < 1.0
        assert judge.reward(x, a, a) == pytest.approx(0.5, abs=1e-6)
    batched = judge.rewards([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases], batch_size=4)
    assert batched == pytest.approx([judge.reward(*c) for c in cases], abs=1e-5)
    assert judge.check(prompt, reply("word " * 600), r) == "over_length"
    assert judge.check(prompt, reply("a <|im_end|> b"), r) == "special_token_in_text"
    assert judge.check(prompt, y, r) is None
    with pytest.raises(rm.PairRejected, match="over_length"):
        judge.reward(prompt, reply("word " * 600), r)


def test_ladder_rewarder_scores_against_the_reference(init):
    """RL's Rewarder over task records: the reference itself scores exactly 1/2, another answer R(y, r) as the judge
    gives it, an unreadable completion 0."""
    judge = judge_of(init)
    record = {"id": "m", "domain": "math", "level": 1, "prompt": "What is 9 + 2?", "answer": "11",
              "solution": "9 + 2 = 11.\n#### 11"}
    reference = tasks.reference_messages(record)[-1]
    own = f"<think>\n{reference['reasoning_content']}\n</think>\n\n{reference['content']}"
    texts = [own, "#### 12", "<think>\nnever closed"]
    got = rm.ladder_rewarder(judge)([record] * 3, texts, {})
    assert got[0] == pytest.approx(0.5, abs=1e-6) and got[2] == 0.0
    assert got[1] == pytest.approx(judge.reward(tasks.format_prompt(record, "chat"), "#### 12", reference), abs=1e-6)


# ----------------------------------------------------------------------------- training

def _sgd_update(init, micros) -> tuple[dict, dict]:
    """One SGD step at lr 1 (the update is minus the gradient) from the init weights; (weights, logged parts)."""
    torch.manual_seed(0)
    model = load_pretrained(init, dtype=torch.float32)
    verdicts = rm.verdict_ids(load_chat_tokenizer(init))
    sums, _ = optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micros, rm.BradleyTerryLoss(verdicts),
                             lr=1.0, grad_clip=1e9, device=CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, sums


def test_update_independent_of_micro_batch_split(init):
    """1 x 4 and 4 x 1 micro-batches of pairs of different lengths (so different padding): the same update and the
    same logged parts."""
    judge = judge_of(init)
    rows = separable_rows(4)
    rows[1]["rejected"] = json.dumps(reply("bad " * 30))
    pairs, _ = rm.encode_pairs(judge, rm.pairs_from_table(write_pairs(init.parent / "split.parquet", rows))[0])
    assert len({len(q.chosen_first) for q in pairs}) > 1
    whole, l1 = _sgd_update(init, [rm.collate(pairs, judge.pad_id)])
    split, l4 = _sgd_update(init, [rm.collate([q], judge.pad_id) for q in pairs])
    start = load_pretrained(init).state_dict()
    assert any((whole[k] - start[k]).abs().max() > 1e-5 for k in start)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-6, rtol=1e-5)
    for name in rm.PARTS:
        assert l4[name] == pytest.approx(l1[name], rel=1e-5, abs=1e-7)


def test_resume_is_exact(init, tmp_path):
    """4 steps == 2 steps + a stop + resume to 4: the judge's weights torch.equal, the same held-out metrics."""
    pairs = write_pairs(tmp_path / "pairs.parquet", separable_rows(24))
    p = {**RM, "max_steps": 4}
    whole = rm.run_reward_model([pairs], init, tmp_path / "a", tmp_path / "ra", tmp_path / "la", p)
    assert rm.run_reward_model([pairs], init, tmp_path / "b", tmp_path / "rb", tmp_path / "lb", p, stop=2) is None
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = rm.run_reward_model([pairs], init, tmp_path / "b", tmp_path / "rb", tmp_path / "lb", p)
    a, b = load_pretrained(tmp_path / "a" / "judge"), load_pretrained(tmp_path / "b" / "judge")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert whole["loss_end"] == resumed["loss_end"] and whole["counts"]["steps"] == resumed["counts"]["steps"] == 4
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b")]
    assert metrics[0] == metrics[1]


def test_micro_judge_learns_separable_pairs(init, tmp_path):
    """From chance to > 90% held-out accuracy (both orders) in a few seconds; the verdicts stop depending on the
    order; the written judge loads and gives the chosen reply a reward above 1/2."""
    pairs = write_pairs(tmp_path / "pairs.parquet", separable_rows(48))
    manifest = rm.run_reward_model([pairs], init, tmp_path / "o", tmp_path / "r", tmp_path / "l", copy.deepcopy(RM))
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    held = metrics["heldout"]
    assert manifest["counts"]["heldout_pairs"] >= 8 and manifest["counts"]["pairs_rejected"] == 0
    assert metrics["heldout_before"]["accuracy"]["value"] <= 0.75
    assert held["accuracy"]["value"] > 0.9 and held["consistency"]["value"] > 0.8
    assert held["accuracy"]["ci95_low"] < held["accuracy"]["value"] <= held["accuracy"]["ci95_high"] + 1e-12
    assert set(held["by_source"]) == {"unit"} and manifest["loss_end"] < manifest["loss_start"]
    judge = rm.PairwiseJudge.load(tmp_path / "o" / "judge", device="cpu")
    assert judge.fmt == rm.JudgeFormat("full", 512)
    x = user("What is 60 + 7?")
    assert judge.reward(x, reply("Good answer: 67.", "60 + 7 = 67"), reply("bad")) > 0.5
    assert (tmp_path / "l").is_dir() and common.count_rows(tmp_path / "o" / "rejected.parquet") == 0


# ----------------------------------------------------------------------------- input

def test_bad_rows_rejected_with_reasons(init, tmp_path):
    good = separable_rows(20)
    x, ok = user("What is 1 + 1?"), reply("2")
    bad = [row(None, "b0", x, ok, reply("3")),
           row("b1", "b1", "{not json", ok, reply("3")),
           row("b2", "b2", x + [reply("2")], ok, reply("3")),
           row("b3", "b3", x, reply("2 <|im_end|>"), reply("3")),
           row("b4", "b4", x, ok, reply("2")),
           row("b5", "b5", x, ok, reply("word " * 600)),
           row("p0/0", "b6", x, ok, reply("3")),
           row("b7", "b7", x, {"role": "user", "content": "2"}, reply("3")),
           row("b8", "b8", 7, ok, reply("3")),
           row("b9", "b9", x, reply("   "), reply("3"))]
    path = write_pairs(tmp_path / "pairs.parquet", good + bad)
    d = rm.prepare_pairs([path], judge_of(init), RM)
    c = d["counts"]
    assert c["pairs_read"] == 30 and c["pairs_kept"] == 20 and c["pairs_rejected"] == 10
    assert c["rejected_by_reason"] == {"bad_json": 1, "bad_prompt": 1, "bad_response": 2, "duplicate_id": 1,
                                       "identical_responses": 1, "missing_field": 1, "not_a_conversation": 1,
                                       "over_length": 1, "special_token_in_text": 1}
    assert {r["prompt_id"] for r in d["rejected"]} == {f"b{i}" for i in range(10)}
    assert all(r["detail"] for r in d["rejected"])
    other = tmp_path / "other.parquet"
    common.write_table(other, pa.table({"id": ["x"], "text": ["y"]}))
    with pytest.raises(common.StageError, match="neither a pair table"):
        rm.prepare_pairs([other], judge_of(init), RM)


def test_distill_targets_pairs_adapter(init, tmp_path):
    """Pairs read from distill_targets' ChatML ids give back its prompt and both assistant turns; ids that do not
    decode to a whole chat, or sides with different prompts, are rejected as unrecoverable."""
    tok = load_chat_tokenizer(init)
    prompt = user("What is 2 + 5?\n\nSolve it step by step and write the final answer on the last line after ####.")
    pos, neg = reply("#### 7", "2 + 5 = 7"), reply("#### 8")

    def ids(messages):
        return distill_targets.completion_span(*(lambda e: (e.ids, e.mask))(encode_chat(tok, messages)))[0]

    rows = [{"pair_id": "m1/0", "prompt_id": "m1", "domain": "math", "pos_ids": ids(prompt + [pos]),
             "neg_ids": ids(prompt + [neg])},
            {"pair_id": "m2/0", "prompt_id": "m2", "domain": "math", "pos_ids": ids(prompt + [pos])[:-3],
             "neg_ids": ids(prompt + [neg])},
            {"pair_id": "m3/0", "prompt_id": "m3", "domain": "code", "pos_ids": ids(prompt + [pos]),
             "neg_ids": ids(user("Other?") + [neg])}]
    out = tmp_path / "distill_targets"
    common.write_table(out / "pairs.parquet", pa.Table.from_pylist(rows))
    common.write_json(out / "manifest.json", {"stage": "distill_targets"})
    assert rm.pair_files([out]) == [out / "pairs.parquet"]
    pairs, rejected = rm.read_pairs(rm.pair_files([out]), tok)
    assert [q.id for q in pairs] == ["m1/0"]
    assert pairs[0].prompt == prompt and pairs[0].chosen == pos and pairs[0].rejected == neg
    assert pairs[0].source == "distill_targets:math"
    assert [(r["id"], r["reason"]) for r in rejected] == [("m2/0", "unrecoverable"), ("m3/0", "unrecoverable")]
    kept, dropped = rm.encode_pairs(judge_of(init), pairs)
    assert len(kept) == 1 and not dropped


def test_split_keeps_each_prompt_on_one_side():
    pairs = [rm.EncodedPair(f"q{i}/{j}", f"q{i}", "unit", [1], [2]) for i in range(400) for j in range(3)]
    train, held = rm.split_pairs(pairs, 0.2)
    assert len(train) + len(held) == len(pairs)
    assert not {q.prompt_id for q in train} & {q.prompt_id for q in held}
    assert 0.14 < len({q.prompt_id for q in held}) / 400 < 0.26
    assert rm.split_pairs(list(reversed(pairs)), 0.2)[1] == list(reversed(held))


def test_min_pairs_zero_writes_the_untrained_judge_and_one_refuses(init, tmp_path):
    """No held-out side: min_pairs 1 is an error naming the counts; min_pairs 0 writes the init model as the judge
    (loadable, counts.trained false, no held-out figure)."""
    pairs = write_pairs(tmp_path / "pairs.parquet", separable_rows(1))
    with pytest.raises(common.StageError, match="both sides need pairs"):
        rm.run_reward_model([pairs], init, tmp_path / "a", tmp_path / "ra", tmp_path / "la", copy.deepcopy(RM))
    m = rm.run_reward_model([pairs], init, tmp_path / "b", tmp_path / "rb", tmp_path / "lb", {**RM, "min_pairs": 0})
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["counts"]["trained"] is False and m["counts"]["steps"] == 0 and metrics["heldout"] is None
    a, b = load_pretrained(init), load_pretrained(tmp_path / "b" / "judge")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert rm.PairwiseJudge.load(tmp_path / "b" / "judge", device="cpu").fmt.max_len == RM["max_len"]
    assert (tmp_path / "lb" / "plots").is_dir()  # dvc.yaml declares dvclive/<stage>/plots: it must exist
