"""The two errors of the CPU backend's compiler: a module that does not compile, and one that
uses a construct the CPU backend refuses. Both are CudaErrors (the one exception type that
carries a CUDA code), so whatever catches them hands the code on unchanged."""
from __future__ import annotations

from kubecash.client.errors import CompileError, E


class KernelCompileError(CompileError):
    """The module does not compile, or is refused (CUDA_ERROR_INVALID_SOURCE)."""

    def __init__(self, message: str, log: str = "", code: int = E.CUDA_ERROR_INVALID_SOURCE):
        super().__init__(code, message, log=log or message)

    def __str__(self) -> str:
        return self.message


class UnsupportedConstructError(KernelCompileError):
    """The module uses something the CPU backend cannot run correctly (CUDA_ERROR_NOT_SUPPORTED)."""

    def __init__(self, construct: str, reason: str = ""):
        msg = f"unsupported on the CPU backend: {construct}" + (f" ({reason})" if reason else "")
        super().__init__(msg, msg, E.CUDA_ERROR_NOT_SUPPORTED)
        self.construct = construct
