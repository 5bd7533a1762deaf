"""Device-side errors: a failed assert() (CUDA_ERROR_ASSERT) and a trap instruction
(CUDA_ERROR_ILLEGAL_INSTRUCTION) end the launch, and are sticky for the tenant's context on
that device, as on a GPU; other tenants go on, and a new session works again."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SANDBOX, run_client

import kubecash.client as kc
from kubecash.broker import cpukernels as ck
from kubecash.client.errors import CudaError, E

ASSERTS = r"""
extern "C" __global__ void check(const int* x, int* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i == 0) printf("before the assert %d\n", x[0]);
    assert(x[i] > 0);
    out[i] = 2 * x[i];
}
"""
ASSERT_LINE = 5         # the assert's line in ASSERTS (the first line is the empty one)

TRAPS = r"""
extern "C" __global__ void boom(int* out) {
    if (blockIdx.x == 1 && threadIdx.x == 3) asm volatile("trap;");
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}
"""

# Fibers (a barrier in the module): the failing thread leaves its block mid-phase.
BARRIER_ASSERT = r"""
extern "C" __global__ void red(const int* x, int* out) {
    __shared__ int s[64];
    s[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
    __syncthreads();
    assert(s[63 - threadIdx.x] >= 0);
    __syncthreads();
    if (threadIdx.x == 0) { int t = 0; for (int k = 0; k < 64; ++k) t += s[k]; out[blockIdx.x] = t; }
}
"""


def test_failed_assert_is_sticky_assert_error_naming_the_assertion(broker):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        n = 256
        good = np.arange(1, n + 1, dtype=np.int32)
        bad = good.copy()
        bad[37] = 0
        k = da.load_module(ASSERTS).get_kernel("check")
        bx, bo = da.allocate(good.nbytes), da.allocate(good.nbytes)
        bx.copy_from(good)                          # passing asserts: runs normally
        da.launch(k, (n // 64,), (64,), [bx, bo])
        np.testing.assert_array_equal(bo.copy_to(np.empty(n, np.int32)), 2 * good)
        kb = db.load_module(ASSERTS).get_kernel("check")
        cx, co = db.allocate(good.nbytes), db.allocate(good.nbytes)
        cx.copy_from(good)

        bx.copy_from(bad)
        da.launch(k, (n // 64,), (64,), [bx, bo])
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        assert e.value.code == E.CUDA_ERROR_ASSERT, e.value
        text = str(e.value)
        assert f"kernel.cu:{ASSERT_LINE}: " in text, text
        assert "block: [0,0,0], thread: [37,0,0] Assertion `x[i] > 0` failed." in text, text
        for call in (lambda: da.allocate(16), da.synchronize, lambda: bo.copy_to(np.empty(n, np.int32)),
                     lambda: da.launch(k, (1,), (1,), [bx, bo])):
            with pytest.raises(kc.LaunchFailedError) as again:      # sticky: every later call
                call()
                da.synchronize()
            assert again.value.code == E.CUDA_ERROR_ASSERT, again.value

        db.launch(kb, (n // 64,), (64,), [cx, co])          # another tenant: unaffected
        np.testing.assert_array_equal(co.copy_to(np.empty(n, np.int32)), 2 * good)
    with broker.connect("alice") as fresh:                  # a new context works again
        d = fresh.device("cpu0")
        k = d.load_module(ASSERTS).get_kernel("check")
        bx, bo = d.allocate(good.nbytes), d.allocate(good.nbytes)
        bx.copy_from(good)
        d.launch(k, (n // 64,), (64,), [bx, bo])
        np.testing.assert_array_equal(bo.copy_to(np.empty(n, np.int32)), 2 * good)


def test_trap_is_sticky_illegal_instruction(broker):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da = a.device("cpu0")
        k = da.load_module(TRAPS).get_kernel("boom")
        out = da.allocate(4 * 4 * 32)
        da.launch(k, (4,), (32,), [out])
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        assert e.value.code == E.CUDA_ERROR_ILLEGAL_INSTRUCTION, e.value
        assert "trap instruction executed: block: [1,0,0], thread: [3,0,0]" in str(e.value)
        with pytest.raises(kc.LaunchFailedError) as again:
            da.allocate(16)
        assert again.value.code == E.CUDA_ERROR_ILLEGAL_INSTRUCTION
        assert b.device("cpu0").allocate(16).size == 16
    with broker.connect("alice") as fresh:
        assert fresh.device("cpu0").allocate(16).size == 16


DEADLOCK = r"""
extern "C" __global__ void stuck(int* out) {
    __shared__ unsigned long long bar;
    unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
    if (threadIdx.x == 0) asm volatile("mbarrier.init.shared.b64 [%0], %1;" :: "r"(b), "r"(blockDim.x + 1));
    __syncthreads();
    unsigned long long st;
    asm volatile("mbarrier.arrive.shared.b64 %0, [%1];" : "=l"(st) : "r"(b));
    unsigned done = 0;
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.test_wait.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(b), "l"(st));
    out[threadIdx.x] = 1;
}
"""


def test_a_block_stuck_on_an_mbarrier_is_a_sticky_launch_timeout(broker):
    """Where a GPU would hang until its watchdog: every live thread waits on a barrier that
    cannot complete. The launch ends with the watchdog's code, sticky, and names why."""
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da = a.device("cpu0")
        out = da.allocate(4 * 64)
        da.launch(da.load_module(DEADLOCK).get_kernel("stuck"), (2,), (64,), [out])
        with pytest.raises(kc.LaunchFailedError, match="deadlocked") as e:
            da.synchronize()
        assert e.value.code == E.CUDA_ERROR_LAUNCH_TIMEOUT, e.value
        with pytest.raises(kc.LaunchFailedError):
            da.allocate(16)
        assert b.device("cpu0").allocate(16).size == 16


