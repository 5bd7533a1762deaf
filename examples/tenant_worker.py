"""An example tenant: a real client process running real kernels through its broker.

    KUBECASH_BROKER=ipc:///run/kubecash/tenants/alice/broker.sock python examples/tenant_worker.py

Modes: `saturate` keeps its queue full of kernels for --seconds; `sporadic` launches one
kernel at random intervals and records each one's completion time (latency); `duty` launches
one every --period-ms (a tenant busy a fixed fraction of the time; a period it overruns is
not made up). With --wait, it waits for a line on stdin after {"ready": true}, so tenants
started one after another run side by side for their --seconds. Prints one JSON line:
kernels run, whether the results were right, and latencies in ms."""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np

import kubecash.client as kc

# Each thread iterates a damped recurrence: compute-bound, with a result numpy can check.
SOURCE = r"""
extern "C" __global__ void burn(float* out, int iters) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float x = out[i];
    for (int k = 0; k < iters; k++) x = x * 0.5f + 1.0f;
    out[i] = x;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--mode", choices=["saturate", "sporadic", "duty"], default="saturate")
    ap.add_argument("--iters", type=int, default=2000, help="work per thread per kernel")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--depth", type=int, default=8, help="kernels in flight when saturating")
    ap.add_argument("--gap-ms", type=float, default=20.0, help="mean gap when sporadic")
    ap.add_argument("--period-ms", type=float, default=10.0, help="one kernel per period when duty")
    ap.add_argument("--device", default="cpu0")
    ap.add_argument("--memory", type=int, default=1 << 20, help="bytes to allocate and hold")
    ap.add_argument("--wait", action="store_true", help="once ready, start on a line from stdin")
    a = ap.parse_args()
    n = a.blocks * 128
    with kc.connect() as s:
        dev = s.device(a.device)
        out = dev.allocate(n * 4)
        out.copy_from(np.zeros(n, np.float32))
        hold = dev.allocate(a.memory) if a.memory else None
        k = dev.load_module(SOURCE).get_kernel("burn")
        launched, latencies = 0, []
        print(json.dumps({"ready": True}), flush=True)
        if a.wait:
            sys.stdin.readline()
        end = time.monotonic() + a.seconds
        # Saturating: two batches in flight, so the queue never runs dry while we wait.
        marks = [dev.create_event(), dev.create_event()]
        batch = 0
        next_at = time.monotonic()
        while time.monotonic() < end:
            if a.mode == "saturate":
                for _ in range(a.depth):
                    dev.launch(k, (a.blocks,), (128,), [out, a.iters])
                launched += a.depth
                marks[batch % 2].record()
                if batch:
                    marks[(batch - 1) % 2].synchronize()
                batch += 1
            else:
                if a.mode == "duty":
                    next_at = max(next_at + a.period_ms / 1000, time.monotonic())
                    time.sleep(max(0.0, next_at - time.monotonic()))
                else:
                    time.sleep(random.expovariate(1000.0 / a.gap_ms))
                t0 = time.perf_counter()
                dev.launch(k, (a.blocks,), (128,), [out, a.iters])
                dev.synchronize()
                latencies.append((time.perf_counter() - t0) * 1000)
                launched += 1
        dev.synchronize()
        got = out.copy_to(np.empty(n, np.float32))
        # x -> x/2 + 1 converges to 2 from 0; after any number >= 30 of steps it is 2.0f.
        ok = bool(np.all(got == np.float32(2.0))) if a.iters >= 30 else True
        if hold is not None:
            hold.close()
        print(json.dumps({"tenant": s.tenant, "kernels": launched, "ok": ok,
                          "latencies_ms": latencies}), flush=True)


if __name__ == "__main__":
    main()
