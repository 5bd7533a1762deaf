"""Every bad input gets a clear error reply while the broker and executor keep serving."""
from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from kernels import VECADD

import kubecash.client as kc
from kubecash.client import protocol as P

HOSTILE_FRAMES = [
    b"",
    b"\xc1",                                        # a byte MessagePack never uses
    b"\x91" * 50000,                                # absurdly deep nesting
    msgpack.packb({"v": 1, "id": 3, "op": "mem_alloc"})[:-2],   # truncated
    msgpack.packb(["not", "a", "map"]),
    msgpack.packb({"v": 1, "id": 3}),               # no op
    msgpack.packb({"v": 2, "id": 3, "op": "hello"}),           # wrong version
    msgpack.packb({"v": 1, "id": 3, "op": "rm -rf /"}),        # unknown op
    msgpack.packb({"v": 1, "id": 3, "op": "mem_alloc", "session": "x" * 100, "size": 1}),
    msgpack.packb({"v": 1, "id": 3, "op": "mem_alloc", "session": b"s", "size": 2**64 - 1}),
    msgpack.packb({"v": 1, "id": 3, "op": "launch", "session": b"s", "function": 1,
                   "grid": [2**40], "block": [1], "shared": 0, "args": []}),
    b"\xdb\xff\xff\xff\xff",                        # a str header claiming 4 GiB
]


def _reply(sock) -> dict:
    return P.unpack(sock.recv())


def test_broker_answers_hostile_frames_and_keeps_serving(broker, raw_socket):
    sock = raw_socket(broker.address("alice"))
    for frame in HOSTILE_FRAMES:
        sock.send(frame)
        r = _reply(sock)
        assert r["ok"] is False and r["error"], frame[:20]
    sock.send_multipart([b"two", b"frames"])
    assert _reply(sock)["ok"] is False
    sock.send(P.pack({"v": 2, "id": 9, "op": "hello"}))
    r = _reply(sock)
    assert r["id"] == 9 and "protocol version 2" in r["error"]
    # An oversized message (over the broker socket's 1 MiB cap) is dropped by ZeroMQ, which
    # also drops that connection; a fresh one is served.
    sock.send(b"\x00" * (2 << 20))
    with broker.connect("alice") as s:
        assert s.device("cpu0").allocate(64).size == 64
    assert broker.alive()


def test_executor_answers_hostile_frames_and_keeps_serving(broker, raw_socket):
    with broker.connect("alice") as s, broker.connect("bob") as other:
        dev = s.device("cpu0")
        keep = dev.allocate(16)
        keep.copy_from(b"0123456789abcdef")
        ob = other.device("cpu0").allocate(16)
        sock = raw_socket(f"ipc://{P.executor_socket_path(broker.runtime_dir, 'alice', 'cpu0')}")
        for frame in HOSTILE_FRAMES:
            sock.send(frame)
            r = _reply(sock)
            assert r["ok"] is False and r["error"]
        # A well-formed request with hostile values, on a real session.
        tok = s.token
        for bad in [
            {"op": "memcpy_dtoh", "src": 0, "size": 16},
            {"op": "memcpy_dtoh", "src": keep.ptr, "size": 2**40},
            {"op": "memcpy_htod", "dst": keep.ptr, "size": 8, "data": b"123"},
            {"op": "memset", "dst": keep.ptr, "value": 1, "width": 3, "count": 1},
            {"op": "mem_free", "ptr": 12345},
            {"op": "module_load", "kind": "elf", "source": "x"},
            {"op": "get_function", "module": 99, "name": "x"},
            {"op": "stream_destroy", "stream": 0},
            {"op": "event_elapsed", "start": 1, "end": 2},
            {"op": "mem_alloc", "size": 0},
        ]:
            sock.send(P.pack({"v": 1, "id": 5, "session": tok, **bad}))
            r = _reply(sock)
            assert r["ok"] is False and r["id"] == 5 and r["error"], bad
        assert bytes(keep.copy_to()) == b"0123456789abcdef"
        assert other.device("cpu0").mem_info()[1] == 256 << 20
        ob.copy_from(b"x" * 16)
    assert broker.alive()


