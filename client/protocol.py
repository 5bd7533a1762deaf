"""The KubeCASH wire protocol: every message kind, declared once, as data.

Every side imports this module: the client library, the broker, its executors, brokerctl,
and native clients, which are generated or checked from its export (`kubecash-protocol
--json`).

Transports (each message is one MessagePack map):
  tenant        client DEALER -> the tenant's broker socket (ZMTP parsed by broker/gate.py)
  executor      client DEALER -> the tenant's executor ROUTER socket (one per device)
  admin         brokerctl DEALER -> the broker's owner-only admin ROUTER socket
  control       broker -> executor, on the executor's inherited control socketpair
  report        executor -> broker, on the same socketpair
  lease         broker -> executor, on the executor's inherited lease socketpair
  lease_report  executor -> broker, on the same socketpair
  event         broker or executor -> client, unsolicited
  compile       executor -> its confined compile helper, on a socketpair (4-byte length prefix)

Envelopes (built only by `envelope` and the builders below it):
  Request   {"v": VERSION, "id": int, "op": str[, "async": True], ...fields}
  Reply     {"v": VERSION, "id": <request id>, "ok": True, ...reply fields}
  Error     {"v": VERSION, "id": <request id>, "ok": False, "code": CUresult, "error": str[, "log": str]}
  Event     {"v": VERSION, "id": 0, "event": str, ...fields}
  Notice    {"v": VERSION, "op": str, ...fields}         control, report, lease, lease_report

A request whose message is declared `asynchronous` may carry "async": True when the caller
does not wait: no reply is sent, and an error it raises is kept and returned by the
session's next synchronizing request (CUDA semantics). Clients gather such requests in a push
buffer and send them as one "batch" request whose "ops" are the whole requests, each checked
and handled as if it had come alone (limits.BATCH_MAX_OPS, BATCH_MAX_BYTES, BATCH_DELAY_S).

Every field is declared with its type, bounds, choices and length; `check` validates an
incoming message against its declaration (plus the message's own cross-field rule), so
handlers never see wrong types or out-of-range values. Each message is handled by exactly
one method, named `<channel.handler_prefix><message name>` on the receiving side's class
(tests/test_protocol.py checks both directions).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from .errors import CudaError, CUresult, ProtocolError, error_from_code
from .limits import (
    ADMIN_MESSAGE_MAX,
    BATCH_DELAY_S,
    BATCH_MAX_BYTES,
    BATCH_MAX_OPS,
    BROKER_MESSAGE_MAX,
    COMPILED_IMAGE_MAX,
    CONTROL_MESSAGE_MAX,
    DEFAULT_STAGING_BYTES,
    INLINE_MAX,
    LAUNCH,
    MODULE_IMAGE_MAX,
    MODULE_SOURCE_MAX,
    VMM_GRANULARITY,
    Limits,
)

VERSION = 1
MAX_MESSAGE_BYTES = Limits().max_message_bytes   # default; the broker config can lower it
U64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
NONE = type(None)

__all__ = [
    "VERSION", "MAX_MESSAGE_BYTES", "INLINE_MAX", "BATCH_MAX_OPS", "BATCH_MAX_BYTES", "BATCH_DELAY_S",
    "DEFAULT_STAGING_BYTES", "BROKER_MESSAGE_MAX",
    "ADMIN_MESSAGE_MAX", "CONTROL_MESSAGE_MAX", "F", "Channel", "Message", "CHANNELS", "MESSAGES",
    "TENANT", "EXECUTOR", "ADMIN", "CONTROL", "REPORT", "LEASE", "LEASE_REPORT", "EVENT", "COMPILE",
    "message", "handler_name", "envelope", "request", "notice", "reply", "error", "error_reply",
    "event", "pack", "unpack", "check", "check_reply", "decode", "request_id_of", "raise_for_reply",
    "export",
]


@dataclasses.dataclass(frozen=True)
class F:
    """One field of a message: its type(s), whether it is required, and its bounds."""
    type: type | tuple[type, ...]
    required: bool = True
    lo: int | float | None = None
    hi: int | float | None = None
    maxlen: int | None = None          # for str/bytes/list/dict
    minlen: int | None = None
    items: type | tuple[type, ...] | None = None   # element type of a list
    item_lo: int | None = None                     # bounds of each (int) element of a list
    item_hi: int | tuple[int, ...] | None = None   # one bound, or one per position
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    def type_names(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return "/".join("nil" if t is NONE else t.__name__ for t in types)


@dataclasses.dataclass(frozen=True)
class Channel:
    """Where a message travels, who sends it, who handles it and how."""
    name: str
    sender: str
    receiver: str
    handler_prefix: str       # the receiver's handler for message m is <prefix><m.name>
    answered: bool            # requests on it get a reply (and so carry an id)
    max_bytes: int            # largest message the receiver accepts (a setting may lower it)


TENANT = Channel("tenant", "client", "broker", "_op_", True, BROKER_MESSAGE_MAX)
EXECUTOR = Channel("executor", "client", "executor", "op_", True, MAX_MESSAGE_BYTES)
ADMIN = Channel("admin", "brokerctl", "broker", "_admin_", True, ADMIN_MESSAGE_MAX)
CONTROL = Channel("control", "broker", "executor", "_on_control_", False, CONTROL_MESSAGE_MAX)
REPORT = Channel("report", "executor", "broker", "_on_report_", False, CONTROL_MESSAGE_MAX)
LEASE = Channel("lease", "broker", "executor", "_on_lease_", False, CONTROL_MESSAGE_MAX)
LEASE_REPORT = Channel("lease_report", "executor", "broker", "_on_lease_report_", False, CONTROL_MESSAGE_MAX)
EVENT = Channel("event", "broker/executor", "client", "_on_event_", False, MAX_MESSAGE_BYTES)
COMPILE = Channel("compile", "executor", "compile helper", "_on_compile_", True, MODULE_SOURCE_MAX + (64 << 10))
CHANNELS = (TENANT, EXECUTOR, ADMIN, CONTROL, REPORT, LEASE, LEASE_REPORT, EVENT, COMPILE)


@dataclasses.dataclass(frozen=True)
class Message:
    name: str
    channel: Channel
    fields: Mapping[str, F]
    reply: Mapping[str, F] | None = None    # fields of the success reply (None: never answered)
    asynchronous: bool = False              # may be sent with "async": True
    rule: Callable[[dict], str | None] | None = None   # cross-field check: an error text or None
    doc: str = ""


def handler_name(m: Message) -> str:
    return m.channel.handler_prefix + m.name


# -- field shapes used by many messages ---------------------------------------------------
SESSION = F(bytes, minlen=1, maxlen=64, doc="session token from hello")
HANDLE = F(int, lo=0, hi=U64)
PTR = F(int, lo=0, hi=U64, doc="device address in the executor's context")
SIZE = F(int, lo=0, hi=1 << 48)
STREAM = F(int, required=False, lo=0, hi=U64, doc="stream handle; 0 or absent: the default stream")
FLAGS = F(int, required=False, lo=0, hi=0xFFFFFFFF)
NAME = F(str, minlen=1, maxlen=64)
COUNT = F(int, lo=0, hi=I64_MAX)
NS = F(int, lo=0, hi=I64_MAX)
NUMBER = F((int, float))
TEXT = F(str)
MAP = F(dict)
LIST = F(list)
BOOL = F(bool)
OPT_NUMBER = F((int, float, NONE))
OPT_STR = F((str, NONE))
OPT_INT = F((int, NONE))
DEVICE_VIEW = F(dict, doc="a device as the tenant sees it: describe() plus its quota")


def _launch_rule(msg: dict) -> str | None:
    threads = msg["block"][0] * msg["block"][1] * msg["block"][2]
    if threads > LAUNCH.max_threads_per_block:
        return (f"block {tuple(msg['block'])} has {threads} threads; "
                f"at most {LAUNCH.max_threads_per_block}")
    return None


_M: list[Message] = [
    # -- tenant: client -> its broker socket ------------------------------------------------
    Message("hello", TENANT, {"pid": F(int, required=False, lo=0, hi=I64_MAX),
                              "client": F(str, required=False, maxlen=200)},
            reply={"session": SESSION, "tenant": TEXT, "heartbeat_interval": NUMBER,
                   "heartbeat_timeout": NUMBER, "devices": F(list, items=dict)},
            doc="open a session; the tenant is the socket it came in on"),
    Message("heartbeat", TENANT, {"session": SESSION}, reply={}),
    Message("open_device", TENANT, {"session": SESSION, "device": NAME},
            reply={"address": TEXT, "memory_limit": COUNT},
            doc="start (or find) the tenant's executor for a device; address: its socket's name"),
    Message("status", TENANT, {"session": SESSION},
            reply={"tenant": TEXT, "sessions": COUNT, "devices": MAP}),
    Message("close", TENANT, {"session": SESSION}, reply={}),

    # -- executor: client -> the tenant's executor for one device -----------------------------
    Message("attach", EXECUTOR, {"session": SESSION},
            reply={"staging": TEXT, "staging_size": COUNT, "memory_limit": COUNT, "device": MAP,
                   "max_queued_ops": COUNT, "max_message_bytes": COUNT,
                   "arena": F(str, maxlen=255, doc="a CPU device's memory itself, a file in the tenant's "
                                                   "shm/ to map ('' if none): copies are one memcpy"),
                   "arena_size": COUNT,
                   "arena_base": F(int, lo=0, hi=U64, doc="the executor's address of the arena's byte 0")},
            doc="join the executor; staging: a shared-memory segment in the tenant's shm/ ('' if attached)"),
    Message("mem_alloc", EXECUTOR, {"session": SESSION, "size": SIZE}, reply={"ptr": PTR}),
    Message("mem_free", EXECUTOR, {"session": SESSION, "ptr": PTR}, reply={}, asynchronous=True,
            doc="runs after the work queued before it; async: cuMemFreeAsync (no wait for that work)"),
    Message("mem_info", EXECUTOR, {"session": SESSION}, reply={"free": COUNT, "total": COUNT}),
    # Virtual memory management (cuMemAddressReserve/cuMemCreate/cuMemMap...), CPU devices:
    # a reservation is a range of the arena's address space, a physical allocation a range of
    # the arena's file, and a mapping puts that file range at a reserved address (executor
    # and client map the same pages there). Sizes and addresses in VMM_GRANULARITY units.
    Message("vmm_reserve", EXECUTOR, {"session": SESSION, "size": SIZE,
                                      "align": F(int, required=False, lo=0, hi=1 << 40)},
            reply={"ptr": PTR}, doc="cuMemAddressReserve: address space only, not charged"),
    Message("vmm_free", EXECUTOR, {"session": SESSION, "ptr": PTR, "size": SIZE}, reply={},
            doc="cuMemAddressFree: a whole reservation, after its mappings are gone"),
    Message("vmm_create", EXECUTOR, {"session": SESSION, "size": SIZE},
            reply={"handle": HANDLE}, doc="cuMemCreate: charged against the memory quota"),
    Message("vmm_release", EXECUTOR, {"session": SESSION, "handle": HANDLE}, reply={},
            doc="cuMemRelease: the memory goes once no mapping of it is left"),
    Message("vmm_map", EXECUTOR, {"session": SESSION, "ptr": PTR, "size": SIZE,
                                  "offset": F(int, lo=0, hi=1 << 48), "handle": HANDLE},
            reply={"file_offset": COUNT},
            doc="cuMemMap: no access until vmm_access; file_offset: where the pages are in the arena file"),
    Message("vmm_unmap", EXECUTOR, {"session": SESSION, "ptr": PTR, "size": SIZE}, reply={},
            doc="cuMemUnmap: whole mappings; runs after the work queued before it"),
    Message("vmm_access", EXECUTOR, {"session": SESSION, "ptr": PTR, "size": SIZE,
                                     "access": F(int, lo=0, hi=3, doc="CUmemAccess_flags: 0, 1 read, 3 read-write")},
            reply={}, doc="cuMemSetAccess on whole mappings of one reservation"),
    Message("host_alloc", EXECUTOR, {"session": SESSION, "size": SIZE},
            reply={"ptr": PTR, "path": TEXT}, doc="mapped host memory shared with the client"),
    Message("host_mapped", EXECUTOR, {"session": SESSION, "ptr": PTR}, reply={}),
    Message("host_free", EXECUTOR, {"session": SESSION, "ptr": PTR}, reply={}),
    Message("memcpy_htod", EXECUTOR,
            {"session": SESSION, "dst": PTR, "size": SIZE, "stream": STREAM,
             "data": F(bytes, required=False, maxlen=INLINE_MAX, doc="inline data (small copies)"),
             "offset": F(int, required=False, lo=0, hi=1 << 40, doc="where the data is in staging")},
            reply={}, asynchronous=True),
    Message("memcpy_dtoh", EXECUTOR,
            {"session": SESSION, "src": PTR, "size": SIZE, "stream": STREAM,
             "offset": F(int, required=False, lo=0, hi=1 << 40)},
            reply={"data": F(bytes, required=False)}, doc="data inline when no offset was given"),
    Message("memcpy_dtod", EXECUTOR,
            {"session": SESSION, "dst": PTR, "src": PTR, "size": SIZE, "stream": STREAM},
            reply={}, asynchronous=True),
    Message("memset", EXECUTOR,
            {"session": SESSION, "dst": PTR, "value": F(int, lo=0, hi=0xFFFFFFFF),
             "width": F(int, choices=(1, 2, 4), doc="element width in bytes"), "count": SIZE,
             "stream": STREAM},
            reply={}, asynchronous=True),
    Message("module_load", EXECUTOR,
            {"session": SESSION, "kind": F(str, choices=("cuda-c", "ptx", "cubin", "fatbin")),
             "source": F(str, required=False, maxlen=MODULE_SOURCE_MAX),
             "image": F(bytes, required=False, maxlen=MODULE_IMAGE_MAX),
             "options": F(list, required=False, maxlen=64, items=str)},
            reply={"module": HANDLE}, doc="compiled off the executor's main loop; answered when built"),
    Message("module_unload", EXECUTOR, {"session": SESSION, "module": HANDLE}, reply={}),
    Message("get_function", EXECUTOR, {"session": SESSION, "module": HANDLE, "name": F(str, maxlen=4096)},
            reply={"function": HANDLE, "param_sizes": F(list, items=int)}),
    Message("get_global", EXECUTOR, {"session": SESSION, "module": HANDLE, "name": F(str, maxlen=4096)},
            reply={"ptr": PTR, "size": COUNT}),
    Message("launch", EXECUTOR,
            {"session": SESSION, "function": HANDLE,
             "grid": F(list, minlen=3, maxlen=3, items=int, item_lo=1, item_hi=LAUNCH.max_grid),
             "block": F(list, minlen=3, maxlen=3, items=int, item_lo=1, item_hi=LAUNCH.max_block),
             "shared": F(int, lo=0, hi=LAUNCH.max_shared_bytes, doc="dynamic shared memory, bytes"),
             "stream": STREAM,
             "args": F(list, maxlen=LAUNCH.max_kernel_params, items=bytes, doc="each parameter's bytes"),
             "cooperative": F(bool, required=False,
                              doc="cuLaunchCooperativeKernel: every block resident at once (grid-wide barriers)")},
            reply={}, asynchronous=True, rule=_launch_rule),
    Message("stream_create", EXECUTOR, {"session": SESSION, "flags": FLAGS}, reply={"stream": HANDLE}),
    Message("stream_destroy", EXECUTOR, {"session": SESSION, "stream": HANDLE}, reply={}),
    Message("stream_sync", EXECUTOR, {"session": SESSION, "stream": STREAM}, reply={}),
    Message("stream_query", EXECUTOR, {"session": SESSION, "stream": STREAM}, reply={"ready": BOOL}),
    Message("stream_wait_event", EXECUTOR, {"session": SESSION, "stream": STREAM, "event": HANDLE},
            reply={}, asynchronous=True),
    Message("event_create", EXECUTOR, {"session": SESSION, "flags": FLAGS}, reply={"event": HANDLE}),
    Message("event_destroy", EXECUTOR, {"session": SESSION, "event": HANDLE}, reply={}),
    Message("event_record", EXECUTOR, {"session": SESSION, "event": HANDLE, "stream": STREAM},
            reply={}, asynchronous=True),
    Message("event_sync", EXECUTOR, {"session": SESSION, "event": HANDLE}, reply={}),
    Message("event_query", EXECUTOR, {"session": SESSION, "event": HANDLE}, reply={"ready": BOOL}),
    Message("event_elapsed", EXECUTOR, {"session": SESSION, "start": HANDLE, "end": HANDLE},
            reply={"ms": NUMBER}),
    Message("ctx_sync", EXECUTOR, {"session": SESSION}, reply={}),
    Message("batch", EXECUTOR,
            {"session": SESSION,
             "ops": F(list, minlen=1, maxlen=BATCH_MAX_OPS, items=dict,
                      doc="whole asynchronous requests of this session, each as if sent alone")},
            reply={}, asynchronous=True,
            doc="the push buffer: sent only with async; each op is checked and queued in order, "
                "its error kept for the next synchronization"),

    # -- admin: brokerctl -> the broker's admin socket --------------------------------------
    Message("status", ADMIN, {},
            reply={"devices": MAP, "tenants": MAP, "uptime_s": NUMBER, "quantum_ms": NUMBER,
                   "runtime_dir": TEXT, "metrics_address": TEXT, "config": TEXT,
                   "libdir": F((str, NONE), doc="the native libraries' copy CDI specs mount (nil: not built)"),
                   "state": F(dict, doc="the state file: its path, the dynamic tenants, and the problem "
                                        "it had at start (nil: none)")}),
    Message("reload", ADMIN, {},
            reply={"tenants": F(list, items=str), "added": F(list, items=str),
                   "removed": F(list, items=str),
                   "restart_needed_for": F(list, items=str, doc="changed settings that apply at restart"),
                   "warnings": F(list, items=str, doc="tenants not served, or not resized, and why")},
            doc="re-read the quota file; an invalid one changes nothing"),
    Message("evict", ADMIN, {"tenant": NAME}, reply={"tenant": TEXT, "sessions_ended": COUNT}),
    Message("drain", ADMIN, {"device": NAME, "undo": F(bool, required=False)},
            reply={"device": TEXT, "draining": BOOL, "holder": OPT_STR}),
    Message("set_quota", ADMIN,
            {"tenant": NAME, "device": F(str, required=False, maxlen=64),
             "weight": F(int, required=False),     # ranges: checked by the config rules
             "limit": F((int, float), required=False, doc="<= 0 removes the limit"),
             "memory": F(int, required=False, lo=0, hi=1 << 62),
             "class": F(str, required=False, maxlen=16)},
            reply={"tenant": TEXT, "warnings": F(list, items=str, doc="what did not take effect, and why")}),
    Message("tenant_add", ADMIN,
            {"tenant": NAME,
             "table": F(dict, maxlen=64, doc="its definition: the fields of [tenants.<name>] in a quota "
                                             "file (checked by the same rules)"),
             "replace": F(bool, required=False, doc="change it if it exists with another definition")},
            reply={"tenant": TEXT, "created": BOOL, "changed": BOOL,
                   "served": BOOL, "warnings": F(list, items=str)},
            doc="make (or change) a dynamic tenant, kept in the state file; the same table again "
                "changes nothing"),
    Message("tenant_remove", ADMIN, {"tenant": NAME}, reply={"tenant": TEXT, "sessions_ended": COUNT},
            doc="remove a dynamic tenant: its sessions end, its executors stop, its directory goes"),
    Message("tenant_list", ADMIN, {},
            reply={"tenants": F(dict, doc="name -> source (file or dynamic), served, table"),
                   "state": MAP}),

    # -- control: broker -> executor ---------------------------------------------------------
    Message("session_add", CONTROL, {"session": SESSION}),
    Message("session_end", CONTROL, {"session": SESSION}),
    Message("set_quota", CONTROL, {"memory": F(int, lo=0, hi=1 << 62)}),
    Message("shutdown", CONTROL, {}),

    # -- report: executor -> broker ----------------------------------------------------------
    Message("ready", REPORT, {"tenant": NAME, "device": NAME, "pid": F(int, lo=0, hi=I64_MAX)}),
    Message("session_added", REPORT, {"session": SESSION}),
    Message("session_ended", REPORT, {"session": SESSION}),
    Message("fatal", REPORT, {"code": F(int, lo=0, hi=I64_MAX), "error": F(str, maxlen=1000)},
            doc="a context-fatal device error: the executor exits after it"),
    Message("stats", REPORT, {"device_ns": NS, "kernels": COUNT, "memory_used": COUNT}),

    # -- compile: executor -> its compile helper (a stream socketpair, length-prefixed) ---------
    Message("build", COMPILE,
            {"source": F(str, maxlen=MODULE_SOURCE_MAX), "options": F(list, maxlen=64, items=str),
             "timeout_s": F(float, lo=0.1, hi=3600.0), "language": F(str, choices=("cuda-c", "ptx"))},
            reply={"image": F(bytes, maxlen=COMPILED_IMAGE_MAX)},
            doc="CUDA C source or PTX text to a CPU module (a shared object), built in the confined helper"),

    # -- lease: broker -> executor -----------------------------------------------------------
    Message("grant", LEASE, {"lease": F(int, lo=1, hi=U64), "quantum_ns": F(int, lo=1, hi=I64_MAX),
                             "preemptible": F(bool, required=False,
                                              doc="a latency tenant shares the device"),
                             "renewable": F(bool, required=False,
                                            doc="while uncontended, renew at the quantum's end "
                                                "instead of releasing (no limit binds the tenant)"),
                             "contended": F(bool, required=False,
                                            doc="another tenant already waits: release as usual")}),
    Message("preempt", LEASE, {"lease": F(int, lo=1, hi=U64)}),
    Message("contended", LEASE, {"lease": F(int, lo=1, hi=U64)},
            doc="another tenant wants the device: release at the quantum's end, do not renew"),

    # -- lease_report: executor -> broker ----------------------------------------------------
    Message("want", LEASE_REPORT, {}),
    Message("release", LEASE_REPORT,
            {"lease": F(int, lo=1, hi=U64), "used_ns": NS, "kernels": COUNT, "more": BOOL,
             # a preempted kernel is still running: its time so far carries to the next lease,
             # so max_kernel_seconds bounds a kernel run in slices too
             "suspended": F(bool, required=False)}),
    Message("renew", LEASE_REPORT, {"lease": F(int, lo=1, hi=U64), "used_ns": NS, "kernels": COUNT},
            doc="a renewable, uncontended lease's quantum is spent and more work is queued: the "
                "device time is charged and the lease goes on (no hand-over); the broker "
                "preempts it if someone wants the device meanwhile"),

    # -- events: broker or executor -> client ------------------------------------------------
    Message("stdout", EVENT, {"data": F(bytes)}, doc="what the session's kernels printed"),
    Message("throttled", EVENT, {"seconds": F((int, float), lo=0)},
            doc="the broker leaves this tenant's requests unread for about this long"),
    Message("executor_died", EVENT, {"device": TEXT, "code": F(int), "error": TEXT}),
    Message("session_ended", EVENT, {"code": F(int), "error": TEXT}),
]

MESSAGES: dict[tuple[str, str], Message] = {}
for _m in _M:
    if (_m.channel.name, _m.name) in MESSAGES:
        raise RuntimeError(f"message {_m.name} declared twice on {_m.channel.name}")
    MESSAGES[(_m.channel.name, _m.name)] = _m
del _m


def message(channel: Channel, name: str) -> Message:
    return MESSAGES[(channel.name, name)]


def messages(channel: Channel) -> dict[str, Message]:
    return {m.name: m for m in _M if m.channel is channel}


# name -> fields, per channel (what the receiving side checks against)
BROKER_OPS = {n: m.fields for n, m in messages(TENANT).items()}
EXECUTOR_OPS = {n: m.fields for n, m in messages(EXECUTOR).items()}
ASYNC_OPS = frozenset(m.name for m in _M if m.asynchronous)

_COMMON = {"v": F(int), "id": F(int, required=False, lo=0, hi=U64), "op": F(str, maxlen=64),
           "async": F(bool, required=False)}


# -- encoding -----------------------------------------------------------------------------
def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def envelope(**fields: Any) -> bytes:
    """The one place a message is framed: the version, then its fields."""
    return pack({"v": VERSION, **fields})


def request(op: str, req_id: int, *, asynchronous: bool = False, **fields: Any) -> bytes:
    if asynchronous:
        return envelope(id=req_id, op=op, **{"async": True}, **fields)
    return envelope(id=req_id, op=op, **fields)


def notice(op: str, **fields: Any) -> bytes:
    """A control, report, lease or lease_report message (unanswered, no id)."""
    return envelope(op=op, **fields)


def reply(req_id: int, **result: Any) -> bytes:
    return envelope(id=req_id, ok=True, **result)


def error(req_id: int, code: int, message: str, log: str = "") -> bytes:
    if log:
        return envelope(id=req_id, ok=False, code=int(code), error=message, log=log)
    return envelope(id=req_id, ok=False, code=int(code), error=message)


def error_reply(req_id: int, e: CudaError) -> bytes:
    return error(req_id, e.code, e.message, e.log)


def event(name: str, **fields: Any) -> bytes:
    return envelope(id=0, event=name, **fields)


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


# -- validation ---------------------------------------------------------------------------
def _check_field(op: str, name: str, spec: F, value: Any) -> None:
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    # bool is a subclass of int: never accept it where a number is meant.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ProtocolError(f"{op}: field '{name}' must be {spec.type_names()}, got {type(value).__name__}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or spec.lo is not None and value < spec.lo or spec.hi is not None and value > spec.hi:
            raise ProtocolError(f"{op}: field '{name}'={value} out of range [{spec.lo}, {spec.hi}]")
    if isinstance(value, (str, bytes, list, dict)):
        if spec.maxlen is not None and len(value) > spec.maxlen:
            raise ProtocolError(f"{op}: field '{name}' longer than {spec.maxlen}")
    if spec.choices is not None and value not in spec.choices:
        raise ProtocolError(f"{op}: field '{name}'={value!r} is not one of {', '.join(map(repr, spec.choices))}")
    if spec.items is not None:
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, spec.items):
                raise ProtocolError(f"{op}: field '{name}'[{i}] has type {type(item).__name__}")
            if spec.item_lo is not None or spec.item_hi is not None:
                hi = spec.item_hi[i] if isinstance(spec.item_hi, tuple) else spec.item_hi
                if spec.item_lo is not None and item < spec.item_lo or hi is not None and item > hi:
                    raise ProtocolError(f"{op}: field '{name}' {tuple(value)} outside "
                                        f"{spec.item_lo}..{spec.item_hi}")
    if spec.minlen is not None and isinstance(value, (str, bytes, list, dict)) and len(value) < spec.minlen:
        what = "items" if isinstance(value, list) else "characters" if isinstance(value, str) else "bytes"
        raise ProtocolError(f"{op}: field '{name}' needs at least {spec.minlen} {what}")


def _lookup(channel: Channel | Mapping[str, Mapping[str, F]], op: str) -> Message | None:
    if isinstance(channel, Channel):
        return MESSAGES.get((channel.name, op))
    fields = channel.get(op)        # a name -> fields table (older callers)
    if fields is None:
        return None
    for m in _M:
        if m.fields is fields and m.name == op:
            return m
    return None


def check(msg: dict[str, Any], channel: Channel | Mapping[str, Mapping[str, F]]) -> str:
    """Validate a decoded message against its declaration on `channel`; return its name.

    Raises ProtocolError (a readable reason) for a wrong version, unknown message, missing,
    ill-typed or out-of-range field, or a field the message does not have (so typos do not
    pass silently)."""
    for name, spec in _COMMON.items():
        if name in msg:
            _check_field("request", name, spec, msg[name])
        elif spec.required:
            raise ProtocolError(f"request lacks field '{name}'")
    m = _lookup(channel, msg["op"])
    answered = m.channel.answered if m is not None else (
        channel.answered if isinstance(channel, Channel) else True)
    # Requests from clients and operators are answered, so they carry an id.
    if answered and "id" not in msg:
        raise ProtocolError("request lacks field 'id'")
    if msg["v"] != VERSION:
        raise ProtocolError(f"protocol version {msg['v']} is not supported (this side speaks {VERSION})")
    op = msg["op"]
    if m is None:
        raise ProtocolError(f"unknown operation '{op[:64]}'")
    for name, spec in m.fields.items():
        if name in msg:
            _check_field(op, name, spec, msg[name])
        elif spec.required:
            raise ProtocolError(f"{op}: missing field '{name}'")
    extra = set(msg) - set(m.fields) - set(_COMMON)
    if extra:
        raise ProtocolError(f"{op}: unknown field(s) {sorted(str(x)[:32] for x in extra)[:8]}")
    if msg.get("async") and not m.asynchronous:
        raise ProtocolError(f"{op} cannot be sent asynchronously")
    if m.rule is not None:
        why = m.rule(msg)
        if why:
            raise ProtocolError(f"{op}: {why}")
    return op


check_request = check   # the name older code uses


def decode(frame: bytes, channel: Channel | Mapping[str, Mapping[str, F]],
           max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[str, dict[str, Any]]:
    """unpack + check: (name, message), or ProtocolError saying what is wrong."""
    msg = unpack(frame, max_bytes)
    return check(msg, channel), msg


def handler_for(receiver: Any, channel: Channel, frame: bytes) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Decode and check one unanswered message (control, report, lease, lease report) and
    find its one handler on `receiver`: (bound handler, message), or ProtocolError."""
    op, msg = decode(frame, channel, channel.max_bytes)
    return getattr(receiver, handler_name(message(channel, op))), msg


