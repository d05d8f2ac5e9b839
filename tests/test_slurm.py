"""`snakemake --profile profiles/slurm` submits real SLURM jobs with each rule's resources: a filter shard, and the
training chain tokenize -> schedule -> pretrain, whose outputs equal a local `snakemake -c2` run's byte for byte even
though its pretrain job is cancelled mid-run (`scancel`): the profile's `retries` resubmits it, and it resumes from
its resume state in checkpoints/<scale>/pretrain instead of starting over (resume is exact, so the bytes still match).

Skips only when no SLURM controller answers (`sinfo`); .ci/run starts a single-node SLURM first."""
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stages import common
from test_dag import CORES, ENV, copy_repo, set_param, sh


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not slurm_up(), reason="no SLURM controller answers `sinfo`: SLURM is absent")]


def test_slurm_profile_runs_a_shard_through_sbatch(tmp_path):
    work = copy_repo(tmp_path)
    target = "artifacts/tiny/filter/kept/shakespeare.parquet"
    out = sh(["snakemake", "--profile", "profiles/slurm", target], work)
    log = out.stdout + out.stderr
    assert (work / target).is_file()
    assert log.count("has been submitted with SLURM jobid") == 2, log[-3000:]
    assert "mem_mb=4000" in log and "slurm_partition=debug" in log  # the filter rule's own resources
    # SLURM's own record of the filter job (kept MinJobAge seconds after it ends): done, with the rule's memory
    filter_job = re.findall(r"rule_filter/\S+/(\d+)\.log", log)[-1]
    record = sh(["scontrol", "show", "job", filter_job], work).stdout
    assert "JobState=COMPLETED" in record and "mem=4000M" in record, record


# The training chain at tiny on a shrunken model (~0.2M parameters, vocab 1024) and a short stream: 28 optimizer
# steps (4 at least per FG-WSD phase). A resume state and a progress line every step, so the test sees where the
# kill lands and where the retry resumes.
SHRINK = {"scales.tiny.select.budgets": {"pool_tokens": 200000, "top_tokens": 40000, "train_tokens": 80000},
          "scales.tiny.tokenize.vocab_size": 1024, "scales.tiny.model.vocab_size": 1024,
          "scales.tiny.model.hidden_size": 64, "scales.tiny.model.intermediate_size": 128,
          "scales.tiny.model.num_hidden_layers": 2, "scales.tiny.model.num_attention_heads": 2,
          "scales.tiny.model.head_dim": 32, "scales.tiny.pretrain.min_phase_steps": 4,
          "scales.tiny.pretrain.eval_tokens": 4096, "scales.tiny.pretrain.checkpoint_every": 1,
          "scales.tiny.pretrain.progress_every_steps": 1}
CHAIN = ("tokenize", "schedule", "pretrain")
TARGET = "artifacts/tiny/pretrain/manifest.json"
KILL_AT_STEP = 5
PROGRESS = re.compile(r"^pretrain step (\d+)/(\d+)", re.M)
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/")
WAIT_S = 1800  # a loaded 2-core machine: scheduling, three job start-ups, tokenize, 28 steps, a retry


def steps(log: str) -> list[int]:
    return [int(m.group(1)) for m in PROGRESS.finditer(log)]


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(found, proc: subprocess.Popen, what: str, log: Path):
    """Poll found() until it returns something truthy; fail if the Snakemake run ends or WAIT_S passes first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before {what}:\n{read(log)[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {WAIT_S} s:\n{read(log)[-4000:]}")


def job_record(job: str, cwd: Path, state: str | None = None) -> str | None:
    """`scontrol show job`; None while the job is not yet in `state` (when given)."""
    record = sh(["scontrol", "show", "job", job], cwd).stdout
    return record if state is None or f"JobState={state}" in record else None


def rule_resources(log: str, rule: str) -> dict[str, str]:
    """The resources Snakemake gave `rule`'s first job, as it printed them."""
    line = re.search(rf"^rule {rule}:\n(?:    .*\n)*?    resources: (.*)$", log, re.M).group(1)
    return dict(item.split("=", 1) for item in line.split(", "))


