"""quality_model + score: the tagger trains and measures itself, tags stay in [0, 1], utility is a 0-9 integer that
rises with the classifier, no row is dropped, and reruns are byte-identical."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fixtures_quality as fq
from stages import common, quality_model, score


def params(stage: str) -> dict:
    return common.stage_params(common.load_params(), stage)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    corpus = fq.write_corpus(root / "dedup" / "kept", n_shards=2, docs_per_shard=150, seed=7)
    seed_file = fq.write_seed_set(root / "seed.jsonl", n=40, seed=7)
    quality_model.build_quality_model(seed_file, corpus, root / "quality_model", params("quality_model"))
    status = score.score_all(corpus, root / "quality_model", root / "score", params("score"))
    return {"root": root, "corpus": corpus, "seed": seed_file, "model": root / "quality_model",
            "out": root / "score", "status": status}


def test_quality_model_writes_its_files_and_heldout_metrics(scored):
    model = scored["model"]
    for name in ("classifier.npz", "retrieval.npz", "metrics.json", "manifest.json"):
        assert (model / name).is_file()
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["n_pos"] == 40 and metrics["n_neg"] == 80
    k = params("quality_model")["cross_fit_folds"]
    assert [f["fold"] for f in metrics["folds"]] == list(range(k))
    assert sum(f["n_pos"] for f in metrics["folds"]) == 40 and sum(f["n_neg"] for f in metrics["folds"]) == 80
    assert metrics["heldout_auc"] > 0.9  # out of fold: textbook prose vs a mostly-spam corpus is easy to tell apart
    manifest = json.loads((model / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"classifier.npz", "retrieval.npz", "metrics.json"}
    assert manifest["counts"]["folds"] == metrics["folds"]
    with np.load(model / "classifier.npz") as clf:
        assert clf["coef"].shape[0] == clf["intercept"].shape[0] == int(clf["folds"]) == k
    with np.load(model / "retrieval.npz") as ret:
        norms = np.sqrt(np.bincount(np.repeat(np.arange(ret["shape"][0]), np.diff(ret["indptr"])),
                                    weights=ret["data"].astype(np.float64) ** 2))
        assert np.allclose(norms, 1.0, atol=1e-5)


def test_quality_model_is_deterministic(scored, tmp_path):
    quality_model.build_quality_model(scored["seed"], scored["corpus"], tmp_path, params("quality_model"))
    for name in ("classifier.npz", "retrieval.npz", "metrics.json"):
        assert common.sha256_file(tmp_path / name) == common.sha256_file(scored["model"] / name)


def training_docs(scored) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(positives, negatives) exactly as build_quality_model drew them, as (id, text)."""
    p = params("quality_model")
    seeds = quality_model.read_seed_set(scored["seed"])
    negatives = quality_model.sample_corpus(scored["corpus"], 80, int(p["seed"]), {d["id"] for d in seeds})
    return [(d["id"], d["text"]) for d in seeds], negatives


def test_classifier_k_does_not_depend_on_the_documents_of_fold_k(scored):
    """Black box: rewrite one training document's text; only the classifiers that trained on it may change, and the
    one that scores it (its fold's) must not."""
    p = dict(params("quality_model"), retrieval=dict(params("quality_model")["retrieval"], n_features=1024))
    positives, negatives = training_docs(scored)
    model = quality_model.load_quality_model(scored["model"])
    for victim in (0, 1, 2):  # a few sampled negatives, whatever their folds
        doc_id, _ = negatives[victim]
        fold = int(model.fold([doc_id])[0])
        changed = list(negatives)
        changed[victim] = (doc_id, "buy now " * 30 + "gradient descent converges for convex losses")
        a, _, _ = quality_model.train_quality_model(positives, negatives, p)
        b, _, _ = quality_model.train_quality_model(positives, changed, p)
        assert np.array_equal(a["coef"][fold], b["coef"][fold]) and a["intercept"][fold] == b["intercept"][fold]
        others = [k for k in range(len(a["intercept"])) if k != fold]
        assert all(not np.array_equal(a["coef"][k], b["coef"][k]) for k in others)


