"""DPD stages (distill_targets + distill) on the micro checkpoint: pair filtering by the verifiers with every drop
counted, bad input counted with its reason, the teacher top-k / reference artifact equal to a direct recomputation,
determinism, an update independent of the micro-batch split, exact resume, and the KD endpoints against TRL's GKD."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fixtures_checkpoint import make_checkpoint
from stages import common, distill, distill_targets, tasks
from stages.distill_targets import Sample
from stages.dpd_loss import kd_terms
from stages.training import optimizer_step

CPU = torch.device("cpu")
TASKS = {"seed": 1234,
         "math": {"levels": [1, 2], "train_per_level": 12, "heldout_per_level": 4, "max_heldout_fraction": 0.4},
         "code": {"levels": [1], "train_per_level": 3, "heldout_per_level": 2, "max_heldout_fraction": 0.4,
                  "public_tests": 2, "hidden_tests": 3}}
TARGETS = {"seed": 1234, "scale": "tiny", "prompts_per_level": {"math": 3, "code": 1}, "positives_per_prompt": 2,
           "negatives_per_prompt": 2, "pairs_per_prompt": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8,
           "batch_size": 16, "max_len": 512, "top_k": 4, "min_score_gap": 1.0, "sympy_timeout_s": 5.0,
           "sandbox_timeout_s": 5.0, "sandbox_memory_mb": 1024, "sandbox_workers": 1, "cpu_threads": 1}
DISTILL = {"seed": 1234, "scale": "tiny", "beta": 0.1, "w_dpo": 1.0, "w_pos": 1.0, "w_neg": 1.0,
           "kd_reverse_weight": 0.0, "epochs": 2, "max_steps": None, "pairs_per_step": 4, "micro_batch_pairs": 2,
           "optimizer": "adamw", "lr_peak": 3e-3, "lr_final": 3e-4, "warmup_steps": 1, "lr_shape": "cosine",
           "adam_betas": [0.9, 0.95], "adam_eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0, "checkpoint_every": 2,
           "log_every": 1, "progress_every_steps": 10, "progress_every_s": 30, "cpu_threads": 1, "min_pairs": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _def_line(record: dict) -> str:
    return record["prompt"].splitlines()[0]


def good_text(record: dict) -> str:
    """A reply the verifier passes: the worked solution, or the reference function in a python block."""
    if record["domain"] == "math":
        return record["solution"]
    return f"```python\n{_def_line(record)}\n{record['canonical_solution']}```"


def bad_text(record: dict) -> str:
    """A reply the verifier fails: a wrong final answer, or a function returning None."""
    if record["domain"] == "math":
        return f"The answer is\n#### {int(record['answer']) + 1}"
    return f"```python\n{_def_line(record)}\n    return None\n```"


def scripted_sampler(model, tok, prompts, prompt_ids, role, p):
    """Positives all pass, negatives all fail: every prompt gives pairs (the micro model's samples never pass)."""
    n = int(p["positives_per_prompt" if role == "positive" else "negatives_per_prompt"])
    text = good_text if role == "positive" else bad_text
    return [[Sample(distill_targets.sample_seed(int(p["seed"]), r["id"], role, i), text(r), True) for i in range(n)]
            for r in prompts]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Student = the micro checkpoint; teacher = the same architecture and tokenizer, other random weights."""
    from model import NanbeigeForCausalLM, load_pretrained, save_pretrained
    root = tmp_path_factory.mktemp("dpd")
    student = make_checkpoint(root / "student")
    teacher = root / "teacher"
    teacher.mkdir()
    cfg = load_pretrained(student).config
    torch.manual_seed(1)
    save_pretrained(NanbeigeForCausalLM(cfg), teacher)
    for name in distill.TOKENIZER_FILES:
        shutil.copyfile(student / name, teacher / name)
    tasks.write_tasks(root / "tasks", copy.deepcopy(TASKS))
    manifest = distill_targets.run_distill_targets(root / "tasks", teacher, student, root / "targets",
                                                   copy.deepcopy(TARGETS), sampler=scripted_sampler)
    return {"root": root, "student": student, "teacher": teacher, "tasks": root / "tasks",
            "targets": root / "targets", "manifest": manifest}


# ----------------------------------------------------------------------------- pairs

def test_scripted_pairs_counts(world):
    c = world["manifest"]["counts"]
    assert c["prompts"] == 3 * 2 + 1 and c["prompts_bad"] == 0
    assert c["pairs"] == 7 and c["pairs_by_domain_level"] == {"code/L1": 1, "math/L1": 3, "math/L2": 3}
    # 2 positives and 2 negatives per prompt, one pair per prompt: the second of each is unpaired
    assert c["dropped"] == {"negative/unpaired": 7, "positive/unpaired": 7}
    rejected = pq.read_table(world["targets"] / "rejected.parquet").to_pylist()
    assert len(rejected) == 14 and {r["reason"] for r in rejected} == {"unpaired"}


def test_pair_filtering_drops_passing_negative_and_failing_positive(world):
    tok = distill_targets.load_chat_tokenizer(world["student"])
    rows = pq.read_table(world["tasks"] / "math_train.parquet").to_pylist()[:2]
    a, b = ({**r, "domain": "math"} for r in rows)
    p = {**TARGETS, "pairs_per_prompt": 2}
    pos = [[Sample(1, good_text(a), True), Sample(2, bad_text(a), True), Sample(3, good_text(a), False)],
           [Sample(4, bad_text(b), True)]]
    neg = [[Sample(5, good_text(a), True), Sample(6, bad_text(a), True), Sample(7, bad_text(a) + "<|im_start|>", True)],
           [Sample(8, bad_text(b), True)]]
    records = [a, b]
    score = lambda rows: [distill_targets.verify([r] * len(s), [x.text for x in s], p)  # noqa: E731
                          for r, s in zip(records, rows)]
    pairs, rejected = distill_targets.build_pairs(records, pos, neg, score(pos), score(neg), tok, p)
    reasons = sorted((r["prompt_id"] == a["id"], r["role"], r["seed"], r["reason"]) for r in rejected)
    assert reasons == [(False, "negative", 8, "no_positive"), (False, "positive", 4, "verifier_failed"),
                       (True, "negative", 5, "not_worse"), (True, "negative", 7, "chat:special_token_in_text"),
                       (True, "positive", 2, "verifier_failed"), (True, "positive", 3, "truncated")]
    assert [(q["pos_seed"], q["neg_seed"]) for q in pairs] == [(1, 6)]
    assert pairs[0]["pos_score"] == 1.0 and pairs[0]["neg_score"] == 0.0


def test_min_score_gap_keeps_partial_scores_apart(world):
    """With graded scores a negative is kept only when its score is at least min_score_gap below the positive's."""
    tok = distill_targets.load_chat_tokenizer(world["student"])
    r = {**pq.read_table(world["tasks"] / "math_train.parquet").to_pylist()[0], "domain": "math"}
    pos, neg = [[Sample(1, good_text(r), True)]], [[Sample(2, bad_text(r), True), Sample(3, bad_text(r), True)]]
    p = {**TARGETS, "min_score_gap": 0.5}
    pairs, rejected = distill_targets.build_pairs([r], pos, neg, [[1.0]], [[0.6, 0.5]], tok, p)
    assert [q["neg_seed"] for q in pairs] == [3]
    assert [(x["seed"], x["reason"]) for x in rejected] == [(2, "not_worse")]


def test_bad_input_counted_with_reason(world, tmp_path):
    """A malformed task record and a prompt holding a control token are dropped and counted, not trained on."""
    table = pq.read_table(world["tasks"] / "math_train.parquet").to_pylist()
    table[0] = {**table[0], "answer": ""}
    table[1] = {**table[1], "prompt": table[1]["prompt"] + " <|im_end|>"}
    bad = tmp_path / "tasks"
    bad.mkdir()
    common.write_table(bad / "math_train.parquet", pa.Table.from_pylist(table, schema=tasks.MATH_SCHEMA))
    p = {**TARGETS, "prompts_per_level": {"math": 100, "code": 0}}
    m = distill_targets.run_distill_targets(bad, world["teacher"], world["student"], tmp_path / "out", p,
                                            sampler=scripted_sampler)
    c = m["counts"]
    assert c["dropped"]["prompt/bad_record"] == 1 and c["dropped"]["prompt/chat:special_token_in_text"] == 1
    assert c["prompts"] == len(table) and c["prompts_bad"] == 2 and c["pairs"] == len(table) - 2
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist()
    assert {(r["prompt_id"], r["reason"]) for r in rejected if r["role"] == "prompt"} == {
        (table[0]["id"], "bad_record"), (table[1]["id"], "chat:special_token_in_text")}


def test_real_sampling_is_deterministic_and_conserves(world, tmp_path):
    """The engine's samples (the micro model's: none passes) give byte-identical outputs twice, every sample
    accounted for."""
    outs = []
    for name in ("a", "b"):
        outs.append(distill_targets.run_distill_targets(world["tasks"], world["teacher"], world["student"],
                                                        tmp_path / name, copy.deepcopy(TARGETS)))
    assert outs[0]["outputs"] == outs[1]["outputs"]
    c = outs[0]["counts"]
    n = c["prompts"] * TARGETS["positives_per_prompt"]
    assert c["positives_sampled"] == n and sum(v for k, v in c["dropped"].items() if k.startswith("positive/")) == n


def test_scripted_targets_deterministic(world, tmp_path):
    m = distill_targets.run_distill_targets(world["tasks"], world["teacher"], world["student"], tmp_path / "again",
                                            copy.deepcopy(TARGETS), sampler=scripted_sampler)
    assert m["outputs"] == world["manifest"]["outputs"]
    assert m["targets_key"] == world["manifest"]["targets_key"]
    assert m["targets_key"] != distill_targets.targets_key(world["student"], world["targets"] / "pairs.parquet", 4)


# ----------------------------------------------------------------------------- the stored targets

def test_teacher_topk_and_reference_equal_direct_recomputation(world):
    from model import load_pretrained
    teacher, student = load_pretrained(world["teacher"]).eval(), load_pretrained(world["student"]).eval()
    k = world["manifest"]["top_k"]
    pairs = pq.read_table(world["targets"] / "pairs.parquet").to_pylist()
    assert pairs
    with torch.no_grad():
        for q in pairs:
            for side in ("pos", "neg"):
                ids, n0 = q[f"{side}_ids"], q[f"{side}_prompt_len"]
                x = torch.tensor([ids])
                # independent of model.topk_logprobs: the full-vocabulary log-softmax of the logits
                full = torch.log_softmax(teacher(x[:, :-1]).float(), -1)[0, n0 - 1:]
                want_lp, want_ids = full.topk(k, dim=-1)
                got_lp = torch.tensor(q[f"{side}_topk_logprobs"]).view(-1, k)
                got_ids = torch.tensor(q[f"{side}_topk_ids"]).view(-1, k)
                assert got_lp.shape == (len(ids) - n0, k)
                torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)
                assert torch.equal(got_ids, want_ids.to(got_ids.dtype))
                ref = torch.log_softmax(student(x[:, :-1]).float(), -1)[0].gather(-1, x[0, 1:, None])[n0 - 1:].sum()
                assert q[f"ref_{side}"] == pytest.approx(float(ref), abs=1e-4)
            # the completion is the assistant reply through <|im_end|>
            assert q["pos_ids"][-1] == distill_targets.load_chat_tokenizer(world["student"]).token_to_id("<|im_end|>")


