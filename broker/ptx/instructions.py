"""What each PTX instruction the CPU backend runs becomes in C++: OPS, one entry per opcode.

A handler gets the Translator (operands, types, refusals) and the instruction, and returns
one C++ statement. It accepts only the modifiers it implements; anything else is refused
with the instruction's full name and line (Translator.refuse)."""
from __future__ import annotations

import dataclasses
from functools import partial

from .errors import PtxError
from .parse import Instr, _int
from .translate import TYPES, Translator, _ident

SPACES = (".global", ".shared", ".local", ".const", ".param")
VECTORS = {".v2": 2, ".v4": 4, ".v8": 8}
_WIDE = {".s16": ".s32", ".u16": ".u32", ".s32": ".s64", ".u32": ".u64", ".b16": ".b32", ".b32": ".b64"}


def _only(tr: Translator, mods: list[str], allowed: set[str]) -> None:
    bad = [m for m in mods if m not in allowed]
    if bad:
        raise tr.refuse(f"modifier {' '.join(bad)}")


def _nargs(tr: Translator, ins: Instr, *counts: int) -> None:
    if len(ins.args) not in counts:
        raise PtxError(f"{ins.op} takes {' or '.join(map(str, counts))} operands, not {len(ins.args)}", ins.line)


def _cls(t: str) -> str:
    return TYPES[t][2]


def _ctype(t: str) -> str:
    return TYPES[t][0]


# -- data movement --------------------------------------------------------------------------

