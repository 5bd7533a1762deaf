"""Protocol fuzzing against a real broker and a real executor. Run by hand:

    .venv/bin/python bench/fuzz.py [--messages 100000] [--seed N] [--timeout 10]

Sends random and mutated messages -- random bytes, truncated and bit-flipped MessagePack,
wrong types, huge length headers, deep nesting, unknown operations, valid operations with
hostile values (forged handles, huge or negative numbers, wrong-typed list items, enormous
dims), multi-frame messages, oversized frames -- alternately to a tenant's broker socket and
to that tenant's executor socket (with a real session token), and checks each one:

- answered: a reply arrives that is a MessagePack map {v: 1, id, ok: bool} (an error also
  carries an int code and a non-empty message), with the id the server can read from the
  request (0 when it cannot), and is not an "internal error" (a handler bug);
- or cleanly dropped, which the protocol allows in exactly two cases: an asynchronous
  request ("async": true) that was accepted, or failed and keeps its error for the next
  synchronization; and a frame over the socket's size limit, which ZeroMQ discards together
  with the connection (the fuzzer then reconnects). Either way the same connection (or the
  new one) must answer a probe request sent right after it.

Nothing else counts as a drop: a missing reply or probe answer within --timeout is a hang.
After every --check-every messages and at the end: the broker and the executor processes
are alive (the executor is the same process as at the start), and a real client (a session
opened before the run, holding its buffers and kernel) copies, launches and reads back
correct results; at the end a fresh client connects and does the same. The last line is
`N passed, M failed` (one verdict per message, plus one per health check).
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from typing import Any

import msgpack
import numpy as np
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import kubecash.client as kc  # noqa: E402
from kubecash.client import protocol as P  # noqa: E402
from kubecash.client.errors import code_name  # noqa: E402
from kubecash.client.limits import BROKER_MESSAGE_MAX  # noqa: E402

VECADD = r"""
extern "C" __global__ void vadd(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
"""
PROBE_BASE = 1 << 62            # probe ids; fuzzed ids stay below unless mutated
BROKER_FRAME_MAX = BROKER_MESSAGE_MAX   # the broker's tenant sockets (16 KiB)
MESSAGE_MAX = 1 << 20           # max_message_bytes of the fuzzed broker: its executors' cap too


# -- checking one exchange ------------------------------------------------------------------
def reply_problem(raw: bytes) -> str | None:
    """Why `raw` is not a well-formed reply or event (None when it is)."""
    try:
        r = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        return f"reply is not MessagePack: {e}"
    if not isinstance(r, dict) or r.get("v") != P.VERSION or not isinstance(r.get("id"), int):
        return f"reply is not a {{v, id}} map: {r!r:.200}"
    if "ok" not in r and "event" in r:      # unsolicited event (a reply may carry an "event" handle)
        return None if isinstance(r["event"], str) and r["id"] == 0 else f"bad event {r!r:.200}"
    if not isinstance(r.get("ok"), bool):
        return f"reply without ok: {r!r:.200}"
    if not r["ok"]:
        if not isinstance(r.get("code"), int) or not isinstance(r.get("error"), str) or not r["error"]:
            return f"error reply without code or message: {r!r:.200}"
        if "internal error" in r["error"]:
            return f"a handler failed: {r['error'][:200]}"
    return None


class Target:
    """One socket under fuzz: a DEALER to a broker or executor ROUTER, plus its probe."""

    def __init__(self, ctx: zmq.Context, address: str, frame_max: int, probe: dict, timeout: float,
                 counts: collections.Counter | None = None, answers_oversize: bool = False):
        self.ctx, self.address, self.frame_max = ctx, address, frame_max
        # The broker's gate discards an oversized frame and answers (id 0) on the same
        # connection; an executor's ZeroMQ drops it with the connection.
        self.answers_oversize = answers_oversize
        self.probe, self.timeout = probe, timeout
        self.probes = 0
        self.sock: zmq.Socket | None = None
        self.counts = counts if counts is not None else collections.Counter()
        self._connect()

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def exchange(self, frames: list[bytes]) -> str | None:
        """Send one (possibly hostile) message; None when it was handled properly."""
        oversize = any(len(f) > self.frame_max for f in frames)
        want_id: int | None = 0
        optional = False
        if len(frames) == 1 and not oversize:
            try:
                msg = P.unpack(frames[0], self.frame_max)
            except Exception:
                msg = None
            want_id = P.request_id_of(msg)
            optional = isinstance(msg, dict) and msg.get("async") is True
        self.sock.send_multipart(frames)
        if oversize and not self.answers_oversize:
            # ZeroMQ discards it and the connection with it: reconnect, then the probe below
            # checks the server still serves.
            time.sleep(0.01)
            self._connect()
            want_id, optional = None, True
        self.probes += 1
        pid = PROBE_BASE + self.probes
        self.sock.send(P.pack({**self.probe, "id": pid}))
        got_answer, got_probe = False, False
        deadline = time.monotonic() + self.timeout
        while not (got_probe and (got_answer or optional)):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                if not got_probe:
                    return "hang: the probe after it was not answered"
                return "hang: no reply to it"
            raw = self.sock.recv()
            problem = reply_problem(raw)
            if problem:
                return problem
            r = msgpack.unpackb(raw, raw=False)
            if r.get("id") == pid:
                if not r.get("ok"):
                    return f"the probe failed: {r.get('error')}"
                got_probe = True
            elif want_id is not None and r.get("id") == want_id and "ok" in r:
                got_answer = True
                self.counts["answer ok" if r["ok"] else f"answer {code_name(r['code'])}"] += 1
            # anything else: a late reply to an earlier request or an event (checked above)
        if got_answer:
            self.counts["answered"] += 1
        else:
            self.counts["dropped-oversize" if oversize else "dropped-async"] += 1
        return None


# -- generating messages ------------------------------------------------------------------
class Generator:
    """Random and mutated messages for one operation table, using real handles sometimes."""

    def __init__(self, rng: random.Random, table: dict, token: bytes, real: dict[str, list[int]]):
        self.rng, self.table, self.token, self.real = rng, table, token, real
        self.ids = 0

    def _int(self) -> int:
        r = self.rng
        return r.choice([0, 1, -1, 2, 3, 7, 255, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32,
                         2**40, 2**48, 2**48 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63),
                         r.randrange(-2**64 + 1, 2**64), r.randrange(0, 1 << 20)])

    def _junk(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(12 if depth < 3 else 8)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind in (2, 3):
            return self._int()
        if kind == 4:
            return r.choice([0.0, -1.5, 1e308, float("inf"), float("nan")])
        if kind == 5:
            return r.choice(["", "x", "../../bob/shm/cpu0-0.staging", "\x00", "é" * 50,
                             "a" * r.randrange(0, 5000)])
        if kind == 6:
            return r.randbytes(r.choice([0, 1, 4, 8, 16, 64, 4097]))
        if kind == 7:
            return self.token if r.random() < 0.7 else r.randbytes(16)
        if kind in (8, 9):
            return [self._junk(depth + 1) for _ in range(r.choice([0, 1, 2, 3, 4, 70]))]
        return {self._junk_key(): self._junk(depth + 1) for _ in range(r.randrange(0, 4))}

    def _junk_key(self) -> Any:
        return self.rng.choice(["v", "id", "op", "session", "size", "x", "", "a" * 100])

    def _value(self, name: str, spec: P.F) -> Any:
        r = self.rng
        if r.random() < 0.12:
            return self._junk()
        if name == "session":
            return self.token if r.random() < 0.9 else r.randbytes(r.choice([0, 16, 64, 65]))
        if name in ("ptr", "dst", "src") and self.real["ptr"] and r.random() < 0.6:
            return r.choice(self.real["ptr"]) + r.choice([0, 0, 0, 1, 4095, 4096, -1, 2**20])
        if name == "function" and self.real["function"] and r.random() < 0.5:
            return r.choice(self.real["function"])
        if name == "module" and self.real["module"] and r.random() < 0.5:
            return r.choice(self.real["module"])
        table = "event" if name in ("start", "end") else name
        if name in ("stream", "event", "start", "end") and self.real[table] and r.random() < 0.5:
            return r.choice(self.real[table])
        if name in ("grid", "block"):
            return [r.choice([1, 1, 2, 0, -1, 1024, 1025, 65535, 65536, 2**31 - 1, 2**31, 2**64 - 1,
                              2**70, "1", 1.0, None]) for _ in range(r.choice([0, 1, 2, 3, 3, 3, 4]))]
        if name == "args":
            return [r.choice([b"\0" * 8, b"\0" * 4, b"", b"x" * 100, 5, "s", None])
                    for _ in range(r.choice([0, 1, 3, 4, 4, 5, 5000]))]
        if name == "options":
            return r.choice([[], ["-O3"], ["-I../../bob"], ["-include", "/etc/passwd"], [1],
                             ["-D", "X=1"], ["-o", "/tmp/x"], ["--std=c++99"]])
        if name == "source":
            return r.choice([VECADD, VECADD, '#include "../../bob/shm/x"\n', "__global__",
                             '#include "/etc/passwd"\n', ""])
        if name == "image":
            return r.choice([b"", b"\x7fELF", r.randbytes(100)])
        if name == "kind":
            return r.choice(["cuda-c", "ptx", "cubin", "fatbin", "elf", "", "cuda-c" * 10])
        if name == "data":
            return r.randbytes(r.choice([0, 1, 8, 16, 4096, 65536, 65537]))
        if name == "device":
            return r.choice(["cpu0", "cpu1", "gpu0", "../bob/cpu0", "", "cpu0\x00", "x" * 65])
        types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
        if int in types:
            return self._int()
        if str in types:
            return r.choice(["", "vadd", "vsub", "x" * 5000, "../x"])
        if bytes in types:
            return r.randbytes(r.choice([0, 8, 64]))
        if bool in types:
            return r.random() < 0.5
        return self._junk()

    def request(self) -> dict:
        r = self.rng
        self.ids += 1
        op = r.choice(list(self.table)) if r.random() < 0.9 else r.choice(
            ["", "rm -rf /", "op" * 40, "__init__", "_hello", "shutdown", "session_add"])
        msg: dict[Any, Any] = {"v": P.VERSION, "id": self.ids, "op": op}
        for name, spec in self.table.get(op, {}).items():
            if spec.required or r.random() < 0.5:
                if r.random() < 0.05:
                    continue                              # a missing field
                msg[name] = self._value(name, spec)
        if op in P.ASYNC_OPS and r.random() < 0.5 or r.random() < 0.03:
            msg["async"] = True if r.random() < 0.9 else r.choice([1, "yes", None])
        if r.random() < 0.05:
            msg[self._junk_key() if r.random() < 0.5 else "extra"] = self._junk()
        if r.random() < 0.05:
            msg["v"] = r.choice([0, 2, "1", None, 1.0, True])
        if r.random() < 0.05:
            msg["id"] = r.choice([-1, 2**64, "7", None, 1.5, True, 0])
        if r.random() < 0.03:
            del msg["op"]
        # Launches that would really run: only with a valid pointer set, or the executor
        # would (correctly) crash on a wild pointer -- that is the tenant hurting itself.
        if op == "launch" and msg.get("function") in self.real["function"] and \
                isinstance(msg.get("args"), list) and len(msg["args"]) == 4 and \
                all(isinstance(a, bytes) for a in msg["args"]) and \
                [len(a) for a in msg["args"]] == [8, 8, 8, 4]:
            p = self.real["ptr"][0]
            msg["args"] = [p.to_bytes(8, "little")] * 3 + [r.choice([0, 1, 16]).to_bytes(4, "little")]
            if isinstance(msg.get("grid"), list) and all(isinstance(d, int) for d in msg["grid"]) \
                    and all(1 <= d <= 65535 for d in msg["grid"]):
                msg["grid"] = [1, 1, 1]                 # valid dims: keep the run short
        # Never end the session under fuzz from inside (that is a valid request, not a fault).
        if msg.get("op") == "close" and msg.get("session") == self.token:
            msg["session"] = b"forged-token----"
        return msg

    @staticmethod
    def _pack(obj: Any) -> bytes:
        try:
            return msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):   # e.g. an int past 64 bits
            return msgpack.packb({"v": 1, "id": 1, "op": "unpackable"}, use_bin_type=True)

    def message(self) -> list[bytes]:
        """One message as frames, of a randomly chosen kind."""
        r = self.rng
        kind = r.random()
        if kind < 0.45:
            return [self._pack(self.request())]
        if kind < 0.60:                                   # mutated bytes of a valid request
            b = bytearray(self._pack(self.request()))
            how = r.randrange(4)
            if how == 0 and len(b) > 1:
                b = b[:r.randrange(1, len(b))]            # truncated
            elif how == 1:
                for _ in range(r.randrange(1, 4)):
                    b[r.randrange(len(b))] = r.randrange(256)  # flipped bytes
            elif how == 2:
                b += r.randbytes(r.randrange(1, 16))      # trailing junk
            else:
                i = r.randrange(len(b))
                b[i:i] = r.randbytes(r.randrange(1, 8))   # inserted junk
            return [bytes(b)]
        if kind < 0.68:
            return [r.randbytes(r.choice([0, 1, 2, 5, 17, 100, 1000]))]
        if kind < 0.74:                                   # huge length headers
            head = r.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xda", b"\xc5", b"\xde", b"\xdc"])
            size = 4 if head in (b"\xdb", b"\xc6", b"\xdd", b"\xdf") else 2
            return [head + b"\xff" * size + r.randbytes(r.randrange(0, 32))]
        if kind < 0.78:                                   # deep nesting
            depth = r.choice([100, 1000, 5000, 100000])
            return [r.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"]
        if kind < 0.86:                                   # any MessagePack value
            return [self._pack(self._junk())]
        if kind < 0.94:                                   # several frames
            return [self._pack(self.request()) if r.random() < 0.5
                    else r.randbytes(r.randrange(0, 64)) for _ in range(r.randrange(2, 6))]
        if kind < 0.995:                                  # a request with a big payload field
            m = self.request()
            m[r.choice(["source", "data", "name", "x"])] = "y" * r.choice([70000, 300000, 900000])
            return [self._pack(m)]
        return [b"\x00" * r.choice([(1 << 20) + 1, (2 << 20)])]   # past the frame caps


# -- the run ---------------------------------------------------------------------------------
class Health:
    """A client opened before the fuzzing that checks copies and launches still work."""

    def __init__(self, broker, tenant: str):
        self.s = broker.connect(tenant) if hasattr(broker, "connect") else kc.connect(broker.address(tenant))
        self.dev = self.s.device("cpu0")
        self.n = 1024
        self.a = self.dev.allocate(self.n * 4)
        self.c = self.dev.allocate(self.n * 4)
        self.k = self.dev.load_module(VECADD).get_kernel("vadd")

    def check(self, round_: int) -> str | None:
        try:
            x = np.arange(self.n, dtype=np.float32) + round_
            self.a.copy_from(x)
            self.dev.launch(self.k, (self.n // 256,), (256,), [self.a, self.a, self.c, self.n])
            out = self.c.copy_to(np.empty(self.n, np.float32))
            if not np.array_equal(out, 2 * x):
                return "wrong result"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    def close(self) -> None:
        self.s.close()


def connect_retry(broker, tenant: str, wait_s: float = 30.0) -> kc.Session:
    """kc.connect, waiting while fuzz-opened sessions fill max_sessions_per_tenant (they
    expire after the heartbeat timeout)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return kc.connect(broker.address(tenant))
        except kc.CudaError as e:
            if "max_sessions_per_tenant" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def fresh_client_check(broker, tenant: str, wait_s: float) -> str | None:
    """A brand-new session (after any fuzz-opened ones have expired) allocates and launches."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with kc.connect(broker.address(tenant)) as s:
                dev = s.device("cpu0")
                n = 512
                a, c = dev.allocate(n * 4), dev.allocate(n * 4)
                x = np.arange(n, dtype=np.float32)
                a.copy_from(x)
                dev.launch(dev.load_module(VECADD).get_kernel("vadd"), (2,), (256,), [a, a, c, n])
                return None if np.array_equal(c.copy_to(np.empty(n, np.float32)), 2 * x) else "wrong result"
        except kc.CudaError as e:
            if "max_sessions_per_tenant" in str(e) and time.monotonic() < deadline:
                time.sleep(0.5)                       # hello floods: wait for them to expire
                continue
            return f"{type(e).__name__}: {e}"
        except Exception as e:
            return f"{type(e).__name__}: {e}"


class FuzzRun:
    """Broker and executor targets for one tenant of a running broker, and their checks."""

    def __init__(self, broker, tenant: str, seed: int, timeout: float, log=print,
                 max_message_bytes: int = P.MAX_MESSAGE_BYTES):
        self.broker, self.tenant, self.log = broker, tenant, log
        self.max_message_bytes = max_message_bytes
        self.rng = random.Random(seed)
        self.ctx = zmq.Context()
        self.health = Health(broker, tenant)
        self.timeout = timeout
        self.failures: list[str] = []
        self.passed = 0
        self.counts = {"broker": collections.Counter(), "executor": collections.Counter()}
        self._open_fuzz_session()

    def _open_fuzz_session(self) -> None:
        """The session whose real token and handles the fuzzer uses (reopened now and then,
        so what the fuzz allocates does not fill the quota)."""
        if getattr(self, "fs", None) is not None:
            for t in (self.bt, self.et):
                t.close()
            self.fs.close()
        self.fs = connect_retry(self.broker, self.tenant)
        d = self.fs.device("cpu0")
        bufs = [d.allocate(4096) for _ in range(3)]
        host = d.allocate_host(4096)
        mod = d.load_module(VECADD)
        k = mod.get_kernel("vadd")
        st, ev = d.create_stream(), d.create_event()
        self._keep = (bufs, host, mod, k, st, ev)
        real = {"ptr": [b.ptr for b in bufs] + [host.ptr], "function": [k.handle],
                "module": [mod.handle], "stream": [0, st.handle], "event": [ev.handle]}
        tok = self.fs.token
        exec_addr = f"ipc://{P.executor_socket_path(self.broker.runtime_dir, self.tenant, 'cpu0')}"
        self.bt = Target(self.ctx, self.broker.address(self.tenant),
                         min(BROKER_FRAME_MAX, self.max_message_bytes),
                         {"v": 1, "op": "heartbeat", "session": tok}, self.timeout,
                         self.counts["broker"], answers_oversize=True)
        self.et = Target(self.ctx, exec_addr, self.max_message_bytes,
                         {"v": 1, "op": "mem_info", "session": tok}, self.timeout,
                         self.counts["executor"])
        self.bgen = Generator(self.rng, P.BROKER_OPS, tok, real)
        self.egen = Generator(self.rng, P.EXECUTOR_OPS, tok, real)
        self.executor_pid = self.fs.status()["devices"]["cpu0"]["pid"]

    def one(self, target: str) -> None:
        t, g = (self.bt, self.bgen) if target == "broker" else (self.et, self.egen)
        frames = g.message()
        problem = t.exchange(frames)
        if problem:
            self.failures.append(f"{target}: {problem} -- sent {[f[:80] for f in frames]!r:.300}")
            if len(self.failures) <= 20:
                self.log(f"  FAIL  {self.failures[-1]}")
            t._connect()               # a fresh connection: one failure must not cascade
        else:
            self.passed += 1

    def processes_ok(self) -> str | None:
        if not self.broker.alive():
            return "the broker died"
        try:
            os.kill(self.executor_pid, 0)
        except ProcessLookupError:
            return f"the executor (pid {self.executor_pid}) died"
        st = self.health.s.status()
        if st["devices"]["cpu0"]["pid"] != self.executor_pid:
            return "the executor was replaced"
        return None

    def health_check(self, round_: int) -> bool:
        problem = self.processes_ok() or self.health.check(round_)
        if problem:
            self.failures.append(f"health check {round_}: {problem}")
            self.log(f"  FAIL  health check {round_}: {problem}")
            return False
        self.passed += 1
        return True

    def close(self) -> None:
        for t in (self.bt, self.et):
            t.close()
        self.fs.close()
        self.health.close()
        self.ctx.term()


# -- raw ZMTP streams at the broker's own parser (broker/gate.py) ------------------------------
ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def _zframe(flags: int, body: bytes, size: int | None = None) -> bytes:
    n = len(body) if size is None else size
    if flags & 2 or n > 255:
        return bytes([flags | 2]) + n.to_bytes(8, "big") + body
    return bytes([flags, n]) + body


def zmtp_stream(rng: random.Random, gen: Generator) -> list[bytes]:
    """One connection's bytes: a greeting and READY (sometimes mangled or missing), frames
    with any flags, sizes that lie, commands, multi-frame runs, junk; a request last."""
    out = []
    start = rng.choice([0, 1, 2, 3, 3, 3, 3])
    if start >= 1:
        g = bytearray(ZMTP_GREETING)
        if start == 2:
            for _ in range(rng.randint(1, 4)):
                g[rng.randrange(64)] = rng.randrange(256)
        out.append(bytes(g))
    if start >= 3:
        kind = rng.choice([b"DEALER"] * 5 + [b"PUB", b"REQ", b""])
        out.append(_zframe(4, b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + kind))
    for _ in range(rng.randint(0, 6)):
        k = rng.randrange(8)
        if k == 0:
            out.append(rng.randbytes(rng.randrange(200)))
        elif k == 1:
            out.append(_zframe(rng.randrange(256), rng.randbytes(rng.randrange(100))))
        elif k == 2:
            out.append(_zframe(rng.randrange(4), rng.randbytes(rng.randrange(40)),
                               rng.choice([0, 1, 255, 256, 16385, 2**32, 2**63 - 1, 2**64 - 1])))
        elif k == 3:
            name = rng.choice([b"PING", b"PONG", b"READY", b"ERROR", b"SUBSCRIBE", b"X" * 255])
            out.append(_zframe(4, bytes([len(name)]) + name + rng.randbytes(rng.randrange(40))))
        elif k == 4:
            out += [_zframe(1, rng.randbytes(rng.randrange(30))) for _ in range(rng.randint(1, 5))]
        else:
            out.append(_zframe(0, _small_request(gen)))
    out.append(_zframe(0, _small_request(gen)))
    return out


def _small_request(gen: Generator) -> bytes:
    """One of the generator's messages up to the broker's 16 KiB: framing thrown off by junk
    can turn a larger one into thousands of tiny requests, paced at the tenant's request rate
    for longer than a hang timeout (the DEALER phase sends the big ones)."""
    while True:
        frame = gen.message()[0]
        if len(frame) <= BROKER_FRAME_MAX:
            return frame


ZMTP_PROBE_ID = 777_777


def _zmtp_replies(got: bytes) -> tuple[str | None, int, bool]:
    """Check what the broker sent on a raw connection: (problem, replies, probe answered)."""
    if len(got) < 64:
        return (None if got[:1] in (b"", b"\xff") else f"bad greeting {got[:64]!r}"), 0, False
    if got[0] != 0xFF or got[10] != 3:
        return f"bad greeting {got[:64]!r}", 0, False
    i, replies, probed = 64, 0, False
    while i + 2 <= len(got):
        flags = got[i]
        size = int.from_bytes(got[i + 1:i + 9], "big") if flags & 2 else got[i + 1]
        head = 9 if flags & 2 else 2
        body = got[i + head:i + head + size]
        if len(body) < size:
            break                              # the rest is still on its way
        if not flags & 4:
            problem = reply_problem(body)
            if problem:
                return problem, replies, probed
            replies += 1
            probed = probed or msgpack.unpackb(body, raw=False).get("id") == ZMTP_PROBE_ID
        i += head + size
    return None, replies, probed


def zmtp_exchange(path: str, chunks: list[bytes], timeout: float) -> tuple[str | None, int]:
    """Send one stream and a probe request after it. If the probe is not answered soon (the
    stream may have left the parser inside a frame it declared huge), half-close: the broker
    must then close its side within `timeout`. Every frame that comes back after the greeting
    must be a command or a well-formed reply. Returns (problem, replies checked)."""
    import socket as so
    probe = _zframe(0, msgpack.packb({"v": 1, "id": ZMTP_PROBE_ID, "op": "heartbeat",
                                      "session": b"\x00" * 16}))
    c = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    got, closed = b"", False
    try:
        c.settimeout(timeout)
        c.connect(path)
        try:
            for ch in chunks + [probe]:
                c.sendall(ch)
        except OSError:
            pass                              # it hung up already: allowed
        deadline = time.monotonic() + 0.05
        half_closed = False
        while True:
            problem, replies, probed = _zmtp_replies(got)
            if problem or probed or closed:
                return problem, replies
            left = deadline - time.monotonic()
            if left <= 0:
                if half_closed:
                    return "hang: the broker neither answered nor closed the connection", replies
                half_closed = True
                try:
                    c.shutdown(so.SHUT_WR)    # the broker sees the end and closes its side
                except OSError:
                    pass
                deadline = time.monotonic() + timeout
                continue
            c.settimeout(left)
            try:
                chunk = c.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                got += chunk
            else:
                closed = True
    finally:
        c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000, help="messages in all (half each)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a hang is declared")
    ap.add_argument("--check-every", type=int, default=5000)
    ap.add_argument("--recycle-every", type=int, default=5000,
                    help="messages between reopening the fuzzed session")
    ap.add_argument("--zmtp-streams", type=int, default=10_000,
                    help="raw ZMTP byte streams sent at the broker's own parser afterwards")
    a = ap.parse_args(argv)
    from kubecash.broker.local import LocalBroker
    print(f"fuzz: {a.messages} messages, seed {a.seed}, hang timeout {a.timeout:g} s", flush=True)
    broker = LocalBroker({"alice": {"memory": "1GiB"}, "bob": {"memory": "64MiB"}},
                         log_level="WARNING", heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0,
                         executor_threads=2, max_message_bytes=MESSAGE_MAX)
    run = None
    t0 = time.monotonic()
    try:
        run = FuzzRun(broker, "alice", a.seed, a.timeout, max_message_bytes=MESSAGE_MAX)
        per = {"broker": 0, "executor": 0}
        for i in range(a.messages):
            target = "broker" if i % 2 == 0 else "executor"
            run.one(target)
            per[target] += 1
            if (i + 1) % a.recycle_every == 0:
                run._open_fuzz_session()
            if (i + 1) % a.check_every == 0:
                run.health_check(i + 1)
                el = time.monotonic() - t0
                print(f"  {i + 1} messages, {el:.0f} s, {(i + 1) / el:.0f} msg/s, "
                      f"{len(run.failures)} failures", flush=True)
        elapsed = time.monotonic() - t0
        t1 = time.monotonic()
        path = broker.socket_path("alice")
        streams = replies = 0
        for i in range(a.zmtp_streams):
            chunks = zmtp_stream(run.rng, run.bgen)
            problem, n = zmtp_exchange(path, chunks, a.timeout)
            streams += 1
            replies += n
            # the broker still answers on an ordinary connection
            probe = problem or run.bt.exchange([P.pack({**run.bt.probe, "id": 7})])
            if probe:
                run.failures.append(f"zmtp stream {i}: {probe} -- sent {b''.join(chunks)[:300]!r}")
                if len(run.failures) <= 20:
                    print(f"  FAIL  {run.failures[-1]}", flush=True)
                run.bt._connect()
            else:
                run.passed += 1
        if a.zmtp_streams:
            zs = time.monotonic() - t1
            print(f"raw ZMTP streams: {streams} in {zs:.1f} s, {replies} replies checked", flush=True)
        run.health_check(a.messages + 1)
        problem = fresh_client_check(broker, "alice", 30) or (None if broker.alive() else "the broker died")
        if problem:
            run.failures.append(f"final fresh client: {problem}")
            print(f"  FAIL  final fresh client: {problem}")
        else:
            run.passed += 1
        hangs = sum("hang" in f for f in run.failures)
        crashes = sum("died" in f or "replaced" in f for f in run.failures)
        print(f"messages: {a.messages} ({per['broker']} to the broker, {per['executor']} to the "
              f"executor) in {elapsed:.1f} s = {a.messages / elapsed:.0f} msg/s")
        for target, c in run.counts.items():
            print(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
        print(f"crashes: {crashes}, hangs: {hangs}, other failures: {len(run.failures) - hangs - crashes}")
        print(f"{run.passed} passed, {len(run.failures)} failed")
        return 0 if not run.failures else 1
    finally:
        if run is not None:
            run.close()
        broker.close()


if __name__ == "__main__":
    sys.exit(main())
