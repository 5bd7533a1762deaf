"""kubecash.shim: unmodified cuda-python programs, brokered.

With kubecash installed and KUBECASH_BROKER set, imports of cuda.bindings.driver,
cuda.bindings.runtime, cuda.bindings.nvrtc (and its pythonic cuda.bindings._v2.nvrtc), the
legacy cuda.cuda / cuda.cudart / cuda.nvrtc and pynvml resolve to brokered modules with
cuda-python's own signatures, return tuples, result enums and handle types. The
kubecash_shim.pth file installed into site-packages does this at interpreter start;
`python -m kubecash.shim program.py args...` does it for one program.

What is intercepted, and how, is declared in one table: kubecash.shim.table.
"""
from .inject import install, installed

__all__ = ["install", "installed"]
