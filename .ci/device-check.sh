#!/usr/bin/env bash
# One prepared run on the device machine (GPU): tests (CUDA and Triton ones included),
# lookup bench with the kernels beside the reference, DLRM step bench, demo + bench --model.
# Needs the tensorly wheel in .whl/ (the device image lacks tensorly); writes results to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton, sys; print(torch.__version__, torch.version.cuda, triton.__version__, sys.version)" | tee -a $OUT/gpu.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tee $OUT/pytest.log | tail -4
timeout 120 python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank 32 --batch 65536 --reps 10 --step --json \
  > $OUT/bench_10m_r32.json 2>$OUT/bench_r32.err; tail -3 $OUT/bench_r32.err
grep -E "ratio|lookups_s|samples_s|unique|speedup" $OUT/bench_10m_r32.json
timeout 50 python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank 16 --batch 65536 --reps 10 --json \
  > $OUT/bench_10m_r16.json 2>$OUT/bench_r16.err
grep -E "ratio|speedup" $OUT/bench_10m_r16.json
timeout 80 python3 -m fpd_convert demo --dir /tmp/demo > $OUT/demo.log 2>&1; tail -12 $OUT/demo.log
C=$(ls /tmp/demo/*.safetensors 2>/dev/null | head -1)
[ -n "$C" ] && timeout 60 python3 -m fpd_convert bench --model "$C" --rows 1000000 --dim 64 --rank 16 --batch 65536 --json \
  > $OUT/bench_model.json 2>$OUT/bench_model.err; grep -E "ratio|samples_s" $OUT/bench_model.json
