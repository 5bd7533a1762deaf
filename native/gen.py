"""Generate the C surface of libcuda.so.1 and libnvidia-ml.so.1 from the CUDA headers, the
table (native/table.py), the protocol declaration and shim/devattr.py's attribute table.

    python -m kubecash.native.gen            # rewrite native/src/gen_*.{c,h}
    python -m kubecash.native.gen --check    # exit 1 if they differ from what is checked in

The outputs are checked in: building the libraries needs neither the headers nor the toolkit.
Exported names come from cuda.h preprocessed three ways (plain, per-thread default stream,
and __CUDA_API_VERSION_INTERNAL, which declares the legacy unversioned names): their union is
what NVIDIA's libcuda.so.1 exports, with the profiler's three (cudaProfilerTypedefs.h).
cuGetProcAddress's (name, version, stream flavour) -> symbol map comes from cudaTypedefs.h's
PFN_cuXxx_vNNNN[_ptds|_ptsz] typedefs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
GENERATED = ("gen_surface.c", "gen_devattr.c", "gen_protocol.h", "gen_nvml.c")

_DEFINE_SETS = ([], ["-DCUDA_API_PER_THREAD_DEFAULT_STREAM"], ["-D__CUDA_API_VERSION_INTERNAL"])
# A declaration, not a static inline helper (cuda.h defines cuGetProcAddress_v2_ptsz inline).
_DECL = re.compile(r"(?<!inline )\bCUresult\s+(cu\w+)\s*\(")
_PFN = re.compile(r"typedef\s+CUresult\s*\(\s*CUDAAPI\s+\*PFN_(cu\w+?)_v(\d{4,6})(_ptds|_ptsz)?\)")
_ERR = re.compile(r"/\*\*((?:(?!\*/).)*?)\*/\s*(CUDA_(?:SUCCESS|ERROR_\w+))\s*=\s*(\d+)", re.S)
_ATTR = re.compile(r"\bCU_DEVICE_ATTRIBUTE_(\w+)\s*=\s*(\d+)")
_RENAME = re.compile(r"^#define\s+(cu\w+)\s+(cu\w+)\s*$", re.M)
_VERSION = re.compile(r"#define\s+CUDA_VERSION\s+(\d+)")


class GenError(Exception):
    pass


def include_dirs() -> list[str]:
    """Every CUDA include directory here holding cuda.h and cudaTypedefs.h: the pip package
    nvidia-cuda-runtime's (via cuda-pathfinder's search where it has one) and the toolkit's."""
    found: list[str] = []
    try:
        import nvidia.cu13  # the pip package's namespace (nvidia-cuda-runtime 13.x)
        for p in nvidia.cu13.__path__:
            found.append(os.path.join(p, "include"))
    except ImportError:
        pass
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        d = find_nvidia_header_directory("cudart")
        if d:
            found.append(d)
    except Exception:  # absent, or an older cuda-pathfinder without the function
        pass
    found.append("/usr/local/cuda/include")
    out: list[str] = []
    for d in found:
        d = os.path.realpath(d)
        if d not in out and all(os.path.isfile(os.path.join(d, f)) for f in ("cuda.h", "cudaTypedefs.h")):
            out.append(d)
    return out


def cuda_version(inc: str) -> int:
    with open(os.path.join(inc, "cuda.h")) as f:
        m = _VERSION.search(f.read())
    if not m:
        raise GenError(f"{inc}/cuda.h has no CUDA_VERSION")
    return int(m.group(1))


