r"""Evaluate: a checkpoint -> metrics JSON + per-sample verdicts, under the paper's sampling protocol.

Protocol (RECIPE.md): temperature 0.6, top-p 0.95, n samples per problem (avg@8 for AIME-style sets, avg@3
elsewhere). Each (benchmark, problem, sample) has its own seed, sha256(seed/benchmark/problem/sample), and its own
torch.Generator, so a sample does not depend on which others share its batch (up to float rounding). Generation is
the shared engine's (model.generate): ragged batches through one KV cache, the samples of a problem sharing one
prefill, ending at a stop token (cfg stop_tokens) or a stop string of the prompt format (cfg stop_strings).

Per checkpoint (checkpoint_params): evaluate.per_checkpoint.<name> may set its prompt_format (post-trained
checkpoints: chat, their ChatML template with the assistant turn opened), its run (benchmarks: the ladder for base
and the post-trained ones) and max_new_tokens; a checkpoint not named there takes the evaluate defaults (phase
checkpoints: plain text). The format used is written into every benchmark's metrics and the manifest.

Metrics per benchmark, over P problems with n samples each, c_p of them correct (score > 0.5):
  avg@k  = 1/P sum_p 1/n sum_i score_{p,i}                      (k = n: the paper's avg@8 / avg@3)
  pass@k = 1/P sum_p [1 - C(n - c_p, k) / C(n, k)]              (Chen et al. 2021, unbiased; k = 1 and k = n)
computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms a large binomial.
Each metric has a 95% interval over problems (stages.eval_stats): Wilson when n = 1 and scores are 0/1, else a
seeded bootstrap over problems (evaluate.bootstrap_resamples), since the n samples of one problem are not independent.

Benchmarks are entries in params (`evaluate.benchmarks.<name>`: a plugin + its local data, paths relative to
--data-root); plugins (PLUGINS): math (MATH/AIME/GSM8K-style, configurable field names; tiny_math is one),
mcq (GPQA/SuperGPQA-style letters), humaneval (sandboxed `check(candidate)`), bfcl (AST match against
possible_answer), judge (Arena-Hard-style pairwise win rate, read from a judge checkpoint's P("A") vs P("B"),
both answer orders), ladder (the tasks stage's held-out math / code splits, graded per level; entry `root: tasks`
resolves its path against --tasks-dir). Loaders read local files only (jsonl[.gz] / json / parquet / `datasets`).

Outputs in --output-dir: metrics.json ({benchmark: {"avg@k", "pass@1", "pass@k", "<metric>:ci95_low",
"<metric>:ci95_high", "ci95_method", "n_problems", "k", "prompt_format", ["by_level": {level: the same}]}}),
scores.json ({benchmark: {problem id: mean score over its samples}}: the report's paired comparisons),
samples/<benchmark>.jsonl (prompt, completion, verdict per sample), manifest.json (last).

    python -m stages.evaluate --params params.yaml --checkpoint DIR --output-dir DIR \
        [--benchmarks tiny_math,humaneval,bfcl] [--data-root data/eval] [--tasks-dir artifacts/tiny/tasks]

Interop with lm-evaluation-harness: our checkpoints are Hugging Face Llama checkpoints (config.json +
model.safetensors + tokenizer files), so `lm_eval --model hf` loads them with transformers unchanged. lm-eval is
a dev dependency (not a pipeline one; tests/test_lm_eval.py runs it); our local tasks are yamls in data/eval/lm_eval/:

    .venv/bin/python tools/lm_eval_local.py --checkpoint DIR [--tasks tiny_math_gen] [--limit 20]
    # runs, from the repo root with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1:
    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --include_path data/eval/lm_eval \
        --tasks tiny_math_gen --device cpu --batch_size 8 --output_path bench/out/lm_eval [--limit 20]
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import model as engine
from model.config import ModelError
from stages import common, eval_stats
from stages.tasks import cut_at_first_answer, format_prompt
from stages.verifiers import (SandboxLimits, VerifierResult, humaneval_program, strip_reasoning,
                              verify_choice, verify_code_batch, verify_math, verify_tool_calls)

STAGE = "evaluate"
DEFAULT_DATA_ROOT = common.REPO / "data" / "eval"
_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names: torch loads on first use (the Snakefile reads us)


# ============================================================================ metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(scores: list[list[float]]) -> float:
    """Mean over problems of the mean score over that problem's samples."""
    if not scores:
        raise ValueError("avg@k over no problems")
    return sum(sum(s) / len(s) for s in scores) / len(scores)