def test_malformed_pairs_refused(world, tmp_path):
    shutil.copytree(world["targets"], tmp_path / "t")
    rows = pq.read_table(tmp_path / "t" / "pairs.parquet").to_pylist()
    rows[0]["neg_topk_ids"] = rows[0]["neg_topk_ids"][:-1]
    table = pa.Table.from_pylist(rows, schema=distill_targets.PAIRS_SCHEMA)
    common.write_table(tmp_path / "t" / "pairs.parquet", table)
    with pytest.raises(common.StageError, match=rf"pair {rows[0]['pair_id']} neg: top-k lengths"):
        distill.load_pairs(tmp_path / "t", 600)


# ----------------------------------------------------------------------------- training

def _micros(world, per_micro: int, n_pairs: int = 4):
    pairs, manifest = distill.load_pairs(world["targets"], 600)
    chosen = pairs[:n_pairs]
    return [distill.collate(chosen[i:i + per_micro], manifest["top_k"]) for i in range(0, n_pairs, per_micro)]


def _sgd_update(world, micros, weights) -> tuple[dict, dict]:
    from model import load_pretrained
    model = load_pretrained(world["student"])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    losses, _ = optimizer_step(model, opt, micros, distill.DPDLoss(weights), 1.0, 1e9, CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


@pytest.mark.parametrize("reverse", [0.0, 0.5, 1.0])
def test_update_independent_of_micro_batch_split(world, reverse):
    """1 x P and P x 1 micro-batching give the same SGD update (the gradient itself at lr 1) and logged parts."""
    weights = distill.dpd_weights({**DISTILL, "kd_reverse_weight": reverse})
    whole, l1 = _sgd_update(world, _micros(world, 4), weights)
    split, l4 = _sgd_update(world, _micros(world, 1), weights)
    from model import load_pretrained
    init = load_pretrained(world["student"]).state_dict()
    assert any((whole[k] - init[k]).abs().max() > 1e-4 for k in init)  # the update is not trivially zero
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-6, rtol=1e-5)
    for name in distill.PARTS:
        assert l4[name] == pytest.approx(l1[name], rel=1e-5, abs=1e-7)


