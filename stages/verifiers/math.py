"""Math answers: the first final answer of a completion, compared with the gold answer by two checkers.

Extraction (the reward reads one answer, so printing many numbers never helps): in the answer part (after
`</think>`), the earliest `\\boxed{}` / `\\fbox{}` or `#### x` line; only when neither is present, the first
"The answer is x" / "Final answer: x". No marker at all scores 0: there is no "last number" fallback.

Equivalence, each checker three-valued (equal / not equal / undecided):
  ours         our normalisation (LaTeX wrappers, units, separators, `x =`, percent and degree signs removed;
               exact rationals), then tuples element by element (same brackets), then sympy's
               simplify(a - b) == 0 on a whitelisted alphabet. Undecided when no rule applies or sympy fails.
  math-verify  Hugging Face's `math-verify` (parse + verify on `\\boxed{answer}`): sets, intervals, LaTeX forms.
               Undecided when either side does not parse into a sympy object.
A pair is correct only when one checker says equal and the other does not say not-equal (false positives
cost more than false negatives: a reward that can be gamed is worse than one that is strict). Both checkers
run in one long-lived worker process that is killed and restarted when a check runs past its time limit
(sympy and math-verify can hang in C big-int arithmetic, beyond the reach of math-verify's signal.alarm).
"""
from __future__ import annotations

import json
import math
import re
import resource
import select
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

from stages.verifiers.result import VerifierResult, strip_reasoning
from stages.verifiers.sandbox import kill_group, scrubbed_env

# Answers outside this alphabet never reach sympy (parse_expr evaluates Python): no quotes, brackets or `_`.
_SYMPY_SAFE = re.compile(r"^[0-9a-zA-Z+\-*/().,\s]*$")
_SYMPY_WORDS = {"sqrt", "pi", "log", "ln", "exp", "sin", "cos", "tan", "oo", "E", "I"}
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


def _balanced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == '{', or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def first_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the first `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), braces balanced."""
    m = re.search(r"\\(?:boxed|fbox)", text)
    if m is None:
        return None
    rest = m.end()
    if rest < len(text) and text[rest] == "{":
        content = _balanced(text, rest)
        return None if content is None else (m.start(), content)
    bare = re.match(r"\s+([^\s$]+)", text[rest:])
    return (m.start(), bare.group(1)) if bare else None


def extract_final_answer(text: str) -> tuple[str | None, str]:
    """(answer, how) of the FIRST final answer in the answer part: the earliest \\boxed{} or `#### x` line,
    else the first "the answer is x" / "final answer: x" up to the end of its sentence; how is one of boxed,
    gsm8k, answer_is, none."""
    text = strip_reasoning(text)
    boxed = first_boxed(text)
    hashes = re.search(r"####[ \t]*([^\n]*\S)", text)
    if boxed is not None and (hashes is None or boxed[0] < hashes.start()):
        return boxed[1].strip(), "boxed"
    if hashes is not None:
        return hashes.group(1).strip(), "gsm8k"
    stated = re.search(r"(?i)(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", text)
    if stated:  # up to the end of its sentence
        return re.split(r"\.(?:\s|$)", stated.group(1), maxsplit=1)[0].strip(), "answer_is"
    return None, "none"


def _replace_frac(s: str) -> str:
    """\\frac{a}{b} -> (a)/(b) and \\frac12 -> (1)/(2), innermost groups resolved by recursion."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            return "".join(out) + s[i:]
        out.append(s[i:j])
        k = j + 5
        args = []
        for _ in range(2):
            while k < len(s) and s[k] == " ":
                k += 1
            if k < len(s) and s[k] == "{":
                inner = _balanced(s, k)
                if inner is None:
                    return "".join(out) + s[j:]
                args.append(_replace_frac(inner))
                k += len(inner) + 2
            elif k < len(s):
                args.append(s[k])
                k += 1
        if len(args) < 2:
            return "".join(out) + s[j:]
        out.append(f"({args[0]})/({args[1]})")
        i = k


