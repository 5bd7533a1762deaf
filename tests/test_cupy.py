"""CuPy (cupy-cuda13x) on KubeCASH's libcuda.so.1, no Python-level shim: elementwise and
reduction kernels, raw and generated, run on cpu0 and are checked against numpy; memory is
the tenant's quota.

CuPy compiles its kernels with NVRTC in the program. It loads CUBINs by default (SASS, which a
CPU device cannot run): CUPY_COMPILE_WITH_PTX=1 makes it load the PTX instead. Its CUB
accelerator loads a 9 MiB precompiled fatbin whose PTX is more than a CPU device compiles in
one module: that load is refused with the reason on stderr, and CuPy's CUB wrappers ignore
the error (their results are then wrong), so CUPY_ACCELERATORS="" (CuPy's own reduction
kernels) is what a CPU-device tenant sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("cupy", reason="CuPy (pip cupy-cuda13x, x86-64: the test extra) is not installed")
from test_native_driver import RUN_TIMEOUT, _libdir  # noqa: E402

QUOTA = 256 << 20          # the broker fixture's alice

PROGRAM = r"""
import json, numpy as np, cupy as cp
out = {"count": cp.cuda.runtime.getDeviceCount(), "mem": list(cp.cuda.runtime.memGetInfo())}
rng = np.random.default_rng(3)
a = rng.random(100_003).astype(np.float32)
b = rng.random(100_003).astype(np.float32)
x, y = cp.asarray(a), cp.asarray(b)
out["elementwise"] = bool(np.allclose((x * 2 + y).get(), a * 2 + b, rtol=1e-6))
out["math"] = bool(np.allclose(cp.sqrt(cp.exp(x)).get(), np.sqrt(np.exp(a)), rtol=1e-6))
out["sum"] = [float(x.sum()), float(a.sum(dtype=np.float64))]
i = cp.arange(1_000_000, dtype=cp.int64)
out["int_sum"] = int(i.sum())
out["max_argmax"] = [float(x.max()), int(x.argmax()), float(a.max()), int(a.argmax())]
m = cp.asarray(rng.random((300, 70)))
out["axis_mean"] = bool(np.allclose(m.mean(axis=0).get(), m.get().mean(axis=0)))
saxpy = cp.ElementwiseKernel("float32 a, float32 x, float32 y", "float32 z", "z = a * x + y", "saxpy")
out["elementwise_kernel"] = bool(np.allclose(saxpy(cp.float32(3), x, y).get(), 3 * a + b, rtol=1e-6))
l2 = cp.ReductionKernel("T x", "T y", "x * x", "a + b", "y = sqrt(a)", "0", "l2norm")
out["reduction_kernel"] = [float(l2(x)), float(np.sqrt((a.astype(np.float64) ** 2).sum()))]
raw = cp.RawKernel(r'''extern "C" __global__ void twice(const float* x, float* y, int n) {
    int i = blockDim.x * blockIdx.x + threadIdx.x; if (i < n) y[i] = 2 * x[i]; }''', "twice")
z = cp.empty_like(x)
raw(((x.size + 255) // 256,), (256,), (x, z, cp.int32(x.size)))
out["raw_kernel"] = bool(np.array_equal(z.get(), 2 * a))
try:
    cp.empty(%d, dtype=cp.uint8)
    out["over_quota"] = "allocated"
except cp.cuda.memory.OutOfMemoryError:
    out["over_quota"] = "refused"
print(json.dumps(out))
"""


def _run(broker, code: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECASH_", "CUPY_"))}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=broker.address("alice"), KUBECASH_SHIM="0",
               CUPY_COMPILE_WITH_PTX="1", CUPY_CACHE_DIR=os.path.join(broker.runtime_dir, "cupy-cache"),
               **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT * 3, stdin=subprocess.DEVNULL)


def test_cupy_elementwise_and_reduction_kernels_run_brokered(broker):
    r = _run(broker, PROGRAM % (QUOTA + (1 << 20)), CUPY_ACCELERATORS="")
    assert r.returncode == 0, r.stderr[-4000:]
    v = json.loads(r.stdout.strip().splitlines()[-1])
    assert v["count"] == 1 and v["mem"][1] == QUOTA, v               # the tenant's quota, not the machine
    assert v["elementwise"] and v["math"] and v["elementwise_kernel"] and v["raw_kernel"], v
    assert v["sum"][0] == pytest.approx(v["sum"][1], rel=1e-5), v
    assert v["int_sum"] == 999_999 * 1_000_000 // 2
    assert v["max_argmax"][:2] == pytest.approx(v["max_argmax"][2:]), v
    assert v["axis_mean"] and v["reduction_kernel"][0] == pytest.approx(v["reduction_kernel"][1], rel=1e-5), v
    assert v["over_quota"] == "refused", v
    # nothing fell through to a stub but one private table CuPy asks for and does without
    refused = [ln for ln in r.stderr.splitlines() if "not supported" in ln and "cuGetExportTable" not in ln]
    assert not refused, r.stderr[-3000:]
    assert "exceeds tenant 'alice' memory quota" in r.stderr             # the refusal's reason, told
    st = broker.admin().call("status")["tenants"]["alice"]["devices"]["cpu0"]
    assert st["kernels"] > 10, st


def test_cupys_cub_fatbin_is_refused_saying_why(broker):
    """CUB's precompiled module: refused with the reason on stderr (CuPy itself ignores it)."""
    r = _run(broker, "import cupy as cp\nx = cp.arange(10, dtype=cp.float32)\nx.sum()\n"
                     "cp.cuda.Device().synchronize()\n", CUPY_ACCELERATORS="cub")
    assert "a CPU device compiles in one module" in r.stderr, r.stderr[-3000:]
