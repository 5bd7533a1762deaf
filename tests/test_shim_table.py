"""The shim's declarative table against cuda-python's own modules, and the brokered modules
the builder makes from it (no broker needed: nothing here reaches a device)."""
from __future__ import annotations

import importlib
import logging
import types

import pytest

pytest.importorskip("cuda.bindings.driver")

from kubecash.client.errors import CUresult as KC  # noqa: E402
from kubecash.shim import build, inject  # noqa: E402
from kubecash.shim import driver as shim_driver  # noqa: E402
from kubecash.shim import nvml as shim_nvml
from kubecash.shim import nvrtc as shim_nvrtc  # noqa: E402
from kubecash.shim import runtime as shim_runtime
from kubecash.shim import table as T

IMPLS = {T.DRIVER: shim_driver, T.RUNTIME: shim_runtime, T.NVRTC: shim_nvrtc,
         T.NVRTC_V2: shim_nvrtc, T.PYNVML: shim_nvml}


def real(name: str):
    # This process runs without KUBECASH_BROKER: these are cuda-python's own modules.
    mod = importlib.import_module(name)
    assert not hasattr(mod, "__kubecash_shim__")
    return mod


@pytest.mark.parametrize("module", list(T.TABLE))
def test_every_listed_name_exists_in_cuda_python(module):
    mod = real(module)
    missing = [n for n in T.TABLE[module] if not callable(getattr(mod, n, None))]
    assert not missing, f"{module} has no {missing}"


@pytest.mark.parametrize("module", list(T.TABLE))
def test_every_implemented_row_has_an_implementation_and_back(module):
    impls = IMPLS[module]
    rows = T.TABLE[module]
    for name, kind in rows.items():
        if kind in (T.BROKERED, T.LOCAL):
            assert callable(getattr(impls, name, None)), f"{module}.{name}: no implementation"
    # Conversely, an implementation that is not in the table would never be reachable.
    prefixes = {T.DRIVER: "cu", T.RUNTIME: "cuda", T.NVRTC: "nvrtc", T.PYNVML: "nvml"}
    if module in prefixes:
        for name in dir(impls):
            if name.startswith(prefixes[module]) and callable(getattr(impls, name)) \
                    and (module != T.DRIVER or not name.startswith("cuda")):
                assert name in rows, f"{module}.{name} is implemented but not in the table"


def test_aliases_agree_with_the_injector():
    assert inject.ALIASES == T.ALIASES


def build_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    r = real(name)
    inject._implementations(name, r)
    build.populate(mod, name, r, IMPLS[name])
    return mod


def test_types_enums_and_constants_are_the_real_ones():
    d, r = build_module(T.DRIVER), real(T.DRIVER)
    for n in ("CUresult", "CUdevice_attribute", "CUdeviceptr", "CUstream", "CUcontext",
              "CUfunction", "CUevent", "CUmodule", "CU_STREAM_LEGACY", "CU_MEMHOSTALLOC_DEVICEMAP",
              "cuuint64_t", "CUDA_VERSION"):
        assert getattr(d, n) is getattr(r, n), n
    rt = build_module(T.RUNTIME)
    assert rt.cudaError_t is real(T.RUNTIME).cudaError_t
    assert rt.cudaStream_t is real(T.RUNTIME).cudaStream_t
    assert isinstance(rt.cudaStream_t(5), d.CUstream)


def test_unlisted_and_unsupported_calls_return_not_supported_and_log_once(caplog):
    d = build_module(T.DRIVER)
    r = real(T.DRIVER)
    assert "cuCtxGetLimit" not in T.TABLE[T.DRIVER]        # unlisted
    with caplog.at_level(logging.WARNING, logger="kubecash.shim"):
        assert d.cuCtxGetLimit(r.CUlimit.CU_LIMIT_STACK_SIZE) == (r.CUresult.CUDA_ERROR_NOT_SUPPORTED, None)
        assert d.cuCtxGetLimit(r.CUlimit.CU_LIMIT_STACK_SIZE)[0] == r.CUresult.CUDA_ERROR_NOT_SUPPORTED
        # Output count follows the real call's: cuMemGetAllocationGranularity returns 2 values.
        assert d.cuMemGetAllocationGranularity(None, 0) == (r.CUresult.CUDA_ERROR_NOT_SUPPORTED, None)
        assert d.cuGraphLaunch(None, None) == (r.CUresult.CUDA_ERROR_NOT_SUPPORTED,)
    said = [m.getMessage() for m in caplog.records]
    assert sum("cuCtxGetLimit" in m for m in said) == 1
    # No unlisted API call of the real module survives as the real function.
    for name in dir(r):
        obj = getattr(r, name)
        if name.startswith("cu") and callable(obj) and not isinstance(obj, type):
            assert getattr(d, name) is not obj, name
    rt = build_module(T.RUNTIME)
    assert rt.cudaGraphCreate(0)[0] == real(T.RUNTIME).cudaError_t.cudaErrorNotSupported
    nv = build_module(T.PYNVML)
    import pynvml
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nv.nvmlDeviceGetTemperature(None, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nv._nvmlGetFunctionPointer("nvmlInit")              # the raw NVML door is shut too
    assert nv.c_nvmlMemory_t is pynvml.c_nvmlMemory_t


def test_local_answers_need_no_broker():
    d, r = build_module(T.DRIVER), real(T.DRIVER)
    assert d.cuGetErrorName(r.CUresult.CUDA_ERROR_OUT_OF_MEMORY) == (r.CUresult.CUDA_SUCCESS,
                                                                     b"CUDA_ERROR_OUT_OF_MEMORY")
    assert d.cuDriverGetVersion() == (r.CUresult.CUDA_SUCCESS, r.CUDA_VERSION)
    assert d.cuGetErrorName(12345)[0] == r.CUresult.CUDA_ERROR_INVALID_VALUE
    # Before cuInit, as on a real driver.
    assert d.cuMemAlloc(16) == (r.CUresult.CUDA_ERROR_NOT_INITIALIZED, None)


def test_nvrtc_stays_real():
    nv, r = build_module(T.NVRTC), real(T.NVRTC)
    assert nv.nvrtcVersion is r.nvrtcVersion
    assert nv.nvrtcResult is r.nvrtcResult
    assert nv.nvrtcGetPTX is r.nvrtcGetPTX                   # PTX runs on a CPU device as it is
    assert nv.nvrtcGetCUBIN is not r.nvrtcGetCUBIN           # the real one, and its PTX filed


def test_result_codes_map_to_the_same_names_in_each_enum():
    d, rt = real(T.DRIVER), real(T.RUNTIME)
    from kubecash.shim.errors import driver_result, runtime_result
    for c in KC:
        assert driver_result(d, int(c)).name == c.name
        assert int(runtime_result(rt, int(c))) == int(c)
    assert runtime_result(rt, 2) == rt.cudaError_t.cudaErrorMemoryAllocation
    assert runtime_result(rt, 801) == rt.cudaError_t.cudaErrorNotSupported


def test_arity_comes_from_cuda_pythons_docstrings():
    d, rt = real(T.DRIVER), real(T.RUNTIME)
    assert build.arity(d.cuMemGetInfo) == 3
    assert build.arity(d.cuModuleGetGlobal) == 3
    assert build.arity(d.cuLaunchKernel) == 1
    assert build.arity(rt.cudaMalloc) == 2
    assert build.arity(rt.cudaGetErrorName) == 2