def normalize_math_answer(answer: str) -> str:
    """Canonical string form of a final answer: LaTeX wrappers, units, thousands separators, degree and
    percent signs, `x =` prefixes and trailing `.0` removed; \\frac, \\sqrt, \\cdot, ^ turned into
    sympy-readable syntax; exact numbers (3/4, 0.75, \\frac{3}{4}) printed as the reduced fraction 3/4."""
    s = answer.strip()
    for wrap_open, wrap_close in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(wrap_open) and s.endswith(wrap_close) and len(s) >= len(wrap_open) + len(wrap_close):
            s = s[len(wrap_open):len(s) - len(wrap_close)].strip()
    s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\^\{?\d\}?)?", r"\1", s)  # units
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("{,}", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("°", ""), ("\\%", ""), ("%", ""),
                     ("\\$", ""), ("$", ""), ("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"),
                     ("\\infty", "oo")):
        s = s.replace(old, new)
    s = s.strip().rstrip(".").strip()
    m = re.fullmatch(r"[a-zA-Z]\s*=\s*(.+)", s)
    if m:
        s = m.group(1).strip()
    m = re.fullmatch(rf"({_NUMBER})\s+([a-zA-Z][a-zA-Z .]*)(?:\^\d+)?", s)
    if m and m.group(2).strip() not in _SYMPY_WORDS:  # a number then a unit word ("5 dollars", "10 cm^2")
        s = m.group(1)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = _replace_frac(s)
    s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"sqrt(\1)", s)
    s = s.replace("^", "**").replace("{", "(").replace("}", ")").replace(" ", "")
    number = as_exact_number(s)
    if number is not None:
        return str(number.numerator) if number.denominator == 1 else f"{number.numerator}/{number.denominator}"
    return s


def as_exact_number(s: str) -> Fraction | None:
    """An exact rational for `-2`, `0.75`, `1e3`, `3/4`, `(3)/(4)`, `-(1)/(2)`; None for anything else."""
    m = re.fullmatch(r"(-?)\(?(-?[\d.]+(?:e-?\d+)?)\)?/\(?(-?[\d.]+)\)?", s)
    try:
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)(?:e-?\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _split_top_level(s: str) -> list[str]:
    """Split a tuple / interval / list answer on its top-level commas."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _sympy_ready(s: str) -> bool:
    words = set(re.findall(r"[a-zA-Z]{2,}", s))
    return bool(_SYMPY_SAFE.match(s)) and words <= _SYMPY_WORDS and len(s) <= 200


# The worker answers one JSON request per line: ["sympy" | "math_verify", pred, gold, seconds].
_WORKER_SOURCE = r"""
import json, sys
import math_verify, sympy
print("ready", flush=True)

def sympy_equal(a, b, seconds):
    from sympy import N, simplify
    from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations
    t = standard_transformations + (implicit_multiplication_application,)
    diff = simplify(parse_expr(a, transformations=t) - parse_expr(b, transformations=t))
    return bool(diff == 0 or (diff.is_number and abs(complex(N(diff))) < 1e-9)), ""

def math_verify_equal(pred, gold, seconds):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=seconds)
    p = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=seconds)
    parsed = [any(not isinstance(x, str) for x in side) for side in (g, p)]
    if not all(parsed):  # nothing, or only the extracted string: math-verify would compare text
        return None, "unparsed " + ("gold" if not parsed[0] else "answer")
    return bool(verify(g, p, timeout_seconds=seconds)), ""

CHECKS = {"sympy": sympy_equal, "math_verify": math_verify_equal}
for line in sys.stdin:
    check, pred, gold, seconds = json.loads(line)
    try:
        equal, error = CHECKS[check](pred, gold, seconds)
    except Exception as exc:
        equal, error = None, type(exc).__name__
    print(json.dumps({"equal": equal, "error": error}), flush=True)
