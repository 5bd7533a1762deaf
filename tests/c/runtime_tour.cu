// The CUDA runtime API's start-up and memory calls, as an unmodified program makes them: no
// kernel, so it builds with nvcc (static or shared cudart) and, being plain C++, with any
// host compiler against a pip cudart (tests/test_native_runtime.py). Checks its own results:
// prints "FAIL what: detail" for each failed check, then "failures=N", and exits non-zero on
// any. Usage: runtime_tour QUOTA_BYTES, or runtime_tour count (cudaGetDeviceCount alone)
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// cuda_profiler_api.h's, declared here: pip's cudart wheels do not ship that header
extern "C" cudaError_t cudaProfilerStart(void);
extern "C" cudaError_t cudaProfilerStop(void);

static int failures;

#define CHECK(what, cond, ...)                                          \
    do {                                                                \
        if (!(cond)) {                                                  \
            failures++;                                                 \
            printf("FAIL %s: ", what);                                  \
            printf(__VA_ARGS__);                                        \
            printf("\n");                                               \
        }                                                               \
    } while (0)
#define CHECK_OK(what, call)                                                              \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        CHECK(what, e_ == cudaSuccess, "%d %s (%s)", (int)e_, cudaGetErrorName(e_),       \
              cudaGetErrorString(e_));                                                    \
    } while (0)

// An allocation, a copy there and back, a free: through the staging segment when large.
static void round_trip(const char *what, size_t n) {
    unsigned char *h = (unsigned char *)malloc(n), *g = (unsigned char *)malloc(n);
    void *d = NULL;
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 7 + 3);
    memset(g, 0, n);
    char w[64];
    snprintf(w, sizeof w, "%s cudaMalloc", what);
    CHECK_OK(w, cudaMalloc(&d, n));
    snprintf(w, sizeof w, "%s cudaMemcpy HtoD", what);
    CHECK_OK(w, cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    snprintf(w, sizeof w, "%s cudaMemcpy DtoH", what);
    CHECK_OK(w, cudaMemcpy(g, d, n, cudaMemcpyDeviceToHost));
    snprintf(w, sizeof w, "%s round trip", what);
    CHECK(w, memcmp(h, g, n) == 0, "the bytes read back differ");
    snprintf(w, sizeof w, "%s cudaFree", what);
    CHECK_OK(w, cudaFree(d));
    free(h);
    free(g);
}

