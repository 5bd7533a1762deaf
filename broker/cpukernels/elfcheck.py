"""The one check a built module passes before any dlopen: no code of its own runs when it is
loaded or unloaded (dlopen and dlclose would run it on the executor's unconfined threads)."""
from __future__ import annotations

import struct

from .errors import KernelCompileError, UnsupportedConstructError

_DT_INIT_ARRAYSZ, _DT_FINI_ARRAYSZ, _DT_PREINIT_ARRAYSZ = 27, 28, 33


def check_load_time_code(path: str) -> None:
    """Refuse a module with initializers or finalizers of its own: dlopen/dlclose would run
    them on the executor's unconfined threads. A module built here has exactly one entry
    in each of .init_array and .fini_array (crtbegin's frame_dummy and
    __do_global_dtors_aux); a namespace-scope object with a dynamic initializer or a
    destructor adds one. (CUDA has no dynamic initialization of device variables.)"""
    with open(path, "rb") as f:
        check_load_time_image(f.read())


def check_load_time_image(data: bytes) -> None:
    """check_load_time_code on a module's bytes: what the loader checks before every dlopen,
    so an entry of the cache changed after its build is refused too."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KernelCompileError("internal error: the module is not a 64-bit little-endian ELF object")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    sizes = {}
    for i in range(phnum):
        try:
            p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        except struct.error:
            raise KernelCompileError("the module's program headers are truncated") from None
        if p_type != 2:   # PT_DYNAMIC
            continue
        if p_offset + p_filesz > len(data):
            raise KernelCompileError("the module's dynamic section is truncated")
        for off in range(p_offset, p_offset + p_filesz - 15, 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            sizes[tag] = val
    if (sizes.get(_DT_INIT_ARRAYSZ, 0) > 8 or sizes.get(_DT_FINI_ARRAYSZ, 0) > 8
            or sizes.get(_DT_PREINIT_ARRAYSZ, 0)):
        raise UnsupportedConstructError(
            "code that runs when the module is loaded or unloaded",
            "a namespace-scope variable with a dynamic initializer or a destructor; "
            "initialize globals, __device__ and __constant__ variables with constants")
