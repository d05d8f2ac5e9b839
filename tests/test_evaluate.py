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
    got = ev.summarize(scores, 500, 7)
    # correct = score > 0.5: counts 1, 3, 0, 1 of 3
    assert got["k"] == 3 and got["n_problems"] == 4
    assert got["pass@1"] == pytest.approx((1 / 3 + 1 + 0 + 1 / 3) / 4)
    assert got["pass@k"] == pytest.approx(3 / 4)
    # 3 samples per problem are not independent trials: the interval is a bootstrap over the 4 problems
    assert got["ci95_method"] == "bootstrap(500)"
    for metric in ("avg@k", "pass@1", "pass@k"):
        assert 0 <= got[f"{metric}:ci95_low"] <= got[metric] <= got[f"{metric}:ci95_high"] <= 1
    assert got == ev.summarize(scores, 500, 7) and got != ev.summarize(scores, 500, 8)


def test_summary_of_one_sample_per_problem_is_wilson_over_problems():
    got = ev.summarize([[1.0]] * 8 + [[0.0]] * 2, 500, 7)
    assert got["ci95_method"] == "wilson" and got["avg@k"] == got["pass@1"] == got["pass@k"] == 0.8
    # Wilson 8/10 at z = 1.96: [0.4902, 0.9433] (hand-computed)
    assert (got["avg@k:ci95_low"], got["avg@k:ci95_high"]) == pytest.approx((0.49016, 0.94331), abs=1e-4)
    # a judge tie (0.5) is no Bernoulli trial: the bootstrap even with one sample
    assert ev.summarize([[0.5], [1.0], [0.0]], 500, 7)["ci95_method"] == "bootstrap(500)"


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
                   "seed": 1234, "device": "cpu", "dtype": "float32", "sandbox_timeout_s": 5.0,
                   "stop_strings": {"plain": ["\nProblem:"], "chat": ["<|im_end|>"]}, "bootstrap_resamples": 200,
                   "per_checkpoint": {"teacher": {"prompt_format": "chat"}}})
    params.update(overrides)
    return params


def test_generation_is_seeded_per_sample_not_per_batch(checkpoint):
    model, tok = ev.load_checkpoint(checkpoint, eval_params())
    prompt = ev.render_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}], None, eval_params())
    other = ev.render_prompt(tok, [{"role": "user", "content": "Name a prime number above ten."}], None, eval_params())
    cfg = eval_params(max_new_tokens=20, temperature=1.0, top_p=1.0)
    together = ev.generate(model, tok, [ev.engine.Request(prompt, (11, 22, 11, 33)), ev.engine.Request(other, (22,))],
                           cfg)
    alone = ev.generate(model, tok, [ev.engine.Request(prompt, (22,))], cfg)
    # The same sample: the same tokens (log-probs agree up to the float rounding of other batch shapes).
    tokens = [c.token_ids for c in together[0]]
    assert tokens[0] == tokens[2] and tokens[1] == alone[0][0].token_ids and together[1][0].token_ids != tokens[1]
    assert len({c.text for c in together[0]}) > 1
    for c in together[0]:
        kept = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids     # the stop token is not in the text
        assert len(c.token_ids) <= 20 and c.text == tok.decode(kept, skip_special_tokens=False)


