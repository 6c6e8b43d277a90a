"""Pre-tokenised training records: every text tokenised once, with `datasets`, and cached on disk.

A training step then only samples a group (SPEC 2) and slices and concatenates id lists
(SPEC 3, 4). The store keeps, per record:

- `query_ids`: tok(query_instruction + query), cut to Q + P // 4 (the Matryoshka recipe slices it to Q);
- `passage_ids`: tok(passage_instruction + passage) for every `pos` then every `neg` passage, cut to
  P + Q // 2 (one column, so a group is read in one go; `num_pos` says where the negatives start);
- `prompt_ids`: tok(the record's prompt, else the formatter's).

The cache is a `datasets` folder named by a fingerprint of the tokenizer, the formatter's
settings and the records' content, so a changed tokenizer, setting or file is tokenised afresh.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
from torch.utils.data import Dataset

from .formatting import PairFormatter, passage_store_len, query_store_len
from .records import TrainRecord, load_records
from .sampling import Group, sample_group

log = logging.getLogger(__name__)

STORE_VERSION = 2  # bump when the stored columns or their meaning change
MAP_BATCH_SIZE = 256
# Text whose ids tell tokenizers apart beyond their vocabulary (normalisation, merges, byte fallback,
# leading and double spaces: sentencepiece and transformers' fast Llama tokenizer differ there).
PROBE_TEXT = " A: Who wrote  Hamlet?\nB: Shakespeare wrote it in 1600 — naïve café 東京 🙂 don't\t$3.50"
FEATURES = datasets.Features({
    "query_ids": datasets.Sequence(datasets.Value("int32")),
    "num_pos": datasets.Value("int32"),
    "passage_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    "prompt_ids": datasets.Sequence(datasets.Value("int32")),
})


def default_cache_dir() -> str:
    """$RERANK_LIGHTNING_CACHE/tokenized, by default ~/.cache/rerank_lightning/tokenized."""
    root = os.environ.get("RERANK_LIGHTNING_CACHE", str(Path.home() / ".cache" / "rerank_lightning"))
    return str(Path(root) / "tokenized")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Name, class, size, special ids, a hash of the vocabulary and the ids of a probe text."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = sorted(get_vocab().items()) if callable(get_vocab) else None
    return _sha({
        "class": type(tokenizer).__qualname__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "special": [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")],
        "vocab": _sha(vocab),
        "probe": list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]),
    })


def records_fingerprint(records: Sequence[TrainRecord]) -> str:
    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps([rec.query, rec.pos, rec.neg, rec.prompt], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def store_fingerprint(records: Sequence[TrainRecord], formatter: PairFormatter) -> str:
    """What the stored ids depend on: tokenizer, instructions, default prompt, Q, P and the records."""
    return _sha({
        "version": STORE_VERSION,
        "tokenizer": tokenizer_fingerprint(formatter.tokenizer),
        "formatter": formatter.recipe(),
        "records": records_fingerprint(records),
    })[:32]


def tokenize_batch(batch: dict[str, list], tokenizer: Any, query_instruction: str, passage_instruction: str,
                   query_len: int, passage_len: int) -> dict[str, list]:
    """`datasets.map` function: one batch of records (query, pos, neg, prompt) to id lists."""
    def encode(texts: list[str], prefix: str, limit: int | None) -> list[list[int]]:
        ids = tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"] if texts else []
        return [x[:limit] for x in ids]

    passages = [[*pos, *neg] for pos, neg in zip(batch["pos"], batch["neg"])]
    flat = encode([p for record in passages for p in record], passage_instruction, passage_len)
    passage_ids, start = [], 0
    for record in passages:
        passage_ids.append(flat[start : start + len(record)])
        start += len(record)

    prompts = sorted(set(batch["prompt"]))
    prompt_ids = dict(zip(prompts, encode(prompts, "", None)))
    return {
        "query_ids": encode(batch["query"], query_instruction, query_len),
        "num_pos": [len(pos) for pos in batch["pos"]],
        "passage_ids": passage_ids,
        "prompt_ids": [prompt_ids[p] for p in batch["prompt"]],
    }


class IdColumn:
    """Reads one `list<int32>` (or, `nested`, `list<list<int32>>`) column of an Arrow table in place.

    Offsets and values are numpy views of the (memory-mapped) Arrow buffers, so a read copies only
    the ids it returns: a group of G passages costs G slices, however many negatives a record has.
    """

    def __init__(self, column: Any, nested: bool):
        self.chunk_starts: list[int] = []
        self.chunks: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
        start = 0
        for chunk in column.chunks:
            self.chunk_starts.append(start)
            start += len(chunk)
            # the `.offsets` of a sliced array index into its `.values`, which ignore the slice
            lists = chunk.values if nested else chunk
            inner = lists.offsets.to_numpy() if nested else None
            self.chunks.append((chunk.offsets.to_numpy(), inner, lists.values.to_numpy()))

    def _locate(self, row: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
        c = bisect.bisect_right(self.chunk_starts, row) - 1
        return (*self.chunks[c], row - self.chunk_starts[c])

    def ids(self, row: int) -> list[int]:
        """The ids of `row` (a flat column)."""
        outer, _, values, local = self._locate(row)
        return values[outer[local] : outer[local + 1]].tolist()

    def nested_ids(self, row: int, items: Sequence[int]) -> list[list[int]]:
        """The ids of the given items (passages) of `row` (a nested column)."""
        outer, inner, values, local = self._locate(row)
        bounds = inner[outer[local] : outer[local + 1] + 1].tolist()  # where each passage starts, and the end
        if any(not 0 <= j < len(bounds) - 1 for j in items):
            raise IndexError(f"record {row} has {len(bounds) - 1} passages here, asked for {list(items)}")
        return [values[bounds[j] : bounds[j + 1]].tolist() for j in items]


class TokenizedRecords:
    """The pre-tokenised ids of `records`, read from `cache_dir` when a matching store is there.

    `cache_dir=None` tokenises in memory and writes nothing. `from_cache` says whether the ids were
    read from the cache rather than tokenised now.
    """

    def __init__(self, records: Sequence[TrainRecord], formatter: PairFormatter, cache_dir: str | Path | None):
        self.fingerprint = store_fingerprint(records, formatter)
        # one folder per datasets major release: a store written by datasets 5 does not load under 2.x
        store_dir = f"datasets{datasets.__version__.split('.')[0]}-{self.fingerprint}"
        self.path = Path(cache_dir).expanduser() / store_dir if cache_dir is not None else None
        self.from_cache = self.path is not None and self.path.is_dir()
        if self.from_cache:
            try:
                self.table = datasets.load_from_disk(str(self.path))
            except Exception as err:
                raise RuntimeError(f"{self.path}: cannot read the pre-tokenised records ({type(err).__name__}: "
                                   f"{err}); delete this folder to tokenise afresh") from err
            log.info("read %d pre-tokenised records from %s", len(self.table), self.path)
        else:
            started = time.perf_counter()
            self.table = self._tokenize(records, formatter)
            if self.path is not None:
                self.table = self._save(self.table, self.path)
            log.info("tokenised %d records in %.1f s%s", len(records), time.perf_counter() - started,
                     f", cached at {self.path}" if self.path else "")
        if len(self.table) != len(records):
            raise RuntimeError(f"{self.path}: holds {len(self.table)} records, expected {len(records)}; delete it")
        self._columns: dict[str, IdColumn] | None = None
        self._num_pos: np.ndarray | None = None

    def _tokenize(self, records: Sequence[TrainRecord], formatter: PairFormatter) -> datasets.Dataset:
        Q, P = formatter.query_max_len, formatter.passage_max_len
        texts = datasets.Dataset.from_dict({
            "query": [r.query for r in records],
            "pos": [list(r.pos) for r in records],
            "neg": [list(r.neg) for r in records],
            "prompt": [formatter.prompt if r.prompt is None else r.prompt for r in records],
        }, features=datasets.Features({
            "query": datasets.Value("string"),
            "pos": datasets.Sequence(datasets.Value("string")),
            "neg": datasets.Sequence(datasets.Value("string")),
            "prompt": datasets.Value("string"),
        }))
        return texts.map(
            tokenize_batch, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=texts.column_names,
            features=FEATURES, new_fingerprint=self.fingerprint, desc="Tokenising training records",
            fn_kwargs={"tokenizer": formatter.tokenizer, "query_instruction": formatter.query_instruction,
                       "passage_instruction": formatter.passage_instruction,
                       "query_len": query_store_len(Q, P), "passage_len": passage_store_len(Q, P)},
        )

    @staticmethod
    def _save(table: datasets.Dataset, path: Path) -> datasets.Dataset:
        """Write beside the target, then rename: readers never see half a store, and a concurrent
        writer of the same fingerprint simply loses the race."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        table.save_to_disk(str(tmp))
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(path))  # memory-mapped: shared by dataloader workers

    def __len__(self) -> int:
        return len(self.table)

    @property
    def columns(self) -> dict[str, IdColumn]:
        """Built on first use in each process (dataloader workers build their own, see __getstate__)."""
        if self._columns is None:
            table = self.table.data.table
            self._columns = {name: IdColumn(table.column(name), nested=name == "passage_ids")
                             for name in ("query_ids", "passage_ids", "prompt_ids")}
            self._num_pos = table.column("num_pos").to_numpy()
        return self._columns

    def __getstate__(self) -> dict[str, Any]:
        # numpy views of the Arrow buffers would pickle as copies; a cached table pickles as its path
        return {**self.__dict__, "_columns": None, "_num_pos": None}

    def query_ids(self, row: int) -> list[int]:
        return self.columns["query_ids"].ids(row)

    def prompt_ids(self, row: int) -> list[int]:
        return self.columns["prompt_ids"].ids(row)

    def passage_ids(self, row: int, positive: int, negatives: Sequence[int]) -> list[list[int]]:
        """The ids of `pos[positive]` and of the given `neg` passages of record `row`, in that order."""
        column = self.columns["passage_ids"]
        num_pos = int(self._num_pos[row])
        if not 0 <= positive < num_pos:
            raise IndexError(f"record {row} has {num_pos} positives, asked for {positive}")
        return column.nested_ids(row, [positive, *(num_pos + j for j in negatives)])


