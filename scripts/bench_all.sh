#!/usr/bin/env bash
# The whole speed matrix on a 4-GPU machine in about 8 minutes: scripts/bench.py's SUITES["all"] as four
# processes in parallel, one per GPU (part i on GPU i; part 0 also times a second, warm-cache compile of its
# first cell), then one merged JSON and markdown table, and the PNG plot where matplotlib is installed.
#
#   bash scripts/bench_all.sh [OUT_DIR]          # default bench_out: gpuI.json, gpuI.log, all.json, all.md (all.png)
#   bash scripts/bench_all.sh --quick [OUT_DIR]  # smoke test: SUITES["quick"] (2 TinyLlama cells) on GPU 0
#
# Each process rewrites its JSON after every cell and is stopped after BENCH_TIMEOUT seconds (default 550),
# so a slow part still gives its finished cells to the merge. Anywhere, later:
#   python scripts/bench.py --merge OUT_DIR/all.json --plot OUT_DIR/all.png
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
SUITE=all PARTS=4
if [[ "${1:-}" == "--quick" ]]; then
  SUITE=quick PARTS=1
  shift
fi
# inductor starts up to 32 compile workers per process; four processes compiling at once oversubscribe the host
# while the others time their decode loops (in one such run an int8 cell measured 12 % below its reruns).
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / PARTS ))}
OUT=${1:-bench_out}
if [[ "$OUT" == -* || $# -gt 1 ]]; then  # a flag where the output folder goes: not a folder to make
  echo "error: usage: bash scripts/bench_all.sh [--quick] [OUT_DIR]" >&2
  exit 1
fi

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())') || exit 1
if (( gpus < PARTS )); then
  echo "error: suite '$SUITE' runs one process per GPU and needs $PARTS GPUs, this machine shows $gpus (bash scripts/bench_all.sh --quick needs 1)" >&2
  exit 1
fi
mkdir -p "$OUT" || exit 1
rm -f "$OUT"/gpu*.json  # an earlier run's parts must not join this run's merge

pids=()
for (( i = 0; i < PARTS; i++ )); do
  extra=()
  (( i == 0 )) && extra=(--second_compile)
  CUDA_VISIBLE_DEVICES=$i timeout "${BENCH_TIMEOUT:-550}" "$PYTHON" scripts/bench.py --suite "$SUITE" --part "$i" "${extra[@]}" \
    --out "$OUT/gpu$i.json" >"$OUT/gpu$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "GPU $i's process failed or ran out of time (its finished cells are kept): see $OUT/gpu$i.log" >&2
    tail -n 3 "$OUT/gpu$i.log" >&2
    failed=1
  fi
done

results=()
for (( i = 0; i < PARTS; i++ )); do
  [[ -f "$OUT/gpu$i.json" ]] && results+=("$OUT/gpu$i.json")
done
if (( ${#results[@]} == 0 )); then
  echo "error: no process wrote a result: see $OUT/gpu*.log" >&2
  exit 1
fi
plot=()
if "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
  plot=(--plot "$OUT/all.png")
else
  echo "note: no matplotlib here; plot elsewhere: python scripts/bench.py --merge $OUT/all.json --plot $OUT/all.png" >&2
fi
"$PYTHON" scripts/bench.py --merge "${results[@]}" --out "$OUT/all.json" --markdown "$OUT/all.md" "${plot[@]}" || exit 1
exit $failed
