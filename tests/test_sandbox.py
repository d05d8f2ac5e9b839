"""The code sandbox: every attack is contained and reported as a failure without crashing the caller, under
bwrap with and without the audit hook (the kernel layers alone) and under the fallback layers."""
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import pytest

from stages.common import REPO
from stages.verifiers import sandbox as sb

FAST = sb.SandboxLimits(timeout_s=1.0, memory_mb=512, max_file_mb=4, max_processes=64)
ISO = sb.sandbox_setup()
KERNEL_ONLY = dataclasses.replace(ISO, layers=tuple(layer for layer in ISO.layers if layer != "audit_hook"))
needs_bwrap = pytest.mark.skipif(ISO.kind != "bwrap", reason=f"bwrap unavailable here: {ISO.note}")
ESCAPED = os.path.join(tempfile.mkdtemp(prefix="sandbox-test-host-"), "escaped.txt")   # a host dir of ours
ENV_VAR = "SANDBOX_TEST_REPO"

# name -> (program, statuses that count as contained); every attack must fail or time out, never pass
ATTACKS = {
    "read_project_file": (f"print(open({str(REPO / 'params.yaml')!r}).read()[:20])\n", {"failed"}),
    "read_repo_from_env": (f"import os\nprint(open(os.path.join(os.environ.get({ENV_VAR!r}, '/nowhere'), "
                           f"'params.yaml')).read()[:20])\n", {"failed"}),
    "list_repo": (f"import os\nprint(os.listdir({str(REPO)!r}))\n", {"failed"}),
    "read_venv_python": (f"open({sys.executable!r}, 'rb').read(4)\n", {"failed"}),
    "write_host_tmp": (f"open({ESCAPED!r}, 'w').write('x')\n", {"failed"}),
    "write_usr": ("open('/usr/sandbox-escape', 'w').write('x')\n", {"failed"}),
    "socket_loopback": ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=0.5)\n", {"failed"}),
    "socket_internet": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=0.5)\n", {"failed"}),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", {"failed", "timeout"}),
    "memory_bomb": ("x = bytearray(8 << 30)\n", {"failed"}),
    "memory_growth": ("x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n", {"failed", "timeout"}),
    "infinite_loop": ("while True:\n    pass\n", {"timeout"}),
    "sleep_past_limit": ("import time\ntime.sleep(60)\n", {"timeout"}),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)\nassert False, 'ran on'\n", {"failed"}),
    "kill_everything": ("import os\nos.kill(-1, 9)\nassert False, 'ran on'\n", {"failed"}),
    "stdout_flood": ("import sys\nsys.stdout.write('x' * (64 << 20))\n", {"failed"}),
    "print_flood": ("while True:\n    print('x' * 4096)\n", {"failed"}),
    "sys_exit_0": ("import sys\nsys.exit(0)\nassert False\n", {"failed"}),
    "os_exit_0": ("import os\nos._exit(0)\nassert False\n", {"failed"}),
    "atexit_os_exit": ("import atexit, os\natexit.register(os._exit, 0)\nassert False\n", {"failed"}),
    "atexit_system_exit": ("import atexit, sys\ndef bye():\n    raise SystemExit(0)\natexit.register(bye)\n"
                           "sys.exit(1)\n", {"failed"}),
    "close_stdout_then_exit": ("import os, sys\nsys.stdout.close()\nos._exit(0)\n", {"failed"}),
    # every inherited fd, whatever its number (the harness's channel is the parent's fd number, >= 1024 in a long
    # pytest process): the harness cannot report its end, so the program fails
    "close_all_fds": ("import os\nos.closerange(3, 1 << 20)\n", {"failed"}),
    "thread_exits_early": ("import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                           "time.sleep(5)\n", {"failed", "timeout"}),
}
# what an honest program does must still pass
HONEST = {
    "write_and_read_own_dir": "open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n",
    "tempfile": "import tempfile\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n",
    "stdlib": "import json, re, collections, itertools, functools, heapq, fractions, math, random, string\n"
              "assert json.loads('[1]') == [1] and math.gcd(12, 18) == 6\n",
    "some_output": "print('y' * (1 << 20))\n",
}
ALL = {**{k: p for k, (p, _) in ATTACKS.items()}, **HONEST}


def _run_all(iso):
    os.environ[ENV_VAR] = str(REPO)   # the parent's environment names the repo; the sandbox's must not
    try:
        start = time.monotonic()
        results = sb.run_programs_sandboxed(list(ALL.values()), FAST, workers=2, isolation=iso)
        return dict(zip(ALL, results)), time.monotonic() - start
    finally:
        del os.environ[ENV_VAR]


@pytest.fixture(scope="module")
def outcomes():
    """Each isolation mode's results over all programs, run once per module (the whole file stays short)."""
    modes = {"fallback": sb.fallback_isolation("forced by the test")}
    if ISO.kind == "bwrap":
        modes.update(bwrap=ISO, kernel_only=KERNEL_ONLY)
    yield {mode: _run_all(iso) for mode, iso in modes.items()}
    shutil.rmtree(os.path.dirname(ESCAPED))


