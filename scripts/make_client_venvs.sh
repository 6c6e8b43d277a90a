#!/usr/bin/env bash
# Builds the virtual environments of the clients the export must load in (tests/test_interop.py):
#   .venv-flag  FlagEmbedding 1.4.2 on transformers 4.x (FlagEmbedding imports only under transformers<5)
#   .venv-st    sentence-transformers >= 5.4 on transformers 5
# Idempotent: a venv whose recorded requirements match is left as it is. Needs the package index once;
# the tests that use the venvs run offline.
# torch is pinned: an open bound pulls a multi-GB CUDA build, 2.13.0 resolves to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

make_venv() {
    local dir=$1; shift
    local wanted="$*"
    if [[ -f $dir/.installed && "$(cat "$dir/.installed")" == "$wanted" ]]; then
        echo "$dir: up to date"
        return
    fi
    echo "$dir: installing $wanted"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet "$@"
    echo "$wanted" > "$dir/.installed"
}

make_venv .venv-flag "torch==2.13.0" "transformers>=4.44,<5" "FlagEmbedding==1.4.2" sentencepiece protobuf
make_venv .venv-st "torch==2.13.0" "transformers>=5,<6" "sentence-transformers>=5.4" sentencepiece protobuf
