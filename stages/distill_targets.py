r"""DPD targets: preference pairs, the teacher's top-k log-probs on both sequences and the reference log-probs, once.

The first of the two DPD stages (the second, stages/distill.py, trains on this artifact; the loss is in
stages/dpd_loss.py): changing a DPD weight, beta or the KL direction reruns only training, never the sampling and the
teacher passes (open-instruct caches its reference log-probs the same way, keyed by a hash of model and data).

Pair construction (RECIPE.md, DPD):
  prompts     the task ladder's train split (math L1-L5, code L1-L3; tasks.format_prompt "chat"), per domain and
              level the first `prompts_per_level[domain]` in the order of sha256(seed/id) (spread over templates)
  positives   `positives_per_prompt` samples from the teacher; kept when the verifier passes (math: verify_math on
              the first `#### x` after </think>; code: the hidden + public tests in the sandbox, evaluate's
              humaneval_candidate) and the conversation is chat-valid (stages.chat.encode_chat within max_len) and
              the sample ended at a stop token (a truncated sample is no answer)
  negatives   `negatives_per_prompt` samples from the student (the sft_full checkpoint, pi_ref); kept when chat-valid,
              not truncated and clearly worse: score(y+) - score(y-) >= min_score_gap (scores in [0, 1]; with
              pass/fail verifiers and gap 1 a negative must fail where the positive passes)
  pairs       per prompt the i-th kept positive with the i-th kept negative, at most pairs_per_prompt; the rest is
              dropped as unpaired
  seeds       sample i of role r for prompt id q: sha256("distill_targets/<seed>/<q>/<r>/<i>") (sample_seed), so a
              sample depends on nothing else (not batch, order or other prompts)
Every drop is a row of rejected.parquet with its reason, and
  positives_sampled == pairs + positive drops,   negatives_sampled == pairs + negative drops   (checked).

Targets, for each pair and each completion token t of y+ and of y- (the assistant tokens of encode_chat's mask: the
reply and its <|im_end|>): the teacher's top_k log-probs log T_t(v_1..v_k) and ids v_1..v_k (model.topk_logprobs,
fp32), and the reference sequence log-probs log pi_ref(y|x) = sum_t log pi_ref(y_t | x, y_<t) of both (the student
checkpoint, model.token_logprobs). Stored flat per row: [n_y * k] in position-major order.

Outputs (artifacts/<scale>/distill_targets/): pairs.parquet (PAIRS_SCHEMA), rejected.parquet (REJECTED_SCHEMA),
manifest.json (counts; `targets_key` = sha256 of the teacher's weights, the pairs' content and k: the cache key the
training stage keys its resume state on).

Params: the `distill_targets` slice (--params-json {"distill_targets": {...}}).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages import common, tasks
from stages.chat import ChatRejected, encode_chat, encode_prompt, load_chat_tokenizer

STAGE = "distill_targets"
CODE = (f"stages.{STAGE}",)
ROLES = ("positive", "negative")
DOMAINS = ("math", "code")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
RECORD_FIELDS = {"math": ("id", "level", "prompt", "answer"),
                 "code": ("id", "level", "prompt", "statement", "test", "entry_point")}

PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt_id", pa.string()), ("domain", pa.string()), ("level", pa.int64()),
    ("pos_seed", pa.int64()), ("neg_seed", pa.int64()), ("pos_text", pa.string()), ("neg_text", pa.string()),
    ("pos_score", pa.float64()), ("neg_score", pa.float64()),
    # token ids of the whole conversation through the assistant's <|im_end|>; completion = ids[prompt_len:]
    ("pos_ids", pa.list_(pa.int32())), ("neg_ids", pa.list_(pa.int32())),
    ("pos_prompt_len", pa.int64()), ("neg_prompt_len", pa.int64()),
    # teacher top-k at each completion token, flat [n_completion * k]
    ("pos_topk_logprobs", pa.list_(pa.float32())), ("pos_topk_ids", pa.list_(pa.int32())),
    ("neg_topk_logprobs", pa.list_(pa.float32())), ("neg_topk_ids", pa.list_(pa.int32())),
    ("ref_pos", pa.float64()), ("ref_neg", pa.float64()),
])
REJECTED_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("role", pa.string()), ("sample", pa.int64()), ("seed", pa.int64()),
    ("text", pa.string()), ("score", pa.float64()), ("reason", pa.string()),
])


# ----------------------------------------------------------------------------- prompts

def sample_seed(seed: int, prompt_id: str, role: str, sample: int) -> int:
    """The seed of sample `sample` of `role` for prompt `prompt_id` (63 bits)."""
    digest = hashlib.sha256(f"{STAGE}/{seed}/{prompt_id}/{role}/{sample}".encode()).hexdigest()
    return int(digest[:16], 16) >> 1


def select_prompts(records: dict[str, list[dict]], caps: dict[str, int], seed: int) -> list[dict]:
    """Per domain and level, the first caps[domain] records in sha256(seed/id) order; domains in DOMAINS order."""
    out = []
    for domain in DOMAINS:
        by_level: dict[int, list[dict]] = {}
        for r in records.get(domain, []):
            by_level.setdefault(int(r.get("level") or 0), []).append(r)
        for level in sorted(by_level):
            ranked = sorted(by_level[level],
                            key=lambda r: hashlib.sha256(f"{seed}/{r.get('id')}".encode()).hexdigest())
            out += [{**r, "domain": domain} for r in ranked[:int(caps.get(domain, 0))]]
    return out


def load_task_records(tasks_dir: str | Path, domains: list[str]) -> dict[str, list[dict]]:
    return {d: pq.read_table(common.input_shard(tasks_dir, f"{d}_train")).to_pylist() for d in domains}


def record_problem(record: dict) -> str | None:
    """None when the task record has every field its domain needs, else why not."""
    domain = record.get("domain")
    if domain not in RECORD_FIELDS:
        return f"unknown domain {domain!r}"
    missing = [f for f in RECORD_FIELDS[domain] if not isinstance(record.get(f), (str, int)) or record.get(f) == ""]
    return f"missing or empty {missing}" if missing else None


# ----------------------------------------------------------------------------- samples and verification

@dataclass(frozen=True)
class Sample:
    """One sampled completion: its seed, decoded text (cut before the stop) and whether it ended at a stop."""
    seed: int
    text: str
    stopped: bool


Sampler = Callable[[object, object, list[dict], list[list[int]], str, dict], list[list[Sample]]]


def sample_completions(model, tok, prompts: list[dict], prompt_ids: list[list[int]], role: str,
                       p: dict) -> list[list[Sample]]:
    """n samples per prompt (positives_per_prompt or negatives_per_prompt) through the generation engine, each
    seeded by sample_seed; temperature, top_p, max_new_tokens and batch_size from params."""
    from model import Request, SamplingParams, generate
    n = int(p["positives_per_prompt" if role == "positive" else "negatives_per_prompt"])
    seeds = [[sample_seed(int(p["seed"]), r["id"], role, i) for i in range(n)] for r in prompts]
    params = SamplingParams(int(p["max_new_tokens"]), float(p["temperature"]), float(p["top_p"]),
                            stop_token_ids=tuple(tok.token_to_id(t) for t in STOP_TOKENS))
    out = generate(model, [Request(ids, s) for ids, s in zip(prompt_ids, seeds)], params,
                   lambda ids: tok.decode(ids, skip_special_tokens=False), int(p["batch_size"]))
    return [[Sample(seed, c.text, c.finish_reason == "stop") for seed, c in zip(s, row)]
            for s, row in zip(seeds, out)]


_THINK = re.compile(r"<think>\n(.*?)\n</think>\n\n(.*)", re.DOTALL)


def assistant_message(text: str) -> dict:
    """The assistant turn of a completion: `<think>\\n r \\n</think>\\n\\n a` (the chat template's form) becomes
    reasoning r + content a; anything else is content as is (encode_chat rejects control tokens inside it)."""
    m = _THINK.fullmatch(text)
    if m:
        return {"role": "assistant", "reasoning_content": m.group(1), "content": m.group(2)}
    return {"role": "assistant", "content": text}


def verify(records: list[dict], texts: list[str], p: dict) -> list[float]:
    """Verifier scores in [0, 1] of each (record, completion): math by verify_math against the record's answer,
    code by the record's tests in the sandbox (one batch)."""
    from stages.evaluate import humaneval_candidate
    from stages.verifiers import SandboxLimits, verify_code_batch, verify_math
    scores = [0.0] * len(texts)
    code = [i for i, r in enumerate(records) if r["domain"] == "code"]
    for i, r in enumerate(records):
        if r["domain"] == "math":
            scores[i] = verify_math(texts[i], r["answer"], float(p["sympy_timeout_s"])).score
    if code:
        limits = SandboxLimits(timeout_s=float(p["sandbox_timeout_s"]), memory_mb=int(p["sandbox_memory_mb"]))
        programs = [humaneval_candidate(records[i], texts[i]) for i in code]
        for i, res in zip(code, verify_code_batch(programs, limits, workers=int(p["sandbox_workers"]))):
            scores[i] = res.score
    return scores


def completion_span(ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], int]:
    """(ids through the last supervised token, index of the first): the one assistant turn must be contiguous."""
    on = np.flatnonzero(mask)
    if len(on) == 0 or on[-1] - on[0] + 1 != len(on):
        raise AssertionError("a single-turn assistant mask must be one contiguous span")
    return ids[:on[-1] + 1].tolist(), int(on[0])


