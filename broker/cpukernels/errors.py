"""The two errors of the CPU backend's compiler: a module that does not compile, and one that
uses a construct the CPU backend refuses."""
from __future__ import annotations


class KernelCompileError(Exception):
    """The module does not compile, or is refused."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log or message


class UnsupportedConstructError(KernelCompileError):
    """The module uses something the CPU backend cannot run correctly."""

    def __init__(self, construct: str, reason: str = ""):
        msg = f"unsupported on the CPU backend: {construct}" + (f" ({reason})" if reason else "")
        super().__init__(msg, msg)
        self.construct = construct
