"""GPU-only behaviour (the device-generic scenarios run on gpu0 through the `dev_name`
fixture). Skipped, with the reason, where no NVIDIA GPU is present."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import GPU_COUNT
from kernels import VECADD

import kubecash.client as kc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPU_COUNT == 0, reason="no NVIDIA GPU here (NVML finds none)")]

ILLEGAL = r"""
extern "C" __global__ void wild(int* p) { *(volatile int*)(0x10) = 1; p[0] = 2; }
"""


def test_gpu_device_is_described_with_its_uuid(broker):
    with broker.connect("alice") as s:
        d = s.device("gpu0")
        assert d.kind == "cuda" and d.properties["uuid"].startswith("GPU-")
        assert d.total_memory == 256 << 20              # the quota, not the card


def test_illegal_address_is_sticky_for_that_tenant_only(broker):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("gpu0"), b.device("gpu0")
        n = 1 << 16
        x = np.arange(n, dtype=np.float32)
        bx = db.allocate(x.nbytes)
        bx.copy_from(x)
        kb = db.load_module(VECADD).get_kernel("vadd")
        buf = da.allocate(16)
        da.launch(da.load_module(ILLEGAL).get_kernel("wild"), (1,), (1,), [buf])
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        assert e.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"
        with pytest.raises(kc.LaunchFailedError):
            da.allocate(16)
        db.launch(kb, (n // 256,), (256,), [bx, bx, bx, n])
        np.testing.assert_array_equal(bx.copy_to(np.empty(n, np.float32)), 2 * x)


def test_ptx_image_loads_and_runs(broker):
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(VECADD.encode(), b"v.cu", 0, [], [])
    assert int(err) == 0
    assert int(nvrtc.nvrtcCompileProgram(prog, 1, [b"--gpu-architecture=compute_80"])[0]) == 0
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    with broker.connect("alice") as s:
        d = s.device("gpu0")
        k = d.load_module(image=ptx, kind="ptx").get_kernel("vadd")
        assert k.param_sizes == (8, 8, 8, 4)
        n = 1024
        a = d.allocate(n * 4)
        a.copy_from(np.ones(n, np.float32))
        d.launch(k, (n // 256,), (256,), [a, a, a, n])
        np.testing.assert_array_equal(a.copy_to(np.empty(n, np.float32)), 2.0)
