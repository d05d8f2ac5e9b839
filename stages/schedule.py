"""FG-WSD (Fine-Grained Warmup-Stable-Decay) as a plan file: phase token counts, LR end points and data mixtures.

Stage tokens are the train budget T (select's budgets.train_tokens) split by the paper's stage sizes
(Warmup 0.1T, Diversity-Enriched Stable 12.4T, High-Quality Stable 6.5T, Decay 4T of 23T), each stage split into
its sub-phases by weight; both splits are largest-remainder roundings of exact fractions, so the phases sum to T.

Mixture of phase k over the buckets b = "<tier>/<group>" (tiers top and pool, from select):

  m_k(b) = s_k(tier(b)) * n_b g_k(group(b)) / sum_{b' in tier(b)} n_b' g_k(group(b'))

with n_b the bucket's tokens, s_k(top) = hq_share_k (rising over the stable sub-phases, from about 1:1 HQ:MQ),
s_k(pool) = 1 - hq_share_k (a missing tier hands its share to the other), and g_k the phase's group boost (decay
raises math, code and QA). Fractions are rounded to `mixture_decimals` by largest remainder so they sum to 1.

n_b is the real size of the bucket's token stream (tokenize's manifest, `buckets.<b>.tokens`), since pretraining
draws BPE tokens; select's approx_tokens (bytes / 4) only sized the selection. The top subset must get at least
m = min_top_epochs (select's, carried in buckets.json) in those real tokens, so the top shares are lifted towards 1 by
the smallest common lambda in [0, 1] that gives every top bucket m epochs after rounding:

  s'_k = s_k + lambda (1 - s_k),   e_b(lambda) = sum_k T_k m_k(b) / n_b (linear in lambda),
  lambda = max(0, max_b (t_b - e_b(0)) / (e_b(1) - e_b(0))),   t_b = m + T 10^-mixture_decimals / n_b

(t_b adds the most that rounding can take: each fraction moves by < 10^-d). The lift keeps the shares rising; if
lambda would exceed 1 (the stream is too short for m epochs of the top tier) it is capped and the plan records
min_top_epochs_met = false.

LR: warmup linear 0 -> lr_peak, stable constant lr_peak, decay lr_peak -> lr_final (`decay_lr_shape`); a stage with
several linear phases interpolates its end points by tokens. Planned epochs per bucket = sum_k T_k m_k(b) / n_b.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

from stages import common

STAGE = "schedule"
STAGES = ("warmup", "diversity_stable", "hq_stable", "decay")
STABLE = ("diversity_stable", "hq_stable")
LR_SHAPES = ("linear", "constant", "cosine")


def largest_remainder(total: int, weights: list) -> list[int]:
    """Integers proportional to `weights` that sum to `total` exactly: floor each exact share, then hand the
    leftover units to the largest remainders (ties to the earlier entry)."""
    weights = [Fraction(w) for w in weights]
    denom = sum(weights)
    if denom <= 0:
        raise common.StageError(f"{STAGE}: weights must have a positive sum, got {weights}")
    exact = [total * w / denom for w in weights]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _exact(value) -> Fraction:
    """A YAML number as the decimal it was written as (0.1 -> 1/10), so the paper's 0.1T of 23T is exact."""
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def _validate(phases: list[dict]) -> None:
    names = [ph["name"] for ph in phases]
    if len(set(names)) != len(names):
        raise common.StageError(f"{STAGE}: phase names must be unique, got {names}")
    stages = [ph["stage"] for ph in phases]
    if any(s not in STAGES for s in stages) or stages != sorted(stages, key=STAGES.index) \
            or set(stages) != set(STAGES):
        raise common.StageError(f"{STAGE}: phases must cover the stages {STAGES} in order, got {stages}")
    if any(not 0.0 <= float(ph["hq_share"]) <= 1.0 for ph in phases):
        raise common.StageError(f"{STAGE}: hq_share must lie in [0, 1]")
    stable = [float(ph["hq_share"]) for ph in phases if ph["stage"] in STABLE]
    if any(b < a for a, b in zip(stable, stable[1:])):
        raise common.StageError(f"{STAGE}: the high-quality share must rise across the stable sub-phases, "
                                f"got {stable}")


