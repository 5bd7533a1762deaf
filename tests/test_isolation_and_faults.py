"""Quotas, isolation and faults: each tenant is alone with its own memory and executor."""
from __future__ import annotations

import numpy as np
import pytest
from kernels import SEGFAULT, VECADD

import kubecash.client as kc


def test_memory_quota_holds_exactly_at_its_boundary(broker_factory):
    b = broker_factory({"alice": {"memory": "1MiB"}, "bob": {"memory": "1MiB"}})
    with b.connect("alice") as s, b.connect("bob") as other:
        dev = s.device("cpu0")
        keep = dev.allocate(1000)
        keep.copy_from(b"k" * 1000)
        big = dev.allocate((1 << 20) - 1000 - 1)
        with pytest.raises(kc.OutOfMemoryError) as e:
            dev.allocate(2)                  # one byte past the quota
        assert "limit 1048576 bytes" in str(e.value) and "1048575 in use" in str(e.value)
        last = dev.allocate(1)               # exactly at the quota: allowed
        assert dev.mem_info() == (0, 1 << 20)
        # Nothing else changed: the other allocations are intact, and bob is untouched.
        assert bytes(keep.copy_to()) == b"k" * 1000
        assert other.device("cpu0").allocate(1 << 20).size == 1 << 20
        last.close()
        big.close()
        assert dev.mem_info()[0] == (1 << 20) - 1000
        host = dev.allocate_host(4096)       # on a CPU device, mapped host memory counts too
        assert dev.mem_info()[0] == (1 << 20) - 1000 - 4096
        host.close()


def test_handles_of_another_session_or_tenant_are_refused(broker):
    with broker.connect("alice") as a, broker.connect("alice") as a2, broker.connect("bob") as b:
        da, da2, db = a.device("cpu0"), a2.device("cpu0"), b.device("cpu0")
        buf = da.allocate(4096)
        mod = da.load_module(VECADD)
        k = mod.get_kernel("vadd")
        s = da.create_stream()
        ev = da.create_event()
        for dev in (da2, db):
            with pytest.raises(kc.InvalidValueError, match="not in any allocation"):
                dev.request("memcpy_dtoh", src=buf.ptr, size=16)
            with pytest.raises(kc.InvalidValueError):
                dev.request("mem_free", ptr=buf.ptr)
            with pytest.raises(kc.InvalidHandleError):
                dev.request("get_function", module=mod.handle, name="vadd")
            with pytest.raises(kc.InvalidHandleError):
                dev.request("stream_sync", stream=s.handle)
            with pytest.raises(kc.InvalidHandleError):
                dev.request("event_query", event=ev.handle)
        # A launch with a foreign function handle fails at the next synchronization.
        db.submit("launch", function=k.handle, grid=[1, 1, 1], block=[1, 1, 1], shared=0,
                 stream=0, args=[b"\0" * 8] * 3 + [b"\0" * 4])
        with pytest.raises(kc.InvalidHandleError):
            db.synchronize()
        db.synchronize()                     # reported once, then the context is fine
        # Forged and freed handles.
        with pytest.raises(kc.InvalidValueError):
            da.request("memcpy_dtoh", src=buf.ptr + 4090, size=16)   # runs off the end
        buf.close()
        with pytest.raises(kc.InvalidValueError):
            da.request("memcpy_dtoh", src=buf.ptr, size=16)          # freed
        # bob's session token is unknown to alice's executor even on alice's socket.
        ch = a._devices["cpu0"]._ch
        with pytest.raises(kc.CudaError) as e:
            a._wait(ch, a._send(ch, "mem_info", {"session": b.token}))
        assert e.value.name == "CUDA_ERROR_INVALID_CONTEXT"
        assert da.mem_info()[1] == 256 << 20       # alice's session still works


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
