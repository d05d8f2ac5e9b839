"""Verifier audit: how often math-verify and our own checker disagree on task data, and who is right.

Each gold answer is paired with model-like completions whose verdict is known: the gold solution, the answer
in other formats (boxed, "The answer is", `.0`, \\frac, `$..$`, `x =`, a unit, a thousands separator, a
trailing period) which must score 1, and wrong answers (off by one, negated, times ten, as a percent
fraction, a wrong first answer before the right one, numbers without a final-answer marker) which must
score 0. For every pair, both checkers'
verdicts (equal / not equal / undecided) on the extracted first final answer, and the combined verdict of
stages.verifiers.math.verify_math against the known label.

    python -m tools.verifier_audit --tasks artifacts/tiny/tasks/math_heldout.parquet \\
        --eval data/eval/tiny_math/test.jsonl
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq

from stages.verifiers.math import extract_final_answer, math_verify_equal, ours_equal, verify_math

VERDICT = {True: "equal", False: "not equal", None: "undecided"}


def completions(answer: str, solution: str) -> list[tuple[str, str, int]]:
    """(variant, completion, label) for one gold answer; formats that need an integer answer only for one."""
    rows = [("solution", solution, 1), ("boxed", f"\\boxed{{{answer}}}", 1), ("answer_is", f"The answer is {answer}.", 1),
            ("latex_inline", f"#### ${answer}$", 1), ("assignment", f"\\boxed{{x = {answer}}}", 1),
            ("unit_text", f"\\boxed{{{answer}\\text{{ dollars}}}}", 1), ("trailing_period", f"#### {answer}.", 1)]
    try:
        a = int(answer)
    except ValueError:
        return rows
    rows += [("decimal", f"#### {a}.0", 1), ("frac", f"\\boxed{{\\frac{{{2 * a}}}{{2}}}}", 1),
             ("off_by_one", f"#### {a + 1}", 0), ("first_of_two", f"#### {a + 1}\n#### {a}", 0),
             ("number_spray", f"It is {a - 1}, {a} or {a + 1}.", 0)]
    if abs(a) >= 1000:
        rows.append(("thousands", f"#### {a:,}", 1))
    if a != 0:
        rows += [("negated", f"\\boxed{{{-a}}}", 0), ("times_ten", f"\\boxed{{{10 * a}}}", 0),
                 ("percent_fraction", f"\\boxed{{{float(Fraction(a, 100))}}}", 0)]
    return rows


def load_items(tasks: list[Path], evals: list[Path], limit: int) -> list[dict]:
    """{source, id, answer, solution} from task Parquet files and eval JSONL files, the first `limit` of each."""
    items = []
    for path in tasks:
        rows = pq.read_table(path, columns=["id", "answer", "solution"]).to_pylist()
        items += [{"source": path.name, **r} for r in rows[:limit or None]]
    for path in evals:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        items += [{"source": path.name, "id": r["id"], "answer": r["answer"], "solution": r["solution"]}
                  for r in rows[:limit or None]]
    return items


def load_labelled_pairs(paths: list[Path]) -> list[tuple[dict, str, str, int]]:
    """(item, variant, completion, label) from tables of tricky pairs {pred, gold, expected, kind}, such as
    tests/data/math_verify_audit.jsonl: the prediction is answered as \\boxed{pred}."""
    rows = [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [({"source": "pairs", "id": f"pair-{i}", "answer": r["gold"]}, f"table:{r['kind']}",
             f"\\boxed{{{r['pred']}}}", int(r["expected"])) for i, r in enumerate(rows)]


def audit(items: list[dict], timeout_s: float, labelled: list[tuple[dict, str, str, int]] = ()) -> dict:
    """Per pair: the extracted answer, both checkers' verdicts, the combined score and the label."""
    generated = [(item, variant, completion, label) for item in items
                 for variant, completion, label in completions(item["answer"].strip(), item["solution"])]
    pairs = []
    for item, variant, completion, label in [*generated, *labelled]:
        gold = item["answer"].strip()
        pred, _ = extract_final_answer(completion)
        ours = ours_equal(pred, gold, timeout_s) if pred is not None else (None, "no final answer")
        theirs = math_verify_equal(pred, gold, timeout_s) if pred is not None else (None, "no final answer")
        score = verify_math(completion, gold, timeout_s).score
        pairs.append({"source": item["source"], "id": item["id"], "variant": variant, "label": label,
                      "pred": pred, "gold": gold, "ours": ours[0], "ours_why": ours[1],
                      "math_verify": theirs[0], "math_verify_why": theirs[1], "score": score})
    return summarize(pairs)