def test_units_count_completion_tokens(world):
    micro = _micros(world, 2)[0]
    pairs, _ = distill.load_pairs(world["targets"], 600)
    units = distill.DPDLoss(distill.dpd_weights(DISTILL)).units(micro)
    assert units == {"pairs": 2, "pos_tokens": sum(len(q["pos_ids"]) - q["pos_prompt_len"] for q in pairs[:2]),
                     "neg_tokens": sum(len(q["neg_ids"]) - q["neg_prompt_len"] for q in pairs[:2])}


def _train(world, out: Path, stop=None, p=DISTILL):
    return distill.run_distill(world["targets"], world["student"], out / "ckpt", out / "resume", copy.deepcopy(p),
                               out / "live", stop=stop)


def test_distill_trains_and_writes_checkpoint(world, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from model import load_pretrained
    m = _train(world, tmp_path)
    c = m["counts"]
    assert c["pairs"] == 7 and c["steps"] == 4  # ceil(2 epochs x 7 pairs / 4 per step)
    assert distill.total_steps({**DISTILL, "max_steps": 3}, 7) == 3
    assert distill.total_steps({**DISTILL, "max_steps": 9}, 7) == 4
    # step 1 is measured before any update: the policy is the reference, so the margin is 0 up to float rounding
    assert abs(m["parts_start"]["reward_margin"]) < 1e-4
    assert m["parts_end"]["kd_pos"] < m["parts_start"]["kd_pos"]
    assert m["parts_end"]["dpo"] < m["parts_start"]["dpo"] and m["parts_end"]["reward_accuracy"] > 0.5
    model = load_pretrained(tmp_path / "ckpt")
    assert model.config.vocab_size == 600
    PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "ckpt"))
    metrics = (tmp_path / "live" / "metrics.json").read_text()
    for name in ("dpo", "kd_pos", "kd_neg", "loss", "reward_margin", "reward_accuracy"):
        assert f'"{name}"' in metrics


