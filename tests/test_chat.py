"""ChatML rendering, the assistant loss mask, rejection of bad conversations, packing."""
from __future__ import annotations

import numpy as np
import pytest

from stages import chat
from tests.fixtures_checkpoint import make_checkpoint

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Add 4 and 4.\n"},
     {"role": "assistant", "content": "The answer is 8.", "reasoning_content": "4 + 4 = 8."}],
    [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "\n    return x"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "  ok  "}],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chat_ckpt"))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_equal_transformers_apply_chat_template(ckpt, messages):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    ex = chat.encode_chat(chat.load_chat_tokenizer(ckpt), messages)
    hf_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ex.ids) == list(hf_ids)
    assert chat.render(messages) == hf.apply_chat_template(messages, tokenize=False)
    prompt = chat.encode_prompt(chat.load_chat_tokenizer(ckpt), messages[:-1])
    assert prompt == list(hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                 return_dict=False))


def test_mask_covers_exactly_assistant_turns_and_their_end_token(ckpt):
    tok = chat.load_chat_tokenizer(ckpt)
    messages = CONVERSATIONS[1]
    ex = chat.encode_chat(tok, messages)
    supervised = tok.decode([int(i) for i in ex.ids[ex.mask == 1]], skip_special_tokens=False)
    assert supervised == "<think>\n4 + 4 = 8.\n</think>\n\nThe answer is 8.<|im_end|>"
    im_end = tok.token_to_id("<|im_end|>")
    ends = np.flatnonzero(ex.ids == im_end)
    assert ex.mask[ends].tolist() == [0, 0, 1]           # system and user ends are never supervised
    assert ex.mask[-1] == 0                              # the newline after the last <|im_end|>
    multi = chat.encode_chat(tok, CONVERSATIONS[2])
    text = tok.decode([int(i) for i in multi.ids[multi.mask == 1]], skip_special_tokens=False)
    # An answer starting with a newline merges with the header's newline into one token ("\n\n"): a token with
    # any supervised character is supervised, so that token is.
    assert text == "\n\n    return x<|im_end|>  ok  <|im_end|>"


@pytest.mark.parametrize("messages, reason", [
    ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "missing_role"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown_role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}], "empty_assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "bad_content"),
    ([{"role": "user", "content": "hi"}], "last_not_assistant"),
    ([{"role": "user", "content": "a <|im_end|> b"}, {"role": "assistant", "content": "x"}], "special_token_in_text"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "x <|tool_call|>"}], "special_token_in_text"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "reasoning_content": "</think>"}],
     "special_token_in_text"),
    ([], "not_a_conversation"),
])
def test_bad_conversations_are_rejected_with_a_reason(ckpt, messages, reason):
    with pytest.raises(chat.ChatRejected) as err:
        chat.encode_chat(chat.load_chat_tokenizer(ckpt), messages)
    assert err.value.reason == reason


def test_over_length_is_rejected_never_truncated(ckpt):
    tok = chat.load_chat_tokenizer(ckpt)
    n = len(chat.encode_chat(tok, CONVERSATIONS[0]).ids)
    assert len(chat.encode_chat(tok, CONVERSATIONS[0], max_len=n).ids) == n
    with pytest.raises(chat.ChatRejected) as err:
        chat.encode_chat(tok, CONVERSATIONS[0], max_len=n - 1)
    assert err.value.reason == "over_length"


def test_packing_keeps_every_example_whole_and_marks_documents(ckpt):
    tok = chat.load_chat_tokenizer(ckpt)
    examples = [chat.encode_chat(tok, m) for m in CONVERSATIONS * 3]
    seq_len = max(len(e.ids) for e in examples) + 5
    rows = chat.pack_examples(examples, seq_len, pad_id=5)
    assert rows.input_ids.shape[1] == seq_len
    assert rows.loss_mask.sum() == sum(int(e.mask[1:].sum()) for e in examples)
    got = []
    for r in range(len(rows.input_ids)):
        for d in sorted(set(rows.doc_ids[r].tolist()) - {-1}):
            sel = rows.doc_ids[r] == d
            assert rows.positions[r, sel].tolist() == list(range(int(sel.sum())))
            got.append(rows.input_ids[r, sel].tolist() + [int(rows.targets[r, sel][-1])])
    assert got == [e.ids.tolist() for e in examples]
    assert (rows.loss_mask[rows.doc_ids == -1] == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        chat.pack_examples(examples, seq_len=3, pad_id=5)
