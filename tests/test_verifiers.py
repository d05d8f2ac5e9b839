"""Verifiers: math equivalence edge cases, the code sandbox's limits, HumanEval's protocol, BFCL's AST match."""
import gzip
import json
import os
import shutil
import tempfile

import pytest

from stages import verifiers as v
from stages.common import REPO

EVAL = REPO / "data" / "eval"


# ----------------------------------------------------------------------------- math

@pytest.mark.parametrize("text, answer, how", [
    (r"so the total is \boxed{42}.", "42", "boxed"),
    (r"\boxed{\frac{1}{2}} and later \boxed{3}", "3", "boxed"),
    (r"nested \boxed{\frac{a^{2}}{b}} end", r"\frac{a^{2}}{b}", "boxed"),
    (r"\fbox{7}", "7", "boxed"),
    ("He has 20 - 4 = 16 left.\n#### 16", "16", "gsm8k"),
    ("The answer is 12 apples.", "12 apples", "answer_is"),
    ("Final answer: x = 5", "x = 5", "answer_is"),
    ("<think>maybe \\boxed{1}</think>The answer is 2.", "2", "answer_is"),
    ("I counted 3, then 4, then 5 cats", "5", "last_number"),
    ("no digits here", None, "none"),
])
def test_extract_final_answer(text, answer, how):
    assert v.extract_final_answer(text) == (answer, how)


@pytest.mark.parametrize("completion, gold, score", [
    ("#### 1,000", "1000", 1.0),                                  # thousands separator
    ("The answer is 12.0", "12", 1.0),                            # trailing .0
    ("The answer is 12.50", "12.5", 1.0),
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),                        # LaTeX fraction == decimal
    (r"\boxed{3/4}", r"\dfrac34", 1.0),                           # brace-less \frac
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),                           # units
    ("The answer is 7 dollars.", "7", 1.0),
    (r"\boxed{\$18}", "18", 1.0),                                 # currency
    (r"\boxed{50\%}", "50", 1.0),                                 # percent sign
    (r"\boxed{90^\circ}", "90", 1.0),                             # degrees
    (r"\boxed{x = 2}", "2", 1.0),                                 # variable prefix
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),                            # tuples
    (r"\boxed{(1, 3)}", "(1,2)", 0.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),                     # sympy: radicals
    (r"\boxed{2x+2}", "2(x+1)", 1.0),                             # sympy: expansion
    (r"\boxed{\frac{\pi}{2}}", r"\dfrac{\pi}{2}", 1.0),
    (r"\boxed{2x}", "2", 0.0),                                    # a variable is not a unit
    ("The answer is 0.333", r"\frac{1}{3}", 0.0),                 # exact rationals, no tolerance
    ("The answer is 17", "16", 0.0),
    ("no answer at all", "3", 0.0),
    ("work...\n#### 16", "Aisha keeps 20 - 4 = 16.\n#### 16", 1.0),   # a full gold solution is extracted too
])
def test_verify_math_edge_cases(completion, gold, score):
    result = v.verify_math(completion, gold, sympy_timeout_s=10)
    assert result.score == score, result.reason
    assert result.cost >= 0 and result.reason


def test_math_sympy_timeout_counts_as_not_equal():
    # 9**9**9**9 hangs in C big-int arithmetic, out of a signal's reach: the worker is killed and restarted.
    result = v.verify_math(r"\boxed{9**9**9**9}", "1", sympy_timeout_s=1)
    assert result.score == 0.0 and "timed out" in result.reason
    assert v.verify_math(r"\boxed{2x+2}", "2(x+1)", sympy_timeout_s=10).score == 1.0


def test_math_never_hands_code_to_sympy():
    assert not v._sympy_ready("__import__('os')")
    assert not v._sympy_ready("exec(chr(111))")
    assert v.verify_math(r"\boxed{exec(chr(111))}", "1").score == 0.0


@pytest.mark.parametrize("text, n, letter", [
    ("Reasoning...\nAnswer: C", 4, "C"),
    ("Answer: (b)", 4, None),
    ("**Answer:** B", 4, "B"),
    (r"so \boxed{D}", 4, "D"),
    ("The answer is (A).", 4, "A"),
    ("B", 4, "B"),
    ("Answer: E", 4, None),            # not one of four choices
    ("I am not sure", 4, None),
])
def test_extract_choice(text, n, letter):
    assert v.extract_choice(text, n) == letter


