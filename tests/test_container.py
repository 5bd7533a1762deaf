"""A real container given only its CDI device (make test-cdi).

podman runs a Debian 13 rootfs (tools/rootfs.sh) with nothing but `--device
kubecash.io/tenant=<name>`, from the spec `brokerctl cdi` wrote for a real broker on this
host, and two programs mounted read-only: an nvcc-built CUDA sample (static cudart, nvcc's
default) and driver_tour (cc, cuda.h, -lcuda). Inside, they find KubeCASH's libcuda.so.1
through the spec's LD_LIBRARY_PATH, reach the tenant's broker socket through its bind mount,
run kernels and see the tenant's memory quota; the container sees no other tenant's
directory and no /dev node a container without the device lacks.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
from conftest import ROOT, wait_for
from podman import Podman, why_not
from test_native_driver import RUN_TIMEOUT, programs  # noqa: F401  (a fixture)
from test_native_samples import built  # noqa: F401  (a fixture)
from toolkit import NO_NVCC, NVCC

ROOTFS = os.environ.get("KUBECASH_CONTAINER_ROOTFS")
# podman 4.3 reads CDI specs from /etc/cdi and /var/run/cdi only (not containers.conf's
# cdi_spec_dirs); /var/run is the one for specs that do not outlive the machine's boot
CDI_DIR = "/var/run/cdi"
QUOTA_MIB = 64
POD_SECONDS = 16              # the example pod runs until stopped: this long, under contention
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS_IN = "/opt/kubecash-test"

# What the container reports: key=value lines, as the programs print theirs.
SCRIPT = r"""
echo "broker_env=$KUBECASH_BROKER"
echo "ld_library_path=$LD_LIBRARY_PATH"
echo "runtime_dir=$(ls -A /run/kubecash 2>/dev/null | tr '\n' ' ')"
echo "tenant_dirs=$(ls -A /run/kubecash/tenants 2>/dev/null | tr '\n' ' ')"
echo "dev=$(ls -A /dev | sort | tr '\n' ' ')"
echo "host_runtime_dir=$(test -e "$1" && echo visible || echo absent)"
[ "$2" = run ] || exit 0
"$0"/vector_add-static
echo "sample_rc=$?"
"$0"/driver_tour tour
echo "tour_rc=$?"
"""


def _values(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _brokerctl(broker, *args: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "brokerctl")
    r = subprocess.run([exe, "--runtime-dir", broker.runtime_dir, *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"brokerctl {' '.join(args)}: {r.stderr}"
    return r.stdout


@pytest.fixture
def podman(tmp_path):
    why = why_not(ROOTFS, "test-cdi")
    if why:
        pytest.skip(why)
    if NVCC is None:
        pytest.skip(NO_NVCC)
    return Podman(tmp_path)


@pytest.fixture
def broker(broker_factory):
    """The tests' broker, with heartbeats given longer: a container's Python starts slowly
    beside a tenant saturating the device on a loaded 2-core machine."""
    return broker_factory(heartbeat_timeout_s=15.0)


@pytest.fixture
def tenant(broker):
    """A dynamic tenant, as the DRA driver makes one for a claim, and the node's CDI spec
    (every tenant) written by brokerctl where podman reads it."""
    name = f"pod-{uuid.uuid4().hex[:8]}"
    _brokerctl(broker, "tenant", "add", name, "--memory", f"{QUOTA_MIB}MiB", "--limit", "0.25")
    os.makedirs(CDI_DIR, exist_ok=True)
    spec = os.path.join(CDI_DIR, f"kubecash-test-{name}.json")
    _brokerctl(broker, "cdi", "-o", spec)
    try:
        yield name, spec
    finally:
        os.unlink(spec)
        _brokerctl(broker, "tenant", "remove", name)


def _run(podman, broker, progdir: str, script_arg: str, *device: str) -> dict[str, str]:
    p = podman("run", "--rm", "--network", "none", *device, "-v", f"{progdir}:{PROGRAMS_IN}:ro",
               "--rootfs", f"{ROOTFS}:O", "/bin/sh", "-c", SCRIPT, PROGRAMS_IN, broker.runtime_dir, script_arg,
               check=False, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, f"podman run: rc {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
    return {**_values(p.stdout), "stdout": p.stdout, "stderr": p.stderr}


def test_a_container_given_its_cdi_device_runs_kernels_in_its_tenant_and_reaches_nothing_else(
        podman, broker, tenant, built, programs, tmp_path):  # noqa: F811
    name, spec_path = tenant
    with open(spec_path) as f:
        spec = json.load(f)
    # the version podman's CDI library reads (1.0.0 and 0.6.0 are refused by podman 4.3)
    assert spec["cdiVersion"] == "0.3.0", spec["cdiVersion"]
    progdir = tmp_path / "programs"
    progdir.mkdir()
    shutil.copy(built("vector_add", "static"), progdir / "vector_add-static")
    shutil.copy(programs["driver_tour"], progdir / "driver_tour")

    bare = _run(podman, broker, str(progdir), "look")
    v = _run(podman, broker, str(progdir), "run", "--device", f"kubecash.io/tenant={name}")
    out = f"{v['stdout']}\n{v['stderr'][-3000:]}"

    # what the spec gave it: the socket, the libraries, and nothing else
    assert v["broker_env"] == f"ipc:///run/kubecash/tenants/{name}/broker.sock", out
    assert v["ld_library_path"].startswith("/usr/local/lib/kubecash:"), out
    assert v["runtime_dir"].split() == ["tenants"], out      # no admin socket
    assert v["tenant_dirs"].split() == [name], out            # not alice's, not bob's
    assert bare["tenant_dirs"] == "", bare["stdout"]
    assert v["dev"] == bare["dev"], (v["dev"], bare["dev"])   # no /dev node of any kind
    assert v["host_runtime_dir"] == "absent", out

    # it reached its tenant: kernels ran, under its quota
    assert v["sample_rc"] == "0" and "OK vector_add" in v["stdout"], out
    assert v["tour_rc"] == "0" and v["init"] == "0" and v["count"] == "1", out
    assert int(v["mem_info_total"]) == QUOTA_MIB << 20, out   # the tenant's memory, not the machine's
    assert v["over_quota"] == "2", out                         # CUDA_ERROR_OUT_OF_MEMORY
    assert v["sync"] == "0", out
    st = broker.admin().call("status")["tenants"]
    assert st[name]["devices"]["cpu0"]["kernels"] > 0, st[name]
    assert st[name]["devices"]["cpu0"]["limit"] == 0.25, st[name]
    for other in ("alice", "bob"):
        assert st[other]["devices"]["cpu0"]["kernels"] == 0, st[other]


# -- a pod's claim, prepared as the kubelet has the DRA driver prepare it --------------------
def _example(kind: str) -> dict:
    import yaml
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "example", "*.yaml"))):
        with open(path) as f:
            for d in yaml.safe_load_all(f):
                if d and d["kind"] == kind:
                    return d
    raise AssertionError(f"no {kind} in deploy/kubernetes/example")


def test_the_example_pods_claim_runs_its_container_at_a_quarter_and_6_gib(podman, broker, programs, tmp_path):  # noqa: E501,F811
    """deploy/kubernetes/example: the claim (0.25 of a device, 6 GiB) allocated as the
    scheduler would, prepared over the kubelet's gRPC by a real kubecash-dra, and the pod's
    own command run in podman from the CDI device the driver returned, with the pod's
    securityContext (its uid:gid, no capability, no privilege escalation) and the image's PATH."""
    pytest.importorskip("grpc", reason="the kubernetes extra (grpcio) runs the DRA driver")
    from test_dra import Dra, allocated, result
    from test_scheduling import start_worker, window

    claim, klass, pod = _example("ResourceClaim"), _example("DeviceClass"), _example("Pod")
    req = claim["spec"]["devices"]["requests"][0]
    assert req["exactly"]["deviceClassName"] == klass["metadata"]["name"]
    capacity = req["exactly"]["capacity"]["requests"]
    assert capacity == {"share": "250m", "memory": "6Gi"}
    claim["metadata"]["uid"] = str(uuid.uuid4())
    claim = allocated(claim, klass, result(share=capacity["share"], memory=capacity["memory"], request=req["name"]))

    base = tempfile.mkdtemp(prefix="kc-dra-", dir="/tmp")
    dra = Dra(broker, base, cdi_dir=CDI_DIR, container_runtime_dir="/run/kubecash")
    dra.start()
    ref = dra.put(claim)
    tenant = "k8s-" + ref.uid
    hog = None
    try:
        resp = dra.prepare(ref).claims[ref.uid]
        assert resp.error == "", resp.error
        (cdi_id,) = resp.devices[0].cdi_device_ids
        with open(os.path.join(CDI_DIR, f"kubecash.io-{tenant}.json")) as f:
            assert json.load(f)["cdiVersion"] == "0.3.0"     # what podman 4.3 reads

        progdir = tmp_path / "programs"
        progdir.mkdir()
        shutil.copy(programs["driver_tour"], progdir / "driver_tour")
        (main,) = pod["spec"]["containers"]
        sc = main["securityContext"]
        user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
        assert sc["runAsNonRoot"] and sc["capabilities"] == {"drop": ["ALL"]} and not sc["allowPrivilegeEscalation"]
        assert [c["name"] for c in main["resources"]["claims"]] == [pod["spec"]["resourceClaims"][0]["name"]]
        # the pod's command, for a while (it runs until stopped), then driver_tour's view
        pod_cmd = " ".join(shlex.quote(a) for a in main["command"])
        script = f"timeout -s INT {POD_SECONDS} {pod_cmd}; echo pod_rc=$?; {PROGRAMS_IN}/driver_tour tour"
        hog = start_worker(broker, "alice", POD_SECONDS + 30)           # saturates cpu0 meanwhile
        ctr = subprocess.Popen(
            ["podman", "run", "--rm", "--network", "none", "--device", cdi_id, "--user", user,
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "-e", f"PATH=/opt/venv/bin:{IMAGE_PATH}", "-v", f"{progdir}:{PROGRAMS_IN}:ro",
             "--rootfs", f"{ROOTFS}:O", "/bin/sh", "-c", script],
            env=podman.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with broker.admin() as a:
            # its fill loop's memsets run under the device's lease: device time, not kernels
            wait_for(lambda: a.call("status")["tenants"][tenant]["devices"]["cpu0"]["used_ns"] > 0
                     or ctr.poll() is not None, RUN_TIMEOUT, "the pod's first work on the device")
            assert ctr.poll() is None, ctr.communicate()
            used, wall = window(a, [tenant, "alice"], POD_SECONDS / 2)
            q = a.call("status")["tenants"][tenant]["devices"]["cpu0"]
        out, err = ctr.communicate(timeout=RUN_TIMEOUT)
        v = _values(out)
        said = f"{out}\n{err[-3000:]}"
        assert ctr.returncode == 0 and v["pod_rc"] in ("124", "130"), said    # stopped by timeout
        assert "KubeCASH CPU" in out and ": 6 GiB," in out, said              # the pod's own line
        assert int(v["mem_info_total"]) == 6 << 30 and v["over_quota"] == "2", said
        assert (q["limit"], q["memory_limit"], q["weight"], q["class"]) == (0.25, 6 << 30, 200, "latency")
        # its share is held to its claim against a tenant that would take the whole device
        share = {t: u / wall for t, u in used.items()}
        print(f"pod share {share[tenant]:.4f}, alice {share['alice']:.4f} over {wall:.1f} s")
        assert 0 < share[tenant] <= 0.25 + 0.05, share
        assert share["alice"] > share[tenant], share
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        assert dra.unprepare(ref).claims[ref.uid].error == ""
        dra.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert not os.path.exists(os.path.join(CDI_DIR, f"kubecash.io-{tenant}.json"))
