r"""Pass-rate filter before each RL stage: the previous model answers every candidate prompt k times, and only the
prompts it sometimes solves are kept (RECIPE.md: avg@16 per question, kept strictly between 10% and 90%).

Candidates: the task ladder's train splits of the stage's domains (ROLE_DOMAINS: rl_stem -> math, rl_code -> code,
rl_pref -> math and code); per domain and level the first `max_prompts_per_level` (null: all) in sha256(seed/id) order,
so a cap spreads over templates.
Sampling is RL's own (sample_answers, which stages/rl.py rolls out with; rollout_engine: ours, or vLLM on GPU nodes):
the chat prompt of tasks.format_prompt with
the assistant turn opened, stop at <|im_end|> / <|endoftext|>, temperature / top_p / max_new_tokens from params;
sample i of prompt q is seeded by derived_seed(seed, "pass_filter", role, q, i), so it depends on nothing else.
The reward is the stage's own (ROLE_REWARD), so the filter and the RL reward judge alike:
  verifier  rl_stem, rl_code: task_rewards, evaluation's ladder verifier (the held-out accuracy judge too; math: the
            first final answer after </think>, math-verify next to our normalisation; code: the public + hidden tests
            in the sandbox), 0 or 1
  judge     rl_pref: the reward model of stages/reward_model.py (--judge-dir), R(y, r) in (0, 1) against the task's
            reference solution, both orders averaged; a sample "passes" when the judge prefers it to the reference
A sample passes when its reward > 0.5; a truncated one is scored like any other.

    pass_rate(q) = passes(q) / k,     kept  iff  low < pass_rate(q) < high     (strict: 0.1 and 0.9 themselves drop)

Below or at `low` the verdict is too_hard, at or above `high` too_easy: in both the group rewards of RL would mostly
be all equal, so the prompt would be a dropped zero-variance group.

Outputs (--output-dir): pass_rates.parquet (every candidate: domain, level, passes, truncated samples, mean score,
pass_rate and its verdict; the scores come before the bounds), kept.parquet (the kept task records in their ladder
schema, the domains' columns unified, + pass_rate and passes), histogram.json (passes: the prompts with j = 0..k
passes, a list; prompts per verdict and per "domain/level": the report's plot), manifest.json (role, counts;
kept + too_hard + too_easy == candidates, checked).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages import common, tasks
from stages.chat import encode_prompt, load_chat_tokenizer
from stages.eval_stats import derived_seed

STAGE = "pass_filter"
CODE = (f"stages.{STAGE}",)
ROLE_DOMAINS = {"rl_stem": ("math",), "rl_code": ("code",), "rl_pref": ("math", "code")}
ROLE_REWARD = {"rl_stem": "verifier", "rl_code": "verifier", "rl_pref": "judge"}
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
VERDICTS = ("kept", "too_hard", "too_easy")
VERIFIER_KEYS = ("sympy_timeout_s", "sandbox_timeout_s", "sandbox_memory_mb", "sandbox_workers")
RATES_SCHEMA = pa.schema([("id", pa.string()), ("domain", pa.string()), ("level", pa.int64()),
                          ("template_id", pa.string()), ("samples", pa.int64()), ("passes", pa.int64()),
                          ("truncated", pa.int64()), ("mean_score", pa.float64()), ("pass_rate", pa.float64()),
                          ("verdict", pa.string())])

# (records, completion texts, params) -> one reward in [0, 1] per (record, text)
Rewarder = Callable[[list[dict], list[str], dict], list[float]]


# ----------------------------------------------------------------------------- sampling and rewards (shared with RL)

def prompt_ids(tok, records: list[dict]) -> list[list[int]]:
    """Each task's chat prompt (one user turn) with the assistant turn opened, as token ids."""
    return [encode_prompt(tok, tasks.format_prompt(r, "chat")) for r in records]


def rollout_engine(checkpoint: str | Path, p: dict):
    """The engine the samples come from (p["rollout_engine"]): None for ours (model.generate, on the torch model),
    else a vLLM engine on the checkpoint (model/vllm_engine.py: GPU nodes, `pip install -r requirements-gpu.txt`;
    the same contract, its samples reproducible only on the same GPU and vLLM version)."""
    if p["rollout_engine"] == "native":
        return None
    from model.vllm_engine import VLLMEngine
    return VLLMEngine(checkpoint, dtype=str(p["vllm_dtype"]),
                      gpu_memory_utilization=float(p["vllm_gpu_memory_utilization"]), seed=int(p["seed"]))


