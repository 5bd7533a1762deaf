"""nvcc, looked up one way for every test that builds CUDA programs with it: $KUBECASH_NVCC
where set (it must then be an executable: a wrong one fails the run instead of skipping), else
nvcc on PATH, else the toolkit's /usr/local/cuda/bin/nvcc, else the one tools/nvcc-from-wheels.sh
makes from PyPI wheels in .venv/cuda-toolkit (as .ci/run does where there is no toolkit).
Tests never download it themselves."""
from __future__ import annotations

import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS_NVCC = os.path.join(ROOT, ".venv", "cuda-toolkit", "cuda", "bin", "nvcc")


def find_nvcc() -> str | None:
    explicit = os.environ.get("KUBECASH_NVCC")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise RuntimeError(f"KUBECASH_NVCC={explicit} is not an executable nvcc")
        return explicit
    for path in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", WHEELS_NVCC):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


NVCC = find_nvcc()
NO_NVCC = "no nvcc here (no CUDA toolkit; tools/nvcc-from-wheels.sh makes one from PyPI wheels)"
needs_nvcc = pytest.mark.skipif(NVCC is None, reason=NO_NVCC)
