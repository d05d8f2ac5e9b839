"""Code sandbox throughput: executions/s under bwrap and under the fallback layers, same programs, same rlimits.

A benchmark script, never a timed test. `python bench/bench_sandbox.py [--repeats 5] [--workers 2] [--out DIR]`:
the programs are HumanEval's first --programs canonical solutions with their tests (what evaluation runs) plus
as many trivial `pass` programs (the fixed cost of one sandbox). Each repeat runs the whole list once per mode,
the modes alternating in ABBA order so drift on a shared machine hits both alike; executions/s = programs / wall
time, and the figure reported is the median over repeats. ratio = bwrap / fallback (below 1: bwrap is slower).
Every run must pass in both modes, else the figures would time different work. Writes OUT/bench_sandbox.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.verifiers.code import humaneval_program  # noqa: E402
from stages.verifiers.sandbox import SandboxLimits, fallback_isolation, run_programs_sandboxed, sandbox_setup  # noqa: E402


def benchmark_programs(n: int) -> dict[str, list[str]]:
    with gzip.open(REPO / "data" / "eval" / "humaneval" / "HumanEval.jsonl.gz", "rt") as fh:
        problems = [json.loads(line) for line in fh][:n]
    return {"humaneval": [humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
                          for p in problems],
            "trivial": ["pass\n"] * n}


def executions_per_s(programs: list[str], limits: SandboxLimits, workers: int, isolation) -> float:
    start = time.perf_counter()
    results = run_programs_sandboxed(programs, limits, workers, isolation=isolation)
    seconds = time.perf_counter() - start
    failed = [r for r in results if r.status != "passed"]
    if failed:
        raise SystemExit(f"{isolation.kind}: {len(failed)} programs did not pass, e.g. {failed[0]}")
    return len(programs) / seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=20, help="HumanEval problems (and as many trivial programs)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args(argv)
    bwrap = sandbox_setup()
    if bwrap.kind != "bwrap":
        raise SystemExit(f"bwrap is not usable here ({bwrap.note}): nothing to compare")
    modes = {"bwrap": bwrap, "fallback": fallback_isolation("benchmark")}
    limits = SandboxLimits(timeout_s=10.0)
    report = {"workers": args.workers, "repeats": args.repeats, "limits": dataclasses.asdict(limits),
              "fallback_layers": list(modes["fallback"].layers), "sets": {}}
    for name, programs in benchmark_programs(args.programs).items():
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.repeats):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                rates[mode].append(executions_per_s(programs, limits, args.workers, modes[mode]))
        medians = {mode: statistics.median(v) for mode, v in rates.items()}
        report["sets"][name] = {"programs": len(programs), "executions_per_s": rates, "median": medians,
                                "ratio_bwrap_over_fallback": medians["bwrap"] / medians["fallback"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sandbox.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"{'set':10s} {'programs':>8s} {'bwrap exec/s':>13s} {'fallback exec/s':>16s} {'ratio':>6s}")
    for name, s in report["sets"].items():
        print(f"{name:10s} {s['programs']:8d} {s['median']['bwrap']:13.1f} {s['median']['fallback']:16.1f} "
              f"{s['ratio_bwrap_over_fallback']:6.2f}")
    print(f"(median of {args.repeats} repeats, {args.workers} workers; fallback layers: "
          f"{', '.join(report['fallback_layers'])})")


if __name__ == "__main__":
    main()
