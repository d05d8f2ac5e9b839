"""Graded task ladder: math levels L1-L5 and code levels L1-L3 with exact answers, disjoint train / held-out.

A template is a problem family with a finite operand domain (math: the numbers; code: the constants of the
reference solution). A problem's signature is (template_id, operands). Per template the domain is shuffled with a
seed derived from (seed, template_id); the first h_t signatures go to held-out, the next n_t to train, so no
signature is in both splits, and no normalized question text either (checked; a repeat is a generator bug).
Phrasing never varies inside a template, so the same arithmetic cannot cross splits under another wording.

Quotas: a level asks for H held-out and N train problems. Held-out capacity of template t is
floor(max_heldout_fraction * |D_t|) (every template keeps the rest for train); train capacity is |D_t| - h_t.
`balanced_quota` splits H (then N) over the level's templates as evenly as capacities allow (water-filling).
A level with fewer distinct problems than asked gives what it has (math L1 has 155, L3 288); the manifest says so.

Math levels: L1 single-digit sums and differences; L2 two-digit sums and differences; L3 times tables and their
divisions (1..12); L4 two-step a + b - c, a x b + c, a x b - c; L5 short word problems (one or two steps, worded
unlike the corpus's templates). Worked solutions use the corpus's format: one equation per line, `#### <answer>`.

Code tasks are built backwards (RECIPE.md): reference solution (template + constants) -> tests (the reference run on
seeded inputs; the first `public_tests` are shown, the rest hidden) -> statement. The tests must expect at least two
distinct outputs (a constant function fails) and reject every one-constant mutant of the reference (ints + 1,
strings minus their last character); inputs are redrawn until they do.

Evaluation: `accuracy_by_level` with the Wilson score interval (`wilson_interval`), `format_prompt` (plain | chat).
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from stages import common

STAGE = "tasks"
SPLITS = ("train", "heldout")
PROMPT_FORMATS = ("plain", "chat")
Z95 = 1.959963984540054  # standard normal quantile at 0.975
MATH_PLAIN_TEMPLATE = "Problem: {prompt}\n\nSolution:\n"  # the corpus's worked-problem format (data/README.md)
MATH_CHAT_INSTRUCTION = "Solve it step by step and write the final answer on the last line after ####."
CODE_CHAT_INSTRUCTION = "Reply with the whole function in one ```python code block."
MAX_TESTS = 20  # public + hidden tests per code task; every template's input space holds more
MUTANT_ATTEMPTS = 50  # input redraws before a code task whose tests cannot reject its mutants is a StageError


# ============================================================================ quotas and splits

def balanced_quota(total: int, capacities: list[int]) -> list[int]:
    """Counts q_t with sum q_t = min(total, sum c_t) and q_t <= c_t, as equal as possible (water-filling): templates
    with capacity below the equal share take all of it, the others share the rest; spare units go to the earlier."""
    quota = [0] * len(capacities)
    remaining = min(total, sum(capacities))
    open_ = sorted(range(len(capacities)), key=lambda i: (capacities[i], i))
    while open_ and remaining > 0:
        share = remaining // len(open_)
        if capacities[open_[0]] <= share:
            i = open_.pop(0)
            quota[i] = capacities[i]
            remaining -= capacities[i]
            continue
        extra = remaining - share * len(open_)
        for rank, i in enumerate(sorted(open_)):
            quota[i] = share + (rank < extra)
        remaining = 0
    return quota


def normalize_question(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the key under which two questions count as the same text."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _template_rng(seed: int, *key) -> random.Random:
    """A Random seeded by a string (hashed with sha512 by `random`, so stable across runs and platforms)."""
    return random.Random("/".join(map(str, (seed, STAGE, *key))))


def split_level(templates: list, seed: int, n_train: int, n_heldout: int,
                max_heldout_fraction: float) -> dict[str, list[tuple]]:
    """{split: [(template, operands), ...]} for one level: each template's shuffled domain, held-out first."""
    domains = []
    for t in templates:
        domain = list(t.domain())
        _template_rng(seed, t.template_id, "order").shuffle(domain)
        domains.append(domain)
    h = balanced_quota(n_heldout, [math.floor(max_heldout_fraction * len(d)) for d in domains])
    n = balanced_quota(n_train, [len(d) - h_t for d, h_t in zip(domains, h)])
    return {"heldout": [(t, ops) for t, d, h_t in zip(templates, domains, h) for ops in d[:h_t]],
            "train": [(t, ops) for t, d, h_t, n_t in zip(templates, domains, h, n) for ops in d[h_t:h_t + n_t]]}


