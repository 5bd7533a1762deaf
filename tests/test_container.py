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

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from podman import Podman, why_not
from test_native_driver import RUN_TIMEOUT, programs  # noqa: F401  (a fixture)
from test_native_samples import built  # noqa: F401  (a fixture)
from toolkit import NO_NVCC, NVCC

ROOTFS = os.environ.get("KUBECASH_CONTAINER_ROOTFS")
# podman 4.3 reads CDI specs from /etc/cdi and /var/run/cdi only (not containers.conf's
# cdi_spec_dirs); /var/run is the one for specs that do not outlive the machine's boot
CDI_DIR = "/var/run/cdi"
QUOTA_MIB = 64
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
