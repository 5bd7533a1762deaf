"""How far PyTorch gets on a brokered CPU device, step by step. By hand (torch is ~5.5 GB):

    python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.14.1 numpy
    .venv/bin/python tools/torch_probe.py --python /tmp/torchenv/bin/python [--expandable]

Starts a broker (a CPU device, tenant alice with 4 GiB), runs the steps below in the torch
interpreter with only LD_LIBRARY_PATH=$(kubecash-libdir) and KUBECASH_BROKER set, and prints
each one OK or FAIL with its error. --expandable: PYTORCH_CUDA_ALLOC_CONF=expandable_segments
(the allocator maps memory with cuMemCreate/cuMemMap). Ends "N passed, M failed"."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import kubecash.native as kn
from kubecash.broker.local import LocalBroker

STEPS = r'''
import torch
def step(name, f):
    try:
        r = f()
        # a device tensor's text needs kernels (torch formats it on the device): its shape
        print(f"OK   {name}: {tuple(r.shape) if isinstance(r, torch.Tensor) else r}", flush=True)
        return r
    except Exception as e:
        print(f"FAIL {name}: {str(e).splitlines()[0][:300]}", flush=True)
h = torch.arange(1 << 20, dtype=torch.float32)
step("is_available, device_count", lambda: (torch.cuda.is_available(), torch.cuda.device_count()))
step("name, capability", lambda: (torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)))
step("mem_get_info (the quota)", torch.cuda.mem_get_info)
d = step("copy to the device", lambda: h.to("cuda"))
step("copy back", lambda: bool(torch.equal(d.cpu(), h)))
step("pinned memory", lambda: torch.empty(1 << 20, pin_memory=True).is_pinned())
def on_stream():
    s, p = torch.cuda.Stream(), torch.empty(1 << 20, pin_memory=True)
    with torch.cuda.stream(s):
        p.copy_(h.pin_memory().to("cuda", non_blocking=True), non_blocking=True)
    s.synchronize()
    return bool(torch.equal(p, h))
step("async copies on a stream", on_stream)
def timing():
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); d.cpu(); b.record(); b.synchronize()
    return a.elapsed_time(b) >= 0
step("events with timing", timing)
step("device-to-device clone", lambda: bool(torch.equal(d.clone().cpu(), h)))
step("1 GiB tensor", lambda: torch.empty(1 << 28, device="cuda"))
step("past the quota refused", lambda: torch.empty(1 << 31, device="cuda"))
step("zeros (a kernel)", lambda: torch.zeros(4, device="cuda").cpu().tolist())
step("elementwise", lambda: (d[:4] * 2 + 1).cpu().tolist())
step("reduction", lambda: d.sum().item())
step("matmul (cuBLAS)", lambda: (torch.ones(4, 4, device="cuda") @ torch.ones(4, 4, device="cuda")).cpu().tolist())
'''
EXPECTED_FAIL = {"past the quota refused"}     # a refusal is its success


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="an interpreter with torch installed")
    ap.add_argument("--expandable", action="store_true", help="expandable_segments:True")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECASH_", "CUDA_", "PYTORCH_"))}
    if a.expandable:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    with tempfile.TemporaryDirectory() as cache, \
            LocalBroker({"alice": {"memory": "4GiB"}}, cache_dir=cache) as broker:
        env.update(LD_LIBRARY_PATH=kn.libdir(), KUBECASH_BROKER=broker.address("alice"))
        r = subprocess.run([a.python, "-c", STEPS], env=env, capture_output=True, text=True, timeout=1800)
    passed = failed = 0
    for line in r.stdout.splitlines():
        print(line)
        name = line[5:].split(":")[0]
        ok = line.startswith("OK") != (name in EXPECTED_FAIL)
        passed, failed = passed + ok, failed + (not ok)
    if r.returncode:
        print(f"the torch process ended with {r.returncode}:\n{r.stderr[-3000:]}")
        failed += 1
    refused = sorted({x for x in r.stderr.splitlines() if x.startswith("kubecash:")})
    if refused:
        print("what the brokered driver refused or logged:\n  " + "\n  ".join(refused[:20]))
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
