"""The dynamic checklist of SFT solution refinement: small named checks, chosen per task by its domain.

A candidate is one assistant turn {reasoning, content} (the `<think>` part and the reply) for a task-ladder record.
`checklist_for(record)` names the items that apply to the record's domain (the "dynamic" part: a math task is
checked against its gold answer and the arithmetic of its steps, a code task against its hidden tests and its
entry point); each item returns CheckResult(item, passed, detail). Items:

  answer_correct    math: stages.verifiers.verify_math(content, gold answer) == 1 (the first `#### x` / \\boxed{}).
  steps_consistent  math: every equation `a op b [op c ...] = c [= ...]` (op in + - * x × / ÷, non-negative
                    integers or decimals, a side may open with a minus sign, * and / before + and -) in reasoning +
                    content (the `####` line excluded) holds exactly (Fractions), there is at least one, and the
                    value of the last one equals the final answer (`####` / \\boxed{}, an exact number).
  tests_pass        code: the record's `test` (check(candidate) over the public + hidden tests) passes in the
                    sandbox against the reply's program (stages.evaluate.humaneval_candidate, the eval metric).
  code_wellformed   code: the reply has a fenced ```python block that `ast` parses and that defines the entry point
                    at top level (the block the tests run: the last one defining it).
  chat_format       both: the generation ended (not cut at max_new_tokens) and the conversation [user prompt,
                    assistant turn] passes stages.chat.encode_chat within max_len (roles, no control-token strings,
                    non-empty reply, length).
  no_repetition     both: no run of `repetition_ngram` words occurs more than `repetition_max_ngram` times and no
                    non-blank line (stripped) more than `repetition_max_line` times (a degenerate loop).
  length            both: min_tokens <= tokens of reasoning + content <= max_tokens.

CoT reconstruction accepts a chain with `Checker.chain`: steps_consistent (math) or, for code, the reasoning is
non-empty and names the entry point (reported under the same item name), plus chat_format, no_repetition, length.

The sandbox is the one costly item, so `Checker.run` checks a batch of candidates at once and runs the sandbox on
all their programs together; every item is evaluated on every candidate (per-item pass rates stay honest).
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

from stages.chat import ChatRejected, encode_chat
from stages.evaluate import humaneval_candidate
from stages.tasks import format_prompt
from stages.verifiers import VerifierResult, extract_final_answer, normalize_math_answer, verify_math
from stages.verifiers.math import as_exact_number

MATH_ITEMS = ("answer_correct", "steps_consistent", "chat_format", "no_repetition", "length")
CODE_ITEMS = ("tests_pass", "code_wellformed", "chat_format", "no_repetition", "length")
ITEMS = tuple(dict.fromkeys(MATH_ITEMS + CODE_ITEMS))

_NUM = r"\d+(?:\.\d+)?"
_OP = r"[-+*/×÷x]"
_EXPR = rf"-?\(?{_NUM}\)?(?:\s*{_OP}\s*\(?{_NUM}\)?)*"  # a side may start with a minus sign: 3 - 5 = -2
_EQUATION = re.compile(rf"(?<![\w.]){_EXPR}(?:\s*=\s*{_EXPR})+")
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_FENCED = re.compile(r"```(?:python|py|Python)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Candidate:
    """One assistant turn: the reasoning (inside `<think>`), the reply, and whether generation hit max_new_tokens."""
    reasoning: str
    content: str
    truncated: bool = False


@dataclass(frozen=True)
class CheckResult:
    item: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ChecklistConfig:
    max_len: int
    min_tokens: int
    max_tokens: int
    repetition_ngram: int
    repetition_max_ngram: int
    repetition_max_line: int
    sympy_timeout_s: float


def checklist_for(record: dict) -> tuple[str, ...]:
    """The items that apply to a task: by its domain (module docstring)."""
    return {"math": MATH_ITEMS, "code": CODE_ITEMS}[record["domain"]]


def parse_completion(text: str, truncated: bool = False) -> Candidate:
    """Split generated text `<think>\\n{reasoning}\\n</think>\\n\\n{content}` (the chat template's assistant turn)
    into a Candidate; text without a closed think block is all content (chat_format then fails on the marker)."""
    m = re.fullmatch(r"\s*<think>\n?(.*?)\n?</think>\n*(.*)", text, re.DOTALL)
    if m is None:
        return Candidate("", text.strip(), truncated)
    return Candidate(m.group(1).strip(), m.group(2).strip(), truncated)


def assistant_message(c: Candidate) -> dict:
    message = {"role": "assistant", "content": c.content}
    if c.reasoning:
        message["reasoning_content"] = c.reasoning
    return message


# ----------------------------------------------------------------------------- items

def check_answer(record: dict, c: Candidate, cfg: ChecklistConfig) -> CheckResult:
    r = verify_math(c.content, record["answer"], cfg.sympy_timeout_s)
    return CheckResult("answer_correct", r.score == 1.0, r.reason)


def _value(expr: str) -> Fraction:
    """Exact value of an arithmetic expression of numbers, + - * / (x, ×, ÷ read as * and /) and parentheses."""
    tree = ast.parse(expr.replace("×", "*").replace("x", "*").replace("÷", "/"), mode="eval")

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")
    return ev(tree.body)


def equations(text: str) -> list[list[str]]:
    """Every chain `e1 = e2 [= e3 ...]` of arithmetic expressions in text, as its sides."""
    return [[side.strip() for side in m.group().split("=")] for m in _EQUATION.finditer(text)]


def check_steps(record: dict, c: Candidate, cfg: ChecklistConfig) -> CheckResult:
    final, how = extract_final_answer(c.content)
    body = "\n".join([c.reasoning, re.sub(r"####[^\n]*", "", c.content)])
    chains = equations(body)
    if not chains:
        return CheckResult("steps_consistent", False, "no computed step (no `a op b = c` equation)")
    last = None
    for sides in chains:
        try:
            values = [_value(s) for s in sides]
        except (SyntaxError, ValueError, ZeroDivisionError) as exc:
            return CheckResult("steps_consistent", False, f"cannot evaluate {' = '.join(sides)!r}: {exc}")
        if len(set(values)) > 1:
            return CheckResult("steps_consistent", False, f"wrong step: {' = '.join(sides)}")
        last = values[-1]
    answer = None if final is None else as_exact_number(normalize_math_answer(final))
    if answer is None:
        return CheckResult("steps_consistent", False, f"final answer {final!r} ({how}) is not a number")
    if answer != last:
        return CheckResult("steps_consistent", False, f"last computed value {last} != final answer {final}")
    return CheckResult("steps_consistent", True, f"{len(chains)} steps hold, last = final answer {final}")


def solution_block(record: dict, content: str) -> str | None:
    """The fenced block the tests run: the last ```python block defining the entry point, else the last block."""
    blocks = _FENCED.findall(content)
    definition = re.compile(rf"^def {re.escape(record['entry_point'])}\s*\(", re.MULTILINE)
    return next((b for b in reversed(blocks) if definition.search(b)), blocks[-1] if blocks else None)


def check_code_wellformed(record: dict, c: Candidate, cfg: ChecklistConfig) -> CheckResult:
    block = solution_block(record, c.content)
    if block is None:
        return CheckResult("code_wellformed", False, "no ```python block")
    try:
        tree = ast.parse(block)
    except SyntaxError as exc:
        return CheckResult("code_wellformed", False, f"does not parse: {exc.msg} (line {exc.lineno})")
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    if record["entry_point"] not in names:
        return CheckResult("code_wellformed", False, f"does not define {record['entry_point']}() (defines {names})")
    return CheckResult("code_wellformed", True, f"parses, defines {record['entry_point']}()")


def check_chat_format(record: dict, c: Candidate, cfg: ChecklistConfig, tok) -> CheckResult:
    if c.truncated:
        return CheckResult("chat_format", False, "generation cut at max_new_tokens (no end of turn)")
    try:
        encode_chat(tok, [*instruction_messages(record), assistant_message(c)], cfg.max_len)
    except ChatRejected as exc:
        return CheckResult("chat_format", False, str(exc))
    return CheckResult("chat_format", True, "valid ChatML conversation")


def check_repetition(record: dict, c: Candidate, cfg: ChecklistConfig) -> CheckResult:
    text = f"{c.reasoning}\n{c.content}"
    words, n = text.split(), cfg.repetition_ngram
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
    gram, most = max(counts.items(), key=lambda kv: kv[1], default=((), 0))
    if most > cfg.repetition_max_ngram:
        return CheckResult("no_repetition", False, f"{n}-gram {' '.join(gram)!r} occurs {most} times")
    lines: dict[str, int] = {}
    for line in text.splitlines():
        if line.strip():
            lines[line.strip()] = lines.get(line.strip(), 0) + 1
    line, most_line = max(lines.items(), key=lambda kv: kv[1], default=("", 0))
    if most_line > cfg.repetition_max_line:
        return CheckResult("no_repetition", False, f"line {line[:60]!r} occurs {most_line} times")
    return CheckResult("no_repetition", True, f"max {n}-gram count {most}, max line count {most_line}")


def check_length(record: dict, c: Candidate, cfg: ChecklistConfig, tok) -> CheckResult:
    n = len(tok.encode(f"{c.reasoning}\n{c.content}", add_special_tokens=False).ids)
    ok = cfg.min_tokens <= n <= cfg.max_tokens
    return CheckResult("length", ok, f"{n} tokens ({'within' if ok else 'outside'} [{cfg.min_tokens}, "
                                     f"{cfg.max_tokens}])")


def instruction_messages(record: dict) -> list[dict]:
    """The instruction as a chat prompt (stages.tasks.format_prompt, chat format)."""
    return format_prompt(record, "chat")


# ----------------------------------------------------------------------------- the batch

CodeVerifier = Callable[[Sequence[str]], list[VerifierResult]]


def check_on_topic(record: dict, c: Candidate, cfg: ChecklistConfig) -> CheckResult:
    """code, CoT reconstruction only: the reasoning is non-empty and names the entry point (a chain about this
    function; code reasoning has no equations to check, so this is the weak, stated form of consistency)."""
    ok = bool(c.reasoning) and record["entry_point"] in c.reasoning
    return CheckResult("steps_consistent", ok, "names the entry point" if ok else
                       f"reasoning {'is empty' if not c.reasoning else 'never names ' + record['entry_point']}")


@dataclass(frozen=True)
class Checker:
    """The checklist with what it needs: thresholds, the tokenizer of the model the data trains (lengths and
    encode_chat), and the code verifier (e.g. verify_code_batch with the sandbox limits)."""
    cfg: ChecklistConfig
    tok: object
    verify_code: CodeVerifier

    def item(self, item: str, record: dict, c: Candidate) -> CheckResult:
        """One item other than tests_pass (which runs batched in `run`)."""
        if item in ("chat_format", "length"):
            return {"chat_format": check_chat_format, "length": check_length}[item](record, c, self.cfg, self.tok)
        return {"answer_correct": check_answer, "steps_consistent": check_steps,
                "code_wellformed": check_code_wellformed, "no_repetition": check_repetition}[item](record, c, self.cfg)

    def run(self, pairs: Sequence[tuple[dict, Candidate]]) -> list[list[CheckResult]]:
        """Every applicable item on every (record, candidate), in checklist_for order; the code candidates'
        programs go to verify_code in one call."""
        code_at = [i for i, (r, _) in enumerate(pairs) if r["domain"] == "code"]
        programs = [humaneval_candidate(pairs[i][0], pairs[i][1].content) for i in code_at]
        verdicts = dict(zip(code_at, self.verify_code(programs))) if code_at else {}
        return [[CheckResult("tests_pass", verdicts[i].score == 1.0, verdicts[i].reason) if item == "tests_pass"
                 else self.item(item, record, c) for item in checklist_for(record)]
                for i, (record, c) in enumerate(pairs)]

    def chain(self, record: dict, c: Candidate) -> list[CheckResult]:
        """CoT acceptance of a training example (a chain + the refined reply, already verified): the chain is
        consistent with the reply (math: steps_consistent against its `####` answer; code: check_on_topic), and
        the example passes chat_format, no_repetition and length."""
        consistent = (self.item("steps_consistent", record, c) if record["domain"] == "math"
                      else check_on_topic(record, c, self.cfg))
        return [consistent, *(self.item(item, record, c) for item in ("chat_format", "no_repetition", "length"))]


def critique(results: Sequence[CheckResult]) -> list[dict]:
    """The structured critique: one {item, detail} per failed item, in checklist order."""
    return [{"item": r.item, "detail": r.detail} for r in results if not r.passed]
