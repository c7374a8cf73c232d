#!/usr/bin/env python3
"""Real English text without a hub: Wikipedia articles from the gensim wheel's test data.

    python scripts/get_wikitext.py --out data/wiki.txt [--jsonl data/wiki.jsonl] [--force]
                                   [--wheel PATH] [--tokenizer models/SmolLM2-135M-Instruct]

``pip download --no-deps gensim==4.4.0`` (wheel only) into a temp dir (gensim is NOT installed), then read
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
out of the wheel with zipfile + bz2, and extract plain article prose (CC BY-SA, Wikipedia).

Output format (``--out``, UTF-8): one article per block, blocks separated by ONE blank line;
inside a block the article's paragraphs are separated by single newlines, so
``text.split("\\n\\n")`` gives the articles. No titles, no markup. Articles in dump order.
``--jsonl`` optionally also writes ``{"title": ..., "text": ...}`` lines (same texts).

Cleaning (deterministic, regex based): only main-namespace pages that are not redirects or
disambiguation pages; drop comments, <ref>s, <math>/<gallery>/... blocks, tables {| |}, templates
{{...}} (a few inline ones keep their text: lang, convert, nowrap, ...), File:/Image:/Category: and
interlanguage links, headings, list/indent lines; [[a|b]] -> b, [[a]] -> a, [url text] -> text;
bold/italic quotes and html tags removed, entities unescaped; the article stops at the first
"See also"/"References"/"External links"/... section; paragraphs shorter than 40 characters and
articles shorter than --min-chars are dropped.
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

# Pinned: the extracted text (and so every perplexity measured on it) depends on this file.
GENSIM = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

STOP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "literature", "external link", "reference", "note",
}
DROP_TAGS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "pre",
             "imagemap", "chem", "ce", "hiero", "graph", "mapframe", "table", "code")
# File/Image/Category and language links: [[File:...]] etc. are dropped with their captions.
DROP_LINK_PREFIX = re.compile(r"^\s*:?\s*((?i:file|image|category|media|wikipedia|wp|wikt|wiktionary|s|q|commons)|"
                              r"[a-z]{2,3}(-[a-z]+)?)\s*:")
KEEP_LAST_ARG_TEMPLATES = {"lang", "nowrap", "nobr", "small", "smaller", "big", "em", "strong", "transl",
                           "ill", "sic", "nowrap begin", "vanchor", "visible anchor", "lang-la"}


# ----------------------------------------------------------------------------------------------
# Pure helpers (no network, no model; not yet covered by tests/)
# ----------------------------------------------------------------------------------------------
def _template_text(body: str) -> str:
    """Text a few inline templates stand for; "" for every other template."""
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]
    if name.startswith("lang-") and args:
        return args[-1]
    if name in KEEP_LAST_ARG_TEMPLATES and args:
        return args[-1] if name != "ill" else args[0]
    if name in ("convert", "cvt") and len(args) >= 2:
        if len(args) >= 4 and args[1] in ("-", "to", "and", "or", "–"):
            return f"{args[0]}{'–' if args[1] == '-' else ' ' + args[1] + ' '}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name in ("'", "' \""):
        return "'"
    if name in ("snd", "spaced ndash", "ndash", "spaced en dash"):
        return " – "
    if name in ("mdash", "spaced mdash"):
        return " — "
    return ""


def strip_templates(text: str) -> str:
    """Remove {{...}} (innermost first, so nesting works); a few inline ones keep their text."""
    rx = re.compile(r"\{\{([^{}]*)\}\}", re.S)
    for _ in range(50):
        new = rx.sub(lambda m: _template_text(m.group(1)), text)
        if new == text:
            break
        text = new
    return text


def strip_tables(text: str) -> str:
    rx = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
    for _ in range(20):
        new = rx.sub("", text)
        if new == text:
            break
        text = new
    return text


def strip_links(text: str) -> str:
    """[[File:..[[x]]..]] -> "" (nested captions), [[a|b]] -> b, [[a]] -> a."""
    out = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("[[", i):
            # find the matching ]] with nesting
            depth, j = 0, i
            while j < n:
                if text.startswith("[[", j):
                    depth += 1
                    j += 2
                elif text.startswith("]]", j):
                    depth -= 1
                    j += 2
                    if depth == 0:
                        break
                else:
                    j += 1
            inner = text[i + 2 : j - 2] if depth == 0 else text[i + 2 :]
            if DROP_LINK_PREFIX.match(inner):
                out.append("")
            else:
                inner = strip_links(inner)
                target, _, label = inner.partition("|")
                label = label.split("|")[-1] if label else target
                # [[a]]s -> as (link trail)
                m = re.match(r"[a-z]+", text[j:]) if depth == 0 else None
                if m:
                    label += m.group()
                    j += m.end()
                out.append(label.lstrip(":"))
            i = j
        else:
            k = text.find("[[", i)
            k = n if k < 0 else k
            out.append(text[i:k])
            i = k
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Wiki markup -> plain prose paragraphs joined by single newlines ("" if nothing is left)."""
    t = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    t = html.unescape(t) if "&lt;" in t else t
    for tag in DROP_TAGS:
        t = re.sub(rf"<{tag}\b[^>/]*/>", "", t, flags=re.I)
        t = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", t, flags=re.I | re.S)
    t = strip_tables(t)
    t = strip_templates(t)
    t = strip_tables(t)
    t = strip_links(t)
    # external links
    t = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?:|ftp:)?//[^\]]*\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<br\s*/?>", " ", t, flags=re.I)
    t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    t = html.unescape(t).replace("\u00a0", " ")

    paras = []
    for line in t.split("\n"):
        s = line.strip()
        h = re.match(r"^(=+)\s*(.*?)\s*\1$", s)
        if h:
            if h.group(2).lower() in STOP_SECTIONS:
                break
            continue
        if not s or s[0] in "*#:;|!{}=":
            continue
        s = re.sub(r"\(\s*[,;:]?\s*\)", "", s)           # "()" left by removed templates
        s = re.sub(r"\(\s*[,;]\s*", "(", s)
        s = re.sub(r"[ \t]+", " ", s)
        s = re.sub(r" +([,.;:])", r"\1", s)
        s = s.strip()
        if len(s) < 40 or "{{" in s or "}}" in s or "[[" in s:
            continue
        paras.append(s)
    return "\n".join(paras)


