r"""Reward model: a generative pairwise judge trained with the Bradley-Terry loss, and the RL preference reward.

The judge is our Llama (an HF-layout checkpoint, initialized from --init-dir, e.g. the distilled student) reading one
ChatML user turn (JUDGE_TEMPLATE: the question, response 1, response 2, "Which response is better? Answer 1 or 2.")
followed by the assistant header. Its next-token logits at that answer position give the score

    s(x, a, b) = logit("1") - logit("2"),    P(a better than b | x) = sigmoid(s(x, a, b))

one prefill per comparison, no generation (the paper's reward model "answers in a few tokens").

Loss (Bradley-Terry, both orders of every pair, so a preference for a position earns nothing): for P pairs
(x, y+, y-) of the optimizer step,

    L = 1/(2P) sum_pairs [ -log sigmoid(s(x, y+, y-)) - log sigmoid(-s(x, y-, y+)) ]

with 2P ("comparisons") counted over the whole step once, before any backward (BradleyTerryLoss.units), so the update
does not depend on the micro-batch split. A micro-batch is [B pairs, 2 orders, T] (order 0: chosen first), left-padded
(padding is its own document: model/llama.py packed_causal_mask), so both orders of a pair stay together.

RL reward of a sample y against a reference answer r (PairwiseJudge.reward), both orders averaged:

    R(y, r) = 1/2 [ sigmoid(s(x, y, r)) + sigmoid(-s(x, r, y)) ]   in (0, 1);  R(y, r) + R(r, y) = 1,  R(y, y) = 1/2

Pairs (PAIR_COLUMNS, one or more Parquets; all columns strings):
  id         unique pair id
  prompt_id  the prompt's id: the held-out split is by sha256 of it, so no prompt is on both sides
  prompt     JSON list of chat messages (stages/chat.py), the last one not an assistant turn
  chosen     JSON assistant message {"role": "assistant", "content", "reasoning_content"?} (or a JSON string: the
             completion text, `<think>` block included): the preferred response
  rejected   the same, the worse response (tiny: a verifier-failed answer to the prompt a verified one solves)
  source     where the pair comes from (metrics are also reported per source)
and the DPD pairs of stages/distill_targets.py (its pairs.parquet, or its output directory), adapted: prompt and both
responses are parsed back from the stored ChatML token ids (pos_ids / neg_ids), the parse checked by re-rendering
(mismatch: rejected, unrecoverable), source = distill_targets:<domain>.
The judge sees each response as its content (response_view "answer") or reasoning + content ("full").
A bad pair is rejected with its reason (REJECT_REASONS; the chat reasons of stages.chat), never repaired or truncated:
pairs read == kept + rejected (checked), counts by reason in the manifest, the rows in rejected.parquet.

Fewer than `min_pairs` kept pairs, or (min_pairs > 0) a side with none, is an error; with min_pairs 0 and a side
empty the init model is written as the judge, untrained (counts.trained false, no held-out figure; the end-to-end
test's tiny run, whose few-step teacher yields no pair).

Held-out: the pairs whose sha256("reward_model/heldout/<prompt_id>") (first 8 bytes as a fraction of 2^64) is below
heldout_fraction. Before and after training, overall and per source:
  accuracy       share of the 2P comparisons that prefer the chosen response (Wilson 95% over 2P: optimistic, the two
                 orders of a pair are not independent)
  pair_accuracy  #{R(y+, y-) > 1/2} / P, one verdict per pair (Wilson over P)
  consistency    share of pairs whose verdict survives swapping the responses (s(y+, y-), s(y-, y+) of opposite signs)

Data order: epoch e visits the train pairs in a permutation seeded by (seed, e); step t takes stream positions
t * pairs_per_step .. (t + 1) * pairs_per_step - 1 (a pure function of t). Steps = ceil(epochs * pairs /
pairs_per_step), at most max_steps.

Outputs (--output-dir): judge/ (model.safetensors + config.json in HF Llama layout, the tokenizer files, judge.json:
the prompt format PairwiseJudge.load reads), metrics.json (held-out before / after, counts), rejected.parquet,
manifest.json last; dvclive (--live-dir): train/loss, train/accuracy, train/consistency, train/margin per step, and
heldout/* at the last step. Resume states: --resume-dir/<hash of the slice, inputs, code, torch>/.

    python -m stages.reward_model --params-json '{"reward_model": {...}}' --pairs PARQUET|DIR [...] \
        --init-dir CKPT --output-dir DIR --resume-dir DIR --live-dir DIR [--stop-at N]
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from stages import common, tasks, training
from stages.chat import REJECT_REASONS as CHAT_REASONS
from stages.chat import ChatRejected, encode_prompt, load_chat_tokenizer, render, validate_messages
from stages.lr_schedule import piecewise_lr, warmup_decay
from stages.tokenize import PAD

STAGE = "reward_model"
CODE = (f"stages.{STAGE}",)
PAIR_COLUMNS = ("id", "prompt_id", "prompt", "chosen", "rejected", "source")
PAIR_SCHEMA = pa.schema([(name, pa.string()) for name in PAIR_COLUMNS])
# The columns of distill_targets' pairs.parquet the adapter reads (not imported: see stages/distill.py COLUMNS).
DPD_COLUMNS = ("pair_id", "prompt_id", "domain", "pos_ids", "neg_ids")
REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("source", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])
REJECT_REASONS = (*CHAT_REASONS, "missing_field", "bad_json", "bad_prompt", "bad_response", "identical_responses",
                  "duplicate_id", "unrecoverable")
VIEWS = ("answer", "full")
VERDICTS = ("1", "2")
JUDGE_INSTRUCTION = "Which response is better? Answer 1 or 2."
JUDGE_TEMPLATE = "[Question]\n{question}\n\n[Response 1]\n{first}\n\n[Response 2]\n{second}\n\n" + JUDGE_INSTRUCTION
JUDGE_FILE = "judge.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PARTS = ("loss", "accuracy", "consistency", "margin")


class PairRejected(ValueError):
    """A pair (or a judge input) that cannot be scored, with one of REJECT_REASONS and a detail."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- the judge's prompt

