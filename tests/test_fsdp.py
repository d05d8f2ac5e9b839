"""The PyTorch backend on several processes: pretrain under FSDP2 on 2 CPU processes (gloo) trains the same global
batches as one process, so its losses and final weights match the single-process run to float reduction order; the
data cursors and every window read match exactly; a run resumes across a changed world size (2 -> 1, 1 -> 2); the
launch line for SLURM is what srun + torchrun need.

Tolerances (fp32 on CPU, 12 Adam steps): the 2-rank step differs from the 1-rank step only in the order float sums
are taken (each rank sums its own rows, then the gradient reduce-scatter and the totals all-reduce add the two
halves). Measured: weights max |dw| 3e-7, logged losses rel 1e-7, gradient norms rel 2e-6; asserted with ~6x
margin: WEIGHT_ATOL 2e-6, LOSS_RTOL 1e-5 (losses and grad norms). A wrong normalizer is a factor (W, or the
token count) and fails by orders of magnitude; Adam would hide a scaled gradient in the weights, so the logged
gradient norm is compared too."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fixtures_tokens import MODEL_PARAMS, PRETRAIN_PARAMS, make_tokens, write_plan
from stages import common, pretrain
from stages.training import World, shard_rows
from stages.training.launch import launch_command

REPO = Path(__file__).resolve().parent.parent
WEIGHT_ATOL = 2e-6
LOSS_RTOL = 1e-5
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: dict) -> None:
    """One torchrun-like rank: the env torchrun sets, one thread, run_pretrain; rank 0 writes the windows it read."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    log: list = []
    try:
        run(job, log)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        Path(job["log"]).write_text(json.dumps(log))


def run(job: dict, log: list) -> dict | None:
    out = Path(job["out"])
    return pretrain.run_pretrain(job["plan"], job["tokens"], out / "pretrain", job["ckpt"], job["params"],
                                 dict(job.get("model", MODEL_PARAMS)), out / "live", max_steps=job.get("max_steps"),
                                 on_step=lambda step, windows: log.extend([step, b, c] for b, c in windows))


