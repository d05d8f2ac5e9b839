"""Verifiers: one function per kind of answer, all returning one small result type.

The same functions score RL rollouts (the reward) and evaluation samples (the verdict), open-instruct style:
  - verify_math:      final-answer extraction (\\boxed{}, `#### x`, "The answer is x") + normalisation + exact
                      numeric / sympy equivalence (sympy runs in a killable worker with a timeout).
  - verify_code:      a program and its tests run in a sandbox (HumanEval's `check(candidate)` protocol).
  - verify_tool_calls: BFCL-style AST match of parsed function calls against `possible_answer` entries.
  - verify_choice:    the letter of a multiple-choice answer.

Sandbox layers (each used where the host allows it; `sandbox_setup()` reports which):
  rlimits     RLIMIT_AS / CPU / NOFILE / FSIZE / NPROC / CORE set in the child before exec;
  audit_hook  a `sys.addaudithook` guard (irremovable) refusing writes and deletes outside the sandbox dir,
              sockets, subprocesses, fork and ctypes loading;
  netns       a fresh network namespace (unshare(CLONE_NEWNET), what `unshare -n` does; as non-root with
              CLONE_NEWUSER): no interface but a down loopback, so no network at all;
  uid_nobody  when run as root, the child drops to uid/gid 65534, so the kernel refuses writes to every path
              not world-writable.
Plus: `python -I -B` (no user site, no PYTHON* env, no bytecode writes), a scrubbed environment, a fresh
temp working dir, a wall-clock timeout that kills the whole process group, stdout/stderr to files capped by
RLIMIT_FSIZE. Sandboxes are started without threads (a poll loop), since preexec hooks are not thread-safe.
"""
from __future__ import annotations

import ast
import ctypes
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class VerifierResult:
    """score in [0, 1] (1 = correct); reason: why, in words; cost: seconds spent verifying."""
    score: float
    reason: str
    cost: float


# ============================================================================ math

# Answers outside this alphabet never reach sympy (parse_expr evaluates Python): no quotes, brackets or `_`.
_SYMPY_SAFE = re.compile(r"^[0-9a-zA-Z+\-*/().,\s]*$")
_SYMPY_WORDS = {"sqrt", "pi", "log", "ln", "exp", "sin", "cos", "tan", "oo", "E", "I"}


def strip_reasoning(text: str) -> str:
    """The answer part of a completion: what follows the last `</think>` (all of it when there is none)."""
    return text.rsplit("</think>", 1)[-1]


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


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = idx + (6 if text.startswith("\\boxed", idx) else 5)
    if rest < len(text) and text[rest] == "{":
        return _balanced(text, rest)
    m = re.match(r"\s+([^\s$]+)", text[rest:])
    return m.group(1) if m else None


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