def summarize(scores: list[list[float]], resamples: int, seed: int) -> dict:
    """The metrics of one benchmark from per-problem sample scores (correct means score > 0.5), each with its 95%
    interval (`<metric>:ci95_low`, `<metric>:ci95_high`; stages.eval_stats): Wilson over problems when each problem
    has one 0/1 sample, else a bootstrap over problems of the per-problem value (mean score, c/n, pass@n)."""
    n = len(scores[0])
    if any(len(s) != n for s in scores):
        raise ValueError("every problem needs the same number of samples")
    correct = [sum(x > 0.5 for x in s) for s in scores]
    per_problem = {"avg@k": [sum(s) / n for s in scores], "pass@1": [pass_at_k(n, c, 1) for c in correct],
                   "pass@k": [pass_at_k(n, c, n) for c in correct]}
    bernoulli = n == 1 and all(s[0] in (0.0, 1.0) for s in scores)
    out = {"avg@k": avg_at_k(scores), "k": n, "n_problems": len(scores),
           "pass@1": sum(per_problem["pass@1"]) / len(scores), "pass@k": sum(per_problem["pass@k"]) / len(scores)}
    for metric, values in per_problem.items():
        (out[f"{metric}:ci95_low"], out[f"{metric}:ci95_high"]), out["ci95_method"] = eval_stats.accuracy_interval(
            values, bernoulli, resamples, seed)
    return out


def sample_seed(seed: int, benchmark: str, problem_id: str, sample: int) -> int:
    """The seed of one sample: the first 63 bits of sha256("seed/benchmark/problem/sample")."""
    return eval_stats.derived_seed(seed, benchmark, problem_id, sample)


# ============================================================================ local data

def read_records(path: str | Path, split: str | None = None) -> list[dict]:
    """Rows of a local data file: *.jsonl / *.jsonl.gz / *.json (a list or JSON lines) / *.parquet, or a
    `datasets` dataset saved to disk (a DatasetDict needs `split`)."""
    path = Path(path)
    if not path.exists():
        raise common.StageError(f"{path}: evaluation data not found")
    if path.is_dir():
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise common.StageError(f"{path}: a DatasetDict; set `split` to one of {sorted(ds)}")
            ds = ds[split]
        return ds.to_list()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.name.endswith(".json"):
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise common.StageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return [record for _, record in common.iter_jsonl(path)]


def _resolve(data_root: Path, rel: str) -> Path:
    return Path(rel) if Path(rel).is_absolute() else data_root / rel


def _field(row: dict, name: str, path: Path, index: int):
    if name not in row:
        raise common.StageError(f"{path}: record {index + 1} has no field {name!r} (has {sorted(row)})")
    return row[name]


# ============================================================================ plugins

@dataclass(frozen=True)
class Plugin:
    """A kind of benchmark: load(cfg, data_root) -> problems (each with "id"); messages(problem, cfg) -> the chat
    prompt; verify(problems, completions, cfg) -> one VerifierResult per completion. plain(problem, cfg), when
    given, is the prompt for prompt_format=plain (a base model); else the messages' contents are joined. level(problem),
    when given, is the problem's difficulty level: the metrics then also hold `by_level`, the same metrics per level."""
    load: Callable[[dict, Path], list[dict]]
    messages: Callable[[dict, dict], list[dict]]
    verify: Callable[[list[dict], list[str], dict], list[VerifierResult]]
    plain: Callable[[dict, dict], str] | None = None
    data_files: Callable[[dict, Path], list[Path]] | None = None
    level: Callable[[dict], int] | None = None


PLUGINS: dict[str, Plugin] = {}

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _load_math(cfg: dict, data_root: Path) -> list[dict]:
    path = _resolve(data_root, cfg["path"])
    rows = read_records(path, cfg.get("split"))
    id_field = cfg.get("id_field", "id")
    return [{"id": str(row.get(id_field, i)), "problem": _field(row, cfg.get("problem_field", "problem"), path, i),
             "answer": str(_field(row, cfg.get("answer_field", "answer"), path, i))} for i, row in enumerate(rows)]


