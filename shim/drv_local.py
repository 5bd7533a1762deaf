"""cuda.bindings.driver calls answered in the program: the profiler (no-ops on a brokered
device) and error names and strings."""
from __future__ import annotations

from typing import Any

from kubecash.client.errors import CudaError, E

from .errors import ERROR_NAMES, ERROR_STRINGS, result_code
from .state import STATE

real: Any = None          # the real cuda.bindings.driver, set by driver.bind()


def cuProfilerStart():
    STATE.ctx()
    return ()                        # no profiler is attached to a brokered device: a no-op


def cuProfilerStop():
    STATE.ctx()
    return ()


# -- errors (answered locally) -----------------------------------------------------------------
def cuGetErrorName(error):
    code = result_code(error)
    try:
        return (real.CUresult(code).name.encode(),)
    except ValueError:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}") from None


def cuGetErrorString(error):
    code = result_code(error)
    try:
        name = real.CUresult(code).name
    except ValueError:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}") from None
    return (ERROR_STRINGS.get(code, ERROR_NAMES.get(code, name)).encode(),)