def sample_answers(model, tok, prompts: list[list[int]], seeds: list[list[int]], p: dict, engine=None) -> list:
    """result[q][i]: the Completion of prompts[q] drawn with seeds[q][i] (temperature, top_p, max_new_tokens,
    batch_size from p; the stop tokens STOP_TOKENS), from `engine` (rollout_engine) or, None, ours on `model`."""
    from model import Request, SamplingParams, generate
    params = SamplingParams(int(p["max_new_tokens"]), float(p["temperature"]), float(p["top_p"]),
                            stop_token_ids=tuple(tok.token_to_id(t) for t in STOP_TOKENS))
    requests = [Request(ids, s) for ids, s in zip(prompts, seeds)]

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False)
    if engine is not None:
        return engine.generate(requests, params, decode)
    return generate(model, requests, params, decode, int(p["batch_size"]))


def task_rewards(records: list[dict], texts: list[str], p: dict) -> list[float]:
    """The verifier score of each (task record, chat completion): evaluation's ladder verifier (stages.evaluate),
    with p's sympy and sandbox limits."""
    from stages.evaluate import PLUGINS
    cfg = {"prompt_format": "chat", **{k: p[k] for k in VERIFIER_KEYS}}
    return [r.score for r in PLUGINS["ladder"].verify(records, texts, cfg)]


# ----------------------------------------------------------------------------- the filter

def judge_rewarder(judge_dir: str | Path, batch_size: int) -> Rewarder:
    """The reward model a reward_model run wrote (its judge/ directory) as a Rewarder (rl_pref)."""
    from stages.reward_model import PairwiseJudge, ladder_rewarder
    return ladder_rewarder(PairwiseJudge.load(judge_dir), batch_size)


def role_rewarder(role: str, judge_dir: str | Path | None, p: dict) -> Rewarder:
    """The role's reward (ROLE_REWARD): the ladder verifier, or the judge, which then must be given."""
    if ROLE_REWARD[role] == "verifier":
        return task_rewards
    if judge_dir is None:
        raise common.StageError(f"{role}: its reward is the reward model: pass --judge-dir (artifacts/<scale>/"
                                f"reward_model/judge)")
    return judge_rewarder(judge_dir, int(p["batch_size"]))


def candidate_records(tasks_dir: str | Path, domains: tuple[str, ...], per_level: int | None,
                      seed: int) -> list[dict]:
    """The domains' train records, per domain and level the first per_level (None: all) in sha256(seed/id) order."""
    out = []
    for domain in domains:
        by_level: dict[int, list[dict]] = {}
        for r in pq.read_table(common.input_shard(tasks_dir, f"{domain}_train")).to_pylist():
            by_level.setdefault(int(r["level"]), []).append(r)
        for level in sorted(by_level):
            ranked = sorted(by_level[level], key=lambda r: hashlib.sha256(f"{seed}/{r['id']}".encode()).hexdigest())
            out += ranked if per_level is None else ranked[:int(per_level)]
    return out


def kept_schema(sources: list[Path]) -> pa.Schema:
    """The kept table's schema: the domains' ladder schemas unified (a column one domain lacks is null there), then
    pass_rate and passes."""
    schema = pa.unify_schemas([pq.read_schema(s) for s in sources])
    return schema.append(pa.field("pass_rate", pa.float64())).append(pa.field("passes", pa.int64()))


def pass_verdict(passes: int, k: int, low: float, high: float) -> str:
    """kept iff low < passes / k < high (strictly); too_hard at or below low, too_easy at or above high."""
    rate = passes / k
    return "too_hard" if rate <= low else "too_easy" if rate >= high else "kept"


def pass_histogram(rates: list[dict], k: int, low: float, high: float) -> dict:
    """{k, low, high, passes: [prompts with j passes for j = 0..k], verdicts: {verdict: prompts}, by_level:
    {"domain/level": {verdict: prompts}}}."""
    passes = [0] * (k + 1)
    verdicts = dict.fromkeys(VERDICTS, 0)
    by_level: dict[str, dict[str, int]] = {}
    for q in rates:
        passes[q["passes"]] += 1
        verdicts[q["verdict"]] += 1
        level = by_level.setdefault(f"{q['domain']}/{q['level']}", dict.fromkeys(VERDICTS, 0))
        level[q["verdict"]] += 1
    return {"k": k, "low": low, "high": high, "passes": passes, "verdicts": verdicts, "by_level": by_level}


def check_params(p: dict) -> tuple[int, float, float]:
    k, low, high = int(p["k"]), float(p["low"]), float(p["high"])
    if k < 1 or not 0.0 <= low < high <= 1.0:
        raise common.StageError(f"{STAGE}: need k >= 1 and 0 <= low < high <= 1, got k {k}, low {low}, high {high}")
    if float(p["temperature"]) <= 0:
        raise common.StageError(f"{STAGE}: temperature must be > 0 (greedy answers are all alike), got "
                                f"{p['temperature']}")
    return k, low, high