def phase_mixture(bucket_tokens: dict[str, int], hq_share: float | Fraction, group_boost: dict[str, float],
                  decimals: int) -> dict[str, float]:
    """m_k(b) of the module docstring, rounded to `decimals` places with an exact sum of 1 (zero entries dropped)."""
    tiers = {b: b.split("/", 1)[0] for b in bucket_tokens}
    present = set(tiers.values())
    share = {"top": Fraction(hq_share), "pool": 1 - Fraction(hq_share)}
    if present != {"top", "pool"}:
        share = {t: Fraction(1) for t in present}
    weight = {b: n * Fraction(group_boost.get(b.split("/", 1)[1], 1.0)) for b, n in bucket_tokens.items()}
    tier_weight = {t: sum(w for b, w in weight.items() if tiers[b] == t) for t in present}
    names = sorted(bucket_tokens)
    exact = [share[tiers[b]] * weight[b] / tier_weight[tiers[b]] if tier_weight[tiers[b]] else Fraction(0)
             for b in names]
    units = largest_remainder(10 ** decimals, exact)
    return {b: round(u / 10 ** decimals, decimals) for b, u in zip(names, units) if u > 0}


def _lr_points(stage: str, p: dict) -> tuple[float, float, str]:
    peak, final = float(p["lr_peak"]), float(p["lr_final"])
    if stage == "warmup":
        return 0.0, peak, "linear"
    if stage == "decay":
        return peak, final, p["decay_lr_shape"]
    return peak, peak, "constant"


def hq_share_lift(bucket_tokens: dict[str, int], phase_tokens: list[int], phases: list[dict], min_top_epochs: float,
                  decimals: int) -> Fraction:
    """lambda of the module docstring: the smallest lift of the top shares that gives every top bucket
    min_top_epochs real epochs after rounding (uncapped: > 1 means even an all-top stream falls short)."""
    top = [b for b in bucket_tokens if b.startswith("top/")]
    if not top or not any(b.startswith("pool/") for b in bucket_tokens):
        return Fraction(0)  # one tier takes the whole mixture already: nothing to lift

    def epochs(b: str, lift: Fraction) -> Fraction:
        drawn = Fraction(0)
        for n, ph in zip(phase_tokens, phases):
            s = _exact(ph["hq_share"])
            boost = ph.get("group_boost") or {}
            weight = {c: bucket_tokens[c] * _exact(boost.get(c.split("/", 1)[1], 1.0)) for c in top}
            drawn += n * (s + lift * (1 - s)) * weight[b] / sum(weight.values())
        return drawn / bucket_tokens[b]

    total = sum(phase_tokens)
    lifts = [Fraction(0)]
    for b in top:
        target = _exact(min_top_epochs) + Fraction(total, 10 ** decimals * bucket_tokens[b])
        e0, e1 = epochs(b, Fraction(0)), epochs(b, Fraction(1))
        if e0 < target:
            lifts.append((target - e0) / (e1 - e0) if e1 > e0 else Fraction(2))  # no lift helps: report > 1
    return max(lifts)


def stream_sizes(buckets: dict, stream_tokens: dict[str, int]) -> dict[str, int]:
    """n_b: the real tokens of every selected bucket's stream; a selected bucket without a stream is an error."""
    selected = sorted(buckets["buckets"])
    missing = [b for b in selected if b not in stream_tokens]
    if missing:
        raise common.StageError(f"{STAGE}: selected buckets {missing} have no token stream in tokenize's manifest "
                                f"(has {sorted(stream_tokens)})")
    sizes = {b: int(stream_tokens[b]) for b in selected if int(stream_tokens[b]) > 0}
    if not sizes:
        raise common.StageError(f"{STAGE}: no selected bucket has tokens")
    return sizes


