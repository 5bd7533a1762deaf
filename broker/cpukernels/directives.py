"""Step 1 of a compile, on the raw tenant source: #include-like directives. The compiler must
never read a host file for a tenant: the few headers kubecash_cuda.h stands in for are
blanked out, every other include (and every probe of host files) is refused."""
from __future__ import annotations

import re

from .errors import UnsupportedConstructError
from .tokens import RAW_TOKEN_RE, splice, to_orig

_DIRECTIVE_RE = re.compile(r"[ \t\f\v\r]*(?P<hash>#|%:)[ \t\f\v\r]*([A-Za-z_]\w*)?(.*)", re.S)
_INCLUDE_KWS = ("include", "include_next", "import", "embed")

# Headers kubecash_cuda.h already stands in for: an #include of one of these is dropped.
_INCLUDE_WHITELIST = frozenset({
    "cuda_runtime.h", "cuda.h", "cuda_runtime_api.h", "device_launch_parameters.h",
    "stdint.h", "cstdint", "math.h", "cmath", "stddef.h", "cstddef", "float.h", "cfloat",
    "limits.h", "climits", "stdio.h", "cstdio",
})


def sanitize_directives(source: str) -> str:
    """Refuse every #include-like directive except the whitelist, which is blanked out
    (line numbers kept).  Works on the logical lines the compiler sees: after line
    splicing, with comments replaced by spaces."""
    spliced, pos_at, removed_at = splice(source)
    clean = []  # same length as `spliced`, comments blanked
    for m in RAW_TOKEN_RE.finditer(spliced):
        kind, text = m.lastgroup, m.group()
        if kind in ("lc", "bc", "ubc"):
            clean.append(re.sub(r"[^\n]", " ", text) if kind == "lc" else " " * len(text))
        elif kind == "raw":
            # The start of a raw string (matched alone: scanning for its end could take
            # quadratic time).  A raw string spans lines, and whether `xR"(` starts one
            # depends on identifier rules (non-ASCII letters...) where we could disagree
            # with g++ and so miss a directive it sees.  Kernels do not need them: refuse.
            raise UnsupportedConstructError("raw string literal")
        else:
            clean.append(text)
    code = "".join(clean)
    assert len(code) == len(spliced)

    if re.search(r"\b__has_include(?:_next)?\b", code):
        raise UnsupportedConstructError("__has_include", "it probes host files")
    if re.search(r"\bGCC\W{0,8}dependency\b", code):
        raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")

    out = list(source)
    line_start = 0
    for line in code.split("\n"):
        m = _DIRECTIVE_RE.match(line)
        if m and m.group(2) in _INCLUDE_KWS:
            kw, operand = m.group(2), m.group(3).strip()
            name = None
            om = re.fullmatch(r'<([^<>"\n]*)>|"([^"\n]*)"', operand)
            if om:
                name = om.group(1) if om.group(1) is not None else om.group(2)
            if not om:
                if operand and not operand.startswith(("<", '"')):
                    raise UnsupportedConstructError(f"#{kw} {operand}",
                                                    "a macro-expanded include is not allowed")
                raise UnsupportedConstructError(f"#{kw} {operand}".rstrip())
            if kw != "include" or name not in _INCLUDE_WHITELIST:
                raise UnsupportedConstructError(f"#{kw} {operand}",
                                                "only headers the CPU backend provides may be included")
            # Whitelisted: blank it in the original text, keeping every newline.
            hash_pos = line_start + m.start("hash")
            a = to_orig(hash_pos, pos_at, removed_at)
            b = to_orig(line_start + len(line) - 1, pos_at, removed_at) + 1
            for j in range(a, min(b, len(out))):
                if out[j] != "\n":
                    out[j] = " "
        elif m and m.group(2) == "pragma" and re.search(r"\bdependency\b", m.group(3)):
            raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")
        line_start += len(line) + 1
    return "".join(out)
