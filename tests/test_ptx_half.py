"""Half-precision PTX arithmetic (.f16 .f16x2 .bf16 .bf16x2) and directed rounding (.rz .rm
.rp), bit-exact against references: exact rational arithmetic (fractions) rounded once as
IEEE 754 defines, and numpy's float16 where it is exact."""
from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
from conftest import SANDBOX

from kubecash.broker import cpukernels as ck

FMT = {"f16": (5, 10), "bf16": (8, 7)}
NAN16 = 0x7FFF


def decode(bits: int, fmt: str) -> float:
    if fmt == "f16":
        return float(np.array([bits], np.uint16).view(np.float16)[0])
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def round_to(x: Fraction | float, fmt: str, mode: str = "rn", zero_neg: bool = False) -> int:
    """x rounded once to the format; an exact zero gets the sign zero_neg says."""
    E, M = FMT[fmt]
    bias, sign_bit = (1 << (E - 1)) - 1, 1 << (E + M)
    inf = ((1 << E) - 1) << M
    if isinstance(x, float) and math.isnan(x):
        return NAN16
    if isinstance(x, float) and math.isinf(x):
        return inf | (sign_bit if x < 0 else 0)
    x = Fraction(x)
    if x == 0:
        return sign_bit if zero_neg else 0
    neg, a = x < 0, abs(x)
    sg = sign_bit if neg else 0
    up = (mode == "rp" and not neg) or (mode == "rm" and neg)
    ex = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** ex > a:
        ex -= 1
    if ex > bias:
        return sg | (inf if mode == "rn" or up else inf - 1)
    ex = max(ex, 1 - bias)
    r = a / Fraction(2) ** (ex - M)
    n, f = divmod(r.numerator, r.denominator)
    f = Fraction(f, r.denominator)
    if f and (f > Fraction(1, 2) or (f == Fraction(1, 2) and n % 2) if mode == "rn" else up):
        n += 1
    return sg | (((ex + bias) << M) + n - (1 << M))


def sum_zero_neg(signs: list[bool], mode: str) -> bool:
    """IEEE's sign of an exact zero sum: the terms' common sign where they share one, else
    -0 only when rounding down."""
    return all(signs) if len(set(signs)) == 1 else mode == "rm"


# One kernel per case; operands and results in 64-bit slots (a 16-bit value in the low bits).
HEAD = """.version 7.8
.target sm_80
.address_size 64
"""
KERNEL = """
.visible .entry {name}(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 po)
{{
    .reg .b64 %xa, %xb, %xc, %xo, %p0, %p1, %p2, %p3, %off;
    .reg .b32 %ra, %rb, %rc, %ro, %tid;
    .reg .b16 %ha, %hb, %hc, %ho;
    .reg .f32 %fa, %fb, %fc, %fo;
    .reg .f64 %da, %db, %dc, %do;
    .reg .pred %p, %q;
    ld.param.u64 %p0, [pa]; ld.param.u64 %p1, [pb]; ld.param.u64 %p2, [pc]; ld.param.u64 %p3, [po];
    mov.u32 %tid, %tid.x;
    mul.wide.u32 %off, %tid, 8;
    add.s64 %p0, %p0, %off; add.s64 %p1, %p1, %off; add.s64 %p2, %p2, %off; add.s64 %p3, %p3, %off;
    ld.global.u64 %xa, [%p0]; ld.global.u64 %xb, [%p1]; ld.global.u64 %xc, [%p2];
    cvt.u32.u64 %ra, %xa; cvt.u32.u64 %rb, %xb; cvt.u32.u64 %rc, %xc;
    cvt.u16.u64 %ha, %xa; cvt.u16.u64 %hb, %xb; cvt.u16.u64 %hc, %xc;
    mov.b32 %fa, %ra; mov.b32 %fb, %rb; mov.b32 %fc, %rc;
    mov.b64 %da, %xa; mov.b64 %db, %xb; mov.b64 %dc, %xc;
    mov.u64 %xo, 0;
    {body}
    st.global.u64 [%p3], %xo;
}}
"""
OUT16 = "cvt.u64.u16 %xo, %ho;"
OUT32 = "cvt.u64.u32 %xo, %ro;"
OUTF = "mov.b32 %ro, %fo; cvt.u64.u32 %xo, %ro;"
OUTD = "mov.b64 %xo, %do;"
OUTPQ = "selp.u32 %ro, 1, 0, %p; cvt.u64.u32 %xo, %ro; selp.u64 %off, 2, 0, %q; or.b64 %xo, %xo, %off;"