def test_verify_choice():
    assert v.verify_choice("Answer: B", "B", 4).score == 1.0
    assert v.verify_choice("Answer: A", "B", 4).score == 0.0


# ----------------------------------------------------------------------------- sandbox

FAST = v.SandboxLimits(timeout_s=1.5, memory_mb=512)


def run(*programs, limits=FAST):
    return v.run_programs_sandboxed(list(programs), limits, workers=2)


def test_sandbox_layers_always_include_limits_and_audit_hook():
    python, layers = v.sandbox_setup()
    assert {"rlimits", "audit_hook"} <= set(layers) and os.path.isfile(python)


def test_sandbox_kills_infinite_loop_and_sleeper():
    loop, sleeper = run("while True:\n    pass\n", "import time\ntime.sleep(60)\n")
    assert loop.status == "timeout" and sleeper.status == "timeout"
    assert loop.seconds < 5 and sleeper.seconds < 5


def test_sandbox_stops_memory_bomb():
    bomb, = run("x = bytearray(8 << 30)\n")
    assert bomb.status == "failed" and bomb.reason == "MemoryError"


def test_sandbox_blocks_writes_outside_its_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    write, remove, inside = run(f"open({str(target)!r}, 'w').write('x')\n", f"import os\nos.remove({str(victim)!r})\n",
                                "open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n")
    assert write.status == "failed" and write.reason.startswith("PermissionError"), write
    assert remove.status == "failed" and remove.reason.startswith("PermissionError"), remove
    assert inside.status == "passed", inside
    assert not target.exists() and victim.read_text() == "keep me"


def test_sandbox_blocks_network_processes_and_caps_output():
    connect, spawn, fork, flood = run(
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.fork()\n",
        "import sys\nsys.stdout.write('x' * (64 << 20))\n")
    for result in (connect, spawn, fork):
        assert result.status == "failed" and result.reason.startswith("PermissionError"), result
    assert flood.status == "failed" and "File too large" in flood.reason


def test_sandbox_kernel_layers_where_available():
    _, layers = v.sandbox_setup()
    netns, uid = run("import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n",
                     f"import os\nassert os.getuid() == {v.NOBODY}\n")
    assert (netns.status == "passed") == ("netns" in layers), netns
    assert (uid.status == "passed") == ("uid_nobody" in layers), uid


def test_sandbox_reports_error_class_and_leaves_no_temp_dirs(monkeypatch):
    v.sandbox_setup()
    base = tempfile.mkdtemp(prefix="sandbox-test-")
    os.chmod(base, 0o711)  # reachable by the sandbox's uid, as the system temp dir is
    monkeypatch.setattr(v.tempfile, "tempdir", base)
    try:
        assertion, name, ok = run("assert 1 == 2, 'nope'\n", "undefined_name\n", "print('hi')\n")
        assert (assertion.reason, name.reason, ok.status) == (
            "AssertionError: nope", "NameError: name 'undefined_name' is not defined", "passed")
        assert os.listdir(base) == []
    finally:
        shutil.rmtree(base)


# ----------------------------------------------------------------------------- HumanEval

@pytest.fixture(scope="module")
def humaneval():
    with gzip.open(EVAL / "humaneval" / "HumanEval.jsonl.gz", "rt") as fh:
        return [json.loads(line) for line in fh][:6]


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    programs = [v.humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
                for p in humaneval]
    wrong = humaneval[1]
    programs.append(v.humaneval_program(wrong["prompt"], "    return []\n", wrong["test"], wrong["entry_point"]))
    results = v.verify_code_batch(programs, v.SandboxLimits(timeout_s=10), workers=2)
    assert [r.score for r in results] == [1.0] * len(humaneval) + [0.0]
    assert results[-1].reason.startswith("AssertionError")


# ----------------------------------------------------------------------------- BFCL

def _bfcl(category, n):
    questions = [json.loads(x) for x in (EVAL / "bfcl" / f"BFCL_v4_{category}.json").read_text().splitlines()[:n]]
    answers = [json.loads(x) for x in
               (EVAL / "bfcl" / "possible_answer" / f"BFCL_v4_{category}.json").read_text().splitlines()[:n]]
    return [(q["function"], a["ground_truth"]) for q, a in zip(questions, answers)]


