#!/usr/bin/env bash
# The GPU proof on a fresh machine with one GPU and no network (benchmarks/gpu_proof.py says what it runs).
#
#   bash benchmarks/gpu_proof.sh WHEEL_DIR OUT_DIR [--cpu] [gpu_proof.py options, e.g. --budget 450]
#
# Installs what the machine's Python lacks (deepspeed, webdataset and their dependencies) from
# WHEEL_DIR, offline (fill it with `bash benchmarks/fetch_wheels.sh WHEEL_DIR` where the registries
# are reachable), then runs `python -m benchmarks.gpu_proof --out OUT_DIR`, which writes
# OUT_DIR/gpu_proof.json, gpu_proof.md and gpu_proof.log. When everything already imports (a dev
# venv, CI), nothing is installed and WHEEL_DIR may be "-". PYTHON chooses the interpreter (python3).
# Takes about 8 minutes on one H100/H200; `--cpu` runs the same parts at tiny sizes on the CPU.
set -euo pipefail

WHEELS=${1:?usage: bash benchmarks/gpu_proof.sh WHEEL_DIR OUT_DIR [--cpu] [options]}
OUT=${2:?usage: bash benchmarks/gpu_proof.sh WHEEL_DIR OUT_DIR [--cpu] [options]}
shift 2
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ "$WHEELS" = - ] || [ ! -d "$WHEELS" ] || WHEELS=$(cd "$WHEELS" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

MODULES="deepspeed webdataset braceexpand hjson pydantic"
missing() {
    "$PY" - $MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
start=$(date +%s)
absent=$(missing)
if [ -n "$absent" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_proof: $absent not importable and WHEEL_DIR $WHEELS is not a folder (fill it with" \
             "bash benchmarks/fetch_wheels.sh WHEEL_DIR)" >&2
        exit 2
    fi
    echo "== installing $absent from $WHEELS (offline)"
    # the machine's own packages satisfy the rest; the wheel folder holds exactly what they lack
    "$PY" -m pip install -q --no-index --no-cache-dir --find-links "$WHEELS" deepspeed webdataset
    absent=$(missing)
    if [ -n "$absent" ]; then
        echo "gpu_proof: still not importable after the install: $absent" >&2
        exit 2
    fi
    echo "== installed in $(( $(date +%s) - start )) s"
fi
exec "$PY" -m benchmarks.gpu_proof --out "$OUT" "$@"
