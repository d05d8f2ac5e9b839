"""Multiple choice (GPQA / SuperGPQA style): the first chosen letter in the answer part, against the gold letter."""
from __future__ import annotations

import re
import time

from stages.verifiers.result import VerifierResult, strip_reasoning


def extract_choice(text: str, n_choices: int) -> str | None:
    """The chosen letter: the first `Answer: X`, else the first \\boxed{X}, else the first "the answer is (X)",
    else a reply that is a lone letter. First, not last: writing every letter never earns the reward."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_choices]
    text = strip_reasoning(text)
    cls = f"[{letters}]"
    for pattern in (rf"(?i:answer)\s*:\s*\**\s*\(?\s*({cls})\b", rf"\\boxed\{{\s*(?:\\text\{{)?({cls})\b",
                    rf"(?i:the answer is)\s*\(?({cls})\b"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    m = re.fullmatch(rf"\s*\(?({cls})\)?[.)]?\s*", text)
    return m.group(1) if m else None


def verify_choice(completion: str, gold_letter: str, n_choices: int) -> VerifierResult:
    """1 when the chosen letter is the gold letter, else 0."""
    start = time.perf_counter()
    got = extract_choice(completion, n_choices)
    if got is None:
        return VerifierResult(0.0, "no choice letter found", time.perf_counter() - start)
    ok = got == gold_letter.strip().upper()
    return VerifierResult(float(ok), f"chose {got}, gold {gold_letter}", time.perf_counter() - start)
