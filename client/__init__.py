"""kubecash.client: the library a container uses to run work on a brokered device.

Light by design: pyzmq and msgpack only, no CUDA libraries."""
from .device import Device
from .errors import (
                     BrokerUnavailable,
                     CompileError,
                     CudaError,
                     CUresult,
                     InvalidHandleError,
                     InvalidValueError,
                     KubecashError,
                     LaunchFailedError,
                     NotFoundError,
                     NotReadyError,
                     NotSupportedError,
                     OutOfMemoryError,
                     ProtocolError,
                     error_from_code,
)
from .memory import Buffer, HostBuffer
from .module import Kernel, Module, encode_args
from .session import ENV_BROKER, Session, connect
from .stream import Event, Stream

__all__ = [
    "connect", "Session", "Device", "Buffer", "HostBuffer", "Module", "Kernel", "Stream", "Event",
    "encode_args", "ENV_BROKER", "CUresult", "error_from_code", "KubecashError", "ProtocolError",
    "BrokerUnavailable", "CudaError", "OutOfMemoryError", "InvalidValueError",
    "InvalidHandleError", "NotFoundError", "NotReadyError", "CompileError", "NotSupportedError",
    "LaunchFailedError",
]
