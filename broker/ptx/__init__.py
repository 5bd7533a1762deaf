"""PTX on the CPU backend: the text NVIDIA's compilers produce, translated to C++ that the
host compiler builds and the CPU backend's block scheduler runs (fibers where it has
barriers), under the same sandbox as any module.

- ``parse``         PTX text to a syntax tree (PtxError on malformed text, with its line)
- ``translate``     the tree to one C++ translation unit; types, operands, address spaces
- ``instructions``  OPS: what each opcode becomes (anything else: PtxUnsupportedError)
- ``errors``        PtxError, PtxUnsupportedError, PtxTimeoutError
"""
from __future__ import annotations

from .errors import PtxError, PtxTimeoutError, PtxUnsupportedError
from .parse import parse
from .translate import translate

__all__ = ["PtxError", "PtxTimeoutError", "PtxUnsupportedError", "parse", "translate", "to_cpp"]


def to_cpp(text: str, deadline: float | None = None) -> str:
    """PTX `text` as one C++ translation unit for the CPU backend (its tables included);
    PtxError once time.monotonic() passes `deadline` (translation is linear, about 1 s per
    12k instructions: a huge module must not outlast its build's time bound)."""
    return translate(parse(text, deadline), deadline)
