"""Brokered cuda.bindings.driver calls, code: module loads, functions and globals, kernel
launches, function attributes and occupancy (from the device's own limits)."""
from __future__ import annotations

from typing import Any

from kubecash.client.errors import CudaError, E

from . import devattr, images, ops
from .drv_device import ctx_dev
from .errors import say_once
from .hostmem import as_int
from .state import STATE, handle_int

real: Any = None          # the real cuda.bindings.driver, set by driver.bind()


# -- modules and launches -------------------------------------------------------------------
def _load(data: bytes) -> tuple:
    c, dev = ctx_dev()
    return (real.CUmodule(ops.load_module(data, c.handle, dev)),)


def cuModuleLoadData(image):
    STATE.ctx()
    return _load(images.image_bytes(image))


def cuModuleLoadDataEx(image, numOptions, options, optionValues):
    STATE.ctx()
    if as_int(numOptions, "numOptions"):
        say_once("jit-options", "cuModuleLoadDataEx: JIT options are ignored on the brokered "
                 "device (the module's source is compiled for it)")
    return _load(images.image_bytes(image))


def cuModuleLoadFatBinary(fatCubin):
    STATE.ctx()
    return _load(images.image_bytes(fatCubin))


def cuModuleLoad(fname):
    STATE.ctx()
    return _load(images.read_image_file(fname))


def cuModuleUnload(hmod):
    STATE.drop_module(handle_int(hmod))
    return ()


def cuModuleGetFunction(hmod, name):
    return (real.CUfunction(ops.get_function(hmod, name)),)


def cuModuleGetGlobal(hmod, name):
    m = STATE.module(hmod)
    nm = name.decode() if isinstance(name, (bytes, bytearray)) else str(name)
    ptr, size = m.module.get_global(nm.rstrip("\0"))
    return (real.CUdeviceptr(ptr), size)


def cuFuncSetCacheConfig(hfunc, config):
    STATE.function(hfunc)
    return ()                      # a cache preference: a hint, nothing to do on a CPU


def cuFuncSetAttribute(hfunc, attrib, value):
    STATE.function(hfunc)
    name = real.CUfunction_attribute(int(attrib)).name
    if name in ("CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES",
                "CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT"):
        return ()                  # the executor checks each launch's shared memory itself
    raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED, f"function attribute {name} cannot be set")


def cuLaunchKernel(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                   sharedMemBytes, hStream, kernelParams, extra):
    STATE.ctx()
    ops.launch(f, (gridDimX, gridDimY, gridDimZ), (blockDimX, blockDimY, blockDimZ),
               sharedMemBytes, hStream, kernelParams, extra)
    return ()


# -- function attributes and occupancy (from the device's own limits) --------------------------
def _dev_attr(dev: int, short: str) -> int:
    return devattr.attribute(real, STATE.dev(dev),
                             getattr(real.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_" + short))


def cuFuncGetAttribute(attrib, hfunc):
    f = STATE.function(hfunc)
    try:
        name = real.CUfunction_attribute(int(attrib)).name
    except (ValueError, TypeError):
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"unknown function attribute {attrib!r}") from None
    if name == "CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK":
        return (_dev_attr(f.dev, "MAX_THREADS_PER_BLOCK"),)
    if name in ("CU_FUNC_ATTRIBUTE_PTX_VERSION", "CU_FUNC_ATTRIBUTE_BINARY_VERSION"):
        return (_dev_attr(f.dev, "COMPUTE_CAPABILITY_MAJOR") * 10
                + _dev_attr(f.dev, "COMPUTE_CAPABILITY_MINOR"),)
    raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED,
                    f"function attribute {name} is not known for a kernel on the brokered device")


def blocks_per_sm(dev: int, block_size: int, dynamic_smem: int) -> int:
    """Resident blocks per multiprocessor as the device's reported limits allow."""
    if block_size <= 0 or block_size > _dev_attr(dev, "MAX_THREADS_PER_BLOCK"):
        return 0
    if dynamic_smem > _dev_attr(dev, "MAX_SHARED_MEMORY_PER_BLOCK"):
        return 0
    n = min(_dev_attr(dev, "MAX_BLOCKS_PER_MULTIPROCESSOR"),
            _dev_attr(dev, "MAX_THREADS_PER_MULTIPROCESSOR") // block_size)
    if dynamic_smem > 0:
        n = min(n, _dev_attr(dev, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR") // dynamic_smem)
    return max(n, 0)


def cuOccupancyMaxActiveBlocksPerMultiprocessor(func, blockSize, dynamicSMemSize):
    f = STATE.function(func)
    return (blocks_per_sm(f.dev, as_int(blockSize, "blockSize"),
                          as_int(dynamicSMemSize, "dynamicSMemSize")),)


def cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(func, blockSize, dynamicSMemSize, flags):
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(func, blockSize, dynamicSMemSize)


def cuOccupancyMaxPotentialBlockSize(func, blockSizeToDynamicSMemSize, dynamicSMemSize,
                                     blockSizeLimit):
    f = STATE.function(func)
    if blockSizeToDynamicSMemSize not in (None, 0) and handle_int(blockSizeToDynamicSMemSize):
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED,
                        "cuOccupancyMaxPotentialBlockSize with a blockSizeToDynamicSMemSize "
                        "callback is not supported; pass None and dynamicSMemSize")
    smem = as_int(dynamicSMemSize, "dynamicSMemSize")
    limit = as_int(blockSizeLimit, "blockSizeLimit")
    warp = _dev_attr(f.dev, "WARP_SIZE")
    top = _dev_attr(f.dev, "MAX_THREADS_PER_BLOCK")
    if limit > 0:
        top = min(top, limit)
    best, best_threads = 0, -1
    for bs in range(top, 0, -1):             # the largest block size of the best occupancy
        if bs % warp and bs != top:
            continue
        threads = blocks_per_sm(f.dev, bs, smem) * bs
        if threads > best_threads:
            best, best_threads = bs, threads
    if best_threads <= 0:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "no block size fits the kernel's shared memory")
    return (blocks_per_sm(f.dev, best, smem) * _dev_attr(f.dev, "MULTIPROCESSOR_COUNT"), best)