class PretokenizedGroups(Dataset):
    """Records loaded (SPEC 1) and tokenised once; item i is the tokens of one sampled group (SPEC 2).

    Index with an int (uses `self.epoch`) or with the `(epoch, i)` keys of `GroupSampler`.
    Subclasses turn a group's tokens into their recipe's encodings.
    """

    def __init__(self, args: Any, tokenizer: Any, formatter: PairFormatter | None = None):
        if args.train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {args.train_group_size}")
        self.args = args
        self.formatter = formatter or args.formatter(tokenizer)
        self.records, self.load_report = load_records(
            args.train_data,
            need_negatives=args.train_group_size > 1,
            max_example_num_per_dataset=args.max_example_num_per_dataset,
            seed=args.seed,
            on_error=args.on_error,
        )
        for prompt in {r.prompt for r in self.records if r.prompt is not None}:
            self.formatter.check_prompt(prompt)
        self.tokens = TokenizedRecords(self.records, self.formatter, args.cache_dir)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def group_tokens(self, key: int | tuple[int, int]) -> tuple[Group, list[int], list[list[int]], list[int]]:
        """(group, query ids, the group's passage ids positive first, prompt ids) for one key."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        group = sample_group(self.records[index], self.args.train_group_size, self.args.seed, epoch, index)
        tokens = self.tokens
        passages = tokens.passage_ids(index, group.positive_index, group.negative_indices)
        return group, tokens.query_ids(index), passages, tokens.prompt_ids(index)
