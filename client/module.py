"""Loaded code: Module (one loaded image), Kernel (a function in it) and encode_args (a
kernel's arguments as the raw bytes of its parameters)."""
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import KubecashError
from .memory import Buffer, HostBuffer
from .resource import _Resource

if TYPE_CHECKING:
    from .device import Device


def encode_args(args: Sequence[Any], sizes: Sequence[int]) -> list[bytes]:
    """Kernel arguments as raw bytes, one string per parameter of the kernel's signature."""
    if len(args) != len(sizes):
        raise ValueError(f"kernel takes {len(sizes)} arguments, got {len(args)}")
    out = []
    for i, (a, n) in enumerate(zip(args, sizes, strict=True)):
        if isinstance(a, (Buffer, HostBuffer)):
            a = a.ptr
        if isinstance(a, bool):
            a = int(a)
        if isinstance(a, int):
            if not -(1 << (8 * n - 1)) <= a < (1 << (8 * n)):
                raise ValueError(f"argument {i}: {a} does not fit in {n} bytes")
            b = (a & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        elif isinstance(a, float):
            if n not in (4, 8):
                raise ValueError(f"argument {i}: a float for a {n}-byte parameter")
            b = struct.pack("<f" if n == 4 else "<d", a)
        elif isinstance(a, (bytes, bytearray, memoryview)):
            b = bytes(a)
        elif hasattr(a, "tobytes"):         # numpy scalars and 0-d arrays
            b = a.tobytes()
        else:
            try:
                b = bytes(memoryview(a))    # ctypes instances and other buffers
            except TypeError:
                raise ValueError(f"argument {i}: cannot pass a {type(a).__name__}") from None
        if len(b) != n:
            raise ValueError(f"argument {i}: {len(b)} bytes given for a {n}-byte parameter")
        out.append(b)
    return out


class Module(_Resource):
    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def get_kernel(self, name: str) -> Kernel:
        r = self.device.request("get_function", module=self.handle, name=name)
        return Kernel(self.device, r["function"], name, tuple(r["param_sizes"]))

    def get_global(self, name: str) -> tuple[int, int]:
        """(device address, size) of a __device__ or __constant__ variable."""
        r = self.device.request("get_global", module=self.handle, name=name)
        return r["ptr"], r["size"]

    def _release(self) -> None:
        if self.device._ch is not None and not self.device.session._closed:
            try:
                self.device.request("module_unload", module=self.handle)
            except KubecashError:
                pass


class Kernel:
    def __init__(self, device: Device, handle: int, name: str, param_sizes: tuple[int, ...]):
        self.device, self.handle, self.name, self.param_sizes = device, handle, name, param_sizes

    def __repr__(self) -> str:
        return f"<kubecash Kernel {self.name}{self.param_sizes}>"
