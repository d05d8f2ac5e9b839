"""Hybrid filtering, the tagger and the recall index: what `score` applies to every document.

The paper has a strong model label quality and distills a small tagger from it. We have no strong model, so the
tagger is distilled from provenance instead: a hashed n-gram logistic regression that tells the reference seed set
(positives) from a seeded sample of the deduplicated corpus (negatives),

    p(reference | d) = sigmoid(w . x(d) + b),   x(d) = [h_word(d) ; h_char(d)]  (hashed n-gram counts, each block L2-normalized)

and the retrieval side of hybrid filtering is a hashed TF-IDF index of the seed documents,

    v(d) = normalize(tf(d) * idf),  tf = 1 + ln(count) (sublinear),  idf_j = ln((1 + N) / (1 + df_j)) + 1,

so `score` recalls a document by its maximum cosine similarity to the seed set. Both are plain arrays in .npz files
that carry their own feature spec, so a stronger tagger or a real vector index plugs in by writing the same files.
"""
from __future__ import annotations

import heapq
import json
import math
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import normalize
from tqdm import tqdm

from stages import common

STAGE = "quality_model"
CLASSIFIER = "classifier.npz"
RETRIEVAL = "retrieval.npz"
METRICS = "metrics.json"


# ----------------------------------------------------------------------------- features

def _hashing(n_features: int, **kwargs) -> HashingVectorizer:
    return HashingVectorizer(n_features=int(n_features), alternate_sign=False, lowercase=True, dtype=np.float32,
                             **kwargs)


def ngram_features(texts: list[str], spec: dict) -> sparse.csr_matrix:
    """x(d) = [h_word(d) ; h_char(d)]: hashed word 1..n-gram counts and char n-gram counts, each block L2-normalized.

    spec: n_features (per block), word_ngram_max, char_ngram_range [lo, hi] (hi = 0 turns the char block off)."""
    blocks = [_hashing(spec["n_features"], ngram_range=(1, int(spec["word_ngram_max"])), norm="l2").transform(texts)]
    lo, hi = (int(v) for v in spec["char_ngram_range"])
    if hi > 0:
        blocks.append(_hashing(spec["n_features"], analyzer="char_wb", ngram_range=(lo, hi), norm="l2")
                      .transform(texts))
    return sparse.hstack(blocks, format="csr", dtype=np.float32)


def term_counts(texts: list[str], spec: dict) -> sparse.csr_matrix:
    """Hashed word 1..n-gram counts, sublinear (1 + ln count) when spec["sublinear_tf"]: the retrieval index's tf."""
    counts = _hashing(spec["n_features"], ngram_range=(1, int(spec["word_ngram_max"])), norm=None).transform(texts)
    counts = counts.tocsr()
    if spec["sublinear_tf"]:
        counts.data = 1.0 + np.log(counts.data)
    return counts


def tfidf_vectors(texts: list[str], idf: np.ndarray, spec: dict) -> sparse.csr_matrix:
    """v(d) = normalize(tf(d) * idf): L2-normalized, so a dot product is a cosine similarity."""
    return normalize(term_counts(texts, spec).multiply(idf[np.newaxis, :]).tocsr(), norm="l2", copy=False)


def inverse_document_frequency(texts: list[str], spec: dict) -> np.ndarray:
    """idf_j = ln((1 + N) / (1 + df_j)) + 1 over the N given documents (smoothed, as scikit-learn's TfidfTransformer)."""
    counts = term_counts(texts, spec)
    df = np.bincount(counts.indices, minlength=int(spec["n_features"]))
    return (np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- inputs

def read_seed_set(path: str | Path) -> list[dict]:
    """The reference seed set: JSON lines {"text", "domain", "source"}; text NFC-normalized like ingest does."""
    path = Path(path)
    if not path.is_file():
        raise common.StageError(f"{path}: seed file does not exist")
    docs = []
    for lineno, record in common.iter_jsonl(path, text_field="text"):
        if not record["text"].strip():
            raise common.StageError(f"{path}:{lineno}: record has an empty 'text'")
        text = unicodedata.normalize("NFC", record["text"])
        docs.append({"id": common.content_id(text), "text": text, "domain": record.get("domain", ""),
                     "source": record.get("source", "")})
    if not docs:
        raise common.StageError(f"{path}: seed file holds no documents")
    return docs


def sample_corpus(corpus_dir: str | Path, k: int, seed: int, exclude_ids: set[str]) -> list[str]:
    """A seeded bottom-k sample of the corpus: the k documents with the smallest xxh64(id, seed), streamed shard by
    shard with only k documents in memory; independent of shard order and of the number of shards."""
    heap: list[tuple[int, str, str]] = []  # (-key, id, text): a max-heap on key keeps the k smallest
    for shard in tqdm(common.list_shards(corpus_dir), desc="sample corpus", unit="shard", file=sys.stderr,
                      disable=None):
        for batch in common.iter_record_batches(Path(corpus_dir) / f"{shard}.parquet", columns=["id", "text"]):
            for doc_id, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()):
                if doc_id in exclude_ids:
                    continue
                item = (-xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed), doc_id, text)
                if len(heap) < k:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
    return [text for _, _, text in sorted(heap, reverse=True)]


# ----------------------------------------------------------------------------- training

