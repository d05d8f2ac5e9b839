"""Print where a finished run's results are (what `make demo` ends with)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", default="tiny")
    args = ap.parse_args()
    art = REPO / "artifacts" / args.scale
    report = art / "report" / "report.md"
    funnel = art / "funnel" / "funnel.md"
    plan = art / "schedule" / "plan.json"
    if report.is_file():
        print(f"Report card: {report}")
    if funnel.is_file():
        print(f"Data funnel: {funnel}")
    if plan.is_file():
        phases = json.loads(plan.read_text())["phases"]
        print(f"FG-WSD plan:  {plan} ({len(phases)} phases)")
    final = art / "pretrain" / "final"
    if final.is_dir():
        print(f"Base model:   {final}")
    print(f"All artifacts: {art}")


if __name__ == "__main__":
    main()
