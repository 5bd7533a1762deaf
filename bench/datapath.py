"""Data-path benchmark: copies and launches through the broker against doing the same directly,
measured side by side in one run. By hand:

    .venv/bin/python bench/datapath.py [--device cpu0|gpu0] [--mib 256]

Through the broker: a real client process's kubecash.client calls to its executor (bulk data
through the shared-memory staging segment, pipelined over its two halves). Directly: on a
GPU, cuMemcpyHtoD/DtoH from pageable host memory and cuLaunchKernel in this process; on the
CPU device, a host memcpy and an in-process launch of the same compiled kernel. Targets (GPU):
H2D and D2H through the broker >= 0.8x direct; the per-launch overhead is reported. On every
device: the median synchronous call (mem_info) and ctx_sync on an empty queue against the
median round trip of a raw pyzmq DEALER/ROUTER echo over ipc, target <= 1.2x (#17).
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
print(json.dumps({"h2d": h2d, "d2h": d2h, "launch_us": launch_us, "query_us": query_us, "sync_us": sync_us}))
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
    with LocalBroker({"bench": {}}, log_level="WARNING") as b:
        p = subprocess.run([sys.executable, "-c", CLIENT, a.device, str(nbytes), str(a.launches),
                            str(a.reps), KERNEL], env=b.env("bench"), capture_output=True,
                           text=True, timeout=600)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            print("0 passed, 1 failed")
            return 1
        brokered = json.loads(p.stdout.strip().splitlines()[-1])
    results = []
    print(f"device {a.device}, {a.mib} MiB copies x {a.reps}, {a.launches} launches")
    print(f"{'':24} {'direct':>12} {'brokered':>12} {'ratio':>7}")
    for key, label in (("h2d", "host to device GB/s"), ("d2h", "device to host GB/s")):
        ratio = brokered[key] / direct[key]
        verdict = ("PASS" if ratio >= 0.8 else "FAIL") if gpu else "info"
        if gpu:
            results.append(ratio >= 0.8)
        print(f"{label:24} {direct[key] / 1e9:12.2f} {brokered[key] / 1e9:12.2f} {ratio:7.2f}  "
              f"{verdict}{' (target >= 0.80)' if gpu else ''}")
    print(f"{'per-launch us':24} {direct['launch_us']:12.1f} {brokered['launch_us']:12.1f} "
          f"{brokered['launch_us'] / direct['launch_us']:7.2f}  info (overhead "
          f"{brokered['launch_us'] - direct['launch_us']:.1f} us per launch)")
    echo = raw_echo_us()
    for key, label in (("query_us", "sync call p50 us"), ("sync_us", "ctx_sync empty p50 us")):
        ratio = brokered[key] / echo
        results.append(ratio <= 1.2)
        print(f"{label:24} {echo:12.1f} {brokered[key]:12.1f} {ratio:7.2f}  "
              f"{'PASS' if ratio <= 1.2 else 'FAIL'} (direct: a raw pyzmq echo; target <= 1.20)")
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