def extract_final_answer(text: str) -> tuple[str | None, str]:
    """(answer, how): the last \\boxed{}, else the last `#### x` (GSM8K), else the last "answer is x",
    else the last number in the text; how is one of boxed, gsm8k, answer_is, last_number, none."""
    text = strip_reasoning(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip(), "gsm8k"
    stated = re.findall(r"(?i)(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", text)
    if stated:
        return stated[-1].strip().rstrip("."), "answer_is"
    numbers = re.findall(_NUMBER, text)
    if numbers:
        return numbers[-1].rstrip(".,"), "last_number"
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


_SYMPY_WORKER = r"""
import json, sys
from sympy import simplify, N
from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication_application
T = standard_transformations + (implicit_multiplication_application,)
for line in sys.stdin:
    a, b = json.loads(line)
    try:
        x, y = parse_expr(a, transformations=T), parse_expr(b, transformations=T)
        diff = simplify(x - y)
        ok = diff == 0 or (diff.is_number and abs(complex(N(diff))) < 1e-9)
        print(json.dumps({"equal": bool(ok), "error": ""}), flush=True)
    except Exception as exc:
        print(json.dumps({"equal": None, "error": type(exc).__name__}), flush=True)
"""


class SympyWorker:
    """A long-lived `python -I` process that answers "are a and b symbolically equal?", killed and restarted
    when one question runs past its timeout (sympy can hang in C big-int arithmetic, beyond any signal)."""

    def __init__(self, memory_mb: int = 2048):
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        limit = self.memory_mb << 20
        return subprocess.Popen([sys.executable, "-I", "-B", "-c", _SYMPY_WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=_scrubbed_env(tempfile.gettempdir()), start_new_session=True,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))

    def equal(self, a: str, b: str, timeout_s: float) -> tuple[bool | None, str]:
        """(True/False, "") when sympy decided; (None, why) on a parse error or a timeout."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps([a, b]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return None, f"sympy timed out after {timeout_s:g} s"
        reply = json.loads(line)
        return reply["equal"], reply["error"]

    def close(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None


_SYMPY = SympyWorker()


def math_equal(pred: str, gold: str, sympy_timeout_s: float = 5.0) -> tuple[bool, str]:
    """(equal, how): normalised strings equal, else exact rationals equal, else tuples compared element by
    element, else sympy: simplify(pred - gold) == 0 within the timeout."""
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
        verdicts = [math_equal(a, b, sympy_timeout_s) for a, b in zip(p_parts, g_parts)]
        return all(v for v, _ in verdicts), "element-wise"
    if not (_sympy_ready(p) and _sympy_ready(g)):
        return False, "different normalised forms"
    equal, error = _SYMPY.equal(p, g, sympy_timeout_s)
    if equal is None:
        return False, error
    return equal, "sympy"


def verify_math(completion: str, gold: str, sympy_timeout_s: float = 5.0) -> VerifierResult:
    """1 when the completion's final answer equals the gold answer (itself extracted when it is a full
    solution with \\boxed{} or `####`), else 0."""
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


# ============================================================================ multiple choice

def extract_choice(text: str, n_choices: int) -> str | None:
    """The chosen letter: the last `Answer: X`, else the last \\boxed{X}, else "the answer is (X)", else a
    reply that is a lone letter."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_choices]
    text = strip_reasoning(text)
    cls = f"[{letters}]"
    for pattern in (rf"(?i:answer)\s*:\s*\**\s*\(?\s*({cls})\b", rf"\\boxed\{{\s*(?:\\text\{{)?({cls})\b",
                    rf"(?i:the answer is)\s*\(?({cls})\b"):
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    m = re.fullmatch(rf"\s*\(?({cls})\)?[.)]?\s*", text)
    return m.group(1) if m else None


def verify_choice(completion: str, gold_letter: str, n_choices: int) -> VerifierResult:
    start = time.perf_counter()
    got = extract_choice(completion, n_choices)
    if got is None:
        return VerifierResult(0.0, "no choice letter found", time.perf_counter() - start)
    ok = got == gold_letter.strip().upper()
    return VerifierResult(float(ok), f"chose {got}, gold {gold_letter}", time.perf_counter() - start)


# ============================================================================ code sandbox

@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0          # wall clock, the whole process group is killed past it
    memory_mb: int = 1024           # RLIMIT_AS
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_file_mb: int = 16           # RLIMIT_FSIZE (also caps captured stdout/stderr)
    max_processes: int = 256        # RLIMIT_NPROC (per uid; enforced once the child is not root)


@dataclass(frozen=True)
class SandboxResult:
    status: str         # passed | failed | timeout | crashed
    reason: str
    seconds: float


