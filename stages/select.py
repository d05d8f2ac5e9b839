"""Selection: the paper's resampling, raw -> high-quality pool (12.5T) -> top subset (6.5T) -> training stream (23T).

DuckDB SQL over the scored shards, thresholds from params (score wrote continuous columns, so a new cut-off reruns
only this stage):

  pool      = utility candidates (utility >= pool_min_utility) and recall candidates (utility below it but
              retrieval_sim >= recall_min_sim: retrieval-based recall of documents close to the seed set even when
              their tags score low). Recall has its own share of the budget, since a recalled document ranks below
              every utility candidate by definition and a single utility ranking would always cut it first:
                R_recall  = max(floor(recall_share B), B - U)       B = budgets.pool_tokens, U = utility candidates'
                                                                    tokens (recall also takes what utility leaves)
                recalled  = recall candidates ranked by retrieval_sim desc then id, cut where the running token sum
                            passes R_recall; r = their tokens
                kept      = utility candidates ranked by utility desc then id, cut where the running sum passes B - r
              so the pool holds <= B tokens and recall gets min(its candidates, R_recall) when the budget binds
  top       = pool documents with utility >= top_min_utility, same ranking, cut at budgets.top_tokens
  bucket    = "<tier>/<group>": tier top, or pool (in the pool, not top); group = domain_groups[domain] or
              default_group

Token counts here are estimates (approx_tokens = bytes / 4, from ingest): budgets and the epochs below size the
selection; the FG-WSD plan (`schedule`) recomputes epochs and mixtures from tokenize's real per-bucket BPE counts.
buckets.json carries min_top_epochs and max_epochs for it.

Epochs (the pool tier is seen once, the top subset fills the rest of the stream, as 6T x 1 + 6.5T x 2.6 = 23T):
with H top tokens, P pool-tier tokens, T = budgets.train_tokens, m = min_top_epochs, M = max_epochs,

  e_top = min(M, max(m, (T - P) / H)),   e_pool = min(M, max(0, (T - e_top H) / P)),

so the stream e_top H + e_pool P equals T unless even M epochs of everything fall short (recorded as stream_tokens).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb

from stages import common

STAGE = "select"
TIERS = ("top", "pool")


def bucket_epochs(top_tokens: int, pool_tokens: int, train_tokens: int, min_top_epochs: float,
                  max_epochs: float) -> dict:
    """Epochs per tier that reach the train budget (formula in the module docstring)."""
    h, pl, t, m, cap = float(top_tokens), float(pool_tokens), float(train_tokens), float(min_top_epochs), \
        float(max_epochs)
    if h == 0 and pl == 0:
        raise common.StageError(f"{STAGE}: the selected pool is empty; lower select.pool_min_utility or "
                                f"select.recall_min_sim")
    if h == 0:
        e_top, e_pool = 0.0, min(cap, t / pl)
    elif pl == 0:
        e_top, e_pool = min(cap, max(m, t / h)), 0.0
    else:
        e_top = min(cap, max(m, (t - pl) / h))
        e_pool = min(cap, max(0.0, (t - e_top * h) / pl))
    return {"top": round(e_top, 6), "pool": round(e_pool, 6), "stream_tokens": round(e_top * h + e_pool * pl)}


def recall_budget(pool_tokens: int, recall_share: float) -> int:
    """floor(recall_share B): the tokens reserved for recalled documents (before what utility leaves unused)."""
    if not 0.0 <= float(recall_share) <= 1.0:
        raise common.StageError(f"{STAGE}: recall_share must lie in [0, 1], got {recall_share}")
    return math.floor(float(recall_share) * pool_tokens)


def _budgets(p: dict) -> dict:
    budgets = p.get("budgets") or {}
    missing = [k for k in ("pool_tokens", "top_tokens", "train_tokens") if k not in budgets]
    if missing:
        raise common.StageError(f"{STAGE}: select.budgets lacks {missing} for scale {p.get('scale')!r}")
    b = {k: int(float(budgets[k])) for k in ("pool_tokens", "top_tokens", "train_tokens")}
    if not 0 < b["top_tokens"] <= b["pool_tokens"]:
        raise common.StageError(f"{STAGE}: budgets need 0 < top_tokens <= pool_tokens, got {b}")
    if float(p["min_top_epochs"]) * b["top_tokens"] > b["train_tokens"]:
        raise common.StageError(f"{STAGE}: min_top_epochs x top_tokens exceeds train_tokens ({b}): the top subset "
                                f"could not get its epochs")
    return b


def _lit(value: str | Path) -> str:
    """A SQL string literal (paths and shard names cannot be bound as COPY parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


DECIDE_SQL = """
CREATE TEMP TABLE decided AS
WITH flagged AS (
    SELECT s.*, coalesce(g.grp, $default_group) AS grp,
           s.utility >= $pool_min AS by_utility,
           s.utility < $pool_min AND coalesce(s.retrieval_sim, 0) >= $recall_min AS by_recall
    FROM scored s LEFT JOIN domain_groups g USING (domain)
), ranked AS (
    SELECT *,
           sum(approx_tokens) OVER (PARTITION BY by_utility ORDER BY utility DESC, id, shard, row_no
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS pool_cum,
           sum(approx_tokens) OVER (PARTITION BY by_recall ORDER BY retrieval_sim DESC, id, shard, row_no
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS recall_cum
    FROM flagged
), recall_cap AS (
    SELECT greatest($recall_tokens, $pool_tokens - coalesce(sum(approx_tokens) FILTER (by_utility), 0)) AS cap
    FROM flagged
), recall_kept AS (
    SELECT r.*, r.by_recall AND r.recall_cum <= c.cap AS recalled, c.cap AS recall_cap FROM ranked r, recall_cap c
), utility_cap AS (
    SELECT $pool_tokens - coalesce(sum(approx_tokens) FILTER (recalled), 0) AS cap FROM recall_kept
), kept AS (
    SELECT r.*, recalled OR (by_utility AND pool_cum <= u.cap) AS kept, u.cap AS utility_cap
    FROM recall_kept r, utility_cap u
), ranked_top AS (
    SELECT *, sum(approx_tokens) OVER (PARTITION BY kept AND utility >= $top_min
                                       ORDER BY utility DESC, id, shard, row_no
                                       ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS top_cum
    FROM kept
)
SELECT shard, row_no, approx_tokens, kept, recalled, by_recall AS recall_candidate, recall_cap,
       CASE WHEN NOT kept THEN NULL
            WHEN utility >= $top_min AND top_cum <= $top_tokens THEN 'top/' || grp
            ELSE 'pool/' || grp END AS bucket,
       CASE WHEN recalled
            THEN printf('retrieval_sim %.4f >= %.4f with utility %d < %d', retrieval_sim, $recall_min, utility,
                        $pool_min)
            ELSE '' END AS recall_reason,
       CASE WHEN kept THEN NULL WHEN by_recall THEN 'over_recall_budget' WHEN NOT by_utility THEN 'below_pool_utility'
            ELSE 'over_pool_budget' END AS rule,
       CASE WHEN kept THEN NULL
            WHEN by_recall THEN printf('cumulative recall tokens %d > recall budget %d (ranked by retrieval_sim, '
                                       'then id)', recall_cum, recall_cap)
            WHEN NOT by_utility THEN printf('utility %d < %d and retrieval_sim %.4f < %.4f', utility, $pool_min,
                                            coalesce(retrieval_sim, 0), $recall_min)
            ELSE printf('cumulative pool tokens %d > pool budget %d - %d recalled (ranked by utility, then id)',
                        pool_cum, $pool_tokens, $pool_tokens - utility_cap) END AS detail
FROM ranked_top
"""


def select_pool(input_dir: str | Path, output_dir: str | Path, p: dict) -> dict:
    """Decide every scored document (pool tier, top tier or rejected with its rule), write pool/ and rejected/
    shards, buckets.json and manifest.json. Returns the buckets.json content."""
    budgets = _budgets(p)
    input_dir, out = Path(input_dir), Path(output_dir)
    shards = common.list_shards(input_dir)
    files = [input_dir / f"{s}.parquet" for s in shards]
    con = duckdb.connect()
    con.execute("SET threads TO 1")  # one thread: row order and float sums are reproducible byte for byte
    con.execute("CREATE TEMP TABLE domain_groups (domain VARCHAR, grp VARCHAR)")
    groups = sorted((str(d), str(g)) for d, g in (p.get("domain_groups") or {}).items())
    if groups:
        con.executemany("INSERT INTO domain_groups VALUES (?, ?)", groups)
    file_list = "[" + ", ".join(_lit(f) for f in files) + "]"
    try:
        con.execute(f"""
            CREATE TEMP TABLE scored AS
            SELECT regexp_extract(filename, '([^/]+)\\.parquet$', 1) AS shard, file_row_number AS row_no,
                   id, domain, utility, retrieval_sim, approx_tokens
            FROM read_parquet({file_list}, filename = true, file_row_number = true)""")
    except duckdb.Error as exc:
        raise common.StageError(f"{input_dir}: scored shards are unreadable or lack a column ({exc})") from None
    con.execute(DECIDE_SQL, {"default_group": str(p["default_group"]), "pool_min": int(p["pool_min_utility"]),
                             "recall_min": float(p["recall_min_sim"]), "pool_tokens": budgets["pool_tokens"],
                             "recall_tokens": recall_budget(budgets["pool_tokens"], p["recall_share"]),
                             "top_min": int(p["top_min_utility"]), "top_tokens": budgets["top_tokens"]})

    outputs = []
    for shard, path in zip(shards, files):
        source = f"read_parquet({_lit(path)}, file_row_number = true)"
        join = f"JOIN decided d ON d.shard = {_lit(shard)} AND d.row_no = s.file_row_number"
        parts = {"pool": "d.bucket, d.recalled, d.recall_reason", "rejected": "d.rule, d.detail"}
        for part, extra in parts.items():
            target = out / part / f"{shard}.parquet"
            keep = "d.kept" if part == "pool" else "NOT d.kept"
            with common.atomic_path(target) as tmp:
                con.execute(f"""COPY (SELECT s.* EXCLUDE (file_row_number), {extra} FROM {source} s {join}
                                      WHERE {keep} ORDER BY s.file_row_number)
                                TO {_lit(tmp)} (FORMAT parquet, COMPRESSION zstd,
                                                ROW_GROUP_SIZE {common.ROW_GROUP_ROWS})""")
            outputs.append(target)
        common.check_conservation(STAGE, shard, common.count_rows(path),
                                  kept=common.count_rows(out / "pool" / f"{shard}.parquet"),
                                  rejected=common.count_rows(out / "rejected" / f"{shard}.parquet"))

    per_bucket = con.execute("""SELECT bucket, count(*), sum(approx_tokens) FROM decided WHERE kept
                                GROUP BY bucket ORDER BY bucket""").fetchall()
    tier_tokens = {t: sum(int(n) for b, _, n in per_bucket if b.startswith(t + "/")) for t in TIERS}
    epochs = bucket_epochs(tier_tokens["top"], tier_tokens["pool"], budgets["train_tokens"],
                           p["min_top_epochs"], p["max_epochs"])
    rules = dict(con.execute("SELECT rule, count(*) FROM decided WHERE NOT kept GROUP BY rule ORDER BY rule")
                 .fetchall())
    scored, kept, candidates, recalled, recall_tokens, recall_cap = con.execute(
        """SELECT count(*), count(*) FILTER (kept), count(*) FILTER (recall_candidate), count(*) FILTER (recalled),
                  coalesce(sum(approx_tokens) FILTER (recalled), 0), max(recall_cap) FROM decided""").fetchone()
    summary = {
        "budgets": budgets,
        "thresholds": {k: p[k] for k in ("pool_min_utility", "top_min_utility", "recall_min_sim", "recall_share")},
        "epoch_bounds": {k: p[k] for k in ("min_top_epochs", "max_epochs")},
        "buckets": {b: {"docs": int(d), "approx_tokens": int(n), "epochs": epochs[b.split("/", 1)[0]]}
                    for b, d, n in per_bucket},
        "tiers": {t: {"approx_tokens": tier_tokens[t], "epochs": epochs[t]} for t in TIERS},
        "stream_tokens": epochs["stream_tokens"],
        "counts": {"scored": int(scored), "kept": int(kept), "rejected": int(scored - kept),
                   "recall_candidates": int(candidates), "recalled": int(recalled),
                   "recalled_tokens": int(recall_tokens), "recall_budget_tokens": int(recall_cap or 0),
                   "rejected_by_rule": {r: int(n) for r, n in rules.items()}},
    }
    common.check_conservation(STAGE, "all", summary["counts"]["scored"], kept=summary["counts"]["kept"],
                              rejected=summary["counts"]["rejected"])
    common.write_json(out / "buckets.json", summary)
    common.write_manifest(out / "manifest.json", stage=STAGE, params=p, inputs=files,
                          outputs=outputs + [out / "buckets.json"], counts=summary["counts"],
                          code=common.code_version(f"stages.{STAGE}"))
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--input-dir", required=True, help="score shards")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    try:
        p = common.resolve_cli_params(args, STAGE)
        summary = select_pool(args.input_dir, args.output_dir, p)
    except common.StageError as exc:
        common.fail(exc)
    print(json.dumps(summary["counts"], sort_keys=True))


if __name__ == "__main__":
    main()
