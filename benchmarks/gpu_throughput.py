"""GPU training throughput: tokens/s, MFU and peak memory of the project's training step.

Needs CUDA. Without it, `run()` returns one "skipped" row and the script exits with a message;
`--dry-run` runs the same code on CPU with tiny shapes (a correctness check, numbers meaningless).

Cases (random weights, random token ids, no padding, the project's scoring + listwise loss):
- `mistral7b_lora`: Mistral-7B-v0.1 shape (hidden 4096, MLP 14336, 32 layers, 32/8 heads,
  vocab 32000), bf16 weights, bf16 autocast (precision bf16-mixed), LoRA r64 / alpha 16 /
  dropout 0.1 on q,v,o,gate,up,down (conf/model/mistral.yaml), gradient checkpointing (non-reentrant),
  B=4 groups x G=16 x L=288 per step, on one GPU (a 7B LoRA fits on one; more GPUs would be data parallel).
- `llama1b_full`: Llama-3.2-1B shape (hidden 2048, MLP 8192, 16 layers, 32/8 heads, vocab 128256,
  tied embeddings), full fine-tune, fp32 master weights with bf16 compute, AdamW, B=4 x G=16 x L=288
  per GPU. With more than one GPU: torchrun + FSDP2 (`torch.distributed.fsdp.fully_shard` on every
  decoder layer and the root; bf16 parameters, fp32 gradient reduction). With one GPU: plain
  (no sharding), bf16 autocast.
The model is built by the project's `RerankerModule.configure_model` (`load_causal_lm` with
`random_init`, gradient checkpointing and `apply_lora` as in training); a step is
`answer_logits` -> "Yes" column -> `listwise_ce` -> backward -> AdamW step, timed with CUDA
synchronisation over `--steps` steps after `--warmup` steps. Each case runs in its own process.

Definitions:
- tokens/s = B * G * L * steps * GPUs / elapsed (all tokens real); per-GPU tokens/s = that / GPUs.
- N = non-embedding parameters of the base model (decoder layers + final norm; the input embedding
  is a lookup and the LM head runs on one position per sequence, so neither is counted); N_lora =
  the LoRA adapter parameters. Attention score/context matmuls (about 12 * layers * hidden * L
  FLOPs per token with backward, 1-2 % of 6N at L=288) are not counted.
- full fine-tune: model FLOPs per token = 6N (forward 2N, backward 4N).
- LoRA on a frozen base: model FLOPs per token = 4N + 6 N_lora (forward 2N, backward activation
  gradients 2N, no weight gradients for the frozen base; the adapters train fully). Hardware FLOPs
  add the recomputed forward of gradient checkpointing: + 2N + 2 N_lora (reported as HFU). The
  "6N convention" MFU (6N per token as if it were a full fine-tune) is reported too, since many
  reports use it.
- MFU = per-GPU tokens/s * FLOPs per token / peak FLOP/s; peak = `--peak-tflops`, else env
  `BENCH_PEAK_TFLOPS`, else 989 TFLOP/s (H100 SXM bf16 dense, no sparsity; H200 is the same).
- peak memory = `torch.cuda.max_memory_allocated()` over the steps (reset after the model and
  optimiser are built, so it is the training peak with weights, gradients, optimiser state and
  activations resident), max over ranks; `max_memory_reserved` too. In a CPU dry run: peak RSS.

Status: written and checked with `--dry-run` on CPU (both cases, and the FSDP2 path with 2 CPU
processes over gloo); not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TITLE = "GPU training throughput (tokens/s, MFU, peak memory)"
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, bf16 dense
YES_ID = 5592

CASES = {
    "mistral7b_lora": {
        "model": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 32768, "rope_theta": 10000.0, "tie_word_embeddings": False},
        "vocab": 32000, "dtype": "bfloat16", "gradient_checkpointing": True,
        "lora": {"enabled": True, "r": 64, "alpha": 16, "dropout": 0.1,
                 "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "B": 4, "G": 16, "L": 288, "distributed": False,
    },
    "llama1b_full": {
        "model": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                  "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True},
        "vocab": 128256, "dtype": "float32", "gradient_checkpointing": False,
        "lora": {"enabled": False},
        "B": 4, "G": 16, "L": 288, "distributed": True,
    },
}
DRY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024}
DRY = {"vocab": 1000, "B": 1, "G": 4, "L": 32}


def case_config(name: str, dry_run: bool, batch: int | None = None) -> dict:
    cfg = json.loads(json.dumps(CASES[name]))
    if dry_run:
        cfg["model"].update(DRY_MODEL)
        cfg.update(DRY)
    if batch:
        cfg["B"] = batch
    return cfg


def peak_tflops(arg: float | None) -> float:
    if arg:
        return float(arg)
    return float(os.environ.get("BENCH_PEAK_TFLOPS") or DEFAULT_PEAK_TFLOPS)


# --------------------------------------------------------------------------- worker (one process per rank)

def worker(name: str, cfg: dict, warmup: int, steps: int, dry_run: bool, out: str | None) -> dict:
    import contextlib
    import resource

    import torch
    import torch.distributed as dist

    from rerank_lightning.model import RerankerModule, listwise_ce
    from rerank_lightning.model.scoring import answer_logits, causal_lm, score_positions

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not dry_run
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    sharded = world > 1

    yes_id = min(YES_ID, cfg["vocab"] - 1)  # the dry run's vocabulary is small
    model_cfg = {"random_init": cfg["model"], "dtype": cfg["dtype"], "init_seed": 0,
                 "gradient_checkpointing": cfg["gradient_checkpointing"], "lora": cfg["lora"]}
    module = RerankerModule(model=model_cfg, yes_token_id=yes_id, no_token_id=yes_id - 1, vocab_size=cfg["vocab"])
    with torch.device(device):
        module.configure_model()
    lm = module.lm
    base = causal_lm(lm)
    n_params = sum(p.numel() for name_, p in base.named_parameters()
                   if "embed_tokens" not in name_ and "lm_head" not in name_ and "lora_" not in name_)
    n_lora = sum(p.numel() for name_, p in base.named_parameters() if "lora_" in name_)
    n_trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)

    class Scorer(torch.nn.Module):
        """The project's score as a module, so that an FSDP root forward wraps the whole step."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, positions):
            return answer_logits(self.lm, input_ids, attention_mask, positions)[:, yes_id]

    scorer = Scorer(lm)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in base.get_decoder().layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(scorer, mesh=mesh, mp_policy=policy)
        autocast = contextlib.nullcontext()
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    scorer.train()
    optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=1e-5)

    B, G, L = cfg["B"], cfg["G"], cfg["L"]
    gen = torch.Generator().manual_seed(1000 + rank)
    input_ids = torch.randint(3, cfg["vocab"], (B * G, L), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    positions = score_positions(attention_mask)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            scores = scorer(input_ids, attention_mask, positions)
        loss = listwise_ce(scores.float().view(B, G))
        loss.backward()
        optimizer.step()
        return loss.detach()

    def sync():
        if use_cuda:
            torch.cuda.synchronize()
        if sharded:
            dist.barrier()

    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    error = None
    elapsed, loss = float("nan"), None
    try:
        for _ in range(warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        elapsed = time.perf_counter() - start
        loss = float(loss)
    except torch.OutOfMemoryError as err:
        error = f"out of memory: {str(err).splitlines()[0][:200]}"

    if use_cuda:
        peak = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()], device=device)
        memory_kind = "cuda max_memory_allocated"
    else:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = torch.tensor([kib * 1024, kib * 1024])
        memory_kind = "cpu peak RSS (dry run)"
    if sharded:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()

    result = {
        "case": name, "gpus": world if use_cuda else 0, "ranks": world,
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu (dry run)",
        "mode": ("FSDP2" if sharded else "single") + (" LoRA" if cfg["lora"].get("enabled") else " full")
                + (" + grad ckpt" if cfg["gradient_checkpointing"] else ""),
        "B x G x L": f"{B}x{G}x{L}", "tokens_per_step_per_rank": B * G * L, "steps": steps,
        "elapsed_s": elapsed, "loss": loss, "n_params": n_params, "n_lora": n_lora, "n_trainable": n_trainable,
        "peak_bytes": int(peak[0]), "peak_reserved_bytes": int(peak[1]), "memory_kind": memory_kind,
        "lora": bool(cfg["lora"].get("enabled")), "gradient_checkpointing": cfg["gradient_checkpointing"],
        "error": error,
    }
    if out and rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    return result


