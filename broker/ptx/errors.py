"""The two ways a PTX module is refused: it is not PTX we can read, or it uses what the CPU
backend does not run. Both name the line; the executor turns them into CUDA errors."""
from __future__ import annotations


class PtxError(Exception):
    """Malformed PTX (CUDA_ERROR_INVALID_PTX)."""

    MAX_TEXT = 500      # messages quote the tenant's PTX: bounded, whatever it holds

    def __init__(self, message: str, line: int):
        if len(message) > self.MAX_TEXT:
            message = f"{message[:self.MAX_TEXT]}... ({len(message)} characters)"
        super().__init__(f"PTX line {line}: {message}")
        self.line = line


class PtxUnsupportedError(PtxError):
    """PTX this translator does not run (CUDA_ERROR_NOT_SUPPORTED): never a wrong result."""


class PtxTimeoutError(PtxError):
    """Parsing or translating outlasted the build's time bound (a compile timeout, not bad PTX)."""