def assistant_from_text(text: str) -> dict:
    """The assistant message of a completion as the chat template renders it: `<think>\\n r \\n</think>\\n\\n a` is
    reasoning r + content a; anything else is all content."""
    m = re.fullmatch(r"<think>\n(.*?)\n</think>\n\n(.*)", text, re.DOTALL)
    if m:
        return {"role": "assistant", "reasoning_content": m.group(1), "content": m.group(2)}
    return {"role": "assistant", "content": text}


def response_message(response) -> dict:
    """A response as an assistant message: a message dict as is (checked), a string as completion text."""
    if isinstance(response, str):
        return assistant_from_text(response)
    if not isinstance(response, dict) or response.get("role") != "assistant":
        raise PairRejected("bad_response", f"expected an assistant message, got {str(response)[:80]!r}")
    if not isinstance(response.get("content"), str) or not isinstance(response.get("reasoning_content", ""), str):
        raise PairRejected("bad_response", "content / reasoning_content must be strings")
    return response


def response_text(response, view: str) -> str:
    """What the judge reads of a response: its content ("answer"), or reasoning then content ("full")."""
    m = response_message(response)
    if not m["content"].strip():
        raise PairRejected("bad_response", "empty content")
    reasoning = m.get("reasoning_content") or ""
    return f"{reasoning}\n\n{m['content']}" if view == "full" and reasoning else m["content"]


def question_text(prompt) -> str:
    """The prompt conversation as the judge's question: a lone user turn's content, else `role: content` turns."""
    try:
        validate_messages(prompt, require_assistant_last=False)
    except ChatRejected as exc:
        raise PairRejected(exc.reason, f"prompt: {exc.detail}") from None
    if prompt[-1]["role"] == "assistant":
        raise PairRejected("bad_prompt", "the prompt ends with an assistant turn")
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def judge_messages(prompt, first, second, view: str) -> list[dict]:
    """The judge's conversation: one user turn holding the question and the two responses in this order."""
    return [{"role": "user", "content": JUDGE_TEMPLATE.format(question=question_text(prompt),
                                                              first=response_text(first, view),
                                                              second=response_text(second, view))}]


