#!/usr/bin/env bash
# Tensor-parallel decode speed: random weights, batch 1, 5-token prompt, 200 new tokens, --compile (one
# CUDA graph per decode step), one untimed compiling run then 3 timed samples, on 1, 2, 4 or 8 GPUs of one host.
#
#   bash scripts/bench_tp.sh 2                          # the default cells for 2 GPUs (below)
#   bash scripts/bench_tp.sh 4 Llama-2-70B bf16 int8    # chosen cells: one model, its precisions
#
# Each cell prints a markdown row: decode tok/s, GB/s per GPU (bytes each rank reads per step x steps/s), GB read
# per GPU per step, compile time; the table of every row measured so far comes last. The JSON of every sample
# is kept in $OUT (default bench_tp/).
# TP_OUTPUT=replicated rows keep a whole output layer on every GPU instead of splitting it by vocabulary (tp.py):
# the measurement behind the default.
# First, on 2 GPUs, the correctness check (NCCL, eager and compiled with CUDA graphs, against one GPU):
#   python -m pytest tests/test_tp.py -q -k cuda
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast (NVLS) stays off in NCCL, PyTorch and NVSHMEM: on a shared host a program that uses it can
# put the GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=1
PYTHON=${PYTHON:-python}
usage="usage: bash scripts/bench_tp.sh GPUS [MODEL PRECISION...]"
if [ $# -eq 0 ] || [ $# -eq 2 ]; then echo "error: $usage" >&2; exit 1; fi
GPUS=$1
case $GPUS in 1|2|4|8) ;; *) echo "error: GPUS must be 1, 2, 4 or 8 ($usage)" >&2; exit 1 ;; esac
if ! "$PYTHON" -c "import sys, torch; sys.exit(torch.cuda.device_count() < $GPUS)"; then
    echo "error: the tensor-parallel benchmark needs $GPUS CUDA GPUs on this machine" >&2; exit 1
fi
OUT=${OUT:-bench_tp}
mkdir -p "$OUT"

cell() {  # MODEL PRECISION: one run under torchrun, then its row
    local model=$1 precision=$2 tag="$1.$2.gpus$GPUS${TP_OUTPUT:+.output-$TP_OUTPUT}"
    local quantization=()
    [ "$precision" != bf16 ] && quantization=(--random_quantization "$precision")
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" generate.py --compile --device cuda \
        --random_weights "$model" "${quantization[@]}" \
        --prompt_tokens 5 --max_new_tokens 200 --num_samples 3 --json "$OUT/$tag.json" >/dev/null
    "$PYTHON" - "$OUT/$tag.json" "$model" "$precision" "$GPUS" "${TP_OUTPUT:-sharded}" <<'EOF'
import json, sys
path, model, precision, gpus, output = sys.argv[1:]
m = json.load(open(path))
row = (f"| {model} | {precision} | {gpus} | {output} | {m['average']['decode_tok_s']:.1f} | {m['average']['bandwidth_gb_s']:.0f} "
      f"| {m['model_bytes'] / 1e9:.2f} | {m['compile_s']:.0f} s | {m['device']}, torch {m['torch']} |")
print(row, flush=True)
open(path.rsplit("/", 1)[0] + "/table.md", "a").write(row + "\n")
EOF
}

# The chosen cells, or the default cells for the GPU count (on 8: Llama-2-70B in three precisions, and
# Llama-3.1-405B in int8 only, its bf16 weights being 810 GB).
if [ $# -gt 1 ]; then
    for precision in "${@:3}"; do cell "$2" "$precision"; done
else case $GPUS in
    1) cell Llama-2-7B bf16; cell Llama-2-7B int8 ;;
    2) cell Llama-2-7B bf16; cell Llama-2-7B int8; cell Llama-2-70B int8
       TP_OUTPUT=replicated cell Llama-2-7B bf16 ;;
    4) cell Llama-2-7B bf16; cell Llama-2-7B int8; cell Llama-2-70B bf16; cell Llama-2-70B int8
       TP_OUTPUT=replicated cell Llama-2-7B bf16; TP_OUTPUT=replicated cell Llama-2-70B bf16 ;;
    8) cell Llama-2-70B bf16; cell Llama-2-70B int8; cell Llama-2-70B int4.g32; cell Llama-3.1-405B int8 ;;
esac
fi
echo "| model | precision | GPUs | output layer | decode tok/s | GB/s per GPU | GB per GPU per step | compile | card |"
echo "|---|---|---|---|---|---|---|---|---|"
cat "$OUT/table.md"  # every row measured into this folder so far
