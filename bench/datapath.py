"""Data-path benchmark: copies and launches through the broker against doing the same directly,
measured side by side in one run. By hand:

    .venv/bin/python bench/datapath.py [--device cpu0|gpu0] [--mib 256]

Through the broker, two ways side by side: a real client process's kubecash.client calls to
its executor, and the same work from a C program through KubeCASH's libcuda.so.1 (the native
path, bench/native/datapath.c: cuMemcpyHtoD/DtoH, cuLaunchKernel, cuMemGetInfo,
cuCtxSynchronize). Directly: on a GPU, cuMemcpyHtoD/DtoH from pageable host memory and
cuLaunchKernel in this process; on the CPU device, np.copyto and an in-process launch of the
same compiled kernel. Targets (#17): H2D and D2H through the broker >= 0.8x direct; async
launches of an empty kernel a second >= a raw pyzmq one-way stream's messages a second; on
the CPU device, kernels of about 100 us and 1 ms (calibrated in process, run back to back)
at >= 0.95x and >= 0.98x their in-process rate; the median synchronous call (mem_info) and
ctx_sync on an empty queue <= 1.2x the median round trip of a raw pyzmq DEALER/ROUTER echo.
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
sys.path.insert(0, os.path.dirname(HERE))

from kubecash.broker.local import LocalBroker  # noqa: E402

KERNEL = 'extern "C" __global__ void nop(float* p, int n) { if (threadIdx.x == 0 && n < 0) p[0] = 1; }'
# A kernel that takes as long as `iters` says (calibrated in process to about 100 us and 1 ms).
SPIN = r"""
extern "C" __global__ void spin(float* p, int iters) {
    float x = threadIdx.x;
    for (int i = 0; i < iters; i++) x = x * 0.9999f + 0.0001f;
    if (x == 12345.0f) p[0] = x;
}
"""
SPIN_GRID, SPIN_BLOCK = (4, 1, 1), (64, 1, 1)

CLIENT = r"""
import json, sys, time, numpy as np, kubecash.client as kc
dev_name, nbytes, launches, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
src = sys.argv[5]
with kc.connect() as s:
    d = s.device(dev_name)
    host = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    back = np.empty_like(host)
    buf = d.allocate(nbytes)
    buf.copy_from(host); buf.copy_to(back)          # warm up: maps, first touches
    t = time.perf_counter()
    for _ in range(reps): buf.copy_from(host)
    h2d = reps * nbytes / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps): buf.copy_to(back)
    d2h = reps * nbytes / (time.perf_counter() - t)
    assert np.array_equal(host, back)
    k = d.load_module(src).get_kernel("nop")
    small = d.allocate(4)
    for _ in range(50): d.launch(k, (1,), (32,), [small, 1])
    d.synchronize()
    t = time.perf_counter()
    for _ in range(launches): d.launch(k, (1,), (32,), [small, 1])
    d.synchronize()
    launch_us = (time.perf_counter() - t) / launches * 1e6
    def p50(fn, n=2000):
        for _ in range(200): fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2] * 1e6
    query_us = p50(d.mem_info)          # a synchronous request the executor answers at once
    sync_us = p50(d.synchronize)        # ctx_sync on an empty queue
    timed = {}
    spins = json.loads(sys.argv[7])
    if spins:   # brokered and in this process, in alternate rounds: the machine's noise hits both
        import os, tempfile
        from kubecash.broker import cpukernels
        spin = d.load_module(sys.argv[6]).get_kernel("spin")
        cache = tempfile.mkdtemp(prefix="kc-datapath-spin-")
        mod = cpukernels.compile_module(sys.argv[6], cache_dir=cache)
        ks = mod.kernel("spin")
        ptr = np.zeros(1, np.float32)
        with cpukernels.Launcher(os.cpu_count() or 1, nice=10) as L:   # as an executor's workers
            for name, iters, count in spins:
                args = [ptr.ctypes.data.to_bytes(8, "little"), iters.to_bytes(4, "little")]
                d.launch(spin, SPIN_GRID, SPIN_BLOCK, [small, iters]); d.synchronize()
                L.launch(mod, ks, SPIN_GRID, SPIN_BLOCK, 0, args)
                brokered = direct = 0.0
                for _ in range(3):
                    t = time.perf_counter()
                    for _ in range(count): L.launch(mod, ks, SPIN_GRID, SPIN_BLOCK, 0, args)
                    direct += time.perf_counter() - t
                    t = time.perf_counter()
                    for _ in range(count): d.launch(spin, SPIN_GRID, SPIN_BLOCK, [small, iters])
                    d.synchronize()
                    brokered += time.perf_counter() - t
                timed[name] = brokered / (3 * count) * 1e6
                timed[name + "_direct"] = direct / (3 * count) * 1e6
