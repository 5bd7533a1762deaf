"""broker/ptx/fatbin: PTX out of the images nvcc makes (fatbins plain and compressed, CUBINs,
a shared object's .nv_fatbin), refusals naming what the image held, and a fuzz that only
NoPtxError / FatbinFormatError come out of malformed ones."""
from __future__ import annotations

import random
import re
import struct
import subprocess
import time

import numpy as np
import pytest
from toolkit import NO_NVCC, NVCC, needs_nvcc

import kubecash.client as kc
from kubecash.broker import ptx
from kubecash.broker.ptx import fatbin as F

HAVE_ZSTD = F.zstandard is not None     # the broker extra installs it
needs_zstd = pytest.mark.skipif(not HAVE_ZSTD, reason="no zstd decoder installed (zstandard)")

SRC = """
extern "C" __global__ void add(float *a, const float *b, int n)
{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) a[i] += b[i]; }
extern "C" __global__ void scale(float *a, float s, int n)
{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) a[i] *= s; }
"""
G80 = ["-gencode", "arch=compute_80,code=[sm_80,compute_80]"]
G90 = ["-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
SASS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
IMAGES = {  # name: nvcc arguments (the output kind and options)
    "plain": ["-fatbin", *G80, *G90, "--compress-mode=none"],
    "default": ["-fatbin", *G80, *G90],                       # PTX zstd-compressed
    "compress_all": ["-fatbin", *G80, *G90, "-Xfatbin", "-compress-all"],
    "size": ["-fatbin", *G80, "--compress-mode=size"],
    "speed": ["-fatbin", *G80, *G90, "--compress-mode=speed"],  # the LZ4 scheme
    "sass": ["-fatbin", *SASS],
    "cubin90": ["-cubin", "-arch=sm_90"],
    "cubin80": ["-cubin", "-arch=sm_80"],
    "cubin120": ["-cubin", "-arch=sm_120"],
    "ptx80": ["-ptx", "-arch=compute_80"],
    "ptx90": ["-ptx", "-arch=compute_90"],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    if NVCC is None:
        pytest.skip(NO_NVCC)
    d = tmp_path_factory.mktemp("fatbin")
    (d / "k.cu").write_text(SRC)
    (d / "k2.cu").write_text(SRC.replace("add", "add2").replace("scale", "scale2"))
    jobs = {name: [NVCC, *args, "k.cu", "-o", name] for name, args in IMAGES.items()}
    rng = random.Random(5)   # a long kernel: LZ4 literal and match lengths past 255
    (d / "big.cu").write_text('extern "C" __global__ void big(int *a) {\n' + "".join(
        f"  a[{rng.randrange(1 << 20)}] ^= {rng.randrange(1 << 30)} + a[{rng.randrange(1000)}];\n"
        for _ in range(300)) + "}\n")
    for mode in ("speed", "none"):
        jobs[f"big_{mode}"] = [NVCC, "-fatbin", "-arch=compute_80", f"--compress-mode={mode}", "big.cu", "-o",
                               f"big_{mode}"]
    jobs["lib.so"] = [NVCC, "-shared", "-Xcompiler", "-fPIC", *G80, "k.cu", "k2.cu", "-o", "lib.so"]
    procs = {}
    for name, cmd in jobs.items():  # a few at a time: nvcc is mostly single-threaded
        procs[name] = subprocess.Popen(cmd, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if len(procs) % 4 == 0:
            for p in procs.values():
                p.wait()
    out = {}
    for name, p in procs.items():
        log = p.communicate()[0]
        assert p.returncode == 0, f"nvcc {name}: {log.decode(errors='replace')}"
        out[name] = (d / name).read_bytes()
    return out


def tokens(text: str) -> list[str]:
    """PTX without comments, whitespace and trailing NULs: nvcc strips the first two in fatbins."""
    return re.sub(r"//[^\n]*", "", text.rstrip("\0")).split()


def target(text: str) -> str:
    return re.search(r"^\s*\.target\s+(\w+)", text, re.M).group(1)


@needs_nvcc
@pytest.mark.parametrize("name", ["plain", "speed",
                                  pytest.param("default", marks=needs_zstd),
                                  pytest.param("compress_all", marks=needs_zstd),
                                  pytest.param("size", marks=needs_zstd)])
def test_ptx_from_fatbin_matches_nvcc_ptx(images, name):
    text = F.ptx_from_image(images[name])
    want = "ptx80" if name == "size" else "ptx90"   # the highest arch's PTX is chosen
    assert target(text) == f"sm_{want[3:]}"
    assert tokens(text) == tokens(images[want].decode())
    assert "\0" not in text


@needs_nvcc
def test_lz4_long_entry(images):
    e, = F.entries(images["big_speed"])
    assert e.flags & F.FLAG_LZ4 and len(e.payload) < e.size // 2 and e.size > 40000
    assert F.ptx_from_image(images["big_speed"]) == F.ptx_from_image(images["big_none"])


@needs_nvcc
def test_entries_and_flags(images):
    es = F.entries(images["speed"])
    assert [(e.kind, e.arch) for e in es] == [(2, 80), (1, 80), (2, 90), (1, 90)]
    assert all(e.flags & F.FLAG_LZ4 for e in es if e.is_ptx)
    assert images["cubin80"] == F.entries(images["plain"])[0].data()   # the SASS entry is the cubin
    if HAVE_ZSTD:
        es = F.entries(images["compress_all"])
        assert all(e.flags & F.FLAG_ZSTD for e in es)
        assert es[0].data() == images["cubin80"]


@needs_nvcc
def test_extracted_ptx_translates(images):
    cpp = ptx.to_cpp(F.ptx_from_image(images["plain"]))
    assert "add" in cpp and "scale" in cpp


def test_ptx_text_passes_through():
    text = ".version 8.0\n.target sm_80\n.address_size 64\n"
    assert F.ptx_from_image(text.encode() + b"\0\0") == text
    assert F.describe(text.encode()) == "PTX text (.version 8.0, .target sm_80)"


@needs_nvcc
def test_sass_only_and_cubins_refused_naming_archs(images):
    with pytest.raises(F.NoPtxError, match=r"a fatbin with SASS for sm_80, sm_90 only \(no PTX\)"):
        F.ptx_from_image(images["sass"])
    for name, arch in [("cubin80", 80), ("cubin90", 90), ("cubin120", 120)]:
        with pytest.raises(F.NoPtxError, match=rf"a CUBIN \(ELF, SASS for sm_{arch}\): a CPU device runs PTX"):
            F.ptx_from_image(images[name])
        assert F.describe(images[name]) == f"a CUBIN (ELF, SASS for sm_{arch})"
    assert F.describe(images["plain"]) == "a fatbin with PTX 9.0 for compute_80, compute_90; SASS for sm_80, sm_90"


@needs_nvcc
def test_shared_object_containers(images):
    so = images["lib.so"]
    with pytest.raises(F.FatbinFormatError, match="not a CUDA image"):
        F.ptx_from_image(so)
    containers = F.fatbins_in_elf(so)
    with_ptx = [c for c in containers if any(e.is_ptx for e in F.entries(c))]
    assert len(with_ptx) == 2         # one a translation unit (and one SASS-only from the device link)
    if HAVE_ZSTD:                     # nvcc's default: the PTX entries are zstd-compressed
        texts = [F.ptx_from_image(c) for c in with_ptx]
        assert sorted(tokens(t) == tokens(images["ptx80"].decode()) for t in texts) == [False, True]
        assert any(".entry add2" in t for t in texts)
    # the concatenated section reads as one image too
    sec = b"".join(containers)
    assert len(F.entries(sec)) == sum(len(F.entries(c)) for c in containers)


@needs_nvcc
def test_fatbin_from_wrapper(images):
    blob = images["plain"]
    mem = {0x1000: struct.pack("<IIQQ", F.WRAPPER_MAGIC, 1, 0x8000, 0), 0x8000: blob}

    def read(addr, n):
        for base, b in mem.items():
            if base <= addr < base + len(b):
                return b[addr - base:addr - base + n]
        return b""
    assert F.fatbin_from_wrapper(read, 0x1000) == blob
    assert F.fatbin_from_wrapper(read, 0x8000) == blob
    with pytest.raises(F.FatbinFormatError):
        F.fatbin_from_wrapper(read, 0x1004)
    with pytest.raises(F.FatbinFormatError, match="wrapper"):
        F.ptx_from_image(mem[0x1000])


def _container(kind=1, flags=0, payload=b"", usize=0, csize=None, psize=None, ehsize=64, fat=None):
    entry = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x101, ehsize, len(payload) if psize is None else psize,
                        len(payload) if csize is None else csize, 0, 0, 9, 80, 0, 0, flags, 0, usize)
    body = entry + b"\0" * (ehsize - 64) + payload
    return struct.pack("<IHHQ", F.FATBIN_MAGIC, 1, 16, len(body) if fat is None else fat) + body


@pytest.mark.parametrize("blob, match", [
    (_container(fat=1000, payload=b".version 9.0\n"), "runs past the end"),
    (_container(psize=999, payload=b".version 9.0\n"), "runs past its container"),
    (_container(ehsize=8, payload=b"x" * 64), "runs past its container"),
    (_container(flags=F.FLAG_LZ4, payload=b"\xf0", usize=100), "ends inside a length"),
    (_container(flags=F.FLAG_LZ4, payload=b"\x11A\x05\x00", usize=100), "before the start"),
    (_container(flags=F.FLAG_LZ4, payload=b"\x1fA\x01\x00\xff\xff\xff\xff", usize=1 << 40), "limit"),
    (_container(flags=F.FLAG_LZ4, payload=b"\x1fA\x01\x00\xff\xff\xff\xff\xff\xff\xff", usize=200), "past"),
    (_container(flags=F.FLAG_ZSTD, payload=b"\x28\xb5\x2f\xfdjunk", usize=1 << 40), "limit"),
    (_container(flags=F.FLAG_ZSTD, payload=b"notzstd", usize=10), "without a zstd frame"),
    (_container(flags=F.FLAG_LZ4, payload=b"ab", csize=9), "compressed size"),
    (_container(payload=b".version 9.0\n\xff\xfe"), "not UTF-8"),
    (struct.pack("<IHHQ", F.FATBIN_MAGIC, 1, 16, 0) * 5000, "more than"),
    (struct.pack("<IHHQ", F.FATBIN_MAGIC, 2, 16, 0), "version"),
    (struct.pack("<IHH", F.FATBIN_MAGIC, 1, 16), "truncated fatbin header"),
    (_container() + b"\0\0\0" + b"junk" * 5, "bad fatbin magic"),
    (b"\x00\x01\x02garbage", "neither PTX"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_raise_format_error(blob, match):
    with pytest.raises(F.FatbinFormatError, match=match) as e:
        F.ptx_from_image(blob)
    assert "offset 0x" in str(e.value)
    assert isinstance(F.describe(blob), str)


def test_lz4_overlapping_match():
    # 'a' then a match of 19 at offset 1: 20 'a's, then literal "b"
    payload = bytes([0x1F, ord("a"), 1, 0, 0]) + bytes([0x10, ord("b")])
    blob = _container(flags=F.FLAG_LZ4, payload=payload, usize=21)
    assert F.entries(blob)[0].data() == b"a" * 20 + b"b"


def _mutants(blob: bytes, rng: random.Random, count: int):
    for _ in range(count):
        b = bytearray(blob)
        r = rng.random()
        if r < 0.3:
            yield bytes(b[:rng.randrange(len(b))])
        else:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(min(len(b), 256) if rng.random() < 0.6 else len(b))
                b[i] = rng.randrange(256) if rng.random() < 0.7 else b[i] ^ (1 << rng.randrange(8))
            yield bytes(b)


@needs_nvcc
def test_fuzz_only_our_exceptions(images):
    rng = random.Random(1234)
    seeds = [images[n] for n in ("plain", "speed", "sass", "cubin90", "default", "compress_all")]
    seeds += F.fatbins_in_elf(images["lib.so"])
    t0 = time.monotonic()
    for seed in seeds:
        for m in _mutants(seed, rng, 1500):
            try:
                F.ptx_from_image(m)
            except (F.NoPtxError, F.FatbinFormatError):
                pass
            assert isinstance(F.describe(m), str)
        try:
            F.fatbins_in_elf(images["lib.so"][:rng.randrange(len(images["lib.so"]))])
        except F.FatbinFormatError:
            pass
    assert time.monotonic() - t0 < 20


def test_large_bounded_inputs_are_quick():
    t0 = time.monotonic()
    # many empty containers with NUL gaps: linear, and capped
    blob = (struct.pack("<IHHQ", F.FATBIN_MAGIC, 1, 16, 0) + b"\0") * 3000
    assert F.entries(blob) == []
    # an LZ4 run of 32 MiB from a few bytes is allowed (under the cap) and quick
    n = 32 << 20
    ext = b"\xff" * ((n - 1 - 4 - 15) // 255) + bytes([(n - 1 - 4 - 15) % 255])
    payload = bytes([0x1F, ord("a"), 1, 0]) + ext
    assert len(F.entries(_container(flags=F.FLAG_LZ4, payload=payload, usize=n))[0].data()) == n
    assert time.monotonic() - t0 < 10


@needs_nvcc
def test_zstd_without_decoder_is_a_format_error_saying_so(images, monkeypatch):
    monkeypatch.setattr(F, "zstandard", None)
    with pytest.raises(F.FatbinFormatError, match="zstandard"):
        F.ptx_from_image(images["default"])
    assert F.ptx_from_image(images["speed"])     # LZ4 and plain entries need no package


@needs_nvcc
@needs_zstd
def test_an_nvcc_fatbin_runs_on_the_cpu_device_and_sass_is_refused_naming_its_sms(images, session):
    """Through the client and the executor: the fatbin's best PTX entry runs; a fatbin of SASS
    only is NO_BINARY_FOR_GPU naming what it held."""
    dev = session.device("cpu0")
    m = dev.load_module(image=images["default"], kind="fatbin")
    a, b = np.arange(64, dtype=np.float32), np.full(64, 2.0, np.float32)
    with dev.allocate(a.nbytes) as da, dev.allocate(b.nbytes) as db:
        da.copy_from(a)
        db.copy_from(b)
        dev.launch(m.get_kernel("add"), (1,), (64,), [da, db, np.int32(64)])
        np.testing.assert_array_equal(da.copy_to(np.empty_like(a)), a + b)
    with pytest.raises(kc.CudaError, match="SASS for sm_80, sm_90") as e:
        dev.load_module(image=images["sass"], kind="fatbin")
    assert e.value.name == "CUDA_ERROR_NO_BINARY_FOR_GPU"


@needs_zstd
def test_a_zstd_bomb_is_refused_before_it_is_decompressed():
    """Found by an attacker review: zstandard's decompress() trusts the frame's declared
    size over max_output_size. 16 KiB that would become 512 MiB: refused at once."""
    bomb = F.zstandard.ZstdCompressor().compress(b"\0" * (512 << 20))
    t0 = time.monotonic()
    with pytest.raises(F.FatbinFormatError, match="declares"):
        F.entries(_container(flags=F.FLAG_ZSTD, payload=bomb, usize=100))[0].data()
    assert time.monotonic() - t0 < 2
