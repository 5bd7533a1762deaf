/* An NVML program linked to KubeCASH's libnvidia-ml.so.1 (tests/test_native_driver.py).
 * Declares what it uses itself: no nvml.h ships with the pip packages or the toolkit here. */
#include <stdio.h>

typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
int nvmlInit_v2(void);
int nvmlShutdown(void);
int nvmlDeviceGetCount_v2(unsigned int *);
int nvmlDeviceGetHandleByIndex_v2(unsigned int, nvmlDevice_t *);
int nvmlDeviceGetName(nvmlDevice_t, char *, unsigned int);
int nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *);
int nvmlDeviceGetUUID(nvmlDevice_t, char *, unsigned int);
const char *nvmlErrorString(int);

int main(void) {
    unsigned int n = 0;
    nvmlDevice_t h = 0;
    char name[96] = "", uuid[96];
    nvmlMemory_t m = {0, 0, 0};
    printf("count_before_init=%d\n", nvmlDeviceGetCount_v2(&n));
    printf("init=%d\n", nvmlInit_v2());
    int rc = nvmlDeviceGetCount_v2(&n);          /* (arguments are evaluated in no set order) */
    printf("count_rc=%d\ncount=%u\n", rc, n);
    printf("handle=%d\n", nvmlDeviceGetHandleByIndex_v2(0, &h));
    printf("handle_bad=%d\n", nvmlDeviceGetHandleByIndex_v2(n, &h) == 0 ? 0 : 2);
    nvmlDeviceGetHandleByIndex_v2(0, &h);
    rc = nvmlDeviceGetName(h, name, sizeof name);
    printf("name_rc=%d\nname=%s\n", rc, name);
    rc = nvmlDeviceGetMemoryInfo(h, &m);
    printf("mem_rc=%d\ntotal=%llu\nused=%llu\nfree=%llu\n", rc, m.total, m.used, m.free);
    printf("uuid_1=%d\nuuid_2=%d\n", nvmlDeviceGetUUID(h, uuid, sizeof uuid), nvmlDeviceGetUUID(h, uuid, sizeof uuid));
    printf("err_string=%s\n", nvmlErrorString(3));
    printf("shutdown=%d\n", nvmlShutdown());
    return 0;
}
