#!/usr/bin/env bash
# The GPU pass (issue 8) in one script: build, GPU test suite, every benchmark.
#   bash benchmarks/gpu_pass.sh [build|first|tests|bench|sweep|peers|all] [pytest args | benchmark names]
#   first: vit.py --quick, the op benchmarks --quick and the GPU-only tests within FIRST_BUDGET s;
#   tests: the whole suite (extra args go to pytest); bench: host overhead, then the named
#   benchmarks --quick (default: attention layer_norm mlp patch_embed vit; with the CUDA-graph
#   columns all five take more than one 10-minute device call: run `bench attention layer_norm`,
#   then `bench mlp patch_embed vit`); sweep: the tile sweeps, by name (default all four, more than
#   one 10-minute device call: run `sweep attention layer_norm`, then `sweep layer_norm_residual mlp`):
#   attention, layer_norm (forward and backward configs at 4 widths), layer_norm_residual (add + LN
#   forward configs and its unfused peers at [50432, C], 4 widths), mlp; peers: the MLP's
#   torch.compile max-autotune peer and the training workflow's loader.
# Logs and results go to $OUT (default ./gpu_out): build.log, tests.log, bench_<op>.log,
# results.tar.gz (benchmarks/results/<device>/). The device tool brings back at most 8 files:
# keep the logs few, or tar them.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}; shift || true
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton, setuptools; print('torch', torch.__version__, 'triton', triton.__version__, 'setuptools', setuptools.__version__, torch.cuda.get_device_name())"

t0=$SECONDS
timeout 400 $PY setup.py develop --no-deps > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
$PY -c "import vit_fast, vit_fast._C, torch; print('built in', $SECONDS - $t0, 's; ops:', torch.ops.vit_fast.patch_embed_fwd)" || exit 1
[ "$MODE" = build ] && exit 0

# first: the one command a short lease runs first (the whole model, then the op rows, then the
# GPU-only tests), each step cut to what is left of FIRST_BUDGET seconds (default 480, counted
# from the start of the script, build included), every log written as it goes.
left() { echo $(( FIRST_BUDGET - SECONDS > 0 ? FIRST_BUDGET - SECONDS : 1 )); }
if [ "$MODE" = first ]; then
  FIRST_BUDGET=${FIRST_BUDGET:-480}
  timeout "$(left)" $PY benchmarks/vit.py --quick 2>&1 | tee "$OUT/bench_vit.log" | tail -40
  for op in attention layer_norm mlp patch_embed; do
    step=$(( $(left) < 75 ? $(left) : 75 ))
    timeout "$step" $PY benchmarks/$op.py --quick 2>&1 | tee "$OUT/bench_$op.log" | tail -25
  done
  timeout "$(left)" $PY -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests 2>&1 | tee "$OUT/tests.log" | tail -40
fi

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  $PY -m pytest -q -n 8 -p no:cacheprovider --durations=15 tests "$@" 2>&1 | tee "$OUT/tests.log" | tail -80
fi

if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  OPS=("$@"); [ "$MODE" = all ] || [ ${#OPS[@]} -eq 0 ] && OPS=(attention layer_norm mlp patch_embed vit)
  $PY benchmarks/host_overhead.py 2>&1 | tee "$OUT/bench_host_overhead.log"
  for op in "${OPS[@]}"; do
    echo "== benchmarks/$op.py --quick =="
    timeout 300 $PY benchmarks/$op.py --quick 2>&1 | tee "$OUT/bench_$op.log" | tail -40
  done
fi

if [ "$MODE" = sweep ]; then
  SWEEPS=("$@"); [ ${#SWEEPS[@]} -eq 0 ] && SWEEPS=(attention layer_norm layer_norm_residual mlp)
  WIDTHS=384,768,1024,1280
  for s in "${SWEEPS[@]}"; do
    echo "== sweep $s =="
    case $s in
      attention) timeout 150 $PY benchmarks/attention.py --sweep ;;
      layer_norm) timeout 270 $PY benchmarks/layer_norm.py --sweep --widths $WIDTHS --sweep-kinds fwd,bwd ;;
      layer_norm_residual) timeout 240 $PY benchmarks/layer_norm.py --sweep --widths $WIDTHS --sweep-kinds residual ;;
      mlp) timeout 90 $PY benchmarks/mlp.py --sweep ;;
      *) echo "unknown sweep $s (attention layer_norm layer_norm_residual mlp)" ;;
    esac
  done 2>&1 | tee "$OUT/sweep.log" | grep -E "best|table rows|met|MISSED|failed|Error|==" | tail -80
fi

if [ "$MODE" = peers ]; then
  {
    timeout 360 $PY benchmarks/mlp.py --quick --max-autotune
    timeout 150 $PY benchmarks/workflow.py --quick --workers 16
  } 2>&1 | tee "$OUT/peers.log" | tail -60
fi

if [ "$MODE" != build ] && [ "$MODE" != tests ]; then
  tar czf "$OUT/results.tar.gz" benchmarks/results
fi