PLUGINS["math"] = Plugin(
    load=_load_math,
    messages=lambda p, cfg: [{"role": "user", "content": f"{p['problem']}\n\n{MATH_INSTRUCTION}"}],
    plain=lambda p, cfg: cfg.get("plain_template", "Question: {problem}\nAnswer:").format(problem=p["problem"]),
    verify=lambda problems, completions, cfg: [verify_math(c, p["answer"], float(cfg["sympy_timeout_s"]))
                                               for p, c in zip(problems, completions)],
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _load_mcq(cfg: dict, data_root: Path) -> list[dict]:
    path = _resolve(data_root, cfg["path"])
    problems = []
    for i, row in enumerate(read_records(path, cfg.get("split"))):
        choices = list(_field(row, cfg.get("choices_field", "choices"), path, i))
        answer = _field(row, cfg.get("answer_field", "answer"), path, i)
        letter = LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()
        if not 2 <= len(choices) <= len(LETTERS) or letter not in LETTERS[:len(choices)]:
            raise common.StageError(f"{path}: record {i + 1}: answer {answer!r} is not one of {len(choices)} choices")
        problems.append({"id": str(row.get(cfg.get("id_field", "id"), i)), "answer": letter, "choices": choices,
                         "question": _field(row, cfg.get("question_field", "question"), path, i)})
    return problems


def _mcq_text(p: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(p["choices"]))
    return (f"Answer the following multiple choice question. The last line of your response should be of the form "
            f"'Answer: LETTER', where LETTER is one of {', '.join(LETTERS[:len(p['choices'])])}.\n\n"
            f"{p['question']}\n\n{options}")


PLUGINS["mcq"] = Plugin(
    load=_load_mcq,
    messages=lambda p, cfg: [{"role": "user", "content": _mcq_text(p)}],
    plain=lambda p, cfg: f"{_mcq_text(p)}\nAnswer:",
    verify=lambda problems, completions, cfg: [verify_choice(c, p["answer"], len(p["choices"]))
                                               for p, c in zip(problems, completions)],
)

# Codex's stop sequences: a continuation ends where the next top-level statement begins.
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert", "\n```")


def _load_humaneval(cfg: dict, data_root: Path) -> list[dict]:
    path = _resolve(data_root, cfg["path"])
    rows = read_records(path)
    for i, row in enumerate(rows):
        for key in ("task_id", "prompt", "test", "entry_point"):
            _field(row, key, path, i)
    return [{"id": r["task_id"], **r} for r in rows]


def humaneval_candidate(problem: dict, completion: str) -> str:
    """The program to test: a fenced (or bare) full definition of the entry point, after the prompt's imports,
    when the reply has one (chat models); else the prompt continued by the completion up to the first stop
    sequence (base models). Then HumanEval's tests and `check(entry_point)`."""
    text = strip_reasoning(completion)
    blocks = re.findall(r"```(?:python|py|Python)?\s*\n(.*?)```", text, re.DOTALL)
    definition = re.compile(rf"^def {re.escape(problem['entry_point'])}\s*\(", re.MULTILINE)
    full = next((b for b in reversed(blocks) if definition.search(b)), None)
    if full is None and definition.search(text):
        full = text
    if full is not None:
        imports = "".join(line + "\n" for line in problem["prompt"].splitlines()
                          if line.startswith(("import ", "from ")))
        return humaneval_program(imports, full, problem["test"], problem["entry_point"])
    body = completion
    cut = min((i for i in (body.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(body))
    return humaneval_program(problem["prompt"], body[:cut], problem["test"], problem["entry_point"])


def _verify_humaneval(problems: list[dict], completions: list[str], cfg: dict) -> list[VerifierResult]:
    limits = SandboxLimits(timeout_s=float(cfg["sandbox_timeout_s"]), memory_mb=int(cfg["sandbox_memory_mb"]))
    programs = [humaneval_candidate(p, c) for p, c in zip(problems, completions)]
    return verify_code_batch(programs, limits, workers=int(cfg["sandbox_workers"]))


PLUGINS["humaneval"] = Plugin(
    load=_load_humaneval,
    messages=lambda p, cfg: [{"role": "user", "content": "Complete the following Python function. Reply with the "
                              f"whole function in one ```python code block.\n\n```python\n{p['prompt']}```"}],
    plain=lambda p, cfg: p["prompt"],
    verify=_verify_humaneval,
)

BFCL_SYSTEM = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. Based on "
    "the question, make one or more function calls to achieve the purpose.\nReply only with the calls, in the "
    "format [func_name1(param_name1=value1, param_name2=value2), func_name2(params)], and nothing else.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n{functions}\n")


def _bfcl_files(cfg: dict, data_root: Path) -> list[Path]:
    root = _resolve(data_root, cfg["path"])
    return [p for cat in cfg["categories"]
            for p in (root / f"BFCL_v4_{cat}.json", root / "possible_answer" / f"BFCL_v4_{cat}.json")]