def exported_names(inc: str) -> set[str]:
    names: set[str] = set()
    for defs in _DEFINE_SETS:
        r = subprocess.run([os.environ.get("CC", "cc"), "-E", "-P", *defs, "-I", inc, "-x", "c", "-"],
                           input="#include <cuda.h>\n", capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise GenError(f"preprocessing {inc}/cuda.h {' '.join(defs)} failed: {r.stderr[-2000:]}")
        names |= set(_DECL.findall(r.stdout))
    if len(names) < 300:
        raise GenError(f"only {len(names)} driver functions found in {inc}/cuda.h")
    return names


def pfn_entries(inc: str) -> set[tuple[str, int, str]]:
    with open(os.path.join(inc, "cudaTypedefs.h")) as f:
        return {(b, int(v), s or "") for b, v, s in _PFN.findall(f.read())}


def profiler_entries(inc: str) -> set[tuple[str, int, str]]:
    """cuProfilerStart/Stop/Initialize: declared by cudaProfiler.h, not cuda.h, yet exported by
    NVIDIA's libcuda.so.1 and resolved by cudart (cudaProfilerStart); cudaProfilerTypedefs.h,
    which the toolkit and the pip package both ship, names them with their versions."""
    path = os.path.join(inc, "cudaProfilerTypedefs.h")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {(b, int(v), s or "") for b, v, s in _PFN.findall(f.read())}


def renames(inc: str) -> dict[str, str]:
    """cuda.h's `#define cuXxx cuYyy` where the newest version of cuXxx has another name
    (cuGraphInstantiate -> cuGraphInstantiateWithFlags), not a cuXxx_vN."""
    with open(os.path.join(inc, "cuda.h")) as f:
        return {a: b for a, b in _RENAME.findall(f.read()) if not re.fullmatch(re.escape(a) + r"_v\d+", b)}


def _versioned(base: str, k: int) -> str:
    return base if k == 1 else f"{base}_v{k}"


def proc_map(names: set[str], pfns: set[tuple[str, int, str]],
             renamed: dict[str, str]) -> list[tuple[str, int, int, str]]:
    """(name, version, per-thread flavour 0/1, symbol), sorted. A base name's plain versions,
    in order, are its exported base, base_v2, base_v3... (the newest may be renamed, see
    renames()); a _ptds/_ptsz entry is the symbol of
    its version (the latest plain one at or before it) with that suffix."""
    by_base: dict[str, dict[str, list[int]]] = {}
    for base, ver, suffix in pfns:
        by_base.setdefault(base, {}).setdefault(suffix, []).append(ver)
    out: list[tuple[str, int, int, str]] = []
    problems: list[str] = []
    for base, flavours in sorted(by_base.items()):
        plain = sorted(flavours.get("", []))
        cands = [_versioned(base, k) for k in range(1, 16) if _versioned(base, k) in names]
        sym_of: dict[int, str] = {}
        if plain:
            if len(cands) == len(plain) - 1 and renamed.get(base) in names:
                cands.append(renamed[base])
            if len(cands) != len(plain):
                problems.append(f"{base}: versions {plain} vs symbols {cands}")
                continue
            for ver, sym in zip(plain, cands, strict=True):
                sym_of[ver] = sym
                out.append((base, ver, 0, sym))
        for suffix in ("_ptds", "_ptsz"):
            for ver in sorted(flavours.get(suffix, [])):
                earlier = [v for v in sym_of if v <= ver]
                stem = sym_of[max(earlier)] if earlier else base
                sym = stem + suffix
                if sym not in names:
                    problems.append(f"{base}_v{ver}{suffix}: no exported {sym}")
                    continue
                out.append((base, ver, 1, sym))
    unmapped = sorted(names - {sym for *_, sym in out})
    if unmapped:
        problems.append(f"exported but not reachable through cuGetProcAddress: {unmapped}")
    if problems:
        raise GenError("cudaTypedefs.h does not line up with cuda.h:\n  " + "\n  ".join(problems))
    return sorted(out)


def error_codes(inc: str) -> list[tuple[int, str, str]]:
    from kubecash.client import errors as kce
    with open(os.path.join(inc, "cuda.h")) as f:
        text = f.read()
    out = []
    for doc, name, num in _ERR.findall(text):
        try:
            s = kce.ERROR_STRINGS[kce.CUresult[name]]
        except KeyError:      # no short text known: the header's first sentence
            s = " ".join(re.sub(r"\\\w+\s+|::", "", doc).replace("*", " ").split())
            s = s.split(". ")[0].rstrip(".")
        out.append((int(num), name, s))
    return sorted(set(out))


def attributes(inc: str) -> list[tuple[int, str, str, str, int, int]]:
    """(CUdevice_attribute number, name, kind, property key, index, value) for every attribute
    shim/devattr.py answers: kind "prop" (key[index] of the device description), "const"
    (value), "cpu" (value on a CPU device, refused on others) or "on_cpu" (value on a CPU
    device, index on others)."""
    from kubecash.shim import devattr
    with open(os.path.join(inc, "cuda.h")) as f:
        nums = {n: int(v) for n, v in _ATTR.findall(f.read())}
    out = {}
    for name, get in devattr.ATTRIBUTES.items():
        if name not in nums:
            raise GenError(f"shim/devattr.py answers {name}, which cuda.h does not declare")
        if not isinstance(get, types.FunctionType) or get.__closure__ is None:
            raise GenError(f"devattr {name}: not one of _p/_const/_cpu/_on_cpu")
        maker = get.__qualname__.split(".")[0]
        cells = dict(zip(get.__code__.co_freevars, (c.cell_contents for c in get.__closure__), strict=True))
        if maker == "_p":
            row = ("prop", cells["key"], -1 if cells["i"] is None else cells["i"], 0)
        elif maker == "_const":
            row = ("const", "", -1, cells["v"])
        elif maker == "_cpu":
            row = ("cpu", "", -1, cells["if_cpu"])
        elif maker == "_on_cpu":
            row = ("on_cpu", "", cells["otherwise"], cells["if_cpu"])
        else:
            raise GenError(f"devattr {name}: made by {maker}, which this generator does not know")
        out.setdefault(nums[name], (nums[name], name, *row))
    return sorted(out.values())


def _c_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _banner(incs: list[str], what: str) -> str:
    vers = ", ".join(str(cuda_version(i)) for i in incs)
    return (f"/* Generated by native/gen.py from {what} (CUDA headers: CUDA_VERSION {vers}).\n"
            f" * Do not edit: change native/table.py or the generator and rerun it. */\n")


def gen_surface(incs: list[str]) -> str:
    from kubecash.native import table
    names: set[str] = set()
    pfns: set[tuple[str, int, str]] = set()
    renamed: dict[str, str] = {}
    for inc in incs:
        names |= exported_names(inc)
        pfns |= pfn_entries(inc)
        prof = profiler_entries(inc)
        pfns |= prof
        names |= {b for b, _, _ in prof}
        renamed.update(renames(inc))
    unknown = sorted(set(table.DRIVER) - names)
    if unknown:
        raise GenError(f"native/table.py names symbols the headers do not declare: {unknown}")
    procs = proc_map(names, pfns, renamed)
    codes = error_codes(incs[0])
    version = max(cuda_version(i) for i in incs)
    lines = [_banner(incs, "cuda.h, cudaTypedefs.h and native/table.py"), '#include "kc.h"\n',
             f"const int kc_driver_version = {version};\n",
             "/* Every driver entry point the table does not implement: CUDA_ERROR_NOT_SUPPORTED. */"]
    lines += [f"KC_STUB({n})" for n in sorted(names - set(table.DRIVER))]
    lines.append("\n/* Declarations for the address table below (the definitions' real prototypes live"
                 "\n * in cuda_api.c and the stubs above; only addresses are taken here). */")
    lines += [f"extern CUresult {n}(void);" for n in sorted({p[3] for p in procs})]
    lines.append("\n/* cuGetProcAddress: (name, version, per-thread stream flavour) -> symbol, sorted. */")
    lines.append("const struct kc_proc kc_procs[] = {")
    lines += [f"    {{{_c_str(b)}, {v}, {f}, (void *){s}}}," for b, v, f, s in procs]
    lines.append("};\n")
    lines.append(f"const int kc_nprocs = {len(procs)};\n")
    lines.append("/* CUresult codes: names from cuda.h, short texts from kubecash.client.errors. */")
    lines.append("const struct kc_errname kc_errnames[] = {")
    lines += [f"    {{{num}, {_c_str(n)}, {_c_str(s)}}}," for num, n, s in codes]
    lines.append("};\n")
    lines.append(f"const int kc_nerrnames = {len(codes)};")
    return "\n".join(lines) + "\n"


def gen_devattr(incs: list[str]) -> str:
    rows = attributes(incs[0])
    lines = [_banner(incs, "shim/devattr.py's ATTRIBUTES and cuda.h's CUdevice_attribute"),
             '#include "kc.h"\n', "const struct kc_attr kc_attrs[] = {"]
    kinds = {"prop": "KC_ATTR_PROP", "const": "KC_ATTR_CONST", "cpu": "KC_ATTR_CPU", "on_cpu": "KC_ATTR_ON_CPU"}
    lines += [f"    {{{num}, {kinds[k]}, {_c_str(key)}, {i}, {v}}},  /* {name} */"
              for num, name, k, key, i, v in rows]
    lines.append("};\n")
    lines.append(f"const int kc_nattrs = {len(rows)};")
    return "\n".join(lines) + "\n"


def gen_protocol() -> str:
    """Op and field names of the messages the C side uses, from kubecash-protocol's export:
    the C code spells them only through these macros, so a renamed field is a compile error."""
    from kubecash.client import protocol as P
    from kubecash.native import table
    ex = P.export()
    msgs = {(m["channel"], m["name"]): m for m in ex["messages"]}
    lines = ["/* Generated by native/gen.py from kubecash.client.protocol.export(). Do not edit. */",
             "#ifndef KC_GEN_PROTOCOL_H", "#define KC_GEN_PROTOCOL_H",
             f"#define KCP_VERSION {ex['version']}",
             f"#define KCP_INLINE_MAX {ex['limits']['inline_max']}",
             f"#define KCP_BATCH_MAX_OPS {ex['limits']['batch_max_ops']}",
             f"#define KCP_BATCH_MAX_BYTES {ex['limits']['batch_max_bytes']}",
             f"#define KCP_BATCH_DELAY_US {ex['limits']['batch_delay_us']}",
             f"#define KCP_VMM_GRANULARITY {ex['limits']['vmm_granularity']}"]
    for k in ex["envelope"]:
        lines.append(f"#define KCP_ENV_{k.upper()} {_c_str(k)}")
    for chan, names in table.MESSAGES_USED.items():
        for name in names:
            m = msgs.get((chan, name))
            if m is None:
                raise GenError(f"native/table.py uses {chan} message {name}, which the protocol lacks")
            stem = f"KCP_{chan.upper()}_{name.upper()}"
            lines.append(f"#define {stem} {_c_str(name)}")
            for f, spec in m["fields"].items():
                lines.append(f"#define {stem}_{f.upper()} {_c_str(f)}  /* {'/'.join(spec['type'])}"
                             f"{'' if spec['required'] else ', optional'} */")
            for f, spec in (m["reply"] or {}).items():
                lines.append(f"#define {stem}_R_{f.upper()} {_c_str(f)}  /* {'/'.join(spec['type'])} */")
    lines.append("#endif")
    return "\n".join(lines) + "\n"


_DRIVER_VERSION = re.compile(r"^const int kc_driver_version = (\d+);$", re.M)


def checked_in_driver_version() -> int:
    """The CUDA version libcuda.so.1 reports: the one gen_surface.c was made with."""
    with open(os.path.join(SRC, "gen_surface.c")) as f:
        m = _DRIVER_VERSION.search(f.read())
    if not m:
        raise GenError("gen_surface.c has no kc_driver_version")
    return int(m.group(1))


_NVML_FN = re.compile(r'_nvmlGetFunctionPointer\(\s*"(nvml\w+)"\s*\)')


def nvml_surface() -> tuple[str, list[str]]:
    """Every NVML entry point there is, as NVIDIA's own bindings (nvidia-ml-py's pynvml, kept
    in step with nvml.h, which no package here ships) look them up: their version, the names."""
    import importlib.metadata
    import importlib.util
    spec = importlib.util.find_spec("pynvml")
    if spec is None or not spec.origin:
        raise GenError("pynvml (pip nvidia-ml-py) is not installed: it lists the NVML entry points")
    with open(spec.origin) as f:
        names = sorted(set(_NVML_FN.findall(f.read())))
    if len(names) < 100:
        raise GenError(f"{spec.origin} names only {len(names)} NVML entry points: not nvidia-ml-py's pynvml?")
    return importlib.metadata.version("nvidia-ml-py"), names


def gen_nvml(version: int | None = None, surface: tuple[str, list[str]] | None = None) -> str:
    """The NVML stubs (every entry point the table does not implement), and the CUDA version
    NVML reports: libcuda's (`version`, or the one the checked-in gen_surface.c was made with)."""
    from kubecash.native import table
    if version is None:
        version = checked_in_driver_version()
    ml_version, names = nvml_surface() if surface is None else surface
    lines = [f"/* Generated by native/gen.py from native/table.py and the NVML entry points of "
             f"nvidia-ml-py {ml_version}. Do not edit. */", '#include "kc.h"\n',
             f"const int kc_driver_version = {version};     /* gen_surface.c's: libcuda's */\n",
             "/* NVML entry points not implemented: NVML_ERROR_NOT_SUPPORTED, logged once. */"]
    lines += [f"KC_NVML_STUB({n})" for n in sorted(set(names) - set(table.NVML))]
    return "\n".join(lines) + "\n"


def generate(incs: list[str] | None = None) -> dict[str, str]:
    incs = include_dirs() if incs is None else incs
    if not incs:
        raise GenError("no CUDA include directory with cuda.h and cudaTypedefs.h found "
                       "(install nvidia-cuda-runtime or the CUDA toolkit)")
    return {"gen_surface.c": gen_surface(incs), "gen_devattr.c": gen_devattr(incs),
            "gen_protocol.h": gen_protocol(), "gen_nvml.c": gen_nvml(max(cuda_version(i) for i in incs))}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print("usage: python -m kubecash.native.gen [--check]", file=sys.stderr)
        return 2
    try:
        out = generate()
    except GenError as e:
        print(f"kubecash.native.gen: {e}", file=sys.stderr)
        return 1
    stale = []
    for name, text in out.items():
        path = os.path.join(SRC, name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not args:
                with open(path, "w") as f:
                    f.write(text)
    if args and stale:
        print(f"out of date: {', '.join(stale)} (run python -m kubecash.native.gen)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
