"""Regressions found in review: each ran against a real broker and failed before its fix."""
from __future__ import annotations

import time

import numpy as np

import kubecash.client as kc
from kubecash.client import protocol as P

COUNT = r'''
extern "C" __global__ void inc(unsigned long long* c, int spin) {
    if (threadIdx.x == 0) { volatile int x = 0; for (int i = 0; i < spin; i++) x += i; atomicAdd(c, 1ULL); }
}
'''


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


def test_reopening_right_after_the_last_session_closed(broker):
    for _ in range(5):
        with broker.connect("alice") as s:
            s.device("cpu0").allocate(16)
        with kc.connect(broker.address("alice"), timeout=20) as s:
            t0 = time.monotonic()
            assert s.device("cpu0").allocate(16).size == 16
            assert time.monotonic() - t0 < 20


def test_a_repeated_open_is_answered_and_keeps_the_session(broker, raw_socket):
    sock = raw_socket(broker.address("alice"))
    sock.send(P.pack({"v": 1, "id": 1, "op": "hello"}))
    token = P.unpack(sock.recv())["session"]
    for rid in (2, 3):
        sock.send(P.pack({"v": 1, "id": rid, "op": "open_device", "session": token, "device": "cpu0"}))
    replies = {P.unpack(sock.recv())["id"]: True for _ in range(2)}
    assert replies == {2: True, 3: True}
    ex = raw_socket(f"ipc://{P.executor_socket_path(broker.runtime_dir, 'alice', 'cpu0')}")
    ex.send(P.pack({"v": 1, "id": 4, "op": "mem_alloc", "session": token, "size": 64}))
    assert P.unpack(ex.recv())["ok"] is True


def test_frees_queued_when_a_session_ends_still_free(broker_factory):
    b = broker_factory({"t": {"memory": "64MiB"}})
    with b.connect("t") as other:
        od = other.device("cpu0")
        with b.connect("t") as s:
            d = s.device("cpu0")
            k = d.load_module(COUNT).get_kernel("inc")
            c = d.allocate(8)
            big = d.allocate(32 << 20)
            d.launch(k, (64,), (1,), [c, 200000])             # keeps the queue busy
            d.submit("launch", function=k.handle, grid=[64, 1, 1], block=[1, 1, 1], shared=0,
                    stream=0, args=[c.ptr.to_bytes(8, "little"), (200000).to_bytes(4, "little")])
            s._send(d._conn(), "mem_free", {"session": s.token, "ptr": big.ptr})  # queued, unanswered
        deadline = time.monotonic() + 20
        while od.mem_info()[0] < (64 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert od.allocate(48 << 20).size == 48 << 20


def test_reload_removing_a_tenant_while_it_sends(broker_factory, raw_socket):
    from kubecash.broker.local import toml_dumps
    b = broker_factory({"alice": {}, "bob": {}})
    flood = raw_socket(b.address("bob"))
    for _ in range(2000):
        flood.send(P.pack({"v": 1, "id": 1, "op": "hello"}))
    with open(b.config_path, "w") as f:
        f.write(toml_dumps({"runtime_dir": b.runtime_dir, "heartbeat_interval_s": 0.25,
                            "heartbeat_timeout_s": 1.5, "metrics_address": "127.0.0.1:0"},
                           {"alice": {}}))
    with b.admin() as admin:
        assert admin.call("reload")["removed"] == ["bob"]
    time.sleep(0.3)
    assert b.alive()
    with b.connect("alice") as s:
        assert s.device("cpu0").allocate(16).size == 16


def test_the_kernel_cache_is_held_to_its_cap(broker_factory, tmp_path):
    import os
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in range(10):                       # ten old builds of 1 MiB each
        p = cache / f"{i:064x}.so"
        p.write_bytes(b"\0" * (1 << 20))
        os.utime(p, (1000 + i, 1000 + i))
    stale = cache / ".build-old"
    stale.mkdir()
    os.utime(stale, (1000, 1000))
    from conftest import BrokerProcess
    b = BrokerProcess({"t": {}}, str(cache), cache_max_bytes=4 << 20)
    try:
        deadline = time.monotonic() + 10
        while len(list(cache.glob("*.so"))) > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(p.name for p in cache.glob("*.so"))
        assert left == [f"{i:064x}.so" for i in (7, 8, 9)]      # the newest, within 80 % of the cap
        assert not stale.exists()
        with b.connect("t") as s:              # and kernels still build and run
            d = s.device("cpu0")
            k = d.load_module(COUNT).get_kernel("inc")
            c = d.allocate(8)
            c.copy_from(np.zeros(1, np.uint64))
            d.launch(k, (3,), (1,), [c, 1])
            assert int(c.copy_to(np.empty(1, np.uint64))[0]) == 3
    finally:
        b.stop()
