"""The one result type every verifier returns, and the part of a completion that verifiers read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifierResult:
    """score in [0, 1] (1 = correct); reason: why, in words; cost: seconds spent verifying."""
    score: float
    reason: str
    cost: float


def strip_reasoning(text: str) -> str:
    """The answer part of a completion: what follows the last `</think>` (all of it when there is none)."""
    return text.rsplit("</think>", 1)[-1]
