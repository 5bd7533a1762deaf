"""NVRTC stays the real NVRTC (it compiles in the program and needs no device). One wrapper
only: when the program takes a CUBIN out, the shim also takes the same program's PTX, so
that the CUBIN, loaded on a CPU device (which runs PTX, not SASS), runs as that PTX (see
images.py). PTX the program takes out needs nothing: a CPU device runs it as it is."""
from __future__ import annotations

import ctypes
from typing import Any

from .hostmem import host_address
from .state import STATE

real: Any = None          # the real cuda.bindings.nvrtc, set by the module builder
real_v2: Any = None       # the real pythonic cuda.bindings._v2.nvrtc


def _ok(res) -> bool:
    return int(res[0] if isinstance(res, tuple) else res) == 0


def _buffer_bytes(buf, size: int) -> bytes | None:
    """What NVRTC wrote into the caller's buffer (bytes objects included: cuda-python
    writes into them in place)."""
    try:
        addr, _ = host_address(buf, "buffer")
    except Exception:
        return None
    return ctypes.string_at(addr, size) if addr and size > 0 else None


def _program_ptx(prog) -> bytes | None:
    res = real.nvrtcGetPTXSize(prog)
    if not _ok(res) or int(res[1]) <= 0:
        return None
    buf = b" " * int(res[1])
    return buf if _ok(real.nvrtcGetPTX(prog, buf)) else None


# -- the classic bindings (nvrtcResult, ...) tuples ------------------------------------------------
def nvrtcGetCUBIN(prog, cubin):
    res = real.nvrtcGetCUBIN(prog, cubin)
    if _ok(res):
        sres = real.nvrtcGetCUBINSize(prog)
        data = _buffer_bytes(cubin, int(sres[1])) if _ok(sres) else None
        ptx = _program_ptx(prog)
        if data is not None and ptx is not None:
            STATE.images.add(data, ptx)
    return res


# -- the pythonic form (cuda.bindings._v2.nvrtc: exceptions, plain returns) ----------------------
def get_cubin(prog):
    data = real_v2.get_cubin(prog)
    try:
        ptx = real_v2.get_ptx(prog)
    except Exception:   # noqa: BLE001  (no PTX from this program: the CUBIN stays a CUBIN)
        ptx = None
    if ptx is not None:
        STATE.images.add(bytes(data), bytes(ptx))
    return data