def test_printf_before_a_failed_assert_reaches_the_program(broker):
    code = r"""
        import numpy as np, kubecash.client as kc
        with kc.connect() as s:
            d = s.device("cpu0")
            k = d.load_module(SOURCE).get_kernel("check")
            x = d.allocate(4); x.copy_from(np.array([-3], np.int32)); o = d.allocate(4)
            d.launch(k, (1,), (1,), [x, o])
            try:
                d.synchronize()
            except kc.LaunchFailedError as e:
                print("error", e.code, flush=True)
    """.replace("SOURCE", repr(ASSERTS))
    p = run_client(code, broker.address("alice"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "before the assert -3", out
    assert lines[1].endswith("block: [0,0,0], thread: [0,0,0] Assertion `x[i] > 0` failed."), out
    assert lines[-1] == "error 710", out


@pytest.fixture(scope="module")
def launcher():
    with ck.Launcher(2, sandbox=SANDBOX) as lz:
        yield lz


def _ptr(a: np.ndarray) -> bytes:
    return a.ctypes.data.to_bytes(8, "little")


@pytest.mark.parametrize("src, name", [(ASSERTS, "check"), (BARRIER_ASSERT, "red")])
def test_the_launcher_recovers_after_a_device_error(tmp_path, launcher, src, name):
    """The error path itself, under the executor: the launch raises the CudaError, runs no
    further blocks, and the same workers (and their fibers) run the next launch correctly."""
    m = ck.compile_module(src, (), cache_dir=tmp_path)
    try:
        k = m.kernel(name)
        nb = 64
        x = np.arange(1, nb * 64 + 1, dtype=np.int32)
        x[5 * 64 + 9] = -1                     # fails in block 5
        out = np.zeros(nb * 64, np.int32)
        with pytest.raises(CudaError) as e:
            launcher.launch(m, k, (nb, 1, 1), (64, 1, 1), 0, [_ptr(x), _ptr(out)])
        assert e.value.code == E.CUDA_ERROR_ASSERT and e.value.sticky
        assert "Assertion" in e.value.message and "block: [5,0,0]" in e.value.message
        x[5 * 64 + 9] = 9
        launcher.launch(m, k, (nb, 1, 1), (64, 1, 1), 0, [_ptr(x), _ptr(out)])
        if name == "check":
            np.testing.assert_array_equal(out, 2 * x)
        else:
            np.testing.assert_array_equal(out[:nb], x.reshape(nb, 64).sum(axis=1))
    finally:
        m.close()


def test_trap_from_ptx_text(tmp_path, launcher):
    ptx = """
.version 7.0
.target sm_80
.address_size 64
.visible .entry t(.param .u64 p)
{
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [p];
    trap;
    st.global.u32 [%rd1], 1;
}
"""
    m = ck.compile_module(ptx, (), cache_dir=tmp_path, language="ptx")
    try:
        out = np.zeros(1, np.int32)
        with pytest.raises(CudaError) as e:
            launcher.launch(m, m.kernel("t"), (1, 1, 1), (1, 1, 1), 0, [_ptr(out)])
        assert e.value.code == E.CUDA_ERROR_ILLEGAL_INSTRUCTION and out[0] == 0
    finally:
        m.close()


