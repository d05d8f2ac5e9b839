"""tokenize: the BPE loads in transformers with its special tokens and ChatML template; every bucket's stream decodes
back to its documents + eos; training and packing are deterministic; bad input fails naming the file and line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures_tokens import TOKENIZE_PARAMS, make_heldout, make_pool
from stages import common, tokenize

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    pool, heldout = make_pool(tmp / "pool"), make_heldout(tmp / "heldout")
    manifest = tokenize.run_tokenize(pool, heldout, tmp / "out", dict(TOKENIZE_PARAMS))
    return tmp, manifest


def pool_docs(pool: Path) -> list[dict]:
    return [row for shard in sorted(pool.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_tokenizer_loads_in_transformers_with_special_tokens_and_chat_template(tokenized, loader):
    import transformers
    tmp, manifest = tokenized
    tok = getattr(transformers, loader).from_pretrained(tmp / "out" / "tokenizer")
    assert len(tok) == TOKENIZE_PARAMS["vocab_size"] == manifest["vocab_size"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == manifest["special_tokens"]["<|pad|>"]
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(t) == manifest["special_tokens"][t]
        assert tok(f"a {t} b")["input_ids"].count(manifest["special_tokens"][t]) == 1  # one id, never split
    chat = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "add the numbers"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd the numbers\n</think>\n\n4<|im_end|>\n")
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")


def test_every_bucket_stream_decodes_to_its_documents_each_followed_by_eos(tokenized):
    tmp, manifest = tokenized
    tok = tokenize.load_tokenizer(tmp / "out" / "tokenizer")
    docs = pool_docs(tmp / "pool")
    assert set(manifest["buckets"]) == {d["bucket"] for d in docs}
    for bucket, entry in manifest["buckets"].items():
        tokens, offsets = tokenize.read_stream(tmp / "out" / entry["bin"], manifest["dtype"])
        assert tokens.dtype == np.uint16 and len(offsets) == entry["docs"] + 1 and offsets[-1] == entry["tokens"]
        decoded = [tok.decode(tokens[a:b].tolist(), skip_special_tokens=False)
                   for a, b in zip(offsets[:-1], offsets[1:])]
        want = [d["text"] + "<|endoftext|>" for d in docs if d["bucket"] == bucket]
        assert sorted(decoded) == sorted(want)
        assert decoded != want  # shuffled, not in pool order
        # eos only at document ends; "<|im_start|>" written inside a document stays plain text
        assert (np.flatnonzero(tokens == 0) + 1).tolist() == offsets[1:].tolist()
        assert not np.isin(tokens, [1, 2, 3, 4, 5]).any()
    assert sum(manifest["counts"]["tokens_per_bucket"].values()) == sum(manifest["counts"]["tokens_per_domain"].values()) \
        == sum(manifest["counts"]["tokens_per_source"].values()) == manifest["counts"]["tokens"]


def test_heldout_streams_keep_file_order(tokenized):
    tmp, manifest = tokenized
    tok = tokenize.load_tokenizer(tmp / "out" / "tokenizer")
    for name in ("hq", "math"):
        tokens, offsets = tokenize.read_stream(tmp / "out" / manifest["heldout"][name]["bin"], manifest["dtype"])
        texts = [json.loads(line)["text"] for line in (tmp / "heldout" / f"{name}.jsonl").read_text().splitlines()]
        assert [tok.decode(tokens[a:b].tolist(), skip_special_tokens=False)
                for a, b in zip(offsets[:-1], offsets[1:])] == [t + "<|endoftext|>" for t in texts]


def test_rerun_is_byte_identical_and_the_seed_changes_the_shuffle(tokenized, tmp_path):
    tmp, manifest = tokenized
    again = tokenize.run_tokenize(tmp / "pool", tmp / "heldout", tmp_path / "again", dict(TOKENIZE_PARAMS))
    assert again["outputs"] == manifest["outputs"]  # sha256 of the tokenizer files and every stream
    reseeded = tokenize.run_tokenize(tmp / "pool", tmp / "heldout", tmp_path / "reseeded",
                                     {**TOKENIZE_PARAMS, "seed": 8})
    changed = [k for k in manifest["outputs"] if reseeded["outputs"][k]["sha256"] != manifest["outputs"][k]["sha256"]]
    assert any(k.startswith("buckets/") and k.endswith(".bin") for k in changed)


def test_stream_dtype_fits_every_token_id():
    assert tokenize.stream_dtype(8192) == np.uint16 and tokenize.stream_dtype(65536) == np.uint16
    assert tokenize.stream_dtype(65537) == np.uint32 and tokenize.stream_dtype(166144) == np.uint32


def test_bad_heldout_line_names_file_and_line(tokenized, tmp_path):
    tmp, _ = tokenized
    bad = tmp_path / "heldout"
    bad.mkdir()
    (bad / "hq.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(common.StageError, match=r"hq\.jsonl:2: not valid JSON"):
        tokenize.run_tokenize(tmp / "pool", bad, tmp_path / "out", dict(TOKENIZE_PARAMS))
    (bad / "hq.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(common.StageError, match=r"hq\.jsonl:2: record has no string field 'text'"):
        tokenize.run_tokenize(tmp / "pool", bad, tmp_path / "out", dict(TOKENIZE_PARAMS))


def test_a_sample_too_small_for_the_vocab_fails_clearly(tokenized, tmp_path):
    tmp, _ = tokenized
    with pytest.raises(common.StageError, match="raise tokenize.sample_chars"):
        tokenize.run_tokenize(tmp / "pool", tmp / "heldout", tmp_path / "out",
                              {**TOKENIZE_PARAMS, "vocab_size": 5000})


def test_cli_writes_the_same_artifacts(tokenized, tmp_path):
    tmp, manifest = tokenized
    payload = json.dumps({"tokenize": TOKENIZE_PARAMS})
    proc = subprocess.run([sys.executable, "-m", "stages.tokenize", "--params-json", payload, "--pool-dir",
                           str(tmp / "pool"), "--heldout", str(tmp / "heldout"), "--output-dir", str(tmp_path / "cli")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["outputs"] == manifest["outputs"]


def test_a_pool_shard_without_the_bucket_column_is_refused(tokenized, tmp_path):
    tmp, _ = tokenized
    table = pq.read_table(tmp / "pool" / "shard0.parquet").drop_columns(["bucket"])
    common.write_table(tmp_path / "pool" / "shard0.parquet", table)
    with pytest.raises(common.StageError, match=r"shard0\.parquet: pool shard lacks columns \['bucket'\]"):
        tokenize.run_tokenize(tmp_path / "pool", tmp / "heldout", tmp_path / "out", dict(TOKENIZE_PARAMS))
