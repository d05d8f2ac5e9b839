"""Run lm-evaluation-harness on one of our checkpoints, offline, with our local task yaml(s).

Our checkpoints are Hugging Face Llama checkpoints (config.json + model.safetensors + tokenizer files), so
lm-eval's `hf` model loads them with transformers unchanged. lm-eval is not a pipeline dependency: run this
script with the interpreter of a separate venv that has it (never install it into .venv):

    python -m venv bench/.venv-lmeval
    echo "$PWD/.venv/lib/python3.11/site-packages" > bench/.venv-lmeval/lib/python3.11/site-packages/_main.pth
    bench/.venv-lmeval/bin/pip install 'lm-eval[hf]'   # adds lm-eval's deps only; torch etc. come from .venv
    bench/.venv-lmeval/bin/python tools/lm_eval_local.py --checkpoint DIR --limit 20

which runs, from the repo root, with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1:

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --include_path data/eval/lm_eval \
        --tasks tiny_math_gen --device cpu --batch_size 8 --output_path OUT [--limit N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "data" / "eval" / "lm_eval"


def lm_eval_command(checkpoint: str, tasks: str, output_path: str, device: str, dtype: str, batch_size: int,
                    limit: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={Path(checkpoint).resolve()},dtype={dtype}",
           "--include_path", str(TASKS_DIR), "--tasks", tasks, "--device", device,
           "--batch_size", str(batch_size), "--output_path", output_path]
    return cmd + (["--limit", str(limit)] if limit is not None else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lm-evaluation-harness on a local checkpoint with local tasks, offline")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tasks", default="tiny_math_gen", help=f"comma-separated task names (yamls in {TASKS_DIR})")
    ap.add_argument("--output-path", default="bench/out/lm_eval")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task")
    args = ap.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = lm_eval_command(args.checkpoint, args.tasks, args.output_path, args.device, args.dtype,
                          args.batch_size, args.limit)
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
