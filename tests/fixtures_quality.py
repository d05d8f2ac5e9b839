"""Small synthetic corpora for the score / select / schedule tests: seeded, so every test sees the same documents."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa

from stages import common

TOPICS = ["photosynthesis", "thermodynamics", "electromagnetism", "probability", "evolution", "algorithms",
          "geometry", "metabolism", "plate tectonics", "linear algebra", "combustion", "immunology"]
NAMES = ["Newton", "Darwin", "Euler", "Curie", "Maxwell", "Gauss", "Mendel", "Faraday", "Noether", "Turing"]
SPAM = ["click here", "best deals", "buy now", "free shipping", "limited offer", "subscribe", "amazing price",
        "hot sale", "win big", "lol", "omg", "follow us", "share this", "top 10", "you wont believe"]

DOC_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("text", pa.string()),
                        ("n_chars", pa.int64()), ("approx_tokens", pa.int64())])


def reference_doc(rng: random.Random) -> str:
    topic, other = rng.sample(TOPICS, 2)
    name = rng.choice(NAMES)
    n = rng.randint(2, 90)
    sentences = [
        f"In science, {topic} is defined as the study of how systems change under measurable conditions.",
        f"For example, {name} measured {n} samples in {1700 + n} and reported a ratio of {n / 7:.2f}.",
        "Because the quantities are conserved, the total remains constant, and therefore the model predicts it.",
        f"The relationship between {topic} and {other} is known as a coupling, which means that one constrains "
        f"the other.",
        f"Thus students can compute the value directly: if x = {n} then 2x = {2 * n}.",
        f"In other words, {topic} explains observations such as temperature, pressure and concentration.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(4, 6)])


def web_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 10)):
        lines.append(" ".join(rng.sample(SPAM, rng.randint(1, 3))) + rng.choice(["!!!", "", " >>", "..."]))
    return "\n".join(lines)


def math_doc(rng: random.Random) -> str:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    return (f"Question: A farmer has {a} rows with {b} plants each. How many plants are there?\n"
            f"Step 1: Each row has {b} plants, so we multiply.\n"
            f"Step 2: {a} * {b} = {a * b}.\n"
            f"Therefore the farmer has {a * b} plants.\n#### {a * b}")


def code_doc(rng: random.Random) -> str:
    name = rng.choice(["compute_total", "parse_record", "merge_intervals", "load_config"])
    return (f"def {name}(items, threshold=0):\n"
            f"    \"\"\"Return the sum of the items above the threshold.\"\"\"\n"
            f"    # skip values that do not pass the threshold\n"
            f"    total = 0\n"
            f"    for value in items:\n"
            f"        if value > threshold:\n"
            f"            total += value\n"
            f"    return total\n")


def doc_row(text: str, domain: str, source: str = "fixture") -> dict:
    return {"id": common.content_id(text), "source": source, "domain": domain, "text": text, "n_chars": len(text),
            "approx_tokens": math.ceil(len(text.encode("utf-8")) / 4)}


def corpus_rows(n: int, seed: int) -> list[dict]:
    """A mixed corpus: mostly web text, some reference-like, math and code documents; unique ids."""
    rng = random.Random(seed)
    makers = [(web_doc, "web", 0.5), (reference_doc, "wiki", 0.2), (math_doc, "math", 0.15), (code_doc, "code", 0.15)]
    rows, seen = [], set()
    while len(rows) < n:
        r = rng.random()
        for make, domain, share in makers:
            if r < share:
                break
            r -= share
        row = doc_row(make(rng), domain)
        if row["id"] not in seen:
            seen.add(row["id"])
            rows.append(row)
    return rows


def write_corpus(directory: Path, n_shards: int, docs_per_shard: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = corpus_rows(n_shards * docs_per_shard, seed)
    for i in range(n_shards):
        chunk = rows[i * docs_per_shard:(i + 1) * docs_per_shard]
        common.write_table(directory / f"shard-{i:03d}.parquet", common.rows_to_table(chunk, DOC_SCHEMA))
    return directory


def write_seed_set(path: Path, n: int, seed: int) -> Path:
    """Reference documents, disjoint from the corpus by construction (a different seed and a fixed preamble)."""
    rng = random.Random(seed + 10_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = "Textbook chapter. " + reference_doc(rng)
            fh.write(json.dumps({"text": text, "domain": "reference", "source": f"seed-{i}"}) + "\n")
    return path
