"""SFT data: solution refinement (generate, check, critique, revise) then CoT reconstruction, per instruction.

Instructions: the task ladder's train splits, at most `max_per_level[domain]` per (domain, level), chosen by
sha256(seed/id) order (every template of a level is represented, not just the first). For each one:

  1. Candidates (round 0): `teacher_samples` from the teacher and `student_samples` from the current model (two
     checkpoints by path), prompted with stages.tasks.format_prompt(record, "chat").
  2. Checklist (stages.sft_checklist, built per task from its domain): each candidate gets every applicable item,
     pass / fail + detail. The first candidate passing every item (teacher samples first, then the student's) is
     the refined solution (source teacher | student, rounds 0).
  3. Critique and revision, rounds 1..revise_rounds: the candidate of the previous round with the fewest failed
     items (the first on ties) is revised by the teacher, `revise_samples` samples, from the prompt
         [instruction, assistant: that candidate, user: "Your answer failed: <item>: <detail>; ... Revise it."]
     (the structured critique [{item, detail}] rendered as a user turn). Each round re-checks; the first passing
     revision stops the loop (source revised, rounds r). None after the last round: rejected, checklist_failed,
     with the last critique.
  3b. Reference fallback (`reference_fallback`): an instruction still unsolved after the last round gets the task's
     own reference solution (stages.tasks.reference_messages) as one more candidate, checked by the same checklist
     (source reference, rounds = the rounds run); what the refinement could not produce is counted as such.
  4. CoT reconstruction: the chain-completion model (the teacher unless --chain-model) is prompted with the
     instruction + "The answer is X." (math: the refined `####` answer; code: the refined ```python block), and
     `cot_tries` samples are drawn; a sample's reasoning is accepted when Checker.chain passes on (its reasoning,
     the refined reply): consistent with the refined answer (math: every step holds and the last value is X; code:
     non-empty and names the entry point), valid chat, no loop, within length. The first accepted chain is the
     training target's reasoning_content (cot reconstructed); else the refined candidate's own reasoning when it
     passes the same check (cot own); else rejected, cot_unreconstructable, with the last chain's critique.
     `summary` (ours, extractive): math, the chain's equations in order; code, its first non-blank line.

Seeds: sample s of phase (teacher | student | revise | chain) in round r of instruction i is
stages.evaluate.sample_seed(seed, "sft_data/<phase>/<r>", i, s), so a rerun draws the same candidates, whatever else
shares their batch. Generation is an injected callable (`Generate`); the CLI wires model.generate.

Outputs (--output-dir): sft.parquet (SFT_SCHEMA), rejected.parquet (REJECTED_SCHEMA), metrics.json (per-round
pass rates, per-item pass rates, rejection reasons, sources, CoT paths, counts with kept + rejected ==
instructions checked), manifest.json last; dvclive (--live-dir): per-round pass rates as steps, the rest as metrics.

    python -m stages.sft_data --params-json '{"sft_data": {...}}' --tasks-dir DIR --teacher DIR --student DIR \
        [--chain-model DIR] --output-dir DIR --live-dir DIR
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import torch

import model as engine
from stages import common, evaluate, tasks
from stages.chat import RESERVED, encode_prompt, load_chat_tokenizer
from stages.sft_checklist import (ITEMS, Candidate, Checker, ChecklistConfig, CheckResult, assistant_message,
                                  critique, equations, instruction_messages, parse_completion, solution_block)
from stages.verifiers import SandboxLimits, extract_final_answer, verify_code_batch

STAGE = "sft_data"
DOMAINS = ("math", "code")
SOURCES = ("teacher", "student", "revised", "reference")
COT_PATHS = ("reconstructed", "own")
REJECT_REASONS = ("checklist_failed", "cot_unreconstructable")

# generate(model, prompts, seeds) -> per prompt, one Candidate per seed; model is "teacher", "student" or "chain".
Generate = Callable[[str, Sequence[list[dict]], Sequence[Sequence[int]]], list[list[Candidate]]]

PARAM_TYPES = {
    "seed": int, "scale": str, "max_per_level": dict, "teacher_samples": int, "student_samples": int,
    "revise_rounds": int, "revise_samples": int, "cot_tries": int, "temperature": float, "top_p": float,
    "max_new_tokens": int, "max_len": int, "min_tokens": int, "max_tokens": int, "repetition_ngram": int,
    "repetition_max_ngram": int, "repetition_max_line": int, "stop_tokens": list, "batch_size": int, "device": str,
    "dtype": str, "cpu_threads": int, "sympy_timeout_s": float, "sandbox_timeout_s": float,
    "sandbox_memory_mb": int, "sandbox_workers": int, "reference_fallback": bool,
}

SFT_SCHEMA = pa.schema([
    ("id", pa.string()), ("domain", pa.string()), ("level", pa.int64()),
    ("messages", pa.string()),    # JSON [{"role", "content", "reasoning_content"?}]: user, assistant
    ("source", pa.string()),      # teacher | student | revised
    ("rounds", pa.int64()),       # revision rounds before the refined solution passed (0: a first draw)
    ("cot", pa.string()),         # reconstructed | own
    ("summary", pa.string()),     # short reasoning summary (module docstring)
    ("checklist", pa.string()),   # JSON [{"item", "passed", "detail"}] of the refined candidate
])
REJECTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("domain", pa.string()), ("level", pa.int64()),
    ("reason", pa.string()),      # one of REJECT_REASONS
    ("rounds", pa.int64()),       # revision rounds run
    ("critique", pa.string()),    # JSON [{"item", "detail"}]: the last critique
])


def validate_params(p: dict) -> dict:
    """The slice with exactly PARAM_TYPES' keys and types (ints where floats are asked are fine); a StageError names
    the key at fault."""
    if set(p) != set(PARAM_TYPES):
        raise common.StageError(f"{STAGE}: missing {sorted(set(PARAM_TYPES) - set(p))}, "
                                f"unknown {sorted(set(p) - set(PARAM_TYPES))}")
    for key, kind in PARAM_TYPES.items():
        ok = isinstance(p[key], (int, float) if kind is float else kind) and (kind is bool or
                                                                             not isinstance(p[key], bool))
        if not ok or (kind is int and p[key] < 0):
            raise common.StageError(f"{STAGE}.{key} must be a {'non-negative ' if kind is int else ''}"
                                    f"{kind.__name__}, got {p[key]!r}")
    if set(p["max_per_level"]) != set(DOMAINS) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in p["max_per_level"].values()):
        raise common.StageError(f"{STAGE}.max_per_level must map math and code to ints >= 0, got "
                                f"{p['max_per_level']!r}")
    if p["teacher_samples"] + p["student_samples"] < 1 or p["cot_tries"] < 1 or (p["revise_rounds"] and
                                                                                 p["revise_samples"] < 1):
        raise common.StageError(f"{STAGE}: need teacher_samples + student_samples >= 1, cot_tries >= 1 and "
                                f"revise_samples >= 1 when revise_rounds > 0")
    return p


def checklist_config(p: dict) -> ChecklistConfig:
    return ChecklistConfig(**{k: p[k] for k in ChecklistConfig.__dataclass_fields__})


def select_instructions(records: Sequence[dict], max_per_level: dict, seed: int) -> list[dict]:
    """At most max_per_level[domain] records per (domain, level): the first in sha256(seed/id) order, which mixes
    a level's templates (the files list them template by template); output in (domain, level, that order) order."""
    def rank(r: dict) -> str:
        return hashlib.sha256(f"{seed}/{r['id']}".encode()).hexdigest()
    out = []
    for domain in DOMAINS:
        for level in sorted({r["level"] for r in records if r["domain"] == domain}):
            group = sorted((r for r in records if r["domain"] == domain and r["level"] == level), key=rank)
            out += group[:max_per_level[domain]]
    return out


