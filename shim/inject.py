"""Injection: a meta-path finder that makes cuda-python's and pynvml's module names resolve
to the brokered modules.

`install()` is called at interpreter start by the kubecash_shim.pth file the package
installs into site-packages (only when KUBECASH_BROKER is set), or by
`python -m kubecash.shim program.py`. This module imports nothing heavy: the shim itself
(zmq, the client) loads only when the program imports a CUDA module.

The real modules are still needed (their types, enums and NVRTC): the loader imports each
one under its own name while the finder steps aside for that name, then puts the brokered
module in its place in sys.modules, so the program (and anything it imports later) only
ever sees the brokered one.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading

# The one declaration of both, in the table. table.py imports nothing (it is data), so this
# module stays light enough for the .pth line that runs at every interpreter start.
from .table import ALIASES, REFUSED_MODULES

ENV = "KUBECASH_BROKER"

_bypass = threading.local()      # names being imported for real by this thread
_real: dict[str, object] = {}    # canonical name -> the real module
_lock = threading.RLock()


def _bypassed() -> set[str]:
    s = getattr(_bypass, "names", None)
    if s is None:
        s = _bypass.names = set()
    return s


def import_real(name: str):
    """The real module `name`, imported under its own name and kept out of sys.modules."""
    with _lock:
        if name in _real:
            return _real[name]
        names = _bypassed()
        saved = sys.modules.pop(name, None)
        names.add(name)
        try:
            mod = importlib.import_module(name)
        finally:
            names.discard(name)
            if saved is not None:
                sys.modules[name] = saved
            else:
                sys.modules.pop(name, None)
        _unbind(name, mod, saved)
        _real[name] = mod
        return mod


def _unbind(name: str, real, replacement=None) -> None:
    """`from package import module` reads the package attribute: never leave the real one."""
    parent, _, child = name.rpartition(".")
    pkg = sys.modules.get(parent) if parent else None
    if pkg is not None and getattr(pkg, child, None) is real:
        if replacement is not None:
            setattr(pkg, child, replacement)
        else:
            delattr(pkg, child)


class _Loader(importlib.abc.Loader):
    def __init__(self, fullname: str, canonical: str):
        self.fullname, self.canonical = fullname, canonical

    def create_module(self, spec):
        if self.fullname != self.canonical:          # a legacy name: the same module object
            return importlib.import_module(self.canonical)
        return None

    def exec_module(self, module) -> None:
        if self.fullname != self.canonical:
            return
        from . import build
        real = import_real(self.canonical)
        impls = _implementations(self.canonical, real)
        build.populate(module, ALIASES[self.canonical], real, impls)


def _implementations(canonical: str, real):
    if canonical == "cuda.bindings.driver":
        from . import driver
        driver.bind(real)
        return driver
    if canonical == "cuda.bindings.runtime":
        from . import driver, runtime
        runtime.real = real
        runtime.real_driver = import_real("cuda.bindings.driver")
        driver.bind(runtime.real_driver)
        return runtime
    if canonical == "cuda.bindings.nvrtc":
        from . import nvrtc
        nvrtc.real = real
        return nvrtc
    if canonical == "cuda.bindings._v2.nvrtc":
        from . import nvrtc
        nvrtc.real_v2 = real
        return nvrtc
    from . import nvml
    nvml.real = real
    return nvml


class _RefusingLoader(importlib.abc.Loader):
    """A module the shim cannot broker: importing it fails, saying why."""

    def __init__(self, reason: str):
        self.reason = reason

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        raise ImportError(f"kubecash.shim: {self.reason}", name=module.__name__)


def _refused(fullname: str) -> str | None:
    for name, reason in REFUSED_MODULES.items():
        if fullname == name or fullname.startswith(name + "."):
            return reason
    return None


class ShimFinder(importlib.abc.MetaPathFinder):
    """Resolves the CUDA module names to brokered modules (and refuses the ones it cannot
    broker)."""

    def find_spec(self, fullname, path=None, target=None):
        reason = _refused(fullname)
        if reason is not None:
            return importlib.machinery.ModuleSpec(fullname, _RefusingLoader(reason), origin="kubecash.shim")
        canonical = ALIASES.get(fullname)
        if canonical is None or fullname in _bypassed():
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(fullname, canonical),
                                              origin="kubecash.shim")


_FINDER = ShimFinder()


def installed() -> bool:
    return _FINDER in sys.meta_path


def install() -> None:
    """Put the finder first on sys.meta_path (idempotent). Modules of these names that were
    imported before are dropped so the next import gets the brokered ones."""
    with _lock:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        for name in ALIASES:
            mod = sys.modules.get(name)
            if mod is not None and not getattr(mod, "__kubecash_shim__", None):
                # Keep the real module: a Cython extension cannot be initialised twice.
                _real.setdefault(name, mod)
                del sys.modules[name]
                _unbind(name, mod)


def _from_pth() -> None:
    """Run by kubecash_shim.pth at every interpreter start: acts only when $KUBECASH_BROKER
    is set; never lets a problem here stop the interpreter."""
    if not os.environ.get(ENV) or os.environ.get("KUBECASH_SHIM") == "0" or _is_broker():
        return
    try:
        install()
    except Exception as e:  # pragma: no cover - a broken shim must not break Python
        print(f"kubecash.shim: not installed: {e}", file=sys.stderr)


def _is_broker() -> bool:
    """KubeCASH's own daemons use the real pynvml (device discovery) even if started with
    KUBECASH_BROKER in their environment."""
    argv = list(getattr(sys, "orig_argv", ()) or ())
    for i, a in enumerate(argv[1:], 1):
        if a == "-m":
            return i + 1 < len(argv) and argv[i + 1].startswith("kubecash.broker")
        if not a.startswith("-"):
            return os.path.basename(a) in ("kubecash-broker", "brokerctl")
    return False
