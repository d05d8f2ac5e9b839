"""Running untrusted Python programs (a generated solution and its tests), `workers` at a time.

Isolation, chosen once per process by `sandbox_setup()`:
  bwrap     bubblewrap (`bwrap`): fresh user, pid, network, ipc, uts, mount and cgroup namespaces (--unshare-all),
            uid/gid 65534 inside, --die-with-parent, --new-session. The file system is /usr (with the /bin and
            /lib* links) read-only, a private /proc and /dev, a size-capped tmpfs /tmp and a size-capped tmpfs
            working dir /sandbox holding the program read-only. Nothing else: not the project, not the venv,
            not /etc, /home or /root. The system interpreter /usr/bin/python3 runs the program (else our base
            interpreter's prefix is bound read-only; never the venv, which lives in the project).
  fallback  when bwrap is missing or cannot create its namespaces: the interpreter runs on the host in a fresh
            temp dir, in a fresh network namespace (when unshare works) and as uid 65534 (when we are root);
            world-readable files, the project's among them, stay readable. Every result then says so.
Both: rlimits set before exec (RLIMIT_AS, CPU, FSIZE, NOFILE, CORE = 0; NPROC too when we are root and drop the
uid, since it counts per uid and never binds root: under bwrap each run gets its own unused host uid, 65534
inside, so a fork bomb cannot starve the others); `python -I -B` in a scrubbed environment; an
irremovable audit hook refusing writes outside the working dir, sockets, subprocesses, fork, kill and ctypes,
as an inner layer; a wall-clock limit that kills the whole process group (bwrap's pid namespace dies with it);
stdout and stderr go to files capped by RLIMIT_FSIZE, and only the last 8 KiB of stderr is read back.

A pass needs exit status 0 AND a per-run random nonce, which the harness writes to its own file descriptor
after the program has run to its end: a program that leaves early (sys.exit(0), os._exit(0), SystemExit from
an atexit hook, closing the descriptor) fails. The nonce stops early exits; it is not a secret from a program
that searches the harness's memory, which under bwrap still reaches nothing outside the sandbox.
Sandboxes are started without threads (a poll loop), since preexec hooks are not thread-safe.
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

NOBODY = 65534
_RUN_UIDS = 1 << 30             # bwrap runs as a random host uid in [2^30, 2^31): no account uses those
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PROJECT = Path(__file__).resolve().parents[2]
_STDERR_TAIL = 8192


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0          # wall clock, the whole process group is killed past it
    memory_mb: int = 1024           # RLIMIT_AS
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_file_mb: int = 16           # RLIMIT_FSIZE (also caps captured stdout/stderr)
    max_processes: int = 256        # RLIMIT_NPROC (per uid; set when we are root and the child runs as 65534)
    disk_mb: int = 64               # bwrap: size of each tmpfs (/sandbox and /tmp)


@dataclass(frozen=True)
class SandboxResult:
    status: str         # passed | failed | timeout | crashed
    reason: str
    seconds: float
    isolation: str      # bwrap | fallback


@dataclass(frozen=True)
class Isolation:
    """How programs run here: kind bwrap or fallback, the interpreter, the layers, why not bwrap (fallback).
    Tests drop "audit_hook" from the layers to show what the kernel layers contain on their own."""
    kind: str
    python: str
    layers: tuple[str, ...]
    note: str = ""
    python_binds: tuple[str, ...] = ()


# Runs first in the sandboxed interpreter: an audit hook cannot be removed once added.
_HARNESS = r"""
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
def main():
    done_fd, hook, nonce = int(sys.argv[1]), sys.argv[2] == "hook", sys.stdin.readline().strip().encode()
    if hook:
        sys.addaudithook(guard)
    sys.argv = ["main.py"]
    runpy.run_path("main.py", run_name="__main__")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(done_fd, nonce)
    os._exit(0)
