"""Programs in the style of NVIDIA's cuda-samples (tests/c/samples/), compiled unmodified by
nvcc twice (static cudart, nvcc's default, and `-cudart shared`), run against a real broker
through KubeCASH's libcuda.so.1 on cpu0. Each checks its own results against a host
reference and prints what failed; nothing but LD_LIBRARY_PATH and KUBECASH_BROKER is set."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import SLOW, wait_for
from test_native_driver import RUN_TIMEOUT, _libdir
from test_native_runtime import cudart_dirs
from toolkit import NO_NVCC, NVCC

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLES = os.path.join(HERE, "c", "samples")
NAMES = sorted(f[:-3] for f in os.listdir(SAMPLES) if f.endswith(".cu"))
# The broker settings a sample needs beyond the default broker's
SETTINGS = {"multi_device": {"cpu_devices": 2}}

needs_nvcc = pytest.mark.skipif(NVCC is None, reason=NO_NVCC)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    rpath = [f"-Xlinker=-rpath,{d}" for d in cudart_dirs()]

    def get(name: str, cudart: str) -> str:
        exe = str(out / f"{name}-{cudart}")
        if not os.path.exists(exe):
            cmd = [NVCC, "-arch=sm_80", "-o", exe, os.path.join(SAMPLES, f"{name}.cu"), "-cudart", cudart]
            r = subprocess.run(cmd + (rpath if cudart == "shared" else []), capture_output=True, text=True,
                               timeout=RUN_TIMEOUT)
            assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
        return exe
    return get


@needs_nvcc
@pytest.mark.parametrize("cudart", ["static", "shared"])
@pytest.mark.parametrize("name", NAMES)
def test_sample_runs_brokered(built, broker_factory, name, cudart):
    broker = broker_factory(**SETTINGS.get(name, {}))
    exe = built(name, cudart)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECASH_", "CUDA_"))}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=broker.address("alice"))
    r = subprocess.run([exe], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and f"OK {name}" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "not supported" not in r.stderr, r.stderr       # nothing fell through to a stub
    if name == "device_printf":                             # device printf reached stdout, in full
        lines = sorted(x for x in r.stdout.splitlines() if x.startswith("hello"))
        assert lines == [f"hello from block {b} thread {t} tag 42" for b in (0, 1) for t in (0, 1)], r.stdout
    # the work ran on the broker's device, under alice's session (not a local fallback); the
    # executor's count reaches the broker in its stats report, which may come after the exit
    wait_for(lambda: broker.admin().call("status")["tenants"]["alice"]["devices"]["cpu0"]["kernels"] > 0,
             10 * SLOW, "the broker to count alice's kernels on cpu0")


def test_cuda_core_program_runs_brokered(broker):
    """examples/cuda_core_saxpy.py: cuda.core (NVRTC, a memory pool, a stream, a launch) on the
    native driver, no Python-level shim; memory totals are the tenant's quota."""
    pytest.importorskip("cuda.core")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECASH_", "CUDA_"))}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=broker.address("alice"), KUBECASH_SHIM="0")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "cuda_core_saxpy.py")], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and "OK saxpy" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "memory 256 MiB total" in r.stdout, r.stdout        # the broker fixture's alice: 256 MiB
    assert broker.admin().call("status")["tenants"]["alice"]["devices"]["cpu0"]["kernels"] > 0