# ============================================================================ prompts

def _scrub(text: str) -> str:
    """Text safe inside a prompt: control-token strings removed (a junk candidate may contain them)."""
    return RESERVED.sub("", text)


def revision_messages(record: dict, c: Candidate, failed: list[dict]) -> list[dict]:
    """Instruction + the previous candidate + its critique as a user turn."""
    prior = Candidate(_scrub(c.reasoning), _scrub(c.content).strip() or "(no reply)")
    issues = "; ".join(f"{x['item']}: {x['detail']}" for x in failed)
    return [*instruction_messages(record), assistant_message(prior),
            {"role": "user", "content": _scrub(f"Your answer failed: {issues}. Revise it.")}]


def chain_messages(record: dict, c: Candidate) -> list[dict]:
    """The chain-completion prompt: the instruction with the refined answer as a hint, "The answer is X." (math:
    the reply's final answer; code: its solution block, fenced)."""
    user = instruction_messages(record)[0]["content"]
    if record["domain"] == "math":
        hint = f"The answer is {extract_final_answer(c.content)[0]}."
    else:
        hint = f"The answer is:\n```python\n{solution_block(record, c.content).rstrip()}\n```"
    return [{"role": "user", "content": f"{user}\n\n{hint}"}]


def summary_of(record: dict, reasoning: str) -> str:
    if record["domain"] == "math":
        return "; ".join(" = ".join(sides) for sides in equations(reasoning))
    return next((line.strip() for line in reasoning.splitlines() if line.strip()), "")


