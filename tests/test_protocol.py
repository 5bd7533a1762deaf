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


# Which class handles each channel's messages (the receiving side).
HANDLER_CLASSES = {
    "tenant": ("kubecash.broker.server", "Broker"),
    "admin": ("kubecash.broker.server", "Broker"),
    "report": ("kubecash.broker.server", "Broker"),
    "lease_report": ("kubecash.broker.server", "Broker"),
    "executor": ("kubecash.broker.executor", "Executor"),
    "control": ("kubecash.broker.executor", "Executor"),
    "lease": ("kubecash.broker.executor", "Executor"),
    "event": ("kubecash.client.session", "Session"),
    "compile": ("kubecash.broker.compile_helper", "_HelperServer"),
}


@pytest.mark.parametrize("channel", P.CHANNELS, ids=lambda c: c.name)
def test_every_declared_message_has_exactly_one_handler_and_every_handler_a_declaration(channel):
    import importlib
    module, name = HANDLER_CLASSES[channel.name]
    cls = getattr(importlib.import_module(module), name)
    declared = {P.handler_name(m) for m in P.messages(channel).values()}
    handlers = {n for n in dir(cls) if n.startswith(channel.handler_prefix) and callable(getattr(cls, n))}
    # another channel's longer prefix on the same class is not this channel's
    for other in P.CHANNELS:
        if other is not channel and other.handler_prefix.startswith(channel.handler_prefix) \
                and HANDLER_CLASSES[other.name] == HANDLER_CLASSES[channel.name]:
            handlers = {n for n in handlers if not n.startswith(other.handler_prefix)}
    assert declared - handlers == set(), f"declared without a handler on {name}"
    assert handlers - declared == set(), f"handlers on {name} without a declaration"


def test_the_declarations_export_as_json():
    import json
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(sys.executable), "kubecash-protocol")
    out = subprocess.run([script, "--json"], capture_output=True, text=True, check=True)
    assert out.stderr == ""
    doc = json.loads(out.stdout)
    names = {(m["channel"], m["name"]) for m in doc["messages"]}
    assert names == set(P.MESSAGES)
    launch = next(m for m in doc["messages"] if m["name"] == "launch")
    assert launch["asynchronous"] and launch["fields"]["grid"]["item_hi"] == list(P.LAUNCH.max_grid)
    assert doc["codes"]["CUDA_ERROR_OUT_OF_MEMORY"] == 2


@pytest.mark.parametrize("msg, reason", [
    (req("memset", session=b"s", dst=1, value=0, width=3, count=1), "width'=3 is not one of"),
    (req("module_load", session=b"s", kind="elf"), "kind'='elf' is not one of"),
    (req("launch", session=b"s", function=1, grid=[1, 1, 0], block=[1, 1, 1], shared=0, args=[]), "outside"),
    (req("launch", session=b"s", function=1, grid=[1, 1, 1], block=[1024, 2, 1], shared=0, args=[]),
     "2048 threads; at most 1024"),
    (req("launch", session=b"s", function=1, grid=[1, 1], block=[1, 1, 1], shared=0, args=[]), "at least 3"),
])
def test_field_rules_live_in_the_declaration(msg, reason):
    with pytest.raises(ProtocolError, match=reason):
        P.check(msg, P.EXECUTOR)


def test_replies_are_checked_against_their_declaration():
    P.check_reply(P.EXECUTOR, "mem_alloc", {"v": 1, "id": 3, "ok": True, "ptr": 4096})
    with pytest.raises(ProtocolError, match="missing field 'ptr'"):
        P.check_reply(P.EXECUTOR, "mem_alloc", {"v": 1, "id": 3, "ok": True})
    with pytest.raises(ProtocolError, match="unknown field"):
        P.check_reply(P.EXECUTOR, "mem_alloc", {"v": 1, "id": 3, "ok": True, "ptr": 1, "extra": 2})