def test_long_prompts_are_cut_to_fit_the_context(checkpoint):
    model, tok = ev.load_checkpoint(checkpoint, eval_params())
    long_prompt = ev.render_prompt(tok, [{"role": "user", "content": "add the numbers " * 400}], None, eval_params())
    assert len(long_prompt) > model.config.max_position_embeddings
    (out,), = ev.generate(model, tok, [ev.engine.Request(long_prompt, (1,))], eval_params(max_new_tokens=8))
    assert len(out.token_ids) <= 8


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
        assert set(m) == {"avg@k", "pass@1", "pass@k", "n_problems", "k", "prompt_format", "ci95_method",
                          *(f"{k}:ci95_{end}" for k in ("avg@k", "pass@1", "pass@k") for end in ("low", "high"))}
        assert 0 <= m["pass@1"] <= m["pass@k"] <= 1 and 0 <= m["avg@k"] <= 1
        assert m["avg@k:ci95_low"] <= m["avg@k"] <= m["avg@k:ci95_high"] and m["prompt_format"] == "chat"
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert sorted(scores["bfcl"]) == ["multiple_0", "simple_python_0"]
    assert sum(scores["tiny_math"].values()) / 2 == pytest.approx(on_disk["tiny_math"]["avg@k"])
    assert [on_disk[n]["n_problems"] for n in names] == [2, 2, 2, 1] and on_disk["tiny_math"]["k"] == 2
    rows = [json.loads(x) for x in (tmp_path / "a" / "samples" / "bfcl.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in rows] == [("simple_python_0", 0), ("simple_python_0", 1),
                                                              ("multiple_0", 0), ("multiple_0", 1)]
    assert all(r["prompt"].startswith("<|im_start|>system") and r["reason"] for r in rows)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"]["humaneval"] == {"problems": 2, "samples": 4}
    assert set(manifest["outputs"]) == {"metrics.json", "scores.json", *(f"samples/{n}.jsonl" for n in names)}
    assert manifest["prompt_format"] == "chat"

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


# ----------------------------------------------------------------------------- prompt formats and stop strings

def test_prompt_format_is_per_checkpoint_and_stated():
    params = eval_params(prompt_format="plain", run=["tiny_math"],
                         per_checkpoint={"teacher": {"prompt_format": "chat", "run": ["tiny_math", "ladder_math"],
                                                     "max_new_tokens": 256},
                                         "base": {"run": ["bfcl", "ladder_math"]}})
    teacher, base = ev.checkpoint_params(params, "teacher"), ev.checkpoint_params(params, "base")
    assert teacher["prompt_format"] == "chat" and teacher["run"] == ["tiny_math", "ladder_math"]
    assert ev.benchmark_config(teacher, "tiny_math")["max_new_tokens"] == 256
    assert ev.benchmark_config(base, "tiny_math")["max_new_tokens"] == params["max_new_tokens"] == 12
    assert base["prompt_format"] == "plain" and base["run"] == ["bfcl", "ladder_math"]
    assert ev.checkpoint_params(params, "phase_decay")["prompt_format"] == "plain"
    assert ev.checkpoint_params(params, None)["run"] == ["tiny_math"]
    params["benchmarks"] = {**params["benchmarks"], "ladder_math": {"plugin": "ladder", "root": "tasks",
                                                                    "path": "math_heldout.parquet"}}
    roots = {"eval": EVAL, "tasks": EVAL / "tasks"}
    assert ev.checkpoint_inputs(params, "base", roots)[-1] == EVAL / "tasks" / "math_heldout.parquet"
    assert ev.checkpoint_inputs(params, "phase_decay", roots) == [EVAL / "tiny_math" / "test.jsonl"]
    with pytest.raises(common.StageError, match="prompt format of sft_full"):
        ev.checkpoint_params({**params, "per_checkpoint": {"sft_full": {"prompt_format": "chatml"}}}, "sft_full")
    with pytest.raises(common.StageError, match="unknown keys"):
        ev.checkpoint_params({**params, "per_checkpoint": {"sft_full": {"temperature": 0}}}, "sft_full")
    with pytest.raises(common.StageError, match="stop_strings"):
        ev.evaluate_checkpoint("unused", ["tiny_math"], {k: v for k, v in params.items() if k != "stop_strings"},
                               EVAL, "unused")


def test_stop_strings_of_the_prompt_format_end_the_completion(checkpoint):
    model, tok = ev.load_checkpoint(checkpoint, eval_params())
    prompt = ev.render_prompt(tok, [], "Problem: What is 2 + 3?\n\nSolution:\n", eval_params(prompt_format="plain"))
    free = eval_params(prompt_format="plain", max_new_tokens=40, temperature=1.0, top_p=1.0,
                       stop_strings={"plain": [], "chat": []})
    (long,), = ev.generate(model, tok, [ev.engine.Request(prompt, (5,))], free)
    stop = long.text[10:13]  # a string the unstopped sample writes
    assert len(stop) == 3 and long.finish_reason == "length"
    for fmt, expect_stop in (("plain", True), ("chat", False)):  # only the checkpoint's format's strings apply
        cfg = {**free, "prompt_format": fmt, "stop_strings": {"plain": [stop], "chat": ["\x00never"]}}
        (out,), = ev.generate(model, tok, [ev.engine.Request(prompt, (5,))], cfg)
        if expect_stop:
            assert out.finish_reason == "stop" and stop not in out.text and long.text.startswith(out.text)
            assert len(out.text) <= 12
        else:
            assert out.text == long.text


# ----------------------------------------------------------------------------- the task ladder

LADDER_PARAMS = {"seed": 3, "math": {"levels": [1, 3], "train_per_level": 2, "heldout_per_level": 6,
                                     "max_heldout_fraction": 0.4},
                 "code": {"levels": [1], "train_per_level": 1, "heldout_per_level": 4, "max_heldout_fraction": 0.4,
                          "public_tests": 1, "hidden_tests": 2}}


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory):
    from stages import tasks
    out = tmp_path_factory.mktemp("tasks")
    tasks.write_tasks(out, LADDER_PARAMS)
    return out


