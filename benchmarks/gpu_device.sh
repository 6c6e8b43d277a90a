#!/usr/bin/env bash
# benchmarks/gpu_throughput.py on the lent GPU machine (an H200 image with torch, transformers, lightning,
# peft and pytest, without this project's other dependencies), all cases in one call.
#   here:        bash benchmarks/gpu_device.sh prepare   # the missing wheels into .whl/ (git-ignored locally)
#   the device:  run(command="bash benchmarks/gpu_device.sh run", carry=[".whl"], timeout_s=560)
# `run` installs .whl/ into /tmp/site, runs every case (padded, and packed where data.packing exists) and
# writes $OUT/gpu_throughput.json and $OUT/gpu_throughput.log. Budget: the cases take about 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
# imported by the project, absent from the device image (mistral-common only ships the tokenizer file)
WHEELS="hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 mistral-common==1.8.5"
case ${1:-} in
prepare)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
  mkdir -p .whl
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$w"
  done
  # antlr4 4.9.3 (hydra's pin) is an sdist only: build its pure-Python wheel here
  for sdist in .whl/*.tar.gz; do [ -e "$sdist" ] && python3 -m pip wheel -q --no-deps -w .whl "$sdist" && rm "$sdist"; done
  du -sh .whl ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  set -o pipefail
  python3 benchmarks/gpu_throughput.py --timeout 300 --out "${OUT:-/tmp}/gpu_throughput.json" 2>&1 \
    | tee "${OUT:-/tmp}/gpu_throughput.log" ;;
*)
  echo "usage: bash benchmarks/gpu_device.sh prepare|run" >&2; exit 2 ;;
esac