# ============================================================================ math

NAMES = ("Maya", "Liam", "Ava", "Noah", "Sofia", "Ethan", "Zara", "Omar", "Priya", "Lucas", "Mei", "Diego")
ITEMS = ("apples", "stickers", "marbles", "pencils", "cookies", "shells", "cards", "stamps")


@dataclass(frozen=True)
class MathTemplate:
    """render(operands, rng) -> (question, steps, answer); rng picks only names and items (not in the signature)."""
    template_id: str
    level: int
    domain: Callable[[], list[tuple[int, ...]]]
    render: Callable[[tuple[int, ...], random.Random], tuple[str, list[str], int]]


def _pairs(lo: int, hi: int, b_max_is_a: bool = False) -> list[tuple[int, int]]:
    """(a, b) with lo <= a, b <= hi (and b <= a when b_max_is_a: differences stay >= 0)."""
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, (a if b_max_is_a else hi) + 1)]


def _add(ops, r):
    a, b = ops
    return f"What is {a} + {b}?", [f"{a} + {b} = {a + b}."], a + b


def _sub(ops, r):
    a, b = ops
    return f"What is {a} - {b}?", [f"{a} - {b} = {a - b}."], a - b


def _mul(ops, r):
    a, b = ops
    return f"What is {a} × {b}?", [f"{a} × {b} = {a * b}."], a * b


def _div(ops, r):
    a, b = ops
    return f"What is {a * b} ÷ {a}?", [f"{a * b} ÷ {a} = {b}."], b


