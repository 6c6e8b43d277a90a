"""Training records in FlagEmbedding's JSONL format (SPEC 1): loading and validation."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl")
ON_ERROR = ("raise", "skip")  # data.on_error: stop at the first bad record, or skip and count them


class DataFormatError(ValueError):
    """A record breaks the format; the message names file, line and field."""


@dataclass(frozen=True)
class TrainRecord:
    """One validated training record."""

    query: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    pos_scores: tuple[float, ...] | None = None
    neg_scores: tuple[float, ...] | None = None
    prompt: str | None = None

    @property
    def has_teacher_scores(self) -> bool:
        return self.pos_scores is not None and self.neg_scores is not None


@dataclass
class LoadReport:
    """What loading kept and skipped, per file."""

    kept: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def expand_paths(train_data: str | Path | Sequence[str | Path]) -> list[Path]:
    """A file, a directory (its *.json / *.jsonl, sorted) or a list of those."""
    items = [train_data] if isinstance(train_data, (str, Path)) else list(train_data)
    if not items:
        raise DataFormatError("train_data is empty: give a file, a directory or a list of them")
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
            if not found:
                raise DataFormatError(f"{path}: directory holds no *.json or *.jsonl file")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataFormatError(f"{path}: no such file or directory")
    return paths


def _string_list(value: Any, name: str, required: bool) -> tuple[str, ...]:
    if not isinstance(value, list):
        kind = type(value).__name__
        raise ValueError(f"field '{name}': expected a list of strings, got {kind}")
    if required and not value:
        raise ValueError(f"field '{name}': expected at least one passage, got an empty list")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"field '{name}[{j}]': expected a string, got {type(item).__name__}")
    return tuple(value)


def _score_list(value: Any, name: str, length: int, of: str) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError(f"field '{name}': expected a list of numbers, got {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"field '{name}': expected {length} scores (one per '{of}'), got {len(value)}")
    for j, item in enumerate(value):
        # bool is an int subclass in Python; a true/false score is a data error, not 1.0/0.0
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise ValueError(f"field '{name}[{j}]': expected a finite number, got {item!r}")
    return tuple(float(x) for x in value)


def parse_record(obj: Any, need_negatives: bool) -> TrainRecord:
    """Validate one decoded JSON object; raises ValueError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"field 'query': expected a non-empty string, got {query!r}")
    if "pos" not in obj:
        raise ValueError("field 'pos': missing")
    pos = _string_list(obj["pos"], "pos", required=True)
    if "neg" not in obj and need_negatives:
        raise ValueError("field 'neg': missing (needed when train_group_size > 1)")
    neg = _string_list(obj.get("neg", []), "neg", required=need_negatives)
    has_pos_scores, has_neg_scores = "pos_scores" in obj, "neg_scores" in obj
    if has_pos_scores != has_neg_scores:
        missing = "neg_scores" if has_pos_scores else "pos_scores"
        raise ValueError(f"field '{missing}': missing while the other score list is present")
    pos_scores = neg_scores = None
    if has_pos_scores:
        pos_scores = _score_list(obj["pos_scores"], "pos_scores", len(pos), "pos")
        neg_scores = _score_list(obj["neg_scores"], "neg_scores", len(neg), "neg")
    prompt = obj.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"field 'prompt': expected a non-empty string, got {prompt!r}")
    return TrainRecord(query, pos, neg, pos_scores, neg_scores, prompt)


def _list_items(text: str) -> Iterable[tuple[int, Any]]:
    """(line where it starts, object) for each element of a valid JSON list."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        obj, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, obj
        pos = end


def _lines(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, decoded object) for JSONL, or for a .json file holding a list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        yield from _list_items(text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            yield lineno, DataFormatError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})")


def load_records(
    train_data: str | Path | Sequence[str | Path],
    *,
    need_negatives: bool = True,
    max_example_num_per_dataset: int | None = None,
    seed: int = 42,
    on_error: str = "raise",
) -> tuple[list[TrainRecord], LoadReport]:
    """Load and validate every record; `on_error="skip"` skips bad records but counts and reports them."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    records: list[TrainRecord] = []
    report = LoadReport()
    for path in expand_paths(train_data):
        kept: list[TrainRecord] = []
        for lineno, obj in _lines(path):
            try:
                if isinstance(obj, DataFormatError):
                    raise obj
                kept.append(parse_record(obj, need_negatives))
            except (ValueError, DataFormatError) as err:
                message = str(err) if isinstance(err, DataFormatError) else f"{path}:{lineno}: {err}"
                if on_error == "raise":
                    raise DataFormatError(message) from None
                report.skipped.append(message)
        if not kept:
            raise DataFormatError(f"{path}: no valid record")
        if max_example_num_per_dataset is not None and len(kept) > max_example_num_per_dataset:
            kept = random.Random(seed).sample(kept, max_example_num_per_dataset)
        report.kept[str(path)] = len(kept)
        records.extend(kept)
    if report.skipped:
        log.warning(
            "skipped %d bad training records (on_error=skip); first: %s",
            len(report.skipped),
            "; ".join(report.skipped[:3]),
        )
    return records, report
