"""Quality against cost of a Matryoshka re-ranker (SPEC 7) over exit layers x compression ratios.

`python -m rerank_lightning.eval.matryoshka_grid EXPORT_DIR CANDIDATES.jsonl --out DIR
 [--exits 8,16,24,30] [--ratios 1,2,4,8] [--compress-layers 4,8,...] [--max-queries N] [--device cuda]`
writes DIR/grid.csv, DIR/grid.md and DIR/grid.png (nDCG@10 and MRR@10 against the cost) and
DIR/per_query.csv (each setting's metrics per query).
`python -m rerank_lightning.eval.matryoshka_grid compare BASE_DIR OTHER_DIR [--out DIR]` pairs two such
grids query by query (e.g. without and with the compensation adapters): the mean change per setting
with a paired bootstrap 95% interval, and how many queries got better or worse.

Cost of one pair at (exit l, ratio r): the decoder layers it runs and the tokens each sees.
`token_layers` = sum over the l layers of the sequence length at that layer (compression shortens
it from each compress layer on); `gflops` = sum over layers of 2 * (parameters per layer) * length
+ 4 * length^2 * hidden (attention scores and weighted values), per pair, averaged over pairs.
`relative_cost` = token_layers / the full model's token_layers (top exit, no compression).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from ..data.candidates import CandidateList, load_candidate_lists
from ..data.records import DataFormatError
from .compare import add_bootstrap_options, markdown_table, paired_change
from .evaluate import per_query_metrics_for_scores


def pair_cost(length: int, query_length: int, prompt_length: int, exit_layer: int, compress_layers: Sequence[int],
              ratio: int, layer_params: int, hidden: int) -> tuple[int, float]:
    """(token-layers, FLOPs) of one pair run to `exit_layer` with compression before each compress layer."""
    token_layers, flops, current = 0, 0.0, length
    for layer in range(exit_layer):
        if ratio > 1 and layer in compress_layers and layer > 0:
            passage = current - query_length - prompt_length
            current = query_length + math.ceil(passage / ratio) + prompt_length
        token_layers += current
        flops += 2 * layer_params * current + 4 * current * current * hidden
    return token_layers, flops


def evaluate_grid(reranker: Any, lists: Sequence[CandidateList], exits: Sequence[int], ratios: Sequence[int],
                  compress_layers: Sequence[int] | None = None, k: int = 10,
                  relevance_threshold: float = 1,
                  per_query: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (exit, ratio): metrics, cost and the compensation adapter used.

    `per_query`, when given a list, receives one row per (exit, ratio, query) with that query's metrics.
    """
    pairs = [(cl.query, text) for cl in lists for text in cl.texts]
    layers = list(reranker.matryoshka.get("compress_layers", [])) if compress_layers is None else list(compress_layers)
    encoded = [reranker.formatter.encode_pair(q, p) for q, p in pairs]
    lm = reranker.lm.get_base_model() if hasattr(reranker.lm, "get_base_model") else reranker.lm
    decoder = lm.get_decoder()
    layer_params = sum(p.numel() for p in decoder.layers[0].parameters())
    hidden = lm.config.hidden_size
    top = max(reranker.heads.layers)
    full_cost = sum(pair_cost(len(e[0]), e[1], e[2], top, layers, 1, layer_params, hidden)[0] for e in encoded)
    rows = []
    for ratio in ratios:
        scores = reranker.score_exits(pairs, exits, ratio, layers)
        for layer in exits:
            costs = [pair_cost(len(e[0]), e[1], e[2], layer, layers, ratio, layer_params, hidden) for e in encoded]
            token_layers = sum(c[0] for c in costs)
            by_query = per_query_metrics_for_scores(lists, scores[layer], k, relevance_threshold)
            if per_query is not None:
                per_query.extend({"exit_layer": layer, "ratio": ratio, "qid": cl.qid,
                                  **{name: float(v[qi]) for name, v in by_query.items()}}
                                 for qi, cl in enumerate(lists))
            rows.append({
                "exit_layer": layer, "ratio": ratio,
                **{name: float(v.mean()) for name, v in by_query.items()},
                "token_layers_per_pair": token_layers / len(encoded),
                "gflops_per_pair": sum(c[1] for c in costs) / len(encoded) / 1e9,
                "relative_cost": token_layers / full_cost,
                "adapter": reranker.adapter_for(layer, ratio) or "-",
            })
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(rows: list[dict[str, Any]], out_dir: str | Path, title: str = "", k: int = 10,
                  per_query: list[dict[str, Any]] | None = None) -> list[Path]:
    """grid.csv, grid.md and grid.png (metric against relative cost, one line per ratio), and
    per_query.csv when `per_query` rows are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "grid.csv", rows)
    (out / "grid.md").write_text((f"{title}\n\n" if title else "") + markdown_table(rows))
    written = [out / "grid.csv", out / "grid.md", out / "grid.png"]
    if per_query:
        _write_csv(out / "per_query.csv", per_query)
        written.append(out / "per_query.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, (f"nDCG@{k}", f"MRR@{k}")):
        for ratio in sorted({r["ratio"] for r in rows}):
            pts = sorted((r["relative_cost"], r[metric], r["exit_layer"]) for r in rows if r["ratio"] == ratio)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"ratio {ratio}")
            for x, y, layer in pts:
                ax.annotate(str(layer), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("relative cost (token-layers; full model = 1)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Matryoshka re-ranker: quality against cost (labels: exit layer)")
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=120)
    plt.close(fig)
    return written


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the grid into {path.parent} first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare_grids(base_dir: str | Path, other_dir: str | Path, metric: str = "nDCG@10", samples: int = 2000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Per (exit, ratio) in both grids: `other` minus `base` on `metric`, paired query by query.

    Each row: the adapter `other` used, both means, the mean change with a paired bootstrap 95%
    interval (queries resampled with replacement, `samples` times) and the queries that got better,
    worse or stayed the same. Both grids must hold the same queries (their per_query.csv).
    """
    base_dir, other_dir = Path(base_dir), Path(other_dir)
    per = {}
    for name, folder in (("base", base_dir), ("other", other_dir)):
        table: dict[tuple[int, int], dict[str, float]] = {}
        for r in _read_csv(folder / "per_query.csv"):
            if metric not in r:
                raise DataFormatError(f"{folder / 'per_query.csv'} has no column {metric!r}")
            setting = table.setdefault((int(r["exit_layer"]), int(r["ratio"])), {})
            if r["qid"] in setting:
                raise DataFormatError(f"{folder / 'per_query.csv'}: qid {r['qid']!r} appears twice in one setting")
            setting[r["qid"]] = float(r[metric])
        per[name] = table
    adapters = {(int(r["exit_layer"]), int(r["ratio"])): r["adapter"] for r in _read_csv(other_dir / "grid.csv")}
    rows = []
    for key in sorted(set(per["base"]) & set(per["other"]), key=lambda kv: (kv[1], kv[0])):
        base, other = per["base"][key], per["other"][key]
        if set(base) != set(other):
            raise DataFormatError(f"exit {key[0]} ratio {key[1]}: the two grids scored different queries")
        change = paired_change(base, other, samples, seed)
        rows.append({"exit_layer": key[0], "ratio": key[1], "adapter": adapters.get(key, "?"),
                     f"{metric} base": change["base"], f"{metric} other": change["other"],
                     **{k: change[k] for k in ("change", "ci95_low", "ci95_high", "better", "worse", "same")}})
    if not rows:
        raise DataFormatError(f"{base_dir} and {other_dir} share no (exit, ratio) setting")
    return rows


