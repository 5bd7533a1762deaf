"""KubeCASH's own libcuda.so.1 and libnvidia-ml.so.1 (native/): C programs compiled against
NVIDIA's cuda.h, linked to the libraries kubecash-libdir names, run against a real broker."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile

import pytest
from conftest import run_client, wait_for
from toolkit import NO_NVCC, NVCC

import kubecash.native as kn
from kubecash.client import protocol as P
from kubecash.native import build, gen, table

HERE = os.path.dirname(os.path.abspath(__file__))
QUOTA = 64 << 20
RUN_TIMEOUT = 180                       # generous: a loaded 2-core machine

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
# As the tours are built; what GCC 14 (Debian trixie) refuses is refused with every compiler.
CC = ["cc", "-Wall", "-Wno-deprecated-declarations", "-Werror=implicit-function-declaration"]


def _cuda_include() -> str:
    incs = gen.include_dirs()
    if not incs:
        pytest.skip("no cuda.h here (nvidia-cuda-runtime is not installed on this platform)")
    return incs[0]


def _libdir() -> str:
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubecash-libdir")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, str]:
    """driver_tour and nvml_tour, built as any CUDA program is: cuda.h, -lcuda (the soname)."""
    out = tmp_path_factory.mktemp("native-programs")
    lib = _libdir()
    built = {}
    for name, extra in (("driver_tour", ["-I", _cuda_include(), "-l:libcuda.so.1", "-ldl", "-lpthread"]),
                        ("nvml_tour", ["-l:libnvidia-ml.so.1"])):
        exe = str(out / name)
        cmd = [*CC, "-o", exe, os.path.join(HERE, "c", f"{name}.c"),
               "-L", lib, "-Wl,--no-as-needed", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert r.returncode == 0, r.stderr
        built[name] = exe
    return built


@pytest.fixture(scope="module")
def exec_tour(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """exec_tour built against cuda.h, and tests/c/kernels.cu as nvcc makes it: PTX, a fatbin
    and a CUBIN."""
    if NVCC is None:
        pytest.skip(NO_NVCC + ": no PTX or fatbin to load")
    out = tmp_path_factory.mktemp("native-exec")
    src = os.path.join(HERE, "c", "kernels.cu")
    images = {k: str(out / f"kernels.{k}") for k in ("ptx", "fatbin", "cubin")}
    for kind, path in images.items():
        r = subprocess.run([NVCC, f"-{kind}", "-arch=sm_80", "-o", path, src], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
        assert r.returncode == 0, r.stderr
    exe = str(out / "exec_tour")
    r = subprocess.run([*CC, "-o", exe,
                        os.path.join(HERE, "c", "exec_tour.c"), "-I", _cuda_include(), "-L", _libdir(),
                        "-Wl,--no-as-needed", "-l:libcuda.so.1", "-lm", "-lpthread"],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr
    return exe, images


def run(exe: str, *args: str, broker: str | None, timeout: float = RUN_TIMEOUT) -> tuple[dict[str, str], str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECASH_BROKER"}
    env["LD_LIBRARY_PATH"] = _libdir()
    if broker is not None:
        env["KUBECASH_BROKER"] = broker
    r = subprocess.run([exe, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    vals = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return vals, r.stderr


@pytest.fixture
def quota_broker(broker_factory):
    return broker_factory({"alice": {"memory": QUOTA}})


# -- the build ------------------------------------------------------------------------------
def test_libraries_are_self_contained():
    """Only libc, libdl, libpthread, libm needed; only CUDA/NVML names exported."""
    if not (shutil.which("readelf") and shutil.which("nm")):
        pytest.skip("binutils (readelf, nm) not installed")
    allowed = {"libc.so.6", "libdl.so.2", "libpthread.so.0", "libm.so.6"}
    for name, prefix in (("libcuda.so.1", "cu"), ("libnvidia-ml.so.1", "nvml")):
        path = os.path.join(kn.libdir(), name)
        dyn = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        needed = {line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line}
        assert needed and needed <= allowed, f"{name} needs {needed - allowed}"
        assert f"Library soname: [{name}]" in dyn
        assert "NODELETE" in dyn                     # dlclose must not unmap a running thread's code
        syms = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                              check=True).stdout.split("\n")
        names = {s.split()[-1] for s in syms if s.strip()}
        assert names and all(n.startswith(prefix) for n in names), sorted(n for n in names if not n.startswith(prefix))
        if name == "libnvidia-ml.so.1":     # all that pynvml can call (PyTorch dlsyms NVLink calls)
            for must in ("nvmlDeviceGetNvLinkRemoteDeviceType", "nvmlDeviceGetGpuFabricInfoV",
                         *table.NVML, *gen.nvml_surface()[1]):
                assert must in names, must
        if name == "libcuda.so.1":
            # every generated entry point and every table entry is exported under its exact name
            for must in ("cuMemAlloc", "cuMemAlloc_v2", "cuMemcpyHtoD_v2_ptds", "cuMemcpyHtoDAsync_v2_ptsz",
                         "cuGetProcAddress", "cuGetProcAddress_v2", "cuCtxCreate_v4", *table.DRIVER):
                assert must in names, must


def test_kubecash_libdir_prints_the_directory():
    d = _libdir()
    assert os.path.samefile(d, kn.libdir())
    assert all(os.path.isfile(os.path.join(d, n)) for n in kn.LIBS)


def test_wheel_contains_the_libraries(tmp_path):
    root = os.path.dirname(HERE)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", root, "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    (whl,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / whl) as z:
        names = set(z.namelist())
    assert {"kubecash/native/lib/libcuda.so.1", "kubecash/native/lib/libnvidia-ml.so.1"} <= names


def _assert_fresh(name: str, text: str) -> None:
    with open(os.path.join(gen.SRC, name)) as f:
        assert f.read() == text, f"native/src/{name} is stale: run python -m kubecash.native.gen"


def test_generated_protocol_matches_its_source():
    """gen_protocol.h (from the protocol's export) needs no headers: checked everywhere."""
    _assert_fresh("gen_protocol.h", gen.gen_protocol())


def test_generated_nvml_matches_the_table_and_pynvml():
    """gen_nvml.c: every NVML entry point nvidia-ml-py's pynvml knows that the table does not
    implement, a stub. Made with one nvidia-ml-py: where this machine has another, it says so."""
    version, names = gen.nvml_surface()
    with open(os.path.join(gen.SRC, "gen_nvml.c")) as f:
        banner = f.readline()
    if f"nvidia-ml-py {version}." not in banner:
        pytest.skip(f"the checked-in NVML stubs were made from another nvidia-ml-py "
                    f"({banner.strip()}; here: {version})")
    _assert_fresh("gen_nvml.c", gen.gen_nvml())


def test_generated_surface_matches_the_headers():
    """Regenerated from the CUDA headers, table and devattr here, the driver surface is what
    is checked in: it cannot drift. It was made from every header set found (the pip
    package's and the toolkit's): where this machine has another set, it says which."""
    incs = gen.include_dirs()
    if not incs:
        pytest.skip("no CUDA headers here")
    with open(os.path.join(gen.SRC, "gen_surface.c")) as f:
        banner = f.readline()
    here = ", ".join(str(gen.cuda_version(i)) for i in incs)
    if f"CUDA_VERSION {here})" not in banner:
        pytest.skip(f"the checked-in surface was made from other headers ({banner.strip()}; here: {here})")
    _assert_fresh("gen_surface.c", gen.gen_surface(incs))
    _assert_fresh("gen_devattr.c", gen.gen_devattr(incs))


def test_protocol_names_come_from_the_declaration():
    """Every op and field the C side sends is the protocol's (gen_protocol.h is generated
    from its export); a message the table lists but the protocol lacks is refused."""
    with open(os.path.join(gen.SRC, "gen_protocol.h")) as f:
        header = f.read()
    ex = P.export()
    for m in ex["messages"]:
        if m["name"] in table.MESSAGES_USED.get(m["channel"], ()):
            for field in m["fields"]:
                assert f'_{field.upper()} "{field}"' in header
    assert f"#define KCP_VERSION {P.VERSION}" in header
    saved = table.MESSAGES_USED
    try:
        table.MESSAGES_USED = {"executor": ("no_such_op",)}
        with pytest.raises(gen.GenError, match="no_such_op"):
            gen.gen_protocol()
    finally:
        table.MESSAGES_USED = saved


def test_table_names_only_declared_symbols():
    saved = dict(table.DRIVER)
    try:
        table.DRIVER["cuNoSuchThing"] = table.LOCAL
        with pytest.raises(gen.GenError, match="cuNoSuchThing"):
            gen.gen_surface(gen.include_dirs() or pytest.skip("no CUDA headers here"))
    finally:
        table.DRIVER.clear()
        table.DRIVER.update(saved)


# -- the driver, brokered --------------------------------------------------------------------
def test_driver_tour(programs, quota_broker):
    v, err = run(programs["driver_tour"], "tour", broker=quota_broker.address("alice"))
    assert v["init"] == "0" and v["count_rc"] == "0" and v["count"] == "1"
    assert v["device_get_bad"] == "101"                          # CUDA_ERROR_INVALID_DEVICE
    assert v["name_rc"] == "0" and v["name"].startswith("KubeCASH CPU")
    assert v["total_rc"] == "0" and int(v["total"]) == QUOTA     # the quota, not the machine
    # the same UUID the Python shim derives (shim/devattr.py uuid_bytes)
    assert v["uuid"] == hashlib.sha256(f"kubecash:cpu0:{v['name']}".encode()).digest()[:16].hex()
    assert (v["cc_rc"], v["cc"]) == ("0", "8.0")
    assert (v["attr_warp_rc"], v["attr_warp"]) == ("0", "32")
    assert (v["attr_block_x_rc"], v["attr_block_x"]) == ("0", "1024")
    assert (v["attr_cc_major_rc"], v["attr_cc_major"]) == ("0", "8")
    assert (v["attr_managed_rc"], v["attr_managed"]) == ("0", "0")
    assert v["alloc_no_ctx"] == "201"                            # no current context
    assert v["retain"] == v["set_current"] == v["get_current_rc"] == "0"
    assert v["current_is_primary"] == "1" and v["ctx_device"] == "0"
    assert v["mem_info_rc"] == "0" and int(v["mem_info_total"]) == QUOTA
    assert 0 < int(v["mem_info_free"]) <= QUOTA
    for size in ("small", "large"):                              # inline, and through staging
        assert [v[f"{size}_{k}"] for k in ("alloc", "htod", "dtoh", "free", "same")] == ["0", "0", "0", "0", "1"]
    assert v["over_quota"] == "2"                                # CUDA_ERROR_OUT_OF_MEMORY, from the executor
    assert v["sync"] == "0"
    assert v["unsupported_1"] == v["unsupported_2"] == "801"     # CUDA_ERROR_NOT_SUPPORTED
    assert err.count("kubecash: cuIpcGetMemHandle is not supported") == 1, err
    assert (v["err_name"], v["err_string"]) == ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory")
    assert v["err_name_bad"] == "1"
    assert v["procs_ok"] == "1", {k: x for k, x in v.items() if k.startswith("proc_")}
    assert (v["proc_too_old"], v["proc_too_old_status"]) == ("500", "2")    # VERSION_NOT_SUFFICIENT
    assert (v["proc_unknown"], v["proc_unknown_status"]) == ("500", "1")    # SYMBOL_NOT_FOUND
    assert (v["proc_call"], v["proc_call_count"]) == ("0", "1")
    # a created context: current, its allocation charged and its stream its own; destroyed,
    # both go (the stream's handle INVALID_HANDLE, the pointer INVALID_VALUE), the quota is back
    assert (v["create_rc"], v["create_current"], v["create_alloc"], v["create_stream"]) == ("0", "1", "0", "0")
    assert (v["create_charged"], v["create_device"], v["create_push_primary"], v["create_pop"]) == ("1", "1", "0", "1")
    assert (v["destroy_primary"], v["destroy_rc"], v["destroy_popped"], v["destroy_twice"]) == ("201", "0", "1", "201")
    assert (v["destroy_freed"], v["destroy_stream_gone"], v["destroy_alloc_gone"]) == ("1", "400", "1"), v
    assert v["create_affinity"] == "801" and "execution affinity parameters are not supported" in err
    # the driver's logs: that reason reached the callback and the dump, once each
    assert (v["logs_register"], v["logs_current"], v["logs_callback"]) == ("0", "0", "1"), v
    assert (v["logs_dump"], v["logs_dump_text"], v["logs_dump_after"]) == ("0", "1", "1"), v
    assert (v["logs_dump_small"], v["logs_unregister"], v["logs_after_unregister"]) == ("1", "0", "1"), v
    assert v["release"] == "0"
    assert v["stdin_open"] == "1"


def test_forked_child_opens_its_own_session(programs, quota_broker):
    v, err = run(programs["driver_tour"], "fork", broker=quota_broker.address("alice"))
    assert v["child_exit"] == "0", (v, err)
    assert v["child_count"] == "0" and v["child_devices"] == "1" and v["child_same"] == "1"
    assert v["parent_after_ok"] == "1"                           # the parent's session is untouched
    assert v["stdin_open"] == "1"
    log = quota_broker.log()
    for who in ("parent_pid", "child_pid"):
        assert f"opened (pid {v[who]})" in log, (who, log[-3000:])


def test_threads_share_the_session(programs, quota_broker):
    v, err = run(programs["driver_tour"], "threads", broker=quota_broker.address("alice"))
    assert v["threads_failed"] == "0", err
    assert sum(1 for k, x in v.items() if k.endswith("_same") and x == "1") == 4


def test_an_idle_session_outlives_the_heartbeat_timeout(programs, quota_broker):
    # the test broker's heartbeat_timeout_s is 1.5: only heartbeats keep the session past it
    v, err = run(programs["driver_tour"], "idle", "4", broker=quota_broker.address("alice"))
    assert v["after_idle_ok"] == "1", err
    assert "ended" not in err, err


def test_a_broker_gone_mid_session_is_an_error_not_a_hang(programs, kernel_cache):
    from conftest import BrokerProcess
    b = BrokerProcess({"alice": {"memory": QUOTA}}, kernel_cache)     # not the factory's: it is stopped here
    try:
        env = dict(os.environ, LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=b.address("alice"))
        p = subprocess.Popen([programs["driver_tour"], "idle", "6"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            for line in p.stdout:                 # the session and context are open...
                seen.append(line)
                if line.startswith("set_current="):
                    break
            assert seen and seen[-1] == "set_current=0\n", seen
            b.stop()                              # ...when the broker (and its executors) go
            out, err = p.communicate(timeout=RUN_TIMEOUT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    finally:
        b.stop()
    assert p.returncode == 0, err
    assert "after_idle_ok=0" in out, out
    assert "ended" in err or "lost the executor" in err, err


def test_no_signal_handlers_and_no_signals_for_our_thread(programs, quota_broker):
    v, err = run(programs["driver_tour"], "signals", broker=quota_broker.address("alice"))
    assert v["handlers_unchanged"] == "1"
    assert int(v["library_threads"]) >= 1              # the heartbeat thread is running...
    assert v["library_threads_block_signals"] == "1"   # ...with every signal blocked


def test_local_answers_need_no_broker(programs):
    v, _ = run(programs["driver_tour"], "version", broker="ipc:///nonexistent/broker.sock")
    assert v["driver_version_rc"] == "0" and int(v["driver_version"]) >= 13000
    assert v["count_before_init"] == "3"                         # CUDA_ERROR_NOT_INITIALIZED


class _Listener:
    """A Unix socket that accepts and says nothing, counting connections."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.accepted: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.accepted.append(c)
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.thread.join(5)
        self.sock.setblocking(False)
        while True:                  # connections still in the backlog count too
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                break
        for c in self.accepted:
            c.close()
        self.sock.close()


def test_nothing_talks_to_the_broker_before_the_first_call(programs, tmp_path):
    lst = _Listener(str(tmp_path / "broker.sock"))
    try:
        v, err = run(programs["driver_tour"], "nothing", broker=f"ipc://{tmp_path}/broker.sock")
        assert v["loaded"] == "1" and err == ""
    finally:
        lst.close()
    assert lst.accepted == []


def test_a_peer_that_never_answers_is_an_error_not_a_hang(programs, tmp_path):
    lst = _Listener(str(tmp_path / "broker.sock"))
    try:
        v, err = run(programs["driver_tour"], "init", broker=f"ipc://{tmp_path}/broker.sock", timeout=120)
        assert v["init"] == "3"                                   # CUDA_ERROR_NOT_INITIALIZED
        assert f"ipc://{tmp_path}/broker.sock" in err and "greeting" in err, err
        assert len(lst.accepted) == 1
    finally:
        lst.close()


@pytest.mark.parametrize("address, why", [(None, "KUBECASH_BROKER is not set"),
                                          ("ipc:///nonexistent/broker.sock", "No such file or directory"),
                                          ("tcp://127.0.0.1:1", "only ipc://")])
def test_bad_broker_address_is_a_clear_error(programs, address, why):
    v, err = run(programs["driver_tour"], "init", broker=address, timeout=120)
    assert v["init"] == "3"
    assert why in err and (address is None or address in err), err


# -- work: modules, launches, streams, events, copies (tests/c/exec_tour.c) ------------------
@pytest.mark.parametrize("kind", ["ptx", "fatbin"])
def test_exec_tour(exec_tour, quota_broker, kind):
    """nvcc's PTX and fatbin of tests/c/kernels.cu, loaded, launched on streams with events,
    globals, memsets, DtoD and unified copies, libraries, and the error paths: the program
    checks each result against a host reference."""
    exe, images = exec_tour
    v, err = run(exe, kind, images[kind], images["cubin"], broker=quota_broker.address("alice"))
    bad = {k: x for k, x in v.items() if k.startswith("check_") and not x.startswith("1")}
    assert not bad and v["failed"] == "0", (bad, err[-3000:])
    assert sum(1 for k in v if k.startswith("check_")) > 100
    # refused launch attributes are named
    assert "CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION (4) with this value is not supported" in err, err
    assert "cooperative launch of 100000 blocks: at most" in err, err
    assert "CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT (7) is not supported" in err, err


@pytest.mark.parametrize("mode", ["threads", "fork"])
def test_exec_threads_and_fork(exec_tour, quota_broker, mode):
    """threads: four threads, each launching on a stream of its own, share the session.
    fork: the child's session is its own, so its parent's module, function and stream
    handles are INVALID_HANDLE there; the parent's still work afterwards."""
    exe, images = exec_tour
    v, err = run(exe, mode, images["ptx"], broker=quota_broker.address("alice"))
    bad = {k: x for k, x in v.items() if k.startswith("check_") and not x.startswith("1")}
    assert not bad and v["failed"] == "0", (bad, err[-3000:])


def test_exec_device_fault_is_sticky(exec_tour, quota_broker):
    """A kernel that traps: the next synchronization says CUDA_ERROR_ILLEGAL_INSTRUCTION, and
    so does every later call on that context, as on a GPU."""
    exe, images = exec_tour
    v, err = run(exe, "fault", images["ptx"], broker=quota_broker.address("alice"))
    bad = {k: x for k, x in v.items() if k.startswith("check_") and not x.startswith("1")}
    assert not bad and v["failed"] == "0", (bad, err[-3000:])


def test_exec_posted_work_runs_without_a_sync(exec_tour, quota_broker):
    """Posted launches wait in the library's push buffer; it leaves on its own after a short
    delay, so a launch the program never synchronizes still runs (the program reads its
    result through the device pointer, its own mapping of the arena)."""
    exe, images = exec_tour
    v, err = run(exe, "posted", images["ptx"], broker=quota_broker.address("alice"))
    bad = {k: x for k, x in v.items() if k.startswith("check_") and not x.startswith("1")}
    assert not bad and v["failed"] == "0", (bad, err[-3000:])
    assert "check_ran_without_sync" in v


def test_exec_launch_rate(exec_tour, quota_broker):
    """Launches are posted without waiting for a reply: many a second even on a loaded
    machine (the figure is printed; the bound is loose)."""
    exe, images = exec_tour
    v, err = run(exe, "bench", images["ptx"], "3000", broker=quota_broker.address("alice"))
    print({k: v[k] for k in ("posted_per_s", "completed_per_s", "launch_sync_per_s")})
    assert float(v["posted_per_s"]) > float(v["launch_sync_per_s"])
    assert float(v["completed_per_s"]) > 100


@pytest.fixture(scope="module")
def more_tour(exec_tour, tmp_path_factory) -> tuple[str, str]:
    """tests/c/more_tour.c built against cuda.h, and the PTX of tests/c/kernels.cu."""
    exe = str(tmp_path_factory.mktemp("native-more") / "more_tour")
    r = subprocess.run([*CC, "-o", exe,
                        os.path.join(HERE, "c", "more_tour.c"), "-I", _cuda_include(), "-L", _libdir(),
                        "-Wl,--no-as-needed", "-l:libcuda.so.1"],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr
    return exe, exec_tour[1]["ptx"]


def test_more_tour(more_tour, quota_broker):
    """Host functions and stream callbacks in stream order (after earlier work, before later
    work), 2D/3D copies of every host/device shape and 2D memsets against host references,
    stream-ordered allocation and pools (attributes, maxSize, the quota's OOM at the byte),
    and their error paths: bad pitches, arrays, unknown pools, shareable handles."""
    exe, ptx = more_tour
    v, err = run(exe, ptx, broker=quota_broker.address("alice"))
    bad = {k: x for k, x in v.items() if k.startswith("check_") and not x.startswith("1")}
    assert not bad and v["failed"] == "0", (bad, err[-3000:])
    assert sum(1 for k in v if k.startswith("check_")) > 100
    # A CPU executor's arena sits in a region programs leave free (broker/arena.py) and the
    # library maps it at the same address: device pointers are then that memory here too,
    # and no allocation has to be moved off the program's own memory.
    assert v.get("arena_identity") == "1", v
    assert "overlaps this program's memory" not in err, err[-3000:]


# -- NVML -------------------------------------------------------------------------------------
BUSY_CLIENT = f"""
import sys, kubecash.client as kc
sys.path.insert(0, {HERE!r})
from kernels import VECADD
with kc.connect() as s:
    d = s.device("cpu0")
    k = d.load_module(VECADD).get_kernel("vadd")
    n = 1 << 18
    a = d.allocate(4 * n)
    print("ready", flush=True)
    while True:
        d.launch(k, (n // 256,), (256,), [a, a, a, n])
        d.synchronize()
"""


def test_nvml_tour(programs, quota_broker):
    """What pynvml-style tools ask, answered as the tenant's: its quota as memory, its share of
    the device as utilisation, its own processes; a busy client of the tenant runs beside."""
    busy = run_client(BUSY_CLIENT, quota_broker.address("alice"))
    try:
        assert busy.stdout.readline().strip() == "ready", busy.stderr.read() if busy.poll() is not None else ""
        with quota_broker.admin() as a:
            wait_for(lambda: a.call("status")["tenants"]["alice"]["devices"]["cpu0"]["share"]["1s"] > 0.3,
                     60, "the busy client's share")
        v, err = run(programs["nvml_tour"], broker=quota_broker.address("alice"))
    finally:
        busy.kill()
        busy.wait()
    assert v["count_before_init"] == "1"                         # NVML_ERROR_UNINITIALIZED
    assert v["init"] == v["init_flags"] == v["count_rc"] == v["handle"] == v["name_rc"] == v["mem_rc"] == "0"
    assert v["count"] == "1" and v["handle_bad"] == "2"
    assert v["name"].startswith("KubeCASH CPU")
    assert int(v["total"]) == QUOTA and int(v["used"]) + int(v["free"]) == QUOTA
    assert int(v["used"]) >= 4 << 18                              # the busy client's buffer
    assert (v["mem2_rc"], int(v["mem2_total"]), v["mem2_sum"]) == ("0", QUOTA, "1")
    assert v["mem2_bad_version"] == "25"                         # NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    # the UUID cuDeviceGetUuid gives (the shim's too), as NVML writes one
    u = hashlib.sha256(f"kubecash:cpu0:{v['name']}".encode()).digest()[:16].hex()
    assert v["uuid_rc"] == "0" and v["uuid"] == f"GPU-{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    assert v["uuid_small"] == "7"                                # NVML_ERROR_INSUFFICIENT_SIZE
    assert (v["by_uuid_rc"], v["by_uuid_same"], v["by_uuid_bad"]) == ("0", "1", "6")   # NOT_FOUND
    assert (v["index_rc"], v["index"], v["cc_rc"], v["cc"]) == ("0", "0", "0", "8.0")
    # the tenant's share of the device's last second, and its own processes
    assert v["util_rc"] == "0" and 30 <= int(v["util_gpu"]) <= 100 and v["util_memory"] == "0", v
    assert (v["procs_count_rc"], v["procs_count"]) == ("7", "1")      # asked with no room: how many
    assert v["procs_rc"] == v["procs_v1_rc"] == "0"
    assert v["procs"] == v["procs_v1"] == str(busy.pid) and v["procs_mem_na"] == "1"
    assert (v["driver_rc"], v["driver"]) == ("0", f"kubecash-{build.package_version()}")
    assert (v["cuda_version_rc"], v["cuda_version"]) == ("0", str(gen.checked_in_driver_version()))
    assert v["temp_1"] == v["temp_2"] == "3"                     # NVML_ERROR_NOT_SUPPORTED
    assert err.count("kubecash: nvmlDeviceGetTemperature is not supported") == 1, err
    assert v["err_string"] == "Not Supported" and v["shutdown"] == "0"


def test_pynvml_on_the_native_library_reports_the_tenant(quota_broker):
    """pynvml itself (no Python-level shim) loading KubeCASH's libnvidia-ml.so.1."""
    pytest.importorskip("pynvml")
    code = """
import json, os, pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
m = pynvml.nvmlDeviceGetMemoryInfo(h)
print(json.dumps({"count": pynvml.nvmlDeviceGetCount(), "name": pynvml.nvmlDeviceGetName(h),
                  "total": m.total, "uuid": pynvml.nvmlDeviceGetUUID(h),
                  "same": pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(pynvml.nvmlDeviceGetUUID(h))),
                  "cc": list(pynvml.nvmlDeviceGetCudaComputeCapability(h)),
                  "util": pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                  "pids": [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)],
                  "cuda": pynvml.nvmlSystemGetCudaDriverVersion(), "driver": pynvml.nvmlSystemGetDriverVersion(),
                  "lib": [l.split()[-1] for l in open("/proc/self/maps") if "libnvidia-ml" in l][0]}))
"""
    env = {k: v for k, v in os.environ.items() if k != "KUBECASH_BROKER"}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=quota_broker.address("alice"), KUBECASH_SHIM="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["lib"].startswith(_libdir()), v                 # ours, not a driver's
    assert (v["count"], v["total"], v["same"], v["cc"]) == (1, QUOTA, 0, [8, 0]) and v["name"].startswith("KubeCASH")
    assert v["uuid"].startswith("GPU-") and 0 <= v["util"] <= 100 and v["pids"] == []   # no device open
    assert v["cuda"] == gen.checked_in_driver_version() and v["driver"] == f"kubecash-{build.package_version()}"


def test_nvml_without_a_broker_is_driver_not_loaded(programs):
    v, err = run(programs["nvml_tour"], broker="ipc:///nonexistent/broker.sock")
    assert v["init"] == "9"                                      # NVML_ERROR_DRIVER_NOT_LOADED
    assert v["count_rc"] == "1"                                  # still uninitialised
    assert "ipc:///nonexistent/broker.sock" in err, err


_CUDA_PYTHON = r"""
import numpy as np
from cuda.bindings import driver as d
ok = d.CUresult.CUDA_SUCCESS
assert d.cuInit(0) == (ok,)
assert d.cuDeviceGetCount() == (ok, 1)
err, dev = d.cuDeviceGet(0)
assert d.cuDeviceTotalMem(dev) == (ok, QUOTA)
err, ctx = d.cuDevicePrimaryCtxRetain(dev)
assert err == ok and d.cuCtxSetCurrent(ctx) == (ok,)
err, p = d.cuMemAlloc(1 << 20)
assert err == ok
a = np.arange(1000, dtype=np.float32)
b = np.zeros_like(a)
assert d.cuMemcpyHtoD(p, a.ctypes.data, a.nbytes) == (ok,)
assert d.cuMemcpyDtoH(b.ctypes.data, p, a.nbytes) == (ok,)
assert (a == b).all()
assert d.cuMemAlloc(QUOTA)[0] == d.CUresult.CUDA_ERROR_OUT_OF_MEMORY
assert d.cuIpcGetMemHandle(p)[0] == d.CUresult.CUDA_ERROR_NOT_SUPPORTED     # nothing cross-process
err, g = d.cuGraphCreate(0)                                                  # graphs: the library's own
assert err == ok and d.cuGraphDestroy(g) == (ok,)
# a kernel from NVRTC (compiled here, in the program), launched on a stream with its arguments
from cuda.bindings import nvrtc
src = b'extern "C" __global__ void scale(float *x, float k, int n) { int i = threadIdx.x; if (i < n) x[i] *= k; }'
err, prog = nvrtc.nvrtcCreateProgram(src, b"scale.cu", 0, [], [])
assert nvrtc.nvrtcCompileProgram(prog, 1, [b"-arch=compute_80"])[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
err, size = nvrtc.nvrtcGetPTXSize(prog)
ptx = b" " * size
assert nvrtc.nvrtcGetPTX(prog, ptx)[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
err, mod = d.cuModuleLoadData(ptx)
assert err == ok, err
err, fn = d.cuModuleGetFunction(mod, b"scale")
assert err == ok, err
err, st = d.cuStreamCreate(0)
assert err == ok, err
args = ((p, 2.0, 1000), (None, __import__("ctypes").c_float, __import__("ctypes").c_int))
assert d.cuLaunchKernel(fn, 1, 1, 1, 1000, 1, 1, 0, st, args, 0) == (ok,)
assert d.cuStreamSynchronize(st) == (ok,)
assert d.cuMemcpyDtoH(b.ctypes.data, p, a.nbytes) == (ok,)
assert (b == 2 * a).all(), b[:8]
assert d.cuStreamDestroy(st) == (ok,) and d.cuModuleUnload(mod) == (ok,)
assert d.cuMemFree(p) == (ok,)
print("done")
"""


def test_cuda_python_bindings_run_on_the_native_driver(quota_broker):
    """cuda-python's compiled bindings dlopen libcuda.so.1 and resolve every call through
    cuGetProcAddress: with the Python shim off, they reach the broker through this library,
    and a kernel NVRTC compiled in the program runs on a stream."""
    pytest.importorskip("cuda.bindings.driver")
    env = dict(os.environ, KUBECASH_BROKER=quota_broker.address("alice"), LD_LIBRARY_PATH=_libdir(),
               KUBECASH_SHIM="0")
    r = subprocess.run([sys.executable, "-c", f"QUOTA = {QUOTA}\n" + _CUDA_PYTHON], env=env,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-3000:]
    assert r.stderr.count("kubecash: cuIpcGetMemHandle is not supported") == 1, r.stderr


_ARENA_COPIES = r"""
import ctypes, os, sys, numpy as np
cu = ctypes.CDLL(os.path.join(sys.argv[1], "libcuda.so.1"))
def ok(rc): assert rc == 0, rc
ok(cu.cuInit(0))
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
ok(cu.cuDeviceGet(ctypes.byref(dev), 0))
ok(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
ok(cu.cuCtxSetCurrent(ctx))
n = 16 << 20
p, q = ctypes.c_uint64(), ctypes.c_uint64()
ok(cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(n + 3)))
ok(cu.cuMemAlloc_v2(ctypes.byref(q), ctypes.c_size_t(4096)))
rng = np.random.default_rng(0)
for size, off in ((1, 0), (3, 1), (65537, 4097), (n, 3)):
    a = rng.integers(0, 256, size, dtype=np.uint8)
    b = np.zeros_like(a)
    ok(cu.cuMemcpyHtoD_v2(ctypes.c_uint64(p.value + off), a.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(size)))
    ok(cu.cuMemcpyDtoH_v2(b.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(p.value + off), ctypes.c_size_t(size)))
    assert (a == b).all(), (size, off)
# past the end of an allocation: the executor refuses it (CUDA_ERROR_INVALID_VALUE)
big = np.zeros(8192, np.uint8)
src = big.ctypes.data_as(ctypes.c_void_p)
assert cu.cuMemcpyHtoD_v2(ctypes.c_uint64(q.value + 100), src, ctypes.c_size_t(8192)) == 1
assert any(line.rstrip().endswith(".arena") for line in open("/proc/self/maps")), "the arena is mapped"
print("done")
"""


def test_native_copies_go_straight_to_the_arena(quota_broker):
    """On a CPU device the library maps the executor's memory arena: copies of every size and
    offset round-trip through one memcpy; a range past an allocation is the executor's to refuse."""
    env = dict(os.environ, KUBECASH_BROKER=quota_broker.address("alice"))
    r = subprocess.run([sys.executable, "-c", _ARENA_COPIES, _libdir()], env=env,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-3000:]


def test_devices_are_found_by_pci_bus_id_in_cuda_and_nvml(broker_factory):
    """What PyTorch's allocator asks before it maps memory (expandable segments): a device's
    PCI bus id (a CPU device's is 0000:00:<index>.0, distinct per device), the device at it
    through cuDeviceGetByPCIBusId and NVML, fabric handles answered unsupported (0, not an
    error), and NVML calls of NVLink reached (every NVML entry point is exported) and refused."""
    pytest.importorskip("pynvml")
    pytest.importorskip("cuda.bindings")
    broker = broker_factory({"alice": {"memory": "256MiB"}}, cpu_devices=2)
    code = """
import json, pynvml
from cuda.bindings import driver as cu
assert cu.cuInit(0)[0] == 0
ids = [cu.cuDeviceGetPCIBusId(32, d)[1].split(b"\\0")[0].decode() for d in range(2)]
back = [int(cu.cuDeviceGetByPCIBusId(i.encode())[1]) for i in ids]
bad = int(cu.cuDeviceGetByPCIBusId(b"0000:00:1f.0")[0])
fabric = cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, 0)
pynvml.nvmlInit()
nv = [pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByPciBusId(i)) for i in ids]
try:
    pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(pynvml.nvmlDeviceGetHandleByIndex(0), 0)
    nvlink = "ok"
except pynvml.NVMLError as e:
    nvlink = e.value
print(json.dumps({"ids": ids, "back": back, "bad": bad, "fabric": [int(fabric[0]), fabric[1]], "nv": nv,
                  "nvlink": nvlink}))
"""
    env = {k: v for k, v in os.environ.items() if k != "KUBECASH_BROKER"}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=broker.address("alice"), KUBECASH_SHIM="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["ids"] == ["0000:00:00.0", "0000:00:01.0"] and v["back"] == [0, 1] and v["nv"] == [0, 1], v
    assert v["bad"] == 101 and v["fabric"] == [0, 0], v        # CUDA_ERROR_INVALID_DEVICE; attribute 0
    assert v["nvlink"] == 3, v                                 # NVML_ERROR_NOT_SUPPORTED
    assert "nvmlDeviceGetNvLinkRemoteDeviceType is not supported" in r.stderr, r.stderr
