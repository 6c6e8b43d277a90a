"""Data pipeline: groups per second of the pre-tokenised TrainDatasetForReranker + RerankCollator
against the reference's approach (tokenise inside `__getitem__`, as FlagEmbedding does).

Data: ../shared/data/wikiqa/train_flag.jsonl (857 questions, about 1.2 positives and 8.9 negatives
each, so G=16 repeats negatives). Same tokenizer for both: Mistral-7B-v0.1's sentencepiece model
loaded like the tests' TINY_MODEL (`rerank_lightning.model.load_tokenizer`). Instruction recipe,
Q=32, P=128, G=16; batches of B=4 groups.

- baseline (`ReferenceStyleDataset` below): what FlagEmbedding's LLM-reranker dataset does per item:
  read the record from a `datasets.Dataset` (once; FlagEmbedding reads it twice), choose a positive
  and G-1 negatives with `random`, tokenise the query (truncation to Q + P//4), the prompt and every
  passage (truncation to P + Q//2) with the tokenizer's `__call__`, then assemble
  `[BOS] q \\n p \\n prompt label` with `prepare_for_model(truncation='only_second')`'s rule written
  out by hand (transformers 5 has no `prepare_for_model`; the hand-written rule is cheaper, so the
  baseline is if anything faster than the reference).
- project: `rerank_lightning.data.TrainDatasetForReranker`, which samples the group as a pure function
  of (seed, epoch, index) and slices ids tokenised once, ahead (batched tokenizer calls), and
  read memory-mapped from the cache's numpy arrays.
- both batches go through the same `RerankCollator` (left padding to a multiple of 8), so the
  figure is the whole dataset + collation path a dataloader worker runs.
- time: every record once, in a fixed shuffled order, in chunks of 64 groups (16 batches); each
  chunk is timed `rounds` times for each pipeline, the two alternating chunk by chunk in this
  process, and a pipeline's time is the sum over chunks of its best timing (robust to bursts of
  load from other processes on a shared machine, alike for both).
- the one-off cost: building the project's store (tokenise in batches of records + write the cache),
  timed in a fresh temporary cache folder, and reading it back from the cache.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILE = ROOT.parent / "shared" / "data" / "wikiqa" / "train_flag.jsonl"
TITLE = "Data pipeline: pre-tokenised TrainDatasetForReranker vs tokenising in __getitem__"
TARGET_SPEEDUP = 10.0
G, B, Q, P = 16, 4, 32, 128
CHUNK = 64  # groups timed together (16 batches)


def load_tokenizer() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_MODEL  # noqa: E402  (the tests' tokenizer: Mistral v1 sentencepiece)

    from rerank_lightning.model import load_tokenizer as load

    return load(TINY_MODEL)


class ReferenceStyleDataset(Dataset):
    """FlagEmbedding's way: records in a `datasets.Dataset`; the query, the prompt and every passage
    of a group tokenised inside `__getitem__`."""

    def __init__(self, records: list, tokenizer: Any, prompt: str, pad_id: int):
        import datasets

        self.dataset = datasets.Dataset.from_list(
            [{"query": r.query, "pos": list(r.pos), "neg": list(r.neg), "prompt": r.prompt} for r in records])
        self.tokenizer, self.prompt = tokenizer, prompt
        self.sep_inputs = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.yes, self.no = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("Yes", "No"))
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and bos != pad_id else []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> list[dict[str, Any]]:
        tok, data = self.tokenizer, self.dataset[item]
        passages = [random.choice(data["pos"])]
        if len(data["neg"]) < G - 1:
            negs = random.sample(data["neg"] * math.ceil((G - 1) / len(data["neg"])), G - 1)
        else:
            negs = random.sample(data["neg"], G - 1)
        passages.extend(negs)
        prompt = data["prompt"] if data["prompt"] is not None else self.prompt
        query_inputs = tok("A: " + data["query"], max_length=Q + P // 4, truncation=True,
                           add_special_tokens=False)["input_ids"]
        prompt_inputs = tok(prompt, add_special_tokens=False)["input_ids"]
        max_length = Q + P - len(prompt_inputs) - 1 - len(self.sep_inputs)
        encodings = []
        for j, passage in enumerate(passages):
            passage_inputs = tok("B: " + passage, max_length=P + Q // 2, truncation=True,
                                 add_special_tokens=False)["input_ids"]
            first, second = self.bos + query_inputs, self.sep_inputs + passage_inputs
            overflow = len(first) + len(second) - max_length  # prepare_for_model(truncation='only_second')
            if 0 < overflow < len(second):
                second = second[:-overflow]
            label = self.yes if j == 0 else self.no
            ids = first + second + self.sep_inputs + prompt_inputs + [label]
            encodings.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                              "labels": [-100] * (len(ids) - 1) + [label]})
        return encodings


def timed_batches(get: Callable[[int], Any], collate: Callable[[list], Any], order: list[int]) -> float:
    """Seconds to turn the records in `order` into collated batches of B groups."""
    started = time.perf_counter()
    for start in range(0, len(order), B):
        collate([get(i) for i in order[start : start + B]])
    return time.perf_counter() - started


def best_pass_seconds(pipelines: dict[str, Callable[[int, int], Any]], collate: Callable[[list], Any],
                      order: list[int], rounds: int) -> dict[str, float]:
    """Per pipeline: the sum over chunks of CHUNK groups of the best of `rounds` timings of that chunk.

    The pipelines alternate chunk by chunk, so a burst of load from other processes on a shared
    machine hits both alike and a quiet moment is not wasted on one of them only.
    """
    best = {name: [float("inf")] * math.ceil(len(order) / CHUNK) for name in pipelines}
    for epoch in range(rounds):
        for c in range(len(best[next(iter(pipelines))])):
            chunk = order[c * CHUNK : (c + 1) * CHUNK]
            for name, get in pipelines.items():
                seconds = timed_batches(lambda i, get=get: get(epoch, i), collate, chunk)
                best[name][c] = min(best[name][c], seconds)
    return {name: sum(times) for name, times in best.items()}


def run(quick: bool = False) -> list[dict]:
    from rerank_lightning.data import DataArguments, RerankCollator, TrainDatasetForReranker

    tokenizer = load_tokenizer()
    rounds = 2 if quick else 5
    limit = 200 if quick else None
    with tempfile.TemporaryDirectory(prefix="bench-data-") as cache:
        args = DataArguments(train_data=str(TRAIN_FILE), train_group_size=G, query_max_len=Q,
                             passage_max_len=P, max_example_num_per_dataset=limit, cache_dir=cache)
        started = time.perf_counter()
        project = TrainDatasetForReranker(args, tokenizer)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        reloaded = TrainDatasetForReranker(args, tokenizer)
        reload_s = time.perf_counter() - started
        assert reloaded.tokens.from_cache and not project.tokens.from_cache

        fmt = project.formatter
        reference = ReferenceStyleDataset(project.records, tokenizer, fmt.prompt, fmt.pad_id)
        collate = RerankCollator(tokenizer, Q, P, pad_to_multiple_of=8, padding_side="left")
        order = list(range(len(project)))
        random.Random(0).shuffle(order)
        random.seed(0)
        pipelines = {"reference": lambda epoch, i: reference[i], "project": lambda epoch, i: project[(epoch, i)]}
        seconds = best_pass_seconds(pipelines, collate, order, rounds)
        t_ref, t_project = seconds["reference"], seconds["project"]

    n = len(order)
    common = {"records": n, "G": G, "B": B, "Q": Q, "P": P, "rounds": rounds}
    ref_rate, project_rate = n / t_ref, n / t_project
    return [
        {"name": "reference: tokenise in __getitem__", "groups/s": ref_rate, "ms/group": 1e3 / ref_rate,
         "ratio vs baseline": 1.0, **common},
        {"name": "project: pre-tokenised TrainDatasetForReranker", "groups/s": project_rate,
         "ms/group": 1e3 / project_rate, "ratio vs baseline": project_rate / ref_rate,
         "target": f">= {TARGET_SPEEDUP:g}x", "met": bool(project_rate >= TARGET_SPEEDUP * ref_rate), **common},
        {"name": "project: one-off store build (tokenise + write cache)", "seconds": build_s,
         "build time in reference epochs": build_s / t_ref, **common},
        {"name": "project: reading the store back from the cache", "seconds": reload_s, **common},
    ]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="200 records, 2 rounds (a smoke test)")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    print(TITLE)
    print(f"{'':58s} {'groups/s':>10s} {'ms/group':>9s} {'ratio':>7s} {'seconds':>8s}")
    for row in rows:
        def cell(key: str, fmt: str) -> str:
            return format(row[key], fmt) if key in row else ""
        print(f"{row['name']:58s} {cell('groups/s', '10.1f'):>10s} {cell('ms/group', '9.3f'):>9s} "
              f"{cell('ratio vs baseline', '7.1f'):>7s} {cell('seconds', '8.2f'):>8s}")
    project = rows[1]
    print(f"records={project['records']} G={G} B={B} Q={Q} P={P}, best of {project['rounds']} per chunk; "
          f"target {project['target']}: {'met' if project['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
