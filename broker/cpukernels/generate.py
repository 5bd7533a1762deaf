"""The generated code appended after the tenant text: the runtime (part 2 of kubecash_cuda.h)
and the tables of kernels and variables the module exports."""
from __future__ import annotations

from .analyze import Analysis

# Bump whenever the generated code or its contract with the header changes: part of the
# cache key, so stale .so files are never reused.
GENERATOR_VERSION = "kubecash-cpukernels-4"


def generate(an: Analysis) -> str:
    """Code appended after the tenant text: the runtime and the tables it exports."""
    g = ['#line 1 "<kubecash-generated>"',
         f"#define __KC_FIBERS {1 if an.fibers else 0}",
         "#define __KC_RUNTIME__ 1",
         '#include "kubecash_cuda.h"',
         "namespace __kc { static void extern_shared_hook(void* p) {"]
    g += [f"    ::{q} = static_cast<decltype(::{q})>(p);" for q in an.extern_shared_globals]
    g.append("    (void)p; } }")
    g.append("static const ::__kc::KernelEntry __kc_kernel_table[] = {")
    g += [f'    __KC_KERNEL("{n}", "{q}", ::{q})' for n, q in an.kernels]
    g.append("    { nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr } };")
    g.append("static const ::__kc::VarEntry __kc_var_table[] = {")
    g += [f'    __KC_VAR("{n}", "{q}", ::{q})' for n, q in an.variables]
    g.append("    { nullptr, nullptr, nullptr, 0 } };")
    g.append("__KC_EXPORTS")
    return "\n".join(g) + "\n"
