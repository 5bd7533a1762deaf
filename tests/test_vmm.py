"""Virtual memory management on a CPU device (broker/executor/ops_vmm.py), driven through the
protocol as the native driver library drives it: every bad request refused with a message
naming what was wrong and nothing changed, the quota charged by cuMemCreate and given back
when the session ends, aliasing mappings, and a kernel touching an unmapped address ending
only its own context. The nvcc-built tests/c/samples/vmm_mapping.cu runs the same through
libcuda.so.1."""
from __future__ import annotations

import numpy as np
import pytest
from kernels import SPIN

import kubecash.client as kc
from kubecash.client.limits import VMM_GRANULARITY as G

WRITE = r"""
extern "C" __global__ void put(unsigned* p, unsigned v) { p[threadIdx.x] = v + threadIdx.x; }
"""
RW, READ = 3, 1


def _refused(dev, op, match, code="CUDA_ERROR_INVALID_VALUE", **fields):
    with pytest.raises(kc.CudaError) as e:
        dev.request(op, **fields)
    assert e.value.name == code, e.value
    assert match in str(e.value), str(e.value)


def _read(dev, ptr, n):
    out = np.empty(n, np.uint8)
    dev.read(memoryview(out), ptr)
    return out


def test_vmm_requests_are_checked_and_a_refusal_changes_nothing(broker):
    with broker.connect("alice") as s, broker.connect("alice") as other:
        dev, odev = s.device("cpu0"), other.device("cpu0")
        base = dev.request("vmm_reserve", size=4 * G)["ptr"]
        assert base % G == 0
        assert dev.request("vmm_reserve", size=G, align=1 << 34)["ptr"] % (1 << 34) == 0
        h = dev.request("vmm_create", size=2 * G)["handle"]
        oh = odev.request("vmm_create", size=G)["handle"]
        for op, match, fields in [
            ("vmm_reserve", "multiple of the allocation granularity", {"size": G + 4096}),
            ("vmm_reserve", "not a power of two", {"size": G, "align": 3 * G}),
            ("vmm_create", "multiple of the allocation granularity", {"size": 0}),
            ("vmm_map", "not a physical allocation handle of this session",
             {"ptr": base, "size": G, "offset": 0, "handle": oh}),        # another session's
            ("vmm_map", "not a physical allocation handle", {"ptr": base, "size": G, "offset": 0, "handle": 999}),
            ("vmm_map", "not inside one address range this session reserved",
             {"ptr": base + 3 * G, "size": 2 * G, "offset": 0, "handle": h}),
            ("vmm_map", "runs past the physical allocation", {"ptr": base, "size": 2 * G, "offset": G, "handle": h}),
            ("vmm_map", "address", {"ptr": base + 4096, "size": G, "offset": 0, "handle": h}),
            ("vmm_access", "not a run of whole mappings", {"ptr": base, "size": G, "access": RW}),
            ("vmm_unmap", "not a run of whole mappings", {"ptr": base, "size": G}),
            ("vmm_free", "not an address range this session reserved", {"ptr": base, "size": 2 * G}),
            ("vmm_release", "not a physical allocation handle", {"handle": oh}),
        ]:
            _refused(dev, op, match, **fields)
        _refused(dev, "vmm_access", "access flags", ptr=base, size=G, access=2)
        # a mapping, then what it rules out
        dev.request("vmm_map", ptr=base, size=2 * G, offset=0, handle=h)
        _refused(dev, "vmm_map", "overlaps a mapping", ptr=base + G, size=G, offset=0, handle=h)
        _refused(dev, "vmm_access", "not a run of whole mappings", ptr=base, size=G, access=RW)
        _refused(dev, "vmm_free", "cuMemUnmap them first", ptr=base, size=4 * G)
        # copies need the mapping and its access: none yet, then read-only
        buf = np.arange(64, dtype=np.uint8)
        with pytest.raises(kc.CudaError, match="is not writable"):
            dev.write(base, memoryview(buf))
        dev.request("vmm_access", ptr=base, size=2 * G, access=READ)
        with pytest.raises(kc.CudaError, match="is not writable"):
            dev.write(base, memoryview(buf))
        assert not _read(dev, base, 64).any()                 # readable: fresh memory is zeros
        dev.request("vmm_access", ptr=base, size=2 * G, access=RW)
        dev.write(base + G - 32, memoryview(buf))             # across the middle: one mapping
        np.testing.assert_array_equal(_read(dev, base + G - 32, 64), buf)
        with pytest.raises(kc.CudaError, match="not all mapped"):
            _read(dev, base + 2 * G - 32, 64)                 # runs into the unmapped half
        # the other session's handle is its own: it maps it in its own reservation
        obase = odev.request("vmm_reserve", size=G)["ptr"]
        odev.request("vmm_map", ptr=obase, size=G, offset=0, handle=oh)
        # unmap, release, free: then the addresses are gone
        dev.request("vmm_unmap", ptr=base, size=2 * G)
        dev.request("vmm_release", handle=h)
        _refused(dev, "vmm_release", "or it was released", handle=h)
        dev.request("vmm_free", ptr=base, size=4 * G)
        with pytest.raises(kc.CudaError, match="not in any allocation"):
            _read(dev, base, 64)
        assert dev.allocate(64).size == 64                    # the session goes on
    assert broker.alive()


