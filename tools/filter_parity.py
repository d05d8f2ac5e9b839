"""Filter parity: our rules (stages/filters/) against datatrove's Gopher / C4 / FineWeb filters, rule by rule.

`python tools/filter_parity.py [--ingest-dir DIR] [--write-cases tests/data/filter_parity_cases.jsonl]`

Each of our rules runs alone (default `filter` params, no domain exemptions or overrides) on each document; on the
datatrove side (its own venv, bench/.venv-datatrove, as bench/bench_data.py makes it) the datatrove filter that
implements the rule runs alone too, configured with our thresholds and every other check of that filter switched
off (bench/datatrove_pipeline.py --rule-verdicts), and datatrove's drop reason says whether that rule fired. Both
sides split words on whitespace (datatrove's stock spaCy tokenizer also counts punctuation as words, which would
compare tokenizers, not rules).

Documents: the hand-written HAND_CASES (each probing one definition) and every document of the tiny corpus
(stages.ingest of params' corpus, or --ingest-dir). Prints per-rule agreement. --write-cases commits the
hand-written cases and a corpus sample (the corpus documents on which a rule disagrees, then the ones a rule drops,
shortest first, capped per rule) with datatrove's verdict per rule: the table tests/test_filter.py checks ours
against. A disagreement is allowed only on a rule of DEVIATIONS, whose reason travels into the table; any other
disagreement makes the tool exit 1 without writing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_data  # noqa: E402  (bench/ is put on the path just above)
from stages import common, filters  # noqa: E402
from stages.filters import langid  # noqa: E402

CASES_PER_RULE = 6

# Our rules that deliberately differ from datatrove's, and why (the reasons go into the case table).
DEVIATIONS = {
    "bullet_lines": "lines are the non-empty lines (datatrove's splitlines() counts blank lines in the denominator) "
                    "and the bullets are filter.bullets (datatrove: only U+2022 and '-')",
    "ellipsis_lines": "lines are the non-empty lines (datatrove's splitlines() counts blank lines in the denominator)",
    "boilerplate": "C4 removes javascript/policy lines from the page and never drops it; this stage only keeps or "
                   "drops, so it drops a page whose lines are mostly boilerplate",
    "line_punctuation": "lines are stripped (datatrove tests the line as written: trailing spaces hide its period)",
    "short_lines": "lines are stripped (datatrove counts trailing spaces in a line's length)",
    "duplicate_paragraphs": "paragraphs split on blank lines, whitespace-only ones included, and are stripped "
                            "(datatrove splits on two or more newlines only)",
    "duplicate_paragraph_chars": "paragraphs split on blank lines, whitespace-only ones included, and are stripped "
                                 "(datatrove splits on two or more newlines only)",
    "duplicate_lines": "lines are stripped non-empty lines (datatrove splits on newlines unstripped, so a trailing "
                       "newline adds an empty line)",
    "duplicate_line_chars": "lines are stripped non-empty lines (datatrove counts a repeated line's indentation)",
    "top_ngram": "fraction of word characters (datatrove: n-gram joined with spaces over all characters), and only "
                 "an n-gram seen twice or more scores (datatrove also scores one seen once)",
    "duplicate_ngram": "coverage by every repeated n-gram occurrence, overlaps once, over word characters, as the "
                       "Gopher paper defines it (datatrove scans greedily, skipping n words after a repeat, and "
                       "joins n-grams without spaces, so 'ab c' equals 'a bc')",
    "word_count": "symbol words are words of Unicode P* / ASCII punctuation only (datatrove's PUNCTUATION_SET "
                  "holds 201 P* characters, some symbols and control characters)",
    "mean_word_length": "symbol words are words of Unicode P* / ASCII punctuation only (datatrove's "
                        "PUNCTUATION_SET holds 201 P* characters, some symbols and control characters)",
}
NO_COUNTERPART = {"binary_garbage": "datatrove has no character-garbage filter"}

_PROSE = ("The river runs through the valley and past the town that was built beside it long ago. People have "
          "fished in it for centuries, and the old stone bridge still carries the road to the market on the hill. "
          "In spring the water rises with the snow melt, and the meadows along the banks turn green with new "
          "grass. Children learn to swim in the shallow pool below the mill, where the current is slow.")
_LINES = _PROSE.replace(". ", ".\n")
# (id, text): each probes one definition where ours and datatrove could part.
HAND_CASES = [
    ("prose", _PROSE),
    ("prose_lines", _LINES),
    ("symbol_words_do_not_count", " ".join(["-- | --"] * 10) + " " + " ".join(_PROSE.split()[:45])),
    ("hash_only", _PROSE + " " + " ".join(["#tag"] * 12)),
    ("ellipsis_only", _PROSE + " " + " ".join(["and so on..."] * 10)),
    ("hash_and_ellipsis_each_below", _PROSE + " " + " ".join(["#a b..."] * 6)),
    ("stop_words_capitalized", "The And With " + " ".join(w for w in _PROSE.split() if w.lower() not in
                                                          {"the", "and", "with", "to", "of", "that", "have", "be"})),
    ("stop_words_with_punctuation", " ".join(w for w in _PROSE.split() if w not in {"the", "to", "of", "that"})
     .replace(" and ", " and, ")),
    ("one_stop_word_repeated", " ".join(w for w in _PROSE.split() if w not in {"and", "to", "of", "that"})),
    ("duplicate_paragraphs", "\n\n".join([_PROSE, "A short note.", _PROSE, "A short note.", _PROSE])),
    ("duplicate_paragraph_chars", "\n\n".join([_PROSE, _PROSE[:200], _PROSE])),
    ("duplicate_lines", "\n".join(_LINES.split("\n") + ["Subscribe to the newsletter."] * 4)),
    ("duplicate_line_chars_over_text", "\n".join(_LINES.split("\n") + [_LINES.split("\n")[0]] * 2)),
    ("bullets_with_blank_lines", "\n\n".join(f"- {line}" for line in _LINES.split("\n"))),
    ("ellipsis_lines_with_blank_lines", "\n\n".join(line[:-1] + "..." if i % 2 else line
                                                    for i, line in enumerate(_LINES.split("\n")))),
    ("trailing_spaces_hide_punctuation", "\n".join(line + "   " for line in _LINES.split("\n"))),
    ("short_lines", "\n".join(w + "." for w in _PROSE.split()[:60])),
    ("top_bigram", " ".join(f"{s} click here. click here." for s in _LINES.split("\n"))),
    ("repeated_ngrams", _PROSE + "\n" + _PROSE),
    ("lorem_ipsum", _PROSE + "\nLorem ipsum dolor sit amet."),
    ("curly_brace", _PROSE + "\nThe template renders {title}."),
    ("boilerplate", "\n".join(["This site uses cookies, see the cookie policy.", "Please enable JavaScript.",
                               "Read our terms of use and privacy policy."] + _LINES.split("\n")[:2])),
    ("alpha_words", _PROSE + " " + " ".join(str(n) for n in range(40))),
    ("mean_word_length_short", " ".join(["a b c d to of an in it is"] * 6)),
    ("foreign", "Le fleuve traverse la vallée et passe devant la ville construite à côté il y a longtemps. Les gens "
                "y pêchent depuis des siècles, et le vieux pont de pierre porte encore la route du marché."),
]


def rule_params(fp: dict) -> dict:
    return {**fp, "rules": list(filters.RULES)}


def our_verdicts(texts: list[str], fp: dict) -> dict[str, list[str]]:
    """{rule: ["drop" | "keep" per text]}, each rule alone (language id batched)."""
    out = {rule: ["keep" if fn(filters.Doc(t), fp) is None else "drop" for t in texts]
           for rule, fn in filters.RULES.items() if rule not in NO_COUNTERPART}
    out[langid.LANGUAGE_RULE] = ["keep" if v is None else "drop" for v in langid.language_verdicts(texts, fp)]
    return out


def datatrove_rule_specs(fp: dict) -> dict[str, dict]:
    """{rule: {"name", "kwargs", "drop", "keep"}}: the datatrove filter that implements the rule, with only that
    rule's check on; `drop` / `keep` are the reason prefixes that mean the rule fired / was passed (a check that
    datatrove runs before ours can mask it: any other reason means "not decided")."""
    gq = {k: None for k in ("min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length",
                            "max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                            "max_non_alpha_words_ratio", "min_stop_words")}
    gq["stop_words"] = list(fp["stop_words"])
    c4 = {**bench_data.datatrove_filter_kwargs("C4QualityFilter", fp), "filter_lorem_ipsum": False,
          "filter_javascript": False, "filter_curly_bracket": False, "filter_policy": False}
    fw = {**bench_data.datatrove_filter_kwargs("FineWebQualityFilter", fp), "line_punct_thr": 0.0,
          "short_line_thr": 1.0}
    gr = {"dup_para_frac": None, "dup_para_char_frac": None, "dup_line_frac": None, "dup_line_char_frac": None,
          "top_n_grams": [], "dup_n_grams": []}

    def spec(name, base, drop, keep=(), **on):
        return {"name": name, "kwargs": {**base, **on}, "drop": list(drop), "keep": list(keep)}

    gopher, rep = "GopherQualityFilter", "GopherRepetitionFilter"
    return {
        "word_count": spec(gopher, gq, ["gopher_short_doc", "gopher_long_doc"], min_doc_words=fp["min_words"],
                           max_doc_words=fp["max_words"]),
        "mean_word_length": spec(gopher, gq, ["gopher_below_avg", "gopher_above_avg"],
                                 min_avg_word_length=fp["min_mean_word_length"],
                                 max_avg_word_length=fp["max_mean_word_length"]),
        # datatrove tests hashes, then ellipses, with one threshold: an ellipsis drop means the hashes passed
        "hash_ratio": spec(gopher, gq, ["gopher_too_many_hashes"], ["gopher_too_many_ellipsis"],
                           max_symbol_word_ratio=fp["max_hash_word_ratio"]),
        "ellipsis_ratio": spec(gopher, gq, ["gopher_too_many_ellipsis"],
                               max_symbol_word_ratio=fp["max_ellipsis_word_ratio"]),
        "bullet_lines": spec(gopher, gq, ["gopher_too_many_bullets"], max_bullet_lines_ratio=fp["max_bullet_lines_frac"]),
        "ellipsis_lines": spec(gopher, gq, ["gopher_too_many_end_ellipsis"],
                               max_ellipsis_lines_ratio=fp["max_ellipsis_lines_frac"]),
        "alpha_words": spec(gopher, gq, ["gopher_below_alpha"], max_non_alpha_words_ratio=fp["min_alpha_words_frac"]),
        "stop_words": spec(gopher, gq, ["gopher_enough_stop_words"], min_stop_words=fp["min_stop_words"]),
        "lorem_ipsum": spec("C4QualityFilter", c4, ["lorem_ipsum"], filter_lorem_ipsum=True),
        "curly_braces": spec("C4QualityFilter", c4, ["curly_bracket"], filter_curly_bracket=True),
        "boilerplate": spec("C4QualityFilter", c4, [], filter_javascript=True, filter_policy=True),
        "line_punctuation": spec("FineWebQualityFilter", fw, ["line_punct_ratio"],
                                 line_punct_thr=fp["min_line_punctuation_frac"]),
        "short_lines": spec("FineWebQualityFilter", fw, ["short_line_ratio"], short_line_thr=fp["max_short_lines_frac"]),
        "duplicate_paragraphs": spec(rep, gr, ["dup_para_frac"], dup_para_frac=fp["max_dup_paragraphs_frac"]),
        "duplicate_paragraph_chars": spec(rep, gr, ["dup_para_char_frac"],
                                          dup_para_char_frac=fp["max_dup_paragraph_chars_frac"]),
        "duplicate_lines": spec(rep, gr, ["dup_line_frac"], dup_line_frac=fp["max_dup_lines_frac"]),
        "duplicate_line_chars": spec(rep, gr, ["dup_line_char_frac"], dup_line_char_frac=fp["max_dup_line_chars_frac"]),
        "top_ngram": spec(rep, gr, ["top_"], top_n_grams=fp["max_top_ngram_chars_frac"]),
        "duplicate_ngram": spec(rep, gr, ["duplicated_"], dup_n_grams=fp["max_dup_ngram_chars_frac"]),
        langid.LANGUAGE_RULE: spec("langid", {}, ["dropped"], **bench_data.datatrove_filter_kwargs("langid", fp)),
    }


def datatrove_verdicts(python: Path, texts: list[str], fp: dict) -> dict[str, list[str | None]]:
    """{rule: ["drop" | "keep" | None (masked or undefined) per text]} from datatrove, each filter alone."""
    specs = datatrove_rule_specs(fp)
    cfg = {"tokenizer": "whitespace", "docs": texts,
           "rules": {r: {"name": s["name"], "kwargs": s["kwargs"]} for r, s in specs.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parity.json"
        path.write_text(json.dumps(cfg), encoding="utf-8")
        out = subprocess.run([str(python), str(bench_data.DATATROVE_SCRIPT), "--rule-verdicts", str(path)],
                             capture_output=True, text=True, check=True, env={**os.environ, **bench_data.CHILD_ENV})
    raw = json.loads(out.stdout.strip().splitlines()[-1])

    def verdict(result, s) -> str | None:
        if result is True:
            return "keep"
        if any(result.startswith(p) for p in s["drop"]):
            return "drop"
        return "keep" if any(result.startswith(p) for p in s["keep"]) else None

    return {r: [verdict(x, specs[r]) for x in raw[r]] for r in specs}


def corpus_texts(ingest_dir: Path) -> list[tuple[str, str]]:
    """(id, text) of every document of the ingest shards, in shard order."""
    return [
        (f"corpus:{shard}:{row['id'][:12]}", row["text"])
        for shard in common.list_shards(ingest_dir)
        for batch in common.iter_record_batches(ingest_dir / f"{shard}.parquet", columns=["id", "text"])
        for row in batch.to_pylist()]


def agreement(ours: dict, theirs: dict) -> dict[str, dict]:
    """Per rule: documents compared (datatrove decided), agreeing, dropped by ours only, by datatrove only."""
    table = {}
    for rule, mine in ours.items():
        pairs = [(a, b) for a, b in zip(mine, theirs[rule]) if b is not None]
        table[rule] = {"compared": len(pairs), "agree": sum(a == b for a, b in pairs),
                       "ours_only": sum(a == "drop" and b == "keep" for a, b in pairs),
                       "datatrove_only": sum(a == "keep" and b == "drop" for a, b in pairs)}
    return table


def print_agreement(title: str, table: dict[str, dict]) -> None:
    print(f"\n{title}\n{'rule':<28} {'compared':>9} {'agree':>7} {'agree %':>8} {'ours only':>10} {'dt only':>8}")
    for rule, row in table.items():
        pct = 100 * row["agree"] / row["compared"] if row["compared"] else float("nan")
        mark = "  (deviation: see DEVIATIONS)" if rule in DEVIATIONS and row["agree"] < row["compared"] else ""
        print(f"{rule:<28} {row['compared']:>9} {row['agree']:>7} {pct:>7.1f}% {row['ours_only']:>10} "
              f"{row['datatrove_only']:>8}{mark}")
    for rule, why in NO_COUNTERPART.items():
        print(f"{rule:<28} not compared: {why}")


def select_cases(ids: list[str], texts: list[str], ours: dict, theirs: dict) -> list[int]:
    """Corpus documents for the table: per rule, disagreements then drops, shortest first, CASES_PER_RULE each."""
    chosen: list[int] = []
    by_length = sorted(range(len(texts)), key=lambda i: (len(texts[i]), ids[i]))
    for rule in ours:
        for want in (lambda i: theirs[rule][i] is not None and ours[rule][i] != theirs[rule][i],
                     lambda i: ours[rule][i] == "drop"):
            picked = [i for i in by_length if want(i) and i not in chosen][:CASES_PER_RULE]
            chosen += picked
    return sorted(chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--ingest-dir", default=None, help="ingest shards of the corpus (default: stages.ingest into a "
                                                       "temporary directory)")
    ap.add_argument("--datatrove-venv", default=str(REPO / "bench" / ".venv-datatrove"))
    ap.add_argument("--write-cases", default=None, help="write the case table here")
    args = ap.parse_args()
    fp = rule_params(common.stage_params(common.load_params(args.params), "filter"))
    python = bench_data.ensure_datatrove_venv(Path(args.datatrove_venv))
    with tempfile.TemporaryDirectory() as tmp:
        ingest_dir = Path(args.ingest_dir) if args.ingest_dir else Path(tmp) / "ingest"
        if not args.ingest_dir:
            subprocess.run([sys.executable, "-m", "stages.ingest", "--params", args.params, "--output-dir",
                            str(ingest_dir)], check=True, cwd=REPO, capture_output=True)
        corpus = corpus_texts(ingest_dir)
    ids = [i for i, _ in HAND_CASES] + [i for i, _ in corpus]
    texts = [t for _, t in HAND_CASES] + [t for _, t in corpus]
    ours, theirs = our_verdicts(texts, fp), datatrove_verdicts(python, texts, fp)
    n_hand = len(HAND_CASES)
    print_agreement(f"hand-written cases ({n_hand})", agreement({r: v[:n_hand] for r, v in ours.items()},
                                                                {r: v[:n_hand] for r, v in theirs.items()}))
    print_agreement(f"tiny corpus ({len(corpus)} documents)", agreement({r: v[n_hand:] for r, v in ours.items()},
                                                                        {r: v[n_hand:] for r, v in theirs.items()}))
    unexplained = sorted({r for r in ours if r not in DEVIATIONS for a, b in zip(ours[r], theirs[r])
                          if b is not None and a != b})
    if unexplained:
        raise SystemExit(f"filter_parity: rules disagree with datatrove without a listed deviation: {unexplained}")
    if args.write_cases:
        rows = list(range(n_hand)) + [n_hand + i for i in select_cases(ids[n_hand:], texts[n_hand:],
                                                                          {r: v[n_hand:] for r, v in ours.items()},
                                                                          {r: v[n_hand:] for r, v in theirs.items()})]
        with open(args.write_cases, "w", encoding="utf-8") as fh:
            for i in rows:
                differs = {r: DEVIATIONS[r] for r in ours if theirs[r][i] is not None and ours[r][i] != theirs[r][i]}
                fh.write(json.dumps({"id": ids[i], "text": texts[i], "datatrove": {r: theirs[r][i] for r in ours},
                                     "differs": differs}, ensure_ascii=False, sort_keys=True) + "\n")
        print(f"\nwrote {len(rows)} cases to {args.write_cases}")


if __name__ == "__main__":
    main()
