"""Hard-negative mining into FlagEmbedding JSONL (SPEC 1): positives from the qrels, negatives
sampled from a rank range of first-stage candidates (BM25 over the corpus, or any TREC run)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from .beir import BeirCollection
from .records import DataFormatError

# (query, passages) -> one score per passage, higher is more relevant (e.g. `inference.teacher.load_teacher`)
Teacher = Callable[[str, Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class MiningSettings:
    negatives: int = 15                    # negatives per query (fewer when fewer candidates qualify)
    rank_range: tuple[int, int] = (10, 100)  # 1-based ranks, both included, of the first-stage list
    min_grade: int = 1                     # positive: judged grade >= this
    max_negative_grade: int | None = None  # never a negative: a judged doc above this grade (positives never are)
    judged_only: bool = False              # negatives only among judged docs (the collection's own judged negatives)
    seed: int = 42
    write_grades: bool = False             # add pos_grades / neg_grades (judged grade, 0 when unjudged)
    teacher_margin: float = 0.0            # with a teacher: drop negatives scored above min(positive) - margin

    def __post_init__(self) -> None:
        lo, hi = self.rank_range
        if not 1 <= lo <= hi:
            raise ValueError(f"rank range must be LO-HI with 1 <= LO <= HI, got {lo}-{hi}")
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")


@dataclass
class MiningReport:
    written: int = 0
    negatives: Counter = field(default_factory=Counter)  # negatives per written query -> queries
    skipped: Counter = field(default_factory=Counter)    # reason -> queries
    dropped_by_teacher: int = 0

    def line(self, settings: MiningSettings) -> str:
        lo, hi = settings.rank_range
        per_query = ", ".join(f"{n}: {q}" for n, q in sorted(self.negatives.items(), reverse=True))
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{q} {reason}" for reason, q in sorted(self.skipped.items()))
        teacher = f"; teacher dropped {self.dropped_by_teacher} negatives" if self.dropped_by_teacher else ""
        return (f"mined: {self.written} queries written, {skipped} skipped" + (f" ({why})" if why else "")
                + f"; negatives per query from ranks {lo}-{hi} ({per_query or 'none'}){teacher}")


def query_rng(seed: int, qid: str) -> random.Random:
    """One generator per query: the same query gets the same negatives whatever else is mined."""
    return random.Random(f"{seed}/{qid}")


def mine_query(qid: str, ranked: Sequence[str], collection: BeirCollection, settings: MiningSettings,
               teacher: Teacher | None = None) -> tuple[dict | None, str, int]:
    """(record or None, why it is skipped or "", negatives the teacher dropped) for one query."""
    judged = collection.qrels.get(qid, {})
    positives = sorted((d for d, g in judged.items() if g >= settings.min_grade and d in collection.corpus),
                       key=lambda d: (-judged[d], d))
    if not positives:
        return None, f"no positive with grade >= {settings.min_grade} in the corpus", 0
    ceiling = settings.min_grade - 1
    if settings.max_negative_grade is not None:
        ceiling = min(ceiling, settings.max_negative_grade)
    lo, hi = settings.rank_range
    pool = [d for d in ranked[lo - 1 : hi] if judged.get(d, 0) <= ceiling  # never a judged positive
            and (d in judged or not settings.judged_only)]
    if not pool:
        return None, f"no negative candidate in ranks {lo}-{hi}", 0
    query = collection.queries[qid]
    dropped = 0
    if teacher is not None:
        scores = list(teacher(query, [collection.corpus[d] for d in positives + pool]))
        bar = min(scores[: len(positives)]) - settings.teacher_margin
        kept = [d for d, s in zip(pool, scores[len(positives):]) if s <= bar]
        dropped, pool = len(pool) - len(kept), kept
        if not pool:
            return None, "every negative candidate scored above a positive by the teacher", dropped
    chosen = sorted(query_rng(settings.seed, qid).sample(range(len(pool)), min(settings.negatives, len(pool))))
    negatives = [pool[i] for i in chosen]  # in rank order
    record = {"query": query, "pos": [collection.corpus[d] for d in positives],
              "neg": [collection.corpus[d] for d in negatives]}
    if settings.write_grades:
        record["pos_grades"] = [judged[d] for d in positives]
        record["neg_grades"] = [judged.get(d, 0) for d in negatives]
    record.update({"qid": qid, "pos_ids": positives, "neg_ids": negatives})
    return record, "", dropped


def mine(collection: BeirCollection, run: Mapping[str, Sequence[str]], settings: MiningSettings,
         teacher: Teacher | None = None, progress: bool = True,
         report: MiningReport | None = None) -> Iterator[dict]:
    """Records for the queries of the qrels, in qid order; `report` counts what was written and skipped.

    A record holds FlagEmbedding's `query`, `pos`, `neg` (and `pos_grades`/`neg_grades` when asked),
    plus `qid`, `pos_ids`, `neg_ids` so that the docids can be checked against the qrels.
    """
    report = report if report is not None else MiningReport()
    for qid in tqdm(sorted(collection.qrels), desc="mining", disable=not progress):
        if qid not in run:
            report.skipped["not in the run"] += 1
            continue
        record, why, dropped = mine_query(qid, run[qid], collection, settings, teacher)
        report.dropped_by_teacher += dropped
        if record is None:
            report.skipped[why] += 1
            continue
        report.written += 1
        report.negatives[len(record["neg"])] += 1
        yield record


def bm25_run(collection: BeirCollection, qids: Sequence[str], top_k: int, progress: bool = True) -> dict[str, list[str]]:
    """qid -> the top_k docids by BM25 (`bm25s`, Lucene variant, k1=1.5, b=0.75, English stopwords)."""
    import bm25s

    if not collection.corpus:
        raise DataFormatError("the corpus is empty")
    docids = list(collection.corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([collection.corpus[d] for d in docids], stopwords="en", show_progress=progress),
                    show_progress=progress)
    tokens = bm25s.tokenize([collection.queries[q] for q in qids], stopwords="en", show_progress=progress)
    results, _ = retriever.retrieve(tokens, k=min(top_k, len(docids)), show_progress=progress)
    return {qid: [docids[i] for i in row] for qid, row in zip(qids, results.tolist())}