def mov(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    _only(tr, mods, {t})
    _nargs(tr, ins, 2)
    d, a = ins.args
    size = TYPES[t][1]
    pieces = d if d.kind == "vec" else a
    if pieces.kind == "vec" and (len(pieces.items) not in (2, 4) or size // len(pieces.items) not in (1, 2, 4)
                                 or _cls(t) not in "bu"):
        raise tr.refuse(f"{len(pieces.items)} pieces of {t}")
    if d.kind == "vec":             # unpack: mov.b64 {%r1, %r2}, %rd1 (low part first)
        w = size // len(d.items)
        src = tr.src(a, t)
        parts = [tr.dst(x, {1: ".b8", 2: ".b16", 4: ".b32"}[w],
                        f"::kc::as<uint{8 * size}_t>({src}) >> {8 * w * i}") for i, x in enumerate(d.items)]
        return " ".join(parts)
    if a.kind == "vec":             # pack: mov.b64 %rd1, {%r1, %r2}
        w = size // len(a.items)
        wt = {1: ".b8", 2: ".b16", 4: ".b32"}[w]
        terms = [f"((uint{8 * size}_t){tr.src(x, wt)} << {8 * w * i})" for i, x in enumerate(a.items)]
        return tr.dst(d, t, f"::kc::as<{_ctype(t)}>((uint{8 * size}_t)({' | '.join(terms)}))")
    return tr.dst(d, t, tr.src(a, t))


def _mem_mods(tr: Translator, ins: Instr, extra: set[str] = frozenset()):
    mods = tr.mods(ins)
    space = next((m for m in mods if m in SPACES), "")
    vec = next((VECTORS[m] for m in mods if m in VECTORS), 1)
    ts = [m for m in mods if m in TYPES]
    if len(ts) != 1:
        raise tr.refuse("expected one operand type")
    _only(tr, mods, {space, ts[0], *[m for m in mods if m in VECTORS], *extra} - {""})
    return space, vec, ts[0], mods


def _access(tr: Translator, ins: Instr, load: bool) -> str:
    """ld d, [a] / st [a], v, scalar or vector (.v2 .v4 .v8: consecutive elements)."""
    space, vec, t, mods = _mem_mods(tr, ins, {".acquire"} if load else {".release"})
    _nargs(tr, ins, 2)
    regs, a = (ins.args[0], ins.args[1]) if load else (ins.args[1], ins.args[0])
    if vec == 1:
        items = [regs]
    elif regs.kind == "vec" and len(regs.items) == vec:
        items = regs.items
    else:
        raise PtxError(f"{ins.op}.v{vec} needs {{{vec} operands}}", ins.line)
    p, size, ctype = tr.fresh(), TYPES[t][1], _ctype(t)
    # Ordered or volatile: a real access every time (tr.mods drops the qualifiers themselves).
    ordered = "_atomic" if {".volatile", ".relaxed", ".acquire", ".release"} & set(ins.mods) else ""
    if ordered and size not in (1, 2, 4, 8):
        raise tr.refuse(f"an ordered access of {t}")
    if load:
        parts = [tr.dst(x, t, f"::kc::ld{ordered}<{ctype}>({p} + {i * size})") for i, x in enumerate(items)]
        fence = " __atomic_thread_fence(__ATOMIC_SEQ_CST);" if ".acquire" in mods else ""
        spin = " __kc_spin();" if ordered and space != ".shared" else ""   # may be a spin-wait
        return f"{{ unsigned char* {p} = {tr.pointer(a, space)}; {' '.join(parts)} }}" + fence + spin
    parts = [f"::kc::st{ordered}<{ctype}>({p} + {i * size}, {tr.src(x, t)});" for i, x in enumerate(items)]
    fence = "__atomic_thread_fence(__ATOMIC_SEQ_CST); " if ".release" in mods else ""
    return f"{fence}{{ unsigned char* {p} = {tr.pointer(a, space)}; {' '.join(parts)} }}"


def cvta(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    to = ".to" in mods
    space = next((m for m in mods if m in SPACES), None)
    t = tr.type_of(mods)
    _only(tr, mods, {".to", space, t})
    if space is None:
        raise tr.refuse("no state space")
    _nargs(tr, ins, 2)
    d, a = ins.args
    v = tr.src(a, t)
    if space == ".shared":     # shared window offsets <-> generic pointers
        base = f"({_ctype(t)})(uintptr_t)_kc_smem"
        return tr.dst(d, t, f"({v}) - {base}" if to else f"({v}) + {base}")
    return tr.dst(d, t, v)


# -- integer and float arithmetic -----------------------------------------------------------

_DIRECTED = {".rz": "FE_TOWARDZERO", ".rm": "FE_DOWNWARD", ".rp": "FE_UPWARD"}


def _rounding(tr: Translator, mods: list[str]) -> list[str]:
    """Float rounding modifiers: .rn is what C++ does; .rz .rm .rp (at most one) are done
    by _float_wrap, which every caller of this goes on to (libdevice's expf uses fma.rm)."""
    if len([m for m in mods if m == ".rn" or m in _DIRECTED]) > 1:
        raise tr.refuse("more than one rounding mode")
    return [m for m in mods if m != ".rn" and m not in _DIRECTED]


def _float_wrap(tr: Translator, mods: list[str], t: str, args: list[str], expr) -> str:
    ftz, sat = ".ftz" in mods, ".sat" in mods
    if ftz:
        args = [f"::kc::ftz({a})" for a in args]
    mode = next((_DIRECTED[m] for m in tr.ins.mods if m in _DIRECTED), None)
    if mode is not None:            # the operation alone in that mode, its operands pinned
        xs = [f"_x{i}" for i in range(len(args))]
        lam = f"[]({', '.join('auto ' + x for x in xs)}) {{ return ({_ctype(t)})({expr(*xs)}); }}"
        r = f"::kc::rounded<{mode}>({lam}, {', '.join(args)})"
    else:
        r = expr(*args)
    if ftz:
        r = f"::kc::ftz(({_ctype(t)})({r}))"
    if sat:
        r = f"::kc::sat01(({_ctype(t)})({r}))"
    return r


def _binary(int_fn, float_fn, allow_int=(), allow_float=(".ftz", ".sat")):
    def handler(tr: Translator, ins: Instr) -> str:
        mods = tr.mods(ins)
        t = tr.type_of(mods)
        _nargs(tr, ins, 3)
        d, a, b = ins.args
        cls = _cls(t)
        if cls == "f":
            rest = _rounding(tr, [m for m in mods if m != t])
            _only(tr, rest, set(allow_float))
            if float_fn is None:
                raise tr.refuse(f"type {t}")
            return tr.dst(d, t, _float_wrap(tr, rest, t, [tr.src(a, t), tr.src(b, t)], float_fn))
        if cls == "p" and int_fn is not None and ins.op in ("and", "or", "xor"):
            _only(tr, mods, {t})
            op = {"and": "&&", "or": "||", "xor": "!="}[ins.op]
            return tr.dst(d, t, f"{tr.src(a, t)} {op} {tr.src(b, t)}")
        if cls not in "usb" or int_fn is None:
            raise tr.refuse(f"type {t}")
        rest = [m for m in mods if m != t]
        _only(tr, rest, set(allow_int))
        return tr.dst(d, t, int_fn(tr, rest, t, tr.src(a, t), tr.src(b, t)))
    return handler


def _add_int(tr, rest, t, a, b):
    if ".sat" in rest:
        if t != ".s32":
            raise tr.refuse("saturation (only .s32)")
        return f"::kc::sat_{'add' if tr.ins.op == 'add' else 'sub'}({a}, {b})"
    return f"::kc::{tr.ins.op}({a}, {b})"


add = _binary(_add_int, lambda a, b: f"{a} + {b}", allow_int={".sat"})
sub = _binary(_add_int, lambda a, b: f"{a} - {b}", allow_int={".sat"})
div = _binary(lambda tr, r, t, a, b: f"::kc::div({a}, {b})", lambda a, b: f"{a} / {b}")
rem = _binary(lambda tr, r, t, a, b: f"::kc::rem({a}, {b})", None)
min_ = _binary(lambda tr, r, t, a, b: f"({a} < {b} ? {a} : {b})", None)
max_ = _binary(lambda tr, r, t, a, b: f"({a} > {b} ? {a} : {b})", None)
and_ = _binary(lambda tr, r, t, a, b: f"{a} & {b}", None)
or_ = _binary(lambda tr, r, t, a, b: f"{a} | {b}", None)
xor = _binary(lambda tr, r, t, a, b: f"{a} ^ {b}", None)


def _minmax(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    if _cls(t) != "f":
        return (min_ if ins.op == "min" else max_)(tr, ins)
    _nargs(tr, ins, 3)
    rest = [m for m in mods if m != t]
    _only(tr, rest, {".ftz", ".NaN"})
    fn = f"::kc::f{ins.op}_{'nan' if '.NaN' in rest else ''}"
    d, a, b = ins.args
    return tr.dst(d, t, _float_wrap(tr, [m for m in rest if m != ".NaN"], t, [tr.src(a, t), tr.src(b, t)],
                                    lambda x, y: f"{fn}({x}, {y})"))


def _product(tr: Translator, ins: Instr, add: bool) -> str:
    """Integer mul / mad (.lo, .hi, .wide: the product's low half, high half, or all of it
    in the type twice as wide), plus c for mad. Float mul here too; float mad is fma."""
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    _nargs(tr, ins, 4 if add else 3)
    d, a, b = ins.args[:3]
    if _cls(t) == "f":
        if add:
            return fma(tr, ins)      # mad.f32 is fma.rn.f32
        rest = _rounding(tr, [m for m in mods if m != t])
        _only(tr, rest, {".ftz", ".sat"})
        return tr.dst(d, t, _float_wrap(tr, rest, t, [tr.src(a, t), tr.src(b, t)], lambda x, y: f"{x} * {y}"))
    rest = [m for m in mods if m != t]
    _only(tr, rest, {".lo", ".hi", ".wide"})
    rt = t
    if ".wide" in rest:
        rt = _WIDE.get(t)
        if rt is None:
            raise tr.refuse(f".wide of {t}")
        prod = f"::kc::mul(({_ctype(rt)}){tr.src(a, t)}, ({_ctype(rt)}){tr.src(b, t)})"
    else:
        prod = f"::kc::{'mulhi' if '.hi' in rest else 'mul'}({tr.src(a, t)}, {tr.src(b, t)})"
    return tr.dst(d, rt, f"::kc::add({prod}, {tr.src(ins.args[3], rt)})" if add else prod)


def fma(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    if _cls(t) != "f":
        raise tr.refuse(f"type {t}")
    _nargs(tr, ins, 4)
    rest = _rounding(tr, [m for m in mods if m != t])
    _only(tr, rest, {".ftz", ".sat"})
    d, a, b, c = ins.args
    return tr.dst(d, t, _float_wrap(tr, rest, t, [tr.src(x, t) for x in (a, b, c)],
                                    lambda x, y, z: f"fma({x}, {y}, {z})"))


def _carry(plain):
    """Extended-precision integer arithmetic through the condition code's carry flag
    (CC.CF, one per thread: the function's _kc_cc): add.cc / sub.cc / mad.{lo,hi}.cc write
    it, addc / subc / madc.{lo,hi} also read it (sub's carry is the borrow, as subc takes
    it). Plain add, sub and mad go to `plain`."""
    def handler(tr: Translator, ins: Instr) -> str:
        carry_in = ins.op.endswith("c")
        if not carry_in and ".cc" not in ins.mods:
            return plain(tr, ins)
        mods = tr.mods(ins)
        t = tr.type_of(mods)
        rest = [m for m in mods if m not in (t, ".cc")]
        mad = ins.op.startswith("mad")
        _only(tr, rest, {".lo", ".hi"} if mad else set())
        if t not in (".u32", ".s32", ".u64", ".s64"):
            raise tr.refuse(f"type {t}")
        if mad and len(rest) != 1:
            raise tr.refuse("expected one of .lo .hi")
        _nargs(tr, ins, 4 if mad else 3)
        bits = 8 * TYPES[t][1]
        u, wide = _ctype(".u32" if bits == 32 else ".u64"), "uint64_t" if bits == 32 else "unsigned __int128"
        ut = ".u32" if bits == 32 else ".u64"
        d, a, b = ins.args[:3]
        if mad:
            half = "mulhi" if rest == [".hi"] else "mul"
            a, b = f"({u})::kc::{half}({tr.src(a, t)}, {tr.src(b, t)})", tr.src(ins.args[3], ut)
        else:
            a, b = tr.src(a, ut), tr.src(b, ut)
        sign = "-" if ins.op.startswith("sub") else "+"
        s = tr.fresh()
        expr = f"({wide}){a} {sign} ({wide}){b}" + (f" {sign} ({wide})_kc_cc" if carry_in else "")
        tr.carry = True
        out = f"{wide} {s} = {expr}; " + tr.dst(d, ut, f"({u}){s}")
        if ".cc" in ins.mods:
            out += f" _kc_cc = (uint32_t)({s} >> {bits}) & 1u;"
        return "{ " + out + " }"
    return handler


def _unary(int_fn, float_fn, float_mods=(".ftz",)):
    def handler(tr: Translator, ins: Instr) -> str:
        mods = tr.mods(ins)
        t = tr.type_of(mods)
        _nargs(tr, ins, 2)
        d, a = ins.args
        cls = _cls(t)
        if cls == "f":
            if float_fn is None:
                raise tr.refuse(f"type {t}")
            rest = _rounding(tr, [m for m in mods if m != t])
            _only(tr, rest, set(float_mods))
            return tr.dst(d, t, _float_wrap(tr, rest, t, [tr.src(a, t)], float_fn))
        if cls == "p" and ins.op == "not":
            _only(tr, mods, {t})
            return tr.dst(d, t, f"!{tr.src(a, t)}")
        if cls not in "usb" or int_fn is None:
            raise tr.refuse(f"type {t}")
        _only(tr, mods, {t})
        return tr.dst(d, t, int_fn(tr.src(a, t)))
    return handler


abs_ = _unary(lambda a: f"::kc::iabs({a})", lambda a: f"fabs({a})")
neg = _unary(lambda a: f"::kc::neg({a})", lambda a: f"-({a})")
not_ = _unary(lambda a: f"~{a}", None)
cnot = _unary(lambda a: f"({a} == 0)", None)
sqrt = _unary(None, lambda a: f"sqrt({a})")
rsqrt = _unary(None, lambda a: f"(1 / sqrt({a}))")
rcp = _unary(None, lambda a: f"(1 / ({a}))")
sin = _unary(None, lambda a: f"sin({a})")
cos = _unary(None, lambda a: f"cos({a})")
lg2 = _unary(None, lambda a: f"log2({a})")
ex2 = _unary(None, lambda a: f"exp2({a})")
tanh = _unary(None, lambda a: f"tanh({a})")




















def testp(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    tests = {".finite": "isfinite({})", ".infinite": "isinf({})", ".number": "!isnan({})",
             ".notanumber": "isnan({})", ".normal": "isnormal({})",
             ".subnormal": "(fpclassify({}) == FP_SUBNORMAL)"}
    which = [m for m in mods if m in tests]
    _only(tr, mods, {t, *which})
    if len(which) != 1:
        raise tr.refuse("expected one test")
    _nargs(tr, ins, 2)
    d, a = ins.args
    return tr.dst(d, ".pred", tests[which[0]].format(tr.src(a, t)))


def _call(expr: str, srcs: tuple[str, ...], *, dst: str = "t", classes: str = "usb",
          types: tuple[str, ...] | None = None):
    """An instruction that is one C++ expression of its operands: `expr` with {0}, {1}...
    for the sources, each read as the PTX type in `srcs` ("t": the instruction's own),
    the result stored as `dst`. Only one modifier: the type (of class `classes`, or one
    of `types`)."""
    def handler(tr: Translator, ins: Instr) -> str:
        mods = tr.mods(ins)
        t = tr.type_of(mods)
        _only(tr, mods, {t})
        _nargs(tr, ins, 1 + len(srcs))
        if (types is not None and t not in types) or (types is None and _cls(t) not in classes):
            raise tr.refuse(f"type {t}")
        d, *xs = ins.args
        args = [tr.src(x, t if s == "t" else s) for x, s in zip(xs, srcs, strict=True)]
        return tr.dst(d, t if dst == "t" else dst, expr.format(*args))
    return handler


popc = _call("::kc::popc({0})", ("t",), dst=".u32")
clz = _call("::kc::clz({0})", ("t",), dst=".u32")
brev = _call("::kc::brev({0})", ("t",))
shl = _call("::kc::shl({0}, {1})", ("t", ".u32"))
shr = _call("::kc::shr({0}, {1})", ("t", ".u32"))
bfe = _call("::kc::bfe({0}, {1}, {2})", ("t", ".u32", ".u32"))
bfi = _call("::kc::bfi({0}, {1}, {2}, {3})", ("t", "t", ".u32", ".u32"))
prmt = _call("::kc::prmt({0}, {1}, {2})", ("t", "t", "t"), types=(".b32",))
lop3 = _call("::kc::lop3({0}, {1}, {2}, {3})", ("t", "t", "t", "t"), types=(".b32",))
def shf(tr: Translator, ins: Instr) -> str:
    """shf.{l,r}.{wrap,clamp}.b32 d, a, b, c: a funnel shift of b:a by c (mod 32, or at most 32)."""
    mods = tr.mods(ins)
    side = [m for m in mods if m in (".l", ".r")]
    mode = [m for m in mods if m in (".wrap", ".clamp")]
    _only(tr, mods, {*side, *mode, ".b32"})
    if len(side) != 1 or len(mode) != 1 or ".b32" not in mods:
        raise tr.refuse("expected .l or .r, .wrap or .clamp, and .b32")
    _nargs(tr, ins, 4)
    d, a, b, c = ins.args
    n = tr.src(c, ".u32")
    n = f"({n} & 31u)" if mode == [".wrap"] else f"({n} < 32u ? {n} : 32u)"
    return tr.dst(d, ".b32", f"::kc::shf_{side[0][1]}({tr.src(a, '.b32')}, {tr.src(b, '.b32')}, {n})")


copysign = _call("copysign({1}, {0})", ("t", "t"), classes="f")      # the sign of a, on b
selp = _call("({2} ? {0} : {1})", ("t", "t", ".pred"), classes="usbf")


# -- comparisons and selection --------------------------------------------------------------

_INT_CMP = {".eq": "==", ".ne": "!=", ".lt": "<", ".le": "<=", ".gt": ">", ".ge": ">=",
            ".lo": "<", ".ls": "<=", ".hi": ">", ".hs": ">="}
_FLOAT_CMP = {".eq": "{a} == {b}", ".ne": "({a} != {b} && {a} == {a} && {b} == {b})",
              ".lt": "{a} < {b}", ".le": "{a} <= {b}", ".gt": "{a} > {b}", ".ge": "{a} >= {b}",
              ".equ": "!({a} != {b} && {a} == {a} && {b} == {b})", ".neu": "{a} != {b}",
              ".ltu": "!({a} >= {b})", ".leu": "!({a} > {b})", ".gtu": "!({a} <= {b})",
              ".geu": "!({a} < {b})", ".num": "({a} == {a} && {b} == {b})", ".nan": "({a} != {a} || {b} != {b})"}
_BOOL = {".and": "&&", ".or": "||", ".xor": "!="}


def _compare(tr: Translator, mods: list[str], t: str, a, b) -> tuple[str, list[str]]:
    cls = _cls(t)
    if cls == "f":
        cmp = [m for m in mods if m in _FLOAT_CMP]
        if len(cmp) != 1:
            raise tr.refuse("expected one comparison")
        x, y = tr.src(a, t), tr.src(b, t)
        if ".ftz" in mods:
            x, y = f"::kc::ftz({x})", f"::kc::ftz({y})"
        return "(" + _FLOAT_CMP[cmp[0]].format(a=x, b=y) + ")", cmp
    if cls not in "usb":
        raise tr.refuse(f"type {t}")
    cmp = [m for m in mods if m in _INT_CMP]
    if len(cmp) != 1:
        raise tr.refuse("expected one comparison")
    ct = t
    if cmp[0] in (".lo", ".ls", ".hi", ".hs") or cls == "b":
        ct = ".u" + t[2:]
    return f"({tr.src(a, ct)} {_INT_CMP[cmp[0]]} {tr.src(b, ct)})", cmp


def setp(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    cond, cmp = _compare(tr, mods, t, ins.args[1], ins.args[2]) if len(ins.args) >= 3 else ("", [])
    boolop = [m for m in mods if m in _BOOL]
    _only(tr, mods, {t, *cmp, *boolop, ".ftz"})
    _nargs(tr, ins, 4 if boolop else 3)
    d = ins.args[0]
    pq = d.items if d.kind == "vec" and d.text == "|" else [d]
    c = tr.src(ins.args[3], ".pred") if boolop else None
    tmp = tr.fresh()
    out = [f"{{ bool {tmp} = {cond};"]
    for i, x in enumerate(pq):
        v = tmp if i == 0 else f"!{tmp}"
        if boolop:
            v = f"({v}) {_BOOL[boolop[0]]} ({c})"
        out.append(tr.dst(x, ".pred", v))
    return " ".join(out) + " }"


def _two_types(tr: Translator, mods: list[str]) -> tuple[str, str]:
    """The destination and source types of set and cvt (.dtype.atype)."""
    ts = [m for m in mods if m in TYPES]
    if len(ts) != 2:
        raise tr.refuse("expected a destination and a source type")
    return ts[0], ts[1]


def set_(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    dt, st_ = _two_types(tr, mods)
    cond, cmp = _compare(tr, mods, st_, ins.args[1], ins.args[2])
    boolop = [m for m in mods if m in _BOOL]
    _only(tr, mods, {dt, st_, *cmp, *boolop, ".ftz"})
    _nargs(tr, ins, 4 if boolop else 3)
    if boolop:
        cond = f"(({cond}) {_BOOL[boolop[0]]} ({tr.src(ins.args[3], '.pred')}))"
    one = "1.0f" if dt == ".f32" else "0xffffffffu"
    if dt not in (".f32", ".u32", ".s32", ".b32"):
        raise tr.refuse(f"destination type {dt}")
    return tr.dst(ins.args[0], dt, f"{cond} ? ({_ctype(dt)}){one} : ({_ctype(dt)})0")


# -- conversions ----------------------------------------------------------------------------

_IRND = {".rni": "nearbyint", ".rzi": "trunc", ".rmi": "floor", ".rpi": "ceil"}


def cvt(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    dt, at = _two_types(tr, mods)
    rest = [m for m in mods if m not in (dt, at)]
    _nargs(tr, ins, 2)
    d, a = ins.args
    dc, ac = _cls(dt), _cls(at)
    irnd = [m for m in rest if m in _IRND]
    ftz, sat = ".ftz" in rest, ".sat" in rest
    if ".rz" in mods or ".rm" in mods or ".rp" in mods:
        raise tr.refuse("rounding modes other than .rn")
    _only(tr, rest, {*irnd, ".rn", ".ftz", ".sat"})
    x = tr.src(a, at)
    if ac == "h":                       # half / bfloat16 sources: through float
        if at not in (".f16", ".bf16"):
            raise tr.refuse(f"source type {at}")
        x = f"::kc::{'h2f' if at == '.f16' else 'bf2f'}({x})"
        ac, at = "f", ".f32"
    if ftz and ac == "f":
        x = f"::kc::ftz({x})"
    if dc == "h":
        if dt not in (".f16", ".bf16") or ac not in "fus":
            raise tr.refuse(f"destination type {dt}")
        if at == ".f64" or (ac in "us" and TYPES[at][1] > 2):
            # through float would round twice (1 + 2^-11 + 2^-40 became 1.0, not 1 + 2^-10)
            raise tr.refuse(f"{at} to {dt} (only from f32 and 8- and 16-bit integers)")
        v = f"(float)({x})"
        if sat:
            v = f"::kc::sat01({v})"
        return tr.dst(d, dt, f"::kc::{'f2h' if dt == '.f16' else 'f2bf'}({v})")
    if dc in "usb" and ac in "usb":
        if sat:
            return tr.dst(d, dt, f"::kc::isat<{_ctype(dt)}>({x})")
        return tr.dst(d, dt, f"({_ctype(dt)})({x})")
    if dc in "us" and ac == "f":
        if len(irnd) != 1:
            raise tr.refuse("a float to integer conversion needs .rni, .rzi, .rmi or .rpi")
        return tr.dst(d, dt, f"::kc::f2i<{_ctype(dt)}>({_IRND[irnd[0]]}({x}))")
    if dc == "f" and ac in "usb":
        v = f"({_ctype(dt)})({x})"
    elif dc == "f" and ac == "f":
        v = f"({_ctype(dt)})({_IRND[irnd[0]]}({x}))" if irnd else f"({_ctype(dt)})({x})"
    else:
        raise tr.refuse(f"{at} to {dt}")
    if ftz:
        v = f"::kc::ftz({v})"
    if sat:
        v = f"::kc::sat01({v})"
    return tr.dst(d, dt, v)


# -- control flow ---------------------------------------------------------------------------

def bra(tr: Translator, ins: Instr) -> str:
    _only(tr, tr.mods(ins), set())
    _nargs(tr, ins, 1)
    (target,) = ins.args
    if target.kind != "name" or tr.scope.find(target.text) is not None:
        raise tr.refuse("a branch to a register (brx.idx)")
    if target.text not in tr.labels:
        raise PtxError(f"bra to {target.text}, a label this function does not define", ins.line)
    return f"goto {_ident('L', target.text)};"


def ret(tr: Translator, ins: Instr) -> str:
    _only(tr, tr.mods(ins), set())
    return "return;"


def exit_(tr: Translator, ins: Instr) -> str:
    _only(tr, tr.mods(ins), set())
    if not tr.fn.entry:
        raise tr.refuse("exit inside a .func (only in a kernel)")
    return "return;"


def call(tr: Translator, ins: Instr) -> str:
    _only(tr, tr.mods(ins), set())
    args = list(ins.args)
    rets: list = []
    if args and args[0].kind == "vec":
        rets = args.pop(0).items
    if not args or args[0].kind != "name":
        raise PtxError("call needs a function name", ins.line)
    fname = args.pop(0).text
    params = args.pop(0).items if args and args[0].kind == "vec" else []
    if args:
        raise tr.refuse("indirect calls (a prototype operand)")
    d = tr.scope.find(fname)
    if d is None or d[0] != "func":
        if d is not None and d[0] == ".reg":
            raise tr.refuse("indirect calls through a register")
        raise PtxError(f"call of undeclared function {fname}", ins.line)
    f = tr.funcs[fname]
    if fname == "vprintf" and f.body is None:
        return _vprintf(tr, ins, rets, params)
    if fname in ("malloc", "free") and f.body is None:
        return _heap(tr, ins, fname, rets, params)
    if fname == "__assertfail" and f.body is None:
        return _assertfail(tr, ins, rets, params)
    if f.body is None:
        raise tr.refuse(f"the device-runtime function {fname}")
    if f.entry:
        raise tr.refuse("calling a kernel (dynamic parallelism)")
    if len(rets) != len(f.rets) or len(params) != len(f.params):
        raise PtxError(f"call of {fname} with {len(rets)} results and {len(params)} arguments; "
                       f"it has {len(f.rets)} and {len(f.params)}", ins.line)
    return f"{d[2]}({', '.join(_param_names(tr, ins, rets + params))});"


def _param_names(tr: Translator, ins: Instr, operands: list) -> list[str]:
    """The C++ names of a call's results and arguments: .param variables, all of them."""
    names = []
    for o in operands:
        v = tr.scope.find(o.text) if o.kind == "name" else None
        if v is None or v[0] != ".param":
            raise PtxError("call arguments and results must be .param variables", ins.line)
        names.append(v[2])
    return names


def _vprintf(tr: Translator, ins: Instr, rets: list, params: list) -> str:
    """call (r), vprintf, (fmt, args): both parameters are generic pointers."""
    if len(params) != 2 or len(rets) > 1:
        raise PtxError("vprintf takes a format and an argument buffer", ins.line)
    *ret, fmt, args = _param_names(tr, ins, rets + params)
    call = (f"::kc::vprintf_((const char*)(uintptr_t)::kc::ld<uint64_t>({fmt}), "
            f"(const unsigned char*)(uintptr_t)::kc::ld<uint64_t>({args}))")
    return f"::kc::st<int32_t>({ret[0]}, {call});" if ret else f"(void){call};"


def _heap(tr: Translator, ins: Instr, fname: str, rets: list, params: list) -> str:
    """Device-side malloc/free: the executor's heap (CUDA's is a per-context heap too). A
    failed malloc returns NULL, as on the GPU."""
    if len(params) != 1 or len(rets) != (1 if fname == "malloc" else 0):
        raise PtxError(f"{fname} takes one argument" + (" and returns a pointer" if fname == "malloc" else ""),
                       ins.line)
    *ret, arg = _param_names(tr, ins, rets + params)
    if fname == "free":
        return f"::free((void*)(uintptr_t)::kc::ld<uint64_t>({arg}));"
    return f"::kc::st<uint64_t>({ret[0]}, (uint64_t)(uintptr_t)::malloc((size_t)::kc::ld<uint64_t>({arg})));"


def _assertfail(tr: Translator, ins: Instr, rets: list, params: list) -> str:
    """call __assertfail, (message, file, line, function, charsize): device assert(). The
    strings are generic pointers; the launch ends with CUDA_ERROR_ASSERT (kubecash_runtime.h)."""
    if len(params) != 5 or rets:
        raise PtxError("__assertfail takes a message, file, line, function and char size", ins.line)
    msg, file, line, func, _size = _param_names(tr, ins, params)
    ptr = "(const char*)(uintptr_t)::kc::ld<uint64_t>({})".format
    return (f"__kc_assertfail({ptr(msg)}, {ptr(file)}, ::kc::ld<uint32_t>({line}), {ptr(func)});")


def trap(tr: Translator, ins: Instr) -> str:
    """trap: the launch ends with CUDA_ERROR_ILLEGAL_INSTRUCTION, as on the device."""
    _only(tr, tr.mods(ins), set())
    _nargs(tr, ins, 0)
    return "__kc_trap();"


def bar(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    tr.fibers = True
    red = [m for m in mods if m in (".red",)]
    if ".arrive" in mods:
        raise tr.refuse("bar.arrive (producer-consumer barriers)")
    if ins.op == "bar" and ".warp" in mods:
        _only(tr, mods, {".warp"})
        return warp_sync(tr, ins)
    if red:
        kind = [m for m in mods if m in (".popc", ".and", ".or")]
        t = [m for m in mods if m in TYPES]
        _only(tr, mods, {".red", *kind, *t})
        if len(kind) != 1 or len(t) != 1:
            raise tr.refuse("expected .popc, .and or .or, and a type")
        _nargs(tr, ins, 3, 4)
        if len(ins.args) == 4:
            raise tr.refuse("a thread count")
        d, _bid, p = ins.args
        fn = {".popc": "__syncthreads_count", ".and": "__syncthreads_and", ".or": "__syncthreads_or"}[kind[0]]
        return tr.dst(d, t[0], f"{fn}({tr.src(p, '.pred')})")
    _only(tr, mods, set())
    _nargs(tr, ins, 1, 2)
    if len(ins.args) == 2:
        raise tr.refuse("a thread count (barriers over part of a block)")
    if ins.args[0].kind != "imm" or _int(ins.args[0].text, ins.line) != 0:
        raise tr.refuse("barriers other than 0")
    return "__syncthreads();"


def fence(tr: Translator, ins: Instr) -> str:
    return "__atomic_thread_fence(__ATOMIC_SEQ_CST);"


def nop(tr: Translator, ins: Instr) -> str:
    return ";"


# -- atomics --------------------------------------------------------------------------------

_ATOM_OPS = {".add", ".min", ".max", ".inc", ".dec", ".and", ".or", ".xor", ".exch", ".cas"}
_SEMANTICS = {".acquire", ".release", ".acq_rel", ".relaxed"}


def _atom(tr: Translator, ins: Instr, result: bool) -> str:
    mods = tr.mods(ins)
    space = next((m for m in mods if m in (".global", ".shared")), "")
    ops = [m for m in mods if m in _ATOM_OPS]
    t = tr.type_of(mods)
    _only(tr, mods, {space, *ops, t, *[m for m in mods if m in _SEMANTICS]} - {""})
    if len(ops) != 1:
        raise tr.refuse("expected one operation")
    op, cls = ops[0], _cls(t)
    ctype = _ctype(t)
    args = list(ins.args)
    d = args.pop(0) if result else None
    if len(args) != (3 if op == ".cas" else 2):
        raise PtxError(f"{ins.op}{op} takes {(3 if op == '.cas' else 2) + result} operands", ins.line)
    ptr = tr.pointer(args[0], space)
    b = tr.src(args[1], t)
    if cls == "h" or (cls == "f" and op not in (".add", ".exch", ".min", ".max")):
        raise tr.refuse(f"{op} on {t}")
    if op == ".cas":
        e = f"::kc::atom_cas<{ctype}>({ptr}, {b}, {tr.src(args[2], t)})"
    elif op == ".exch":
        bits = f"uint{8 * TYPES[t][1]}_t"
        e = f"::kc::as<{ctype}>(__atomic_exchange_n(({bits}*)({ptr}), ::kc::as<{bits}>({b}), __ATOMIC_SEQ_CST))"
    else:
        lam = {".add": "::kc::add(o, v)" if cls != "f" else "o + v",
               ".min": "(v < o ? v : o)" if cls != "f" else "fmin(o, v)",
               ".max": "(v > o ? v : o)" if cls != "f" else "fmax(o, v)",
               ".inc": f"(o >= v ? ({ctype})0 : ({ctype})(o + 1))",
               ".dec": f"((o == 0 || o > v) ? v : ({ctype})(o - 1))",
               ".and": "(o & v)", ".or": "(o | v)", ".xor": "(o ^ v)"}[op]
        if op in (".inc", ".dec") and t != ".u32":
            raise tr.refuse(f"{op} on {t}")
        e = f"::kc::atom_rmw<{ctype}>({ptr}, [&]({ctype} o) {{ {ctype} v = {b}; return ({ctype})({lam}); }})"
    if d is None:
        return f"(void){e};"
    return tr.dst(d, t, e)


# -- warp-level operations (run by the block scheduler, a warp of fibers at a time) ------------

def _warp(tr: Translator, kind: str, mode: int, a: str, b: str = "0", c: str = "0", mask: str = "0xffffffffu") -> str:
    """A statement that parks this lane at a warp operation; its WarpOp is `_o` afterwards."""
    tr.fibers = True
    return (f"::__kc::WarpOp _o{{::__kc::{kind}, {mode}u, (uint64_t)({a}), (uint32_t)({b}), (uint32_t)({c}), "
            f"(uint32_t)({mask}), 0, 0}}; __kc_warp_op(&_o);")


_SHFL_MODES = {".up": 0, ".down": 1, ".bfly": 2, ".idx": 3}


def shfl(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    mode = [m for m in mods if m in _SHFL_MODES]
    _only(tr, mods, {*mode, ".b32"})
    if len(mode) != 1 or ".b32" not in mods:
        raise tr.refuse("expected a mode and .b32")
    _nargs(tr, ins, 4, 5)
    d, a, b, c = ins.args[:4]
    mask = tr.src(ins.args[4], ".b32") if len(ins.args) == 5 else "0xffffffffu"
    pq = d.items if d.kind == "vec" and d.text == "|" else [d]
    out = [_warp(tr, "WARP_SHFL", _SHFL_MODES[mode[0]], tr.src(a, ".b32"), tr.src(b, ".b32"), tr.src(c, ".b32"), mask),
           tr.dst(pq[0], ".b32", "(uint32_t)_o.result")]
    if len(pq) == 2:
        out.append(tr.dst(pq[1], ".pred", "_o.pred != 0"))
    return "{ " + " ".join(out) + " }"


_VOTE_MODES = {".all": 0, ".any": 1, ".uni": 2, ".ballot": 3}


def vote(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins) + ([".uni"] if ".uni" in ins.mods else [])   # .uni is vote's mode, not bra's
    mode = [m for m in mods if m in _VOTE_MODES]
    t = ".b32" if mode == [".ballot"] else ".pred"
    _only(tr, mods, {*mode, t})
    if len(mode) != 1 or t not in mods:
        raise tr.refuse("expected a mode and its type (.pred, or .b32 for .ballot)")
    _nargs(tr, ins, 2, 3)
    d, a = ins.args[:2]
    mask = tr.src(ins.args[2], ".b32") if len(ins.args) == 3 else "0xffffffffu"
    res = "(uint32_t)_o.result" if t == ".b32" else "_o.result != 0"
    return "{ " + _warp(tr, "WARP_VOTE", _VOTE_MODES[mode[0]], tr.src(a, ".pred"), mask=mask) + " " \
        + tr.dst(d, t, res) + " }"


def match(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    mode = [m for m in mods if m in (".any", ".all")]
    t = [m for m in mods if m in (".b32", ".b64")]
    _only(tr, mods, {*mode, *t})
    if len(mode) != 1 or len(t) != 1:
        raise tr.refuse("expected .any or .all, and .b32 or .b64")
    _nargs(tr, ins, 3)
    d, a, mask = ins.args
    pq = d.items if d.kind == "vec" and d.text == "|" else [d]
    out = [_warp(tr, "WARP_MATCH_ANY" if mode == [".any"] else "WARP_MATCH_ALL", 0,
                 f"::kc::as<{_ctype(t[0])}>({tr.src(a, t[0])})", mask=tr.src(mask, ".b32")),
           tr.dst(pq[0], ".b32", "(uint32_t)_o.result")]
    if len(pq) == 2:
        out.append(tr.dst(pq[1], ".pred", "_o.pred != 0"))
    return "{ " + " ".join(out) + " }"


_REDUX = {".add": 0, ".min": 1, ".max": 2, ".and": 3, ".or": 4, ".xor": 5}


def redux(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    op = [m for m in mods if m in _REDUX]
    t = [m for m in mods if m in (".u32", ".s32", ".b32")]
    _only(tr, mods, {*op, *t})
    if len(op) != 1 or len(t) != 1:
        raise tr.refuse("expected an operation and .u32, .s32 or .b32 (floating-point redux is not run)")
    _nargs(tr, ins, 3)
    d, a, mask = ins.args
    mode = _REDUX[op[0]] + (8 if t[0] == ".s32" else 0)
    return "{ " + _warp(tr, "WARP_REDUX", mode, tr.src(a, ".b32"), mask=tr.src(mask, ".b32")) + " " \
        + tr.dst(d, t[0], "(uint32_t)_o.result") + " }"


def activemask(tr: Translator, ins: Instr) -> str:
    _only(tr, tr.mods(ins), {".b32"})
    _nargs(tr, ins, 1)
    return "{ " + _warp(tr, "WARP_SYNC", 0, "0") + " " + tr.dst(ins.args[0], ".b32", "(uint32_t)_o.result") + " }"


def warp_sync(tr: Translator, ins: Instr) -> str:
    """bar.warp.sync membermask: the lanes of the warp meet."""
    _nargs(tr, ins, 1)
    return "{ " + _warp(tr, "WARP_SYNC", 0, "0", mask=tr.src(ins.args[0], ".b32")) + " }"


# -- asynchronous copies and mbarriers (sm_80 cp.async, sm_90 bulk copies) -----------------
# A CPU copies at issue: an asynchronous copy is complete before the next instruction, so
# commit/wait groups have nothing to wait for, and a copy's mbarrier arrival or transaction
# completion happens right away. mbarrier waits yield the lane (kubecash_runtime.h).

_SHARED_SPACES = {".shared": ".shared", ".shared::cta": ".shared", ".shared::cluster": ".shared"}


def _space(tr: Translator, mods: list[str]) -> tuple[str, list[str]]:
    """The state space of an mbarrier / shared operand ("" generic) and the other modifiers."""
    spaces = [m for m in mods if m in _SHARED_SPACES]
    if len(spaces) > 1:
        raise tr.refuse("two state spaces")
    return (_SHARED_SPACES[spaces[0]] if spaces else ""), [m for m in mods if m not in _SHARED_SPACES]


def _u32_operand(tr: Translator, o) -> str:
    return tr.src(o, ".u32")


def cp(tr: Translator, ins: Instr) -> str:
    mods = tr.mods(ins)
    if not mods or mods[0] != ".async":
        raise tr.refuse("only cp.async")
    rest = mods[1:]
    if rest and rest[0] == ".bulk":
        return _cp_bulk(tr, ins, rest[1:])
    if rest in ([".commit_group"], [".wait_all"]):
        _nargs(tr, ins, 0)
        return ";"      # every copy of this thread is already complete
    if rest == [".wait_group"]:
        _nargs(tr, ins, 1)
        if ins.args[0].kind != "imm":
            raise PtxError("cp.async.wait_group takes an immediate group count", ins.line)
        return ";"
    if rest and rest[0] == ".mbarrier":
        return _cp_mbarrier_arrive(tr, ins, rest[1:])
    space, rest = _space(tr, rest)
    # cp.async.{ca,cg}.shared.global (.ca/.cg and .L2:: hints are dropped by tr.mods)
    _only(tr, rest, {".global"})
    if space != ".shared" or rest != [".global"]:
        raise tr.refuse("only shared <- global copies")
    hint = ".L2::cache_hint" in ins.mods
    _nargs(tr, ins, 3 + hint, 4 + hint)
    d, a, size = ins.args[:3]
    if size.kind != "imm" or _int(size.text, ins.line) not in (4, 8, 16):
        raise PtxError("cp.async's copy size is 4, 8 or 16 bytes (an immediate)", ins.line)
    if ".cg" in ins.mods and _int(size.text, ins.line) != 16:
        raise PtxError("cp.async.cg copies 16 bytes", ins.line)
    n = _int(size.text, ins.line)
    src_n = str(n)
    if len(ins.args) == 4 + hint:                  # src-size (zero-fill the rest) or ignore-src
        x = ins.args[3]
        pred = x.kind == "name" and (tr.scope.find(x.text) or ("", "", ""))[1] == ".pred"
        src_n = f"({tr.src(x, '.pred')} ? 0u : {n}u)" if pred else f"({tr.src(x, '.u32')})"
    dp, sp, k = tr.fresh(), tr.fresh(), tr.fresh()
    return (f"{{ unsigned char* {dp} = {tr.pointer(d, '.shared')}; "
            f"const unsigned char* {sp} = {tr.pointer(a, '.global')}; uint32_t {k} = {src_n}; "
            f"if ({k} > {n}u) {k} = {n}u; __builtin_memcpy({dp}, {sp}, {k}); "
            f"__builtin_memset({dp} + {k}, 0, {n}u - {k}); }}")


def _cp_mbarrier_arrive(tr: Translator, ins: Instr, rest: list[str]) -> str:
    """cp.async.mbarrier.arrive{.noinc}.shared.b64 [mbar]: an arrival once this thread's
    copies are done (now). Without .noinc the pending count is raised by one first: the
    two cancel."""
    tr.fibers = True
    space, rest = _space(tr, rest)
    _only(tr, rest, {".arrive", ".noinc", ".b64"})
    if ".arrive" not in rest or ".b64" not in rest:
        raise tr.refuse("expected .arrive and .b64")
    _nargs(tr, ins, 1)
    p = tr.pointer(ins.args[0], space)
    if ".noinc" in rest:
        return f"(void)__kc_mbar_arrive({p}, 1u, 0, 0, 0);"
    return f"(void)({p});"


def _cp_bulk(tr: Translator, ins: Instr, rest: list[str]) -> str:
    """cp.async.bulk: shared <- global completing transactions on an mbarrier, global <-
    shared in bulk groups; their commit/wait groups. Tensor, multicast and prefetch forms
    are refused."""
    if rest in ([".commit_group"],):
        _nargs(tr, ins, 0)
        return ";"
    if rest in ([".wait_group"], [".wait_group", ".read"]):
        _nargs(tr, ins, 1)
        return ";"
    if ".mbarrier::complete_tx::bytes" in rest:
        dst = [m for m in rest if m in _SHARED_SPACES]
        _only(tr, rest, {*dst, ".global", ".mbarrier::complete_tx::bytes"})
        if len(dst) != 1 or rest.index(dst[0]) != 0 or ".global" not in rest:
            raise tr.refuse("only shared <- global copies with an mbarrier")
        tr.fibers = True
        hint = ".L2::cache_hint" in ins.mods
        _nargs(tr, ins, 4 + hint)
        d, a, size, mbar = ins.args[:4]
        n, dp = tr.fresh(), tr.fresh()
        return (f"{{ uint32_t {n} = {tr.src(size, '.u32')}; unsigned char* {dp} = {tr.pointer(d, '.shared')}; "
                f"__builtin_memcpy({dp}, {tr.pointer(a, '.global')}, {n}); "
                f"__kc_mbar_tx({tr.pointer(mbar, '.shared')}, -(int64_t){n}); }}")
    if rest[:1] == [".global"] and rest[1:2] and rest[1] in _SHARED_SPACES:
        _only(tr, rest[2:], {".bulk_group"})
        _nargs(tr, ins, 3 + (".L2::cache_hint" in ins.mods))
        d, a, size = ins.args[:3]
        return f"__builtin_memcpy({tr.pointer(d, '.global')}, {tr.pointer(a, '.shared')}, {tr.src(size, '.u32')});"
    raise tr.refuse("this bulk copy form")


_MBAR_KINDS = {".init", ".inval", ".arrive", ".arrive_drop", ".expect_tx", ".complete_tx", ".test_wait",
               ".try_wait", ".pending_count"}


def mbarrier(tr: Translator, ins: Instr) -> str:
    tr.fibers = True
    space, mods = _space(tr, tr.mods(ins))
    kinds = [m for m in mods if m in _MBAR_KINDS]
    if not kinds:
        raise tr.refuse("no operation")
    kind = kinds[0]
    if kind in (".arrive", ".arrive_drop") and kinds[1:] == [".expect_tx"]:
        kinds = kinds[:1]
    if len(kinds) != 1:
        raise tr.refuse(f"operations {' '.join(kinds)}")
    sems = {".release", ".acquire"} if kind in (".arrive", ".arrive_drop", ".test_wait", ".try_wait",
                                                ".expect_tx", ".complete_tx") else set()
    extra = {".arrive": {".expect_tx", ".noComplete"}, ".arrive_drop": {".expect_tx", ".noComplete"},
             ".test_wait": {".parity"}, ".try_wait": {".parity"}}.get(kind, set())
    _only(tr, mods, {kind, ".b64", *sems, *extra})
    if ".b64" not in mods:
        raise tr.refuse("expected .b64")
    args = ins.args
    if kind == ".pending_count":
        _nargs(tr, ins, 2)
        return tr.dst(args[0], ".u32", f"__kc_mbar_pending({tr.src(args[1], '.b64')})")
    if kind in (".init", ".inval", ".expect_tx", ".complete_tx"):
        _nargs(tr, ins, 1 if kind == ".inval" else 2)
        p = tr.pointer(args[0], space)
        if kind == ".inval":
            return f"__kc_mbar_inval({p});"
        v = tr.src(args[1], ".u32")
        if kind == ".init":
            return f"__kc_mbar_init({p}, {v});"
        return f"__kc_mbar_tx({p}, {'' if kind == '.expect_tx' else '-'}(int64_t){v});"
    if kind in (".test_wait", ".try_wait"):
        _nargs(tr, ins, 3, 4 if kind == ".try_wait" else 3)     # try_wait's suspend-time hint: ignored
        d, a, x = args[:3]
        parity = f"(uint64_t){tr.src(x, '.u32')}" if ".parity" in mods else f"({tr.src(x, '.b64')} >> 63)"
        return tr.dst(d, ".pred", f"__kc_mbar_wait({tr.pointer(a, space)}, {parity})")
    # arrive / arrive_drop: state, [a] {, count}  |  .expect_tx: state, [a], tx
    _nargs(tr, ins, 2, 3)
    d, a = args[:2]
    tx = ".expect_tx" in mods
    if ".noComplete" in mods and len(args) != 3:
        raise PtxError(f"{ins.op}{''.join(ins.mods)} needs a count", ins.line)
    count = tr.src(args[2], ".u32") if len(args) == 3 and not tx else "1u"
    txv = f"(int64_t){tr.src(args[2], '.u32')}" if tx else "0"
    if tx and len(args) != 3:
        raise PtxError(f"{ins.op}{''.join(ins.mods)} needs a transaction count", ins.line)
    call = (f"__kc_mbar_arrive({tr.pointer(a, space)}, {count}, {int(kind == '.arrive_drop')}, "
            f"{int('.noComplete' in mods)}, {txv})")
    return tr.dst(d, ".b64", call)


def nanosleep(tr: Translator, ins: Instr) -> str:
    """nanosleep.u32 t: in fiber mode the lane yields (the others run); otherwise nothing."""
    _only(tr, tr.mods(ins), {".u32"})
    _nargs(tr, ins, 1)
    return f"(void){tr.src(ins.args[0], '.u32')}; __kc_yield();"


def elect(tr: Translator, ins: Instr) -> str:
    """elect.sync d|p, membermask: the lowest active lane of the mask is the leader."""
    _only(tr, tr.mods(ins), set())
    _nargs(tr, ins, 2)
    d, mask = ins.args
    pq = d.items if d.kind == "vec" and d.text == "|" else [d]
    m = tr.fresh()
    out = [_warp(tr, "WARP_SYNC", 0, "0", mask=tr.src(mask, ".b32")),
           f"uint32_t {m} = (uint32_t)_o.result & {tr.src(mask, '.b32')};",
           f"{m} = {m} ? (uint32_t)__builtin_ctz({m}) : 0u;",
           tr.dst(pq[0], ".b32", m)]
    if len(pq) == 2:
        out.append(tr.dst(pq[1], ".pred", f"{m} == (::kc::linear_tid() & 31u)"))
    return "{ " + " ".join(out) + " }"


def bfind(tr: Translator, ins: Instr) -> str:
    """bfind{.shiftamt}.{u32,s32,u64,s64} d, a: the most significant non-sign bit's position
    (or 31/63 minus it), 0xffffffff where there is none."""
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    _only(tr, mods, {t, ".shiftamt"})
    if t not in (".u32", ".s32", ".u64", ".s64"):
        raise tr.refuse(f"type {t}")
    _nargs(tr, ins, 2)
    d, a = ins.args
    bits = 8 * TYPES[t][1]
    ut = _UNSIGNED_OF[bits]
    x = f"(({ut}){tr.src(a, t)})"
    if _cls(t) == "s":
        x = f"(({_ctype(t)}){x} < 0 ? ({ut})~{x} : {x})"
    clz = "__builtin_clz" if bits == 32 else "__builtin_clzll"
    v, k = tr.fresh(), tr.fresh()
    pos = f"(uint32_t){clz}({v})" if ".shiftamt" in mods else f"(uint32_t)({bits - 1} - {clz}({v}))"
    return f"{{ {ut} {v} = {x}; uint32_t {k} = {v} ? {pos} : 0xffffffffu; {tr.dst(d, '.u32', k)} }}"


_UNSIGNED_OF = {32: "uint32_t", 64: "uint64_t"}


# -- integer dot products, 24-bit multiplies, sad, bmsk, szext -------------------------------
# (__dp4a, __dp2a_lo/hi, __mul24, __umul24, __sad, __usad and cuda::ptx::bmsk/szext)

def _dp(tr: Translator, ins: Instr) -> str:
    """dp4a.atype.btype d, a, b, c and dp2a.{lo,hi}.atype.btype d, a, b, c: c plus the dot
    product of a's bytes (dp2a: halves) with b's bytes, each sign- or zero-extended by its
    type; d is .u32 when both are, else .s32 (wrapping)."""
    mods = tr.mods(ins)
    types = [m for m in mods if m in (".u32", ".s32")]
    modes = [m for m in mods if m in (".lo", ".hi")]
    _only(tr, mods, {*types, *modes})
    if len(types) != 2 or (ins.op == "dp2a") != (len(modes) == 1):
        raise tr.refuse("expected " + ("a mode (.lo or .hi) and " if ins.op == "dp2a" else "") +
                        "two operand types (.u32 or .s32)")
    _nargs(tr, ins, 4)
    d, a, b, c = ins.args
    at, bt = types
    dt = ".u32" if at == bt == ".u32" else ".s32"
    sa, sb = str(at == ".s32").lower(), str(bt == ".s32").lower()
    args = f"{tr.src(a, '.b32')}, {tr.src(b, '.b32')}, {tr.src(c, '.b32')}, {sa}, {sb}"
    if ins.op == "dp4a":
        return tr.dst(d, dt, f"::kc::dp4a({args})")
    return tr.dst(d, dt, f"::kc::dp2a({args}, {str(modes[0] == '.hi').lower()})")


def _mul24(tr: Translator, ins: Instr) -> str:
    """mul24.{lo,hi}.{u32,s32} d, a, b (and mad24, + c): the 48-bit product of a's and b's
    low 24 bits (sign-extended for .s32), its low 32 bits or bits 47..16."""
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    mode = [m for m in mods if m in (".lo", ".hi")]
    _only(tr, mods, {t, *mode})
    if t not in (".u32", ".s32") or len(mode) != 1:
        raise tr.refuse("expected .lo or .hi and .u32 or .s32 (mad24.sat is not supported)")
    mad = ins.op == "mad24"
    _nargs(tr, ins, 4 if mad else 3)
    d, a, b, *c = ins.args
    p = (f"::kc::mul24({tr.src(a, '.u32')}, {tr.src(b, '.u32')}, {str(t == '.s32').lower()}, "
         f"{str(mode[0] == '.hi').lower()})")
    if mad:
        p = f"(uint32_t)({p} + {tr.src(c[0], '.u32')})"
    return tr.dst(d, t, p)


sad = _call("::kc::sad({0}, {1}, {2})", ("t", "t", "t"), classes="us")


def _bits_mode(tr: Translator, ins: Instr, types: tuple[str, ...]) -> tuple[str, bool]:
    mods = tr.mods(ins)
    mode = [m for m in mods if m in (".clamp", ".wrap")]
    t = [m for m in mods if m in types]
    _only(tr, mods, {*mode, *t})
    if len(mode) != 1 or len(t) != 1:
        raise tr.refuse(f"expected .clamp or .wrap and one of {' '.join(types)}")
    _nargs(tr, ins, 3)
    return t[0], mode[0] == ".clamp"


def bmsk(tr: Translator, ins: Instr) -> str:
    """bmsk.{clamp,wrap}.b32 d, a, b: b bits set from bit a."""
    t, clamp = _bits_mode(tr, ins, (".b32",))
    d, a, b = ins.args
    return tr.dst(d, t, f"::kc::bmsk({tr.src(a, '.u32')}, {tr.src(b, '.u32')}, {str(clamp).lower()})")


def szext(tr: Translator, ins: Instr) -> str:
    """szext.{clamp,wrap}.{u32,s32} d, a, b: a's low b bits, zero- or sign-extended."""
    t, clamp = _bits_mode(tr, ins, (".u32", ".s32"))
    d, a, b = ins.args
    return tr.dst(d, t, f"::kc::szext({tr.src(a, '.u32')}, {tr.src(b, '.u32')}, {str(clamp).lower()}, "
                        f"{str(t == '.s32').lower()})")


OPS = {
    "mov": mov, "ld": partial(_access, load=True), "ldu": partial(_access, load=True),
    "st": partial(_access, load=False), "cvta": cvta,
    "add": _carry(add), "sub": _carry(sub), "mul": partial(_product, add=False),
    "mad": _carry(partial(_product, add=True)), "fma": fma, "div": div, "rem": rem,
    "addc": _carry(None), "subc": _carry(None), "madc": _carry(None),
    "abs": abs_, "neg": neg, "min": _minmax, "max": _minmax,
    "and": and_, "or": or_, "xor": xor, "not": not_, "cnot": cnot, "shl": shl, "shr": shr, "shf": shf,
    "popc": popc, "clz": clz, "brev": brev, "bfe": bfe, "bfi": bfi, "prmt": prmt, "lop3": lop3,
    "sqrt": sqrt, "rsqrt": rsqrt, "rcp": rcp, "sin": sin, "cos": cos, "lg2": lg2, "ex2": ex2,
    "tanh": tanh, "copysign": copysign, "testp": testp,
    "setp": setp, "set": set_, "selp": selp, "cvt": cvt,
    "bra": bra, "ret": ret, "exit": exit_, "call": call, "trap": trap,
    "bar": bar, "barrier": bar, "membar": fence, "fence": fence,
    "atom": partial(_atom, result=True), "red": partial(_atom, result=False),
    "prefetch": nop, "prefetchu": nop,
    "shfl": shfl, "vote": vote, "match": match, "redux": redux, "activemask": activemask,
    "cp": cp, "mbarrier": mbarrier, "nanosleep": nanosleep, "elect": elect, "bfind": bfind,
    "dp4a": _dp, "dp2a": _dp, "mul24": _mul24, "mad24": _mul24, "sad": sad, "bmsk": bmsk, "szext": szext,
}


# -- half precision: .f16 .f16x2 .bf16 .bf16x2 ----------------------------------------------
# kubecash_ptx.h's hadd/hfma/... compute each result exactly and round it once (see there).

_HALF_MODE = {".rn": "::kc::H_RN", ".rz": "::kc::H_RZ", ".rm": "::kc::H_RM", ".rp": "::kc::H_RP"}
_HALF_FLAGS = {".ftz": "::kc::H_FTZ", ".sat": "::kc::H_SAT", ".relu": "::kc::H_RELU"}


def _half_type(mods: list[str]) -> str | None:
    return next((m for m in mods if m in TYPES and _cls(m) == "h"), None)


def _half_flags(mods: list[str]) -> str:
    return " | ".join(_HALF_FLAGS[m] for m in mods if m in _HALF_FLAGS) or "0"


def _half_apply(tr: Translator, ins: Instr, t: str, fn: str, args: list[str]) -> str:
    """fn (a C++ function of 16-bit operands) on the operands, per half for the x2 types."""
    d, *srcs = ins.args
    xs = [tr.src(x, t) for x in srcs]
    bf = "true" if t.startswith(".bf16") else "false"
    if t.endswith("x2"):
        names = ["_ha", "_hb", "_hc"]
        lam = (f"[](uint16_t _ha, uint16_t _hb, uint16_t _hc) {{ (void)_hb; (void)_hc; "
               f"return ::kc::{fn}<{bf}>({', '.join(names[:len(xs)] + args)}); }}")
        return tr.dst(d, t, f"::kc::h2({lam}, {', '.join(xs)})")
    return tr.dst(d, t, f"::kc::{fn}<{bf}>({', '.join(xs + args)})")


def _half_arith(tr: Translator, ins: Instr) -> str:
    """add sub mul fma (.rn; .ftz .sat .relu as PTX allows them), neg abs (.ftz), min max
    (.ftz .NaN .relu) of the 16-bit float types."""
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    rest = [m for m in mods if m != t]
    op = ins.op
    bf = t.startswith(".bf16")
    if op in ("add", "sub", "mul", "fma"):
        allowed = {".rn", ".relu"} if op == "fma" else {".rn"}
        if not bf:
            allowed |= {".ftz", ".sat"}
        _only(tr, rest, allowed)
        if ".sat" in rest and ".relu" in rest:
            raise tr.refuse("both .sat and .relu")
        if op == "fma" and ".rn" not in rest:
            raise tr.refuse("fma without a rounding mode")
        _nargs(tr, ins, 4 if op == "fma" else 3)
        return _half_apply(tr, ins, t, f"h{op}", ["::kc::H_RN", _half_flags(rest)])
    if op in ("neg", "abs"):
        _only(tr, rest, set() if bf else {".ftz"})
        _nargs(tr, ins, 2)
        return _half_apply(tr, ins, t, f"h{op}", [_half_flags(rest)])
    _only(tr, rest, {".NaN", ".relu"} | (set() if bf else {".ftz"}))
    _nargs(tr, ins, 3)
    flags = _half_flags(rest)
    return _half_apply(tr, ins, t, "hminmax", ["true" if op == "max" else "false",
                                               "true" if ".NaN" in rest else "false", flags])


def _half_value(tr: Translator, x: str, t: str, half: int, ftz: bool) -> str:
    """Half `half` (0: low) of a 16-bit float operand `x` of type t, as a double."""
    bf = "true" if t.startswith(".bf16") else "false"
    v = f"(uint16_t)({x} >> 16)" if half else f"(uint16_t)({x})"
    if ftz:
        v = f"::kc::hftz<{bf}>({v})"
    return f"::kc::hget<{bf}>({v})"


def _half_compare(tr: Translator, ins: Instr, mods: list[str], t: str, half: int) -> tuple[str, list[str]]:
    cmp = [m for m in mods if m in _FLOAT_CMP]
    if len(cmp) != 1:
        raise tr.refuse("expected one comparison")
    ftz = ".ftz" in mods
    a, b = (_half_value(tr, tr.src(x, t), t, half, ftz) for x in ins.args[1:3])
    return "(" + _FLOAT_CMP[cmp[0]].format(a=a, b=b) + ")", cmp


def _half_setp(tr: Translator, ins: Instr) -> str:
    """setp.cmp{.bool}{.ftz}.{f16,bf16} p{|q}, a, b{, c}; the x2 types: p from the low
    halves, q from the high halves."""
    mods = tr.mods(ins)
    t = tr.type_of(mods)
    boolop = [m for m in mods if m in _BOOL]
    _nargs(tr, ins, 4 if boolop else 3)
    pair = t.endswith("x2")
    conds = []
    for half in (0, 1) if pair else (0,):
        cond, cmp = _half_compare(tr, ins, mods, t, half)
        conds.append(cond)
    _only(tr, mods, {t, *cmp, *boolop, ".ftz"})
    d = ins.args[0]
    pq = d.items if d.kind == "vec" and d.text == "|" else [d]
    if pair and len(pq) != 2:
        raise tr.refuse(f"setp of {t} with one destination (it sets two: p|q)")
    vals = conds if pair else [conds[0], f"!{conds[0]}"][:len(pq)]
    if boolop:
        c = tr.src(ins.args[3], ".pred")
        vals = [f"(({v}) {_BOOL[boolop[0]]} ({c}))" for v in vals]
    return "{ " + " ".join(tr.dst(x, ".pred", v) for x, v in zip(pq, vals, strict=False)) + " }"


def _half_set(tr: Translator, ins: Instr) -> str:
    """set.cmp{.bool}{.ftz}.dtype.{f16,bf16,f16x2,bf16x2}: 1.0 (dtype a 16-bit float type) or
    all ones (an integer dtype) where true, 0 where false; per half for the x2 types."""
    mods = tr.mods(ins)
    dt, at = _two_types(tr, mods)
    boolop = [m for m in mods if m in _BOOL]
    _nargs(tr, ins, 4 if boolop else 3)
    pair = at.endswith("x2")
    if dt not in ((".u32", ".s32", ".b32", ".f16x2", ".bf16x2") if pair else
                  (".u32", ".s32", ".b32", ".f32", ".f16", ".bf16", ".u16", ".s16", ".b16")):
        raise tr.refuse(f"destination type {dt}")
    one = {".f16": "0x3c00u", ".f16x2": "0x3c00u", ".bf16": "0x3f80u", ".bf16x2": "0x3f80u",
           ".f32": "0x3f800000u"}.get(dt, "0xffffu" if pair or TYPES[dt][1] == 2 else "0xffffffffu")
    parts = []
    for half in (0, 1) if pair else (0,):
        cond, cmp = _half_compare(tr, ins, mods, at, half)
        if boolop:
            cond = f"(({cond}) {_BOOL[boolop[0]]} ({tr.src(ins.args[3], '.pred')}))"
        parts.append(f"((uint32_t)({cond} ? {one} : 0u) << {16 * half})")
    _only(tr, mods, {dt, at, *cmp, *boolop, ".ftz"})
    return tr.dst(ins.args[0], dt, f"::kc::as<{_ctype(dt)}>(({TYPES[dt][0]})({' | '.join(parts)}))")


def _half_or(half, other, pick=_half_type):
    """The half-precision handler where an operand is of a 16-bit float type, else `other`."""
    def handler(tr: Translator, ins: Instr) -> str:
        return half(tr, ins) if pick(tr.mods(ins)) else other(tr, ins)
    return handler


def _cvt_rounded(tr: Translator, ins: Instr) -> str | None:
    """cvt into the 16-bit float types in every rounding mode, from f32 or f64 (one rounding:
    kc::round_small from the exact double), .relu, and the packing cvt.f16x2.f32 d, a, b (a in
    the high half); cvt.{rz,rm,rp}.f32.f64. None: cvt's own handler does it."""
    mods = tr.mods(ins)
    dt, at = _two_types(tr, mods)
    rest = [m for m in mods if m not in (dt, at)]
    rnd = [m for m in rest if m in _HALF_MODE]
    directed = any(m in _DIRECTED for m in rnd)
    if _cls(dt) == "h" and at in (".f32", ".f64") and (directed or at == ".f64" or dt.endswith("x2")
                                                       or ".relu" in rest):
        _only(tr, rest, {*rnd, ".relu", ".ftz", ".sat"})
        if len(rnd) != 1:
            raise tr.refuse("expected one rounding mode")
        bf = "true" if dt.startswith(".bf16") else "false"
        flags = " | ".join(_HALF_FLAGS[m] for m in rest if m in (".relu", ".sat")) or "0"

        def one(o) -> str:
            x = tr.src(o, at)
            if ".ftz" in rest:
                x = f"::kc::ftz({x})"
            return f"::kc::hfinish<{bf}>((double)({x}), {_HALF_MODE[rnd[0]]}, {flags})"
        if dt.endswith("x2"):
            _nargs(tr, ins, 3)
            hi, lo = ins.args[1:]
            return tr.dst(ins.args[0], dt, f"((uint32_t){one(hi)} << 16 | (uint32_t){one(lo)})")
        _nargs(tr, ins, 2)
        return tr.dst(ins.args[0], dt, one(ins.args[1]))
    if dt == ".f32" and at == ".f64" and directed:
        _only(tr, rest, {*rnd, ".ftz", ".sat"})
        _nargs(tr, ins, 2)
        x = tr.src(ins.args[1], at)
        v = f"::kc::f64_to_f32<{_DIRECTED[rnd[0]]}>({x})"
        if ".ftz" in rest:
            v = f"::kc::ftz({v})"
        if ".sat" in rest:
            v = f"::kc::sat01({v})"
        return tr.dst(ins.args[0], dt, v)
    if dt == ".f64" and at == ".f32" and directed:      # exact: no rounding happens
        _only(tr, rest, {*rnd, ".ftz", ".sat"})
        return cvt(tr, dataclasses.replace(ins, mods=[m for m in ins.mods if m not in _DIRECTED]))
    return None


def _cvt_any(tr: Translator, ins: Instr) -> str:
    r = _cvt_rounded(tr, ins)
    return r if r is not None else cvt(tr, ins)


OPS.update({op: _half_or(_half_arith, OPS[op]) for op in
            ("add", "sub", "mul", "fma", "neg", "abs", "min", "max")})
OPS.update({"setp": _half_or(_half_setp, OPS["setp"]), "set": _half_or(_half_set, OPS["set"]),
            "cvt": _cvt_any})
