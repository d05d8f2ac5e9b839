r"""Evaluate: a checkpoint -> metrics JSON + per-sample verdicts, under the paper's sampling protocol.

Protocol (RECIPE.md): temperature 0.6, top-p 0.95, n samples per problem (avg@8 for AIME-style sets, avg@3
elsewhere). Each (benchmark, problem, sample) has its own seed, sha256(seed/benchmark/problem/sample), and its own
torch.Generator, so a sample does not depend on which others share its batch (up to float rounding). Prompts are
batched by token length (our decoder shares positions across a batch, so no padding), the samples of a problem
share one prefill, and decoding runs through the model's KV cache.

Metrics per benchmark, over P problems with n samples each, c_p of them correct (score > 0.5):
  avg@k  = 1/P sum_p 1/n sum_i score_{p,i}                      (k = n: the paper's avg@8 / avg@3)
  pass@k = 1/P sum_p [1 - C(n - c_p, k) / C(n, k)]              (Chen et al. 2021, unbiased; k = 1 and k = n)
computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms a large binomial.

Benchmarks are entries in params (`evaluate.benchmarks.<name>`: a plugin + its local data, paths relative to
--data-root); plugins (PLUGINS): math (MATH/AIME/GSM8K-style, configurable field names; tiny_math is one),
mcq (GPQA/SuperGPQA-style letters), humaneval (sandboxed `check(candidate)`), bfcl (AST match against
possible_answer), judge (Arena-Hard-style pairwise win rate, read from a judge checkpoint's P("A") vs P("B"),
both answer orders). Loaders read local files only (jsonl[.gz] / json / parquet / `datasets` saved to disk).

Outputs in --output-dir: metrics.json ({benchmark: {"avg@k", "pass@1", "pass@k", "n_problems", "k"}}),
samples/<benchmark>.jsonl (prompt, completion, verdict per sample), manifest.json (last).

    python -m stages.evaluate --params params.yaml --checkpoint DIR --output-dir DIR \
        [--benchmarks tiny_math,humaneval,bfcl] [--data-root data/eval]

Interop with lm-evaluation-harness: our checkpoints are Hugging Face Llama checkpoints (config.json +
model.safetensors + tokenizer files), so `lm_eval --model hf` loads them with transformers unchanged. lm-eval is
a dev dependency (not a pipeline one; tests/test_lm_eval.py runs it); our local tasks are yamls in data/eval/lm_eval/:

    .venv/bin/python tools/lm_eval_local.py --checkpoint DIR [--tasks tiny_math_gen] [--limit 20]
    # runs, from the repo root with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1:
    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --include_path data/eval/lm_eval \
        --tasks tiny_math_gen --device cpu --batch_size 8 --output_path bench/out/lm_eval [--limit 20]
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stages import common
from stages.verifiers import (SandboxLimits, VerifierResult, humaneval_program, strip_reasoning,
                              verify_choice, verify_code_batch, verify_math, verify_tool_calls)

STAGE = "evaluate"
DEFAULT_DATA_ROOT = common.REPO / "data" / "eval"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def summarize(scores: list[list[float]]) -> dict:
    """The metrics of one benchmark from per-problem sample scores (correct means score > 0.5)."""
    n = len(scores[0])
    if any(len(s) != n for s in scores):
        raise ValueError("every problem needs the same number of samples")
    correct = [sum(x > 0.5 for x in s) for s in scores]
    return {"avg@k": avg_at_k(scores), "k": n, "n_problems": len(scores),
            "pass@1": sum(pass_at_k(n, c, 1) for c in correct) / len(scores),
            "pass@k": sum(pass_at_k(n, c, n) for c in correct) / len(scores)}


def sample_seed(seed: int, benchmark: str, problem_id: str, sample: int) -> int:
    """The seed of one sample: the first 63 bits of sha256("seed/benchmark/problem/sample")."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/{problem_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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
    given, is the prompt for prompt_format=plain (a base model); else the messages' contents are joined."""
    load: Callable[[dict, Path], list[dict]]
    messages: Callable[[dict, dict], list[dict]]
    verify: Callable[[list[dict], list[str], dict], list[VerifierResult]]
    plain: Callable[[dict, dict], str] | None = None
    data_files: Callable[[dict, Path], list[Path]] | None = None


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
        jobs = [GenerationJob(render_prompt(tok, [{"role": "user", "content": p["question"]}], None, cfg), 0)
                for p in missing]
        outputs = generate(model, tok, jobs, {**cfg, "temperature": 0.0}, desc="reference answers")
        for p, out in zip(missing, outputs):
            p["reference"] = out.text
    return problems


@torch.inference_mode()
def judge_preference(model, tok, question: str, answer_a: str, answer_b: str, cfg: dict) -> float:
    """P(A better) = softmax([logit_A, logit_B])_0 at the judge's first reply token (the prompt keeps its last
    max_position_embeddings tokens)."""
    ids = render_prompt(tok, judge_messages(question, answer_a, answer_b), None, cfg)
    ids = ids[-model.config.max_position_embeddings:]
    letters = [_single_token(tok, "A"), _single_token(tok, "B")]
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


