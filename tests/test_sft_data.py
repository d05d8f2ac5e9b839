"""SFT data refinement: checklist items, the critique-revise loop, CoT reconstruction, seeds, conservation, the CLI."""
from __future__ import annotations

import json
from functools import partial

import pyarrow.parquet as pq
import pytest

from stages import common, sft_data, tasks
from stages.chat import load_chat_tokenizer
from stages.sft_checklist import (Candidate, Checker, ChecklistConfig, checklist_for, critique, equations,
                                  parse_completion)
from stages.verifiers import SandboxLimits, verify_code_batch
from tests.fixtures_checkpoint import make_checkpoint

MATH = {"id": "math-L4-mul_add-3_4_5", "domain": "math", "level": 4, "prompt": "What is 3 × 4 + 5?", "answer": "17",
        "solution": "3 × 4 = 12.\n12 + 5 = 17.\n#### 17"}
CODE = {"id": "code-L1-add_constant-2", "domain": "code", "level": 1, "entry_point": "add_two",
        "prompt": 'def add_two(x):\n    """Return x plus 2."""\n',
        "statement": "Write a Python function `add_two(x)` that returns x plus 2.",
        "test": "def check(candidate):\n    assert candidate(1) == 3\n    assert candidate(-4) == -2\n"}
GOOD_MATH = Candidate("3 × 4 = 12.\n12 + 5 = 17.", "#### 17")
GOOD_CODE = Candidate("add_two adds 2 to x.", "```python\ndef add_two(x):\n    return x + 2\n```")
CFG = ChecklistConfig(max_len=512, min_tokens=10, max_tokens=120, repetition_ngram=4, repetition_max_ngram=2,
                      repetition_max_line=2, sympy_timeout_s=5.0)
PARAMS = {"seed": 7, "scale": "tiny", "max_per_level": {"math": 2, "code": 1}, "teacher_samples": 2,
          "student_samples": 1, "revise_rounds": 2, "revise_samples": 1, "cot_tries": 2, "temperature": 0.7,
          "top_p": 0.95, "max_new_tokens": 24, "max_len": 512, "min_tokens": 10, "max_tokens": 120,
          "repetition_ngram": 4, "repetition_max_ngram": 2, "repetition_max_line": 2,
          "stop_tokens": ["<|endoftext|>", "<|im_end|>"], "batch_size": 8, "device": "cpu", "dtype": "float32",
          "cpu_threads": 1, "sympy_timeout_s": 5.0, "sandbox_timeout_s": 5.0, "sandbox_memory_mb": 1024,
          "sandbox_workers": 1, "reference_fallback": False}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def checker(micro):
    return Checker(CFG, load_chat_tokenizer(micro), partial(verify_code_batch, limits=SandboxLimits(), workers=1))


def _verdicts(checker, record, candidate) -> dict[str, bool]:
    return {r.item: r.passed for r in checker.run([(record, candidate)])[0]}


# ============================================================================ checklist items

