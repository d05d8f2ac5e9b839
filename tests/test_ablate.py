"""tools/ablate.py: variants x seeds, mean and sd, provenance; the report marks stale or foreign tables."""
from __future__ import annotations

import json

import pytest

from stages.report import ablation_section
from tools.ablate import mean_sd, merge_studies, results_table, runs

SPEC = {"target": "report", "seeds": [1, 2, 3], "seed_key": "pretrain.seed", "provenance": ["plan.json"],
        "variants": {"fgwsd": {"pretrain.schedule": "fgwsd"}, "wsd": {"pretrain.schedule": "wsd"}},
        "metrics": [{"label": "loss", "file": "m.json", "key": "eval/loss"}]}


def test_every_variant_runs_once_per_seed_with_the_seed_override():
    planned = runs("schedule", SPEC)
    assert [n for n, *_ in planned] == [f"schedule-{v}-seed{s}" for v in ("fgwsd", "wsd") for s in (1, 2, 3)]
    assert planned[4][3] == {"pretrain.schedule": "wsd", "pretrain.seed": 2}


def test_mean_and_sample_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, None)
    assert mean_sd([]) == (None, None)


def _found(plan_hash: str) -> dict:
    values = {"fgwsd": [6.0, 6.2, 6.4], "wsd": [6.1, 6.1, 6.1]}
    return {f"schedule-{v}-seed{s}": {"metrics": {"m.json:eval/loss": values[v][i]}, "deps": {"plan.json": plan_hash},
                                      "rev": "abcdef123456"}
            for v in values for i, s in enumerate((1, 2, 3))}


def test_results_table_aggregates_over_seeds():
    table = results_table("schedule", SPEC, _found("h"), "python -m tools.ablate --study schedule")
    fg, wsd = table["rows"]
    assert fg["loss"] == pytest.approx(6.2) and fg["loss:sd"] == pytest.approx(0.2)
    assert fg["loss:values"] == [6.0, 6.2, 6.4]
    assert wsd["loss:sd"] == pytest.approx(0.0)
    assert len(table["runs"]) == 6 and table["runs"][0]["inputs"] == {"plan.json": "h"}


def test_report_marks_stale_and_foreign_tables(tmp_path):
    import hashlib
    (tmp_path / "plan.json").write_text("{}")
    current = hashlib.md5(b"{}").hexdigest()
    for plan_hash, expect in ((current, "current"), ("0" * 32, "STALE")):
        table = results_table("schedule", SPEC, _found(plan_hash), "python -m tools.ablate --study schedule")
        path = tmp_path / f"results-{expect}.json"
        path.write_text(json.dumps({"studies": [table]}))
        text = ablation_section(path, repo=tmp_path)
        assert expect in text
        assert "6.2000 ± 0.2000 (n=3)" in text
    foreign = tmp_path / "old.json"
    foreign.write_text(json.dumps({"studies": [{"study": "schedule", "columns": ["loss"], "command": "x",
                                                "rows": [{"variant": "fgwsd", "loss": 6.3}]}]}))
    assert "provenance unknown" in ablation_section(foreign, repo=tmp_path)


def test_one_study_rerun_keeps_the_other_studies_tables():
    """`--study distill` replaces distill's table and keeps schedule's; a study gone from params.yaml is dropped."""
    def table(study, value):
        return {"study": study, "columns": [f"{study}_metric"], "command": f"python -m tools.ablate --study {study}",
                "rows": [{"variant": "a", f"{study}_metric": value}]}
    previous = [table("schedule", 1.0), table("distill", 2.0), table("gone", 9.0)]
    merged = merge_studies(previous, [table("distill", 3.0)], ["schedule", "distill"])
    assert [t["study"] for t in merged["studies"]] == ["schedule", "distill"]
    assert merged["rows"] == [{"variant": "schedule: a", "schedule_metric": 1.0},
                              {"variant": "distill: a", "distill_metric": 3.0}]
    assert merged["columns"] == ["distill_metric", "schedule_metric"] and merged["command"] == "python -m tools.ablate"
    only = merge_studies([], [table("distill", 3.0)], ["schedule", "distill"])
    assert only["command"] == "python -m tools.ablate --study distill" and len(only["studies"]) == 1


