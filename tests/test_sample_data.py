"""The shipped sample data set (data/sample) and its generator, scripts/make_sample_data.py."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_sample_data.py"
SAMPLE = ROOT / "data" / "sample"
FILES = ("train.jsonl", "val_candidates.jsonl", "README.md")

# Independent of the generator's own list, so the overlap test does not just echo it.
STOPWORDS = set(
    "a an the of in on at to for by with from and or is are was were be been its it "
    "what which who where when how does do did as most many s".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS}


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return read_jsonl(SAMPLE / "train.jsonl")


@pytest.fixture(scope="module")
def val() -> list[dict]:
    return read_jsonl(SAMPLE / "val_candidates.jsonl")


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_shipped_files_byte_for_byte(tmp_path):
    out = tmp_path / "sample"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True)
    for name in FILES:
        assert (out / name).read_bytes() == (SAMPLE / name).read_bytes(), f"{name} differs from the shipped file"


def test_train_records_are_well_formed(train):
    assert len(train) >= 100
    for rec in train:
        assert set(rec) == {"query", "pos", "neg"}
        assert isinstance(rec["query"], str) and rec["query"].strip()
        assert len(rec["pos"]) >= 1 and len(rec["neg"]) >= 7
        texts = rec["pos"] + rec["neg"]
        assert all(isinstance(t, str) and t.strip() for t in texts)
        assert len(set(texts)) == len(texts), f"repeated passage for {rec['query']!r}"
    assert len({r["query"] for r in train}) == len(train)


def test_train_loads_with_project_loader(train):
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from rerank_lightning.data.records import load_records
    except ImportError:
        pytest.skip("rerank_lightning is not importable here")
    finally:
        sys.path.remove(str(ROOT / "src"))
    records, report = load_records(SAMPLE / "train.jsonl")
    assert len(records) == len(train) and not report.skipped


def test_val_lists_are_well_formed_and_disjoint_from_train(train, val):
    assert len(val) >= 30
    train_queries = {r["query"] for r in train}
    first_positions = set()
    for rec in val:
        assert set(rec) == {"qid", "query", "candidates"}
        assert rec["query"] not in train_queries
        cands = rec["candidates"]
        assert 8 <= len(cands) <= 10
        labels = [c["label"] for c in cands]
        assert set(labels) <= {0, 1} and 1 <= labels.count(1) <= 2 and labels.count(0) >= 1
        docids = [c["docid"] for c in cands]
        assert len(set(docids)) == len(docids)
        assert all(isinstance(c["text"], str) and c["text"].strip() for c in cands)
        first_positions.add(labels.index(1))
    assert len({r["qid"] for r in val}) == len(val)
    assert len(first_positions) > 3, "positives must not sit at a fixed position"


def test_val_asks_only_about_held_out_entities(generator, train, val):
    # every question the tables can produce, mapped to the entity and relation it asks about
    asked = {}
    for ent in generator.load_entities():
        for rel in generator.TYPES[ent["type"]]["relations"]:
            if ent[rel] is not None:
                for template in generator.TYPES[ent["type"]][rel]["q"]:
                    asked[generator.render(template, ent)] = (ent["name"], ent["held_out"], ent["type"], rel)
    train_asked = [asked[r["query"]] for r in train]
    val_asked = [asked[r["query"]] for r in val]
    assert not any(held_out for _, held_out, _, _ in train_asked)
    assert all(held_out for _, held_out, _, _ in val_asked)
    train_entities = {name for name, _, _, _ in train_asked}
    val_entities = {name for name, _, _, _ in val_asked}
    assert train_entities.isdisjoint(val_entities)
    for rec in train:  # no held-out entity is even mentioned in a training query
        assert not any(generator.mentions(rec["query"], name) for name in val_entities), rec["query"]
    # validation covers the relation types that training teaches, and no others
    train_relations = {(kind, rel) for _, _, kind, rel in train_asked}
    val_relations = {(kind, rel) for _, _, kind, rel in val_asked}
    assert val_relations <= train_relations and len(val_relations) >= 10


def test_negatives_share_content_words_with_their_query(train, val):
    shared = total = 0
    for rec in train:
        words = content_words(rec["query"])
        hits = [bool(words & content_words(n)) for n in rec["neg"]]
        assert sum(hits) >= 5, rec["query"]
        shared, total = shared + sum(hits), total + len(hits)
    assert shared / total >= 0.7
    for rec in val:
        words = content_words(rec["query"])
        negs = [c["text"] for c in rec["candidates"] if c["label"] == 0]
        assert sum(bool(words & content_words(n)) for n in negs) >= len(negs) // 2, rec["query"]


def test_positives_name_the_queried_entity_and_negatives_do_not_repeat_the_answer(generator, train):
    by_query = {}
    for ent in generator.load_entities():
        for rel in generator.TYPES[ent["type"]]["relations"]:
            if ent[rel] is not None:
                by_query[ent["name"], rel] = ent[rel]
    checked = 0
    for rec in train:
        for (name, rel), value in by_query.items():
            if generator.mentions(rec["query"], name) and all(
                generator.mentions(p, name) and generator.mentions(p, value) for p in rec["pos"]
            ):
                for n in rec["neg"]:
                    assert not (generator.mentions(n, name) and generator.mentions(n, value)), (rec["query"], n)
                checked += 1
                break
    assert checked == len(train)