@dataclass
class Candidate:
    """A sample that survived the checks of its role, encoded."""
    sample: int
    seed: int
    text: str
    score: float
    ids: list[int]
    prompt_len: int


def screen(record: dict, samples: list[Sample], scores: list[float], role: str, tok, p: dict,
           rejected: list[dict], best_positive: float | None = None) -> list[Candidate]:
    """The samples of one prompt and role that are kept (module docstring), in sample order; the others go to
    `rejected` with their reason. Negatives need best_positive, the score of the prompt's positives."""
    kept = []
    messages = tasks.format_prompt(record, "chat")
    for i, (s, score) in enumerate(zip(samples, scores)):
        reason = None
        if not s.stopped:
            reason = "truncated"
        elif role == "positive" and score < 1.0:
            reason = "verifier_failed"
        elif role == "negative" and best_positive is not None and best_positive - score < float(p["min_score_gap"]):
            reason = "not_worse"
        if reason is None:
            try:
                ex = encode_chat(tok, messages + [assistant_message(s.text)], max_len=int(p["max_len"]))
            except ChatRejected as exc:
                reason = f"chat:{exc.reason}"
        if reason is not None:
            rejected.append({"prompt_id": record["id"], "role": role, "sample": i, "seed": s.seed, "text": s.text,
                             "score": score, "reason": reason})
            continue
        ids, prompt_len = completion_span(ex.ids, ex.mask)
        kept.append(Candidate(i, s.seed, s.text, score, ids, prompt_len))
    return kept