def fgwsd_plan(buckets: dict, stream_tokens: dict[str, int], p: dict) -> dict:
    """The FG-WSD plan for select's buckets.json content, the real stream sizes {bucket: tokens} and the schedule
    params slice (formulas in the docstring)."""
    phases = p["phases"]
    _validate(phases)
    if p["decay_lr_shape"] not in LR_SHAPES:
        raise common.StageError(f"{STAGE}: decay_lr_shape must be one of {LR_SHAPES}")
    bucket_tokens = stream_sizes(buckets, stream_tokens)
    total = int(buckets["budgets"]["train_tokens"])
    decimals = int(p["mixture_decimals"])
    min_top_epochs = buckets["epoch_bounds"]["min_top_epochs"]

    stage_tokens = dict(zip(STAGES, largest_remainder(total, [_exact(p["stage_weights"][s]) for s in STAGES])))
    phase_tokens = []
    for stage in STAGES:
        members = [ph for ph in phases if ph["stage"] == stage]
        phase_tokens += largest_remainder(stage_tokens[stage], [_exact(ph["weight"]) for ph in members])
    needed = hq_share_lift(bucket_tokens, phase_tokens, phases, min_top_epochs, decimals)
    lift = min(needed, Fraction(1))
    plan_phases, done = [], {s: 0 for s in STAGES}
    for ph, n in zip(phases, phase_tokens):
        stage = ph["stage"]
        lr_start, lr_end, shape = _lr_points(stage, p)
        if shape == "cosine" and sum(q["stage"] == stage for q in phases) > 1:
            raise common.StageError(f"{STAGE}: a cosine {stage} stage must be a single phase")
        frac_a = done[stage] / stage_tokens[stage] if stage_tokens[stage] else 0.0
        done[stage] += n
        frac_b = done[stage] / stage_tokens[stage] if stage_tokens[stage] else 1.0
        share = _exact(ph["hq_share"]) + lift * (1 - _exact(ph["hq_share"]))
        plan_phases.append({
            "name": ph["name"], "stage": stage, "tokens": n,
            "lr_start": lr_start * (1 - frac_a) + lr_end * frac_a,
            "lr_end": lr_start * (1 - frac_b) + lr_end * frac_b,
            "lr_shape": shape,
            "seq_len_scale": float(ph.get("seq_len_scale", 1.0)),
            "rope_theta_scale": float(ph.get("rope_theta_scale", 1.0)),
            "mixture": phase_mixture(bucket_tokens, share, ph.get("group_boost") or {}, decimals),
        })

    draws = {b: round(sum(ph["tokens"] * ph["mixture"].get(b, 0.0) for ph in plan_phases)) for b in bucket_tokens}
    tiers = {}
    for tier in ("top", "pool"):
        names = [b for b in bucket_tokens if b.startswith(tier + "/")]
        n, d = sum(bucket_tokens[b] for b in names), sum(draws[b] for b in names)
        tiers[tier] = {"tokens": n, "draws": d, "epochs": round(d / n, 4) if n else 0.0}
    epochs = {b: draws[b] / bucket_tokens[b] for b in bucket_tokens}
    return {
        "total_tokens": total,
        "lr_peak": float(p["lr_peak"]),
        "lr_final": float(p["lr_final"]),
        "buckets": bucket_tokens,
        "phases": plan_phases,
        "draws": draws,
        "epochs": {b: round(e, 4) for b, e in epochs.items()},
        "tiers": tiers,
        "min_top_epochs": min_top_epochs,
        "min_top_epochs_met": all(e >= min_top_epochs for b, e in epochs.items() if b.startswith("top/")),
        "hq_share_lift": float(lift),
        "hq_shares": {ph["name"]: float(_exact(ph["hq_share"]) + lift * (1 - _exact(ph["hq_share"])))
                      for ph in phases},
        "select_approx_tokens": {b: buckets["buckets"][b].get("approx_tokens") for b in bucket_tokens},
        "select_epochs": {b: buckets["buckets"][b].get("epochs") for b in bucket_tokens},
    }


