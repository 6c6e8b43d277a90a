"""Pre-tokenised training records: every text tokenised once and cached on disk as numpy arrays.

A training step then only samples a group (SPEC 2) and slices and concatenates id lists
(SPEC 3, 4). The store keeps, per record:

- `query_ids`: tok(query_instruction + query), cut to Q + P // 4 (the Matryoshka recipe slices it to Q);
- `passage_ids`: tok(passage_instruction + passage) for every `pos` then every `neg` passage, cut to
  P + Q // 2 (`num_pos` says where the negatives start);
- `prompt_ids`: tok(the record's prompt, else the formatter's).

Each id column is two arrays: every id list's ids one after another (`<name>.ids`, int32, written as
tokenised and read memory-mapped) and where each list starts (`<name>.starts.npy`, int64, one more
entry than lists). Passages are one list each; `passage_first.npy` gives each record's first passage.
The cache is a folder named by a fingerprint of the tokenizer, the formatter's settings and the
records' content, so a changed tokenizer, setting or file is tokenised afresh.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
from torch.utils.data import Dataset

from .formatting import PairFormatter, passage_store_len, query_store_len
from .records import TrainRecord, load_records
from .sampling import Group, sample_group

log = logging.getLogger(__name__)

STORE_VERSION = 3  # bump when the stored arrays or their meaning change
TOKENIZE_BATCH_SIZE = 256  # records per tokenizer call
ID_COLUMNS = ("query_ids", "passage_ids", "prompt_ids")
# Text whose ids tell tokenizers apart beyond their vocabulary (normalisation, merges, byte fallback,
# leading and double spaces: sentencepiece and transformers' fast Llama tokenizer differ there).
PROBE_TEXT = " A: Who wrote  Hamlet?\nB: Shakespeare wrote it in 1600 — naïve café 東京 🙂 don't\t$3.50"


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


def tokenize_batch(records: Sequence[TrainRecord], formatter: PairFormatter) -> dict[str, list[list[int]]]:
    """One batch of records to id lists: `query_ids` and `prompt_ids` one list per record,
    `passage_ids` one per passage (each record's `pos`, then its `neg`)."""
    tokenizer = formatter.tokenizer
    Q, P = formatter.query_max_len, formatter.passage_max_len

    def encode(texts: list[str], prefix: str, limit: int | None) -> list[list[int]]:
        ids = tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"] if texts else []
        return [x[:limit] for x in ids]

    prompts = [formatter.prompt if r.prompt is None else r.prompt for r in records]
    unique = sorted(set(prompts))  # most records share the formatter's prompt: tokenise each prompt once
    prompt_ids = dict(zip(unique, encode(unique, "", None)))
    return {
        "query_ids": encode([r.query for r in records], formatter.query_instruction, query_store_len(Q, P)),
        "passage_ids": encode([p for r in records for p in (*r.pos, *r.neg)], formatter.passage_instruction,
                              passage_store_len(Q, P)),
        "prompt_ids": [prompt_ids[p] for p in prompts],
    }


class IdLists:
    """A column of id lists: list i is `ids[starts[i]:starts[i + 1]]`; a read copies only its own ids."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray):
        self.ids, self.starts = ids, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> list[int]:
        start, end = self.starts[i : i + 2].tolist()
        return self.ids[start:end].tolist()


class _IdListWriter:
    """Appends id lists to a file (`path`) or to memory (None) and records where each starts."""

    def __init__(self, path: Path | None):
        self.path = path
        self.file: BinaryIO | None = open(path, "wb") if path is not None else None
        self.parts: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []

    def extend(self, lists: list[list[int]]) -> None:
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype="<i4", count=int(lengths.sum()))
        self.lengths.append(lengths)
        if self.file is not None:
            self.file.write(ids.tobytes())
        else:
            self.parts.append(ids)

    def close(self) -> IdLists | None:
        """The column (in memory), or None once its starts are saved beside its ids (on disk)."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        if self.file is None:
            return IdLists(np.concatenate(self.parts) if self.parts else np.zeros(0, "<i4"), starts)
        self.file.close()
        np.save(self.path.with_suffix(".starts.npy"), starts)
        return None


class TokenizedRecords:
    """The pre-tokenised ids of `records`, read from `cache_dir` when a matching store is there.

    `cache_dir=None` tokenises in memory and writes nothing. `from_cache` says whether the ids were
    read from the cache rather than tokenised now.
    """

    def __init__(self, records: Sequence[TrainRecord], formatter: PairFormatter, cache_dir: str | Path | None):
        self.fingerprint = store_fingerprint(records, formatter)
        self.path = Path(cache_dir).expanduser() / f"ids-{self.fingerprint}" if cache_dir is not None else None
        self.from_cache = self.path is not None and self.path.is_dir()
        self.num_records = len(records)
        self._arrays: dict[str, Any] | None = None
        if not self.from_cache:
            started = time.perf_counter()
            self._arrays = self._tokenize(records, formatter)
            log.info("tokenised %d records in %.1f s%s", len(records), time.perf_counter() - started,
                     f", cached at {self.path}" if self.path else "")
        if self._arrays is None:  # read now, so that a broken store names its folder before training starts
            self._arrays = self._read()
            log.info("read %d pre-tokenised records from %s", len(records), self.path)

    def _tokenize(self, records: Sequence[TrainRecord], formatter: PairFormatter) -> dict[str, Any] | None:
        """Tokenise in batches, writing into a folder beside the store and renaming it when complete (None:
        read it back from `self.path`), or into memory without a cache (the arrays)."""
        tmp = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        try:
            writers = {name: _IdListWriter(tmp / f"{name}.ids" if tmp else None) for name in ID_COLUMNS}
            for start in range(0, len(records), TOKENIZE_BATCH_SIZE):
                batch = records[start : start + TOKENIZE_BATCH_SIZE]
                for name, lists in tokenize_batch(batch, formatter).items():
                    writers[name].extend(lists)
            arrays: dict[str, Any] = {name: writer.close() for name, writer in writers.items()}
            arrays["num_pos"] = np.array([len(r.pos) for r in records], dtype=np.int32)
            passages = np.array([len(r.pos) + len(r.neg) for r in records], dtype=np.int64)
            arrays["passage_first"] = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(passages)])
            if tmp is None:
                return arrays
            for name in ("num_pos", "passage_first"):
                np.save(tmp / f"{name}.npy", arrays[name])
            self._publish(tmp, self.path)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return None

    @staticmethod
    def _publish(tmp: Path, path: Path) -> None:
        """Rename the complete folder into place: readers never see half a store, and a concurrent writer
        of the same fingerprint simply loses the race."""
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise

    def _read(self) -> dict[str, Any]:
        """The cached store, memory-mapped (shared by dataloader workers); RuntimeError naming the folder
        when it is unreadable or does not match the records."""
        path = self.path
        try:
            # np.asarray: plain arrays over the mapped files (np.memmap slices made a group 1.6x slower to read)
            arrays: dict[str, Any] = {name: np.asarray(np.load(path / f"{name}.npy", mmap_mode="r"))
                                      for name in ("num_pos", "passage_first")}
            for name in ID_COLUMNS:
                starts = np.asarray(np.load(path / f"{name}.starts.npy", mmap_mode="r"))
                size = (path / f"{name}.ids").stat().st_size
                ids = np.asarray(np.memmap(path / f"{name}.ids", dtype="<i4", mode="r")) if size else np.zeros(0, "<i4")
                arrays[name] = IdLists(ids, starts)
            expected = {"num_pos": self.num_records, "query_ids": self.num_records, "prompt_ids": self.num_records,
                        "passage_first": self.num_records + 1, "passage_ids": int(arrays["passage_first"][-1])}
            for name, count in expected.items():
                if len(arrays[name]) != count:
                    raise ValueError(f"{name} has {len(arrays[name])} entries, expected {count}")
            for name in ID_COLUMNS:
                if arrays[name].starts[-1] != len(arrays[name].ids):
                    raise ValueError(f"{name}.ids holds {len(arrays[name].ids)} ids, its starts say "
                                     f"{arrays[name].starts[-1]}")
        except (OSError, ValueError, IndexError) as err:
            raise RuntimeError(f"{path}: cannot read the pre-tokenised records ({type(err).__name__}: {err}); "
                               "delete this folder to tokenise afresh") from err
        return arrays

    @property
    def arrays(self) -> dict[str, Any]:
        """Read from the cache on first use in each process (dataloader workers that unpickle the dataset
        map the store themselves, see __getstate__)."""
        if self._arrays is None:
            self._arrays = self._read()
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # a memory map would pickle as a copy of the whole store; a cached store pickles as its path
        return {**self.__dict__, "_arrays": None if self.path is not None else self._arrays}

    def __len__(self) -> int:
        return self.num_records

    def query_ids(self, row: int) -> list[int]:
        return self.arrays["query_ids"][row]

    def prompt_ids(self, row: int) -> list[int]:
        return self.arrays["prompt_ids"][row]

    def passage_ids(self, row: int, positive: int, negatives: Sequence[int]) -> list[list[int]]:
        """The ids of `pos[positive]` and of the given `neg` passages of record `row`, in that order."""
        arrays = self.arrays
        first, end = arrays["passage_first"][row : row + 2].tolist()
        num_pos = int(arrays["num_pos"][row])
        if not 0 <= positive < num_pos:
            raise IndexError(f"record {row} has {num_pos} positives, asked for {positive}")
        items = [positive, *(num_pos + j for j in negatives)]
        if any(not 0 <= j < end - first for j in items):
            raise IndexError(f"record {row} has {end - first} passages here, asked for {items}")
        column = arrays["passage_ids"]
        bounds = column.starts[first : end + 1].tolist()  # where each of the record's passages starts, and the end
        return [column.ids[bounds[j] : bounds[j + 1]].tolist() for j in items]


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
