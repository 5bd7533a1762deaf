"""PTX text to a syntax tree: the module's directives, its variables, and each function's
parameters and statements (instructions with their guards, labels, nested blocks).

Only the grammar is checked here; what an instruction means is translate.py's business."""
from __future__ import annotations

import dataclasses
import re
import time

from .errors import PtxError, PtxTimeoutError, PtxUnsupportedError

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+|\n)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<float>0[fF][0-9a-fA-F]{8}|0[dD][0-9a-fA-F]{16})
  | (?P<number>0[xX][0-9a-fA-F]+U?|0[bB][01]+U?|[0-9]+\.[0-9]*(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+|[0-9]+U?)
  | (?P<ident>[.%$_a-zA-Z][a-zA-Z0-9_$.]*(?:::[a-zA-Z0-9_$]+[a-zA-Z0-9_$.]*)*)     # .shared::cta, .L2::128B
  | (?P<punct>[{}()\[\],;:@!+\-<>=|*])
""", re.X | re.S)


@dataclasses.dataclass
class Tok:
    kind: str
    text: str
    line: int


def tokenize(text: str, deadline: float | None = None) -> list[Tok]:
    toks, line, pos = [], 1, 0
    while pos < len(text):
        if deadline is not None and not len(toks) & 4095 and time.monotonic() > deadline:
            raise PtxTimeoutError("parsing timed out (the build's time bound)", line)
        m = _TOKEN.match(text, pos)
        if not m:
            raise PtxError(f"unexpected character {text[pos]!r}", line)
        kind, s = m.lastgroup, m.group()
        if kind not in ("ws", "comment"):
            toks.append(Tok(kind, s, line))
        line += s.count("\n")
        pos = m.end()
    return toks


@dataclasses.dataclass
class Operand:
    """reg/special/symbol name, an immediate, an address [base+offset], a vector {a, b}, or _"""
    kind: str                     # "name" | "imm" | "float" | "addr" | "vec" | "sink"
    text: str = ""
    offset: int = 0               # addr: the constant part
    base: Operand | None = None   # addr: its register or symbol (None: an absolute address)
    items: list[Operand] = dataclasses.field(default_factory=list)   # vec
    negate_pred: bool = False     # !%p as a source predicate


@dataclasses.dataclass
class Instr:
    op: str                        # "add"
    mods: list[str]                # [".s32"] / [".global", ".v4", ".f32"]
    args: list[Operand]
    line: int
    guard: str | None = None       # "%p1"
    guard_neg: bool = False


@dataclasses.dataclass
class Label:
    name: str
    line: int


@dataclasses.dataclass
class VarDecl:
    """.reg/.local/.shared/.global/.const/.param declaration"""
    space: str                     # ".reg", ".shared", ...
    type: str                      # ".b32"
    name: str
    line: int
    align: int = 0
    array: list[int | None] = dataclasses.field(default_factory=list)   # [] scalar; [None]: []
    count: int | None = None       # %r<6>
    init: list | None = None       # initializer values (flattened): int/float/str (symbol)
    linkage: str = ""              # .extern / .visible / .weak / ""
    vector: int = 1                # .v2 / .v4 variables


@dataclasses.dataclass
class Block:
    items: list                    # Instr | Label | VarDecl | Block
    line: int


@dataclasses.dataclass
class Function:
    name: str
    entry: bool
    params: list[VarDecl]
    rets: list[VarDecl]
    body: Block | None             # None: a prototype (.extern .func)
    line: int
    linkage: str = ""
    directives: dict[str, list[int]] = dataclasses.field(default_factory=dict)   # .maxntid etc.


@dataclasses.dataclass
class Module:
    version: tuple[int, int]
    target: list[str]
    address_size: int
    variables: list[VarDecl]
    functions: list[Function]


_SPACES = (".reg", ".local", ".shared", ".global", ".const", ".param", ".tex")
_LINKAGE = (".extern", ".visible", ".weak", ".common")
_TEXTURE_OPS = frozenset({"tex", "tld4", "txq", "suld", "sust", "sured", "suq", "istypep"})
_PERF = (".maxntid", ".reqntid", ".minnctapersm", ".maxnctapersm", ".maxnreg", ".noreturn",
         ".pragma", ".maxclusterrank", ".reqnctapercluster", ".explicitcluster")


class _Parser:
    def __init__(self, toks: list[Tok], deadline: float | None = None):
        self.t, self.i = toks, 0
        self.deadline = deadline

    # -- tokens -----------------------------------------------------------------------------
    def peek(self, k: int = 0) -> Tok | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def line(self) -> int:
        t = self.peek() or (self.t[-1] if self.t else None)
        return t.line if t else 1

    def next(self) -> Tok:
        t = self.peek()
        if t is None:
            raise PtxError("unexpected end of the PTX text", self.line())
        self.i += 1
        return t

    def at(self, text: str) -> bool:
        t = self.peek()
        return t is not None and t.text == text

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Tok:
        t = self.next()
        if t.text != text:
            raise PtxError(f"expected {text!r}, found {t.text!r}", t.line)
        return t

    def ident(self) -> Tok:
        t = self.next()
        if t.kind != "ident":
            raise PtxError(f"expected a name, found {t.text!r}", t.line)
        return t

    def integer(self) -> int:
        neg = self.accept("-")
        t = self.next()
        if t.kind != "number" or "." in t.text:
            raise PtxError(f"expected an integer, found {t.text!r}", t.line)
        v = _int(t.text, t.line)
        return -v if neg else v

    # -- module -----------------------------------------------------------------------------
    def module(self) -> Module:
        version, target, asize = (0, 0), [], 64
        variables: list[VarDecl] = []
        functions: list[Function] = []
        while self.peek() is not None:
            t = self.peek()
            if t.text == ".version":
                self.next()
                v = self.next()
                major, _, minor = v.text.partition(".")
                if not (major.isdigit() and minor.isdigit()):
                    raise PtxError(f"bad .version {v.text!r}", v.line)
                version = (int(major), int(minor))
            elif t.text == ".target":
                self.next()
                target.append(self.ident().text)
                while self.accept(","):
                    target.append(self.ident().text)
            elif t.text == ".address_size":
                self.next()
                asize = self.integer()
            elif t.text == ".section":          # DWARF for cuda-gdb (-G): { .b8 ... } blocks
                self._skip_directive()
                if self.at("{"):
                    self._skip_braces()
            elif t.text in (".file", ".loc"):
                self._skip_directive()
            elif t.text == ".pragma":
                self.next()
                self.next()
                self.accept(";")
            else:
                linkage = ""
                while self.peek() is not None and self.peek().text in _LINKAGE:
                    linkage = self.next().text
                t = self.peek()
                if t is None:
                    raise PtxError("unexpected end of the PTX text", self.line())
                if t.text in (".entry", ".func"):
                    functions.append(self.function(linkage))
                elif t.text in _SPACES:
                    variables += self.var_decls(linkage)
                    self.expect(";")
                else:
                    raise PtxError(f"unknown module-level directive {t.text!r}", t.line)
        if version == (0, 0):
            raise PtxError("no .version directive: not PTX text", 1)
        return Module(version, target, asize, variables, functions)

    def _skip_braces(self) -> None:
        start = self.next()
        depth = 1
        while depth:
            t = self.peek()
            if t is None:
                raise PtxError("unclosed '{' of a .section", start.line)
            self.next()
            depth += {"{": 1, "}": -1}.get(t.text, 0)

    def _skip_directive(self) -> None:
        line = self.next().line
        while self.peek() is not None and self.peek().line == line and not self.at(";"):
            self.next()
        self.accept(";")

    def var_decl(self, linkage: str = "") -> VarDecl:
        space_tok = self.next()
        space, line = space_tok.text, space_tok.line
        align, vector, typ = 0, 1, ""
        while True:
            t = self.peek()
            if t is None:
                raise PtxError("unexpected end in a declaration", line)
            if t.text == ".align":
                self.next()
                align = self.integer()
                if align < 1 or align & (align - 1) or align > 4096:
                    raise PtxError(f".align {align}: a power of two from 1 to 4096", line)
            elif t.text in (".v2", ".v4", ".v8"):
                vector = int(self.next().text[2:])
            elif t.text in (".ptr", ".global", ".shared", ".const", ".local"):   # .param .ptr.global
                self.next()
            elif t.kind == "ident" and t.text.startswith(".") and not typ:
                typ = self.next().text
            else:
                break
        if not typ:
            raise PtxError(f"{space} declaration without a type", line)
        return self._declarator(VarDecl(space, typ, "", line, align=align, linkage=linkage, vector=vector))

    def var_decls(self, linkage: str = "") -> list[VarDecl]:
        """One declaration statement: one or more names of one space and type, each with its
        own count, array sizes and initializer (`.reg .u32 lo, hi;` in inline assembly)."""
        out = [self.var_decl(linkage)]
        while self.accept(","):
            out.append(self._declarator(dataclasses.replace(out[0], name="", array=[], count=None, init=None)))
        return out

    def _declarator(self, d: VarDecl) -> VarDecl:
        """The name of a declaration and what follows it: <count>, [sizes], = initializer."""
        name, line = self.ident().text, d.line
        d.name = name
        if self.accept("<"):
            d.count = self.integer()
            self.expect(">")
            if d.count < 0:
                raise PtxError(f"{name}<{d.count}>: a negative register count", line)
        while self.accept("["):
            if self.accept("]"):
                d.array.append(None)
                continue
            n = self.integer()
            if n < 0:
                raise PtxError(f"{name}[{n}]: a negative array size", line)
            d.array.append(n)
            self.expect("]")
        if self.accept("="):
            d.init = self._initializer()
        return d

    def _initializer(self) -> list:
        out: list = []
        if self.accept("{"):
            if not self.at("}"):
                out += self._initializer()
                while self.accept(","):
                    out += self._initializer()
            self.expect("}")
            return out
        neg = self.accept("-")
        t = self.next()
        if t.kind == "number":
            v = _number(t.text)
            out.append(-v if neg else v)
        elif t.kind == "float":
            out.append(("bits", t.text))
        elif t.kind == "ident" and not neg:
            name, wrapped = t.text, False
            if name == "generic" and self.accept("("):     # generic(var): a generic address
                name, wrapped = self.ident().text, True
            off = 0
            if self.accept("+"):
                off = self.integer()
            if wrapped:
                self.expect(")")
            out.append(("sym", name, off))
        else:
            raise PtxError(f"bad initializer {t.text!r}", t.line)
        return out

    def function(self, linkage: str) -> Function:
        kw = self.next()
        entry = kw.text == ".entry"
        rets: list[VarDecl] = []
        if not entry and self.at("("):
            rets = self._param_list()
        name = self.ident().text
        params = self._param_list() if self.at("(") else []
        f = Function(name, entry, params, rets, None, kw.line, linkage)
        while self.peek() is not None and self.peek().text in _PERF:
            d = self.next().text
            vals = []
            if d == ".pragma":
                self.next()
            elif d != ".noreturn":
                vals.append(self.integer())
                while self.accept(","):
                    vals.append(self.integer())
            f.directives[d] = vals
            self.accept(";")
        if self.accept(";"):
            return f
        f.body = self.block()
        return f

    def _param_list(self) -> list[VarDecl]:
        self.expect("(")
        out = []
        if not self.at(")"):
            out.append(self.var_decl())
            while self.accept(","):
                out.append(self.var_decl())
        self.expect(")")
        return out

    def block(self) -> Block:
        start = self.expect("{")
        items: list = []
        while not self.accept("}"):
            t = self.peek()
            if t is None:
                raise PtxError("unclosed '{'", start.line)
            if t.text == "{":
                items.append(self.block())
            elif t.text in _SPACES:
                items += self.var_decls()
                self.expect(";")
            elif t.text in (".loc", ".file"):
                self._skip_directive()
            elif t.text == ".pragma":
                self.next()
                self.next()
                self.expect(";")
            elif t.kind == "ident" and self.peek(1) is not None and self.peek(1).text == ":" \
                    and not t.text.startswith("."):
                self.next()
                self.next()
                items.append(Label(t.text, t.line))
            else:
                items.append(self.instruction())
                if self.deadline is not None and not len(items) & 1023 and time.monotonic() > self.deadline:
                    raise PtxTimeoutError("parsing timed out (the build's time bound)", items[-1].line)
        return Block(items, start.line)

    def instruction(self) -> Instr:
        guard, neg = None, False
        line = self.line()
        if self.accept("@"):
            neg = self.accept("!")
            guard = self.ident().text
        t = self.ident()
        if t.text.startswith("."):
            raise PtxError(f"unknown directive {t.text!r} in a function body", t.line)
        op, *mods = re.split(r"(?=\.)", t.text)
        if op in _TEXTURE_OPS:      # their operands ([tex, {coords}]) are refused with them
            raise PtxUnsupportedError(f"instruction {t.text} (textures and surfaces)", t.line)
        args: list[Operand] = []
        if not self.at(";"):
            args.append(self.operand())
            while self.accept(","):
                args.append(self.operand())
        self.expect(";")
        return Instr(op, ["." + m.lstrip(".") for m in mods if m], args, line, guard, neg)

    def operand(self) -> Operand:
        t = self.peek()
        if t is None:
            raise PtxError("unexpected end in an operand", self.line())
        if self.accept("["):
            return self._address()
        if self.accept("{"):
            items = [self.operand()]
            while self.accept(","):
                items.append(self.operand())
            self.expect("}")
            return Operand("vec", items=items)
        if self.accept("("):    # call argument lists: (a, b)
            items = [] if self.at(")") else [self.operand()]
            while self.accept(","):
                items.append(self.operand())
            self.expect(")")
            return Operand("vec", text="()", items=items)
        if self.accept("!"):
            o = self.operand()
            o.negate_pred = True
            return o
        neg = self.accept("-")
        t = self.next()
        if t.kind == "number":
            return Operand("imm", ("-" if neg else "") + t.text)
        if t.kind == "float":
            if neg:
                raise PtxError("negated hexadecimal float", t.line)
            return Operand("float", t.text)
        if t.kind == "ident" and not neg:
            if t.text == "_":
                if self.accept("|"):    # elect.sync _|p: no lane index, only the predicate
                    return Operand("vec", text="|", items=[Operand("sink"), Operand("name", self.ident().text)])
                return Operand("sink")
            if self.at("+") and self.peek(1) is not None and self.peek(1).kind == "number":
                self.next()
                return Operand("name", t.text, offset=self.integer())
            if self.accept("|"):    # setp's p|q: a result and its complement
                return Operand("vec", text="|", items=[Operand("name", t.text), Operand("name", self.ident().text)])
            return Operand("name", t.text)
        raise PtxError(f"bad operand {t.text!r}", t.line)

    def _address(self) -> Operand:
        base, off = None, 0
        t = self.peek()
        if t is not None and t.kind == "ident":
            base = Operand("name", self.next().text)
            if self.accept("+"):
                off = self.integer()
            elif self.at("-"):
                off = self.integer()
        else:
            off = self.integer()
        self.expect("]")
        return Operand("addr", base=base, offset=off)


def _int(text: str, line: int = 0) -> int:
    """A PTX integer literal (hex, binary, octal with a leading 0, decimal; U suffix); PtxError
    for anything else, such as 09."""
    s = text[:-1] if text.endswith("U") else text
    try:
        if s[:2] in ("0x", "0X"):
            return int(s[2:], 16)
        if s[:2] in ("0b", "0B"):
            return int(s[2:], 2)
        if len(s) > 1 and s[0] == "0":
            return int(s[1:], 8)
        return int(s, 10)
    except ValueError:
        raise PtxError(f"not an integer: {text!r}", line) from None


def _number(text: str) -> int | float:
    if re.fullmatch(r"[0-9]+\.[0-9]*(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+", text):
        return float(text)
    return _int(text)


def parse(text: str, deadline: float | None = None) -> Module:
    """The syntax tree of PTX `text`; PtxError (with a line) where it is not PTX;
    PtxTimeoutError once time.monotonic() passes `deadline`."""
    return _Parser(tokenize(text, deadline), deadline).module()