CASES = {
    # name: body
    "add_f16": "add.f16 %ho, %ha, %hb;" + OUT16,
    "add_rn_f16": "add.rn.f16 %ho, %ha, %hb;" + OUT16,
    "sub_f16": "sub.f16 %ho, %ha, %hb;" + OUT16,
    "mul_f16": "mul.f16 %ho, %ha, %hb;" + OUT16,
    "fma_f16": "fma.rn.f16 %ho, %ha, %hb, %hc;" + OUT16,
    "fma_relu_f16": "fma.rn.relu.f16 %ho, %ha, %hb, %hc;" + OUT16,
    "add_sat_f16": "add.sat.f16 %ho, %ha, %hb;" + OUT16,
    "mul_ftz_f16": "mul.ftz.f16 %ho, %ha, %hb;" + OUT16,
    "add_bf16": "add.rn.bf16 %ho, %ha, %hb;" + OUT16,
    "sub_bf16": "sub.rn.bf16 %ho, %ha, %hb;" + OUT16,
    "mul_bf16": "mul.rn.bf16 %ho, %ha, %hb;" + OUT16,
    "fma_bf16": "fma.rn.bf16 %ho, %ha, %hb, %hc;" + OUT16,
    "fma_f16x2": "fma.rn.f16x2 %ro, %ra, %rb, %rc;" + OUT32,
    "mul_f16x2": "mul.f16x2 %ro, %ra, %rb;" + OUT32,
    "add_bf16x2": "add.rn.bf16x2 %ro, %ra, %rb;" + OUT32,
    "fma_bf16x2": "fma.rn.bf16x2 %ro, %ra, %rb, %rc;" + OUT32,
    "neg_f16": "neg.f16 %ho, %ha;" + OUT16,
    "abs_bf16": "abs.bf16 %ho, %ha;" + OUT16,
    "neg_bf16x2": "neg.bf16x2 %ro, %ra;" + OUT32,
    "max_f16": "max.f16 %ho, %ha, %hb;" + OUT16,
    "min_bf16": "min.bf16 %ho, %ha, %hb;" + OUT16,
    "max_f16x2": "max.f16x2 %ro, %ra, %rb;" + OUT32,
    "min_nan_f16": "min.NaN.f16 %ho, %ha, %hb;" + OUT16,
    "setp_lt_f16": "setp.lt.f16 %p|%q, %ha, %hb;" + OUTPQ,
    "setp_geu_bf16": "setp.geu.bf16 %p, %ha, %hb; setp.ne.u32 %q, 0, 0;" + OUTPQ,
    "setp_le_f16x2": "setp.le.f16x2 %p|%q, %ra, %rb;" + OUTPQ,
    "set_le_f16x2": "set.le.f16x2.f16x2 %ro, %ra, %rb;" + OUT32,
    "set_eq_u32_f16x2": "set.eq.u32.f16x2 %ro, %ra, %rb;" + OUT32,
    "set_gt_u32_bf16": "set.gt.u32.bf16 %ro, %ha, %hb;" + OUT32,
    "cvt_f32_f16": "cvt.f32.f16 %fo, %ha;" + OUTF,
    "cvt_f16x2_f32": "cvt.rn.f16x2.f32 %ro, %fa, %fb;" + OUT32,
    "cvt_bf16x2_f32": "cvt.rn.bf16x2.f32 %ro, %fa, %fb;" + OUT32,
    "cvt_relu_f16_f32": "cvt.rn.relu.f16.f32 %ho, %fa;" + OUT16,
    "cvt_rn_f16_f64": "cvt.rn.f16.f64 %ho, %da;" + OUT16,
    "cvt_rz_bf16_f64": "cvt.rz.bf16.f64 %ho, %da;" + OUT16,
    **{f"cvt_{m}_{t}_f32": f"cvt.{m}.{t}.f32 %ho, %fa;" + OUT16 for m in ("rn", "rz", "rm", "rp")
       for t in ("f16", "bf16")},
    **{f"cvt_{m}_f32_f64": f"cvt.{m}.f32.f64 %fo, %da;" + OUTF for m in ("rz", "rm", "rp")},
    **{f"{op}_{m}_f32": f"{op}.{m}.f32 %fo, %fa, %fb;" + OUTF for op in ("add", "mul", "div")
       for m in ("rz", "rm", "rp")},
    **{f"fma_{m}_f32": f"fma.{m}.f32 %fo, %fa, %fb, %fc;" + OUTF for m in ("rz", "rm", "rp")},
    **{f"{op}_{m}_f64": f"{op}.{m}.f64 %do, %da, %db;" + OUTD for op in ("add", "mul", "div")
       for m in ("rz", "rm", "rp")},
    **{f"fma_{m}_f64": f"fma.{m}.f64 %do, %da, %db, %dc;" + OUTD for m in ("rz", "rm", "rp")},
    **{f"sqrt_{m}_f64": f"sqrt.{m}.f64 %do, %da;" + OUTD for m in ("rz", "rm", "rp")},
    **{f"rcp_{m}_f32": f"rcp.{m}.f32 %fo, %fa;" + OUTF for m in ("rz", "rm", "rp")},
}
N = 512


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ptx = HEAD + "".join(KERNEL.format(name=n, body=b) for n, b in CASES.items())
    m = ck.compile_module(ptx, (), cache_dir=tmp_path_factory.mktemp("half"), language="ptx")
    lz = ck.Launcher(1, sandbox=SANDBOX)

    def _run(name: str, a, b=None, c=None) -> list[int]:
        arrs = [np.asarray(v if v is not None else np.zeros(N, np.uint64), dtype=np.uint64).copy()
                for v in (a, b, c)]
        out = np.zeros(len(arrs[0]), np.uint64)
        lz.launch(m, m.kernel(name), (1, 1, 1), (len(out), 1, 1), 0,
                  [x.ctypes.data.to_bytes(8, "little") for x in (*arrs, out)])
        return [int(v) for v in out]
    yield _run
    lz.close()
    m.close()


