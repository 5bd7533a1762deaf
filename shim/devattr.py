"""Device attributes and properties as the tenant sees the device: from the broker's
description of it (its quota as the memory), never guessed. An attribute the description
cannot answer is refused with CUDA_ERROR_NOT_SUPPORTED rather than made up."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubecash.client as kc
from kubecash.client.errors import CudaError, CUresult


def _p(key: str, i: int | None = None) -> Callable[[kc.Device], Any]:
    def get(d: kc.Device) -> Any:
        v = d.properties.get(key)
        if v is None:
            raise KeyError(key)
        return v[i] if i is not None else v
    return get


def _const(v: int) -> Callable[[kc.Device], int]:
    return lambda d: v


def _on_cpu(if_cpu: int, otherwise: int) -> Callable[[kc.Device], int]:
    return lambda d: if_cpu if d.kind == "cpu" else otherwise


def _cpu(if_cpu: int) -> Callable[[kc.Device], int]:
    def get(d: kc.Device) -> int:
        if d.kind != "cpu":
            raise KeyError("cpu-only answer")
        return if_cpu
    return get


# CUdevice_attribute name (without the prefix) -> how to answer it. cudaDeviceAttr numbers
# are the same, so the runtime answers from this table too.
ATTRIBUTES: dict[str, Callable[[kc.Device], Any]] = {
    "MAX_THREADS_PER_BLOCK": _p("max_threads_per_block"),
    "MAX_BLOCK_DIM_X": _p("max_block_dim", 0), "MAX_BLOCK_DIM_Y": _p("max_block_dim", 1),
    "MAX_BLOCK_DIM_Z": _p("max_block_dim", 2),
    "MAX_GRID_DIM_X": _p("max_grid_dim", 0), "MAX_GRID_DIM_Y": _p("max_grid_dim", 1),
    "MAX_GRID_DIM_Z": _p("max_grid_dim", 2),
    "MAX_SHARED_MEMORY_PER_BLOCK": _p("max_shared_memory_per_block"),
    "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": _p("max_shared_memory_per_block"),
    "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": _p("max_shared_memory_per_block"),
    "WARP_SIZE": _p("warp_size"),
    "MULTIPROCESSOR_COUNT": _p("multiprocessor_count"),
    "CLOCK_RATE": _p("clock_rate_khz"),
    "COMPUTE_CAPABILITY_MAJOR": _p("compute_capability", 0),
    "COMPUTE_CAPABILITY_MINOR": _p("compute_capability", 1),
    # What the brokered device offers, whatever the hardware: unified addressing and
    # mapped host memory (cuMemHostAlloc DEVICEMAP), stream-ordered allocation, streams.
    "UNIFIED_ADDRESSING": _const(1), "CAN_MAP_HOST_MEMORY": _const(1),
    "MEMORY_POOLS_SUPPORTED": _const(1), "CONCURRENT_KERNELS": _const(1),
    "ASYNC_ENGINE_COUNT": _const(1), "STREAM_PRIORITIES_SUPPORTED": _const(0),
    "COMPUTE_MODE": _const(0), "KERNEL_EXEC_TIMEOUT": _const(0), "TCC_DRIVER": _const(0),
    "HOST_REGISTER_SUPPORTED": _const(1),
    # Not offered: registered memory stays in the program, managed memory, peer access;
    # virtual memory management on CPU devices only (the native driver library's
    # cuMemCreate/cuMemMap; GPU executors do not offer it yet). Cooperative launches are.
    "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM": _const(0), "MANAGED_MEMORY": _const(0),
    "CONCURRENT_MANAGED_ACCESS": _const(0), "PAGEABLE_MEMORY_ACCESS": _const(0),
    "PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES": _const(0),
    "DIRECT_MANAGED_MEM_ACCESS_FROM_HOST": _const(0), "COOPERATIVE_LAUNCH": _const(1),
    "COOPERATIVE_MULTI_DEVICE_LAUNCH": _const(0), "MULTI_GPU_BOARD": _const(0),
    "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": _on_cpu(1, 0), "CLUSTER_LAUNCH": _const(0),
    "IPC_EVENT_SUPPORTED": _const(0), "GPU_DIRECT_RDMA_SUPPORTED": _const(0),
    "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED": _const(0),
    "MEMPOOL_SUPPORTED_HANDLE_TYPES": _const(0), "READ_ONLY_HOST_REGISTER_SUPPORTED": _const(0),
    "ECC_ENABLED": _const(0), "MPS_ENABLED": _const(0),
    # Nor what the node's driver may have and a brokered device does not pass through:
    # shareable handles other than none, DMA-BUF, RDMA, multicast, stream memory operations,
    # compression, tensor maps (TMA), host NUMA memory, graphics interop (PyTorch's expandable
    # segments ask for fabric handles and stop on an error, so each is answered 0).
    **{name: _const(0) for name in (
        "HANDLE_TYPE_FABRIC_SUPPORTED", "HANDLE_TYPE_WIN32_HANDLE_SUPPORTED",
        "HANDLE_TYPE_WIN32_KMT_HANDLE_SUPPORTED", "DMA_BUF_SUPPORTED", "DMA_BUF_MMAP_SUPPORTED",
        "HOST_ALLOC_DMA_BUF_SUPPORTED", "GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED",
        "GPU_DIRECT_RDMA_WITH_LOCALIZED_MEMORY_SUPPORTED", "CAN_FLUSH_REMOTE_WRITES", "MULTICAST_SUPPORTED",
        "CAN_USE_STREAM_MEM_OPS_V1", "CAN_USE_64_BIT_STREAM_MEM_OPS_V1", "CAN_USE_STREAM_WAIT_VALUE_NOR_V1",
        "CAN_USE_64_BIT_STREAM_MEM_OPS", "CAN_USE_STREAM_WAIT_VALUE_NOR", "GENERIC_COMPRESSION_SUPPORTED",
        "TENSOR_MAP_ACCESS_SUPPORTED", "HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
        "HOST_NUMA_MEMORY_POOLS_SUPPORTED", "HOST_MEMORY_POOLS_SUPPORTED",
        "HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED", "D3D12_CIG_SUPPORTED", "D3D12_CIG_STREAMS_SUPPORTED",
        "VULKAN_CIG_SUPPORTED", "VULKAN_CIG_STREAMS_SUPPORTED", "CAN_TEX2D_GATHER",
        "LOGICAL_ENDPOINT_UNICAST_SUPPORTED", "LOGICAL_ENDPOINT_MULTICAST_SUPPORTED",
        "LOGICAL_ENDPOINT_COUNTED_OPS_SUPPORTED", "LOGICAL_ENDPOINT_UNICAST_ACCESS_ON_OWNER_DEVICE_SUPPORTED")},
    # A CPU device: host memory is its memory.
    "INTEGRATED": _cpu(1), "HOST_NATIVE_ATOMIC_SUPPORTED": _cpu(1),
    "PCI_DOMAIN_ID": _p("pci", 0), "PCI_BUS_ID": _p("pci", 1), "PCI_DEVICE_ID": _p("pci", 2),
    "TOTAL_CONSTANT_MEMORY": _cpu(64 << 10),
    "MAX_REGISTERS_PER_BLOCK": _cpu(65536), "MAX_REGISTERS_PER_MULTIPROCESSOR": _cpu(65536),
    "MAX_THREADS_PER_MULTIPROCESSOR": _p("max_threads_per_multiprocessor"),
    "MAX_BLOCKS_PER_MULTIPROCESSOR": _p("max_blocks_per_multiprocessor"),
    "GLOBAL_L1_CACHE_SUPPORTED": _cpu(1), "LOCAL_L1_CACHE_SUPPORTED": _cpu(1),
    "L2_CACHE_SIZE": _cpu(0), "MAX_PITCH": _cpu(2**31 - 1), "TEXTURE_ALIGNMENT": _cpu(512),
    "TEXTURE_PITCH_ALIGNMENT": _cpu(32), "SURFACE_ALIGNMENT": _cpu(512),
    "GPU_OVERLAP": _cpu(1), "COMPUTE_PREEMPTION_SUPPORTED": _cpu(0),
    "MEMORY_CLOCK_RATE": _cpu(0), "GLOBAL_MEMORY_BUS_WIDTH": _cpu(0),
    "SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO": _cpu(2), "RESERVED_SHARED_MEMORY_PER_BLOCK": _cpu(0),
    "NUMA_CONFIG": _cpu(0), "NUMA_ID": _cpu(-1), "HOST_NUMA_ID": _cpu(-1),
    "MAX_PERSISTING_L2_CACHE_SIZE": _cpu(0), "MAX_ACCESS_POLICY_WINDOW_SIZE": _cpu(0),
    "MULTI_GPU_BOARD_GROUP_ID": _cpu(0), "UNIFIED_FUNCTION_POINTERS": _cpu(0),
    "GPU_PCI_DEVICE_ID": _cpu(0), "GPU_PCI_SUBSYSTEM_ID": _cpu(0),
    # Not offered either (cudart's initialisation asks for every one of these).
    "SPARSE_CUDA_ARRAY_SUPPORTED": _const(0), "TIMELINE_SEMAPHORE_INTEROP_SUPPORTED": _const(0),
    "GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS": _const(0), "GPU_DIRECT_RDMA_WRITES_ORDERING": _const(0),
    "DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED": _const(0), "HOST_NUMA_MULTINODE_IPC_SUPPORTED": _const(0),
}
# Texture and surface limits: cudart's cudaDeviceProp needs every one. A CPU device answers
# those of the compute capability it presents (8.0: the CUDA C++ Programming Guide's
# technical specifications per compute capability), though it binds no textures yet.
_TEXTURE_LIMITS_CC80 = {
    "MAXIMUM_TEXTURE1D_WIDTH": 131072, "MAXIMUM_TEXTURE1D_MIPMAPPED_WIDTH": 32768,
    "MAXIMUM_TEXTURE1D_LINEAR_WIDTH": 268435456,
    "MAXIMUM_TEXTURE1D_LAYERED_WIDTH": 32768, "MAXIMUM_TEXTURE1D_LAYERED_LAYERS": 2048,
    "MAXIMUM_TEXTURE2D_WIDTH": 131072, "MAXIMUM_TEXTURE2D_HEIGHT": 65536,
    "MAXIMUM_TEXTURE2D_MIPMAPPED_WIDTH": 32768, "MAXIMUM_TEXTURE2D_MIPMAPPED_HEIGHT": 32768,
    "MAXIMUM_TEXTURE2D_LINEAR_WIDTH": 131072, "MAXIMUM_TEXTURE2D_LINEAR_HEIGHT": 65000,
    "MAXIMUM_TEXTURE2D_LINEAR_PITCH": 2097120,
    "MAXIMUM_TEXTURE2D_GATHER_WIDTH": 32768, "MAXIMUM_TEXTURE2D_GATHER_HEIGHT": 32768,
    "MAXIMUM_TEXTURE2D_LAYERED_WIDTH": 32768, "MAXIMUM_TEXTURE2D_LAYERED_HEIGHT": 32768,
    "MAXIMUM_TEXTURE2D_LAYERED_LAYERS": 2048,
    "MAXIMUM_TEXTURE3D_WIDTH": 16384, "MAXIMUM_TEXTURE3D_HEIGHT": 16384, "MAXIMUM_TEXTURE3D_DEPTH": 16384,
    "MAXIMUM_TEXTURE3D_WIDTH_ALTERNATE": 8192, "MAXIMUM_TEXTURE3D_HEIGHT_ALTERNATE": 8192,
    "MAXIMUM_TEXTURE3D_DEPTH_ALTERNATE": 32768,
    "MAXIMUM_TEXTURECUBEMAP_WIDTH": 32768, "MAXIMUM_TEXTURECUBEMAP_LAYERED_WIDTH": 32768,
    "MAXIMUM_TEXTURECUBEMAP_LAYERED_LAYERS": 2046,
    "MAXIMUM_SURFACE1D_WIDTH": 32768, "MAXIMUM_SURFACE1D_LAYERED_WIDTH": 32768,
    "MAXIMUM_SURFACE1D_LAYERED_LAYERS": 2048,
    "MAXIMUM_SURFACE2D_WIDTH": 131072, "MAXIMUM_SURFACE2D_HEIGHT": 65536,
    "MAXIMUM_SURFACE2D_LAYERED_WIDTH": 32768, "MAXIMUM_SURFACE2D_LAYERED_HEIGHT": 32768,
    "MAXIMUM_SURFACE2D_LAYERED_LAYERS": 2048,
    "MAXIMUM_SURFACE3D_WIDTH": 16384, "MAXIMUM_SURFACE3D_HEIGHT": 16384, "MAXIMUM_SURFACE3D_DEPTH": 16384,
    "MAXIMUM_SURFACECUBEMAP_WIDTH": 32768, "MAXIMUM_SURFACECUBEMAP_LAYERED_WIDTH": 32768,
    "MAXIMUM_SURFACECUBEMAP_LAYERED_LAYERS": 2046,
}
ATTRIBUTES.update({k: _cpu(v) for k, v in _TEXTURE_LIMITS_CC80.items()})
ATTRIBUTES["SHARED_MEMORY_PER_BLOCK"] = ATTRIBUTES["MAX_SHARED_MEMORY_PER_BLOCK"]
ATTRIBUTES["REGISTERS_PER_BLOCK"] = ATTRIBUTES["MAX_REGISTERS_PER_BLOCK"]


# What this Python shim answers otherwise than the table (which the native library's is made
# from): it has no virtual memory management and no cooperative launch of its own.
SHIM_ONLY: dict[str, int] = {"VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": 0, "COOPERATIVE_LAUNCH": 0}


def attribute(real_driver, device: kc.Device, attrib: Any) -> int:
    try:
        name = real_driver.CUdevice_attribute(int(attrib)).name
    except (ValueError, TypeError):
        raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE, f"unknown device attribute {attrib!r}") from None
    short = name[len("CU_DEVICE_ATTRIBUTE_"):]
    get = (lambda d: SHIM_ONLY[short]) if short in SHIM_ONLY else ATTRIBUTES.get(short)
    try:
        if get is None:
            raise KeyError(short)
        return int(get(device))
    except (KeyError, IndexError, TypeError):
        raise CudaError(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                        f"device attribute {name} is not known for the brokered device "
                        f"'{device.name}'") from None


def uuid_bytes(device: kc.Device) -> bytes:
    """16 bytes naming the device as this tenant sees it (stable per device name)."""
    u = device.properties.get("uuid")
    if isinstance(u, str):
        hexpart = u.replace("GPU-", "").replace("-", "")
        try:
            b = bytes.fromhex(hexpart)
            if len(b) == 16:
                return b
        except ValueError:
            pass
    import hashlib
    return hashlib.sha256(f"kubecash:{device.name}:{device.properties.get('model', '')}".encode()).digest()[:16]


def model(device: kc.Device) -> str:
    return str(device.properties.get("model", device.name))
