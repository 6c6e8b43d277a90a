"""Graded labels (SPEC 1 extension): optional `pos_grades`/`neg_grades` reach the loss as [B, G] grades."""

import json

import pytest
from rerank_lightning.data import DataFormatError, load_records
from rerank_lightning.data.instruction import DataArguments, RerankCollator, TrainDatasetForReranker
from rerank_lightning.data.sampling import sample_group

GRADED = {"query": "q", "pos": ["p3", "p1"], "neg": ["n1", "n0", "n00"],
          "pos_grades": [3, 1], "neg_grades": [1, 0, 0]}


def write(tmp_path, *records):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_grades_follow_the_sampled_passages(tmp_path):
    records, _ = load_records(write(tmp_path, GRADED))
    grade_of = {**dict(zip(GRADED["pos"], GRADED["pos_grades"])), **dict(zip(GRADED["neg"], GRADED["neg_grades"]))}
    for epoch in range(5):
        group = sample_group(records[0], 3, seed=1, epoch=epoch, index=0)
        assert group.grades == tuple(float(grade_of[p]) for p in group.passages)


def test_a_flagembedding_record_has_no_grades_and_pos_grades_alone_default_negatives_to_zero(tmp_path):
    records, _ = load_records(write(tmp_path, {"query": "q", "pos": ["a"], "neg": ["b", "c"]},
                                    {"query": "q", "pos": ["a"], "neg": ["b", "c"], "pos_grades": [2]}))
    assert sample_group(records[0], 3, 0, 0, 0).grades is None
    assert sample_group(records[1], 3, 0, 0, 1).grades == (2.0, 0.0, 0.0)


@pytest.mark.parametrize("field, value, words", [
    ("pos_grades", [0, 1], "field 'pos_grades[0]': expected a grade > 0, got 0"),
    ("neg_grades", [1, -1, 0], "field 'neg_grades[1]': expected a grade >= 0, got -1"),
    ("neg_grades", [1], "field 'neg_grades': expected 3 numbers (one per 'neg'), got 1"),
])
def test_bad_grades_name_the_line_and_field(tmp_path, field, value, words):
    with pytest.raises(DataFormatError, match=r":1: " + words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_records(write(tmp_path, {**GRADED, field: value}))


def test_collated_batch_carries_grades(tmp_path, mistral_tokenizer):
    path = write(tmp_path, GRADED, {"query": "plain", "pos": ["a"], "neg": ["b", "c"]})
    ds = TrainDatasetForReranker(DataArguments(train_data=str(path), train_group_size=3), mistral_tokenizer)
    batch = RerankCollator(mistral_tokenizer)([ds[0], ds[1]])
    grades = batch["grades"]
    assert grades.shape == (2, 3)
    assert grades[0].tolist() == list(sample_group(ds.records[0], 3, ds.args.seed, 0, 0).grades)
    assert grades[1].tolist() == [1.0, 0.0, 0.0]  # the ungraded record: FlagEmbedding's positive first
