/* A driver-API program for the entry points of native/src/cuda_more.c: host functions and
 * stream callbacks (stream order both ways), 2D and 3D copies of every host/device shape,
 * 2D memsets, stream-ordered allocation and pools, device ranges reserved in this process
 * (unified addressing), and their error paths. Each check prints
 * check_<name>=1 or =0 (with what it got); the last line is failed=<count>.
 * tests/test_native_driver.py builds and runs it:  more_tour <ptx file> */
#include <cuda.h>
#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tour.h"

static int bad;

/* ---- host functions ---- */
static int order[8], norder;
static volatile int slow_done;
static unsigned char hostbuf[256];
static CUresult cb_status = -1;
static CUstream cb_stream;

static void note(void *arg) { order[norder++] = (int)(long)arg; }
static void slow(void *arg) {
    struct timespec t = {0, 150 * 1000 * 1000};
    nanosleep(&t, NULL);
    slow_done = 1;
}
static void fill(void *arg) {          /* later work on the stream must see what this writes */
    struct timespec t = {0, 100 * 1000 * 1000};
    nanosleep(&t, NULL);
    memset(hostbuf, (int)(long)arg, sizeof hostbuf);
}
static void callback(CUstream s, CUresult status, void *arg) { cb_status = status; cb_stream = s; note(arg); }

