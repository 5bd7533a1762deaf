"""pynvml inside a brokered container: the devices this tenant may use, with its quota as
the memory (total = quota, used = the tenant's use), never the physical card. Calls not
listed in the table raise NVMLError(NVML_ERROR_NOT_SUPPORTED)."""
from __future__ import annotations

import ctypes
from typing import Any

import kubecash
from kubecash.client.errors import CudaError

from . import devattr
from .state import STATE

real: Any = None          # the real pynvml module, set by the module builder
_inited = 0


def _err(code: int):
    return real.NVMLError(code)


def _need_init() -> None:
    if _inited <= 0:
        raise _err(real.NVML_ERROR_UNINITIALIZED)


def _handle(index: int):
    return ctypes.cast(ctypes.c_void_p(0x6B630000 + index), real.c_nvmlDevice_t)


def _index(handle) -> int:
    _need_init()
    try:
        v = ctypes.cast(handle, ctypes.c_void_p).value or 0
    except (TypeError, ctypes.ArgumentError):
        raise _err(real.NVML_ERROR_INVALID_ARGUMENT) from None
    i = v - 0x6B630000
    if not 0 <= i < len(STATE.devices):
        raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
    return i


def nvmlInitWithFlags(flags):
    global _inited
    try:
        STATE.init()
    except CudaError:
        raise _err(real.NVML_ERROR_DRIVER_NOT_LOADED) from None
    _inited += 1


def nvmlInit():
    nvmlInitWithFlags(0)


def nvmlShutdown():
    global _inited
    _need_init()
    _inited -= 1


def nvmlDeviceGetCount():
    _need_init()
    return len(STATE.devices)




def nvmlDeviceGetHandleByIndex(index):
    _need_init()
    i = int(index)
    if not 0 <= i < len(STATE.devices):
        raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
    return _handle(i)


def nvmlDeviceGetIndex(handle):
    return _index(handle)


def _uuid(i: int) -> str:
    u = STATE.devices[i].properties.get("uuid")
    if isinstance(u, str) and u:
        return u
    b = devattr.uuid_bytes(STATE.devices[i]).hex()
    return f"GPU-{b[:8]}-{b[8:12]}-{b[12:16]}-{b[16:20]}-{b[20:]}"


def nvmlDeviceGetHandleByUUID(uuid):
    _need_init()
    u = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    for i in range(len(STATE.devices)):
        if _uuid(i) == u:
            return _handle(i)
    raise _err(real.NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(handle):
    return _uuid(_index(handle))


def nvmlDeviceGetName(handle):
    return devattr.model(STATE.devices[_index(handle)])


def nvmlDeviceGetMemoryInfo(handle, version=None):
    d = STATE.devices[_index(handle)]
    free, total = d.mem_info()          # the executor's view: this tenant's quota and use
    used = total - free
    if not version:
        m = real.c_nvmlMemory_t()
    else:
        m = real.c_nvmlMemory_v2_t()
        m.version = version
        m.reserved = 0
    m.total, m.free, m.used = total, free, used
    return m


def _use(i: int) -> dict:
    """The tenant's use of device i, from the broker (its session's status); {} before its
    executor runs there."""
    d = STATE.devices[i]
    try:
        return STATE.session.status()["devices"].get(d.name, {})
    except CudaError as e:
        raise _err(real.NVML_ERROR_UNKNOWN) from e


def nvmlDeviceGetUtilizationRates(handle):
    """gpu: the tenant's share of the device's time over the last second (the broker's
    scheduler measured it); memory bus activity is not measured: 0 (libnvidia-ml.so.1 says
    the same)."""
    share = float(_use(_index(handle)).get("share_1s", 0.0))
    u = real.c_nvmlUtilization_t()
    u.gpu, u.memory = max(0, min(100, int(share * 100 + 0.5))), 0
    return u


def nvmlDeviceGetComputeRunningProcesses(handle):
    """The tenant's own processes with the device open (as their sessions named them); their
    memory is the executor's, not counted per process (None, as pynvml says for N/A)."""
    out = []
    for pid in _use(_index(handle)).get("pids", []):
        p = real.c_nvmlProcessInfo_t()
        p.pid, p.usedGpuMemory = pid, real.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
        p.gpuInstanceId = p.computeInstanceId = 0xFFFFFFFF
        obj = real.nvmlStructToFriendlyObject(p)
        obj.usedGpuMemory = None
        out.append(obj)
    return out


nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses
nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses


def nvmlDeviceGetCudaComputeCapability(handle):
    cc = STATE.devices[_index(handle)].properties.get("compute_capability") or [0, 0]
    return (int(cc[0]), int(cc[1]))


def nvmlDeviceGetMultiGpuBoard(handle):
    _index(handle)
    return 0


def nvmlSystemGetDriverVersion():
    _need_init()
    return f"kubecash-{getattr(kubecash, '__version__', '0.1.0')}"


def nvmlSystemGetCudaDriverVersion():
    _need_init()
    try:
        from cuda.bindings import driver  # the brokered module
    except ImportError:                                  # no cuda-python: no CUDA API to offer
        raise _err(real.NVML_ERROR_NOT_SUPPORTED) from None
    return int(driver.cuDriverGetVersion()[1])


nvmlSystemGetCudaDriverVersion_v2 = nvmlSystemGetCudaDriverVersion


def nvmlSystemGetNVMLVersion():
    _need_init()
    return f"kubecash-{getattr(kubecash, '__version__', '0.1.0')}"