def ladder_params(**overrides) -> dict:
    params = eval_params(max_problems=None, **overrides)
    params["benchmarks"] = {"ladder_math": {"plugin": "ladder", "root": "tasks", "path": "math_heldout.parquet",
                                            "max_problems": None, "max_per_level": 4},
                            "ladder_code": {"plugin": "ladder", "root": "tasks", "path": "code_heldout.parquet",
                                            "max_problems": None, "max_per_level": None}}
    return params


def test_ladder_loader_interleaves_templates_per_level(ladder_dir):
    cfg = ev.benchmark_config(ladder_params(), "ladder_math")
    problems = ev.PLUGINS["ladder"].load(cfg, ladder_dir)
    assert [p["level"] for p in problems] == [1] * 4 + [3] * 4
    # each level's first problems take its templates in turn (L1: add_1d, sub_1d; L3: mul_table, div_table)
    assert [p["template_id"] for p in problems] == ["add_1d", "sub_1d"] * 2 + ["mul_table", "div_table"] * 2
    assert len(ev.PLUGINS["ladder"].load({**cfg, "max_per_level": None}, ladder_dir)) == 12


def test_ladder_verifier_grades_plain_and_chat_answers(ladder_dir):
    from stages import tasks
    math = ev.read_records(ladder_dir / "math_heldout.parquet")[0]
    code = ev.read_records(ladder_dir / "code_heldout.parquet")[0]
    right, wrong = math["answer"], str(int(math["answer"]) + 1)
    # runs on past its answer into text with a `</think>` (the answer part would start after it) and another answer
    runaway = f"{math['solution']}\n\nProblem: What is 1 + 1?\n</think>\nSolution:\n#### {wrong}"
    plain = ev.benchmark_config(ladder_params(prompt_format="plain"), "ladder_math")
    got = ev._verify_ladder([math, math, code, code], [runaway, f"#### {wrong}\n#### {right}",
                                                        code["canonical_solution"], "    return None\n"], plain)
    # a base model is graded on its first answer, not the last one it wrote after running on
    assert [r.score for r in got] == [1.0, 0.0, 1.0, 0.0], [r.reason for r in got]
    chat = ev.benchmark_config(ladder_params(prompt_format="chat"), "ladder_math")
    fenced = f"```python\ndef {code['entry_point']}(x):\n{code['canonical_solution']}```"
    got = ev._verify_ladder([math, math, code], [f"<think>maybe #### {wrong}</think>\n#### {right}",
                                                 f"#### {wrong}", fenced], chat)
    assert [r.score for r in got] == [1.0, 0.0, 1.0], [r.reason for r in got]
    assert tasks.format_prompt(math, "plain") in ev.PLUGINS["ladder"].plain(math, plain)