# ============================================================================ generation

@dataclass(frozen=True)
class GenerationJob:
    prompt_ids: list[int]
    seed: int


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int
    finished: bool      # stopped on a stop token (else ran out of max_new_tokens)


def _device(cfg: dict) -> torch.device:
    return torch.device(cfg.get("device", "cpu"))


def load_checkpoint(ckpt_dir: str | Path, cfg: dict):
    """(model in eval mode on cfg's device and dtype, its tokenizer) from a checkpoint directory."""
    from transformers import PreTrainedTokenizerFast

    from model.checkpoint import load_pretrained
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "tokenizer.json").is_file():
        raise common.StageError(f"{ckpt_dir}: no tokenizer.json next to the weights")
    model = load_pretrained(ckpt_dir, device=_device(cfg), dtype=_DTYPES[cfg.get("dtype", "float32")]).eval()
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


def _sample_rows(logits: torch.Tensor, temperature: float, top_p: float,
                 generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row, each row drawn with its own generator (the decoder's top-p sampler, row by row)."""
    from model.llama import _sample
    return torch.cat([_sample(logits[i:i + 1], temperature, top_p, g) for i, g in enumerate(generators)])


@torch.inference_mode()
def generate(model, tok, jobs: list[GenerationJob], cfg: dict, desc: str = "generate") -> list[Generation]:
    """Complete every job: jobs of equal prompt length are batched (up to cfg batch_size) and decoded through
    one KV cache; a row stops at a stop token (cfg stop_tokens) or after min(max_new_tokens, context - prompt)
    new tokens. A prompt keeps at most its last context - min(max_new_tokens, context / 2) tokens."""
    from tqdm import tqdm

    from model import KVCache
    max_new = int(cfg["max_new_tokens"])
    context = model.config.max_position_embeddings
    keep = context - min(max_new, context // 2)
    stop_ids = [_single_token(tok, t) for t in cfg["stop_tokens"]]
    prompts = [job.prompt_ids[-keep:] for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: (len(prompts[i]), i))
    batches, size = [], int(cfg["batch_size"])
    for i in order:
        if batches and len(batches[-1]) < size and len(prompts[batches[-1][0]]) == len(prompts[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    device, dtype = _device(cfg), model.lm_head.weight.dtype
    temperature, top_p = float(cfg["temperature"]), float(cfg["top_p"])
    results: list[Generation | None] = [None] * len(jobs)
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=None):
        ids = torch.tensor([prompts[i] for i in batch], device=device)
        budget = min(max_new, context - ids.shape[1])
        generators = [torch.Generator(device=device).manual_seed(jobs[i].seed) for i in batch]
        # Samples of one problem share their prompt: prefill each distinct prompt once, then copy its keys/values.
        distinct, rows = torch.unique(ids, dim=0, return_inverse=True)
        prefill = KVCache(model.config, len(distinct), ids.shape[1], device=device, dtype=dtype)
        logits = model(distinct, prefill)[:, -1].float()[rows]
        cache = KVCache(model.config, len(batch), ids.shape[1] + budget, device=device, dtype=dtype)
        cache.k[:, :, :, :ids.shape[1]] = prefill.k[:, rows]
        cache.v[:, :, :, :ids.shape[1]] = prefill.v[:, rows]
        cache.advance(ids.shape[1])
        new = torch.empty(len(batch), budget, dtype=torch.long, device=device)
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        stops = torch.tensor(stop_ids, device=device)
        steps = 0
        while steps < budget:
            token = _sample_rows(logits, temperature, top_p, generators)
            new[:, steps] = token
            steps += 1
            done |= torch.isin(token, stops)
            if bool(done.all()) or steps == budget:
                break
            logits = model(token[:, None], cache)[:, -1].float()
        for row, i in enumerate(batch):
            tokens = new[row, :steps].tolist()
            end = next((j for j, t in enumerate(tokens) if t in stop_ids), len(tokens))
            results[i] = Generation(tok.decode(tokens[:end], skip_special_tokens=False), end, end < len(tokens))
    return results


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
    cfg = {k: v for k, v in params.items() if k not in ("benchmarks", "run")}
    cfg.update(entry)
    if "n_samples" not in entry:
        cfg["n_samples"] = params["n_samples"]
    if not isinstance(cfg["n_samples"], int) or cfg["n_samples"] < 1:
        raise common.StageError(f"evaluate: n_samples for {name} must be a positive int, got {cfg['n_samples']!r}")
    return cfg


def benchmark_inputs(cfg: dict, data_root: Path) -> list[Path]:
    plugin = PLUGINS[cfg["plugin"]]
    if plugin.data_files is not None:
        return plugin.data_files(cfg, data_root)
    return [_resolve(data_root, cfg["path"])]


def evaluate_benchmark(model, tok, name: str, cfg: dict, data_root: Path) -> tuple[dict, list[dict]]:
    """(metrics, sample rows) of one benchmark: load, keep the first max_problems, sample n per problem,
    verify every sample."""
    plugin = PLUGINS[cfg["plugin"]]
    problems = plugin.load(cfg, data_root)
    if cfg.get("max_problems") is not None:
        problems = problems[:int(cfg["max_problems"])]
    if not problems:
        raise common.StageError(f"evaluate: benchmark {name} has no problems")
    n = cfg["n_samples"]
    jobs, prompts = [], []
    for p in problems:
        plain = plugin.plain(p, cfg) if plugin.plain is not None else None
        ids = render_prompt(tok, plugin.messages(p, cfg), plain, cfg)
        prompts.append(tok.decode(ids, skip_special_tokens=False))
        jobs += [GenerationJob(ids, sample_seed(int(cfg["seed"]), name, p["id"], j)) for j in range(n)]
    outputs = generate(model, tok, jobs, cfg, desc=name)
    expanded = [p for p in problems for _ in range(n)]
    verdicts = plugin.verify(expanded, [o.text for o in outputs], cfg)
    rows = [{"benchmark": name, "problem_id": p["id"], "sample": j % n, "seed": job.seed,
             "prompt": prompts[j // n], "completion": out.text, "completion_tokens": out.n_tokens,
             "finished": out.finished, "score": v.score, "correct": v.score > 0.5, "reason": v.reason}
            for j, (p, job, out, v) in enumerate(zip(expanded, jobs, outputs, verdicts))]
    scores = [[v.score for v in verdicts[i * n:(i + 1) * n]] for i in range(len(problems))]
    return summarize(scores), rows


def evaluate_checkpoint(ckpt_dir: str | Path, benchmarks: list[str], params: dict, data_root: str | Path,
                        output_dir: str | Path) -> dict:
    """Evaluate one checkpoint on the named benchmarks; writes output_dir/metrics.json,
    output_dir/samples/<benchmark>.jsonl and output_dir/manifest.json (last); returns the metrics."""
    data_root, output_dir = Path(data_root), Path(output_dir)
    configs = {name: benchmark_config(params, name) for name in benchmarks}
    threads = torch.get_num_threads()
    # A fixed thread count fixes the float reduction order, so samples do not depend on the host's core count.
    torch.set_num_threads(int(params["cpu_threads"]))
    try:
        model, tok = load_checkpoint(ckpt_dir, params)
        metrics, outputs, inputs = _evaluate_all(model, tok, configs, data_root, output_dir)
    finally:
        torch.set_num_threads(threads)
    common.write_json(output_dir / "metrics.json", metrics)
    outputs.append(output_dir / "metrics.json")
    ckpt_files = sorted(p for p in Path(ckpt_dir).iterdir() if p.is_file())
    common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=params, inputs=[*ckpt_files, *inputs],
                          outputs=outputs, code=common.code_version("stages.evaluate", "stages.verifiers"),
                          counts={name: {"problems": m["n_problems"], "samples": m["n_problems"] * m["k"]}
                                  for name, m in metrics.items()},
                          extra={"checkpoint": str(ckpt_dir), "benchmarks": benchmarks})
    return metrics


def _evaluate_all(model, tok, configs: dict, data_root: Path, output_dir: Path) -> tuple[dict, list[Path], list[Path]]:
    """Every benchmark in turn; its samples file is written as soon as it is done."""
    metrics, outputs, inputs = {}, [], []
    for name, cfg in configs.items():
        metrics[name], rows = evaluate_benchmark(model, tok, name, cfg, data_root)
        path = output_dir / "samples" / f"{name}.jsonl"
        with common.atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows),
                           encoding="utf-8")
        outputs.append(path)
        inputs += benchmark_inputs(cfg, data_root)
        print(f"{name}: avg@{metrics[name]['k']} = {metrics[name]['avg@k']:.4f} over "
              f"{metrics[name]['n_problems']} problems", file=sys.stderr)
    return metrics, outputs, inputs


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
                                                       "(default: evaluate.run)")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="where benchmark paths are relative to")
    args = ap.parse_args(argv)
    try:
        params = common.resolve_cli_params(args, STAGE)
        names = args.benchmarks.split(",") if args.benchmarks else list(params["run"])
        if args.checkpoint:
            evaluate_checkpoint(args.checkpoint, names, params, args.data_root, args.output_dir)
            return
        targets = parse_checkpoints(args.checkpoints)
        if args.only is not None:
            if args.only not in targets:
                raise common.StageError(f"--only {args.only!r} is not among --checkpoints {sorted(targets)}")
            targets = {args.only: targets[args.only]}
        for name, ckpt in targets.items():
            evaluate_checkpoint(ckpt, names, params, args.data_root, Path(args.output_dir) / name)
    except common.StageError as exc:
        common.fail(exc)


if __name__ == "__main__":
    main()
