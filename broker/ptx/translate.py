"""A PTX syntax tree to one C++ translation unit the CPU backend builds like any module.

Each PTX function becomes a C++ function whose registers are locals; each instruction one
C++ statement (OPS below: one entry per opcode); branches are gotos. Kernels (.entry) get
the runtime's tables (kubecash_runtime.h), so they run on the same block scheduler, as
fibers where the module has barriers. Address spaces are this process's memory: global,
local, const and param addresses are plain pointers; shared addresses are offsets into the
block's shared window (a thread_local buffer, as one block runs at a time per OS thread; in a
cooperative launch each resident block has its own, which __kc_smem picks).

Anything not in OPS, or a modifier an entry does not handle, is PtxUnsupportedError naming
the instruction and its line: never a wrong result."""
from __future__ import annotations

import math
import re
import struct
import time

from .errors import PtxError, PtxTimeoutError, PtxUnsupportedError
from .parse import Block, Function, Instr, Label, Module, Operand, VarDecl, _number

# PTX type: (C++ type, bytes, class)  class: u s f (floats) b (untyped bits) p (predicate)
TYPES = {
    ".b8": ("uint8_t", 1, "b"), ".u8": ("uint8_t", 1, "u"), ".s8": ("int8_t", 1, "s"),
    ".b16": ("uint16_t", 2, "b"), ".u16": ("uint16_t", 2, "u"), ".s16": ("int16_t", 2, "s"),
    ".b32": ("uint32_t", 4, "b"), ".u32": ("uint32_t", 4, "u"), ".s32": ("int32_t", 4, "s"),
    ".b64": ("uint64_t", 8, "b"), ".u64": ("uint64_t", 8, "u"), ".s64": ("int64_t", 8, "s"),
    ".f32": ("float", 4, "f"), ".f64": ("double", 8, "f"),
    ".f16": ("uint16_t", 2, "h"), ".bf16": ("uint16_t", 2, "h"), ".f16x2": ("uint32_t", 4, "h"),
    ".bf16x2": ("uint32_t", 4, "h"), ".pred": ("bool", 1, "p"),
}
_UNSIGNED = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}
_IGNORED = re.compile(r"^\.(?:ca|cg|cs|lu|cv|wb|wt|nc|volatile|relaxed|weak|aligned|uni|sync"
                      r"|cta|gpu|sys|cluster|L1::.*|L2::.*|level::.*|unified|approx|full)$")
SHARED_WINDOW_DYNAMIC = 48 * 1024            # as the launcher's MAX_SHARED_BYTES
MAX_STATIC_SHARED = 48 * 1024                # a block's static .shared, as on the device
MAX_VARIABLE_BYTES = 1 << 32                 # one module variable
MAX_REGISTERS = 1 << 18                      # declared per function (NVRTC's run to thousands)
MAX_MODULE_REGISTERS = 1 << 20               # all functions together: each is a C++ local,
                                             # and a few bytes of `.reg .b32 %r<N>;` are N of them
SPECIAL = {"%tid": "threadIdx", "%ntid": "blockDim", "%ctaid": "blockIdx", "%nctaid": "gridDim"}


def _ident(kind: str, name: str) -> str:
    """A C++ identifier for a PTX name: nothing of the name can reach the C++ but letters,
    digits and underscores (everything else is spelled as _<code>_)."""
    return f"_{kind}_" + re.sub(r"[^A-Za-z0-9]", lambda m: f"_{ord(m.group()):x}_", name)


class _Scope:
    def __init__(self, parent: _Scope | None = None):
        self.parent = parent
        self.names: dict[str, tuple[str, str, str]] = {}   # ptx name -> (space, ptx type, c++ name)

    def find(self, name: str):
        s = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None