def slurm_minutes(limit: str) -> int:
    """scontrol's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    hours, minutes, _ = map(int, clock.split(":"))
    return int(days or 0) * 24 * 60 + hours * 60 + minutes


def chain_files(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file the chain wrote under artifacts/tiny."""
    return {str(p.relative_to(root)): common.sha256_file(p) for stage in CHAIN
            for p in sorted((root / "artifacts" / "tiny" / stage).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_workspace):
    """The data stages (from the shared workspace, done up to score; then select here, locally), then the chain
    twice from that state: locally with `snakemake -c2`, and through SLURM with the pretrain job cancelled once it
    logs step KILL_AT_STEP."""
    local = tmp_path_factory.mktemp("local") / "repo"
    shutil.copytree(data_workspace, local, symlinks=True)
    for key, value in SHRINK.items():
        set_param(local, key, value)
    sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm shrink", local)
    sh(["snakemake", f"-c{CORES}", "--no-hooks", "artifacts/tiny/select/manifest.json"], local)
    slurm = tmp_path_factory.mktemp("slurm") / "repo"
    shutil.copytree(local, slurm, symlinks=True)  # mtimes and .snakemake metadata kept: only the chain is left
    sh(["snakemake", f"-c{CORES}", "--no-hooks", TARGET], local)

    log_path, train_log = slurm.parent / "snakemake.log", slurm / "logs" / "tiny" / "pretrain.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(["snakemake", "--profile", "profiles/slurm", "--no-hooks", TARGET], cwd=slurm,
                                env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: max(steps(read(train_log)), default=0) >= KILL_AT_STEP, proc, f"pretrain step {KILL_AT_STEP}",
                 log_path)
        first_log = read(train_log)  # the retry's `2> {log}` truncates it
        killed = [job for job, rule in SUBMITTED.findall(read(log_path)) if rule == "pretrain"][0]
        sh(["scancel", killed], slurm)
        # SLURM keeps a job's record only MinJobAge seconds after it ends: read this one now
        killed_record = wait_for(lambda: job_record(killed, slurm, state="CANCELLED"), proc,
                                 "the cancelled job's record", log_path)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
            for job, _ in SUBMITTED.findall(read(log_path)):
                subprocess.run(["scancel", job], capture_output=True)
    log = read(log_path)
    assert proc.returncode == 0, log[-4000:]
    jobs = SUBMITTED.findall(log)
    return {"local": local, "slurm": slurm, "log": log, "jobs": jobs, "first_log": first_log,
            "retry_log": read(train_log), "killed": killed, "killed_record": killed_record,
            "retry_record": job_record(jobs[-1][0], slurm)}


def test_slurm_chain_equals_a_local_run_byte_for_byte(chain):
    assert [rule for _, rule in chain["jobs"]] == ["tokenize", "schedule", "pretrain", "pretrain"], chain["log"][-3000:]
    final = "artifacts/tiny/pretrain/final/model.safetensors"
    local_sha, slurm_sha = (common.sha256_file(chain[run] / final) for run in ("local", "slurm"))
    assert slurm_sha == local_sha, f"final checkpoint differs: SLURM {slurm_sha}, local {local_sha}"
    manifest = "artifacts/tiny/pretrain/manifest.json"
    local_files, slurm_files = chain_files(chain["local"]), chain_files(chain["slurm"])
    assert local_files.keys() == slurm_files.keys()
    assert {k for k in local_files if local_files[k] != slurm_files[k]} <= {manifest}
    # the pretrain manifest differs in its wall time alone
    local_m, slurm_m = (json.loads((chain[run] / manifest).read_text()) for run in ("local", "slurm"))
    assert local_m.pop("wall_time_s") > 0 and slurm_m.pop("wall_time_s") > 0
    assert local_m == slurm_m


def test_slurm_pretrain_job_gets_the_rules_resources(chain):
    wanted = rule_resources(chain["log"], "pretrain")
    defaults = yaml.safe_load((chain["slurm"] / "profiles" / "slurm" / "config.yaml").read_text())["default-resources"]
    assert int(wanted["mem_mb"]) != defaults["mem_mb"]  # the rule's own resources, not the profile's defaults
    for record in (chain["killed_record"], chain["retry_record"]):
        fields = dict(re.findall(r"(\S+?)=(\S*)", record))
        assert fields["Comment"] == "rule_pretrain" and fields["Partition"] == wanted["slurm_partition"], record
        assert f"mem={wanted['mem_mb']}M" in fields["TRES"] and fields["MinMemoryNode"] == f"{wanted['mem_mb']}M"
        assert fields["CPUs/Task"] == wanted["cpus_per_task"], record
        assert slurm_minutes(fields["TimeLimit"]) == int(wanted["runtime"]), record
        assert fields["WorkDir"] == str(chain["slurm"])
    assert "JobState=CANCELLED" in chain["killed_record"] and "JobState=COMPLETED" in chain["retry_record"]


def test_slurm_retries_a_killed_pretrain_job_and_it_resumes(chain):
    log, first, retry = chain["log"], steps(chain["first_log"]), steps(chain["retry_log"])
    assert "Trying to restart job" in log, log[-3000:]
    total = int(PROGRESS.search(chain["retry_log"]).group(2))
    assert first[0] == 1 and max(first) >= KILL_AT_STEP  # the first attempt started from scratch, killed mid-run
    # a state is saved after every step, and step k's line is printed after state k-1 is written: the retry's first
    # step is at least the last one the first attempt logged, and it runs only the remaining steps, in order
    assert retry[0] >= max(first) and retry[0] > 1, (first, retry)
    assert retry == list(range(retry[0], total + 1)) and len(retry) < total
    manifest = json.loads((chain["slurm"] / "artifacts" / "tiny" / "pretrain" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == total
    assert (chain["slurm"] / manifest["resume_dir"] / "latest").is_file()