def _add_sub(ops, r):
    a, b, c = ops
    return f"What is {a} + {b} - {c}?", [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c


def _mul_add(ops, r):
    a, b, c = ops
    return f"What is {a} × {b} + {c}?", [f"{a} × {b} = {a * b}.", f"{a * b} + {c} = {a * b + c}."], a * b + c


def _mul_sub(ops, r):
    a, b, c = ops
    return f"What is {a} × {b} - {c}?", [f"{a} × {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c


def _wp_more(ops, r):
    (a, b), name, item = ops, r.choice(NAMES), r.choice(ITEMS)
    return (f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
            [f"{name} has {a} + {b} = {a + b} {item}."], a + b)


def _wp_left(ops, r):
    (a, b), name, item = ops, r.choice(NAMES), r.choice(ITEMS)
    return (f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
            [f"{name} has {a} - {b} = {a - b} {item} left."], a - b)


def _wp_groups(ops, r):
    (a, b), item = ops, r.choice(ITEMS)
    return (f"There are {a} bags with {b} {item} in each bag. How many {item} are there in all?",
            [f"There are {a} × {b} = {a * b} {item}."], a * b)


def _wp_share(ops, r):
    (a, b), name, item = ops, r.choice(NAMES), r.choice(ITEMS)
    return (f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?",
            [f"Each friend gets {a * b} ÷ {a} = {b} {item}."], b)


def _wp_change(ops, r):
    (a, b, extra), name, item = ops, r.choice(NAMES), r.choice(ITEMS)
    money = a * b + extra
    return (f"{name} has ${money} and buys {a} packs of {item} at ${b} each. How many dollars does {name} have left?",
            [f"The packs cost {a} × {b} = {a * b} dollars.", f"{name} has {money} - {a * b} = {extra} dollars left."],
            extra)


MATH_TEMPLATES = (
    MathTemplate("add_1d", 1, lambda: _pairs(0, 9), _add),
    MathTemplate("sub_1d", 1, lambda: _pairs(0, 9, b_max_is_a=True), _sub),
    MathTemplate("add_2d", 2, lambda: _pairs(10, 99), _add),
    MathTemplate("sub_2d", 2, lambda: _pairs(10, 99, b_max_is_a=True), _sub),
    MathTemplate("mul_table", 3, lambda: _pairs(1, 12), _mul),
    MathTemplate("div_table", 3, lambda: _pairs(1, 12), _div),
    MathTemplate("add_sub", 4, lambda: [(a, b, c) for a in range(2, 21) for b in range(2, 21) for c in range(1, 21)
                                        if c <= a + b], _add_sub),
    MathTemplate("mul_add", 4, lambda: [(a, b, c) for a in range(2, 10) for b in range(2, 10) for c in range(1, 21)],
                 _mul_add),
    MathTemplate("mul_sub", 4, lambda: [(a, b, c) for a in range(2, 10) for b in range(2, 10) for c in range(1, 21)
                                        if c <= a * b], _mul_sub),
    MathTemplate("wp_more", 5, lambda: _pairs(2, 30), _wp_more),
    MathTemplate("wp_left", 5, lambda: [(a, b) for a in range(5, 31) for b in range(1, a)], _wp_left),
    MathTemplate("wp_groups", 5, lambda: _pairs(2, 12), _wp_groups),
    MathTemplate("wp_share", 5, lambda: _pairs(2, 12), _wp_share),
    MathTemplate("wp_change", 5, lambda: [(a, b, e) for a in range(2, 6) for b in range(2, 10) for e in range(1, 21)],
                 _wp_change),
)
MATH_LEVELS = tuple(sorted({t.level for t in MATH_TEMPLATES}))

# id "math-L<level>-<template_id>-<operands joined by _>"; solution: equations, one a line, then "#### <answer>".
MATH_SCHEMA = pa.schema([
    ("id", pa.string()), ("domain", pa.string()), ("level", pa.int64()), ("template_id", pa.string()),
    ("operands", pa.list_(pa.int64())), ("prompt", pa.string()), ("answer", pa.string()), ("solution", pa.string()),
])


def math_record(t: MathTemplate, operands: tuple[int, ...], seed: int) -> dict:
    question, steps, answer = t.render(operands, _template_rng(seed, t.template_id, *operands))
    return {"id": f"math-L{t.level}-{t.template_id}-{'_'.join(map(str, operands))}", "domain": "math",
            "level": t.level, "template_id": t.template_id, "operands": list(operands), "prompt": question,
            "answer": str(answer), "solution": "\n".join(steps) + f"\n#### {answer}"}


# ============================================================================ code (built backwards)

@dataclass(frozen=True)
class CodeTemplate:
    """A reference-solution family: body(constants) is the function body, describe(constants) the statement's
    clause (what the function returns), inputs(rng, constants, n) n distinct argument tuples; domain() the constant dicts."""
    template_id: str
    level: int
    entry_point: str
    args: str
    domain: Callable[[], list[dict]]
    body: Callable[[dict], str]
    describe: Callable[[dict], str]
    inputs: Callable[[random.Random, dict, int], list[tuple]]


def _distinct(draw: Callable[[], tuple], n: int) -> list[tuple]:
    """n distinct argument tuples from `draw`, in draw order (every input space holds at least MAX_TESTS)."""
    out: list[tuple] = []
    for _ in range(1000 * n):
        args = draw()
        if args not in out:
            out.append(args)
            if len(out) == n:
                return out
    raise common.StageError(f"{STAGE}: could not draw {n} distinct test inputs")


def _ints(r: random.Random, n: int, lo: int = -20, hi: int = 40) -> list[tuple]:
    return _distinct(lambda: (r.randint(lo, hi),), n)


def _int_lists(r: random.Random, n: int) -> list[tuple]:
    return _distinct(lambda: ([r.randint(-10, 20) for _ in range(r.randint(0, 6))],), n)


def _words(r: random.Random, n: int, alphabet: str = "abcdeiorstu") -> list[tuple]:
    return _distinct(lambda: ("".join(r.choice(alphabet) for _ in range(r.randint(0, 8))),), n)


FIZZ_WORDS = (("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"))

CODE_TEMPLATES = (
    CodeTemplate("add_constant", 1, "add_constant", "x", lambda: [{"k": k} for k in range(1, 31)],
                 lambda c: f"    return x + {c['k']}\n", lambda c: f"x plus {c['k']}",
                 lambda r, c, n: _ints(r, n)),
    CodeTemplate("multiply_constant", 1, "multiply_constant", "x", lambda: [{"k": k} for k in range(2, 13)],
                 lambda c: f"    return x * {c['k']}\n", lambda c: f"x times {c['k']}",
                 lambda r, c, n: _ints(r, n)),
    CodeTemplate("is_multiple", 1, "is_multiple", "n", lambda: [{"k": k} for k in range(2, 13)],
                 lambda c: f"    return n % {c['k']} == 0\n",
                 lambda c: f"True when the integer n is divisible by {c['k']}, else False",
                 lambda r, c, n: _ints(r, n, 0, 60)),
    CodeTemplate("clamp", 1, "clamp", "x",
                 lambda: [{"lo": lo, "hi": hi} for lo in range(-10, 1) for hi in range(1, 21)],
                 lambda c: f"    return min(max(x, {c['lo']}), {c['hi']})\n",
                 lambda c: f"x limited to the range [{c['lo']}, {c['hi']}]",
                 lambda r, c, n: _ints(r, n, c["lo"] - 10, c["hi"] + 10)),
    CodeTemplate("count_above", 2, "count_above", "xs", lambda: [{"k": k} for k in range(-5, 11)],
                 lambda c: f"    return sum(1 for x in xs if x > {c['k']})\n",
                 lambda c: f"how many numbers in the list xs are greater than {c['k']}",
                 lambda r, c, n: _int_lists(r, n)),
    CodeTemplate("count_letters", 2, "count_letters", "s",
                 lambda: [{"letters": "".join(ls)} for size in (2, 3) for ls in itertools.combinations("aeiorst", size)],
                 lambda c: f"    return sum(1 for ch in s if ch in {c['letters']!r})\n",
                 lambda c: f"how many characters of the string s are one of the letters {c['letters']!r}",
                 lambda r, c, n: _words(r, n)),
    CodeTemplate("repeat_join", 2, "repeat_join", "s",
                 lambda: [{"k": k, "sep": sep} for k in range(2, 6) for sep in ("-", ",", "+", "|", "::")],
                 lambda c: f"    return {c['sep']!r}.join([s] * {c['k']})\n",
                 lambda c: f"the string s repeated {c['k']} times, joined by {c['sep']!r}",
                 lambda r, c, n: _words(r, n)),
    CodeTemplate("rotate_left", 2, "rotate_left", "s", lambda: [{"k": k} for k in range(1, 7)],
                 lambda c: f"    if not s:\n        return s\n    k = {c['k']} % len(s)\n    return s[k:] + s[:k]\n",
                 lambda c: f"the string s rotated left by {c['k']} characters (wrapping around)",
                 lambda r, c, n: _words(r, n)),
    CodeTemplate("fizzbuzz", 3, "fizzbuzz", "n",
                 lambda: [{"a": a, "b": b, "word_a": wa, "word_b": wb}
                          for a in range(2, 10) for b in range(a + 1, 10) for wa, wb in FIZZ_WORDS],
                 lambda c: (f"    if n % {c['a']} == 0 and n % {c['b']} == 0:\n"
                            f"        return {c['word_a'] + c['word_b']!r}\n"
                            f"    if n % {c['a']} == 0:\n        return {c['word_a']!r}\n"
                            f"    if n % {c['b']} == 0:\n        return {c['word_b']!r}\n    return str(n)\n"),
                 lambda c: (f"{c['word_a'] + c['word_b']!r} when the positive integer n is divisible by both "
                            f"{c['a']} and {c['b']}, {c['word_a']!r} when only by {c['a']}, {c['word_b']!r} when "
                            f"only by {c['b']}, and otherwise n as a string"),
                 lambda r, c, n: _distinct(lambda: (r.choice((r.randint(1, 100), c["a"] * r.randint(1, 10),
                                                              c["b"] * r.randint(1, 10), c["a"] * c["b"] * r.randint(1, 3))),), n)),
    CodeTemplate("sum_multiples", 3, "sum_multiples", "n",
                 lambda: [{"a": a, "b": b} for a in range(2, 10) for b in range(a + 1, 10)],
                 lambda c: f"    return sum(i for i in range(n) if i % {c['a']} == 0 or i % {c['b']} == 0)\n",
                 lambda c: (f"the sum of the non-negative integers below n that are divisible by {c['a']} "
                            f"or by {c['b']}"),
                 lambda r, c, n: _ints(r, n, 0, 60)),
    CodeTemplate("count_digit", 3, "count_digit", "n", lambda: [{"d": d} for d in range(10)],
                 lambda c: f"    return str(abs(n)).count({str(c['d'])!r})\n",
                 lambda c: f"how many times the digit {c['d']} appears in the decimal digits of the integer n",
                 lambda r, c, n: _distinct(lambda: (r.choice((1, -1)) * int("".join(
                     r.choice("0123456789" + 3 * str(c["d"])) for _ in range(r.randint(1, 7)))),), n)),
)
CODE_LEVELS = tuple(sorted({t.level for t in CODE_TEMPLATES}))

# constants: JSON (sorted keys) of the reference's constants; prompt: HumanEval-style signature + docstring with the
# public examples; canonical_solution: the body after it; public_tests / hidden_tests: `assert f(args) == value` lines;
# test: `def check(candidate)` over public + hidden, runnable by verifiers.humaneval_program.
CODE_SCHEMA = pa.schema([
    ("id", pa.string()), ("domain", pa.string()), ("level", pa.int64()), ("template_id", pa.string()),
    ("constants", pa.string()), ("entry_point", pa.string()), ("prompt", pa.string()), ("statement", pa.string()),
    ("canonical_solution", pa.string()), ("public_tests", pa.list_(pa.string())),
    ("hidden_tests", pa.list_(pa.string())), ("test", pa.string()),
])


def _reference(t: CodeTemplate, constants: dict) -> Callable:
    """The reference solution as a function: our own generated source, so exec here is trusted."""
    namespace: dict = {}
    exec(f"def {t.entry_point}({t.args}):\n{t.body(constants)}", namespace)  # noqa: S102 (generated, trusted)
    return namespace[t.entry_point]


def _mutants(constants: dict) -> list[dict]:
    """One-constant mutants: each int + 1, each string minus its last character."""
    out = []
    for key, value in constants.items():
        changed = value + 1 if isinstance(value, int) else value[:-1]
        out.append({**constants, key: changed})
    return out


def _call(entry_point: str, args: tuple) -> str:
    return f"{entry_point}({', '.join(map(repr, args))})"


def _asserts(name: str, inputs: list[tuple], expected: list) -> list[str]:
    return [f"assert {_call(name, args)} == {want!r}" for args, want in zip(inputs, expected)]


def code_record(t: CodeTemplate, constants: dict, seed: int, n_public: int, n_hidden: int) -> dict:
    """Solution -> tests (the reference run on seeded inputs, redrawn until they discriminate) -> statement."""
    reference = _reference(t, constants)
    mutants = [_reference(t, m) for m in _mutants(constants)]
    key = json.dumps(constants, sort_keys=True)
    rng = _template_rng(seed, t.template_id, key)
    for _ in range(MUTANT_ATTEMPTS):
        inputs = t.inputs(rng, constants, n_public + n_hidden)
        expected = [reference(*args) for args in inputs]
        if len(set(map(repr, expected))) > 1 and all(
                any(m(*args) != want for args, want in zip(inputs, expected)) for m in mutants):
            break
    else:
        raise common.StageError(f"{STAGE}: {t.template_id} {key}: no inputs in {MUTANT_ATTEMPTS} draws give two "
                                f"distinct outputs and reject every one-constant mutant")
    asserts = _asserts(t.entry_point, inputs, expected)
    examples = "".join(f"    >>> {_call(t.entry_point, args)}\n    {want!r}\n"
                       for args, want in zip(inputs[:n_public], expected[:n_public]))
    sentence = t.describe(constants)
    prompt = f'def {t.entry_point}({t.args}):\n    """Return {sentence}.\n\n{examples}    """\n'
    statement = (f"Write a Python function `{t.entry_point}({t.args})` that returns {sentence}.\n\nExamples:\n"
                 + "\n".join(asserts[:n_public]))
    check = "def check(candidate):\n" + "".join(f"    {line}\n" for line in _asserts("candidate", inputs, expected))
    slug = "_".join(str(constants[k]) for k in sorted(constants))
    return {"id": f"code-L{t.level}-{t.template_id}-{slug}", "domain": "code", "level": t.level,
            "template_id": t.template_id, "constants": key, "entry_point": t.entry_point, "prompt": prompt,
            "statement": statement, "canonical_solution": t.body(constants), "public_tests": asserts[:n_public],
            "hidden_tests": asserts[n_public:], "test": check}


# ============================================================================ params, generation, files

SECTION_KEYS = {"math": {"levels", "train_per_level", "heldout_per_level", "max_heldout_fraction"}}
SECTION_KEYS["code"] = SECTION_KEYS["math"] | {"public_tests", "hidden_tests"}


def _int(value, where: str, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise common.StageError(f"{STAGE}.{where} must be an int >= {lo}, got {value!r}")
    return value


def validate_params(p: dict) -> dict:
    """The checked slice: {seed, scale?, math: {...}, code: {...}}; an unknown, missing or ill-typed key is a
    StageError naming it."""
    if not isinstance(p, dict):
        raise common.StageError(f"{STAGE}: params must be a mapping, got {type(p).__name__}")
    unknown = set(p) - {"seed", "scale", "math", "code"}
    if unknown:
        raise common.StageError(f"{STAGE}: unknown keys {sorted(unknown)}")
    _int(p.get("seed"), "seed", 0)
    for section, known in (("math", MATH_LEVELS), ("code", CODE_LEVELS)):
        cfg = p.get(section)
        if not isinstance(cfg, dict):
            raise common.StageError(f"{STAGE}.{section} must be a mapping, got {cfg!r}")
        if set(cfg) != SECTION_KEYS[section]:
            raise common.StageError(f"{STAGE}.{section}: keys must be {sorted(SECTION_KEYS[section])}; missing "
                                    f"{sorted(SECTION_KEYS[section] - set(cfg))}, unknown "
                                    f"{sorted(set(cfg) - SECTION_KEYS[section])}")
        levels = cfg["levels"]
        if (not isinstance(levels, list) or not levels or len(set(levels)) != len(levels)
                or any(level not in known for level in levels)):
            raise common.StageError(f"{STAGE}.{section}.levels must be a non-empty list of distinct levels from "
                                    f"{list(known)}, got {levels!r}")
        _int(cfg["train_per_level"], f"{section}.train_per_level", 0)
        _int(cfg["heldout_per_level"], f"{section}.heldout_per_level", 1)
        fraction = cfg["max_heldout_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise common.StageError(f"{STAGE}.{section}.max_heldout_fraction must be a number in (0, 1), "
                                    f"got {fraction!r}")
    code = p["code"]
    n_tests = _int(code["public_tests"], "code.public_tests", 1) + _int(code["hidden_tests"], "code.hidden_tests", 1)
    if n_tests > MAX_TESTS:
        raise common.StageError(f"{STAGE}.code: public_tests + hidden_tests must be <= {MAX_TESTS}, got {n_tests}")
    return p


def build_tasks(p: dict) -> dict[str, list[dict]]:
    """{"math_train", "math_heldout", "code_train", "code_heldout"}: rows in level, template, draw order."""
    validate_params(p)
    seed = p["seed"]
    out = {f"{domain}_{split}": [] for domain in ("math", "code") for split in SPLITS}
    for domain, templates in (("math", MATH_TEMPLATES), ("code", CODE_TEMPLATES)):
        cfg = p[domain]
        for level in sorted(cfg["levels"]):
            chosen = split_level([t for t in templates if t.level == level], seed, cfg["train_per_level"],
                                 cfg["heldout_per_level"], cfg["max_heldout_fraction"])
            for split in SPLITS:
                out[f"{domain}_{split}"] += [
                    math_record(t, ops, seed) if domain == "math" else
                    code_record(t, ops, seed, cfg["public_tests"], cfg["hidden_tests"]) for t, ops in chosen[split]]
    seen: dict[str, str] = {}
    for name, rows in out.items():
        for row in rows:
            key = normalize_question(row["prompt"])
            if key in seen:  # distinct signatures always render distinct text: a repeat is a generator bug
                raise common.StageError(f"{STAGE}: {row['id']} ({name}) repeats the question of {seen[key]}")
            seen[key] = row["id"]
    return out


def level_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row["level"])] = counts.get(str(row["level"]), 0) + 1
    return counts


def write_tasks(output_dir: str | Path, p: dict) -> dict:
    """<output_dir>/{math,code}_{train,heldout}.parquet, then manifest.json (counts per file and level)."""
    output_dir = Path(output_dir)
    tables = build_tasks(p)
    paths = []
    for name, rows in tables.items():
        path = output_dir / f"{name}.parquet"
        common.write_table(path, common.rows_to_table(rows, MATH_SCHEMA if name.startswith("math") else CODE_SCHEMA))
        paths.append(path)
    counts = {name: {"rows": len(rows), "by_level": level_counts(rows)} for name, rows in tables.items()}
    for name, c in counts.items():
        cfg = p[name.split("_")[0]]
        want = cfg["train_per_level"] if name.endswith("train") else cfg["heldout_per_level"]
        short = {level: n for level, n in c["by_level"].items() if n < want}
        if short:
            print(f"{STAGE}: {name}: levels with fewer distinct problems than asked ({want}): {short}", file=sys.stderr)
    distinct = {t.template_id: len(t.domain()) for t in MATH_TEMPLATES + CODE_TEMPLATES}
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p, inputs=[], outputs=paths,
                                 counts=counts, code=common.code_version("stages.tasks"),
                                 extra={"distinct_problems": distinct})


