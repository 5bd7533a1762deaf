"""The CPU backend's two ways to a kernel, side by side in one run: CUDA C compiled from
source (today's path) and the same kernels compiled by NVRTC to PTX and translated
(broker/ptx). By hand:

    .venv/bin/python bench/ptx.py [--reps 7] [--threads 2]

Per kernel: the best of `reps` launches each way, in this process on one Launcher, and the
ratio source time / PTX time (target >= 1.0: NVIDIA's front end plus the host compiler is
not slower than the hand-written path); and the translation time per KiB of PTX (parse and
translate, not the host compiler). Ends "N passed, M failed" (one check per kernel).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from kubecash.broker import cpukernels as ck  # noqa: E402
from kubecash.broker import ptx  # noqa: E402

KERNELS = {
    "vadd": (r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}""", 1 << 22, 256, 0),
    "poly": (r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = a[i], y = b[i], acc = 0.f;
    for (int j = 0; j < 64; ++j) acc = fmaf(acc, x, y) * 0.5f + (float)j;
    c[i] = acc;
}""", 1 << 20, 256, 0),
    "reduce": (r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    __shared__ float s[256];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    s[t] = i < n ? a[i] * b[i] : 0.f;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) { if (t < w) s[t] += s[t + w]; __syncthreads(); }
    if (t == 0) c[blockIdx.x] = s[0];
}""", 1 << 20, 256, 0),
    "int_mix": (r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned v = __float_as_uint(a[i]) ^ (unsigned)i;
    for (int j = 0; j < 16; ++j) v = (v << 3 | v >> 29) * 2654435761u + (v >> 7) % 13u;
    c[i] = (float)(v & 0xffff) + b[i];
}""", 1 << 20, 256, 0),
}


def nvrtc_ptx(src: str) -> str:
    from cuda.bindings import nvrtc
    _, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"bench.cu", 0, [], [])
    opts = [b"--gpu-architecture=compute_80"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC: {err}")
    _, n = nvrtc.nvrtcGetPTXSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetPTX(prog, buf)
    nvrtc.nvrtcDestroyProgram(prog)
    return buf.rstrip(b"\0").decode()


def ptr(a: np.ndarray) -> bytes:
    return a.ctypes.data.to_bytes(8, "little")


def best(launcher, m, n: int, block: int, reps: int, a, b, c) -> float:
    k = m.kernel("k")
    grid = ((n + block - 1) // block, 1, 1)
    args = [ptr(a), ptr(b), ptr(c), ctypes.c_int32(n).value.to_bytes(4, "little", signed=True)]
    launcher.launch(m, k, grid, (block, 1, 1), 0, args)      # warm: pages, fibers, caches
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        launcher.launch(m, k, grid, (block, 1, 1), 0, args)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="kc-bench-ptx-")
    passed = 0
    print(f"{'kernel':<9} {'source ms':>10} {'PTX ms':>9} {'ratio':>7} {'PTX KiB':>8} {'translate ms/KiB':>17}")
    with ck.Launcher(a.threads) as launcher:
        for name, (src, n, block, _) in KERNELS.items():
            text = nvrtc_ptx(src)
            t = time.perf_counter()
            for _ in range(5):
                ptx.to_cpp(text)
            per_kib = (time.perf_counter() - t) / 5 * 1000 / (len(text) / 1024)
            rng = np.random.default_rng(0)
            x, y = rng.random(n, np.float32), rng.random(n, np.float32)
            outs = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
            with ck.compile_module(src, cache_dir=cache) as m_src, \
                    ck.compile_module(text, cache_dir=cache, language="ptx") as m_ptx:
                t_src = best(launcher, m_src, n, block, a.reps, x, y, outs[0])
                t_ptx = best(launcher, m_ptx, n, block, a.reps, x, y, outs[1])
            same = np.allclose(outs[0], outs[1], rtol=1e-5, equal_nan=True)
            ratio = t_src / t_ptx
            ok = ratio >= 1.0 and same
            passed += ok
            print(f"{name:<9} {t_src * 1e3:10.2f} {t_ptx * 1e3:9.2f} {ratio:7.2f} {len(text) / 1024:8.1f} "
                  f"{per_kib:17.2f}  {'ok' if ok else 'BELOW TARGET' if same else 'RESULTS DIFFER'}")
    print(f"{passed} passed, {len(KERNELS) - passed} failed")
    return 0 if passed == len(KERNELS) else 1


if __name__ == "__main__":
    sys.exit(main())
