#!/usr/bin/env bash
# tools/nvcc-from-wheels.sh DIR: nvcc for a machine without the CUDA toolkit, from NVIDIA's PyPI
# wheels (x86_64 and aarch64). Installs cuda-toolkit[nvcc,crt,nvvm,cudart,cccl] into DIR/wheels
# (nvcc, ptxas, fatbinary, nvlink, cudafe++; the CRT, cudart and CCCL headers; cicc and
# libdevice; libcudart_static.a and libcudart.so.13: all under nvidia/cu13) and completes the
# layout nvcc.profile expects of a toolkit ($TOP = bin/..: $TOP/nvvm/bin, $TOP/nvvm/libdevice,
# $TOP/targets/<arch>-linux/include and lib) with symlinks, plus lib64 and the libcudart.so
# that `-cudart shared` links. Prints the nvcc path (DIR/cuda/bin/nvcc) and nothing else.
# Idempotent: a finished DIR for the same version is reused without touching the network.
#   PYTHON                a python with pip (default: python3)
#   CUDA_TOOLKIT_VERSION  the cuda-toolkit metapackage's version (default below; it pins the
#                         version of each wheel: 13.0.2 is nvcc 13.0.88, cudart 13.0.96)
set -euo pipefail
dir=${1:?usage: tools/nvcc-from-wheels.sh DIR}
version=${CUDA_TOOLKIT_VERSION:-13.0.2}
py=${PYTHON:-python3}
case "$(uname -m)" in
    x86_64) target=x86_64-linux ;;
    aarch64) target=sbsa-linux ;;
    *) echo "nvcc-from-wheels: NVIDIA publishes no nvcc wheels for $(uname -m)" >&2; exit 1 ;;
esac
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stamp=$dir/.done-$version
if [ ! -e "$stamp" ]; then
    rm -rf "$dir/wheels" "$dir/cuda" "$dir"/.done-*
    "$py" -m pip install -qq --disable-pip-version-check --no-warn-script-location --no-compile \
        --target "$dir/wheels" "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl]==$version"
    top=$dir/wheels/nvidia/cu13
    for f in bin/nvcc bin/nvcc.profile nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc include/cuda_runtime.h \
             include/crt/host_config.h include/cccl lib/libcudart_static.a lib/libcudart.so.13; do
        [ -e "$top/$f" ] || { echo "nvcc-from-wheels: $top/$f missing after install" >&2; exit 1; }
    done
    mkdir -p "$top/targets/$target"
    ln -sfn ../../include "$top/targets/$target/include"
    ln -sfn ../../lib "$top/targets/$target/lib"
    ln -sfn lib "$top/lib64"
    ln -sfn libcudart.so.13 "$top/lib/libcudart.so"
    ln -sfn wheels/nvidia/cu13 "$dir/cuda"
    "$dir/cuda/bin/nvcc" --version >/dev/null
    touch "$stamp"
fi
echo "$dir/cuda/bin/nvcc"
