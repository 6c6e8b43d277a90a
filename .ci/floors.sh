#!/usr/bin/env bash
# CI: the lowest supported releases (the ">=" floors of pyproject.toml's dependencies for FLOORED) installed
# exactly in a venv of their own, then a subset of the tests (a few minutes). The venv is kept and
# brought up to date when pyproject.toml changes. FLOORS_VENV=... picks its folder.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOORED="torch transformers lightning peft"
VENV=${FLOORS_VENV:-/tmp/rerank-lightning-floors}
pins=$(python3 - "$FLOORED" <<'PY'
import re, sys, tomllib
wanted = sys.argv[1].split()
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
floors = {m[1]: m[2] for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", d))}
missing = [w for w in wanted if w not in floors]
if missing:
    sys.exit(f"pyproject.toml: no '>=' floor for {missing}")
print(" ".join(f"{w}=={floors[w]}" for w in wanted))
PY
)
echo "dependency floors: $pins"
stamp="$VENV/.floors-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # pytest and mistral-common (the tiny test model's tokenizer) from the dev extra; the rest as declared
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet -e . pytest mistral-common $pins
    rm -f "$VENV"/.floors-*
    touch "$stamp"
fi
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|lightning|peft) "
# a cache of pre-tokenised records of its own, apart from the main suite's.
# PYTHONPATH: this checkout's code, whichever checkout the shared venv's editable install points to.
PYTHONPATH="$PWD/src" RERANK_LIGHTNING_CACHE="$VENV/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -m pytest -q -m "not slow" \
    tests/test_matryoshka_model.py tests/test_module.py tests/test_scoring.py tests/test_tokenized.py \
    tests/test_compat.py tests/test_distributed.py tests/test_packing.py tests/test_tiled_attention.py "$@"
