"""The DAG itself: dvc.yaml is generated from Snakemake, one small end-to-end run with Snakemake, incremental
reruns with Snakemake and DVC (a changed score param reruns score and what follows, nothing before), and the two
runners sharing one state: after either finishes the other has nothing to do, and an edit to a declared input
(a benchmark file, a stage module, a file inside a directory input) reruns exactly the same stages under both."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import common
from tools import gen_dvc

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
COPY = ["Snakefile", "rules", "stages", "model", "kernels", "tools", "data", "profiles", "schemas", "ablation",
        "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"]
CORES = os.environ.get("TEST_DAG_CORES", "2")  # the end-to-end run; 1 on a shared machine
DATA_RULES = ["ingest", "filter", "dedup_edges", "dedup_index", "dedup", "quality_model", "score", "select", "schedule", "funnel"]
POST_TRAINING = ["base", "teacher", "sft_cold", "sft_full", "distill", "rl_stem", "rl_code", "rl_pref"]
RL_ROLES = ["rl_stem", "rl_code", "rl_pref"]
UPSTREAM_OF_SCORE = {"ingest", "filter", "dedup_edges", "dedup_index", "dedup", "quality_model"}


def sh(cmd, cwd, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, shell=isinstance(cmd, str), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init", dest)
    return dest


def set_param(workdir: Path, dotted: str, value) -> None:
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule -> job count of what `snakemake -n` would run now."""
    out = sh(["snakemake", "-n", "-c1", *args], workdir).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def reasons(workdir: Path) -> str:
    """Why `snakemake -n` would rerun jobs (a failing assert's message)."""
    return sh(["snakemake", "-n", "-c1"], workdir).stdout.split("Reasons:", 1)[-1][-3000:]


def a_score_param() -> str:
    """A leaf param that only the score stage reads."""
    sliced = common.stage_params(common.load_params(REPO / "params.yaml"), "score")
    weights = sliced["utility_weights"]
    return f"score.utility_weights.{sorted(weights)[0]}", weights[sorted(weights)[0]] + 0.25


def test_dvc_yaml_is_generated_from_the_snakemake_dag():
    committed = (REPO / "dvc.yaml").read_text()
    assert committed == gen_dvc.generate(), "dvc.yaml drifted from the Snakemake DAG: run `python -m tools.gen_dvc`"
    stages = yaml.safe_load(committed)["stages"]
    assert set(DATA_RULES) | {"tokenize", "pretrain", "evaluate", "report", "tasks", "teacher", "sft_data", "sft_cold",
                              "sft_full", "distill_targets", "distill"} <= set(stages)
    assert stages["score"]["params"] == ["scale", "seed", "score"]
    assert stages["pretrain"]["params"] == ["scale", "seed", "model", "scales.${scale}.model", "pretrain",
                                            "scales.${scale}.pretrain"]
    assert stages["pretrain"]["metrics"] == [{"dvclive/pretrain/metrics.json": {"cache": False}}]
    assert stages["score"]["outs"] == ["artifacts/${scale}/score"]
    assert "artifacts/${scale}/dedup" in stages["score"]["deps"] and "stages/score.py" in stages["score"]["deps"]
    assert stages["all"]["cmd"].startswith("snakemake --touch --no-hooks")  # DVC's run, recorded for Snakemake


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in deps)


def test_every_stage_declares_the_code_it_imports_and_the_files_it_reads():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        if module:
            missing = [str(f) for f in common.repo_imports(module.group(1)) if not covered(str(f), stage["deps"])]
            assert not missing, f"{name}: code it imports is no dep: {missing}"
    assert covered("model/llama.py", stages["pretrain"]["deps"]) and covered("model/ops.py", stages["evaluate"]["deps"])
    assert covered("data/eval/tiny_math/test.jsonl", stages["evaluate"]["deps"])
    assert not covered("data/eval/lm_eval", stages["evaluate"]["deps"])  # only the files its benchmarks read
    for read in ("data/paper_results.yaml", "ablation/${scale}/results.json", "dvclive/pretrain"):
        assert read in stages["report"]["deps"], read
    assert {"data/corpus", "data/heldout"} <= set(stages["ingest"]["deps"] + stages["tokenize"]["deps"])