def _load_bfcl(cfg: dict, data_root: Path) -> list[dict]:
    """Single-turn categories, interleaved round-robin so that the first N problems cover every category."""
    files = _bfcl_files(cfg, data_root)
    per_category = []
    for cat, questions_path, answers_path in zip(cfg["categories"], files[::2], files[1::2]):
        answers = {r["id"]: r["ground_truth"] for r in read_records(answers_path)}
        rows = []
        for i, row in enumerate(read_records(questions_path)):
            if row["id"] not in answers:
                raise common.StageError(f"{answers_path}: no possible answer for {row['id']}")
            if len(row["question"]) != 1:
                raise common.StageError(f"{questions_path}: record {i + 1} is multi-turn; only single-turn "
                                        f"categories are supported")
            rows.append({"id": row["id"], "category": cat, "messages": row["question"][0],
                         "functions": row["function"], "ground_truth": answers[row["id"]]})
        per_category.append(rows)
    return [rows[i] for i in range(max(map(len, per_category), default=0)) for rows in per_category if i < len(rows)]


PLUGINS["bfcl"] = Plugin(
    load=_load_bfcl,
    messages=lambda p, cfg: [{"role": "system", "content": BFCL_SYSTEM.format(functions=json.dumps(p["functions"]))},
                             *p["messages"]],
    verify=lambda problems, completions, cfg: [verify_tool_calls(c, p["functions"], p["ground_truth"])
                                               for p, c in zip(problems, completions)],
    data_files=_bfcl_files,
)

JUDGE_SYSTEM = ("Please act as an impartial judge and evaluate the quality of the two answers to the user "
                "question below. Judge helpfulness, correctness, depth and clarity; ignore the answers' order and "
                "length. Reply with a single letter: A if answer A is better, B if answer B is better.")


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"[Question]\n{question}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}"
                                        f"\n\nWhich answer is better, A or B?"}]


def _load_judge(cfg: dict, data_root: Path) -> list[dict]:
    """Questions with the reference model's answers: a `reference` field in the file, else generated greedily
    by cfg["reference_checkpoint"]."""
    path = _resolve(data_root, cfg["path"])
    rows = read_records(path)
    problems = [{"id": str(r.get("id", i)), "question": _field(r, "prompt", path, i), "reference": r.get("reference")}
                for i, r in enumerate(rows)]
    missing = [p for p in problems if p["reference"] is None]
    if missing:
        if not cfg.get("reference_checkpoint"):
            raise common.StageError(f"{path}: {len(missing)} questions have no `reference` answer and "
                                    f"evaluate.benchmarks.<name>.reference_checkpoint is not set")
        model, tok = load_checkpoint(cfg["reference_checkpoint"], cfg)
        requests = [engine.Request(render_prompt(tok, [{"role": "user", "content": p["question"]}], None, cfg))
                    for p in missing]
        outputs = generate(model, tok, requests, {**cfg, "temperature": 0.0})
        for p, (out,) in zip(missing, outputs):
            p["reference"] = out.text
    return problems


def judge_preference(model, tok, question: str, answer_a: str, answer_b: str, cfg: dict) -> float:
    """P(A better) = softmax([logit_A, logit_B])_0 at the judge's first reply token (the prompt keeps its last
    max_position_embeddings tokens)."""
    import torch
    ids = render_prompt(tok, judge_messages(question, answer_a, answer_b), None, cfg)
    ids = ids[-model.config.max_position_embeddings:]
    letters = [_single_token(tok, "A"), _single_token(tok, "B")]
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=_device(cfg)))[0, -1].float()
    return torch.softmax(logits[letters], dim=-1)[0].item()


def _verify_judge(problems: list[dict], completions: list[str], cfg: dict) -> list[VerifierResult]:
    """Win (1), tie (0.5) or loss (0) against the reference, judged in both orders to cancel position bias:
    p = (P(A | model as A) + P(B | model as B)) / 2; a tie when |p - 0.5| <= tie_margin."""
    if not cfg.get("judge_checkpoint"):
        raise common.StageError("evaluate.benchmarks.<judge>.judge_checkpoint is not set (a checkpoint directory)")
    model, tok = load_checkpoint(cfg["judge_checkpoint"], cfg)
    results = []
    for p, completion in zip(problems, completions):
        start = time.perf_counter()
        answer = strip_reasoning(completion).strip()
        reference = strip_reasoning(p["reference"]).strip()
        as_a = judge_preference(model, tok, p["question"], answer, reference, cfg)
        as_b = 1.0 - judge_preference(model, tok, p["question"], reference, answer, cfg)
        win = (as_a + as_b) / 2
        margin = float(cfg["tie_margin"])
        score = 1.0 if win > 0.5 + margin else 0.0 if win < 0.5 - margin else 0.5
        results.append(VerifierResult(score, f"P(model better) = {win:.4f} (as A {as_a:.4f}, as B {as_b:.4f})",
                                      time.perf_counter() - start))
    return results


