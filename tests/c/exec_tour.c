/* A driver-API program that runs work through KubeCASH's libcuda.so.1: it loads the kernels
 * of tests/c/kernels.cu as nvcc built them (PTX text or a fatbin file), launches them on
 * streams with events around them, uses module globals, memsets, device-to-device and
 * unified copies, pinned memory, and checks error paths. Results are checked here against
 * host references; each check prints check_<name>=1 or =0 (with what it got), and the last
 * line is failed=<count>. tests/test_native_driver.py builds and runs it.
 *
 *   exec_tour ptx|fatbin <image file> [<cubin file>]   the tour
 *   exec_tour threads <image file>        threads launching on streams of their own at once
 *   exec_tour fork <image file>           a forked child: its parent's handles are not its own
 *   exec_tour fault <image file>          a kernel that traps: the error is sticky
 *   exec_tour bench <image file> <count>  launches/s: posted launches, then launch + sync
 *   exec_tour posted <image file>         a posted launch runs with no later driver call */
#include <cuda.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tour.h"

struct Affine { float scale; float shift; int count; };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static size_t smem_per_block(int block) { return (size_t)block * 64; }   /* for cuOccupancyMaxPotentialBlockSize */

static int same_floats(const float *x, const float *want, int n, int *bad) {
    for (int i = 0; i < n; i++)
        if (fabsf(x[i] - want[i]) > 1e-5f) { *bad = i; return 0; }
    return 1;
}

static int bench(CUmodule mod, long count) {
    CUfunction f;
    CUstream s;
    CUdeviceptr a;
    if (cuModuleGetFunction(&f, mod, "vec_add") || cuStreamCreate(&s, CU_STREAM_NON_BLOCKING) ||
        cuMemAlloc(&a, 4 * sizeof(float)))
        return 1;
    int n = 1;
    void *args[] = {&a, &a, &a, &n};
    if (cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, s, args, NULL) || cuStreamSynchronize(s)) return 1;  /* warm */
    double t0 = now();
    for (long i = 0; i < count; i++)
        if (cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, s, args, NULL)) return 1;
    double t1 = now();
    if (cuStreamSynchronize(s)) return 1;
    double t2 = now();
    long synced = count / 10 > 0 ? count / 10 : 1;
    for (long i = 0; i < synced; i++)
        if (cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, s, args, NULL) || cuStreamSynchronize(s)) return 1;
    double t3 = now();
    printf("launches=%ld\nposted_per_s=%.0f\ncompleted_per_s=%.0f\nsynced=%ld\nlaunch_sync_per_s=%.0f\n",
           count, count / (t1 - t0), count / (t2 - t0), synced, synced / (t3 - t2));
    return 0;
}

/* n floats: c = a + b (+ the module's bias, 0 here) on stream s, checked; 1 if right. */
static int vec_add_once(CUfunction f, CUstream s, int n, float seed) {
    size_t bytes = n * sizeof(float);
    float *a = malloc(bytes), *b = malloc(bytes), *c = malloc(bytes);
    for (int i = 0; i < n; i++) a[i] = seed + i, b[i] = 2.0f * i, c[i] = -1;
    CUdeviceptr da, db, dc;
    int ok = !cuMemAlloc(&da, bytes) && !cuMemAlloc(&db, bytes) && !cuMemAlloc(&dc, bytes);
    void *args[] = {&da, &db, &dc, &n};
    ok = ok && !cuMemcpyHtoDAsync(da, a, bytes, s) && !cuMemcpyHtoDAsync(db, b, bytes, s) &&
         !cuLaunchKernel(f, (n + 127) / 128, 1, 1, 128, 1, 1, 0, s, args, NULL) &&
         !cuMemcpyDtoHAsync(c, dc, bytes, s) && !cuStreamSynchronize(s);
    for (int i = 0; i < n && ok; i++) ok = c[i] == seed + 3.0f * i;
    ok = !cuMemFree(da) && !cuMemFree(db) && !cuMemFree(dc) && ok;
    free(a); free(b); free(c);
    return ok;
}

static CUmodule shared_mod;
static CUcontext shared_ctx;
static void *worker(void *arg) {
    long t = (long)arg;
    CUfunction f;
    CUstream s;
    if (cuCtxSetCurrent(shared_ctx) || cuModuleGetFunction(&f, shared_mod, "vec_add") || cuStreamCreate(&s, 0))
        return (void *)1;
    int ok = 1;
    for (int k = 0; k < 15 && ok; k++) ok = vec_add_once(f, s, 1000 + 37 * (int)t + k, (float)(t * 100 + k));
    ok = !cuStreamDestroy(s) && ok;
    return (void *)(long)!ok;
}

