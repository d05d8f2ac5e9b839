"""Verifiers: one module per kind of answer, all returning one result type (`result.VerifierResult`).

The same functions score RL rollouts (the reward) and evaluation samples (the verdict), open-instruct style:
  math        verify_math: the first final answer (\\boxed{}, `#### x`), our normalisation and math-verify,
              correct only when one says equal and the other does not say not equal; time-limited worker.
  choice      verify_choice: the first chosen letter of a multiple-choice answer.
  code        verify_code / verify_code_batch: a program and its tests in the sandbox (HumanEval protocol).
  sandbox     run_programs_sandboxed: bubblewrap namespaces + rlimits + audit hook, or a reported fallback.
  tool_calls  verify_tool_calls: BFCL's AST match against `possible_answer`, with its official type rules.
"""
from stages.verifiers.choice import extract_choice, verify_choice
from stages.verifiers.code import humaneval_program, verify_code, verify_code_batch
from stages.verifiers.math import extract_final_answer, math_equal, normalize_math_answer, verify_math
from stages.verifiers.result import VerifierResult, strip_reasoning
from stages.verifiers.sandbox import SandboxLimits, SandboxResult, run_programs_sandboxed, sandbox_setup
from stages.verifiers.tool_calls import FunctionCall, ToolCallParseError, parse_function_calls, verify_tool_calls

__all__ = ["FunctionCall", "SandboxLimits", "SandboxResult", "ToolCallParseError", "VerifierResult",
           "extract_choice", "extract_final_answer", "humaneval_program", "math_equal", "normalize_math_answer",
           "parse_function_calls", "run_programs_sandboxed", "sandbox_setup", "strip_reasoning", "verify_choice",
           "verify_code", "verify_code_batch", "verify_math", "verify_tool_calls"]