def finite16(rng, fmt: str, n: int = N) -> np.ndarray:
    """Random finite 16-bit patterns (normals, subnormals, zeros, big and small)."""
    v = rng.integers(0, 1 << 16, n * 2, dtype=np.uint64)
    E, M = FMT[fmt]
    v = v[((v >> M) & ((1 << E) - 1)) != (1 << E) - 1][:n]
    v[:6] = [0, 0x8000, 1, 0x8001, 0x3C00 if fmt == "f16" else 0x3F80, 0xBC00 if fmt == "f16" else 0xBF80]
    return v


def fr(bits: int, fmt: str) -> Fraction:
    return Fraction(decode(bits, fmt))


def is_neg(bits: int) -> bool:
    return bool(bits & 0x8000)


def ref_arith(op: str, fmt: str, a: int, b: int, c: int = 0, ftz=False, sat=False, relu=False) -> int:
    E, M = FMT[fmt]
    flush = (lambda v: v & 0x8000 if (v >> M) & ((1 << E) - 1) == 0 else v) if ftz else (lambda v: v)
    a, b, c = flush(a), flush(b), flush(c)
    x, y, z = fr(a, fmt), fr(b, fmt), fr(c, fmt)
    if op == "add":
        r, zn = x + y, sum_zero_neg([is_neg(a), is_neg(b)], "rn")
    elif op == "sub":
        r, zn = x - y, sum_zero_neg([is_neg(a), not is_neg(b)], "rn")
    elif op == "mul":
        r, zn = x * y, is_neg(a) != is_neg(b)
    else:
        r, zn = x * y + z, sum_zero_neg([is_neg(a) != is_neg(b), is_neg(c)], "rn")
    if sat:
        r = min(max(r, Fraction(0)), Fraction(1))
        zn = zn and r == 0 and False
    if relu and r < 0:
        r, zn = Fraction(0), False
    out = round_to(r, fmt, "rn", zn)
    return flush(out)


