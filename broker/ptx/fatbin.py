"""The images a program hands cuModuleLoadData / cuModuleLoadFatBinary, read for the CPU
backend: PTX text, NVIDIA fatbin containers (as ``nvcc -fatbin`` writes them, as an
executable's ``.nv_fatbin`` section holds them, as the runtime registers them) and bare
CUBINs. The CPU backend runs PTX, so the one question here is "which PTX, if any?".

Public API
----------
- ``ptx_from_image(data) -> str``     the PTX text to run (NoPtxError, FatbinFormatError)
- ``describe(data) -> str``           one line naming what an image holds (never raises)
- ``entries(data) -> list[Entry]``    every entry of every container in a fatbin
- ``fatbins_in_elf(data) -> list[bytes]``  the containers of a host ELF's ``.nv_fatbin``
- ``fatbin_from_wrapper(read_memory, addr) -> bytes``  the container a runtime wrapper points to
- ``NoPtxError``, ``FatbinFormatError`` (both ValueError); nothing else escapes.

Container layout (little-endian)
--------------------------------
A fatbin is one or more containers laid end to end (an executable's ``.nv_fatbin`` holds
one a translation unit, plus one from the device link). A container::

    0x00 u32 magic        0xBA55ED50
    0x04 u16 version      1
    0x06 u16 header_size  16: the first entry is at container + header_size
    0x08 u64 fat_size     bytes of entries after the header; next container at
                          container + header_size + fat_size

followed by entries, each an entry header and its payload::

    0x00 u16 kind         1 = PTX text, 2 = ELF (CUBIN, SASS); 0x10 a second ELF kind
    0x02 u16 (0x0101)
    0x04 u32 header_size  64; nvcc 13 writes 80 for PTX and 112 for sm_100+ ELF (an
                          extension block after the 64 bytes; payload at entry + header_size)
    0x08 u64 payload_size bytes of payload (padded to 8); next entry at
                          entry + header_size + payload_size
    0x10 u32 compressed_size   bytes of compressed data (0 when not compressed)
    0x14 u32 (0, or 0x40 when the header has the extension)
    0x18 u16 minor        PTX: the ISA version (9.0 for CUDA 13); ELF: the ELF ABI (1.8)
    0x1a u16 major
    0x1c u32 arch         the SM/compute capability times ten (80 = sm_80/compute_80)
    0x20 u32 name offset, 0x24 u32 name length (of an object name; 0 from nvcc)
    0x28 u64 flags        0x1 64-bit, 0x2 debug, 0x10 Linux host, 0x2000 compressed with
                          NVIDIA's LZ4 scheme, 0x8000 compressed with zstd
    0x30 u64 (0)
    0x38 u64 uncompressed_size (0 when not compressed)

Compression, as nvcc 13.0 writes it (established by compiling one .cu with each option and
reading the headers back): ``--compress-mode=default`` and ``balance`` compress PTX entries
with zstd (flag 0x8000, payload a standard zstd frame, magic 28 B5 2F FD) and leave SASS
plain; ``size`` and ``-Xfatbin -compress-all`` compress both with zstd; ``speed`` uses the
older scheme (flag 0x2000), which is the LZ4 *block* format without a frame (a token whose
high nibble is the literal length and low nibble the match length minus 4, each 15
continued by bytes while 255, then a 2-byte little-endian back offset); ``none`` stores
plain payloads. The LZ4 decoder here is ours, pure Python, bounded by the header's size;
zstd is decoded by the ``zstandard`` package (the broker extra installs it: zstd is too
involved for a short bounded decoder of our own); without it a zstd entry is refused with a
FatbinFormatError that says so. PTX in a fatbin is
nvcc's PTX with its comments removed and whitespace collapsed, NUL-padded.

CUBINs are ELF64 with e_machine 190 (EM_CUDA). The SM is in e_flags: bits 0-7 for the
ELF ABI version 7 of earlier CUDA (sm_70: 0x460546, per reprospect), bits 8-15 for ABI
version 8 that nvcc 13 writes (sm_80: 0x6005004, sm_90: 0x6005A04, sm_100:
0x6006402, sm_120: 0x6007802, read from nvcc 13 ``-cubin`` output).

The runtime registers a wrapper (``__fatBinC_Wrapper_t``, in ``.nvFatBinSegment``): u32
magic 0x466243B1, u32 version (1, or 2 for prelinked), u64 address of the container,
u64 filename or prelinked-fatbin list.

Public references read: n-eiling/cuda-fatbin-decompression (fatbin-decompress.h/.c: the
header structs, the compressed flag 0x2000, the LZ4-like decoder); jiegec/fatbinary (lib.rs,
fatbinary.ksy: the same layout as a Kaitai description); GrigoryEvko/nvopen-tools
fatbin/FORMAT_SPECIFICATION.md (entry traversal, the 80/112-byte headers of CUDA 12.8+,
zstd payloads, flag 0x8000); a Rust binding's comment quoting CUDA's fatbinary header
(``__fatBinC_Wrapper_t``, ``fatBinaryHeader``); the reprospect project's cubin ELF reader
and its tests (the ABI-7 e_flags values, after LLVM's BinaryFormat/ELF.h). Every field
used here was checked against nvcc 13.0 output (-fatbin with each compression mode, -cubin
for sm_75..sm_120, -shared).
"""
from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

