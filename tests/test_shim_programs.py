"""Unmodified cuda-python programs (examples/cuda_python, written the way NVIDIA's samples
are) run in subprocesses with only KUBECASH_BROKER set, against a real broker on the CPU
backend: correct results, the tenant's quota as the device's memory, OUT_OF_MEMORY exactly
where a full GPU would run out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, run_client

EXAMPLES = os.path.join(ROOT, "examples", "cuda_python")


def run_program(broker, *args: str, tenant: str = "alice", timeout: float = 120,
                env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`python <args>` in the examples directory with KUBECASH_BROKER set, nothing else."""
    env = dict(os.environ, KUBECASH_BROKER=broker.address(tenant), PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=EXAMPLES, env=env, capture_output=True,
                          text=True, timeout=timeout)


def kernels_run(session, device: str = "cpu0", at_least: int = 1) -> int:
    """Kernels the tenant's executor ran (stats reach the broker within ~0.25 s)."""
    deadline = time.monotonic() + 5
    n = 0
    while time.monotonic() < deadline:
        n = session.status()["devices"].get(device, {}).get("kernels", 0)
        if n >= at_least:
            break
        time.sleep(0.05)
    return n


def assert_ok(r: subprocess.CompletedProcess, marker: str) -> None:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert marker in r.stdout, r.stdout


@pytest.mark.parametrize("image", ["ptx", "cubin"])
def test_driver_vector_add_from_nvrtc_ptx_and_cubin(broker, image):
    with broker.connect("alice") as watcher:      # keeps the executor up to read its stats
        r = run_program(broker, "vector_add_drv.py", image)
        assert_ok(r, "Result = PASS")
        assert "device: KubeCASH CPU" in r.stdout
        assert kernels_run(watcher) >= 1          # it ran brokered, not on some local GPU


@pytest.mark.parametrize("image", ["ptx", "cubin"])
def test_jit_saxpy_on_streams_with_both_argument_forms(broker, image):
    with broker.connect("alice") as watcher:
        r = run_program(broker, "jit_saxpy_streams.py", image)
        assert_ok(r, "saxpy on a stream: PASS")
        assert kernels_run(watcher, at_least=2) >= 2


def test_reduction_with_extern_shared_and_syncthreads(broker):
    r = run_program(broker, "reduction_shared.py", "cubin")
    assert_ok(r, "PASS")
    assert "sum = 3144630.0" in r.stdout


@pytest.mark.parametrize("api", ["rt", "drv"])
def test_vector_add_over_mapped_zero_copy_host_memory(broker, api):
    r = run_program(broker, "simple_zero_copy.py", api, "65536")
    assert_ok(r, "zero-copy vector add: PASS")


def test_stream_ordered_allocation_timed_with_events(broker):
    r = run_program(broker, "stream_ordered_allocation.py", "262144")
    assert_ok(r, "stream-ordered allocation: PASS")
    assert "Total elapsed time = " in r.stdout and "pool high-water mark = 3145728 bytes" in r.stdout


def test_runtime_api_vector_add_with_legacy_module_names(broker):
    r = run_program(broker, "vector_add_runtime.py", "ptx")
    assert_ok(r, "runtime vector add: PASS (quota 268435456 bytes)")


def test_device_memory_and_pynvml_report_the_tenant_quota(broker_factory):
    b = broker_factory({"alice": {"memory": "96MiB"}})
    r = run_program(b, "device_info.py")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    quota = 96 << 20
    assert info["count"] == 1
    assert info["total_mem"] == info["props_total"] == info["mem_info"][1] == quota
    assert info["mem_info"][0] == quota - (12 << 20)   # nothing allocated: its staging segment (1/8)
    assert info["nvml"]["count"] == 1 and info["nvml"]["name"].startswith("KubeCASH CPU")
    assert info["nvml"]["total"] == quota
    used = (1 << 20) + (12 << 20)
    assert info["nvml"]["used"] == used and info["nvml"]["free"] == quota - used
    # its share of the device's last second (idle but for its own few calls), its own process
    assert 0 <= info["nvml_util"] <= 100 and info["nvml_pids"] == [info["pid"]]
    assert info["nvml_temperature"] == "not supported"  # refused, never made up
    assert info["driver_version"] >= 13000


def test_python_dash_m_kubecash_shim_runs_a_program(broker):
    # KUBECASH_SHIM=0 turns the .pth hook off: only the -m entry point installs the shim here.
    r = run_program(broker, "-m", "kubecash.shim", "vector_add_drv.py", "ptx", "2000",
                    env_extra={"KUBECASH_SHIM": "0"})
    assert_ok(r, "Result = PASS")
    off = run_program(broker, "-c", "import cuda.bindings.driver as d; print(hasattr(d, '__kubecash_shim__'))",
                      env_extra={"KUBECASH_SHIM": "0"})
    assert off.stdout.strip() == "False", off.stderr