class Translator:
    def __init__(self, module: Module, deadline: float | None = None):
        self.m = module
        self.deadline = deadline
        self.count = 0                 # instructions translated: the deadline is checked every 1024
        self.globals = _Scope()
        self.shared: dict[int, int] = {}   # id(shared VarDecl) -> offset in the window
        self.shared_static = 0
        self.dynamic_shared = False
        self.fibers = False            # barriers or warp operations: blocks run as fibers
        self.funcs: dict[str, Function] = {}
        self.tmp = 0
        self.module_registers = 0

    # -- the module ------------------------------------------------------------------------
    def translate(self) -> str:
        """The C++ source: functions, then the runtime's tables (fibers where needed)."""
        m = self.m
        if not ((6, 0) <= m.version < (10, 0)):
            raise PtxUnsupportedError(f".version {m.version[0]}.{m.version[1]} (supported: 6.0 to 9.x)", 1)
        if m.address_size != 64:
            raise PtxUnsupportedError(f".address_size {m.address_size} (only 64)", 1)
        self._layout_shared()
        head = ['#include "kubecash_runtime.h"', '#include "kubecash_ptx.h"', "namespace {"]
        body: list[str] = []
        for v in m.variables:
            body += self._module_var(v)
        for f in m.functions:
            if f.name in self.funcs and self.funcs[f.name].body is not None and f.body is not None:
                raise PtxError(f"function {f.name} defined twice", f.line)
            if f.body is not None or f.name not in self.funcs:
                self.funcs[f.name] = f
            self.globals.names[f.name] = ("func", "", _ident("f" if not f.entry else "e", f.name))
        for f in self.funcs.values():
            if f.body is None and not f.entry:
                if f.name in ("vprintf", "__assertfail", "malloc", "free"):
                    continue    # refused where called
                raise PtxUnsupportedError(f"external function {f.name} (linking PTX modules)", f.line)
        protos = [self._signature(f) + ";" for f in self.funcs.values() if f.body is not None]
        for f in self.funcs.values():
            if f.body is not None:
                body += self._function(f)
        window = self.dynamic_offset + (SHARED_WINDOW_DYNAMIC if self.dynamic_shared else 0)
        head.append(f"alignas(16) static thread_local unsigned char _kc_smem_window[{max(window, 16)}];")
        # The scheduler's mode is fixed where the runtime header is read: first line.
        head.insert(0, f"#define __KC_FIBERS {1 if self.fibers else 0}")
        text = "\n".join(head + protos + body) + "\n}  // namespace\n"
        return text + self._tables()

    def _tables(self) -> str:
        g = ["static const ::__kc::KernelEntry __kc_kernel_table[] = {"]
        for f in self.funcs.values():
            if f.entry and f.body is not None:
                g.append(f'    __KC_KERNEL("{f.name}", "{f.name}", {_ident("e", f.name)})')
        g.append("    { nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr } };")
        g.append("static const ::__kc::VarEntry __kc_var_table[] = {")
        for v in self.m.variables:
            if v.space in (".global", ".const") and v.linkage != ".extern":
                g.append(f'    __KC_VAR("{v.name}", "{v.name}", {_ident("g", v.name)})')
        g.append("    { nullptr, nullptr, nullptr, 0 } };")
        g.append("__KC_EXPORTS")
        return "\n".join(g) + "\n"

    def _size(self, d: VarDecl) -> int:
        if d.type not in TYPES or d.type == ".pred":
            raise PtxUnsupportedError(f"variables of type {d.type}", d.line)
        n = TYPES[d.type][1] * d.vector
        for a in d.array:
            if a is None:
                if d.init is None:
                    return 0
                return max(len(d.init) * TYPES[d.type][1] * d.vector, n)
            n *= a
        return n

    def _module_var(self, v: VarDecl) -> list[str]:
        if v.name in self.globals.names:
            raise PtxError(f"{v.name} declared twice", v.line)
        if v.space == ".shared":
            self.globals.names[v.name] = self._shared_var(v)
            return []
        if v.space not in (".global", ".const"):
            raise PtxUnsupportedError(f"module-level {v.space} variables", v.line)
        if v.linkage == ".extern":
            raise PtxUnsupportedError(f".extern {v.space} variable {v.name} (linking PTX modules)", v.line)
        size = self._size(v)
        if size > MAX_VARIABLE_BYTES:
            raise PtxUnsupportedError(f"{v.space} variable {v.name} of {size} bytes", v.line)
        align = max(v.align, TYPES[v.type][1])
        name = _ident("g", v.name)
        self.globals.names[v.name] = (v.space, v.type, name)
        init = ""
        if v.init is not None and any(isinstance(x, tuple) and x[0] == "sym" for x in v.init):
            return [self._address_table(v, name, size, align)]
        if v.init is not None:
            data = self._init_bytes(v, size)
            init = " = {" + ", ".join(str(b) for b in data) + "}"
        # Not static: the runtime's table takes its address, and cuModuleGetGlobal reaches it.
        return [f"alignas({align}) unsigned char {name}[{max(size, 1)}]{init};"]

    def _address_table(self, v: VarDecl, name: str, size: int, align: int) -> str:
        """A 64-bit variable initialized with addresses (`s = generic($str)`, tables of
        functions): pointers, which the loader relocates; no code runs at load time."""
        if TYPES[v.type][1] != 8 or size % 8:
            raise PtxUnsupportedError(f"address initializers in {v.type} variable {v.name} (only 64-bit)", v.line)
        items = []
        for x in v.init:
            if isinstance(x, tuple) and x[0] == "sym":
                target = self.globals.names.get(x[1])
                if target is None or target[0] not in (".global", ".const", "func"):
                    raise PtxError(f"{v.name}: initializer names {x[1]}, not a global variable or function", v.line)
                items.append(f"(void*)((unsigned char*)&{target[2]} + {int(x[2])})")
            elif isinstance(x, int):
                items.append(f"(void*)(uintptr_t){x % (1 << 64)}ULL")
            else:
                raise PtxError(f"a floating-point initializer for {v.type} {v.name}", v.line)
        if len(items) > size // 8:
            raise PtxError(f"too many initializers for {v.name}", v.line)
        return f"alignas({align}) void* {name}[{size // 8}] = {{{', '.join(items)}}};"

    def _init_bytes(self, v: VarDecl, size: int) -> bytes:
        ctype, n, cls = TYPES[v.type]
        out = bytearray()
        for x in v.init:
            if isinstance(x, tuple) and x[0] == "bits":
                if len(x[1]) - 2 != 2 * n:
                    raise PtxError(f"a {(len(x[1]) - 2) * 4}-bit float initializer for {v.type} {v.name}", v.line)
                out += int(x[1][2:], 16).to_bytes(n, "little")
            elif isinstance(x, tuple):
                raise PtxUnsupportedError(f"address initializers ({v.name} = {{{x[1]}...}})", v.line)
            elif cls == "f":
                out += struct.pack("<f" if n == 4 else "<d", float(x))
            elif isinstance(x, float):
                raise PtxError(f"a floating-point initializer for {v.type} {v.name}", v.line)
            else:
                out += (x % (1 << (8 * n))).to_bytes(n, "little")
        if len(out) > size:
            raise PtxError(f"too many initializers for {v.name}", v.line)
        return bytes(out).rstrip(b"\0")     # C++ zero-fills the rest of the array

    def _layout_shared(self) -> None:
        """Offsets in the shared window for every .shared variable, module or function
        scope, before any code refers to one; dynamic (extern, unsized) shared memory
        starts after them all, 16-byte aligned."""
        decls = [v for v in self.m.variables if v.space == ".shared"]

        def walk(b: Block) -> None:
            for it in b.items:
                if isinstance(it, VarDecl) and it.space == ".shared":
                    decls.append(it)
                elif isinstance(it, Block):
                    walk(it)
        for f in self.m.functions:
            if f.body is not None:
                walk(f.body)
        for v in decls:
            if v.array and v.array[-1] is None and v.init is None:    # extern .shared x[]
                self.dynamic_shared = True
                continue
            if v.init is not None:
                raise PtxError(f".shared variable {v.name} with an initializer", v.line)
            align = max(v.align, TYPES.get(v.type, ("", 1))[1], 1)
            off = -(-self.shared_static // align) * align
            self.shared[id(v)] = off
            self.shared_static = off + self._size(v)
        if self.shared_static > MAX_STATIC_SHARED:
            raise PtxUnsupportedError(f"{self.shared_static} bytes of static .shared memory "
                                      f"(a block has {MAX_STATIC_SHARED})", 1)
        self.dynamic_offset = -(-self.shared_static // 16) * 16

    def _shared_var(self, v: VarDecl) -> tuple[str, str, str]:
        off = self.shared.get(id(v))
        return (".shared", v.type, str(self.dynamic_offset if off is None else off))

    # -- functions ----    # -- functions -------------------------------------------------------------------------
    def _signature(self, f: Function) -> str:
        name = _ident("e" if f.entry else "f", f.name)
        if f.entry:
            ps = []
            for i, p in enumerate(f.params):
                size, align = self._size(p), max(p.align, TYPES[p.type][1])
                ps.append(f"::kc::param<{size}, {align}> _a{i}")
            return f"static void {name}({', '.join(ps)})"
        ps = [f"unsigned char* _r{i}" for i in range(len(f.rets))]
        ps += [f"unsigned char* _a{i}" for i in range(len(f.params))]
        return f"static void {name}({', '.join(ps)})"

    def _function(self, f: Function) -> list[str]:
        self.fn = f
        self.registers = 0
        self._check_labels(f)
        scope = _Scope(self.globals)
        lines = [self._signature(f) + " {"]
        for i, p in enumerate(f.params):
            c = _ident("p", p.name)
            scope.names[p.name] = (".param", p.type, c)
            lines.append(f"    unsigned char* const {c} = _a{i}{'.b' if f.entry else ''};")
        for i, r in enumerate(f.rets):
            c = _ident("p", r.name)
            scope.names[r.name] = (".param", r.type, c)
            lines.append(f"    unsigned char* const {c} = _r{i};")
        self.carry = False             # add.cc and the like: the carry flag, one per thread
        body = self._block(f.body, scope, top=True)
        if self.carry:
            lines.append("    uint32_t _kc_cc = 0;")
        if any("_kc_smem" in line for line in body):
            # The window's address once per thread: each use of the thread_local after a
            # call (a barrier) would look it up again (__tls_get_addr in a dlopen'ed module).
            # Laundered: g++ would otherwise fold a constant offset (an out-of-range index on
            # a path it proves) into a TLS relocation too small for it, and the link fails.
            lines.append("    unsigned char* _kc_smem = __kc_smem(_kc_smem_window);")
            lines.append('    __asm__("" : "+r"(_kc_smem));')
        lines += body
        lines.append("}")
        return lines

    def _check_labels(self, f: Function) -> None:
        """Every label defined once in the function (branches are checked against them):
        what PTX requires, said here rather than by the host compiler."""
        self.labels: dict[str, int] = {}

        def walk(b: Block) -> None:
            for it in b.items:
                if isinstance(it, Label):
                    if it.name in self.labels:
                        raise PtxError(f"label {it.name} defined twice (first at line {self.labels[it.name]})",
                                       it.line)
                    self.labels[it.name] = it.line
                elif isinstance(it, Block):
                    walk(it)
        walk(f.body)

    def _declare(self, d: VarDecl, scope: _Scope, top: bool) -> list[str]:
        if d.space != ".reg" and d.name in scope.names:
            raise PtxError(f"{d.name} declared twice in one scope", d.line)
        if d.space == ".reg":
            if d.type not in TYPES:
                raise PtxUnsupportedError(f"registers of type {d.type}", d.line)
            if d.vector != 1 or d.array:
                raise PtxUnsupportedError("vector or array registers", d.line)
            ctype = TYPES[d.type][0]
            n = d.count if d.count is not None else 1
            if n < 0:
                raise PtxError(f"a negative register count for {d.name}", d.line)
            self.registers += n
            self.module_registers += n
            if self.registers > MAX_REGISTERS:
                raise PtxUnsupportedError(f"more than {MAX_REGISTERS} registers in one function", d.line)
            if self.module_registers > MAX_MODULE_REGISTERS:
                raise PtxUnsupportedError(f"more than {MAX_MODULE_REGISTERS} registers in one module", d.line)
            names = [f"{d.name}{i}" for i in range(d.count)] if d.count is not None else [d.name]
            for n in names:
                if n in scope.names:
                    raise PtxError(f"{n} declared twice in one scope", d.line)
                scope.names[n] = (".reg", d.type, _ident("r", n))
            init = " = 0" if top else ""
            return [f"    {ctype} {', '.join(_ident('r', n) + init for n in names)};"]
        if d.space == ".shared":
            scope.names[d.name] = self._shared_var(d)
            return []
        if d.space in (".local", ".param"):
            size = self._size(d)
            if size > MAX_VARIABLE_BYTES:
                raise PtxUnsupportedError(f"{d.space} variable {d.name} of {size} bytes", d.line)
            align = max(d.align, TYPES[d.type][1])
            c = _ident("l", d.name)
            scope.names[d.name] = (d.space, d.type, c)
            return [f"    alignas({align}) unsigned char {c}[{max(size, 1)}];"]
        raise PtxUnsupportedError(f"{d.space} declarations inside a function", d.line)

    def _block(self, b: Block, scope: _Scope, top: bool = False) -> list[str]:
        out: list[str] = []
        for it in b.items:
            if isinstance(it, VarDecl):
                out += self._declare(it, scope, top)
        for it in b.items:
            if isinstance(it, VarDecl):
                continue
            if isinstance(it, Block):
                out.append("    {")
                out += self._block(it, _Scope(scope))
                out.append("    }")
            elif isinstance(it, Label):
                out.append(f"  {_ident('L', it.name)}:;")
            else:
                out.append("    " + self._instr(it, scope))
        return out

    def _instr(self, ins: Instr, scope: _Scope) -> str:
        handler = OPS.get(ins.op)
        if handler is None:
            raise PtxUnsupportedError(f"instruction {ins.op}", ins.line)
        self.count += 1
        if self.deadline is not None and not self.count & 1023 and time.monotonic() > self.deadline:
            raise PtxTimeoutError(f"translation timed out after {self.count} instructions (the build's time bound)",
                                  ins.line)
        self.scope = scope
        self.ins = ins
        try:
            code = handler(self, ins)
        except IndexError:      # a handler reached for an operand the line does not have
            raise PtxError(f"{ins.op}{''.join(ins.mods)}: too few operands ({len(ins.args)})", ins.line) from None
        if ins.guard is not None:
            p = self._pred(ins.guard)
            code = f"if ({'!' if ins.guard_neg else ''}{p}) {{ {code} }}"
        return code

    # -- operands --------------------------------------------------------------------------
    def refuse(self, what: str) -> PtxUnsupportedError:
        return PtxUnsupportedError(f"{self.ins.op}{''.join(self.ins.mods)}: {what}", self.ins.line)

    def _pred(self, name: str) -> str:
        d = self.scope.find(name)
        if d is None or d[0] != ".reg" or d[1] != ".pred":
            raise PtxError(f"{name} is not a predicate register", self.ins.line)
        return d[2]

    def reg(self, o: Operand) -> tuple[str, str]:
        """(C++ name, PTX type) of a register operand."""
        if o.kind != "name":
            raise PtxError(f"expected a register, found {o.text or o.kind}", self.ins.line)
        d = self.scope.find(o.text)
        if d is None or d[0] != ".reg":
            raise PtxError(f"{o.text} is not a declared register", self.ins.line)
        return d[2], d[1]

    def src(self, o: Operand, t: str) -> str:
        """Operand `o` as a C++ expression of PTX type `t`."""
        ctype, size, cls = TYPES[t]
        if o.kind == "name":
            if o.text.split(".")[0] in SPECIAL or o.text.startswith("%"):
                d = self.scope.find(o.text)
                if d is None:
                    return f"(({ctype}){self.special(o.text)})"
            d = self.scope.find(o.text)
            if d is None:
                raise PtxError(f"{o.text} is not declared", self.ins.line)
            if d[0] == ".reg":
                self._check_width(o.text, d[1], t, dest=False)
                if d[1] == ".pred":
                    e = d[2]
                    return f"(!{e})" if o.negate_pred else e
                return f"::kc::as<{ctype}>({d[2]})"
            return f"(({ctype}){self.address_of(o.text, o.offset)})"
        if o.kind == "imm":
            v = _number(o.text.lstrip("-"))
            v = -v if o.text.startswith("-") else v
            if cls == "f":
                return f"(({ctype}){_float_literal(float(v))})"
            if isinstance(v, float):
                raise PtxError(f"a floating-point immediate for {t}", self.ins.line)
            if cls == "p":
                return "true" if v else "false"
            v %= 1 << (8 * size)
            return f"::kc::as<{ctype}>(({_UNSIGNED[size]}){v}ull)"
        if o.kind == "float":
            hexbits = o.text[2:]
            w = 4 if o.text[1] in "fF" else 8
            if cls == "f":
                if w == size:
                    return f"::kc::as<{ctype}>(({'uint32_t' if w == 4 else 'uint64_t'})0x{hexbits}ull)"
                val = struct.unpack("<f" if w == 4 else "<d", int(hexbits, 16).to_bytes(w, "little"))[0]
                return f"(({ctype}){_float_literal(val)})"
            return f"::kc::as<{ctype}>(({'uint32_t' if w == 4 else 'uint64_t'})0x{hexbits}ull)"
        raise PtxError(f"unexpected operand for {t}", self.ins.line)

    def dst(self, o: Operand, t: str, expr: str) -> str:
        """Store `expr` (of PTX type `t`) in register `o`."""
        if o.kind == "sink":
            return f"(void)({expr});"
        name, rt = self.reg(o)
        self._check_width(o.text, rt, t, dest=True)
        return f"{name} = ::kc::put<{TYPES[rt][0]}>(({TYPES[t][0]})({expr}));"

    # ld, st and cvt may name a register wider than their (integer) type; nothing else may
    # (PTX ISA, "Operand Size Exceeding Instruction-Type Size"). ptxas refuses the rest, so
    # the translator does too rather than give such a line a meaning of its own.
    _WIDER_OK = {"ld": True, "ldu": True, "cvt": True, "st": False}   # op -> widens its destination

    def _check_width(self, name: str, rt: str, t: str, dest: bool) -> None:
        if (rt == ".pred") != (t == ".pred"):
            raise PtxError(f"{name} is a {rt} register, used as {t}", self.ins.line)
        have, want = TYPES[rt][1], TYPES[t][1]
        if have == want:
            return
        widens = self._WIDER_OK.get(self.ins.op)
        if have > want and widens is not None and TYPES[t][2] in "bus" and TYPES[rt][2] in "bus" \
                and (dest == widens or self.ins.op == "cvt"):
            return
        raise PtxError(f"{name} is a {rt} register, used as {t} ({have} bytes, not {want})", self.ins.line)

    def special(self, name: str) -> str:
        base, _, comp = name.partition(".")
        if base in SPECIAL and comp in ("x", "y", "z"):
            return f"{SPECIAL[base]}.{comp}"
        simple = {
            "%laneid": "(::kc::linear_tid() & 31u)", "%warpid": "(::kc::linear_tid() >> 5)",
            "%nwarpid": "((blockDim.x * blockDim.y * blockDim.z + 31u) >> 5)",
            "%clock": "((uint32_t)::kc::clock64())", "%clock64": "::kc::clock64()",
            "%globaltimer": "::kc::globaltimer()", "%globaltimer_lo": "((uint32_t)::kc::globaltimer())",
            "%globaltimer_hi": "((uint32_t)(::kc::globaltimer() >> 32))", "%smid": "0u",
            "%nsmid": "1u", "%gridid": "0ull",
            "%lanemask_eq": "(1u << (::kc::linear_tid() & 31u))",
            "%lanemask_lt": "((1u << (::kc::linear_tid() & 31u)) - 1u)",
            "%lanemask_le": "((2u << (::kc::linear_tid() & 31u)) - 1u)",
            "%lanemask_gt": "(~((2u << (::kc::linear_tid() & 31u)) - 1u))",
            "%lanemask_ge": "(~((1u << (::kc::linear_tid() & 31u)) - 1u))",
        }
        if name in simple:
            return simple[name]
        if name in ("%envreg1", "%envreg2"):   # a cooperative launch's grid workspace, high:low
            self.fibers = True      # its grid barrier spins: resident blocks must take turns
            ws = "__kc_grid_workspace()"
            return f"((uint32_t)({ws} >> 32))" if name == "%envreg1" else f"((uint32_t){ws})"
        if name.startswith("%envreg"):
            raise self.refuse(f"special register {name} (a driver-defined register KubeCASH does not set)")
        raise self.refuse(f"special register {name}")

    def address_of(self, name: str, offset: int = 0) -> str:
        """A variable's address in its own state space, as an integer: a pointer for
        global/const/local/param, an offset into the shared window for shared."""
        d = self.scope.find(name)
        if d is None:
            raise PtxError(f"{name} is not declared", self.ins.line)
        space, _t, c = d
        if space == ".shared":
            return f"((uint64_t){int(c) + offset})"
        if space == "func":
            raise self.refuse(f"the address of function {name} (indirect calls)")
        if space == ".reg":
            raise PtxError(f"{name} is a register, not a variable", self.ins.line)
        return f"((uint64_t)(uintptr_t)({c} + {offset}))"

    def pointer(self, a: Operand, space: str) -> str:
        """The C++ pointer an address operand [base+offset] of state space `space` reaches."""
        if a.kind != "addr":
            raise PtxError("expected an address [..]", self.ins.line)
        if a.base is None:
            if space == ".shared":
                return f"(_kc_smem + {a.offset})"
            return f"((unsigned char*)(uintptr_t){a.offset}ull)"
        d = self.scope.find(a.base.text)
        if d is None:
            raise PtxError(f"{a.base.text} is not declared", self.ins.line)
        if d[0] == ".reg":
            v = f"::kc::as<uint64_t>({d[2]})" if TYPES[d[1]][1] == 8 else f"(uint64_t)::kc::as<uint32_t>({d[2]})"
            if space == ".shared":
                return f"(_kc_smem + (uint32_t)({v}) + {a.offset})"
            return f"((unsigned char*)(uintptr_t)({v}) + {a.offset})"
        if d[0] == ".shared":
            if space not in (".shared", ""):
                raise self.refuse(f"a shared variable through the {space} space")
            return f"(_kc_smem + {self.address_of(a.base.text, a.offset)})"
        if d[0] == "func":
            raise self.refuse("a function's address")
        return f"({d[2]} + {a.offset})"

    # -- helpers for handlers --------------------------------------------------------------
    def mods(self, ins: Instr) -> list[str]:
        return [m for m in ins.mods if not _IGNORED.match(m)]

    def type_of(self, mods: list[str]) -> str:
        ts = [m for m in mods if m in TYPES]
        if len(ts) != 1:
            raise self.refuse("expected one operand type")
        return ts[0]

    def fresh(self) -> str:
        self.tmp += 1
        return f"_t{self.tmp}"


def _float_literal(v: float) -> str:
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    return repr(v)


def translate(module: Module, deadline: float | None = None) -> str:
    return Translator(module, deadline).translate()


from .instructions import OPS  # noqa: E402  (the table refers back to Translator's helpers)