def test_dvc_analytics_are_off_in_the_committed_config():
    assert re.search(r"analytics\s*=\s*false", (REPO / ".dvc" / "config").read_text())


# The end-to-end run trains on a shorter stream and evaluates fewer, shorter samples than `make demo`:
# the same code path in a fraction of the time.
FAST = {"scales.tiny.select.budgets": {"pool_tokens": 200000, "top_tokens": 80000, "train_tokens": 160000},
        "scales.tiny.pretrain.eval_tokens": 4096,  # held-out tokens per set at each phase end (one batch)
        "scales.tiny.evaluate.max_problems": 2, "scales.tiny.evaluate.n_samples": 2,
        "scales.tiny.evaluate.max_new_tokens": 24, "scales.tiny.evaluate.max_per_level": 1,
        "scales.tiny.evaluate.per_checkpoint": {c: {"max_new_tokens": 24} for c in POST_TRAINING},
        # post-training: a few steps each, a handful of instructions; no pair is expected from a teacher this
        # weak, so distill passes the student through (min_pairs 0; its own tests train on real pairs)
        "scales.tiny.teacher.max_steps": 3, "scales.tiny.sft_cold.max_steps": 2, "scales.tiny.sft_full.max_steps": 2,
        "scales.tiny.sft_data.max_per_level": {"math": 1, "code": 1}, "scales.tiny.sft_data.max_new_tokens": 24,
        "scales.tiny.distill_targets.prompts_per_level": {"math": 1, "code": 1},
        "scales.tiny.distill_targets.max_new_tokens": 24, "scales.tiny.distill.min_pairs": 0,
        "scales.tiny.distill.max_steps": 2,
        # RL: the filters sample 2 answers to 1 prompt per level; models this weak solve none, so nothing is kept
        # and each RL stage passes its init checkpoint through (min_prompts 0; tests/test_grpo.py trains for real),
        # and the judge is the distilled student untrained (min_pairs 0; tests/test_reward_model.py trains it)
        "scales.tiny.pass_filter.k": 2, "scales.tiny.pass_filter.max_prompts_per_level": 1,
        "scales.tiny.pass_filter.max_new_tokens": 24,
        **{f"scales.tiny.{r}.{k}": v for r in RL_ROLES for k, v in (("min_prompts", 0), ("steps", 1),
                                                                   ("max_new_tokens", 24))},
        "scales.tiny.reward_model.min_pairs": 0}


@pytest.fixture(scope="module")
def snakemake_run(tmp_path_factory, data_workspace):
    work = tmp_path_factory.mktemp("smk") / "repo"
    shutil.copytree(data_workspace, work, symlinks=True)  # the data stages done up to score (tests/conftest.py)
    for key, value in FAST.items():
        set_param(work, key, value)
    sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm fast", work)
    sh(["snakemake", f"-c{CORES}"], work)
    return work


