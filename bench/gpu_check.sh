#!/usr/bin/env bash
# The GPU check, in one go, on a machine with an NVIDIA GPU and no network:
#   bench/gpu_check.sh OUTDIR [gpu0]
# Installs the project from bench/wheels/ (made by bench/gpu_wheels.sh) if it is missing,
# runs the GPU tests, the data-path and the fairness benchmarks on one device, writes the
# full logs to OUTDIR and prints a short table last. Budget: 8 minutes. With the device
# tool: run bench/gpu_wheels.sh here first and name bench/wheels in `carry`.
set -u
out=${1:?usage: bench/gpu_check.sh OUTDIR [DEVICE]}
dev=${2:-gpu0}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)

if ! $py -c "import zmq, msgpack, kubecash.broker.server, prometheus_client" 2>/dev/null; then
    site=/tmp/kubecash-site
    $py -m pip install -q --no-index --no-deps --no-compile --target "$site" --upgrade bench/wheels/*.whl \
        >"$out/install.log" 2>&1 || { echo "install from bench/wheels failed: see $out/install.log"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"
fi
$py -c "import kubecash.broker.server" || exit 1
nvidia-smi >"$out/nvidia-smi.log" 2>&1

run() {   # name, seconds, command...
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local last
    last=$(grep -E 'passed|failed|skipped|no tests ran' "$out/$name.log" | tail -1)
    printf '%-10s rc=%-3s %s\n' "$name" "$rc" "${last:-(no summary; see $name.log)}" >>"$out/summary.txt"
}
: >"$out/summary.txt"
run tests     120 $py -m pytest -q -m gpu -p no:cacheprovider tests
run datapath   90 $py bench/datapath.py --device "$dev" --mib 512
run fairness  250 $py bench/fairness.py --device "$dev" --quick --threads 1

echo
echo "== gpu_check on $dev: $(( $(date +%s) - start )) s; logs in $out =="
grep -E 'GB/s|per-launch' "$out/datapath.log" || true
grep -E 'PASS|FAIL' "$out/fairness.log" || true
cat "$out/summary.txt"