def iter_pages(xml_text: str):
    """(title, wikitext) of main-namespace, non-redirect pages, in dump order."""
    root = ET.fromstring(xml_text)
    nsuri = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{nsuri}page"):
        if (page.findtext(f"{nsuri}ns") or "0") != "0" or page.find(f"{nsuri}redirect") is not None:
            continue
        title = page.findtext(f"{nsuri}title") or ""
        text = page.findtext(f"{nsuri}revision/{nsuri}text") or ""
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        yield title, text


def extract_articles(xml_text: str, min_chars: int = 500) -> list[tuple[str, str]]:
    arts = []
    for title, wikitext in iter_pages(xml_text):
        if "(disambiguation)" in title or re.search(r"\{\{\s*(disambig|dab|disambiguation)", wikitext, re.I):
            continue
        text = clean_wikitext(wikitext)
        if len(text) >= min_chars:
            arts.append((title, text))
    return arts


# ----------------------------------------------------------------------------------------------
def download_wheel(dest: Path) -> Path:
    """pip-download the pinned gensim wheel (not installed). The test-data file is the same in
    every platform's wheel; if this interpreter has no wheel of that version (e.g. a newer
    Python), fetch the CPython 3.11 manylinux one instead, which is only unzipped, never run."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary=:all:", "-d", str(dest)]
    attempts = [base + [GENSIM],
                base + ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                        "--platform", "manylinux_2_28_x86_64", GENSIM]]
    for cmd in attempts:
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode == 0:
            wheels = sorted(dest.glob("gensim-*.whl"))
            if wheels:
                return wheels[0]
    raise SystemExit(f"pip download produced no {GENSIM} wheel in {dest}")


def write_atomic(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/wiki.txt")
    ap.add_argument("--jsonl", help="also write {title, text} JSON lines here")
    ap.add_argument("--wheel", help="use this gensim wheel instead of pip download")
    ap.add_argument("--min-chars", type=int, default=500)
    ap.add_argument("--tokenizer", default="models/SmolLM2-135M-Instruct",
                    help="count tokens with this tokenizer dir, if it exists")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.is_file() and out.stat().st_size > 0 and not args.force and (not args.jsonl or Path(args.jsonl).is_file()):
        print(f"{out}: already there ({out.stat().st_size} bytes); nothing to do (use --force to redo)")
        return 0

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gensim-dl-") as dl:
        wheel = Path(args.wheel) if args.wheel else download_wheel(Path(dl))
        print(f"wheel: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)", flush=True)
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MEMBER)
    xml_text = bz2.decompress(raw).decode("utf-8")
    arts = extract_articles(xml_text, args.min_chars)
    body = "\n\n".join(text for _, text in arts) + "\n"
    write_atomic(out, body)
    if args.jsonl:
        write_atomic(Path(args.jsonl), "".join(json.dumps({"title": t, "text": x}, ensure_ascii=False) + "\n" for t, x in arts))
    n_pages = sum(1 for _ in iter_pages(xml_text))
    msg = (f"wrote {out}: {len(arts)} articles (of {n_pages} main-namespace pages), {len(body)} characters, "
           f"{out.stat().st_size} bytes, sha256 {hashlib.sha256(body.encode()).hexdigest()[:16]}")
    tok_dir = Path(args.tokenizer)
    if (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        lens = [len(e.ids) for e in tok.encode_batch([t for _, t in arts], add_special_tokens=False)]
        msg += (f"; {sum(lens)} SmolLM2 tokens (per article min {min(lens)}, median {sorted(lens)[len(lens) // 2]}, "
                f"max {max(lens)}; {sum(1 for n in lens if n >= 513)} articles >= 513 tokens)")
    print(msg + f" in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
