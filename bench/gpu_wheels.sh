#!/usr/bin/env bash
# Run here (with network): fill bench/wheels/ with what bench/gpu_check.sh installs on a GPU
# machine that has no network: this project as a wheel and the dependencies such machines
# may lack (CPython 3.12, x86-64). bench/wheels/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
rm -rf bench/wheels && mkdir -p bench/wheels
$py -m pip wheel -q --no-deps -w bench/wheels .
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d bench/wheels pyzmq msgpack psutil nvidia-ml-py prometheus-client jsonschema \
    jsonschema-specifications referencing rpds-py attrs
ls bench/wheels