// A thread that never chose a device: cudart binds it to device 0's primary context.
static void *other_thread(void *arg) {
    round_trip("thread", 4096);
    int dev = -1;
    CHECK_OK("thread cudaGetDevice", cudaGetDevice(&dev));
    CHECK("thread device", dev == 0, "%d", dev);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: runtime_tour QUOTA_BYTES | count\n");
        return 2;
    }
    if (strcmp(argv[1], "count") == 0) {        // what torch.cuda.device_count() does
        int n = -1;
        cudaError_t e = cudaGetDeviceCount(&n);
        printf("count_rc=%d\ndevice_count=%d\n", (int)e, n);
        return e != cudaSuccess;
    }
    size_t quota = strtoull(argv[1], NULL, 0);
    int rt = 0, drv = 0, n = -1;
    CHECK_OK("cudaRuntimeGetVersion", cudaRuntimeGetVersion(&rt));
    CHECK_OK("cudaDriverGetVersion", cudaDriverGetVersion(&drv));
    printf("runtime_version=%d\ndriver_version=%d\n", rt, drv);
    CHECK("driver at least runtime", drv >= rt, "driver %d, runtime %d", drv, rt);

    CHECK_OK("cudaGetDeviceCount", cudaGetDeviceCount(&n));
    printf("device_count=%d\n", n);
    CHECK("device count", n >= 1, "%d", n);
    if (n < 1) {
        printf("failures=%d\n", failures);
        return 1;
    }

    cudaDeviceProp p;
    memset(&p, 0, sizeof p);
    CHECK_OK("cudaGetDeviceProperties", cudaGetDeviceProperties(&p, 0));
    printf("name=%s\ncc=%d.%d\ntotal_global_mem=%zu\n", p.name, p.major, p.minor, p.totalGlobalMem);
    CHECK("name", p.name[0] != 0, "empty");
    CHECK("totalGlobalMem is the quota", p.totalGlobalMem == quota, "%zu, quota %zu", p.totalGlobalMem, quota);
    CHECK("warpSize", p.warpSize == 32, "%d", p.warpSize);
    CHECK("maxThreadsPerBlock", p.maxThreadsPerBlock > 0, "%d", p.maxThreadsPerBlock);
    int warp = 0;
    CHECK_OK("cudaDeviceGetAttribute", cudaDeviceGetAttribute(&warp, cudaDevAttrWarpSize, 0));
    CHECK("attribute warp size", warp == 32, "%d", warp);

    // before the context exists: the flags it will be made with, reported back
    CHECK_OK("cudaSetDeviceFlags", cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync));
    unsigned dflags = 0;
    CHECK_OK("cudaGetDeviceFlags", cudaGetDeviceFlags(&dflags));
    CHECK("device flags", (dflags & cudaDeviceScheduleMask) == cudaDeviceScheduleBlockingSync, "%#x", dflags);

    cudaError_t e = cudaSetDevice(n + 7);
    CHECK("cudaSetDevice(no such device)", e == cudaErrorInvalidDevice, "%d %s", (int)e, cudaGetErrorName(e));
    CHECK_OK("cudaSetDevice", cudaSetDevice(0));
    int dev = -1;
    CHECK_OK("cudaGetDevice", cudaGetDevice(&dev));
    CHECK("device", dev == 0, "%d", dev);

    size_t free_b = 0, total = 0;
    CHECK_OK("cudaMemGetInfo", cudaMemGetInfo(&free_b, &total));
    printf("mem_free=%zu\nmem_total=%zu\n", free_b, total);
    CHECK("cudaMemGetInfo total is the quota", total == quota, "%zu, quota %zu", total, quota);
    CHECK("cudaMemGetInfo free", free_b > 0 && free_b <= total, "%zu of %zu", free_b, total);

    round_trip("small", 4096);
    round_trip("large", 8u << 20);

    void *big = NULL;
    e = cudaMalloc(&big, quota + (1u << 20));
    CHECK("cudaMalloc over the quota", e == cudaErrorMemoryAllocation, "%d %s", (int)e, cudaGetErrorName(e));
    e = cudaGetLastError();
    CHECK("cudaGetLastError after it", e == cudaErrorMemoryAllocation, "%d %s", (int)e, cudaGetErrorName(e));
    e = cudaGetLastError();
    CHECK("cudaGetLastError cleared", e == cudaSuccess, "%d %s", (int)e, cudaGetErrorName(e));
    CHECK_OK("cudaFree(NULL)", cudaFree(NULL));

    pthread_t t;
    CHECK("pthread_create", pthread_create(&t, NULL, other_thread, NULL) == 0, "failed");
    pthread_join(t, NULL);

    CHECK_OK("cudaDeviceSynchronize", cudaDeviceSynchronize());
    CHECK_OK("cudaProfilerStart", cudaProfilerStart());      // no profiler here: nothing to do
    CHECK_OK("cudaProfilerStop", cudaProfilerStop());

    // limits and preferences: kept and reported back (cuBLAS reads them at cublasCreate)
    size_t lim = 0;
    CHECK_OK("cudaDeviceGetLimit", cudaDeviceGetLimit(&lim, cudaLimitStackSize));
    CHECK("stack size limit", lim == 1024, "%zu", lim);
    CHECK_OK("cudaDeviceSetLimit", cudaDeviceSetLimit(cudaLimitMallocHeapSize, 16u << 20));
    CHECK_OK("cudaDeviceGetLimit heap", cudaDeviceGetLimit(&lim, cudaLimitMallocHeapSize));
    CHECK("heap size limit", lim == 16u << 20, "%zu", lim);
    int least = -1, greatest = -1;
    CHECK_OK("cudaDeviceGetStreamPriorityRange", cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CHECK("no stream priorities", least == 0 && greatest == 0, "[%d, %d]", least, greatest);
    cudaFuncCache cache = cudaFuncCachePreferNone;
    CHECK_OK("cudaDeviceSetCacheConfig", cudaDeviceSetCacheConfig(cudaFuncCachePreferShared));
    CHECK_OK("cudaDeviceGetCacheConfig", cudaDeviceGetCacheConfig(&cache));
    CHECK("cache config", cache == cudaFuncCachePreferShared, "%d", (int)cache);
    const char *s = cudaGetErrorString(cudaErrorMemoryAllocation);
    printf("error_string=%s\n", s);
    CHECK("cudaGetErrorString", s && strcmp(s, "out of memory") == 0, "%s", s ? s : "(null)");
    s = cudaGetErrorName(cudaErrorInvalidDevice);
    CHECK("cudaGetErrorName", s && strcmp(s, "cudaErrorInvalidDevice") == 0, "%s", s ? s : "(null)");

    // cudaDeviceReset frees what the program left allocated; cudart starts afresh after it
    void *left = NULL;
    size_t before = 0, after = 0;
    CHECK_OK("cudaMemGetInfo before", cudaMemGetInfo(&before, &total));
    CHECK_OK("cudaMalloc left allocated", cudaMalloc(&left, 1u << 20));
    CHECK_OK("cudaDeviceReset", cudaDeviceReset());
    CHECK_OK("cudaMemGetInfo after reset", cudaMemGetInfo(&after, &total));
    CHECK("reset freed the allocation", after == before, "free %zu before, %zu after", before, after);
    round_trip("after reset", 4096);

    printf("failures=%d\n", failures);
    return failures != 0;
}
