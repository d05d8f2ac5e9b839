"""params.yaml is validated against schemas/params.schema.yaml: by the Snakefile at DAG load and by every stage CLI
that reads params.yaml (what DVC runs). A mistyped key or a wrong type fails naming its path, instead of a
`.get()` default silently applying."""
import argparse
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from stages import common

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "schemas" / "params.schema.yaml"
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

# (edit, the dotted path the error must name, what Snakemake's message shows of it)
BAD = [
    ({"pretrain.sequence_len": 512}, "pretrain.sequence_len", ["instance['pretrain']", "'sequence_len' was unexpected"]),
    ({"pretrain.batch_size": "16"}, "pretrain.batch_size", ["instance['pretrain']['batch_size']", "'16' is not of type"]),
    ({"scales.tiny.evaluate.max_problem": 5}, "scales.tiny.evaluate.max_problem",
     ["instance['scales']['tiny']['evaluate']", "'max_problem' was unexpected"]),
    ({"schedule.phases": [{"name": "warmup", "stage": "warmpu"}]}, "schedule.phases.0.stage",
     ["instance['schedule']['phases'][0]['stage']"]),
    ({"scale": "medium"}, None, ["'medium' is not one of"]),
]


def edited(changes: dict) -> dict:
    params = copy.deepcopy(PARAMS)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params


def test_committed_params_validate():
    validate(copy.deepcopy(PARAMS), str(SCHEMA))
    common.validate_params(PARAMS, "params.yaml")


@pytest.mark.parametrize("changes, dotted, snakemake_says", BAD, ids=[next(iter(c)) for c, _, _ in BAD])
def test_snakemake_validate_names_the_path(changes, dotted, snakemake_says):
    with pytest.raises(WorkflowError) as err:
        validate(edited(changes), str(SCHEMA))
    for text in snakemake_says:
        assert text in str(err.value.args), err.value


@pytest.mark.parametrize("changes, dotted, _", [b for b in BAD if b[1]], ids=[b[1] for b in BAD if b[1]])
def test_stage_cli_params_name_the_path(tmp_path, changes, dotted, _):
    """What a DVC stage does: `--params params.yaml` -> stages.common.resolve_cli_params -> load_params."""
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(edited(changes), sort_keys=False))
    args = argparse.Namespace(params=str(bad), params_json=None)
    with pytest.raises(common.StageError) as err:
        common.resolve_cli_params(args, "pretrain")
    assert f"{bad}: {dotted}:" in str(err.value), err.value


def test_the_dag_does_not_load_with_a_mistyped_key(tmp_path):
    for name in ("Snakefile", "rules", "stages", "model", "tools", "schemas", "params.yaml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(edited({"pretrain.sequence_len": 512}), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["snakemake", "-n", "-c1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Error validating config file" in proc.stderr + proc.stdout
    assert "'sequence_len' was unexpected" in proc.stderr + proc.stdout
