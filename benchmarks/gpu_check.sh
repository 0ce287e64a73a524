#!/usr/bin/env bash
# One short GPU run that measures everything issue 7 asks for (H100/H200, ~8 minutes of device time):
#   bench_train mae-base (plain / recipe / recipe+torch_compile / recipe+device augmentation when wired),
#   vit-base is not in bench_train yet (see benchmarks/RESULTS.md), mae-large at batch 128 (ZeRO-2 when deepspeed
#   imports, else plain), and bench_data when node + Azurite are present. Everything lands in one folder:
#   $OUT (device tool) or benchmarks/results/<date>/.
#
# The device image has torch, transformers, accelerate, pyarrow, fsspec, pandas, pillow, pyyaml, scikit-learn,
# matplotlib (KINDS.md); it lacks datasets (and its dill / multiprocess), pydicom and evaluate. Fetch their wheels
# here, once, into the git-ignored .whl/ (never commit them):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydicom==3.0.2 evaluate==0.4.6
#
# (the versions of this repo's venv, 2026-11-27). datasets 5.2.0 also needs pyarrow>=24, fsspec<=2026.9.0 and
# huggingface-hub>=1.31 from the image (hub 1.33 there); the script prints their versions first -- if pyarrow or fsspec
# is out of range, add pyarrow==26.0.1 / fsspec==2026.9.0 to the download.
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
#   --dry-run   CPU check of this script's logic: tiny models, --quick, no wheels needed (uses the current python).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results/$(date +%Y-%m-%d)}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

if [[ $DRY -eq 0 && -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install failed"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, accelerate, pyarrow, fsspec; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| pyarrow', pyarrow.__version__, '| fsspec', fsspec.__version__)"
  $PY -c "import datasets; print('datasets', datasets.__version__)"
} 2>&1 | tee -a "$LOG"

# One shard set for every model: phantoms -> prepared 256² uint8 shards (bench_train repeats them to fill an epoch).
DATA=/tmp/gpu_check_data
QUICK=()
[[ $DRY -eq 1 ]] && QUICK=(--quick)
bench() {  # name, timeout seconds, bench_train arguments... (in --dry-run, sizes are --quick's: size flags dropped)
  local name=$1 limit=$2; shift 2
  if [[ $DRY -eq 1 ]]; then
    local kept=() skip=0
    for a in "$@"; do
      if [[ $skip -eq 1 ]]; then skip=0; continue; fi
      case $a in --batch-size|--steps|--patients) skip=1 ;; *) kept+=("$a") ;; esac
    done
    set -- "${kept[@]}"
  fi
  say "bench_train $name: $*"
  timeout "$limit" $PY benchmarks/bench_train.py "${QUICK[@]}" --out "$DATA/$name" "$@" \
    > "$RESULTS/bench_train-$name.txt" 2> "$RESULTS/bench_train-$name.err"
  local rc=$?
  tail -n 12 "$RESULTS/bench_train-$name.txt" | tee -a "$LOG"
  [[ $rc -ne 0 ]] && { say "$name exited $rc (stderr tail below)"; tail -n 5 "$RESULTS/bench_train-$name.err" | tee -a "$LOG"; }
  cp "$DATA/$name"/results-*.json "$RESULTS/" 2>/dev/null
  return 0
}

# MAE-B/16, batch 256: the issue's headline (>= 5,200 img/s, >= 1.9x the plain Trainer). ~3 min with compile.
bench mae-base 270 --model mae-base --batch-size 256 --steps 40 --patients 400
# MAE-L/16, batch 128; ZeRO-2 only where deepspeed imports (it ships no wheel, so usually plain bf16 + fused AdamW).
DS=()
if [[ $DRY -eq 0 ]] && $PY -c "import deepspeed" >/dev/null 2>&1; then DS=(--deepspeed ds_configs/zero2.json); fi
bench mae-large 150 --model mae-large --batch-size 128 --steps 24 --patients 400 --variants plain,recipe "${DS[@]}"

# Data plane, when the Azure Blob emulator can run here (needs node + .azurite, usually absent on the device image).
if command -v node >/dev/null 2>&1 && [[ -f .azurite/node_modules/azurite/dist/src/blob/main.js ]]; then
  say "bench_data"
  timeout 90 $PY benchmarks/bench_data.py --quick --workers 8 > "$RESULTS/bench_data.txt" 2>&1; tail -n 5 "$RESULTS/bench_data.txt" | tee -a "$LOG"
else
  say "bench_data skipped: no node/Azurite on this host"
fi
say "done; results in $RESULTS"
grep -h "speedup_vs_plain_trainer\|^plain \|^recipe \|^compile \|^devaug \|^device:" "$RESULTS"/bench_train-*.txt | tee -a "$LOG"
