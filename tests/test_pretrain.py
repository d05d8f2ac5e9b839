"""pretrain: the FG-WSD / WSD / cosine LR tables, the seeded bucket draw, and exact resume: a run stopped anywhere
(mid-phase, at a phase boundary, or by kill -9) and resumed ends with the same weights as an uninterrupted run,
having read every window once; tokens per phase match the plan to the step rounding."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixtures_tokens import MODEL_PARAMS, PRETRAIN_PARAMS, make_tokens, micro_plan, write_plan
from stages import common, lr_schedule, pretrain

REPO = Path(__file__).resolve().parent.parent
PARAMS = dict(PRETRAIN_PARAMS)
PEAK, FINAL = micro_plan()["lr_peak"], micro_plan()["lr_final"]
# The micro plan at 4 sequences of 16 tokens per step: 2 + 4 + 4 steps, then decay at seq_len 32: 192 / 128 -> 2.
STEPS = [2, 4, 4, 2]


# ----------------------------------------------------------------------------- the schedule (pure)

@pytest.mark.parametrize("tokens,per_step,min_steps,steps", [
    (128, 64, 1, 2), (96, 64, 1, 2), (65, 64, 1, 2), (64, 64, 1, 1), (10, 64, 1, 1), (0, 64, 1, 1),
    (10**12, 4 * 2**20, 1, 238419), (4348, 4096, 1, 2), (4348, 4096, 8, 8), (10**6, 4096, 8, 245)])
def test_phase_steps_cover_the_planned_tokens_with_a_floor(tokens, per_step, min_steps, steps):
    assert lr_schedule.phase_steps(tokens, per_step, min_steps) == steps


def test_min_phase_steps_gives_every_phase_a_few_steps():
    s = lr_schedule.build_schedule(micro_plan(), "fgwsd", 16, 4, min_phase_steps=3)
    assert [ph.steps for ph in s.phases] == [max(3, n) for n in STEPS]


def test_fgwsd_lr_table_and_phase_boundaries():
    s = lr_schedule.build_schedule(micro_plan(), "fgwsd", seq_len=16, sequences_per_step=4)
    assert [ph.steps for ph in s.phases] == STEPS and s.total_steps == 12
    assert [ph.start for ph in s.phases] == [0, 2, 6, 10] and [ph.seq_len for ph in s.phases] == [16, 16, 16, 32]
    table = [lr_schedule.lr_at(s, t) for t in range(12)]
    assert table[0] == pytest.approx(PEAK / 2) and table[1] == pytest.approx(PEAK)     # warmup: never 0, ends at peak
    assert table[2:10] == [PEAK] * 8                                                    # both stable phases: constant
    assert table[10] == pytest.approx((PEAK + FINAL) / 2) and table[11] == pytest.approx(FINAL)  # decay ends at final
    assert lr_schedule.lr_at(s, 50) == pytest.approx(FINAL)                             # past the end: stays
    assert [lr_schedule.phase_at(s, t).name for t in (0, 1, 2, 5, 6, 9, 10, 11)] == [
        "warmup", "warmup", "diversity_stable", "diversity_stable", "hq_stable", "hq_stable", "decay", "decay"]
    assert s.phases[2].mixture == {"top/general": 0.6, "top/math": 0.4}


def test_wsd_keeps_the_lr_and_uses_one_token_weighted_mixture():
    plan = micro_plan()
    fg = lr_schedule.build_schedule(plan, "fgwsd", 16, 4)
    wsd = lr_schedule.build_schedule(plan, "wsd", 16, 4)
    assert [lr_schedule.lr_at(wsd, t) for t in range(12)] == [lr_schedule.lr_at(fg, t) for t in range(12)]
    tokens = [ph["tokens"] for ph in plan["phases"]]  # 128, 256, 256, 192 of 832
    want = {"pool/general": (128 * 0.5 + 256 * 0.5) / 832, "top/general": (128 * 0.5 + 256 * 0.3 + 256 * 0.6 + 192 * 0.3) / 832,
            "top/math": (256 * 0.2 + 256 * 0.4 + 192 * 0.7) / 832}
    assert sum(tokens) == 832
    for ph in wsd.phases:
        assert ph.mixture == pytest.approx(want)
    assert [ph.seq_len for ph in wsd.phases] == [ph.seq_len for ph in fg.phases]


def test_cosine_warms_up_then_decays_to_lr_final_over_the_rest():
    s = lr_schedule.build_schedule(micro_plan(), "cosine", 16, 4)
    table = [lr_schedule.lr_at(s, t) for t in range(12)]
    assert table[:2] == pytest.approx([PEAK / 2, PEAK])
    rest = table[2:]
    assert all(a > b for a, b in zip(rest, rest[1:])) and rest[-1] == pytest.approx(FINAL)
    assert rest[0] == pytest.approx(FINAL + (PEAK - FINAL) * (1 + math.cos(math.pi / 10)) / 2)


def test_unknown_schedule_or_shape_is_refused():
    with pytest.raises(common.StageError, match="pretrain.schedule must be one of"):
        lr_schedule.build_schedule(micro_plan(), "linear", 16, 4)
    plan = micro_plan()
    plan["phases"][1]["lr_shape"] = "step"
    with pytest.raises(common.StageError, match="diversity_stable: lr_shape must be one of"):
        lr_schedule.build_schedule(plan, "fgwsd", 16, 4)


def test_bucket_quotas_hold_the_mixture_within_one_sequence_across_phases():
    phases = [({"a": 0.5, "b": 0.5}, 37), ({"a": 0.7, "b": 0.0, "c": 0.3}, 101), ({"b": 0.2, "c": 0.8}, 64),
              ({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 200)]
    for seed in range(5):
        quota = pretrain.BucketQuota(["a", "b", "c"], seed)
        counts, expected, worst = Counter(), Counter(), 0.0
        for mixture, n in phases:
            for b in quota.assign(mixture, n):
                counts[b] += 1
                for k, w in mixture.items():
                    expected[k] += w / sum(mixture.values())
                worst = max(worst, *(abs(counts[k] - expected[k]) for k in "abc"))
        assert worst < 1.0
    assert counts["b"] == round(expected["b"])


def test_bucket_quotas_are_seeded_resumable_and_ignore_chunking():
    mixture = {"a": 0.6, "b": 0.1, "c": 0.3}
    whole = pretrain.BucketQuota(["a", "b", "c"], 3).assign(mixture, 150)
    q = pretrain.BucketQuota(["a", "b", "c"], 3)
    first = q.assign(mixture, 100)
    resumed = pretrain.BucketQuota(["a", "b", "c"], 99)
    resumed.load_state_dict(q.state_dict())
    assert first + resumed.assign(mixture, 50) == whole
    assert pretrain.BucketQuota(["a", "b", "c"], 4).assign(mixture, 150) != whole
    assert Counter(whole) == {"a": 90, "b": 15, "c": 45}


def test_windows_read_the_next_tokens_and_wrap_into_the_next_epoch():
    streams = {"a": np.arange(10, dtype=np.uint16)}
    cursors = {"a": 0}
    batch, read = pretrain.read_windows(streams, cursors, ["a", "a", "a"], seq_len=4)
    assert batch.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 0, 1, 2]]
    assert read == [("a", 0), ("a", 4), ("a", 8)] and cursors == {"a": 12}


# ----------------------------------------------------------------------------- training and resume

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    return tmp, make_tokens(tmp), write_plan(tmp / "plan.json")


def train(setup, name: str, max_steps=None, log=None, params=None):
    tmp, tokens, plan = setup
    out = tmp / name
    on_step = None if log is None else (lambda step, windows: log.extend((step, b, c) for b, c in windows))
    return pretrain.run_pretrain(plan, tokens, out / "pretrain", out / "ckpt", params or dict(PARAMS),
                                 dict(MODEL_PARAMS), out / "live", max_steps=max_steps, on_step=on_step)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    log = []
    manifest = train(setup, "full", log=log)
    return manifest, log


def weights(setup, name: str) -> dict:
    return load_file(setup[0] / name / "pretrain" / "final" / "model.safetensors")


def assert_windows_contiguous(log: list, seq_len_of_step) -> None:
    """Per bucket, every window starts where the previous one ended: nothing repeated, nothing skipped."""
    nxt: dict[str, int] = {}
    for step, bucket, cursor in log:
        assert cursor == nxt.get(bucket, 0), (step, bucket)
        nxt[bucket] = cursor + seq_len_of_step(step)


def test_uninterrupted_run_consumes_the_plan_and_loss_falls(setup, uninterrupted):
    manifest, log = uninterrupted
    phases = manifest["counts"]["phases"]
    assert [ph["steps"] for ph in phases] == STEPS
    for ph in phases:  # consumed = the planned tokens rounded to whole steps
        per_step = 4 * ph["seq_len"]
        assert ph["tokens_consumed"] == ph["steps"] * per_step and abs(ph["tokens_consumed"] - ph["tokens_planned"]) <= per_step / 2
    assert manifest["loss_end"] < manifest["loss_start"] - 0.5
    assert set(manifest["heldout_loss"]) == {"warmup", "diversity_stable", "hq_stable", "decay"}
    schedule = lr_schedule.build_schedule(micro_plan(), "fgwsd", 16, 4)
    assert len(log) == 12 * 4
    assert_windows_contiguous(log, lambda step: lr_schedule.phase_at(schedule, step).seq_len)
    live = setup[0] / "full" / "live"
    metrics = json.loads((live / "metrics.json").read_text())
    assert {"heldout_hq_loss", "heldout_math_loss"} <= set(metrics["eval"]) and "loss" in metrics["train"]
    assert metrics["eval"]["heldout_hq_loss"] == manifest["heldout_loss"]["decay"]["hq"]


@pytest.mark.parametrize("stop", [5, 6], ids=["mid_phase", "phase_boundary"])
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(setup, uninterrupted, stop):
    name = f"stop{stop}"
    log = []
    assert train(setup, name, max_steps=stop, log=log) is None
    assert not (setup[0] / name / "pretrain" / "final").exists()
    assert len(log) == stop * 4
    manifest = train(setup, name, log=log)
    full_manifest, full_log = uninterrupted
    assert log == full_log  # the same windows in the same order: none repeated or skipped across the resume
    a, b = weights(setup, "full"), weights(setup, name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["outputs"] == full_manifest["outputs"]  # every checkpoint file, byte for byte
    assert manifest["counts"] == full_manifest["counts"] and manifest["heldout_loss"] == full_manifest["heldout_loss"]
    rows = (setup[0] / name / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    steps = [int(r.split("\t")[0]) for r in rows]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]  # each logged step once, also across the resume


def test_a_completed_run_reruns_from_its_state_without_training(setup, uninterrupted):
    log = []
    manifest = train(setup, "full", log=log)
    assert log == [] and manifest["outputs"] == uninterrupted[0]["outputs"]


def test_a_code_change_retrains_under_a_new_run_hash(setup, uninterrupted, monkeypatch):
    """The resume directory is keyed by the code pretrain imports (stages/*, model/*, kernels): after an edit a
    rerun trains again instead of re-linking the finished state of the old code. The edit is simulated by a new
    closure hash (test_training_loop checks that an edited imported file gives one)."""
    monkeypatch.setattr(common, "code_version_closure", lambda *modules: "edited0code0hash")
    log = []
    manifest = train(setup, "full", log=log)
    assert len(log) == 12 * 4  # every step trained again
    assert manifest["resume_dir"] != uninterrupted[0]["resume_dir"] and manifest["code_version"] == "edited0code0hash"
    assert manifest["outputs"] == uninterrupted[0]["outputs"]  # deterministic: the same weights, byte for byte


def test_final_checkpoint_loads_standalone_in_transformers(setup, uninterrupted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import load_pretrained
    final = setup[0] / "full" / "pretrain" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["rope_theta"] == 4 * MODEL_PARAMS["rope_theta"] and config["max_position_embeddings"] == 32  # ABF
    assert config["eos_token_id"] == 0 and config["vocab_size"] == 320
    tok = AutoTokenizer.from_pretrained(final)
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([tok("kalo mine 12. tari")["input_ids"]])
    with torch.no_grad():
        ours = load_pretrained(final)(ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_vocab_size_disagreeing_with_the_tokenizer_fails_clearly(setup, tmp_path):
    tmp, tokens, plan = setup
    with pytest.raises(common.StageError, match="model.vocab_size=512 but the tokenizer has 320"):
        pretrain.run_pretrain(plan, tokens, tmp_path / "out", tmp_path / "ckpt", dict(PARAMS),
                              {**MODEL_PARAMS, "vocab_size": 512}, tmp_path / "live")


def test_kill_9_then_rerun_equals_the_uninterrupted_run(setup, tmp_path):
    """The CLI killed right after its first resume state (mid-run), then rerun, ends where an in-process run ends."""
    tmp, tokens, _ = setup
    plan = write_plan(tmp_path / "plan.json", micro_plan((128, 512, 512, 256)))  # 2 + 8 + 8 + 2 steps
    params = {**PARAMS, "checkpoint_every": 4}
    reference = pretrain.run_pretrain(plan, tokens, tmp_path / "ref", tmp_path / "ref_ckpt", params,
                                      dict(MODEL_PARAMS), tmp_path / "ref_live")
    cmd = [sys.executable, "-m", "stages.pretrain", "--params-json",
           json.dumps({"pretrain": params, "model": MODEL_PARAMS}), "--plan", str(plan), "--tokens-dir", str(tokens),
           "--output-dir", str(tmp_path / "out"), "--resume-dir", str(tmp_path / "ckpt"),
           "--live-dir", str(tmp_path / "live")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "ckpt").glob("*/latest")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "out" / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain step 20/20 (100.0%) loss " in done.stderr  # progress lines off a TTY (stderr is a pipe)
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == reference["counts"] and manifest["bucket_cursors"] == reference["bucket_cursors"]
    tsv = [(tmp_path / d / "plots" / "metrics" / "train" / "loss.tsv").read_text() for d in ("live", "ref_live")]
    assert tsv[0] == tsv[1]  # rows the killed run logged past its last resume state were not kept twice
