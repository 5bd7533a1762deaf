"""Source text: newline normalization, line splicing, and a tokenizer good enough for
preprocessing-token boundaries, comments and literals (shared by the directive check on the
raw source and the analysis of the preprocessed text)."""
from __future__ import annotations

import bisect
import re

_TOKEN_BODY = r"""
  | (?P<ws>[ \t\r\f\v]+|\n)
  | (?P<lc>//[^\n]*)
  | (?P<bc>/\*.*?\*/)
  | (?P<ubc>/\*.*)
  | (?P<raw>(?:u8|[uUL])?R")
  | (?P<str>(?:u8|[uUL])?"(?:\\.|[^"\\\n])*"?)
  | (?P<chr>(?:u8|[uUL])?'(?:\\.|[^'\\\n])*'?)
  | (?P<num>\.?[0-9](?:[eEpP][+-]|'(?=[0-9A-Za-z_])|[0-9A-Za-z_.])*)
  | (?P<id>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op>%:%:|%:|<:(?!:(?![:>]))|:>|<%|%>|\.\.\.|->\*?|::|<<=|>>=|<<|>>|<=|>=|==|!=
          |&&|\|\||\+\+|--|[-+*/%&|^!=]=|\#\#|.)
"""
# Raw source: no directive lines to skip (they are what we look for).
RAW_TOKEN_RE = re.compile(r"(?P<nothing>(?!))" + _TOKEN_BODY, re.S | re.X)
# Preprocessed output: a line starting with '#' is a linemarker or #pragma.
_PP_TOKEN_RE = re.compile(r"(?P<pp>(?m:^)[ \t\f\v]*(?:\#|%:)[^\n]*)" + _TOKEN_BODY, re.S | re.X)
_DIGRAPHS = {"<%": "{", "%>": "}", "<:": "[", ":>": "]", "%:": "#", "%:%:": "##"}


def splice(src: str) -> tuple[str, list[int], list[int]]:
    """Phase 2 line splicing.  Returns the spliced text and, for mapping positions back,
    the spliced positions of the splices and the total removed length up to each."""
    parts, pos_at, removed_at = [], [], []
    last, removed, out_len = 0, 0, 0
    # GCC accepts whitespace between the backslash and the newline (with a warning).
    for m in re.finditer(r"\\[ \t\f\v]*\r?\n", src):
        parts.append(src[last:m.start()])
        out_len += m.start() - last
        removed += m.end() - m.start()
        pos_at.append(out_len)
        removed_at.append(removed)
        last = m.end()
    parts.append(src[last:])
    return "".join(parts), pos_at, removed_at


def to_orig(i: int, pos_at: list[int], removed_at: list[int]) -> int:
    k = bisect.bisect_right(pos_at, i)
    return i + (removed_at[k - 1] if k else 0)


def normalize_newlines(text: str) -> str:
    """GCC ends a line at \n, \r\n and a lone \r alike; the checks split on \n only, so
    the text they check and the text compiled must agree on where lines end."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


class Tokens:
    """The preprocessing tokens of a text (comments and whitespace dropped, digraphs
    spelled as their brackets), with their spans, and the spans of its directive lines."""

    def __init__(self, text: str):
        self.kind: list[str] = []
        self.text: list[str] = []
        self.start: list[int] = []
        self.end: list[int] = []
        self.pp_lines: list[tuple[int, int]] = []
        for m in _PP_TOKEN_RE.finditer(text):
            k = m.lastgroup
            if k in ("ws", "lc", "bc", "ubc"):
                continue
            if k == "pp":
                self.pp_lines.append((m.start(), m.end()))
                continue
            t = m.group()
            if k == "op":
                t = _DIGRAPHS.get(t, t)
            self.kind.append(k)
            self.text.append(t)
            self.start.append(m.start())
            self.end.append(m.end())
        self.n = len(self.text)

    def match(self, i: int) -> int:
        """Index of the bracket closing the one at i (or n-1)."""
        pairs = {"(": ")", "[": "]", "{": "}"}
        open_, close = self.text[i], pairs[self.text[i]]
        depth = 0
        for j in range(i, self.n):
            t = self.text[j]
            if t == open_:
                depth += 1
            elif t == close:
                depth -= 1
                if depth == 0:
                    return j
        return self.n - 1
