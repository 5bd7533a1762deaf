"""Soak test: many real client processes doing random work against one broker for a long time,
with random SIGKILLs. Run by hand:

    .venv/bin/python bench/soak.py [--clients 100] [--minutes 10] [--tenants 4] [--kill-rate 0.2]

A real broker (LocalBroker, CPU backend) serves --tenants tenants; --clients client processes
(spread round robin over the tenants) each loop over random operations, every one checked:
allocate random sizes and copy random data in (inline and through the staging segment), read
it back whole or in part, overwrite and fill parts, free; launch real kernels (an int a*x+b,
a __shared__/__syncthreads reduction with atomicAdd, a zero-copy kernel on pinned host memory)
on the default stream or on a stream with events, and check their results; allocate, hold
and free pinned host buffers (shared-memory segments); load and unload modules (the kernel
cache makes that a dlopen); query mem_info; now and then close the session and open a new
one, or exit cleanly. A client reports every unexpected error or wrong result as an `E` line
in its report file and carries on with a fresh session.

The driver keeps --clients processes running: it SIGKILLs random clients at --kill-rate per
second (Poisson) and starts a replacement for every client that ends (killed or exited).
Every --sample-s it records the broker's RSS, each executor's RSS (pids from brokerctl
status), sessions, memory_used per tenant and the shared-memory files in the tenants'
shm/ directories (a file seen for longer than heartbeat_timeout_s + 10 s is *stale*: nothing
legitimate keeps a name that long, the client unlinks it once mapped), and prints one line.

At the end every client gets SIGTERM (finishes its operation, closes its session, exits 0),
the driver waits for the broker to reclaim everything (sessions 0, memory_used 0, executors
gone), counts the segments left, and checks that a fresh client still does a full round of
work. RSS growth compares the median over a steady-state baseline window (10-20 % of the run,
minutes 1-2 of 10, after warm-up) with the median over the last 10 % (the last minute).
Executors live as long as their tenant has a session; with many clients per tenant they
normally live the whole run. Growth is computed per executor process present in both windows
and summed; an executor replaced in between is listed and left out (a fresh process says
nothing about growth). An executor's RSS includes what it holds for its tenant: the
allocations in use (memory_used) and the shared-memory segments it maps (staging, pinned host
buffers), which rise and fall with what the clients hold at that moment. Its *own* memory is
RSS less those two; that is what must not grow. Both are printed.

Verdicts: broker RSS growth <= 5 %; executors' own memory growth <= 5 %; no stale segments during
the run; 0 segments left at the end; 0 client errors (wrong results, unexpected exceptions,
crashes, hangs); no executor ended uncleanly; broker alive and serving; everything
reclaimed. The last line is `N passed, M failed`.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

DEVICE = "cpu0"
KERNELS = {
    "axpb": r"""
extern "C" __global__ void axpb(int* y, const int* x, int a, int b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + b;
}
""",
    "bsum": r"""
extern "C" __global__ void bsum(const int* x, int* out, int n) {
    __shared__ int part[128];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    part[threadIdx.x] = i < n ? x[i] : 0;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(out, part[0]);
}
""",
    "xorb": r"""
extern "C" __global__ void xorb(unsigned char* p, int k, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] ^= (unsigned char)k;
}
""",
}


# ======================================================================================
# The client (a subprocess: bench/soak.py --worker ...)
# ======================================================================================

class Mismatch(Exception):
    """A wrong result: the data read back or a kernel's output is not what it must be."""


