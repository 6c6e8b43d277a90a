"""A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) and TREC runs, read strictly:
a bad line is a `DataFormatError` naming the file, the line and what was expected."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .records import DataFormatError


@dataclass(frozen=True)
class BeirCollection:
    corpus: dict[str, str]                 # docid -> "title text"
    queries: dict[str, str]                # qid -> text
    qrels: dict[str, dict[str, int]]       # qid -> {docid: grade}, the split's judgments


def _jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            for name in fields:
                if not isinstance(obj, dict) or not isinstance(obj.get(name), (str, int)) or isinstance(obj.get(name), bool):
                    raise DataFormatError(f"{path}:{lineno}: field '{name}': expected a string")
            rows.append(obj)
    if not rows:
        raise DataFormatError(f"{path}: empty, expected one JSON object per line")
    return rows


def read_beir(beir_dir: str | Path, split: str = "test") -> BeirCollection:
    """The corpus, the queries and the split's qrels; qrels must name known queries. They may judge
    documents the corpus lacks (a corpus cut down to some first stage's candidates): those have no text."""
    beir_dir = Path(beir_dir)
    corpus = {str(d["_id"]): f"{d.get('title') or ''} {d['text']}".strip()
              for d in _jsonl(beir_dir / "corpus.jsonl", ("_id", "text"))}
    queries = {str(q["_id"]): str(q["text"]) for q in _jsonl(beir_dir / "queries.jsonl", ("_id", "text"))}
    path = beir_dir / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (is --split right?)")
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with path.open(encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, start=1):
            if lineno == 1 and row[:1] == ["query-id"]:
                continue
            if len(row) != 3:
                raise DataFormatError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'")
            qid, docid, grade = row
            try:
                qrels[qid][docid] = int(grade)
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: score: expected an integer grade, got {grade!r}") from None
            if qid not in queries:
                raise DataFormatError(f"{path}:{lineno}: query-id {qid!r} is not in queries.jsonl")
    if not qrels:
        raise DataFormatError(f"{path}: no judgment")
    return BeirCollection(corpus, queries, dict(qrels))


def read_run(path: str | Path, corpus: dict[str, str] | None = None) -> dict[str, list[str]]:
    """qid -> docids best first (score descending, ties by docid descending as trec_eval); with `corpus`,
    a docid it does not hold is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such run file")
    run: dict[str, list[tuple[float, str]]] = defaultdict(list)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise DataFormatError(f"{path}:{lineno}: expected 'qid Q0 docid rank score tag', got {len(parts)} fields")
            try:
                score = float(parts[4])
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: score: expected a number, got {parts[4]!r}") from None
            if corpus is not None and parts[2] not in corpus:
                raise DataFormatError(f"{path}:{lineno}: docid {parts[2]!r} is not in the corpus")
            run[parts[0]].append((score, parts[2]))
    if not run:
        raise DataFormatError(f"{path}: empty run")
    return {qid: [d for _, d in sorted(rows, key=lambda x: (x[0], x[1].encode()), reverse=True)]
            for qid, rows in run.items()}