def build_pairs(records: list[dict], pos: list[list[Sample]], neg: list[list[Sample]], pos_scores: list[list[float]],
                neg_scores: list[list[float]], tok, p: dict) -> tuple[list[dict], list[dict]]:
    """(pairs, rejected rows) from the samples and verifier scores of every prompt (module docstring)."""
    pairs, rejected = [], []
    cap = int(p["pairs_per_prompt"])
    for r, ps, ns, pss, nss in zip(records, pos, neg, pos_scores, neg_scores):
        positives = screen(r, ps, pss, "positive", tok, p, rejected)
        # Without a kept positive nothing is "clearly worse" than it: the negatives are unpaired.
        negatives = screen(r, ns, nss, "negative", tok, p, rejected,
                           best_positive=max((c.score for c in positives), default=None)) if positives else []
        if not positives:
            rejected += [{"prompt_id": r["id"], "role": "negative", "sample": i, "seed": s.seed, "text": s.text,
                          "score": sc, "reason": "no_positive"} for i, (s, sc) in enumerate(zip(ns, nss))]
        n = min(len(positives), len(negatives), cap)
        for role, kept in (("positive", positives), ("negative", negatives)):
            rejected += [{"prompt_id": r["id"], "role": role, "sample": c.sample, "seed": c.seed, "text": c.text,
                          "score": c.score, "reason": "unpaired"} for c in kept[n:]]
        for j, (a, b) in enumerate(zip(positives[:n], negatives[:n])):
            pairs.append({"pair_id": f"{r['id']}/{j}", "prompt_id": r["id"], "domain": r["domain"],
                          "level": int(r["level"]), "pos_seed": a.seed, "neg_seed": b.seed, "pos_text": a.text,
                          "neg_text": b.text, "pos_score": a.score, "neg_score": b.score, "pos_ids": a.ids,
                          "neg_ids": b.ids, "pos_prompt_len": a.prompt_len, "neg_prompt_len": b.prompt_len})
    return pairs, rejected