static void host_functions(CUfunction vec_add) {
    CUstream s, s2;
    OK("hf_stream", cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK("hf_stream2", cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
    int n = 1 << 16;
    CUdeviceptr a, c;
    OK("hf_alloc", cuMemAlloc(&a, n * 4));
    OK("hf_alloc2", cuMemAlloc(&c, n * 4));
    OK("hf_memset", cuMemsetD32Async(a, 0x3f800000u, n, s));      /* 1.0f */
    void *args[] = {&a, &a, &c, &n};
    OK("hf_launch", cuLaunchKernel(vec_add, n / 256, 1, 1, 256, 1, 1, 0, s, args, NULL));
    /* three in a row on one stream (they queue without waiting), one on the legacy stream */
    OK("hf_launch_host_1", cuLaunchHostFunc(s, note, (void *)1));
    OK("hf_add_callback_2", cuStreamAddCallback(s, callback, (void *)2, 0));
    OK("hf_launch_host_3", cuLaunchHostFunc(s, note, (void *)3));
    OK("hf_sync", cuStreamSynchronize(s));
    CHECK("hf_ran_in_order", norder == 3 && order[0] == 1 && order[1] == 2 && order[2] == 3,
          "norder=%d order=%d,%d,%d", norder, order[0], order[1], order[2]);
    CHECK("hf_callback_args", cb_status == CUDA_SUCCESS && cb_stream == s, "status=%d stream=%p", cb_status, (void *)cb_stream);
    float got[4] = {0};
    OK("hf_result", cuMemcpyDtoH(got, c, sizeof got));
    CHECK("hf_kernel_before", got[0] == 2.0f && got[3] == 2.0f, "c[0]=%g", got[0]);

    /* later work waits for the host function: the copy reads what the function wrote */
    memset(hostbuf, 0, sizeof hostbuf);
    OK("hf_fill", cuLaunchHostFunc(s, fill, (void *)0x5a));
    OK("hf_copy_after", cuMemcpyHtoDAsync(a, hostbuf, sizeof hostbuf, s));
    unsigned char back[256];
    OK("hf_copy_back", cuMemcpyDtoHAsync(back, a, sizeof back, s));
    OK("hf_sync2", cuStreamSynchronize(s));
    int bad = 0;
    for (int i = 0; i < 256; i++) bad += back[i] != 0x5a;
    CHECK("hf_later_work_after", bad == 0, "%d bytes not 0x5a (back[0]=%#x)", bad, back[0]);

    /* the context's synchronization waits for host functions; another stream does not */
    slow_done = 0;
    OK("hf_slow", cuLaunchHostFunc(s, slow, NULL));
    OK("hf_other_stream_free", cuMemsetD32Async(c, 0, 16, s2));
    OK("hf_ctx_sync", cuCtxSynchronize());
    CHECK("hf_ctx_sync_waited", slow_done == 1, "slow_done=%d", slow_done);
    slow_done = 0;
    OK("hf_slow_default", cuLaunchHostFunc(NULL, slow, NULL));
    OK("hf_sync_default", cuStreamSynchronize(NULL));
    CHECK("hf_default_stream_waited", slow_done == 1, "slow_done=%d", slow_done);

    RC("hf_null_fn", cuLaunchHostFunc(s, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    RC("hf_callback_flags", cuStreamAddCallback(s, callback, NULL, 1), CUDA_ERROR_INVALID_VALUE);
    RC("hf_bad_stream", cuLaunchHostFunc((CUstream)(uintptr_t)0x12345670, note, NULL), CUDA_ERROR_INVALID_HANDLE);
    cuMemFree(a);
    cuMemFree(c);
    cuStreamDestroy(s);
    cuStreamDestroy(s2);
}

/* ---- 2D / 3D copies and 2D memsets ---- */
static void copies(void) {
    enum { W = 40, H = 5, DP = 64, HP = 48 };
    CUstream s;
    OK("c2_stream", cuStreamCreate(&s, 0));
    unsigned char src[HP * H], dst[W * H], want[W * H], dev_img[DP * H], ref[DP * H];
    for (int i = 0; i < HP * H; i++) src[i] = (unsigned char)(i * 7 + 1);
    for (int y = 0; y < H; y++) memcpy(want + y * W, src + y * HP, W);
    CUdeviceptr d, d2;
    OK("c2_alloc", cuMemAlloc(&d, DP * H));
    OK("c2_alloc2", cuMemAlloc(&d2, DP * H));
    OK("c2_clear", cuMemsetD8(d, 0xee, DP * H));

    CUDA_MEMCPY2D p = {0};                        /* host (pitch 48) -> device (pitch 64) */
    p.srcMemoryType = CU_MEMORYTYPE_HOST; p.srcHost = src; p.srcPitch = HP;
    p.dstMemoryType = CU_MEMORYTYPE_DEVICE; p.dstDevice = d; p.dstPitch = DP;
    p.WidthInBytes = W; p.Height = H;
    OK("c2_htod", cuMemcpy2D(&p));
    OK("c2_htod_read", cuMemcpyDtoH(dev_img, d, sizeof dev_img));
    memset(ref, 0xee, sizeof ref);
    for (int y = 0; y < H; y++) memcpy(ref + y * DP, src + y * HP, W);
    CHECK("c2_htod_rows_and_gaps", !memcmp(dev_img, ref, sizeof ref), "first byte %#x", dev_img[0]);

    CUDA_MEMCPY2D q = {0};                        /* device (pitch 64) -> host (packed) */
    q.srcMemoryType = CU_MEMORYTYPE_DEVICE; q.srcDevice = d; q.srcPitch = DP;
    q.dstMemoryType = CU_MEMORYTYPE_HOST; q.dstHost = dst; q.dstPitch = W;
    q.WidthInBytes = W; q.Height = H;
    memset(dst, 0, sizeof dst);
    OK("c2_dtoh", cuMemcpy2D(&q));
    CHECK("c2_dtoh_equal", !memcmp(dst, want, sizeof want), "dst[0]=%#x", dst[0]);

    /* device -> device with offsets, async, then the unified type both ways */
    OK("c2_clear2", cuMemsetD8(d2, 0, DP * H));
    CUDA_MEMCPY2D r = {0};
    r.srcMemoryType = CU_MEMORYTYPE_DEVICE; r.srcDevice = d; r.srcPitch = DP; r.srcXInBytes = 4; r.srcY = 1;
    r.dstMemoryType = CU_MEMORYTYPE_UNIFIED; r.dstDevice = d2; r.dstPitch = DP; r.dstXInBytes = 8;
    r.WidthInBytes = 16; r.Height = 3;
    OK("c2_dtod_async", cuMemcpy2DAsync(&r, s));
    OK("c2_sync", cuStreamSynchronize(s));
    OK("c2_dtod_read", cuMemcpyDtoH(dev_img, d2, sizeof dev_img));
    memset(ref, 0, sizeof ref);
    for (int y = 0; y < 3; y++) memcpy(ref + y * DP + 8, src + (y + 1) * HP + 4, 16);
    CHECK("c2_dtod_equal", !memcmp(dev_img, ref, sizeof ref), "byte 8 %#x want %#x", dev_img[8], ref[8]);
    memset(dst, 0, sizeof dst);
    q.srcMemoryType = CU_MEMORYTYPE_UNIFIED; q.dstMemoryType = CU_MEMORYTYPE_UNIFIED; q.dstDevice = (CUdeviceptr)(uintptr_t)dst;
    OK("c2_unified_dtoh", cuMemcpy2DUnaligned(&q));
    CHECK("c2_unified_equal", !memcmp(dst, want, sizeof want), "dst[0]=%#x", dst[0]);
    unsigned char hh[W * H];                      /* host -> host */
    CUDA_MEMCPY2D hp = {0};
    hp.srcMemoryType = CU_MEMORYTYPE_HOST; hp.srcHost = src; hp.srcPitch = HP;
    hp.dstMemoryType = CU_MEMORYTYPE_HOST; hp.dstHost = hh; hp.dstPitch = W;
    hp.WidthInBytes = W; hp.Height = H;
    OK("c2_htoh", cuMemcpy2D(&hp));
    CHECK("c2_htoh_equal", !memcmp(hh, want, sizeof want), "hh[0]=%#x", hh[0]);

    /* errors: a pitch shorter than the row, arrays */
    CUDA_MEMCPY2D e = p;
    e.dstPitch = W - 1;
    RC("c2_bad_pitch", cuMemcpy2D(&e), CUDA_ERROR_INVALID_VALUE);
    e = p;
    e.srcXInBytes = HP - W + 1;
    RC("c2_bad_offset", cuMemcpy2D(&e), CUDA_ERROR_INVALID_VALUE);
    e = p;
    e.dstMemoryType = CU_MEMORYTYPE_ARRAY;
    RC("c2_array", cuMemcpy2D(&e), CUDA_ERROR_NOT_SUPPORTED);
    RC("c2_null", cuMemcpy2D(NULL), CUDA_ERROR_INVALID_VALUE);

    /* 3D: a 16 x 3 x 4 box out of a 20-pitch, 5-row host volume into a device volume */
    enum { X = 16, Y = 3, Z = 4, SP = 20, SH = 5, SD = 6, TP = 32, TH = 4 };
    static unsigned char vol[SP * SH * SD], out[TP * TH * Z], vref[TP * TH * Z];
    for (int i = 0; i < (int)sizeof vol; i++) vol[i] = (unsigned char)(i * 13 + 5);
    CUdeviceptr dv;
    OK("c3_alloc", cuMemAlloc(&dv, sizeof out));
    OK("c3_clear", cuMemsetD8(dv, 0x11, sizeof out));
    CUDA_MEMCPY3D m = {0};
    m.srcMemoryType = CU_MEMORYTYPE_HOST; m.srcHost = vol; m.srcPitch = SP; m.srcHeight = SH;
    m.srcXInBytes = 2; m.srcY = 1; m.srcZ = 1;
    m.dstMemoryType = CU_MEMORYTYPE_DEVICE; m.dstDevice = dv; m.dstPitch = TP; m.dstHeight = TH;
    m.WidthInBytes = X; m.Height = Y; m.Depth = Z;
    OK("c3_htod", cuMemcpy3D(&m));
    OK("c3_read", cuMemcpyDtoH(out, dv, sizeof out));
    memset(vref, 0x11, sizeof vref);
    for (int z = 0; z < Z; z++)
        for (int y = 0; y < Y; y++)
            memcpy(vref + z * TP * TH + y * TP, vol + (z + 1) * SP * SH + (y + 1) * SP + 2, X);
    CHECK("c3_htod_equal", !memcmp(out, vref, sizeof vref), "out[0]=%#x want %#x", out[0], vref[0]);
    static unsigned char box[X * Y * Z], bref[X * Y * Z];
    CUDA_MEMCPY3D m2 = {0};                       /* device -> host, async, packed */
    m2.srcMemoryType = CU_MEMORYTYPE_DEVICE; m2.srcDevice = dv; m2.srcPitch = TP; m2.srcHeight = TH;
    m2.dstMemoryType = CU_MEMORYTYPE_HOST; m2.dstHost = box; m2.dstPitch = X; m2.dstHeight = Y;
    m2.WidthInBytes = X; m2.Height = Y; m2.Depth = Z;
    OK("c3_dtoh_async", cuMemcpy3DAsync(&m2, s));
    OK("c3_sync", cuStreamSynchronize(s));
    for (int z = 0; z < Z; z++)
        for (int y = 0; y < Y; y++) memcpy(bref + (z * Y + y) * X, vref + z * TP * TH + y * TP, X);
    CHECK("c3_dtoh_equal", !memcmp(box, bref, sizeof bref), "box[0]=%#x", box[0]);
    CUDA_MEMCPY3D e3 = m;
    e3.srcHeight = Y;                             /* srcY 1 + 3 rows > 3 */
    RC("c3_bad_height", cuMemcpy3D(&e3), CUDA_ERROR_INVALID_VALUE);
    e3 = m;
    e3.srcPitch = X - 1;
    RC("c3_bad_pitch", cuMemcpy3D(&e3), CUDA_ERROR_INVALID_VALUE);
    e3 = m;
    e3.srcMemoryType = CU_MEMORYTYPE_ARRAY;
    RC("c3_array", cuMemcpy3D(&e3), CUDA_ERROR_NOT_SUPPORTED);

    /* 2D memsets: 8, 16, 32 bits, gaps untouched */
    unsigned int img[DP / 4 * H];
    OK("m2_clear", cuMemsetD8(d, 0, DP * H));
    OK("m2_d32", cuMemsetD2D32(d, DP, 0xdeadbeefu, 10, H));          /* 40 of 64 bytes a row */
    OK("m2_read", cuMemcpyDtoH(img, d, sizeof img));
    bad = 0;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < DP / 4; x++) bad += img[y * DP / 4 + x] != (x < 10 ? 0xdeadbeefu : 0u);
    CHECK("m2_d32_equal", bad == 0, "%d words wrong", bad);
    OK("m2_d16_async", cuMemsetD2D16Async(d, DP, 0x1234, 4, 2, s));
    OK("m2_d8_async", cuMemsetD2D8Async(d + 60, DP, 0x77, 4, H, s));
    OK("m2_sync", cuStreamSynchronize(s));
    OK("m2_read2", cuMemcpyDtoH(dev_img, d, DP * H));
    bad = 0;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < DP; x++) {
            unsigned char w = x < 40 ? ((const unsigned char *)"\xef\xbe\xad\xde")[x % 4] : 0;
            if (y < 2 && x < 8) w = x % 2 ? 0x12 : 0x34;
            if (x >= 60) w = 0x77;
            bad += dev_img[y * DP + x] != w;
        }
    CHECK("m2_d16_d8_equal", bad == 0, "%d bytes wrong", bad);
    RC("m2_bad_pitch", cuMemsetD2D32(d, 36, 0, 10, 2), CUDA_ERROR_INVALID_VALUE);
    RC("m2_unaligned_pitch", cuMemsetD2D32(d, 62, 0, 10, 2), CUDA_ERROR_INVALID_VALUE);
    OK("m2_empty", cuMemsetD2D8(d, DP, 0, 0, 3));
    cuMemFree(d); cuMemFree(d2); cuMemFree(dv);
    cuStreamDestroy(s);
}

/* ---- stream-ordered allocation and pools ---- */
static void pools(CUdevice dev, CUfunction vec_add) {
    CUstream s;
    OK("p_stream", cuStreamCreate(&s, 0));
    CUmemoryPool def, cur;
    OK("p_default", cuDeviceGetDefaultMemPool(&def, dev));
    OK("p_current", cuDeviceGetMemPool(&cur, dev));
    CHECK("p_current_is_default", cur == def, "%p vs %p", (void *)cur, (void *)def);
    cuuint64_t used0 = 1, v;
    OK("p_used0", cuMemPoolGetAttribute(def, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &used0));

    int n = 1 << 14;
    CUdeviceptr a, c;
    OK("p_alloc_async", cuMemAllocAsync(&a, n * 4, s));
    OK("p_alloc_async2", cuMemAllocAsync(&c, n * 4, s));
    OK("p_used", cuMemPoolGetAttribute(def, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &v));
    CHECK("p_used_counts", v == used0 + 2 * (cuuint64_t)n * 4, "used %llu", (unsigned long long)v);
    OK("p_memset", cuMemsetD32Async(a, 0x40000000u, n, s));        /* 2.0f */
    void *args[] = {&a, &a, &c, &n};
    OK("p_launch", cuLaunchKernel(vec_add, n / 256, 1, 1, 256, 1, 1, 0, s, args, NULL));
    float got[2];
    OK("p_read", cuMemcpyDtoHAsync(got, c + 4 * (n - 2), sizeof got, s));
    OK("p_free_async_a", cuMemFreeAsync(a, s));                   /* after the launch that reads it */
    OK("p_free_async_c", cuMemFreeAsync(c, s));
    OK("p_sync", cuStreamSynchronize(s));
    CHECK("p_result", got[0] == 4.0f && got[1] == 4.0f, "got %g %g", got[0], got[1]);
    OK("p_high", cuMemPoolGetAttribute(def, CU_MEMPOOL_ATTR_USED_MEM_HIGH, &v));
    CHECK("p_high_value", v >= 2 * (cuuint64_t)n * 4, "high %llu", (unsigned long long)v);
    cuuint64_t zero = 0, thr = 1 << 20;
    OK("p_reset_high", cuMemPoolSetAttribute(def, CU_MEMPOOL_ATTR_USED_MEM_HIGH, &zero));
    OK("p_set_threshold", cuMemPoolSetAttribute(def, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &thr));
    v = 0;
    OK("p_get_threshold", cuMemPoolGetAttribute(def, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &v));
    CHECK("p_threshold_value", v == thr, "%llu", (unsigned long long)v);
    RC("p_set_used_refused", cuMemPoolSetAttribute(def, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &zero), CUDA_ERROR_INVALID_VALUE);
    OK("p_trim", cuMemPoolTrimTo(def, 0));

    /* a pool of its own, with a maximum size; made current, then destroyed */
    CUmemPoolProps props = {0};
    props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = dev;
    props.maxSize = 1 << 20;
    CUmemoryPool mine;
    OK("p_create", cuMemPoolCreate(&mine, &props));
    CUdeviceptr x, y;
    OK("p_from_pool", cuMemAllocFromPoolAsync(&x, 512 << 10, mine, s));
    RC("p_pool_max_size", cuMemAllocFromPoolAsync(&y, 768 << 10, mine, s), CUDA_ERROR_OUT_OF_MEMORY);
    OK("p_set_pool", cuDeviceSetMemPool(dev, mine));
    OK("p_get_pool", cuDeviceGetMemPool(&cur, dev));
    CHECK("p_current_is_mine", cur == mine, "%p", (void *)cur);
    OK("p_alloc_mine", cuMemAllocAsync(&y, 256 << 10, s));
    OK("p_mine_used", cuMemPoolGetAttribute(mine, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &v));
    CHECK("p_mine_used_value", v == (768 << 10), "%llu", (unsigned long long)v);
    OK("p_free_x", cuMemFreeAsync(x, s));
    OK("p_free_y", cuMemFreeAsync(y, s));
    OK("p_destroy", cuMemPoolDestroy(mine));
    OK("p_back_to_default", cuDeviceGetMemPool(&cur, dev));
    CHECK("p_default_again", cur == def, "%p", (void *)cur);
    RC("p_unknown_pool_attr", cuMemPoolGetAttribute(mine, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &v), CUDA_ERROR_INVALID_VALUE);
    RC("p_unknown_pool_alloc", cuMemAllocFromPoolAsync(&x, 4096, mine, s), CUDA_ERROR_INVALID_VALUE);
    RC("p_garbage_pool", cuMemPoolTrimTo((CUmemoryPool)(uintptr_t)0x1234, 0), CUDA_ERROR_INVALID_VALUE);
    RC("p_destroy_default", cuMemPoolDestroy(def), CUDA_ERROR_INVALID_VALUE);
    RC("p_free_not_device", cuMemFreeAsync((CUdeviceptr)(uintptr_t)&v, s), CUDA_ERROR_INVALID_VALUE);
    props.handleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    RC("p_shareable_refused", cuMemPoolCreate(&mine, &props), CUDA_ERROR_NOT_SUPPORTED);
    props.handleTypes = 0;
    props.location.id = 99;
    RC("p_bad_device", cuMemPoolCreate(&mine, &props), CUDA_ERROR_INVALID_DEVICE);
    OK("p_sync2", cuStreamSynchronize(s));

    /* the quota: the byte it allows is allowed, one past it is OUT_OF_MEMORY, at the call */
    size_t fr, tot;
    OK("p_ctx_sync", cuCtxSynchronize());     /* the frees above have run: what is free is free */
    OK("p_mem_info", cuMemGetInfo(&fr, &tot));
    CUdeviceptr big;
    OK("p_quota_all", cuMemAllocAsync(&big, fr, s));
    CUdeviceptr one;
    RC("p_quota_one_more", cuMemAllocAsync(&one, 1, s), CUDA_ERROR_OUT_OF_MEMORY);
    OK("p_quota_free", cuMemFreeAsync(big, s));
    OK("p_sync3", cuStreamSynchronize(s));
    OK("p_quota_again", cuMemAllocAsync(&one, 1, s));
    OK("p_quota_free2", cuMemFreeAsync(one, NULL));
    OK("p_ctx_sync", cuCtxSynchronize());
    cuStreamDestroy(s);
}

/* ---- unified addressing: device ranges are reserved here, so no host memory of ours is
 * ever taken for device memory; an allocation the executor places over our memory moves ---- */
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
static void unified(void) {
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = 1 << 20;
    CUdeviceptr a, b;
    OK("u_alloc", cuMemAlloc(&a, n));
    errno = 0;
    void *m = mmap((void *)(uintptr_t)a, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK("u_reserved_here", m == MAP_FAILED && errno == EEXIST, "mmap at %#llx gave %p, errno %d", a, m, errno);
    if (m != MAP_FAILED) munmap(m, pg);
    OK("u_free", cuMemFree(a));
    /* Where the device's arena is mapped here at the executor's own address, the freed range
     * stays the arena's (device memory, never a host address of ours); elsewhere it is ours
     * again: host memory there, then the same size asked for (the executor's next mapping of
     * that size is likely the range it just unmapped). */
    unsigned char *h = mmap((void *)(uintptr_t)a, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (h == MAP_FAILED && errno == EEXIST) {
        OK("u_alloc_again", cuMemAlloc(&b, n));
        OK("u_free_again", cuMemFree(b));
        printf("arena_identity=1\n");
        return;
    }
    CHECK("u_released", h == (void *)(uintptr_t)a, "mmap at %#llx gave %p, errno %d", a, (void *)h, errno);
    OK("u_alloc_again", cuMemAlloc(&b, n));
    CHECK("u_disjoint", b + n <= a || b >= a + n, "device %#llx overlaps host %#llx", b, a);
    OK("u_memset", cuMemsetD8(b, 0x33, pg));
    if (h != MAP_FAILED) {
        memset(h, 0, pg);
        OK("u_memcpy_to_host", cuMemcpy((CUdeviceptr)(uintptr_t)h, b, pg));
        int wrong = 0;
        for (size_t i = 0; i < pg; i++) wrong += h[i] != 0x33;
        CHECK("u_host_is_host", wrong == 0, "%d bytes wrong", wrong);
        munmap(h, n);
    }
    OK("u_free2", cuMemFree(b));
    CUdeviceptr p;                                /* the stream-ordered path is reserved too */
    OK("u_alloc_async", cuMemAllocAsync(&p, n, NULL));
    m = mmap((void *)(uintptr_t)p, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK("u_async_reserved", m == MAP_FAILED, "mmap at %#llx gave %p", p, m);
    OK("u_free_async", cuMemFreeAsync(p, NULL));
    OK("u_sync", cuCtxSynchronize());
}

/* a forked child's host functions run on a worker of its own, in its own session */
static void forked_host_functions(void) {
    norder = 0;
    OK("fk_parent_hf", cuLaunchHostFunc(NULL, note, (void *)7));   /* the parent's worker runs */
    pid_t pid = fork();
    if (pid == 0) {
        norder = 0;
        int ok = !cuLaunchHostFunc(NULL, note, (void *)9) && !cuStreamSynchronize(NULL) && norder == 1 && order[0] == 9;
        _exit(ok ? 0 : 3);
    }
    int st = -1;
    waitpid(pid, &st, 0);
    CHECK("fk_child_host_function", WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    OK("fk_parent_sync", cuStreamSynchronize(NULL));
    CHECK("fk_parent_ran", norder == 1 && order[0] == 7, "norder=%d order[0]=%d", norder, order[0]);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) { fprintf(stderr, "usage: more_tour <ptx file>\n"); return 2; }
    size_t image_len;
    char *image = read_file(argv[1], &image_len);
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction vec_add;
    if (!image || cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx) ||
        cuModuleLoadData(&mod, image) || cuModuleGetFunction(&vec_add, mod, "vec_add")) {
        fprintf(stderr, "no context or module\n");
        return 1;
    }
    host_functions(vec_add);
    copies();
    pools(dev, vec_add);
    unified();
    forked_host_functions();
    printf("failed=%d\n", failed);
    return 0;
}
