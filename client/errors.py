"""KubeCASH's error vocabulary: the CUDA result codes, the exception tree, and the one
translation point from anything raised to a CUDA error.

    KubecashError                 every error this package raises
    ├── BrokerUnavailable         the broker (or an executor) did not answer in time
    ├── ConfigError               (kubecash.broker.config) an invalid quota file
    └── CudaError                 THE exception that carries a CUDA code: .code is a CUresult
        ├── InvalidValueError     CUDA_ERROR_INVALID_VALUE (1)
        │   └── ProtocolError     a message that is not well-formed (either direction)
        ├── OutOfMemoryError      CUDA_ERROR_OUT_OF_MEMORY (2): quota or device exhausted
        ├── InvalidHandleError    CUDA_ERROR_INVALID_HANDLE (400): unknown, freed or foreign handle
        ├── NotFoundError         CUDA_ERROR_NOT_FOUND (500): e.g. unknown kernel name
        ├── NotReadyError         CUDA_ERROR_NOT_READY (600): a query found work still pending
        ├── CompileError          CUDA_ERROR_INVALID_SOURCE/INVALID_PTX/INVALID_IMAGE/NO_BINARY_FOR_GPU; .log
        ├── NotSupportedError     CUDA_ERROR_NOT_SUPPORTED (801)
        └── LaunchFailedError     context-fatal codes (STICKY_CODES): the executor is gone;
                                  the error is sticky for the session on that device

Codes use CUresult numbering so the shim (and a native driver library) hands them back to
programs unchanged. `error_from_code` is the only place that turns a code into an
exception; `map_exceptions` the only place that turns any other exception into a CudaError
(as httpx's `map_exceptions` does); `exit_reason` the only place that turns how an executor
ended into a code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger("kubecash")


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
    CUDA_ERROR_ASSERT = 710
    CUDA_ERROR_HARDWARE_STACK_ERROR = 714
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715
    CUDA_ERROR_MISALIGNED_ADDRESS = 716
    CUDA_ERROR_INVALID_ADDRESS_SPACE = 717
    CUDA_ERROR_INVALID_PC = 718
    CUDA_ERROR_LAUNCH_FAILED = 719
    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE = 720
    CUDA_ERROR_NOT_PERMITTED = 800
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_TIMEOUT = 909
    CUDA_ERROR_UNKNOWN = 999


E = CUresult   # the short name every module uses for the members

# Short strings as cuGetErrorString gives them (the common ones; others fall back to the name).
ERROR_STRINGS: dict[CUresult, str] = {
    E.CUDA_SUCCESS: "no error",
    E.CUDA_ERROR_INVALID_VALUE: "invalid argument",
    E.CUDA_ERROR_OUT_OF_MEMORY: "out of memory",
    E.CUDA_ERROR_NOT_INITIALIZED: "initialization error",
    E.CUDA_ERROR_DEINITIALIZED: "driver shutting down",
    E.CUDA_ERROR_NO_DEVICE: "no CUDA-capable device is detected",
    E.CUDA_ERROR_INVALID_DEVICE: "invalid device ordinal",
    E.CUDA_ERROR_INVALID_IMAGE: "device kernel image is invalid",
    E.CUDA_ERROR_INVALID_CONTEXT: "invalid device context",
    E.CUDA_ERROR_NO_BINARY_FOR_GPU: "no kernel image is available for execution on the device",
    E.CUDA_ERROR_INVALID_PTX: "a PTX JIT compilation failed",
    E.CUDA_ERROR_INVALID_SOURCE: "device kernel image is invalid",
    E.CUDA_ERROR_INVALID_HANDLE: "invalid resource handle",
    E.CUDA_ERROR_ILLEGAL_STATE: "the operation cannot be performed in the present state",
    E.CUDA_ERROR_NOT_FOUND: "named symbol not found",
    E.CUDA_ERROR_NOT_READY: "device not ready",
    E.CUDA_ERROR_ILLEGAL_ADDRESS: "an illegal memory access was encountered",
    E.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: "too many resources requested for launch",
    E.CUDA_ERROR_LAUNCH_TIMEOUT: "the launch timed out and was terminated",
    E.CUDA_ERROR_LAUNCH_FAILED: "unspecified launch failure",
    E.CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "too many blocks in cooperative launch",
    E.CUDA_ERROR_ASSERT: "device-side assert triggered",
    E.CUDA_ERROR_ILLEGAL_INSTRUCTION: "an illegal instruction was encountered",
    E.CUDA_ERROR_NOT_PERMITTED: "operation not permitted",
    E.CUDA_ERROR_NOT_SUPPORTED: "operation not supported",
    E.CUDA_ERROR_UNKNOWN: "unknown error",
}

# Codes after which the context is unusable (CUDA calls these "sticky"); LAUNCH_TIMEOUT: a
# kernel ran past max_kernel_seconds and the broker ended its executor; ASSERT: a device-side
# assert() failed (ILLEGAL_INSTRUCTION: a trap).
STICKY_CODES: frozenset[CUresult] = frozenset({
    E.CUDA_ERROR_ASSERT,
    E.CUDA_ERROR_ILLEGAL_ADDRESS, E.CUDA_ERROR_LAUNCH_TIMEOUT, E.CUDA_ERROR_HARDWARE_STACK_ERROR,
    E.CUDA_ERROR_ILLEGAL_INSTRUCTION, E.CUDA_ERROR_MISALIGNED_ADDRESS,
    E.CUDA_ERROR_INVALID_ADDRESS_SPACE, E.CUDA_ERROR_INVALID_PC, E.CUDA_ERROR_LAUNCH_FAILED})


def code_name(code: int) -> str:
    try:
        return CUresult(code).name
    except ValueError:
        return f"CUresult({code})"


def error_string(code: int) -> str:
    """cuGetErrorString's text for a code (its name where no text is known)."""
    try:
        c = CUresult(code)
    except ValueError:
        return code_name(code)
    return ERROR_STRINGS.get(c, c.name)


