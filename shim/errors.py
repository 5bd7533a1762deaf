"""The one place where KubeCASH result codes become the program's own result enums.

The executor speaks CUresult numbering (kubecash.client.errors). A brokered call hands the
program the same code as a member of the module's own enum: CUresult for the driver API,
cudaError_t for the runtime API (whose numbering agrees with CUresult for every code the
executor produces), nvrtcResult for NVRTC.
"""
from __future__ import annotations

import logging
import sys
import threading

from kubecash.client.errors import ERROR_STRINGS, CudaError  # noqa: F401  (the shim's names for them)
from kubecash.client.errors import CUresult as KC

log = logging.getLogger("kubecash.shim")

# The code tables (ERROR_STRINGS, keyed by CUresult) and the one exception type carrying a code
# (CudaError, raised inside an implementation: it becomes the call's result code) are the
# client's: kubecash.client.errors.
ERROR_NAMES = {int(c): c.name for c in KC}


def result_code(error) -> int:
    """The number of a result enum, an int, or anything with .value (error-name calls)."""
    try:
        return int(error)
    except (TypeError, ValueError):
        return int(getattr(error, "value", -1))


def driver_result(real, code: int):
    try:
        return real.CUresult(int(code))
    except ValueError:
        return real.CUresult.CUDA_ERROR_UNKNOWN


def runtime_result(real, code: int):
    # cudaError_t numbers every code the executor reports as CUresult does (checked by a test).
    try:
        return real.cudaError_t(code)
    except ValueError:
        return real.cudaError_t.cudaErrorUnknown


def nvrtc_result(real, code: int):
    # NVRTC never talks to the broker; its own codes pass through, anything else is generic.
    try:
        return real.nvrtcResult(int(code))
    except ValueError:
        return real.nvrtcResult.NVRTC_ERROR_INTERNAL_ERROR


_said: set[str] = set()
_said_lock = threading.Lock()


def say_once(key: str, message: str) -> None:
    """Log a message once per key (unsupported calls, refused images...)."""
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    log.warning("%s", message)


def explain(name: str, code: int, message: str) -> None:
    """A failed brokered call: say why on stderr (the program only sees the code)."""
    log.warning("%s failed: %s%s", name, ERROR_NAMES.get(code, code), f": {message}" if message else "")


def _stderr_fallback() -> None:
    # Make sure warnings reach stderr even when the program configures no logging.
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("kubecash.shim: %(message)s"))
        log.addHandler(h)
        log.propagate = False


_stderr_fallback()
