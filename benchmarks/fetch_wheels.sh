#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_proof.sh installs offline on a GPU machine.
#
#   bash benchmarks/fetch_wheels.sh OUT_DIR [DEVICE_FREEZE]
#
# Run where the package registries are reachable, with a Python that has torch (DeepSpeed's setup
# imports it). The GPU machine's Python (3.12, manylinux x86_64) is assumed to hold torch,
# torchvision, timm, tensorboard, pyyaml, safetensors and scikit-learn (BASE) but not the rest of the
# project's dependencies. OUT_DIR receives the wheels of exactly the packages the project needs beyond
# BASE and BASE's own dependencies (deepspeed, webdataset, braceexpand, hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, msgpack, ninja, psutil, py-cpuinfo, einops): pip resolves the
# whole set and the BASE set alone for the target platform (metadata only, nothing large is downloaded)
# and keeps the difference, plus any BASE dependency those packages need a minimum version of
# (pydantic: typing-extensions>=4.16), so an older copy on the machine can be upgraded offline.
# DeepSpeed is built here from its sdist into a pure-Python wheel with DS_BUILD_OPS=0 (its ops, if
# any run needs one, compile on first use on the GPU machine).
#
# DEVICE_FREEZE (optional): `python3 -m pip list --format=freeze` of the GPU machine's Python. Its
# versions constrain the resolution and the packages it already has are not downloaded.
#
# The wheels come to about 6 MB (printed at the end). To ship them with a checkout, put OUT_DIR inside it
# and keep it out of git (e.g. a line in .git/info/exclude).
set -euo pipefail

OUT=${1:?usage: bash benchmarks/fetch_wheels.sh OUT_DIR [DEVICE_FREEZE]}
FREEZE=${2:-}
PY=${PYTHON:-python3}
DS_VERSION=${DS_VERSION:-0.19.8}
NEEDED="deepspeed==$DS_VERSION webdataset>=0.2.100"
BASE="torch torchvision timm tensorboard pyyaml safetensors scikit-learn"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CONSTRAINTS=()
if [ -n "$FREEZE" ]; then
    [ -f "$FREEZE" ] || { echo "fetch_wheels: DEVICE_FREEZE $FREEZE not found" >&2; exit 2; }
    grep -E '^[A-Za-z0-9_.-]+==' "$FREEZE" > "$TMP/constraints.txt" || true
    CONSTRAINTS=(-c "$TMP/constraints.txt")
fi

echo "== DeepSpeed $DS_VERSION: sdist -> pure-Python wheel (DS_BUILD_OPS=0)"
"$PY" -m pip download -q --no-deps --no-binary :all: "deepspeed==$DS_VERSION" -d "$TMP/sdist"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$TMP"/sdist/deepspeed-*.tar.gz

echo "== resolving the dependency closure for Python 3.12 manylinux x86_64"
resolve() {  # report file, requirements...
    local report=$1; shift
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --dry-run --ignore-installed --target "$TMP/never" --report "$report" \
        "${TARGET[@]}" --find-links "$OUT" "${CONSTRAINTS[@]}" "$@"
}
# shellcheck disable=SC2086
resolve "$TMP/all.json" $NEEDED $BASE
# shellcheck disable=SC2086
resolve "$TMP/base.json" $BASE
"$PY" - "$TMP/all.json" "$TMP/base.json" "$FREEZE" > "$TMP/wanted.txt" <<'EOF'
import json, re, sys

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def items(path):
    return {norm(i["metadata"]["name"]): i["metadata"] for i in json.load(open(path))["install"]}


everything, base = items(sys.argv[1]), items(sys.argv[2])
have = set(base)
if sys.argv[3]:
    have |= {norm(line.split("==")[0]) for line in open(sys.argv[3]) if "==" in line}
wanted = {name for name in everything if name not in have}
# a version floor that a missing package puts on one the machine has (pydantic: typing-extensions>=4.16):
# ship that wheel too, so pip can upgrade an older copy offline (never torch: it must be the machine's own)
for name in list(wanted):
    for spec in everything[name].get("requires_dist") or []:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
            continue
        dep = norm(req.name)
        if dep in have and dep in everything and req.specifier and dep not in ("torch", "torchvision"):
            wanted.add(dep)
for name in sorted(wanted - {"deepspeed"}):
    print(f"{name}=={everything[name]['version']}")
EOF
echo "wheels for the GPU machine: deepspeed==$DS_VERSION $(tr '\n' ' ' < "$TMP/wanted.txt")"
if [ -s "$TMP/wanted.txt" ]; then
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT" -r "$TMP/wanted.txt"
fi
ls -l "$OUT"
du -sh "$OUT" | awk '{print "total " $1 " (a device call carries at most 64 MiB with the working tree)"}'
