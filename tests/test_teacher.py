"""Teacher scores (`rerank-lightning score-teacher`): exactly the scorer's, resumable, from every kind of teacher."""

import copy
import json

import pytest
import torch

from rerank_lightning.commands.score_teacher import main as score_teacher_main
from rerank_lightning.data.formatting import PairFormatter
from rerank_lightning.inference import Reranker, export_reranker
from rerank_lightning.inference.teacher import load_teacher, record_pairs, score_records, teacher_kind
from rerank_lightning.model import load_causal_lm

RECORDS = [
    {"query": "what is the capital of france", "pos": ["Paris is the capital of France."],
     "neg": ["Berlin is in Germany.", "The Loire is a river.", "Lyon is a big city."], "qid": "1"},
    {"query": "largest planet", "pos": ["Jupiter is the largest planet.", "Jupiter is a gas giant."],
     "neg": ["Mars is red."]},
    {"query": "who wrote hamlet", "pos": ["Shakespeare wrote Hamlet."], "neg": ["Goethe wrote Faust."] * 2,
     "prompt": "ignored by the teacher"},
    {"query": "boiling point of water", "pos": ["Water boils at 100 C at sea level."], "neg": ["Ice is cold."]},
]


@pytest.fixture(scope="module")
def tiny_lm(mistral_tokenizer):
    from conftest import TINY_MODEL

    torch.manual_seed(0)
    return load_causal_lm(TINY_MODEL, len(mistral_tokenizer))


@pytest.fixture(scope="module")
def export(tiny_lm, mistral_tokenizer, tmp_path_factory):
    return export_reranker(tiny_lm, PairFormatter(mistral_tokenizer), tmp_path_factory.mktemp("t") / "export")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_scores_are_exactly_the_rerankers(export, tmp_path):
    out = tmp_path / "out.jsonl"
    assert score_records(load_teacher(export, batch_size=3), write_jsonl(tmp_path / "in.jsonl", RECORDS), out,
                         progress=False) == (4, 0)
    reranker = Reranker.from_pretrained(export, batch_size=3)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    for record, got in zip(RECORDS, written):
        expected = reranker.score(record_pairs(record))
        assert got["pos_scores"] + got["neg_scores"] == expected
        assert len(got["pos_scores"]) == len(record["pos"])
        assert {k: v for k, v in got.items() if not k.endswith("_scores")} == record  # other fields kept


def test_resume_after_a_partial_output_gives_the_same_file(export, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    scorer = load_teacher(export)
    full = tmp_path / "full.jsonl"
    score_records(scorer, source, full, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(lines[0] + lines[1] + lines[2][:25])  # killed while writing the third record
    assert score_records(scorer, source, partial, progress=False) == (2, 2)
    assert partial.read_bytes() == full.read_bytes()
    assert score_records(scorer, source, partial, progress=False) == (0, 4)  # nothing left to do


def test_resume_refuses_an_output_of_another_file(export, tmp_path):
    out = write_jsonl(tmp_path / "out.jsonl", [{**RECORDS[1], "pos_scores": [0, 0], "neg_scores": [0]}])
    rc = score_teacher_main([str(export), str(write_jsonl(tmp_path / "in.jsonl", RECORDS)), str(out), "--no-progress"])
    assert rc == 2


def test_plain_causal_lm_scores_with_the_given_prompt(tiny_lm, mistral_tokenizer, tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_lm.save_pretrained(hf_dir)
    mistral_tokenizer.save_pretrained(hf_dir)
    assert teacher_kind(hf_dir) == "causal-lm"
    prompt = "Is B an answer to A? Say Yes or No."
    teacher = load_teacher(hf_dir, prompt=prompt)
    pairs = record_pairs(RECORDS[0])
    expected = Reranker(tiny_lm, PairFormatter(mistral_tokenizer, prompt=prompt)).score(pairs)
    assert teacher.score(pairs) == pytest.approx(expected, abs=1e-5)
    assert teacher.score(pairs) != pytest.approx(load_teacher(hf_dir).score(pairs), abs=1e-4)


def test_cross_encoder_scores_its_logit(mistral_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(mistral_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    ce_dir = tmp_path / "ce"
    model.save_pretrained(ce_dir)
    tok = copy.deepcopy(mistral_tokenizer)  # the session's tokenizer stays without a pad token
    tok.pad_token = tok.pad_token or tok.unk_token
    tok.save_pretrained(ce_dir)
    assert teacher_kind(ce_dir) == "cross-encoder"
    pairs = record_pairs(RECORDS[1])
    with torch.no_grad():  # one pair at a time, no padding: the logit itself
        expected = [model(**tok(q, p, return_tensors="pt")).logits[0, 0].item() for q, p in pairs]
    assert load_teacher(ce_dir, batch_size=2).score(pairs) == pytest.approx(expected, abs=1e-5)


def test_bad_input_is_one_error_line(export, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"query": "q", "pos": "not a list"}) + "\n")
    assert score_teacher_main([str(export), str(bad), str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:2: field 'pos'")
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    assert score_teacher_main([str(tmp_path), str(good), str(tmp_path / "o.jsonl")]) == 2
    assert "neither a reranker export" in capsys.readouterr().err


def test_mine_with_a_teacher_keeps_only_negatives_scored_below_every_positive(export, tmp_path, capsys):
    from test_mining import QRELS, RUN, write_beir, write_run

    from rerank_lightning.commands.mine import main as mine_main

    root, run = write_beir(tmp_path / "beir", QRELS), write_run(tmp_path / "run.trec", RUN)
    out = tmp_path / "mined.jsonl"
    assert mine_main(["--beir", str(root), "--run", str(run), "--out", str(out), "--range", "1-50",
                      "--negatives", "50", "--min-grade", "2", "--teacher", str(export), "--no-progress"]) == 0
    reranker = Reranker.from_pretrained(export)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records
    for record in records:
        scores = reranker.score(record_pairs(record))
        pos, neg = scores[: len(record["pos"])], scores[len(record["pos"]):]
        assert max(neg) <= min(pos) + 1e-5  # scored in another batch: equal up to float rounding
    assert "teacher dropped" in capsys.readouterr().out
