"""In-tree PEP 517 backend: setuptools, plus kubecash_shim.pth in every wheel it builds.

The .pth file is what makes `KUBECASH_BROKER=... python program.py` brokered with no change
to the program: site-packages .pth lines run at interpreter start. setuptools has no way to
place a file at the top of site-packages for both regular and editable (PEP 660) installs,
so the built wheel gets it added here, with its RECORD line.

It also compiles KubeCASH's libcuda.so.1 and libnvidia-ml.so.1 (native/build.py) into
native/lib before setuptools collects the package, so wheels and editable installs have them.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import warnings
import zipfile

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook unchanged)

# setuptools tells every editable install of a package-dir layout that it is one ("Editable
# installation ... be careful with folders named like the package"): information, not a
# problem of this project's configuration, so `pip install -e .` stays quiet about it.
try:
    from setuptools.warnings import InformationOnly
    warnings.filterwarnings("ignore", category=InformationOnly)
except ImportError:  # older setuptools: it has no such notice
    pass

PTH_NAME = "kubecash_shim.pth"
# One line, run at every interpreter start: acts only when KUBECASH_BROKER is set and never
# stops the interpreter (kubecash/shim/inject.py, _from_pth).
PTH_LINE = ("import os, sys; exec(\"try:\\n import kubecash.shim.inject as _kc_shim; "
            "_kc_shim._from_pth()\\nexcept Exception as _e:\\n print('kubecash.shim:', _e, "
            "file=sys.stderr)\") if os.environ.get('KUBECASH_BROKER') else None\n")


def _add_pth(wheel_path: str) -> None:
    data = PTH_LINE.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == PTH_NAME:
                continue
            content = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in content.decode().splitlines() if not ln.startswith(PTH_NAME + ",")]
                lines.insert(0, f"{PTH_NAME},sha256={digest},{len(data)}")
                content = ("\n".join(lines) + "\n").encode()
            dst.writestr(item, content)
        dst.writestr(PTH_NAME, data)
    os.replace(tmp, wheel_path)


def _build_native() -> None:
    """native/build.py, loaded by path: nothing of the package is importable yet."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "native", "build.py")
    spec = importlib.util.spec_from_file_location("_kubecash_native_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _build_native()
    name = _orig.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _build_native()       # in place: the editable install imports kubecash.native from native/
    name = _orig.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name
