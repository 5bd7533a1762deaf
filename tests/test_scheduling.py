"""Time quotas against a real broker: behaviour with generous bounds (numbers: bench/fairness.py)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, SLOW, wait_for
from kernels import COUNT

import kubecash.client as kc

WORKER = os.path.join(ROOT, "examples", "tenant_worker.py")


def start_worker(broker, tenant: str, seconds: float, iters: int = 4000, wait: bool = False,
                 **extra) -> subprocess.Popen:
    """A tenant_worker.py client, ready (connected, its kernel compiled). With `wait`, it
    starts its --seconds of kernels on go(p), not at once."""
    argv = [sys.executable, WORKER, "--seconds", str(seconds), "--iters", str(iters),
            "--blocks", "8"] + (["--wait"] if wait else [])
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    p = subprocess.Popen(argv, env=dict(os.environ, KUBECASH_BROKER=broker.address(tenant)),
                         stdin=subprocess.PIPE if wait else None, stdout=subprocess.PIPE, text=True)
    assert json.loads(p.stdout.readline())["ready"]
    return p


def go(p: subprocess.Popen) -> None:
    p.stdin.write("go\n")
    p.stdin.flush()


def kernels(admin, tenant: str) -> int:
    return admin.call("status")["tenants"][tenant]["devices"]["cpu0"]["kernels"]


def finish(p: subprocess.Popen) -> dict:
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0
    r = json.loads(out.strip().splitlines()[-1])
    assert r["ok"], "the kernels computed a wrong result"
    return r


def used(admin, tenant: str) -> int:
    return admin.call("status")["tenants"][tenant]["devices"]["cpu0"]["used_ns"]


def window(admin, tenants, seconds: float) -> tuple[dict[str, float], float]:
    st0 = admin.call("status")
    time.sleep(seconds)
    st1 = admin.call("status")
    d = {t: (st1["tenants"][t]["devices"]["cpu0"]["used_ns"] - st0["tenants"][t]["devices"]["cpu0"]["used_ns"]) / 1e9
         for t in tenants}
    return d, st1["uptime_s"] - st0["uptime_s"]


def test_a_limit_caps_a_tenant_even_on_an_idle_device(broker_factory):
    b = broker_factory({"capped": {"limit": 0.2}})
    p = start_worker(b, "capped", 4)
    with b.admin() as admin:
        time.sleep(0.5)
        u, wall = window(admin, ["capped"], 2.5)
    finish(p)
    assert 0.1 < u["capped"] / wall < 0.3, u["capped"] / wall


def test_weights_divide_a_contended_device(broker_factory):
    b = broker_factory({"light": {"weight": 100}, "heavy": {"weight": 300}})
    # Both start together once both are ready: under qemu-user a client's start (an executor,
    # a compile) takes longer than the other's 8 s run. Measured once each has run kernels.
    ps = [start_worker(b, t, 8 if SLOW == 1 else 20, wait=True) for t in ("light", "heavy")]
    with b.admin() as admin:
        for p in ps:
            go(p)
        wait_for(lambda: all(kernels(admin, t) > 0 for t in ("light", "heavy")), 30 * SLOW,
                 "both tenants to run a kernel", interval=0.1)
        time.sleep(0.5)
        u, _ = window(admin, ["light", "heavy"], 2.5)
        # live change: equal weights now
        admin.call("set_quota", tenant="heavy", weight=100)
        time.sleep(0.3)
        u2, _ = window(admin, ["light", "heavy"], 1.5)
        st = admin.call("status")
    assert all(p.poll() is None for p in ps), "a worker ended before the measurement did"
    for p in ps:
        finish(p)
    share = u["light"] / (u["light"] + u["heavy"])
    assert 0.1 < share < 0.4, share
    share2 = u2["light"] / (u2["light"] + u2["heavy"])
    assert 0.3 < share2 < 0.7, share2
    assert st["tenants"]["heavy"]["devices"]["cpu0"]["weight"] == 100
    dev = st["tenants"]["light"]["devices"]["cpu0"]
    assert dev["kernels"] > 0 and dev["grants"] > 0 and set(dev["share"]) == {"1s", "10s", "60s"}


def test_a_lone_tenant_keeps_its_lease_and_hands_it_over_when_another_wants_it(broker_factory):
    """While no one else wants the device, the holder renews its lease at each quantum's end
    (charged, no hand-over: a few grants for seconds of kernels); once another tenant wants
    it, the holder releases at its quantum's end and the two share it."""
    b = broker_factory({"alone": {}, "late": {}})
    # Both ready before either runs: under qemu-user a client's start (an executor, a
    # compile) takes longer than a short run of the other's.
    p = start_worker(b, "alone", 8 if SLOW == 1 else 40, wait=True)
    late = start_worker(b, "late", 4 if SLOW == 1 else 15, wait=True)
    go(p)
    with b.admin() as admin:
        wait_for(lambda: kernels(admin, "alone") > 0, 30 * SLOW, "the first tenant to run", interval=0.1)
        dev0 = admin.call("status")["tenants"]["alone"]["devices"]["cpu0"]
        time.sleep(1.5)
        dev1 = admin.call("status")["tenants"]["alone"]["devices"]["cpu0"]
        q = admin.call("status")["quantum_ms"]
        quanta = (dev1["used_ns"] - dev0["used_ns"]) / (q * 1e6)
        assert quanta > 20, quanta                       # it ran many quanta's worth...
        assert dev1["grants"] - dev0["grants"] < quanta / 4, (dev0, dev1)   # ...on a few grants
        go(late)
        wait_for(lambda: kernels(admin, "late") > 0, 30 * SLOW, "the second tenant to run", interval=0.1)
        time.sleep(0.3)
        u, _ = window(admin, ["alone", "late"], 1.5)
    assert p.poll() is None and late.poll() is None, "a worker ended before the measurement did"
    finish(p)
    finish(late)
    share = u["late"] / (u["late"] + u["alone"])
    assert 0.3 < share < 0.7, share


