"""Keep DVC's record of the DAG current after a Snakemake run (the Snakefile's `onsuccess:` calls this).

Snakemake and DVC run the same DAG (dvc.yaml is generated from it) but keep separate records of what is
built: Snakemake its metadata under .snakemake/, DVC dvc.lock. After Snakemake succeeds, `dvc commit` of
the stages whose rules were in its DAG writes their deps, params and outs hashes to dvc.lock (the files stay
as they are: DVC hashes and caches them without relinking), so `dvc status` / `dvc repro` find nothing to do.
The other direction is the generated DVC stage `all` (tools/gen_dvc.py): after DVC built the DAG,
`snakemake --touch --no-hooks` records it in Snakemake's metadata (params, input set, mtimes in DAG order)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def record_in_dvc(config: dict, rules: set[str], root: Path = REPO) -> list[str]:
    """`dvc commit` the dvc.yaml stages among `rules`; returns them. Skipped (with a note) when there is no DVC
    repo, or Snakemake ran with a config other than params.yaml (`--config ...`): dvc.lock would record params
    the outputs were not built with."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return []
    if config != yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")):
        print("runner sync: Snakemake ran with --config overrides, so dvc.lock is left as it was "
              "(`dvc status` will show these stages as changed)", file=sys.stderr)
        return []
    every = set(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    stages = sorted(every & rules)
    if stages:
        # --no-relink: the workspace files stay as Snakemake wrote them (a relink rewrites them, hard-linked
        # checkpoints among them, in no DAG order, and newer inputs than outputs would make Snakemake rerun).
        # `dvc commit` handles its targets one at a time, parsing dvc.yaml and rewriting dvc.lock for each (ruamel,
        # ~3.5 s a stage here: 104 s for the tiny DAG's 29); with no target it does all stages in one pass (27 s).
        # Never more than what ran: committing a stage Snakemake did not check would record stale outputs as current.
        targets = [] if every <= rules else stages
        proc = subprocess.run(["dvc", "commit", "--force", "--no-relink", *targets], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode != 0:  # the build itself succeeded: say why DVC will see these stages as changed
            print(f"runner sync: `dvc commit` failed, dvc.lock is not current:\n{proc.stderr}", file=sys.stderr)
            return []
    return stages