def run_pass_filter(role: str, tasks_dir: str | Path, checkpoint: str | Path, output_dir: str | Path, p: dict,
                    reward_fn: Rewarder | None = None, judge_dir: str | Path | None = None) -> dict:
    """Sample k answers per candidate with the checkpoint, score them, keep by the bounds, write the outputs.
    reward_fn scores the completions (None: the role's reward, role_rewarder; tests pass their own)."""
    from model import load_pretrained
    if role not in ROLE_DOMAINS:
        raise common.StageError(f"{STAGE}: role must be one of {sorted(ROLE_DOMAINS)}, got {role!r}")
    k, low, high = check_params(p)
    tasks_dir, checkpoint, output_dir = Path(tasks_dir), Path(checkpoint), Path(output_dir)
    torch.set_num_threads(int(p["cpu_threads"]))
    domains, seed = ROLE_DOMAINS[role], int(p["seed"])
    reward_fn = reward_fn or role_rewarder(role, judge_dir, p)
    records = candidate_records(tasks_dir, domains, p.get("max_prompts_per_level"), seed)
    if not records:
        raise common.StageError(f"{tasks_dir}: no {'/'.join(domains)} train records to filter")
    tok = load_chat_tokenizer(checkpoint)
    engine = rollout_engine(checkpoint, p)
    model = load_pretrained(checkpoint).eval() if engine is None else None
    seeds = [[derived_seed(seed, STAGE, role, r["id"], i) for i in range(k)] for r in records]
    completions = sample_answers(model, tok, prompt_ids(tok, records), seeds, p, engine)
    scores = reward_fn([r for r in records for _ in range(k)], [c.text for row in completions for c in row], p)

    rates, kept = [], []
    for i, (r, row) in enumerate(zip(records, completions)):
        mine = scores[i * k:(i + 1) * k]
        passes = sum(s > 0.5 for s in mine)
        q = {"id": r["id"], "domain": r["domain"], "level": int(r["level"]), "template_id": r["template_id"],
             "samples": k, "passes": passes, "truncated": sum(c.finish_reason == "length" for c in row),
             "mean_score": sum(mine) / k, "pass_rate": passes / k, "verdict": pass_verdict(passes, k, low, high)}
        rates.append(q)
        if q["verdict"] == "kept":
            kept.append({**r, "pass_rate": q["pass_rate"], "passes": passes})
    histogram = pass_histogram(rates, k, low, high)
    common.check_conservation(STAGE, role, len(records), **histogram["verdicts"])

    sources = [common.input_shard(tasks_dir, f"{d}_train") for d in domains]
    kept_path, rates_path = output_dir / "kept.parquet", output_dir / "pass_rates.parquet"
    hist_path = output_dir / "histogram.json"
    common.write_table(kept_path, common.rows_to_table(kept, kept_schema(sources)))
    common.write_table(rates_path, common.rows_to_table(rates, RATES_SCHEMA))
    common.write_json(hist_path, histogram)
    counts = {"candidates": len(records), "samples": len(records) * k, **histogram["verdicts"],
              "truncated": sum(q["truncated"] for q in rates),
              "mean_pass_rate": sum(q["pass_rate"] for q in rates) / len(rates)}
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p,
                                 inputs=[*sources, checkpoint / "model.safetensors", checkpoint / "config.json",
                                         *judge_inputs(judge_dir)],
                                 outputs=[kept_path, rates_path, hist_path], counts=counts,
                                 code=common.code_version_closure(*CODE),
                                 extra={"role": role, "domain": "+".join(domains), "reward": ROLE_REWARD[role],
                                        "checkpoint": str(checkpoint),
                                        "judge": None if judge_dir is None else str(judge_dir)})


def judge_inputs(judge_dir: str | Path | None) -> list[Path]:
    """The judge files a run reads (its weights, config and prompt format), for the manifest."""
    if judge_dir is None:
        return []
    return [Path(judge_dir) / name for name in ("model.safetensors", "config.json", "judge.json")]


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--role", required=True, choices=sorted(ROLE_DOMAINS), help="the RL stage this filter feeds")
    ap.add_argument("--tasks-dir", required=True, help="the task ladder: artifacts/<scale>/tasks")
    ap.add_argument("--checkpoint", required=True,
                    help="the previous stage's model (HF dir + tokenizer): distill for rl_stem, rl_stem/final for "
                         "rl_code")
    ap.add_argument("--output-dir", required=True, help="artifacts/<scale>/pass_filter/<role>")
    ap.add_argument("--judge-dir", default=None,
                    help="the reward model, for rl_pref: artifacts/<scale>/reward_model/judge")
    args = ap.parse_args()
    try:
        manifest = run_pass_filter(args.role, args.tasks_dir, args.checkpoint, args.output_dir,
                                   common.resolve_cli_params(args, STAGE), judge_dir=args.judge_dir)
    except common.StageError as exc:
        common.fail(exc)
    c = manifest["counts"]
    print(f"{STAGE} {args.role}: {c['kept']}/{c['candidates']} prompts kept ({c['too_hard']} too hard, "
          f"{c['too_easy']} too easy), mean pass rate {c['mean_pass_rate']:.3f}")


if __name__ == "__main__":
    main()
