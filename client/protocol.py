"""The KubeCASH wire protocol: the one definition shared by client, broker and executors.

Transport: ZeroMQ. The broker and each executor bind ROUTER sockets; clients connect
DEALER sockets. After the ROUTER's routing envelope every message is exactly one frame
holding one MessagePack map.

Request   {"v": VERSION, "id": int, "op": str, ...fields of that op}
Reply     {"v": VERSION, "id": <request id>, "ok": True, ...result fields}
Error     {"v": VERSION, "id": <request id>, "ok": False, "code": CUresult, "error": str[, "log": str]}
Event     {"v": VERSION, "id": 0, "event": str, ...}      unsolicited, broker -> client

Requests named in ASYNC_OPS carry "async": True when the caller does not wait: no reply is
sent; an error they raise is kept and returned by the session's next synchronizing request
(CUDA semantics). Bulk data travels in a shared-memory staging segment (named by the
executor at attach) when client and executor share a node, or inline in "data" for small
copies.

Every field of every op is declared in OPS below; `check_request` validates an incoming
message against it, so handlers never see wrong types or out-of-range values.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from .errors import CUresult, ProtocolError

VERSION = 1
MAX_MESSAGE_BYTES = 64 << 20        # default; the broker config can lower it
INLINE_MAX = 64 << 10               # copies up to this size travel inside the message
DEFAULT_STAGING_BYTES = 32 << 20    # per-session shared-memory staging segment
U64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class F:
    """One field of a message: its Python type(s), whether it is required, and bounds."""
    type: type | tuple[type, ...]
    required: bool = True
    lo: int | None = None
    hi: int | None = None
    maxlen: int | None = None          # for str/bytes/list
    items: type | tuple[type, ...] | None = None   # element type of a list


SESSION = F(bytes, maxlen=64)
HANDLE = F(int, lo=0, hi=U64)
SIZE = F(int, lo=0, hi=1 << 48)
STREAM = F(int, required=False, lo=0, hi=U64)
DIM3 = F(list, maxlen=3, items=int)

# op name -> fields. Broker ops arrive on a tenant's broker socket, executor ops on that
# tenant's executor socket. Adding an op means adding one line here and one handler.
BROKER_OPS: dict[str, dict[str, F]] = {
    "hello": {"pid": F(int, required=False, lo=0, hi=I64_MAX),
              "client": F(str, required=False, maxlen=200)},
    "heartbeat": {"session": SESSION},
    "open_device": {"session": SESSION, "device": F(str, maxlen=64)},
    "status": {"session": SESSION},
    "close": {"session": SESSION},
}

EXECUTOR_OPS: dict[str, dict[str, F]] = {
    "attach": {"session": SESSION},
    "mem_alloc": {"session": SESSION, "size": SIZE},
    "mem_free": {"session": SESSION, "ptr": HANDLE},
    "mem_info": {"session": SESSION},
    "host_alloc": {"session": SESSION, "size": SIZE},
    "host_mapped": {"session": SESSION, "ptr": HANDLE},
    "host_free": {"session": SESSION, "ptr": HANDLE},
    "memcpy_htod": {"session": SESSION, "dst": HANDLE, "size": SIZE, "stream": STREAM,
                    "data": F(bytes, required=False, maxlen=INLINE_MAX),
                    "offset": F(int, required=False, lo=0, hi=1 << 40)},
    "memcpy_dtoh": {"session": SESSION, "src": HANDLE, "size": SIZE, "stream": STREAM,
                    "offset": F(int, required=False, lo=0, hi=1 << 40)},
    "memcpy_dtod": {"session": SESSION, "dst": HANDLE, "src": HANDLE, "size": SIZE,
                    "stream": STREAM},
    "memset": {"session": SESSION, "dst": HANDLE, "value": F(int, lo=0, hi=0xFFFFFFFF),
               "width": F(int, lo=1, hi=4), "count": SIZE, "stream": STREAM},
    "module_load": {"session": SESSION, "kind": F(str, maxlen=16),
                    "source": F(str, required=False, maxlen=8 << 20),
                    "image": F(bytes, required=False, maxlen=32 << 20),
                    "options": F(list, required=False, maxlen=64, items=str)},
    "module_unload": {"session": SESSION, "module": HANDLE},
    "get_function": {"session": SESSION, "module": HANDLE, "name": F(str, maxlen=4096)},
    "get_global": {"session": SESSION, "module": HANDLE, "name": F(str, maxlen=4096)},
    "launch": {"session": SESSION, "function": HANDLE, "grid": DIM3, "block": DIM3,
               "shared": F(int, lo=0, hi=1 << 32), "stream": STREAM,
               "args": F(list, maxlen=4096, items=bytes)},
    "stream_create": {"session": SESSION, "flags": F(int, required=False, lo=0, hi=0xFFFFFFFF)},
    "stream_destroy": {"session": SESSION, "stream": HANDLE},
    "stream_sync": {"session": SESSION, "stream": STREAM},
    "stream_query": {"session": SESSION, "stream": STREAM},
    "stream_wait_event": {"session": SESSION, "stream": STREAM, "event": HANDLE},
    "event_create": {"session": SESSION, "flags": F(int, required=False, lo=0, hi=0xFFFFFFFF)},
    "event_destroy": {"session": SESSION, "event": HANDLE},
    "event_record": {"session": SESSION, "event": HANDLE, "stream": STREAM},
    "event_sync": {"session": SESSION, "event": HANDLE},
    "event_query": {"session": SESSION, "event": HANDLE},
    "event_elapsed": {"session": SESSION, "start": HANDLE, "end": HANDLE},
    "ctx_sync": {"session": SESSION},
}

# The operator's socket (<runtime_dir>/admin.sock, owner-only): what brokerctl speaks.
ADMIN_OPS: dict[str, dict[str, F]] = {
    "status": {},
    "reload": {},
    "evict": {"tenant": F(str, maxlen=64)},
    "drain": {"device": F(str, maxlen=64), "undo": F(bool, required=False)},
    "set_quota": {"tenant": F(str, maxlen=64), "device": F(str, required=False, maxlen=64),
                  "weight": F(int, required=False),   # ranges: checked by the config rules
                  "limit": F((int, float), required=False),      # <= 0 removes the limit
                  "memory": F(int, required=False, lo=0, hi=1 << 62),
                  "class": F(str, required=False, maxlen=16)},
}

# Requests that may be sent without waiting for a reply.
ASYNC_OPS = frozenset({"launch", "memcpy_htod", "memcpy_dtod", "memset", "event_record",
                       "stream_wait_event"})

_COMMON = {"v": F(int), "id": F(int, required=False, lo=0, hi=U64), "op": F(str, maxlen=64),
           "async": F(bool, required=False)}


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode one frame into a map, or raise ProtocolError saying what is wrong."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, ValueError...)
        raise ProtocolError(f"not a MessagePack message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, expected a map")
    return msg


def _check_field(op: str, name: str, spec: F, value: Any) -> None:
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    # bool is a subclass of int: never accept it where a number is meant.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = spec.type.__name__ if isinstance(spec.type, type) else "/".join(
            t.__name__ for t in spec.type)
        raise ProtocolError(f"{op}: field '{name}' must be {want}, got {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool):
        if spec.lo is not None and value < spec.lo or spec.hi is not None and value > spec.hi:
            raise ProtocolError(f"{op}: field '{name}'={value} out of range [{spec.lo}, {spec.hi}]")
    if spec.maxlen is not None and isinstance(value, (str, bytes, list)) and len(value) > spec.maxlen:
        raise ProtocolError(f"{op}: field '{name}' longer than {spec.maxlen}")
    if spec.items is not None:
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, spec.items):
                raise ProtocolError(f"{op}: field '{name}'[{i}] has type {type(item).__name__}")


def check_request(msg: dict[str, Any], table: dict[str, dict[str, F]]) -> str:
    """Validate a decoded request against `table`; return its op name.

    Raises ProtocolError (a readable reason) for a wrong version, unknown op, missing or
    ill-typed field. Unknown extra fields are refused too, so typos do not pass silently."""
    for name, spec in _COMMON.items():
        if name in msg:
            _check_field("request", name, spec, msg[name])
        elif spec.required:
            raise ProtocolError(f"request lacks field '{name}'")
    # Requests from clients and operators are answered, so they carry an id; only the
    # broker-executor control messages go without.
    if "id" not in msg and table is not CONTROL_OPS and table is not EXECUTOR_REPORTS:
        raise ProtocolError("request lacks field 'id'")
    if msg["v"] != VERSION:
        raise ProtocolError(f"protocol version {msg['v']} is not supported (this side speaks {VERSION})")
    op = msg["op"]
    fields = table.get(op)
    if fields is None:
        raise ProtocolError(f"unknown operation '{op[:64]}'")
    for name, spec in fields.items():
        if name in msg:
            _check_field(op, name, spec, msg[name])
        elif spec.required:
            raise ProtocolError(f"{op}: missing field '{name}'")
    extra = set(msg) - set(fields) - set(_COMMON)
    if extra:
        raise ProtocolError(f"{op}: unknown field(s) {sorted(str(x)[:32] for x in extra)[:8]}")
    if msg.get("async") and op not in ASYNC_OPS:
        raise ProtocolError(f"{op} cannot be sent asynchronously")
    return op


def decode(frame: bytes, table: dict[str, dict[str, F]],
           max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[str, dict[str, Any]]:
    """unpack + check_request: (op, message), or ProtocolError saying what is wrong."""
    msg = unpack(frame, max_bytes)
    return check_request(msg, table), msg


def reply(req_id: int, **result: Any) -> bytes:
    return pack({"v": VERSION, "id": req_id, "ok": True, **result})


def error(req_id: int, code: int, message: str, log: str = "") -> bytes:
    msg = {"v": VERSION, "id": req_id, "ok": False, "code": int(code), "error": message}
    if log:
        msg["log"] = log
    return pack(msg)


def event(name: str, **fields: Any) -> bytes:
    return pack({"v": VERSION, "id": 0, "event": name, **fields})


def request_id_of(msg: Any) -> int:
    """Best-effort id of a (possibly malformed) request, so even a refusal can be matched."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= U64:
            return rid
    return 0


