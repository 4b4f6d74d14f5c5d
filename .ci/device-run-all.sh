set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 .ci/kernel-sweep.py 2>&1 | grep -v Warn | head -24
bash .ci/device-check.sh
