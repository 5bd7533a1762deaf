"""Faults: a killed client, a killed executor, a kernel that never ends, a killed broker.
Each hits only what it must; the times measured are printed (run with -s to see them)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import BrokerProcess, run_client, wait_for
from kernels import COUNT, SEGFAULT, SPIN, VECADD

import kubecash.client as kc

FOREVER = r"""
extern "C" __global__ void forever(volatile int* flag) { while (flag[0] == 0) { } }
"""
TINY = r"""
extern "C" __global__ void tiny(int* p) { p[threadIdx.x] += 1; }
"""




def _alice_cpu0(admin) -> dict:
    return admin.call("status")["tenants"]["alice"]["devices"]["cpu0"]


HOLDER = """
    import sys, kubecash.client as kc
    s = kc.connect()
    d = s.device("cpu0")
    bufs = [d.allocate(16 << 20) for _ in range(4)]
    for b in bufs:
        b.fill(7)
    d.synchronize()
    print("allocated", flush=True)
    sys.stdin.read()          # hold everything until killed
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dead_client_memory_and_executor_are_reclaimed(broker_factory, how):
    """A killed client's connection closes: its session ends at once. A stopped one keeps its
    connection but stops heartbeating: its session ends at the heartbeat timeout."""
    interval, timeout = (1.0, 5.0) if how == "SIGKILL" else (0.25, 1.5)
    b = broker_factory(heartbeat_interval_s=interval, heartbeat_timeout_s=timeout)
    p = run_client(HOLDER, b.address("alice"), stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "allocated"
        with b.admin() as admin:
            # 64 MiB allocated, plus the session's 32 MiB staging segment (it counts too)
            wait_for(lambda: _alice_cpu0(admin)["memory_used"] == 96 << 20, 10, "the allocations")
            pid = _alice_cpu0(admin)["executor_pid"]
            t0 = time.monotonic()
            p.send_signal(getattr(signal, how))
            wait_for(lambda: _alice_cpu0(admin)["memory_used"] == 0 and
                     admin.call("status")["tenants"]["alice"]["sessions"] == 0, timeout + 20,
                     "the session to end and its memory to be freed")
            freed = time.monotonic() - t0
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, "the executor to exit")
            gone = time.monotonic() - t0
        print(f"\n[client {how}, heartbeat {interval:g}/{timeout:g} s] memory freed after "
              f"{freed:.2f} s, executor exited after {gone:.2f} s")
        if how == "SIGKILL":
            assert freed < timeout - interval, freed        # not waiting for the heartbeat
        else:
            assert timeout - interval - 0.2 <= freed < timeout + 10, freed
        with b.connect("bob") as other:            # nothing else was disturbed
            assert other.device("cpu0").allocate(16).size == 16
    finally:
        for f in (p.stdout, p.stderr, p.stdin):
            f.close()
        if p.poll() is None:
            p.kill()
            p.wait()


