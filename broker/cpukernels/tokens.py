"""Source text: newline normalization, line splicing, and a tokenizer good enough for
preprocessing-token boundaries, comments and literals (what the directive check needs)."""
from __future__ import annotations

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
# Before C++14 an apostrophe after a digit starts a character literal, not a digit separator:
# the check must tokenize as the compiler does, or a quote could hide a directive from it.
RAW_TOKEN_RE_NO_SEPARATORS = re.compile(r"(?P<nothing>(?!))" + _TOKEN_BODY.replace("|'(?=[0-9A-Za-z_])", ""),
                                        re.S | re.X)


def splice(src: str) -> str:
    """Phase 2 line splicing: backslash-newline removed. (Compilers accept whitespace
    between the backslash and the newline, with a warning: so do we.)"""
    return re.sub(r"\\[ \t\f\v]*\r?\n", "", src)


def normalize_newlines(text: str) -> str:
    """Compilers end a line at \n, \r\n and a lone \r alike; the checks split on \n only, so
    the text they check and the text compiled must agree on where lines end."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")
