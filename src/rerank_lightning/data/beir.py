"""A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) and TREC runs, read strictly:
a bad line is a `DataFormatError` naming the file, the line and what was expected (or, where the
caller allows it, a counted skip)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Container

from .records import DataFormatError


@dataclass(frozen=True)
class BeirCollection:
    corpus: dict[str, str]                 # docid -> "title text"
    queries: dict[str, str]                # qid -> text
    qrels: dict[str, dict[str, int]]       # qid -> {docid: grade}, the split's judgments


def passage_text(doc: dict) -> str:
    """A corpus entry as the passage the reranker reads: "title text"."""
    return f"{doc.get('title') or ''} {doc['text']}".strip()


def read_beir(beir_dir: str | Path, split: str = "test") -> BeirCollection:
    """The corpus, the queries and the split's qrels; qrels must name known queries. They may judge
    documents the corpus lacks (a corpus cut down to some first stage's candidates): those have no text."""
    beir_dir = Path(beir_dir)
    corpus = {docid: passage_text(doc) for _, docid, doc in read_beir_jsonl(beir_dir / "corpus.jsonl", "document")}
    if not corpus:
        raise DataFormatError(f"{beir_dir / 'corpus.jsonl'}: empty, expected one JSON object per line")
    queries = {qid: obj["text"] for _, qid, obj in read_beir_jsonl(beir_dir / "queries.jsonl", "query")}
    path = beir_dir / "qrels" / f"{split}.tsv"
    qrels = read_qrels(path, queries)
    if not qrels:
        raise DataFormatError(f"{path}: no judgment")
    return BeirCollection(corpus, queries, qrels)


def read_run(path: str | Path, corpus: dict[str, str] | None = None) -> dict[str, list[str]]:
    """qid -> docids best first (trec_eval's order); with `corpus`, a docid it does not hold is an error."""
    run = read_trec_run(path)
    if not run:
        raise DataFormatError(f"{path}: empty run")
    if corpus is not None:
        for qid, docs in run.items():
            for docid, (_, lineno) in docs.items():
                if docid not in corpus:
                    raise DataFormatError(f"{path}:{lineno}: docid {docid!r} is not in the corpus")
    return {qid: [d for _, d in trec_order([(score, d) for d, (score, _) in docs.items()])]
            for qid, docs in run.items()}


def trec_order(ranked: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """(score, docid) pairs in trec_eval's rank order: score descending, then docid descending (bytes)."""
    return sorted(ranked, key=lambda sd: (sd[0], sd[1].encode("utf-8")), reverse=True)


def text_lines(path: Path):
    """(line number, text) of a UTF-8 text file; a line that is not UTF-8 is a DataFormatError."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: not UTF-8 text (byte {err.start} of the line)") from None


def json_lines(path: Path):
    """(line number, JSON value) for each non-blank line of a JSONL file; a line that is not UTF-8 or
    not JSON is a DataFormatError naming it."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
        yield lineno, value


def read_beir_jsonl(path: Path, what: str):
    """(line number, object with a string `_id` and `text`) for each non-blank line of a BEIR JSONL file."""
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    for lineno, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object with _id and text")
        _id = obj.get("_id")
        if isinstance(_id, bool) or not isinstance(_id, (str, int)) or not str(_id).strip():
            raise DataFormatError(f"{path}:{lineno}: field '_id': expected a non-empty string, got {_id!r}")
        for key in ("text", "title") if what == "document" else ("text",):
            value = obj.get(key)
            if not isinstance(value, str) and not (key == "title" and value is None):
                raise DataFormatError(f"{path}:{lineno}: field '{key}': expected a string, got {value!r}")
        yield lineno, str(_id), obj


def read_qrels(path: Path, queries: Container[str] | None = None) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (`query-id<TAB>corpus-id<TAB>score`, a header line first): {qid: {docid: grade}}.
    With `queries`, a query-id they do not hold is an error."""
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.tsv"))
        raise DataFormatError(f"{path}: no qrels for split '{path.stem}' (splits found: {found or 'none'})")
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for lineno, line in text_lines(path):
        fields = line.rstrip("\r\n").split("\t")
        if lineno == 1 and fields == ["query-id", "corpus-id", "score"] or not line.strip():
            continue
        if len(fields) != 3:
            raise DataFormatError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score', "
                                  f"got {len(fields)} tab-separated fields")
        qid, docid, grade = fields
        try:
            value = int(grade)
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: field 'score': expected an integer grade, got {grade!r}") from None
        if queries is not None and qid not in queries:
            raise DataFormatError(f"{path}:{lineno}: query-id {qid!r} is not in queries.jsonl")
        if docid in qrels[qid] and qrels[qid][docid] != value:
            raise DataFormatError(f"{path}:{lineno}: query {qid!r} document {docid!r} is judged twice "
                                  f"({qrels[qid][docid]} and {value})")
        qrels[qid][docid] = value
    return dict(qrels)


def read_trec_run(path: str | Path, on_error: str = "raise",
                  skipped: Counter | None = None) -> dict[str, dict[str, tuple[float, int]]]:
    """A TREC run (`qid Q0 docid rank score tag` per line): {qid: {docid: (score, line number)}}.

    The rank column is ignored (trec_eval ranks by score). A line with the wrong number of columns or a
    score that is not a finite number, or a (qid, docid) seen before, is an error, or with
    `on_error="skip"` a counted skip (`skipped`; a duplicate keeps its first line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such run file")
    skipped = Counter() if skipped is None else skipped
    run: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
    for lineno, line in text_lines(path):
        parts = line.split()
        if not parts:
            continue
        problem, what = None, ""
        if len(parts) != 6:
            problem, what = "malformed run lines", f"expected 6 columns 'qid Q0 docid rank score tag', got {len(parts)}"
        else:
            qid, docid, score = parts[0], parts[2], _number(parts[4])
            if score is None:
                problem, what = "malformed run lines", f"field 'score' (column 5): expected a number, got {parts[4]!r}"
            elif docid in run[qid]:
                problem = "duplicate run lines"
                what = f"document {docid!r} appears twice for query {qid!r} (first on line {run[qid][docid][1]})"
        if problem:
            report_problem(f"{path}:{lineno}: {what}", problem, on_error, skipped)
            continue
        run[qid][docid] = (score, lineno)
    return dict(run)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def report_problem(message: str, kind: str, on_error: str, skipped: Counter) -> None:
    if on_error == "raise":
        raise DataFormatError(f"{message} (on_error=skip skips such lines and counts them)")
    skipped[kind] += 1
