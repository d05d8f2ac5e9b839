"""Run lm-evaluation-harness on one of our checkpoints, offline, with our local task yaml(s).

Our checkpoints are Hugging Face Llama checkpoints (config.json + model.safetensors + tokenizer files), so
lm-eval's `hf` model loads them with transformers unchanged. lm-eval is a dev dependency of the main venv:

    .venv/bin/python tools/lm_eval_local.py --checkpoint DIR [--tasks tiny_math_gen] [--limit 20]

which is, from the repo root with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, the same as lm-eval's own CLI:

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --include_path data/eval/lm_eval \
        --tasks tiny_math_gen --device cpu --batch_size 8 --output_path bench/out/lm_eval [--limit 20]

Results land where lm-eval puts them: OUTPUT_PATH/<checkpoint path, sanitized>/results_<timestamp>.json.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "data" / "eval" / "lm_eval"
# Read by datasets / huggingface_hub / transformers when first imported: set them before that.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_lm_eval(checkpoint: str | Path, tasks: list[str], limit: int | None = None, device: str = "cpu",
                dtype: str = "float32", batch_size: int = 8, log_samples: bool = False,
                evaluation_tracker=None) -> dict:
    """lm_eval.simple_evaluate with the `hf` model on `checkpoint` and only our task yamls (TASKS_DIR, not lm-eval's
    built-in ones). Call it from the repo root (the yamls' data_files are repo-relative) with OFFLINE_ENV in effect."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    return simple_evaluate(model="hf", model_args=f"pretrained={Path(checkpoint).resolve()},dtype={dtype}",
                           tasks=tasks, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                           device=device, batch_size=batch_size, limit=limit, log_samples=log_samples,
                           evaluation_tracker=evaluation_tracker)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lm-evaluation-harness on a local checkpoint with local tasks, offline")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tasks", default="tiny_math_gen", help=f"comma-separated task names (yamls in {TASKS_DIR})")
    ap.add_argument("--output-path", default="bench/out/lm_eval", help="relative to the repo root")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task")
    args = ap.parse_args(argv)
    checkpoint = Path(args.checkpoint).resolve()
    os.environ.update(OFFLINE_ENV)
    os.chdir(REPO)
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table
    tracker = EvaluationTracker(output_path=args.output_path)
    results = run_lm_eval(checkpoint, args.tasks.split(","), args.limit, args.device, args.dtype, args.batch_size,
                          evaluation_tracker=tracker)
    tracker.save_results_aggregated(results=results)
    print(make_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
