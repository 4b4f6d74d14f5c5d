#!/usr/bin/env bash
# One prepared run on the device machine (GPU): tests (CUDA ones included), lookup bench, demo.
# Needs the tensorly wheel in .whl/ (the device image lacks tensorly); writes results to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, sys; print(torch.__version__, torch.version.cuda, sys.version)" | tee -a $OUT/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tee $OUT/pytest.log | tail -4
for r in 16 32; do
  timeout 90 python3 -m fpd_convert bench --rows 10000000 --dim 128 --rank $r --batch 65536 --reps 10 --json > $OUT/bench_10m_r$r.json 2>$OUT/bench_r$r.err
  python3 -m json.tool $OUT/bench_10m_r$r.json | grep -E "ratio|lookups_s|unique" 
done
timeout 120 python3 -m fpd_convert demo --dir /tmp/demo > $OUT/demo.log 2>&1; tail -22 $OUT/demo.log