print(json.dumps({"h2d": h2d, "d2h": d2h, "launch_us": launch_us, "query_us": query_us, "sync_us": sync_us,
                  **timed}))
""".replace("SPIN_GRID", repr(SPIN_GRID)).replace("SPIN_BLOCK", repr(SPIN_BLOCK))

ONEWAY = r"""
import sys, time, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect(sys.argv[1])
n = int(sys.argv[2])
msg = b"x" * 100
s.send(b"start"); s.recv()
for _ in range(n): s.send(msg)
s.recv()
"""


ECHO = r"""
import sys, time, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect(sys.argv[1])
msg = b"x" * 64
for _ in range(200): s.send(msg); s.recv()
ts = []
for _ in range(2000):
    t = time.perf_counter(); s.send(msg); s.recv(); ts.append(time.perf_counter() - t)
print(sorted(ts)[1000] * 1e6)
"""


def raw_echo_us() -> float:
    """p50 of a raw pyzmq round trip: a DEALER in another process, a ROUTER echoing in a thread
    of this one, over ipc (what a synchronous call costs at the least)."""
    import threading

    import zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    path = tempfile.mktemp(prefix="kc-echo-")
    router.bind(f"ipc://{path}")
    stop = threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(100):
                router.send_multipart(router.recv_multipart())
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        out = subprocess.run([sys.executable, "-c", ECHO, f"ipc://{path}"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    finally:
        stop.set()
        th.join()
        router.close(0)
        ctx.term()
        if os.path.exists(path):
            os.unlink(path)
    return float(out.strip().splitlines()[-1])


def raw_oneway_per_s(n: int = 200_000) -> float:
    """Messages a second a raw pyzmq DEALER in another process gets to a ROUTER here, one
    way, over ipc (of the size of a launch request): what async launches are held to (#17)."""
    import zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    path = tempfile.mktemp(prefix="kc-oneway-")
    router.bind(f"ipc://{path}")
    p = subprocess.Popen([sys.executable, "-c", ONEWAY, f"ipc://{path}", str(n)])
    try:
        ident, _ = router.recv_multipart()
        router.send_multipart([ident, b"go"])
        t = time.perf_counter()
        for _ in range(n):
            router.recv_multipart()
        rate = n / (time.perf_counter() - t)
        router.send_multipart([ident, b"done"])
        p.wait(timeout=60)
    finally:
        p.kill()
        router.close(0)
        ctx.term()
        if os.path.exists(path):
            os.unlink(path)
    return rate


def direct_spin(threads: int) -> list[tuple[str, int, int, float]]:
    """(name, iters, count, us per kernel in process) for kernels of about 100 us and 1 ms."""
    import numpy as np

    from kubecash.broker import cpukernels
    out = []
    with tempfile.TemporaryDirectory() as cache:
        mod = cpukernels.compile_module(SPIN, cache_dir=cache)
        k = mod.kernel("spin")
        small = np.zeros(1, np.float32)
        p = small.ctypes.data.to_bytes(8, "little")
        with cpukernels.Launcher(threads, nice=10) as L:
            def per_kernel(iters: int, count: int) -> float:
                args = [p, iters.to_bytes(4, "little")]
                L.launch(mod, k, SPIN_GRID, SPIN_BLOCK, 0, args)
                t = time.perf_counter()
                for _ in range(count):
                    L.launch(mod, k, SPIN_GRID, SPIN_BLOCK, 0, args)
                return (time.perf_counter() - t) / count * 1e6
            base = per_kernel(2000, 50)
            for name, us, count in (("k100us", 100, 1000), ("k1ms", 1000, 150)):
                iters = max(1, int(2000 * us / base))
                out.append((name, iters, count, per_kernel(iters, count)))
    return out


def direct_gpu(index: int, nbytes: int, launches: int, reps: int) -> dict:
    import numpy as np
    from cuda.bindings import driver as cu
    from cuda.bindings import nvrtc

    from kubecash.broker.backend_cuda import _check
    _check(cu.cuInit(0), "cuInit")
    dev = _check(cu.cuDeviceGet(index), "cuDeviceGet")
    ctx = _check(cu.cuDevicePrimaryCtxRetain(dev), "retain")
    _check(cu.cuCtxSetCurrent(ctx), "current")
    host = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    back = np.empty_like(host)
    dptr = _check(cu.cuMemAlloc(nbytes), "alloc")
    cu.cuMemcpyHtoD(dptr, host, nbytes)
    t = time.perf_counter()
    for _ in range(reps):
        _check(cu.cuMemcpyHtoD(dptr, host, nbytes), "h2d")
    h2d = reps * nbytes / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps):
        _check(cu.cuMemcpyDtoH(back, dptr, nbytes), "d2h")
    d2h = reps * nbytes / (time.perf_counter() - t)
    attr = cu.CUdevice_attribute
    major = _check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "a")
    minor = _check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "a")
    _, prog = nvrtc.nvrtcCreateProgram(KERNEL.encode(), b"k.cu", 0, [], [])
    nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{major}{minor}".encode()])
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    mod = _check(cu.cuModuleLoadData(cubin), "load")
    fn = _check(cu.cuModuleGetFunction(mod, b"nop"), "fn")
    small = _check(cu.cuMemAlloc(4), "alloc")
    p = ctypes.c_uint64(int(small))
    n = ctypes.c_int(1)
    params = (ctypes.c_void_p * 2)(ctypes.addressof(p), ctypes.addressof(n))
    for _ in range(50):
        cu.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, 0, ctypes.addressof(params), 0)
    cu.cuCtxSynchronize()
    t = time.perf_counter()
    for _ in range(launches):
        cu.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, 0, ctypes.addressof(params), 0)
    cu.cuCtxSynchronize()
    launch_us = (time.perf_counter() - t) / launches * 1e6
    cu.cuMemFree(dptr)
    cu.cuMemFree(small)
    cu.cuDevicePrimaryCtxRelease(dev)
    return {"h2d": h2d, "d2h": d2h, "launch_us": launch_us}


