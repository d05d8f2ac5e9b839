"""tools/runner_sync.record_in_dvc: what Snakemake ran goes into dvc.lock, in one `dvc commit` pass when that is the
whole DAG, never more than what ran (the DAG tests check the result end to end: tests/test_dag.py)."""
import subprocess

import yaml

from tools import runner_sync


def fake_repo(tmp_path, stages):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: {"cmd": "true"} for s in stages}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"scale": "tiny"}))
    return tmp_path


def test_commits_all_stages_in_one_pass_and_a_subset_by_name(tmp_path, monkeypatch):
    root = fake_repo(tmp_path, ["ingest", "filter", "report"])
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert runner_sync.record_in_dvc({"scale": "tiny"}, {"ingest", "filter", "report", "all_rule"}, root) == \
        ["filter", "ingest", "report"]
    assert calls[-1] == ["dvc", "commit", "--force", "--no-relink"]  # no targets: every stage, one pass
    assert runner_sync.record_in_dvc({"scale": "tiny"}, {"report", "not_a_stage"}, root) == ["report"]
    assert calls[-1] == ["dvc", "commit", "--force", "--no-relink", "report"]  # only what ran
    assert runner_sync.record_in_dvc({"scale": "other"}, {"report"}, root) == []  # --config overrides: untouched
    assert runner_sync.record_in_dvc({"scale": "tiny"}, {"not_a_stage"}, root) == [] and len(calls) == 2