@pytest.mark.parametrize("category", ["simple_python", "multiple", "parallel", "parallel_multiple"])
def test_bfcl_possible_answers_match_their_ground_truth(category):
    for functions, truth in _bfcl(category, 5):
        as_python = v.calls_source(truth)
        assert v.verify_tool_calls(as_python, functions, truth).score == 1.0, as_python
        as_json = json.dumps([{"name": v.call_source(a).split("(")[0],
                               "arguments": {k: v._example_value(vals) for k, vals in next(iter(a.values())).items()
                                             if any(x != "" for x in vals)}} for a in truth])
        assert v.verify_tool_calls(as_json, functions, truth).score == 1.0, as_json


TRIANGLE = [{"name": "calculate_triangle_area", "parameters": {"type": "dict", "required": ["base", "height"],
            "properties": {"base": {"type": "integer"}, "height": {"type": "integer"}, "unit": {"type": "string"},
                           "scale": {"type": "float"}, "tags": {"type": "array", "items": {"type": "string"}}}}}]
TRIANGLE_TRUTH = [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""],
                                               "scale": [2.0, ""], "tags": [["Big Shape", "red"], ""]}}]


@pytest.mark.parametrize("reply, score", [
    ("calculate_triangle_area(base=10, height=5)", 1.0),                     # optional params absent
    ("[calculate_triangle_area(base=10, height=5, unit='units')]", 1.0),
    ("calculate_triangle_area(base=10, height=5, unit='UNITS')", 1.0),       # BFCL's case-insensitive strings
    ("calculate_triangle_area(base=10, height=5, scale=2)", 1.0),            # int -> float promotion
    ("calculate_triangle_area(base=10, height=5, tags=['big shape', 'Red'])", 1.0),
    ('{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}', 1.0),
    ('<tool_call>{"name": "calculate_triangle_area",\n"arguments": "{\\"base\\": 10, \\"height\\": 5}"}</tool_call>',
     1.0),                                                                   # arguments as a JSON string
    ("```python\ncalculate_triangle_area(base=10, height=5)\n```", 1.0),
    ("calculate_triangle_area(base=12, height=5)", 0.0),                     # wrong value
    ("calculate_triangle_area(base=10.0, height=5)", 0.0),                   # float where an int is declared
    ("calculate_triangle_area(base=10)", 0.0),                               # missing required
    ("calculate_triangle_area(base=10, height=5, colour='red')", 0.0),       # unexpected parameter
    ("calculate_area(base=10, height=5)", 0.0),                              # wrong function
    ("calculate_triangle_area(10, 5)", 0.0),                                 # positional arguments
    ("[calculate_triangle_area(base=10, height=5), calculate_triangle_area(base=10, height=5)]", 0.0),
    ("The area is 25.", 0.0),
])
def test_bfcl_ast_match_table(reply, score):
    result = v.verify_tool_calls(reply, TRIANGLE, TRIANGLE_TRUTH)
    assert result.score == score, result.reason


def test_bfcl_parallel_calls_match_in_any_order():
    truth = [{"calculate_triangle_area": {"base": [10], "height": [5]}},
             {"calculate_triangle_area": {"base": [3], "height": [4]}}]
    swapped = "[calculate_triangle_area(base=3, height=4), calculate_triangle_area(base=10, height=5)]"
    assert v.verify_tool_calls(swapped, TRIANGLE, truth).score == 1.0
    twice = "[calculate_triangle_area(base=3, height=4), calculate_triangle_area(base=3, height=4)]"
    assert v.verify_tool_calls(twice, TRIANGLE, truth).score == 0.0


def test_bfcl_dict_parameters():
    functions = [{"name": "f", "parameters": {"type": "dict", "required": ["d"],
                                              "properties": {"d": {"type": "dict"}}}}]
    truth = [{"f": {"d": [{"city": ["New York, NY", "NYC"], "days": [3, ""]}]}}]
    assert v.verify_tool_calls("f(d={'city': 'new york ny'})", functions, truth).score == 1.0
    assert v.verify_tool_calls("f(d={'city': 'NYC', 'days': 3})", functions, truth).score == 1.0
    assert v.verify_tool_calls("f(d={'city': 'Boston'})", functions, truth).score == 0.0
    assert v.verify_tool_calls("f(d={'days': 3})", functions, truth).score == 0.0


def test_tool_call_arguments_are_never_evaluated():
    assert v.parse_function_calls("f(x=2*3, y=-1, z=[1, (2, 3)], w=g(1))") == [
        v.FunctionCall("f", {"x": 6, "y": -1, "z": [1, (2, 3)], "w": "g(1)"})]
    with pytest.raises(v.ToolCallParseError):
        v.parse_function_calls("f(x=__import__('os').system('true') ** 2)")
