"""The evaluation harness: pass@k / avg@k, per-sample seeds, batched generation, plugins, and an end-to-end run of
evaluate_checkpoint on a micro checkpoint (scores near zero are fine: the point is the plumbing)."""
import copy
import gzip
import hashlib
import json
import math

import pytest

from stages import common
from stages import evaluate as ev
from stages.verifiers import VerifierResult
from fixtures_checkpoint import make_checkpoint

EVAL = common.REPO / "data" / "eval"


# ----------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0),
    (5, 2, 1, 0.4),                      # pass@1 = c / n
    (5, 2, 2, 1 - 3 / 10),               # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),            # 1 - C(7,5)/C(10,5)
    (3, 3, 1, 1.0),
    (4, 1, 4, 1.0),                      # n - c < k: some draw of k always holds the correct one
    (8, 1, 3, 3 / 8),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_stays_finite_for_large_n():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert 0 < ev.pass_at_k(2000, 3, 1000) <= 1
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 4, 1)


def test_avg_at_k_and_summary():
    scores = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 1.0]]
    assert ev.avg_at_k(scores) == pytest.approx((1 / 3 + 1 + 0 + 2 / 3) / 4)
    got = ev.summarize(scores)
    # correct = score > 0.5: counts 1, 3, 0, 1 of 3
    assert got["k"] == 3 and got["n_problems"] == 4
    assert got["pass@1"] == pytest.approx((1 / 3 + 1 + 0 + 1 / 3) / 4)
    assert got["pass@k"] == pytest.approx(3 / 4)


def test_sample_seeds_are_stable_and_distinct():
    seeds = {ev.sample_seed(1234, b, p, s) for b in ("math", "bfcl") for p in ("a", "b") for s in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2 ** 63 for s in seeds)
    assert ev.sample_seed(1, "math", "a", 0) == ev.sample_seed(1, "math", "a", 0)


# ----------------------------------------------------------------------------- local data and plugins

def test_read_records_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(common.StageError, match=r"bad.jsonl:2: not valid JSON"):
        ev.read_records(path)
    with pytest.raises(common.StageError, match="not found"):
        ev.read_records(tmp_path / "missing.jsonl")


def test_read_records_formats(tmp_path):
    import datasets
    rows = [{"id": "x", "problem": "1+1", "answer": "2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(rows[0]) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.json", "a.jsonl.gz", "a.parquet"):
        assert ev.read_records(tmp_path / name) == rows
    assert ev.read_records(tmp_path / "ds", split="test") == rows
    with pytest.raises(common.StageError, match="DatasetDict"):
        ev.read_records(tmp_path / "ds")


def test_mcq_loader_accepts_letters_and_indices(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "b"}) + "\n"
                    + json.dumps({"question": "1+1?", "choices": ["2", "5", "7"], "answer": 0}) + "\n")
    problems = ev.PLUGINS["mcq"].load({"path": str(path)}, tmp_path)
    assert [p["answer"] for p in problems] == ["B", "A"]
    path.write_text(json.dumps({"question": "?", "choices": ["a", "b"], "answer": "D"}) + "\n")
    with pytest.raises(common.StageError, match="record 1"):
        ev.PLUGINS["mcq"].load({"path": str(path)}, tmp_path)


def test_humaneval_candidate_forms():
    with gzip.open(EVAL / "humaneval" / "HumanEval.jsonl.gz", "rt") as fh:
        problem = json.loads(fh.readline())
    continuation = problem["canonical_solution"] + "\n\ndef unrelated():\n    raise SystemExit(1)\n"
    body = problem["prompt"].split("from typing import List")[1]
    chat = f"Here you go:\n```python\nfrom typing import List\n{body}{problem['canonical_solution']}```\nDone."
    wrong = "    return True\n"
    results = ev._verify_humaneval([problem] * 3, [continuation, chat, wrong],
                                   {"sandbox_timeout_s": 10, "sandbox_memory_mb": 1024, "sandbox_workers": 2})
    assert [r.score for r in results] == [1.0, 1.0, 0.0], [r.reason for r in results]


def test_bfcl_loader_interleaves_categories():
    problems = ev.PLUGINS["bfcl"].load({"path": "bfcl", "categories": ["simple_python", "parallel"]}, EVAL)
    assert [p["id"] for p in problems[:4]] == ["simple_python_0", "parallel_0", "simple_python_1", "parallel_1"]
    assert len(problems) == 600


def test_benchmark_config_overlays_entry_and_rejects_unknown():
    params = {"n_samples": 3, "temperature": 0.6, "run": ["a"],
              "benchmarks": {"a": {"plugin": "math", "path": "x", "n_samples": 8}, "b": {"plugin": "nope"}}}
    cfg = ev.benchmark_config(params, "a")
    assert cfg["n_samples"] == 8 and cfg["temperature"] == 0.6 and "benchmarks" not in cfg
    with pytest.raises(common.StageError, match="plugin must be one of"):
        ev.benchmark_config(params, "b")
    with pytest.raises(common.StageError, match="no entry 'c'"):
        ev.benchmark_config(params, "c")


