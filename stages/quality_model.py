"""Hybrid filtering, the tagger and the recall index: what `score` applies to every document.

The paper has a strong model label quality and distills a small tagger from it. We have no strong model, so the
tagger is distilled from provenance instead: a hashed n-gram logistic regression that tells the reference seed set
(positives) from a seeded sample of the deduplicated corpus (negatives),

    p(reference | d) = sigmoid(w_f(d) . x(d) + b_f(d)),   x(d) = [h_word(d) ; h_char(d)]  (hashed n-gram counts, each
                                                                                         block L2-normalized)

cross-fitted so that no document is scored by a classifier that trained on it: every document (seed, sampled or
never sampled) has the fold f(d) = xxh64(id_d; seed + 1) mod K (K = `cross_fit_folds`), classifier k is trained on
the training documents with f != k, and `score` applies classifier f(d) to d. A sampled negative is thus scored
like any unsampled document (by a model that never saw it), and metrics.json reports out-of-fold AUC / accuracy over
all training documents. Words are every run of word characters, one-character tokens included (digits, "a", "x"),
so templated problems that differ only in a number get different vectors (classifier and retrieval alike).

The retrieval side of hybrid filtering is a hashed TF-IDF index of the seed documents,

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
TOKEN_PATTERN = r"(?u)\b\w+\b"  # scikit-learn's default \w\w+ drops one-character tokens: digits, "a", "x"
CLASSIFIER = "classifier.npz"
RETRIEVAL = "retrieval.npz"
METRICS = "metrics.json"


# ----------------------------------------------------------------------------- features

def _hashing(n_features: int, **kwargs) -> HashingVectorizer:
    return HashingVectorizer(n_features=int(n_features), alternate_sign=False, lowercase=True, dtype=np.float32,
                             **kwargs)


def _word_hashing(n_features: int, word_ngram_max: int, norm: str | None) -> HashingVectorizer:
    return _hashing(n_features, ngram_range=(1, int(word_ngram_max)), norm=norm, token_pattern=TOKEN_PATTERN)


def ngram_features(texts: list[str], spec: dict) -> sparse.csr_matrix:
    """x(d) = [h_word(d) ; h_char(d)]: hashed word 1..n-gram counts and char n-gram counts, each block L2-normalized.

    spec: n_features (per block), word_ngram_max, char_ngram_range [lo, hi] (hi = 0 turns the char block off)."""
    blocks = [_word_hashing(spec["n_features"], spec["word_ngram_max"], "l2").transform(texts)]
    lo, hi = (int(v) for v in spec["char_ngram_range"])
    if hi > 0:
        blocks.append(_hashing(spec["n_features"], analyzer="char_wb", ngram_range=(lo, hi), norm="l2")
                      .transform(texts))
    return sparse.hstack(blocks, format="csr", dtype=np.float32)


def term_counts(texts: list[str], spec: dict) -> sparse.csr_matrix:
    """Hashed word 1..n-gram counts, sublinear (1 + ln count) when spec["sublinear_tf"]: the retrieval index's tf."""
    counts = _word_hashing(spec["n_features"], spec["word_ngram_max"], None).transform(texts)
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


def sample_corpus(corpus_dir: str | Path, k: int, seed: int, exclude_ids: set[str]) -> list[tuple[str, str]]:
    """A seeded bottom-k sample of the corpus, as (id, text): the k documents with the smallest xxh64(id, seed),
    streamed shard by shard with only k documents in memory; independent of shard order and of the number of shards."""
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
    return [(doc_id, text) for _, doc_id, text in sorted(heap, reverse=True)]


def cross_fit_fold(ids: list[str], folds: int, fold_seed: int) -> np.ndarray:
    """f(d) = xxh64(id_d; fold_seed) mod K: the classifier that scores d is the one trained without fold f(d)."""
    return np.array([xxhash.xxh64_intdigest(i.encode("utf-8"), seed=fold_seed) % folds for i in ids], dtype=np.int64)


# ----------------------------------------------------------------------------- training

