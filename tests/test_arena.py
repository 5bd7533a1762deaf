"""A CPU device's memory is an arena the client maps (#17): the allocator, and copies done by
the client itself against a real broker, real executors, real kernels."""
from __future__ import annotations

import glob
import os
import signal
import socket
import time

import numpy as np
import pytest
from conftest import BrokerProcess, run_client
from kernels import SAXPY

import kubecash.client as kc
from kubecash.broker import arena as A

MiB = 1 << 20


# -- the allocator ----------------------------------------------------------------------------
def test_allocations_are_aligned_and_never_overlap():
    al = A.Allocator(1 << 30)
    rng = np.random.default_rng(0)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = list(live)[rng.integers(len(live))]
            assert al.free(off) is not None
            del live[off]
            continue
        size = int(rng.choice([1, 7, 255, 256, 300, 4095, 4096, 5000, 1 << 20]))
        off = al.alloc(size)
        assert off is not None and off % A.ALIGN == 0 and off % A.alignment(size) == 0
        live[off] = size
    spans = sorted((o, o + -(-s // A.ALIGN) * A.ALIGN) for o, s in live.items())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    # A small allocation never straddles a page: it touches no more pages than it is charged.
    assert all(o // A.PAGE == (o + s - 1) // A.PAGE for o, s in live.items() if s < A.PAGE)
    for off in list(live):
        al.free(off)
    assert al.free_ranges() == [(0, 1 << 30)], "everything freed coalesces back into one range"


def test_free_coalesces_and_full_is_none():
    al = A.Allocator(4 * A.PAGE)
    offs = [al.alloc(A.PAGE) for _ in range(4)]
    assert offs == [0, A.PAGE, 2 * A.PAGE, 3 * A.PAGE] and al.alloc(1) is None
    assert al.free(A.PAGE) == (A.PAGE, 2 * A.PAGE)
    assert al.free(2 * A.PAGE) == (A.PAGE, 3 * A.PAGE)       # merged with the one before
    assert al.free(12345) is None                            # not an allocation: nothing changes
    assert al.alloc(2 * A.PAGE) == A.PAGE                    # the merged hole fits it
    assert al.free(0) == (0, A.PAGE) and al.free(A.PAGE) == (0, 3 * A.PAGE)


def test_arena_size_is_address_space_only():
    assert A.arena_size(1) == A.ARENA_MIN
    assert A.arena_size(100 << 30) == 400 << 30
    assert A.arena_size(1 << 50) == A.ARENA_MAX


# -- against a broker ---------------------------------------------------------------------------
def _arena_files(b, tenant="alice") -> list[str]:
    return glob.glob(os.path.join(b.runtime_dir, "tenants", tenant, "shm", "*.arena"))


def _fs_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_copies_of_every_size_and_offset_round_trip(broker):
    with broker.connect("alice") as s:
        d = s.device("cpu0")
        rng = np.random.default_rng(3)
        with d.allocate(16 * MiB + 3) as buf:
            assert d._arena is not None, "a CPU device's memory is mapped here"
            for n, off in ((1, 0), (1, 16 * MiB + 2), (3, 1), (4095, 4097), (65537, 12345),
                           (16 * MiB, 3), (16 * MiB + 3, 0)):
                data = rng.integers(0, 256, n, dtype=np.uint8)
                buf.copy_from(data, offset=off)
                back = buf.copy_to(np.empty(n, np.uint8), offset=off)
                assert np.array_equal(back, data), (n, off)
            with pytest.raises(ValueError):                   # the client's own bounds
                buf.copy_from(b"xx", offset=16 * MiB + 2)
        with d.allocate(4096) as a, d.allocate(4096) as b2:
            # A range across two allocations goes to the executor, which refuses it.
            with pytest.raises(kc.CudaError, match="runs past the end|not in any allocation"):
                d.write(a.ptr + 4000, memoryview(bytes(200)))
            with pytest.raises(kc.CudaError, match="runs past the end|not in any allocation"):
                d.read(memoryview(bytearray(200)), b2.ptr + 4000)
        freed = d.allocate(4096)
        ptr = freed.ptr
        freed.close()
        with pytest.raises(kc.CudaError):                    # freed: the executor says no
            d.write(ptr, memoryview(bytes(64 * 1024)))


def test_a_copy_after_queued_kernels_sees_their_results(broker):
    with broker.connect("alice") as s:
        d = s.device("cpu0")
        n = 1 << 22
        x = np.ones(n, np.float32)
        k = d.load_module(SAXPY).get_kernel("saxpy")
        st = d.create_stream()
        with d.allocate(4 * n) as dx, d.allocate(4 * n) as dy:
            dx.copy_from(x)
            dy.copy_from(np.zeros(n, np.float32))
            for _ in range(5):                                # queued, not waited for
                d.launch(k, ((n + 255) // 256,), (256,), [np.float32(2), dx, dy, np.uint64(n)])
            np.testing.assert_array_equal(dy.copy_to(np.empty(n, np.float32)), np.full(n, 10, np.float32))
            for _ in range(3):
                d.launch(k, ((n + 255) // 256,), (256,), [np.float32(1), dx, dy, np.uint64(n)], stream=st)
            out = dy.copy_to(np.empty(n, np.float32), stream=st)
            np.testing.assert_array_equal(out, np.full(n, 13, np.float32))


def test_quota_is_bytes_allocated_and_freed_pages_go_back(broker_factory):
    b = broker_factory({"alice": {"memory": "64MiB"}})
    shm = os.path.join(b.runtime_dir, "tenants", "alice")
    with b.connect("alice") as s:
        d = s.device("cpu0")
        free, _ = d.mem_info()
        assert free % 4096 == 0
        with pytest.raises(kc.OutOfMemoryError):
            d.allocate(free + 1)                      # one byte more: a page more than is left
        before = _fs_used(shm)
        big = d.allocate(free)                        # every byte of it
        with pytest.raises(kc.OutOfMemoryError):
            d.allocate(1)
        big.copy_from(np.full(free, 7, np.uint8))
        assert _fs_used(shm) >= before + free - MiB, "allocated memory is backed in the tenant's fs"
        big.close()
        d.synchronize()
        assert _fs_used(shm) <= before + MiB, "freed pages are returned to the file system"
        assert d.mem_info()[0] == free
        d.allocate(free).close()


def test_the_arena_is_the_tenants_alone_and_goes_with_its_executor(kernel_cache):
    broker = BrokerProcess({"alice": {"memory": "256MiB"}, "bob": {"memory": "256MiB"}}, kernel_cache)
    try:
        _arena_lifetime(broker)
    finally:
        broker.stop()
    assert not _arena_files(broker) and not _arena_files(broker, "bob"), "a clean exit unlinks it"


def _arena_lifetime(broker) -> None:
    with broker.connect("alice") as s, broker.connect("bob") as t:
        s.device("cpu0").allocate(16).close()
        t.device("cpu0").allocate(16).close()
        (arena,), (bob_arena,) = _arena_files(broker), _arena_files(broker, "bob")
        st = os.stat(arena)
        assert st.st_mode & 0o777 == 0o600
        assert os.geteuid() != 0 or st.st_uid != os.stat(bob_arena).st_uid, "tenants' uids differ"
        if os.geteuid() == 0:
            pid = os.fork()
            if pid == 0:                              # bob's uid, as his container has it
                try:
                    os.setgid(os.stat(bob_arena).st_gid)
                    os.setuid(os.stat(bob_arena).st_uid)
                    os.close(os.open(arena, os.O_RDWR))
                    os._exit(1)
                except PermissionError:
                    os._exit(0)
                except BaseException:
                    os._exit(2)
            assert os.waitpid(pid, 0)[1] == 0, "bob's uid could open alice's arena"
        executor_pid = int(os.path.basename(arena).split("-")[1])
    os.kill(executor_pid, signal.SIGKILL)             # a crash: the broker removes the file
    deadline = time.monotonic() + 10
    while _arena_files(broker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _arena_files(broker)
    with broker.connect("alice") as s:                # a new executor, a new arena
        with s.device("cpu0").allocate(16) as buf:
            buf.copy_from(b"x" * 16)
            assert bytes(buf.copy_to()) == b"x" * 16
    assert broker.alive()


# -- what a tenant can do to its own arena and directory (#17, an attacker's review) ----------
def test_an_executor_never_makes_its_files_through_a_symlink_where_shm_was(tmp_path, kernel_cache):
    """A GPU executor runs as root with the host's view (only CPU executors are confined), and
    the tenant owns its directory: it may swap shm/ for a symlink at any time after the
    executor started. The staging segment, mapped host memory and the arena are then never
    made (by root, backed: a full disk of the node's, files no broker clears) in the directory
    it points to. A real Executor, in this process: unconfined, as a GPU executor is."""
    from kubecash.broker.executor.service import Executor
    from kubecash.broker.executor.state import SessionState
    from kubecash.client.errors import CudaError
    runtime = tmp_path / "run"
    tdir = runtime / "tenants" / "alice"
    (tdir / "shm").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    ctl, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lease, lease_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = {"name": "cpu0", "kind": "cpu", "index": 0, "total_memory": 1 << 30, "cores": 1}
    ex = Executor("alice", device, str(runtime), ctl_theirs.detach(), lease_theirs.detach(),
                  256 * MiB, 1, kernel_cache, sandbox=False)
    s = SessionState(b"t" * 16)
    try:
        os.rename(tdir / "shm", tdir / "shm-old")       # the tenant's doing, after the start
        os.symlink(victim, tdir / "shm")
        for op, msg in (("attach", {}), ("host_alloc", {"size": 4096})):
            try:
                getattr(ex, "op_" + op)(s, msg, b"client")
            except CudaError:
                pass                                     # an error for the tenant is fine
        ex._arena()
        assert os.listdir(victim) == [], "files made through the tenant's symlink"
    finally:
        ex._release(s)
        ex.backend.close()
        ex.sock.close()
        ex.ctl.close()
        ex.ctx.term()
        ctl.close()
        lease.close()


def _as_owner(path: str, fn) -> int:
    """Run fn(path) in a child as the file's owner (the tenant's uid: its containers'), as root
    can; else as ourselves (a broker that is not root runs executors as its own uid). Its exit
    status: 0 done, 1 refused, 2 anything else."""
    st = os.stat(path)
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(st.st_gid)
                os.setuid(st.st_uid)
            fn(path)
            os._exit(0)
        except PermissionError:
            os._exit(1)
        except BaseException:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_tenant_that_truncates_its_arena_ends_its_own_executor_only(broker):
    """The arena is the tenant's file (its uid owns it, so that its containers map it), so the
    tenant can shrink it or punch holes in it: a file shared by name cannot be sealed. Its
    executor touching a page past the new end gets SIGBUS and ends; its sessions hear
    ILLEGAL_ADDRESS saying so. Another tenant's work on the same device, the broker, and the
    tenant's next session are not disturbed."""
    n = 1 << 16
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        buf = da.allocate(MiB)
        buf.copy_from(bytes(MiB))
        k = db.load_module(SAXPY).get_kernel("saxpy")
        bx, by = db.allocate(4 * n), db.allocate(4 * n)
        bx.copy_from(np.ones(n, np.float32))
        by.copy_from(np.zeros(n, np.float32))
        (arena,) = _arena_files(broker)
        assert _as_owner(arena, lambda p: os.truncate(p, 0)) == 0, "the tenant's uid may truncate it"
        # (alice's own mapping here now faults too: only the executor touches it from now on)
        with pytest.raises(kc.LaunchFailedError) as e:
            buf.fill(1)                                  # a memset, run by the executor
            da.synchronize()
        assert e.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS" and "SIGBUS" in str(e.value), e.value
        assert "truncated" in str(e.value), "the tenant hears what it did"
        db.launch(k, (n // 256,), (256,), [np.float32(3), bx, by, np.uint64(n)])
        np.testing.assert_array_equal(by.copy_to(np.empty(n, np.float32)), np.full(n, 3, np.float32))
    with broker.connect("alice") as fresh:               # a new executor, a new arena
        with fresh.device("cpu0").allocate(16) as x:
            x.copy_from(b"y" * 16)
            assert bytes(x.copy_to()) == b"y" * 16
    assert broker.alive()


STRAY_WRITER = """
    import kubecash.client as kc
    s = kc.connect()
    d = s.device("cpu0")
    d.allocate(4096).copy_from(b"x" * 4096)         # the arena is mapped here now
    print("mapped", flush=True)
    chunk = b"\\1" * (1 << 20)
    for i in range(1 << 10):                         # 1 GiB past anything allocated
        d._arena[(1 << 30) + (i << 20): (1 << 30) + ((i + 1) << 20)] = chunk
    print("wrote all of it", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a tenant's directory has a file system of its own "
                    "only under a root broker")
def test_writes_to_unallocated_arena_pages_are_bounded_by_the_tenants_own_file_system(broker_factory):
    """A client may write anywhere in its mapping of the arena, allocated or not: the pages it
    touches are its tenant's file system's (its quota plus a little), not the node's. Past that
    the writer itself faults; memory already allocated stays backed and intact, and other
    tenants do not notice."""
    from kubecash.broker import confine
    b = broker_factory({"alice": {"memory": "64MiB"}, "bob": {"memory": "64MiB"}})
    tdir = os.path.join(b.runtime_dir, "tenants", "alice")
    with b.connect("alice") as hold:
        d = hold.device("cpu0")
        if not confine.is_tenant_fs(tdir):
            pytest.skip("no tenant file system here (the mount failed): the runtime's would fill")
        kept = d.allocate(8 * MiB)
        kept.copy_from(np.full(8 * MiB, 5, np.uint8))
        p = run_client(STRAY_WRITER, b.address("alice"))
        out, err = p.communicate(timeout=120)
        assert out.startswith("mapped") and "wrote all" not in out, (out, err)
        assert p.returncode == -signal.SIGBUS, (p.returncode, err)
        assert _fs_used(tdir) <= confine.tenant_fs_size(tdir)
        with b.connect("bob") as other:
            with other.device("cpu0").allocate(32 * MiB) as x:
                x.fill(7)
                assert bytes(x.copy_to(np.empty(16, np.uint8))) == b"\7" * 16
        data = d.request("memcpy_dtoh", src=kept.ptr + 8 * MiB - 64, size=64)["data"]
        assert data == b"\5" * 64, "an allocation's pages stay backed"
    assert b.alive()
