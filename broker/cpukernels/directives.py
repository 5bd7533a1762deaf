"""Step 1 of a compile, on the raw tenant source: #include-like directives. The compiler must
never read a host file for a tenant: a header the CUDA include directories hold (cuda_fp16.h,
cooperative_groups.h, cuda/barrier, ...) may be included, every other include (and every
probe of host files) is refused. (A broker that is not root compiles without a view of its
own: this check is what keeps the compiler out of the host's files there.)"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

from .errors import UnsupportedConstructError
from .tokens import RAW_TOKEN_RE, RAW_TOKEN_RE_NO_SEPARATORS, splice

_DIRECTIVE_RE = re.compile(r"[ \t\f\v\r]*(?P<hash>#|%:)[ \t\f\v\r]*([A-Za-z_]\w*)?(.*)", re.S)
_INCLUDE_KWS = ("include", "include_next", "import", "embed")

_HEADER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*\Z")


def _in_include_dirs(name: str, include_dirs: Sequence[str]) -> bool:
    if not _HEADER_NAME.match(name) or ".." in name.split("/"):
        return False
    return any(os.path.isfile(os.path.join(d, name)) for d in include_dirs)


def check_directives(source: str, include_dirs: Sequence[str], *, digit_separators: bool = True) -> None:
    """Refuse every #include-like directive but #include of a header in `include_dirs`.
    Works on the logical lines the compiler sees: after line splicing, with comments
    replaced by spaces, tokenized as the C++ dialect does (`digit_separators`: C++14 on).
    (NVRTC itself reads files through a Landlock ruleset: see nvrtc.py. This check is what
    a tenant is told, and the first wall.)"""
    # Trigraphs (??= is # before C++17) would spell directives this check does not see.
    if re.search(r"\?\?[=/'()!<>\-]", source):
        raise UnsupportedConstructError("trigraph", "??= and the like can spell a directive")
    spliced = splice(source)
    clean = []  # same length as `spliced`, comments blanked
    for m in (RAW_TOKEN_RE if digit_separators else RAW_TOKEN_RE_NO_SEPARATORS).finditer(spliced):
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
            if kw != "include" or not _in_include_dirs(name, include_dirs):
                raise UnsupportedConstructError(f"#{kw} {operand}",
                                                "only headers of the CUDA include directories may be included")
        elif m and m.group(2) == "pragma" and re.search(r"\bdependency\b", m.group(3)):
            raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")
