"""Dedup index at scale: wall time and peak RSS of the band-sharded index + merge vs named baselines, same run.

A benchmark script, never a timed test. `python bench/bench_dedup.py [--docs 1000000]`:

1. Workload: --docs synthetic sigs rows (filter.minhash's num_perm / bands / rows from params.yaml, band hashes by
   stages.filters.minhash.band_hashes, the schema the filter writes) in --shards shards. Most documents are random
   signatures (no near duplicate); CLUSTER_FRAC of them lie in planted clusters of 2-6, each member a copy of the
   cluster's previous member (a chain) or of its first (a star) with 2-30 minima rewritten (J^ to its parent 0.73-
   0.98), shuffled over all shards; and BIG_BUCKET_DOCS copies of one document with 1-3 minima rewritten: buckets
   far above dedup.bucket_window, so the window cap is exercised.
2. Ours, sharded: `stages.dedup edges --bands LO-HI` once per range of --band-shards ranges (one after the other
   here; separate SLURM jobs in the pipeline), then `stages.dedup merge`. Also `stages.dedup index` (every range
   and the merge in one process).
3. Baselines, on the same shards in the same run: (a) `today`: stages/dedup.py as of --baseline-commit (the
   first-verified-earlier-member index, all signatures in memory, one process); (b) datasketch MinHashLSH
   (params (bands, rows), LeanMinHash from the same minima) insert + query of every document, on the first
   --datasketch-docs documents only (pure Python per document), against ours on the same subset.
4. Each command is a subprocess measured by bench_data.run_measured: wall, CPU and peak RSS from os.wait4.

Figures on a shared machine (2 cores, other users) are noisy. Writes bench/out/bench_dedup.json, prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_data import run_measured  # noqa: E402  (bench/ and the repo root are put on the path just above)
from stages import common  # noqa: E402
from stages.filters import minhash  # noqa: E402

P31 = (1 << 31) - 1
CLUSTER_FRAC = 0.10
BIG_BUCKET_DOCS = 2000
DEFAULT_BASELINE = "3a32d14"  # the last commit with the first-verified-member index


def list_column(matrix: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel(), value_type))


def planted_signatures(rng: np.random.Generator, n_docs: int, num_perm: int) -> tuple[np.ndarray, int]:
    """The cluster and big-bucket members, (M, num_perm) uint64, and how many duplicates they plant."""
    def rewrite(sig: np.ndarray, k: int) -> np.ndarray:
        out = sig.copy()
        pos = rng.choice(num_perm, k, replace=False)
        out[pos] = (out[pos] + rng.integers(1, P31, k, dtype=np.uint64)) % np.uint64(P31)
        return out

    members, planted = [], 0
    big = rng.integers(0, P31, num_perm, dtype=np.uint64)
    members += [big] + [rewrite(big, int(rng.integers(1, 4))) for _ in range(BIG_BUCKET_DOCS - 1)]
    planted += BIG_BUCKET_DOCS - 1
    while len(members) < CLUSTER_FRAC * n_docs:
        cluster = [rng.integers(0, P31, num_perm, dtype=np.uint64)]
        for _ in range(int(rng.integers(1, 6))):
            parent = cluster[-1] if rng.random() < 0.5 else cluster[0]
            cluster.append(rewrite(parent, int(rng.integers(2, 31))))
        members += cluster
        planted += len(cluster) - 1
    return np.stack(members), planted


def write_workload(out: Path, n_docs: int, n_shards: int, mp: dict, seed: int) -> dict:
    """--shards sigs shards of `n_docs` rows, the planted members at random places; returns its description."""
    rng = np.random.default_rng(seed)
    members, planted = planted_signatures(rng, n_docs, mp["num_perm"])
    where = rng.permutation(n_docs)[: len(members)]  # document index of each planted member
    schema = minhash.sigs_schema(mp, store_signature=True)
    bounds = np.linspace(0, n_docs, n_shards + 1).astype(np.int64)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        sig = rng.integers(0, P31, (hi - lo, mp["num_perm"]), dtype=np.uint64)
        here = (where >= lo) & (where < hi)
        sig[where[here] - lo] = members[here]
        shard = f"s{k:03d}"
        ids = [f"{shard}-{i:07d}" for i in range(hi - lo)]
        table = pa.table({"id": ids, "shard": [shard] * (hi - lo), "row": np.arange(hi - lo),
                          "approx_tokens": rng.integers(50, 2000, hi - lo), "exact_hash": ids,
                          "bands": list_column(minhash.band_hashes(sig, mp["bands"], mp["rows"]), pa.uint64()),
                          "minhash": list_column(sig.astype(np.uint32), pa.uint32())}, schema=schema)
        common.write_table(out / f"{shard}.parquet", table)
    return {"docs": n_docs, "shards": n_shards, "planted_members": len(members), "planted_duplicates": planted,
            "big_bucket_docs": BIG_BUCKET_DOCS,
            "sigs_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)}


def run_ours(sigs: Path, out: Path, p: dict, log_dir: Path) -> dict:
    """The sharded index (one process per band range, then merge) and the one-process `index`; their figures."""
    from stages import dedup
    cfg = json.dumps({"dedup": p})
    py = [sys.executable, "-m", "stages.dedup"]
    n_bands = dedup.SigsShards(sigs, []).minhash_params["bands"]
    steps = {}
    for name in dedup.band_ranges(n_bands, p["band_shards"]):
        steps[f"edges {name}"] = run_measured(py + ["edges", "--params-json", cfg, "--sigs-dir", str(sigs), "--bands",
                                                    name, "--output-dir", str(out / "sharded" / "edges")],
                                              log_dir / f"edges-{name}.log")
    steps["merge"] = run_measured(py + ["merge", "--params-json", cfg, "--sigs-dir", str(sigs), "--edges-dir",
                                        str(out / "sharded" / "edges"), "--output-dir", str(out / "sharded")],
                                  log_dir / "merge.log")
    steps["index (one process)"] = run_measured(py + ["index", "--params-json", cfg, "--sigs-dir", str(sigs),
                                                      "--output-dir", str(out / "single")], log_dir / "index.log")
    same = common.sha256_file(out / "sharded" / "duplicates.parquet") == \
        common.sha256_file(out / "single" / "duplicates.parquet")
    counts = json.loads((out / "sharded" / "manifest.json").read_text())["counts"]
    return {"steps": {k: vars(m) for k, m in steps.items()}, "sharded_equals_single": same,
            "duplicates": counts["duplicates"], "counts": counts,
            "sharded_wall_s": sum(m.wall_s for k, m in steps.items() if k != "index (one process)"),
            "sharded_peak_rss_mb": max(m.peak_rss_mb for k, m in steps.items() if k != "index (one process)")}


def run_today(sigs: Path, out: Path, p: dict, commit: str, log_dir: Path) -> dict:
    """stages/dedup.py at `commit`, run as a script on the same sigs (its `index` reads verify_min_jaccard only)."""
    source = subprocess.run(["git", "show", f"{commit}:stages/dedup.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    script = out / f"dedup_{commit}.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(source, encoding="utf-8")
    m = run_measured([sys.executable, str(script), "index", "--params-json", json.dumps({"dedup": p}),
                      "--sigs-dir", str(sigs), "--output-dir", str(out / "index")], log_dir / f"today-{commit}.log")
    return {**vars(m), "duplicates": pq.ParquetFile(out / "index" / "duplicates.parquet").metadata.num_rows}


def datasketch_child(sigs: Path, mp: dict) -> None:
    """Insert every document of `sigs` into a MinHashLSH (bands, rows) and query each: prints candidate pairs."""
    from datasketch import LeanMinHash, MinHashLSH
    lsh = MinHashLSH(num_perm=mp["num_perm"], params=(mp["bands"], mp["rows"]))
    signatures = []
    for path in sorted(sigs.glob("*.parquet")):
        column = pq.read_table(path, columns=["minhash"]).column("minhash").combine_chunks()
        signatures.append(column.flatten().to_numpy().reshape(-1, mp["num_perm"]).astype(np.uint64))
    sig = np.concatenate(signatures)
    for i, values in enumerate(sig):
        lsh.insert(i, LeanMinHash(seed=mp["seed"], hashvalues=values, scheme="legacy"))
    pairs = sum(len(lsh.query(LeanMinHash(seed=mp["seed"], hashvalues=values, scheme="legacy"))) - 1 for values in sig)
    print(json.dumps({"docs": len(sig), "candidate_pairs": pairs // 2}))


def run_datasketch(sigs: Path, out: Path, p: dict, n_docs: int, log_dir: Path) -> dict:
    """datasketch on the first `n_docs` documents (whole shards), and ours (sharded) on the same subset."""
    subset = out / "sigs"
    subset.mkdir(parents=True, exist_ok=True)
    taken = 0
    for path in sorted(sigs.glob("*.parquet")):
        if taken >= n_docs:
            break
        shutil.copy(path, subset / path.name)
        taken += common.count_rows(path)
    log = log_dir / "datasketch.log"
    m = run_measured([sys.executable, __file__, "datasketch-child", "--sigs-dir", str(subset)], log)
    result = json.loads(log.read_text(encoding="utf-8").strip().splitlines()[-1])
    ours = run_ours(subset, out / "ours", p, log_dir / "subset")
    return {"docs": taken, "datasketch": {**vars(m), **result}, "ours": ours}


def print_table(report: dict) -> None:
    print(f"\n{report['workload']['docs']:,} signatures, {report['workload']['shards']} shards, "
          f"num_perm {report['minhash']['num_perm']}, {report['minhash']['bands']} bands x {report['minhash']['rows']} "
          f"rows, band_shards {report['params']['band_shards']}, bucket_window {report['params']['bucket_window']}")
    print(f"{'run':44s} {'wall s':>8s} {'cpu s':>8s} {'peak RSS MB':>12s} {'duplicates':>11s}")
    for name, m in report["ours"]["steps"].items():
        print(f"{'ours: ' + name:44s} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['peak_rss_mb']:12.0f}")
    ours = report["ours"]
    print(f"{'ours: sharded total (edges + merge)':44s} {ours['sharded_wall_s']:8.1f} {'':8s} "
          f"{ours['sharded_peak_rss_mb']:12.0f} {ours['duplicates']:11,d}")
    if "today" in report:
        t = report["today"]
        print(f"{'today (' + report['baseline_commit'] + ')':44s} {t['wall_s']:8.1f} {t['cpu_s']:8.1f} "
              f"{t['peak_rss_mb']:12.0f} {t['duplicates']:11,d}")
    if "datasketch" in report:
        d = report["datasketch"]
        print(f"{'datasketch insert+query, ' + format(d['docs'], ',') + ' docs':44s} {d['datasketch']['wall_s']:8.1f} "
              f"{d['datasketch']['cpu_s']:8.1f} {d['datasketch']['peak_rss_mb']:12.0f}")
        print(f"{'ours sharded, same ' + format(d['docs'], ',') + ' docs':44s} {d['ours']['sharded_wall_s']:8.1f} "
              f"{'':8s} {d['ours']['sharded_peak_rss_mb']:12.0f} {d['ours']['duplicates']:11,d}")
    for name, ratio in report["ratios"].items():
        print(f"  {name}: {ratio:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    child = sub.add_parser("datasketch-child", help=argparse.SUPPRESS)
    child.add_argument("--sigs-dir", required=True)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--band-shards", type=int, default=2, help="dedup.band_shards for the sharded run")
    ap.add_argument("--datasketch-docs", type=int, default=100_000, help="subset for datasketch (0: skip)")
    ap.add_argument("--baseline-commit", default=DEFAULT_BASELINE, help="today's stages/dedup.py ('' to skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "bench_dedup"), help="work directory")
    args = ap.parse_args(argv)
    params = common.load_params()
    mp = minhash.minhash_params(common.stage_params(params, "filter"))
    if args.command == "datasketch-child":
        datasketch_child(Path(args.sigs_dir), mp)
        return
    p = {**common.stage_params(params, "dedup"), "band_shards": args.band_shards}
    os.environ["PYTHONPATH"] = str(REPO)  # today's dedup.py runs as a script and imports stages.common
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    report = {"minhash": mp, "params": p, "baseline_commit": args.baseline_commit,
              "workload": write_workload(out / "sigs", args.docs, args.shards, mp, int(params.get("seed", 0))),
              "ours": run_ours(out / "sigs", out / "ours", p, out / "logs"), "ratios": {}}
    ours = report["ours"]
    if args.baseline_commit:
        today = report["today"] = run_today(out / "sigs", out / "today", p, args.baseline_commit, out / "logs")
        report["ratios"]["today wall / ours sharded wall"] = today["wall_s"] / ours["sharded_wall_s"]
        report["ratios"]["today peak RSS / ours sharded peak RSS"] = today["peak_rss_mb"] / ours["sharded_peak_rss_mb"]
    if args.datasketch_docs:
        d = report["datasketch"] = run_datasketch(out / "sigs", out / "subset", p, args.datasketch_docs, out / "logs")
        report["ratios"]["datasketch wall / ours sharded wall (subset)"] = \
            d["datasketch"]["wall_s"] / d["ours"]["sharded_wall_s"]
        report["ratios"]["datasketch peak RSS / ours sharded peak RSS (subset)"] = \
            d["datasketch"]["peak_rss_mb"] / d["ours"]["sharded_peak_rss_mb"]
    common.write_json(REPO / "bench" / "out" / "bench_dedup.json", report)
    print_table(report)


if __name__ == "__main__":
    main()
