"""One training step on CPU: the project's scoring vs reading the score from the full logits.

Model: a random Llama (`rerank_lightning.model.load_causal_lm` with `random_init`, seed 0), vocabulary
32000 (Mistral-7B's), 2 layers, 4 heads / 2 KV heads, untied LM head, fp32; two sizes: hidden 256 /
MLP 512 and hidden 128 / MLP 256.
Batch: B=4 groups x G=16 candidates = 64 sequences x L=256 tokens, random token ids, no padding
(every position real, so both variants see the same positions). Score = logit of a fixed "Yes" token
id (5592; any id would do, the weights are random) at the last position.

- project: `model/scoring.py` `answer_logits`: the decoder's last hidden state, the row at the scored
  position, times the output embedding: [64, 32000] logits, never [N, L, V]; all 64 sequences in
  one forward (`model.micro_batch_size` unset).
- project, micro-batched: the same scoring through the project's micro-batching inside a group
  (`model/module.py` `micro_batched(fn, rows, size=G, recompute=True)`, what
  `RerankerModule.score_logits` does with `model.micro_batch_size: 16` in training): 4 forwards of
  16 sequences (one group each), each under activation checkpointing, so the forward keeps only each
  chunk's inputs and scores and backward recomputes one chunk at a time (one extra forward in all).
  The loss still sees all 4 groups at once.
- baseline: `model(input_ids, attention_mask).logits` ([64, 256, 32000] fp32 = 2.1 GB, plus as much
  again for its gradient), then `[:, -1, yes]` (what FlagEmbedding's reranker does).
All then take the listwise CE (`model/losses.py` `listwise_ce`, the positive in column 0) over the
[B, G] scores and run backward (parameter gradients set to None before each step; no optimiser step,
which would be the same for both).

Each variant runs in its own fresh Python subprocess (which imports the same project modules,
`model/module.py` and so Lightning included, whatever the variant): build the model and batch, then
1 warm-up step and 2 timed steps. The subprocesses alternate (project, project micro-batched,
baseline, then again: 2 rounds), so that load from other processes on the machine hits all alike; time per step = best of the
4 timed steps (median of the rounds' medians also shown), `max load avg` = the highest 1-minute load
average seen at the end of a round (2 cores: above ~2 means others were competing). Memory:
- peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the subprocess at the end (whole process:
  Python, torch, transformers, the model, the steps);
- step peak increase = that peak minus the RSS (psutil) just before the first step, i.e. the most
  memory the step(s) added on top of the loaded model and batch. Valid when the steps set the
  process's high-water mark, which the `step set peak` column checks. The larger figure of the
  two rounds is shown (they agree to a few MiB).
The project's increase is mostly the decoder's saved activations (about 0.5 GiB per layer at hidden
256 here), which the baseline holds too; the baseline adds the logits and their gradient (4 GiB).
Micro-batching bounds the saved activations by one chunk of 16 sequences instead of 64.
Checks: the loss of the last step, and the global L2 norm of the parameter gradients after it,
against the baseline's (`|loss diff|`, `grad norm rel diff`: the largest over all pairs of rounds).
Target: the project's step peak increase at most 1/5 of the baseline's; same loss (within 1e-4) and
same gradient norm (within 1e-4 relative).

Threads: every subprocess runs with 1 torch intra-op thread (`OMP_NUM_THREADS=1`). On the shared
2-core machine these numbers come from, a 2-thread step waits at every op for a core that another
job holds (in one profile a [4096, 128] x [128, 64] matmul took 16 ms, as long as the same matmul
on 4x the rows), so step time followed the number of ops rather than the work: with 2 threads the micro-batched step (4x the ops)
took 3x the unbatched one, with 1 thread 1.25x (its real cost, the recomputed forward). Memory does
not depend on it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TITLE = "Training step on CPU: answer_logits (with and without micro-batching) vs full [N, L, V] logits"
YES_ID = 5592
MEMORY_TARGET = 5.0  # baseline increase / project increase
LOSS_TOL = 1e-4
GRAD_NORM_RTOL = 1e-4

MODEL = {"vocab": 32000, "layers": 2, "heads": 4, "kv_heads": 2, "B": 4, "G": 16, "L": 256, "warmup": 1, "steps": 2}
# hidden 256 (the brief's upper end) and 128 (its lower end): the project's step memory is the decoder's
# activations, which scale with hidden; the baseline adds 2 x N*L*V*4 bytes whatever the hidden size.
FULL = [dict(MODEL, hidden=256, intermediate=512), dict(MODEL, hidden=128, intermediate=256)]
ROUNDS = 2  # each variant's subprocess runs this many times, alternating the variants
THREADS = 1  # torch intra-op threads of every step subprocess (see the docstring)
QUICK = [{"vocab": 32000, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2,
          "B": 2, "G": 4, "L": 32, "warmup": 1, "steps": 1}]
# variant id -> (row's `variant`, how the score is read, sequences per forward); G is filled in per size
VARIANTS = {
    "project": ("project", "answer_logits: hidden[scored pos] @ W_out", None),
    "project_mb": ("project", "micro_batched(answer_logits, rows, G, recompute=True)", "G"),
    "baseline": ("baseline", "model(...).logits [N, L, V], then [:, -1, yes]", None),
}


def _project_functions():
    """The project's load_causal_lm, listwise_ce, answer_logits, score_positions, micro_batched.

    Imported without running `rerank_lightning/model/__init__.py` (the modules themselves are the
    package's own files, unchanged). `model/module.py`, which holds `micro_batched`, imports
    Lightning; every variant imports it, so that the whole-process peak RSS compares like with like.
    """
    import importlib
    import importlib.util
    import types

    name = "rerank_lightning.model"
    if name not in sys.modules:
        spec = importlib.util.find_spec("rerank_lightning")
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "model")]
        sys.modules[name] = pkg
    backbone = importlib.import_module(f"{name}.backbone")
    losses = importlib.import_module(f"{name}.losses")
    scoring = importlib.import_module(f"{name}.scoring")
    module = importlib.import_module(f"{name}.module")
    return (backbone.load_causal_lm, losses.listwise_ce, scoring.answer_logits, scoring.score_positions,
            module.micro_batched)


def worker(variant: str, size: dict) -> dict:
    """Runs in a fresh subprocess: build, step, measure."""
    import functools
    import gc
    import resource

    import psutil
    import torch

    load_causal_lm, listwise_ce, answer_logits, score_positions, micro_batched = _project_functions()

    cfg = {
        "random_init": {
            "model_type": "llama", "hidden_size": size["hidden"], "intermediate_size": size["intermediate"],
            "num_hidden_layers": size["layers"], "num_attention_heads": size["heads"],
            "num_key_value_heads": size["kv_heads"], "max_position_embeddings": max(1024, size["L"]),
            "tie_word_embeddings": False,
        },
        "dtype": "float32", "init_seed": 0,
    }
    lm = load_causal_lm(cfg, size["vocab"])
    lm.train()
    B, G, L = size["B"], size["G"], size["L"]
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, size["vocab"], (B * G, L), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    positions = score_positions(attention_mask)  # the last token of every row
    rows = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions}
    score_fn = functools.partial(answer_logits, lm)  # RerankerModule.forward: answer_logits(self.lm, ...)

    def step() -> float:
        lm.zero_grad(set_to_none=True)
        if variant == "project":
            scores = answer_logits(lm, input_ids, attention_mask, positions)[:, YES_ID]
        elif variant == "project_mb":  # RerankerModule.score_logits with model.micro_batch_size = G
            scores = micro_batched(score_fn, rows, G, recompute=True)[:, YES_ID]
        else:
            logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits  # [N, L, V]
            scores = logits[:, -1, YES_ID]
        loss = listwise_ce(scores.float().view(B, G))
        loss.backward()
        return loss.item()

    gc.collect()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    loss = None
    for _ in range(size["warmup"]):
        loss = step()
    times = []
    for _ in range(size["steps"]):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = [p.grad.detach().double().norm() for p in lm.parameters() if p.grad is not None]
    grad_norm = torch.stack(grads).norm().item()
    times.sort()
    return {
        "variant": variant, "loss": loss, "grad_norm": grad_norm, "best_s": times[0],
        "median_s": times[len(times) // 2],
        "rss_before": rss_before, "maxrss_before": maxrss_before, "peak_rss": peak,
        "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
        "params": sum(p.numel() for p in lm.parameters()),
    }


def start(variant: str, size: dict, threads: int | None = None) -> subprocess.Popen:
    """`worker` in a fresh interpreter (with `threads` intra-op threads, else torch's default)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--size", json.dumps(size)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(variant: str, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def merge(rounds: list[dict]) -> dict:
    """One variant's rounds: best time, median of the rounds' medians, largest memory figures, worst load."""
    merged = dict(rounds[0])
    merged["best_s"] = min(r["best_s"] for r in rounds)
    merged["median_s"] = sorted(r["median_s"] for r in rounds)[len(rounds) // 2]
    merged["increase"] = max(r["peak_rss"] - r["rss_before"] for r in rounds)
    merged["peak_rss"] = max(r["peak_rss"] for r in rounds)
    merged["step_set_peak"] = all(r["peak_rss"] > r["maxrss_before"] for r in rounds)
    merged["load"] = max(r["load"] for r in rounds)
    merged["losses"] = [r["loss"] for r in rounds]
    merged["grad_norms"] = [r["grad_norm"] for r in rounds]
    return merged


def compare(size: dict, quick: bool) -> list[dict]:
    if quick:  # all at once, one thread each: a smoke test, timings meaningless
        procs = {variant: start(variant, size, threads=1) for variant in VARIANTS}
        results = {variant: merge([finish(variant, proc)]) for variant, proc in procs.items()}
    else:  # one after the other, alternating, so that load from other processes hits all alike
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for _ in range(ROUNDS):
            for variant in VARIANTS:
                runs[variant].append(finish(variant, start(variant, size, threads=THREADS)))
        results = {variant: merge(r) for variant, r in runs.items()}
    base = results["baseline"]
    mib = 1 / 2**20
    rows = []
    for variant, res in results.items():
        name, how, per_forward = VARIANTS[variant]
        loss_diff = max(abs(a - b) for a in res["losses"] for b in base["losses"])
        grad_diff = max(abs(a - b) / b for a in res["grad_norms"] for b in base["grad_norms"])
        n = size["B"] * size["G"]
        per_forward = size["G"] if per_forward == "G" else n
        row = {
            "variant": name,
            "how the score is read": how,
            "seqs per forward": f"{per_forward}, recomputed" if per_forward < n else f"all {n}",
            "shape": f"{size['B']}x{size['G']} seqs x {size['L']} tok, V={size['vocab']}, h={size['hidden']}",
            "step s (best)": res["best_s"],
            "step s (median)": res["median_s"],
            "speedup x": base["best_s"] / res["best_s"],
            "peak RSS MiB": res["peak_rss"] * mib,
            "step peak increase MiB": res["increase"] * mib,
            "increase / baseline's": res["increase"] / base["increase"],
            "step set peak": res["step_set_peak"],
            "torch threads": res["threads"],
            "max load avg (1 min)": res["load"],
            "loss": res["loss"],
            "|loss diff|": loss_diff,
            "grad norm": res["grad_norm"],
            "grad norm rel diff": grad_diff,
        }
        if name == "project":
            row["target"] = (f"increase <= 1/{MEMORY_TARGET:g} baseline's, |loss diff| <= {LOSS_TOL:g}, "
                             f"grad norm rel diff <= {GRAD_NORM_RTOL:g}")
            row["met"] = bool(res["increase"] * MEMORY_TARGET <= base["increase"] and loss_diff <= LOSS_TOL
                              and grad_diff <= GRAD_NORM_RTOL and res["step_set_peak"])
        rows.append(row)
    return rows


def run(quick: bool = False) -> list[dict]:
    rows = []
    for size in QUICK if quick else FULL:
        rows += compare(size, quick)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.size))))
    else:
        for r in run(quick=args.quick):
            print(json.dumps(r))