# --------------------------------------------------------------------------- orchestration

def flops_per_token(res: dict) -> dict:
    """(model FLOPs, hardware FLOPs, 6N convention) per token, as defined in the module docstring."""
    n, n_lora = res["n_params"], res["n_lora"]
    six_n = 6 * n
    if res["lora"]:
        model = 4 * n + 6 * n_lora
    else:
        model = six_n
    hardware = model + ((2 * n + 2 * n_lora) if res["gradient_checkpointing"] else 0)
    return {"model": model, "hardware": hardware, "6N": six_n}


def row_from(res: dict, peak: float) -> dict:
    gpus = max(res["ranks"], 1)
    row = {"case": res["case"], "device": res["device"], "mode": res["mode"], "ranks": res["ranks"],
           "B x G x L per rank": res["B x G x L"]}
    if res.get("error"):
        row["status"] = res["error"]
        return row
    tokens = res["tokens_per_step_per_rank"] * res["steps"] * gpus
    tps = tokens / res["elapsed_s"]
    per_gpu = tps / gpus
    f = flops_per_token(res)
    row.update({
        "step s": res["elapsed_s"] / res["steps"],
        "tokens/s": tps,
        "tokens/s per GPU": per_gpu,
        "MFU %": 100 * per_gpu * f["model"] / (peak * 1e12),
        "HFU % (+recompute)": 100 * per_gpu * f["hardware"] / (peak * 1e12),
        "MFU % (6N convention)": 100 * per_gpu * f["6N"] / (peak * 1e12),
        "peak mem GiB": res["peak_bytes"] / 2**30,
        "reserved GiB": res["peak_reserved_bytes"] / 2**30,
        "memory": res["memory_kind"],
        "N (non-emb) M": res["n_params"] / 1e6,
        "N_lora M": res["n_lora"] / 1e6,
        "peak TFLOP/s": peak,
        "loss": res["loss"],
    })
    return row