class KubecashError(Exception):
    """Base of every error raised by KubeCASH."""


class BrokerUnavailable(KubecashError):
    """The broker or an executor did not answer within the timeout."""


class CudaError(KubecashError):
    """An operation failed with a CUDA result code: the one exception type that carries one."""

    def __init__(self, code: int, message: str = "", *, log: str = ""):
        self.code = int(code)
        self.name = code_name(self.code)
        self.message = message
        self.log = log
        super().__init__(f"{self.name}: {message}" if message else self.name)

    @property
    def sticky(self) -> bool:
        """True when the context that raised it is lost (CUDA's sticky errors)."""
        return self.code in STICKY_CODES


class OutOfMemoryError(CudaError):
    pass


class InvalidValueError(CudaError):
    pass


class ProtocolError(InvalidValueError):
    """A message could not be decoded or does not follow the protocol (CUDA_ERROR_INVALID_VALUE)."""

    def __init__(self, message: str = ""):
        super().__init__(E.CUDA_ERROR_INVALID_VALUE, message)


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


_BY_CODE: dict[CUresult, type[CudaError]] = {
    E.CUDA_ERROR_OUT_OF_MEMORY: OutOfMemoryError,
    E.CUDA_ERROR_INVALID_VALUE: InvalidValueError,
    E.CUDA_ERROR_INVALID_HANDLE: InvalidHandleError,
    E.CUDA_ERROR_NOT_FOUND: NotFoundError,
    E.CUDA_ERROR_NOT_READY: NotReadyError,
    E.CUDA_ERROR_INVALID_SOURCE: CompileError,
    E.CUDA_ERROR_INVALID_PTX: CompileError,
    E.CUDA_ERROR_INVALID_IMAGE: CompileError,
    E.CUDA_ERROR_NO_BINARY_FOR_GPU: CompileError,
    E.CUDA_ERROR_NOT_SUPPORTED: NotSupportedError,
    **{c: LaunchFailedError for c in STICKY_CODES},
}


def error_from_code(code: int, message: str = "", *, log: str = "") -> CudaError:
    """The single mapping from a CUresult code to the exception that represents it."""
    try:
        cls = _BY_CODE.get(CUresult(int(code)), CudaError)
    except ValueError:
        cls = CudaError
    return cls(code, message, log=log)


