"""GPU training throughput: tokens/s, MFU and peak memory of the product's own training run.

Each case is `rerank_lightning.train.build(cfg)` on a Hydra config composed from conf/ (the model,
trainer and data groups a user picks), then `trainer.fit` for `--warmup` + `--steps` optimizer steps,
timed from the first step after the warm-up to the end of fit with CUDA synchronisation:
- the weights: a random-init model of the case's shape, saved with `save_pretrained` and loaded back
  through `model.pretrained` (`from_pretrained`: eval mode until Lightning's fit sets train mode, so
  gradient checkpointing is exercised as in a real run), with the Mistral sentencepiece tokenizer;
- `mistral7b_lora`: Mistral-7B-v0.1 shape, `model=mistral` (bf16 weights, LoRA r64 on q,v,o,gate,up,down,
  transformers' gradient checkpointing), `trainer=gpu` (one GPU, bf16-mixed), G=16, L<=288;
- `llama1b_full`: Llama-3.2-1B shape (vocab 128256, tied embeddings), full fine-tune with fp32 weights,
  `trainer=fsdp` (FSDP2 through `RerankFSDPStrategy`, its per-layer activation checkpointing, bf16-mixed)
  over all visible GPUs, G=16, L<=288;
- data: a synthetic training file (one positive and 15 negatives per query) whose passages have
  random lengths, so that `padded` rows carry padding; `packed` adds `data.packing=true` where the
  checkout has that option (else that row says so). Query <= 32 and passage <= 256 tokens (L <= 288).

Definitions (per GPU; real tokens = the pairs' tokens, the padded rows' attention-mask ones; computed tokens
= the non-padding tokens the model runs, fewer than real where packed pairs share their query prefix;
fed tokens/s counts the rows as fed, padding included):
- N = non-embedding parameters (decoder layers + final norm; the LM head runs on one position per
  row), N_lora = adapter parameters; attention = 12 * layers * hidden * L per token (scores and context,
  forward and backward), L = the mean real length of a row.
- FLOPs per token: full fine-tune 6N + attention; LoRA 4N + 6 N_lora + attention (no weight gradients
  of the frozen base). MFU = computed tokens/s per GPU * FLOPs per token / peak; "MFU 6N" uses 6N + attention
  for LoRA too. Recomputation by checkpointing is not counted (it is hardware, not model, FLOPs).
  Peak = `--peak-tflops`, else $BENCH_PEAK_TFLOPS, else 989 TFLOP/s (H100/H200 SXM bf16 dense).
- peak memory = `torch.cuda.max_memory_allocated()` from the first timed step to the end, max over
  ranks (the dry run on CPU: peak RSS).

`--dry-run` runs every case on CPU with tiny shapes (fp32, 32-true) to check the code; its numbers are
meaningless. Results go to `--out` (JSON, default benchmarks/results/gpu_throughput.json) and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLE = "GPU training throughput (tokens/s, MFU, peak memory)"
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, bf16 dense
TOKENIZER = "mistral_common:data/tokenizer.model.v1"  # Mistral-7B's 32000-token sentencepiece model
GROUP, QUERY_MAX, PASSAGE_MAX = 16, 32, 256

CASES = {
    "mistral7b_lora": {
        "shape": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                  "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 32000},
        "dtype": "bfloat16", "batch": 4,
        "overrides": ["model=mistral", "trainer=gpu"],
    },
    "llama1b_full": {
        "shape": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                  "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256},
        "dtype": "float32", "batch": 4,
        "overrides": ["model=mistral", "model.lora.enabled=false", "model.gradient_checkpointing=false",
                      "trainer=fsdp"],
    },
}
LAYOUTS = ("padded", "packed")
DRY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024}
DRY_OVERRIDES = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "model.dtype=float32"]
NO_CUDA = ("skipped: no CUDA device (torch.cuda.is_available() is False); the script is ready but unrun on GPU; "
           "`python benchmarks/gpu_throughput.py --dry-run` checks its code on CPU with tiny shapes")


# --------------------------------------------------------------------------- one case, in its own process


def save_random_model(shape: dict, dtype: str, out: Path, device: str) -> None:
    """A random-init model of `shape` and the Mistral tokenizer, written as a `from_pretrained` folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rerank_lightning.model import load_tokenizer

    init = dict(shape)
    config = AutoConfig.for_model(init.pop("model_type"), **init)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7B parameters on the GPU takes seconds, on the CPU minutes
        lm = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    lm.save_pretrained(out)
    load_tokenizer({"tokenizer": {"sentencepiece": TOKENIZER}}).save_pretrained(out)
    del lm


