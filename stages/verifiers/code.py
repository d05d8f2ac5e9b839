"""Code: a completion and its tests run as one program in the sandbox (HumanEval's `check(candidate)` protocol)."""
from __future__ import annotations

from typing import Sequence

from stages.verifiers.result import VerifierResult
from stages.verifiers.sandbox import SandboxLimits, SandboxResult, run_programs_sandboxed


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval's protocol: prompt + completion, then the test code, then `check(entry_point)`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def _result(r: SandboxResult) -> VerifierResult:
    return VerifierResult(float(r.status == "passed"), r.reason, r.seconds)


def verify_code(program: str, limits: SandboxLimits = SandboxLimits()) -> VerifierResult:
    """1 when the program (solution + tests) runs to its end and exits 0 in the sandbox, else 0 with the failure."""
    return _result(run_programs_sandboxed([program], limits, workers=1)[0])


def verify_code_batch(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
                      workers: int = 2) -> list[VerifierResult]:
    """verify_code over many programs, `workers` sandboxes at a time; results in order."""
    return [_result(r) for r in run_programs_sandboxed(programs, limits, workers)]
