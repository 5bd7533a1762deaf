"""NVRTC stays the real NVRTC (it compiles in the program and needs no device). These
wrappers only record what the CPU device needs to run the result: each program's source
and options, and which PTX/CUBIN bytes came out of it (see images.py)."""
from __future__ import annotations

import ctypes
from typing import Any

from .hostmem import host_address
from .state import STATE

real: Any = None          # the real cuda.bindings.nvrtc, set by the module builder
real_v2: Any = None       # the real pythonic cuda.bindings._v2.nvrtc


def _ok(res) -> bool:
    return int(res[0] if isinstance(res, tuple) else res) == 0


def _prog_id(prog) -> int:
    return int(prog) if prog is not None else 0


def _buffer_bytes(buf, size: int) -> bytes | None:
    """What NVRTC wrote into the caller's buffer (bytes objects included: cuda-python
    writes into them in place)."""
    try:
        addr, _ = host_address(buf, "buffer")
    except Exception:
        return None
    return ctypes.string_at(addr, size) if addr and size > 0 else None


# -- the classic bindings (nvrtcResult, ...) tuples ------------------------------------------------
def nvrtcCreateProgram(src, name, numHeaders, headers, includeNames):
    res = real.nvrtcCreateProgram(src, name, numHeaders, headers, includeNames)
    if _ok(res):
        STATE.images.add_program(_prog_id(res[1]), src, name, headers, includeNames)
    return res


def nvrtcCompileProgram(prog, numOptions, options):
    STATE.images.set_options(_prog_id(prog), options)
    return real.nvrtcCompileProgram(prog, numOptions, options)


def nvrtcDestroyProgram(prog):
    pid = _prog_id(prog)
    res = real.nvrtcDestroyProgram(prog)
    if _ok(res):
        STATE.images.drop_program(pid)
    return res


def _get(kind: str, getter, size_fn, prog, buf):
    res = getter(prog, buf)
    if _ok(res):
        sres = size_fn(prog)
        if _ok(sres):
            data = _buffer_bytes(buf, int(sres[1]))
            if data is not None:
                STATE.images.add_image(_prog_id(prog), data, kind)
    return res


def nvrtcGetPTX(prog, ptx):
    return _get("ptx", real.nvrtcGetPTX, real.nvrtcGetPTXSize, prog, ptx)


def nvrtcGetCUBIN(prog, cubin):
    return _get("cubin", real.nvrtcGetCUBIN, real.nvrtcGetCUBINSize, prog, cubin)


# -- the pythonic form (cuda.bindings._v2.nvrtc: exceptions, plain returns) ----------------------
def create_program(src, name, headers=None, include_names=None):
    prog = real_v2.create_program(src, name, headers, include_names)
    STATE.images.add_program(_prog_id(prog), src, name, headers, include_names)
    return prog


def compile_program(prog, options=None):
    STATE.images.set_options(_prog_id(prog), options)
    return real_v2.compile_program(prog, options)


def destroy_program(prog):
    pid = _prog_id(prog)
    out = real_v2.destroy_program(prog)
    STATE.images.drop_program(pid)
    return out


def get_ptx(prog):
    data = real_v2.get_ptx(prog)
    STATE.images.add_image(_prog_id(prog), bytes(data), "ptx")
    return data


def get_cubin(prog):
    data = real_v2.get_cubin(prog)
    STATE.images.add_image(_prog_id(prog), bytes(data), "cubin")
    return data
