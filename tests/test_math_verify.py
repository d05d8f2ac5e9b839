"""Math verifier: first-final-answer extraction, the two checkers and their combination, the audit table,
time limits that hold whatever a check does."""
import json
import time

import pytest

from stages.common import REPO
from stages.verifiers import math as vm

AUDIT = [json.loads(line) for line in (REPO / "tests" / "data" / "math_verify_audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text, answer, how", [
    (r"so the total is \boxed{42}.", "42", "boxed"),
    (r"\boxed{\frac{1}{2}} and later \boxed{3}", r"\frac{1}{2}", "boxed"),       # the first, not the last
    (r"nested \boxed{\frac{a^{2}}{b}} end", r"\frac{a^{2}}{b}", "boxed"),
    (r"\fbox{7}", "7", "boxed"),
    ("He has 20 - 4 = 16 left.\n#### 16", "16", "gsm8k"),
    ("#### 16\nQuestion: next one\n#### 99", "16", "gsm8k"),                     # a base model running on
    ("#### 5\nthen \\boxed{7}", "5", "gsm8k"),                                    # the earliest marker wins
    ("\\boxed{7}\n#### 5", "7", "boxed"),
    ("The answer is 12 apples.", "12 apples", "answer_is"),
    ("Final answer: x = 5", "x = 5", "answer_is"),
    ("The answer is 2. No wait, the answer is 3.", "2", "answer_is"),
    ("The answer is 3.5 metres.", "3.5 metres", "answer_is"),
    ("<think>maybe \\boxed{1}</think>The answer is 2.", "2", "answer_is"),
    ("I counted 3, then 4, then 5 cats", None, "none"),                           # no last-number fallback
    ("#### \n", None, "none"),
    (r"\boxed{unclosed", None, "none"),
])
def test_extract_first_final_answer(text, answer, how):
    assert vm.extract_final_answer(text) == (answer, how)


def test_many_numbers_without_a_marker_score_zero():
    spray = " ".join(str(i) for i in range(200))
    result = vm.verify_math(f"Let me list candidates: {spray}", "17", sympy_timeout_s=5)
    assert result.score == 0.0 and result.reason == "no final answer found"


def test_only_the_first_boxed_answer_counts():
    assert vm.verify_math(r"\boxed{16} or maybe \boxed{17}", "17").score == 0.0
    assert vm.verify_math(r"\boxed{17} or maybe \boxed{16}", "17").score == 1.0


@pytest.mark.parametrize("row", AUDIT, ids=[f"{r['kind']}:{r['pred']}|{r['gold']}" for r in AUDIT])
def test_audit_table(row):
    equal, why = vm.math_equal(row["pred"], row["gold"], timeout_s=10)
    assert int(equal) == row["expected"], why


@pytest.mark.parametrize("completion, gold, score", [
    ("#### 1,000", "1000", 1.0),
    ("The answer is 12.50", "12.5", 1.0),
    (r"\boxed{3/4}", r"\dfrac34", 1.0),
    (r"\boxed{x = 2}", "2", 1.0),
    ("The answer is 17", "16", 0.0),
    ("no answer at all", "3", 0.0),
    ("work...\n#### 16", "Aisha keeps 20 - 4 = 16.\n#### 16", 1.0),   # a full gold solution is extracted too
])
def test_verify_math_end_to_end(completion, gold, score):
    result = vm.verify_math(completion, gold, sympy_timeout_s=10)
    assert result.score == score, result.reason
    assert result.cost >= 0 and result.reason


@pytest.mark.parametrize("ours, theirs, verdict", [
    (True, True, True), (True, None, True), (None, True, True),
    (True, False, False), (None, None, False), (None, False, False),
])
def test_combination_rule(monkeypatch, ours, theirs, verdict):
    monkeypatch.setattr(vm, "ours_equal", lambda p, g, t: (ours, "stub"))
    monkeypatch.setattr(vm, "math_verify_equal", lambda p, g, t: (theirs, "stub"))
    assert vm.math_equal("a", "b")[0] is verdict


def test_ours_not_equal_is_final_without_asking_math_verify(monkeypatch):
    monkeypatch.setattr(vm, "math_verify_equal", lambda p, g, t: pytest.fail("math-verify was asked"))
    assert vm.math_equal("3", "4") == (False, "ours: not equal (exact numbers)")


@pytest.mark.parametrize("check, answer", [(vm.ours_equal, "9**9**9**9"), (vm.math_verify_equal, "9^{9^{9^{9}}}")])
def test_a_hanging_check_is_killed_at_its_limit(check, answer):
    # 9**9**9**9 hangs in C big-int arithmetic, out of a signal's reach: the worker is killed and restarted.
    assert check("1", "1", 10)[0] is True     # a started worker: its imports are not part of the limit
    start = time.monotonic()
    equal, why = check(answer, "1", 1.0)
    assert equal is None and "timed out" in why
    assert time.monotonic() - start < 3
    assert check("2", "2", 10)[0] is True     # a fresh worker answers the next question


def test_math_never_hands_code_to_sympy():
    assert not vm._sympy_ready("__import__('os')")
    assert not vm._sympy_ready("exec(chr(111))")
    assert vm.verify_math(r"\boxed{exec(chr(111))}", "1").score == 0.0


def test_audit_tool_reports_disagreements_and_no_false_positive(capsys):
    from tools import verifier_audit as va
    items = va.load_items([], [REPO / "data" / "eval" / "tiny_math" / "test.jsonl"], limit=3)
    labelled = va.load_labelled_pairs([REPO / "tests" / "data" / "math_verify_audit.jsonl"])
    report = va.audit(items, 10, labelled)
    generated = sum(len(va.completions(i["answer"], i["solution"])) for i in items)
    assert report["pairs"] == generated + len(AUDIT)
    assert report["combined"] == {"false_positives": 0, "false_negatives": 0}
    assert report["math_verify"]["false_positives"] > 0      # what the combination rule is for
    assert 0 < report["disagreement_rate"] == len(report["disagreements"]) / report["pairs"]
    va.print_report(report, examples=3)
    assert "disagreement rate" in capsys.readouterr().out