def train_quality_model(positives: list[tuple[str, str]], negatives: list[tuple[str, str]], p: dict
                        ) -> tuple[dict, dict, dict]:
    """Fit the K cross-fitted reference-vs-web classifiers, measure them out of fold, build the recall index.

    positives / negatives: (id, text). Classifier k trains on the documents with fold != k; its out-of-fold
    predictions (on fold k) give the metrics. Returns (classifier arrays, retrieval arrays, metrics)."""
    folds, fold_seed = int(p["cross_fit_folds"]), int(p["seed"]) + 1
    if folds < 2:
        raise common.StageError(f"{STAGE}: cross_fit_folds must be >= 2, got {folds}")
    ids = [i for i, _ in positives] + [i for i, _ in negatives]
    texts = [t for _, t in positives] + [t for _, t in negatives]
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(np.int64)
    fold = cross_fit_fold(ids, folds, fold_seed)
    fold_sizes = [{"fold": k, "n_pos": int(np.sum((fold == k) & (labels == 1))),
                   "n_neg": int(np.sum((fold == k) & (labels == 0)))} for k in range(folds)]
    for k in range(folds):
        train = fold != k
        if len(set(labels[train])) < 2 or not np.any(~train):
            raise common.StageError(f"{STAGE}: cross-fit fold {k} leaves a training set without both classes or "
                                    f"nothing to score (fold sizes {fold_sizes}); add seed or corpus documents or "
                                    f"lower cross_fit_folds")

    clf_spec = p["classifier"]
    features = ngram_features(texts, clf_spec)
    coef = np.zeros((folds, features.shape[1]), dtype=np.float32)
    intercept = np.zeros(folds, dtype=np.float64)
    out_of_fold = np.zeros(len(texts))
    for k in range(folds):
        train = fold != k
        model = LogisticRegression(C=float(clf_spec["C"]), max_iter=int(clf_spec["max_iter"]),
                                   class_weight="balanced", solver="lbfgs")
        model.fit(features[train], labels[train])
        coef[k], intercept[k] = model.coef_[0], model.intercept_[0]
        out_of_fold[~train] = model.predict_proba(features[~train])[:, 1]
    metrics = {
        "heldout_auc": float(roc_auc_score(labels, out_of_fold)),
        "heldout_accuracy": float(np.mean((out_of_fold >= 0.5) == labels)),
        "heldout": "out-of-fold: every training document predicted by the classifier that did not see it",
        "n_pos": len(positives), "n_neg": len(negatives), "folds": fold_sizes,
        "mean_p_reference_out_of_fold": {"pos": float(out_of_fold[labels == 1].mean()),
                                         "neg": float(out_of_fold[labels == 0].mean())},
    }
    classifier = {"coef": coef, "intercept": intercept, "folds": np.int64(folds), "fold_seed": np.int64(fold_seed),
                  "spec": np.array(json.dumps(clf_spec, sort_keys=True))}

    ret_spec = p["retrieval"]
    pos_texts = [t for _, t in positives]
    idf = inverse_document_frequency(texts, ret_spec)
    index = tfidf_vectors(pos_texts, idf, ret_spec)
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
    positives = [(d["id"], d["text"]) for d in seed_docs]
    classifier, retrieval, metrics = train_quality_model(positives, negatives, p)
    common.write_npz(out / CLASSIFIER, classifier)
    common.write_npz(out / RETRIEVAL, retrieval)
    common.write_json(out / METRICS, metrics)
    inputs = [seed_file] + [Path(corpus_dir) / f"{s}.parquet" for s in common.list_shards(corpus_dir)]
    return common.write_manifest(out / "manifest.json", stage=STAGE, params=p, inputs=inputs,
                                 outputs=[out / CLASSIFIER, out / RETRIEVAL, out / METRICS],
                                 counts={"n_pos": metrics["n_pos"], "n_neg": metrics["n_neg"],
                                         "folds": metrics["folds"]},
                                 code=common.code_version(f"stages.{STAGE}"))


# ----------------------------------------------------------------------------- applying the model

@dataclass(frozen=True)
class QualityModel:
    """The K cross-fitted taggers and the recall index, as `score` applies them."""
    coef: np.ndarray          # [K, features]: row k trained without fold k
    intercept: np.ndarray     # [K]
    fold_seed: int
    classifier_spec: dict
    idf: np.ndarray
    index: sparse.csr_matrix
    retrieval_spec: dict

    def fold(self, ids: list[str]) -> np.ndarray:
        """f(d) for each document id: the classifier that scores it."""
        return cross_fit_fold(ids, len(self.intercept), self.fold_seed)

    def classifier_probability(self, ids: list[str], texts: list[str]) -> np.ndarray:
        """p(reference | d) = sigmoid(w_f(d) . x(d) + b_f(d)), from the classifier that did not train on d."""
        logits = ngram_features(texts, self.classifier_spec) @ self.coef.astype(np.float64).T + self.intercept
        picked = logits[np.arange(len(ids)), self.fold(ids)]
        return 1.0 / (1.0 + np.exp(-picked))

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
        if clf["coef"].ndim != 2 or "fold_seed" not in clf:
            raise common.StageError(f"{model_dir / CLASSIFIER}: not a cross-fitted classifier (rerun quality_model)")
        index = sparse.csr_matrix((ret["data"], ret["indices"], ret["indptr"]), shape=tuple(ret["shape"]))
        return QualityModel(coef=clf["coef"], intercept=clf["intercept"].astype(np.float64),
                            fold_seed=int(clf["fold_seed"]), classifier_spec=json.loads(str(clf["spec"])),
                            idf=ret["idf"], index=index, retrieval_spec=json.loads(str(ret["spec"])))


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