def plan_markdown(plan: dict) -> str:
    """plan.md: one row per phase, then the bucket draws and epochs (pool -> top -> stream in numbers)."""
    total = plan["total_tokens"]
    lines = ["| phase | stage | tokens | share | LR | seq_len x | rope_theta x | top-tier share | mixture |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for ph in plan["phases"]:
        top = sum(f for b, f in ph["mixture"].items() if b.startswith("top/"))
        mix = ", ".join(f"{b} {f:.3f}" for b, f in sorted(ph["mixture"].items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"| {ph['name']} | {ph['stage']} | {ph['tokens']} | {ph['tokens'] / total:.2%} | "
                     f"{ph['lr_start']:.3g} -> {ph['lr_end']:.3g} ({ph['lr_shape']}) | {ph['seq_len_scale']:g} | "
                     f"{ph['rope_theta_scale']:g} | {top:.2f} | {mix} |")
    lines += ["", "| bucket | tokens (real) | drawn | planned epochs | select estimate: tokens | epochs |",
              "|---|---:|---:|---:|---:|---:|"]
    for b, n in plan["buckets"].items():
        lines.append(f"| {b} | {n} | {plan['draws'][b]} | {plan['epochs'][b]} | {plan['select_approx_tokens'][b]} | "
                     f"{plan['select_epochs'][b]} |")
    for tier, t in plan["tiers"].items():
        lines.append(f"| **{tier} tier** | {t['tokens']} | {t['draws']} | {t['epochs']} | | |")
    lines.append(f"| **stream** | {sum(plan['buckets'].values())} | {total} | | | |")
    lines += ["", f"Top shares lifted by {plan['hq_share_lift']:.4f} towards 1 so every top bucket gets "
              f">= {plan['min_top_epochs']} epochs in real tokens: "
              f"{'met' if plan['min_top_epochs_met'] else 'NOT met (the stream is too short)'}."]
    return "\n".join(lines) + "\n"


def _read_json(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise common.StageError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise common.StageError(f"{path}: expected {what} with {list(keys)}")
    return data


def write_plan(buckets_path: str | Path, tokens_manifest: str | Path, output_dir: str | Path, p: dict) -> dict:
    """plan.json + plan.md from select's buckets.json and tokenize's manifest.json (real stream sizes)."""
    buckets_path, tokens_manifest, out = Path(buckets_path), Path(tokens_manifest), Path(output_dir)
    buckets = _read_json(buckets_path, "select's buckets.json", ("buckets", "budgets", "epoch_bounds"))
    streams = _read_json(tokens_manifest, "tokenize's manifest.json", ("buckets",))
    plan = fgwsd_plan(buckets, {b: s["tokens"] for b, s in streams["buckets"].items()}, p)
    common.write_json(out / "plan.json", plan)
    common.write_text(out / "plan.md", plan_markdown(plan))
    common.write_manifest(out / "manifest.json", stage=STAGE, params=p, inputs=[buckets_path, tokens_manifest],
                          outputs=[out / "plan.json", out / "plan.md"],
                          counts={"phases": len(plan["phases"]), "total_tokens": plan["total_tokens"],
                                  "hq_share_lift": plan["hq_share_lift"],
                                  "min_top_epochs_met": plan["min_top_epochs_met"]},
                          code=common.code_version(f"stages.{STAGE}"))
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--buckets", required=True, help="select/buckets.json")
    ap.add_argument("--tokens-manifest", required=True, help="tokenize/manifest.json (real tokens per bucket stream)")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    try:
        p = common.resolve_cli_params(args, STAGE)
        plan = write_plan(args.buckets, args.tokens_manifest, args.output_dir, p)
    except common.StageError as exc:
        common.fail(exc)
    print(json.dumps({ph["name"]: ph["tokens"] for ph in plan["phases"]}))


if __name__ == "__main__":
    main()
