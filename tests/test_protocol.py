"""The wire protocol's decoder and validator refuse bad input with a reason (no broker needed)."""
import msgpack
import pytest

from kubecash.client import protocol as P
from kubecash.client.errors import (
    CudaError,
    CUresult,
    LaunchFailedError,
    OutOfMemoryError,
    ProtocolError,
    error_from_code,
)


def req(op, **f):
    return {"v": P.VERSION, "id": 7, "op": op, **f}


def test_round_trip():
    msg = req("mem_alloc", session=b"x" * 16, size=10)
    assert P.unpack(P.pack(msg)) == msg
    assert P.check_request(msg, P.EXECUTOR_OPS) == "mem_alloc"


@pytest.mark.parametrize("frame, reason", [
    (b"\xc1", "not a MessagePack"),                        # never-used byte
    (msgpack.packb([1, 2, 3]), "expected a map"),
    (msgpack.packb({"v": 1})[:-1], "not a MessagePack"),   # truncated
    (b"\x91" * 100000, "not a MessagePack"),               # nesting far too deep
])
def test_undecodable(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        P.unpack(frame)


def test_oversized():
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        P.unpack(b"\x00" * 101, max_bytes=100)


@pytest.mark.parametrize("msg, reason", [
    ({"id": 1, "op": "mem_info", "session": b"s"}, "lacks field 'v'"),
    (req("mem_info", session=b"s") | {"v": 99}, "version 99"),
    (req("format_disk"), "unknown operation"),
    (req("mem_alloc", session=b"s"), "missing field 'size'"),
    (req("mem_alloc", session=b"s", size="big"), "must be int"),
    (req("mem_alloc", session=b"s", size=True), "must be int"),
    (req("mem_alloc", session=b"s", size=-1), "out of range"),
    (req("mem_alloc", session=b"s", size=1, colour=3), "unknown field"),
    (req("launch", session=b"s", function=1, grid=[1, 1, 1, 1], block=[1], shared=0, args=[]),
     "longer than 3"),
    (req("launch", session=b"s", function=1, grid=[1, "x"], block=[1], shared=0, args=[]),
     r"'grid'\[1\]"),
    (req("mem_info", session=b"s") | {"async": True}, "cannot be sent asynchronously"),
])
def test_invalid_requests(msg, reason):
    with pytest.raises(ProtocolError, match=reason):
        P.check_request(msg, P.EXECUTOR_OPS)


def test_error_mapping_is_one_table():
    e = error_from_code(2, "quota")
    assert isinstance(e, OutOfMemoryError) and e.name == "CUDA_ERROR_OUT_OF_MEMORY"
    assert isinstance(error_from_code(700), LaunchFailedError)
    unknown = error_from_code(12345, "?")
    assert type(unknown) is CudaError and unknown.name == "CUresult(12345)"
    assert CUresult.CUDA_ERROR_NOT_SUPPORTED == 801
