/* A plain CUDA driver-API program, compiled against NVIDIA's cuda.h and linked to KubeCASH's
 * libcuda.so.1 (tests/test_native_driver.py). It prints key=value lines the test checks. */
#include <cuda.h>
#include <dirent.h>
#include <dlfcn.h>
#include <sys/stat.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SAY(k, fmt, ...) printf(k "=" fmt "\n", __VA_ARGS__)

static int roundtrip(size_t n, const char *label) {
    CUdeviceptr d = 0;
    unsigned char *a = malloc(n), *b = malloc(n);
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i * 7 + 3), b[i] = 0;
    CUresult r1 = cuMemAlloc(&d, n);
    CUresult r2 = r1 ? r1 : cuMemcpyHtoD(d, a, n);
    CUresult r3 = r2 ? r2 : cuMemcpyDtoH(b, d, n);
    CUresult r4 = r1 ? r1 : cuMemFree(d);
    int same = r3 == CUDA_SUCCESS && memcmp(a, b, n) == 0;
    printf("%s_alloc=%d\n%s_htod=%d\n%s_dtoh=%d\n%s_free=%d\n%s_same=%d\n", label, r1, label, r2, label, r3,
           label, r4, label, same);
    free(a); free(b);
    return same && r4 == CUDA_SUCCESS;
}

static CUcontext open_ctx(void) {
    CUdevice dev;
    CUcontext ctx = NULL;
    SAY("device_get", "%d", cuDeviceGet(&dev, 0));
    SAY("retain", "%d", cuDevicePrimaryCtxRetain(&ctx, dev));
    SAY("set_current", "%d", cuCtxSetCurrent(ctx));
    return ctx;
}

/* Each thread makes the primary context current (per thread, as in CUDA) and copies. */
/* cuda.h declares cuCtxCreate_v3 only for the driver's own build: the exported name */
CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray, int numParams, unsigned int flags,
                        CUdevice dev);

/* cuLogs*: what a registered callback was told */
static char logged[1024];
static int logged_level = -1, log_calls;
static void on_log(void *data, CUlogLevel level, char *message, size_t length) {
    (void)data;
    log_calls++;
    logged_level = (int)level;
    snprintf(logged, sizeof logged, "%.*s", (int)length, message);
}

static CUcontext shared_ctx;
static void *worker(void *arg) {
    long i = (long)arg;
    if (cuCtxSetCurrent(shared_ctx)) return (void *)1;
    char label[32];
    snprintf(label, sizeof label, "thread%ld", i);
    int ok = 1;
    for (int k = 0; k < 20; k++) ok &= roundtrip(1000 + (size_t)i * 977 + (size_t)k, label);
    return (void *)(long)!ok;
}

/* stdin is still the program's /dev/null: the library closed or took over no descriptor of ours */
static int stdin_intact(void) {
    struct stat st;
    return fstat(0, &st) == 0 && S_ISCHR(st.st_mode);
}

/* The hex mask of a /proc status line ("SigCgt:", "SigBlk:") of task `tid` (0: the process). */
static unsigned long long proc_mask(int tid, const char *key) {
    char path[64], line[256];
    unsigned long long v = ~0ULL;
    if (tid) snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
    else snprintf(path, sizeof path, "/proc/self/status");
    FILE *f = fopen(path, "r");
    if (!f) return v;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) v = strtoull(line + strlen(key), NULL, 16);
    fclose(f);
    return v;
}

static void *sym(const char *name) { return dlsym(RTLD_DEFAULT, name); }

