#!/usr/bin/env bash
# Download a Hugging Face model, convert it into a gpt-blitz checkpoint and write an int8 copy:
#   bash scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf
#     -> checkpoints/meta-llama/Llama-2-7b-chat-hf
# Raw HF files land in checkpoints/REPO/hf; the converted checkpoint in checkpoints/REPO.
# Gated repos need HF_TOKEN. Set PYTHON to pick an interpreter other than `python`.
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "error: give one Hugging Face repo id: bash scripts/prepare.sh REPO_ID (e.g." \
        "meta-llama/Llama-2-7b-chat-hf)" >&2
    exit 1
fi
REPO="$1"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."  # checkpoints/ lives in the repo root, wherever this is called from

"$PYTHON" scripts/download.py --repo_id "$REPO"
# --force: running this again redoes the conversion (the hf/ download is kept).
"$PYTHON" scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$REPO" --force

# An int8 copy beside it (checkpoints/$REPO/model_int8.pth): half the bytes per token.
"$PYTHON" quantize.py --checkpoint_path "checkpoints/$REPO" --mode int8
