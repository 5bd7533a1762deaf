"""The gRPC stubs in `proto/`, generated from the kubelet's published .proto files.

Checked in (not generated at build time) so that installing needs no grpcio-tools and the
build backend stays as it is; reproducible: `python -m kubecash.broker.k8s.gen [PROTO_ROOT]`
regenerates them, and tests/test_dra.py regenerates into a temporary directory and compares
byte for byte (grpcio-tools is pinned in the test extra: its protoc's version is in the
output). PROTO_ROOT is a copy of kubernetes/kubelet's tree (../shared/k8s-protos).

Each api.proto is copied unchanged under a distinct name in this package's path, then
    python -m grpc_tools.protoc -I <tmp> --python_out=<tmp> --grpc_python_out=<tmp> \
        kubecash/broker/k8s/proto/<name>.proto
so the generated imports are `kubecash.broker.k8s.proto.<name>_pb2` and no two files are
registered as "api.proto" in protobuf's descriptor pool. Only file names change: packages,
services and messages (all the wire sees: /k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/...) are
the kubelet's.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

# generated module name -> the published file, relative to the proto root
PROTOS = {
    "dra_v1": "pkg/apis/dra/v1/api.proto",
    "pluginregistration_v1": "pkg/apis/pluginregistration/v1/api.proto",
    "deviceplugin_v1beta1": "pkg/apis/deviceplugin/v1beta1/api.proto",
    "podresources_v1": "pkg/apis/podresources/v1/api.proto",
}
PACKAGE_PATH = "kubecash/broker/k8s/proto"
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proto")


def generate(proto_root: str, out_dir: str) -> list[str]:
    """Write the stubs into `out_dir`; returns the file names written."""
    from grpc_tools import protoc
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, PACKAGE_PATH)
        os.makedirs(pkg)
        for name, rel in PROTOS.items():
            shutil.copyfile(os.path.join(proto_root, rel), os.path.join(pkg, name + ".proto"))
            rc = protoc.main(["grpc_tools.protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                              f"{PACKAGE_PATH}/{name}.proto"])
            if rc != 0:
                raise RuntimeError(f"protoc failed on {rel} (exit {rc})")
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
                shutil.copyfile(os.path.join(pkg, name + suffix), os.path.join(out_dir, name + suffix))
                written.append(name + suffix)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "k8s-protos")
    for f in generate(root, HERE):
        print(f"wrote {os.path.join(HERE, f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