def test_ladder_benchmark_reports_levels_with_intervals(checkpoint, ladder_dir, tmp_path):
    params = ev.checkpoint_params(ladder_params(prompt_format="plain", n_samples=2), "base")
    metrics = ev.evaluate_checkpoint(checkpoint, ["ladder_math", "ladder_code"], params, EVAL, tmp_path / "out",
                                     tasks_dir=ladder_dir)
    m, c = metrics["ladder_math"], metrics["ladder_code"]
    assert m["n_problems"] == 8 and sorted(m["by_level"]) == ["1", "3"] and c["n_problems"] == 4
    assert sorted(c["by_level"]) == ["1"] and m["prompt_format"] == "plain"
    for lv in m["by_level"].values():
        assert lv["n_problems"] == 4 and lv["ci95_method"] == "bootstrap(200)"
        assert lv["avg@k:ci95_low"] <= lv["avg@k"] <= lv["avg@k:ci95_high"]
    assert m["avg@k"] == pytest.approx(sum(lv["avg@k"] for lv in m["by_level"].values()) / 2)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(scores["ladder_math"]) == 8 and all(i.startswith("code-L1-") for i in scores["ladder_code"])
    rows = [json.loads(x) for x in (tmp_path / "out" / "samples" / "ladder_math.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("Problem: ") and all("\nProblem:" not in r["completion"] for r in rows)
    with pytest.raises(common.StageError, match="root 'tasks'"):
        ev.evaluate_checkpoint(checkpoint, ["ladder_math"], params, EVAL, tmp_path / "none")


# ----------------------------------------------------------------------------- intervals and paired comparisons

def test_wilson_and_bootstrap_intervals_on_known_counts():
    from stages import eval_stats
    assert eval_stats.accuracy_interval([0.0] * 200, True, 100, 1) == ((0.0, pytest.approx(0.01884, abs=1e-4)),
                                                                        "wilson")
    values = [1.0] * 120 + [0.0] * 280      # p = 0.3, n = 400: the normal interval is 0.3 +- 0.0449
    (low, high), method = eval_stats.accuracy_interval(values, False, 4000, 11)
    assert method == "bootstrap(4000)" and low == pytest.approx(0.3 - 0.0449, abs=0.008)
    assert high == pytest.approx(0.3 + 0.0449, abs=0.008)
    assert eval_stats.bootstrap_interval(values, 300, 5) == eval_stats.bootstrap_interval(values, 300, 5)
    assert eval_stats.bootstrap_interval(values, 300, 5) != eval_stats.bootstrap_interval(values, 300, 6)
    with pytest.raises(common.StageError, match="0/1 values"):
        eval_stats.accuracy_interval([0.5, 1.0], True, 100, 1)
    # every problem wrong in all its samples: the bootstrap has no spread; 0 of 20 is not certainty (Wilson 0/20)
    (low, high), method = eval_stats.accuracy_interval([0.0] * 20, False, 100, 1)
    assert method == "bootstrap(100)" and low == 0.0 and high == pytest.approx(0.1611, abs=1e-3)


@pytest.mark.parametrize("before, after, verdict", [
    ([0.0] * 40, [1.0] * 10 + [0.0] * 30, "beyond the interval"),        # +25 points on 40 problems
    ([0.0] * 40, [1.0] + [0.0] * 39, "inside the interval"),             # one more problem right: noise
    ([1.0, 0.0] * 20, [1.0, 0.0] * 20, "inside the interval"),           # no change
    ([1.0] * 20 + [0.0] * 20, [0.0] * 12 + [1.0] * 8 + [0.0] * 20, "beyond the interval"),   # a loss
    # pairing: 6 of 40 problems gain and none loses (+15 points); each side's own interval is +-15 points wide
    ([0.0] * 20 + [1.0] * 20, [1.0] * 6 + [0.0] * 14 + [1.0] * 20, "beyond the interval"),
])
def test_paired_comparison_verdicts(before, after, verdict):
    from stages import eval_stats
    ids = [f"p{i}" for i in range(len(before))]
    got = eval_stats.paired_difference(dict(zip(ids, before)), dict(zip(ids, after)), 2000, 3)
    assert got["verdict"] == verdict and got["n"] == len(ids)
    assert got["delta"] == pytest.approx((sum(after) - sum(before)) / len(ids))
    assert got["ci95_low"] <= got["delta"] <= got["ci95_high"]
    if sum(before) == 20 and sum(after) == 26:
        a = eval_stats.bootstrap_interval(before, 2000, 1)
        b = eval_stats.bootstrap_interval(after, 2000, 1)
        assert a[1] > b[0]  # non-overlap of intervals would have called this noise


def test_paired_comparison_uses_shared_problems_only():
    from stages import eval_stats
    got = eval_stats.paired_difference({"a": 0.0, "b": 1.0, "c": 0.0}, {"b": 1.0, "c": 1.0, "d": 0.0}, 100, 1)
    assert got["n"] == 2 and got["delta"] == 0.5
    assert eval_stats.paired_difference({"a": 1.0}, {"b": 1.0}, 100, 1) is None