def summarize(pairs: list[dict]) -> dict:
    """Disagreement rates (any verdict differs; both decided and opposite), each checker's and the combined
    verdict's errors against the labels, per variant."""
    n = len(pairs)
    differ = [p for p in pairs if p["ours"] is not p["math_verify"]]
    opposite = [p for p in differ if p["ours"] is not None and p["math_verify"] is not None]
    per_variant: dict[str, Counter] = defaultdict(Counter)
    for p in pairs:
        c = per_variant[p["variant"]]
        c["n"] += 1
        c["differ"] += p["ours"] is not p["math_verify"]
        for name in ("ours", "math_verify"):
            c[f"{name}_{VERDICT[p[name]]}"] += 1
        c["combined_wrong"] += int(p["score"] > 0.5) != p["label"]

    def errors(key):
        fp = sum(1 for p in pairs if p[key] is True and p["label"] == 0)
        fn = sum(1 for p in pairs if p[key] is not True and p["label"] == 1)
        return {"false_positives": fp, "false_negatives": fn}

    combined_fp = sum(1 for p in pairs if p["score"] > 0.5 and p["label"] == 0)
    combined_fn = sum(1 for p in pairs if p["score"] <= 0.5 and p["label"] == 1)
    return {"pairs": n, "disagreement_rate": len(differ) / max(n, 1),
            "opposite_verdict_rate": len(opposite) / max(n, 1),
            "ours": errors("ours"), "math_verify": errors("math_verify"),
            "combined": {"false_positives": combined_fp, "false_negatives": combined_fn},
            "per_variant": {k: dict(v) for k, v in sorted(per_variant.items())}, "disagreements": differ}


def print_report(report: dict, examples: int) -> None:
    print(f"pairs: {report['pairs']}   disagreement rate (any verdict differs): {report['disagreement_rate']:.2%}   "
          f"opposite verdicts (equal vs not equal): {report['opposite_verdict_rate']:.2%}")
    for name in ("ours", "math_verify", "combined"):
        e = report[name]
        print(f"  {name:12s} false positives {e['false_positives']:5d}   false negatives {e['false_negatives']:5d}")
    print(f"\n{'variant':18s} {'n':>5s} {'differ':>7s} {'ours =/!=/?':>14s} {'math-verify =/!=/?':>19s} {'wrong':>6s}")
    for variant, c in report["per_variant"].items():
        ours = f"{c.get('ours_equal', 0)}/{c.get('ours_not equal', 0)}/{c.get('ours_undecided', 0)}"
        mv = f"{c.get('math_verify_equal', 0)}/{c.get('math_verify_not equal', 0)}/{c.get('math_verify_undecided', 0)}"
        print(f"{variant:18s} {c['n']:5d} {c.get('differ', 0):7d} {ours:>14s} {mv:>19s} {c.get('combined_wrong', 0):6d}")
    shown: Counter = Counter()
    print("\nexamples of disagreements (at most a few per variant):")
    for p in report["disagreements"]:
        if sum(shown.values()) >= examples or shown[p["variant"]] >= 3:
            continue
        shown[p["variant"]] += 1
        print(f"  [{p['variant']}] {p['pred']!r} vs gold {p['gold']!r}: ours {VERDICT[p['ours']]} ({p['ours_why']}), "
              f"math-verify {VERDICT[p['math_verify']]} ({p['math_verify_why']}), label {p['label']}, "
              f"score {p['score']:g}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=Path, nargs="*", default=[], help="task Parquet files (stages.tasks output)")
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="eval JSONL files with answer and solution")
    ap.add_argument("--pairs", type=Path, nargs="*", default=[],
                    help="labelled tricky pairs (JSONL: pred, gold, expected, kind), e.g. tests/data/math_verify_audit.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="items per file (0: all)")
    ap.add_argument("--timeout-s", type=float, default=5.0, help="time limit of each checker call")
    ap.add_argument("--examples", type=int, default=12)
    ap.add_argument("--json", type=Path, help="also write the report (all disagreements) here")
    args = ap.parse_args(argv)
    if not (args.tasks or args.eval or args.pairs):
        ap.error("give --tasks, --eval and/or --pairs")
    report = audit(load_items(args.tasks, args.eval, args.limit), args.timeout_s, load_labelled_pairs(args.pairs))
    print_report(report, args.examples)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
