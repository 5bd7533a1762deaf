"""Ties the images NVRTC produces in this program to the source they came from.

A CPU device cannot run PTX or a CUBIN, but it can compile the CUDA C that NVRTC compiled.
The shim records each program's source and options (nvrtcCreateProgram /
nvrtcCompileProgram) and, when the program takes the PTX or CUBIN out (nvrtcGetPTX /
nvrtcGetCUBIN and the pythonic get_ptx / get_cubin), files the image under a hash of its
bytes. Loading those bytes later (cuModuleLoadData, ...Ex, ...FatBinary, cuModuleLoad of a
file holding them) sends the source along. Also here: the image bytes a module-load call
names (bytes, arrays or a bare address), and kernel signatures read from PTX.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import re
import struct
import threading
from typing import Any

from kubecash.client.errors import CudaError, CUresult

from .hostmem import host_address

ELF_MAGIC = b"\x7fELF"
FATBIN_MAGIC = 0xBA55ED50
MAX_IMAGE = 32 << 20


@dataclasses.dataclass
class Program:
    source: str
    name: str
    options: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class KnownImage:
    kind: str                      # "ptx" or "cubin"
    source: str
    options: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]


def _key(data: bytes) -> str:
    # Programs pass images back padded, NUL-terminated, through np.char.array...: compare
    # without trailing NULs and whitespace on both sides.
    return hashlib.sha256(data.rstrip(b"\0 \t\r\n")).hexdigest()


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.programs: dict[int, Program] = {}
        self.images: dict[str, KnownImage] = {}
        self._raw: list[tuple[bytes, KnownImage]] = []   # for finding images inside fatbins

    def add_program(self, handle: int, source: bytes | str, name: Any, headers, include_names) -> None:
        src = source.decode("utf-8", "replace") if isinstance(source, (bytes, bytearray)) else str(source)
        hdrs: list[tuple[str, str]] = []
        for h, n in zip(headers or (), include_names or (), strict=False):   # nvrtc: counts may differ
            hdrs.append((_text(n), _text(h)))
        with self._lock:
            self.programs[handle] = Program(src.rstrip("\0"), _text(name or b"default_program"),
                                            (), tuple(hdrs))

    def set_options(self, handle: int, options) -> None:
        with self._lock:
            p = self.programs.get(handle)
            if p is not None:
                p.options = tuple(_text(o) for o in (options or ()))

    def drop_program(self, handle: int) -> None:
        with self._lock:
            self.programs.pop(handle, None)

    def add_image(self, handle: int, data: bytes, kind: str) -> None:
        with self._lock:
            p = self.programs.get(handle)
            if p is None or not data:
                return
            img = KnownImage(kind, p.source, p.options, p.headers)
            self.images[_key(bytes(data))] = img
            self._raw.append((bytes(data).rstrip(b"\0 \t\r\n"), img))
            del self._raw[:-64]              # enough for fatbin lookups; bounded

    def lookup(self, data: bytes) -> KnownImage | None:
        with self._lock:
            hit = self.images.get(_key(data))
            if hit is not None or not is_fatbin(data):
                return hit
            # A fatbin built from images this program made: find one of them inside.
            for raw, img in reversed(self._raw):
                if raw and raw in data:
                    return img
            return None


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


# -- NVRTC options a CPU device can honour ---------------------------------------------------
# Options that only steer GPU code generation or debugging: meaningless on a CPU, dropped.
_DROP = re.compile(
    r"(?:--?fmad(?:=\S*)?|--?ftz(?:=\S*)?|--?prec-div(?:=\S*)?|--?prec-sqrt(?:=\S*)?"
    r"|-?-use_fast_math|--?extra-device-vectorization|-G|--device-debug|-lineinfo"
    r"|--generate-line-info|-default-device|--device-as-default-execution-space"
    r"|-rdc(?:=\S*)?|--relocatable-device-code(?:=\S*)?|-dopt(?:=\S*)?|--dopt(?:=\S*)?"
    r"|-maxrregcount(?:=\S*)?|--maxrregcount(?:=\S*)?|-ewp|--extensible-whole-program"
    r"|-restrict|--restrict|-w|--disable-warnings|-Werror(?:=\S*)?|-dw|-dlto|--dlink-time-opt"
    r"|-time(?:=\S*)?|--time(?:=\S*)?|-split-compile(?:=\S*)?|--split-compile(?:=\S*)?"
    r"|-pch|--pch|-no-pch|--no-pch|-err-no|--display-error-number|-no-err-no"
    r"|--no-display-error-number|--diag-(?:suppress|error|warn)(?:=\S*)?"
    r"|-diag-(?:suppress|error|warn)(?:=\S*)?|-builtin-move-forward(?:=\S*)?"
    r"|-builtin-initializer-list(?:=\S*)?|--builtin-\S+|-std=c\+\+03|--std=c\+\+03"
    r"|-opt-info(?:=\S*)?|--optimization-info(?:=\S*)?|-?-modify-stack-limit(?:=\S*)?"
    r"|-?-minimal|-?-device-int128|-?-device-float128|-?-fdevice-syntax-only"
    r"|-?-fdevice-time-trace(?:=\S*)?|-?-Ofast-compile(?:=\S*)?|-O[0-3])\Z")
_INCLUDE = re.compile(r"(?:--include-path(?:=|\Z)|-I=?)(.*)", re.S)
_ARCH = re.compile(r"(?:-arch|--gpu-architecture)(?:=|\Z)(.*)", re.S)
_STD = re.compile(r"--?std=(.*)")


def _nvidia_header_dir(path: str) -> bool:
    """NVIDIA's own CUDA header directories: the CPU backend stands in for these headers."""
    try:
        return any(os.path.exists(os.path.join(path, f))
                   for f in ("cuda_runtime.h", "cuda.h", "cuda/std/version", "cuda_fp16.h"))
    except (OSError, ValueError):
        return False


