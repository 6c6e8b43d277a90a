"""Teacher scores (SPEC 1 `pos_scores`/`neg_scores`) from any reranker the project can load, written
record by record and resumable (FlagEmbedding's `add_reranker_score`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..data.records import DataFormatError, parse_record
from .export import RECIPE_FILE
from .reranker import Reranker

TEACHER_KINDS = ("auto", "export", "causal-lm", "cross-encoder")


class PairScorer(Protocol):
    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...


class CrossEncoder:
    """A Hugging Face sequence-classification model over (query, passage): its single logit, or
    logit[1] - logit[0] for a two-label (irrelevant, relevant) head."""

    def __init__(self, path: str | Path, batch_size: int = 16, max_length: int = 512,
                 device: str | torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..model.backbone import MODEL_LOAD_KWARGS

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), **MODEL_LOAD_KWARGS).eval()
        if self.model.config.num_labels not in (1, 2):
            raise ValueError(f"{path}: a cross-encoder teacher needs 1 or 2 labels, got {self.model.config.num_labels}")
        if device is not None:
            self.model.to(device)
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            enc = self.tokenizer([q for q, _ in chunk], [p for _, p in chunk], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()
            scores.extend((logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).tolist())
        return scores


def teacher_kind(path: str | Path) -> str:
    """`export` (this project's, with its recipe), `cross-encoder` (a *ForSequenceClassification
    config) or `causal-lm` (any other HF directory, scored as a yes/no reranker)."""
    path = Path(path)
    if (path / RECIPE_FILE).is_file():
        return "export"
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: neither a reranker export ({RECIPE_FILE}) nor a Hugging Face model (config.json)")
    architectures = json.loads(config.read_text()).get("architectures") or []
    return "cross-encoder" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal-lm"


def load_teacher(path: str | Path, kind: str = "auto", prompt: str | None = None, batch_size: int = 16,
                 query_max_len: int = 32, passage_max_len: int = 128, max_length: int = 512,
                 device: str | torch.device | None = None) -> PairScorer:
    """A scorer with `.score(pairs) -> list[float]`. A plain causal LM is formatted as this project
    formats pairs (SPEC 3, `prompt` or the default) and scored by its "Yes" logit, as an export is."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    kind = teacher_kind(path) if kind == "auto" else kind
    if kind == "export":
        if prompt is not None:
            raise ValueError("--prompt is for a plain causal LM; an export scores with its own recipe's prompt")
        return Reranker.from_pretrained(path, device=device, batch_size=batch_size)
    if kind == "cross-encoder":
        return CrossEncoder(path, batch_size, max_length, device)
    from transformers import AutoModelForCausalLM

    from ..data.formatting import DEFAULT_PROMPT, PairFormatter
    from ..model.backbone import MODEL_LOAD_KWARGS, auto_tokenizer

    formatter = PairFormatter(auto_tokenizer(str(path)), query_max_len, passage_max_len, prompt=prompt or DEFAULT_PROMPT)
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", **MODEL_LOAD_KWARGS)
    return Reranker(lm.to(device) if device is not None else lm, formatter, batch_size)


def record_pairs(record: dict) -> list[tuple[str, str]]:
    return [(record["query"], p) for p in [*record["pos"], *record.get("neg", [])]]


def _read_records(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                parse_record(obj, need_negatives=False)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            except ValueError as err:
                raise DataFormatError(f"{path}:{lineno}: {err}") from None
            yield lineno, obj


def check_records(path: str | Path) -> int:
    """Validate every record of a training file (SPEC 1) before any model is loaded; returns how many."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    count = sum(1 for _ in _read_records(path))
    if not count:
        raise DataFormatError(f"{path}: no record")
    return count


def _done_records(out: Path) -> int:
    """Complete lines already in `out`; a half-written last line (an interrupted run) is cut off."""
    if not out.is_file():
        return 0
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with out.open("r+b") as fh:
            fh.truncate(len(complete))
    return complete.count(b"\n")


def score_records(scorer: PairScorer, in_path: str | Path, out_path: str | Path,
                  progress: bool = True) -> tuple[int, int]:
    """Copy IN to OUT with `pos_scores`/`neg_scores` set to `scorer.score` of each record's pairs
    (one call per record, so a record's scores do not depend on its neighbours or on resuming).

    Resumable: records already in OUT are checked against IN (same query and passages) and skipped.
    Returns (records scored now, records already there).
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise DataFormatError(f"{in_path}: no such file")
    done = _done_records(out_path)
    existing = out_path.open(encoding="utf-8") if done else None
    scored = total = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as out:
        for index, (lineno, record) in enumerate(tqdm(_read_records(in_path), desc="teacher", disable=not progress)):
            total = index + 1
            if index < done:
                previous = json.loads(existing.readline())
                if record_pairs(previous) != record_pairs(record):
                    raise DataFormatError(f"{out_path}:{index + 1}: does not match {in_path}:{lineno}; "
                                          "OUT holds another file's scores (remove it to start again)")
                continue
            scores = scorer.score(record_pairs(record))
            n_pos = len(record["pos"])
            record = {**record, "pos_scores": scores[:n_pos], "neg_scores": scores[n_pos:]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            scored += 1
        os.fsync(out.fileno())
    if existing is not None:
        existing.close()
    if total == 0:
        raise DataFormatError(f"{in_path}: no record")
    if done > total:
        raise DataFormatError(f"{out_path}: holds {done} records, {in_path} only {total}")
    return scored, done
