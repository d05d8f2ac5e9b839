"""Interop with lm-evaluation-harness: its `hf` model loads one of our checkpoints through transformers and scores
our local task (data/eval/lm_eval/tiny_math_gen.yaml over data/eval/tiny_math/test.jsonl) without the network,
and the answers it scores are our own model's greedy continuations."""
import json
import socket

import pytest
import torch

from fixtures_checkpoint import make_checkpoint
from stages import common
from tools import lm_eval_local

TASK = "tiny_math_gen"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub libraries in offline mode, the repo root as cwd, and every outgoing connection refused and recorded
    (the returned list), so a test can assert that nothing tried."""
    for key, value in lm_eval_local.OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    import datasets
    import huggingface_hub
    # Another test may have imported these before the env was set: they read it once, at import.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"test_lm_eval: network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(common.REPO)
    return attempts


def greedy_answer(model, tok, prompt: str, gen_kwargs: dict) -> str:
    """Our decoder's greedy continuation as lm-eval's hf model reports it: at most max_gen_toks tokens, cut at the
    first stop string, special tokens dropped."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), gen_kwargs["max_gen_toks"], temperature=0.0,
                             eos_token_id=model.config.eos_token_id)
    text = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)
    for stop in gen_kwargs["until"]:
        text = text.split(stop)[0]
    for special in tok.all_special_tokens:
        text = text.replace(special, "")
    return text


def test_lm_eval_scores_our_checkpoint_on_the_local_task_offline(checkpoint, offline):
    # batch_size 1: no left padding, so lm-eval's transformers run and ours decode the very same sequences.
    results = lm_eval_local.run_lm_eval(checkpoint, [TASK], limit=2, device="cpu", dtype="float32", batch_size=1,
                                        log_samples=True)
    assert offline == []
    assert set(results["results"]) == {TASK}
    scores = results["results"][TASK]
    assert scores["sample_len"] == 2
    for filter_name in ("strict-match", "flexible-extract"):
        value = scores[f"exact_match,{filter_name}"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0

    from stages.evaluate import load_checkpoint
    model, tok = load_checkpoint(checkpoint, {"device": "cpu", "dtype": "float32"})
    expected_docs = [json.loads(line) for line in
                     (common.REPO / "data" / "eval" / "tiny_math" / "test.jsonl").read_text().splitlines()[:2]]
    samples = {s["doc_id"]: s for s in results["samples"][TASK]}
    assert [samples[i]["doc"] for i in sorted(samples)] == expected_docs
    for sample in samples.values():
        prompt, gen_kwargs = sample["arguments"][0]
        assert prompt == f"Question: {sample['doc']['question']}\nAnswer:"
        assert sample["resps"] == [[greedy_answer(model, tok, prompt, gen_kwargs)]]


def test_cli_writes_lm_evals_results_file(checkpoint, offline, tmp_path, capsys):
    assert lm_eval_local.main(["--checkpoint", str(checkpoint), "--limit", "1", "--batch-size", "1",
                               "--output-path", str(tmp_path / "out")]) == 0
    assert offline == []
    [path] = (tmp_path / "out").glob("*/results_*.json")
    saved = json.loads(path.read_text())
    assert saved["results"][TASK]["sample_len"] == 1
    assert saved["config"]["model_args"] == f"pretrained={checkpoint.resolve()},dtype=float32"
    assert TASK in capsys.readouterr().out
