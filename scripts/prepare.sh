#!/usr/bin/env bash
# Download a Hugging Face model and convert it into a gpt-blitz checkpoint:
#   bash scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf   # -> checkpoints/meta-llama/Llama-2-7b-chat-hf
# Raw HF files land in checkpoints/REPO/hf; the converted checkpoint in checkpoints/REPO.
# Gated repos need HF_TOKEN. Set PYTHON to pick an interpreter other than `python`.
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: bash scripts/prepare.sh REPO_ID   (e.g. meta-llama/Llama-2-7b-chat-hf)" >&2
    exit 2
fi
REPO="$1"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."  # checkpoints/ lives in the repo root, wherever this is called from

"$PYTHON" scripts/download.py --repo_id "$REPO"
"$PYTHON" scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$REPO"

# quantize.py (a later step) plugs in here: int8 weights written from checkpoints/$REPO.