def cpu_options(options: tuple[str, ...]) -> list[str]:
    """The NVRTC options that mean something to a CPU compile. Raises CudaError for ones
    that would need the program's files (include paths other than NVIDIA's own)."""
    out: list[str] = []
    opts = list(options)
    i = 0
    while i < len(opts):
        o = opts[i].strip()
        i += 1
        if not o:
            continue
        if o in ("-D", "--define-macro") and i < len(opts):
            out.append("-D" + opts[i].strip())
            i += 1
            continue
        if o.startswith(("-D", "--define-macro=")):
            out.append("-D" + (o[2:] if o.startswith("-D") else o.split("=", 1)[1]))
            continue
        m = _INCLUDE.match(o)
        if m:
            path = m.group(1)
            if not path and i < len(opts):
                path, i = opts[i], i + 1
            if _nvidia_header_dir(path) or not os.path.isdir(path):
                continue          # cuda_runtime.h & co. are provided; a missing dir holds nothing
            raise CudaError(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                            f"NVRTC option {o!r}: a CPU device compiles the program's source in "
                            "the broker, which cannot read include directories from the "
                            "program's file system; pass headers to nvrtcCreateProgram or "
                            "inline them")
        m = _ARCH.match(o)
        if m:
            v = m.group(1)
            if not v and i < len(opts):
                v, i = opts[i], i + 1
            out.append(f"--gpu-architecture={v}")   # sets __CUDA_ARCH__ as on the GPU
            continue
        if _DROP.match(o):
            continue
        m = _STD.match(o)
        if m:
            out.append(f"-std={m.group(1)}")
            continue
        out.append(o)             # anything else: the CPU compiler accepts it or says why
    return out


def inline_headers(source: str, headers: tuple[tuple[str, str], ...]) -> str:
    """Headers given to nvrtcCreateProgram, pasted where the source includes them (the CPU
    compiler reads no files): `#include "name"` / `<name>` of a given header is replaced."""
    if not headers:
        return source
    table = dict(headers)

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name in table:
            return f"\n{table[name]}\n"
        return m.group(0)
    for _ in range(8):            # headers including headers, bounded
        new = re.sub(r'(?m)^[ \t]*#[ \t]*include[ \t]*([<"])([^>"]+)[>"][^\n]*$', sub, source)
        if new == source:
            break
        source = new
    return source
