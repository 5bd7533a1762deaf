"""The CPU backend's kernels through NVRTC and the PTX translator (today's path) against the
hand-written CUDA C path it replaced (retired in #18), side by side in one run. By hand,
from a git checkout:

    .venv/bin/python bench/ptx.py [--reps 7] [--rounds 3] [--threads 2] [--baseline 7031baa]

The baseline is the last revision with the hand-written path: its package is exported from
git into a temporary directory and this same script measures it there, in a child process
(its own Launcher, same thread count, same inputs), while this process measures today's.
The two take turns, `rounds` times, so that a change in the machine's load falls on both.
Per kernel: the best of all launches each way and the ratio baseline time / today's time
(target >= 1.0: NVIDIA's front end plus the host compiler is not slower than the
hand-written path), and the translation time per KiB of PTX (parse and translate, not the
host compiler). Ends "N passed, M failed" (one check per kernel).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("KC_BENCH_BASELINE"):      # the baseline child imports the exported package
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
    from kubecash.broker.cpukernels import nvrtc, options
    return nvrtc.to_ptx(src, list(options.parse_options(()).args), deadline=time.monotonic() + 60,
                        memory_limit_bytes=2 << 30, cwd=tempfile.gettempdir())


def inputs(n: int):
    rng = np.random.default_rng(0)
    return rng.random(n, np.float32), rng.random(n, np.float32)


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


def measure_all(reps: int, threads: int, cache: str) -> dict[str, tuple[float, list[float]]]:
    """Each kernel's best launch time through `ck.compile_module` of its source, and a sample
    of its output (whatever path the imported package compiles source with)."""
    out = {}
    with ck.Launcher(threads) as launcher:
        for name, (src, n, block, _) in KERNELS.items():
            x, y = inputs(n)
            c = np.zeros(n, np.float32)
            with ck.compile_module(src, cache_dir=cache) as m:
                out[name] = (best(launcher, m, n, block, reps, x, y, c), c[:4096].tolist())
    return out


def export_baseline(rev: str) -> str:
    """The package of revision `rev`, exported from git: the directory to put on its path."""
    root = tempfile.mkdtemp(prefix="kc-bench-baseline-")
    repo = os.path.dirname(HERE)
    tree = subprocess.run(["git", "-C", repo, "archive", rev, "broker", "client", "shim"],
                          check=True, capture_output=True).stdout
    pkg = os.path.join(root, "kubecash")
    os.makedirs(pkg)
    subprocess.run(["tar", "-x", "-C", pkg], input=tree, check=True)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    os.makedirs(os.path.join(root, "cache"))
    return root


def baseline(root: str, reps: int, threads: int) -> dict[str, tuple[float, list[float]]]:
    """measure_all in the exported package at `root`, in a child process."""
    env = dict(os.environ, KC_BENCH_BASELINE="1", PYTHONPATH=root)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", "--reps", str(reps),
                        "--threads", str(threads), "--cache", os.path.join(root, "cache")],
                       env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict[str, tuple[float, list[float]]]]) -> dict[str, tuple[float, list[float]]]:
    return {name: (min(r[name][0] for r in runs), runs[0][name][1]) for name in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="turns each way, alternating")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--baseline", default="7031baa", help="the git revision to compare with")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)   # the baseline child
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cache = a.cache or tempfile.mkdtemp(prefix="kc-bench-ptx-")
    if a.measure:
        print(json.dumps(measure_all(a.reps, a.threads, cache)))
        return 0
    root = export_baseline(a.baseline)
    base_runs, now_runs = [], []
    for _ in range(max(1, a.rounds)):
        base_runs.append(baseline(root, a.reps, a.threads))
        now_runs.append(measure_all(a.reps, a.threads, cache))
    base, now = best_of(base_runs), best_of(now_runs)
    passed = 0
    print(f"baseline: {a.baseline} (hand-written CUDA C path); today: NVRTC -> PTX -> translator; "
          f"{a.threads} threads, best of {a.rounds} alternating rounds of {a.reps}")
    print(f"{'kernel':<9} {'baseline ms':>12} {'today ms':>9} {'ratio':>7} {'PTX KiB':>8} {'translate ms/KiB':>17}")
    for name, (src, _n, _block, _) in KERNELS.items():
        text = nvrtc_ptx(src)
        t = time.perf_counter()
        for _ in range(5):
            ptx.to_cpp(text)
        per_kib = (time.perf_counter() - t) / 5 * 1000 / (len(text) / 1024)
        (t_base, o_base), (t_now, o_now) = base[name], now[name]
        same = np.allclose(o_base, o_now, rtol=1e-5, equal_nan=True)
        ratio = t_base / t_now
        ok = ratio >= 1.0 and same
        passed += ok
        print(f"{name:<9} {t_base * 1e3:12.2f} {t_now * 1e3:9.2f} {ratio:7.2f} {len(text) / 1024:8.1f} "
              f"{per_kib:17.2f}  {'ok' if ok else 'BELOW TARGET' if same else 'RESULTS DIFFER'}")
    print(f"{passed} passed, {len(KERNELS) - passed} failed")
    return 0 if passed == len(KERNELS) else 1


if __name__ == "__main__":
    sys.exit(main())
