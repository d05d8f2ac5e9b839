"""stages/sft.py: packing, masking, the mixture, rejections, exact resume, the teacher's tokenizer check, the output
checkpoint's chat template. Micro shapes: every test runs in seconds on one CPU thread."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from model import ModelConfig, NanbeigeForCausalLM, load_pretrained, save_pretrained
from stages import common, sft, tasks, tokenize
from stages.chat import encode_chat, load_chat_tokenizer, pack_examples
from stages.training import TokenCrossEntropy

MICRO = {"vocab_size": None, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "initializer_range": 0.02,
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
TASKS = {"seed": 7, "scale": "tiny",
         "math": {"levels": [1, 4], "train_per_level": 12, "heldout_per_level": 2, "max_heldout_fraction": 0.4},
         "code": {"levels": [1], "train_per_level": 6, "heldout_per_level": 2, "max_heldout_fraction": 0.4,
                  "public_tests": 2, "hidden_tests": 3}}


def slice_(**over) -> dict:
    p = {"seed": 0, "seq_len": 256, "batch_size": 2, "grad_accum": 2, "epochs": 1, "examples_per_epoch": None,
         "max_steps": 4, "mixture": {"math": 0.5, "science": 0.3, "code": 0.2}, "lr_peak": 3e-3, "lr_final": 3e-4,
         "warmup_steps": 1, "lr_shape": "cosine", "optimizer": "adamw", "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
         "weight_decay": 0.0, "grad_clip": 1.0, "checkpoint_every": 100, "log_every": 1, "progress_every_steps": 1,
         "progress_every_s": 30, "cpu_threads": 1, "model": MICRO, "checkpoint": None}
    return {**p, **over}


def make_tokens_dir(root, extra_text: str = ""):
    """What the tokenize stage leaves that SFT reads: tokenizer/ and a manifest with vocab size and special ids."""
    rows = tasks.build_tasks(TASKS)
    texts = [r.get("solution", "") + r.get("statement", "") + r.get("canonical_solution", "") + r["prompt"]
             for rs in rows.values() for r in rs] * 3 + [tasks.MATH_CHAT_INSTRUCTION, tasks.CODE_CHAT_INSTRUCTION,
                                                         extra_text]
    tok = tokenize.train_tokenizer(texts, vocab_size=400, min_frequency=2)
    tokenize.save_tokenizer(tok, root / "tokenizer")
    common.write_json(root / "manifest.json", {"stage": "tokenize", "vocab_size": tok.get_vocab_size(),
                                               "special_tokens": tokenize.special_token_ids(tok)})
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft")
    tasks.write_tasks(root / "tasks", TASKS)
    return {"root": root, "tokens": make_tokens_dir(root / "tokenize"), "tasks": root / "tasks"}


def micro_model(tokens_dir, seed: int = 0) -> NanbeigeForCausalLM:
    from stages.pretrain import model_config
    torch.manual_seed(seed)
    return NanbeigeForCausalLM(model_config(MICRO, common.read_manifest(tokens_dir / "manifest.json")))


def task_examples(env, n: int = 6):
    tok = load_chat_tokenizer(env["tokens"] / "tokenizer")
    rows = sft.read_rows(env["tasks"] / "math_train.parquet")[:n // 2] + sft.read_rows(
        env["tasks"] / "code_train.parquet")[:n - n // 2]
    return tok, [encode_chat(tok, r.messages) for r in rows]


def micro_of(packed) -> dict:
    return {k: torch.from_numpy(v) for k, v in (("input_ids", packed.input_ids), ("targets", packed.targets),
                                                 ("mask", packed.loss_mask), ("doc_ids", packed.doc_ids),
                                                 ("positions", packed.positions))}


# ----------------------------------------------------------------------------- data

def test_task_records_become_think_conversations(env):
    math_row = sft.read_rows(env["tasks"] / "math_train.parquet")[0]
    user, assistant = math_row.messages
    assert user["role"] == "user" and tasks.MATH_CHAT_INSTRUCTION in user["content"]
    assert assistant["content"].startswith("#### ") and "####" not in assistant["reasoning_content"]
    code_row = sft.read_rows(env["tasks"] / "code_train.parquet")[0]
    reply = code_row.messages[1]["content"]
    assert reply.startswith("```python\ndef ") and reply.endswith("\n```")
    # The reply is the reference solution: it passes the task's own tests.
    record = pa.parquet.read_table(env["tasks"] / "code_train.parquet").to_pylist()[0]
    scope: dict = {}
    exec(reply.removeprefix("```python\n").removesuffix("```") + record["test"], scope)
    scope["check"](scope[record["entry_point"]])
    assert sft.data_files([env["tasks"]]) == [env["tasks"] / "code_train.parquet", env["tasks"] / "math_train.parquet"]


def test_packed_loss_equals_the_documents_one_by_one(env):
    """TokenCrossEntropy over a packed batch == the token mean over the documents run alone (fp32, 1e-5)."""
    tok, examples = task_examples(env)
    model = micro_model(env["tokens"])
    packed = pack_examples(examples, 256, tok.token_to_id(tokenize.PAD))
    assert len(packed.input_ids) < len(examples)  # several documents share a row
    micro = micro_of(packed)
    loss = TokenCrossEntropy()
    with torch.no_grad():
        got = loss(model, micro, loss.units(micro))["loss"]
        total, n = 0.0, 0
        for ex in examples:
            ids = torch.from_numpy(ex.ids)[None]
            logp = model.token_logprobs(ids[:, :-1], ids[:, 1:])
            total += float((logp * torch.from_numpy(ex.mask[1:])[None]).sum())
            n += int(ex.mask[1:].sum())
    assert abs(float(got) - (-total / n)) < 1e-5


def test_prompt_targets_do_not_change_the_gradient(env):
    """mask 0 on prompts: rewriting every unsupervised target leaves the gradient bit-identical; rewriting one
    supervised target does not."""
    tok, examples = task_examples(env, 4)
    packed = pack_examples(examples, 256, tok.token_to_id(tokenize.PAD))
    micro = micro_of(packed)
    assert (micro["mask"] == 0).any() and (micro["mask"] == 1).any()

    def grads(m):
        model = micro_model(env["tokens"])
        loss = TokenCrossEntropy()
        loss(model, m, loss.units(m))["loss"].backward()
        return [p.grad.clone() for p in model.parameters()]

    base = grads(micro)
    prompt_changed = {**micro, "targets": torch.where(micro["mask"] == 0, (micro["targets"] + 5) % 400,
                                                      micro["targets"])}
    assert all(torch.equal(a, b) for a, b in zip(base, grads(prompt_changed)))
    first = int(micro["mask"].flatten().nonzero()[0])
    answer_changed = {**micro, "targets": micro["targets"].flatten().clone()}
    answer_changed["targets"][first] = (answer_changed["targets"][first] + 5) % 400
    answer_changed["targets"] = answer_changed["targets"].view_as(micro["targets"])
    assert not all(torch.equal(a, b) for a, b in zip(base, grads(answer_changed)))


def test_mixture_drops_absent_domains_and_renormalizes():
    weights, dropped = sft.effective_mixture({"math": 0.5, "science": 0.3, "code": 0.2}, {"math", "code"})
    assert dropped == ["science"]
    assert weights == pytest.approx({"math": 0.5 / 0.7, "code": 0.2 / 0.7})
    full, dropped = sft.effective_mixture({"math": 0.4, "general": 0.3, "agent": 0.2, "code": 0.1}, {"math", "code"})
    assert full == pytest.approx({"math": 0.8, "code": 0.2}) and dropped == ["agent", "general"]
    # N defaults to the most examples that repeat no domain: min(100 / 0.8, 10 / 0.2) = 50.
    assert sft.domain_counts(full, {"math": 100, "code": 10}, None) == {"code": 10, "math": 40}
    assert sft.domain_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"a": 9, "b": 9, "c": 9}, 10) == \
        {"a": 4, "b": 3, "c": 3}
    with pytest.raises(common.StageError, match=r"\['tools'\] have data but no mixture weight"):
        sft.effective_mixture({"math": 1.0}, {"math", "tools"})
    with pytest.raises(common.StageError, match="no data for any mixture domain"):
        sft.effective_mixture({"science": 1.0}, set())
    with pytest.raises(common.StageError, match="positive weights"):
        sft.effective_mixture({"math": 0.0}, {"math"})


def test_epoch_cycles_a_small_domain_and_is_seeded(env):
    _, examples = task_examples(env, 6)
    pools = {"math": examples[:3], "code": examples[3:]}
    one = sft.epoch_examples(pools, {"math": 2, "code": 7}, seed=1, epoch=0)
    assert len(one) == 9 and sum(any(e is c for c in pools["code"]) for e in one) == 7
    assert [id(e) for e in one] == [id(e) for e in sft.epoch_examples(pools, {"math": 2, "code": 7}, 1, 0)]
    assert [id(e) for e in one] != [id(e) for e in sft.epoch_examples(pools, {"math": 2, "code": 7}, 1, 1)]


def test_bad_rows_are_rejected_with_reasons_and_counted(env, tmp_path):
    good = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "reasoning_content": "2 + 2 = 4", "content": "#### 4"}]
    rows = [("ok", "math", good), ("prompt_only", "math", good[:1]),
            ("control", "code", [good[0], {"role": "assistant", "content": "a <|im_end|> b"}]),
            ("long", "math", [good[0], {"role": "assistant", "content": "4 " * 900}]),
            ("broken", "code", "{not json")]
    table = pa.table({"id": [r[0] for r in rows], "domain": [r[1] for r in rows],
                      "messages": [r[2] if isinstance(r[2], str) else json.dumps(r[2]) for r in rows],
                      "source": ["unit"] * len(rows)})
    common.write_table(tmp_path / "conv.parquet", table)
    d = sft.prepare_data([tmp_path / "conv.parquet", env["tasks"]], env["tokens"], slice_())
    report = d["report"]
    n_tasks = sum(common.count_rows(f) for f in env["tasks"].glob("*_train.parquet"))
    assert report["rows_read"] == n_tasks + 5 and report["rows_kept"] == n_tasks + 1
    assert report["rejected_by_reason"] == {"last_not_assistant": 1, "not_a_conversation": 1, "over_length": 1,
                                            "special_token_in_text": 1}
    assert {r["id"] for r in d["rejected"]} == {"prompt_only", "control", "long", "broken"}
    assert report["domains_dropped"] == ["science"] and set(report["mixture_effective"]) == {"math", "code"}


# ----------------------------------------------------------------------------- the run

def test_resume_is_exact_and_the_output_loads_with_its_chat_template(env, tmp_path):
    """4 steps == 2 steps + a stop + resume to 4 (torch.equal); final/ loads in our model and in transformers,
    whose apply_chat_template gives encode_chat's ids."""
    p = slice_()
    whole = sft.run_sft("teacher", [env["tasks"]], env["tokens"], tmp_path / "a", tmp_path / "ra", tmp_path / "la", p)
    assert sft.run_sft("teacher", [env["tasks"]], env["tokens"], tmp_path / "b", tmp_path / "rb", tmp_path / "lb", p,
                       max_steps=2) is None
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = sft.run_sft("teacher", [env["tasks"]], env["tokens"], tmp_path / "b", tmp_path / "rb", tmp_path / "lb",
                          p)
    a, b = load_pretrained(tmp_path / "a" / "final"), load_pretrained(tmp_path / "b" / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert whole["counts"]["steps"] == resumed["counts"]["steps"] == 4
    assert whole["loss_end"] == resumed["loss_end"] and whole["loss_end"] < whole["loss_start"]
    assert whole["counts"]["rows_rejected"] == 0 and whole["counts"]["domains_dropped"] == ["science"]

    from transformers import AutoTokenizer
    final = tmp_path / "a" / "final"
    config = json.loads((final / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tokenize.CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(str(final))
    messages = sft.read_rows(env["tasks"] / "math_train.parquet")[0].messages
    ids = hf.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == encode_chat(load_chat_tokenizer(final), messages).ids.tolist()


def test_init_from_a_checkpoint_and_teacher_adoption_check_the_tokenizer(env, tmp_path):
    good = tmp_path / "good"
    save_pretrained(micro_model(env["tokens"], seed=3), good)
    tokenize.copy_tokenizer_files(env["tokens"], good)
    p = slice_(model=None, max_steps=1, mixture={"math": 0.8, "code": 0.2})
    out = sft.run_sft("sft_cold", [env["tasks"]], env["tokens"], tmp_path / "o", tmp_path / "r", tmp_path / "l", p,
                      init_dir=good)
    assert out["init"] == str(good) and out["counts"]["steps"] == 1

    adopted = sft.run_sft("teacher", [], env["tokens"], tmp_path / "t", tmp_path / "rt", tmp_path / "lt",
                          slice_(checkpoint=str(good)))
    assert adopted["adopted_from"] == str(good)
    assert common.count_rows(tmp_path / "t" / "rejected.parquet") == 0 and (tmp_path / "lt").is_dir()
    assert torch.equal(load_pretrained(tmp_path / "t" / "final").lm_head.weight,
                       load_pretrained(good).lm_head.weight)

    other = tmp_path / "other"
    shutil.copytree(good, other)
    make_tokens_dir(tmp_path / "other_tok", extra_text="a different corpus " * 50)
    shutil.copyfile(tmp_path / "other_tok" / "tokenizer" / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(common.StageError, match="needs the same tokenizer"):
        sft.run_sft("teacher", [], env["tokens"], tmp_path / "t2", tmp_path / "rt2", tmp_path / "lt2",
                    slice_(checkpoint=str(other)))
    with pytest.raises(common.StageError, match="needs the same tokenizer"):
        sft.run_sft("sft_cold", [env["tasks"]], env["tokens"], tmp_path / "o2", tmp_path / "r2", tmp_path / "l2", p,
                    init_dir=other)
    (other / "tokenizer.json").unlink()
    with pytest.raises(common.StageError, match="tokenizer.json: checkpoint file is missing"):
        sft.validate_checkpoint(other, env["tokens"])
    with pytest.raises(common.StageError, match="exactly one of"):
        sft.run_sft("sft_cold", [env["tasks"]], env["tokens"], tmp_path / "o3", tmp_path / "r3", tmp_path / "l3",
                    slice_(), init_dir=good)
