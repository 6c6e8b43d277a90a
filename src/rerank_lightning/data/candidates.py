"""Evaluation data (SPEC 8): candidate lists, or a BEIR folder plus a TREC run to rerank."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from .beir import json_lines, passage_text, read_beir_jsonl, read_qrels, read_trec_run, report_problem, trec_order
from .formatting import PairFormatter
from .records import DataFormatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateList:
    """One query and the passages to rerank for it, with graded labels (0: unjudged).

    `qrels`: every judgement of the query (docid -> grade), when the candidates come from a run over a
    larger collection (BEIR + run); None for a candidate-list file, whose labels are all it knows.
    `run_scores`: the first-stage run's score of each candidate (BEIR + run); None for a candidate-list file.
    """

    qid: str
    query: str
    docids: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    qrels: Mapping[str, int] | None = field(default=None, compare=False)
    run_scores: tuple[float, ...] | None = field(default=None, compare=False)


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
    for lineno, obj in json_lines(path):
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


def docid_tie_order(docids: list[list[str]], width: int | None = None) -> torch.Tensor:
    """[Q, width] long tensor such that the metrics break score ties like trec_eval (padding gets -1).

    trec_eval sorts a query's run by score descending, then by docno descending in strcmp (byte) order,
    ignoring the order of the run file: e.g. tied docs rank "zz" > "b" > "ab" > "a" > "Z" > "B" > "9" > "10".
    So the tie order of a doc is its position in ascending byte order of the query's docids.
    """
    width = max((len(ids) for ids in docids), default=0) if width is None else width
    out = torch.full((len(docids), width), -1, dtype=torch.long)
    for i, ids in enumerate(docids):  # string sorting is inherently per query; this is preprocessing
        if len(ids) > width:
            raise ValueError(f"query {i} has {len(ids)} docids > width {width}")
        ascending = sorted(range(len(ids)), key=lambda j: ids[j].encode("utf-8"))
        out[i, ascending] = torch.arange(len(ids))
    return out


def query_judgements(lists: list[CandidateList]) -> dict[str, torch.Tensor]:
    """What the metrics need beyond the labels (`ranking_metrics`' `judged` and `judged_grades`):
    judged [Q, C] bool (the qrels judge the candidate), judged_grades [Q, J] float (every grade of the
    query's qrels, NaN padding). A list without qrels (a candidate-list file) has its labels as its only
    judgements: every candidate judged, the ideal DCG and the relevant count taken among the candidates."""
    width = max((len(cl.docids) for cl in lists), default=0)
    grades = [list(cl.qrels.values()) if cl.qrels is not None else list(cl.labels) for cl in lists]
    judged = torch.zeros(len(lists), width, dtype=torch.bool)
    judged_grades = torch.full((len(lists), max(map(len, grades), default=0)), float("nan"), dtype=torch.float64)
    for qi, (cl, g) in enumerate(zip(lists, grades)):
        judged[qi, : len(cl.docids)] = torch.tensor([cl.qrels is None or d in cl.qrels for d in cl.docids])
        judged_grades[qi, : len(g)] = torch.tensor(g, dtype=torch.float64)
    return {"judged": judged, "judged_grades": judged_grades}


def load_beir_rerank(beir_dir: str | Path, run_file: str | Path, split: str | None = "test",
                     top_k: int = 100, on_error: str = "raise",
                     skipped: Counter | None = None) -> list[CandidateList]:
    """BEIR corpus/queries/qrels plus a TREC run: each query's top-k first-stage results (trec_eval's order),
    labelled by qrels (0 where unjudged), in qid order.

    Each list carries its query's full qrels (`CandidateList.qrels`), so the metrics count relevant
    documents the run missed, as trec_eval does. Run queries without qrels are not evaluated (trec_eval's
    rule; counted in `skipped`). `split=None` reads no qrels: every run query is kept (reranking only).
    A run line naming a query missing from queries.jsonl or a document missing from corpus.jsonl (among
    the top k), a malformed or duplicate run line: an error, or with `on_error="skip"` a counted skip.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    beir_dir = Path(beir_dir)
    if not beir_dir.is_dir():
        raise DataFormatError(f"{beir_dir}: no such BEIR folder")
    skipped = Counter() if skipped is None else skipped
    before = sum(skipped.values())
    qrels = read_qrels(beir_dir / "qrels" / f"{split}.tsv") if split is not None else None
    run = read_trec_run(run_file, on_error, skipped)
    queries = {qid: obj["text"] for _, qid, obj in read_beir_jsonl(beir_dir / "queries.jsonl", "query")}
    top = {}
    for qid in sorted(run):
        if qrels is not None and qid not in qrels:
            skipped["run queries without qrels (not evaluated)"] += 1
            continue
        if qid not in queries:
            line = min(line for _, line in run[qid].values())
            report_problem(f"{run_file}:{line}: query {qid!r} is not in {beir_dir / 'queries.jsonl'}",
                     "run queries not in queries.jsonl", on_error, skipped)
            continue
        top[qid] = trec_order([(score, docid) for docid, (score, _) in run[qid].items()])[:top_k]
    wanted = {docid for ranked in top.values() for _, docid in ranked}
    corpus = {}
    for _, docid, doc in read_beir_jsonl(beir_dir / "corpus.jsonl", "document"):
        if docid in wanted:
            corpus[docid] = passage_text(doc)
    lists = []
    for qid, ranked in top.items():
        docids, run_scores = [], []
        for score, docid in ranked:
            if docid in corpus:
                docids.append(docid)
                run_scores.append(score)
            else:
                report_problem(f"{run_file}:{run[qid][docid][1]}: document {docid!r} is not in "
                         f"{beir_dir / 'corpus.jsonl'}", "run lines with a document not in the corpus",
                         on_error, skipped)
        if not docids:
            skipped["queries left without candidates"] += 1
            continue
        judgements = qrels[qid] if qrels is not None else {}
        lists.append(CandidateList(qid, queries[qid], tuple(docids), tuple(corpus[d] for d in docids),
                                   tuple(judgements.get(d, 0) for d in docids),
                                   qrels=judgements if qrels is not None else None, run_scores=tuple(run_scores)))
    if sum(skipped.values()) > before:
        log.warning("%s + %s: skipped %s", beir_dir, run_file, ", ".join(f"{n} {k}" for k, n in skipped.items()))
    if not lists:
        raise DataFormatError(f"{run_file}: no query left to rerank"
                              + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return lists


class CandidatePairs(Dataset):
    """Every (query, candidate) pair of some candidate lists, formatted for scoring (no label token).

    With the Matryoshka formatter each item also carries `query_length` and `prompt_length` (SPEC 4).
    """

    def __init__(self, lists: list[CandidateList], formatter: PairFormatter):
        self.lists, self.formatter = lists, formatter
        self.index = [(qi, ci) for qi, cl in enumerate(lists) for ci in range(len(cl.docids))]
        self.tie_order = [docid_tie_order([list(cl.docids)])[0].tolist() for cl in lists]
        self.judgements = query_judgements(lists)  # for the metrics: full qrels where the lists have them
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