MODES = ["bwrap", "kernel_only"]


@needs_bwrap
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_contained(outcomes, mode, attack):
    result = outcomes[mode][0][attack]
    assert result.status in ATTACKS[attack][1], result
    assert result.isolation == "bwrap" and "fallback" not in result.reason


@pytest.mark.parametrize("mode", ["bwrap", "kernel_only", "fallback"])
@pytest.mark.parametrize("program", HONEST)
def test_honest_program_passes(outcomes, mode, program):
    if mode not in outcomes:
        pytest.skip(f"bwrap unavailable here: {ISO.note}")
    assert outcomes[mode][0][program].status == "passed", outcomes[mode][0][program]


@needs_bwrap
@pytest.mark.parametrize("mode", MODES)
def test_limits_hold_and_nothing_escaped(outcomes, mode):
    results, seconds = outcomes[mode]
    for name in ("infinite_loop", "sleep_past_limit"):
        assert results[name].seconds < FAST.timeout_s + 1, results[name]
    assert "MemoryError" in results["memory_bomb"].reason
    assert "File too large" in results["stdout_flood"].reason
    assert "no completion nonce" in results["os_exit_0"].reason
    assert not os.path.exists(ESCAPED) and not os.path.exists("/usr/sandbox-escape")
    assert seconds < 30


def test_fallback_contains_what_its_layers_can_and_says_so(outcomes):
    results, _ = outcomes["fallback"]
    assert all("[isolation: fallback, forced by the test]" in r.reason for r in results.values())
    assert all(r.isolation == "fallback" for r in results.values())
    # reads of world-readable files are what the fallback cannot stop (the reason bwrap exists)
    for name, (_, contained) in ATTACKS.items():
        if name not in ("read_project_file", "list_repo", "read_venv_python"):
            assert results[name].status in contained, (name, results[name])


@needs_bwrap
def test_kernel_layers_inside_bwrap():
    program = (f"import os, socket\nassert os.getuid() == {sb.NOBODY} and os.getgid() == {sb.NOBODY}\n"
               "assert [n for _, n in socket.if_nameindex()] == ['lo']\n"
               "assert os.getpid() <= 3, os.getpid()\n"                          # a fresh pid namespace
               "assert socket.gethostname() == 'sandbox'\n"
               "assert not os.path.exists('/work') and not os.path.exists('/etc') and not os.path.exists('/root')\n"
               "assert os.getcwd() == '/sandbox' and set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', "
               "'PYTHONHASHSEED', 'PWD'}\n")
    result, = sb.run_programs_sandboxed([program], FAST, workers=1, isolation=KERNEL_ONLY)
    assert result.status == "passed", result


@needs_bwrap
def test_a_fork_bomb_does_not_starve_its_neighbour():
    bomb, neighbour = sb.run_programs_sandboxed(
        ["import os\nwhile True:\n    os.fork()\n", "import os, time\ntime.sleep(0.3)\nos.fork()\n"],
        sb.SandboxLimits(timeout_s=2, memory_mb=512, max_processes=64), workers=2, isolation=KERNEL_ONLY)
    assert bomb.status in ("failed", "timeout") and neighbour.status == "passed", (bomb, neighbour)


def test_setup_uses_bwrap_when_installed():
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed (make venv installs it when run as root)")
    assert ISO.kind == "bwrap" or ISO.note.startswith("bwrap probe failed"), ISO


def test_setup_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    missing = sb.sandbox_setup.__wrapped__()
    assert (missing.kind, missing.note) == ("fallback", "bwrap not installed")
    monkeypatch.undo()
    if shutil.which("bwrap") is None:
        return
    monkeypatch.setattr(sb, "_bwrap_argv", lambda *args: ["bwrap", "--no-such-option"])   # bwrap that cannot start
    broken = sb.sandbox_setup.__wrapped__()
    assert broken.kind == "fallback" and broken.note.startswith("bwrap probe failed"), broken
    result, = sb.run_programs_sandboxed(["pass\n"], FAST, workers=1, isolation=broken)
    assert result.status == "passed" and "[isolation: fallback, bwrap probe failed" in result.reason


def test_reports_error_line_and_leaves_no_temp_dirs(monkeypatch):
    base = tempfile.mkdtemp(prefix="sandbox-test-")
    os.chmod(base, 0o711)  # reachable by the sandbox's uid, as the system temp dir is
    monkeypatch.setattr(tempfile, "tempdir", base)
    try:
        assertion, name, tail = sb.run_programs_sandboxed(
            ["assert 1 == 2, 'nope'\n", "undefined_name\n",
             "import sys\nsys.stderr.write('e' * (2 << 20))\nraise ValueError('last words')\n"], FAST, workers=2)
        assert (assertion.reason.split(" [")[0], name.reason.split(" [")[0], tail.reason.split(" [")[0]) == (
            "AssertionError: nope", "NameError: name 'undefined_name' is not defined", "ValueError: last words")
        assert os.listdir(base) == []
    finally:
        shutil.rmtree(base)
