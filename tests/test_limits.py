"""The [broker] limits: each configurable, each refused with an error naming it, none letting
one tenant grow the broker's (or its executor's) tables without bound."""
from __future__ import annotations

import mmap
import time

import numpy as np
import pytest
import zmq
from kernels import COUNT, SAXPY, SPIN, VECADD

import kubecash.client as kc
from kubecash.broker import config as cfg
from kubecash.client import protocol as P

INC = r"""
extern "C" __global__ void inc(int* p) { p[0] += 1; }
"""


def test_limits_are_validated_in_the_quota_file():
    c = cfg.parse({"broker": {"max_sessions_per_tenant": 3, "max_queued_ops_per_session": 8}})
    assert c.broker.max_sessions_per_tenant == 3 and c.broker.max_queued_ops_per_session == 8
    assert cfg.BrokerSettings().max_handles_per_session == 65536
    for key in ("max_sessions_per_tenant", "max_handles_per_session", "max_modules_per_session",
                "max_module_bytes", "max_queued_ops_per_session", "max_message_bytes"):
        with pytest.raises(cfg.ConfigError, match=f"field '{key}'"):
            cfg.parse({"broker": {key: 0}}, "q.toml")


def test_sessions_per_tenant(broker_factory, raw_socket):
    b = broker_factory(max_sessions_per_tenant=3)
    opened = [b.connect("alice") for _ in range(3)]
    try:
        with pytest.raises(kc.CudaError, match="max_sessions_per_tenant is 3") as e:
            b.connect("alice")
        assert e.value.name == "CUDA_ERROR_NOT_PERMITTED"
        with b.connect("bob") as other:            # per tenant: bob is not affected
            assert other.device("cpu0").allocate(16).size == 16
        opened.pop().close()
        with b.connect("alice") as again:          # a slot freed by a close is usable
            assert again.device("cpu0").allocate(16).size == 16
        # A hello flood that never heartbeats holds at most the limit, and only until the
        # heartbeat timeout (1.5 s in the test broker): then a real client gets in again.
        opened.pop().close()
        sock = raw_socket(b.address("alice"))
        for i in range(200):
            sock.send(P.pack({"v": 1, "id": i + 1, "op": "hello"}))
        replies = [P.unpack(sock.recv()) for _ in range(200)]
        assert sum(r["ok"] for r in replies) == 2          # the limit 3 less the one still open
        assert all("max_sessions_per_tenant" in r["error"] for r in replies if not r["ok"])
        deadline = time.monotonic() + 15
        while True:
            try:
                with b.connect("alice") as s:
                    assert s.device("cpu0").allocate(16).size == 16
                break
            except kc.CudaError:
                assert time.monotonic() < deadline, "flooded sessions never expired"
                time.sleep(0.2)
    finally:
        for s in opened:
            s.close()


def test_handles_per_session(broker_factory):
    b = broker_factory(max_handles_per_session=6)
    with b.connect("alice") as s, b.connect("alice") as s2:
        dev = s.device("cpu0")
        mod = dev.load_module(VECADD)                 # 1
        k = mod.get_kernel("vadd")                    # 2
        for _ in range(5):                            # the same kernel: the same handle
            assert mod.get_kernel("vadd").handle == k.handle
        bufs = [dev.allocate(64), dev.allocate(64)]   # 4
        st = dev.create_stream()                      # 5
        ev = dev.create_event()                       # 6
        for make, what in [(lambda: dev.allocate(64), "an allocation"),
                           (dev.create_stream, "a stream"), (dev.create_event, "an event"),
                           (lambda: dev.allocate_host(4096), "a mapped host allocation"),
                           (lambda: dev.load_module(SAXPY), "a module")]:
            with pytest.raises(kc.OutOfMemoryError, match=f"cannot create {what}.*"
                               "max_handles_per_session is 6"):
                make()
        # nothing else changed, and another session has its own count
        dev.launch(k, (1,), (16,), [bufs[0], bufs[0], bufs[1], 16], stream=st)
        st.synchronize()
        assert s2.device("cpu0").create_stream().handle
        ev.close()
        dev.create_event()                            # one freed, one allowed again


