"""Shared fixtures. Tests run offline, in fp32, on CPU."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: the test models are tiny, subprocess tests run 2 processes on 2 cores, and
# with 2 threads each op's workers spin-wait for a busy core (tiny-model tests ran 3-10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import pytest  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_MODEL = {
    "name": "tiny",
    "tokenizer": {"sentencepiece": "mistral_common:data/tokenizer.model.v1"},
    "random_init": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "dtype": "float32",
    "precision": "32-true",
    "lora": {"enabled": False},
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (FlagEmbedding examples, WikiQA); never copied into the repo."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read real data from ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mistral_tokenizer():
    """Mistral-7B-v0.1's sentencepiece tokenizer, shipped by the mistral-common wheel (BOS=1, no pad)."""
    from rerank_lightning.model import load_tokenizer

    return load_tokenizer(TINY_MODEL)


@pytest.fixture()
def tiny_model_cfg() -> dict:
    import copy

    return copy.deepcopy(TINY_MODEL)


def group_pairs(lengths, prefix_len, n_groups=2, seed=3):
    """`n_groups` groups of random token ids: each group's pairs begin with its `prefix_len` tokens (a query),
    then differ (`lengths`: each pair's own tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seqs, groups = [], []
    for k in range(n_groups):
        prefix = torch.randint(3, 100, (prefix_len,), generator=g).tolist()
        for n in lengths:
            seqs.append(prefix + torch.randint(3, 100, (n,), generator=g).tolist())
            groups.append(k)
    return seqs, groups


@pytest.fixture()
def tile_plans(monkeypatch) -> list:
    """The tile plan each `model.tiled_attention.tiled_sdpa` call of the test attended under, in order (None:
    it left the call to sdpa); calls that `_tileable` sends to sdpa straight away are not listed."""
    from rerank_lightning.model import tiled_attention

    used, plan_for = [], tiled_attention.plan_for

    def spy(mask):
        used.append(plan_for(mask))
        return used[-1]

    monkeypatch.setattr(tiled_attention, "plan_for", spy)
    return used