main()
"""


def scrubbed_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _preexec(limits: SandboxLimits, netns: bool, run_as: int | None):
    """Runs in the child between fork and exec: limits first, then the namespace (fallback), then the uid."""
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
        if run_as is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
            os.setgroups([])
            os.setgid(run_as)
            os.setuid(run_as)
    return setup


def _run_uid(iso: Isolation) -> int | None:
    """The host uid a run drops to when we are root: under bwrap a fresh unused one per run (65534 inside), so
    that RLIMIT_NPROC, which counts per uid, is per run and a fork bomb cannot starve the other sandboxes;
    in the fallback 65534 (its audit hook refuses fork)."""
    if os.geteuid() != 0:
        return None
    if iso.kind == "bwrap":
        return _RUN_UIDS + secrets.randbelow(_RUN_UIDS)
    return NOBODY if "uid_nobody" in iso.layers else None


def _harness_args(iso: Isolation, done_fd: int) -> list[str]:
    return [str(done_fd), "hook" if "audit_hook" in iso.layers else "no-hook"]


def _bwrap_argv(iso: Isolation, box: str, limits: SandboxLimits, done_fd: int) -> list[str]:
    """bwrap's command line: namespaces, read-only system dirs, two size-capped tmpfs, the program read-only."""
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--uid", str(NOBODY),
            "--gid", str(NOBODY), "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in iso.python_binds:
        argv += ["--ro-bind", path, path]
    size = str(limits.disk_mb << 20)
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp", "--size", size,
             "--tmpfs", "/sandbox", "--ro-bind", f"{box}/main.py", "/sandbox/main.py",
             "--ro-bind", f"{box}/harness.py", "/sandbox/.harness.py", "--chdir", "/sandbox",
             iso.python, "-I", "-B", ".harness.py", *_harness_args(iso, done_fd)]
    return argv


def _error_line(stderr: str, sandbox_dir: str) -> str:
    """The last line of a traceback ("NameError: name 'x' is not defined"), the sandbox path masked."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no error output"
    return last.replace(sandbox_dir, "<sandbox>")[:300]


def _tail(path: str, n: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - n))
        return fh.read()


class _Run:
    """One started sandbox: its temp dirs (box: what the program sees; base: our output files), process, nonce."""

    def __init__(self, program: str, limits: SandboxLimits, iso: Isolation):
        self.limits, self.iso = limits, iso
        self.base = tempfile.mkdtemp(prefix="sandbox-")
        self.box = os.path.join(self.base, "box")
        os.mkdir(self.box)
        (Path(self.box) / "main.py").write_text(program, encoding="utf-8")
        (Path(self.box) / "harness.py").write_text(_HARNESS, encoding="utf-8")
        run_as = _run_uid(iso)
        if run_as is not None:  # that uid must reach the box (bwrap binds from it; the fallback writes in it)
            os.chmod(self.base, 0o711)
            for path in (self.box, *(os.path.join(self.box, f) for f in ("main.py", "harness.py"))):
                os.chown(path, run_as, run_as)
        self.stdout = open(os.path.join(self.base, "stdout"), "wb")
        self.stderr = open(os.path.join(self.base, "stderr"), "wb")
        self.done = open(os.path.join(self.base, "done"), "wb")
        self.nonce = secrets.token_hex(16)
        if iso.kind == "bwrap":
            argv, cwd, home = _bwrap_argv(iso, self.box, limits, self.done.fileno()), self.base, "/sandbox"
        else:
            argv, cwd, home = [iso.python, "-I", "-B", "harness.py", *_harness_args(iso, self.done.fileno())], \
                self.box, self.box
        self.start = time.monotonic()
        try:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=scrubbed_env(home), stdin=subprocess.PIPE,
                                         stdout=self.stdout, stderr=self.stderr, pass_fds=(self.done.fileno(),),
                                         start_new_session=True,
                                         preexec_fn=_preexec(limits, "netns" in iso.layers, run_as))
        except BaseException:
            self._close_files()
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        try:
            self.proc.stdin.write(self.nonce.encode() + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it died at once: finish() reports how
            pass

    def _close_files(self) -> None:
        for fh in (self.stdout, self.stderr, self.done):
            fh.close()

    def finish(self, timed_out: bool) -> SandboxResult:
        if timed_out:
            kill_group(self.proc)
        seconds = time.monotonic() - self.start
        self._close_files()
        stderr = _tail(self.stderr.name, _STDERR_TAIL).decode("utf-8", "replace")
        finished = self.nonce.encode() in Path(self.done.name).read_bytes()  # a forked child may write it too
        shutil.rmtree(self.base, ignore_errors=True)
        code = self.proc.returncode
        # bwrap reports a child killed by signal s as exit status 128 + s
        signum = -code if code < 0 else code - 128 if self.iso.kind == "bwrap" and code > 128 else 0
        if timed_out or signum in (signal.SIGXCPU, signal.SIGKILL):
            status, reason = "timeout", f"timeout after {self.limits.timeout_s:g} s"
        elif code == 0 and finished:
            status, reason = "passed", "passed"
        elif code == 0:
            status, reason = "failed", "exited before the end of its tests (no completion nonce)"
        elif signum in signal.valid_signals():
            status, reason = "crashed", f"killed by {signal.Signals(signum).name}"
        else:
            status, reason = "failed", _error_line(stderr, self.box)
        if self.iso.kind != "bwrap":
            reason = f"{reason} [isolation: fallback, {self.iso.note}]"
        return SandboxResult(status, reason, seconds, self.iso.kind)


def run_programs_sandboxed(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                           isolation: Isolation | None = None) -> list[SandboxResult]:
    """Run each program (a whole Python script) in its own sandbox, `workers` at a time; results in order.

    A program passes when it runs to its end and exits 0; a failure's reason is the error line of its
    traceback. isolation: sandbox_setup()'s choice unless given (tests pass fallback_isolation())."""
    iso = isolation or sandbox_setup()
    results: list[SandboxResult | None] = [None] * len(programs)
    running: dict[int, _Run] = {}
    queue = list(enumerate(programs))
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                i, program = queue.pop(0)
                running[i] = _Run(program, limits, iso)
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