DIES_BEFORE_UNLINKING_STAGING = """
    import os, signal
    import kubecash.client.device as S
    real = os.unlink
    def unlink(path, *a, **k):
        if path.endswith(".staging"):                 # stopped (then killed) between attach and unlink
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(path, *a, **k)
    S.os.unlink = unlink
    import kubecash.client as kc
    kc.connect().device("cpu0").allocate(16)
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_client_killed_before_unlinking_its_staging_segment_leaves_no_file(broker):
    """The executor lives on (another session): the dead session's segment name must go
    when its session ends, not when the executor does (found by bench/soak.py's design)."""
    with broker.connect("alice") as keep:
        keep.device("cpu0").allocate(16)
        shm = os.path.join(broker.runtime_dir, "tenants", "alice", "shm")
        p = run_client(DIES_BEFORE_UNLINKING_STAGING, broker.address("alice"))
        wait_for(lambda: _stopped(p.pid), 60, "the client to stop before unlinking its segment")
        def segments() -> list[str]:                   # the arena stays with its executor
            return [n for n in os.listdir(shm) if not n.endswith(".arena")]
        assert len(segments()) == 1                    # the client's staging segment
        p.kill()                                       # its connection closes: the session ends
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        with broker.admin() as admin:
            wait_for(lambda: admin.call("status")["tenants"]["alice"]["sessions"] == 1, 20,
                     "the dead session to end")
        wait_for(lambda: not segments(), 10, "its segment to be removed")


def test_executor_sigkill_fails_only_that_tenants_sessions(broker):
    with broker.connect("alice") as a1, broker.connect("alice") as a2, broker.connect("bob") as b:
        d1, d2, db = a1.device("cpu0"), a2.device("cpu0"), b.device("cpu0")
        d1.allocate(16)
        d2.allocate(16)
        n = 1024
        x = np.arange(n, dtype=np.float32)
        bx, by = db.allocate(x.nbytes), db.allocate(x.nbytes)
        bx.copy_from(x)
        kb = db.load_module(VECADD).get_kernel("vadd")
        bob_pid = b.status()["devices"]["cpu0"]["pid"]
        pid = a1.status()["devices"]["cpu0"]["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for d in (d1, d2):               # every session of alice on that device: sticky
            err = wait_for(lambda d=d: _error_of(d.mem_info), 15, "alice's sessions to see it")
            assert isinstance(err, kc.LaunchFailedError) and "killed by SIGKILL" in str(err)
            assert "alice" in str(err)
            with pytest.raises(kc.LaunchFailedError):
                d.allocate(16)
        print(f"\n[executor SIGKILL] sessions failed after {time.monotonic() - t0:.2f} s")
        db.launch(kb, (n // 256,), (256,), [bx, bx, by, n])
        np.testing.assert_array_equal(by.copy_to(np.empty(n, np.float32)), 2 * x)
        assert b.status()["devices"]["cpu0"]["pid"] == bob_pid
    with broker.connect("alice") as fresh:            # a new session gets a new executor
        assert fresh.device("cpu0").allocate(16).size == 16
        assert fresh.status()["devices"]["cpu0"]["pid"] != pid


def _error_of(fn):
    try:
        fn()
    except kc.KubecashError as e:
        return e
    return None


def test_a_kernel_that_never_ends_is_ended_by_max_kernel_seconds(broker_factory):
    b = broker_factory({"alice": {"memory": "64MiB", "max_kernel_seconds": 1},
                        "bob": {"memory": "64MiB"}})
    with b.connect("alice") as a, b.connect("bob") as o:
        da, do = a.device("cpu0"), o.device("cpu0")
        spin = da.load_module(SPIN).get_kernel("spin")
        out = da.allocate(4)
        out.copy_from(np.zeros(1, np.float32))
        da.launch(spin, (1,), (1,), [out, 20_000_000])   # a short kernel under the bound: fine
        da.synchronize()
        flag = da.allocate(4)
        flag.copy_from(np.zeros(1, np.int32))
        k = da.load_module(FOREVER).get_kernel("forever")
        tiny = do.load_module(TINY).get_kernel("tiny")
        cnt = do.allocate(4)
        cnt.copy_from(np.zeros(1, np.int32))
        pid = a.status()["devices"]["cpu0"]["pid"]
        t0 = time.monotonic()
        da.launch(k, (1,), (1,), [flag])
        ev = da.create_event()
        ev.record()
        do.launch(tiny, (1,), (1,), [cnt])             # bob waits for the device meanwhile
        # polled (not a blocking synchronize), so that a missing bound fails, not hangs
        err = wait_for(lambda: _error_of(ev.query), 20, "the kernel to be ended")
        took = time.monotonic() - t0
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        assert type(err) is type(e.value)
        assert e.value.name == "CUDA_ERROR_LAUNCH_TIMEOUT"
        assert "max_kernel_seconds = 1 s" in str(e.value) and "alice" in str(e.value)
        with pytest.raises(kc.LaunchFailedError):       # sticky
            da.allocate(16)
        do.synchronize()
        bob_done = time.monotonic() - t0
        assert cnt.copy_to(np.empty(1, np.int32))[0] == 1
        print(f"\n[max_kernel_seconds=1] kernel ended after {took:.2f} s; bob's queued kernel "
              f"ran after {bob_done:.2f} s")
        assert 1.0 <= took < 10, took
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the executor to be gone")


def test_max_kernel_seconds_counts_a_kernel_run_in_preempted_slices(broker_factory):
    """A batch kernel sliced by a latency tenant's preemptions still hits the bound: its
    time carries across leases (each lease alone stays short)."""
    b = broker_factory({"alice": {"memory": "64MiB", "max_kernel_seconds": 1},
                        "bob": {"memory": "64MiB", "class": "latency"}}, executor_threads=1)
    with b.connect("alice") as a, b.connect("bob") as o:
        da, do = a.device("cpu0"), o.device("cpu0")
        spin = da.load_module(SPIN).get_kernel("spin")
        out = da.allocate(4)
        tiny = do.load_module(TINY).get_kernel("tiny")
        cnt = do.allocate(4)
        cnt.copy_from(np.zeros(1, np.int32))
        stop = threading.Event()
        bob_kernels = [0]

        def latency_load():              # bob keeps wanting the device: alice is preempted
            while not stop.is_set():
                do.launch(tiny, (1,), (1,), [cnt])
                do.synchronize()
                bob_kernels[0] += 1
                time.sleep(0.002)
        th = threading.Thread(target=latency_load, daemon=True)
        th.start()
        try:
            wait_for(lambda: bob_kernels[0] > 5, 10, "bob's kernels")
            t0 = time.monotonic()
            # 2^31-1 blocks of ~1 ms each: never ends in practice, runs in slices
            da.launch(spin, (2**31 - 1,), (1,), [out, 300_000])
            ev = da.create_event()
            ev.record()
            wait_for(lambda: _error_of(ev.query), 30, "the sliced kernel to be ended")
            took = time.monotonic() - t0
            with pytest.raises(kc.LaunchFailedError) as e:
                da.synchronize()
        finally:
            stop.set()
            th.join(10)
        assert e.value.name == "CUDA_ERROR_LAUNCH_TIMEOUT" and "max_kernel_seconds" in str(e.value)
        print(f"\n[max_kernel_seconds=1, sliced] kernel ended after {took:.2f} s wall, "
              f"bob ran {bob_kernels[0]} kernels")
        assert 1.0 <= took < 20, took
        assert bob_kernels[0] > 10 and not th.is_alive()
        assert do.mem_info()[1] == 64 << 20           # bob's session is fine


def test_broker_sigkill_and_restart(kernel_cache):
    b = BrokerProcess({"alice": {}, "bob": {}}, kernel_cache)
    b2 = None
    try:
        s = b.connect("alice")
        d = s.device("cpu0")
        d.allocate(4096)
        host = d.allocate_host(4096)                   # a shared-memory file while it runs
        pid = s.status()["devices"]["cpu0"]["pid"]
        shm = os.path.join(b.runtime_dir, "tenants", "alice", "shm")
        stale = os.path.join(shm, "cpu0-stale.host")   # one it never got to remove
        with open(stale, "wb") as f:
            f.write(b"x")
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        err = wait_for(lambda: _error_of(d.mem_info) or _error_of(s.status), 20,
                       "the client to notice")
        noticed = time.monotonic() - t0
        assert isinstance(err, (kc.BrokerUnavailable, kc.LaunchFailedError)), err
        assert "broker" in str(err) or "executor" in str(err), err
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the executor to die with it")
        host.close()
        s.close()
        t1 = time.monotonic()
        b2 = BrokerProcess({"alice": {}, "bob": {}}, kernel_cache, runtime_dir=b.runtime_dir)
        # (LocalBroker returns once the sockets exist: the old ones still do, so wait)
        wait_for(lambda: not os.path.exists(stale), 20, "the new broker to clear leftovers")
        assert not os.listdir(shm), os.listdir(shm)
        with b2.connect("alice") as s2:                # the same address serves again
            restarted = time.monotonic() - t1
            d2 = s2.device("cpu0")
            buf = d2.allocate(16)
            buf.copy_from(b"0123456789abcdef")
            assert bytes(buf.copy_to()) == b"0123456789abcdef"
            assert s2.status()["devices"]["cpu0"]["pid"] != pid
        print(f"\n[broker SIGKILL] client error after {noticed:.2f} s ({type(err).__name__}); "
              f"new broker serving after {restarted:.2f} s")
    finally:
        if b2 is not None:
            b2.stop()
        b.stop()


def test_a_session_dropped_unclosed_after_its_broker_died_is_collected_without_hanging(kernel_cache):
    """The collector takes such a session, its sockets and (once) its own ZeroMQ context in one
    cycle. The context's finalizer found no sockets left to close and waited for them in
    term() forever: a process hung in whatever line happened to trigger the collection."""
    b = BrokerProcess({"alice": {}}, kernel_cache)
    try:
        p = run_client("""
            import gc, sys, time, kubecash.client as kc
            s = kc.connect()
            d = s.device("cpu0")
            buf = d.allocate(4096)
            print("connected", flush=True)
            sys.stdin.readline()                      # the broker is killed meanwhile
            deadline = time.monotonic() + 20
            while True:
                try:
                    d.mem_info()
                except kc.KubecashError as e:
                    print("error:", type(e).__name__, flush=True)
                    break
                if time.monotonic() > deadline:
                    sys.exit("the broker's death went unnoticed")
                time.sleep(0.1)
            del s, d, buf                             # dropped, never closed
            gc.collect()
            print("collected", flush=True)
        """, b.address("alice"), stdin=subprocess.PIPE)
        assert p.stdout.readline().strip() == "connected", p.stderr.read()
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        p.stdin.write("\n")
        p.stdin.flush()
        try:
            out, err = p.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"the client hung collecting its dropped session; it printed {out!r}")
        assert p.returncode == 0, err
        assert out.splitlines()[-1] == "collected", out
    finally:
        b.stop()


def test_a_briefly_stopped_executor_loses_no_control_message(broker_factory):
    """The broker's control messages to an executor go on a socketpair whose buffer holds a
    few hundred; past that they wait in the broker (its loop never blocks) until the executor
    reads again. An executor that is only busy, here stopped while 1000 quota changes and a
    new session's open queue up for it, gets them all in order and is not ended."""
    b = broker_factory({"alice": {"memory": "256MiB"}})
    admin = b.admin()
    with b.connect("alice") as first:
        d = first.device("cpu0")
        d.allocate(16)
        pid = first.status()["devices"]["cpu0"]["pid"]
        opened: list = []
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(1000):
                admin.call("set_quota", tenant="alice", memory=(200 << 20) + i * 4096)
            def open_late():
                s2 = b.connect("alice")
                opened.append(s2)
                s2.device("cpu0").mem_info()   # the open goes to the executor: session_add
            late = threading.Thread(target=open_late)
            late.start()
            time.sleep(1)                   # its open waits behind the quota changes
        finally:
            os.kill(pid, signal.SIGCONT)
        late.join(60)
        assert opened, "the session opened while the executor was stopped did not open"
        with opened[0] as s2:
            assert s2.device("cpu0").mem_info()[1] == (200 << 20) + 999 * 4096   # the last one
        assert d.mem_info()[1] == (200 << 20) + 999 * 4096
        assert first.status()["devices"]["cpu0"]["pid"] == pid, "the executor was replaced"
    assert "does not read its control channel" not in b.log()


def test_broker_stop_reaches_an_executor_whose_control_channel_was_full(kernel_cache):
    """The broker's "shutdown" to an executor can wait behind a full control buffer; while
    stopping, the broker keeps sending, so the executor exits on its own well before the
    5 s after which the broker kills it."""
    b = BrokerProcess({"alice": {}}, kernel_cache)
    try:
        admin = b.admin()
        s = b.connect("alice")
        s.device("cpu0").allocate(16)
        pid = s.status()["devices"]["cpu0"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(1000):            # more than the socketpair's buffer holds
                admin.call("set_quota", tenant="alice", memory=(200 << 20) + i * 4096)
        finally:
            threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        b.proc.wait(30)
        took = time.monotonic() - t0
        s.close()
        print(f"\n[broker stop behind a full control buffer] {took:.2f} s")
        assert b.proc.returncode == 0
        assert took < 4.0, f"the broker took {took:.1f} s to stop: it had to kill the executor"
    finally:
        b.stop()


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


def test_a_segfaulting_kernel_ends_only_its_tenants_executor(broker):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        n = 4096
        x = np.arange(n, dtype=np.float32)
        bx, by = db.allocate(x.nbytes), db.allocate(x.nbytes)
        bx.copy_from(x)
        kb = db.load_module(VECADD).get_kernel("vadd")
        crash = da.load_module(SEGFAULT).get_kernel("crash")
        buf = da.allocate(16)
        da.launch(crash, (1,), (1,), [buf])
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        assert e.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"
        assert "SIGSEGV" in str(e.value) and "alice" in str(e.value)
        with pytest.raises(kc.LaunchFailedError):     # sticky for this session
            da.allocate(16)
        db.launch(kb, (n // 256,), (256,), [bx, bx, by, n])
        np.testing.assert_array_equal(by.copy_to(np.empty(n, np.float32)), 2 * x)
    with broker.connect("alice") as fresh:            # a new session gets a new executor
        assert fresh.device("cpu0").allocate(16).size == 16
