"""Task ladder: determinism, disjoint splits, answers recomputed independently, code tasks through the sandbox,
the Wilson interval on published values, and bad params rejected."""
import ast
import copy
import json
import re
from fractions import Fraction

import pyarrow.parquet as pq
import pytest

from stages import common, tasks
from stages.verifiers import SandboxLimits, humaneval_program, verify_code_batch

SMALL = {"seed": 7, "scale": "tiny",
         "math": {"levels": [1, 2, 3, 4, 5], "train_per_level": 40, "heldout_per_level": 10,
                  "max_heldout_fraction": 0.4},
         "code": {"levels": [1, 2, 3], "train_per_level": 8, "heldout_per_level": 4, "max_heldout_fraction": 0.4,
                  "public_tests": 2, "hidden_tests": 6}}


@pytest.fixture(scope="module")
def full():
    """The ladder params.yaml asks for (the tiny scale)."""
    return tasks.build_tasks(common.stage_params(common.load_params(), "tasks"))


@pytest.fixture(scope="module")
def small():
    return tasks.build_tasks(copy.deepcopy(SMALL))


# ----------------------------------------------------------------------------- determinism and files

def test_same_seed_byte_identical_files_and_another_seed_differs(tmp_path):
    a = tasks.write_tasks(tmp_path / "a", copy.deepcopy(SMALL))
    tasks.write_tasks(tmp_path / "b", copy.deepcopy(SMALL))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["code_heldout.parquet", "code_train.parquet", "manifest.json", "math_heldout.parquet",
                     "math_train.parquet"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = tasks.write_tasks(tmp_path / "c", {**copy.deepcopy(SMALL), "seed": 8})
    assert other["outputs"]["math_heldout.parquet"]["sha256"] != a["outputs"]["math_heldout.parquet"]["sha256"]
    rows = pq.read_table(tmp_path / "a" / "math_train.parquet").to_pylist()
    assert a["counts"]["math_train"]["rows"] == len(rows) == 5 * 40 and a["seed"] == 7
    assert set(rows[0]) == set(tasks.MATH_SCHEMA.names)


def test_cli_writes_the_ladder_and_rejects_bad_params(tmp_path, capsys):
    tasks.main(["--params-json", json.dumps({"tasks": SMALL}), "--output-dir", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out)["math_heldout"] == 50
    assert (tmp_path / "out" / "manifest.json").is_file()
    bad = {"tasks": {**SMALL, "math": {**SMALL["math"], "levels": [9]}}}
    with pytest.raises(SystemExit) as exc:
        tasks.main(["--params-json", json.dumps(bad), "--output-dir", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "levels" in capsys.readouterr().err


# ----------------------------------------------------------------------------- splits

def _signature(row):
    return row["template_id"], tuple(row["operands"]) if row["domain"] == "math" else row["constants"]


@pytest.mark.parametrize("domain", ["math", "code"])
def test_heldout_shares_no_signature_and_no_question_text_with_train(full, domain):
    train, heldout = full[f"{domain}_train"], full[f"{domain}_heldout"]
    assert {_signature(r) for r in train}.isdisjoint({_signature(r) for r in heldout})
    norm = tasks.normalize_question
    assert {norm(r["prompt"]) for r in train}.isdisjoint({norm(r["prompt"]) for r in heldout})
    ids = [r["id"] for r in train + heldout]
    assert len(ids) == len(set(ids))
    assert len({_signature(r) for r in train + heldout}) == len(ids)
    for split_rows in (train, heldout):  # every template of every level is in both splits
        assert {r["template_id"] for r in split_rows} == {t.template_id for t in
                                                          (tasks.MATH_TEMPLATES if domain == "math" else tasks.CODE_TEMPLATES)}


def test_sizes_follow_params_and_capacity(full):
    """Held-out: min(asked, sum_t floor(f |D_t|)); train: min(asked, what the level has left); per template <= f |D_t|."""
    cfg = common.stage_params(common.load_params(), "tasks")
    assert sum(len(t.domain()) for t in tasks.MATH_TEMPLATES if t.level == 1) == 155
    for domain, templates in (("math", tasks.MATH_TEMPLATES), ("code", tasks.CODE_TEMPLATES)):
        c = cfg[domain]
        for level in c["levels"]:
            sizes = [len(t.domain()) for t in templates if t.level == level]
            want_held = min(c["heldout_per_level"], sum(int(c["max_heldout_fraction"] * n) for n in sizes))
            got = {split: sum(r["level"] == level for r in full[f"{domain}_{split}"]) for split in tasks.SPLITS}
            assert got == {"heldout": want_held, "train": min(c["train_per_level"], sum(sizes) - want_held)}
        for t in templates:
            held = sum(r["template_id"] == t.template_id for r in full[f"{domain}_heldout"])
            assert held <= c["max_heldout_fraction"] * len(t.domain())


@pytest.mark.parametrize("total, caps, want", [
    (10, [2, 100, 100], [2, 4, 4]),
    (9, [100, 100], [5, 4]),
    (50, [3, 4], [3, 4]),
    (0, [5, 5], [0, 0]),
    (7, [1, 1, 10, 2], [1, 1, 3, 2]),
])
def test_balanced_quota(total, caps, want):
    got = tasks.balanced_quota(total, caps)
    assert got == want and sum(got) == min(total, sum(caps)) and all(g <= c for g, c in zip(got, caps))


# ----------------------------------------------------------------------------- math answers

def _value(expr: str) -> Fraction:
    """Exact value of + - × ÷ over integers, written here apart from the generator."""
    def go(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            a, b = go(node.left), go(node.right)
            return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                    ast.Div: lambda: a / b}[type(node.op)]()
        raise ValueError(expr)
    return go(ast.parse(expr.strip().replace("×", "*").replace("÷", "/"), mode="eval").body)


WORD_PROBLEMS = {"wp_more": lambda a, b: a + b, "wp_left": lambda a, b: a - b, "wp_groups": lambda a, b: a * b,
                 "wp_share": lambda a, b: b, "wp_change": lambda a, b, e: e}


def test_every_math_answer_recomputed_and_every_solution_consistent(full):
    rows = full["math_train"] + full["math_heldout"]
    for r in rows:
        if r["level"] <= 4:
            expr = re.fullmatch(r"What is ([\d +\-×÷]+)\?", r["prompt"]).group(1)
            want = _value(expr)
        else:
            want = WORD_PROBLEMS[r["template_id"]](*r["operands"])
        assert r["answer"] == str(want) and want >= 0, r
        *steps, last = r["solution"].split("\n")
        assert last == f"#### {r['answer']}", r
        final = None
        for step in steps:
            chain = re.search(r"[\d(][\d ×÷+\-()]*(?:= *[\d(][\d ×÷+\-()]*)+", step).group(0)
            values = [_value(part) for part in chain.split("=")]
            assert len(set(values)) == 1, (r["id"], step)
            final = values[-1]
        assert final == want, r


PROMPT_NUMBERS = {"wp_more": lambda a, b: [a, b], "wp_left": lambda a, b: [a, b], "wp_groups": lambda a, b: [a, b],
                  "wp_share": lambda a, b: [a * b, a], "wp_change": lambda a, b, e: [a * b + e, a, b]}


def test_word_problems_state_exactly_their_operands(full):
    for r in full["math_train"] + full["math_heldout"]:
        if r["level"] == 5:
            stated = [int(x) for x in re.findall(r"\d+", r["prompt"])]
            assert stated == PROMPT_NUMBERS[r["template_id"]](*r["operands"]), r


# ----------------------------------------------------------------------------- code tasks

LIMITS = SandboxLimits(timeout_s=10.0)


def _program(row, body):
    return humaneval_program(row["prompt"], body, row["test"], row["entry_point"])


def test_code_tests_hold_on_the_reference_in_process(full):
    for row in full["code_train"] + full["code_heldout"]:
        namespace = {}
        exec(row["prompt"] + row["canonical_solution"], namespace)  # noqa: S102 (our generated reference)
        for line in row["public_tests"] + row["hidden_tests"]:
            exec(line, namespace)  # noqa: S102
        assert len(row["public_tests"]) == 2 and len(row["hidden_tests"]) == 8
        assert all(t in row["statement"] for t in row["public_tests"])
        assert not any(t in row["statement"] or t in row["prompt"] for t in row["hidden_tests"])
        assert row["test"].count("assert candidate(") == 10


def test_code_references_pass_and_wrong_solutions_fail_in_the_sandbox(small):
    rows = small["code_train"] + small["code_heldout"]
    assert {r["template_id"] for r in rows} == {t.template_id for t in tasks.CODE_TEMPLATES}
    templates = {t.template_id: t for t in tasks.CODE_TEMPLATES}
    programs, expect = [], []
    for row in rows:
        programs.append(_program(row, row["canonical_solution"]))
        expect.append(1.0)
        constants = json.loads(row["constants"])
        key, value = sorted(constants.items())[0]
        mutated = {**constants, key: value + 1 if isinstance(value, int) else value[:-1]}
        programs.append(_program(row, templates[row["template_id"]].body(mutated)))
        expect.append(0.0)
    programs.append(_program(rows[0], "    return None\n"))
    expect.append(0.0)
    results = verify_code_batch(programs, LIMITS, workers=2)
    assert [r.score for r in results] == expect, [(r.score, r.reason) for r in results]
    assert "AssertionError" in results[1].reason


# ----------------------------------------------------------------------------- evaluation helpers

@pytest.mark.parametrize("correct, n, low, high", [   # Newcombe (1998), Stat. Med. 17:857, Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(correct, n, low, high):
    got = tasks.wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_half_width_at_the_chosen_heldout_size():
    low, high = tasks.wilson_interval(100, 200)
    assert (high - low) / 2 == pytest.approx(0.0686, abs=5e-4)


@pytest.mark.parametrize("correct, n", [(3, 2), (-1, 5), (0, 0), (1.0, 4)])
def test_wilson_interval_rejects_bad_counts(correct, n):
    with pytest.raises(common.StageError, match="wilson_interval"):
        tasks.wilson_interval(correct, n)


def test_accuracy_by_level():
    records = ([{"id": f"a{i}", "level": 1, "correct": i < 8} for i in range(10)]
               + [{"id": f"b{i}", "level": 3, "correct": False} for i in range(20)])
    out = tasks.accuracy_by_level(records)
    assert list(out) == [1, 3]
    assert out[1]["n"] == 10 and out[1]["correct"] == 8 and out[1]["acc"] == 0.8
    assert (out[1]["ci95_low"], out[1]["ci95_high"]) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    assert out[3]["acc"] == 0.0 and out[3]["ci95_high"] == pytest.approx(0.1611, abs=5e-5)
    with pytest.raises(common.StageError, match="twice"):
        tasks.accuracy_by_level(records + records[:1])
    with pytest.raises(common.StageError, match="bool"):
        tasks.accuracy_by_level([{"id": "x", "level": 1, "correct": 1}])
    with pytest.raises(common.StageError, match="must have"):
        tasks.accuracy_by_level([{"level": 1, "correct": True}])


def test_format_prompt(small):
    m, c = small["math_heldout"][0], small["code_heldout"][0]
    assert tasks.format_prompt(m, "plain") == f"Problem: {m['prompt']}\n\nSolution:\n"
    chat = tasks.format_prompt(m, "chat")
    assert chat[0]["role"] == "user" and chat[0]["content"].startswith(m["prompt"]) and "####" in chat[0]["content"]
    assert tasks.format_prompt(c, "plain") == c["prompt"]
    assert tasks.format_prompt(c, "chat")[0]["content"].startswith(c["statement"])
    with pytest.raises(common.StageError, match="prompt_format"):
        tasks.format_prompt(m, "chatml")


# ----------------------------------------------------------------------------- params

def _with(path, value):
    p = copy.deepcopy(SMALL)
    *parents, last = path
    target = p
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return p


@pytest.mark.parametrize("path, value, message", [
    (("math", "levels"), [1, 6], "levels"),
    (("math", "levels"), [], "levels"),
    (("code", "levels"), [1, 1], "levels"),
    (("math", "train_per_level"), -1, "train_per_level must be an int >= 0"),
    (("math", "heldout_per_level"), 0, "heldout_per_level must be an int >= 1"),
    (("math", "heldout_per_level"), 2.5, "heldout_per_level"),
    (("code", "train_per_level"), True, "train_per_level"),
    (("math", "max_heldout_fraction"), 1.0, "max_heldout_fraction"),
    (("math", "max_heldout_fraction"), "0.4", "max_heldout_fraction"),
    (("code", "hidden_tests"), 19, "<= 20"),
    (("code", "public_tests"), 0, "public_tests"),
    (("math", "train"), 5, "unknown"),
    (("code", "hidden_tests"), KeyError, "missing"),
    (("seed",), "x", "seed"),
    (("extra",), 1, "unknown keys"),
    (("math",), [1, 2], "math must be a mapping"),
])
def test_bad_params_rejected_with_a_clear_error(path, value, message):
    with pytest.raises(common.StageError, match=re.escape(message)):
        tasks.build_tasks(_with(path, value))


@pytest.mark.parametrize("completion, cut", [
    ("3 + 4 = 7.\n#### 7\n\nProblem: What is 1 + 1?\n\nSolution:\n1 + 1 = 2.\n#### 2", "3 + 4 = 7.\n#### 7"),
    ("#### 12", "#### 12"),
    ("no answer line", "no answer line"),
])
def test_cut_at_first_answer(completion, cut):
    assert tasks.cut_at_first_answer(completion) == cut
