"""kubecash.client: the library a container uses to run work on a brokered device.

Light by design: pyzmq and msgpack only, no CUDA libraries."""
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
from .session import (
                     ENV_BROKER,
                     Buffer,
                     Device,
                     Event,
                     HostBuffer,
                     Kernel,
                     Module,
                     Session,
                     Stream,
                     connect,
                     encode_args,
)

__all__ = [
    "connect", "Session", "Device", "Buffer", "HostBuffer", "Module", "Kernel", "Stream", "Event",
    "encode_args", "ENV_BROKER", "CUresult", "error_from_code", "KubecashError", "ProtocolError",
    "BrokerUnavailable", "CudaError", "OutOfMemoryError", "InvalidValueError",
    "InvalidHandleError", "NotFoundError", "NotReadyError", "CompileError", "NotSupportedError",
    "LaunchFailedError",
]