static int proc(const char *name, int version, cuuint64_t flags, const char *expect) {
    void *p = NULL;
    CUdriverProcAddressQueryResult st = 99;
    CUresult r = cuGetProcAddress(name, &p, version, flags, &st);
    int ok = expect ? r == CUDA_SUCCESS && st == CU_GET_PROC_ADDRESS_SUCCESS && p && p == sym(expect)
                    : r == CUDA_ERROR_NOT_FOUND && p == NULL;
    printf("proc_%s_%d_%llu=%d,%d,%d\n", name, version, (unsigned long long)flags, r, (int)st, ok);
    return ok;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "tour";
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(what, "nothing")) {              /* loads the library and calls nothing */
        SAY("loaded", "%d", sym("cuInit") != NULL);
        return 0;
    }
    if (!strcmp(what, "version")) {              /* needs no broker: answered locally */
        int v = 0;
        SAY("driver_version_rc", "%d", cuDriverGetVersion(&v));
        SAY("driver_version", "%d", v);
        int n = -1;
        SAY("count_before_init", "%d", cuDeviceGetCount(&n));
        return 0;
    }
    unsigned long long caught_before = proc_mask(0, "SigCgt:");
    CUresult init = cuInit(0);
    SAY("init", "%d", init);
    if (!strcmp(what, "init")) return 0;
    if (init) return 1;
    if (!strcmp(what, "fork")) {
        open_ctx();
        SAY("parent_pid", "%d", (int)getpid());
        int parent_ok = roundtrip(1000, "parent_before");
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {                          /* the child: a session of its own */
            SAY("child_pid", "%d", (int)getpid());
            int n = 0;
            SAY("child_count", "%d", cuDeviceGetCount(&n));
            SAY("child_devices", "%d", n);
            open_ctx();
            int ok = roundtrip(5000, "child") && stdin_intact();
            _exit(ok ? 0 : 3);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        SAY("child_exit", "%d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        SAY("parent_after_ok", "%d", roundtrip(2000, "parent_after") && parent_ok);
        SAY("stdin_open", "%d", stdin_intact());
        return 0;
    }
    if (!strcmp(what, "signals")) {              /* no handlers of ours; our thread takes none */
        open_ctx();
        /* glibc's own (signals 32 and 33, below SIGRTMIN) appear with the first thread: not ours */
        unsigned long long libc = 0;
        for (int s = 32; s < SIGRTMIN; s++) libc |= 1ULL << (s - 1);
        SAY("handlers_unchanged", "%d", (proc_mask(0, "SigCgt:") & ~libc) == (caught_before & ~libc));
        int others = 0, all_blocked = 1;
        unsigned long long want = 0;
        int sigs[] = {SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, SIGCHLD, SIGPIPE, SIGHUP, SIGQUIT};
        for (unsigned i = 0; i < sizeof sigs / sizeof *sigs; i++) want |= 1ULL << (sigs[i] - 1);
        DIR *tasks = opendir("/proc/self/task");
        for (struct dirent *e; tasks && (e = readdir(tasks));) {
            int tid = atoi(e->d_name);
            if (tid <= 0 || tid == getpid()) continue;        /* the main thread is the program's */
            others++;
            if ((proc_mask(tid, "SigBlk:") & want) != want) all_blocked = 0;
        }
        if (tasks) closedir(tasks);
        SAY("library_threads", "%d", others);
        SAY("library_threads_block_signals", "%d", all_blocked);
        return 0;
    }
    if (!strcmp(what, "threads")) {
        shared_ctx = open_ctx();
        pthread_t t[4];
        for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)i);
        int bad = 0;
        for (int i = 0; i < 4; i++) { void *r; pthread_join(t[i], &r); bad += r != NULL; }
        SAY("threads_failed", "%d", bad);
        return 0;
    }
    if (!strcmp(what, "idle")) {                 /* heartbeats keep an idle session open */
        open_ctx();
        sleep((unsigned)atoi(argc > 2 ? argv[2] : "3"));
        SAY("after_idle_ok", "%d", roundtrip(3000, "idle"));
        return 0;
    }
    int n = 0;
    SAY("count_rc", "%d", cuDeviceGetCount(&n));
    SAY("count", "%d", n);
    CUdevice dev;
    SAY("device_get_bad", "%d", cuDeviceGet(&dev, n));
    char name[256] = "";
    SAY("name_rc", "%d", cuDeviceGetName(name, sizeof name, 0));
    SAY("name", "%s", name);
    size_t total = 0;
    SAY("total_rc", "%d", cuDeviceTotalMem(&total, 0));
    SAY("total", "%zu", total);
    CUuuid u;
    SAY("uuid_rc", "%d", cuDeviceGetUuid(&u, 0));
    printf("uuid=");
    for (int i = 0; i < 16; i++) printf("%02x", (unsigned char)u.bytes[i]);
    printf("\n");
    int major = 0, minor = 0, v = 0;
    SAY("cc_rc", "%d", cuDeviceComputeCapability(&major, &minor, 0));
    SAY("cc", "%d.%d", major, minor);
    SAY("attr_warp_rc", "%d", cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_WARP_SIZE, 0));
    SAY("attr_warp", "%d", v);
    SAY("attr_block_x_rc", "%d", cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X, 0));
    SAY("attr_block_x", "%d", v);
    SAY("attr_cc_major_rc", "%d", cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0));
    SAY("attr_cc_major", "%d", v);
    SAY("attr_managed_rc", "%d", cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY, 0));
    SAY("attr_managed", "%d", v);
    CUdeviceptr none;
    SAY("alloc_no_ctx", "%d", cuMemAlloc(&none, 16));
    CUcontext ctx = open_ctx(), cur = NULL;
    SAY("get_current_rc", "%d", cuCtxGetCurrent(&cur));
    SAY("current_is_primary", "%d", cur == ctx && ctx != NULL);
    CUdevice cdev = -1;
    SAY("ctx_device_rc", "%d", cuCtxGetDevice(&cdev));
    SAY("ctx_device", "%d", cdev);
    size_t fr = 0, tot = 0;
    SAY("mem_info_rc", "%d", cuMemGetInfo(&fr, &tot));
    SAY("mem_info_total", "%zu", tot);
    SAY("mem_info_free", "%zu", fr);
    roundtrip(4096, "small");
    roundtrip((5u << 20) + 123, "large");        /* past the inline limit: the staging segment */
    CUdeviceptr big = 0;
    SAY("over_quota", "%d", cuMemAlloc(&big, total + (1u << 20)));
    SAY("sync", "%d", cuCtxSynchronize());
    CUipcMemHandle ipc;                          /* any entry point the table leaves out */
    SAY("unsupported_1", "%d", cuIpcGetMemHandle(&ipc, big));
    SAY("unsupported_2", "%d", cuIpcGetMemHandle(&ipc, big));
    const char *str = NULL;
    SAY("err_name_rc", "%d", cuGetErrorName(CUDA_ERROR_OUT_OF_MEMORY, &str));
    SAY("err_name", "%s", str ? str : "(null)");
    SAY("err_string_rc", "%d", cuGetErrorString(CUDA_ERROR_OUT_OF_MEMORY, &str));
    SAY("err_string", "%s", str ? str : "(null)");
    SAY("err_name_bad", "%d", cuGetErrorName((CUresult)123456, &str));
    int procs = proc("cuMemAlloc", 3020, CU_GET_PROC_ADDRESS_DEFAULT, "cuMemAlloc_v2")
              & proc("cuMemAlloc", 2000, CU_GET_PROC_ADDRESS_DEFAULT, "cuMemAlloc")
              & proc("cuDeviceGetUuid", 12000, CU_GET_PROC_ADDRESS_DEFAULT, "cuDeviceGetUuid_v2")
              & proc("cuDeviceGetUuid", 9020, CU_GET_PROC_ADDRESS_DEFAULT, "cuDeviceGetUuid")
              & proc("cuGetProcAddress", 12000, CU_GET_PROC_ADDRESS_DEFAULT, "cuGetProcAddress_v2")
              & proc("cuMemcpyHtoD", 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM, "cuMemcpyHtoD_v2_ptds")
              & proc("cuMemcpyHtoD", 12000, CU_GET_PROC_ADDRESS_LEGACY_STREAM, "cuMemcpyHtoD_v2")
              & proc("cuStreamCreate", 12000, CU_GET_PROC_ADDRESS_DEFAULT, "cuStreamCreate");
    SAY("procs_ok", "%d", procs);
    void *p = NULL;
    CUdriverProcAddressQueryResult st;
    SAY("proc_too_old", "%d", cuGetProcAddress("cuMemAlloc", &p, 1000, 0, &st));
    SAY("proc_too_old_status", "%d", (int)st);
    SAY("proc_unknown", "%d", cuGetProcAddress("cuNoSuchFunction", &p, 13000, 0, &st));
    SAY("proc_unknown_status", "%d", (int)st);
    /* a pointer cuGetProcAddress gave works like the symbol */
    CUresult (*count_fn)(int *) = NULL;
    cuGetProcAddress("cuDeviceGetCount", (void **)&count_fn, 12000, 0, &st);
    int n2 = 0;
    SAY("proc_call", "%d", count_fn ? count_fn(&n2) : -1);
    SAY("proc_call_count", "%d", n2);
    /* a created context: pushed current, its own allocations and streams, which go with it */
    CUcontext made = NULL, top = NULL;
    size_t free_before = 0, free_in = 0, free_after = 0;
    cuMemGetInfo(&free_before, &tot);
    SAY("create_rc", "%d", cuCtxCreate(&made, NULL, 0, 0));
    cuCtxGetCurrent(&top);
    SAY("create_current", "%d", top == made && made != NULL && made != ctx);
    CUdeviceptr mine = 0;
    CUstream ms = NULL;
    SAY("create_alloc", "%d", cuMemAlloc(&mine, 8u << 20));
    SAY("create_stream", "%d", cuStreamCreate(&ms, 0));
    cuMemGetInfo(&free_in, &tot);
    SAY("create_charged", "%d", free_before - free_in >= (8u << 20));
    CUdevice mdev = -1;
    SAY("create_device", "%d", cuCtxGetDevice(&mdev) == CUDA_SUCCESS && mdev == 0);
    SAY("create_push_primary", "%d", cuCtxPushCurrent(ctx));   /* the primary's work is untouched */
    CUcontext popped = NULL;
    SAY("create_pop", "%d", cuCtxPopCurrent(&popped) == CUDA_SUCCESS && popped == ctx);
    SAY("destroy_primary", "%d", cuCtxDestroy(ctx));           /* released, not destroyed */
    SAY("destroy_rc", "%d", cuCtxDestroy(made));
    cuCtxGetCurrent(&top);
    SAY("destroy_popped", "%d", top == ctx);                   /* off the stack: the primary is current again */
    SAY("destroy_twice", "%d", cuCtxDestroy(made));
    cuMemGetInfo(&free_after, &tot);
    SAY("destroy_freed", "%d", free_after == free_before);
    SAY("destroy_stream_gone", "%d", cuStreamQuery(ms));
    SAY("destroy_alloc_gone", "%d", cuMemFree(mine));
    /* the driver's logs: the reason for a refusal reaches a callback and the dumps */
    CUlogsCallbackHandle cb = NULL;
    CUlogIterator it = 0;
    SAY("logs_register", "%d", cuLogsRegisterCallback(on_log, NULL, &cb));
    SAY("logs_current", "%d", cuLogsCurrent(&it, 0));
    CUexecAffinityParam aff = {CU_EXEC_AFFINITY_TYPE_SM_COUNT, {{1}}};
    SAY("create_affinity", "%d", cuCtxCreate_v3(&made, &aff, 1, 0, 0));
    SAY("logs_callback", "%d", log_calls == 1 && logged_level == CU_LOG_LEVEL_ERROR &&
                               strstr(logged, "execution affinity") != NULL && !strchr(logged, '\n'));
    char dump[4096];
    size_t dsize = sizeof dump;
    CUlogIterator it2 = it;
    SAY("logs_dump", "%d", cuLogsDumpToMemory(&it2, dump, &dsize, 0));
    SAY("logs_dump_text", "%d", dsize == strlen(dump) && strstr(dump, "execution affinity") != NULL && it2 == it + 1);
    dsize = sizeof dump;
    SAY("logs_dump_after", "%d", cuLogsDumpToMemory(&it2, dump, &dsize, 0) == CUDA_SUCCESS && dsize == 0);
    char small[8];
    size_t ssize = sizeof small;
    CUlogIterator it3 = it;
    SAY("logs_dump_small", "%d", cuLogsDumpToMemory(&it3, small, &ssize, 0));   /* none fits */
    SAY("logs_unregister", "%d", cuLogsUnregisterCallback(cb));
    cuCtxCreate_v3(&made, &aff, 1, 0, 0);
    SAY("logs_after_unregister", "%d", log_calls);
    SAY("release", "%d", cuDevicePrimaryCtxRelease(0));
    SAY("stdin_open", "%d", stdin_intact());
    return 0;
}
