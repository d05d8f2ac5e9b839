"""Hybrid filtering, part 2: quality tags and a 0-9 utility per document (tagging-based scoring + retrieval recall).

Every tag is a continuous float in [0, 1] built from transparent features, each feature turned into a rate and
saturated as sat(x; k) = x / (x + k) (half credit when the rate x equals its scale k, `score.tag_scales`):

  tag_knowledge_density = mean(sat(numbers/W; number_rate), sat(entities/W; entity_rate), sat(terms/W; term_rate),
                               sat(unique/sqrt(W); guiraud))          W words, entities = inner capitalized words,
                                                                      terms = words of 10+ letters, Guiraud's R
  tag_reasoning         = mean(sat(connectives/S; connective_rate), sat(step lines/L; step_rate),
                               sat(equation lines/L; equation_rate), 1[final-answer marker: ####, \\boxed, "the answer is"])
  tag_coherence         = mean(1 / (1 + cv(words per sentence)), terminated lines/L, 1 - fragment lines/L)
                                                                      S sentences, L non-empty lines
  tag_educational       = a p + (1 - a) sat(definitional phrases/S; definition_rate)   a = educational_classifier_weight
  tag_code_quality      = mean(sat(comment lines/L; comment_rate), 1 - lines over max_code_line_chars/L,
                               identifiers of 3+ chars / identifiers)   for code documents (domain in code_domains);
                                                                      null (not applicable) for every other document
  tag_classifier        = p = p(reference | d), from the quality_model classifier cross-fitted without d's fold
                          (so no document, sampled negative or seed copy, is scored by a classifier that saw it)
  retrieval_sim         = max cosine similarity of d's tf-idf vector to the seed set

and the utility is the documented weighted mean of the tags (the paper: content tags predict quality better than
format tags, and a 0-9 utility beats a binary label), over the tags defined for the document:

  U = sum_t w_t tag_t / sum_t w_t,   utility = min(9, floor(10 clip((U - lo) / (hi - lo), 0, 1)))

with w = `score.utility_weights`, [lo, hi] = `score.utility_range`. No threshold is applied here and no row dropped:
`select` applies the cut-offs, so changing one never reruns scoring.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from stages import common
from stages.quality_model import QualityModel, load_quality_model

STAGE = "score"
TAGS = ("tag_knowledge_density", "tag_reasoning", "tag_coherence", "tag_educational", "tag_code_quality",
        "tag_classifier", "retrieval_sim")
TAG_SCALES = ("number_rate", "entity_rate", "term_rate", "guiraud", "connective_rate", "step_rate", "equation_rate",
              "definition_rate", "comment_rate")

# RE2 patterns (pyarrow.compute); line patterns run on single lines, since `^` does not anchor lines in a count.
WORD_SPLIT = r"[^\pL\pN_]+"
NUMBER = r"\pN+(?:[.,]\pN+)*"
ENTITY = r"[\pL\pN,;:)\]][ \t]+\p{Lu}\pL+"
TERM = r"\pL{10,}"
SENTENCE_SPLIT = r"[.!?。！？]+\s+|\n[ \t]*\n"
CONNECTIVE = (r"(?i)\b(?:therefore|because|thus|hence|since|consequently|it follows|implies|so that|which means"
              r"|as a result)\b")
DEFINITION = (r"(?i)\b(?:is defined as|are defined as|is called|are called|refers to|is known as|means that"
              r"|for example|for instance|such as|in other words|e\.g\.|i\.e\.)")
ANSWER = r"####|\\boxed\{|(?i:the (?:final )?answer is)"
NONEMPTY_LINE = r"\S"
TERMINATED_LINE = r"[.!?:;,\"')\]}。！？][ \t\r]*$"
STEP_LINE = r"(?i)^[ \t]*(?:step[ \t]*\d+|\d+[.)][ \t]|(?:first|second|third|next|then|finally)\b)"
EQUATION_LINE = r"=|\$[^$]+\$|\\(?:frac|sqrt|sum|int|cdot)\b|\d[ \t]*[-+*/×÷^<>][ \t]*\d"
COMMENT_LINE = r"^[ \t]*(?:#|//|/\*|\*|--|;|\"\"\"|''')"
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
DESCRIPTIVE_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{2,}"


def saturate(x: np.ndarray, k: float) -> np.ndarray:
    """sat(x; k) = x / (x + k): 0 at 0, 1/2 at k, towards 1 above."""
    return x / (x + float(k))


def _per_doc(parents: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(parents, weights=values, minlength=n)


def _count(arr: pa.Array, pattern: str) -> np.ndarray:
    return pc.count_substring_regex(arr, pattern).to_numpy(zero_copy_only=False).astype(np.float64)


def _match(arr: pa.Array, pattern: str) -> np.ndarray:
    return pc.match_substring_regex(arr, pattern).to_numpy(zero_copy_only=False).astype(np.float64)


def _split(arr: pa.Array, pattern: str, regex: bool = True) -> tuple[pa.Array, np.ndarray]:
    parts = pc.split_pattern_regex(arr, pattern) if regex else pc.split_pattern(arr, pattern)
    return pc.list_flatten(parts), pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)


def word_statistics(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(words W, distinct lower-cased words) per document."""
    n = len(texts)
    words, parents = _split(pc.utf8_lower(texts), WORD_SPLIT)
    keep = pc.not_equal(words, "")
    pairs = pa.table({"doc": pa.array(parents), "word": words}).filter(keep)
    n_words = np.bincount(pairs.column("doc").to_numpy(), minlength=n).astype(np.float64)
    distinct = pairs.group_by(["doc", "word"]).aggregate([]).column("doc").to_numpy()
    return n_words, np.bincount(distinct, minlength=n).astype(np.float64)


