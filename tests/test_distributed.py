"""Multi-process training on CPU with gloo (trainer=ddp, trainer=fsdp), the strategy helpers and configs.

The 2-process runs are one `torchrun --nproc_per_node 2 tests/distributed/run_cases.py` subprocess
(Lightning's own launcher would re-run pytest's command line); each case is train.py's `train(cfg)`
with the tiny random Llama on the sample data: data.batch_size=1 on each of 2 processes against
data.batch_size=2 on one process, fp32, 4 steps, checkpoints at steps 2 and 4, then a second run
resumed from the step-2 checkpoint. The `*_matryoshka_*` cases run stage-1 Matryoshka self-distillation
(SPEC 7: exits 1 and 2, compression changing from step to step) the same way. See tests/distributed/cases.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_MODEL

DIST = ROOT / "tests" / "distributed"
sys.path.insert(0, str(DIST))

import cases  # noqa: E402

pytestmark = pytest.mark.distributed
CASE_NAMES = list(cases.CASES)
FSDP_CASES = [c for c in CASE_NAMES if cases.CASES[c][0] == "fsdp"]
DDP_CASES = [c for c in CASE_NAMES if cases.CASES[c][0] == "ddp"]
MATRYOSHKA_CASES = [c for c in CASE_NAMES if cases.CASES[c][1].startswith("matryoshka")]
LAUNCH_TIMEOUT = 420


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, dict[str, dict[str, dict]]]:
    """All cases in one torchrun launch of 2 processes; {case: {"run": record, "resumed": record}}."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(DIST / "run_cases.py"), str(out), *CASE_NAMES]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=out)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed after {time.time() - start:.0f} s, rc={proc.returncode}\n"
                    f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-8000:]}")
    records = {c: {r: read(out / c / r / "record.json") for r in ("run", "resumed")} for c in CASE_NAMES}
    return out, records


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict]:
    """The single-process runs (this process, trainer=cpu, data.batch_size=2) the cases must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    records = {}
    for name in cases.REFERENCES:
        cases.run(name, out / name, world_size=1)
        records[name] = read(out / name / "run" / "record.json")
    return records


def close(a, b, atol):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               atol=atol, rtol=0)


def exit_setting(key: str) -> tuple[int, int]:
    """"2x1" (a key of a record's exit_scores) -> (exit layer 2, compress ratio 1)."""
    layer, ratio = key.split("x")
    return int(layer), int(ratio)


# ---------------------------------------------------------------- 2 processes = 1 process


@pytest.mark.parametrize("case", CASE_NAMES)
def test_two_processes_train_like_one(case, launched, references):
    """Same global batch (1 query on each of 2 ranks = 2 queries on 1): the same losses step by step,
    and the same trained model (its scores), within fp32 reduction-order noise."""
    _, records = launched
    run, ref = records[case]["run"], references[cases.CASES[case][1]]
    assert run["world_size"] == 2 and ref["world_size"] == 1
    assert run["strategy"] == {"ddp": "DDPStrategy", "fsdp": "RerankFSDPStrategy"}[cases.CASES[case][0]]
    assert list(run["losses"]) == [str(s) for s in range(cases.MAX_STEPS)] == list(ref["losses"])
    close(list(run["losses"].values()), list(ref["losses"].values()), atol=1e-5)
    # the gradient norm over all shards; in full fine-tuning above trainer.gradient_clip_val (1.0) at some
    # step, so the losses after it say that clipping scaled every shard by the global norm
    close(list(run["grad_norms"].values()), list(ref["grad_norms"].values()), atol=1e-4)
    if cases.CASES[case][1].endswith("full"):
        assert max(ref["grad_norms"].values()) > 1.0
    close(run["scores"], ref["scores"], atol=1e-4)
    # validation (all-gathered over ranks) before and after fit, the second on the same FSDP shards
    assert [v["step"] for v in run["validations"]] == [0, cases.MAX_STEPS] == [v["step"] for v in ref["validations"]]
    for mine, theirs in zip(run["validations"], ref["validations"]):
        assert set(mine) == set(theirs) >= {"val/MRR@10", "val/nDCG@10", "val/MAP"}
        close([mine[k] for k in sorted(mine)], [theirs[k] for k in sorted(mine)], atol=1e-6)
    # the scores moved in training, so agreeing on them says something
    assert max(abs(a - b) for a, b in zip(run["scores"], run["start_scores"])) > 1e-2


@pytest.mark.parametrize("case", MATRYOSHKA_CASES)
def test_matryoshka_exits_train_like_one_process(case, launched, references):
    """Stage-1 self-distillation: every rank draws the same compression per step (a function of seed and
    step), some steps compressed and some not, and the trained module scores like one process at both
    exits, compressed and not; validation reports every exit."""
    _, records = launched
    run, ref = records[case]["run"], references[cases.CASES[case][1]]
    compression = {s: (ratio, layers) for s, (ratio, layers) in run["compression"].items()}
    assert compression == {s: tuple(v) for s, v in ref["compression"].items()}
    assert {s for s, (ratio, layers) in compression.items() if ratio > 1 and layers} == {"2", "3"}
    assert {s for s, (ratio, layers) in compression.items() if ratio == 1} == {"0", "1"}
    assert sorted(run["exit_scores"]) == sorted(f"{l}x{r}" for l, r in cases.EXIT_SETTINGS)
    for key, scores in run["exit_scores"].items():
        close(scores, ref["exit_scores"][key], atol=1e-4)
    top = max(cases.EXITS)
    assert run["exit_scores"][f"{top}x1"] == run["scores"]
    # compression changes the top exit's scores; exit 1 lies before the only compress layer's effect
    assert max(abs(a - b) for a, b in zip(run["exit_scores"][f"{top}x1"], run["exit_scores"][f"{top}x2"])) > 1e-3
    assert run["exit_scores"]["1x1"] == run["exit_scores"]["1x2"]
    assert max(abs(a - b) for a, b in zip(run["exit_scores"]["1x1"], run["exit_scores"][f"{top}x1"])) > 1e-3
    for validation in run["validations"]:
        assert {f"val/exit{l}/nDCG@10" for l in cases.EXITS} <= set(validation)
        assert validation["val/nDCG@10"] == validation[f"val/exit{top}/nDCG@10"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_resumed_run_continues_exactly(case, launched):
    """From the step-2 checkpoint (sharded under FSDP): the same batches on every rank, the same
    losses and the same final model as the uninterrupted run, to the bit."""
    _, records = launched
    run, resumed = records[case]["run"], records[case]["resumed"]
    assert resumed["start_step"] == cases.RESUME_STEP and resumed["global_step"] == cases.MAX_STEPS
    steps = [str(s) for s in range(cases.RESUME_STEP, cases.MAX_STEPS)]
    assert list(resumed["losses"]) == steps
    assert resumed["batches"] == {s: run["batches"][s] for s in steps}  # each rank's input ids
    assert resumed["losses"] == {s: run["losses"][s] for s in steps}
    assert resumed["scores"] == run["scores"]
    assert resumed.get("exit_scores") == run.get("exit_scores")  # Matryoshka: every exit, compressed or not
    # and the resumed run started from the checkpoint, not from scratch
    assert resumed["start_scores"] != run["start_scores"]


def test_fsdp_shards_and_checkpoints_each_decoder_layer(launched):
    """One FSDP2 unit per decoder layer (found from the model) plus the module as root, and those layers
    recompute their activations in backward, with or without model.gradient_checkpointing=true."""
    _, records = launched
    layers = ["LlamaDecoderLayer"] * TINY_MODEL["random_init"]["num_hidden_layers"]
    units = ["FSDP" + name for name in layers]
    assert records["fsdp_full"]["run"]["fsdp_units"] == ["FSDPRerankerModule", *units]
    assert records["fsdp_lora"]["run"]["fsdp_units"] == ["FSDPRerankerModule", *units]
    assert records["fsdp_matryoshka_full"]["run"]["fsdp_units"] == ["FSDPMatryoshkaModule", *units]  # heads in the root
    for case in FSDP_CASES:
        assert records[case]["run"]["checkpointed"] == layers
    for case in DDP_CASES:
        assert records[case]["run"]["fsdp_units"] == []


# ---------------------------------------------------------------- export and checkpoints


@pytest.mark.parametrize("case", CASE_NAMES)
def test_export_scores_like_the_trained_model(case, launched):
    """train.py's export under DDP/FSDP: the exported model (LoRA merged) scores like the module at the
    end of training (scored through the strategy's wrapper, shards gathered as in training)."""
    from rerank_lightning.inference import Reranker

    out, records = launched
    export = out / case / "run" / "export"
    assert (export / "config.json").is_file() and not (export / "adapter_config.json").exists()
    scores = Reranker.from_pretrained(export).score(cases.PAIRS)
    close(scores, records[case]["run"]["scores"], atol=1e-5)


@pytest.mark.parametrize("case", MATRYOSHKA_CASES)
def test_matryoshka_export_scores_like_the_trained_module_at_each_exit(case, launched):
    """The stage-1 export (model, heads, recipe) under DDP/FSDP: `Reranker` scores like the trained
    module's own forward (through the strategy's wrapper) at the shallow and the top exit, compressed and not."""
    from rerank_lightning.inference import Reranker
    from rerank_lightning.model.matryoshka_module import HEADS_FILE

    out, records = launched
    export = out / case / "run" / "export"
    assert (export / HEADS_FILE).is_file()
    recipe = json.loads((export / "reranker_config.json").read_text())
    assert recipe["recipe"] == "matryoshka" and recipe["score"] == "matryoshka_heads"
    assert recipe["matryoshka"]["exits"] == list(cases.EXITS) and recipe["matryoshka"]["compress_layers"] == [1]
    reranker = Reranker.from_pretrained(export)
    for key, want in records[case]["run"]["exit_scores"].items():
        layer, ratio = exit_setting(key)
        close(reranker.score(cases.PAIRS, exit_layer=layer, compress_ratio=ratio), want, atol=1e-5)


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_checkpoint_is_sharded_and_exports_on_its_own(case, launched, tmp_path):
    """An FSDP checkpoint is a directory with one shard file per rank (LoRA: the adapter only), and
    `python -m rerank_lightning.inference.export` turns it into a model that scores like the trained one."""
    from rerank_lightning.inference import Reranker
    from rerank_lightning.inference.export import main as export_main
    from rerank_lightning.strategies import CHECKPOINT_METADATA, sharded_weight_names

    out, records = launched
    ckpt = out / case / "run" / "checkpoints" / f"step{cases.MAX_STEPS}.ckpt"
    assert ckpt.is_dir(), ckpt
    last = out / case / "run" / "checkpoints" / "last.ckpt"  # save_last: link, as README's commands use it
    assert last.resolve() == ckpt.resolve()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / CHECKPOINT_METADATA).is_file()
    keys = sharded_weight_names(ckpt)
    if cases.CASES[case][1] == "lora":
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), sorted(keys)[:5]
    else:
        assert "lm.model.embed_tokens.weight" in keys and "lm.lm_head.weight" in keys
    if case in MATRYOSHKA_CASES:
        assert {f"heads.heads.{l}.weight" for l in cases.EXITS} <= keys
    export_main([str(last), str(tmp_path / "export")])
    reranker = Reranker.from_pretrained(tmp_path / "export")
    close(reranker.score(cases.PAIRS), records[case]["run"]["scores"], atol=1e-5)
    for key, want in records[case]["run"].get("exit_scores", {}).items():
        layer, ratio = exit_setting(key)
        close(reranker.score(cases.PAIRS, exit_layer=layer, compress_ratio=ratio), want, atol=1e-5)


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["truncated", "missing", "crafted"])
def test_a_damaged_sharded_checkpoint_is_refused_in_one_line(damage, launched, tmp_path, capsys):
    """A sharded checkpoint copied in part or cut short by a full disk (its index and metadata intact),
    or one whose index (a plain pickle, which torch's reader unpickles as it is) would run a command:
    resume and export refuse it by name before loading anything, and the command never runs."""
    import pickle
    import shutil

    from rerank_lightning.checkpoints import CheckpointError, read_checkpoint
    from rerank_lightning.inference.export import main as export_main

    out, _ = launched
    ckpt = tmp_path / "step.ckpt"
    shutil.copytree(out / "fsdp_full" / "run" / "checkpoints" / f"step{cases.MAX_STEPS}.ckpt", ckpt)
    read_checkpoint(ckpt)  # whole, it passes
    shard, marker = ckpt / "__1_0.distcp", tmp_path / "ran"
    expected = {"truncated": "truncated: its shard file __1_0.distcp",
                "missing": "its shard file __1_0.distcp is missing",
                "crafted": "holds pickled Python objects (posix.system), not only checkpoint metadata: refused"}[damage]
    if damage == "truncated":
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "missing":
        shard.unlink()
    else:
        (ckpt / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        read_checkpoint(ckpt)
    assert export_main([str(ckpt), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "export").exists() and not marker.exists()


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_checkpoint_is_one_file(case, launched):
    """One file holding the trainable weights: the adapter, and for Matryoshka the exit heads."""
    out, _ = launched
    ckpt = out / case / "run" / "checkpoints" / f"step{cases.MAX_STEPS}.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    heads = {f"heads.heads.{l}.weight" for l in cases.EXITS} if case in MATRYOSHKA_CASES else set()
    assert state and heads <= set(state) and all("lora_" in k for k in set(state) - heads)


def test_matryoshka_compression_under_transformers_gradient_checkpointing(tiny_model_cfg):
    """A compressed pass reads the attention row of the layer before the compress layer; under activation
    checkpointing (transformers', which the FSDP strategy switches on too) that layer is
    recomputed in backward without it, which must save the same tensors: same loss and gradients as without."""
    from rerank_lightning.model.matryoshka_module import MatryoshkaModule

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = {**tiny_model_cfg, "gradient_checkpointing": checkpointing,
               "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
        module = MatryoshkaModule(model=cfg, yes_token_id=5, no_token_id=6, vocab_size=128,
                                  matryoshka={"start_layer": 1, "compress_layers": [1], "compress_ratios": [2]})
        module.configure_model()
        module.train()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(7, 128, (4, 24), generator=gen)
        batch = {"pair": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 "query_lengths": torch.full((4,), 6), "prompt_lengths": torch.full((4,), 5)}
        scores = module.exit_scores(batch, [1, 2], [1], 2)
        loss = sum((s * torch.arange(1, 5)).sum() for s in scores.values())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
        grads[-1]["loss"] = loss.detach()
    assert grads[0].keys() == grads[1].keys() and any(".lora_A." in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ---------------------------------------------------------------- strategy helpers (in process)


TINY_LAYERS = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer",
               "gemma": "GemmaDecoderLayer"}


def tiny_lm(model_type: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    init = {k: v for k, v in TINY_MODEL["random_init"].items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, vocab_size=128, **init)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


@pytest.mark.parametrize("model_type", list(TINY_LAYERS))
def test_decoder_layer_class_comes_from_the_model(model_type):
    """FSDP's wrap and checkpointing unit: the model's own decoder layer, through peft and the module too."""
    from rerank_lightning.model.backbone import apply_lora
    from rerank_lightning.strategies import decoder_layer_classes

    lm = tiny_lm(model_type)
    (cls,) = decoder_layer_classes(lm)
    assert cls.__name__ == TINY_LAYERS[model_type]
    assert sum(isinstance(m, cls) for m in lm.modules()) == TINY_MODEL["random_init"]["num_hidden_layers"]
    peft_lm = apply_lora(lm, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert decoder_layer_classes(torch.nn.ModuleDict({"lm": peft_lm})) == (cls,)
    with pytest.raises(ValueError, match="no decoder-layer class"):
        decoder_layer_classes(torch.nn.Linear(2, 2))
    assert decoder_layer_classes(lm, ["LlamaMLP", "MistralMLP", "Qwen2MLP", "GemmaMLP"])[0].__name__.endswith("MLP")


def test_lora_on_bf16_base_gets_one_dtype():
    """peft keeps the adapter in fp32 on a bf16 base; an FSDP unit gathers its parameters in one dtype."""
    from rerank_lightning.model.backbone import apply_lora
    from rerank_lightning.strategies import unify_dtypes

    lm = apply_lora(tiny_lm("llama", torch.bfloat16), {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [p for p in lm.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert unify_dtypes(lm) == torch.bfloat16
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in trainable)
    assert unify_dtypes(lm) is None  # already uniform
    full = tiny_lm("llama")
    assert unify_dtypes(full) is None and {p.dtype for p in full.parameters()} == {torch.float32}


# ---------------------------------------------------------------- configs


@pytest.fixture()
def compose():
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    yield lambda args, out="/tmp/rerank-lightning-test-output": cases.compose(
        [*args, f"hydra.runtime.output_dir={out}"])
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("trainer,precision", [("gpu", "bf16-mixed"), ("gpu_bf16_true", "bf16-true"),
                                               ("ddp", "bf16-mixed"), ("fsdp", "bf16-mixed")])
def test_gpu_trainer_configs_compose(compose, trainer, precision):
    for model in ("mistral", "smollm2"):
        job = compose([f"trainer={trainer}", f"model={model}"])
        assert job.trainer._target_ == "lightning.Trainer"
        assert job.trainer.accelerator == "gpu" and job.trainer.precision == precision
        assert job.trainer.num_nodes == 1
        assert job.trainer.devices == (1 if trainer.startswith("gpu") else "auto")


def test_ddp_config_builds_a_static_graph_ddp_strategy(compose, tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from rerank_lightning.train import build

    job = compose(["model=tiny", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "~logger",
                   "trainer.precision=32-true"], tmp_path)
    _, _, trainer = build(job)
    strategy = trainer.strategy
    assert type(strategy) is DDPStrategy
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    assert strategy._ddp_kwargs["static_graph"] is True
    assert trainer.num_devices == 2 and trainer.world_size == 2


@pytest.mark.parametrize("hybrid", [False, True])
def test_fsdp_config_builds_through_train_build(compose, tmp_path, hybrid):
    """trainer=fsdp instantiates in train.py's build(cfg), on CPU too (Lightning's "fsdp" refuses CPU):
    Lightning's public ModelParallelStrategy, every rank a data-parallel replica, Lightning's clipping."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rerank_lightning.strategies import RerankFSDPStrategy
    from rerank_lightning.train import build

    job = compose(["model=tiny", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "~logger",
                   "trainer.precision=32-true", f"trainer.strategy.hybrid_shard={hybrid}"], tmp_path)
    _, _, trainer = build(job)
    strategy = trainer.strategy
    assert isinstance(strategy, RerankFSDPStrategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.hybrid_shard is hybrid and strategy.activation_checkpointing
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert type(trainer.precision_plugin) is Precision
    assert trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_of_eight_get_their_ranks(compose, tmp_path, monkeypatch, launcher):
    """README's 2x8 commands: Lightning reads the node's rank from torchrun's or SLURM's environment."""
    from rerank_lightning.train import build

    for var in [v for v in os.environ if v.startswith(("SLURM_", "TORCHELASTIC_")) or v in (
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]:
        monkeypatch.delenv(var)
    if launcher == "torchrun":  # torchrun --nnodes 2 --nproc_per_node 8 --node_rank 1 ...: its 2nd worker
        env = {"RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
               "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "rerank"}
        environment = "TorchElasticEnvironment"
    else:  # sbatch --nodes 2 --ntasks-per-node 8; srun python train.py ...: task 9
        env = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_PROCID": "9",
               "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "rerank",
               "SLURM_NODELIST": "node[0-1]", "SLURM_JOB_NODELIST": "node[0-1]"}
        environment = "SLURMEnvironment"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    job = compose(["model=tiny", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=8",
                   "trainer.num_nodes=2", "trainer.precision=32-true", "~logger"], tmp_path)
    _, _, trainer = build(job)
    assert type(trainer.strategy.cluster_environment).__name__ == environment
    assert (trainer.num_nodes, trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (
        2, 16, 9, 1, 1)