static void threads(CUcontext ctx, const char *image) {
    if (cuModuleLoadData(&shared_mod, image)) { failed++; return; }
    shared_ctx = ctx;
    pthread_t th[4];
    long bad_threads = 0;
    for (long t = 0; t < 4; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (int t = 0; t < 4; t++) {
        void *r;
        pthread_join(th[t], &r);
        bad_threads += (long)r;
    }
    CHECK("threads", bad_threads == 0, "%ld threads failed", bad_threads);
}

/* A module from the image and one of its kernels, checked under `what`. */
static CUfunction kernel_of(const char *what, const void *image, const char *name, CUmodule *mod) {
    CUfunction f = NULL;
    CUresult r = cuModuleLoadData(mod, image);
    if (!r) r = cuModuleGetFunction(&f, *mod, name);
    CHECK(what, r == CUDA_SUCCESS, "loading %s: %d", name, (int)r);
    return f;
}

static void forked(CUcontext ctx, const char *image) {
    CUmodule mod;
    CUstream s;
    CUfunction f = kernel_of("parent_load", image, "vec_add", &mod);
    OK("parent_stream", cuStreamCreate(&s, 0));
    CHECK("parent_before", vec_add_once(f, s, 5000, 1.0f), "%s", "wrong result");
    pid_t pid = fork();
    if (pid == 0) {                          /* a session of its own: the old handles are stale */
        CUmodule m2;
        CUfunction f2;
        int n = 1;
        void *args[] = {&n, &n, &n, &n};
        int ok = cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, args, NULL) == CUDA_ERROR_INVALID_HANDLE &&
                 cuStreamSynchronize(s) == CUDA_ERROR_INVALID_HANDLE &&
                 cuModuleGetFunction(&f2, mod, "vec_add") == CUDA_ERROR_INVALID_HANDLE &&
                 !cuModuleLoadData(&m2, image) && !cuModuleGetFunction(&f2, m2, "vec_add") &&
                 vec_add_once(f2, NULL, 3000, 7.0f);
        _exit(ok ? 0 : 3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK("child", WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d", status);
    CHECK("parent_after", vec_add_once(f, s, 5000, 2.0f), "%s", "wrong result");
}

static void fault(CUcontext ctx, const char *image) {
    CUmodule mod;
    CUdeviceptr out;
    CUfunction f = kernel_of("load", image, "boom", &mod);
    OK("alloc", cuMemAlloc(&out, 64 * sizeof(int)));
    void *args[] = {&out};
    OK("launch", cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, NULL, args, NULL));
    RC("sync", cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_INSTRUCTION);
    RC("sticky_sync", cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_INSTRUCTION);
    RC("sticky_alloc", cuMemAlloc(&out, 64), CUDA_ERROR_ILLEGAL_INSTRUCTION);
    RC("sticky_launch_sync", cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, args, NULL) ?: cuCtxSynchronize(),
       CUDA_ERROR_ILLEGAL_INSTRUCTION);
}

/* The push buffer leaves after a short delay on its own (session.c's flusher): a launch that
 * nothing synchronizes still runs, as on a GPU. Its result is read straight from the device
 * pointer, which on a CPU device is this process's mapping of the arena: no driver call. */
static void posted(CUcontext ctx, const char *image) {
    CUmodule mod;
    CUdeviceptr a, c;
    CUfunction f = kernel_of("load", image, "vec_add", &mod);
    int n = 1024;
    float ones[1024];
    for (int i = 0; i < n; i++) ones[i] = 1.0f;
    OK("alloc", cuMemAlloc(&a, n * sizeof(float)) ?: cuMemAlloc(&c, n * sizeof(float)));
    OK("fill", cuMemcpyHtoD(a, ones, sizeof ones) ?: cuMemsetD32(c, 0, n) ?: cuCtxSynchronize());
    void *args[] = {&a, &a, &c, &n};
    OK("launch", cuLaunchKernel(f, n / 256, 1, 1, 256, 1, 1, 0, NULL, args, NULL));
    volatile float *out = (volatile float *)(uintptr_t)c;
    double t0 = now();
    while (now() - t0 < 30 && out[n - 1] != 2.0f) usleep(1000);
    CHECK("ran_without_sync", out[0] == 2.0f && out[n - 1] == 2.0f, "c[0]=%g c[%d]=%g after %.1f s",
          out[0], n - 1, out[n - 1], now() - t0);
    OK("sync_after", cuCtxSynchronize());
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 3) { fprintf(stderr, "usage: exec_tour ptx|fatbin|bench <image> [count]\n"); return 2; }
    const char *mode = argv[1], *path = argv[2];
    size_t image_len = 0;
    char *image = read_file(path, &image_len);
    if (!image) { fprintf(stderr, "cannot read %s\n", path); return 2; }
    CUdevice dev;
    CUcontext ctx;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) {
        fprintf(stderr, "no context\n");
        return 1;
    }
    CUmodule mod = NULL, mod2 = NULL;
    if (!strcmp(mode, "bench")) {
        if (cuModuleLoadData(&mod, image)) return 1;
        return bench(mod, argc > 3 ? atol(argv[3]) : 20000);
    }
    void (*other)(CUcontext, const char *) = !strcmp(mode, "threads") ? threads
                                          : !strcmp(mode, "fork") ? forked : !strcmp(mode, "fault") ? fault
                                          : !strcmp(mode, "posted") ? posted : NULL;
    if (other) {
        other(ctx, image);
        printf("failed=%d\n", failed);
        return 0;
    }
    int is_fatbin = !strcmp(mode, "fatbin");

    /* -- modules: from memory and from the file -- */
    if (is_fatbin) {
        OK("load_fatbin", cuModuleLoadData(&mod, image));
        /* as cudart registers it: {magic, version, data, filename} */
        struct { int magic, version; const void *data; void *unused; } wrapper = {0x466243b1, 1, image, NULL};
        OK("load_fatbin_wrapper", cuModuleLoadFatBinary(&mod2, &wrapper));
    } else {
        char log[256] = "garbage", elog[256] = "garbage";
        CUjit_option opts[] = {CU_JIT_INFO_LOG_BUFFER, CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
                               CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
        void *vals[] = {log, (void *)(size_t)sizeof log, elog, (void *)(size_t)sizeof elog};
        OK("load_ptx_ex", cuModuleLoadDataEx(&mod, image, 4, opts, vals));
        CHECK("jit_logs_empty", log[0] == 0 && elog[0] == 0, "info '%s' error '%s'", log, elog);
        OK("load_ptx_data", cuModuleLoadData(&mod2, image));
    }
    if (!is_fatbin) {          /* the JIT linker: one PTX is its own image; anything else refused */
        CUlinkState ls;
        void *out = NULL;
        size_t out_size = 0;
        CUmodule linked;
        char llog[64] = "garbage";
        CUjit_option lopts[] = {CU_JIT_INFO_LOG_BUFFER, CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES};
        void *lvals[] = {llog, (void *)(size_t)sizeof llog};
        OK("link_create", cuLinkCreate(2, lopts, lvals, &ls));
        CHECK("link_log_empty", llog[0] == 0, "'%s'", llog);
        RC("link_complete_empty", cuLinkComplete(ls, &out, &out_size), CUDA_ERROR_INVALID_VALUE);
        RC("link_cubin", cuLinkAddData(ls, CU_JIT_INPUT_CUBIN, (void *)image, 64, "x.cubin", 0, NULL, NULL),
           CUDA_ERROR_NOT_SUPPORTED);
        OK("link_add_ptx", cuLinkAddData(ls, CU_JIT_INPUT_PTX, (void *)image, strlen(image) + 1, "k.ptx", 0, NULL, NULL));
        RC("link_second_input", cuLinkAddFile(ls, CU_JIT_INPUT_PTX, path, 0, NULL, NULL), CUDA_ERROR_NOT_SUPPORTED);
        OK("link_complete", cuLinkComplete(ls, &out, &out_size));
        CHECK("link_image", out && out_size == strlen(image) + 1 && !memcmp(out, image, out_size), "size %zu", out_size);
        OK("link_load", cuModuleLoadData(&linked, out));
        CUfunction lf;
        OK("link_function", cuModuleGetFunction(&lf, linked, "vec_add"));
        OK("link_unload", cuModuleUnload(linked));
        OK("link_destroy", cuLinkDestroy(ls));
        RC("link_destroy_again", cuLinkDestroy(ls), CUDA_ERROR_INVALID_HANDLE);
        RC("link_file_missing", cuLinkAddFile((CUlinkState)(size_t)8, CU_JIT_INPUT_PTX, "/nonexistent.ptx", 0, NULL,
                                              NULL), CUDA_ERROR_FILE_NOT_FOUND);
    }
    CUmodule from_file = NULL;
    OK("load_file", cuModuleLoad(&from_file, path));
    RC("load_missing_file", cuModuleLoad(&from_file, "/nonexistent/kernels.ptx"), CUDA_ERROR_FILE_NOT_FOUND);
    CUmodule junk;
    CUresult jr = cuModuleLoadData(&junk, "this is not PTX");
    CHECK("load_garbage_fails", jr != CUDA_SUCCESS, "rc %d", (int)jr);
    RC("load_empty", cuModuleLoadData(&junk, ""), CUDA_ERROR_INVALID_IMAGE);
    RC("load_null", cuModuleLoadData(&junk, NULL), CUDA_ERROR_INVALID_VALUE);
    if (argc > 3) {                /* a bare CUBIN (SASS only), sized from its ELF headers */
        size_t cubin_len;
        char *cubin = read_file(argv[3], &cubin_len);
        RC("load_cubin", cuModuleLoadData(&junk, cubin), CUDA_ERROR_NO_BINARY_FOR_GPU);
        free(cubin);
    }

    CUfunction vec_add = NULL, affine = NULL, nope = NULL;
    OK("get_function", cuModuleGetFunction(&vec_add, mod, "vec_add"));
    OK("get_function_affine", cuModuleGetFunction(&affine, mod, "affine"));
    CUfunction again = NULL;
    OK("get_function_again", cuModuleGetFunction(&again, mod, "vec_add"));
    CHECK("same_function_handle", again == vec_add, "%p vs %p", (void *)again, (void *)vec_add);
    RC("unknown_function", cuModuleGetFunction(&nope, mod, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);
    RC("bad_module_handle", cuModuleGetFunction(&nope, (CUmodule)(size_t)0x12345670, "vec_add"),
       CUDA_ERROR_INVALID_HANDLE);

    /* -- function attributes -- */
    int v = -1;
    OK("attr_max_threads", cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, vec_add));
    CHECK("attr_max_threads_value", v == 1024, "got %d", v);
    OK("attr_ptx_version", cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_PTX_VERSION, vec_add));
    CHECK("attr_ptx_version_value", v == 80, "got %d", v);
    OK("attr_regs", cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_NUM_REGS, vec_add));
    OK("set_dyn_shared", cuFuncSetAttribute(vec_add, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 4096));
    OK("get_dyn_shared", cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, vec_add));
    CHECK("dyn_shared_value", v == 4096, "got %d", v);
    OK("cache_config", cuFuncSetCacheConfig(vec_add, CU_FUNC_CACHE_PREFER_L1));
    RC("attr_bad_handle", cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_NUM_REGS, (CUfunction)(size_t)0x40),
       CUDA_ERROR_INVALID_HANDLE);

    /* -- occupancy (a CPU device: 2048 threads, 32 blocks, 48 KiB shared per multiprocessor) -- */
    int sms = 0, blocks = -1, grid = -1, block = -1;
    size_t avail = 1;
    OK("sm_count", cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0));
    OK("occ_256", cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, affine, 256, 0));
    CHECK("occ_256_value", blocks == 8, "got %d", blocks);
    OK("occ_1", cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, affine, 1, 0));
    CHECK("occ_1_value", blocks == 32, "got %d", blocks);           /* a warp each, 32 blocks at most */
    OK("occ_smem", cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&blocks, affine, 256, 16 << 10, 1));
    CHECK("occ_smem_value", blocks == 3, "got %d", blocks);
    OK("occ_too_much_smem", cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, affine, 256, 64 << 10));
    CHECK("occ_too_much_smem_value", blocks == 0, "got %d", blocks);
    OK("occ_opted_in", cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, vec_add, 256, 8192));
    CHECK("occ_opted_in_value", blocks == 0, "got %d", blocks);     /* past the 4096 it was set to */
    RC("occ_bad_flags", cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&blocks, affine, 256, 0, 7),
       CUDA_ERROR_INVALID_VALUE);
    RC("occ_bad_handle", cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, (CUfunction)(size_t)0x40, 256, 0),
       CUDA_ERROR_INVALID_HANDLE);
    OK("potential", cuOccupancyMaxPotentialBlockSize(&grid, &block, affine, NULL, 0, 0));
    CHECK("potential_value", block == 1024 && grid == 2 * sms, "got block %d grid %d", block, grid);
    OK("potential_limited", cuOccupancyMaxPotentialBlockSize(&grid, &block, affine, NULL, 0, 100));
    /* 100 threads take 4 warps (16 blocks: 1600 threads); 64 fill the multiprocessor */
    CHECK("potential_limited_value", block == 64 && grid == 32 * sms, "got block %d grid %d", block, grid);
    OK("potential_b2d", cuOccupancyMaxPotentialBlockSizeWithFlags(&grid, &block, affine, smem_per_block, 0, 0, 0));
    CHECK("potential_b2d_value", block == 768 && grid == sms, "got block %d grid %d", block, grid);
    OK("avail_smem", cuOccupancyAvailableDynamicSMemPerBlock(&avail, affine, 4, 256));
    CHECK("avail_smem_value", avail == 12288, "got %zu", avail);
    OK("avail_smem_none", cuOccupancyAvailableDynamicSMemPerBlock(&avail, affine, 9, 256));
    CHECK("avail_smem_none_value", avail == 0, "got %zu", avail);   /* 9 blocks of 256 never fit */

    /* -- globals -- */
    CUdeviceptr bias = 0, hits = 0;
    size_t bias_size = 0;
    OK("get_global", cuModuleGetGlobal(&bias, &bias_size, mod, "bias"));
    CHECK("global_size", bias_size == sizeof(float), "got %zu", bias_size);
    OK("get_global_hits", cuModuleGetGlobal(&hits, NULL, mod, "hits"));
    RC("unknown_global", cuModuleGetGlobal(&bias, &bias_size, mod, "no_such_global"), CUDA_ERROR_NOT_FOUND);
    float half = 0.5f, got_bias = 0;
    OK("set_global", cuMemcpyHtoD(bias, &half, sizeof half));
    OK("get_global_back", cuMemcpyDtoH(&got_bias, bias, sizeof got_bias));
    CHECK("global_roundtrip", got_bias == 0.5f, "got %f", got_bias);
    OK("memset_global", cuMemsetD32(hits, 0, 1));

    /* -- a vector add on a created stream, with events around it -- */
    const int n = 100000;                       /* 400 KB: past the inline limit, staged */
    size_t bytes = n * sizeof(float);
    float *ha, *hb, *hc = malloc(bytes), *want = malloc(bytes);
    OK("alloc_host", cuMemAllocHost((void **)&ha, bytes));
    OK("host_alloc", cuMemHostAlloc((void **)&hb, bytes, CU_MEMHOSTALLOC_PORTABLE));
    for (int i = 0; i < n; i++) ha[i] = (float)i, hb[i] = 2.0f * i, want[i] = 3.0f * i + 0.5f;
    CUdeviceptr da, db, dc;
    OK("alloc_a", cuMemAlloc(&da, bytes));
    OK("alloc_b", cuMemAlloc(&db, bytes));
    OK("alloc_c", cuMemAlloc(&dc, bytes));
    CUstream s, s2;
    OK("stream_create", cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK("stream_create_prio", cuStreamCreateWithPriority(&s2, 0, -1));
    unsigned flags = 99;
    int prio = 99;
    OK("stream_flags", cuStreamGetFlags(s, &flags));
    CHECK("stream_flags_value", flags == CU_STREAM_NON_BLOCKING, "got %u", flags);
    int least = 9, greatest = 9;
    OK("priority_range", cuCtxGetStreamPriorityRange(&least, &greatest));
    CHECK("priority_range_value", least == 0 && greatest == 0, "(%d, %d)", least, greatest);
    OK("stream_priority", cuStreamGetPriority(s2, &prio));
    CHECK("stream_priority_value", prio == 0, "got %d", prio);
    CUevent start, stop, untimed;
    OK("event_create", cuEventCreate(&start, CU_EVENT_DEFAULT));
    OK("event_create2", cuEventCreate(&stop, CU_EVENT_DEFAULT));
    OK("event_create3", cuEventCreate(&untimed, CU_EVENT_DISABLE_TIMING));
    OK("htod_async_a", cuMemcpyHtoDAsync(da, ha, bytes, s));
    OK("htod_async_b", cuMemcpyHtoDAsync(db, hb, bytes, s));
    OK("record_start", cuEventRecord(start, s));
    int nn = n;
    void *args[] = {&da, &db, &dc, &nn};
    OK("launch", cuLaunchKernel(vec_add, (n + 255) / 256, 1, 1, 256, 1, 1, 0, s, args, NULL));
    OK("record_stop", cuEventRecord(stop, s));
    OK("record_untimed", cuEventRecord(untimed, s));
    OK("stream_wait_event", cuStreamWaitEvent(s2, stop, 0));
    OK("stream_sync", cuStreamSynchronize(s));
    OK("event_sync", cuEventSynchronize(stop));
    OK("event_query", cuEventQuery(stop));
    OK("stream_query", cuStreamQuery(s));
    float ms = -1;
    OK("elapsed", cuEventElapsedTime(&ms, start, stop));
    CHECK("elapsed_value", ms >= 0 && ms < 60000, "got %f", ms);
    RC("elapsed_untimed", cuEventElapsedTime(&ms, start, untimed), CUDA_ERROR_INVALID_HANDLE);
    memset(hc, 0, bytes);
    OK("dtoh_async", cuMemcpyDtoHAsync(hc, dc, bytes, s));
    int bad = -1;
    CHECK("vec_add_result", same_floats(hc, want, n, &bad), "c[%d] = %f, want %f", bad, bad >= 0 ? hc[bad] : 0,
          bad >= 0 ? want[bad] : 0);
    unsigned h = 0;
    OK("read_hits", cuMemcpyDtoH(&h, hits, sizeof h));
    CHECK("hits_value", h == (unsigned)n, "got %u", h);

    /* -- pointer attributes: a device allocation, a pinned block, memory of no one's -- */
    {
        unsigned mt = 99;
        int ord = 99;
        CUdeviceptr start = 0;
        size_t rsize = 0;
        OK("ptr_type_device", cuPointerGetAttribute(&mt, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, da + 100));
        CHECK("ptr_type_device_value", mt == CU_MEMORYTYPE_DEVICE, "got %u", mt);
        OK("ptr_ordinal", cuPointerGetAttribute(&ord, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, da + 100));
        OK("ptr_range", cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, da + 100));
        OK("ptr_range_size", cuPointerGetAttribute(&rsize, CU_POINTER_ATTRIBUTE_RANGE_SIZE, da + 100));
        CHECK("ptr_range_value", ord == 0 && start == da && rsize >= bytes, "ordinal %d start %#llx size %zu", ord,
              (unsigned long long)start, rsize);
        OK("ptr_type_pinned", cuPointerGetAttribute(&mt, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)(ha + 3)));
        CHECK("ptr_type_pinned_value", mt == CU_MEMORYTYPE_HOST, "got %u", mt);
        RC("ptr_unknown", cuPointerGetAttribute(&mt, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)hc),
           CUDA_ERROR_INVALID_VALUE);
        CUpointer_attribute which[2] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL};
        void *vals[2] = {&mt, &ord};
        mt = 99;
        OK("ptr_attrs_unknown", cuPointerGetAttributes(2, which, vals, (CUdeviceptr)(uintptr_t)hc));
        CHECK("ptr_attrs_unknown_value", mt == 0 && ord == -2, "type %u ordinal %d", mt, ord);   /* unregistered */
        /* the context of a pinned block and of device memory: the device's primary one (what
         * PyTorch's is_pinned asks, through cudaPointerGetAttributes) */
        CUcontext pctx = NULL, owner = NULL, cur = NULL;
        CUdeviceptr dptr = 1;      /* a pinned block has no device address here: NULL, no error */
        CUpointer_attribute which_ctx[3] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_CONTEXT,
                                            CU_POINTER_ATTRIBUTE_DEVICE_POINTER};
        void *vals_ctx[3] = {&mt, &pctx, &dptr};
        OK("ptr_attrs_pinned_ctx", cuPointerGetAttributes(3, which_ctx, vals_ctx, (CUdeviceptr)(uintptr_t)(ha + 3)));
        CHECK("ptr_attrs_pinned_dptr", dptr == 0, "device pointer %#llx", (unsigned long long)dptr);
        OK("ptr_ctx_device", cuPointerGetAttribute(&owner, CU_POINTER_ATTRIBUTE_CONTEXT, da + 100));
        OK("ptr_ctx_current", cuCtxGetCurrent(&cur));
        CHECK("ptr_ctx_value", mt == CU_MEMORYTYPE_HOST && pctx == cur && owner == cur, "type %u ctx %p %p, current %p",
              mt, (void *)pctx, (void *)owner, (void *)cur);
    }

    /* -- graphs through the driver API: a capture with an event record node, its error paths -- */
    {
        CUgraph g = NULL, none = NULL;
        CUgraphExec ge = NULL;
        CUstreamCaptureStatus cs = 9;
        cuuint64_t cid = 0;
        const CUgraphNode *deps = NULL;
        size_t ndeps = 9;
        RC("capture_legacy", cuStreamBeginCapture(CU_STREAM_LEGACY, CU_STREAM_CAPTURE_MODE_GLOBAL),
           CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        RC("end_not_capturing", cuStreamEndCapture(s, &g), CUDA_ERROR_ILLEGAL_STATE);
        OK("memset_c_graph", cuMemsetD32(dc, 0, n));
        OK("capture_begin", cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
        RC("capture_twice", cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_ERROR_ILLEGAL_STATE);
        OK("capture_record_start", cuEventRecord(start, s));
        OK("capture_launch", cuLaunchKernel(vec_add, (n + 255) / 256, 1, 1, 256, 1, 1, 0, s, args, NULL));
        OK("capture_record_stop", cuEventRecord(stop, s));
        OK("capture_info", cuStreamGetCaptureInfo(s, &cs, &cid, &g, &deps, NULL, &ndeps));
        CHECK("capture_info_value", cs == CU_STREAM_CAPTURE_STATUS_ACTIVE && cid > 0 && g && ndeps == 1 && deps,
              "status %d id %llu graph %p deps %zu", (int)cs, (unsigned long long)cid, (void *)g, ndeps);
        RC("capture_ctx_sync", cuCtxSynchronize(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        RC("capture_join", cuStreamWaitEvent(s2, stop, 0), CUDA_ERROR_NOT_SUPPORTED);   /* across streams */
        unsigned got = 1;
        OK("nothing_ran", cuMemcpyDtoH(&got, dc, sizeof got));       /* another stream: allowed */
        CHECK("nothing_ran_value", got == 0, "c[0] = %u during the capture", got);
        OK("capture_end", cuStreamEndCapture(s, &g));
        size_t gn = 0;
        OK("graph_nodes", cuGraphGetNodes(g, NULL, &gn));
        CHECK("graph_nodes_value", gn == 3, "%zu nodes", gn);
        OK("graph_instantiate", cuGraphInstantiateWithFlags(&ge, g, 0));
        OK("graph_upload", cuGraphUpload(ge, s));
        OK("graph_launch", cuGraphLaunch(ge, s));
        OK("graph_launch_again", cuGraphLaunch(ge, s));
        OK("graph_sync", cuStreamSynchronize(s));
        OK("graph_dtoh", cuMemcpyDtoH(hc, dc, bytes));
        CHECK("graph_result", same_floats(hc, want, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);
        ms = -1;
        OK("graph_elapsed", cuEventElapsedTime(&ms, start, stop));   /* the graph's event nodes ran */
        CHECK("graph_elapsed_value", ms >= 0 && ms < 60000, "got %f", ms);
        RC("graph_bad_handle", cuGraphLaunch((CUgraphExec)(size_t)0x1234560, s), CUDA_ERROR_INVALID_VALUE);
        RC("graph_bad_graph", cuGraphInstantiateWithFlags(&ge, (CUgraph)(size_t)0x40, 0), CUDA_ERROR_INVALID_VALUE);
        RC("graph_bad_dep", cuGraphAddEmptyNode((CUgraphNode *)&none, g, (CUgraphNode *)&s, 1), CUDA_ERROR_INVALID_VALUE);
        /* a memory node: refused by name, and the capture with it */
        CUdeviceptr pa = 0;
        OK("capture_begin_2", cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
        RC("capture_alloc", cuMemAllocAsync(&pa, 64, s), CUDA_ERROR_NOT_SUPPORTED);
        int capst = 9;
        OK("capture_invalidated", cuStreamIsCapturing(s, (CUstreamCaptureStatus *)&capst));
        CHECK("capture_invalidated_value", capst == CU_STREAM_CAPTURE_STATUS_INVALIDATED, "status %d", capst);
        RC("capture_end_invalid", cuStreamEndCapture(s, &none), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        OK("graph_exec_destroy", cuGraphExecDestroy(ge));
        RC("graph_exec_destroy_again", cuGraphExecDestroy(ge), CUDA_ERROR_INVALID_VALUE);
        OK("graph_destroy", cuGraphDestroy(g));
    }

    /* the same launch on the legacy and per-thread default streams, and through cuLaunchKernelEx */
    OK("memset_c", cuMemsetD32(dc, 0, n));
    OK("launch_legacy", cuLaunchKernel(vec_add, (n + 255) / 256, 1, 1, 256, 1, 1, 0, CU_STREAM_LEGACY, args, NULL));
    OK("sync_legacy", cuStreamSynchronize(CU_STREAM_LEGACY));
    OK("dtoh_legacy", cuMemcpyDtoH(hc, dc, bytes));
    CHECK("legacy_result", same_floats(hc, want, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);
    OK("memset_c2", cuMemsetD32Async(dc, 0, n, CU_STREAM_PER_THREAD));
    OK("launch_per_thread", cuLaunchKernel(vec_add, (n + 255) / 256, 1, 1, 256, 1, 1, 0, CU_STREAM_PER_THREAD, args, NULL));
    OK("dtoh_per_thread", cuMemcpyDtoHAsync(hc, dc, bytes, CU_STREAM_PER_THREAD));
    CHECK("per_thread_result", same_floats(hc, want, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);
    CUlaunchAttribute attrs[2];
    memset(attrs, 0, sizeof attrs);
    attrs[0].id = CU_LAUNCH_ATTRIBUTE_PRIORITY;
    attrs[0].value.priority = 0;
    attrs[1].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attrs[1].value.cooperative = 0;
    CUlaunchConfig cfg = {(n + 255) / 256, 1, 1, 256, 1, 1, 0, s2, attrs, 2};
    OK("memset_c3", cuMemsetD8(dc, 0, bytes));
    OK("launch_ex", cuLaunchKernelEx(&cfg, vec_add, args, NULL));
    OK("sync_ex", cuStreamSynchronize(s2));
    OK("dtoh_ex", cuMemcpyDtoH(hc, dc, bytes));
    CHECK("launch_ex_result", same_floats(hc, want, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);
    attrs[1].value.cooperative = 1;
    cfg.gridDimX = 100000;      /* cooperative: more blocks than are ever resident at once */
    RC("launch_ex_cooperative_too_large", cuLaunchKernelEx(&cfg, vec_add, args, NULL),
       CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE);
    cfg.gridDimX = (n + 255) / 256;
    attrs[1].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attrs[1].value.clusterDim.x = 2;
    attrs[1].value.clusterDim.y = attrs[1].value.clusterDim.z = 1;
    RC("launch_ex_cluster", cuLaunchKernelEx(&cfg, vec_add, args, NULL), CUDA_ERROR_NOT_SUPPORTED);
    attrs[1].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT;
    RC("launch_ex_unknown_attr", cuLaunchKernelEx(&cfg, vec_add, args, NULL), CUDA_ERROR_NOT_SUPPORTED);

    /* -- parameters through `extra`, a struct among them -- */
    const int m = 1000;
    double *hout = malloc(m * sizeof(double));
    CUdeviceptr dout;
    OK("alloc_out", cuMemAlloc(&dout, m * sizeof(double)));
    struct Affine aff = {2.0f, 1.0f, m};
    char tag = 3;
    struct { char tag; char pad[7]; CUdeviceptr out; struct Affine f; int pad2; CUdeviceptr in; } buf = {0};
    buf.tag = tag; buf.out = dout; buf.f = aff; buf.in = da;
    size_t buf_size = sizeof buf;
    void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, &buf, CU_LAUNCH_PARAM_BUFFER_SIZE, &buf_size, CU_LAUNCH_PARAM_END};
    OK("launch_extra", cuLaunchKernel(affine, (m + 127) / 128, 1, 1, 128, 1, 1, 0, s, NULL, extra));
    OK("dtoh_extra", cuMemcpyDtoHAsync(hout, dout, m * sizeof(double), s));
    int ok = 1, at = -1;
    for (int i = 0; i < m && ok; i++)
        if (hout[i] != i * 2.0 + 1.0 + 3.0) ok = 0, at = i;
    CHECK("extra_result", ok, "out[%d] = %f", at, at >= 0 ? hout[at] : 0);
    aff.shift = 10.0f;
    void *params[] = {&tag, &dout, &aff, &da};
    OK("launch_struct_params", cuLaunchKernel(affine, (m + 127) / 128, 1, 1, 128, 1, 1, 0, s, params, NULL));
    OK("dtoh_struct", cuMemcpyDtoHAsync(hout, dout, m * sizeof(double), s));
    ok = 1;
    for (int i = 0; i < m && ok; i++)
        if (hout[i] != i * 2.0 + 10.0 + 3.0) ok = 0, at = i;
    CHECK("struct_params_result", ok, "out[%d] = %f", at, at >= 0 ? hout[at] : 0);
    RC("launch_both_param_forms", cuLaunchKernel(affine, 1, 1, 1, 1, 1, 1, 0, s, params, extra), CUDA_ERROR_INVALID_VALUE);

    /* -- memset and device-to-device copies -- */
    unsigned char *bytes8 = malloc(bytes);
    OK("memset_d8", cuMemsetD8(dc, 0xAB, bytes));
    OK("dtoh_d8", cuMemcpyDtoH(bytes8, dc, bytes));
    ok = 1;
    for (size_t i = 0; i < bytes && ok; i++) ok = bytes8[i] == 0xAB;
    CHECK("memset_d8_result", ok, "%s", "a byte differs");
    OK("memset_d16", cuMemsetD16(dc + 2, 0x1234, 3));
    unsigned short sh[5];
    OK("dtoh_d16", cuMemcpyDtoH(sh, dc, sizeof sh));
    CHECK("memset_d16_result", sh[0] == 0xABAB && sh[1] == 0x1234 && sh[3] == 0x1234 && sh[4] == 0xABAB,
          "%x %x %x %x", sh[0], sh[1], sh[3], sh[4]);
    OK("memset_d32_async", cuMemsetD32Async(dc, 0xDEADBEEF, 4, s));
    OK("memset_d8_async", cuMemsetD8Async(dc + 16, 7, 1, s));
    OK("memset_d16_async", cuMemsetD16Async(dc + 18, 9, 1, s));
    unsigned w[5];
    OK("dtoh_d32", cuMemcpyDtoHAsync(w, dc, sizeof w, s));
    CHECK("memset_async_result", w[0] == 0xDEADBEEF && w[3] == 0xDEADBEEF && w[4] == (0x0009u << 16 | 0xAB07u),
          "%x %x %x", w[0], w[3], w[4]);
    OK("dtod", cuMemcpyDtoD(dc, da, bytes));
    OK("dtoh_dtod", cuMemcpyDtoH(hc, dc, bytes));
    CHECK("dtod_result", same_floats(hc, ha, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);
    OK("dtod_async", cuMemcpyDtoDAsync(dc, db, bytes, s));
    OK("dtoh_dtod_async", cuMemcpyDtoHAsync(hc, dc, bytes, s));
    CHECK("dtod_async_result", same_floats(hc, hb, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);

    /* -- cuMemcpy: the direction from the addresses -- */
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8] = {0}, z[8] = {0};
    OK("memcpy_htod", cuMemcpy(dc, (CUdeviceptr)(size_t)x, sizeof x));
    OK("memcpy_dtod", cuMemcpy(dc + 64, dc, sizeof x));
    OK("memcpy_dtoh", cuMemcpyAsync((CUdeviceptr)(size_t)y, dc + 64, sizeof y, s));
    OK("memcpy_htoh", cuMemcpy((CUdeviceptr)(size_t)z, (CUdeviceptr)(size_t)y, sizeof z));
    CHECK("memcpy_result", !memcmp(x, y, sizeof x) && !memcmp(x, z, sizeof x), "y[7] = %f z[7] = %f", y[7], z[7]);
    OK("memcpy_global", cuMemcpy((CUdeviceptr)(size_t)&got_bias, bias, sizeof got_bias));
    CHECK("memcpy_global_result", got_bias == 0.5f, "got %f", got_bias);

    /* -- libraries (what CUDA 12+'s runtime uses) -- */
    CUlibrary lib;
    CUkernel kern;
    CUfunction kf;
    CUmodule lmod;
    OK("library_load", cuLibraryLoadData(&lib, image, NULL, NULL, 0, NULL, NULL, 0));
    OK("library_kernel", cuLibraryGetKernel(&kern, lib, "vec_add"));
    RC("library_no_kernel", cuLibraryGetKernel(&kern, lib, "nope"), CUDA_ERROR_NOT_FOUND);
    OK("library_kernel_again", cuLibraryGetKernel(&kern, lib, "vec_add"));
    OK("kernel_function", cuKernelGetFunction(&kf, kern));
    OK("library_module", cuLibraryGetModule(&lmod, lib));
    CUdeviceptr lbias;
    OK("library_module_global", cuModuleGetGlobal(&lbias, NULL, lmod, "bias"));
    OK("library_set_bias", cuMemsetD32(lbias, 0, 1));
    OK("memset_c4", cuMemsetD32(dc, 0, n));
    OK("launch_library", cuLaunchKernel(kf, (n + 255) / 256, 1, 1, 256, 1, 1, 0, s, args, NULL));
    OK("dtoh_library", cuMemcpyDtoHAsync(hc, dc, bytes, s));
    for (int i = 0; i < n; i++) want[i] = 3.0f * i;          /* this module's bias is 0 */
    CHECK("library_result", same_floats(hc, want, n, &bad), "c[%d] = %f", bad, bad >= 0 ? hc[bad] : 0);
    OK("library_unload", cuLibraryUnload(lib));
    RC("library_gone", cuLibraryGetKernel(&kern, lib, "vec_add"), CUDA_ERROR_INVALID_HANDLE);
    RC("kernel_gone", cuLaunchKernel(kf, 1, 1, 1, 1, 1, 1, 0, s, args, NULL), CUDA_ERROR_INVALID_HANDLE);

    /* -- errors -- */
    RC("launch_bad_function", cuLaunchKernel((CUfunction)(size_t)0x1230, 1, 1, 1, 1, 1, 1, 0, s, args, NULL),
       CUDA_ERROR_INVALID_HANDLE);
    RC("launch_bad_stream", cuLaunchKernel(vec_add, 1, 1, 1, 1, 1, 1, 0, (CUstream)(size_t)0xdeadbeef0, args, NULL),
       CUDA_ERROR_INVALID_HANDLE);
    RC("launch_big_block", cuLaunchKernel(vec_add, 1, 1, 1, 2048, 1, 1, 0, s, args, NULL), CUDA_ERROR_INVALID_VALUE);
    RC("launch_zero_grid", cuLaunchKernel(vec_add, 0, 1, 1, 1, 1, 1, 0, s, args, NULL), CUDA_ERROR_INVALID_VALUE);
    RC("launch_no_params", cuLaunchKernel(vec_add, 1, 1, 1, 1, 1, 1, 0, s, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    RC("sync_bad_stream", cuStreamSynchronize((CUstream)(size_t)0x7777770), CUDA_ERROR_INVALID_HANDLE);
    RC("record_bad_event", cuEventRecord((CUevent)(size_t)0x55550, s), CUDA_ERROR_INVALID_HANDLE);
    RC("free_host_bad", cuMemFreeHost(x), CUDA_ERROR_INVALID_VALUE);
    /* an error the executor finds when it runs the work: reported by the next synchronization, once */
    OK("launch_async_error", cuLaunchKernel(vec_add, 1, 1, 1, 1, 1, 1, 1u << 30, s, args, NULL));
    RC("sync_reports_it", cuStreamSynchronize(s), CUDA_ERROR_INVALID_VALUE);
    OK("sync_after", cuCtxSynchronize());
    CUdeviceptr huge;
    RC("over_quota", cuMemAlloc(&huge, (size_t)1 << 40), CUDA_ERROR_OUT_OF_MEMORY);

    /* -- teardown: handles stop working once destroyed -- */
    OK("event_destroy", cuEventDestroy(start));
    RC("event_destroyed", cuEventRecord(start, s), CUDA_ERROR_INVALID_HANDLE);
    OK("event_destroy2", cuEventDestroy(stop));
    OK("event_destroy3", cuEventDestroy(untimed));
    OK("stream_destroy2", cuStreamDestroy(s2));
    RC("stream_destroyed", cuStreamQuery(s2), CUDA_ERROR_INVALID_HANDLE);
    OK("free_host", cuMemFreeHost(ha));
    OK("free_host2", cuMemFreeHost(hb));
    OK("unload", cuModuleUnload(mod));
    RC("unloaded_function", cuLaunchKernel(vec_add, 1, 1, 1, 1, 1, 1, 0, s, args, NULL), CUDA_ERROR_INVALID_HANDLE);
    RC("unloaded_module", cuModuleGetFunction(&nope, mod, "vec_add"), CUDA_ERROR_INVALID_HANDLE);
    RC("unload_twice", cuModuleUnload(mod), CUDA_ERROR_INVALID_HANDLE);
    OK("unload2", cuModuleUnload(mod2));
    OK("unload3", cuModuleUnload(from_file));
    OK("stream_destroy", cuStreamDestroy(s));
    OK("free_a", cuMemFree(da));
    OK("free_b", cuMemFree(db));
    OK("free_c", cuMemFree(dc));
    OK("free_out", cuMemFree(dout));
    OK("final_sync", cuCtxSynchronize());
    printf("failed=%d\n", failed);
    return 0;
}