def _judge_files(cfg: dict, data_root: Path) -> list[Path]:
    """The questions plus every file of the judge and reference checkpoints: the verdicts depend on them."""
    checkpoints = [Path(cfg[k]) for k in ("judge_checkpoint", "reference_checkpoint") if cfg.get(k)]
    return [_resolve(data_root, cfg["path"]), *(f for d in checkpoints for f in sorted(d.iterdir()) if f.is_file())]


PLUGINS["judge"] = Plugin(
    load=_load_judge,
    messages=lambda p, cfg: [{"role": "user", "content": p["question"]}],
    verify=_verify_judge,
    data_files=_judge_files,
)

LADDER_FIELDS = {"math": ("id", "level", "template_id", "prompt", "answer"),
                 "code": ("id", "level", "template_id", "prompt", "statement", "test", "entry_point")}


def _load_ladder(cfg: dict, data_root: Path) -> list[dict]:
    """A held-out split of the task ladder (stages.tasks: math_heldout / code_heldout parquet), level by level; inside a
    level the templates take turns, so the first `max_per_level` problems of a level (null: all) cover its templates."""
    path = _resolve(data_root, cfg["path"])
    by_level: dict[int, dict[str, list[dict]]] = {}
    for i, row in enumerate(read_records(path)):
        domain = _field(row, "domain", path, i)
        if domain not in LADDER_FIELDS:
            raise common.StageError(f"{path}: record {i + 1}: domain must be math or code, got {domain!r}")
        for key in LADDER_FIELDS[domain]:
            _field(row, key, path, i)
        by_level.setdefault(row["level"], {}).setdefault(row["template_id"], []).append(row)
    cap = cfg.get("max_per_level")
    problems = []
    for level in sorted(by_level):
        templates = list(by_level[level].values())
        turns = [rows[i] for i in range(max(map(len, templates))) for rows in templates if i < len(rows)]
        problems += turns if cap is None else turns[:int(cap)]
    return problems


def _verify_ladder(problems: list[dict], completions: list[str], cfg: dict) -> list[VerifierResult]:
    """Math: verify_math on the first final answer (a plain-format completion is first cut after its first `#### x`
    line, stages.tasks.cut_at_first_answer); code: the task's public + hidden tests in the sandbox (HumanEval
    protocol)."""
    plain = cfg["prompt_format"] == "plain"
    results: list[VerifierResult | None] = [None] * len(problems)
    code = [i for i, p in enumerate(problems) if p["domain"] == "code"]
    for i, verdict in zip(code, _verify_humaneval([problems[i] for i in code], [completions[i] for i in code], cfg)):
        results[i] = verdict
    for i, p in enumerate(problems):
        if p["domain"] == "math":
            text = cut_at_first_answer(completions[i]) if plain else completions[i]
            results[i] = verify_math(text, p["answer"], float(cfg["sympy_timeout_s"]))
    return results


PLUGINS["ladder"] = Plugin(
    load=_load_ladder,
    messages=lambda p, cfg: format_prompt(p, "chat"),
    plain=lambda p, cfg: format_prompt(p, "plain"),
    verify=_verify_ladder,
    level=lambda p: int(p["level"]),
)


# ============================================================================ generation

def _device(cfg: dict) -> torch.device:
    import torch
    return torch.device(cfg.get("device", "cpu"))


