/* An NVML program linked to KubeCASH's libnvidia-ml.so.1 (tests/test_native_driver.py).
 * Declares what it uses itself, as nvml.h lays it out: no nvml.h ships with the pip packages
 * or the toolkit here. */
#include <stdio.h>
#include <string.h>

typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gi, ci; } nvmlProcessInfo_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
int nvmlInit_v2(void);
int nvmlInitWithFlags(unsigned int);
int nvmlShutdown(void);
int nvmlDeviceGetCount_v2(unsigned int *);
int nvmlDeviceGetHandleByIndex_v2(unsigned int, nvmlDevice_t *);
int nvmlDeviceGetHandleByUUID(const char *, nvmlDevice_t *);
int nvmlDeviceGetIndex(nvmlDevice_t, unsigned int *);
int nvmlDeviceGetName(nvmlDevice_t, char *, unsigned int);
int nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *);
int nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t, nvmlMemory_v2_t *);
int nvmlDeviceGetUUID(nvmlDevice_t, char *, unsigned int);
int nvmlDeviceGetCudaComputeCapability(nvmlDevice_t, int *, int *);
int nvmlDeviceGetUtilizationRates(nvmlDevice_t, nvmlUtilization_t *);
int nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t, unsigned int *, nvmlProcessInfo_t *);
int nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t, unsigned int *, nvmlProcessInfo_v1_t *);
int nvmlDeviceGetTemperature(nvmlDevice_t, int, unsigned int *);
int nvmlSystemGetDriverVersion(char *, unsigned int);
int nvmlSystemGetCudaDriverVersion_v2(int *);
const char *nvmlErrorString(int);

int main(void) {
    unsigned int n = 0, idx = 99;
    nvmlDevice_t h = 0, h2 = 0;
    char name[96] = "", uuid[96] = "", small[8], ver[80] = "";
    nvmlMemory_t m = {0, 0, 0};
    printf("count_before_init=%d\n", nvmlDeviceGetCount_v2(&n));
    printf("init=%d\n", nvmlInit_v2());
    printf("init_flags=%d\n", nvmlInitWithFlags(1));
    int rc = nvmlDeviceGetCount_v2(&n);          /* (arguments are evaluated in no set order) */
    printf("count_rc=%d\ncount=%u\n", rc, n);
    printf("handle=%d\n", nvmlDeviceGetHandleByIndex_v2(0, &h));
    printf("handle_bad=%d\n", nvmlDeviceGetHandleByIndex_v2(n, &h) == 0 ? 0 : 2);
    nvmlDeviceGetHandleByIndex_v2(0, &h);
    rc = nvmlDeviceGetName(h, name, sizeof name);
    printf("name_rc=%d\nname=%s\n", rc, name);
    rc = nvmlDeviceGetMemoryInfo(h, &m);
    printf("mem_rc=%d\ntotal=%llu\nused=%llu\nfree=%llu\n", rc, m.total, m.used, m.free);
    nvmlMemory_v2_t m2 = {.version = (unsigned)(sizeof m2 | (2u << 24))};
    rc = nvmlDeviceGetMemoryInfo_v2(h, &m2);
    printf("mem2_rc=%d\nmem2_total=%llu\nmem2_sum=%d\n", rc, m2.total, m2.used + m2.free == m2.total);
    m2.version = 1;
    printf("mem2_bad_version=%d\n", nvmlDeviceGetMemoryInfo_v2(h, &m2));
    rc = nvmlDeviceGetUUID(h, uuid, sizeof uuid);
    printf("uuid_rc=%d\nuuid=%s\n", rc, uuid);
    printf("uuid_small=%d\n", nvmlDeviceGetUUID(h, small, sizeof small));
    rc = nvmlDeviceGetHandleByUUID(uuid, &h2);
    printf("by_uuid_rc=%d\nby_uuid_same=%d\n", rc, h2 == h);
    printf("by_uuid_bad=%d\n", nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000", &h2));
    rc = nvmlDeviceGetIndex(h, &idx);
    printf("index_rc=%d\nindex=%u\n", rc, idx);
    int ma = -1, mi = -1;
    rc = nvmlDeviceGetCudaComputeCapability(h, &ma, &mi);
    printf("cc_rc=%d\ncc=%d.%d\n", rc, ma, mi);
    nvmlUtilization_t u = {999, 999};
    rc = nvmlDeviceGetUtilizationRates(h, &u);
    printf("util_rc=%d\nutil_gpu=%u\nutil_memory=%u\n", rc, u.gpu, u.memory);
    unsigned int np = 0;
    printf("procs_count_rc=%d\n", nvmlDeviceGetComputeRunningProcesses_v3(h, &np, NULL));
    printf("procs_count=%u\n", np);
    nvmlProcessInfo_t procs[8];
    np = 8;
    rc = nvmlDeviceGetComputeRunningProcesses_v3(h, &np, procs);
    printf("procs_rc=%d\nprocs=", rc);
    for (unsigned i = 0; i < np; i++) printf("%s%u", i ? "," : "", procs[i].pid);
    printf("\nprocs_mem_na=%d\n", np > 0 && procs[0].usedGpuMemory == ~0ull);
    nvmlProcessInfo_v1_t v1[8];
    np = 8;
    rc = nvmlDeviceGetComputeRunningProcesses(h, &np, v1);
    printf("procs_v1_rc=%d\nprocs_v1=", rc);
    for (unsigned i = 0; i < np; i++) printf("%s%u", i ? "," : "", v1[i].pid);
    printf("\n");
    rc = nvmlSystemGetDriverVersion(ver, sizeof ver);
    printf("driver_rc=%d\ndriver=%s\n", rc, ver);
    int cv = 0;
    rc = nvmlSystemGetCudaDriverVersion_v2(&cv);
    printf("cuda_version_rc=%d\ncuda_version=%d\n", rc, cv);
    unsigned int t;
    printf("temp_1=%d\ntemp_2=%d\n", nvmlDeviceGetTemperature(h, 0, &t), nvmlDeviceGetTemperature(h, 0, &t));
    printf("err_string=%s\n", nvmlErrorString(3));
    printf("shutdown=%d\n", nvmlShutdown());
    return 0;
}