def test_no_training_document_is_scored_by_a_classifier_that_saw_it(scored):
    """Every seed and sampled document in the corpus is scored by classifier f(d), the one trained without fold f(d);
    and picking the fold matters (another fold's classifier gives another probability)."""
    model = quality_model.load_quality_model(scored["model"])
    positives, negatives = training_docs(scored)
    training = {i for i, _ in positives + negatives}
    rows = [r for shard in ("shard-000", "shard-001")
            for r in pq.read_table(scored["out"] / f"{shard}.parquet").to_pylist()]
    sampled = [r for r in rows if r["id"] in training]
    assert len(sampled) == len(negatives)  # every sampled negative is a corpus document that score scores
    ids, texts = [r["id"] for r in sampled], [r["text"] for r in sampled]
    x = quality_model.ngram_features(texts, model.classifier_spec)
    every = 1.0 / (1.0 + np.exp(-(x @ model.coef.astype(np.float64).T + model.intercept)))  # [n, K]
    folds = model.fold(ids)
    got = np.array([r["tag_classifier"] for r in sampled])
    assert np.allclose(got, every[np.arange(len(ids)), folds])
    assert not np.allclose(got, every[np.arange(len(ids)), (folds + 1) % len(model.intercept)])
    manifests = [json.loads((scored["out"] / f"{s}.manifest.json").read_text()) for s in ("shard-000", "shard-001")]
    assert sum(sum(m["counts"]["scored_by_fold"]) for m in manifests) == len(rows)


def test_one_character_tokens_count_so_numbers_tell_problems_apart():
    """Templated problems that differ only in a digit: different classifier features and retrieval vectors."""
    a = "A farmer has 3 rows with 4 plants each. How many plants are there? x = 3 * 4"
    b = "A farmer has 3 rows with 5 plants each. How many plants are there? x = 3 * 5"
    spec = {"n_features": 4096, "word_ngram_max": 1, "char_ngram_range": [0, 0], "sublinear_tf": True}
    x = quality_model.ngram_features([a, b], spec).toarray()
    assert not np.allclose(x[0], x[1])
    v = quality_model.tfidf_vectors([a, b], np.ones(4096, dtype=np.float32), spec)
    assert (v[0] @ v[1].T).toarray()[0, 0] < 1.0 - 1e-6
    assert quality_model.term_counts(["x 7"], spec).nnz == 2  # "x" and "7" are tokens


def test_char_ngram_block_adds_features():
    spec = {"n_features": 1024, "word_ngram_max": 1, "char_ngram_range": [3, 4]}
    x = quality_model.ngram_features(["gradient descent", "buy now"], spec)
    assert x.shape == (2, 2048) and x[:, 1024:].nnz > 0


def test_seed_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "seed.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(common.StageError, match=r"seed.jsonl:2:"):
        quality_model.read_seed_set(bad)
    bad.write_text('{"text": "fine"}\n{"domain": "wiki"}\n')
    with pytest.raises(common.StageError, match=r"seed.jsonl:2: .*'text'"):
        quality_model.read_seed_set(bad)


def test_corpus_sample_does_not_depend_on_sharding(tmp_path):
    rows = fq.corpus_rows(60, seed=3)
    for n_shards, name in ((1, "one"), (3, "three")):
        for i in range(n_shards):
            chunk = rows[i::n_shards]
            common.write_table(tmp_path / name / f"s{i}.parquet", common.rows_to_table(chunk, fq.DOC_SCHEMA))
    one = quality_model.sample_corpus(tmp_path / "one", 10, seed=5, exclude_ids=set())
    assert one == quality_model.sample_corpus(tmp_path / "three", 10, seed=5, exclude_ids=set())
    assert len(one) == 10 and {i for i, _ in one} <= {r["id"] for r in rows}
    assert one != quality_model.sample_corpus(tmp_path / "one", 10, seed=6, exclude_ids=set())


def test_score_keeps_every_row_and_tags_are_in_range(scored):
    assert scored["status"] == {"shard-000": "done", "shard-001": "done"}
    for shard in ("shard-000", "shard-001"):
        src = pq.read_table(scored["corpus"] / f"{shard}.parquet")
        out = pq.read_table(scored["out"] / f"{shard}.parquet")
        assert out.column("id").to_pylist() == src.column("id").to_pylist()
        assert out.select(src.column_names).equals(src)
        df = out.to_pandas()
        for tag in score.TAGS:
            values = df[tag].dropna()
            assert ((values >= 0) & (values <= 1)).all(), tag
        code = df["domain"] == "code"
        assert df.loc[~code, "tag_code_quality"].isna().all() and df.loc[code, "tag_code_quality"].notna().all()
        assert out.schema.field("utility").type == pa.int8()
        assert df["utility"].between(0, 9).all()
        manifest = json.loads((scored["out"] / f"{shard}.manifest.json").read_text())
        assert manifest["counts"]["in"] == manifest["counts"]["scored"] == src.num_rows
        assert sum(manifest["counts"]["scored_by_fold"]) == src.num_rows