def reference_candidate(record: dict) -> Candidate:
    """The task's own reference solution as a candidate (step 3b)."""
    reply = tasks.reference_messages(record)[-1]
    return Candidate(reply["reasoning_content"], reply["content"])


# ============================================================================ the core

@dataclass
class _State:
    """One instruction through the loop."""
    record: dict
    candidate: Candidate | None = None       # the refined solution, or the best of the last round
    results: list[CheckResult] = field(default_factory=list)
    source: str | None = None
    rounds: int = 0


def _seeds(seed: int, phase: str, round_: int, ids: Sequence[str], n: int) -> list[list[int]]:
    return [[evaluate.sample_seed(seed, f"{STAGE}/{phase}/{round_}", i, s) for s in range(n)] for i in ids]


class _Tally:
    """Item pass counts over every candidate checked."""

    def __init__(self):
        self.items = {item: [0, 0] for item in ITEMS}

    def add(self, results: list[CheckResult]) -> bool:
        for r in results:
            self.items[r.item][0] += 1
            self.items[r.item][1] += r.passed
        return all(r.passed for r in results)

    def summary(self) -> dict:
        return {item: {"checked": n, "passed": k, "pass_rate": k / n if n else None}
                for item, (n, k) in self.items.items()}


def _choose(states: list[_State], drawn: list[list[tuple[str, Candidate]]], checker: Checker, tally: _Tally,
            round_: int) -> dict:
    """Check every drawn candidate; a state with a passing one takes the first (solved), else the one with the
    fewest failed items. Returns the round's row of metrics."""
    flat = [(st.record, c) for st, cands in zip(states, drawn) for _, c in cands]
    results = iter(checker.run(flat))
    by_source: dict[str, list[int]] = {}
    solved = 0
    for st, cands in zip(states, drawn):
        scored = []
        for source, c in cands:
            res = next(results)
            passed = tally.add(res)
            by_source.setdefault(source, [0, 0])
            by_source[source][0] += 1
            by_source[source][1] += passed
            scored.append((source, c, res, passed))
        winner = next((s for s in scored if s[3]), None)
        best = winner or min(scored, key=lambda s: sum(not r.passed for r in s[2]))
        st.source, st.candidate, st.results, st.rounds = best[0] if winner else None, best[1], best[2], round_
        solved += winner is not None
    n_cands = sum(v[0] for v in by_source.values())
    return {"round": round_, "instructions": len(states), "solved": solved,
            "solved_rate": solved / len(states) if states else None, "candidates": n_cands,
            "candidate_pass_rate": sum(v[1] for v in by_source.values()) / n_cands if n_cands else None,
            "by_source": {s: {"candidates": n, "passed": k, "pass_rate": k / n} for s, (n, k) in by_source.items()}}