def test_module_count_and_size(broker_factory):
    b = broker_factory(max_modules_per_session=2, max_module_bytes=4096)
    with b.connect("alice") as s:
        dev = s.device("cpu0")
        m1 = dev.load_module(VECADD)
        dev.load_module(SAXPY)
        with pytest.raises(kc.OutOfMemoryError, match="max_modules_per_session is 2"):
            dev.load_module(INC)
        m1.close()
        assert dev.load_module(INC).get_kernel("inc")
        big = VECADD + "// " + "x" * 5000 + "\n"
        with pytest.raises(kc.InvalidValueError, match=r"module source of \d+ bytes exceeds "
                           r"the broker's max_module_bytes \(4096\)"):
            dev.load_module(big)
        with pytest.raises(kc.InvalidValueError, match="max_module_bytes"):
            dev.load_module(image=b"\0" * 5000, kind="cubin")


def test_a_module_too_large_to_compile_is_refused_and_the_next_one_loads(session):
    """PTX past what a CPU device compiles at once (8 MiB; a 9 MiB fatbin such as CuPy's CUB
    holds more) is refused by name before it reaches the compile helper, which stays up: the
    helper cannot skip an oversize frame, and a confined executor cannot fork another."""
    dev = session.device("cpu0")
    ptx = (".version 8.0\n.target sm_80\n.address_size 64\n// " + "x" * (9 << 20) + "\n"
           ".visible .entry k(.param .u64 p) { ret; }\n").encode()
    with pytest.raises(kc.InvalidValueError, match=r"its ptx is \d+ bytes, more than the \d+ a CPU device compiles"):
        dev.load_module(image=ptx, kind="ptx")
    assert dev.load_module(VECADD).get_kernel("vadd")       # the helper still builds


def test_launch_dimensions_are_bounded(session):
    dev = session.device("cpu0")
    k = dev.load_module(VECADD).get_kernel("vadd")
    args = [b"\0" * 8] * 3 + [b"\0" * 4]
    for grid, block, why in [([2**31, 1, 1], [1, 1, 1], "grid"), ([1, 65536, 1], [1, 1, 1], "grid"),
                             ([1, 1, 1], [1, 1, 65], "block"), ([1, 1, 1], [1025, 1, 1], "block"),
                             ([-1, 1, 1], [1, 1, 1], "grid"), ([1, 1, 1], [2**63, 1, 1], "block")]:
        with pytest.raises(kc.InvalidValueError, match=why):
            dev.request("launch", function=k.handle, grid=grid, block=block, shared=0, stream=0,
                      args=args)
    with pytest.raises(kc.InvalidValueError, match="out of range"):   # past 64 bits: the protocol
        dev.request("launch", function=k.handle, grid=[1, 1, 1], block=[1, 1, 1], shared=2**40,
                  stream=0, args=args)