def write_groups(path: Path, queries: int, seed: int = 0) -> None:
    """`queries` training records (1 positive, GROUP - 1 negatives) of words, passages 8-250 words long."""
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("ra", "to", "mi", "ne", "su", "ka", "lo", "pe") for b in ("n", "t", "s", "", "l")]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with open(path, "w") as fh:
        for _ in range(queries):
            passages = [text(rng.randint(8, 250)) for _ in range(GROUP)]
            fh.write(json.dumps({"query": text(rng.randint(4, 20)), "pos": passages[:1], "neg": passages[1:]}) + "\n")


def compose(overrides: list[str], out_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[*overrides, f"hydra.runtime.output_dir={out_dir}"],
                           return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(job)
    return job


def worker(name: str, layout: str, warmup: int, steps: int, dry_run: bool, work: Path, out: Path) -> None:
    import lightning as L
    import torch

    from bench_packing import computed_tokens, real_tokens  # this script's folder is on sys.path
    from rerank_lightning.model.scoring import causal_lm
    from rerank_lightning.train import build

    case = CASES[name]
    shape = {**case["shape"], **(DRY_SHAPE if dry_run else {})}
    cuda = torch.cuda.is_available() and not dry_run
    model_dir = work / f"{name}-model"
    gpus = torch.cuda.device_count() if cuda else 1
    batch = 1 if dry_run else case["batch"]
    data = work / "groups.jsonl"
    write_groups(data, batch * gpus * (warmup + steps))
    overrides = [*case["overrides"], f"model.pretrained={model_dir}", f"++model.tokenizer.sentencepiece={TOKENIZER}",
                 f"data.train_data={data}", f"data.train_group_size={GROUP}", f"data.query_max_len={QUERY_MAX}",
                 f"data.passage_max_len={PASSAGE_MAX}", f"data.batch_size={batch}", "data.cache_dir=null", "data.val_data=null",
                 "data.num_workers=2", f"trainer.max_steps={warmup + steps}", "trainer.enable_progress_bar=false",
                 "+trainer.enable_model_summary=false", "~logger", "~callbacks", "export.enabled=false"]
    if name == "llama1b_full" and not dry_run:
        overrides.append(f"trainer.devices={gpus}")
    if dry_run:
        overrides += DRY_OVERRIDES
    job = compose(overrides, work / f"{name}-{layout}-run")
    if layout == "packed":
        if "packing" not in job.data:
            out.write_text(json.dumps({"case": name, "layout": layout,
                                       "status": "skipped: this checkout has no data.packing"}))
            return
        job = compose([*overrides, "data.packing=true"], work / f"{name}-{layout}-run")
    if not (model_dir / "config.json").is_file():  # written once, read by both layouts
        save_random_model(shape, "float32" if dry_run else case["dtype"], model_dir, "cuda" if cuda else "cpu")
    datamodule, module, trainer = build(job)

    class Throughput(L.Callback):
        """Real, computed and fed tokens, time and peak memory from the first step after the warm-up."""

        real = computed = fed = 0
        start = elapsed = 0.0

        def sync(self) -> None:
            if cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                self.sync()
                trainer.strategy.barrier()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()
            if trainer.global_step >= warmup:
                self.real += real_tokens(batch)
                self.computed += computed_tokens(batch)
                self.fed += batch["pair"]["input_ids"].numel()

        def on_train_end(self, trainer, pl_module):
            self.sync()
            trainer.strategy.barrier()
            self.elapsed = time.perf_counter() - self.start

    meter = Throughput()
    trainer.callbacks.append(meter)
    trainer.fit(module, datamodule=datamodule)

    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    counts = torch.tensor([meter.real, meter.computed, meter.fed], dtype=torch.float64,
                          device=trainer.strategy.root_device)
    counts = trainer.strategy.reduce(counts, reduce_op="sum")
    peak = trainer.strategy.all_gather(torch.tensor(float(peak), device=trainer.strategy.root_device)).max()
    if not trainer.is_global_zero:
        return
    base = causal_lm(module.lm)
    n_params = sum(p.numel() for n, p in base.named_parameters()
                   if "embed_tokens" not in n and "lm_head" not in n and "lora_" not in n)
    n_lora = sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    real, computed, fed = (float(c) for c in counts)
    pairs = steps * batch * GROUP * trainer.world_size
    result = {
        "case": name, "layout": layout, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "ranks": trainer.world_size, "strategy": type(trainer.strategy).__name__, "precision": job.trainer.precision,
        "lora": n_lora > 0, "gradient_checkpointing": bool(job.model.gradient_checkpointing) or "fsdp" in str(
            job.trainer.strategy), "steps": steps, "elapsed_s": meter.elapsed, "real_tokens": real,
        "computed_tokens": computed, "fed_tokens": fed,
        "mean_row_length": real / pairs, "n_params": n_params, "n_lora": n_lora,
        "layers": shape["num_hidden_layers"], "hidden": shape["hidden_size"], "peak_bytes": float(peak),
        "memory_kind": "cuda max_memory_allocated" if cuda else "cpu peak RSS (dry run)",
    }
    out.write_text(json.dumps(result))


# --------------------------------------------------------------------------- rows and orchestration


def flops_per_token(res: dict) -> tuple[float, float]:
    """(model FLOPs, 6N-convention FLOPs) per real token, as the module docstring defines them."""
    attention = 12 * res["layers"] * res["hidden"] * res["mean_row_length"]
    six_n = 6 * res["n_params"] + attention
    model = (4 * res["n_params"] + 6 * res["n_lora"] + attention) if res["lora"] else six_n
    return model, six_n


def row_from(res: dict, peak_tflops: float) -> dict:
    row = {"case": res["case"], "layout": res["layout"]}
    if "status" in res:
        return {**row, "status": res["status"]}
    gpus = max(res["ranks"], 1)
    computed = res.get("computed_tokens", res["real_tokens"])  # results written before computed_tokens existed
    per_gpu = computed / res["elapsed_s"] / gpus  # the FLOPs done, not the pairs' tokens
    model, six_n = flops_per_token(res)
    return {**row, "device": res["device"], "ranks": res["ranks"], "strategy": res["strategy"],
            "step s": res["elapsed_s"] / res["steps"], "real tokens/s": res["real_tokens"] / res["elapsed_s"],
            "fed tokens/s": res["fed_tokens"] / res["elapsed_s"], "padding %": 100 * (1 - computed / res["fed_tokens"]),
            "mean row length": res["mean_row_length"], "MFU %": 100 * per_gpu * model / (peak_tflops * 1e12),
            "MFU % (6N)": 100 * per_gpu * six_n / (peak_tflops * 1e12), "peak mem GiB": res["peak_bytes"] / 2**30,
            "memory": res["memory_kind"], "N (non-emb) M": res["n_params"] / 1e6, "N_lora M": res["n_lora"] / 1e6,
            "peak TFLOP/s": peak_tflops}


def measure(dry_run: bool = False, cases: list[str] | None = None, layouts: list[str] | None = None,
            warmup: int = 3, steps: int = 10, peak_tflops: float | None = None, timeout: float = 900) -> list[dict]:
    """Every (case, layout) in a fresh process; a failure becomes a row with its status."""
    peak = peak_tflops or float(os.environ.get("BENCH_PEAK_TFLOPS") or DEFAULT_PEAK_TFLOPS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
        for name in cases or list(CASES):
            for layout in layouts or list(LAYOUTS):
                out = Path(tmp) / f"{name}-{layout}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--layout", layout,
                       "--work", tmp, "--json-out", str(out), "--warmup", str(warmup), "--steps", str(steps),
                       *(["--dry-run"] if dry_run else [])]
                started = time.time()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp)
                    failed = proc.returncode != 0 or not out.is_file()
                    detail = (proc.stderr or proc.stdout)[-3000:]
                except subprocess.TimeoutExpired:
                    failed, detail = True, f"timed out after {timeout:.0f} s"
                if failed:
                    print(f"--- {name} {layout} failed:\n{detail}", file=sys.stderr)
                    rows.append({"case": name, "layout": layout, "status": f"failed: {detail.strip().splitlines()[-1:]}"})
                else:
                    rows.append({**row_from(json.loads(out.read_text()), peak), "wall s": time.time() - started})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def run(quick: bool = False) -> list[dict]:
    """For benchmarks/run.py: every case on the GPU(s); one 'skipped' row without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return [{"case": "all", "status": NO_CUDA}]
    return measure(warmup=1 if quick else 3, steps=2 if quick else 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all cases")
    parser.add_argument("--layout", action="append", choices=LAYOUTS, help="default: padded and packed")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the code, not the speed")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (dry run: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default 10 (dry run: 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak bf16 TFLOP/s per GPU (default: $BENCH_PEAK_TFLOPS or {DEFAULT_PEAK_TFLOPS:g})")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case and layout")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_throughput.json"))
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    steps = args.steps if args.steps is not None else (2 if args.dry_run else 10)
    if args.worker:
        worker(args.worker, args.layout[0], warmup, steps, args.dry_run, Path(args.work), Path(args.json_out))
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_throughput: {NO_CUDA}", file=sys.stderr)
        return 2
    rows = measure(args.dry_run, args.case, args.layout, warmup, steps, args.peak_tflops, args.timeout)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dry_run": args.dry_run, "warmup": warmup, "steps": steps, "rows": rows},
                                         indent=1) + "\n")
    print(f"results: {args.out}")
    return 1 if any(str(row.get("status", "")).startswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
