"""Training records in FlagEmbedding's JSONL format (SPEC 1): loading and validation."""

from __future__ import annotations

import difflib
import json
import logging
import math
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl")
# The fields of SPEC 1's table (with graded labels); any other key is reported (a misspelt optional one
# switches a feature off). `mine` also writes docids for checking, which training does not read.
RECORD_FIELDS = ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "pos_grades", "neg_grades")
METADATA_FIELDS = ("qid", "pos_ids", "neg_ids")
# First bytes of files that are not UTF-8 JSON text, with what to do about them.
NOT_TEXT = {
    b"\x1f\x8b": "is gzip-compressed; decompress it (gunzip -k)",
    b"BZh": "is bzip2-compressed; decompress it (bunzip2 -k)",
    b"\xfd7zXZ\x00": "is xz-compressed; decompress it (unxz -k)",
    b"(\xb5/\xfd": "is zstd-compressed; decompress it (unzstd)",
    b"PK\x03\x04": "is a zip archive; extract the JSONL file from it",
    b"\xff\xfe": "is UTF-16 text; re-encode it as UTF-8",
    b"\xfe\xff": "is UTF-16 text; re-encode it as UTF-8",
}
UTF8_BOM = b"\xef\xbb\xbf"  # written by some editors; an encoding mark, not data: dropped
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
    pos_grades: tuple[float, ...] | None = None  # graded relevance; None: 1 for every positive
    neg_grades: tuple[float, ...] | None = None  # None: 0 for every negative

    @property
    def has_teacher_scores(self) -> bool:
        return self.pos_scores is not None and self.neg_scores is not None


@dataclass
class LoadReport:
    """What loading kept and skipped, per file."""

    kept: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # unknown key -> (records holding it, "file:line" of the first)
    unknown_fields: dict[str, tuple[int, str]] = field(default_factory=dict)

    def note_unknown(self, keys: Iterable[str], where: str) -> None:
        for key in keys:
            count, first = self.unknown_fields.get(key, (0, where))
            self.unknown_fields[key] = (count + 1, first)


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
                others = sorted(p.name for p in path.iterdir())
                holds = f" (it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
                raise DataFormatError(f"{path}: directory holds no *.json or *.jsonl file{holds}")
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
        raise ValueError(f"field '{name}': expected {length} numbers (one per '{of}'), got {len(value)}")
    for j, item in enumerate(value):
        # bool is an int subclass in Python; a true/false score is a data error, not 1.0/0.0
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            shown = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(repr(item), repr(item))
            raise ValueError(f"field '{name}[{j}]': expected a finite number, got {shown}")
        if not _fits_float32(item):
            raise ValueError(f"field '{name}[{j}]': expected a number float32 can hold "
                             f"(|x| <= 3.4e38; teacher scores are cast to float32), got {item!r}")
    return tuple(float(x) for x in value)


def _fits_float32(x: float) -> bool:
    """Whether `x` stays finite cast to float32 (1e39 is finite in JSON and inf in float32)."""
    try:
        struct.pack("<f", x)
    except OverflowError:
        return False
    return True