NOBODY = 65534
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# Runs first in the sandboxed interpreter: an audit hook cannot be removed once added.
_GUARD = r"""
import os, runpy, sys
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
DENY = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "ctypes.dlopen", "ctypes.dlsym"}
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
               "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "os.replace": 2, "os.symlink": 2,
               "os.link": 2, "os.chflags": 1, "os.setxattr": 1, "os.removexattr": 1}
def inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == ROOT or real.startswith(ROOT + os.sep)
def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and not inside(path):
            raise PermissionError(f"sandbox: write outside the sandbox directory refused: {path}")
    elif event in DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event in PATH_EVENTS:
        for path in args[:PATH_EVENTS[event]]:
            if not inside(path):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory refused: {path}")
sys.addaudithook(guard)
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


def _scrubbed_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _preexec(limits: SandboxLimits, netns: bool, drop_to_nobody: bool):
    """Runs in the child between fork and exec: limits first, then the namespace (needs root), then the uid."""
    cpu = math.ceil(limits.timeout_s) + 1
    memory, fsize = limits.memory_mb << 20, limits.max_file_mb << 20
    unshare_flags = _CLONE_NEWNET | (0 if os.geteuid() == 0 else _CLONE_NEWUSER)
    libc = _libc() if netns else None

    def setup():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if libc is not None and libc.unshare(unshare_flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        if drop_to_nobody:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
    return setup


def _runs_as_nobody(python: str) -> bool:
    """True when uid 65534 can start `python` on a script in a fresh sandbox dir (the interpreter and the temp
    dir must both be reachable) and it is this Python's version."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    probe_dir = tempfile.mkdtemp(prefix="sandbox-probe-")
    try:
        script = Path(probe_dir) / "probe.py"
        script.write_text("import sys; print('%d.%d' % sys.version_info[:2])\n", encoding="utf-8")
        for path in (probe_dir, script):
            os.chown(path, NOBODY, NOBODY)
        out = subprocess.run([python, "-I", "-B", "probe.py"], cwd=probe_dir, user=NOBODY, group=NOBODY,
                             extra_groups=[], capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and out.stdout.strip() == want
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


@lru_cache(maxsize=1)
def sandbox_setup() -> tuple[str, tuple[str, ...]]:
    """(interpreter, layers) for this host, probed once. Layers: rlimits and audit_hook always; netns when
    unshare(CLONE_NEWNET) works here; uid_nobody when running as root and uid 65534 can reach both the temp
    dir and an interpreter of this Python version (this one, else the system's: programs under test need
    only the standard library)."""
    layers = ["rlimits", "audit_hook"]
    try:
        subprocess.run(["/bin/true"], preexec_fn=_preexec(SandboxLimits(), True, False), check=True)
        layers.append("netns")
    except (subprocess.SubprocessError, OSError):
        pass
    python = sys.executable
    if os.geteuid() == 0:
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
            if Path(candidate).is_file() and _runs_as_nobody(candidate):
                python = candidate
                layers.append("uid_nobody")
                break
    return python, tuple(layers)


def _error_line(stderr: str, sandbox_dir: str) -> str:
    """The last line of a traceback ("NameError: name 'x' is not defined"), the sandbox path masked."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no error output"
    return last.replace(sandbox_dir, "<sandbox>")[:300]


class _Run:
    """One started sandbox: its temp dir, process and deadline."""

    def __init__(self, program: str, limits: SandboxLimits):
        python, layers = sandbox_setup()
        self.limits = limits
        self.dir = tempfile.mkdtemp(prefix="sandbox-")
        (Path(self.dir) / "main.py").write_text(program, encoding="utf-8")
        (Path(self.dir) / "guard.py").write_text(_GUARD, encoding="utf-8")
        drop = "uid_nobody" in layers
        if drop:
            for path in (self.dir, *(os.path.join(self.dir, f) for f in ("main.py", "guard.py"))):
                os.chown(path, NOBODY, NOBODY)
        self.stdout = open(os.path.join(self.dir, ".stdout"), "wb")
        self.stderr = open(os.path.join(self.dir, ".stderr"), "wb")
        self.start = time.monotonic()
        try:
            self.proc = subprocess.Popen([python, "-I", "-B", "guard.py"], cwd=self.dir,
                                         env=_scrubbed_env(self.dir), stdin=subprocess.DEVNULL,
                                         stdout=self.stdout, stderr=self.stderr, start_new_session=True,
                                         preexec_fn=_preexec(limits, "netns" in layers, drop))
        except BaseException:
            self.stdout.close()
            self.stderr.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def finish(self, timed_out: bool) -> SandboxResult:
        if timed_out:
            _kill_group(self.proc)
        seconds = time.monotonic() - self.start
        self.stdout.close()
        self.stderr.close()
        stderr = Path(self.stderr.name).read_bytes()[-8192:].decode("utf-8", "replace")
        shutil.rmtree(self.dir, ignore_errors=True)
        code = self.proc.returncode
        if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult("timeout", f"timeout after {self.limits.timeout_s:g} s", seconds)
        if code == 0:
            return SandboxResult("passed", "passed", seconds)
        if code < 0:
            return SandboxResult("crashed", f"killed by {signal.Signals(-code).name}", seconds)
        return SandboxResult("failed", _error_line(stderr, self.dir), seconds)


def run_programs_sandboxed(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
                           workers: int = 2) -> list[SandboxResult]:
    """Run each program (a whole Python script) in its own sandbox, `workers` at a time; results in order.

    A program passes when it exits 0; a failure's reason is the error line of its traceback."""
    results: list[SandboxResult | None] = [None] * len(programs)
    running: dict[int, _Run] = {}
    queue = list(enumerate(programs))
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                i, program = queue.pop(0)
                running[i] = _Run(program, limits)
            for i, run in list(running.items()):
                overdue = time.monotonic() - run.start > limits.timeout_s
                if run.proc.poll() is not None or overdue:
                    results[i] = run.finish(timed_out=run.proc.returncode is None)
                    del running[i]
            time.sleep(0.005)
    finally:
        for run in running.values():
            run.finish(timed_out=True)
    return results


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval's protocol: prompt + completion, then the test code, then `check(entry_point)`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def verify_code(program: str, limits: SandboxLimits = SandboxLimits()) -> VerifierResult:
    """1 when the program (solution + tests) exits cleanly in the sandbox, else 0 with the failure."""
    result = run_programs_sandboxed([program], limits, workers=1)[0]
    return VerifierResult(float(result.status == "passed"), result.reason, result.seconds)


def verify_code_batch(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
                      workers: int = 2) -> list[VerifierResult]:
    return [VerifierResult(float(r.status == "passed"), r.reason, r.seconds)
            for r in run_programs_sandboxed(programs, limits, workers)]


# ============================================================================ tool calls (BFCL AST)

class ToolCallParseError(ValueError):
    pass


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: dict


_SAFE_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def _literal(node: ast.AST) -> Any:
    """A call argument's value: literals, lists, tuples, dicts, negative numbers, bare names (as strings,
    BFCL's convention for variables), nested calls (as their source) and + - * / on numbers; never eval."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if not isinstance(value, (int, float)):
            raise ToolCallParseError(f"unary minus on a non-number: {ast.unparse(node)}")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(v) for v in node.elts)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        return ast.unparse(node)
    if isinstance(node, ast.BinOp) and type(node.op) in _SAFE_BINOPS:
        a, b = _literal(node.left), _literal(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            try:
                return _SAFE_BINOPS[type(node.op)](a, b)
            except ZeroDivisionError as exc:
                raise ToolCallParseError(f"division by zero in {ast.unparse(node)}") from exc
    raise ToolCallParseError(f"unsupported argument expression: {ast.unparse(node)}")


def _call_name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise ToolCallParseError(f"not a function name: {ast.unparse(func)}")
    parts.append(func.id)
    return ".".join(reversed(parts))


def _json_calls(obj: Any) -> list[FunctionCall]:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            raise ToolCallParseError(f"a JSON tool call needs a name: {json.dumps(item)[:200]}")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, dict):
            raise ToolCallParseError(f"arguments of {item['name']} are not an object")
        calls.append(FunctionCall(str(item["name"]), args))
    return calls


def parse_function_calls(text: str) -> list[FunctionCall]:
    """Function calls in a model reply: JSON (`{"name":..., "arguments":...}`, a list of them, or
    `<tool_call>` blocks) or Python call syntax (`f(a=1)`, `[f(a=1), g(b=[2])]`), code fences stripped."""
    text = strip_reasoning(text).strip()
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    fenced = re.fullmatch(r"```[a-zA-Z]*\n?(.*?)\n?```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        if blocks:
            return [c for block in blocks for c in _json_calls(json.loads(block))]
        if text[:1] in "{[" and not re.match(r"\[\s*[A-Za-z_]", text):
            return _json_calls(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ToolCallParseError(f"invalid JSON tool call: {exc}") from exc
    source = text if text.startswith("[") else f"[{text}]"
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ToolCallParseError(f"not a Python call list: {exc.msg}") from exc
    elts = tree.body.elts if isinstance(tree.body, ast.List) else [tree.body]
    calls = []
    for node in elts:
        if not isinstance(node, ast.Call):
            raise ToolCallParseError(f"not a function call: {ast.unparse(node)[:200]}")
        if node.args:
            raise ToolCallParseError(f"{_call_name(node.func)}: positional arguments are not supported")
        calls.append(FunctionCall(_call_name(node.func), {kw.arg: _literal(kw.value) for kw in node.keywords}))
    return calls


# BFCL's Python type mapping; "tuple" values arrive as lists after JSON, "any" is checked as a string.
BFCL_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
              "dict": dict, "any": str}


def _standardize(s: str) -> str:
    """BFCL's string comparison: spaces and ,./-_*^ removed, lower case, ' -> "."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return _standardize(v) if isinstance(v, str) else v


def _dict_matches(value: dict, allowed: list) -> str | None:
    """None when the dict matches one allowed dict (each key's value among that key's allowed values,
    keys allowed to be missing only when "" is among their values), else why not."""
    why = f"no allowed value matches {value!r}"
    for option in allowed:
        if option == "":
            continue
        bad = next((k for k in value if k not in option or _std(value[k]) not in [_std(a) for a in option[k]]),
                   None)
        missing = next((k for k, vals in option.items() if k not in value and "" not in vals), None)
        if bad is None and missing is None:
            return None
        why = f"dict key {bad!r} has a value not allowed" if bad is not None else f"dict key {missing!r} missing"
    return why


def _type_ok(value: Any, expected: type, item_type: type | None, allowed: list) -> tuple[bool, bool]:
    """(ok, is_variable): the value has the declared type (lists: items too), or the type of the allowed
    answers when those differ from the declared one (BFCL's convention for a variable name)."""
    answer_type = next((type(a) for a in allowed if a != ""), None)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item_type is None or all(type(x) is item_type for x in value):
            return True, is_variable
    return answer_type is not None and type(value) is answer_type, True


def match_one_call(call: FunctionCall, function: dict, answer: dict) -> str | None:
    """None when `call` matches one BFCL ground-truth entry {name: {param: [allowed values]}}, else why."""
    name, allowed_params = next(iter(answer.items()))
    if call.name != name:
        return f"function {call.name!r} is not {name!r}"
    schema = function["parameters"]
    properties, required = schema.get("properties", {}), schema.get("required", [])
    for param in required:
        if param not in call.arguments:
            return f"{name}: missing required parameter {param!r}"
    for param, value in call.arguments.items():
        if param not in properties or param not in allowed_params:
            return f"{name}: unexpected parameter {param!r}"
        allowed = allowed_params[param]
        declared = properties[param]["type"]
        expected = BFCL_TYPES.get(declared, str)
        item_type = None
        if declared in ("array", "tuple"):
            item_type = BFCL_TYPES.get(properties[param].get("items", {}).get("type"))
        if isinstance(value, tuple):
            value = list(value)
        if expected is float and type(value) is int:  # BFCL allows Python's int -> float promotion
            value = float(value)
        ok, is_variable = _type_ok(value, expected, item_type, allowed)
        if not ok:
            return f"{name}: parameter {param!r} should be {declared}, got {type(value).__name__}"
        if not is_variable and expected is dict:
            why = _dict_matches(value, allowed)
        elif not is_variable and expected is list and item_type is dict:
            options = [opt for opt in allowed if opt != "" and len(opt) == len(value)]
            why = None if any(all(_dict_matches(v, [o]) is None for v, o in zip(value, opt)) for opt in options) \
                else "list of dicts not among the allowed values"
        elif not is_variable and expected in (str, list):
            std_value = [_std(v) for v in value] if expected is list else _std(value)
            std_allowed = [[_std(v) for v in a] if isinstance(a, list) else _std(a) for a in allowed]
            why = None if std_value in std_allowed else "value not among the allowed values"
        else:
            why = None if value in allowed else "value not among the allowed values"
        if why is not None:
            return f"{name}: parameter {param!r} = {value!r}: {why} {allowed!r}"
    for param, allowed in allowed_params.items():
        if param not in call.arguments and "" not in allowed:
            return f"{name}: parameter {param!r} missing and not optional"
    return None


def match_function_calls(calls: list[FunctionCall], functions: list[dict],
                         possible_answer: list[dict]) -> str | None:
    """BFCL AST check, order-free: as many calls as ground-truth entries, and each entry matched by a
    distinct call (greedy, in ground-truth order, as BFCL's checker does). None when all match, else why."""
    if len(calls) != len(possible_answer):
        return f"wrong number of calls: {len(calls)} for {len(possible_answer)} expected"
    by_name = {f["name"]: f for f in functions}
    used: set[int] = set()
    for answer in possible_answer:
        name = next(iter(answer))
        if name not in by_name:
            return f"ground truth names {name!r}, which is not among the functions"
        why = f"no call matches {name!r}"
        for i, call in enumerate(calls):
            if i in used:
                continue
            reason = match_one_call(call, by_name[name], answer)
            if reason is None:
                used.add(i)
                break
            why = reason
        else:
            return why
    return None


def verify_tool_calls(completion: str, functions: list[dict], possible_answer: list[dict]) -> VerifierResult:
    """1 when the reply's function calls match BFCL's possible answers (AST match), else 0."""
    start = time.perf_counter()
    try:
        calls = parse_function_calls(completion)
    except (ToolCallParseError, RecursionError) as exc:
        return VerifierResult(0.0, f"unparseable: {exc}", time.perf_counter() - start)
    why = match_function_calls(calls, functions, possible_answer)
    return VerifierResult(float(why is None), why or "all calls match", time.perf_counter() - start)


def _example_value(allowed: list) -> Any:
    """The first allowed value that is not the "optional" marker, with BFCL's nested dict form
    {key: [allowed values]} resolved the same way."""
    value = next((v for v in allowed if v != ""), "")
    if isinstance(value, dict):
        return {k: _example_value(vs) for k, vs in value.items() if any(v != "" for v in vs)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [{k: _example_value(vs) for k, vs in d.items() if any(v != "" for v in vs)} for d in value]
    return value


def call_source(answer: dict) -> str:
    """A ground-truth entry written as the Python call it describes (first allowed value of each parameter,
    parameters that may only be absent left out): what a perfect model would answer."""
    name, params = next(iter(answer.items()))
    args = ", ".join(f"{k}={_example_value(v)!r}" for k, v in params.items() if any(x != "" for x in v))
    return f"{name}({args})"


def calls_source(possible_answer: Iterable[dict]) -> str:
    return "[" + ", ".join(call_source(a) for a in possible_answer) + "]"
