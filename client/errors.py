"""KubeCASH's exception tree and the one mapping from CUDA result codes to exceptions.

    KubecashError                 every error this package raises
    ├── ProtocolError             a message that is not well-formed (either direction)
    ├── BrokerUnavailable         the broker (or an executor) did not answer in time
    └── CudaError                 an operation failed; .code is a CUresult number
        ├── OutOfMemoryError      CUDA_ERROR_OUT_OF_MEMORY (2): quota or device exhausted
        ├── InvalidValueError     CUDA_ERROR_INVALID_VALUE (1)
        ├── InvalidHandleError    CUDA_ERROR_INVALID_HANDLE (400): unknown, freed or foreign handle
        ├── NotFoundError         CUDA_ERROR_NOT_FOUND (500): e.g. unknown kernel name
        ├── NotReadyError         CUDA_ERROR_NOT_READY (600): a query found work still pending
        ├── CompileError          CUDA_ERROR_INVALID_SOURCE/INVALID_PTX/NO_BINARY_FOR_GPU; .log
        ├── NotSupportedError     CUDA_ERROR_NOT_SUPPORTED (801)
        └── LaunchFailedError     context-fatal codes (700, 702, 714-719): the executor is gone;
                                  the error is sticky for the session on that device

Codes use CUresult numbering so the shim can hand them back to cuda-python programs
unchanged. `error_from_code` is the only place that turns a code into an exception.
"""
from __future__ import annotations

import enum


class CUresult(enum.IntEnum):
    """CUresult numbering (the subset KubeCASH reports), names as in cuda.h."""
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_DEINITIALIZED = 4
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_INVALID_DEVICE = 101
    CUDA_ERROR_INVALID_IMAGE = 200
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_MAP_FAILED = 205
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209
    CUDA_ERROR_INVALID_PTX = 218
    CUDA_ERROR_INVALID_SOURCE = 300
    CUDA_ERROR_FILE_NOT_FOUND = 301
    CUDA_ERROR_OPERATING_SYSTEM = 304
    CUDA_ERROR_INVALID_HANDLE = 400
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_NOT_READY = 600
    CUDA_ERROR_ILLEGAL_ADDRESS = 700
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701
    CUDA_ERROR_LAUNCH_TIMEOUT = 702
    CUDA_ERROR_CONTEXT_IS_DESTROYED = 709
    CUDA_ERROR_HARDWARE_STACK_ERROR = 714
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715
    CUDA_ERROR_MISALIGNED_ADDRESS = 716
    CUDA_ERROR_INVALID_ADDRESS_SPACE = 717
    CUDA_ERROR_INVALID_PC = 718
    CUDA_ERROR_LAUNCH_FAILED = 719
    CUDA_ERROR_NOT_PERMITTED = 800
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_TIMEOUT = 909
    CUDA_ERROR_UNKNOWN = 999


def code_name(code: int) -> str:
    try:
        return CUresult(code).name
    except ValueError:
        return f"CUresult({code})"


class KubecashError(Exception):
    """Base of every error raised by KubeCASH."""


class ProtocolError(KubecashError):
    """A message could not be decoded or does not follow the protocol."""


class BrokerUnavailable(KubecashError):
    """The broker or an executor did not answer within the timeout."""


class CudaError(KubecashError):
    """An operation failed with a CUDA-compatible result code."""

    def __init__(self, code: int, message: str = "", *, log: str = ""):
        self.code = int(code)
        self.name = code_name(self.code)
        self.message = message
        self.log = log
        super().__init__(f"{self.name}: {message}" if message else self.name)


class OutOfMemoryError(CudaError):
    pass


class InvalidValueError(CudaError):
    pass


class InvalidHandleError(CudaError):
    pass


class NotFoundError(CudaError):
    pass


class NotReadyError(CudaError):
    pass


class CompileError(CudaError):
    pass


class NotSupportedError(CudaError):
    pass


class LaunchFailedError(CudaError):
    pass


# Codes after which the context is unusable (CUDA calls these "sticky"); 702: a kernel ran
# past max_kernel_seconds and the broker ended its executor.
STICKY_CODES = frozenset({700, 702, 714, 715, 716, 717, 718, 719})

_BY_CODE: dict[int, type[CudaError]] = {
    CUresult.CUDA_ERROR_OUT_OF_MEMORY: OutOfMemoryError,
    CUresult.CUDA_ERROR_INVALID_VALUE: InvalidValueError,
    CUresult.CUDA_ERROR_INVALID_HANDLE: InvalidHandleError,
    CUresult.CUDA_ERROR_NOT_FOUND: NotFoundError,
    CUresult.CUDA_ERROR_NOT_READY: NotReadyError,
    CUresult.CUDA_ERROR_INVALID_SOURCE: CompileError,
    CUresult.CUDA_ERROR_INVALID_PTX: CompileError,
    CUresult.CUDA_ERROR_INVALID_IMAGE: CompileError,
    CUresult.CUDA_ERROR_NO_BINARY_FOR_GPU: CompileError,
    CUresult.CUDA_ERROR_NOT_SUPPORTED: NotSupportedError,
    **{c: LaunchFailedError for c in STICKY_CODES},
}


def error_from_code(code: int, message: str = "", *, log: str = "") -> CudaError:
    """The single mapping from a CUresult code to the exception that represents it."""
    return _BY_CODE.get(int(code), CudaError)(code, message, log=log)
