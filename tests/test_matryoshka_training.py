"""Both Matryoshka stages (SPEC 7) on tiny random decoders of each architecture: training lowers the
loss, export and `Reranker` score like the trained module, and the matching compensation adapter
is picked at inference."""

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from rerank_lightning.data import RerankDataModule
from rerank_lightning.inference import Reranker
from rerank_lightning.inference.matryoshka_export import export_compensation, export_matryoshka
from rerank_lightning.model.matryoshka_module import MatryoshkaModule

ARCHS = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": 16},
    "qwen2": {"model_type": "qwen2"},
}
SETTINGS = {"start_layer": 1, "compress_layers": [1, 2, 3], "compress_ratios": [1, 2, 4], "method": "cascade"}


class LossLog(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _model_cfg(base, arch, lora):
    cfg = copy.deepcopy(base)
    cfg["random_init"] = {**cfg["random_init"], **ARCHS[arch], "num_hidden_layers": 4}
    cfg["lora"] = {"enabled": lora, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    return cfg


def _datamodule(tokenizer, data_file):
    return RerankDataModule(tokenizer, train_data=str(data_file), recipe="matryoshka", train_group_size=4,
                            query_max_len=16, passage_max_len=48, batch_size=2, cache_dir=None)


def _fit(module, datamodule, epochs):
    log = LossLog()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[log])
    trainer.fit(module, datamodule=datamodule)
    return log.losses


def _first_last(losses, n=5):
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def _group_loss(module, datamodule, exits, ratio):
    """Listwise CE summed over `exits` on fixed groups (epoch 0), compressed at every layer when ratio > 1."""
    from rerank_lightning.model.losses import listwise_ce

    batch = datamodule.collator([datamodule.train_set[(0, i)] for i in range(len(datamodule.train_set))])
    module.eval()
    with torch.no_grad():
        scores = module.exit_scores(batch, exits, SETTINGS["compress_layers"], ratio)
    module.train()
    return sum(float(listwise_ce(s.view(-1, batch["group_size"]))) for s in scores.values())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_both_stages_lower_the_loss_and_export(arch, tmp_path, mistral_tokenizer, tiny_model_cfg, shared_data):
    torch.manual_seed(0)
    data = shared_data / "flagembedding" / "reranker_normal_examples.jsonl"  # 10 queries with teacher scores
    dm = _datamodule(mistral_tokenizer, data)
    fmt = dm.formatter
    common = dict(yes_token_id=fmt.yes_id, no_token_id=fmt.no_id, vocab_size=len(mistral_tokenizer),
                  optim={"lr": 2e-3, "warmup": 0}, recipe=fmt.recipe())

    stage1 = MatryoshkaModule(model=_model_cfg(tiny_model_cfg, arch, lora=False), **common,
                              matryoshka={**SETTINGS, "stage": "self_distill"})
    losses = _fit(stage1, dm, epochs=4)
    first, last = _first_last(losses)
    assert last < 0.8 * first, f"stage 1 did not learn: {losses}"
    assert stage1.exits == [1, 2, 3, 4]

    export = export_matryoshka(stage1.lm, stage1.heads, fmt, tmp_path / "export", stage1.mcfg)
    recipe = json.loads((export / "reranker_config.json").read_text())
    assert recipe["recipe"] == "matryoshka" and recipe["matryoshka"]["exits"] == [1, 2, 3, 4]

    # The export scores like the trained module, at an exit and compressed.
    pairs = [("what is a glacier cave", "A glacier cave is a cave formed within the ice of a glacier."),
             ("what is a glacier cave", "The ice facade is approximately 60 m high and rather long indeed.")]
    reranker = Reranker.from_pretrained(export)
    stage1_top = reranker.score(pairs)
    stage1.eval()
    for layer, ratio in [(4, 1), (2, 1), (4, 2)]:
        got = reranker.score(pairs, exit_layer=layer, compress_ratio=ratio)
        items = [fmt.encode_pair(q, p) for q, p in pairs]
        want = _module_scores(stage1, items, layer, ratio, fmt.pad_id)
        assert got == pytest.approx(want, abs=1e-5)

    # Stage 2 from the export: depth and width compensation lower their losses.
    for factor, ratio in [("depth", 1), ("width", 2)]:
        cfg = _model_cfg(tiny_model_cfg, arch, lora=True)
        cfg.update(pretrained=str(export), random_init=None, tokenizer=None)
        stage2 = MatryoshkaModule(model=cfg, **common, matryoshka={
            **SETTINGS, "stage": "compensation", "factor": factor, "compress_ratios": [ratio], "method": "teacher"})
        stage2.configure_model()
        exits = [1, 2, 3] if factor == "depth" else [1, 2, 3, 4]
        before = _group_loss(stage2, dm, exits, ratio)
        _fit(stage2, dm, epochs=2)
        after = _group_loss(stage2, dm, exits, ratio)
        assert after < before, f"compensation ({factor}) did not lower the loss: {before} -> {after}"
        assert not any(p.requires_grad for p in stage2.heads.parameters())  # heads stay as stage 1 left them
        export_compensation(stage2.lm, export, factor, ratio)

    reranker = Reranker.from_pretrained(export)
    assert reranker.adapters == ["depth", "width_r2"]
    assert reranker.adapter_for(4, 1) is None
    assert reranker.adapter_for(2, 1) == "depth"
    assert reranker.adapter_for(4, 2) == reranker.adapter_for(2, 2) == "width_r2"
    assert reranker.adapter_for(2, 4) == "depth"  # no width_r4 adapter: the depth one still helps shallow exits
    # The top exit uncompressed is the stage-1 model itself, adapters or not; other settings use them.
    assert reranker.score(pairs) == pytest.approx(stage1_top, abs=1e-6)
    no_adapter = Reranker.from_pretrained(export)
    no_adapter.adapters = []
    assert reranker.score(pairs, exit_layer=2) != pytest.approx(no_adapter.score(pairs, exit_layer=2), abs=1e-6)


def _module_scores(module, items, layer, ratio, pad_id):
    from rerank_lightning.data.instruction import pad_batch

    ids = pad_batch([e[0] for e in items], pad_id, "right")
    mask = pad_batch([[1] * len(e[0]) for e in items], 0, "right")
    with torch.no_grad():
        out = module(ids, mask, torch.tensor([e[1] for e in items]), torch.tensor([e[2] for e in items]),
                     exits=(layer,), compress_layers=tuple(SETTINGS["compress_layers"]), compress_ratio=ratio)
    return out[layer].tolist()


def test_compression_sampling_is_a_pure_function_of_seed_and_step(tiny_model_cfg, mistral_tokenizer):
    module = MatryoshkaModule(model=tiny_model_cfg, yes_token_id=1, no_token_id=2, vocab_size=len(mistral_tokenizer),
                              matryoshka={**SETTINGS, "seed": 3})
    draws = [module.sample_compression(step) for step in range(40)]
    assert draws == [module.sample_compression(step) for step in range(40)]
    assert {ratio for ratio, _ in draws} == {1, 2, 4}
    assert all(layers == [] for ratio, layers in draws if ratio == 1)
    picked = [c for ratio, layers in draws if ratio > 1 for c in layers]
    assert set(picked) <= {1, 2, 3} and len(set(picked)) == 3


@pytest.mark.parametrize("bad, match", [
    ({"stage": "stage3"}, "matryoshka.stage"),
    ({"method": "last_layer"}, "matryoshka.method"),
    ({"compress_method": "max"}, "matryoshka.compress_method"),
    ({"compress_ratios": [0, 2]}, "compress_ratios"),
    ({"stage": "compensation", "factor": "height"}, "factor"),
    ({"stage": "compensation", "factor": "depth"}, "lora.enabled"),
])
def test_bad_settings_are_named(bad, match, tiny_model_cfg):
    with pytest.raises(ValueError, match=match):
        MatryoshkaModule(model=tiny_model_cfg, yes_token_id=1, no_token_id=2, vocab_size=100,
                         matryoshka={**SETTINGS, **bad})


def test_pair_cost_counts_tokens_per_layer_after_each_compression():
    from rerank_lightning.eval.matryoshka_grid import pair_cost

    # 20 tokens: query 5, passage 12, prompt 3. Compress before layers 2 and 3 at ratio 4:
    # layers 0,1 see 20; from layer 2 the passage is 3 tokens (11); from layer 3 it is 1 (9).
    tokens, flops = pair_cost(20, 5, 3, exit_layer=4, compress_layers=[2, 3], ratio=4, layer_params=10, hidden=2)
    assert tokens == 20 + 20 + 11 + 9
    assert flops == sum(2 * 10 * n + 4 * n * n * 2 for n in (20, 20, 11, 9))
    assert pair_cost(20, 5, 3, 2, [2, 3], 4, 10, 2)[0] == 40  # an exit before the compress layers
    assert pair_cost(20, 5, 3, 4, [2, 3], 1, 10, 2)[0] == 80  # ratio 1: no compression


def test_grid_rows_match_single_settings_and_files_are_written(tmp_path, mistral_tokenizer, tiny_model_cfg):
    from rerank_lightning.data.candidates import load_candidate_lists
    from rerank_lightning.data.formatting import MatryoshkaFormatter
    from rerank_lightning.eval.evaluate import metrics_for_scores
    from rerank_lightning.eval.matryoshka_grid import evaluate_grid, write_outputs

    fmt = MatryoshkaFormatter(mistral_tokenizer, 16, 48)
    cfg = _model_cfg(tiny_model_cfg, "llama", lora=False)
    module = MatryoshkaModule(model=cfg, yes_token_id=fmt.yes_id, no_token_id=fmt.no_id,
                              vocab_size=len(mistral_tokenizer), recipe=fmt.recipe(), matryoshka=SETTINGS)
    module.configure_model()
    export = export_matryoshka(module.lm, module.heads, fmt, tmp_path / "export", module.mcfg)
    reranker = Reranker.from_pretrained(export)
    lists = load_candidate_lists(Path(__file__).parents[1] / "data/sample/val_candidates.jsonl", max_queries=4)
    per_query: list = []
    rows = evaluate_grid(reranker, lists, exits=[2, 4], ratios=[1, 4], per_query=per_query)
    assert [(r["exit_layer"], r["ratio"]) for r in rows] == [(2, 1), (4, 1), (2, 4), (4, 4)]
    assert len(per_query) == 4 * len(lists)
    for r in rows:  # the grid's means are the means of its per-query rows
        mine = [q["nDCG@10"] for q in per_query if (q["exit_layer"], q["ratio"]) == (r["exit_layer"], r["ratio"])]
        assert [q["qid"] for q in per_query[:len(lists)]] == [cl.qid for cl in lists]
        assert r["nDCG@10"] == pytest.approx(sum(mine) / len(mine), abs=1e-6)
    pairs = [(cl.query, t) for cl in lists for t in cl.texts]
    for r in rows:  # each row is what scoring at that one setting gives
        single = reranker.score(pairs, exit_layer=r["exit_layer"], compress_ratio=r["ratio"])
        assert r["nDCG@10"] == pytest.approx(metrics_for_scores(lists, single)["nDCG@10"])
    cost = {(r["exit_layer"], r["ratio"]): r["relative_cost"] for r in rows}
    assert cost[(4, 1)] == pytest.approx(1.0)
    assert cost[(2, 1)] == pytest.approx(0.5)
    assert cost[(4, 4)] < cost[(4, 1)] and cost[(2, 4)] < cost[(4, 4)]
    paths = write_outputs(rows, tmp_path / "grid", per_query=per_query)
    assert [p.name for p in paths] == ["grid.csv", "grid.md", "grid.png", "per_query.csv"]
    assert all(p.stat().st_size for p in paths)
    assert (tmp_path / "grid" / "grid.csv").read_text().count("\n") == 5
    assert (tmp_path / "grid" / "per_query.csv").read_text().count("\n") == 1 + 4 * len(lists)


def _write_grid(folder, per_query, adapter="depth"):
    """A grid folder (grid.csv + per_query.csv) from {(exit, ratio): {qid: nDCG@10}}."""
    from rerank_lightning.eval.matryoshka_grid import _write_csv

    folder.mkdir(parents=True)
    _write_csv(folder / "grid.csv", [{"exit_layer": l, "ratio": r, "adapter": adapter} for l, r in per_query])
    _write_csv(folder / "per_query.csv", [{"exit_layer": l, "ratio": r, "qid": q, "nDCG@10": v}
                                          for (l, r), values in per_query.items() for q, v in values.items()])


def test_compare_grids_pairs_queries_and_bootstraps(tmp_path):
    from rerank_lightning.eval.matryoshka_grid import compare_grids

    base = {(8, 1): {f"q{i}": 0.5 for i in range(40)}, (30, 1): {f"q{i}": 1.0 for i in range(40)}}
    better = {f"q{i}": (0.5 + 0.25 * (i < 30) - 0.25 * (i >= 38)) for i in range(40)}  # 30 up, 2 down, 8 same
    _write_grid(tmp_path / "base", base)
    _write_grid(tmp_path / "other", {(8, 1): better, (30, 1): base[(30, 1)], (16, 1): better})
    rows = compare_grids(tmp_path / "base", tmp_path / "other", samples=500)
    assert [(r["exit_layer"], r["ratio"]) for r in rows] == [(8, 1), (30, 1)]  # only the shared settings
    r8, r30 = rows
    assert r8["change"] == pytest.approx((30 * 0.25 - 2 * 0.25) / 40)
    assert (r8["better"], r8["worse"], r8["same"]) == (30, 2, 8)
    assert 0 < r8["ci95_low"] < r8["change"] < r8["ci95_high"]
    assert r30["change"] == r30["ci95_low"] == r30["ci95_high"] == 0 and r30["same"] == 40
    assert r8["nDCG@10 base"] == pytest.approx(0.5) and r8["adapter"] == "depth"


def test_compare_grids_refuses_mismatched_queries_and_runs_from_the_cli(tmp_path, capsys):
    from rerank_lightning.eval.matryoshka_grid import compare_grids, main

    _write_grid(tmp_path / "a", {(8, 1): {"q1": 0.5, "q2": 1.0}})
    _write_grid(tmp_path / "b", {(8, 1): {"q1": 0.5, "q3": 1.0}})
    with pytest.raises(ValueError, match="different queries"):
        compare_grids(tmp_path / "a", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="per_query.csv"):
        compare_grids(tmp_path / "a", tmp_path / "missing")
    _write_grid(tmp_path / "c", {(8, 1): {"q1": 1.0, "q2": 1.0}})
    main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "mean change nDCG@10 +0.2500" in out
    assert (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[1].startswith("8,1,depth,0.75,1.0,0.25")