@pytest.mark.parametrize("name, op, fmt, flags", [
    ("add_f16", "add", "f16", {}), ("add_rn_f16", "add", "f16", {}), ("sub_f16", "sub", "f16", {}),
    ("mul_f16", "mul", "f16", {}), ("fma_f16", "fma", "f16", {}),
    ("fma_relu_f16", "fma", "f16", {"relu": True}), ("add_sat_f16", "add", "f16", {"sat": True}),
    ("mul_ftz_f16", "mul", "f16", {"ftz": True}),
    ("add_bf16", "add", "bf16", {}), ("sub_bf16", "sub", "bf16", {}), ("mul_bf16", "mul", "bf16", {}),
    ("fma_bf16", "fma", "bf16", {}),
])
def test_scalar_half_arithmetic_is_exactly_rounded(run, name, op, fmt, flags):
    rng = np.random.default_rng(hash(name) & 0xFFFF)
    a, b, c = (finite16(rng, fmt) for _ in range(3))
    if op == "fma":      # products near c's size too: cancellations and near-midpoint sums
        c[N // 2:] = [round_to(-fr(int(x), fmt) * fr(int(y), fmt) * Fraction(1 + 2 ** -9), fmt)
                      for x, y in zip(a[N // 2:], b[N // 2:], strict=True)]
        c = np.array([v if (v >> FMT[fmt][1]) & ((1 << FMT[fmt][0]) - 1) != (1 << FMT[fmt][0]) - 1 else 0
                      for v in c], np.uint64)
    got = run(name, a, b, c)
    for i in range(N):
        want = ref_arith(op, fmt, int(a[i]), int(b[i]), int(c[i]), **flags)
        assert got[i] == want, (name, hex(a[i]), hex(b[i]), hex(c[i]), hex(got[i]), hex(want))
    if fmt == "f16" and op in ("add", "sub", "mul") and not flags:   # numpy agrees
        x, y = a.astype(np.uint16).view(np.float16), b.astype(np.uint16).view(np.float16)
        with np.errstate(all="ignore"):
            ref = {"add": x + y, "sub": x - y, "mul": x * y}[op].view(np.uint16)
        assert [g for g in got] == [int(v) for v in ref]


def test_fma_is_one_rounding_where_double_rounding_is_not(run):
    """bf16: 7 * 37 = 259, a midpoint of bf16 (258 | 260); minus 2^-100 it rounds to 258. Through
    a double the sum would be 259 and then tie to even, 260."""
    bf = lambda v: struct.unpack("<I", struct.pack("<f", v))[0] >> 16   # noqa: E731 (exact here)
    got = run("fma_bf16", [bf(7.0)] * 2, [bf(37.0)] * 2, [bf(-2.0 ** -100), bf(2.0 ** -100)])
    assert decode(got[0], "bf16") == 258.0 and decode(got[1], "bf16") == 260.0
    # f16: 3 * 683 = 2049, the midpoint of 2048 | 2050, plus the smallest subnormal
    h = lambda v: int(np.array([v], np.float16).view(np.uint16)[0])       # noqa: E731
    got = run("fma_f16", [h(3.0)], [h(683.0)], [h(2.0 ** -24)])
    assert got[0] == round_to(Fraction(3 * 683) + Fraction(1, 2 ** 24), "f16")


def test_nan_inf_and_zero_signs(run):
    h = lambda v: int(np.array([v], np.float16).view(np.uint16)[0])       # noqa: E731
    inf, nan = h(np.inf), 0x7E01
    got = run("add_f16", [inf, inf, nan, h(-0.0), h(-0.0), h(1.0)], [h(-np.inf), h(1.0), h(1.0), h(-0.0),
                                                                          h(0.0), h(-1.0)])
    assert got == [NAN16, inf, NAN16, 0x8000, 0, 0]
    assert run("mul_f16", [h(-0.0)], [h(3.0)])[0] == 0x8000
    assert run("fma_f16", [h(0.0)], [h(np.inf)], [h(1.0)])[0] == NAN16
    assert run("max_f16", [nan, h(-0.0), h(0.0)], [h(2.0), h(0.0), h(-0.0)]) == [h(2.0), 0, 0]
    assert run("min_nan_f16", [nan, h(1.0)], [h(2.0), h(3.0)]) == [NAN16, h(1.0)]
    assert run("add_sat_f16", [nan, h(0.75), h(-3.0)], [h(1.0), h(0.5), h(1.0)]) == [0, h(1.0), 0]
    assert run("fma_relu_f16", [h(-2.0), nan], [h(3.0), h(1.0)], [h(1.0), h(1.0)]) == [0, NAN16]


def test_x2_forms_work_per_half(run):
    rng = np.random.default_rng(7)
    for name, op, fmt in (("fma_f16x2", "fma", "f16"), ("mul_f16x2", "mul", "f16"),
                          ("add_bf16x2", "add", "bf16"), ("fma_bf16x2", "fma", "bf16")):
        lo = [finite16(rng, fmt, 256) for _ in range(3)]
        hi = [finite16(rng, fmt, 256) for _ in range(3)]
        ops = [h << np.uint64(16) | v for h, v in zip(hi, lo, strict=True)]
        got = run(name, *ops)
        for i in range(256):
            want_lo = ref_arith(op, fmt, int(lo[0][i]), int(lo[1][i]), int(lo[2][i]))
            want_hi = ref_arith(op, fmt, int(hi[0][i]), int(hi[1][i]), int(hi[2][i]))
            assert got[i] == want_hi << 16 | want_lo, (name, i)


def test_neg_abs_min_max_and_comparisons(run):
    rng = np.random.default_rng(11)
    a, b = finite16(rng, "f16"), finite16(rng, "f16")
    b[::7] = a[::7]
    fa, fb = (x.astype(np.uint16).view(np.float16).astype(np.float64) for x in (a, b))
    assert run("neg_f16", a) == [int(v) ^ 0x8000 for v in a]
    assert run("abs_bf16", a) == [int(v) & 0x7FFF for v in a]
    assert run("neg_bf16x2", a | b << np.uint64(16)) == [int(x | y << 16) ^ 0x80008000
                                                         for x, y in zip(a, b, strict=True)]

    def pick(x, y, bx, by, is_max):
        if x == y:
            return bx if (bx & 0x8000 == 0) == is_max else by
        return bx if (x > y) == is_max else by
    assert run("max_f16", a, b) == [pick(x, y, int(p), int(q), True) for x, y, p, q in zip(fa, fb, a, b, strict=True)]
    assert run("max_f16x2", a | b << np.uint64(16), b | a << np.uint64(16)) == [
        pick(x, y, int(p), int(q), True) | pick(y, x, int(q), int(p), True) << 16
        for x, y, p, q in zip(fa, fb, a, b, strict=True)]
    ba, bb = (np.array([decode(int(v), "bf16") for v in x]) for x in (a, b))
    assert run("min_bf16", a, b) == [pick(x, y, int(p), int(q), False) for x, y, p, q in zip(ba, bb, a, b, strict=True)]
    assert run("setp_lt_f16", a, b) == [int(x < y) | int(not x < y) << 1 for x, y in zip(fa, fb, strict=True)]
    assert run("setp_geu_bf16", a, b) == [int(x >= y) for x, y in zip(ba, bb, strict=True)]
    pair_a, pair_b = a | b << np.uint64(16), b | a << np.uint64(16)
    assert run("setp_le_f16x2", pair_a, pair_b) == [int(x <= y) | int(y <= x) << 1 for x, y in zip(fa, fb, strict=True)]
    assert run("set_le_f16x2", pair_a, pair_b) == [(0x3C00 if x <= y else 0) | (0x3C00 if y <= x else 0) << 16
                                                   for x, y in zip(fa, fb, strict=True)]
    assert run("set_eq_u32_f16x2", pair_a, pair_b) == [0xFFFFFFFF if x == y else 0 for x, y in zip(fa, fb, strict=True)]
    assert run("set_gt_u32_bf16", a, b) == [0xFFFFFFFF if x > y else 0 for x, y in zip(ba, bb, strict=True)]
    nan = 0x7E00
    assert run("setp_lt_f16", [nan], [0x3C00]) == [2]            # unordered: false (and !false)


def f32bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def f64bits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def test_conversions_into_half_in_every_rounding_mode(run):
    rng = np.random.default_rng(3)
    xs = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-9, 6, 200),
                         [65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -25, -(2.0 ** -25), 2.0 ** -26,
                          1 + 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -30, -(1 + 2.0 ** -11), 3e38, 1e-40, 0.0, -0.0]])
    fs = np.array(xs, np.float32)
    for m in ("rn", "rz", "rm", "rp"):
        for t in ("f16", "bf16"):
            got = run(f"cvt_{m}_{t}_f32", [f32bits(float(v)) for v in fs])
            want = [round_to(float(v), t, m, math.copysign(1, v) < 0) for v in fs]
            assert got == want, (m, t, [(float(v), hex(g), hex(w)) for v, g, w in zip(fs, got, want, strict=True)
                                        if g != w][:5])
    ds = [1 + 2.0 ** -11 + 2.0 ** -40, -(1 + 2.0 ** -11 + 2.0 ** -40), 65519.99, 2.0 ** -24 * 1.5000001, 1e300]
    assert run("cvt_rn_f16_f64", [f64bits(v) for v in ds]) == [round_to(v, "f16") for v in ds]
    assert run("cvt_rz_bf16_f64", [f64bits(v) for v in ds]) == [round_to(v, "bf16", "rz") for v in ds]
    got = run("cvt_f16x2_f32", [f32bits(1.5)], [f32bits(-2.0)])
    assert got == [0x3E00 << 16 | 0xC000]                       # a in the high half
    got = run("cvt_bf16x2_f32", [f32bits(1.0)], [f32bits(-1.0)])
    assert got == [0x3F80 << 16 | 0xBF80]
    assert run("cvt_relu_f16_f32", [f32bits(-3.0), f32bits(2.0), 0x7FC00000]) == [0, 0x4000, NAN16]
    assert run("cvt_f32_f16", [0x3555]) == [f32bits(float(np.array([0x3555], np.uint16).view(np.float16)[0]))]