# ----------------------------------------------------------------------------- teacher and reference passes

@torch.inference_mode()
def teacher_topk(teacher, ids: list[int], prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k (log-probs [n, k] fp32, ids [n, k] int32) at the n = len(ids) - prompt_len positions that
    predict the completion tokens ids[prompt_len:]. One sequence per forward: no padding enters the numbers."""
    x = torch.tensor([ids[:-1]], dtype=torch.long)
    logprobs, top = teacher.topk_logprobs(x, k)
    return (logprobs[0, prompt_len - 1:].float().numpy().astype(np.float32),
            top[0, prompt_len - 1:].numpy().astype(np.int32))


@torch.inference_mode()
def sequence_logprob(model, ids: list[int], prompt_len: int) -> float:
    """log pi(y|x) = sum over the completion tokens ids[prompt_len:] of log pi(y_t | x, y_<t) (fp32 sum)."""
    x = torch.tensor([ids], dtype=torch.long)
    return float(model.token_logprobs(x[:, :-1], x[:, 1:])[0, prompt_len - 1:].sum())


def add_targets(pairs: list[dict], teacher, reference, k: int) -> None:
    """Fill each pair's teacher top-k (both sequences, flat) and reference sequence log-probs, in place."""
    for pair in pairs:
        for side in ("pos", "neg"):
            ids, n0 = pair[f"{side}_ids"], pair[f"{side}_prompt_len"]
            lp, top = teacher_topk(teacher, ids, n0, k)
            pair[f"{side}_topk_logprobs"], pair[f"{side}_topk_ids"] = lp.reshape(-1).tolist(), top.reshape(-1).tolist()
        pair["ref_pos"] = sequence_logprob(reference, pair["pos_ids"], pair["pos_prompt_len"])
        pair["ref_neg"] = sequence_logprob(reference, pair["neg_ids"], pair["neg_prompt_len"])


# ----------------------------------------------------------------------------- the stage

def weights_file(ckpt_dir: str | Path) -> Path:
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise common.StageError(f"{path}: checkpoint weights are missing")
    return path


def targets_key(teacher_dir: str | Path, pairs_path: Path, k: int) -> str:
    """The cache key of the targets: sha256 over the teacher's weights, the pairs' content and k."""
    h = hashlib.sha256()
    for part in (common.sha256_file(weights_file(teacher_dir)), common.sha256_file(pairs_path), str(k)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


def count_drops(rejected: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rejected:
        key = f"{row['role']}/{row['reason']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def run_distill_targets(tasks_dir: str | Path, teacher_dir: str | Path, student_dir: str | Path,
                        output_dir: str | Path, p: dict, sampler: Sampler = sample_completions) -> dict:
    """Select prompts, sample and screen, pair, score with the teacher and the reference, write the outputs.
    `sampler` draws the completions (tests pass their own to control what the verifiers see)."""
    from model import load_pretrained
    output_dir = Path(output_dir)
    torch.set_num_threads(int(p["cpu_threads"]))
    k = int(p["top_k"])
    if k < 1:
        raise common.StageError(f"{STAGE}.top_k must be >= 1, got {k}")
    domains = [d for d in DOMAINS if int(p["prompts_per_level"].get(d, 0)) > 0]
    records = select_prompts(load_task_records(tasks_dir, domains), p["prompts_per_level"], int(p["seed"]))
    tok = load_chat_tokenizer(student_dir)
    if tok.to_str() != load_chat_tokenizer(teacher_dir).to_str():
        raise common.StageError(f"{teacher_dir} and {student_dir}: teacher and student tokenizers differ (DPD "
                                f"compares their distributions token by token)")
    teacher = load_pretrained(teacher_dir).eval()
    student = load_pretrained(student_dir).eval()

    rejected: list[dict] = []
    good, prompt_ids = [], []
    for r in records:
        problem = record_problem(r)
        if problem is None:
            try:
                ids = encode_prompt(tok, tasks.format_prompt(r, "chat"))
            except ChatRejected as exc:
                problem = f"chat:{exc.reason}"
        if problem is not None:
            reason = problem if problem.startswith("chat:") else "bad_record"
            rejected.append({"prompt_id": str(r.get("id")), "role": "prompt", "sample": -1, "seed": -1,
                             "text": problem, "score": None, "reason": reason})
            continue
        good.append(r)
        prompt_ids.append(ids)
    pos = sampler(teacher, tok, good, prompt_ids, "positive", p)
    neg = sampler(student, tok, good, prompt_ids, "negative", p)
    flat = lambda samples: [(r, s) for r, row in zip(good, samples) for s in row]  # noqa: E731
    pos_flat, neg_flat = flat(pos), flat(neg)
    scores = verify([r for r, _ in pos_flat + neg_flat], [s.text for _, s in pos_flat + neg_flat], p)
    pos_scores = regroup(scores[:len(pos_flat)], pos)
    neg_scores = regroup(scores[len(pos_flat):], neg)
    pairs, sample_drops = build_pairs(good, pos, neg, pos_scores, neg_scores, tok, p)
    rejected += sample_drops
    add_targets(pairs, teacher, student, k)

    drops = count_drops(rejected)
    n_pos, n_neg = len(pos_flat), len(neg_flat)
    common.check_conservation(STAGE, "positives", n_pos, pairs=len(pairs),
                              **{key: v for key, v in drops.items() if key.startswith("positive/")})
    common.check_conservation(STAGE, "negatives", n_neg, pairs=len(pairs),
                              **{key: v for key, v in drops.items() if key.startswith("negative/")})
    pairs_path, rejected_path = output_dir / "pairs.parquet", output_dir / "rejected.parquet"
    common.write_table(pairs_path, common.rows_to_table(pairs, PAIRS_SCHEMA))
    common.write_table(rejected_path, common.rows_to_table(rejected, REJECTED_SCHEMA))
    counts = {"prompts": len(records), "prompts_bad": len(records) - len(good),
              "prompts_with_pairs": len({q["prompt_id"] for q in pairs}),
              "positives_sampled": n_pos, "positives_kept": n_pos - sum(v for key, v in drops.items()
                                                                         if key.startswith("positive/")
                                                                         and key != "positive/unpaired"),
              "negatives_sampled": n_neg, "negatives_kept": n_neg - sum(v for key, v in drops.items()
                                                                         if key.startswith("negative/")
                                                                         and key != "negative/unpaired"),
              "pairs": len(pairs), "dropped": drops,
              "completion_tokens": {"pos": sum(len(q["pos_ids"]) - q["pos_prompt_len"] for q in pairs),
                                    "neg": sum(len(q["neg_ids"]) - q["neg_prompt_len"] for q in pairs)},
              "pairs_by_domain_level": level_counts(pairs)}
    inputs = [common.input_shard(tasks_dir, f"{d}_train") for d in domains]
    inputs += [weights_file(teacher_dir), weights_file(student_dir)]
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p, inputs=inputs,
                                 outputs=[pairs_path, rejected_path], counts=counts,
                                 code=common.code_version_closure(*CODE),
                                 extra={"top_k": k, "targets_key": targets_key(teacher_dir, pairs_path, k)})


def regroup(flat: list, shape: list[list]) -> list[list]:
    """`flat` cut into lists of the lengths of shape's rows."""
    out, at = [], 0
    for row in shape:
        out.append(flat[at:at + len(row)])
        at += len(row)
    return out


def level_counts(pairs: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for q in pairs:
        key = f"{q['domain']}/L{q['level']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--tasks-dir", required=True, help="the task ladder: artifacts/<scale>/tasks")
    ap.add_argument("--teacher", required=True, help="teacher checkpoint directory (HF layout + tokenizer files)")
    ap.add_argument("--student", required=True, help="student checkpoint (sft_full): negatives and pi_ref")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args()
    try:
        manifest = run_distill_targets(args.tasks_dir, args.teacher, args.student, args.output_dir,
                                       common.resolve_cli_params(args, STAGE))
    except common.StageError as exc:
        common.fail(exc)
    c = manifest["counts"]
    print(f"{STAGE}: {c['prompts']} prompts, {c['positives_kept']}/{c['positives_sampled']} positives, "
          f"{c['negatives_kept']}/{c['negatives_sampled']} negatives, {c['pairs']} pairs; "
          f"dropped {json.dumps(c['dropped'])}")


if __name__ == "__main__":
    main()