def load_checkpoint(ckpt_dir: str | Path, cfg: dict):
    """(model in eval mode on cfg's device and dtype, its tokenizer) from a checkpoint directory."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from model.checkpoint import load_pretrained
    ckpt_dir = Path(ckpt_dir)
    dtype = cfg.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise common.StageError(f"evaluate: dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if not (ckpt_dir / "tokenizer.json").is_file():
        raise common.StageError(f"{ckpt_dir}: no tokenizer.json next to the weights")
    model = load_pretrained(ckpt_dir, device=_device(cfg), dtype=getattr(torch, dtype)).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt_dir))
    if tok.vocab_size > model.config.vocab_size:
        raise common.StageError(f"{ckpt_dir}: tokenizer has {tok.vocab_size} tokens, "
                                f"the model {model.config.vocab_size}")
    return model, tok


def _single_token(tok, text: str) -> int:
    encoded = tok.encode(text, add_special_tokens=False)
    if len(encoded) != 1:
        raise common.StageError(f"tokenizer: {text!r} is not a single token ({encoded})")
    return encoded[0]


def render_prompt(tok, messages: list[dict], plain: str | None, cfg: dict) -> list[int]:
    """Token ids of a prompt: the checkpoint's chat template with the assistant turn opened
    (prompt_format=chat), or the plain text (prompt_format=plain, for base models)."""
    fmt = cfg["prompt_format"]
    if fmt == "chat":
        if not tok.chat_template:
            raise common.StageError("prompt_format=chat but the checkpoint's tokenizer has no chat_template")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif fmt == "plain":
        text = plain if plain is not None else "\n\n".join(m["content"] for m in messages) + "\n\n"
    else:
        raise common.StageError(f"evaluate.prompt_format must be chat or plain, got {fmt!r}")
    return tok.encode(text, add_special_tokens=False)


def sampling_params(tok, cfg: dict) -> engine.SamplingParams:
    """The engine's sampling settings from cfg: max_new_tokens, temperature, top_p, stop_tokens (each a single token
    of the tokenizer) and the stop strings of the prompt format (cfg stop_strings[prompt_format]: a base model's
    "\nProblem:" ends its answer before it writes the next problem; chat ends at <|im_end|>)."""
    return engine.SamplingParams(int(cfg["max_new_tokens"]), float(cfg["temperature"]), float(cfg["top_p"]),
                                 stop_token_ids=tuple(_single_token(tok, t) for t in cfg["stop_tokens"]),
                                 stop_strings=tuple(cfg["stop_strings"][cfg["prompt_format"]]))


def generate(model, tok, requests: list[engine.Request], cfg: dict) -> list[list[engine.Completion]]:
    """Complete every request (a prompt and the seeds of its samples) with the engine, cfg batch_size rows at a time;
    result[r][i] is request r's sample with seed i. A prompt keeps at most its last context - min(max_new_tokens,
    context / 2) tokens; a completion ends at a stop or after min(max_new_tokens, context - prompt) tokens."""
    context = model.config.max_position_embeddings
    keep = context - min(int(cfg["max_new_tokens"]), context // 2)
    requests = [engine.Request(list(r.prompt_ids)[-keep:], r.seeds) for r in requests]
    return engine.generate(model, requests, sampling_params(tok, cfg),
                           lambda ids: tok.decode(ids, skip_special_tokens=False), int(cfg["batch_size"]))


# ============================================================================ the harness

def benchmark_config(params: dict, name: str) -> dict:
    """A benchmark's settings: the global sampling/sandbox settings overlaid with its entry in
    evaluate.benchmarks (which names its plugin and data), n_samples resolved to an int."""
    entries = params.get("benchmarks", {})
    if name not in entries:
        raise common.StageError(f"evaluate.benchmarks has no entry {name!r} (has {sorted(entries)})")
    entry = entries[name]
    if entry.get("plugin") not in PLUGINS:
        raise common.StageError(f"evaluate.benchmarks.{name}.plugin must be one of {sorted(PLUGINS)}, "
                                f"got {entry.get('plugin')!r}")
    cfg = {k: v for k, v in params.items() if k not in ("benchmarks", "run", "per_checkpoint")}
    cfg.update(entry)
    if "n_samples" not in entry:
        cfg["n_samples"] = params["n_samples"]
    if not isinstance(cfg["n_samples"], int) or cfg["n_samples"] < 1:
        raise common.StageError(f"evaluate: n_samples for {name} must be a positive int, got {cfg['n_samples']!r}")
    return cfg


PER_CHECKPOINT_KEYS = {"prompt_format", "run", "max_new_tokens"}


def checkpoint_params(params: dict, name: str | None) -> dict:
    """The evaluate params of one named checkpoint: evaluate.per_checkpoint.<name> (prompt_format, run,
    max_new_tokens: a `<think>` chain needs more room than a base model's answer) over the evaluate defaults. The
    format is stated, never inferred from the tokenizer: every checkpoint of ours carries the same ChatML template,
    base models included."""
    override = (params.get("per_checkpoint") or {}).get(name) or {}
    unknown = sorted(set(override) - PER_CHECKPOINT_KEYS)
    if unknown:
        raise common.StageError(f"evaluate.per_checkpoint.{name}: unknown keys {unknown} "
                                f"(allowed: {sorted(PER_CHECKPOINT_KEYS)})")
    out = {**params, **override}
    if out["prompt_format"] not in ("chat", "plain"):
        raise common.StageError(f"evaluate: prompt format of {name or 'the checkpoint'} must be chat or plain, "
                                f"got {out['prompt_format']!r}")
    return out


def benchmark_root(cfg: dict, roots: dict[str, Path | None]) -> Path:
    """The directory a benchmark's path is relative to: roots[cfg root] (default "eval", the --data-root; "tasks": the
    tasks stage's output, --tasks-dir)."""
    key = cfg.get("root", "eval")
    if roots.get(key) is None:
        raise common.StageError(f"evaluate: benchmark path root {key!r} has no directory (root tasks: give "
                                f"--tasks-dir, the tasks stage's output)")
    return Path(roots[key])


def benchmark_inputs(cfg: dict, data_root: Path) -> list[Path]:
    plugin = PLUGINS[cfg["plugin"]]
    if plugin.data_files is not None:
        return plugin.data_files(cfg, data_root)
    return [_resolve(data_root, cfg["path"])]


def benchmark_metrics(name: str, ids: list[str], scores: list[list[float]], levels: list[int] | None,
                      cfg: dict) -> tuple[dict, dict[str, float]]:
    """(metrics, {problem id: mean score}) of one benchmark from its per-problem sample scores: summarize with 95%
    intervals (bootstrap seeded per benchmark and level), the prompt format, and `by_level` when problems have
    levels."""
    resamples, seed = int(cfg["bootstrap_resamples"]), int(cfg["seed"])
    metrics = {**summarize(scores, resamples, eval_stats.derived_seed(seed, name)),
               "prompt_format": cfg["prompt_format"]}
    if levels is not None:
        metrics["by_level"] = {str(lv): summarize([s for s, l in zip(scores, levels) if l == lv], resamples,
                                                  eval_stats.derived_seed(seed, name, lv))
                               for lv in sorted(set(levels))}
    return metrics, {i: sum(s) / len(s) for i, s in zip(ids, scores)}


def checkpoint_inputs(params: dict, name: str, roots: dict[str, Path | None]) -> list[Path]:
    """The data files the named checkpoint's run reads (its per_checkpoint run, else evaluate.run): the inputs its
    evaluate job declares, so a phase checkpoint without the ladder does not depend on the tasks stage."""
    p = checkpoint_params(params, name)
    configs = [benchmark_config(p, bench) for bench in p["run"]]
    return sorted({f for cfg in configs for f in benchmark_inputs(cfg, benchmark_root(cfg, roots))})


def evaluate_benchmark(model, tok, name: str, cfg: dict, data_root: Path) -> tuple[dict, list[dict], dict]:
    """(metrics, sample rows, {problem id: mean score}) of one benchmark: load, keep the first max_problems, sample n
    per problem, verify every sample."""
    plugin = PLUGINS[cfg["plugin"]]
    problems = plugin.load(cfg, data_root)
    if cfg.get("max_problems") is not None:
        problems = problems[:int(cfg["max_problems"])]
    if not problems:
        raise common.StageError(f"evaluate: benchmark {name} has no problems")
    n = cfg["n_samples"]
    requests, prompts = [], []
    for p in problems:
        plain = plugin.plain(p, cfg) if plugin.plain is not None else None
        ids = render_prompt(tok, plugin.messages(p, cfg), plain, cfg)
        prompts.append(tok.decode(ids, skip_special_tokens=False))
        requests.append(engine.Request(ids, [sample_seed(int(cfg["seed"]), name, p["id"], j) for j in range(n)]))
    outputs = [c for samples in generate(model, tok, requests, cfg) for c in samples]
    expanded = [p for p in problems for _ in range(n)]
    verdicts = plugin.verify(expanded, [o.text for o in outputs], cfg)
    rows = [{"benchmark": name, "problem_id": p["id"], "sample": j % n, "seed": requests[j // n].seeds[j % n],
             "prompt": prompts[j // n], "completion": out.text, "completion_tokens": len(out.token_ids),
             "finish_reason": out.finish_reason, "score": v.score, "correct": v.score > 0.5, "reason": v.reason}
            for j, (p, out, v) in enumerate(zip(expanded, outputs, verdicts))]
    scores = [[v.score for v in verdicts[i * n:(i + 1) * n]] for i in range(len(problems))]
    levels = None if plugin.level is None else [plugin.level(p) for p in problems]
    metrics, per_problem = benchmark_metrics(name, [p["id"] for p in problems], scores, levels, cfg)
    return metrics, rows, per_problem


def evaluate_checkpoint(ckpt_dir: str | Path, benchmarks: list[str], params: dict, data_root: str | Path,
                        output_dir: str | Path, tasks_dir: str | Path | None = None) -> dict:
    """Evaluate one checkpoint on the named benchmarks (params: checkpoint_params' slice, its prompt format resolved);
    writes output_dir/metrics.json, output_dir/scores.json ({benchmark: {problem id: mean score}}, what the report's
    paired comparisons read), output_dir/samples/<benchmark>.jsonl and output_dir/manifest.json (last)."""
    missing = [k for k in ("stop_strings", "bootstrap_resamples") if k not in params]
    if missing:
        raise common.StageError(f"evaluate: {', '.join(missing)} not set (params.yaml evaluate section)")
    output_dir = Path(output_dir)
    roots = {"eval": Path(data_root), "tasks": None if tasks_dir is None else Path(tasks_dir)}
    configs = {name: benchmark_config(params, name) for name in benchmarks}
    print(f"evaluate {ckpt_dir}: prompt_format={params['prompt_format']}", file=sys.stderr)
    import torch
    threads = torch.get_num_threads()
    # A fixed thread count fixes the float reduction order, so samples do not depend on the host's core count.
    torch.set_num_threads(int(params["cpu_threads"]))
    try:
        model, tok = load_checkpoint(ckpt_dir, params)
        metrics, scores, outputs, inputs = _evaluate_all(model, tok, configs, roots, output_dir)
    finally:
        torch.set_num_threads(threads)
    common.write_json(output_dir / "scores.json", scores)
    common.write_json(output_dir / "metrics.json", metrics)
    outputs += [output_dir / "scores.json", output_dir / "metrics.json"]
    ckpt_files = sorted(p for p in Path(ckpt_dir).iterdir() if p.is_file())
    common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=params, inputs=[*ckpt_files, *inputs],
                          outputs=outputs, code=common.code_version_closure("stages.evaluate"),
                          counts={name: {"problems": m["n_problems"], "samples": m["n_problems"] * m["k"]}
                                  for name, m in metrics.items()},
                          extra={"checkpoint": str(ckpt_dir), "benchmarks": benchmarks,
                                 "prompt_format": params["prompt_format"]})
    return metrics


def _evaluate_all(model, tok, configs: dict, roots: dict,
                  output_dir: Path) -> tuple[dict, dict, list[Path], list[Path]]:
    """Every benchmark in turn; its samples file is written as soon as it is done."""
    metrics, scores, outputs, inputs = {}, {}, [], []
    for name, cfg in configs.items():
        data_root = benchmark_root(cfg, roots)
        metrics[name], rows, scores[name] = evaluate_benchmark(model, tok, name, cfg, data_root)
        path = output_dir / "samples" / f"{name}.jsonl"
        with common.atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows),
                           encoding="utf-8")
        outputs.append(path)
        inputs += benchmark_inputs(cfg, data_root)
        m = metrics[name]
        print(f"{name}: avg@{m['k']} = {m['avg@k']:.4f} [{m['avg@k:ci95_low']:.4f}, {m['avg@k:ci95_high']:.4f}] "
              f"over {m['n_problems']} problems", file=sys.stderr)
    return metrics, scores, outputs, inputs


