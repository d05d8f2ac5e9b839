"""ChatML conversations for post-training: validate, render, encode with the assistant loss mask, pack.

A conversation is a list of messages {"role", "content"[, "reasoning_content"]} with role in ROLES. It renders
through the tokenizer's own `chat_template` (stages.tokenize.CHAT_TEMPLATE, saved in tokenizer_config.json), so
`transformers`' `apply_chat_template` gives the same text and ids as `encode_chat`:

  <|im_start|>{role}\\n[<think>\\n{reasoning}\\n</think>\\n\\n]{content}<|im_end|>\\n   per message

Loss mask (nanochat's SFT rule): supervise every assistant turn from its first token after
"<|im_start|>assistant\\n" through its <|im_end|> (the reasoning, the answer and the end token the model must learn to
emit); never the role header, system/user/tool turns or the newline after <|im_end|>. The mask is computed on
characters of the rendered text and mapped to tokens by offsets: a token is supervised when any of its characters is.

Bad input is rejected with a reason (ChatRejected.reason), never repaired or truncated: a missing or unknown role,
non-string content, an empty assistant turn, a conversation that does not end with an assistant turn (for SFT), a
special-token string inside text (it would render as a control token), and an encoding longer than max_len.

Packing (`pack_examples`): examples in order fill rows of seq_len positions without cropping: an example of n ids
gives n - 1 (input, target) positions; when the next one does not fit the row is closed with padding (loss mask 0,
doc id -1). Each position carries its document id and its position inside the document, so attention never crosses
documents and RoPE restarts per document: a packed row gives the same loss as its documents one by one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from stages.tokenize import CHAT_TEMPLATE, CHAT_TOKENS, EOS, PAD

ROLES = ("system", "user", "assistant", "tool")
SPECIAL_STRINGS = (EOS, PAD, *CHAT_TOKENS)
# Any <|...|> marker is reserved for control tokens, known or not (a future tokenizer may add more).
RESERVED = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?think>")
REJECT_REASONS = ("not_a_conversation", "missing_role", "unknown_role", "bad_content", "empty_assistant",
                  "last_not_assistant", "special_token_in_text", "over_length")


class ChatRejected(ValueError):
    """A conversation that cannot be trained on, with one of REJECT_REASONS and a detail naming the message."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ChatExample:
    """Token ids of a rendered conversation and the 0/1 loss mask over them (1 = supervised)."""
    ids: np.ndarray
    mask: np.ndarray


def validate_messages(messages, require_assistant_last: bool = True) -> None:
    """Raise ChatRejected for a conversation `encode_chat` must not train on (reasons in the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ChatRejected("not_a_conversation", f"expected a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatRejected("missing_role", f"message {i} has no role")
        if m["role"] not in ROLES:
            raise ChatRejected("unknown_role", f"message {i} has role {m['role']!r} (known: {', '.join(ROLES)})")
        for field in ("content", "reasoning_content"):
            value = m.get(field, "" if field == "reasoning_content" else None)
            if not isinstance(value, str):
                raise ChatRejected("bad_content", f"message {i} {field} is {type(value).__name__}, not a string")
            hit = RESERVED.search(value)
            if hit:
                raise ChatRejected("special_token_in_text", f"message {i} {field} contains {hit.group()!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatRejected("empty_assistant", f"message {i} is an empty assistant turn")
    if require_assistant_last and messages[-1]["role"] != "assistant":
        raise ChatRejected("last_not_assistant", f"the last message is {messages[-1]['role']!r}, not an assistant turn")


@lru_cache(maxsize=1)
def _template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation's text through the tokenizer's chat_template (what apply_chat_template renders)."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def render_with_spans(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(text, supervised character spans [start, end)) with text == render(messages): the template written out
    piecewise so the assistant spans are known; a mismatch with the template is a bug and raises."""
    parts, spans, pos = [], [], 0
    for m in messages:
        header = f"<|im_start|>{m['role']}\n"
        body = ""
        if m["role"] == "assistant" and m.get("reasoning_content"):
            body = f"<think>\n{m['reasoning_content']}\n</think>\n\n"
        body += m["content"] + "<|im_end|>"
        parts += [header, body, "\n"]
        if m["role"] == "assistant":
            spans.append((pos + len(header), pos + len(header) + len(body)))
        pos += len(header) + len(body) + 1
    text = "".join(parts)
    if text != render(messages):
        raise AssertionError("render_with_spans disagrees with CHAT_TEMPLATE: keep them in step")
    return text, spans


def load_chat_tokenizer(tokenizer_dir: str | Path):
    """The trained tokenizer with control-token strings encoded as their special ids (as transformers does)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tok.encode_special_tokens = False
    return tok


def encode_chat(tok, messages: list[dict], max_len: int | None = None,
                require_assistant_last: bool = True) -> ChatExample:
    """Validate, render and tokenize a conversation; the mask marks tokens overlapping an assistant span."""
    validate_messages(messages, require_assistant_last)
    text, spans = render_with_spans(messages)
    enc = tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    if max_len is not None and len(ids) > max_len:
        raise ChatRejected("over_length", f"{len(ids)} tokens > max_len {max_len} (never truncated)")
    starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
    ends = np.array([e for _, e in enc.offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.int64)
    for lo, hi in spans:
        mask |= (starts < hi) & (ends > lo)
    return ChatExample(ids=ids, mask=mask)


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    """Ids of a prompt conversation followed by the assistant header, ready for generation."""
    validate_messages(messages, require_assistant_last=False)
    return tok.encode(render(messages, add_generation_prompt=True), add_special_tokens=False).ids


@dataclass(frozen=True)
class PackedRows:
    """Rows of seq_len positions: input ids, next-token targets, loss mask, document id (-1 = padding) and the
    position of each token inside its document, each [n_rows, seq_len] int64."""
    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray


def pack_examples(examples: list[ChatExample], seq_len: int, pad_id: int) -> PackedRows:
    """Greedy in-order packing without cropping (module docstring); an example longer than seq_len + 1 ids is an
    error (encode_chat with max_len = seq_len + 1 rejects it first)."""
    rows: list[list[tuple]] = []
    row: list[tuple] = []
    used = 0
    for i, ex in enumerate(examples):
        n = len(ex.ids) - 1
        if n < 1 or n > seq_len:
            raise ValueError(f"example {i}: {len(ex.ids)} ids do not fit rows of {seq_len} positions")
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append((i, ex))
        used += n
    if row:
        rows.append(row)
    shape = (len(rows), seq_len)
    out = {k: np.full(shape, fill, dtype=np.int64) for k, fill in
           (("input_ids", pad_id), ("targets", pad_id), ("loss_mask", 0), ("doc_ids", -1), ("positions", 0))}
    for r, members in enumerate(rows):
        at = 0
        for doc, (_, ex) in enumerate(members):
            n = len(ex.ids) - 1
            sl = slice(at, at + n)
            out["input_ids"][r, sl] = ex.ids[:-1]
            out["targets"][r, sl] = ex.ids[1:]
            out["loss_mask"][r, sl] = ex.mask[1:]
            out["doc_ids"][r, sl] = doc
            out["positions"][r, sl] = np.arange(n)
            at += n
    return PackedRows(**out)