def compare_main(argv: Sequence[str] | None = None) -> int:
    """`rerank-lightning matryoshka-compare BASE_DIR OTHER_DIR`."""
    parser = argparse.ArgumentParser(
        prog="rerank-lightning matryoshka-compare",
        description="Pair two grids written by `rerank-lightning matryoshka-grid` (each DIR holds grid.csv and "
                    "per_query.csv) query by query, other minus base: per (exit layer, ratio) the mean change "
                    "with a paired bootstrap 95% interval and how many queries got better or worse.")
    parser.add_argument("base_dir", help="the grid folder to compare against (e.g. without compensation)")
    parser.add_argument("other_dir", help="the grid folder compared with it (e.g. with compensation adapters)")
    add_bootstrap_options(parser)
    parser.add_argument("--out", help="folder for compare.csv and compare.md (default: print only)")
    args = parser.parse_args(argv)
    rows = compare_grids(args.base_dir, args.other_dir, args.metric, args.samples, args.seed)
    changed = [r for r in rows if r["adapter"] != "-"]
    summary = (f"{len(changed)} settings use an adapter; mean change {args.metric} "
               f"{sum(r['change'] for r in changed) / max(len(changed), 1):+.4f}; interval above 0 in "
               f"{sum(r['ci95_low'] > 0 for r in changed)}, below 0 in {sum(r['ci95_high'] < 0 for r in changed)}")
    text = markdown_table(rows) + "\n" + summary + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "compare.csv", rows)
        (out / "compare.md").write_text(text)
    print(text)
    return 0