def test_queued_work_per_session(broker_factory):
    b = broker_factory(max_queued_ops_per_session=16)
    with b.connect("alice") as s:
        dev = s.device("cpu0")
        spin = dev.load_module(SPIN).get_kernel("spin")
        inc = dev.load_module(INC).get_kernel("inc")
        out, counter = dev.allocate(4), dev.allocate(4)
        counter.copy_from(np.zeros(1, np.int32))
        # The client library blocks before the executor's bound (like a full CUDA push
        # buffer): 200 launches on a 16-op queue all run, and no error appears.
        for _ in range(200):
            dev.launch(inc, (1,), (1,), [counter])
        dev.synchronize()
        assert counter.copy_to(np.empty(1, np.int32))[0] == 200
        # A client that does not hold back: behind a slow kernel, async work past the bound
        # is refused, and the error (naming the limit) comes at the next synchronization.
        ch = dev._ch
        s._send(ch, "launch", {"session": s.token, "function": spin.handle, "grid": [1, 1, 1],
                               "block": [1, 1, 1], "shared": 0, "stream": 0,
                               "args": [int(out.ptr).to_bytes(8, "little"),
                                        (200_000_000).to_bytes(4, "little")]}, asynchronous=True)
        for _ in range(40):
            s._send(ch, "launch", {"session": s.token, "function": inc.handle, "grid": [1, 1, 1],
                                   "block": [1, 1, 1], "shared": 0, "stream": 0,
                                   "args": [int(counter.ptr).to_bytes(8, "little")]},
                    asynchronous=True)
        with pytest.raises(kc.CudaError, match="max_queued_ops_per_session is 16") as e:
            dev.synchronize()
        assert e.value.name == "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"
        dev.synchronize()                           # reported once; the context is fine
        n = counter.copy_to(np.empty(1, np.int32))[0] - 200
        assert 1 <= n < 40, n                       # some ran, the refused ones did not


def test_message_size(broker_factory, raw_socket):
    limit = 128 << 10
    b = broker_factory(max_message_bytes=limit)
    with b.connect("alice") as s:
        dev = s.device("cpu0")
        buf = dev.allocate(1 << 20)
        buf.copy_from(b"z" * (1 << 20))             # big copies go through shared memory
        assert bytes(buf.copy_to()[-4:]) == b"zzzz"
        # The client refuses a request the executor would drop, naming the limit.
        with pytest.raises(kc.InvalidValueError, match=f"max_message_bytes \\({limit}\\)"):
            dev.load_module(VECADD + "//" + "x" * limit)
        # A raw frame past the limit is dropped by the executor's ZeroMQ with its connection
        # (no reply); it keeps serving everyone, that peer too once reconnected.
        ex = raw_socket(f"ipc://{P.executor_socket_path(b.runtime_dir, 'alice', 'cpu0')}")
        ex.setsockopt(zmq.RCVTIMEO, 1500)
        ex.send(P.pack({"v": 1, "id": 3, "op": "mem_info", "session": s.token,
                        "x": b"\0" * (limit + 1)}))
        with pytest.raises(zmq.Again):
            ex.recv()
        # The broker's own sockets (16 KiB at most) discard such a frame as it arrives and
        # answer with the limit; the connection stays usable.
        br = raw_socket(b.address("alice"))
        br.send(b"\x80" + b"\0" * (limit + 1))
        r = P.unpack(br.recv())
        assert not r["ok"] and f"{limit + 2} bytes exceeds" in r["error"] and "16384" in r["error"]
        br.send(P.pack({"v": 1, "id": 5, "op": "heartbeat", "session": s.token}))
        assert P.unpack(br.recv())["id"] == 5
        # Just under the limit: an answer (an error here, since it is not a valid request).
        ex2 = raw_socket(f"ipc://{P.executor_socket_path(b.runtime_dir, 'alice', 'cpu0')}")
        ex2.send(P.pack({"v": 1, "id": 4, "op": "mem_info", "session": s.token,
                         "x": b"\0" * (limit - 200)}))
        r = P.unpack(ex2.recv())
        assert r["id"] == 4 and not r["ok"] and "unknown field" in r["error"]
        assert dev.mem_info()[1] == 256 << 20
        assert b.alive()