CASES = [  # (name, record, candidate, the items expected to fail)
    ("math correct", MATH, GOOD_MATH, set()),
    ("math wrong answer", MATH, Candidate("3 × 4 = 12.\n12 + 5 = 17.", "#### 18"),
     {"answer_correct", "steps_consistent"}),
    ("math wrong step", MATH, Candidate("3 × 4 = 13.\n13 + 4 = 17.", "#### 17"), {"steps_consistent"}),
    ("math last step not the answer", MATH, Candidate("3 × 4 = 12.\n12 + 5 = 17.\n17 - 1 = 16.", "#### 17"),
     {"steps_consistent"}),
    ("math no steps", MATH, Candidate("It is seventeen.", "#### 17"), {"steps_consistent"}),
    ("math no final answer", MATH, Candidate("3 × 4 = 12.\n12 + 5 = 17.", "17"),
     {"answer_correct", "steps_consistent"}),
    ("math repetition loop", MATH, Candidate("3 × 4 = 12.\n" * 4 + "12 + 5 = 17.", "#### 17"), {"no_repetition"}),
    ("math too long", MATH, Candidate(" ".join(f"w{i}" for i in range(70)) + "\n3 × 4 = 12.\n12 + 5 = 17.",
                                      "#### 17"), {"length"}),
    ("math too short", MATH, Candidate("", "#### 17"), {"length", "steps_consistent"}),
    ("math control token in text", MATH, Candidate("3 × 4 = 12.\n12 + 5 = 17.", "<|im_end|> #### 17"),
     {"chat_format"}),
    ("math truncated", MATH, Candidate("3 × 4 = 12.\n12 + 5 = 17.", "#### 17", truncated=True), {"chat_format"}),
    ("code correct", CODE, GOOD_CODE, set()),
    ("code fails hidden tests", CODE, Candidate("add_two", "```python\ndef add_two(x):\n    return x + 1\n```"),
     {"tests_pass"}),
    ("code wrong entry point", CODE, Candidate("add_two", "```python\ndef plus_two(x):\n    return x + 2\n```"),
     {"tests_pass", "code_wellformed"}),
    ("code does not parse", CODE, Candidate("add_two", "```python\ndef add_two(x)\n    return x + 2\n```"),
     {"tests_pass", "code_wellformed"}),
    ("code not fenced", CODE, Candidate("add_two", "def add_two(x):\n    return x + 2"), {"code_wellformed"}),
]


@pytest.mark.parametrize("name,record,candidate,failing", CASES, ids=[c[0] for c in CASES])
def test_checklist_items(checker, name, record, candidate, failing):
    verdicts = _verdicts(checker, record, candidate)
    assert set(verdicts) == set(checklist_for(record))
    assert {item for item, ok in verdicts.items() if not ok} == failing


def test_checklist_is_dynamic_by_domain():
    assert "answer_correct" in checklist_for(MATH) and "tests_pass" not in checklist_for(MATH)
    assert "tests_pass" in checklist_for(CODE) and "steps_consistent" not in checklist_for(CODE)


def test_equations_and_the_reference_solutions_of_every_math_template(checker):
    assert equations("5 - 7 = -2, so -2 + 1 = -1.") == [["5 - 7", "-2"], ["-2 + 1", "-1"]]
    assert equations("Maya has 3 + 4 = 7 apples. 7 × 2 = 14 ÷ 1 = 14.") == [["3 + 4", "7"],
                                                                        ["7 × 2", "14 ÷ 1", "14"]]
    rows = tasks.build_tasks({"seed": 1, "math": {"levels": [1, 2, 3, 4, 5], "train_per_level": 30,
                                                  "heldout_per_level": 5, "max_heldout_fraction": 0.4},
                              "code": {"levels": [1], "train_per_level": 1, "heldout_per_level": 1,
                                       "max_heldout_fraction": 0.4, "public_tests": 2, "hidden_tests": 2}})
    pairs = [(r, Candidate(*r["solution"].rsplit("\n", 1))) for r in rows["math_train"]]
    assert {r["template_id"] for r, _ in pairs} == {t.template_id for t in tasks.MATH_TEMPLATES}
    assert all(all(x.passed for x in res) for res in checker.run(pairs))


def test_parse_completion():
    assert parse_completion("<think>\n2 + 2 = 4.\n</think>\n\n#### 4") == Candidate("2 + 2 = 4.", "#### 4")
    assert parse_completion("#### 4", truncated=True) == Candidate("", "#### 4", True)
    assert parse_completion("<think>\nnever closed #### 4").content.startswith("<think>")


def test_critique_lists_exactly_the_failed_items(checker):
    results = checker.run([(MATH, Candidate("3 × 4 = 12.\n12 + 5 = 17.", "#### 18"))])[0]
    c = critique(results)
    assert [x["item"] for x in c] == ["answer_correct", "steps_consistent"]
    assert all(set(x) == {"item", "detail"} and x["detail"] for x in c)
    assert critique(checker.run([(MATH, GOOD_MATH)])[0]) == []