def check_reply(channel: Channel, op: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Validate a success reply to `op` against its declared reply fields; return it."""
    m = MESSAGES.get((channel.name, op))
    if m is None or m.reply is None:
        raise ProtocolError(f"no reply is declared for {channel.name} message {op}")
    for name, spec in m.reply.items():
        if name in msg:
            _check_field(f"{op} reply", name, spec, msg[name])
        elif spec.required:
            raise ProtocolError(f"{op} reply: missing field '{name}'")
    extra = set(msg) - set(m.reply) - {"v", "id", "ok"}
    if extra:
        raise ProtocolError(f"{op} reply: unknown field(s) {sorted(str(x)[:32] for x in extra)[:8]}")
    return msg


def raise_for_reply(msg: dict[str, Any]) -> None:
    """An error reply as the exception it stands for (nothing for a success reply)."""
    if msg.get("ok") is True:
        return
    code = msg.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        code = CUresult.CUDA_ERROR_UNKNOWN
    raise error_from_code(code, str(msg.get("error", "")), log=str(msg.get("log", "")))


def check_event(msg: dict[str, Any]) -> str | None:
    """The name of a well-formed event, or None for anything that is not one."""
    name = msg.get("event")
    m = MESSAGES.get((EVENT.name, name)) if isinstance(name, str) else None
    if m is None:
        return None
    try:
        for fname, spec in m.fields.items():
            if fname in msg:
                _check_field(f"{name} event", fname, spec, msg[fname])
            elif spec.required:
                return None
    except ProtocolError:
        return None
    return name


def request_id_of(msg: Any) -> int:
    """Best-effort id of a (possibly malformed) request, so even a refusal can be matched."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= U64:
            return rid
    return 0



# -- where sockets live -------------------------------------------------------------------
def tenant_dir(runtime_dir: str, tenant: str) -> str:
    return f"{runtime_dir}/tenants/{tenant}"


def broker_socket_path(runtime_dir: str, tenant: str) -> str:
    return f"{tenant_dir(runtime_dir, tenant)}/broker.sock"


def executor_socket_path(runtime_dir: str, tenant: str, device: str) -> str:
    return f"{tenant_dir(runtime_dir, tenant)}/{device}.sock"


# -- export -------------------------------------------------------------------------------
def _field_json(spec: F) -> dict[str, Any]:
    out: dict[str, Any] = {"type": spec.type_names().split("/"), "required": spec.required}
    for k in ("lo", "hi", "maxlen", "minlen", "item_lo", "item_hi", "choices", "doc"):
        v = getattr(spec, k)
        if v not in (None, ""):
            out[k] = list(v) if isinstance(v, tuple) else v
    if spec.items is not None:
        items = spec.items if isinstance(spec.items, tuple) else (spec.items,)
        out["items"] = [t.__name__ for t in items]
    return out


def export() -> dict[str, Any]:
    """The whole protocol as plain data (what `--json` prints)."""
    return {
        "version": VERSION,
        "envelope": {name: _field_json(spec) for name, spec in _COMMON.items()},
        "channels": [{**dataclasses.asdict(c)} for c in CHANNELS],
        "messages": [{"name": m.name, "channel": m.channel.name, "asynchronous": m.asynchronous,
                      "doc": m.doc, "handler": handler_name(m),
                      "fields": {k: _field_json(v) for k, v in m.fields.items()},
                      "reply": None if m.reply is None else {k: _field_json(v) for k, v in m.reply.items()},
                      "rule": m.rule.__name__.lstrip("_") if m.rule else None}
                     for m in _M],
        "limits": {"inline_max": INLINE_MAX, "default_staging_bytes": DEFAULT_STAGING_BYTES,
                   "batch_max_ops": BATCH_MAX_OPS, "batch_max_bytes": BATCH_MAX_BYTES,
                   "batch_delay_us": int(BATCH_DELAY_S * 1e6), "vmm_granularity": VMM_GRANULARITY,
                   "launch": dataclasses.asdict(LAUNCH)},
        "codes": {c.name: int(c) for c in CUresult},
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--json"]):
        print("usage: kubecash-protocol [--json]", file=sys.stderr)
        return 2
    if args == ["--json"]:
        json.dump(export(), sys.stdout, indent=1)
        print()
        return 0
    for c in CHANNELS:
        print(f"{c.name}: {c.sender} -> {c.receiver} (handlers {c.handler_prefix}<name>)")
        for m in messages(c).values():
            fields = ", ".join(f"{k}{'' if v.required else '?'}: {v.type_names()}" for k, v in m.fields.items())
            tail = " [async]" if m.asynchronous else ""
            print(f"  {m.name}({fields}){tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
