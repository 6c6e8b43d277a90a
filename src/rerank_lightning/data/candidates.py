"""Evaluation data (SPEC 8): candidate lists, or a BEIR folder plus a TREC run to rerank."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..eval.metrics import docid_tie_order
from .formatting import PairFormatter
from .records import DataFormatError


@dataclass(frozen=True)
class CandidateList:
    """One query and the passages to rerank for it, with graded labels."""

    qid: str
    query: str
    docids: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]


def _candidate(path: Path, lineno: int, j: int, cand: Any) -> tuple[str, str, int]:
    where = f"{path}:{lineno}: field 'candidates[{j}]"
    if not isinstance(cand, dict):
        raise DataFormatError(f"{where}': expected an object with docid, text, label")
    docid, text, label = cand.get("docid"), cand.get("text"), cand.get("label")
    if not isinstance(docid, (str, int)) or isinstance(docid, bool):
        raise DataFormatError(f"{where}.docid': expected a string, got {docid!r}")
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}.text': expected a non-empty string, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataFormatError(f"{where}.label': expected an integer relevance grade, got {label!r}")
    return str(docid), text, label


def load_candidate_lists(path: str | Path, max_queries: int | None = None) -> list[CandidateList]:
    """`{"qid", "query", "candidates": [{"docid", "text", "label"}]}` per line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such candidate-list file")
    lists: list[CandidateList] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object")
        query, cands = obj.get("query"), obj.get("candidates")
        if not isinstance(query, str) or not query.strip():
            raise DataFormatError(f"{path}:{lineno}: field 'query': expected a non-empty string, got {query!r}")
        if not isinstance(cands, list) or not cands:
            raise DataFormatError(f"{path}:{lineno}: field 'candidates': expected a non-empty list")
        rows = [_candidate(path, lineno, j, c) for j, c in enumerate(cands)]
        docids, texts, labels = zip(*rows)
        if len(set(docids)) != len(docids):
            raise DataFormatError(f"{path}:{lineno}: field 'candidates': docids must be unique within a query")
        lists.append(CandidateList(str(obj.get("qid", lineno)), query, docids, texts, labels))
        if max_queries is not None and len(lists) >= max_queries:
            break
    if not lists:
        raise DataFormatError(f"{path}: no candidate list")
    return lists


def load_beir_rerank(beir_dir: str | Path, run_file: str | Path, split: str = "test",
                     top_k: int = 100) -> list[CandidateList]:
    """BEIR corpus/queries/qrels plus a TREC run: each query's top-k first-stage results, labelled by qrels.

    Relevant documents the run missed are not candidates, so they do not enter the ideal DCG.
    """
    beir_dir = Path(beir_dir)
    corpus = {}
    for line in (beir_dir / "corpus.jsonl").open(encoding="utf-8"):
        doc = json.loads(line)
        corpus[str(doc["_id"])] = f"{doc.get('title', '')} {doc['text']}".strip()
    queries = {str(q["_id"]): q["text"] for q in map(json.loads, (beir_dir / "queries.jsonl").open(encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (beir_dir / "qrels" / f"{split}.tsv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    run: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for lineno, line in enumerate(Path(run_file).open(encoding="utf-8"), start=1):
        parts = line.split()
        if len(parts) != 6:
            raise DataFormatError(f"{run_file}:{lineno}: expected 'qid Q0 docid rank score tag'")
        run[parts[0]].append((float(parts[4]), parts[2]))
    lists = []
    for qid in sorted(run):
        if qid not in queries or qid not in qrels:
            continue
        top = sorted(run[qid], key=lambda x: (-x[0], x[1]))[:top_k]
        docids = tuple(d for _, d in top if d in corpus)
        lists.append(CandidateList(qid, queries[qid], docids, tuple(corpus[d] for d in docids),
                                   tuple(qrels[qid].get(d, 0) for d in docids)))
    return lists


class CandidatePairs(Dataset):
    """Every (query, candidate) pair of some candidate lists, formatted for scoring (no label token).

    With the Matryoshka formatter each item also carries `query_length` and `prompt_length` (SPEC 4).
    """

    def __init__(self, lists: list[CandidateList], formatter: PairFormatter):
        self.lists, self.formatter = lists, formatter
        self.index = [(qi, ci) for qi, cl in enumerate(lists) for ci in range(len(cl.docids))]
        self.tie_order = [docid_tie_order([list(cl.docids)])[0].tolist() for cl in lists]
        self._query_ids = [formatter.query_ids(cl.query) for cl in lists]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        qi, ci = self.index[i]
        fmt = self.formatter
        ids, query_length, prompt_length = fmt.layout(
            self._query_ids[qi], fmt.passage_ids(self.lists[qi].texts[ci]), fmt.prompt_ids())
        item = {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "query_index": qi,
            "candidate_index": ci,
            "label": self.lists[qi].labels[ci],
            "tie_order": self.tie_order[qi][ci],
        }
        if fmt.carries_lengths:
            item["query_length"], item["prompt_length"] = query_length, prompt_length
        return item


def collate_candidates(items: list[dict[str, Any]], collate_pairs) -> dict[str, Any]:
    """Pads the pairs with the training collator (the instruction one: groups of encodings); keeps where
    each score belongs, and the Matryoshka lengths as `query_lengths` / `prompt_lengths` when present."""
    batch = collate_pairs([[{"input_ids": it["input_ids"], "attention_mask": it["attention_mask"]}] for it in items])
    out = {"pair": batch["pair"]}
    for key in ("query_index", "candidate_index", "label", "tie_order"):
        out[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
    if "query_length" in items[0]:
        out["query_lengths"] = torch.tensor([it["query_length"] for it in items], dtype=torch.long)
        out["prompt_lengths"] = torch.tensor([it["prompt_length"] for it in items], dtype=torch.long)
    return out