def sentence_statistics(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(sentences S, coefficient of variation of words per sentence) per document; cv = 0 for one sentence."""
    n = len(texts)
    sentences, parents = _split(texts, SENTENCE_SPLIT)
    lengths = _count(sentences, r"[\pL\pN_]+")
    real = lengths > 0
    parents, lengths = parents[real], lengths[real]
    count = np.bincount(parents, minlength=n).astype(np.float64)
    total = _per_doc(parents, lengths, n)
    mean = np.divide(total, count, out=np.zeros(n), where=count > 0)
    sq = _per_doc(parents, (lengths - mean[parents]) ** 2, n)
    std = np.sqrt(np.divide(sq, count, out=np.zeros(n), where=count > 0))
    return count, np.divide(std, mean, out=np.zeros(n), where=mean > 0)


def line_statistics(texts: pa.Array, max_code_line_chars: int) -> dict[str, np.ndarray]:
    """Per document: non-empty lines L and the counts of terminated, fragment, step, equation, comment, long lines."""
    n = len(texts)
    lines, parents = _split(texts, "\n", regex=False)
    nonempty = _match(lines, NONEMPTY_LINE)
    tokens = _count(lines, r"\S+")
    out = {"lines": _per_doc(parents, nonempty, n)}
    per_line = {
        "terminated": _match(lines, TERMINATED_LINE),
        "fragment": (tokens <= 2).astype(np.float64),
        "step": _match(lines, STEP_LINE),
        "equation": _match(lines, EQUATION_LINE),
        "comment": _match(lines, COMMENT_LINE),
        "long": (pc.utf8_length(lines).to_numpy(zero_copy_only=False) > max_code_line_chars).astype(np.float64),
    }
    for name, values in per_line.items():
        out[name] = _per_doc(parents, values * nonempty, n)
    return out


def _rate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def quality_tags(texts: pa.Array, is_code: np.ndarray, p_classifier: np.ndarray, p: dict) -> dict[str, np.ndarray]:
    """The content and format tags of the module docstring, each in [0, 1] (tag_code_quality NaN off code)."""
    k = p["tag_scales"]
    missing = sorted(set(TAG_SCALES) - set(k))
    if missing:
        raise common.StageError(f"{STAGE}: score.tag_scales lacks {missing}")
    n_words, distinct = word_statistics(texts)
    n_sent, cv = sentence_statistics(texts)
    lines = line_statistics(texts, int(p["max_code_line_chars"]))
    n_lines = lines["lines"]

    knowledge = np.mean([saturate(_rate(_count(texts, NUMBER), n_words), k["number_rate"]),
                         saturate(_rate(_count(texts, ENTITY), n_words), k["entity_rate"]),
                         saturate(_rate(_count(texts, TERM), n_words), k["term_rate"]),
                         saturate(_rate(distinct, np.sqrt(n_words)), k["guiraud"])], axis=0)
    reasoning = np.mean([saturate(_rate(_count(texts, CONNECTIVE), n_sent), k["connective_rate"]),
                         saturate(_rate(lines["step"], n_lines), k["step_rate"]),
                         saturate(_rate(lines["equation"], n_lines), k["equation_rate"]),
                         _match(texts, ANSWER)], axis=0)
    coherence = np.mean([np.where(n_sent > 0, 1.0 / (1.0 + cv), 0.0),
                         _rate(lines["terminated"], n_lines),
                         np.where(n_lines > 0, 1.0 - _rate(lines["fragment"], n_lines), 0.0)], axis=0)
    a = float(p["educational_classifier_weight"])
    educational = a * p_classifier + (1.0 - a) * saturate(_rate(_count(texts, DEFINITION), n_sent),
                                                          k["definition_rate"])
    code_quality = np.mean([saturate(_rate(lines["comment"], n_lines), k["comment_rate"]),
                            np.where(n_lines > 0, 1.0 - _rate(lines["long"], n_lines), 0.0),
                            _rate(_count(texts, DESCRIPTIVE_IDENTIFIER), _count(texts, IDENTIFIER))], axis=0)
    return {
        "tag_knowledge_density": knowledge,
        "tag_reasoning": reasoning,
        "tag_coherence": coherence,
        "tag_educational": educational,
        "tag_code_quality": np.where(is_code, code_quality, np.nan),
        "tag_classifier": p_classifier,
    }


def utility_score(tags: dict[str, np.ndarray], weights: dict[str, float], utility_range: list[float]) -> np.ndarray:
    """utility = min(9, floor(10 clip((U - lo)/(hi - lo), 0, 1))), U = sum_t w_t tag_t / sum_t w_t over defined tags."""
    unknown = sorted(set(weights) - set(TAGS))
    if unknown or any(float(w) < 0 for w in weights.values()):
        raise common.StageError(f"{STAGE}: score.utility_weights must be non-negative weights of {TAGS}, "
                                f"got {weights}")
    lo, hi = (float(v) for v in utility_range)
    if not hi > lo:
        raise common.StageError(f"{STAGE}: score.utility_range must be [lo, hi] with hi > lo, got {utility_range}")
    n = len(next(iter(tags.values())))
    num, den = np.zeros(n), np.zeros(n)
    for name, w in sorted(weights.items()):
        values = tags[name]
        defined = ~np.isnan(values)
        num += np.where(defined, float(w) * values, 0.0)
        den += np.where(defined, float(w), 0.0)
    combined = np.divide(num, den, out=np.zeros(n), where=den > 0)
    scaled = np.clip((combined - lo) / (hi - lo), 0.0, 1.0)
    return np.minimum(9, np.floor(10.0 * scaled)).astype(np.int8)


def score_batch(batch: pa.RecordBatch, model: QualityModel, p: dict) -> pa.RecordBatch:
    """All document columns + the tag columns + utility for one batch of documents."""
    texts = batch.column("text")
    text_list = texts.to_pylist()
    is_code = pc.is_in(batch.column("domain"), value_set=pa.array(p["code_domains"], pa.string()))
    p_reference = model.classifier_probability(batch.column("id").to_pylist(), text_list)
    tags = quality_tags(texts, is_code.to_numpy(zero_copy_only=False), p_reference, p)
    tags["retrieval_sim"] = model.retrieval_similarity(text_list)
    utility = utility_score(tags, p["utility_weights"], p["utility_range"])
    columns = dict(zip(batch.schema.names, batch.columns))
    for name in TAGS:
        values = tags[name]
        columns[name] = pa.array(values, pa.float64(), mask=np.isnan(values))
    columns["utility"] = pa.array(utility, pa.int8())
    return pa.RecordBatch.from_pydict(columns)


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    fields = list(input_schema) + [pa.field(name, pa.float64()) for name in TAGS] + [pa.field("utility", pa.int8())]
    return pa.schema(fields)


def score_shard(input_path: str | Path, output_path: str | Path, model: QualityModel, p: dict) -> dict:
    """Score one shard batch by batch, streaming the output; every input row comes out (conservation).
    Returns the manifest counts: rows in and scored, and rows per cross-fit classifier."""
    input_path = Path(input_path)
    schema = output_schema(pq.read_schema(input_path))
    for column in ("id", "text", "domain"):
        if column not in schema.names:
            raise common.StageError(f"{input_path}: shard lacks the '{column}' column")
    rows, by_fold = 0, np.zeros(len(model.intercept), dtype=np.int64)
    with common.table_writer(output_path, schema) as append:
        for batch in tqdm(common.iter_record_batches(input_path, batch_size=int(p["batch_rows"])),
                          desc=f"score {input_path.stem}", unit="batch", file=sys.stderr, disable=None):
            scored = score_batch(batch, model, p)
            append(pa.Table.from_batches([scored], schema=schema))
            rows += scored.num_rows
            by_fold += np.bincount(model.fold(batch.column("id").to_pylist()), minlength=len(by_fold))
        common.check_conservation(STAGE, input_path.stem, common.count_rows(input_path), scored=rows)
    return {"in": rows, "scored": rows, "scored_by_fold": [int(n) for n in by_fold]}


def _paths(shard: str, input_dir: str | Path, model_dir: str | Path, output_dir: str | Path):
    model_dir = Path(model_dir)
    inputs = [Path(input_dir) / f"{shard}.parquet", model_dir / "classifier.npz", model_dir / "retrieval.npz"]
    return inputs, Path(output_dir) / f"{shard}.parquet", Path(output_dir) / f"{shard}.manifest.json"


def code() -> str:
    return common.code_version_closure(f"stages.{STAGE}")


def score_one(shard: str, input_dir: str | Path, model_dir: str | Path, output_dir: str | Path, p: dict,
              model: QualityModel | None = None) -> dict:
    """Score one shard and write its manifest last."""
    inputs, output, manifest = _paths(shard, input_dir, model_dir, output_dir)
    model = model or load_quality_model(model_dir)
    counts = score_shard(inputs[0], output, model, p)
    return common.write_manifest(manifest, stage=STAGE, params=p, inputs=inputs, outputs=[output], counts=counts,
                                 code=code())


def score_all(input_dir: str | Path, model_dir: str | Path, output_dir: str | Path, p: dict,
              shard: str | None = None) -> dict[str, str]:
    """One shard (`shard`), or every shard whose manifest is not current."""
    model = load_quality_model(model_dir)
    shards = [shard] if shard else common.list_shards(input_dir)
    if shard and not (Path(input_dir) / f"{shard}.parquet").is_file():
        raise common.StageError(f"{Path(input_dir) / shard}.parquet: no such shard")
    version = code()

    def is_done(name: str) -> bool:
        inputs, _, manifest = _paths(name, input_dir, model_dir, output_dir)
        return shard is None and common.manifest_is_current(manifest, p, inputs, version)

    return common.run_sharded(shards, lambda name: score_one(name, input_dir, model_dir, output_dir, p, model),
                              is_done, desc=STAGE)


def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--input-dir", required=True, help="dedup/kept shards")
    ap.add_argument("--model-dir", required=True, help="quality_model output directory")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--shard", default=None, help="one shard name (file stem); all shards when omitted")
    args = ap.parse_args(argv)
    try:
        p = common.resolve_cli_params(args, STAGE)
        status = score_all(args.input_dir, args.model_dir, args.output_dir, p, args.shard)
    except common.StageError as exc:
        common.fail(exc)
    print(json.dumps(status, sort_keys=True))


if __name__ == "__main__":
    main()