def unknown_field_hint(key: str) -> str:
    """Why an unknown record key is ignored, and the field it probably meant."""
    close = difflib.get_close_matches(key.lower(), RECORD_FIELDS, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"training records have only {', '.join(RECORD_FIELDS)}"


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
    pos_grades = _grade_list(obj, "pos_grades", len(pos), "pos", positive=True)
    neg_grades = _grade_list(obj, "neg_grades", len(neg), "neg", positive=False)
    return TrainRecord(query, pos, neg, pos_scores, neg_scores, prompt, pos_grades, neg_grades)


def _grade_list(obj: dict, name: str, length: int, of: str, positive: bool) -> tuple[float, ...] | None:
    """Optional graded labels: > 0 for positives, >= 0 for negatives (a graded collection's partly relevant)."""
    if name not in obj:
        return None
    grades = _score_list(obj[name], name, length, of)
    for j, grade in enumerate(grades):
        if grade < 0 or (positive and grade == 0):
            raise ValueError(f"field '{name}[{j}]': expected a grade {'> 0' if positive else '>= 0'}, got {grade:g}")
    return grades


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` refusing a key given twice (json keeps the last value silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"field '{key}': given twice in one object; JSON would keep only the last value")
        obj[key] = value
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _decode(line: str) -> Any:
    """One JSON value; a ValueError naming the problem (syntax, column or duplicate key) otherwise."""
    try:
        obj, end = _DECODER.raw_decode(line, len(line) - len(line.lstrip()))
    except _DuplicateKey:
        raise
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg} (column {err.colno})") from None
    if line[end:].strip():
        raise ValueError(f"invalid JSON: extra data after the record (column {end + 1}); one record per line")
    return obj


def _list_items(text: str) -> Iterable[tuple[int, Any]]:
    """(line where it starts, object or ValueError) for each element of a valid JSON list."""
    pos = text.index("[") + 1
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        lineno = text.count("\n", 0, pos) + 1
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except _DuplicateKey as err:
            yield lineno, err
            pos = json.JSONDecoder().raw_decode(text, pos)[1]
            continue
        yield lineno, obj


def _text_lines(path: Path) -> list[str | ValueError]:
    """The file's lines as text; a line that is not UTF-8 becomes a ValueError naming the byte."""
    data = path.read_bytes()
    for magic, advice in NOT_TEXT.items():
        if data.startswith(magic):
            raise DataFormatError(f"{path}: {advice}; training data must be UTF-8 JSON Lines (SPEC 1)")
    if not data.strip():
        raise DataFormatError(f"{path}: file is empty; expected JSON Lines, one training record per line")
    data = data.removeprefix(UTF8_BOM)
    lines: list[str | ValueError] = []
    offset = 0
    for raw in data.split(b"\n"):
        try:
            lines.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as err:
            lines.append(ValueError(
                f"not UTF-8 text: byte 0x{raw[err.start]:02x} at byte offset {offset + err.start} of the file "
                f"(byte {err.start + 1} of the line); re-encode the file as UTF-8"))
        offset += len(raw) + 1
    return lines


def _lines(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, decoded object or the ValueError that line raised) for JSONL, or for a .json file
    holding a list. Blank lines are not records: they are passed over, and still counted in line numbers."""
    lines = _text_lines(path)
    first = next((x for x in lines if isinstance(x, ValueError) or x.strip()), "")
    if path.suffix == ".json" and isinstance(first, str) and first.lstrip().startswith("["):
        bad = next(((n, x) for n, x in enumerate(lines, start=1) if isinstance(x, ValueError)), None)
        if bad is not None:
            raise DataFormatError(f"{path}:{bad[0]}: {bad[1]}")
        text = "\n".join(lines)  # type: ignore[arg-type]
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        yield from _list_items(text)
        return
    for lineno, line in enumerate(lines, start=1):
        if isinstance(line, ValueError):
            yield lineno, line
        elif line.strip():
            try:
                yield lineno, _decode(line)
            except ValueError as err:
                yield lineno, err


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
                if isinstance(obj, ValueError):
                    raise obj
                kept.append(parse_record(obj, need_negatives))
            except ValueError as err:
                message = f"{path}:{lineno}: {err}"
                if on_error == "raise":
                    raise DataFormatError(message) from None
                report.skipped.append(message)
                continue
            report.note_unknown((key for key in obj if key not in RECORD_FIELDS + METADATA_FIELDS),
                                f"{path}:{lineno}")
        if not kept:
            skipped = sum(m.startswith(f"{path}:") for m in report.skipped)
            raise DataFormatError(f"{path}: no valid record" + (f" ({skipped} skipped, on_error=skip)" if skipped
                                                                else "; expected JSON Lines, one record per line"))
        if max_example_num_per_dataset is not None and len(kept) > max_example_num_per_dataset:
            kept = random.Random(seed).sample(kept, max_example_num_per_dataset)
        report.kept[str(path)] = len(kept)
        records.extend(kept)
    for key, (count, first) in report.unknown_fields.items():
        log.warning("%s: field '%s' (in %d record(s)) is not a training field and is ignored; %s",
                    first, key, count, unknown_field_hint(key))
    if report.skipped:
        log.warning(
            "skipped %d bad training records (on_error=skip); first: %s",
            len(report.skipped),
            "; ".join(report.skipped[:3]),
        )
    return records, report
