"""Step 3 of a compile: the analysis of the preprocessed tenant text. Refused constructs raise
UnsupportedConstructError; kernels, __device__/__constant__ variables and extern __shared__
arrays are found (what the generated tables list); the text is rewritten where it must be
(linemarkers, extern __shared__ declarations)."""
from __future__ import annotations

import dataclasses
import re

from .errors import UnsupportedConstructError
from .tokens import Tokens, normalize_newlines

_REFUSED_IDS = re.compile(r"""(?x)
    (?P<warp>__shfl\w*|__ballot\w*|__any_sync|__all_sync|__uni_sync|__any|__all|__activemask
            |__syncwarp|__match_\w+|__reduce_\w+_sync)
  | (?P<sleep>__nanosleep)
  | (?P<cg>cooperative_groups)
  | (?P<asm>asm|__asm__|__asm)
  | (?P<tex>tex(?:1D|2D|3D|Cubemap|CubeMap)\w*|surf(?:1D|2D|3D|Cubemap|CubeMap)\w*
           |cudaTextureObject_t|cudaSurfaceObject_t)
  | (?P<probe>__has_include|__has_include_next)
""")
_REFUSED_WHY = {
    "warp": "warp-level intrinsics need threads running in lockstep",
    "sleep": "spin-waiting on other threads cannot progress here",
    "cg": "cooperative groups are not available",
    "asm": "inline PTX assembly cannot run on the host",
    "tex": "textures and surfaces are not available",
    "probe": "it probes host files",
}
_LOAD_TIME_ATTRS = frozenset({"constructor", "destructor", "section", "ifunc", "init_priority"})
_BARRIERS = frozenset({"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                       "__syncthreads_or"})
_PAREN_ATTRS = frozenset({"__launch_bounds__", "__attribute__", "__align__", "alignas",
                          "__declspec", "__maxnreg__", "decltype", "__builtin_align__"})
_VAR_QUALS = frozenset({"__device__", "__constant__", "__managed__"})
_KEYWORDS = frozenset("""
    alignas alignof asm auto bool break case catch char char16_t char32_t char8_t class const
    constexpr const_cast continue decltype default delete do double dynamic_cast else enum
    explicit export extern false float for friend goto if inline int long mutable namespace new
    noexcept nullptr operator private protected public register reinterpret_cast return short
    signed sizeof static static_assert static_cast struct switch template this thread_local
    throw true try typedef typeid typename union unsigned using virtual void volatile wchar_t
    while __restrict__ __restrict __shared__ __device__ __constant__ __managed__ __global__
    __host__ __forceinline__ __noinline__""".split())


@dataclasses.dataclass
class Analysis:
    """What step 3 found in a module, and the tenant text to compile."""

    kernels: list[tuple[str, str]]            # (plain name, qualified name)
    variables: list[tuple[str, str]]
    extern_shared_globals: list[str]          # qualified names of namespace-scope ones
    fibers: bool
    text: str                                 # tenant text, rewritten


def analyze(text: str) -> Analysis:
    """Check the preprocessed tenant text, find what it declares, and rewrite it."""
    return _Analyzer(normalize_newlines(text)).run()


class _Analyzer:
    """One analysis of one text: the checks, then the declaration scan, whose state (the
    stack of enclosing braces, what has been found so far) lives here."""

    def __init__(self, text: str):
        self.text = text
        self.tk = Tokens(text)
        self.T, self.K = self.tk.text, self.tk.kind
        self.edits: list[tuple[int, int, str]] = []
        self.kernels: list[tuple[str, str]] = []
        self.kernel_seen: set[str] = set()
        self.variables: list[tuple[str, str]] = []
        self.var_seen: set[str] = set()
        self.extern_globals: list[str] = []
        self.stack: list[tuple[str, str]] = []   # ("ns", name) | ("link", "") | ("other", "")
        self.var_done_upto = -1

    def run(self) -> Analysis:
        self.check_directive_lines()
        fibers = self.check_refused_constructs()
        self.check_load_time_attributes()
        self.scan_declarations()
        return Analysis(self.kernels, self.variables, self.extern_globals, fibers, self.rewritten())

    # -- checks ---------------------------------------------------------------------------
    def check_directive_lines(self) -> None:
        """Lines that would become directives when this text is compiled."""
        text, tk, edits = self.text, self.tk, self.edits
        for a, b in tk.pp_lines:
            line = text[a:b]
            mm = re.fullmatch(r'[ \t\f\v]*#[ \t]*(\d+)[ \t]+("(?:[^"\\]|\\.)*")(?:[ \t]+\d+)*[ \t]*', line)
            if mm:  # linemarker: keep the line numbers, drop the include-stack flags
                edits.append((a, b, f"#line {mm.group(1)} {mm.group(2)}"))
            elif re.match(r"[ \t\f\v]*(?:#|%:)[ \t\f\v]*pragma\b", line):
                if re.search(r"\bdependency\b", line):
                    raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")
            else:
                # Macro expansion produced a '#' at the start of a line: compiling this text
                # would turn it into a directive.
                raise UnsupportedConstructError("macro expanding to a preprocessor directive",
                                                line.strip()[:80])
        for line in text.split("\n"):
            if line.rstrip().endswith("\\"):
                raise UnsupportedConstructError("stray backslash at the end of a line")

    def check_refused_constructs(self) -> bool:
        """Refuse what the CPU backend cannot run; True when the module needs fibers."""
        tk, T, K = self.tk, self.T, self.K
        ids = set()
        for i in range(tk.n):
            t = T[i]
            if K[i] == "id":
                ids.add(t)
                m = _REFUSED_IDS.fullmatch(t)
                if m:
                    raise UnsupportedConstructError(t, _REFUSED_WHY[m.lastgroup])
                if t in ("texture", "surface") and i + 1 < tk.n and T[i + 1] == "<":
                    raise UnsupportedConstructError(f"{t}<...>", _REFUSED_WHY["tex"])
            elif t == "<<" and i + 1 < tk.n and T[i + 1] == "<" and tk.start[i + 1] == tk.end[i]:
                raise UnsupportedConstructError("<<<...>>> kernel launch in device code",
                                                "dynamic parallelism is not available")
        if "volatile" in ids and "__shared__" in ids:
            # Warp-synchronous reductions through volatile shared memory assume 32 threads in
            # lockstep; run one after another they compute a wrong result.
            raise UnsupportedConstructError("volatile with __shared__ (warp-synchronous code)",
                                            "threads of a warp do not run in lockstep here")
        return bool(ids & _BARRIERS)

    def check_load_time_attributes(self) -> None:
        """Code that would run when the module is loaded or unloaded runs outside the sandbox
        (on the executor's own threads): refuse the attributes that put it there. Dynamic
        initializers are caught in the built object (build._check_load_time_code)."""
        tk, T, K = self.tk, self.T, self.K
        for i in range(tk.n):
            if T[i] in ("__attribute__", "__attribute") and i + 1 < tk.n and T[i + 1] == "(":
                end = tk.match(i + 1)
            elif T[i] == "[" and i + 1 < tk.n and T[i + 1] == "[":
                end = tk.match(i)
            else:
                continue
            for j in range(i + 1, end):
                if K[j] == "id" and T[j].strip("_") in _LOAD_TIME_ATTRS:
                    raise UnsupportedConstructError(f"attribute {T[j].strip('_')}",
                                                    "code that runs at load or unload time, or in a "
                                                    "chosen section, is not allowed")

    # -- the declaration scan -------------------------------------------------------------
    def scan_declarations(self) -> None:
        """Kernels, variables and extern __shared__ arrays, in scope order."""
        tk, T, stack = self.tk, self.T, self.stack
        for i in range(tk.n):
            t = T[i]
            if t == "{":
                stack.append(self.classify_brace(i))
            elif t == "}":
                if stack:
                    stack.pop()
            elif t == "__global__":
                self.handle_kernel(i)
            elif t in _VAR_QUALS:
                self.handle_var(i)
            elif t == "extern":
                self.handle_extern(i)

    def rewritten(self) -> str:
        """The text with the edits applied."""
        text = self.text
        out, last = [], 0
        for a, b, r in sorted(self.edits):
            out.append(text[last:a])
            out.append(r)
            last = b
        out.append(text[last:])
        return "".join(out)

    # -- scopes and declarators -----------------------------------------------------------
    def scope_ok(self) -> bool:
        return all(k != "other" for k, _ in self.stack)

    def scope_path(self) -> str:
        return "::".join(name for k, name in self.stack if k == "ns" and name)

    def qualify(self, name: str) -> str:
        p = self.scope_path()
        return f"{p}::{name}" if p else name

    def decl_start(self, i: int) -> int:
        T = self.T
        j = i - 1
        while j >= 0 and T[j] not in (";", "{", "}"):
            j -= 1
        return j + 1

    def classify_brace(self, i: int) -> tuple[str, str]:
        T, K = self.T, self.K
        j, parts = i - 1, []
        while j >= 0 and (K[j] == "id" or T[j] == "::") and T[j] not in ("namespace", "inline"):
            parts.append(T[j])
            j -= 1
        if j >= 0 and T[j] == "namespace":
            return ("ns", "".join(reversed(parts)))
        if i >= 2 and K[i - 1] == "str" and T[i - 2] == "extern":
            return ("link", "")
        return ("other", "")

    def skip_attr(self, j: int) -> int:
        """j at an attribute-ish token; returns the index after it, or j if none."""
        tk, T, K = self.tk, self.T, self.K
        if K[j] == "id" and T[j] in _PAREN_ATTRS and j + 1 < tk.n and T[j + 1] == "(":
            return tk.match(j + 1) + 1
        if T[j] == "[" and j + 1 < tk.n and T[j + 1] == "[":
            return tk.match(j) + 1
        return j

    # -- one declaration, at the token that marks it ---------------------------------------
    def handle_kernel(self, i: int) -> None:
        tk, T, K = self.tk, self.T, self.K
        if not self.scope_ok():
            raise UnsupportedConstructError("__global__ function inside a class or function")
        for j in range(self.decl_start(i), i):
            if T[j] == "template":
                raise UnsupportedConstructError("template __global__ kernel",
                                                "instantiate it as a plain extern \"C\" kernel")
        j = i + 1
        while j < tk.n:
            nj = self.skip_attr(j)
            if nj != j:
                j = nj
                continue
            if T[j] == "(":
                break
            if T[j] in (";", "{", "}", "="):
                return
            j += 1
        if j >= tk.n or K[j - 1] != "id" or T[j - 1] in _KEYWORDS:
            return  # not a function declarator we understand; the compiler will judge
        name, q = T[j - 1], j - 2
        quals = []
        while q >= 1 and T[q] == "::" and K[q - 1] == "id":
            quals.insert(0, T[q - 1])
            q -= 2
        # Definition or declaration?
        m = tk.match(j) + 1
        while m < tk.n and T[m] not in ("{", ";"):
            m = tk.match(m) + 1 if T[m] in ("(", "[") else m + 1
        if m >= tk.n or T[m] != "{":
            return  # a declaration: the definition (if any) registers it
        qual = self.qualify("::".join(quals + [name]))
        if qual in self.kernel_seen:
            raise UnsupportedConstructError(f"overloaded __global__ kernel {name}")
        self.kernel_seen.add(qual)
        self.kernels.append((name, qual))

    def handle_var(self, i: int) -> None:
        tk, T, K = self.tk, self.T, self.K
        if i <= self.var_done_upto or not self.scope_ok():
            return
        start = self.decl_start(i)
        if any(T[j] in ("extern", "template", "typedef", "friend", "using") for j in range(start, i)):
            return
        j, angle = i + 1, 0
        while j < tk.n:
            nj = self.skip_attr(j)
            if nj != j:
                j = nj
                continue
            t = T[j]
            if t == "(":
                self.var_done_upto = j  # a function (or something we do not register)
                return
            if t in ("extern", "template", "typedef"):
                self.var_done_upto = j
                return
            if t == "<":
                angle += 1
            elif t == ">":
                angle -= 1
            elif t == ">>":
                angle -= 2
            elif angle <= 0 and t in ("[", "=", ";", ",", "{"):
                break
            elif t == "}":
                return
            j += 1
        if j >= tk.n:
            return
        if T[j] == "{" and any(T[k] in ("struct", "class", "union", "enum") for k in range(i, j)):
            self.var_done_upto = j
            return
        # Declarators: name [dims] [= init | {init}] (, ...)* ;
        while True:
            if K[j - 1] != "id" or T[j - 1] in _KEYWORDS:
                self.var_done_upto = j
                return
            qual = self.qualify(T[j - 1])
            if qual not in self.var_seen:
                self.var_seen.add(qual)
                self.variables.append((T[j - 1], qual))
            while j < tk.n and T[j] == "[":
                j = tk.match(j) + 1
            if j < tk.n and T[j] == "=":
                j += 1
                while j < tk.n and T[j] not in (",", ";"):
                    j = tk.match(j) + 1 if T[j] in ("(", "[", "{") else j + 1
            elif j < tk.n and T[j] == "{":
                j = tk.match(j) + 1
            if j < tk.n and T[j] == ",":
                j += 1
                while j < tk.n and not (K[j] == "id" and T[j] not in _KEYWORDS
                                        and j + 1 < tk.n and T[j + 1] in ("[", "=", ";", ",", "{")):
                    if T[j] in (";", "{", "}", "("):
                        self.var_done_upto = j
                        return
                    j += 1
                j += 1
                continue
            self.var_done_upto = j
            return

    def handle_extern(self, i: int) -> None:
        tk, T, K = self.tk, self.T, self.K
        if i + 1 < tk.n and K[i + 1] == "str":
            return  # extern "C"
        j, has_shared = i + 1, False
        while j < tk.n and T[j] not in (";", "{", "}"):
            if T[j] == "__shared__":
                has_shared = True
            j = tk.match(j) + 1 if T[j] == "(" else j + 1
        if not has_shared:
            return
        if not (j < tk.n and T[j] == ";" and T[j - 1] == "]" and T[j - 2] == "["
                and K[j - 3] == "id"):
            raise UnsupportedConstructError("extern __shared__ declaration of this form",
                                            "write: extern __shared__ T name[];")
        name, ty, k = T[j - 3], [], i + 1
        while k < j - 3:
            nk = self.skip_attr(k)
            if nk != k:
                k = nk
                continue
            if T[k] not in ("__shared__", "static", "extern", ","):
                ty.append(T[k])
            if T[k] == ",":
                raise UnsupportedConstructError("extern __shared__ declaration of this form",
                                                "declare one array per statement")
            k += 1
        if not ty:
            raise UnsupportedConstructError("extern __shared__ declaration without a type")
        tys = " ".join(ty)
        if self.scope_ok():
            # Namespace scope: a per-thread pointer the block loop sets at every launch.
            repl = f"static thread_local {tys}* {name};"
            self.extern_globals.append(self.qualify(name))
        else:
            repl = f"{tys}* const {name} = ({tys}*)(::__kc::dyn_shared);"
        a, b = tk.start[i], tk.end[j]
        self.edits.append((a, b, repl + "\n" * self.text.count("\n", a, b)))
