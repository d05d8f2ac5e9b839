"""Verifiers: the package's public interface, multiple choice, HumanEval's protocol in the sandbox, BFCL's AST
match with the official checker's type rules. Math: tests/test_math_verify.py; the sandbox: tests/test_sandbox.py."""
import gzip
import json

import pytest

import stages.verifiers as v
from stages.common import REPO
from stages.verifiers import tool_calls as tc

EVAL = REPO / "data" / "eval"


def test_evaluate_imports_still_resolve():
    from stages.verifiers import (SandboxLimits, VerifierResult, humaneval_program, strip_reasoning,  # noqa: F401
                                  verify_choice, verify_code_batch, verify_math, verify_tool_calls)
    assert VerifierResult(1.0, "ok", 0.0).score == 1.0


def test_every_kind_returns_the_one_result_type():
    results = [v.verify_math("#### 3", "3"), v.verify_choice("Answer: A", "A", 4),
               v.verify_tool_calls("f()", [{"name": "f", "parameters": {"properties": {}}}], [{"f": {}}]),
               v.verify_code("assert True\n")]
    assert all(type(r) is v.VerifierResult and r.score == 1.0 and r.cost >= 0 for r in results), results


# ----------------------------------------------------------------------------- multiple choice

@pytest.mark.parametrize("text, n, letter", [
    ("Reasoning...\nAnswer: C", 4, "C"),
    ("Answer: (b)", 4, None),
    ("**Answer:** B", 4, "B"),
    (r"so \boxed{D}", 4, "D"),
    ("The answer is (A).", 4, "A"),
    ("B", 4, "B"),
    ("Answer: E", 4, None),            # not one of four choices
    ("I am not sure", 4, None),
    ("Answer: A\nAnswer: B\nAnswer: C\nAnswer: D", 4, "A"),   # the first, so listing every letter never pays
])
def test_extract_choice(text, n, letter):
    assert v.extract_choice(text, n) == letter


def test_verify_choice():
    assert v.verify_choice("Answer: B", "B", 4).score == 1.0
    assert v.verify_choice("Answer: A", "B", 4).score == 0.0


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
        as_python = tc.calls_source(truth)
        assert v.verify_tool_calls(as_python, functions, truth).score == 1.0, as_python
        as_json = json.dumps([{"name": tc.call_source(a).split("(")[0],
                               "arguments": {k: tc._example_value(vals) for k, vals in next(iter(a.values())).items()
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
    ("calculate_triangle_area(10, 5)", 0.0),                                 # positional: dropped, so missing
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


F = [{"name": "f", "parameters": {"type": "dict", "required": ["ints"], "properties": {
    "ints": {"type": "array", "items": {"type": "integer"}}, "floats": {"type": "array", "items": {"type": "float"}},
    "opt_ints": {"type": "array", "items": {"type": "integer"}}, "pair": {"type": "tuple", "items": {"type": "integer"}},
    "n": {"type": "integer"}, "x": {"type": "float"}, "flag": {"type": "boolean"}, "name": {"type": "string"}}}}]
F_TRUTH = [{"f": {"ints": [[1, 2]], "floats": [[1.0, 2.5], ""], "opt_ints": ["", [1, 2]], "pair": [[3, 4], ""],
                  "n": [5, ""], "x": [2.0, ""], "flag": [True, ""], "name": ["Ann", ""]}}]


@pytest.mark.parametrize("reply, score", [
    ("f(ints=[1, 2])", 1.0),
    ("f(ints=[1.0, 2])", 0.0),                    # a float is not an integer
    ("f(ints=[True, 2])", 0.0),                   # nor is a bool
    ('{"name": "f", "arguments": {"ints": [1.0, 2]}}', 0.0),
    ("f(ints=(1, 2))", 0.0),                      # a tuple for an "array" is a type error
    ("f(ints=[1, 2], pair=(3, 4))", 1.0),         # a tuple for a "tuple" is compared as a list
    ("f(ints=[1, 2], pair=[3, 4])", 1.0),
    ("f(ints=[1, 2], floats=[1, 2.5])", 1.0),     # official quirk: the optional marker "" skips the item check
    ("f(ints=[1, 2], floats=[1.0, 2.5])", 1.0),
    ("f(ints=[1, 2], opt_ints=[1.0, 2])", 1.0),   # official quirk: the optional marker "" skips the item check
    ("f(ints=[1, 2], n=True)", 0.0),
    ("f(ints=[1, 2], n=5.0)", 0.0),
    ("f(ints=[1, 2], x=2)", 1.0),                 # int -> float promotion
    ("f(ints=[1, 2], x=True)", 0.0),
    ("f(ints=[1, 2], flag=1)", 0.0),
    ("f(ints=[1, 2], name=ann)", 1.0),            # a bare name reads as its string, as BFCL's parser reads it
    ("f([1, 2])", 0.0),                           # positional arguments are dropped: `ints` is missing
    ("f('Ann', ints=[1, 2])", 1.0),               # ... and an extra positional one is ignored
])
def test_bfcl_official_type_rules(reply, score):
    result = v.verify_tool_calls(reply, F, F_TRUTH)
    assert result.score == score, result.reason


@pytest.mark.parametrize("floats, score", [("[1.0, 2.5]", 1.0), ("[1, 2.5]", 0.0), ("[True, 2.5]", 0.0)])
def test_bfcl_item_types_are_exact_when_the_parameter_is_required(floats, score):
    functions = [{"name": "g", "parameters": {"type": "dict", "required": ["floats"], "properties": {
        "floats": {"type": "array", "items": {"type": "float"}}}}}]
    result = v.verify_tool_calls(f"g(floats={floats})", functions, [{"g": {"floats": [[1.0, 2.5]]}}])
    assert result.score == score, result.reason   # no int -> float promotion inside an array


def test_nested_calls_with_keywords_parse_as_bfcl_does():
    assert v.parse_function_calls("f(x=g(a=1), y=h(2))") == [v.FunctionCall("f", {"x": {"g": {"a": 1}}, "y": "h(2)"})]