"""


_WORKER_START_S = 120


class EquivalenceWorker:
    """A long-lived `python -I` process running sympy and math-verify checks, killed and restarted when one
    check runs past its time limit: the limit holds whatever the check does (the parent waits with select)."""

    def __init__(self, memory_mb: int = 2048):
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        """A fresh worker, once it has imported sympy and math-verify: imports never count against a check."""
        limit = self.memory_mb << 20
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _WORKER_SOURCE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=scrubbed_env(tempfile.gettempdir()), start_new_session=True,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        ready, _, _ = select.select([proc.stdout], [], [], _WORKER_START_S)
        if not ready or proc.stdout.readline().strip() != "ready":
            kill_group(proc)
            raise RuntimeError("the math equivalence worker did not start: are sympy and math-verify installed "
                               "(make venv)?")
        return proc

    def check(self, kind: str, pred: str, gold: str, timeout_s: float) -> tuple[bool | None, str]:
        """(True/False, "") when the checker decided; (None, why) when it could not (parse error, timeout).
        math-verify's own signal timeouts get the same limit, rounded up to whole seconds (its unit)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps([kind, pred, gold, max(1, math.ceil(timeout_s))]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return None, f"{kind} timed out after {timeout_s:g} s"
        reply = json.loads(line)
        return reply["equal"], reply["error"]

    def close(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


_WORKER = EquivalenceWorker()


def ours_equal(pred: str, gold: str, timeout_s: float = 5.0) -> tuple[bool | None, str]:
    """Our checker, three-valued: normalised strings equal, else exact rationals compared, else tuples
    element by element (same brackets, same length), else sympy within the time limit; None = undecided."""
    p, g = normalize_math_answer(pred), normalize_math_answer(gold)
    if p == g:
        return True, "same normalised form"
    pn, gn = as_exact_number(p), as_exact_number(g)
    if pn is not None and gn is not None:
        return pn == gn, "exact numbers"
    p_parts, g_parts = _split_top_level(p.strip("()[]")), _split_top_level(g.strip("()[]"))
    if len(g_parts) > 1 or len(p_parts) > 1:
        if len(p_parts) != len(g_parts) or p[:1] != g[:1] or p[-1:] != g[-1:]:
            return False, "different tuple shape"
        verdicts = [ours_equal(a, b, timeout_s)[0] for a, b in zip(p_parts, g_parts)]
        if False in verdicts:
            return False, "element-wise"
        return (True, "element-wise") if all(verdicts) else (None, "element-wise undecided")
    if not (_sympy_ready(p) and _sympy_ready(g)):
        return None, "different normalised forms, no rule applies"
    equal, error = _WORKER.check("sympy", p, g, timeout_s)
    return equal, error or "sympy"


def _unit_as_text(answer: str) -> str:
    """`7 dollars` -> `7\\text{ dollars}`: math-verify reads a bare unit word as a product of symbols."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s+([a-zA-Z][a-zA-Z .]*?)\s*\.?\s*", answer)
    if m and m.group(2).strip() not in _SYMPY_WORDS:
        return f"{m.group(1)}\\text{{ {m.group(2).strip()}}}"
    return answer


def math_verify_equal(pred: str, gold: str, timeout_s: float = 5.0) -> tuple[bool | None, str]:
    """math-verify's verdict on the two answers (each parsed as `\\boxed{answer}`, a bare unit word written
    as \\text{}); None = undecided."""
    equal, error = _WORKER.check("math_verify", _unit_as_text(pred), _unit_as_text(gold), timeout_s)
    return equal, error or "math-verify"


def math_equal(pred: str, gold: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(equal, why): equal only when one checker says equal and neither says not equal (module docstring).
    math-verify is not asked once ours has said not equal: the verdict cannot change."""
    ours, ours_why = ours_equal(pred, gold, timeout_s)
    if ours is False:
        return False, f"ours: not equal ({ours_why})"
    theirs, theirs_why = math_verify_equal(pred, gold, timeout_s)
    verdict = theirs is not False and (ours is True or theirs is True)
    name = {True: "equal", False: "not equal", None: "undecided"}
    return verdict, f"ours: {name[ours]} ({ours_why}); math-verify: {name[theirs]} ({theirs_why})"


def verify_math(completion: str, gold: str, sympy_timeout_s: float = 5.0) -> VerifierResult:
    """1 when the completion's first final answer equals the gold answer (itself extracted when it is a full
    solution with \\boxed{} or `####`), else 0. sympy_timeout_s limits each checker's call."""
    start = time.perf_counter()
    pred, how = extract_final_answer(completion)
    gold_answer, gold_how = extract_final_answer(gold)
    if gold_how not in ("boxed", "gsm8k"):
        gold_answer = gold.strip()
    if pred is None:
        return VerifierResult(0.0, "no final answer found", time.perf_counter() - start)
    ok, why = math_equal(pred, gold_answer, sympy_timeout_s)
    verdict = "==" if ok else "!="
    return VerifierResult(float(ok), f"{how}: {pred!r} {verdict} {gold_answer!r} ({why})", time.perf_counter() - start)