def holdout_split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, heldout) of n items: a seeded permutation, ceil(fraction * n) held out, at least one each."""
    order = rng.permutation(n)
    n_held = min(max(1, math.ceil(fraction * n)), n - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def train_quality_model(positives: list[str], negatives: list[str], p: dict) -> tuple[dict, dict, dict]:
    """Fit the reference-vs-web classifier on a train split, measure it on the held-out split, build the index.

    Returns (classifier arrays, retrieval arrays, metrics)."""
    if len(positives) < 2 or len(negatives) < 2:
        raise common.StageError(f"{STAGE}: need at least 2 seed documents and 2 corpus documents to hold out a split, "
                                f"got {len(positives)} and {len(negatives)}")
    rng = np.random.default_rng(p["seed"])
    pos_train, pos_held = holdout_split(len(positives), p["holdout_fraction"], rng)
    neg_train, neg_held = holdout_split(len(negatives), p["holdout_fraction"], rng)
    texts = positives + negatives
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(np.int64)
    train = np.r_[pos_train, len(positives) + neg_train]
    held = np.r_[pos_held, len(positives) + neg_held]

    clf_spec = p["classifier"]
    features = ngram_features(texts, clf_spec)
    model = LogisticRegression(C=float(clf_spec["C"]), max_iter=int(clf_spec["max_iter"]), class_weight="balanced",
                               solver="lbfgs")
    model.fit(features[train], labels[train])
    prob = model.predict_proba(features[held])[:, 1]
    metrics = {
        "heldout_auc": float(roc_auc_score(labels[held], prob)),
        "heldout_accuracy": float(np.mean((prob >= 0.5) == labels[held])),
        "n_pos": len(positives), "n_neg": len(negatives),
        "n_train": int(train.size), "n_heldout": int(held.size),
    }
    classifier = {"coef": model.coef_[0].astype(np.float32), "intercept": np.float64(model.intercept_[0]),
                  "spec": np.array(json.dumps(clf_spec, sort_keys=True))}

    ret_spec = p["retrieval"]
    idf = inverse_document_frequency(texts, ret_spec)
    index = tfidf_vectors(positives, idf, ret_spec)
    index.sort_indices()
    retrieval = {"idf": idf, "data": index.data.astype(np.float32), "indices": index.indices.astype(np.int32),
                 "indptr": index.indptr.astype(np.int64), "shape": np.array(index.shape, dtype=np.int64),
                 "spec": np.array(json.dumps(ret_spec, sort_keys=True))}
    return classifier, retrieval, metrics


def build_quality_model(seed_file: str | Path, corpus_dir: str | Path, output_dir: str | Path, p: dict) -> dict:
    """Train on the seed set + a corpus sample; write classifier.npz, retrieval.npz, metrics.json, manifest.json."""
    out = Path(output_dir)
    seed_docs = read_seed_set(seed_file)
    n_neg = min(int(p["max_negatives"]), math.ceil(float(p["negatives_per_positive"]) * len(seed_docs)))
    negatives = sample_corpus(corpus_dir, n_neg, int(p["seed"]), {d["id"] for d in seed_docs})
    classifier, retrieval, metrics = train_quality_model([d["text"] for d in seed_docs], negatives, p)
    common.write_npz(out / CLASSIFIER, classifier)
    common.write_npz(out / RETRIEVAL, retrieval)
    common.write_json(out / METRICS, metrics)
    inputs = [seed_file] + [Path(corpus_dir) / f"{s}.parquet" for s in common.list_shards(corpus_dir)]
    return common.write_manifest(out / "manifest.json", stage=STAGE, params=p, inputs=inputs,
                                 outputs=[out / CLASSIFIER, out / RETRIEVAL, out / METRICS],
                                 counts={"n_pos": metrics["n_pos"], "n_neg": metrics["n_neg"]},
                                 code=common.code_version(f"stages.{STAGE}"))


# ----------------------------------------------------------------------------- applying the model

@dataclass(frozen=True)
class QualityModel:
    """The trained tagger and recall index, as `score` applies them."""
    coef: np.ndarray
    intercept: float
    classifier_spec: dict
    idf: np.ndarray
    index: sparse.csr_matrix
    retrieval_spec: dict

    def classifier_probability(self, texts: list[str]) -> np.ndarray:
        """p(reference | d) = sigmoid(w . x(d) + b)."""
        logits = ngram_features(texts, self.classifier_spec) @ self.coef.astype(np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def retrieval_similarity(self, texts: list[str]) -> np.ndarray:
        """max over seed documents s of cos(v(d), v(s)), in [0, 1] since tf-idf vectors are non-negative."""
        sims = tfidf_vectors(texts, self.idf, self.retrieval_spec) @ self.index.T
        return np.clip(sims.max(axis=1).toarray().ravel().astype(np.float64), 0.0, 1.0)


def load_quality_model(model_dir: str | Path) -> QualityModel:
    model_dir = Path(model_dir)
    for name in (CLASSIFIER, RETRIEVAL):
        if not (model_dir / name).is_file():
            raise common.StageError(f"{model_dir / name}: quality model file is missing (run the quality_model stage)")
    with np.load(model_dir / CLASSIFIER) as clf, np.load(model_dir / RETRIEVAL) as ret:
        index = sparse.csr_matrix((ret["data"], ret["indices"], ret["indptr"]), shape=tuple(ret["shape"]))
        return QualityModel(coef=clf["coef"], intercept=float(clf["intercept"]),
                            classifier_spec=json.loads(str(clf["spec"])), idf=ret["idf"], index=index,
                            retrieval_spec=json.loads(str(ret["spec"])))


def main(argv: list[str] | None = None) -> None:
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--seed-file", required=True, help="reference seed set, JSON lines {text, domain, source}")
    ap.add_argument("--corpus-dir", required=True, help="dedup/kept shards to sample negatives from")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    try:
        p = common.resolve_cli_params(args, STAGE)
        manifest = build_quality_model(args.seed_file, args.corpus_dir, args.output_dir, p)
    except common.StageError as exc:
        common.fail(exc)
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