def _f32(v: Fraction, mode: str) -> int:
    """v rounded to binary32 (exact: through the half rounding with float's field widths)."""
    neg = v < 0
    bits = _round_general(v, 8, 23, mode)
    return bits | (0x80000000 if neg and bits == 0 else 0)


def _round_general(v: Fraction, E: int, M: int, mode: str) -> int:
    saved = FMT.get("x")
    FMT["x"] = (E, M)
    try:
        r = round_to(v, "x", mode)
    finally:
        FMT.pop("x") if saved is None else FMT.__setitem__("x", saved)
    return r


@pytest.mark.parametrize("op", ["add", "mul", "div", "fma", "cvt", "sqrt", "rcp"])
def test_directed_rounding_of_f32_and_f64(run, op):
    rng = np.random.default_rng(len(op))
    a = rng.standard_normal(N) * 10.0 ** rng.integers(-5, 5, N)
    b = rng.standard_normal(N) * 10.0 ** rng.integers(-5, 5, N)
    c = rng.standard_normal(N)
    exact = {"add": lambda x, y, z: x + y, "mul": lambda x, y, z: x * y, "div": lambda x, y, z: x / y,
             "fma": lambda x, y, z: x * y + z}
    for m in ("rz", "rm", "rp"):
        if op in exact:
            for width in (32, 64):
                if width == 32:
                    xs = [np.float32(v) for v in (a, b, c)]
                    got = run(f"{op}_{m}_f32", *[[f32bits(float(v)) for v in x] for x in xs])
                    want = [_round_general(exact[op](*(Fraction(float(x[i])) for x in xs)), 8, 23, m)
                            for i in range(N)]
                    got = [g & 0x7FFFFFFF if w == 0 else g for g, w in zip(got, want, strict=True)]
                    want = [w | ((1 << 31) if exact[op](*(Fraction(float(x[i])) for x in xs)) < 0 else 0)
                            for i, w in enumerate(want)]
                else:
                    got = run(f"{op}_{m}_f64", *[[f64bits(float(v)) for v in x] for x in (a, b, c)])
                    vals = [exact[op](Fraction(a[i]), Fraction(b[i]), Fraction(c[i])) for i in range(N)]
                    want = [_round_general(v, 11, 52, m) | ((1 << 63) if v < 0 else 0) for v in vals]
                assert got == want, (op, m, width)
        elif op == "cvt":
            got = run(f"cvt_{m}_f32_f64", [f64bits(v) for v in a])
            assert got == [_round_general(Fraction(v), 8, 23, m) | ((1 << 31) if v < 0 else 0) for v in a]
        elif op == "sqrt":
            xs = np.abs(a)
            got = run(f"sqrt_{m}_f64", [f64bits(v) for v in xs])
            for v, g in zip(xs, got, strict=True):        # r is the rounding of sqrt(v) in mode m
                r = Fraction(struct.unpack("<d", struct.pack("<Q", g))[0])
                lo_ok = r * r <= Fraction(v) if m in ("rz", "rm") else r * r >= Fraction(v)
                nxt = Fraction(np.nextafter(float(r), np.inf if m in ("rz", "rm") else -np.inf))
                hi_ok = nxt * nxt > Fraction(v) if m in ("rz", "rm") else nxt * nxt < Fraction(v)
                assert lo_ok and (hi_ok or r * r == Fraction(v)), (m, v)
        else:
            xs = [np.float32(v) for v in a]
            got = run(f"rcp_{m}_f32", [f32bits(float(v)) for v in xs])
            assert got == [_round_general(1 / Fraction(float(v)), 8, 23, m) | ((1 << 31) if v < 0 else 0)
                           for v in xs]