@pytest.mark.slow
def test_snakemake_runs_the_whole_dag_end_to_end(snakemake_run):
    art = snakemake_run / "artifacts" / "tiny"
    report = (art / "report" / "report.md").read_text()
    for png in ("data_funnel.png", "pretrain_loss.png", "eval_accuracy.png", "rl_pass_filter.png", "rl_metrics.png"):
        assert (art / "report" / png).stat().st_size > 10_000 and f"]({png})" in report
    assert "| base |" in report and "Nanbeige4-3B (paper)" in report
    for stage in POST_TRAINING:  # every post-training checkpoint evaluated through the harness, in the card
        assert "ladder_math" in json.loads((art / "eval" / stage / "metrics.json").read_text()), stage
        assert f"| {stage} |" in report, stage
    sft_data = json.loads((art / "sft_data" / "metrics.json").read_text())
    assert sft_data["counts"]["kept"] + sft_data["counts"]["rejected"] == sft_data["counts"]["instructions"] > 0
    for role in ("teacher", "sft_cold", "sft_full"):
        assert json.loads((art / role / "manifest.json").read_text())["counts"]["steps"] >= 1, role
    assert json.loads((art / "distill_targets" / "manifest.json").read_text())["counts"]["prompts"] > 0
    for role in RL_ROLES:  # each RL stage ran its filter (k answers per candidate) and wrote a checkpoint
        c = json.loads((art / "pass_filter" / role / "manifest.json").read_text())["counts"]
        assert c["samples"] == 2 * c["candidates"] > 0 and c["kept"] + c["too_hard"] + c["too_easy"] == c["candidates"]
        assert (art / role / "final" / "model.safetensors").is_file(), role
    assert "## Reinforcement learning" in report and "### Pass-rate filters" in report
    pretrain = json.loads((art / "pretrain" / "manifest.json").read_text())
    assert pretrain["loss_end"] < pretrain["loss_start"] - 1.0
    sliced = common.stage_params(yaml.safe_load((snakemake_run / "params.yaml").read_text()), "pretrain")
    sequences_per_step = sliced["batch_size"] * sliced["grad_accum"]
    for phase in pretrain["counts"]["phases"]:
        step_tokens = sequences_per_step * phase["seq_len"]
        assert phase["tokens_consumed"] == phase["steps"] * step_tokens
        # whole steps covering the plan, at least min_phase_steps per phase
        assert phase["steps"] == max(sliced["min_phase_steps"], -(-phase["tokens_planned"] // step_tokens))
    assert min(ph["steps"] for ph in pretrain["counts"]["phases"]) >= sliced["min_phase_steps"] > 1
    plan = json.loads((art / "schedule" / "plan.json").read_text())
    # the epochs hold in trained tokens: every top bucket saw at least min_top_epochs of its real BPE stream
    tops = {b: e for b, e in pretrain["bucket_epochs"].items() if b.startswith("top/")}
    assert tops and min(tops.values()) >= plan["min_top_epochs"], tops
    metrics = json.loads((art / "eval" / "base" / "metrics.json").read_text())
    assert {"tiny_math", "humaneval", "bfcl"} <= set(metrics)
    live = json.loads((snakemake_run / "dvclive" / "eval" / "metrics.json").read_text())
    assert "tiny_math" in live["base"]
    assert [p["stage"] for p in plan["phases"]][0] == "warmup" and plan["phases"][-1]["stage"] == "decay"
    assert sum(p["tokens"] for p in plan["phases"]) == plan["total_tokens"]
    funnel = json.loads((art / "funnel" / "funnel.json").read_text())
    dropped = {d["rule"] for step in funnel["steps"] for d in step["dropped"]}
    assert {"exact_dup", "near_dup", "language"} <= dropped, dropped
    assert sum(funnel["utility_histogram"].values()) == funnel["steps"][2]["docs_kept"]
    metrics = json.loads((snakemake_run / "dvclive" / "data" / "metrics.json").read_text())
    assert metrics["select"]["docs_kept"] == funnel["steps"][-1]["docs_kept"] > 0
    assert planned_jobs(snakemake_run) == {}, reasons(snakemake_run)


@pytest.mark.slow
def test_snakemake_score_param_reruns_score_and_downstream_only(snakemake_run):
    key, value = a_score_param()
    set_param(snakemake_run, key, value)
    jobs = planned_jobs(snakemake_run)
    assert {"score", "select", "schedule", "funnel"} <= set(jobs), jobs
    assert not set(jobs) & UPSTREAM_OF_SCORE, jobs
    sh(["git", "checkout", "params.yaml"], snakemake_run)
    assert planned_jobs(snakemake_run) == {}


def dvc_changed(workdir: Path) -> set[str]:
    """Stages whose own deps, params or outs changed since dvc.lock (not those merely downstream of one)."""
    return set(json.loads(sh(["dvc", "status", "--json"], workdir).stdout))


def ran_stages(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


@pytest.mark.slow
def test_after_snakemake_dvc_has_nothing_to_do(snakemake_run):
    """The Snakefile's onsuccess recorded the run in dvc.lock: no stage is stale and `dvc repro` runs none."""
    assert (snakemake_run / "dvc.lock").is_file()
    assert dvc_changed(snakemake_run) == set()
    assert ran_stages(sh(["dvc", "repro"], snakemake_run).stdout) == set()


@pytest.mark.slow
def test_after_dvc_snakemake_has_nothing_to_do(snakemake_run):
    """`dvc repro` reruns the report for a changed report param, then `dvc exp run` does for another value; DVC's
    last stage `all` records each run in Snakemake's metadata, so Snakemake plans nothing (neither params nor
    mtimes differ), and `dvc exp show` compares the experiment's param and metrics. (The other direction, and the
    edit cases below, cover evaluate's 14 Snakemake jobs in one DVC stage.)"""
    params = yaml.safe_load((snakemake_run / "params.yaml").read_text())
    resamples = common.stage_params(params, "report")["bootstrap_resamples"]
    set_param(snakemake_run, "report.bootstrap_resamples", resamples + 1)
    assert set(planned_jobs(snakemake_run)) == {"report", "all"}
    assert ran_stages(sh(["dvc", "repro"], snakemake_run).stdout) == {"report", "all"}
    assert planned_jobs(snakemake_run) == {}, reasons(snakemake_run)
    assert dvc_changed(snakemake_run) == set()
    # the same through `dvc exp run` in the workspace, with a value not run before (else DVC's run cache restores it)
    sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm lock", snakemake_run)
    out = sh(["dvc", "exp", "run", "-S", f"report.bootstrap_resamples={resamples + 2}"], snakemake_run).stdout
    assert ran_stages(out) == {"report", "all"}, out
    assert planned_jobs(snakemake_run) == {}, reasons(snakemake_run)
    assert dvc_changed(snakemake_run) == set()
    shown = json.dumps(json.loads(sh(["dvc", "exp", "show", "--json"], snakemake_run).stdout))
    assert "bootstrap_resamples" in shown and str(resamples + 2) in shown and "docs_kept" in shown, shown[:2000]


# (file to edit, the rule whose own input it is, its Snakemake jobs that rerun)
EDITS = [
    ("data/eval/tiny_math/test.jsonl", "evaluate", None),
    ("stages/funnel.py", "funnel", None),
    ("data/corpus/python_docs/c-api__arg__06.rst", "ingest", 1),  # one file of a directory input unit
]


@pytest.mark.slow
@pytest.mark.parametrize("path, rule, jobs", EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_reruns_the_same_stages_under_both_runners(snakemake_run, path, rule, jobs):
    # Needs a start with nothing to do under either runner (the tests before end by checking it). A dirty start
    # would also dirty --forcerun's plan, but not the end: the closing check below fails it, never passes it.
    downstream = set(planned_jobs(snakemake_run, "--forcerun", rule))  # the rule and everything after it
    target = snakemake_run / path
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"\n")
        planned = planned_jobs(snakemake_run)
        assert set(planned) == downstream, planned
        if jobs is not None:
            assert planned[rule] == jobs, planned
        # DVC names the edited stage, and `all`, whose deps are every stage's (it records DVC runs for Snakemake)
        assert dvc_changed(snakemake_run) == {rule, "all"}
    finally:
        target.write_bytes(original)
    assert planned_jobs(snakemake_run) == {} and dvc_changed(snakemake_run) == set()


@pytest.mark.slow
def test_dvc_score_param_reruns_score_and_downstream_only(snakemake_run):
    """`dvc repro` of a changed score param, in the end-to-end workspace (after the edit cases: it leaves score
    stale for both runners once the param is restored, which only the missing-shard case below tolerates)."""
    key, value = a_score_param()
    set_param(snakemake_run, key, value)
    try:
        changed = set(json.loads(sh(["dvc", "status", "--with-deps", "funnel", "--json"], snakemake_run).stdout))
        assert changed == {"score"}, changed  # the only stage whose own params changed
        ran = ran_stages(sh(["dvc", "repro", "funnel"], snakemake_run).stdout)
        assert {"score", "select"} <= ran and not ran & UPSTREAM_OF_SCORE, ran
    finally:
        sh(["git", "checkout", "params.yaml"], snakemake_run)


@pytest.mark.slow
def test_snakemake_redoes_only_the_missing_shard(snakemake_run):
    """A run killed during `filter` (say by a SLURM time limit) left every shard but one, and nothing after."""
    art = snakemake_run / "artifacts" / "tiny"
    shards = sorted(p.stem for p in (art / "filter" / "kept").glob("*.parquet"))
    victim = shards[0]
    for sub in ("kept", "rejected", "sigs"):
        (art / "filter" / sub / f"{victim}.parquet").unlink()
    (art / "filter" / f"{victim}.manifest.json").unlink()
    for later in ("dedup_index", "dedup", "quality_model", "score", "select", "schedule", "funnel", "tokenize",
                  "pretrain", "eval", "report"):
        shutil.rmtree(art / later)
    jobs = planned_jobs(snakemake_run)
    assert jobs.get("filter") == 1 and "ingest" not in jobs, jobs
    assert jobs.get("dedup") == len(shards) and jobs.get("score") == len(shards), jobs


def test_the_3b_pretrain_rule_launches_torchrun_over_its_gpus(tmp_path):
    """The pretrain rule's command comes from stages.training.launch with the scale's resources: one process at
    tiny, torchrun over the node's 8 GPUs at 3b (FSDP2 or Megatron inside, pretrain.backend)."""
    work = copy_repo(tmp_path)
    big = sh(["snakemake", "-n", "-p", "artifacts/3b/pretrain/manifest.json", "--config", "scale=3b"], work).stdout
    assert "torchrun --standalone --nproc-per-node=8 -m stages.pretrain --params-json" in big, big[-3000:]
    tiny = sh(["snakemake", "-n", "-p", "artifacts/tiny/pretrain/manifest.json"], work).stdout
    assert "python -m stages.pretrain --params-json" in tiny and "torchrun" not in tiny


def job_threads_planned(out: str) -> dict[str, int]:
    """Rule -> cores its planned jobs hold, from `snakemake -n` (a job prints `threads:` only above 1)."""
    threads, rule = {}, None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
            threads.setdefault(rule, 1)
        m = re.match(r"^\s+threads: (\d+)", line)
        if m and rule:
            threads[rule] = int(m.group(1))
    return threads


def test_a_cpu_job_holds_the_cores_its_stage_runs_on(tmp_path):
    """At tiny (no GPU) a job holds what its stage runs at once (torch cpu_threads, or sandbox workers if more),
    never an idle core: the 1-thread generation stages run beside an evaluation on 2 cores."""
    work = copy_repo(tmp_path)
    threads = job_threads_planned(sh(["snakemake", "-n", "-c2"], work).stdout)
    params = common.load_params(work / "params.yaml")
    for rule, stage in {"sft_data": "sft_data", "distill_targets": "distill_targets", "distill": "distill",
                        "pass_filter_stem": "pass_filter", "pass_filter_code": "pass_filter",
                        "pass_filter_pref": "pass_filter", "rl_stem": "rl_stem", "rl_code": "rl_code",
                        "rl_pref": "rl_pref", "reward_model": "reward_model", "teacher": "teacher",
                        "sft_cold": "sft_cold", "sft_full": "sft_full"}.items():
        p = common.stage_params(params, stage)
        expect = max(int(p["cpu_threads"]), int(p.get("sandbox_workers") or 0))
        assert threads[rule] == min(2, expect), (rule, threads[rule], expect)
    assert threads["sft_data"] == 1 and threads["teacher"] == 2, threads
