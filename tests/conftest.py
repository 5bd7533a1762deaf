"""Fixtures: a real broker daemon in a subprocess, real sockets, every resource closed."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import zmq

import kubecash.client as kc
from kubecash.broker import sandbox as sb
from kubecash.broker.cpukernels import nvrtc
from kubecash.broker.local import LocalBroker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Why seccomp cannot confine kernels here (qemu-user, for one), or None. Where it cannot, test
# brokers run with the sandbox off and the sandbox's own tests skip with this reason.
NO_SECCOMP = sb.seccomp_unavailable()
SANDBOX = NO_SECCOMP is None       # for the tests' own ck.Launcher
# Without seccomp we are under qemu-user (make test-arch), where Python and NVRTC run 5-20
# times slower: time bounds made for a native machine (a broker's start, a GPU-side compile)
# are stretched, not the behaviour they bound.
SLOW = 8 if NO_SECCOMP is not None else 1
if SLOW > 1:
    from kubecash.broker import backend_cuda
    backend_cuda.NVRTC_TIMEOUT_S *= SLOW


def _compile_in_the_test_process_without_landlock() -> None:
    """The tests compile their own CUDA C in this process (ck.compile_module), where NVRTC's
    child is confined by Landlock or refused. qemu-user has no Landlock: there the tests'
    compiles run as a compile view's would (in_view); brokers' executors still compile in
    their views, and the refusal itself is tested (with in_view patched off) everywhere."""
    if nvrtc.landlock_abi() == 0 and NO_SECCOMP is not None:
        nvrtc.in_view = True


_compile_in_the_test_process_without_landlock()
needs_landlock = pytest.mark.skipif(
    nvrtc.landlock_abi() == 0,
    reason="NVRTC's Landlock confinement is not testable here: no Landlock (qemu-user does not implement it)")
needs_seccomp = pytest.mark.skipif(NO_SECCOMP is not None, reason=f"sandbox not testable here: {NO_SECCOMP}")


class BrokerProcess(LocalBroker):
    """A real kubecash-broker daemon with test settings: fast heartbeats, shared kernel cache."""

    runtime_dirs: list[str] = []     # of the brokers started by the current test

    def __init__(self, tenants: dict[str, dict], cache_dir: str, **broker: Any):
        # Tenant file systems are mounted where the broker is: its clients (the tests) are
        # there too (the default, /proc/1/ns/mnt, may not be readable in a container).
        settings = {"cache_dir": cache_dir, "heartbeat_interval_s": 0.25,
                    "heartbeat_timeout_s": 1.5 * SLOW, "executor_threads": 2,
                    "mount_namespace": "/proc/self/ns/mnt",
                    **({"sandbox": False} if NO_SECCOMP else {}), **broker}
        if settings.get("runtime_dir"):
            BrokerProcess.runtime_dirs.append(settings["runtime_dir"])
        super().__init__(tenants, start_timeout=20.0 * SLOW, **settings)
        self.cache_dir = settings["cache_dir"]     # tenants' module caches: <cache_dir>/tenants/<name>
        BrokerProcess.runtime_dirs.append(self.runtime_dir)

    def connect(self, tenant: str) -> kc.Session:
        return kc.connect(self.address(tenant))

    stop = LocalBroker.close


def _gpu_count() -> int:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


GPU_COUNT = _gpu_count()


@pytest.fixture(autouse=True)
def _tenant_file_systems():
    """A root broker mounts a file system on each tenant directory it makes, and leaves it
    (containers keep theirs across restarts): unmount what this test's brokers made, under
    their runtime directories only (another broker on this machine keeps its own)."""
    from kubecash.broker import confine
    BrokerProcess.runtime_dirs.clear()
    yield
    for d in BrokerProcess.runtime_dirs:
        confine.unmount_tenant_fs_under(d)


@pytest.fixture(params=["cpu0", pytest.param("gpu0", marks=pytest.mark.gpu)])
def dev_name(request) -> str:
    """The device a device-generic test runs on: the CPU backend always, gpu0 where present."""
    if request.param.startswith("gpu") and GPU_COUNT == 0:
        pytest.skip("no NVIDIA GPU here (NVML finds none): GPU backend tests skipped")
    return request.param


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kernel-cache"))


@pytest.fixture
def broker_factory(kernel_cache, request):
    started: list[BrokerProcess] = []

    def start(tenants: dict[str, dict] | None = None, **broker: Any) -> BrokerProcess:
        b = BrokerProcess(tenants or {"alice": {"memory": "256MiB"}, "bob": {"memory": "256MiB"}},
                          kernel_cache, **broker)
        started.append(b)
        return b
    yield start
    failed = getattr(request.node, "_kc_failed", False)
    for b in started:
        alive = b.alive()
        text = b.log() if failed or not alive else ""
        b.stop()
        if text:            # its log goes with its directory: shown with the failure
            print(f"--- log of the broker on {b.runtime_dir} ---\n{text}")
        assert alive, "the broker died during the test"


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    return broker_factory()


@pytest.fixture
def session(broker):
    with broker.connect("alice") as s:
        yield s


@pytest.fixture
def raw_socket():
    """A bare DEALER socket for sending hand-made (hostile) frames; closed afterwards."""
    ctx = zmq.Context()
    socks = []

    def make(address: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10000 * SLOW)
        s.connect(address)
        socks.append(s)
        return s
    yield make
    for s in socks:
        s.close()
    ctx.term()


def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    """Poll `pred` every `interval` s until it returns something true (returned), or fail
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def run_client(code: str, address: str, timeout: float = 120, **popen: Any) -> subprocess.Popen:
    """Start a real client process running `code` with KUBECASH_BROKER=address."""
    env = dict(os.environ, KUBECASH_BROKER=address, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


# NVRTC has no riscv64 build: there CUDA C source is refused (NOT_SUPPORTED, this message) and
# only PTX runs. A test that needed NVRTC is reported skipped with that reason, not failed.
_NO_NVRTC = "CUDA C source needs NVRTC"


def _nvrtc_missing() -> str | None:
    from kubecash.broker.cpukernels.errors import KernelCompileError
    try:
        nvrtc._load()
    except KernelCompileError as e:
        return str(e)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        item._kc_failed = True          # broker_factory shows its brokers' logs
    # the refusal is in the exception, or in the stderr of a client process the test ran
    if rep.failed and call.when in ("setup", "call") and call.excinfo is not None \
            and (_NO_NVRTC in str(call.excinfo.getrepr(style="short")) or _NO_NVRTC in rep.capstderr):
        if _nvrtc_missing():
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), item.location[1] or 0, "Skipped: CUDA C source needs NVRTC, "
                            f"which is not on this {platform.machine()} machine (NOT_SUPPORTED); PTX tests run")