def test_vmm_memory_counts_in_the_quota_and_goes_with_the_session(broker):
    total = 256 << 20                                         # the broker fixture's alice
    with broker.connect("alice") as s:
        dev = s.device("cpu0")
        free0 = dev.mem_info()[0]
        dev.request("vmm_reserve", size=1 << 30)              # address space: not charged
        assert dev.mem_info()[0] == free0
        n = free0 // G
        handles = [dev.request("vmm_create", size=G)["handle"] for _ in range(n)]
        assert dev.mem_info()[0] == free0 - n * G
        with pytest.raises(kc.CudaError) as e:
            dev.request("vmm_create", size=G)
        assert e.value.name == "CUDA_ERROR_OUT_OF_MEMORY" and "cuMemCreate" in str(e.value)
        base = dev.request("vmm_reserve", size=2 * G)["ptr"]
        dev.request("vmm_map", ptr=base, size=G, offset=0, handle=handles[0])
        dev.request("vmm_release", handle=handles[0])         # mapped: stays until unmapped
        assert dev.mem_info()[0] == free0 - n * G
        dev.request("vmm_unmap", ptr=base, size=G)
        assert dev.mem_info()[0] == free0 - (n - 1) * G
        # the session ends holding the rest, mapped and not: all of it comes back
        dev.request("vmm_map", ptr=base, size=G, offset=0, handle=handles[1])
    with broker.connect("alice") as s:
        free, tot = s.device("cpu0").mem_info()
        assert tot == total and free >= free0


def test_mappings_of_one_allocation_alias_and_kernels_use_them(broker):
    with broker.connect("alice") as s:
        dev = s.device("cpu0")
        a, b = (dev.request("vmm_reserve", size=2 * G)["ptr"] for _ in range(2))
        h = dev.request("vmm_create", size=2 * G)["handle"]
        dev.request("vmm_map", ptr=a, size=2 * G, offset=0, handle=h)
        dev.request("vmm_map", ptr=b, size=G, offset=G, handle=h)     # h's second half
        dev.request("vmm_access", ptr=a, size=2 * G, access=RW)
        dev.request("vmm_access", ptr=b, size=G, access=RW)
        put = dev.load_module(WRITE).get_kernel("put")
        dev.launch(put, (1,), (64,), [a + G, 100])                    # through the first mapping
        dev.synchronize()
        want = np.arange(100, 164, dtype=np.uint32)
        got = np.empty(64, np.uint32)
        dev.read(memoryview(got).cast("B"), b)                                # read through the second
        np.testing.assert_array_equal(got, want)
        dev.launch(put, (1,), (64,), [b, 7])
        dev.synchronize()
        dev.read(memoryview(got).cast("B"), a + G)
        np.testing.assert_array_equal(got, np.arange(7, 71, dtype=np.uint32))


def test_a_kernel_touching_an_unmapped_address_ends_only_its_context(broker):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        ob = db.allocate(16)
        ob.copy_from(b"b" * 16)
        base = da.request("vmm_reserve", size=G)["ptr"]
        put = da.load_module(WRITE).get_kernel("put")
        da.launch(put, (1,), (1,), [base, 1])
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        assert e.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS", e.value
        assert bytes(ob.copy_to()) == b"b" * 16
    with broker.connect("alice") as fresh:
        assert fresh.device("cpu0").allocate(16).size == 16
    assert broker.alive()


def test_an_unmap_waits_for_the_work_queued_before_it(broker):
    """Work already queued on the memory still sees it: a kernel queued behind a long one
    writes through a mapping that the program unmaps right after queueing it."""
    with broker.connect("alice") as s:
        dev = s.device("cpu0")
        a, b = (dev.request("vmm_reserve", size=G)["ptr"] for _ in range(2))
        h = dev.request("vmm_create", size=G)["handle"]
        for r in (a, b):
            dev.request("vmm_map", ptr=r, size=G, offset=0, handle=h)
            dev.request("vmm_access", ptr=r, size=G, access=RW)
        put = dev.load_module(WRITE).get_kernel("put")
        spin = dev.load_module(SPIN).get_kernel("spin")
        slow = dev.allocate(4)
        slow.copy_from(np.zeros(1, np.float32))
        dev.launch(spin, (1,), (1,), [slow, 20_000_000])       # some 50 ms and more
        dev.launch(put, (1,), (64,), [a, 40])
        dev.request("vmm_unmap", ptr=a, size=G)                  # answered after both ran
        got = np.empty(64, np.uint32)
        dev.read(memoryview(got).cast("B"), b)
        np.testing.assert_array_equal(got, np.arange(40, 104, dtype=np.uint32))
        dev.synchronize()                                        # and no fault was kept