def test_executor_checks_each_op_of_a_batch(broker, raw_socket):
    """The push buffer's batch: every op in it is checked as if it came alone; a bad one's
    error is kept for the next synchronization and the ops after it still run; only
    asynchronous ops of the batch's own session, and no batches, may be in one."""
    with broker.connect("alice") as s, broker.connect("bob") as other:
        dev = s.device("cpu0")
        buf = dev.allocate(32)
        buf.copy_from(b"." * 32)
        ob = other.device("cpu0").allocate(16)
        ob.copy_from(b"b" * 16)
        sock = raw_socket(f"ipc://{P.executor_socket_path(broker.runtime_dir, 'alice', 'cpu0')}")

        def op(op, token=s.token, asynchronous=True, **f):
            m = {"v": 1, "id": 7, "op": op, "session": token, **f}
            if asynchronous:
                m["async"] = True
            return m

        def sync() -> dict:
            sock.send(P.pack({"v": 1, "id": 8, "op": "ctx_sync", "session": s.token}))
            return _reply(sock)

        def batch(*ops, asynchronous=True):
            sock.send(P.pack(op("batch", asynchronous=asynchronous, ops=list(ops))))

        memset = dict(width=1, count=16, stream=0)
        batch(op("memset", dst=buf.ptr, value=ord("A"), **memset),
              op("mem_free", ptr=12345),                               # not an allocation
              op("memset", dst=buf.ptr + 16, value=ord("B"), **memset))
        r = sync()
        assert r["ok"] is False and "0x3039" in r["error"], r
        assert bytes(buf.copy_to()) == b"A" * 16 + b"B" * 16
        for bad, why in [
            (op("ctx_sync", asynchronous=False), "batch op 0 (ctx_sync)"),
            (op("batch", ops=[op("memset", dst=buf.ptr, value=1, **memset)]), "no batches"),
            (op("memset", token=other.token, dst=ob.ptr, value=ord("X"), **memset), "own session"),
            ({"v": 1, "op": "memset"}, "batch op 0"),
            (op("launch", function=99, grid=[1, 1, 1], block=[1, 1, 1], shared=0, stream=0, args=[]),
             "not one of this session's"),
        ]:
            batch(bad)
            r = sync()
            assert r["ok"] is False and why in r["error"], (bad, r)
        batch(op("memset", dst=buf.ptr, value=ord("C"), **memset), asynchronous=False)
        assert _reply(sock)["ok"] is True                      # a batch sent as a request
        sock.send(P.pack(op("batch", ops=[])))                  # an empty one: refused at once
        assert sync()["ok"] is False
        assert sync()["ok"] is True
        assert bytes(buf.copy_to())[:16] == b"C" * 16
        assert bytes(ob.copy_to()) == b"b" * 16                  # the other session: untouched
    assert broker.alive()


def test_launch_errors(session):
    dev = session.device("cpu0")
    k = dev.load_module(VECADD).get_kernel("vadd")
    buf = dev.allocate(1024)
    with pytest.raises(ValueError, match="takes 4 arguments"):
        dev.launch(k, (1,), (1,), [buf])
    with pytest.raises(ValueError, match="does not fit in 4 bytes"):
        dev.launch(k, (1,), (1,), [buf, buf, buf, 2**40])
    # Checked by the executor too: a raw launch with bad values is refused, reported at sync.
    for grid, block, shared, args in [
        ([1, 1, 1], [2048, 1, 1], 0, [b"\0" * 8] * 3 + [b"\0" * 4]),
        ([1, 1, 1], [32, 32, 2], 0, [b"\0" * 8] * 3 + [b"\0" * 4]),
        ([0, 1, 1], [1, 1, 1], 0, [b"\0" * 8] * 3 + [b"\0" * 4]),
        ([1, 70000, 1], [1, 1, 1], 0, [b"\0" * 8] * 3 + [b"\0" * 4]),
        ([1, 1, 1], [1, 1, 1], 1 << 20, [b"\0" * 8] * 3 + [b"\0" * 4]),
        ([1, 1, 1], [1, 1, 1], 0, [b"\0" * 8] * 3 + [b"\0" * 8]),
        ([1, 1, 1], [1, 1, 1], 0, [b"\0" * 8] * 2),
    ]:
        dev.submit("launch", function=k.handle, grid=grid, block=block, shared=shared,
                  stream=0, args=args)
        with pytest.raises(kc.InvalidValueError):
            dev.synchronize()
    dev.synchronize()


def test_module_errors(session):
    dev = session.device("cpu0")
    with pytest.raises(kc.CompileError) as e:
        dev.load_module('extern "C" __global__ void f(int* p) {\n  p[0] = undefined_name;\n}\n')
    assert e.value.name == "CUDA_ERROR_INVALID_SOURCE"
    assert "undefined_name" in e.value.log and "undefined_name" in str(e.value)
    mod = dev.load_module(VECADD)
    with pytest.raises(kc.NotFoundError, match="no kernel named 'vsub'.*vadd"):
        mod.get_kernel("vsub")
    cubin = (b"\x7fELF\x02\x01\x01\x33\x08" + bytes(7) + struct.pack("<HHI", 2, 190, 1) + bytes(24)
             + struct.pack("<I", 0x6005A04) + bytes(12))          # an sm_90 CUBIN's ELF header
    with pytest.raises(kc.CompileError, match="SASS for sm_90") as e:
        dev.load_module(image=cubin, kind="cubin")
    assert e.value.name == "CUDA_ERROR_NO_BINARY_FOR_GPU"
    with pytest.raises(kc.CudaError) as e:
        dev.load_module(image=b"\x7fELF....", kind="cubin")
    assert e.value.name == "CUDA_ERROR_INVALID_IMAGE"
    # still serving
    n = 256
    a = dev.allocate(n * 4)
    a.copy_from(np.ones(n, np.float32))
    dev.launch(mod.get_kernel("vadd"), (1,), (n,), [a, a, a, n])
    np.testing.assert_array_equal(a.copy_to(np.empty(n, np.float32)), 2.0)