# errno values that mean "out of space or memory": the tenant's request cannot be met, which
# CUDA reports as OUT_OF_MEMORY (never a fault, never an internal error).
_EXHAUSTED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG})


def as_cuda_error(e: BaseException, what: str = "", *, detail: bool = True) -> CudaError:
    """What `e` means as a CUDA error. `what` names the operation, for the message; without
    `detail` an internal error names only its exception type (for untrusted peers)."""
    prefix = f"{what}: " if what else ""
    if isinstance(e, CudaError):
        return e
    if isinstance(e, MemoryError):
        return error_from_code(E.CUDA_ERROR_OUT_OF_MEMORY, f"{prefix}out of host memory")
    if isinstance(e, OSError):
        detail = e.strerror or str(e)
        if e.filename:
            detail = f"{detail} ({e.filename})"
        code = E.CUDA_ERROR_OUT_OF_MEMORY if e.errno in _EXHAUSTED else E.CUDA_ERROR_OPERATING_SYSTEM
        return error_from_code(code, f"{prefix}{detail}")
    text = f"{type(e).__name__}: {e}" if detail else type(e).__name__
    return error_from_code(E.CUDA_ERROR_UNKNOWN, f"{prefix}internal error: {text}")


@contextlib.contextmanager
def map_exceptions(what: str = "", *, logger: logging.Logger | None = None,
                   detail: bool = True) -> Iterator[None]:
    """The one translation point: inside it, whatever is raised leaves as a CudaError.

    CudaErrors pass unchanged; OS and memory errors become OUT_OF_MEMORY (space exhausted) or
    OPERATING_SYSTEM naming what failed; anything else is a bug, logged with its traceback
    and reported as CUDA_ERROR_UNKNOWN, so one bad request never takes a process down."""
    try:
        yield
    except CudaError:
        raise
    except Exception as e:
        if not isinstance(e, (OSError, MemoryError)):
            (logger or log).exception("internal error%s", f" ({what})" if what else "")
        raise as_cuda_error(e, what, detail=detail) from e


@dataclasses.dataclass(frozen=True)
class ExitReason:
    """How an executor ended, as its tenant's sessions are told."""
    code: CUresult
    text: str
    signal: int | None = None


# Signals that end an executor, by number, and the code its sessions get. Any other signal or
# exit status: LAUNCH_FAILED.
EXIT_SIGNAL_CODES: dict[int, CUresult] = {
    signal.SIGSEGV: E.CUDA_ERROR_ILLEGAL_ADDRESS,
    signal.SIGBUS: E.CUDA_ERROR_ILLEGAL_ADDRESS,
}
SANDBOX_SIGNAL = signal.SIGSYS     # the CPU backend's seccomp filter (kubecash.broker.sandbox)


def exit_reason(rc: int) -> ExitReason:
    """What a process's exit status (Popen.returncode: -N for signal N) means."""
    if rc < 0:
        sig = -rc
        if sig == SANDBOX_SIGNAL:
            return ExitReason(E.CUDA_ERROR_LAUNCH_FAILED,
                              "killed by SIGSYS: the sandbox refused a system call made by a kernel "
                              "(kernels may not open files, create sockets, start programs or make "
                              "other host system calls)", sig)
        if sig == signal.SIGBUS:
            # On a CPU device: a page of a file the tenant shares with its executor (its
            # memory arena, a staging segment) is gone; the tenant can do that to its own files.
            return ExitReason(E.CUDA_ERROR_ILLEGAL_ADDRESS,
                              "killed by SIGBUS: memory it touched had no page behind it (a shared-"
                              "memory file in the tenant's directory, such as its CPU device's memory "
                              "arena, was truncated or had holes punched in a full file system)", sig)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return ExitReason(EXIT_SIGNAL_CODES.get(sig, E.CUDA_ERROR_LAUNCH_FAILED), f"killed by {name}", sig)
    return ExitReason(E.CUDA_ERROR_LAUNCH_FAILED, f"exited with status {rc}")