def launch(name: str, cfg: dict, warmup: int, steps: int, dry_run: bool, nproc: int) -> dict:
    """Run `worker` in a fresh process (torchrun when nproc > 1) and return rank 0's result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = [os.path.abspath(__file__), "--worker", name, "--config", json.dumps(cfg), "--warmup", str(warmup),
                "--steps", str(steps), "--json-out", out] + (["--dry-run"] if dry_run else [])
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
        else:
            cmd = [sys.executable] + args
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout)[-3000:]
            raise RuntimeError(f"{name} ({nproc} process(es)) failed with exit code {proc.returncode}:\n{tail}")
        with open(out) as fh:
            return json.load(fh)


def plan(dry_run: bool, cases: list[str], nproc: int | None) -> list[tuple[str, int]]:
    """(case, processes) to run: the 1B case sharded over all GPUs; in a dry run over 2 CPU processes too."""
    import torch

    gpus = torch.cuda.device_count() if not dry_run else 0
    runs = []
    for name in cases:
        if CASES[name]["distributed"]:
            if dry_run:
                runs += [(name, 1), (name, nproc or 2)]
            else:
                runs.append((name, nproc or max(gpus, 1)))
        else:
            runs.append((name, 1))
    return runs


def measure(dry_run: bool = False, cases: list[str] | None = None, warmup: int = 3, steps: int = 10,
            batch: int | None = None, nproc: int | None = None, tflops: float | None = None) -> list[dict]:
    peak = peak_tflops(tflops)
    rows = []
    for name, procs in plan(dry_run, cases or list(CASES), nproc):
        cfg = case_config(name, dry_run, batch)
        try:
            res = launch(name, cfg, warmup, steps, dry_run, procs)
            rows.append(row_from(res, peak))
        except RuntimeError as err:
            rows.append({"case": name, "ranks": procs, "status": f"failed: {str(err).splitlines()[0]}"})
            print(err, file=sys.stderr)
    return rows


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


NO_CUDA = ("skipped: no CUDA device (torch.cuda.is_available() is False); the script is ready but unrun on GPU; "
           "`python benchmarks/gpu_throughput.py --dry-run` checks its code on CPU with tiny shapes")


def run(quick: bool = False) -> list[dict]:
    """For benchmarks/run.py: both cases on the GPU(s); one 'skipped' row without CUDA."""
    if not cuda_available():
        return [{"case": "all", "status": NO_CUDA}]
    return measure(warmup=1 if quick else 3, steps=2 if quick else 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all cases")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the code, not the speed")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (dry run: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default 10 (dry run: 2)")
    parser.add_argument("--batch", type=int, default=None, help="groups per step per rank (default 4)")
    parser.add_argument("--nproc", type=int, default=None, help="processes for the sharded case (default: #GPUs)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak bf16 TFLOP/s per GPU (default: $BENCH_PEAK_TFLOPS or {DEFAULT_PEAK_TFLOPS:g})")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    # internal: one rank of one case
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    steps = args.steps if args.steps is not None else (2 if args.dry_run else 10)

    if args.worker:
        worker(args.worker, json.loads(args.config), warmup, steps, args.dry_run, args.json_out)
        return 0
    if not args.dry_run and not cuda_available():
        print(f"gpu_throughput: {NO_CUDA}", file=sys.stderr)
        return 2
    rows = measure(args.dry_run, args.case, warmup, steps, args.batch, args.nproc, args.peak_tflops)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from run import table

        print(table(rows))
    return 1 if any("status" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