# ----------------------------------------------------------------------------- a micro checkpoint

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def eval_params(**overrides) -> dict:
    params = common.stage_params(common.load_params(), "evaluate")
    params.update({"prompt_format": "chat", "max_problems": 2, "max_new_tokens": 12, "n_samples": 2, "batch_size": 4, "scale": "tiny",
                   "seed": 1234, "device": "cpu", "dtype": "float32", "sandbox_timeout_s": 5.0})
    params.update(overrides)
    return params


def test_generation_is_seeded_per_sample_not_per_batch(checkpoint):
    model, tok = ev.load_checkpoint(checkpoint, eval_params())
    prompt = ev.render_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}], None, eval_params())
    jobs = [ev.GenerationJob(prompt, seed) for seed in (11, 22, 11, 33)]
    together = ev.generate(model, tok, jobs, eval_params(max_new_tokens=20, temperature=1.0, top_p=1.0))
    alone = ev.generate(model, tok, jobs[1:2], eval_params(max_new_tokens=20, temperature=1.0, top_p=1.0))
    assert together[0] == together[2] and together[1] == alone[0]
    assert len({g.text for g in together}) > 1
    assert all(g.n_tokens <= 20 for g in together)


def test_long_prompts_are_cut_to_fit_the_context(checkpoint):
    model, tok = ev.load_checkpoint(checkpoint, eval_params())
    long_prompt = ev.render_prompt(tok, [{"role": "user", "content": "add the numbers " * 400}], None, eval_params())
    assert len(long_prompt) > model.config.max_position_embeddings
    out, = ev.generate(model, tok, [ev.GenerationJob(long_prompt, 1)], eval_params(max_new_tokens=8))
    assert out.n_tokens <= 8


def write_fixtures(root):
    rows = [{"id": f"m{i}", "question": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}",
             "answer": str(2 * i)} for i in range(3)]
    (root / "tiny_math").mkdir()
    (root / "tiny_math" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "judge").mkdir()
    (root / "judge" / "q.jsonl").write_text(json.dumps({"id": "j0", "prompt": "Say hello.", "reference": "Hello!"})
                                            + "\n")


def run_eval(checkpoint, root, out, names, **overrides):
    params = eval_params(**overrides)
    params["benchmarks"] = copy.deepcopy(params["benchmarks"])
    params["benchmarks"]["humaneval"]["path"] = str(EVAL / "humaneval" / "HumanEval.jsonl.gz")
    params["benchmarks"]["bfcl"]["path"] = str(EVAL / "bfcl")
    params["benchmarks"]["judged"] = {"plugin": "judge", "path": "judge/q.jsonl", "judge_checkpoint": str(checkpoint),
                                      "reference_checkpoint": None, "tie_margin": 0.05, "n_samples": 2}
    return ev.evaluate_checkpoint(checkpoint, names, params, root, out)


def test_evaluate_checkpoint_end_to_end_and_deterministic(checkpoint, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_fixtures(root)
    names = ["tiny_math", "humaneval", "bfcl", "judged"]
    metrics = run_eval(checkpoint, root, tmp_path / "a", names)
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics)) and sorted(on_disk) == sorted(names)
    for name, m in on_disk.items():
        assert set(m) == {"avg@k", "pass@1", "pass@k", "n_problems", "k"}
        assert 0 <= m["pass@1"] <= m["pass@k"] <= 1 and 0 <= m["avg@k"] <= 1
    assert [on_disk[n]["n_problems"] for n in names] == [2, 2, 2, 1] and on_disk["tiny_math"]["k"] == 2
    rows = [json.loads(x) for x in (tmp_path / "a" / "samples" / "bfcl.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in rows] == [("simple_python_0", 0), ("simple_python_0", 1),
                                                              ("multiple_0", 0), ("multiple_0", 1)]
    assert all(r["prompt"].startswith("<|im_start|>system") and r["reason"] for r in rows)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"]["humaneval"] == {"problems": 2, "samples": 4}
    assert set(manifest["outputs"]) == {"metrics.json", *(f"samples/{n}.jsonl" for n in names)}

    run_eval(checkpoint, root, tmp_path / "b", names)
    digest = lambda d: {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in d.rglob("*") if p.is_file()}
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_judge_position_swap_makes_identical_answers_a_tie(checkpoint):
    cfg = {**eval_params(), "judge_checkpoint": str(checkpoint), "tie_margin": 1e-9}
    problem = {"id": "q", "question": "Name a colour.", "reference": "Blue."}
    tie, other = ev._verify_judge([problem, problem], ["Blue.", "Green, obviously."], cfg)
    # Whatever the judge's bias for position A, averaging both orders gives exactly 1/2 for identical answers.
    assert tie.score == 0.5 and "P(model better) = 0.5000" in tie.reason
    assert isinstance(other, VerifierResult) and other.score in (0.0, 0.5, 1.0)


def test_cli_smoke(checkpoint, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_fixtures(root)
    params = eval_params(max_problems=1, n_samples=1)
    ev.main(["--params-json", json.dumps({"evaluate": params}), "--checkpoint", str(checkpoint),
             "--output-dir", str(tmp_path / "out"), "--benchmarks", "tiny_math", "--data-root", str(root)])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["tiny_math"]["n_problems"] == 1
    with pytest.raises(SystemExit):
        ev.main(["--params-json", json.dumps({"evaluate": params}), "--checkpoint", str(tmp_path / "missing"),
                 "--output-dir", str(tmp_path / "out2"), "--benchmarks", "tiny_math", "--data-root", str(root)])