# ============================================================================ evaluation helpers

def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p^ = correct / n (95% at z = 1.96):

        center = (p^ + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p^ (1 - p^) / n + z^2 / 4n^2)

    Unlike the Wald interval it stays inside [0, 1] and is not empty at 0 or n correct (0/200 -> [0, 0.0188])."""
    if not isinstance(n, int) or not isinstance(correct, int) or n < 1 or not 0 <= correct <= n:
        raise common.StageError(f"{STAGE}: wilson_interval needs ints 0 <= correct <= n, n >= 1; got {correct}/{n}")
    phat, z2 = correct / n, z * z
    denom = 1 + z2 / n
    center = (phat + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(phat * (1 - phat) / n + z2 / (4 * n * n))
    return (0.0 if correct == 0 else max(0.0, center - half)), (1.0 if correct == n else min(1.0, center + half))


def accuracy_by_level(records) -> dict[int, dict]:
    """{level: {n, correct, acc, ci95_low, ci95_high}} (Wilson 95%) from records {"id", "level", "correct"}, one per
    problem: samples of one problem are not independent, so collapse them first (greedy, or the first sample)."""
    seen, tally = set(), {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"id", "level", "correct"} <= set(r):
            raise common.StageError(f"{STAGE}: record {i} must have id, level and correct, got {r!r}")
        if (r["level"], r["id"]) in seen:
            raise common.StageError(f"{STAGE}: problem {r['id']} appears twice: give one record per problem")
        if not isinstance(r["correct"], bool):
            raise common.StageError(f"{STAGE}: record {r['id']}: correct must be a bool, got {r['correct']!r}")
        seen.add((r["level"], r["id"]))
        n, c = tally.get(r["level"], (0, 0))
        tally[r["level"]] = (n + 1, c + r["correct"])
    out = {}
    for level in sorted(tally):
        n, c = tally[level]
        low, high = wilson_interval(c, n)
        out[level] = {"n": n, "correct": c, "acc": c / n, "ci95_low": low, "ci95_high": high}
    return out


def cut_at_first_answer(completion: str) -> str:
    """The completion up to the end of its first `#### x` line (all of it when there is none): a base model that
    runs on into a new "Problem:" must be graded on its own answer, not on the last `####` it wrote."""
    match = re.search(r"####[^\n]*", completion)
    return completion if match is None else completion[:match.end()]


def format_prompt(record: dict, prompt_format: str) -> str | list[dict]:
    """The prompt of a task: plain text for a base model (math: the corpus's "Problem: ... Solution:" format; code:
    the HumanEval-style signature and docstring to continue) or chat messages (one user turn)."""
    if prompt_format not in PROMPT_FORMATS:
        raise common.StageError(f"{STAGE}: prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if record.get("domain") not in ("math", "code"):
        raise common.StageError(f"{STAGE}: record domain must be math or code, got {record.get('domain')!r}")
    if record["domain"] == "math":
        if prompt_format == "plain":
            return MATH_PLAIN_TEMPLATE.format(prompt=record["prompt"])
        return [{"role": "user", "content": f"{record['prompt']}\n\n{MATH_CHAT_INSTRUCTION}"}]
    if prompt_format == "plain":
        return record["prompt"]
    return [{"role": "user", "content": f"{record['statement']}\n\n{CODE_CHAT_INSTRUCTION}"}]



def reference_messages(record: dict) -> list[dict]:
    """A train record as a chat with its reference solution: the chat prompt, then the assistant's reasoning
    (math: the worked steps; code: a one-line plan) and answer (math: `#### <answer>`; code: the fenced function)."""
    user = format_prompt(record, "chat")
    if record["domain"] == "math":
        steps, _, answer = record["solution"].rpartition("\n#### ")
        return user + [{"role": "assistant", "reasoning_content": steps, "content": f"#### {answer}"}]
    signature = record["prompt"].splitlines()[0]
    plan = f"Plan: {record['statement'].splitlines()[0].replace('Write', 'write', 1)} Check it on the examples."
    return user + [{"role": "assistant", "reasoning_content": plan,
                    "content": f"```python\n{signature}\n{record['canonical_solution'].rstrip()}\n```"}]

def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    try:
        manifest = write_tasks(args.output_dir, common.resolve_cli_params(args, STAGE))
    except common.StageError as exc:
        common.fail(exc)
    print(json.dumps({name: c["rows"] for name, c in manifest["counts"].items()}))


if __name__ == "__main__":
    main()