def parse_checkpoints(spec: str) -> dict[str, Path]:
    """`name=dir,name=dir` -> {name: dir}: the checkpoints the DAG evaluates, each into <output-dir>/<name>/."""
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise common.StageError(f"--checkpoints: expected name=dir,name=dir, got {spec!r}")
    return {name: Path(path) for name, path in pairs}


def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser("Evaluate checkpoints: metrics JSON + per-sample verdicts")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="one checkpoint directory (config.json, model.safetensors, tokenizer)")
    which.add_argument("--checkpoints", help="name=dir,... : each into <output-dir>/<name>/ (what DVC runs)")
    ap.add_argument("--only", default=None, help="with --checkpoints: evaluate just this one (a Snakemake job)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--benchmarks", default=None, help="comma-separated names from evaluate.benchmarks "
                                                       "(default: the checkpoint's run, evaluate.run)")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="where benchmark paths are relative to")
    ap.add_argument("--tasks-dir", default=None,
                    help="the tasks stage's output (benchmarks with root: tasks, the ladder)")
    args = ap.parse_args(argv)
    try:
        params = common.resolve_cli_params(args, STAGE)
        chosen = args.benchmarks.split(",") if args.benchmarks else None
        if args.checkpoint:
            p = checkpoint_params(params, None)
            evaluate_checkpoint(args.checkpoint, chosen or p["run"], p, args.data_root, args.output_dir, args.tasks_dir)
            return
        targets = parse_checkpoints(args.checkpoints)
        if args.only is not None:
            if args.only not in targets:
                raise common.StageError(f"--only {args.only!r} is not among --checkpoints {sorted(targets)}")
            targets = {args.only: targets[args.only]}
        for name, ckpt in targets.items():
            p = checkpoint_params(params, name)
            evaluate_checkpoint(ckpt, chosen or p["run"], p, args.data_root, Path(args.output_dir) / name,
                                args.tasks_dir)
    except (common.StageError, ModelError) as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