def _ints(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",") if x.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    """`rerank-lightning matryoshka-grid EXPORT CANDIDATES --out DIR` (`compare ...` as the first argument:
    `compare_main`, kept for the older `python -m` form)."""
    from ..inference import Reranker

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="rerank-lightning matryoshka-grid",
        description="Score candidate lists with a Matryoshka export at every (exit layer, compression ratio) and "
                    "write DIR/grid.csv, grid.md, grid.png (nDCG@k and MRR@k against the cost) and per_query.csv. "
                    "Cost of a pair: the decoder layers it runs times the tokens each sees (token_layers), "
                    "its GFLOPs, and relative_cost against the full model.")
    parser.add_argument("model_dir", help="a Matryoshka export (stage 1, with compensation adapters if any)")
    parser.add_argument("candidates", help="candidate lists, one query per line: {qid, query, candidates: "
                        "[{docid, text, label}]}")
    parser.add_argument("--out", required=True, help="folder for grid.csv, grid.md, grid.png, per_query.csv")
    parser.add_argument("--exits", help="comma-separated exit layers (default: every head)")
    parser.add_argument("--ratios", default="1,2,4,8", help="comma-separated compression ratios, 1 = none "
                        "(default: 1,2,4,8)")
    parser.add_argument("--compress-layers", help="comma-separated layers that compress (default: the trained ones)")
    parser.add_argument("--max-queries", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--k", type=int, default=10, help="cut-off of nDCG and MRR (default: 10)")
    parser.add_argument("--relevance-threshold", type=float, default=1,
                        help="grade from which a passage counts as relevant for MRR and MAP (default: 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (default: 16)")
    parser.add_argument("--title", default="", help="title of the plot and table")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no-compensation", action="store_true",
                        help="ignore compensation adapters: the stage-1 model at every setting")
    args = parser.parse_args(argv)
    reranker = Reranker.from_pretrained(args.model_dir, device=args.device, batch_size=args.batch_size)
    if reranker.heads is None:
        parser.error(f"{args.model_dir} is not a Matryoshka export (no layer-wise heads)")
    if args.no_compensation:
        reranker.adapters = []
    lists = load_candidate_lists(args.candidates, args.max_queries)
    exits = _ints(args.exits) or reranker.heads.layers
    per_query: list[dict[str, Any]] = []
    rows = evaluate_grid(reranker, lists, exits, _ints(args.ratios), _ints(args.compress_layers), args.k,
                         args.relevance_threshold, per_query)
    paths = write_outputs(rows, args.out, args.title, args.k, per_query)
    print((Path(args.out) / "grid.md").read_text())
    print(json.dumps({"written": [str(p) for p in paths], "queries": len(lists)}))
    return 0


if __name__ == "__main__":
    from ..cli import main as cli_main

    sys.exit(cli_main(["matryoshka-grid", *sys.argv[1:]]))