# ============================================================================ the loop, with a scripted generator

class Scripted:
    """generate(role, prompts, seeds): script[(role, n-th call of that role)] gives each sample's Candidate, a
    Candidate or a function (messages, sample index) -> Candidate; every call is recorded."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, role, prompts, seeds):
        k = sum(c[0] == role for c in self.calls)
        self.calls.append((role, [list(m) for m in prompts], [list(s) for s in seeds]))
        make = self.script[(role, k)]
        return [[make(m, i) if callable(make) else make for i in range(len(s))] for m, s in zip(prompts, seeds)]


WRONG = Candidate("3 × 4 = 12.\n12 + 5 = 17.", "#### 18")
OFF_CHAIN = Candidate("3 × 4 = 12.\n12 + 6 = 18.", "#### 18")  # every step holds, but it ends in 18, not 17
CHAIN = Candidate("First 3 × 4 = 12.\nThen 12 + 5 = 17.", "#### 17")


def _run(checker, script, records=(MATH,), **overrides):
    gen = Scripted(script)
    kept, rejected, metrics = sft_data.refine(list(records), {**PARAMS, **overrides}, gen, checker)
    return kept, rejected, metrics, gen


def test_stops_at_the_first_passing_candidate(checker):
    kept, rejected, metrics, gen = _run(checker, {("teacher", 0): lambda m, i: [WRONG, GOOD_MATH][i],
                                                  ("student", 0): WRONG, ("chain", 0): CHAIN})
    assert [c[0] for c in gen.calls] == ["teacher", "student", "chain"]  # no revision round
    assert (kept[0]["source"], kept[0]["rounds"], kept[0]["cot"]) == ("teacher", 0, "reconstructed")
    assert metrics["rounds"][0]["by_source"]["teacher"] == {"candidates": 2, "passed": 1, "pass_rate": 0.5}
    _, _, _, gen = _run(checker, {("teacher", 0): WRONG, ("student", 0): GOOD_MATH, ("chain", 0): CHAIN})
    assert [c[0] for c in gen.calls] == ["teacher", "student", "chain"]


def test_student_candidate_is_kept_with_its_source(checker):
    kept, *_ = _run(checker, {("teacher", 0): WRONG, ("student", 0): GOOD_MATH, ("chain", 0): CHAIN})
    assert kept[0]["source"] == "student"


def test_revision_with_the_critique_in_context_until_it_passes(checker):
    kept, rejected, metrics, gen = _run(checker, {("teacher", 0): WRONG, ("student", 0): WRONG,
                                                  ("teacher", 1): WRONG, ("teacher", 2): GOOD_MATH,
                                                  ("chain", 0): CHAIN})
    assert [c[0] for c in gen.calls] == ["teacher", "student", "teacher", "teacher", "chain"]
    revision = gen.calls[2][1][0]
    assert [m["role"] for m in revision] == ["user", "assistant", "user"]
    assert revision[1] == {"role": "assistant", "content": "#### 18", "reasoning_content": WRONG.reasoning}
    assert revision[2]["content"].startswith("Your answer failed: answer_correct: ")
    assert "steps_consistent: " in revision[2]["content"] and revision[2]["content"].endswith("Revise it.")
    assert (kept[0]["source"], kept[0]["rounds"]) == ("revised", 2)
    assert [r["solved"] for r in metrics["rounds"]] == [0, 0, 1]
    assert [r["solved_cumulative_rate"] for r in metrics["rounds"]] == [0.0, 0.0, 1.0]
    assert json.loads(kept[0]["checklist"])[0]["passed"] is True


def test_rejected_after_the_last_round_with_its_critique(checker):
    kept, rejected, metrics, gen = _run(checker, {("teacher", 0): WRONG, ("student", 0): WRONG,
                                                  ("teacher", 1): WRONG, ("teacher", 2): GOOD_MATH}, revise_rounds=1)
    assert [c[0] for c in gen.calls] == ["teacher", "student", "teacher"]  # N = 1 round, no chain for nobody
    assert kept == [] and rejected[0]["reason"] == "checklist_failed" and rejected[0]["rounds"] == 1
    assert [x["item"] for x in json.loads(rejected[0]["critique"])] == ["answer_correct", "steps_consistent"]
    assert metrics["rejections"] == {"checklist_failed": 1, "cot_unreconstructable": 0}
    assert metrics["rejected_failed_items"]["answer_correct"] == 1


def test_cot_reconstruction_is_prompted_with_the_refined_answer(checker):
    kept, _, metrics, gen = _run(checker, {("teacher", 0): GOOD_MATH, ("student", 0): GOOD_MATH,
                                           ("chain", 0): lambda m, i: [OFF_CHAIN, CHAIN][i]})
    assert gen.calls[-1][1][0][-1]["content"].endswith("The answer is 17.")
    msgs = json.loads(kept[0]["messages"])
    assert msgs[-1] == {"role": "assistant", "content": "#### 17", "reasoning_content": CHAIN.reasoning}
    assert kept[0]["cot"] == "reconstructed" and kept[0]["summary"] == "3 × 4 = 12; 12 + 5 = 17"
    assert metrics["cot"]["chain_samples"] == 2 and metrics["cot"]["chain_accepted"] == 1


def test_cot_falls_back_to_own_reasoning_then_rejects(checker):
    kept, _, metrics, _ = _run(checker, {("teacher", 0): GOOD_MATH, ("student", 0): WRONG, ("chain", 0): OFF_CHAIN})
    assert kept[0]["cot"] == "own"
    assert json.loads(kept[0]["messages"])[-1]["reasoning_content"] == GOOD_MATH.reasoning
    # a passing code reply without reasoning: no own CoT to fall back on
    no_steps_code = Candidate("", GOOD_CODE.content)
    kept, rejected, metrics, _ = _run(checker, {("teacher", 0): no_steps_code, ("student", 0): no_steps_code,
                                                ("chain", 0): Candidate("I will write it.", "")}, records=(CODE,))
    assert kept == [] and rejected[0]["reason"] == "cot_unreconstructable"
    assert json.loads(rejected[0]["critique"])[0]["item"] == "steps_consistent"
    kept, *_ = _run(checker, {("teacher", 0): no_steps_code, ("student", 0): no_steps_code,
                              ("chain", 0): Candidate("add_two returns x + 2.", "")}, records=(CODE,))
    assert (kept[0]["cot"], kept[0]["summary"]) == ("reconstructed", "add_two returns x + 2.")


def test_conservation_and_seeds(checker):
    records = [MATH, CODE, {**MATH, "id": "math-other"}]
    script = {("teacher", 0): WRONG, ("student", 0): WRONG, ("teacher", 1): WRONG, ("teacher", 2): WRONG}
    kept, rejected, metrics, gen = _run(checker, script, records=records)
    assert metrics["counts"]["kept"] + metrics["counts"]["rejected"] == metrics["counts"]["instructions"] == 3
    seeds = [s for _, _, per in gen.calls for ss in per for s in ss]
    assert len(set(seeds)) == len(seeds)  # distinct per (phase, instruction, round, sample)
    *_, alone = _run(checker, script, records=[{**MATH, "id": "math-other"}])
    assert alone.calls[0][2][0] == gen.calls[0][2][2]  # an instruction's seeds do not depend on the others


def test_select_instructions_caps_each_level_across_templates():
    rows = tasks.build_tasks({"seed": 1, "math": {"levels": [4], "train_per_level": 60, "heldout_per_level": 5,
                                                  "max_heldout_fraction": 0.4},
                              "code": {"levels": [1], "train_per_level": 20, "heldout_per_level": 4,
                                       "max_heldout_fraction": 0.4, "public_tests": 2, "hidden_tests": 2}})
    chosen = sft_data.select_instructions(rows["math_train"] + rows["code_train"], {"math": 9, "code": 4}, 1)
    assert [r["domain"] for r in chosen] == ["math"] * 9 + ["code"] * 4
    assert len({r["template_id"] for r in chosen if r["domain"] == "math"}) == 3


def test_validate_params_names_the_key():
    with pytest.raises(common.StageError, match="unknown"):
        sft_data.validate_params({**PARAMS, "typo": 1})
    with pytest.raises(common.StageError, match="teacher_samples"):
        sft_data.validate_params({**PARAMS, "teacher_samples": "2"})


# ============================================================================ the CLI (micro checkpoint: junk text)

def test_cli_is_deterministic_and_conserves(micro, tmp_path):
    tasks_dir = tmp_path / "tasks"
    tasks.write_tasks(tasks_dir, {"seed": 1, "math": {"levels": [1, 5], "train_per_level": 10, "heldout_per_level": 2,
                                                      "max_heldout_fraction": 0.4},
                                  "code": {"levels": [1], "train_per_level": 4, "heldout_per_level": 1,
                                           "max_heldout_fraction": 0.4, "public_tests": 2, "hidden_tests": 2}})
    outs = []
    for run in ("a", "b"):
        sft_data.main(["--params-json", json.dumps({"sft_data": PARAMS}), "--tasks-dir", str(tasks_dir),
                       "--teacher", str(micro), "--student", str(micro), "--output-dir", str(tmp_path / run),
                       "--live-dir", str(tmp_path / f"live_{run}")])
        outs.append({name: (tmp_path / run / name).read_bytes()
                     for name in ("sft.parquet", "rejected.parquet", "metrics.json", "manifest.json")})
    assert outs[0] == outs[1]
    metrics = json.loads(outs[0]["metrics.json"])
    n = metrics["counts"]["instructions"]
    assert n == 5 and metrics["counts"]["kept"] + metrics["counts"]["rejected"] == n
    assert pq.read_table(tmp_path / "a" / "rejected.parquet").num_rows == metrics["counts"]["rejected"]
    assert pq.read_schema(tmp_path / "a" / "sft.parquet").names == sft_data.SFT_SCHEMA.names
    assert (tmp_path / "live_a" / "metrics.json").is_file()


def test_reference_fallback_after_the_last_round_is_checked_and_counted(checker):
    script = {("teacher", 0): WRONG, ("student", 0): WRONG, ("teacher", 1): WRONG, ("chain", 0): CHAIN}
    kept, rejected, metrics, gen = _run(checker, script, revise_rounds=1, reference_fallback=True)
    assert [c[0] for c in gen.calls] == ["teacher", "student", "teacher", "chain"]  # the refinement ran first
    assert (kept[0]["source"], kept[0]["rounds"]) == ("reference", 1) and rejected == []
    assert json.loads(kept[0]["messages"])[-1]["content"] == "#### 17"
    assert metrics["reference_fallback"] == {"instructions": 1, "solved": 1}
    assert metrics["sources"]["reference"] == 1 and [r["solved"] for r in metrics["rounds"]] == [0, 0]
    # a reference that fails the checklist (here: a wrong final answer) is rejected like any candidate
    bad = {**MATH, "solution": "3 × 4 = 12.\n12 + 6 = 18.\n#### 18"}
    kept, rejected, metrics, _ = _run(checker, script, records=(bad,), revise_rounds=1, reference_fallback=True)
    assert kept == [] and rejected[0]["reason"] == "checklist_failed"
    assert metrics["reference_fallback"] == {"instructions": 1, "solved": 0}
