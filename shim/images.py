"""The image bytes a module-load call names (bytes, arrays or a bare address, a file), the
CUBINs NVRTC made in this program tied to the PTX it made with them, and kernel signatures
read from PTX.

A CPU device runs PTX. A CUBIN holds SASS only; when the program took it out of NVRTC
(nvrtcGetCUBIN, get_cubin: cuda-python's samples do, for the device's compute capability),
the shim took that program's PTX too and files it under a hash of the CUBIN's bytes, so
loading the CUBIN on a CPU device loads its PTX.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import struct
import threading
from typing import Any

from kubecash.client.errors import CudaError, CUresult

from .hostmem import host_address

ELF_MAGIC = b"\x7fELF"
FATBIN_MAGIC = 0xBA55ED50
MAX_IMAGE = 32 << 20
MAX_TIED = 256          # CUBINs remembered (a program that compiles all day stays bounded)


def _key(data: bytes) -> str:
    # Programs pass images back padded, NUL-terminated, through np.char.array...: compare
    # without trailing NULs and whitespace on both sides.
    return hashlib.sha256(data.rstrip(b"\0 \t\r\n")).hexdigest()


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ptx: dict[str, bytes] = {}     # CUBIN hash -> the PTX of the same NVRTC program

    def add(self, cubin: bytes, ptx: bytes) -> None:
        with self._lock:
            self._ptx[_key(cubin)] = ptx.rstrip(b"\0")
            while len(self._ptx) > MAX_TIED:
                del self._ptx[next(iter(self._ptx))]

    def ptx_for(self, data: bytes) -> bytes | None:
        with self._lock:
            return self._ptx.get(_key(data))


def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace").rstrip("\0")
    return str(v)


def is_fatbin(data: bytes) -> bool:
    return len(data) >= 16 and struct.unpack_from("<I", data)[0] == FATBIN_MAGIC


def image_kind(data: bytes) -> str:
    if data[:4] == ELF_MAGIC:
        return "cubin"
    if is_fatbin(data):
        return "fatbin"
    return "ptx"


def _sized_image_at(addr: int) -> bytes:
    """The image at a bare address: its length comes from its own header (ELF, fatbin) or
    its terminating NUL (PTX text), as the driver finds it."""
    head = ctypes.string_at(addr, 4)
    if head == ELF_MAGIC:
        hdr = ctypes.string_at(addr, 64)
        if hdr[4] != 2:
            raise CudaError(CUresult.CUDA_ERROR_INVALID_IMAGE, "only 64-bit ELF images are accepted")
        e_phoff, e_shoff = struct.unpack_from("<QQ", hdr, 0x20)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", hdr, 0x36)
        size = max(64, e_phoff + e_phentsize * e_phnum, e_shoff + e_shentsize * e_shnum)
        # Section contents may lie after the section table: take the furthest end.
        if e_shoff and e_shnum:
            table = ctypes.string_at(addr + e_shoff, e_shentsize * e_shnum)
            for i in range(e_shnum):
                sh_type = struct.unpack_from("<I", table, i * e_shentsize + 4)[0]
                off, sz = struct.unpack_from("<QQ", table, i * e_shentsize + 0x18)
                if sh_type != 8:          # SHT_NOBITS occupies no file space
                    size = max(size, off + sz)
        if size > MAX_IMAGE:
            raise CudaError(CUresult.CUDA_ERROR_INVALID_IMAGE, f"ELF image of {size} bytes is too large")
        return ctypes.string_at(addr, size)
    if struct.unpack("<I", head)[0] == FATBIN_MAGIC:
        _, _, hsize, fsize = struct.unpack("<IHHQ", ctypes.string_at(addr, 16))
        if hsize + fsize > MAX_IMAGE:
            raise CudaError(CUresult.CUDA_ERROR_INVALID_IMAGE, "fatbin image is too large")
        return ctypes.string_at(addr, hsize + fsize)
    return ctypes.string_at(addr)            # PTX: NUL-terminated text


def image_bytes(image: Any) -> bytes:
    """The bytes of a module image as cuModuleLoadData & co. accept it."""
    if image is None:
        raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE, "image is NULL")
    if isinstance(image, str):
        return image.encode()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, int) and not isinstance(image, bool):
        if image == 0:
            raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE, "image is NULL")
        return _sized_image_at(image)
    tobytes = getattr(image, "tobytes", None)
    if callable(tobytes) and hasattr(image, "__array_interface__"):
        return bytes(tobytes())              # numpy arrays, np.char.array(data) included
    addr, n = host_address(image, "image")
    return ctypes.string_at(addr, n) if n is not None else _sized_image_at(addr)


def read_image_file(path: Any) -> bytes:
    p = _text(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except FileNotFoundError:
        raise CudaError(CUresult.CUDA_ERROR_FILE_NOT_FOUND, f"no module file {p!r}") from None
    except OSError as e:
        raise CudaError(CUresult.CUDA_ERROR_FILE_NOT_FOUND, f"cannot read {p!r}: {e}") from None
    if len(data) > MAX_IMAGE:
        raise CudaError(CUresult.CUDA_ERROR_INVALID_IMAGE, f"{p!r} is larger than {MAX_IMAGE} bytes")
    return data


# -- kernel signatures from PTX --------------------------------------------------------------
_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$%]*)\s*\(([^)]*)\)", re.S)
_PTYPE = re.compile(r"\.(?:[usbf](8|16|32|64)|pred)\b")


def ptx_entries(text: str) -> dict[str, tuple[int, ...]]:
    """Each `.entry`'s parameter sizes in bytes, from the PTX's own declarations."""
    out: dict[str, tuple[int, ...]] = {}
    for m in _ENTRY.finditer(text):
        sizes = []
        body = m.group(2).strip()
        if body:
            for param in body.split(","):
                t = _PTYPE.search(param)
                if t is None:
                    raise ValueError(f"unparsed PTX parameter {param.strip()!r}")
                size = int(t.group(1)) // 8 if t.group(1) else 1
                arr = re.search(r"\[(\d+)\]\s*$", param.strip())
                if arr:
                    size *= int(arr.group(1))
                sizes.append(size)
        out[m.group(1)] = tuple(sizes)
    return out


def ptx_signatures(data: bytes) -> dict[str, tuple[int, ...]] | None:
    if image_kind(data) != "ptx":
        return None
    try:
        return ptx_entries(data.rstrip(b"\0").decode("utf-8", "replace"))
    except ValueError:
        return None