try:
    import zstandard  # imported now: executors lose their view of site-packages once confined
except ImportError:     # the broker extra installs it; without it zstd entries are refused
    zstandard = None

__all__ = ["NoPtxError", "FatbinFormatError", "Entry", "ptx_from_image", "describe", "entries",
           "fatbins_in_elf", "fatbin_from_wrapper"]

FATBIN_MAGIC = 0xBA55ED50
WRAPPER_MAGIC = 0x466243B1
KIND_PTX, KIND_ELF, KIND_ELF2 = 1, 2, 0x10
FLAG_LZ4, FLAG_ZSTD = 0x2000, 0x8000
EM_CUDA = 190
MAX_OUTPUT = 64 << 20     # the most one entry may decompress to, and the most a wrapper reads
MAX_ENTRIES = 4096        # entries in all containers of one image
PTX_VERSIONS = range(7, 10)   # .version majors the translator reads

_HEADER = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HHIQIIHHIIIQQQ")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NONZERO = re.compile(rb"[^\0]")


class FatbinFormatError(ValueError):
    """A malformed image (CUDA_ERROR_INVALID_IMAGE): names the problem and its offset."""


class NoPtxError(ValueError):
    """A well-formed image with no PTX the CPU device can run (CUDA_ERROR_NO_BINARY_FOR_GPU)."""


@dataclass(frozen=True)
class Entry:
    kind: int
    arch: int
    version: tuple[int, int]     # (major, minor)
    flags: int
    offset: int                  # of the entry header, from the image's start
    payload: bytes               # as stored (compressed or not), without its padding
    size: int                    # uncompressed size the header gives (len(payload) if plain)

    @property
    def is_ptx(self) -> bool:
        return self.kind == KIND_PTX

    def name(self) -> str:
        return f"{'compute' if self.is_ptx else 'sm'}_{self.arch}"

    def data(self) -> bytes:
        """The payload, decompressed (FatbinFormatError if it does not decompress)."""
        if self.flags & FLAG_ZSTD:
            return _zstd(self.payload, self.size, self.offset)
        if self.flags & FLAG_LZ4:
            return _lz4(self.payload, self.size, self.offset)
        return self.payload


def _bad(message: str, offset: int) -> FatbinFormatError:
    return FatbinFormatError(f"{message} (at offset {offset:#x})")


