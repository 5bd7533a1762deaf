"""Brokered cuda.bindings.driver calls, copies and memsets: each one kubecash.shim.ops
operation (synchronous, or queued on a stream for the Async forms)."""
from __future__ import annotations

from . import ops
from .state import STATE


def cuMemcpyHtoD(dstDevice, srcHost, ByteCount):
    ops.htod(dstDevice, srcHost, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoH(dstHost, srcDevice, ByteCount):
    ops.dtoh(dstHost, srcDevice, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoD(dstDevice, srcDevice, ByteCount):
    ops.dtod(dstDevice, srcDevice, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyHtoDAsync(dstDevice, srcHost, ByteCount, hStream):
    ops.htod(dstDevice, srcHost, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoHAsync(dstHost, srcDevice, ByteCount, hStream):
    ops.dtoh(dstHost, srcDevice, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoDAsync(dstDevice, srcDevice, ByteCount, hStream):
    ops.dtod(dstDevice, srcDevice, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpy(dst, src, ByteCount):
    ops.copy_any(dst, src, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyAsync(dst, src, ByteCount, hStream):
    ops.copy_any(dst, src, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD8(dstDevice, uc, N):
    ops.memset(dstDevice, uc, 1, N, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD16(dstDevice, us, N):
    ops.memset(dstDevice, us, 2, N, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD32(dstDevice, ui, N):
    ops.memset(dstDevice, ui, 4, N, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD8Async(dstDevice, uc, N, hStream):
    ops.memset(dstDevice, uc, 1, N, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD16Async(dstDevice, us, N, hStream):
    ops.memset(dstDevice, us, 2, N, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD32Async(dstDevice, ui, N, hStream):
    ops.memset(dstDevice, ui, 4, N, hStream, default_dev=STATE.ctx().dev)
    return ()