def refine(records: Sequence[dict], p: dict, generate: Generate, checker: Checker) -> tuple[list[dict], list[dict],
                                                                                             dict]:
    """(kept rows, rejected rows, metrics) for the instructions `records` (module docstring, steps 1-4)."""
    seed, tally = p["seed"], _Tally()
    states = [_State(r) for r in records]
    ids = [r["id"] for r in records]
    prompts = [instruction_messages(r) for r in records]
    drawn: list[list[tuple[str, Candidate]]] = [[] for _ in records]
    for model, n in (("teacher", p["teacher_samples"]), ("student", p["student_samples"])):
        if n and records:
            for cands, out in zip(drawn, generate(model, prompts, _seeds(seed, model, 0, ids, n))):
                cands += [(model, c) for c in out]
    rounds = [_choose(states, drawn, checker, tally, 0)] if records else []
    for round_ in range(1, p["revise_rounds"] + 1):
        pending = [st for st in states if st.source is None]
        if not pending:
            break
        outs = generate("teacher", [revision_messages(st.record, st.candidate, critique(st.results)) for st in pending],
                        _seeds(seed, "revise", round_, [st.record["id"] for st in pending], p["revise_samples"]))
        rounds.append(_choose(pending, [[("revised", c) for c in out] for out in outs], checker, tally, round_))

    total = 0
    for row in rounds:  # instructions solved by the end of each round, over all instructions
        total += row["solved"]
        row["solved_cumulative_rate"] = total / len(records)
    pending = [st for st in states if st.source is None]
    fallback = {"instructions": len(pending), "solved": 0}
    if p["reference_fallback"] and pending:
        refs = [[("reference", reference_candidate(st.record))] for st in pending]
        fallback["solved"] = _choose(pending, refs, checker, tally, p["revise_rounds"])["solved"]
    kept, rejected, cot = [], [], {"reconstructed": 0, "own": 0, "chain_samples": 0, "chain_accepted": 0}
    solved = [st for st in states if st.source is not None]
    chains = generate("chain", [chain_messages(st.record, st.candidate) for st in solved],
                      _seeds(seed, "chain", 0, [st.record["id"] for st in solved], p["cot_tries"])) if solved else []
    chain_of = {id(st): out for st, out in zip(solved, chains)}
    for st in states:
        r = st.record
        base = {"id": r["id"], "domain": r["domain"], "level": r["level"]}
        if st.source is None:
            rejected.append({**base, "reason": "checklist_failed", "rounds": st.rounds,
                             "critique": json.dumps(critique(st.results), sort_keys=True)})
            continue
        path, reasoning, last = None, "", []
        for sample in chain_of[id(st)]:
            cot["chain_samples"] += 1
            last = checker.chain(r, Candidate(sample.reasoning, st.candidate.content))
            if all(x.passed for x in last):
                path, reasoning = "reconstructed", sample.reasoning
                cot["chain_accepted"] += 1
                break
        if path is None and all(x.passed for x in checker.chain(r, st.candidate)):
            path, reasoning = "own", st.candidate.reasoning
        if path is None:
            rejected.append({**base, "reason": "cot_unreconstructable", "rounds": st.rounds,
                             "critique": json.dumps(critique(last), sort_keys=True)})
            continue
        cot[path] += 1
        messages = [*instruction_messages(r), assistant_message(Candidate(reasoning, st.candidate.content))]
        kept.append({**base, "messages": json.dumps(messages, ensure_ascii=False), "source": st.source,
                     "rounds": st.rounds, "cot": path, "summary": summary_of(r, reasoning),
                     "checklist": json.dumps([vars(x) for x in st.results], sort_keys=True)})
    common.check_conservation(STAGE, "all", len(records), kept=len(kept), rejected=len(rejected))
    metrics = {
        "counts": {"instructions": len(records), "kept": len(kept), "rejected": len(rejected),
                   "by_domain": {d: {"instructions": sum(r["domain"] == d for r in records),
                                     "kept": sum(k["domain"] == d for k in kept)} for d in DOMAINS}},
        "rounds": rounds,
        "reference_fallback": fallback,   # instructions unsolved after the last round; solved by their reference
        "items": tally.summary(),
        "rejections": {reason: sum(x["reason"] == reason for x in rejected) for reason in REJECT_REASONS},
        "rejected_failed_items": {item: sum(item in {c["item"] for c in json.loads(x["critique"])}
                                            for x in rejected if x["reason"] == "checklist_failed") for item in ITEMS},
        "sources": {s: sum(k["source"] == s for k in kept) for s in SOURCES},
        "cot": {**cot, "chain_accept_rate": cot["chain_accepted"] / cot["chain_samples"] if cot["chain_samples"]
                else None},
    }
    return kept, rejected, metrics


# ============================================================================ files

def read_instructions(tasks_dir: str | Path, p: dict) -> tuple[list[dict], list[Path]]:
    paths = [common.input_shard(tasks_dir, f"{d}_train") for d in DOMAINS]
    records = [row for path in paths for batch in common.iter_batches(path) for row in batch]
    return select_instructions(records, p["max_per_level"], p["seed"]), paths


def write_outputs(output_dir: str | Path, live_dir: str | Path | None, p: dict, kept: list[dict],
                  rejected: list[dict], metrics: dict, inputs: Sequence[Path]) -> dict:
    """sft.parquet, rejected.parquet, metrics.json, dvclive (when live_dir), then manifest.json."""
    out = Path(output_dir)
    common.write_table(out / "sft.parquet", common.rows_to_table(kept, SFT_SCHEMA))
    common.write_table(out / "rejected.parquet", common.rows_to_table(rejected, REJECTED_SCHEMA))
    common.write_json(out / "metrics.json", metrics)
    if live_dir is not None:
        live = common.open_live(live_dir)
        for row in metrics["rounds"]:
            for key in ("solved_rate", "candidate_pass_rate", "solved_cumulative_rate"):
                live.log_metric(f"round/{key}", row[key])
            live.next_step()
        for reason, n in metrics["rejections"].items():
            live.log_metric(f"rejected/{reason}", n, plot=False)
        for item, v in metrics["items"].items():
            if v["pass_rate"] is not None:
                live.log_metric(f"item_pass_rate/{item}", round(v["pass_rate"], 6), plot=False)
        for key in ("instructions", "kept", "rejected"):
            live.log_metric(f"count/{key}", metrics["counts"][key], plot=False)
        live.end()
    return common.write_manifest(out / "manifest.json", stage=STAGE, params=p, inputs=inputs,
                                 outputs=[out / "sft.parquet", out / "rejected.parquet", out / "metrics.json"],
                                 counts=metrics["counts"], code=common.code_version_closure("stages.sft_data"))


