/* libnvidia-ml.so.1: what native/table.py's NVML entries implement. Devices are the tenant's
 * view (the broker's hello): names, and memory as the tenant's quota and use. Its session is
 * the library's own (a separate copy of session.c), opened by nvmlInit. */
#include <string.h>

#include "gen_protocol.h"
#include "kc.h"

#include <stdio.h>

typedef int nvmlReturn_t;
enum { NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
       NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NOT_FOUND = 6, NVML_ERROR_INSUFFICIENT_SIZE = 7,
       NVML_ERROR_DRIVER_NOT_LOADED = 9, NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
       NVML_ERROR_UNKNOWN = 999 };
/* nvml.h's structures, as laid out there (no nvml.h ships with the pip packages) */
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
#define NVML_MEMORY_V2 ((unsigned)(sizeof(nvmlMemory_v2_t) | (2u << 24)))   /* NVML_STRUCT_VERSION */
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; }
    nvmlProcessInfo_t;
#define NVML_VALUE_NOT_AVAILABLE (~0ull)
#define NVML_NO_INSTANCE 0xFFFFFFFFu
struct nvml_dev { int index; };
typedef struct nvml_dev *nvmlDevice_t;
static struct nvml_dev handles[KC_MAX_DEVICES];

static nvmlReturn_t from_cu(CUresult rc) {
    return rc == CUDA_SUCCESS ? NVML_SUCCESS : rc == CUDA_ERROR_NOT_INITIALIZED ? NVML_ERROR_UNINITIALIZED
                                                                                 : NVML_ERROR_UNKNOWN;
}

static nvmlReturn_t lock_handle(nvmlDevice_t h, struct kc_device **d) {
    if (!(h >= handles && h < handles + KC_MAX_DEVICES)) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    *d = kc_device(h->index);
    if (!*d) { kc_unlock(); return NVML_ERROR_INVALID_ARGUMENT; }
    return NVML_SUCCESS;
}

KC_EXPORT nvmlReturn_t nvmlInit_v2(void) {
    CUresult rc = kc_lock(1);         /* a broker it cannot reach: as if no driver were loaded */
    if (rc) return NVML_ERROR_DRIVER_NOT_LOADED;
    kc_unlock();
    return NVML_SUCCESS;
}

KC_EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }

/* Flags (no attach to GPUs, no GPUs needed) change nothing: the devices are the broker's. */
KC_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }

/* The session stays open (it ends with the process): a later nvmlInit finds it. */
KC_EXPORT nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

KC_EXPORT const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    *count = (unsigned)kc_device_count();
    kc_unlock();
    return NVML_SUCCESS;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

KC_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    if (index >= (unsigned)kc_device_count()) rc = NVML_ERROR_INVALID_ARGUMENT;
    else { handles[index].index = (int)index; *device = &handles[index]; }
    kc_unlock();
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char *name, unsigned int length) {
    struct kc_device *d;
    if (!name) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    size_t n = strlen(d->model);
    if (n + 1 > length) rc = NVML_ERROR_INSUFFICIENT_SIZE;
    else memcpy(name, d->model, n + 1);
    kc_unlock();
    return rc;
}

/* The tenant's use of d (the broker's status for its session; lock held): 1 with *mine the
 * device's entry, 0 if it has no executor there yet (nothing used), or NVML_ERROR_UNKNOWN. */
static int tenant_use(const struct kc_device *d, struct mp_val *mine) {
    struct mp_val r, devs;
    if (kc_broker_request(KCP_TENANT_STATUS, NULL, 0, &r, 10000)) return -NVML_ERROR_UNKNOWN;
    return mp_find(&r, KCP_TENANT_STATUS_R_DEVICES, &devs) == 1 && mp_find(&devs, d->name, mine) == 1;
}

/* total: the tenant's quota; used: what its executor holds there (the broker's status). */
static nvmlReturn_t memory_info(nvmlDevice_t h, unsigned long long *total, unsigned long long *used) {
    struct kc_device *d;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    struct mp_val mine, v;
    unsigned long long u = 0;
    int found = tenant_use(d, &mine);
    if (found < 0) rc = -found;
    else if (found && mp_find(&mine, "memory_used", &v) == 1 && v.type == MP_UINT) u = v.v.u;
    *total = d->memory_limit;
    *used = u < d->memory_limit ? u : d->memory_limit;
    kc_unlock();
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *memory) {
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long total, used;
    nvmlReturn_t rc = memory_info(h, &total, &used);
    if (!rc) *memory = (nvmlMemory_t){.total = total, .used = used, .free = total - used};
    return rc;
}

/* reserved: none (the quota is the tenant's, with nothing held back for a driver) */
KC_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t h, nvmlMemory_v2_t *memory) {
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_MEMORY_V2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned long long total, used;
    nvmlReturn_t rc = memory_info(h, &total, &used);
    if (!rc) *memory = (nvmlMemory_v2_t){.version = NVML_MEMORY_V2, .total = total, .reserved = 0,
                                         .used = used, .free = total - used};
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t h, unsigned int *index) {
    struct kc_device *d;
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    *index = (unsigned)h->index;
    kc_unlock();
    return NVML_SUCCESS;
}

