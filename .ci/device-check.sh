#!/usr/bin/env bash
# One prepared run on the device machine (GPU), most important first, inside a time budget
# (BUDGET seconds, default 480: a step that would not fit is cut to what is left, or skipped):
#   1. the GPU tests (CUDA and Triton: values and gradients of every fast path against the reference);
#   2. the bench of issue 5's targets (10M x 128 rank 32, batch 65,536; lookups and the DLRM step),
#      with the code's defaults (no sweep in front of it: what a user gets);
#   3. the DLRM step's A/B (grouped, one by one, long first cores, dedup serving, sync-free training
#      with the TT tables stacked or one by one, or replayed from CUDA graphs; entries suffix-major
#      or by id);
#   4. where the step's time goes: wall time, the host's time to queue it, its host syncs (sync-probe);
#   5. the whole layer's A/B (one-pass vs dedup serving, sync-free chunks, relaxed vs acq_rel adds);
#   6. the bench with the balanced row factors (the default layout, a long first core, is step 2's);
#   6b. fwd+bwd with `.sum().backward()` against a dense upstream gradient (.ci/grad-ab.py, a line in log.txt);
#   6c. the bench with the dim factors ascending, [4, 4, 8] (a line in log.txt);
#   6d. the CPU lookups bench on the machine's 16 cores, fresh batches and one repeated (two lines in log.txt);
#   7. SWEEP=quick or full: the kernel sweep (launch settings; the eighth session's run kept the defaults).
# Needs the tensorly wheel in .whl/ (the device image lacks tensorly; .whl is gitignored, so on a fresh
# checkout first: pip download tensorly==0.10.0 --no-deps -d .whl; then run with carry [".whl"]). Writes at most 8 files to
# $OUT (the device tool brings back no more): log.txt (versions, each step's time and exit status,
# stderr), pytest.log, bench.json, step_ab.json, step_profile.txt (STEP_PROFILE=1), sync_probe.jsonl,
# layer_ab.jsonl, bench_balanced.json (and sweep.jsonl in place of step_profile.txt with SWEEP set).
# SKIP_TESTS=1 skips 1.
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

[ "${SKIP_TESTS:-0}" = 1 ] || step pytest 240 'python3 -m pytest -q -p no:cacheprovider tests/test_pooled.py \
  tests/test_entries.py tests/test_table_batched.py tests/test_graphed.py tests/test_kernels.py tests/test_tt_layers.py tests/test_row_index.py tests/test_training.py \
  tests/test_checkpoints.py 2>&1 | tee $OUT/pytest.log | tail -15'
# a path whose tests fail on this GPU is timed without (its figures would be of wrong values)
grep -qE "(FAILED|ERROR) tests/test_pooled" "$OUT/pytest.log" 2>/dev/null && export FPD_TT_POOLED=off \
  && echo "one-pass serving failed its tests: FPD_TT_POOLED=off for the timings" | tee -a "$LOG"
step bench 120 'python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank 32 --batch 65536 --reps 10 --step \
  --json > $OUT/bench.json; grep -E "ratio|samples_s\"|lookups_s\"" $OUT/bench.json'
step step-ab 150 'python3 .ci/step-ab.py | tee $OUT/step_ab.json'
step sync-probe 100 'python3 .ci/sync-probe.py | tee $OUT/sync_probe.jsonl'
step layer-ab 90 'python3 .ci/layer-ab.py | tee $OUT/layer_ab.jsonl'
# the backward kernels atomic adds as they were before (acq_rel: a MEMBAR around each) against relaxed
step layer-ab-acq-rel 45 'FPD_TT_ATOMIC_SEM=acq_rel LAYER_AB_QUICK=1 python3 .ci/layer-ab.py | tee -a $OUT/layer_ab.jsonl'
step bench-balanced 80 'python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank 32 --batch 65536 --reps 10 \
  --suffix-rows balanced --json > $OUT/bench_balanced.json; grep -E "ratio|row_factors" -A3 $OUT/bench_balanced.json | head -12'
# how the bench's new upstream gradient moves the GPU fwd+bwd ratio against the eighth session's way
step grad-ab 45 'python3 .ci/grad-ab.py | tee -a $OUT/log.txt'
# the ascending dim factors [4, 4, 8] against the default [8, 4, 4] on the GPU: 1.35x on the CPU's
# forward at 1M x 64 ([2, 4, 8]), but the Triton tiles pad a small first factor (a line in log.txt)
step bench-dims 60 'python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank 32 --batch 65536 --reps 10 \
  --dim-factors 4,4,8 --json | python3 -c "import json, sys; r = json.load(sys.stdin)[\"lookups\"]; print(\"bench-dims\", \
  json.dumps({k: v for k, v in r.items() if \"ratio\" in k or \"lookups_s\" in k or k == \"dim_factors\"}))" | tee -a $OUT/log.txt'
# the CPU target's bench on this machine's 16 cores (issue 5 asks for 2-16; ours has 2), into the log
# (both readings: 32 fresh batches, and the bench's default of one batch repeated)
step bench-cpu16 60 'for b in 32 1; do python3 -m fpd_convert bench --device cpu --reps 20 --batches $b --json \
  | python3 -c "import json, sys; print(\"bench-cpu16\", json.dumps(json.load(sys.stdin)))" | tee -a $OUT/log.txt; done'
SWEEP=${SWEEP:-skip}
[ "$SWEEP" = quick ] && step sweep 80 'SWEEP_QUICK=1 python3 .ci/kernel-sweep.py | tee $OUT/sweep.jsonl'
[ "$SWEEP" = full ] && step sweep 150 'python3 .ci/kernel-sweep.py | tee $OUT/sweep.jsonl'
echo "== total $(($(date +%s) - T0))s" | tee -a "$LOG"