class Worker:
    MAX_BUFS = 8
    MAX_HOSTS = 2

    def __init__(self, a: argparse.Namespace):
        import numpy as np
        self.np = np
        self.a = a
        self.rng = random.Random(a.seed)
        self.nrng = np.random.default_rng(a.seed)
        self.stop = threading.Event()
        self.out = open(a.report, "a", buffering=1)
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors = 0
        self.max_op_s = 0.0
        self.s = None
        self.ops = [(self.op_alloc, 4), (self.op_verify, 4), (self.op_write, 2), (self.op_fill, 1),
                    (self.op_free, 3), (self.op_axpb, 3), (self.op_bsum, 2), (self.op_host, 2),
                    (self.op_host_free, 1), (self.op_module, 1), (self.op_stream, 2),
                    (self.op_meminfo, 1), (self.op_reconnect, a.reconnect_weight),
                    (self.op_exit, a.exit_weight)]

    # -- session state ----------------------------------------------------------------------
    def open(self) -> None:
        import kubecash.client as kc
        self.s = kc.connect()
        self.dev = self.s.device(DEVICE)
        self.bufs: list[list] = []      # [Buffer, expected bytes as a uint8 array]
        self.hosts: list[list] = []     # [HostBuffer, expected contents]
        self.kern: dict[str, object] = {}
        self.mods: list = []

    def close(self) -> None:
        if self.s is not None:
            try:
                self.s.close()
            except Exception:
                pass
            self.s = None

    def kernel(self, name: str):
        if name not in self.kern:
            m = self.dev.load_module(KERNELS[name])
            self.mods.append(m)
            self.kern[name] = m.get_kernel(name)
        return self.kern[name]

    def rand_bytes(self, n: int):
        return self.nrng.integers(0, 256, n, dtype=self.np.uint8)

    def check(self, got, want, what: str) -> None:
        if not self.np.array_equal(got, want):
            bad = int(self.np.flatnonzero(got != want)[0]) if got.shape == want.shape else -1
            raise Mismatch(f"{what}: {got.size} values differ from the expected ones "
                           f"(first at {bad})")

    def size(self) -> int:
        if self.rng.random() < 0.05:            # through the staging segment (> 64 KiB inline)
            return int(2 ** self.rng.uniform(16.5, 20.5)) & ~3
        return max(4, int(2 ** self.rng.uniform(6, 16)) & ~3)

    # -- operations (each checks its own result) ---------------------------------------------
    def op_alloc(self) -> None:
        if len(self.bufs) >= self.MAX_BUFS:
            self.op_free()
        n = self.size()
        data = self.rand_bytes(n)
        b = self.dev.allocate(n)
        self.bufs.append([b, data])
        b.copy_from(data)

    def op_verify(self) -> None:
        if not self.bufs:
            return self.op_alloc()
        b, data = self.rng.choice(self.bufs)
        if self.rng.random() < 0.5:
            got = self.np.frombuffer(b.copy_to(), self.np.uint8)
            self.check(got, data, f"read back {b.size} bytes")
        else:
            off = self.rng.randrange(b.size)
            n = self.rng.randint(1, b.size - off)
            got = b.copy_to(self.np.empty(n, self.np.uint8), offset=off)
            self.check(got, data[off:off + n], f"read back {n} bytes at offset {off}")

    def op_write(self) -> None:
        if not self.bufs:
            return self.op_alloc()
        b, data = self.rng.choice(self.bufs)
        off = self.rng.randrange(b.size)
        n = self.rng.randint(1, b.size - off)
        new = self.rand_bytes(n)
        b.copy_from(new, offset=off)
        data[off:off + n] = new

    def op_fill(self) -> None:
        if not self.bufs:
            return self.op_alloc()
        b, data = self.rng.choice(self.bufs)
        v = self.rng.randrange(1 << 32)
        b.fill(v, width=4)
        data[:] = self.np.frombuffer(self.np.full(b.size // 4, v, self.np.uint32).tobytes(),
                                     self.np.uint8)
        got = self.np.frombuffer(b.copy_to(), self.np.uint8)
        self.check(got, data, f"fill of {b.size} bytes")

    def op_free(self) -> None:
        if self.bufs:
            b, _ = self.bufs.pop(self.rng.randrange(len(self.bufs)))
            b.close()

    def op_axpb(self) -> None:
        np = self.np
        n = self.rng.randint(1, 20000)
        x = self.nrng.integers(-30000, 30000, n, dtype=np.int32)
        a, c = self.rng.randint(-1000, 1000), self.rng.randint(-1000, 1000)
        X = self.dev.allocate(4 * n)
        Y = self.dev.allocate(4 * n)
        try:
            X.copy_from(x)
            self.dev.launch(self.kernel("axpb"), ((n + 127) // 128,), (128,), [Y, X, a, c, n])
            self.dev.synchronize()
            got = Y.copy_to(np.empty(n, np.int32))
            self.check(got, (x.astype(np.int64) * a + c).astype(np.int32), f"axpb over {n}")
        finally:
            X.close()
        if len(self.bufs) < self.MAX_BUFS:      # keep the result as a buffer to check later
            self.bufs.append([Y, got.view(np.uint8).copy()])
        else:
            Y.close()

    def op_bsum(self) -> None:
        np = self.np
        n = self.rng.randint(1, 30000)
        x = self.nrng.integers(-1000, 1000, n, dtype=np.int32)
        with self.dev.allocate(4 * n) as X, self.dev.allocate(4) as out:
            X.copy_from(x)
            out.fill(0, width=4)
            self.dev.launch(self.kernel("bsum"), ((n + 127) // 128,), (128,), [X, out, n])
            got = out.copy_to(np.empty(1, np.int32))   # a synchronous copy: after the kernel
            self.check(got, np.array([x.sum()], np.int32), f"bsum over {n}")

    def op_host(self) -> None:
        np = self.np
        n = self.rng.randint(1, 1 << 17)
        h = self.dev.allocate_host(n)
        keep = False
        try:
            data = self.rand_bytes(n)
            h.view[:] = data.tobytes()
            k = self.rng.randrange(1, 256)
            self.dev.launch(self.kernel("xorb"), ((n + 255) // 256,), (256,), [h, k, n])
            self.dev.synchronize()
            data ^= np.uint8(k)
            self.check(np.frombuffer(h.view, np.uint8).copy(), data, f"zero-copy kernel on {n} host bytes")
            with self.dev.allocate(n) as d:
                d.copy_from(h)                       # device <- pinned host
                self.check(np.frombuffer(d.copy_to(), np.uint8), data, f"copy of {n} host bytes")
            if len(self.hosts) < self.MAX_HOSTS and self.rng.random() < 0.5:
                self.hosts.append([h, data])
                keep = True
        finally:
            if not keep:
                h.close()

    def op_host_free(self) -> None:
        if self.hosts:
            h, data = self.hosts.pop(self.rng.randrange(len(self.hosts)))
            self.check(self.np.frombuffer(h.view, self.np.uint8).copy(), data, "held host buffer")
            h.close()

    def op_module(self) -> None:
        np = self.np
        name = self.rng.choice(["axpb", "bsum"])
        with self.dev.load_module(KERNELS[name]) as m:
            k = m.get_kernel(name)
            n = self.rng.randint(1, 512)
            x = np.arange(n, dtype=np.int32)
            with self.dev.allocate(4 * n) as X, self.dev.allocate(4 * n) as Y:
                X.copy_from(x)
                if name == "axpb":
                    self.dev.launch(k, ((n + 127) // 128,), (128,), [Y, X, 3, 1, n])
                    want = 3 * x + 1
                else:
                    Y.fill(0, width=4)
                    self.dev.launch(k, ((n + 127) // 128,), (128,), [X, Y, n])
                    want = np.zeros(n, np.int32)
                    want[0] = x.sum()
                got = Y.copy_to(np.empty(n, np.int32))
                self.check(got, want, f"{name} from a fresh module over {n}")

    def op_stream(self) -> None:
        np = self.np
        n = self.rng.randint(1, 8000)                # inline copies: async on the stream
        x = self.nrng.integers(-30000, 30000, n, dtype=np.int32)
        st = self.dev.create_stream()
        e0, e1 = self.dev.create_event(), self.dev.create_event()
        try:
            with self.dev.allocate(4 * n) as X, self.dev.allocate(4 * n) as Y:
                e0.record(st)
                X.copy_from(x, stream=st)
                self.dev.launch(self.kernel("axpb"), ((n + 127) // 128,), (128,),
                                [Y, X, 2, -5, n], stream=st)
                e1.record(st)
                st.synchronize()
                if not (e1.query() and st.query()):
                    raise Mismatch("stream work not complete after stream synchronize")
                if (e1 - e0) < 0:
                    raise Mismatch("negative elapsed time between events")
                got = Y.copy_to(np.empty(n, np.int32), stream=st)
                self.check(got, (x.astype(np.int64) * 2 - 5).astype(np.int32), f"stream axpb over {n}")
        finally:
            e0.close(), e1.close(), st.close()

    def op_meminfo(self) -> None:
        free, total = self.dev.mem_info()
        if not (0 <= free <= total and total == self.dev.total_memory):
            raise Mismatch(f"mem_info ({free}, {total}) with a quota of {self.dev.total_memory}")

    def op_reconnect(self) -> None:
        self.close()
        self.open()

    def op_exit(self) -> None:
        self.stop.set()

    # -- the loop -------------------------------------------------------------------------------
    def line(self, kind: str, **kw) -> None:
        self.out.write(kind + " " + json.dumps(kw) + "\n")

    def stats(self) -> None:
        self.line("S", ops=dict(self.counts), errors=self.errors, max_op_s=round(self.max_op_s, 3))

    def run_once(self) -> int:
        """One of each operation (the health check after the soak)."""
        self.open()
        for fn, _ in self.ops[:-2]:
            fn()
        self.close()
        return 0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        fns, weights = zip(*[(f, w) for f, w in self.ops if w > 0], strict=True)
        last_stats = 0.0
        self.line("R", pid=os.getpid())
        while not self.stop.is_set():
            if self.s is None:
                try:
                    self.open()
                except Exception as e:
                    self.errors += 1
                    self.line("E", op="connect", type=type(e).__name__, error=str(e)[:400])
                    self.stop.wait(1.0)
                    continue
            fn = self.rng.choices(fns, weights)[0]
            name = fn.__name__[3:]
            t0 = time.monotonic()
            try:
                fn()
                self.counts[name] += 1
            except Exception as e:
                self.errors += 1
                self.line("E", op=name, type=type(e).__name__, error=str(e)[:400])
                self.close()                     # carry on with a fresh session
            self.max_op_s = max(self.max_op_s, time.monotonic() - t0)
            if time.monotonic() - last_stats >= 2.0:
                last_stats = time.monotonic()
                self.stats()
            self.stop.wait(self.rng.expovariate(1000.0 / self.a.gap_ms))
        self.close()
        self.stats()
        self.line("X", clean=True)
        return 0


def worker_main(a: argparse.Namespace) -> int:
    w = Worker(a)
    if a.once:
        try:
            return w.run_once()
        except Exception as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return w.run()


# ======================================================================================
# The driver
# ======================================================================================

class Client:
    def __init__(self, idx: int, tenant: str, proc: subprocess.Popen, report: str):
        self.idx, self.tenant, self.proc, self.report = idx, tenant, proc, report
        self.started = time.monotonic()
        self.killed = False
        self.hung = False


def parse_report(path: str) -> dict:
    """The last complete stats line and the error lines of one client's report."""
    ops: dict[str, int] = {}
    errors: list[dict] = []
    clean = False
    max_op_s = 0.0
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = ""
    for ln in text.split("\n")[:-1] if not text.endswith("\n") else text.splitlines():
        kind, _, body = ln.partition(" ")
        try:
            d = json.loads(body)
        except ValueError:
            continue
        if kind == "S":
            ops, max_op_s = d["ops"], d["max_op_s"]
        elif kind == "E":
            errors.append(d)
        elif kind == "X":
            clean = True
    return {"ops": ops, "errors": errors, "clean": clean, "max_op_s": max_op_s}


def rss(pid: int | None) -> int | None:
    import psutil
    if not pid:
        return None
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def rss_parts(pid: int | None) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) in bytes: private memory vs mapped files (shared-memory
    segments, libraries)."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("RssAnon:"):
                    anon = int(ln.split()[1]) * 1024
                elif ln.startswith(("RssFile:", "RssShmem:")):
                    file += int(ln.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return anon, file


ARENA_ALIGN = 64 << 20   # glibc's per-thread malloc arenas are 64 MiB-aligned on 64-bit


def anon_regions(pid: int | None) -> dict[str, int]:
    """Private memory by where it lives: the main malloc heap ([heap]: Python objects over
    512 bytes, C libraries called from the main thread), other threads' malloc arenas (ZeroMQ's
    I/O thread), and other anonymous mappings (Python's small-object arenas, large malloc
    blocks, stacks). Says which allocator a growth comes from."""
    out = {"heap": 0, "thread arenas": 0, "other anon": 0}
    cur = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for ln in f:
                parts = ln.split()
                if parts and "-" in parts[0] and len(parts) >= 5:
                    name = parts[5] if len(parts) > 5 else ""
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    cur = ("heap" if name == "[heap]" else
                           "thread arenas" if not name and lo % ARENA_ALIGN == 0 and hi - lo <= ARENA_ALIGN else
                           "other anon" if not name else None)
                elif parts and parts[0] == "Anonymous:" and cur:
                    out[cur] += int(parts[1]) * 1024
    except (OSError, ValueError):
        pass
    return out


def segment_rss(pid: int | None, prefix: str) -> int:
    """Resident bytes of the shared-memory segments under `prefix` that `pid` maps (the
    tenant's staging and pinned host buffers: its data, not the executor's)."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for ln in f:
                parts = ln.split()
                if parts and "-" in parts[0] and len(parts) >= 5:
                    inside = len(parts) > 5 and parts[5].startswith(prefix)
                elif inside and parts and parts[0] == "Rss:":
                    total += int(parts[1]) * 1024
    except (OSError, ValueError):
        pass
    return total


def cpu_s(pid: int | None) -> float | None:
    import psutil
    if not pid:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


class Soak:
    def __init__(self, a: argparse.Namespace):
        from kubecash.broker.local import LocalBroker
        self.a = a
        self.rng = random.Random(a.seed)
        self.tenants = [f"t{i}" for i in range(a.tenants)]
        self.broker = LocalBroker({t: {"memory": a.memory} for t in self.tenants},
                                  log_level="INFO", heartbeat_interval_s=a.heartbeat_interval,
                                  heartbeat_timeout_s=a.heartbeat_timeout,
                                  max_sessions_per_tenant=a.max_sessions,
                                  executor_threads=a.executor_threads)
        self.admin = self.broker.admin()
        import tempfile
        self.reports = tempfile.mkdtemp(prefix="kc-soak-")
        self.clients: list[Client] = []
        self.ended: list[Client] = []
        self.next_idx = 0
        self.kills = 0
        self.hangs = 0
        self.crashes: list[str] = []
        self.samples: list[dict] = []
        self.shm_seen: dict[str, float] = {}     # path -> first seen
        self.stale: set[str] = set()
        self.t0 = time.monotonic()
        self.stopping = False
        self.cpu_prev: dict[int, float] = {}

    # -- clients ---------------------------------------------------------------------------
    def spawn(self, tenant: str, *extra: str) -> Client:
        idx = self.next_idx
        self.next_idx += 1
        report = os.path.join(self.reports, f"c{idx}.log")
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "--report", report,
                "--seed", str(self.a.seed * 1_000_003 + idx), "--gap-ms", str(self.a.gap_ms),
                "--exit-weight", str(self.a.exit_weight),
                "--reconnect-weight", str(self.a.reconnect_weight), *extra]
        with open(report + ".err", "w") as err:
            proc = subprocess.Popen(argv, env=self.broker.env(tenant), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        return Client(idx, tenant, proc, report)

    def reap(self, replace: bool) -> None:
        now = time.monotonic()
        for c in list(self.clients):
            rc = c.proc.poll()
            if rc is None:
                try:   # hang: no stats line for hang_s (a client writes one every 2 s of ops)
                    idle = min(time.time() - os.stat(c.report).st_mtime, now - c.started)
                except OSError:
                    idle = now - c.started
                if idle > self.a.hang_s:
                    c.hung = True
                    self.hangs += 1
                    c.proc.kill()
                    c.proc.wait()
                    rc = c.proc.returncode
                else:
                    continue
            self.clients.remove(c)
            self.ended.append(c)
            if rc == -signal.SIGTERM and self.stopping and not os.path.getsize(c.report):
                rc = 0          # stopped before it had installed its SIGTERM handler
            if not c.killed and not c.hung and rc != 0:
                try:
                    err = open(c.report + ".err").read().strip()[-600:]
                except OSError:
                    err = ""
                self.crashes.append(f"client {c.idx} ({c.tenant}) exited with {rc}: {err}")
            if replace:
                self.clients.append(self.spawn(c.tenant))

    def kill_one(self) -> None:
        live = [c for c in self.clients if c.proc.poll() is None
                and time.monotonic() - c.started > 1.0]
        if live:
            c = self.rng.choice(live)
            c.killed = True
            c.proc.send_signal(signal.SIGKILL)
            self.kills += 1

    # -- observation ---------------------------------------------------------------------------
    def shm_files(self) -> list[str]:
        out = []
        for t in self.tenants:
            d = os.path.join(self.broker.runtime_dir, "tenants", t, "shm")
            try:
                out += [os.path.join(d, n) for n in os.listdir(d)]
            except OSError:
                pass
        return out

    def sample(self) -> dict:
        st = self.admin.call("status")
        now = time.monotonic()
        files = self.shm_files()
        for p in files:
            self.shm_seen.setdefault(p, now)
        present = set(files)
        for p in list(self.shm_seen):
            if p not in present:
                del self.shm_seen[p]
        stale_after = self.a.heartbeat_timeout + 10
        stale_now = [p for p, t in self.shm_seen.items() if now - t > stale_after]
        self.stale.update(stale_now)
        ex = {}
        for t, v in st["tenants"].items():
            d = v["devices"][DEVICE]
            pid = d["executor_pid"]
            seg = segment_rss(pid, os.path.join(self.broker.runtime_dir, "tenants", t, "shm") + "/")
            ex[t] = (pid, rss(pid), d["memory_used"], *rss_parts(pid), seg, anon_regions(pid))
        # CPU use since the last sample: broker, executors (together), live clients (together)
        cpu = {"broker": 0.0, "ex": 0.0, "cli": 0.0}
        prev, self.cpu_prev = self.cpu_prev, {}
        for kind, pid in ([("broker", self.broker.proc.pid)] + [("ex", p) for p, *_ in ex.values()]
                          + [("cli", c.proc.pid) for c in self.clients]):
            v = cpu_s(pid)
            if v is not None:
                self.cpu_prev[pid] = v
                cpu[kind] += v - prev.get(pid, v if kind != "cli" else 0.0)
        span = max(1e-3, now - self.t0 - (self.samples[-1]["t"] if self.samples else 0.0))
        cpu = {k: v / span for k, v in cpu.items()}
        s = {"t": now - self.t0, "broker": rss(self.broker.proc.pid), "ex": ex, "cpu": cpu,
             "broker_parts": rss_parts(self.broker.proc.pid),
             "broker_regions": anon_regions(self.broker.proc.pid),
             "sessions": sum(v["sessions"] for v in st["tenants"].values()),
             "clients": sum(1 for c in self.clients if c.proc.poll() is None),
             "shm": len(files), "stale": len(stale_now), "kills": self.kills,
             "kernels": sum(v["devices"][DEVICE]["kernels"] for v in st["tenants"].values()),
             "load": os.getloadavg()[0]}
        self.samples.append(s)
        ex_rss = [e[1] for e in ex.values() if e[1]]
        print(f"{s['t']:7.1f} {s['clients']:4d} {s['sessions']:5d} {mib(s['broker']):>8} "
              f"{mib(sum(ex_rss)):>9} {len(ex_rss):3d} "
              f"{' '.join(mib(e[1]) for e in ex.values()):<{6 * len(ex)}} "
              f"{sum(e[2] for e in ex.values()) / 2**20:8.1f} {s['shm']:4d} {s['stale']:5d} "
              f"{s['kills']:5d} {s['kernels']:8d} {s['load']:5.1f} "
              f"{cpu['broker']:4.2f}/{cpu['ex']:4.2f}/{cpu['cli']:4.2f}", flush=True)
        return s

    def header(self) -> None:
        print(f"{'t_s':>7} {'cli':>4} {'sess':>5} {'brokerMB':>8} {'execMB':>9} {'n':>3} "
              f"{'per-executor MB (' + ','.join(self.tenants) + ')':<{6 * len(self.tenants)}} "
              f"{'memUsedMB':>8} {'shm':>4} {'stale':>5} {'kills':>5} {'kernels':>8} {'load':>5} "
              f"cpu broker/executors/clients (cores)")

    def status_idle(self) -> tuple[bool, dict]:
        st = self.admin.call("status")
        idle = all(v["sessions"] == 0 and v["devices"][DEVICE]["memory_used"] == 0
                   and v["devices"][DEVICE]["executor_pid"] is None
                   for v in st["tenants"].values())
        return idle, st

    # -- the run ------------------------------------------------------------------------------
    def warm(self) -> None:
        """Compile the kernels once (the cache is shared), so no client waits for g++."""
        import kubecash.client as kc
        with kc.connect(self.broker.address(self.tenants[0])) as s:
            d = s.device(DEVICE)
            for name, src in KERNELS.items():
                d.load_module(src).get_kernel(name)

    def run(self) -> None:
        a = self.a
        duration = a.minutes * 60
        t = time.monotonic()
        self.warm()
        print(f"kernels compiled in {time.monotonic() - t:.1f} s", flush=True)
        self.header()
        self.t0 = time.monotonic()
        # Staggered start: interpreter start-up is the costliest thing a client does.
        stagger = min(a.ramp_s, duration / 4) / max(1, a.clients)
        next_kill = self.t0 + a.ramp_s + self.rng.expovariate(a.kill_rate) if a.kill_rate > 0 else None
        next_sample = self.t0
        end = self.t0 + duration
        while True:
            now = time.monotonic()
            if now >= end:
                break
            want = min(a.clients, int((now - self.t0) / stagger) + 1) if stagger else a.clients
            while len(self.clients) < want:     # reap() replaces the ones that end
                self.clients.append(self.spawn(self.tenants[self.next_idx % len(self.tenants)]))
            if next_kill is not None and now >= next_kill:
                self.kill_one()
                next_kill += self.rng.expovariate(a.kill_rate)
            self.reap(replace=True)
            if now >= next_sample:
                self.sample()
                next_sample += a.sample_s
            time.sleep(0.05)
        self.soak_s = time.monotonic() - self.t0
        self.sample()

    def finish(self) -> dict:
        """Stop every client, wait for the broker to reclaim, look at what is left."""
        a = self.a
        out: dict = {}
        self.stopping = True
        t = time.monotonic()
        for c in self.clients:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + a.stop_timeout
        for c in self.clients:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.hung = True
                self.hangs += 1
                c.proc.kill()
                c.proc.wait()
        out["stop_s"] = time.monotonic() - t
        self.reap(replace=False)
        t = time.monotonic()
        idle, st = self.status_idle()
        while not idle and time.monotonic() - t < a.reclaim_timeout:
            time.sleep(0.1)
            idle, st = self.status_idle()
        out["reclaim_s"] = time.monotonic() - t
        out["reclaimed"] = idle
        out["reclaim_state"] = {n: {"sessions": v["sessions"],
                                    "memory_used": v["devices"][DEVICE]["memory_used"],
                                    "executor_pid": v["devices"][DEVICE]["executor_pid"]}
                                for n, v in st["tenants"].items()}
        time.sleep(0.5)     # anything an executor removes as it exits is gone by now
        out["leftover"] = self.shm_files()
        out["broker_rss_idle"] = rss(self.broker.proc.pid)
        # A fresh client does one of every operation.
        t = time.monotonic()
        c = self.spawn(self.tenants[0], "--once")
        try:
            rc = c.proc.wait(120)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            rc = "timeout"
        try:
            err = open(c.report + ".err").read().strip()
        except OSError:
            err = ""
        out["fresh"] = (rc == 0, f"exit {rc} in {time.monotonic() - t:.1f} s" + (f": {err[-500:]}" if err else ""))
        t = time.monotonic()
        idle, _ = self.status_idle()
        while not idle and time.monotonic() - t < a.reclaim_timeout:
            time.sleep(0.1)
            idle, _ = self.status_idle()
        out["fresh_reclaimed"] = idle
        out["leftover_after_fresh"] = self.shm_files()
        out["alive"] = self.broker.alive()
        try:
            out["serving"] = self.admin.call("status")["uptime_s"] > 0
        except Exception as e:
            out["serving"] = False
            out["serving_err"] = str(e)
        return out

    def close(self) -> None:
        for c in self.clients:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        self.admin.close()
        self.broker.close()
        import shutil
        shutil.rmtree(self.reports, ignore_errors=True)


# -- verdicts ---------------------------------------------------------------------------------
RESULTS: list[bool] = []


def verdict(name: str, ok: bool, detail: str) -> None:
    RESULTS.append(ok)
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def window(samples: list[dict], lo: float, hi: float) -> list[dict]:
    return [s for s in samples if lo <= s["t"] <= hi]


def growth_report(sk: Soak, a: argparse.Namespace) -> None:
    T = sk.soak_s
    base = window(sk.samples, 0.1 * T, 0.2 * T)
    end = window(sk.samples, 0.9 * T, T + 1)
    print(f"RSS: baseline = median over t in [{0.1 * T:.0f}, {0.2 * T:.0f}] s ({len(base)} samples), "
          f"end = median over [{0.9 * T:.0f}, {T:.0f}] s ({len(end)} samples)")
    if not base or not end:
        verdict("RSS growth", False, "not enough samples (run longer or sample more often)")
        return
    b0 = statistics.median(s["broker"] for s in base if s["broker"])
    b1 = statistics.median(s["broker"] for s in end if s["broker"])
    g = b1 / b0 - 1
    slope = trend([(s["t"], s["broker"]) for s in sk.samples if s["t"] >= 0.1 * T and s["broker"]])
    ba = [statistics.median(s["broker_parts"][i] for s in w) for w in (base, end) for i in (0, 1)]
    print(f"     broker anon {mib(ba[0])} -> {mib(ba[2])} MiB, file-backed {mib(ba[1])} -> {mib(ba[3])} MiB")
    print("     broker anon by region: " + ", ".join(
        f"{k} {mib(statistics.median(s['broker_regions'][k] for s in base))} -> "
        f"{mib(statistics.median(s['broker_regions'][k] for s in end))} MiB"
        for k in base[0]["broker_regions"]))
    verdict("broker RSS growth", g <= a.max_growth,
            f"{mib(b0)} MiB -> {mib(b1)} MiB ({g:+.2%}, limit +{a.max_growth:.0%}); "
            f"trend after warm-up {slope / 2**20 * 60:+.2f} MiB/min")
    tot0 = tot1 = own0 = own1 = 0.0
    lines, replaced = [], []
    for t in sk.tenants:
        p0 = {s["ex"][t][0] for s in base} - {None}
        p1 = {s["ex"][t][0] for s in end} - {None}
        same = p0 & p1
        if len(p0) == 1 and p0 == p1:
            pid = next(iter(same))
            r0 = statistics.median(s["ex"][t][1] for s in base if s["ex"][t][0] == pid and s["ex"][t][1])
            r1 = statistics.median(s["ex"][t][1] for s in end if s["ex"][t][0] == pid and s["ex"][t][1])
            tot0 += r0
            tot1 += r1
            # The executor's own memory: its RSS less what it holds for the tenant (the
            # allocations in use and the mapped segments), which moves with the clients.
            def own(ws, t=t, pid=pid):
                return statistics.median(s["ex"][t][1] - s["ex"][t][2] - s["ex"][t][5]
                                         for s in ws if s["ex"][t][0] == pid and s["ex"][t][1])
            o0, o1 = own(base), own(end)
            own0 += o0
            own1 += o1
            sl = trend([(s["t"], s["ex"][t][1]) for s in sk.samples
                        if s["t"] >= 0.1 * T and s["ex"][t][0] == pid and s["ex"][t][1]])
            def med(ws, i, t=t, pid=pid):
                return statistics.median(s["ex"][t][i] for s in ws if s["ex"][t][0] == pid)
            lines.append(f"{t} pid {pid}: {mib(r0)} -> {mib(r1)} MiB ({r1 / r0 - 1:+.2%}, "
                         f"{sl / 2**20 * 60:+.2f} MiB/min); anon {mib(med(base, 3))} -> "
                         f"{mib(med(end, 3))}, of it device memory in use {mib(med(base, 2))} -> "
                         f"{mib(med(end, 2))}; file-backed {mib(med(base, 4))} -> "
                         f"{mib(med(end, 4))}, of it the tenant's segments {mib(med(base, 5))} -> "
                         f"{mib(med(end, 5))}; own {mib(o0)} -> {mib(o1)} MiB ({o1 / o0 - 1:+.2%}); "
                         f"anon by region " + ", ".join(
                             f"{k} {mib(statistics.median(s['ex'][t][6][k] for s in base if s['ex'][t][0] == pid))}"
                             f" -> {mib(statistics.median(s['ex'][t][6][k] for s in end if s['ex'][t][0] == pid))}"
                             for k in ("heap", "thread arenas", "other anon")))
        else:
            replaced.append(f"{t} (pids {sorted(p0)} in the baseline, {sorted(p1)} at the end)")
    pids = {s["ex"][t][0] for s in sk.samples for t in sk.tenants} - {None}
    print(f"executor processes seen over the run: {len(pids)} for {len(sk.tenants)} tenants")
    for ln in lines:
        print("     " + ln)
    if replaced:
        print("     not compared (executor replaced between the windows): " + "; ".join(replaced))
    if tot0:
        g = tot1 / tot0 - 1
        print(f"     executors' RSS, sum over {len(lines)} alive in both windows: {mib(tot0)} MiB -> "
              f"{mib(tot1)} MiB ({g:+.2%}), tenant data included")
        g = own1 / own0 - 1
        verdict("executors' own memory growth", g <= a.max_growth,
                f"RSS less the tenant's allocations in use and mapped segments, sum over "
                f"{len(lines)}: {mib(own0)} MiB -> {mib(own1)} MiB ({g:+.2%}, limit +{a.max_growth:.0%})")
    else:
        verdict("executors' own memory growth", False, "no executor lived through both windows")


def trend(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0


def driver_main(a: argparse.Namespace) -> int:
    print(f"soak: {a.clients} clients over {a.tenants} tenants for {a.minutes:g} min, "
          f"kill rate {a.kill_rate:g}/s, mean gap between a client's ops {a.gap_ms:g} ms, "
          f"seed {a.seed}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start", flush=True)
    sk = Soak(a)
    try:
        sk.run()
        fin = sk.finish()
    except BaseException:
        sk.close()
        raise
    log = sk.broker.log()
    # -- clients' reports
    ops: collections.Counter[str] = collections.Counter()
    errors: list[tuple[int, str, dict]] = []
    max_op_s = 0.0
    clean_exits = 0
    for c in sk.ended:
        r = parse_report(c.report)
        ops.update(r["ops"])
        errors += [(c.idx, c.tenant, e) for e in r["errors"]]
        max_op_s = max(max_op_s, r["max_op_s"])
        clean_exits += r["clean"] and not c.killed
    sk.close()
    print()
    print(f"soak ran {sk.soak_s:.0f} s: {len(sk.ended)} client processes, {sk.kills} SIGKILLed, "
          f"{clean_exits} exited cleanly (random exits and the final SIGTERM), {sk.hangs} hung")
    print(f"operations done (reported; a killed client's last <= 2 s are not): {sum(ops.values())} "
          f"-- " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    print(f"kernels the broker counted: {sk.samples[-1]['kernels']}; longest single operation "
          f"{max_op_s:.2f} s; load average over the run: "
          f"{statistics.mean(s['load'] for s in sk.samples):.1f} (max {max(s['load'] for s in sk.samples):.1f})")
    print(f"stop: clients ended {fin['stop_s']:.1f} s after SIGTERM; broker reclaimed everything "
          f"{fin['reclaim_s']:.1f} s later; broker RSS idle {mib(fin['broker_rss_idle'])} MiB")
    bad_log = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln
               or "internal error" in ln]
    ex_unclean = [ln for ln in bad_log if "executor for" in ln and "ended" in ln]
    print()
    growth_report(sk, a)
    verdict("no stale segments during the run", not sk.stale,
            f"{len(sk.stale)} shared-memory files kept their name longer than "
            f"{a.heartbeat_timeout + 10:g} s" + (f": {sorted(os.path.basename(p) for p in sk.stale)[:10]}"
                                                 if sk.stale else ""))
    verdict("no leaked segments", not fin["leftover"] and not fin["leftover_after_fresh"],
            f"{len(fin['leftover'])} files left in shm/ after reclaim"
            + (f" ({[os.path.basename(p) for p in fin['leftover']][:10]})" if fin["leftover"] else "")
            + f", {len(fin['leftover_after_fresh'])} after the fresh client")
    nerr = len(errors) + len(sk.crashes) + sk.hangs
    verdict("no client errors", nerr == 0,
            f"{len(errors)} reported errors or wrong results, {len(sk.crashes)} crashes, "
            f"{sk.hangs} hangs (killed clients excluded)")
    for idx, tenant, e in errors[:15]:
        print(f"       client {idx} ({tenant}) {e['op']}: {e['type']}: {e['error']}")
    for c in sk.crashes[:5]:
        print("       " + c)
    by_kind = collections.Counter(f"{e['op']}: {e['type']}" for _, _, e in errors)
    if by_kind:
        print("       by operation: " + ", ".join(f"{k} x{v}" for k, v in by_kind.most_common()))
    verdict("no executor ended uncleanly, no broker errors", not bad_log,
            f"{len(bad_log)} ERROR/Traceback lines in the broker log ({len(ex_unclean)} executor ends)")
    for ln in bad_log[:10]:
        print("       " + ln[:300])
    verdict("broker alive and serving", fin["alive"] and fin["serving"] and fin["fresh"][0],
            f"alive {fin['alive']}, status answered {fin['serving']}, fresh client: {fin['fresh'][1]}")
    verdict("everything reclaimed", fin["reclaimed"] and fin["fresh_reclaimed"],
            f"sessions 0, memory_used 0, no executor: {fin['reclaimed']} after "
            f"{fin['reclaim_s']:.1f} s (heartbeat timeout {a.heartbeat_timeout:g} s); "
            f"again after the fresh client: {fin['fresh_reclaimed']}"
            + ("" if fin["reclaimed"] else f"; state {fin['reclaim_state']}"))
    passed = sum(RESULTS)
    print(f"{passed} passed, {len(RESULTS) - passed} failed")
    return 0 if passed == len(RESULTS) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--kill-rate", type=float, default=0.2, help="SIGKILLs per second (Poisson)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gap-ms", type=float, default=500, help="mean sleep between a client's ops")
    ap.add_argument("--exit-weight", type=float, default=0.01,
                    help="relative weight of a clean exit among the ops (total weight ~27)")
    ap.add_argument("--reconnect-weight", type=float, default=0.1)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--ramp-s", type=float, default=30.0, help="start the clients over this long")
    ap.add_argument("--memory", default="1GiB", help="each tenant's memory quota")
    ap.add_argument("--heartbeat-interval", type=float, default=0.5)
    ap.add_argument("--heartbeat-timeout", type=float, default=3.0)
    ap.add_argument("--max-sessions", type=int, default=256)
    ap.add_argument("--executor-threads", type=int, default=2)
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--hang-s", type=float, default=60.0, help="no progress this long is a hang")
    ap.add_argument("--stop-timeout", type=float, default=30.0)
    ap.add_argument("--reclaim-timeout", type=float, default=60.0)
    # the client process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a)
    return driver_main(a)


if __name__ == "__main__":
    sys.exit(main())