def test_resume_is_exact(world, tmp_path):
    """N steps == k steps + a kill + resume to N, bit for bit; and two fresh runs are identical."""
    full = _train(world, tmp_path / "full")
    assert _train(world, tmp_path / "cut", stop=1) is None
    resumed = _train(world, tmp_path / "cut")
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["parts_end"] == resumed["parts_end"] and full["parts_start"] == resumed["parts_start"]
    again = _train(world, tmp_path / "again")
    assert again["outputs"]["model.safetensors"] == full["outputs"]["model.safetensors"]


def test_batches_are_a_pure_function_of_the_step(world):
    pairs, _ = distill.load_pairs(world["targets"], 600)
    src = distill.DPDBatches(pairs, 4, 1234, 4, 2)
    seen = [i for t in range(7) for i in src.step_pairs(t)]  # 28 = 4 epochs of 7
    for e in range(4):
        assert sorted(seen[7 * e:7 * e + 7]) == list(range(7))
    assert src.step_pairs(3) == distill.DPDBatches(pairs, 4, 1234, 4, 2).step_pairs(3)


# ----------------------------------------------------------------------------- cross-check against TRL

@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_kd_endpoints_equal_trl_gkd(reverse):
    """With k = vocabulary (the rest mass ~0), our D_lambda at lambda 0 / 1 is TRL GKD's generalized JSD at beta 0 / 1
    (forward / reverse KL), per token mean over the mask."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 2
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[1, 3:] = -100
    mask = labels != -100
    t_lp = torch.log_softmax(t_logits, -1)
    s_lp = torch.log_softmax(s_logits, -1)
    ours = (kd_terms(t_lp, s_lp, reverse) * mask).sum() / mask.sum()
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels, beta=reverse, reduction="sum",
                                                 num_items_in_batch=mask.sum())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_too_few_pairs_is_an_error_and_min_pairs_zero_passes_the_student_through(world, tmp_path):
    from model import load_pretrained
    shutil.copytree(world["targets"], tmp_path / "t")
    common.write_table(tmp_path / "t" / "pairs.parquet", distill_targets.PAIRS_SCHEMA.empty_table())
    empty = {**world, "targets": tmp_path / "t"}
    with pytest.raises(common.StageError, match="0 pairs, fewer than min_pairs 1"):
        _train(empty, tmp_path / "a")
    with pytest.raises(common.StageError, match="7 pairs, fewer than min_pairs 8"):
        _train(world, tmp_path / "b", p={**DISTILL, "min_pairs": 8})
    m = _train(empty, tmp_path / "c", p={**DISTILL, "min_pairs": 0})
    assert m["counts"]["steps"] == 0 and m["counts"]["trained"] is False
    got, want = load_pretrained(tmp_path / "c" / "ckpt"), load_pretrained(world["student"])
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


def test_max_steps_zero_passes_the_student_through(world, tmp_path):
    """distill.max_steps 0 is the ablation's no-distillation arm: the pairs are read and counted, no step runs, and the
    checkpoint is the student's weights (sft_full straight on to RL)."""
    from model import load_pretrained
    m = _train(world, tmp_path, p={**DISTILL, "max_steps": 0})
    assert m["counts"]["pairs"] == 7 and m["counts"]["steps"] == 0 and m["counts"]["trained"] is False
    got, want = load_pretrained(tmp_path / "ckpt"), load_pretrained(world["student"])
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