def verdict_ids(tok) -> tuple[int, int]:
    """Token ids of "1" and "2"; each must be one token (the judge answers in one)."""
    ids = []
    for v in VERDICTS:
        enc = tok.encode(v, add_special_tokens=False).ids
        if len(enc) != 1:
            raise common.StageError(f"verdict {v!r} is {len(enc)} tokens in this tokenizer; the judge needs one")
        ids.append(enc[0])
    return ids[0], ids[1]


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows left-padded to one length: input_ids, doc_ids (0 real, -1 padding: its own document, read by no real
    token) and positions (0.. per row's real tokens), each [N, T]; the last column is every row's answer position."""
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    doc = torch.full((len(rows), t), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), t), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, t - n:] = torch.tensor(row, dtype=torch.long)
        doc[i, t - n:] = 0
        pos[i, t - n:] = torch.arange(n)
    return {"input_ids": ids, "doc_ids": doc, "positions": pos}


def verdict_scores(model, input_ids: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor,
                   verdicts: tuple[int, int]) -> torch.Tensor:
    """s = logit("1") - logit("2") at the last column of left-padded rows [N, T] -> [N] fp32 (the LM head runs on
    that column only)."""
    logits = model(input_ids, last_only=True, doc_ids=doc_ids, positions=positions).float()
    return logits[:, verdicts[0]] - logits[:, verdicts[1]]


@dataclass(frozen=True)
class JudgeFormat:
    """How the judge's input is built: what it reads of a response and the longest input (tokens) it takes."""
    response_view: str
    max_len: int

    def __post_init__(self):
        if self.response_view not in VIEWS:
            raise common.StageError(f"{STAGE}.response_view must be one of {VIEWS}, got {self.response_view!r}")


class PairwiseJudge:
    """The generative pairwise judge: score(prompt, a, b) = s(x, a, b) and the RL reward(prompt, sample, reference)
    = R(y, r) (module docstring). prompt: chat messages; responses: assistant message dicts or completion text.
    Bad input raises PairRejected (check() returns its reason instead); nothing is truncated."""

    def __init__(self, model, tok, fmt: JudgeFormat, device: torch.device | str = "cpu"):
        if fmt.max_len > model.config.max_position_embeddings:
            raise common.StageError(f"{STAGE}.max_len {fmt.max_len} > the judge's max_position_embeddings "
                                    f"{model.config.max_position_embeddings}")
        self.model, self.tok, self.fmt, self.device = model, tok, fmt, torch.device(device)
        self.verdicts = verdict_ids(tok)
        self.pad_id = tok.token_to_id(PAD)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "PairwiseJudge":
        """The judge a reward_model run wrote (its judge/ directory)."""
        from model import load_pretrained
        path = Path(path)
        device = torch.device(device) if device is not None else training.default_device()
        fmt = JudgeFormat(**json.loads((path / JUDGE_FILE).read_text(encoding="utf-8")))
        return cls(load_pretrained(path, device=device).eval(), load_chat_tokenizer(path), fmt, device)

    def encode(self, prompt, first, second) -> list[int]:
        """Ids of the judge's input with `first` as response 1, ending at the answer position."""
        try:
            ids = encode_prompt(self.tok, judge_messages(prompt, first, second, self.fmt.response_view))
        except ChatRejected as exc:
            raise PairRejected(exc.reason, exc.detail) from None
        if len(ids) > self.fmt.max_len:
            raise PairRejected("over_length", f"{len(ids)} judge tokens > max_len {self.fmt.max_len} "
                                              f"(never truncated)")
        return ids

    @torch.no_grad()
    def scores(self, rows: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """s of encoded inputs [N] (fp32, CPU), batch_size rows per forward; the model's mode is restored."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(self.device) for k, v in left_pad(rows[i:i + batch_size], self.pad_id).items()}
            with training.autocast(self.device):
                out.append(verdict_scores(self.model, **batch, verdicts=self.verdicts).cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompt, a, b) -> float:
        return float(self.scores([self.encode(prompt, a, b)])[0])

    def check(self, prompt, sample, reference) -> str | None:
        """None when reward() can score this input, else the reason it cannot (for RL to count)."""
        try:
            self.encode(prompt, sample, reference)
            self.encode(prompt, reference, sample)
        except PairRejected as exc:
            return exc.reason
        return None

    def rewards(self, prompts: list, samples: list, references: list, batch_size: int = 16) -> list[float]:
        """R(y_i, r_i) for each i (module docstring), both orders of every item in one batched pass."""
        rows = []
        for prompt, y, r in zip(prompts, samples, references, strict=True):
            rows += [self.encode(prompt, y, r), self.encode(prompt, r, y)]
        s = self.scores(rows, batch_size).double().view(-1, 2)
        return (0.5 * (torch.sigmoid(s[:, 0]) + torch.sigmoid(-s[:, 1]))).tolist()

    def reward(self, prompt, sample, reference) -> float:
        return self.rewards([prompt], [sample], [reference])[0]


def ladder_rewarder(judge: PairwiseJudge, batch_size: int = 16):
    """The judge as stages/pass_filter.py's Rewarder (task records, completion texts, p) -> rewards: R(y, r) with r
    the record's reference solution (stages.tasks.reference_messages); a completion the judge cannot read
    (PairwiseJudge.check: a control token or an unclosed <think>, over max_len) scores 0."""
    def rewards(records: list[dict], texts: list[str], p: dict) -> list[float]:
        prompts = [tasks.format_prompt(r, "chat") for r in records]
        refs = [tasks.reference_messages(r)[-1] for r in records]
        ok = [judge.check(x, y, r) is None for x, y, r in zip(prompts, texts, refs)]
        scored = iter(judge.rewards(*(list(v for v, k in zip(col, ok) if k) for col in (prompts, texts, refs)),
                                    batch_size=batch_size))
        return [next(scored) if k else 0.0 for k in ok]
    return rewards


# ----------------------------------------------------------------------------- reading pairs

@dataclass(frozen=True)
class Pair:
    """One preference pair as read: prompt messages, chosen and rejected assistant messages (parsed JSON)."""
    id: str
    prompt_id: str
    source: str
    prompt: object
    chosen: object
    rejected: object


@dataclass(frozen=True)
class EncodedPair:
    """A kept pair: the judge's ids with the chosen response first (order 0) and second (order 1)."""
    id: str
    prompt_id: str
    source: str
    chosen_first: list[int]
    chosen_second: list[int]


def messages_from_chatml(text: str) -> list[dict] | None:
    """The messages whose rendering (stages.chat.render) is `text`, with or without its final newline; None when
    `text` is not such a rendering."""
    turns, at = [], 0
    for m in re.finditer(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n?", text, re.DOTALL):
        if m.start() != at:
            return None
        role, body = m.group(1), m.group(2)
        turns.append(assistant_from_text(body) if role == "assistant" else {"role": role, "content": body})
        at = m.end()
    if at != len(text) or not turns or render(turns) not in (text, text + "\n"):
        return None
    return turns


def pairs_from_distill_targets(path: Path, tok) -> tuple[list[Pair], list[dict]]:
    """(pairs, rejected rows) from distill_targets' pairs.parquet: each side's ids decoded and parsed back into
    prompt + assistant message (module docstring); both sides must share the prompt."""
    pairs, rejected = [], []
    for r in pq.read_table(path, columns=list(DPD_COLUMNS)).to_pylist():
        source = f"distill_targets:{r['domain']}"
        sides = [messages_from_chatml(tok.decode(r[k], skip_special_tokens=False)) for k in ("pos_ids", "neg_ids")]
        problem = None
        if any(s is None or len(s) < 2 or s[-1]["role"] != "assistant" for s in sides):
            problem = "ids do not decode to a chat ending with an assistant turn"
        elif sides[0][:-1] != sides[1][:-1]:
            problem = "positive and negative have different prompts"
        if problem:
            rejected.append({"id": str(r["pair_id"]), "prompt_id": str(r["prompt_id"]), "source": source,
                             "reason": "unrecoverable", "detail": problem})
            continue
        pairs.append(Pair(str(r["pair_id"]), str(r["prompt_id"]), source, sides[0][:-1], sides[0][-1], sides[1][-1]))
    return pairs, rejected


def pairs_from_table(path: Path) -> tuple[list[Pair], list[dict]]:
    """(pairs, rejected rows) from a PAIR_COLUMNS Parquet: missing fields and unparsable JSON are rejected here."""
    pairs, rejected = [], []
    for r in pq.read_table(path, columns=list(PAIR_COLUMNS)).to_pylist():
        ident = {k: "" if r[k] is None else str(r[k]) for k in ("id", "prompt_id", "source")}
        missing = [k for k in PAIR_COLUMNS if not isinstance(r[k], str) or not r[k]]
        if missing:
            rejected.append({**ident, "reason": "missing_field", "detail": f"missing or empty {missing}"})
            continue
        try:
            parsed = {k: json.loads(r[k]) for k in ("prompt", "chosen", "rejected")}
        except json.JSONDecodeError as exc:
            rejected.append({**ident, "reason": "bad_json", "detail": f"{exc.msg} at {exc.pos}"})
            continue
        pairs.append(Pair(r["id"], r["prompt_id"], r["source"], parsed["prompt"], parsed["chosen"],
                          parsed["rejected"]))
    return pairs, rejected


def pair_files(paths: list[str | Path]) -> list[Path]:
    """The Parquets behind --pairs: a file as is; a distill_targets output directory its pairs.parquet; any other
    directory its *.parquet, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            manifest = common.read_manifest(path / "manifest.json")
            found = [path / "pairs.parquet"] if manifest and manifest.get("stage") == "distill_targets" \
                else sorted(path.glob("*.parquet"))
            if not found or not all(f.is_file() for f in found):
                raise common.StageError(f"{path}: no pair Parquet in it")
            files += found
        else:
            raise common.StageError(f"{path}: --pairs path does not exist")
    if not files:
        raise common.StageError("no --pairs given")
    return files


def read_pairs(files: list[Path], tok) -> tuple[list[Pair], list[dict]]:
    """Every pair of every file (PAIR_COLUMNS, or distill_targets' schema through its adapter) and the rows rejected
    while reading."""
    pairs, rejected = [], []
    for path in files:
        names = set(pq.read_schema(path).names)
        if set(PAIR_COLUMNS) <= names:
            got = pairs_from_table(path)
        elif set(DPD_COLUMNS) <= names:
            got = pairs_from_distill_targets(path, tok)
        else:
            raise common.StageError(f"{path}: neither a pair table ({', '.join(PAIR_COLUMNS)}) nor distill_targets "
                                    f"pairs ({', '.join(DPD_COLUMNS)}); columns: {sorted(names)}")
        pairs += got[0]
        rejected += got[1]
    return pairs, rejected


def encode_pairs(judge: PairwiseJudge, pairs: list[Pair]) -> tuple[list[EncodedPair], list[dict]]:
    """(kept, rejected): a pair is kept when both orders encode within max_len, its responses differ as the judge
    reads them and its id is new."""
    kept, rejected, seen = [], [], set()
    for q in pairs:
        try:
            if q.id in seen:
                raise PairRejected("duplicate_id", f"pair id {q.id!r} seen before")
            if response_text(q.chosen, judge.fmt.response_view) == response_text(q.rejected, judge.fmt.response_view):
                raise PairRejected("identical_responses", "chosen and rejected read the same: no preference")
            kept.append(EncodedPair(q.id, q.prompt_id, q.source, judge.encode(q.prompt, q.chosen, q.rejected),
                                    judge.encode(q.prompt, q.rejected, q.chosen)))
            seen.add(q.id)
        except PairRejected as exc:
            rejected.append({"id": q.id, "prompt_id": q.prompt_id, "source": q.source, "reason": exc.reason,
                             "detail": exc.detail})
    return kept, rejected


def is_heldout(prompt_id: str, fraction: float) -> bool:
    """The prompt's side of the split: sha256 of its id as a number in [0, 1) below `fraction`."""
    digest = hashlib.sha256(f"{STAGE}/heldout/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def split_pairs(pairs: list[EncodedPair], fraction: float) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out) by prompt id; a prompt's pairs are all on one side."""
    heldout = [q for q in pairs if is_heldout(q.prompt_id, fraction)]
    return [q for q in pairs if not is_heldout(q.prompt_id, fraction)], heldout


# ----------------------------------------------------------------------------- batches and the loss

def collate(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of B pairs: input_ids, doc_ids, positions [B, 2, T], order 0 the chosen response first."""
    flat = left_pad([ids for q in pairs for ids in (q.chosen_first, q.chosen_second)], pad_id)
    return {k: v.view(len(pairs), 2, -1) for k, v in flat.items()}


def epoch_stream(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start + count - 1 of the stream that visits range(n) once per epoch e, in the order of a
    permutation seeded by (seed, e)."""
    orders: dict[int, np.ndarray] = {}
    out = []
    for at in range(start, start + count):
        epoch = at // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(orders[epoch][at % n]))
    return out


class PairBatches:
    """The batch source: step t's pairs_per_step pairs of the epoch stream, micro_batch_pairs per micro-batch (a pure
    function of t: state {})."""

    def __init__(self, pairs: list[EncodedPair], seed: int, pairs_per_step: int, micro_batch_pairs: int, pad_id: int):
        self.pairs, self.seed, self.pad_id = pairs, seed, pad_id
        self.pairs_per_step, self.micro_batch_pairs = pairs_per_step, micro_batch_pairs

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.pairs[i] for i in epoch_stream(len(self.pairs), self.seed, step * self.pairs_per_step,
                                                      self.pairs_per_step)]
        return [collate(chosen[i:i + self.micro_batch_pairs], self.pad_id)
                for i in range(0, len(chosen), self.micro_batch_pairs)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BradleyTerryLoss(training.Loss):
    """L over both orders of each pair (module docstring). Units: comparisons (2 per pair: the loss, accuracy and
    margin) and pairs (consistency). Parts: accuracy (share of comparisons preferring the chosen response), margin
    (mean preference for it: s(y+, y-) and -s(y-, y+)) and consistency (share of pairs whose verdict survives the
    swap)."""

    def __init__(self, verdicts: tuple[int, int]):
        self.verdicts = verdicts

    def units(self, micro):
        b = int(micro["input_ids"].shape[0])
        return {"comparisons": 2 * b, "pairs": b}

    def __call__(self, model, micro, totals):
        b, _, t = micro["input_ids"].shape
        s = verdict_scores(model, *(micro[k].reshape(2 * b, t) for k in ("input_ids", "doc_ids", "positions")),
                           verdicts=self.verdicts).view(b, 2)
        prefers_chosen = torch.stack([s[:, 0], -s[:, 1]], dim=1)
        n = totals["comparisons"]
        loss = -F.logsigmoid(prefers_chosen).sum() / n
        with torch.no_grad():
            consistent = ((s[:, 0] > 0) & (s[:, 1] < 0)) | ((s[:, 0] < 0) & (s[:, 1] > 0))
            parts = {"accuracy": (prefers_chosen > 0).sum() / n, "margin": prefers_chosen.sum() / n,
                     "consistency": consistent.sum() / totals["pairs"]}
        return {"loss": loss, **parts}


# ----------------------------------------------------------------------------- held-out metrics

def _rate(k: int, n: int) -> dict:
    low, high = tasks.wilson_interval(int(k), int(n))
    return {"value": k / n, "ci95_low": low, "ci95_high": high}


def heldout_metrics(judge: PairwiseJudge, pairs: list[EncodedPair], batch_size: int) -> dict:
    """Accuracy over comparisons, pair accuracy and position consistency (module docstring), overall and per
    source: {"pairs", "accuracy": {value, ci95_low, ci95_high}, "pair_accuracy": ..., "consistency": ...,
    "chosen_reward_mean", "by_source": {source: {"pairs", "accuracy", "pair_accuracy", "consistency"}}}."""
    s = judge.scores([ids for q in pairs for ids in (q.chosen_first, q.chosen_second)], batch_size).view(-1, 2)
    s = s.double()
    correct = torch.stack([s[:, 0] > 0, s[:, 1] < 0], dim=1)
    reward = 0.5 * (torch.sigmoid(s[:, 0]) + torch.sigmoid(-s[:, 1]))
    consistent = ((s[:, 0] > 0) & (s[:, 1] < 0)) | ((s[:, 0] < 0) & (s[:, 1] > 0))

    def summary(idx: list[int]) -> dict:
        return {"pairs": len(idx), "accuracy": _rate(int(correct[idx].sum()), 2 * len(idx)),
                "pair_accuracy": _rate(int((reward[idx] > 0.5).sum()), len(idx)),
                "consistency": _rate(int(consistent[idx].sum()), len(idx))}

    out = summary(list(range(len(pairs))))
    out["chosen_reward_mean"] = float(reward.mean())
    sources = sorted({q.source for q in pairs})
    out["by_source"] = {src: summary([i for i, q in enumerate(pairs) if q.source == src]) for src in sources}
    return out


def live_metrics(prefix: str, m: dict) -> dict[str, float]:
    """The dvclive row entries of heldout_metrics: <prefix>/<name> and its interval bounds."""
    out = {}
    for name in ("accuracy", "pair_accuracy", "consistency"):
        out[f"{prefix}/{name}"] = m[name]["value"]
        out[f"{prefix}/{name}_ci95_low"], out[f"{prefix}/{name}_ci95_high"] = m[name]["ci95_low"], m[name]["ci95_high"]
    return out


# ----------------------------------------------------------------------------- the run

def total_steps(p: dict, n_pairs: int) -> int:
    """ceil(epochs * pairs / pairs_per_step), capped at max_steps when set."""
    steps = max(1, math.ceil(float(p["epochs"]) * n_pairs / int(p["pairs_per_step"])))
    return steps if p.get("max_steps") is None else min(steps, int(p["max_steps"]))


def check_params(p: dict) -> None:
    if not 0.0 < float(p["heldout_fraction"]) < 1.0:
        raise common.StageError(f"{STAGE}.heldout_fraction must be in (0, 1), got {p['heldout_fraction']}")
    if int(p["pairs_per_step"]) % int(p["micro_batch_pairs"]):
        raise common.StageError(f"{STAGE}: pairs_per_step {p['pairs_per_step']} is not a multiple of "
                                f"micro_batch_pairs {p['micro_batch_pairs']}")


def count_by(rows: list, key) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[key(r)] = out.get(key(r), 0) + 1
    return dict(sorted(out.items()))


def prepare_pairs(pair_paths: list[str | Path], judge: PairwiseJudge, p: dict) -> dict:
    """Read, validate and encode every pair, then split by prompt: train, held-out, rejected rows and counts."""
    files = pair_files(pair_paths)
    read, unreadable = read_pairs(files, judge.tok)
    kept, dropped = encode_pairs(judge, read)
    rejected, n_read = unreadable + dropped, len(read) + len(unreadable)
    common.check_conservation(STAGE, "pairs", n_read, kept=len(kept), rejected=len(rejected))
    train, heldout = split_pairs(kept, float(p["heldout_fraction"]))
    if len(kept) < int(p["min_pairs"]) or (int(p["min_pairs"]) and (not train or not heldout)):
        raise common.StageError(f"{STAGE}: {len(train)} train and {len(heldout)} held-out pairs of {len(kept)} kept "
                                f"({len(rejected)} rejected: {count_by(rejected, lambda r: r['reason'])}); both "
                                f"sides need pairs (min_pairs {p['min_pairs']}): more pairs or another "
                                f"heldout_fraction")
    counts = {"pairs_read": n_read, "pairs_kept": len(kept), "pairs_rejected": len(rejected),
              "rejected_by_reason": count_by(rejected, lambda r: r["reason"]),
              "kept_by_source": count_by(kept, lambda q: q.source),
              "train_pairs": len(train), "heldout_pairs": len(heldout),
              "train_prompts": len({q.prompt_id for q in train}),
              "heldout_prompts": len({q.prompt_id for q in heldout}),
              "judge_tokens_max": max((len(ids) for q in kept for ids in (q.chosen_first, q.chosen_second)),
                                      default=0)}
    return {"files": files, "train": train, "heldout": heldout, "rejected": rejected, "counts": counts}


def write_judge(dest: Path, model, fmt: JudgeFormat, init_dir: Path) -> list[Path]:
    """judge/: the HF checkpoint, the init checkpoint's tokenizer files and judge.json, written whole."""
    from model import save_pretrained
    with common.atomic_dir(dest) as tmp:
        save_pretrained(model, tmp)
        for name in TOKENIZER_FILES:
            (tmp / name).write_bytes((init_dir / name).read_bytes())
        (tmp / JUDGE_FILE).write_text(json.dumps({"response_view": fmt.response_view, "max_len": fmt.max_len},
                                                 indent=2) + "\n", encoding="utf-8")
    return sorted(dest.iterdir())


def write_untrained(output_dir: Path, live_dir: Path, model, fmt: JudgeFormat, init_dir: Path, d: dict,
                    inputs: list[Path], p: dict) -> dict:
    """The outputs when a side has no pair and min_pairs is 0: the init model as the judge, no held-out figure."""
    live = common.open_live(live_dir)
    live.log_metric("train/steps", 0)  # a plots/ dir too: dvc.yaml declares it
    live.end()
    files = write_judge(output_dir / "judge", model, fmt, init_dir)
    rejected_path = output_dir / "rejected.parquet"
    common.write_table(rejected_path, common.rows_to_table(d["rejected"], REJECTED_SCHEMA))
    counts = {**d["counts"], "steps": 0, "pairs_trained": 0, "tokens_seen": 0, "trained": False}
    common.write_json(output_dir / "metrics.json", {"heldout": None, "heldout_before": None, "counts": counts})
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p, inputs=inputs,
                                 outputs=[*files, rejected_path, output_dir / "metrics.json"], counts=counts,
                                 code=common.code_version_closure(*CODE),
                                 extra={"init": str(init_dir), "heldout_accuracy": None, "wall_time_s": 0.0})


def run_reward_model(pair_paths: list[str | Path], init_dir: str | Path, output_dir: str | Path,
                     resume_dir: str | Path, live_dir: str | Path, p: dict, stop: int | None = None) -> dict | None:
    """Train the judge (resuming this run's newest state), then write judge/, metrics.json, rejected.parquet and the
    manifest; `stop` ends after that many steps in all with a resume state and returns None (what a kill leaves)."""
    from model import load_pretrained
    init_dir, output_dir = Path(init_dir), Path(output_dir)
    check_params(p)
    device = training.default_device()
    if device.type == "cpu":
        torch.set_num_threads(int(p["cpu_threads"]))
    training.seed_run(int(p["seed"]), device)
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        if not (init_dir / name).is_file():
            raise common.StageError(f"{init_dir / name}: the init checkpoint lacks it")
    model = load_pretrained(init_dir, device=device, dtype=torch.float32)
    fmt = JudgeFormat(str(p["response_view"]), int(p["max_len"]))
    judge = PairwiseJudge(model, load_chat_tokenizer(init_dir), fmt, device)
    d = prepare_pairs(pair_paths, judge, p)
    inputs = [*d["files"], *(init_dir / name for name in ("config.json", "model.safetensors", *TOKENIZER_FILES))]
    if not d["train"] or not d["heldout"]:  # min_pairs 0: the init model is the judge, untrained (module docstring)
        return write_untrained(output_dir, Path(live_dir), model, fmt, init_dir, d, inputs, p)
    eval_batch = 2 * int(p["micro_batch_pairs"])
    before = heldout_metrics(judge, d["heldout"], eval_batch)

    steps = total_steps(p, len(d["train"]))
    batches = PairBatches(d["train"], int(p["seed"]), int(p["pairs_per_step"]), int(p["micro_batch_pairs"]),
                          judge.pad_id)
    lr = warmup_decay(steps, int(p["warmup_steps"]), float(p["lr_peak"]), float(p["lr_final"]), p["lr_shape"])
    root = training.run_dir(resume_dir, {STAGE: p, "inputs": {str(f): common.sha256_file(f) for f in inputs}}, CODE)
    live = common.open_live(live_dir)
    trainer = training.Trainer(model, training.build_optimizer(model, p, device), lambda t: piecewise_lr(lr, t),
                               BradleyTerryLoss(judge.verdicts), batches, training.LoopConfig.from_params(p),
                               training.ResumeDir(root), live, device, desc=STAGE)
    trainer.state["stage"] = {"parts_start": None, "parts_end": None, "heldout": None}

    def after_step(out: training.StepOutput) -> None:
        stage = trainer.state["stage"]
        parts = {name: out.metrics[f"train/{name}"] for name in PARTS}
        stage["parts_start"] = stage["parts_start"] or parts
        stage["parts_end"] = parts
        if out.step == steps:
            stage["heldout"] = heldout_metrics(judge, d["heldout"], eval_batch)
            out.metrics.update({**live_metrics("heldout", stage["heldout"]), **live_metrics("heldout_before", before)})
            out.milestone = True

    finished = trainer.run(steps, stop=stop, after_step=after_step)
    live.end()
    if not finished:
        return None
    state = trainer.state
    files = write_judge(output_dir / "judge", model, fmt, init_dir)
    rejected_path = output_dir / "rejected.parquet"
    common.write_table(rejected_path, common.rows_to_table(d["rejected"], REJECTED_SCHEMA))
    counts = {**d["counts"], "steps": steps, "pairs_trained": steps * int(p["pairs_per_step"]),
              "tokens_seen": state["tokens_seen"], "trained": True}
    metrics = {"heldout": state["stage"]["heldout"], "heldout_before": before, "counts": counts}
    common.write_json(output_dir / "metrics.json", metrics)
    extra = {"init": str(init_dir), "heldout_accuracy": state["stage"]["heldout"]["accuracy"],
             "parts_start": state["stage"]["parts_start"], "parts_end": state["stage"]["parts_end"],
             "loss_start": state["loss_start"], "loss_end": state["loss_end"],
             "wall_time_s": round(state["wall_time"], 3), "resume_dir": str(root)}
    return common.write_manifest(output_dir / "manifest.json", stage=STAGE, params=p, inputs=inputs,
                                 outputs=[*files, rejected_path, output_dir / "metrics.json"], counts=counts,
                                 code=common.code_version_closure(*CODE), extra=extra)


def main() -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", required=True,
                    help="pair Parquets (PAIR_COLUMNS or distill_targets' pairs.parquet) or directories of them "
                         "(artifacts/<scale>/distill_targets)")
    ap.add_argument("--init-dir", required=True, help="HF checkpoint the judge starts from: artifacts/<scale>/distill")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--resume-dir", required=True,
                    help="resume states (not an output): checkpoints/<scale>/reward_model")
    ap.add_argument("--live-dir", default="dvclive/reward_model", help="dvclive metrics and plots")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this many optimizer steps in all, leaving a resume state (tests: a kill)")
    args = ap.parse_args()
    try:
        manifest = run_reward_model(args.pairs, args.init_dir, args.output_dir, args.resume_dir, args.live_dir,
                                    common.resolve_cli_params(args, STAGE), stop=args.stop_at)
    except common.StageError as exc:
        common.fail(exc)
    if manifest is None:
        print(f"{STAGE}: stopped at --stop-at {args.stop_at}; rerun to resume")
        return
    c, acc = manifest["counts"], manifest["heldout_accuracy"]
    if not c["trained"]:
        print(f"{STAGE}: {c['train_pairs']} train / {c['heldout_pairs']} held-out pairs (min_pairs 0): the init model "
              f"is the judge, untrained")
        return
    print(f"{STAGE}: {c['train_pairs']} train / {c['heldout_pairs']} held-out pairs ({c['pairs_rejected']} rejected), "
          f"{c['steps']} steps, loss {manifest['loss_start']:.3f} -> {manifest['loss_end']:.3f}, held-out accuracy "
          f"{acc['value']:.3f} [{acc['ci95_low']:.3f}, {acc['ci95_high']:.3f}], {manifest['wall_time_s']} s")


if __name__ == "__main__":
    main()
