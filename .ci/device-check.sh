#!/usr/bin/env bash
# The one prepared run for a machine with a GPU (the device tool), most important first, inside a
# time budget (BUDGET seconds, default 480; a step that would not fit is cut to what is left):
#   1. the GPU tests: every fast path's values and gradients against the reference, on CUDA;
#   2. the GPU issue's targets with the code's defaults (10M x 128 rank 32, batch 65,536): the TT
#      table's lookups and the DLRM training step and inference, dense against TT (bench.json);
#   3. the compiled model beside eager (bench --serve on the GPU: serve.json).
# Everything a user might want to measure is an `fpd-convert bench` option; this script only runs them.
# The device image lacks tensorly: on a fresh checkout, first
#   pip download tensorly==0.10.0 --no-deps -d .whl
# and run with carry [".whl"].  Writes log.txt, pytest.log, bench.json and serve.json to $OUT.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-480}
LOG=$OUT/log.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
python3 -c "import torch, triton, sys; print(torch.__version__, torch.version.cuda, triton.__version__, sys.version)" | tee -a "$LOG"

# step NAME SECONDS 'COMMAND': runs COMMAND (stderr to the log) under the smaller of SECONDS and
# what is left of the budget; records its time and exit status; skips it under 20 s left
step() {
  local name=$1 cap=$2 cmd=$3 start left rc
  start=$(date +%s); left=$((BUDGET - (start - T0)))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped, ${left}s left of ${BUDGET}s" | tee -a "$LOG"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  timeout "$cap" bash -c "$cmd" 2>>"$LOG"; rc=$?
  echo "== $name: rc $rc in $(($(date +%s) - start))s (cap ${cap}s)" | tee -a "$LOG"
}

step pytest 200 'python3 -m pytest -q -p no:cacheprovider -m "cuda or not slow" tests/test_pooled.py tests/test_kernels.py \
  tests/test_tt_layers.py tests/test_row_index.py tests/test_training.py tests/test_traced.py 2>&1 | tee $OUT/pytest.log | tail -15'
step bench 150 'python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank 32 --batch 65536 --reps 10 --step \
  --json > $OUT/bench.json; grep -E "ratio|samples_s\"|lookups_s\"" $OUT/bench.json'
step serve 120 'python3 -m fpd_convert bench --serve --device cuda --json > $OUT/serve.json; grep -E "ratio" $OUT/serve.json'
echo "== total $(($(date +%s) - T0))s" | tee -a "$LOG"