# ============================================================================ the CLI's generator

def _checkpoint_files(ckpt: Path) -> list[Path]:
    return [ckpt / name for name in ("config.json", "model.safetensors", "tokenizer.json")]


def model_generator(checkpoints: dict[str, Path], p: dict) -> Generate:
    """Generate over checkpoints by role (teacher, student, chain; one load per distinct directory): chat prompts by
    stages.chat.encode_prompt (a prompt over context - max_new_tokens tokens keeps its end), sampled by
    model.generate with p's temperature, top_p, max_new_tokens, stop_tokens, batch_size; each completion parsed into
    a Candidate (truncated = it hit the token limit)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[p["dtype"]]
    loaded: dict[Path, tuple] = {}
    for ckpt in checkpoints.values():
        if ckpt not in loaded:
            tok = load_chat_tokenizer(ckpt)
            stops = tuple(tok.token_to_id(t) for t in p["stop_tokens"])
            if None in stops:
                raise common.StageError(f"{ckpt}: stop_tokens {p['stop_tokens']} are not all tokens of its tokenizer")
            loaded[ckpt] = (engine.load_pretrained(ckpt, device=p["device"], dtype=dtype).eval(), tok, stops)

    def generate(role: str, prompts: Sequence[list[dict]], seeds: Sequence[Sequence[int]]) -> list[list[Candidate]]:
        model, tok, stops = loaded[checkpoints[role]]
        context = model.config.max_position_embeddings
        keep = context - min(p["max_new_tokens"], context // 2)
        requests = [engine.Request(encode_prompt(tok, m)[-keep:], tuple(s)) for m, s in zip(prompts, seeds)]
        sampling = engine.SamplingParams(p["max_new_tokens"], float(p["temperature"]), float(p["top_p"]), stops)
        outs = engine.generate(model, requests, sampling, lambda ids: tok.decode(ids, skip_special_tokens=False),
                               p["batch_size"])
        return [[parse_completion(c.text, c.finish_reason == "length") for c in out] for out in outs]
    return generate


def run(tasks_dir: str | Path, teacher: str | Path, student: str | Path, output_dir: str | Path,
        live_dir: str | Path | None, p: dict, chain_model: str | Path | None = None) -> dict:
    """The stage: read, refine with the checkpoints, write. Returns the manifest."""
    validate_params(p)
    torch.set_num_threads(p["cpu_threads"])
    records, inputs = read_instructions(tasks_dir, p)
    roles = {"teacher": Path(teacher), "student": Path(student), "chain": Path(chain_model or teacher)}
    for ckpt in set(roles.values()):
        for f in _checkpoint_files(ckpt):
            if not f.is_file():
                raise common.StageError(f"{f}: checkpoint file missing")
    limits = SandboxLimits(timeout_s=float(p["sandbox_timeout_s"]), memory_mb=int(p["sandbox_memory_mb"]))
    # lengths and chat validity are those of the model the data trains: the student's tokenizer
    checker = Checker(checklist_config(p), load_chat_tokenizer(roles["student"]),
                      partial(verify_code_batch, limits=limits, workers=p["sandbox_workers"]))
    kept, rejected, metrics = refine(records, p, model_generator(roles, p), checker)
    files = [*inputs, *(f for ckpt in sorted(set(roles.values())) for f in _checkpoint_files(ckpt))]
    return write_outputs(output_dir, live_dir, p, kept, rejected, metrics, files)


def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--tasks-dir", required=True, help="the tasks stage's output (math_train / code_train)")
    ap.add_argument("--teacher", required=True, help="teacher checkpoint directory (drafts, revisions)")
    ap.add_argument("--student", required=True, help="the current model's checkpoint directory")
    ap.add_argument("--chain-model", default=None, help="CoT reconstruction checkpoint (default: the teacher)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--live-dir", default=None)
    args = ap.parse_args(argv)
    try:
        manifest = run(args.tasks_dir, args.teacher, args.student, args.output_dir, args.live_dir,
                       common.resolve_cli_params(args, STAGE), args.chain_model)
    except common.StageError as exc:
        common.fail(exc)
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