def direct_cpu(nbytes: int, launches: int, reps: int) -> dict:
    import numpy as np

    from kubecash.broker import cpukernels
    host = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dev = np.empty_like(host)
    np.copyto(dev, host)
    t = time.perf_counter()
    for _ in range(reps):
        np.copyto(dev, host)
    h2d = reps * nbytes / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps):
        np.copyto(host, dev)
    d2h = reps * nbytes / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as cache:
        mod = cpukernels.compile_module(KERNEL, cache_dir=cache)
        k = mod.kernel("nop")
        small = np.zeros(1, np.float32)
        args = [small.ctypes.data.to_bytes(8, "little"), (1).to_bytes(4, "little")]
        with cpukernels.Launcher(os.cpu_count() or 1) as L:
            for _ in range(50):
                L.launch(mod, k, (1, 1, 1), (32, 1, 1), 0, args)
            t = time.perf_counter()
            for _ in range(launches):
                L.launch(mod, k, (1, 1, 1), (32, 1, 1), 0, args)
            launch_us = (time.perf_counter() - t) / launches * 1e6
    return {"h2d": h2d, "d2h": d2h, "launch_us": launch_us}


NATIVE_SRC = os.path.join(HERE, "native", "datapath.c")


def native_program(out_dir: str) -> tuple[list[str], dict[str, str], str] | str:
    """bench/native/datapath.c built against cuda.h and KubeCASH's libcuda.so.1, and the nop
    kernel's PTX (NVRTC) for it to load: (argv prefix, extra env), or why it cannot be."""
    from kubecash import native
    from kubecash.native import gen
    incs = gen.include_dirs()
    if not incs:
        return "no cuda.h here (nvidia-cuda-runtime)"
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return "no NVRTC (cuda-python) to make the kernel's PTX"
    _, prog = nvrtc.nvrtcCreateProgram(KERNEL.encode(), b"nop.cu", 0, [], [])
    if int(nvrtc.nvrtcCompileProgram(prog, 1, [b"--gpu-architecture=compute_80"])[0]):
        return "NVRTC could not compile the kernel"
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    ptx_path = os.path.join(out_dir, "nop.ptx")
    with open(ptx_path, "wb") as f:
        f.write(ptx.rstrip(b"\0"))
    libdir = native.libdir()
    exe = os.path.join(out_dir, "datapath")
    r = subprocess.run(["cc", "-O2", "-o", exe, NATIVE_SRC, "-I", incs[0], "-L", libdir, "-l:libcuda.so.1"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        return f"cannot build {NATIVE_SRC}: {r.stderr[-500:]}"
    return [exe], {"LD_LIBRARY_PATH": libdir, "KUBECASH_SHIM": "0"}, ptx_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu0")
    ap.add_argument("--mib", type=int, default=256, help="copy size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--launches", type=int, default=2000)
    a = ap.parse_args()
    nbytes = a.mib << 20
    gpu = a.device.startswith("gpu")
    direct = (direct_gpu(int(a.device[3:]), nbytes, a.launches, a.reps) if gpu
              else direct_cpu(nbytes, a.launches, a.reps))
    tmp = tempfile.mkdtemp(prefix="kc-datapath-")
    built = native_program(tmp)
    paths: dict[str, dict] = {}
    spins = [] if gpu else direct_spin(os.cpu_count() or 1)
    with LocalBroker({"bench": {}}, log_level="WARNING") as b:
        p = subprocess.run([sys.executable, "-c", CLIENT, a.device, str(nbytes), str(a.launches),
                            str(a.reps), KERNEL, SPIN, json.dumps([x[:3] for x in spins])],
                           env=b.env("bench"), capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            print("0 passed, 1 failed")
            return 1
        paths["client"] = json.loads(p.stdout.strip().splitlines()[-1])
        if not isinstance(built, str):     # the same device, by its index in the tenant's list
            argv, env, ptx = built
            index = next(i for i, d in enumerate(b.admin().call("status")["devices"]) if d == a.device)
            p = subprocess.run([*argv, str(index), str(nbytes), str(a.launches), str(a.reps), ptx],
                               env={**b.env("bench"), **env}, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                print(p.stderr, file=sys.stderr)
                print("0 passed, 1 failed")
                return 1
            paths["native"] = json.loads(p.stdout.strip().splitlines()[-1])
    results = []
    print(f"device {a.device}, {a.mib} MiB copies x {a.reps}, {a.launches} launches")
    print("client: kubecash.client in a Python process; native: a C program on KubeCASH's libcuda.so.1"
          + ("" if "native" in paths else f" (not run: {built})"))
    head = "".join(f" {name:>12} {'ratio':>7}" for name in paths)
    print(f"{'':24} {'direct':>12}{head}")

    def row(label: str, base: float, key: str, scale: float, target: float | None, higher: bool, note: str):
        cells = ""
        for got in paths.values():
            if key not in got:
                cells += f" {'-':>12} {'':7} "
                continue
            ratio = got[key] / base
            ok = target is None or (ratio >= target if higher else ratio <= target)
            if target is not None:
                results.append(ok)
            cells += f" {got[key] / scale:12.2f} {ratio:7.2f}{'' if target is None else (' ' if ok else '!')}"
        verdict = "info" if target is None else f"target {'>=' if higher else '<='} {target:.2f} (! misses it)"
        print(f"{label:24} {base / scale:12.2f}{cells}  {verdict}{note}")

    for key, label in (("h2d", "host to device GB/s"), ("d2h", "device to host GB/s")):
        row(label, direct[key], key, 1e9, 0.8, True, " (direct: cuMemcpy in process)" if gpu
            else " (direct: np.copyto)")
    row("per-launch us", direct["launch_us"], "launch_us", 1, None, False,
        " (overhead: " + ", ".join(f"{n} {g['launch_us'] - direct['launch_us']:.1f} us"
                                   for n, g in paths.items()) + " per launch)")
    oneway = raw_oneway_per_s()
    for got in paths.values():
        got["launch_per_s"] = 1e6 / got["launch_us"]
    row("async launches/s", oneway, "launch_per_s", 1, 1.0, True,
        f" (direct: a raw pyzmq one-way stream; an in-process launch: {1e6 / direct['launch_us']:.0f}/s)")
    for name, _iters, _count, _us in spins:    # brokered kernel throughput / in process
        for got in paths.values():
            if name in got:
                got[name + "_rate"] = got[name + "_direct"] / got[name]
        c = paths["client"]
        target = 0.95 if name == "k100us" else 0.98
        row(f"{c[name + '_direct']:.0f} us kernels, rate", 1.0, name + "_rate", 1, target, True,
            f" (brokered / in process: {c[name]:.0f} / {c[name + '_direct']:.0f} us a kernel, "
            f"{SPIN_GRID[0]}x{SPIN_BLOCK[0]} threads, alternate rounds in the client process)")
    echo = raw_echo_us()
    for key, label in (("query_us", "sync call p50 us"), ("sync_us", "ctx_sync empty p50 us")):
        row(label, echo, key, 1, 1.2, False, " (direct: a raw pyzmq echo)")
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