def _lz4(src: bytes, size: int, where: int) -> bytes:
    """The LZ4 block format, to exactly `size` bytes (at most MAX_OUTPUT)."""
    if size > MAX_OUTPUT:
        raise _bad(f"compressed entry claims {size} bytes, over the {MAX_OUTPUT} limit", where)
    out = bytearray()
    p, n = 0, len(src)

    def length(base: int) -> int:
        nonlocal p
        if base != 15:
            return base
        while True:
            if p >= n:
                raise _bad("LZ4 data ends inside a length", where)
            b = src[p]
            p += 1
            base += b
            if base > size:
                raise _bad("LZ4 length past the entry's size", where)
            if b != 255:
                return base

    while p < n:
        token = src[p]
        p += 1
        lit = length(token >> 4)
        if p + lit > n or len(out) + lit > size:
            raise _bad("LZ4 literals past the end", where)
        out += src[p:p + lit]
        p += lit
        if p >= n or len(out) == size:
            break                      # the last sequence has literals only
        if p + 2 > n:
            raise _bad("LZ4 data ends inside an offset", where)
        off = src[p] | src[p + 1] << 8
        p += 2
        match = length(token & 15) + 4
        if off == 0 or off > len(out):
            raise _bad(f"LZ4 back offset {off} before the start", where)
        if len(out) + match > size:
            raise _bad("LZ4 match past the entry's size", where)
        start = len(out) - off
        if match <= off:
            out += out[start:start + match]
        else:                          # overlapping: the last `off` bytes repeated
            out += (out[start:] * (match // off + 1))[:match]
    if len(out) != size:
        raise _bad(f"LZ4 data decompresses to {len(out)} bytes, the header says {size}", where)
    return bytes(out)


def _zstd(src: bytes, size: int, where: int) -> bytes:
    if size > MAX_OUTPUT:
        raise _bad(f"compressed entry claims {size} bytes, over the {MAX_OUTPUT} limit", where)
    if src[:4] != _ZSTD_MAGIC:
        raise _bad("zstd-flagged entry without a zstd frame", where)
    if zstandard is None:
        raise _bad("a zstd-compressed entry (nvcc 13's default for PTX), and no zstd decoder here: "
                   "install the 'zstandard' package", where)
    try:
        # decompress() trusts a frame's declared content size over max_output_size: check it
        # first, and read through a stream (bounded by the header's size) either way.
        declared = zstandard.get_frame_parameters(src).content_size
        if declared not in (0, zstandard.CONTENTSIZE_UNKNOWN) and declared > size:
            raise _bad(f"zstd frame declares {declared} bytes, the entry header {size}", where)
        with zstandard.ZstdDecompressor().stream_reader(src) as r:
            out = bytearray()
            while len(out) <= size:
                chunk = r.read(min(1 << 20, size + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except (zstandard.ZstdError, MemoryError) as e:
        raise _bad(f"zstd data does not decompress: {e or 'out of memory'}", where) from None
    if len(out) != size:
        raise _bad(f"zstd data decompresses to {len(out)}+ bytes, the header says {size}", where)
    return bytes(out)


def entries(data: bytes) -> list[Entry]:
    """Every entry of the containers laid end to end in `data` (NUL padding between them
    allowed). FatbinFormatError on anything malformed."""
    data = bytes(data)
    out: list[Entry] = []
    pos, n, containers = 0, len(data), 0
    while pos < n:
        if data[pos] == 0:             # padding between containers, or after the last
            m = _NONZERO.search(data, pos)
            if m is None:
                break
            pos = m.start()
        containers += 1
        if containers + len(out) > MAX_ENTRIES:
            raise _bad(f"more than {MAX_ENTRIES} fatbin containers and entries", pos)
        if pos + _HEADER.size > n:
            raise _bad("truncated fatbin header", pos)
        magic, version, hsize, fat = _HEADER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:
            raise _bad(f"bad fatbin magic {magic:#010x}", pos)
        if version != 1 or hsize < _HEADER.size:
            raise _bad(f"unknown fatbin version {version} / header size {hsize}", pos)
        end = pos + hsize + fat
        if end > n:
            raise _bad(f"fatbin container of {fat} bytes runs past the end ({n} bytes)", pos)
        p = pos + hsize
        while p < end:
            if containers + len(out) >= MAX_ENTRIES:
                raise _bad(f"more than {MAX_ENTRIES} fatbin containers and entries", p)
            if p + _ENTRY.size > end:
                raise _bad("truncated fatbin entry header", p)
            (kind, _, ehsize, psize, csize, _, minor, major, arch, _, _, flags, _,
             usize) = _ENTRY.unpack_from(data, p)
            if ehsize < _ENTRY.size or p + ehsize + psize > end:
                raise _bad(f"fatbin entry (header {ehsize}, payload {psize} bytes) runs past its container", p)
            start = p + ehsize
            if flags & (FLAG_LZ4 | FLAG_ZSTD):
                if csize > psize:
                    raise _bad(f"compressed size {csize} past the payload's {psize}", p)
                payload, size = data[start:start + csize], usize
            else:
                payload = data[start:start + psize]
                size = len(payload)
            out.append(Entry(kind, arch, (major, minor), flags, p, payload, size))
            p = start + psize
        pos = end
    return out


def _ptx_text(raw: bytes, where: int) -> str:
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"PTX that is not UTF-8 text (byte {e.start})", where) from None


def _archs(es: list[Entry]) -> str:
    return ", ".join(sorted({e.name() for e in es}, key=lambda s: (len(s), s)))


def _cubin_arch(data: bytes) -> int | None:
    """The SM of a CUDA ELF, or None when `data` is not one (too short, another machine)."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    if struct.unpack_from("<H", data, 18)[0] != EM_CUDA:
        return None
    flags = struct.unpack_from("<I", data, 48)[0]
    return (flags >> 8) & 0xFF if data[8] >= 8 else flags & 0xFF


def _elf_machine(data: bytes) -> int | None:
    if len(data) < 20 or data[:4] != b"\x7fELF":
        return None
    return struct.unpack_from("<H" if data[5] != 2 else ">H", data, 18)[0]


def _fatbin_summary(es: list[Entry]) -> str:
    ptx = [e for e in es if e.is_ptx]
    sass = [e for e in es if e.kind in (KIND_ELF, KIND_ELF2)]
    parts = []
    if ptx:
        vs = sorted({f"{e.version[0]}.{e.version[1]}" for e in ptx})
        parts.append(f"PTX {'/'.join(vs)} for {_archs(ptx)}")
    if sass:
        parts.append(f"SASS for {_archs(sass)}")
    other = len(es) - len(ptx) - len(sass)
    if other:
        parts.append(f"{other} entries of other kinds")
    return "; ".join(parts) if parts else "no entries"


def ptx_from_image(data: bytes) -> str:
    """The PTX text to run for an image passed to cuModuleLoadData / cuModuleLoadFatBinary.

    PTX text comes back as it is (up to a NUL); from a fatbin, the PTX entry of the highest
    arch among those whose ISA version the translator reads (then the highest version).
    NoPtxError when the image holds no such PTX; FatbinFormatError when it is malformed."""
    data = bytes(data)
    if len(data) >= 4:
        magic = struct.unpack_from("<I", data, 0)[0]
        if magic == FATBIN_MAGIC:
            es = entries(data)
            ptx = [e for e in es if e.is_ptx]
            usable = [e for e in ptx if e.version[0] in PTX_VERSIONS]
            if not usable:
                what = f"a fatbin with {_fatbin_summary(es)}"
                if not ptx:
                    raise NoPtxError(f"{what} only (no PTX)" if es else f"{what} (no PTX)")
                raise NoPtxError(f"{what}: no PTX of ISA version 7.x-9.x, which the CPU device reads")
            best = max(usable, key=lambda e: (e.arch, e.version))
            return _ptx_text(best.data(), best.offset)
        if magic == WRAPPER_MAGIC:
            raise FatbinFormatError("a fatbin wrapper (magic 0x466243b1), not a container: read the "
                                    "container it points to (fatbin_from_wrapper) (at offset 0x0)")
        if data[:4] == b"\x7fELF":
            arch = _cubin_arch(data)
            if arch is not None:
                raise NoPtxError(f"a CUBIN (ELF, SASS for sm_{arch}): a CPU device runs PTX")
            raise FatbinFormatError(f"an ELF for machine {_elf_machine(data)}, not a CUDA image (at offset 0x0)")
    text = _ptx_text(data, 0)
    if not text.strip() or "\ufffd" in text or any(c < " " and c not in "\t\n\r\f\v" for c in text):
        raise FatbinFormatError("neither PTX text nor a fatbin nor a CUBIN (at offset 0x0)")
    return text


_VERSION = re.compile(r"^\s*\.version\s+(\d+\.\d+)", re.M)
_TARGET = re.compile(r"^\s*\.target\s+([\w, ]+)", re.M)


def describe(data: bytes) -> str:
    """One line naming what an image holds, for error messages. Never raises."""
    data = bytes(data)
    if len(data) >= 4 and struct.unpack_from("<I", data, 0)[0] == FATBIN_MAGIC:
        try:
            es = entries(data)
        except FatbinFormatError as e:
            return f"a malformed fatbin: {e}"
        return f"a fatbin with {_fatbin_summary(es)}"
    if len(data) >= 4 and struct.unpack_from("<I", data, 0)[0] == WRAPPER_MAGIC:
        return "a fatbin wrapper (the struct __cudaRegisterFatBinary takes), not a container"
    if data[:4] == b"\x7fELF":
        arch = _cubin_arch(data)
        if arch is not None:
            return f"a CUBIN (ELF, SASS for sm_{arch})"
        return f"an ELF for machine {_elf_machine(data)}, not a CUDA image"
    head = data[:65536].split(b"\0", 1)[0].decode("utf-8", "replace")
    v, t = _VERSION.search(head), _TARGET.search(head)
    if v:
        return f"PTX text (.version {v.group(1)}" + (f", .target {t.group(1).strip()})" if t else ")")
    return f"{len(data)} bytes that are neither PTX text nor a fatbin nor a CUBIN"


def fatbins_in_elf(data: bytes) -> list[bytes]:
    """The fatbin containers in a host ELF64 (executable, shared object, object file): the
    ``.nv_fatbin`` section, one container each, in order. [] when there is none."""
    data = bytes(data)
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise FatbinFormatError("not an ELF file (at offset 0x0)")
    if data[4] != 2 or data[5] != 1:
        raise FatbinFormatError("not a little-endian ELF64 (at offset 0x4)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shnum == 0:
        return []
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise FatbinFormatError(f"ELF section headers past the end (at offset {shoff:#x})")

    def section(i: int) -> tuple[int, int, int]:
        h = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, h)
        off, size = struct.unpack_from("<QQ", data, h + 0x18)
        stype, = struct.unpack_from("<I", data, h + 4)
        if stype != 8 and off + size > len(data):   # SHT_NOBITS has no bytes in the file
            raise FatbinFormatError(f"ELF section {i} past the end (at offset {h:#x})")
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    names = data[stroff:stroff + strsize]
    out: list[bytes] = []
    for i in range(shnum):
        name, off, size = section(i)
        if names[name:name + 11] == b".nv_fatbin\0":
            sec = data[off:off + size]
            pos = 0
            while pos + _HEADER.size <= len(sec):
                if sec[pos] == 0:
                    m = _NONZERO.search(sec, pos)
                    if m is None:
                        break
                    pos = m.start()
                    continue
                magic, _, hsize, fat = _HEADER.unpack_from(sec, pos)
                if magic != FATBIN_MAGIC or pos + hsize + fat > len(sec):
                    raise FatbinFormatError(f"bad fatbin container in .nv_fatbin (at offset {off + pos:#x})")
                out.append(sec[pos:pos + hsize + fat])
                pos += hsize + fat
    return out


def fatbin_from_wrapper(read_memory: Callable[[int, int], bytes], addr: int) -> bytes:
    """The container the runtime's wrapper struct at `addr` points to, read through
    `read_memory(address, length)`; also accepts `addr` pointing at a container itself."""
    head = bytes(read_memory(addr, 16))
    if len(head) < 16:
        raise FatbinFormatError(f"short read of the fatbin wrapper (at address {addr:#x})")
    magic, = struct.unpack_from("<I", head, 0)
    if magic == WRAPPER_MAGIC:
        addr, = struct.unpack_from("<Q", head, 8)
        head = bytes(read_memory(addr, 16))
        if len(head) < 16:
            raise FatbinFormatError(f"short read of the fatbin header (at address {addr:#x})")
        magic, = struct.unpack_from("<I", head, 0)
    if magic != FATBIN_MAGIC:
        raise FatbinFormatError(f"bad fatbin magic {magic:#010x} (at address {addr:#x})")
    _, _, hsize, fat = _HEADER.unpack_from(head, 0)
    if hsize + fat > MAX_OUTPUT:
        raise FatbinFormatError(f"fatbin of {hsize + fat} bytes, over the {MAX_OUTPUT} limit (at address {addr:#x})")
    data = bytes(read_memory(addr, hsize + fat))
    if len(data) != hsize + fat:
        raise FatbinFormatError(f"short read of the fatbin (at address {addr:#x})")
    return data
