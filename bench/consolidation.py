"""Consolidation benchmark: many small tenants on one device, and a broker configured with
many tenants. Real client processes (examples/tenant_worker.py) run real kernels through real
executors. Run by hand:

    .venv/bin/python bench/consolidation.py [--configured 1000] [--active 100] [--only 1,2]

1. idle: a broker with --configured tenants, none active: its CPU over 10 s (target <= 1 % of
   a core) and the latency of `status` (target <= 50 ms p50).
2. duty: 16 tenants each at 5 % duty (0.5 ms kernel every 10 ms): kernels each ran vs the same
   program alone in this run (target every one >= 0.95x), and the longest single wait
   (a kernel's latency less its run time alone; target <= 2 quanta).
3. the same on a broker configured with --configured tenants.
4. --active of --configured tenants saturating with random weights: shares within 1 pp.
The last line is `N passed, M failed`.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fairness  # noqa: E402  (Scenario, calibration and verdicts are shared with it)
from fairness import Scenario, calibrate, shares_line, verdict  # noqa: E402

from kubecash.broker.scheduler import expected_shares  # noqa: E402

QUANTUM_MS = 10.0


def _tenants(n: int, active: dict[str, dict] | None = None) -> dict[str, dict]:
    """`n` configured tenants: the active ones first, then idle ones that never connect."""
    out = dict(active or {})
    for i in range(n - len(out)):
        out[f"idle{i:04d}"] = {"memory": "64MiB"}
    return out


def s1_idle(args):
    print(f"1. a broker with {args.configured} tenants configured, none active")
    t0 = time.monotonic()
    with Scenario(args, _tenants(args.configured), quantum_ms=QUANTUM_MS) as sc:
        started = time.monotonic() - t0
        proc = psutil.Process(sc.broker.proc.pid)
        time.sleep(2)                                  # past start-up work
        c0, w0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(args.idle_s)
        cpu = (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - w0)
        lat = []
        for _ in range(20):
            s = time.perf_counter()
            sc.admin.call("status")
            lat.append((time.perf_counter() - s) * 1000)
    verdict("1 idle broker CPU", cpu <= 0.01, f"{cpu:.2%} of a core over {args.idle_s:.0f} s (target <= 1%); "
            f"started in {started:.1f} s")
    p50 = statistics.median(lat)
    verdict("1 status latency", p50 <= 50, f"p50 {p50:.1f} ms, max {max(lat):.1f} ms over 20 calls "
            f"(target p50 <= 50 ms)")


def _duty(args, configured: int, label: str):
    kernel_ms, period_ms, n = 0.5, 10.0, 16
    active = {f"d{i:02d}": {} for i in range(n)}
    with Scenario(args, _tenants(max(configured, n), active), quantum_ms=QUANTUM_MS) as sc:
        sc.start("d00", args.duty_s, kernel_ms, mode="duty", period_ms=period_ms, depth=1)
        alone = sc.results()["d00"]
        sc.workers.clear()
        for t in active:
            sc.start(t, args.duty_s, kernel_ms, mode="duty", period_ms=period_ms, depth=1)
        together = sc.results()
    base_lat = statistics.median(alone["latencies_ms"])
    ratios = {t: r["kernels"] / alone["kernels"] for t, r in together.items()}
    waits = {t: max(r["latencies_ms"]) - base_lat for t, r in together.items()}
    worst = min(ratios, key=ratios.get)
    longest = max(waits, key=waits.get)
    ok_all = all(r["ok"] for r in together.values()) and alone["ok"]
    verdict(f"{label} throughput each vs alone", ok_all and ratios[worst] >= 0.95,
            f"median {statistics.median(ratios.values()):.2f}x, worst {ratios[worst]:.2f}x ({worst}); "
            f"alone {alone['kernels']} kernels in {args.duty_s:.0f} s, median latency {base_lat:.2f} ms "
            f"(target every one >= 0.95x){'' if ok_all else '; WRONG RESULTS'}")
    verdict(f"{label} longest wait", waits[longest] <= 2 * QUANTUM_MS,
            f"{waits[longest]:.1f} ms ({longest}; target <= {2 * QUANTUM_MS:.0f} ms, two quanta)")


def s2_duty(args):
    print("2. 16 tenants at 5% duty (0.5 ms kernel every 10 ms), each vs alone")
    _duty(args, 16, "2")


def s3_duty_configured(args):
    print(f"3. the same on a broker with {args.configured} tenants configured")
    _duty(args, args.configured, "3")


def s4_active(args):
    print(f"4. {args.active} of {args.configured} tenants saturating, random weights")
    rng = random.Random(args.seed)
    active = {f"a{i:03d}": {"weight": rng.randint(50, 200)} for i in range(args.active)}
    want = expected_shares({t: (v["weight"], None) for t, v in active.items()})
    with Scenario(args, _tenants(args.configured, active), quantum_ms=QUANTUM_MS) as sc:
        for t in active:
            sc.start(t, args.warmup + args.window_s + 60, 2)
        time.sleep(args.warmup)
        used, _ = sc.window(args.window_s)
        for p in sc.workers.values():
            p.terminate()
    by = sum(used[t] for t in active)
    err, _cols = shares_line({t: used[t] for t in active}, want, by)
    verdict("4 shares", err <= 0.01, f"max error {err * 100:.2f} pp over {args.window_s:.0f} s "
            f"(target <= 1 pp; shares {min(want.values()):.2%} to {max(want.values()):.2%})")


SCENARIOS = {1: s1_idle, 2: s2_duty, 3: s3_duty_configured, 4: s4_active}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu0")
    ap.add_argument("--only", help="comma-separated scenario numbers")
    ap.add_argument("--configured", type=int, default=1000)
    ap.add_argument("--active", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="executor threads (0: all cores)")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--duty-s", type=float, default=10.0)
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--iters-per-ms", type=float, default=400.0)
    args = ap.parse_args()
    args.native = None          # fairness.Scenario's tenants: Python workers (see fairness --native)
    chosen = [int(x) for x in args.only.split(",")] if args.only else list(SCENARIOS)
    if any(n != 1 for n in chosen):
        calibrate(args)
    for n in chosen:
        try:
            SCENARIOS[n](args)
        except Exception as e:            # a scenario that cannot run is a failure, not a crash
            verdict(f"{n} {SCENARIOS[n].__name__}", False, f"{type(e).__name__}: {e}")
    passed = sum(fairness.RESULTS)
    print(f"{passed} passed, {len(fairness.RESULTS) - passed} failed")
    return 0 if passed == len(fairness.RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