def test_memory_quota_holds_exactly_at_its_boundary(broker_factory):
    b = broker_factory({"alice": {"memory": "1MiB"}, "bob": {"memory": "1MiB"}})
    with b.connect("alice") as s, b.connect("bob") as other:
        dev = s.device("cpu0")
        page = mmap.PAGESIZE                 # allocations are charged in whole pages
        assert dev.mem_info() == (1 << 20, 1 << 20)   # no staging segment in so small a quota
        keep = dev.allocate(1000)
        keep.copy_from(b"k" * 1000)
        big = dev.allocate((1 << 20) - 2 * page)
        with pytest.raises(kc.OutOfMemoryError) as e:
            dev.allocate(page + 1)           # one byte past the quota
        assert "limit 1048576 bytes" in str(e.value) and f"{(1 << 20) - page} in use" in str(e.value)
        assert f"of {page + 1} bytes (charged as {2 * page})" in str(e.value)
        last = dev.allocate(page)            # exactly at the quota: allowed
        assert dev.mem_info() == (0, 1 << 20)
        # Nothing else changed: the other allocations are intact, and bob is untouched.
        assert bytes(keep.copy_to()) == b"k" * 1000
        assert other.device("cpu0").allocate(1 << 20).size == 1 << 20
        last.close()
        big.close()
        assert dev.mem_info()[0] == (1 << 20) - page
        host = dev.allocate_host(4096)       # on a CPU device, mapped host memory counts too
        assert dev.mem_info()[0] == (1 << 20) - page - 4096
        host.close()


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


# -- everything a tenant holds counts (issue #13, R9 and R5) -------------------------------

GLOBALS = r"""
__device__ char big[SIZE];
extern "C" __global__ void touch(unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) big[i] = 1;
}
"""


def test_module_globals_and_allocation_granularity_count(broker_factory):
    """R9: a module's __device__ globals (512 MiB of them, fully touched, went unseen) and
    30,000 one-byte allocations (charged 30 KB) are memory the tenant holds."""
    b = broker_factory({"alice": {"memory": "64MiB"}, "bob": {"memory": "64MiB"}})
    with b.connect("alice") as s:
        d = s.device("cpu0")
        free0 = d.mem_info()[0]
        m = d.load_module(GLOBALS.replace("SIZE", "16u << 20"))
        d.launch(m.get_kernel("touch"), (64,), (256,), [np.uint32(16 << 20)])
        d.synchronize()
        free1 = d.mem_info()[0]
        assert 16 << 20 <= free0 - free1 < (16 << 20) + (1 << 20), (free0, free1)
        with pytest.raises(kc.OutOfMemoryError, match=r"module \(code, data and __device__ globals\)"):
            d.load_module(GLOBALS.replace("SIZE", "48u << 20"))    # more than is left
        assert d.mem_info()[0] == free1                            # the refusal held nothing
        m.close()
        d.synchronize()
        assert d.mem_info()[0] == free0                            # unloading gives it back
        tiny = [d.allocate(1) for _ in range(2000)]
        assert free0 - d.mem_info()[0] == 2000 * mmap.PAGESIZE     # a page each: what they take
        for t in tiny:
            t.close()
        d.synchronize()
        assert d.mem_info()[0] == free0
    with b.connect("bob") as s:                # bob's quota is his own
        assert s.device("cpu0").mem_info()[0] == free0


def test_the_staging_segment_counts_and_a_tiny_quota_still_copies(broker_factory):
    """R5: the staging segment is memory the session holds (on a CPU device, its quota); a
    quota too small to spare one gets none, and copies of any size go inline."""
    b = broker_factory({"alice": {"memory": "256MiB"}, "bob": {"memory": "4MiB"}})
    with b.connect("alice") as a, b.connect("bob") as bob:
        free, total = a.device("cpu0").mem_info()
        assert total - free == 32 << 20
        with b.connect("alice") as a2:          # each session its own, at most 1/8 of what is free
            assert free - a2.device("cpu0").mem_info()[0] == min(32 << 20, free // 8)
        d = bob.device("cpu0")
        assert d.mem_info() == (4 << 20, 4 << 20)
        data = np.random.default_rng(3).integers(0, 255, 3 << 20, dtype=np.uint8)
        buf = d.allocate(data.nbytes)
        buf.copy_from(data)                     # 3 MiB, far over the inline limit
        np.testing.assert_array_equal(buf.copy_to(np.empty_like(data)), data)