def run_world(world: int, job: dict) -> list:
    """run_pretrain on `world` processes (gloo), or in this process when world == 1; the windows rank 0 read.
    (tests/test_megatron_backend.py runs its tensor-parallel case through it too.)"""
    if world == 1:
        log: list = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run(job, log)
        finally:
            torch.set_num_threads(threads)
        return log
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), job), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process pretrain did not finish in {TIMEOUT_S} s")
    return json.loads(Path(job["log"]).read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, make_tokens(tmp), write_plan(tmp / "plan.json")


def job(setup, name: str, **params) -> dict:
    tmp, tokens, plan = setup
    return {"plan": str(plan), "tokens": str(tokens), "out": str(tmp / name), "ckpt": str(tmp / name / "ckpt"),
            "params": {**PRETRAIN_PARAMS, **params}, "log": str(tmp / f"{name}.log.json")}


def final(setup, name: str) -> dict[str, torch.Tensor]:
    return load_file(setup[0] / name / "pretrain" / "final" / "model.safetensors")


def manifest(setup, name: str) -> dict:
    return json.loads((setup[0] / name / "pretrain" / "manifest.json").read_text())


def series(setup, name: str, metric: str) -> list[float]:
    """dvclive's train/<metric> rows (every log_every steps)."""
    tsv = (setup[0] / name / "live" / "plots" / "metrics" / "train" / f"{metric}.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[1]) for r in tsv]


def assert_matches_single(setup, name: str, reference: str = "single") -> None:
    a, b = final(setup, reference), final(setup, name)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{name}: max |dw| {worst:.3g}, max rel diff loss / grad norm", *(
        f"{max(abs(x / y - 1) for x, y in zip(series(setup, name, m), series(setup, reference, m))):.3g}"
        for m in ("loss", "grad_norm")))
    assert worst <= WEIGHT_ATOL, worst
    for metric in ("loss", "grad_norm"):  # the gradient norm catches a wrong normalizer that Adam would hide
        assert series(setup, name, metric) == pytest.approx(series(setup, reference, metric), rel=LOSS_RTOL)
    ma, mb = manifest(setup, reference), manifest(setup, name)
    assert ma["counts"] == mb["counts"] and ma["bucket_cursors"] == mb["bucket_cursors"]  # the data: exact
    for phase, held in ma["heldout_loss"].items():
        assert mb["heldout_loss"][phase] == pytest.approx(held, rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def single(setup):
    return run_world(1, job(setup, "single"))


def test_shard_rows_splits_the_global_batch_disjointly():
    micros = [{"input_ids": torch.arange(i * 4, i * 4 + 4)[:, None].expand(-1, 3)} for i in range(2)]  # rows 0..7
    parts = [shard_rows(micros, r, 2) for r in range(2)]
    assert [[m["input_ids"][:, 0].tolist() for m in p] for p in parts] == [[[0, 2, 4, 6]], [[1, 3, 5, 7]]]
    assert shard_rows(micros, 0, 1) is micros
    with pytest.raises(common.StageError, match="8 sequences do not split over 3 data-parallel ranks"):
        shard_rows(micros, 0, 3)


def test_resume_across_changed_world_sizes(setup, single):
    """1 process to step 4, 2 processes to step 8, 1 process to the end (12): each resume changes the world size."""
    name = "resume_1_2_1"
    log = run_world(1, {**job(setup, name), "max_steps": 4})
    log += run_world(2, {**job(setup, name), "max_steps": 8})
    assert not (setup[0] / name / "pretrain" / "final").exists()
    log += run_world(1, job(setup, name))
    assert log == single  # the same windows in the same order: none repeated or skipped across the resumes
    assert_matches_single(setup, name)


def test_two_fsdp_processes_under_torchrun_match_one(setup, single):
    """launch_command's single-node line (torchrun --standalone, 2 CPU ranks) runs `python -m stages.pretrain`
    under FSDP2: rank 0 alone prints the summary and writes the outputs, which match the single-process run."""
    j = job(setup, "torchrun_cli")
    out = Path(j["out"])
    cli = ["python", "-m", "stages.pretrain", "--params-json", json.dumps({"pretrain": j["params"],
           "model": MODEL_PARAMS}), "--plan", j["plan"], "--tokens-dir", j["tokens"], "--output-dir",
           str(out / "pretrain"), "--resume-dir", j["ckpt"], "--live-dir", str(out / "live")]
    cmd = launch_command(cli, nodes=1, gpus_per_node=2)
    assert cmd.startswith("torchrun --standalone --nproc-per-node=2 -m stages.pretrain --params-json '{")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pretrain: 12 steps") == 1  # one summary: rank 0's
    assert_matches_single(setup, "torchrun_cli")


def test_activation_checkpointing_gives_the_same_training(setup, single):
    run_world(1, job(setup, "ckpt_act", activation_checkpointing=True))
    a, b = final(setup, "single"), final(setup, "ckpt_act")
    assert all(torch.equal(a[k], b[k]) for k in a)  # recomputing the same forward: bit for bit on CPU


def test_world_is_read_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.from_env() == World(3, 8, 1) and not World.from_env().is_writer


def test_launch_command_for_slurm():
    cmd = launch_command(["python", "-m", "stages.pretrain", "--plan", "p.json"], nodes=2, gpus_per_node=8,
                         port=29500)
    assert cmd.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun ")
    assert "--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$(scontrol show hostnames " in cmd
    assert "--rdzv-id=$SLURM_JOB_ID" in cmd and cmd.endswith("-m stages.pretrain --plan p.json")
    assert launch_command(["python", "-m", "stages.pretrain"], nodes=1, gpus_per_node=0) == \
        "python -m stages.pretrain"  # CPU (tiny): no launcher, one process