def test_an_idle_tenant_never_blocks_others(broker_factory):
    b = broker_factory({"idle": {"weight": 10000}, "busy": {"weight": 1}})
    with b.connect("idle") as s:
        d = s.device("cpu0")
        d.allocate(1 << 20)                 # a live executor with nothing queued
        d.synchronize()
        p = start_worker(b, "busy", 3)
        with b.admin() as admin:
            time.sleep(0.5)
            u, wall = window(admin, ["idle", "busy"], 2)
        finish(p)
    assert u["idle"] < 0.05
    assert u["busy"] / wall > 0.5


def test_a_latency_tenant_goes_ahead_of_batch_work(broker_factory):
    b = broker_factory({"batch": {"class": "batch"}, "lat": {"class": "latency"}})
    # Batch kernels of about half a second each (64 short blocks) keep the device busy.
    p = start_worker(b, "batch", 8, iters=40_000, depth=2, blocks=64)
    with b.connect("lat") as s:
        dev = s.device("cpu0")
        out = dev.allocate(4 * 128)
        k = dev.load_module(
            'extern "C" __global__ void one(float* o) { o[threadIdx.x] += 1.0f; }').get_kernel("one")
        dev.synchronize()
        time.sleep(0.5)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            dev.launch(k, (1,), (128,), [out])
            dev.synchronize()
            times.append(time.perf_counter() - t0)
            time.sleep(0.05)
    with b.admin() as admin:
        st = admin.call("status")
    p.kill()
    p.communicate()
    batch = st["tenants"]["batch"]["devices"]["cpu0"]
    assert batch["kernels"] >= 1
    # Measured against the batch kernel's own length in this run (a loaded machine stretches
    # both): waiting for the batch kernel in flight would take half of one on average; the
    # latency tenant preempts it between blocks, 1/32 of one here.
    batch_kernel_s = batch["used_ns"] / 1e9 / batch["kernels"]
    assert statistics.median(times) < 0.25 * batch_kernel_s, (times, batch_kernel_s)


@pytest.mark.parametrize("fields, message", [
    ({"weight": 0}, "field 'weight'"),
    ({"limit": 0.00001}, "field 'limit'"),
    ({"class": "urgent"}, "field 'class'"),
])
def test_invalid_live_changes_are_refused_and_change_nothing(broker, fields, message):
    with broker.admin() as admin:
        with pytest.raises(kc.InvalidValueError) as e:
            admin.call("set_quota", tenant="alice", **fields)
        assert "tenant 'alice'" in str(e.value) and message in str(e.value)
        q = admin.call("status")["tenants"]["alice"]["devices"]["cpu0"]
        assert (q["weight"], q["limit"], q["class"]) == (100, None, "batch")
        with pytest.raises(kc.InvalidValueError, match="no tenant 'mallory'"):
            admin.call("set_quota", tenant="mallory", weight=5)


def test_a_suspended_kernel_resumes_and_never_reruns_blocks(broker_factory):
    """Preempted mid-grid, then resumed on a lease that is not preemptible any more."""
    b = broker_factory({"bt": {"class": "batch"}, "lt": {"class": "latency"}})
    with b.connect("lt") as ls, b.connect("bt") as bs, b.admin() as admin:
        ld, bd = ls.device("cpu0"), bs.device("cpu0")
        lc, bc = ld.allocate(8), bd.allocate(8)
        lc.copy_from(np.zeros(1, np.uint64))
        bc.copy_from(np.zeros(1, np.uint64))
        lk = ld.load_module(COUNT).get_kernel("inc")
        bk = bd.load_module(COUNT).get_kernel("inc")
        t0 = time.monotonic()
        bd.launch(bk, (200,), (1,), [bc, 20000])
        bd.synchronize()
        per_block = (time.monotonic() - t0) / 200
        grid = 5000
        spin = max(1, int(20000 * (0.8 / grid) / per_block))     # the grid: about 0.8 s
        bc.copy_from(np.zeros(1, np.uint64))
        bd.launch(bk, (grid,), (1,), [bc, spin])
        time.sleep(0.2)
        ld.launch(lk, (1,), (1,), [lc, spin * grid // 4])       # preempts the batch kernel
        time.sleep(0.05)
        admin.call("set_quota", tenant="lt", **{"class": "batch"})   # no latency tenant left
        ld.synchronize()
        bd.synchronize()
        assert int(bc.copy_to(np.empty(1, np.uint64))[0]) == grid