/* "GPU-" and the device's UUID (cuDeviceGetUuid's bytes; a GPU's own), as NVML writes one. */
static void uuid_text(const struct kc_device *d, char out[41]) {
    const uint8_t *u = d->uuid;
    snprintf(out, 41, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *uuid, unsigned int length) {
    struct kc_device *d;
    if (!uuid) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    char text[41];
    uuid_text(d, text);
    if (length < sizeof text) rc = NVML_ERROR_INSUFFICIENT_SIZE;
    else memcpy(uuid, text, sizeof text);
    kc_unlock();
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    rc = NVML_ERROR_NOT_FOUND;
    for (int i = 0; i < kc_device_count(); i++) {
        char text[41];
        uuid_text(kc_device(i), text);
        if (!strcmp(text, uuid)) {
            handles[i].index = i;
            *device = &handles[i];
            rc = NVML_SUCCESS;
            break;
        }
    }
    kc_unlock();
    return rc;
}

/* The device at a PCI bus id, as cuDeviceGetPCIBusId writes it (or NVML's 8-digit domain). */
static nvmlReturn_t by_pci(const char *bus_id, nvmlDevice_t *device) {
    if (!bus_id || !device) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    int i = kc_device_by_pci(bus_id);
    if (i < 0) rc = NVML_ERROR_NOT_FOUND;
    else {
        handles[i].index = i;
        *device = &handles[i];
    }
    kc_unlock();
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus_id, nvmlDevice_t *device) {
    return by_pci(bus_id, device);
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *bus_id, nvmlDevice_t *device) {
    return by_pci(bus_id, device);
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t h, int *major, int *minor) {
    struct kc_device *d;
    if (!major || !minor) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    long long ma, mi;
    if (kc_desc_int(d, "compute_capability", 0, &ma) || kc_desc_int(d, "compute_capability", 1, &mi)) {
        rc = NVML_ERROR_NOT_SUPPORTED;
    } else {
        *major = (int)ma;
        *minor = (int)mi;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetMultiGpuBoard(nvmlDevice_t h, unsigned int *multi) {
    struct kc_device *d;
    if (!multi) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    *multi = 0;
    kc_unlock();
    return NVML_SUCCESS;
}

/* gpu: the tenant's share of the device's time over the last second, in percent (what the
 * broker's scheduler measured); memory (how busy the memory bus was) is not measured: 0. */
KC_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, nvmlUtilization_t *util) {
    struct kc_device *d;
    if (!util) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    struct mp_val mine, v;
    double share = 0;
    int found = tenant_use(d, &mine);
    if (found < 0) rc = -found;
    else if (found && mp_find(&mine, "share_1s", &v) == 1 && mp_as_double(&v, &share)) share = 0;
    if (!rc) {
        double pct = share * 100 + 0.5;
        util->gpu = pct < 0 ? 0 : pct > 100 ? 100 : (unsigned)pct;
        util->memory = 0;
    }
    kc_unlock();
    return rc;
}

/* The tenant's own processes with the device open (its sessions' pids, as their hello gave
 * them: the container's view); their memory is the executor's, not counted per process. */
static nvmlReturn_t processes(nvmlDevice_t h, unsigned int *count, void *infos, int v1) {
    struct kc_device *d;
    if (!count || (*count && !infos)) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    struct mp_val mine, pids, e;
    unsigned n = 0;
    int found = tenant_use(d, &mine);
    if (found < 0) rc = -found;
    else if (found && mp_find(&mine, "pids", &pids) == 1 && pids.type == MP_ARRAY) n = pids.len;
    if (!rc && n > *count) rc = NVML_ERROR_INSUFFICIENT_SIZE;
    for (unsigned i = 0; !rc && i < n; i++) {
        int64_t pid = 0;
        if (mp_index(&pids, i, &e) != 1 || mp_as_int(&e, &pid)) { rc = NVML_ERROR_UNKNOWN; break; }
        if (v1) ((nvmlProcessInfo_v1_t *)infos)[i] = (nvmlProcessInfo_v1_t){(unsigned)pid, NVML_VALUE_NOT_AVAILABLE};
        else ((nvmlProcessInfo_t *)infos)[i] = (nvmlProcessInfo_t){(unsigned)pid, NVML_VALUE_NOT_AVAILABLE,
                                                                   NVML_NO_INSTANCE, NVML_NO_INSTANCE};
    }
    if (!rc || rc == NVML_ERROR_INSUFFICIENT_SIZE) *count = n;
    kc_unlock();
    return rc;
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned int *count,
                                                               nvmlProcessInfo_t *infos) {
    return processes(h, count, infos, 0);
}

KC_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t h, unsigned int *count,
                                                               nvmlProcessInfo_t *infos) {
    return processes(h, count, infos, 0);
}

/* The unversioned name is the oldest ABI: {pid, usedGpuMemory} records. */
KC_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t h, unsigned int *count,
                                                            nvmlProcessInfo_v1_t *infos) {
    return processes(h, count, infos, 1);
}

static nvmlReturn_t version_text(char *out, unsigned int length) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    int n = snprintf(out, length, "kubecash-%s", KC_PACKAGE_VERSION);
    kc_unlock();
    return n < 0 || (unsigned)n >= length ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
}

KC_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return version_text(version, length);
}

KC_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    return version_text(version, length);
}

/* The CUDA version libcuda.so.1 reports (cuDriverGetVersion), from the same headers. */
KC_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = from_cu(kc_lock(0));
    if (rc) return rc;
    *version = kc_driver_version;
    kc_unlock();
    return NVML_SUCCESS;
}

KC_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    return nvmlSystemGetCudaDriverVersion(version);
}
