"""Device discovery: the CPU always (cpu0, and cpu1... where the broker's cpu_devices asks for
more), NVIDIA GPUs through pynvml when NVML is present."""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
from typing import Any

import psutil

log = logging.getLogger("kubecash.broker.devices")


@dataclasses.dataclass(frozen=True)
class NodeDevice:
    name: str                 # "cpu0", "gpu0", ...
    kind: str                 # "cpu" or "cuda"
    index: int                # index among devices of its kind
    total_memory: int         # bytes
    properties: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "index": self.index,
                "total_memory": self.total_memory, **self.properties}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "uarch", "isa")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device(index: int = 0) -> NodeDevice:
    """CPU device `index`. Several are views of the same cores, each with its own executors,
    lease and quotas (so multi-device programs, and peer copies, run on a CPU-only node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (psutil.cpu_count() or 1)
    props = {
        "model": f"KubeCASH CPU ({_cpu_model()})",
        "cores": cores,
        "multiprocessor_count": cores,
        # What CUDA programs ask about; the CPU backend honours CUDA's launch limits.
        "compute_capability": [8, 0],
        "max_threads_per_block": 1024,
        "max_block_dim": [1024, 1024, 64],
        "max_grid_dim": [2**31 - 1, 65535, 65535],
        "max_shared_memory_per_block": 48 << 10,
        # What occupancy (and so a cooperative grid's size) is computed from, as on sm_80.
        "max_threads_per_multiprocessor": 2048,
        "max_blocks_per_multiprocessor": 32,
        "warp_size": 32,
        "clock_rate_khz": int((psutil.cpu_freq().max if psutil.cpu_freq() else 0) * 1000),
        # It has none, but programs key devices by it (cudaDeviceGetPCIBusId, NVML by bus id):
        # domain, bus, device, distinct per CPU device.
        "pci": [0, 0, index],
    }
    return NodeDevice(f"cpu{index}", "cpu", index, psutil.virtual_memory().total, props)


_nvml_absence_logged = False


def nvidia_devices() -> list[NodeDevice]:
    """GPUs visible through NVML. No NVML (no driver, no library) is normal: logged once."""
    global _nvml_absence_logged
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # ImportError or NVMLError_LibraryNotFound / DriverNotLoaded
        if not _nvml_absence_logged:
            log.info("no NVIDIA GPUs: NVML unavailable (%s); serving the CPU device only", e)
            _nvml_absence_logged = True
        return []
    devices = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            cc = list(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            props = {"model": name if isinstance(name, str) else name.decode(),
                     "uuid": uuid if isinstance(uuid, str) else uuid.decode(),
                     "compute_capability": cc}
            try:                  # where NVML cannot say, the device has no PCI attributes
                pci = pynvml.nvmlDeviceGetPciInfo(h)
                props["pci"] = [int(pci.domain), int(pci.bus), int(pci.device)]
            except pynvml.NVMLError as e:
                log.info("gpu%d: no PCI location from NVML (%s)", i, e)
            devices.append(NodeDevice(f"gpu{i}", "cuda", i, int(mem.total), props))
    finally:
        pynvml.nvmlShutdown()
    return devices


def discover(cpu_devices: int = 1) -> list[NodeDevice]:
    return [*(cpu_device(i) for i in range(cpu_devices)), *nvidia_devices()]