PROTOCOL_ERROR_CODE = CUresult.CUDA_ERROR_INVALID_VALUE


def tenant_dir(runtime_dir: str, tenant: str) -> str:
    return f"{runtime_dir}/tenants/{tenant}"


def broker_socket_path(runtime_dir: str, tenant: str) -> str:
    return f"{tenant_dir(runtime_dir, tenant)}/broker.sock"


def executor_socket_path(runtime_dir: str, tenant: str, device: str) -> str:
    return f"{tenant_dir(runtime_dir, tenant)}/{device}.sock"


# Between the broker and each executor: two SOCK_SEQPACKET socketpairs the broker creates and
# the executor inherits, one for control (session_add... ; ready, stats...) and one for leases
# (grant, preempt; want, release). One message per packet, same encoding. Control messages are
# a few hundred bytes at most; a longer packet is cut to this (and then refused as malformed).
CONTROL_MESSAGE_MAX = 4096
# broker -> executor
CONTROL_OPS: dict[str, dict[str, F]] = {
    "session_add": {"session": SESSION},
    "session_end": {"session": SESSION},
    "set_quota": {"memory": F(int, lo=0, hi=1 << 62)},
    "grant": {"lease": F(int, lo=1, hi=U64), "quantum_ns": F(int, lo=1, hi=I64_MAX),
              "preemptible": F(bool, required=False)},   # a latency tenant shares the device
    "preempt": {"lease": F(int, lo=1, hi=U64)},
    "shutdown": {},
}
# executor -> broker
EXECUTOR_REPORTS: dict[str, dict[str, F]] = {
    "ready": {"tenant": F(str, maxlen=64), "device": F(str, maxlen=64),
              "pid": F(int, lo=0, hi=I64_MAX)},
    "session_added": {"session": SESSION},
    "session_ended": {"session": SESSION},
    "fatal": {"code": F(int, lo=0, hi=I64_MAX), "error": F(str, maxlen=1000)},
    "want": {},
    "release": {"lease": F(int, lo=1, hi=U64), "used_ns": F(int, lo=0, hi=I64_MAX),
                "kernels": F(int, lo=0, hi=I64_MAX), "more": F(bool),
                # a preempted kernel is still running: its time so far carries to the next
                # lease, so max_kernel_seconds bounds a kernel run in slices too
                "suspended": F(bool, required=False)},
    "stats": {"device_ns": F(int, lo=0, hi=I64_MAX), "kernels": F(int, lo=0, hi=I64_MAX),
              "memory_used": F(int, lo=0, hi=I64_MAX)},
}