def test_a_stage_that_depends_on_the_directory_records_the_workspace_hash_it_started_from(tmp_path):
    """pretrain depends on artifacts/<scale>/tokenize, not on its manifest.json: the run's DVC deps have no entry
    for the provenance file, so the hash of the workspace copy the runs started from is recorded (never None, which
    the card would call stale), and a run's own DVC hash still wins where it has one."""
    from tools.ablate import workspace_hashes
    import hashlib
    (tmp_path / "plan.json").write_text('{"phases": []}')
    started = workspace_hashes(["plan.json", "missing.json"], root=tmp_path)
    assert started == {"plan.json": hashlib.md5(b'{"phases": []}').hexdigest(), "missing.json": None}
    no_dep = {name: {**run, "deps": {}} for name, run in _found("x").items()}
    table = results_table("schedule", SPEC, no_dep, "cmd", started)
    assert {r["inputs"]["plan.json"] for r in table["runs"]} == {started["plan.json"]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"studies": [table]}))
    assert "current" in ablation_section(path, repo=tmp_path)
    own = results_table("schedule", SPEC, _found("0" * 32), "cmd", started)
    assert {r["inputs"]["plan.json"] for r in own["runs"]} == {"0" * 32}


def _dvc_repo(root, counter):
    """A two-stage DVC repo: `up` (no params; counts its runs in `counter`, outside the repo) -> `down` (param x)."""
    import subprocess
    import sys
    import textwrap

    def run(*cmd):
        subprocess.run(list(cmd), cwd=root, check=True, capture_output=True)

    py = sys.executable
    (root / "params.yaml").write_text("x: 1\ndown: {k: 1}\n")
    (root / "up.py").write_text(f"open({str(counter)!r}, 'a').write('1')\nopen('up.txt', 'w').write('up')\n")
    (root / "down.py").write_text("import json, yaml\nx = yaml.safe_load(open('params.yaml'))['x']\n"
                                  "json.dump({'y': x * 2}, open('m.json', 'w'))\n")
    (root / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          up:
            cmd: {py} up.py
            deps: [up.py]
            outs: [up.txt]
          down:
            cmd: {py} down.py
            deps: [down.py, up.txt]
            params: [x, down]
            metrics: [{{m.json: {{cache: false}}}}]
        """))
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@t")
    run("git", "config", "user.name", "t")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("dvc", "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "base")


def test_a_variant_reruns_only_what_its_overrides_change_and_replaces_its_earlier_run(tmp_path, monkeypatch):
    """`dvc exp run --force` would rerun `up` (every upstream stage: filter, dedup, ... for a pretraining variant);
    a rerun of the study replaces the experiment of the same name instead of failing on it; a stage-level seed
    that params.yaml does not set is added (`+key=value`), where a plain override fails."""
    import os
    import shutil
    import sys
    from pathlib import Path

    from tools.ablate import collect, experiment_refs, run_variant
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("dvc")
    repo, counter = tmp_path / "repo", tmp_path / "up_runs"
    repo.mkdir()
    _dvc_repo(repo, counter)
    assert counter.read_text() == "1"
    run_variant("s-v-seed1", {"x": 3}, "down", root=repo)
    run_variant("s-v-seed1", {"x": 4, "down.seed": 5}, "down", root=repo)   # a key params.yaml lacks is added
    assert counter.read_text() == "1"                       # `up` never reran
    assert len(experiment_refs("s-v-seed1", repo)) == 1
    monkeypatch.setattr("tools.ablate.REPO", repo)
    assert collect(["s-v-seed1"])["s-v-seed1"]["metrics"]["m.json:y"] == 8
    from tools.ablate import variant_command
    assert variant_command("n", {"a.b": 1, "x": 2}, "t", {"x": 1})[-4:] == ["-S", "+a.b=1", "-S", "x=2"]


def test_an_override_the_scale_slice_would_mask_is_set_there_too():
    """A stage reads params[stage] overlaid with scales.<scale>.<stage>: `distill.max_steps=0` alone would change
    nothing where `scales.tiny.distill.max_steps` is 40 (the no-distillation arm once ran as plain DPD that way)."""
    from tools.ablate import effective_overrides, variant_command
    params = {"scale": "tiny", "distill": {"max_steps": None, "w_dpo": 1.0},
              "scales": {"tiny": {"distill": {"max_steps": 40}}}}
    assert effective_overrides({"distill.max_steps": 0, "distill.w_dpo": 0.0}, params) == \
        {"distill.max_steps": 0, "distill.w_dpo": 0.0, "scales.tiny.distill.max_steps": 0}
    assert variant_command("n", {"distill.max_steps": 0}, "report", params)[-4:] == \
        ["-S", "distill.max_steps=0", "-S", "scales.tiny.distill.max_steps=0"]
    assert effective_overrides({"distill.max_steps": 0}, {**params, "scale": "3b"}) == {"distill.max_steps": 0}