def test_without_the_variable_nothing_is_altered():
    code = textwrap.dedent("""
        import sys, pynvml
        import cuda.bindings.driver as d
        import kubecash.shim.inject as inj
        print(hasattr(d, "__kubecash_shim__"), hasattr(pynvml, "__kubecash_shim__"), inj.installed())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECASH_BROKER", "KUBECASH_SHIM")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False False False", r.stderr


# -- a quota too small: the same programs fail exactly where a full GPU would -------------------
def test_quota_too_small_fails_the_allocation_a_full_gpu_would_fail(broker_factory):
    b = broker_factory({"alice": {"memory": "1MiB"}})
    # Three 400 kB buffers: the third cuMemAlloc is the one past the 1 MiB quota.
    r = run_program(b, "vector_add_drv.py", "ptx", "100000")
    assert r.returncode != 0
    assert "CUDA error code=2(b'CUDA_ERROR_OUT_OF_MEMORY')" in r.stderr, r.stderr
    assert "d_C = checkCudaErrors(cuda.cuMemAlloc(nbytes))" in r.stderr
    assert "memory quota" in r.stderr                    # the executor's reason, on stderr
    r = run_program(b, "stream_ordered_allocation.py", "100000")
    assert "CUDA error code=2(b'cudaErrorMemoryAllocation')" in r.stderr, r.stderr
    assert "d_c = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))" in r.stderr
    r = run_program(b, "vector_add_runtime.py", "ptx", "50000")
    assert "d_c = checkCudaErrors(cudart.cudaMalloc(a.nbytes))" in r.stderr, r.stderr
    r = run_program(b, "device_info.py")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["nvml"]["total"] == 1 << 20 and info["nvml"]["free"] == 0


def test_zero_copy_memory_counts_against_the_quota(broker_factory):
    b = broker_factory({"alice": {"memory": "2MiB"}})
    r = run_program(b, "simple_zero_copy.py", "rt", "200000")   # 3 x 800 kB mapped
    assert "c_ptr = checkCudaErrors(cudart.cudaHostAlloc(num_bytes, flags))" in r.stderr, r.stderr
    assert "cudaErrorMemoryAllocation" in r.stderr


# -- a tour of the API surface: return conventions, handle types, errors ------------------------
TOUR = os.path.join(os.path.dirname(__file__), "shim_tour.py")


def test_api_surface_tour(broker):
    with open(TOUR) as f:
        p = run_client(f.read(), broker.address("alice"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "TOUR OK" in out, f"stdout:\n{out}\nstderr:\n{err}"
    # Unsupported calls are logged by name, once each; failures say why.
    assert err.count("cuGraphCreate is not supported") == 1
    assert "cuCtxGetLimit is not supported" in err
    assert "SASS for sm_80): a CPU device runs PTX" in err and "CUDA_ERROR_NO_BINARY_FOR_GPU" in err


def test_no_broker_reachable_is_no_device():
    code = "from cuda.bindings import driver as d; print(d.cuInit(0)[0].name, d.cuDeviceGetCount()[0].name)"
    env = dict(os.environ, KUBECASH_BROKER="ipc:///nonexistent/kubecash/broker.sock")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "CUDA_ERROR_NO_DEVICE CUDA_ERROR_NOT_INITIALIZED", r.stderr


def test_install_after_the_real_modules_were_imported():
    # A program (or a library) that imported cuda-python before the shim was installed still
    # gets the brokered modules afterwards, by both import forms.
    code = textwrap.dedent("""
        from cuda.bindings import driver as before
        import kubecash.shim
        kubecash.shim.install()
        from cuda.bindings import driver
        import cuda.bindings.runtime as rt
        print(getattr(driver, "__kubecash_shim__", None), getattr(rt, "__kubecash_shim__", None),
              driver.CUresult is before.CUresult)
    """)
    env = dict(os.environ, KUBECASH_BROKER="ipc:///nonexistent/sock", KUBECASH_SHIM="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["cuda.bindings.driver", "cuda.bindings.runtime", "True"], r.stderr


@pytest.mark.parametrize("program, marker", [
    (("vector_add_drv.py", "ptx"), "Result = PASS"),          # cuCtxCreate, a module of PTX
    (("jit_saxpy_streams.py", "ptx"), "saxpy on a stream: PASS"),
    (("reduction_shared.py", "ptx"), "sum = 3144630.0: PASS"),
    (("device_info.py",), '"total_mem": 268435456'),
])
def test_examples_run_on_the_native_driver_without_the_shim(broker, program, marker):
    """The same programs with the Python shim off: cuda-python's real bindings call
    KubeCASH's libcuda.so.1 (LD_LIBRARY_PATH=$(kubecash-libdir)). The examples that JIT SASS
    (nvrtcGetCUBIN: simple_zero_copy, stream_ordered_allocation) need the shim, which hands
    the executor NVRTC's PTX instead; a CPU device cannot run SASS."""
    pytest.importorskip("cuda.bindings")
    import kubecash.native as kn
    with broker.connect("alice") as watcher:
        r = run_program(broker, *program, env_extra={"KUBECASH_SHIM": "0", "LD_LIBRARY_PATH": kn.libdir()})
        assert_ok(r, marker)
        if program[0] != "device_info.py":     # (its marker is the quota: brokered too)
            assert kernels_run(watcher) >= 1
            assert "not supported" not in r.stderr, r.stderr     # nothing fell through to a stub
