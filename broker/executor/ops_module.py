"""Operations on modules and launches: load (compiled off the main loop), unload, kernels,
globals, launch."""
from __future__ import annotations

import bisect

from kubecash.client import protocol as P
from kubecash.client.errors import CudaError, E, map_exceptions

from .accounting import module_footprint
from .state import (
    SUSPENDED,
    SessionState,
    _err,
    log,
)


class ModuleOps:
    def op_module_load(self, s: SessionState, msg: dict, ident: bytes):
        kind = msg["kind"]
        # kind: one of the protocol's declared choices
        limit = self.limits.max_module_bytes
        for field in ("source", "image"):
            n = len(msg[field]) if field in msg else 0
            if n > limit:
                raise _err(E.CUDA_ERROR_INVALID_VALUE,
                           f"module {field} of {n} bytes exceeds the broker's max_module_bytes "
                           f"({limit})")
        nmod, limit = len(s.modules) + s.building, self.limits.max_modules_per_session
        if nmod >= limit:
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                       f"cannot load another module: this session has {nmod} modules loaded or "
                       f"loading on {self.dev_name}, the broker's max_modules_per_session is "
                       f"{limit}; unload some first")
        self._check_handles(s, "a module")
        args = (kind, msg.get("source"), msg.get("image"), tuple(msg.get("options", ())))
        rid = msg["id"]
        s.building += 1                    # counted until it is registered or has failed

        def failed(err: bytes) -> None:
            s.building -= 1
            self._send(ident, err)

        def build() -> None:
            try:
                with map_exceptions("module build", logger=log):
                    module = self.backend.load_module(*args)
            except CudaError as e:
                err = P.error_reply(rid, e)   # `e` is unbound after except
                self._call_in_main(lambda: failed(err))
                return

            def register() -> None:
                s.building -= 1
                if s.closed:
                    self.backend.unload_module(module)
                    return
                try:    # its code, data and __device__ globals are memory the tenant holds
                    self._charge(module_footprint(module), "module (code, data and __device__ globals)")
                except CudaError as e:
                    self.backend.unload_module(module)
                    self._send(ident, P.error_reply(rid, e))
                    return
                h = self._new_handle()
                s.modules[h] = module
                self._send(ident, P.reply(rid, module=h))
            self._call_in_main(register)
        self.compiler.submit(build)

    def op_module_unload(self, s: SessionState, msg: dict, ident: bytes):
        self._check_queue(s, msg)
        m = s.modules.pop(msg["module"], None)
        if m is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"module {msg['module']:#x} is not one of this session's")
        for fh in [fh for fh, (mh, _, _) in s.functions.items() if mh == msg["module"]]:
            del s.functions[fh]
        for key in [k for k in s.fn_names if k[0] == msg["module"]]:
            del s.fn_names[key]
        for ptr in [p for p, (_, mh) in s.globals.items() if mh == msg["module"]]:
            del s.globals[ptr]
            s.bases.remove(ptr)
        def unload() -> None:
            self.backend.unload_module(m)
            self._uncharge(module_footprint(m))
        self._queue_op(s, msg, ident, unload, release=True)

    def _module(self, s: SessionState, h: int):
        m = s.modules.get(h)
        if m is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"module {h:#x} is not one of this session's")
        return m

    def op_get_function(self, s: SessionState, msg: dict, ident: bytes):
        fn, sizes = self.backend.get_function(self._module(s, msg["module"]), msg["name"])
        key = (msg["module"], msg["name"])
        h = s.fn_names.get(key)            # one handle per kernel, as cuModuleGetFunction
        if h is None:
            self._check_handles(s, "a function handle")
            h = s.fn_names[key] = self._new_handle()
            s.functions[h] = (msg["module"], fn, tuple(sizes))
        return {"function": h, "param_sizes": list(sizes)}

    def op_get_global(self, s: SessionState, msg: dict, ident: bytes):
        ptr, size = self.backend.get_global(self._module(s, msg["module"]), msg["name"])
        if ptr not in s.globals and size:       # copies to and from it are now in range
            s.globals[ptr] = (size, msg["module"])
            bisect.insort(s.bases, ptr)
        return {"ptr": ptr, "size": size}

    def _check_cooperative(self, grid, block, shared: int) -> None:
        """A cooperative grid no larger than the device holds resident: blocks per
        multiprocessor (occupancy from the device's per-multiprocessor limits, as
        cuOccupancyMaxActiveBlocksPerMultiprocessor computes it; native/src/cuda_exec.c
        occ_blocks is the same rule) times multiprocessors. A device whose description has
        no such limits (a GPU) checks this itself."""
        d = self.device
        try:
            warp, per_block = d["warp_size"], d["max_threads_per_block"]
            threads_sm, blocks_sm = d["max_threads_per_multiprocessor"], d["max_blocks_per_multiprocessor"]
            smem_sm, sms = d["max_shared_memory_per_block"], d["multiprocessor_count"]
        except KeyError:
            return
        threads = block[0] * block[1] * block[2]
        per_sm = min(threads_sm // (-(-threads // warp) * warp), blocks_sm) if threads <= per_block else 0
        if shared:
            per_sm = min(per_sm, smem_sm // shared)
        nblocks = grid[0] * grid[1] * grid[2]
        if nblocks > per_sm * sms:
            raise _err(E.CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE,
                       f"a cooperative grid of {nblocks} blocks: at most {per_sm * sms} blocks of "
                       f"{threads} threads ({per_sm} per multiprocessor x {sms}) are resident at once")

    def op_launch(self, s: SessionState, msg: dict, ident: bytes):
        entry = s.functions.get(msg["function"])
        if entry is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"function {msg['function']:#x} is not one of this session's")
        _, fn, sizes = entry
        grid, block, args = msg["grid"], msg["block"], msg["args"]
        # grid and block shapes: checked against the protocol's declaration (LAUNCH limits)
        if msg["shared"] > self.device.get("max_shared_memory_per_block", 48 << 10):
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{msg['shared']} bytes of dynamic shared memory "
                       "exceeds the device's limit")
        if len(args) != len(sizes) or any(len(a) != n for a, n in zip(args, sizes, strict=True)):
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"kernel takes {len(sizes)} parameters of sizes {list(sizes)}; got "
                       f"{len(args)} of sizes {[len(a) for a in args]}")
        shared = msg["shared"]
        progress = [0]
        if msg.get("cooperative"):
            self._check_cooperative(grid, block, shared)

            def run_whole():
                # Every block resident at once: not sliced, and so not preempted midway.
                return self.backend.launch(fn, grid, block, shared, args, cooperative=True) and None
            self._queue_op(s, msg, ident, run_whole,
                           stream=self._stream(s, msg), sync_point=False, kernel=True)
            return

        def run():
            # Preemptible only while a latency tenant shares the device (slicing costs a
            # little); a preempted kernel is resumed from `progress` at the next lease.
            if not self._lease_preemptible and progress[0] == 0:
                return self.backend.launch(fn, grid, block, shared, args) and None
            # A kernel suspended mid-grid resumes where it stopped, preemptible or not:
            # blocks that ran must not run again.
            yield_check = self._should_yield if self._lease_preemptible else (lambda: False)
            done = self.backend.launch(fn, grid, block, shared, args,
                                       should_yield=yield_check, progress=progress)
            return None if done else SUSPENDED
        self._queue_op(s, msg, ident, run,
                       stream=self._stream(s, msg), sync_point=False, kernel=True)
