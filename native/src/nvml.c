/* libnvidia-ml.so.1: what native/table.py's NVML entries implement. Devices are the tenant's
 * view (the broker's hello): names, and memory as the tenant's quota and use. Its session is
 * the library's own (a separate copy of session.c), opened by nvmlInit. */
#include <string.h>

#include "gen_protocol.h"
#include "kc.h"

typedef int nvmlReturn_t;
enum { NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
       NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_DRIVER_NOT_LOADED = 9,
       NVML_ERROR_UNKNOWN = 999 };
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
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

/* The session stays open (it ends with the process): a later nvmlInit finds it. */
KC_EXPORT nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

KC_EXPORT const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
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

/* total: the tenant's quota; used: what its executor holds there (the broker's status). */
KC_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *memory) {
    struct kc_device *d;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_handle(h, &d);
    if (rc) return rc;
    struct mp_val r, devs, mine, used;
    unsigned long long u = 0;
    if (kc_broker_request(KCP_TENANT_STATUS, NULL, 0, &r, 10000)) {
        rc = NVML_ERROR_UNKNOWN;
    } else if (mp_find(&r, KCP_TENANT_STATUS_R_DEVICES, &devs) == 1 && mp_find(&devs, d->name, &mine) == 1 &&
               mp_find(&mine, "memory_used", &used) == 1 && used.type == MP_UINT) {
        u = used.v.u;                           /* absent: no executor yet, nothing used */
    }
    if (!rc) {
        memory->total = d->memory_limit;
        memory->used = u < d->memory_limit ? u : d->memory_limit;
        memory->free = memory->total - memory->used;
    }
    kc_unlock();
    return rc;
}
