"""The artifact contract: params by scale, atomic writes, manifests, conservation, the per-shard driver."""
import json
import os

import pyarrow as pa
import pytest

from stages import common


def test_stage_params_overlays_scale_profile():
    params = {"scale": "small", "seed": 7,
              "pretrain": {"lr": 1e-3, "opt": {"b1": 0.9, "b2": 0.95}},
              "scales": {"small": {"pretrain": {"opt": {"b2": 0.99}}}, "tiny": {"pretrain": {"lr": 5.0}}}}
    got = common.stage_params(params, "pretrain")
    assert got == {"lr": 1e-3, "opt": {"b1": 0.9, "b2": 0.99}, "seed": 7, "scale": "small"}
    assert params["pretrain"]["opt"]["b2"] == 0.95  # the base is never mutated


def test_load_params_rejects_unknown_scale(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("scale: huge\n")
    with pytest.raises(common.StageError, match="params.yaml: scale must be one of"):
        common.load_params(path)


def test_repo_params_resolve_for_every_scale():
    params = common.load_params()
    for scale in common.SCALES:
        for stage in [k for k in params if isinstance(params[k], dict) and k != "scales"]:
            sliced = common.stage_params({**params, "scale": scale}, stage)
            assert sliced["scale"] == scale and sliced["seed"] == params["seed"]
        assert set(params["scales"][scale]) <= {k for k in params if k != "scales"}, scale


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out" / "x.json"
    with pytest.raises(RuntimeError):
        with common.atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not final.exists()
    assert os.listdir(final.parent) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    final = tmp_path / "x.json"
    common.write_json(final, {"a": 1})
    common.write_json(final, {"b": 2})
    assert json.loads(final.read_text()) == {"b": 2}
    assert sorted(os.listdir(tmp_path)) == ["x.json"]


def test_manifest_records_hashes_and_detects_changes(tmp_path):
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    inp = tmp_path / "in.parquet"
    out = tmp_path / "o" / "s.parquet"
    common.write_table(inp, common.rows_to_table([{"id": "a", "text": "x"}], schema))
    common.write_table(out, common.rows_to_table([{"id": "a", "text": "x"}], schema))
    params = {"k": 1, "seed": 3}
    m = common.write_manifest(tmp_path / "o" / "s.manifest.json", stage="t", params=params, inputs=[inp],
                              outputs=[out], counts={"kept": 1}, code="c1")
    assert m["outputs"]["s.parquet"]["rows"] == 1 and m["seed"] == 3
    mpath = tmp_path / "o" / "s.manifest.json"
    assert common.manifest_is_current(mpath, params, [inp], "c1")
    assert not common.manifest_is_current(mpath, {"k": 2, "seed": 3}, [inp], "c1")
    assert not common.manifest_is_current(mpath, params, [inp], "c2")
    common.write_table(inp, common.rows_to_table([{"id": "b", "text": "y"}], schema))
    assert not common.manifest_is_current(mpath, params, [inp], "c1")


def test_parquet_writes_are_deterministic(tmp_path):
    schema = pa.schema([("id", pa.string()), ("n", pa.int64())])
    rows = [{"id": str(i), "n": i} for i in range(5000)]
    common.write_table(tmp_path / "a.parquet", common.rows_to_table(rows, schema))
    common.write_table(tmp_path / "b.parquet", common.rows_to_table(rows, schema))
    assert common.sha256_file(tmp_path / "a.parquet") == common.sha256_file(tmp_path / "b.parquet")
    assert sum(len(b) for b in common.iter_batches(tmp_path / "a.parquet")) == 5000


def test_conservation_check_names_the_shard():
    common.check_conservation("filter", "s0", 10, kept=7, rejected=3)
    with pytest.raises(common.StageError, match=r"filter\[s0\]: conservation violated"):
        common.check_conservation("filter", "s0", 10, kept=7, rejected=2)


def test_run_sharded_redoes_only_missing_shards(tmp_path):
    done = {"a", "c"}
    processed = []
    status = common.run_sharded(["a", "b", "c", "d"], processed.append, lambda s: s in done, desc="t")
    assert processed == ["b", "d"]
    assert status == {"a": "skipped", "b": "done", "c": "skipped", "d": "done"}


def test_list_shards_refuses_missing_and_empty_dirs(tmp_path):
    with pytest.raises(common.StageError, match="does not exist"):
        common.list_shards(tmp_path / "nope")
    with pytest.raises(common.StageError, match="holds no"):
        common.list_shards(tmp_path)