def _runs_as_nobody(python: str) -> bool:
    """True when uid 65534 can start `python` on a script in a fresh temp dir and it is this Python's version."""
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
def fallback_isolation(note: str = "bwrap not used") -> Isolation:
    """Today's host layers: rlimits and the audit hook always; netns when unshare(CLONE_NEWNET) works here;
    uid_nobody when we are root and uid 65534 can run an interpreter of this Python's version."""
    layers = ["rlimits", "audit_hook"]
    try:
        subprocess.run(["/bin/true"], preexec_fn=_preexec(SandboxLimits(), True, None), check=True)
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
    return Isolation("fallback", python, tuple(layers), note)


def _bwrap_python() -> tuple[str, tuple[str, ...]] | None:
    """The interpreter bwrap runs, and what to bind for it: the system python3, else our base interpreter's
    prefix read-only (None when that prefix lies inside the project)."""
    if os.path.isfile("/usr/bin/python3"):
        return "/usr/bin/python3", ()
    prefix = Path(sys.base_prefix).resolve()
    if prefix == _PROJECT or _PROJECT in prefix.parents:
        return None
    python = prefix / "bin" / "python3"
    return (str(python), () if prefix.parts[1:2] == ("usr",) else (str(prefix),)) if python.is_file() else None


_PROBE = f"""
import os
assert os.getuid() == {NOBODY}, os.getuid()
assert not os.path.exists({str(_PROJECT)!r}), "the project is visible"
assert [n for _, n in __import__("socket").if_nameindex()] == ["lo"], "a network interface is visible"
"""


@lru_cache(maxsize=1)
def sandbox_setup() -> Isolation:
    """bwrap when it is installed and a probe program runs under it as uid 65534, without the project or a
    network in sight; else fallback_isolation(), its note saying why."""
    if shutil.which("bwrap") is None:
        return fallback_isolation("bwrap not installed")
    found = _bwrap_python()
    if found is None:
        return fallback_isolation("no interpreter outside the project for bwrap")
    iso = Isolation("bwrap", found[0], ("namespaces", "readonly_fs", "rlimits", "audit_hook"), "", found[1])
    probe = run_programs_sandboxed([_PROBE], SandboxLimits(timeout_s=20), workers=1, isolation=iso)[0]
    if probe.status != "passed":
        return fallback_isolation(f"bwrap probe failed: {probe.reason[:120]}")
    return iso
