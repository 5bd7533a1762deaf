"""Fairness benchmark: real tenants (client processes running real kernels through real
executors) against the shares their quotas configure. Run by hand:

    .venv/bin/python bench/fairness.py [--device cpu0] [--quick] [--only 1,6] [--native]

Each scenario prints configured, achieved, target and PASS/FAIL; the last line is
`N passed, M failed`. Shares are of device time as the executors measured it, read from the
broker's accounting (brokerctl status) at the start and end of each window. Scenario 4 runs
600 s (the documented window for a 0.0001 limit); --quick shortens it to 60 s and skips 0.0001.
With --native every tenant is bench/native/tenant_worker.cu built by nvcc (the same kernel,
modes and output as examples/tenant_worker.py) running on KubeCASH's libcuda.so.1: the
quotas hold for unmodified CUDA programs as they do for the client library.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from kubecash.broker.local import LocalBroker  # noqa: E402
from kubecash.broker.scheduler import expected_shares  # noqa: E402

WORKER = os.path.join(ROOT, "examples", "tenant_worker.py")
NATIVE_WORKER = os.path.join(HERE, "native", "tenant_worker.cu")
RESULTS: list[bool] = []


def verdict(name: str, ok: bool, detail: str) -> None:
    RESULTS.append(ok)
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


class Scenario:
    """A broker with tenants, each running tenant_worker.py with its own arguments."""

    def __init__(self, args: argparse.Namespace, tenants: dict[str, dict], quantum_ms: float = 10):
        self.args = args
        self.broker = LocalBroker(tenants, log_level="WARNING", quantum_ms=quantum_ms,
                                  heartbeat_interval_s=1.0, heartbeat_timeout_s=10.0,
                                  executor_threads=args.threads)
        self.workers: dict[str, subprocess.Popen] = {}
        self.admin = self.broker.admin()

    def start(self, tenant: str, seconds: float, kernel_ms: float, mode: str = "saturate",
              **extra: Any) -> None:
        argv = ([self.args.native] if self.args.native else [sys.executable, WORKER]) + [
            "--seconds", str(seconds), "--device", self.args.device,
            "--mode", mode, "--iters", str(max(30, int(kernel_ms * self.args.iters_per_ms))),
            "--blocks", str(self.args.blocks)]
        for k, v in extra.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        env = self.broker.env(tenant)
        if self.args.native:               # nothing but the loader's path and the broker's socket
            from kubecash import native
            env.update(LD_LIBRARY_PATH=native.libdir(), KUBECASH_SHIM="0")
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        self.workers[tenant] = p
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {tenant} failed to start")

    def used(self) -> tuple[dict[str, int], float]:
        st = self.admin.call("status")
        return ({t: v["devices"][self.args.device]["used_ns"] for t, v in st["tenants"].items()},
                st["uptime_s"])

    def window(self, seconds: float) -> tuple[dict[str, float], float]:
        """Device seconds each tenant used over the next `seconds`, and the wall time."""
        u0, t0 = self.used()
        time.sleep(seconds)
        u1, t1 = self.used()
        return {t: (u1[t] - u0[t]) / 1e9 for t in u0}, t1 - t0

    def results(self) -> dict[str, dict]:
        out = {}
        for t, p in self.workers.items():
            text = p.communicate(timeout=900)[0]
            out[t] = json.loads(text.strip().splitlines()[-1])
        return out

    def close(self) -> None:
        for p in self.workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.admin.close()
        self.broker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def calibrate(args: argparse.Namespace) -> None:
    """How many loop iterations per thread make one millisecond of kernel on this device."""
    with Scenario(args, {"cal": {}}) as sc:
        probe = 2000
        sc.start("cal", 3.0, probe / args.iters_per_ms, depth=4)
        used, wall = sc.window(2.0)
        sc.results()
        st = sc.admin.call("status")["tenants"]["cal"]["devices"][args.device]
        ms_per_kernel = st["used_ns"] / 1e6 / max(1, st["kernels"])
        args.iters_per_ms = probe / ms_per_kernel
    print(f"calibration: {args.iters_per_ms:.0f} iterations per thread per ms on {args.device} "
          f"({args.blocks} blocks x 128 threads)")


def shares_line(used: dict[str, float], want: dict[str, float], by: float) -> tuple[float, str]:
    err = max(abs(used[t] / by - want[t]) for t in want)
    cols = "  ".join(f"{t}: {want[t]:.1%} -> {used[t] / by:.2%}" for t in want)
    return err, cols


def s1_weights(args):
    print("1. weights 1:3, both saturating (3 ms and 7 ms kernels), 10 s")
    with Scenario(args, {"a": {"weight": 100}, "b": {"weight": 300}}) as sc:
        sc.start("a", args.warmup + 12, 3)
        sc.start("b", args.warmup + 12, 7)
        time.sleep(args.warmup)
        used, wall = sc.window(10)
    busy = sum(used.values())
    err, cols = shares_line(used, {"a": 0.25, "b": 0.75}, busy)
    verdict("1 weights 1:3", err <= 0.01, f"{cols}; max error {err * 100:.2f} pp (target <= 1 pp); "
            f"device busy {busy / wall:.1%}")


def s2_limit(args):
    print("2. limit 0.10, tenant alone (2 ms kernels), 10 s")
    with Scenario(args, {"a": {"limit": 0.1}}) as sc:
        sc.start("a", args.warmup + 12, 2)
        time.sleep(args.warmup)
        used, wall = sc.window(10)
    share = used["a"] / wall
    verdict("2 limit 0.10 alone", abs(share - 0.10) <= 0.005,
            f"configured 10.00% achieved {share:.2%} of {wall:.1f} s (target +-0.5 pp)")


def s3_eight(args):
    print("3. 8 tenants, random weights, all saturating (1-8 ms kernels), 10 s")
    rng = random.Random(args.seed)
    tenants = {f"t{i}": {"weight": rng.randint(10, 1000)} for i in range(8)}
    with Scenario(args, tenants) as sc:
        for t in tenants:
            sc.start(t, args.warmup + 14, rng.uniform(1, 8), depth=4)
        time.sleep(args.warmup + 2)
        used, wall = sc.window(10)
    want = expected_shares({t: (q["weight"], None) for t, q in tenants.items()})
    busy = sum(used.values())
    err, cols = shares_line(used, want, busy)
    print("     " + cols)
    verdict("3 eight random weights", err <= 0.01,
            f"max error {err * 100:.2f} pp (target <= 1 pp); device busy {busy / wall:.1%}")


def s4_tiny(args):
    long_s = 60 if args.quick else 600
    print(f"4. limit 0.001 over 60 s{'' if args.quick else ' and 0.0001 over 600 s'} (1 ms kernels), "
          f"run together for {long_s} s")
    tenants = {"milli": {"limit": 0.001}}
    if not args.quick:
        tenants["tenth_milli"] = {"limit": 0.0001}
    with Scenario(args, tenants) as sc:
        for t in tenants:
            sc.start(t, long_s + 5, 1, depth=2)
        u0, t0 = sc.used()
        time.sleep(60)
        u60, t60 = sc.used()
        if not args.quick:
            time.sleep(long_s - 60)
        u1, t1 = sc.used()
    share = (u60["milli"] - u0["milli"]) / 1e9 / (t60 - t0)
    verdict("4a limit 0.001 over 60 s", abs(share / 0.001 - 1) <= 0.10,
            f"configured 0.1000% achieved {share:.4%} (target +-10% relative: {share / 0.001 - 1:+.1%})")
    if not args.quick:
        share = (u1["tenth_milli"] - u0["tenth_milli"]) / 1e9 / (t1 - t0)
        verdict("4b limit 0.0001 over 600 s", abs(share / 0.0001 - 1) <= 0.10,
                f"configured 0.0100% achieved {share:.5%} (target +-10% relative: "
                f"{share / 0.0001 - 1:+.1%})")


def s5_latency(args):
    print("5. latency tenant (1 ms kernels, random gaps) vs saturating batch tenant (5 ms kernels)")
    tenants = {"lat": {"class": "latency"}, "batch": {"class": "batch"}}
    with Scenario(args, tenants) as sc:
        sc.start("lat", 10, 1, mode="sporadic", gap_ms=20)
        alone = sc.results()["lat"]["latencies_ms"]
    with Scenario(args, tenants) as sc:
        sc.start("batch", 14, 5)
        time.sleep(1)
        sc.start("lat", 10, 1, mode="sporadic", gap_ms=20)
        mixed = sc.results()["lat"]["latencies_ms"]

    def p99(xs):
        return statistics.quantiles(xs, n=100)[98]
    a, m = p99(alone), p99(mixed)
    verdict("5 latency class", m <= 1.1 * a + 5,
            f"p99 alone {a:.2f} ms, with batch {m:.2f} ms (target <= {1.1 * a + 5:.2f} ms; "
            f"{len(mixed)} kernels; median {statistics.median(mixed):.2f} ms alone "
            f"{statistics.median(alone):.2f} ms; max {max(mixed):.2f} ms)")


def s6_handover(args):
    print("6. two saturating tenants, 10 ms quantum: device busy fraction (hand-over cost)")
    with Scenario(args, {"a": {}, "b": {}}, quantum_ms=10) as sc:
        sc.start("a", args.warmup + 12, 2)
        sc.start("b", args.warmup + 12, 2)
        time.sleep(args.warmup)
        used, wall = sc.window(10)
        grants = {t: v["devices"][args.device]["grants"]
                  for t, v in sc.admin.call("status")["tenants"].items()}
    busy = sum(used.values()) / wall
    verdict("6 hand-over", busy >= 0.97, f"device busy {busy:.2%} of {wall:.1f} s (target >= 97%); "
            f"leases granted {sum(grants.values())}")


def s7_live(args):
    print("7. weights changed live from 1:1 to 1:4 mid-run")
    with Scenario(args, {"a": {}, "b": {}}) as sc:
        sc.start("a", args.warmup + 9, 2)
        sc.start("b", args.warmup + 9, 2)
        time.sleep(args.warmup)
        before, _ = sc.window(3)
        sc.admin.call("set_quota", tenant="b", weight=400)
        time.sleep(0.1)                       # one period (100 ms for an uncapped tenant)
        after, _ = sc.window(3)
    b0 = before["b"] / sum(before.values())
    b1 = after["b"] / sum(after.values())
    verdict("7 live change", abs(b0 - 0.5) <= 0.02 and abs(b1 - 0.8) <= 0.02,
            f"b's share before {b0:.2%} (target 50%), from one period after the change {b1:.2%} "
            f"(target 80% +-2 pp)")


def build_native_worker() -> str | None:
    """bench/native/tenant_worker.cu built by nvcc (static cudart, nvcc's default), or None."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from toolkit import NVCC
    if NVCC is None:
        return None
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kubecash-tenant-worker-{os.getpid()}")
    subprocess.run([NVCC, "-O2", "-arch=sm_80", "-o", out, NATIVE_WORKER], check=True, timeout=600)
    print(f"tenants: {NATIVE_WORKER} built by {NVCC}, on KubeCASH's libcuda.so.1")
    return out


SCENARIOS = {1: s1_weights, 2: s2_limit, 3: s3_eight, 4: s4_tiny, 5: s5_latency, 6: s6_handover,
             7: s7_live}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu0")
    ap.add_argument("--only", help="comma-separated scenario numbers")
    ap.add_argument("--quick", action="store_true", help="scenario 4: 60 s, without 0.0001")
    ap.add_argument("--threads", type=int, default=0, help="executor threads (0: all cores)")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--iters-per-ms", type=float, default=400.0)
    ap.add_argument("--native", action="store_true", help="tenants are nvcc-built CUDA programs on libcuda.so.1")
    args = ap.parse_args()
    if args.native:
        args.native = build_native_worker()
        if args.native is None:
            print("0 passed, 1 failed (--native: no nvcc here)")
            return 1
    chosen = [int(x) for x in args.only.split(",")] if args.only else list(SCENARIOS)
    calibrate(args)
    for n in chosen:
        try:
            SCENARIOS[n](args)
        except Exception as e:            # a scenario that cannot run is a failure, not a crash
            verdict(f"{n} {SCENARIOS[n].__name__}", False, f"{type(e).__name__}: {e}")
    passed = sum(RESULTS)
    print(f"{passed} passed, {len(RESULTS) - passed} failed")
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