def test_utility_separates_reference_like_from_spam(scored):
    df = pq.read_table(scored["out"] / "shard-000.parquet").to_pandas()
    by_domain = df.groupby("domain")["utility"].mean()
    assert by_domain["wiki"] > by_domain["web"] + 3
    assert df.loc[df["domain"] == "math", "tag_reasoning"].mean() > df.loc[df["domain"] == "web",
                                                                           "tag_reasoning"].mean()


def test_tags_respond_to_their_features():
    p = params("score")
    texts = pa.array([
        "Step 1: 12 + 30 = 42.\nTherefore the answer is 42, because 12 + 30 = 42.\n#### 42",
        "wow\nnice\nlol",
        "def total_price(items):\n    # sum the item prices\n    return sum(item.price for item in items)\n",
        "def f(a):\n    return [x for x in a if x > 0 and x < 100 and x % 3 == 0 and x % 5 == 0 and x % 7 == 0 and x]\n",
    ])
    tags = score.quality_tags(texts, np.array([False, False, True, True]), np.zeros(4), p)
    assert tags["tag_reasoning"][0] > 0.5 > tags["tag_reasoning"][1]
    assert tags["tag_coherence"][0] > tags["tag_coherence"][1]
    assert tags["tag_code_quality"][2] > tags["tag_code_quality"][3]
    assert np.isnan(tags["tag_code_quality"][:2]).all()


def test_utility_is_monotone_in_the_classifier_with_other_features_fixed():
    p = params("score")
    text = "Energy is defined as the capacity to do work. For example, a 2 kg mass lifted 3 m stores 58.8 J."
    probs = np.linspace(0.0, 1.0, 41)
    texts = pa.array([text] * len(probs))
    tags = score.quality_tags(texts, np.zeros(len(probs), bool), probs, p)
    utility = score.utility_score(tags, p["utility_weights"], p["utility_range"])
    assert utility.dtype == np.int8 and utility.min() >= 0 and utility.max() <= 9
    assert (np.diff(utility.astype(int)) >= 0).all() and utility[-1] > utility[0]


def test_utility_formula_on_a_hand_computed_example():
    tags = {"tag_knowledge_density": np.array([0.5, 0.5]), "tag_educational": np.array([0.9, 0.1]),
            "tag_code_quality": np.array([np.nan, 1.0])}
    weights = {"tag_knowledge_density": 1.0, "tag_educational": 1.0, "tag_code_quality": 2.0}
    # doc 0: U = (0.5 + 0.9) / 2 = 0.7 -> (0.7 - 0.2) / 0.6 = 0.833 -> 8; doc 1: U = (0.5 + 0.1 + 2) / 4 = 0.65 -> 7
    assert score.utility_score(tags, weights, [0.2, 0.8]).tolist() == [8, 7]
    with pytest.raises(common.StageError, match="utility_weights"):
        score.utility_score(tags, {"tag_length": 1.0}, [0, 1])


def test_rerun_skips_current_shards_and_is_byte_identical(scored, tmp_path):
    p = params("score")
    assert score.score_all(scored["corpus"], scored["model"], scored["out"], p) == {
        "shard-000": "skipped", "shard-001": "skipped"}
    score.score_all(scored["corpus"], scored["model"], tmp_path, p, shard="shard-001")
    assert common.sha256_file(tmp_path / "shard-001.parquet") == common.sha256_file(scored["out"] /
                                                                                    "shard-001.parquet")
    p2 = dict(p, utility_range=[0.0, 1.0])
    assert score.score_all(scored["corpus"], scored["model"], tmp_path, p2)["shard-001"] == "done"


def test_bad_shard_is_a_clear_error(scored, tmp_path):
    common.write_table(tmp_path / "in" / "broken.parquet", pa.table({"id": ["a"], "body": ["x"]}))
    with pytest.raises(common.StageError, match=r"broken.parquet: shard lacks the 'text' column"):
        score.score_all(tmp_path / "in", scored["model"], tmp_path / "out", params("score"))


def test_cli_scores_one_shard(scored, tmp_path):
    payload = json.dumps({"score": params("score")})
    score.main(["--params-json", payload, "--input-dir", str(scored["corpus"]), "--model-dir", str(scored["model"]),
                "--output-dir", str(tmp_path), "--shard", "shard-000"])
    assert (tmp_path / "shard-000.manifest.json").is_file() and not (tmp_path / "shard-001.parquet").exists()
