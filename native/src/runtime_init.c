/* Driver entry points that NVIDIA's runtime (cudart) calls while it initialises, beyond the
 * ones cuda_api.c serves for driver-API programs: answered locally, no message sent. Found
 * by tracing nvcc-built programs (KUBECASH_DEBUG=1, tests/c/runtime_tour.cu). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kc.h"

enum { CU_MODULE_EAGER_LOADING = 1, CU_MODULE_LAZY_LOADING = 2 };

/* The driver's answer follows CUDA_MODULE_LOADING as NVIDIA's does (lazy unless EAGER):
 * lazy, cudart loads a fatbin's kernels when first launched, not all at start-up. */
KC_EXPORT CUresult cuModuleGetLoadingMode(int *mode) {
    if (!mode) return CUDA_ERROR_INVALID_VALUE;
    const char *v = getenv("CUDA_MODULE_LOADING");
    *mode = v && !strcmp(v, "EAGER") ? CU_MODULE_EAGER_LOADING : CU_MODULE_LAZY_LOADING;
    return CUDA_SUCCESS;
}

/* ---- context limits and preferences: kept per device, reported back, not acted on (the
 * CPU backend sizes stacks and heaps itself). cuBLAS asks for them at cublasCreate. ---- */
typedef int CUdevice;
CUresult cuCtxGetDevice(CUdevice *device);

enum { CU_LIMIT_STACK_SIZE, CU_LIMIT_PRINTF_FIFO_SIZE, CU_LIMIT_MALLOC_HEAP_SIZE, CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH,
       CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT, CU_LIMIT_MAX_L2_FETCH_GRANULARITY,
       CU_LIMIT_PERSISTING_L2_CACHE_SIZE, CU_LIMIT_SHMEM_SIZE, CU_LIMIT_CIG_ENABLED,
       CU_LIMIT_CIG_SHMEM_FALLBACK_ENABLED, NLIMITS,
       PREF_CACHE = NLIMITS, PREF_SHARED, NPREFS };   /* then CUfunc_cache, CUsharedconfig */
/* The driver's defaults (what cudaDeviceGetLimit reports on a fresh context of cc 8.0). */
static const size_t pref_default[NPREFS] = {1024, 1 << 20, 8 << 20, 2, 2048, 64, 0, 0, 0, 1, 0, 0};
/* The largest value each may be set to; 0: read-only (SHMEM_SIZE, CIG_ENABLED). The cache and
 * shared-memory configurations are preferences the hardware may ignore, as the driver
 * documents; this one does. */
static const size_t pref_max[NPREFS] = {SIZE_MAX, SIZE_MAX, SIZE_MAX, SIZE_MAX, SIZE_MAX, 128, SIZE_MAX, 0, 0, 1,
                                        3, 2};
static pthread_mutex_t prefs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct prefs { int set; size_t v[NPREFS]; } prefs[KC_MAX_DEVICES];

/* Preference i of the current context's device: read into *get, or set to `value`. */
static CUresult pref(int i, size_t *get, size_t value) {
    if (i < 0 || i >= NPREFS || (get ? 0 : !pref_max[i] || value > pref_max[i])) return CUDA_ERROR_INVALID_VALUE;
    CUdevice dev;
    CUresult rc = cuCtxGetDevice(&dev);
    if (rc) return rc;
    if (dev < 0 || dev >= KC_MAX_DEVICES) return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&prefs_lock);
    struct prefs *p = &prefs[dev];
    if (!p->set) {
        memcpy(p->v, pref_default, sizeof p->v);
        p->set = 1;
    }
    if (get) *get = p->v[i];
    else p->v[i] = value;
    pthread_mutex_unlock(&prefs_lock);
    return CUDA_SUCCESS;
}

static CUresult pref_int(int i, int *out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    size_t v;
    CUresult rc = pref(i, &v, 0);
    if (!rc) *out = (int)v;
    return rc;
}

KC_EXPORT CUresult cuCtxGetLimit(size_t *value, int limit) {
    if (!value || limit >= NLIMITS) return CUDA_ERROR_INVALID_VALUE;
    return pref(limit, value, 0);
}
KC_EXPORT CUresult cuCtxSetLimit(int limit, size_t value) {
    return limit < NLIMITS ? pref(limit, NULL, value) : CUDA_ERROR_INVALID_VALUE;
}
KC_EXPORT CUresult cuCtxGetCacheConfig(int *config) { return pref_int(PREF_CACHE, config); }
KC_EXPORT CUresult cuCtxSetCacheConfig(int config) { return pref(PREF_CACHE, NULL, (size_t)config); }
KC_EXPORT CUresult cuCtxGetSharedMemConfig(int *config) { return pref_int(PREF_SHARED, config); }
KC_EXPORT CUresult cuCtxSetSharedMemConfig(int config) { return pref(PREF_SHARED, NULL, (size_t)config); }

/* Stream priorities are not offered (STREAM_PRIORITIES_SUPPORTED is 0): the range is [0, 0],
 * what the driver answers on such a device. */
KC_EXPORT CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) {
    CUdevice dev;
    CUresult rc = cuCtxGetDevice(&dev);
    if (rc) return rc;
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS;
}

/* cudaProfilerStart/Stop: profiling is a tool's business (Nsight attaches to NVIDIA's driver,
 * not this one); there is nothing to start or stop, and saying so would fail programs that
 * bracket a region with them. */
KC_EXPORT CUresult cuProfilerStart(void) { return CUDA_SUCCESS; }
KC_EXPORT CUresult cuProfilerStop(void) { return CUDA_SUCCESS; }
