/* More of the driver API (native/table.py marks these): host functions and stream
 * callbacks, 2D and 3D copies, 2D memsets, stream-ordered allocation and memory pools.
 *
 * Host functions run in this process, on one worker thread of this library, in stream
 * order. The executor has no way to hold a stream until the program says so, so ordering is
 * kept here: cuLaunchHostFunc records a marker event on the stream and queues the function;
 * the worker polls the marker (event_query, which leaves errors kept for the program's next
 * synchronization alone), then calls it; work submitted to that stream meanwhile waits in
 * the submitting call (lock_stream in cuda_exec.c) until the function has run, so nothing
 * queued after a host function can run before it. Consecutive host functions on a stream
 * queue without waiting. */
#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gen_protocol.h"
#include "kc.h"

typedef unsigned long long CUdeviceptr;
typedef void *CUhandle;
typedef void (*host_fn)(void *);
typedef void (*stream_cb)(CUhandle, CUresult, void *);

KC_EXPORT CUresult cuEventCreate(CUhandle *phEvent, unsigned int Flags);
KC_EXPORT CUresult cuEventRecord(CUhandle hEvent, CUhandle hStream);

/* ---- host functions ---- */
struct hostfn {
    struct hostfn *next;
    int dev;
    uint64_t stream, event;      /* the executor's stream and marker event */
    CUhandle program_stream;     /* what a stream callback is given back */
    unsigned epoch;
    host_fn fn;
    stream_cb cb;
    void *data;
};
static pthread_mutex_t hf_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hf_cv = PTHREAD_COND_INITIALIZER;    /* queue grew or shrank */
static struct hostfn *hf_head, *hf_tail;
static int hf_started;
static pthread_t hf_thread;
static pthread_once_t hf_once = PTHREAD_ONCE_INIT;

/* A forked child has no worker and none of its parent's queue (those belong to the
 * parent's session): the child starts afresh. No prepare handler: the lock may have been
 * held by another thread mid-fork, so it is made anew rather than unlocked, and the
 * parent's entries are dropped (leaked), not walked. Taking it before fork would invert the
 * order with the session lock (held while kc_hostfn_pending takes this one). */
static void hf_child(void) {
    pthread_mutex_init(&hf_mu, NULL);
    pthread_cond_init(&hf_cv, NULL);
    hf_head = hf_tail = NULL;
    hf_started = 0;
}
static void hf_install(void) { pthread_atfork(NULL, NULL, hf_child); }

static int matches(const struct hostfn *e, int dev, uint64_t stream) {
    return dev < 0 || (e->dev == dev && (stream == 0 || e->stream == stream || e->stream == 0));
}

int kc_hostfn_pending(int dev, uint64_t stream) {
    pthread_once(&hf_once, hf_install);
    pthread_mutex_lock(&hf_mu);
    int n = 0;
    /* the worker's own calls never wait for it (CUDA forbids CUDA calls in callbacks; this
     * keeps one that tries from deadlocking) */
    if (!hf_started || !pthread_equal(pthread_self(), hf_thread))
        for (struct hostfn *e = hf_head; e && !n; e = e->next) n = matches(e, dev, stream);
    pthread_mutex_unlock(&hf_mu);
    return n;
}

void kc_hostfn_wait(int dev, uint64_t stream) {
    pthread_once(&hf_once, hf_install);
    pthread_mutex_lock(&hf_mu);
    if (!hf_started || !pthread_equal(pthread_self(), hf_thread))
        for (;;) {
            int n = 0;
            for (struct hostfn *e = hf_head; e && !n; e = e->next) n = matches(e, dev, stream);
            if (!n) break;
            pthread_cond_wait(&hf_cv, &hf_mu);
        }
    pthread_mutex_unlock(&hf_mu);
}

/* Wait for the marker event without holding the session lock across the wait, so other
 * threads' calls go on: poll, backing off from 20 us to 1 ms. */
static CUresult wait_marker(const struct hostfn *e) {
    long ns = 20000;
    for (;;) {
        CUresult rc = kc_lock(0);
        if (rc) return rc;
        struct mp_val r, v;
        if (e->epoch != kc_session_epoch()) rc = CUDA_ERROR_INVALID_CONTEXT;
        else rc = kc_request1(e->dev, KCP_EXECUTOR_EVENT_QUERY, KCP_EXECUTOR_EVENT_QUERY_EVENT, e->event, &r);
        if (!rc) rc = mp_find(&r, KCP_EXECUTOR_EVENT_QUERY_R_READY, &v) == 1 && v.type == MP_BOOL
                    ? (v.v.b ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY) : CUDA_ERROR_UNKNOWN;
        kc_unlock();
        if (rc != CUDA_ERROR_NOT_READY) return rc;
        struct timespec t = {0, ns};
        nanosleep(&t, NULL);
        if (ns < 1000000) ns *= 2;
    }
}

static void *hf_main(void *arg) {
    for (;;) {
        pthread_mutex_lock(&hf_mu);
        while (!hf_head) pthread_cond_wait(&hf_cv, &hf_mu);
        struct hostfn *e = hf_head;
        pthread_mutex_unlock(&hf_mu);
        CUresult status = wait_marker(e);
        if (e->cb) e->cb(e->program_stream, status, e->data);
        else e->fn(e->data);
        if (!kc_lock(0)) {
            struct mp_val r;
            if (e->epoch == kc_session_epoch())
                kc_request1(e->dev, KCP_EXECUTOR_EVENT_DESTROY, KCP_EXECUTOR_EVENT_DESTROY_EVENT, e->event, &r);
            kc_unlock();
        }
        pthread_mutex_lock(&hf_mu);
        hf_head = e->next;                 /* only the worker removes entries */
        if (!hf_head) hf_tail = NULL;
        pthread_cond_broadcast(&hf_cv);
        pthread_mutex_unlock(&hf_mu);
        free(e);
    }
    return NULL;
}

static int hf_start(void) {           /* hf_mu held */
    if (hf_started) return 0;
    pthread_attr_t a;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);      /* no signals for our thread */
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&hf_thread, &a, hf_main, NULL);
    pthread_attr_destroy(&a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!err) hf_started = 1;
    return err ? -1 : 0;
}

static CUresult host_func(CUhandle stream, host_fn fn, stream_cb cb, void *data) {
    if (!fn && !cb) return CUDA_ERROR_INVALID_VALUE;
    pthread_once(&hf_once, hf_install);
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    int dev;
    uint64_t sh, ev;
    struct hostfn *e = NULL;
    rc = kc_resolve_stream(stream, &dev, &sh);    /* no wait: host functions queue in order */
    void *cap = rc ? NULL : kc_capture_of(stream);
    if (cap) {                 /* a host node of the capture's graph (a stream callback: refused, as CUDA's) */
        kc_unlock();
        if (cb) return kc_capture_fail(cap, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        struct kc_gnode n = {.kind = KC_G_HOST, .fn = fn, .data = data};
        return kc_capture_add(cap, &n);
    }
    if (!rc) {
        struct kc_buf b = {0};
        struct mp_val r;
        mp_str(&b, KCP_EXECUTOR_EVENT_CREATE_FLAGS); mp_uint(&b, 0x2);   /* no timing */
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, KCP_EXECUTOR_EVENT_CREATE, &b, 1, &r);
        mp_free(&b);
        if (!rc && kc_uint_of(&r, KCP_EXECUTOR_EVENT_CREATE_R_EVENT, &ev)) rc = CUDA_ERROR_UNKNOWN;
    }
    if (!rc) {
        struct kc_buf b = {0};
        mp_str(&b, KCP_EXECUTOR_EVENT_RECORD_EVENT); mp_uint(&b, ev);
        mp_str(&b, KCP_EXECUTOR_EVENT_RECORD_STREAM); mp_uint(&b, sh);
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_post(dev, KCP_EXECUTOR_EVENT_RECORD, &b, 2);
        mp_free(&b);
        if (!rc && !(e = calloc(1, sizeof *e))) rc = CUDA_ERROR_OUT_OF_MEMORY;
        if (rc) {
            struct mp_val r;
            kc_request1(dev, KCP_EXECUTOR_EVENT_DESTROY, KCP_EXECUTOR_EVENT_DESTROY_EVENT, ev, &r);
        }
    }
    if (!rc) {
        *e = (struct hostfn){NULL, dev, sh, ev, stream, kc_session_epoch(), fn, cb, data};
        pthread_mutex_lock(&hf_mu);
        if (hf_start()) {
            rc = CUDA_ERROR_OUT_OF_MEMORY;
            free(e);
        } else {
            if (hf_tail) hf_tail->next = e; else hf_head = e;
            hf_tail = e;
            pthread_cond_broadcast(&hf_cv);
        }
        pthread_mutex_unlock(&hf_mu);
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuLaunchHostFunc(CUhandle hStream, host_fn fn, void *userData) {
    return fn ? host_func(hStream, fn, NULL, userData) : CUDA_ERROR_INVALID_VALUE;
}
KC_EXPORT CUresult cuLaunchHostFunc_ptsz(CUhandle hStream, host_fn fn, void *userData) {
    return cuLaunchHostFunc(hStream, fn, userData);
}
KC_EXPORT CUresult cuStreamAddCallback(CUhandle hStream, stream_cb callback, void *userData, unsigned int flags) {
    if (flags != 0 || !callback) return CUDA_ERROR_INVALID_VALUE;     /* flags: reserved, 0 */
    return host_func(hStream, NULL, callback, userData);
}
KC_EXPORT CUresult cuStreamAddCallback_ptsz(CUhandle hStream, stream_cb callback, void *userData, unsigned int flags) {
    return cuStreamAddCallback(hStream, callback, userData, flags);
}

/* ---- 2D and 3D copies: row loops over the 1D copies (one copy when both sides are
 * contiguous), so each row goes the way the 1D call of its direction goes ---- */
enum { MT_HOST = 1, MT_DEVICE = 2, MT_ARRAY = 3, MT_UNIFIED = 4 };

KC_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n);
KC_EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n);
KC_EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n);
KC_EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n);
KC_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUhandle s);

/* cuda.h's CUDA_MEMCPY3D_v2; a CUDA_MEMCPY2D_v2 is read into one (Depth 1). */
struct side { size_t x, y, z, lod; int type; const void *host; CUdeviceptr device; void *array; void *reserved; size_t pitch, height; };
struct copy3d { struct side src, dst; size_t width, height, depth; };
struct side2d { size_t x, y; int type; const void *host; CUdeviceptr device; void *array; size_t pitch; };
struct copy2d { struct side2d src, dst; size_t width, height; };

static int side_addr(const struct side *s, uint64_t *a) {
    if (s->type == MT_HOST) *a = (uintptr_t)s->host;
    else if (s->type == MT_DEVICE || s->type == MT_UNIFIED) *a = s->device;
    else return -1;
    return 0;
}

static CUresult row(int st, int dt, uint64_t d, uint64_t s, size_t n, int async, CUhandle stream) {
    if (st == MT_HOST && dt == MT_HOST) {
        if (!d || !s) return CUDA_ERROR_INVALID_VALUE;
        memmove((void *)(uintptr_t)d, (const void *)(uintptr_t)s, n);
        return CUDA_SUCCESS;
    }
    if (st == MT_UNIFIED || dt == MT_UNIFIED)
        return async ? cuMemcpyAsync(d, s, n, stream) : cuMemcpy(d, s, n);
    if (st == MT_HOST)
        return async ? cuMemcpyHtoDAsync_v2(d, (const void *)(uintptr_t)s, n, stream)
                     : cuMemcpyHtoD_v2(d, (const void *)(uintptr_t)s, n);
    if (dt == MT_HOST)
        return async ? cuMemcpyDtoHAsync_v2((void *)(uintptr_t)d, s, n, stream)
                     : cuMemcpyDtoH_v2((void *)(uintptr_t)d, s, n);
    return async ? cuMemcpyDtoDAsync_v2(d, s, n, stream) : cuMemcpyDtoD_v2(d, s, n);
}

static CUresult copy3d(const struct copy3d *c, int async, CUhandle stream) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    if (c->src.type == MT_ARRAY || c->dst.type == MT_ARRAY) {
        static int once;
        kc_unsupported_once("CUDA arrays (CU_MEMORYTYPE_ARRAY in a 2D/3D copy)", &once);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    uint64_t s0, d0;
    if (side_addr(&c->src, &s0) || side_addr(&c->dst, &d0)) return CUDA_ERROR_INVALID_VALUE;
    if (c->src.lod || c->dst.lod) return CUDA_ERROR_INVALID_VALUE;     /* mipmap levels: arrays only */
    size_t w = c->width, h = c->height, dp = c->depth;
    if (!w || !h || !dp) return CUDA_SUCCESS;
    /* as CUDA: a pitch shorter than the row (offset included), a slice height shorter than
     * the rows asked for */
    if (w > c->src.pitch || c->src.x > c->src.pitch - w || w > c->dst.pitch || c->dst.x > c->dst.pitch - w)
        return CUDA_ERROR_INVALID_VALUE;
    if (dp > 1 && (h > c->src.height || c->src.y > c->src.height - h || h > c->dst.height || c->dst.y > c->dst.height - h))
        return CUDA_ERROR_INVALID_VALUE;
    size_t sslice = c->src.pitch * c->src.height, dslice = c->dst.pitch * c->dst.height;   /* 0 when Depth 1 may say 0 */
    s0 += c->src.x + c->src.y * c->src.pitch + c->src.z * sslice;
    d0 += c->dst.x + c->dst.y * c->dst.pitch + c->dst.z * dslice;
    int rows_whole = w == c->src.pitch && w == c->dst.pitch;
    int slices_whole = rows_whole && (dp == 1 || (h == c->src.height && h == c->dst.height));
    if (slices_whole) return row(c->src.type, c->dst.type, d0, s0, w * h * dp, async, stream);
    for (size_t z = 0; z < dp; z++) {
        uint64_t s = s0 + z * sslice, d = d0 + z * dslice;
        CUresult rc = rows_whole ? row(c->src.type, c->dst.type, d, s, w * h, async, stream) : CUDA_SUCCESS;
        for (size_t y = 0; !rows_whole && !rc && y < h; y++)
            rc = row(c->src.type, c->dst.type, d + y * c->dst.pitch, s + y * c->src.pitch, w, async, stream);
        if (rc) return rc;
    }
    return CUDA_SUCCESS;
}

static CUresult copy2d(const struct copy2d *c, int async, CUhandle stream) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    struct copy3d t = {
        {c->src.x, c->src.y, 0, 0, c->src.type, c->src.host, c->src.device, c->src.array, NULL, c->src.pitch, c->height},
        {c->dst.x, c->dst.y, 0, 0, c->dst.type, c->dst.host, c->dst.device, c->dst.array, NULL, c->dst.pitch, c->height},
        c->width, c->height, 1};
    return copy3d(&t, async, stream);
}

KC_EXPORT CUresult cuMemcpy2D_v2(const struct copy2d *p) { return copy2d(p, 0, NULL); }
KC_EXPORT CUresult cuMemcpy2D_v2_ptds(const struct copy2d *p) { return copy2d(p, 0, NULL); }
KC_EXPORT CUresult cuMemcpy2DUnaligned_v2(const struct copy2d *p) { return copy2d(p, 0, NULL); }
KC_EXPORT CUresult cuMemcpy2DUnaligned_v2_ptds(const struct copy2d *p) { return copy2d(p, 0, NULL); }
KC_EXPORT CUresult cuMemcpy2DAsync_v2(const struct copy2d *p, CUhandle s) { return copy2d(p, 1, s); }
KC_EXPORT CUresult cuMemcpy2DAsync_v2_ptsz(const struct copy2d *p, CUhandle s) { return copy2d(p, 1, s); }
KC_EXPORT CUresult cuMemcpy3D_v2(const struct copy3d *p) { return copy3d(p, 0, NULL); }
KC_EXPORT CUresult cuMemcpy3D_v2_ptds(const struct copy3d *p) { return copy3d(p, 0, NULL); }
KC_EXPORT CUresult cuMemcpy3DAsync_v2(const struct copy3d *p, CUhandle s) { return copy3d(p, 1, s); }
KC_EXPORT CUresult cuMemcpy3DAsync_v2_ptsz(const struct copy3d *p, CUhandle s) { return copy3d(p, 1, s); }

/* ---- 2D memsets: one memset per row (one in all when the rows touch) ---- */
KC_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n);
KC_EXPORT CUresult cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n);
KC_EXPORT CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned int v, size_t n);
KC_EXPORT CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUhandle s);

static CUresult memset_row(CUdeviceptr d, unsigned v, unsigned width, size_t n, int async, CUhandle s) {
    switch (width) {
    case 1: return async ? cuMemsetD8Async(d, (unsigned char)v, n, s) : cuMemsetD8_v2(d, (unsigned char)v, n);
    case 2: return async ? cuMemsetD16Async(d, (unsigned short)v, n, s) : cuMemsetD16_v2(d, (unsigned short)v, n);
    default: return async ? cuMemsetD32Async(d, v, n, s) : cuMemsetD32_v2(d, v, n);
    }
}

static CUresult memset2d(CUdeviceptr d, size_t pitch, unsigned v, unsigned width, size_t w, size_t h, int async,
                         CUhandle s) {
    if (!w || !h) return CUDA_SUCCESS;
    /* as CUDA: the row must fit the pitch; 16- and 32-bit fills need aligned rows */
    if (w > (SIZE_MAX / width) || w * width > pitch || (d | pitch) % width) return CUDA_ERROR_INVALID_VALUE;
    if (w * width == pitch) return memset_row(d, v, width, w * h, async, s);
    for (size_t y = 0; y < h; y++) {
        CUresult rc = memset_row(d + y * pitch, v, width, w, async, s);
        if (rc) return rc;
    }
    return CUDA_SUCCESS;
}

#define MEMSET2D(name, T, width) \
    KC_EXPORT CUresult name(CUdeviceptr d, size_t pitch, T v, size_t w, size_t h) { \
        return memset2d(d, pitch, v, width, w, h, 0, NULL); }
#define MEMSET2D_ASYNC(name, T, width) \
    KC_EXPORT CUresult name(CUdeviceptr d, size_t pitch, T v, size_t w, size_t h, CUhandle s) { \
        return memset2d(d, pitch, v, width, w, h, 1, s); }
MEMSET2D(cuMemsetD2D8_v2, unsigned char, 1)
MEMSET2D(cuMemsetD2D8_v2_ptds, unsigned char, 1)
MEMSET2D(cuMemsetD2D16_v2, unsigned short, 2)
MEMSET2D(cuMemsetD2D16_v2_ptds, unsigned short, 2)
MEMSET2D(cuMemsetD2D32_v2, unsigned int, 4)
MEMSET2D(cuMemsetD2D32_v2_ptds, unsigned int, 4)
MEMSET2D_ASYNC(cuMemsetD2D8Async, unsigned char, 1)
MEMSET2D_ASYNC(cuMemsetD2D8Async_ptsz, unsigned char, 1)
MEMSET2D_ASYNC(cuMemsetD2D16Async, unsigned short, 2)
MEMSET2D_ASYNC(cuMemsetD2D16Async_ptsz, unsigned short, 2)
MEMSET2D_ASYNC(cuMemsetD2D32Async, unsigned int, 4)
MEMSET2D_ASYNC(cuMemsetD2D32Async_ptsz, unsigned int, 4)

/* ---- unified addressing: device addresses are never host addresses of this program.
 * cuMemcpy tells device from host memory by this session's allocations; on a CPU device an
 * allocation is a real address of the executor's process and could coincide with memory of
 * this one. So each allocation's range is reserved here too (PROT_NONE, no memory behind it,
 * MAP_FIXED_NOREPLACE: never over a mapping of the program). Where the program already has
 * memory there, the allocation is kept aside while another is asked for, then freed: the
 * executor cannot hand the same range back meanwhile. Module globals live inside the
 * executor's module images and are not reserved (they are looked up like allocations). ---- */
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#define GUARD_TRIES 8
/* A reservation: [lo, hi) pages for the allocation at base. Allocations of the executor's
 * arena can share their first and last pages with their neighbours (small ones are packed),
 * so a page already reserved for another allocation counts as reserved, and a page goes only
 * when no allocation covers it any more. */
struct guard { uint64_t base, lo, hi; };
static struct guard *guards;
static size_t nguards, capguards;
static size_t page_size(void) {
    long pg = sysconf(_SC_PAGESIZE);
    return pg > 0 ? (size_t)pg : 4096;
}

/* Reserve [p, p + n) (rounded out to pages): 0 done, 1 the program has memory there, -1 this
 * process cannot reserve at all (then addresses are not guarded; logged once). */
static int page_guarded(uint64_t page, size_t skip) {     /* by an entry other than `skip` */
    for (size_t i = 0; i < nguards; i++)
        if (i != skip && guards[i].lo <= page && page < guards[i].hi) return 1;
    return 0;
}

/* In device `dev`'s arena mapped at the executor's own address: already this process's
 * mapping of that very memory, nothing to reserve. */
static int in_identity_arena(int dev, uint64_t p, size_t n) {
    const struct kc_device *d = kc_device(dev);
    return d && d->arena && (uint64_t)(uintptr_t)d->arena == d->arena_base && p >= d->arena_base &&
           n <= d->arena_size && p - d->arena_base <= d->arena_size - n;
}

static int guard(uint64_t p, size_t n) {
    size_t pg = page_size();
    uint64_t lo = p / pg * pg, hi = (p + n + pg - 1) / pg * pg;
    if (nguards == capguards) {
        size_t cap = capguards ? capguards * 2 : 64;
        struct guard *q = realloc(guards, cap * sizeof *q);
        if (!q) return -1;
        guards = q;
        capguards = cap;
    }
    uint64_t mlo = lo, mhi = hi;                 /* what still needs a reservation */
    if (mlo < mhi && page_guarded(mlo, (size_t)-1)) mlo += pg;
    if (mlo < mhi && page_guarded(mhi - pg, (size_t)-1)) mhi -= pg;
    if (mlo < mhi) {
        void *m = mmap((void *)(uintptr_t)mlo, mhi - mlo, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (m == MAP_FAILED) return errno == EEXIST ? 1 : -1;
        if ((uintptr_t)m != mlo) {               /* a kernel without MAP_FIXED_NOREPLACE: a hint it moved */
            munmap(m, mhi - mlo);
            return 1;
        }
    }
    guards[nguards++] = (struct guard){p, lo, hi};
    return 0;
}

void kc_unguard(uint64_t p) {
    size_t pg = page_size();
    for (size_t i = 0; i < nguards; i++)
        if (guards[i].base == p) {
            uint64_t lo = guards[i].lo, hi = guards[i].hi;
            if (lo < hi && page_guarded(lo, i)) lo += pg;          /* still a neighbour's */
            if (lo < hi && page_guarded(hi - pg, i)) hi -= pg;
            if (lo < hi) munmap((void *)(uintptr_t)lo, hi - lo);
            guards[i] = guards[--nguards];
            return;
        }
}

static CUresult mem_alloc(int dev, size_t size, uint64_t *p) {
    struct kc_buf b = {0};
    struct mp_val r;
    mp_str(&b, KCP_EXECUTOR_MEM_ALLOC_SIZE); mp_uint(&b, size);
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, KCP_EXECUTOR_MEM_ALLOC, &b, 1, &r);
    mp_free(&b);
    if (!rc && kc_uint_of(&r, KCP_EXECUTOR_MEM_ALLOC_R_PTR, p)) rc = CUDA_ERROR_UNKNOWN;
    return rc;
}

CUresult kc_exec_alloc(int dev, size_t size, uint64_t *out) {
    uint64_t aside[GUARD_TRIES + 1], p = 0;
    int naside = 0, g = 1;
    CUresult rc = CUDA_SUCCESS;
    while (g == 1 && !rc) {
        rc = mem_alloc(dev, size, &p);
        if (rc) break;
        g = in_identity_arena(dev, p, size) ? 0 : guard(p, size);
        if (g != 1) break;
        kc_log("kubecash: device allocation %#llx (%zu bytes) overlaps this program's memory: another is asked for",
               (unsigned long long)p, size);
        aside[naside++] = p;          /* freed below, once another range is had */
        if (naside == GUARD_TRIES + 1) {
            kc_log("kubecash: %d device allocations in a row overlap this program's memory", naside);
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    if (g < 0) {
        static int once;
        if (!once) { once = 1; kc_log("kubecash: cannot reserve device ranges here: cuMemcpy guesses by allocation"); }
    }
    struct mp_val r;
    for (int i = 0; i < naside; i++)
        kc_request1(dev, KCP_EXECUTOR_MEM_FREE, KCP_EXECUTOR_MEM_FREE_PTR, aside[i], &r);
    if (!rc) {
        kc_alloc_note(dev, p, size);
        *out = p;
    }
    return rc;
}

/* ---- stream-ordered allocation and memory pools. A pool is bookkeeping here: its
 * allocations are the executor's ordinary ones (mem_alloc, charged to the quota, so an
 * allocation over it fails at the call with OUT_OF_MEMORY as cuMemAllocAsync does when a
 * pool cannot grow), made at once, which is ahead of anything later on the stream. A free is
 * a posted mem_free: the executor runs it after all work queued before it, so it never frees
 * memory that work still uses. Nothing is cached, so trimming has nothing to release and
 * reserved memory equals used memory. ---- */
enum { ATTR_FOLLOW_EVENTS = 1, ATTR_OPPORTUNISTIC, ATTR_INTERNAL_DEPS, ATTR_RELEASE_THRESHOLD,
       ATTR_RESERVED_CURRENT, ATTR_RESERVED_HIGH, ATTR_USED_CURRENT, ATTR_USED_HIGH };
#define MAX_POOLS 256
struct pool {
    int dev, is_default;
    unsigned epoch;
    uint32_t gen;
    uint64_t max_size, used, high, threshold;
    int reuse[3];                   /* the three reuse policies (all on by default, as CUDA) */
};
static struct pool pools[MAX_POOLS];
static uint32_t pool_gen = 1;
static int current_pool[KC_MAX_DEVICES];   /* index + 1 of each device's current pool; 0: default */
static unsigned current_epoch;
struct pool_alloc { uint64_t ptr, size; int pool; };
static struct pool_alloc *pallocs;
static size_t npallocs, cappallocs;

/* cuda.h's CUmemPoolProps */
struct pool_props { int alloc_type, handle_types; struct { int type, id; } location; void *win32; size_t max_size;
                    unsigned short usage; unsigned char reserved[54]; };

static CUhandle pool_handle(int i) {
    return (CUhandle)(uintptr_t)(((uint64_t)pools[i].gen << 32) | ((uint64_t)(i + 1) << 8) | 0x5A);
}

/* The pool a handle names (lock held), or -1. */
static int pool_of(CUhandle h) {
    uint64_t v = (uint64_t)(uintptr_t)h;
    int i = (int)((v >> 8) & 0xFFFFFF) - 1;
    if ((v & 0xFF) != 0x5A || i < 0 || i >= MAX_POOLS || !pools[i].gen || pools[i].gen != (uint32_t)(v >> 32) ||
        pools[i].epoch != kc_session_epoch())
        return -1;
    return i;
}

static int pool_new(int dev, int is_default, uint64_t max_size) {
    for (int i = 0; i < MAX_POOLS; i++)
        if (!pools[i].gen || pools[i].epoch != kc_session_epoch()) {
            pools[i] = (struct pool){dev, is_default, kc_session_epoch(), pool_gen++, max_size, 0, 0, 0, {1, 1, 1}};
            return i;
        }
    return -1;
}

static void pools_fresh(void) {       /* a new session (a forked child's): none of the old pools */
    if (current_epoch == kc_session_epoch()) return;
    memset(current_pool, 0, sizeof current_pool);
    npallocs = 0;
    current_epoch = kc_session_epoch();
}

/* The device's default pool (made on first use), or -1. */
static int default_pool(int dev) {
    for (int i = 0; i < MAX_POOLS; i++)
        if (pools[i].gen && pools[i].epoch == kc_session_epoch() && pools[i].is_default && pools[i].dev == dev) return i;
    return pool_new(dev, 1, 0);
}

static int device_pool(int dev) {
    pools_fresh();
    int c = current_pool[dev] - 1;
    return c >= 0 && pools[c].gen && pools[c].epoch == kc_session_epoch() ? c : default_pool(dev);
}

/* A pool call's lock (released on failure) plus the pool's index. */
static CUresult lock_pool(CUhandle h, int *i) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    pools_fresh();
    if ((*i = pool_of(h)) < 0) { kc_unlock(); return CUDA_ERROR_INVALID_VALUE; }
    return CUDA_SUCCESS;
}

static CUresult lock_dev(int dev) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    if (!kc_device(dev)) { kc_unlock(); return CUDA_ERROR_INVALID_DEVICE; }
    pools_fresh();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuMemPoolCreate(CUhandle *pool, const struct pool_props *props) {
    if (!pool || !props) return CUDA_ERROR_INVALID_VALUE;
    if (props->alloc_type != 1 || props->location.type != 1) return CUDA_ERROR_INVALID_VALUE;  /* PINNED, DEVICE */
    if (props->handle_types) {
        kc_log("kubecash: cuMemPoolCreate: shareable handle types are cross-process and not supported");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    CUresult rc = lock_dev(props->location.id);
    if (rc) return rc;
    int i = pool_new(props->location.id, 0, props->max_size);
    if (i < 0) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else *pool = pool_handle(i);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemPoolDestroy(CUhandle pool) {
    int i;
    CUresult rc = lock_pool(pool, &i);
    if (rc) return rc;
    if (pools[i].is_default) rc = CUDA_ERROR_INVALID_VALUE;
    else {
        /* its allocations stay valid until freed (CUDA frees them with the pool once the
         * work using them completes; here they stay until cuMemFreeAsync) */
        if (current_pool[pools[i].dev] == i + 1) current_pool[pools[i].dev] = 0;
        for (size_t k = 0; k < npallocs; k++)
            if (pallocs[k].pool == i) pallocs[k].pool = -1;
        pools[i].gen = 0;
    }
    kc_unlock();
    return rc;
}

/* The device's default (which 0) or current (1) pool. */
static CUresult get_pool(CUhandle *pool, int dev, int which) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_dev(dev);
    if (rc) return rc;
    int i = which ? device_pool(dev) : default_pool(dev);
    if (i < 0) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else *pool = pool_handle(i);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuDeviceGetDefaultMemPool(CUhandle *pool, int dev) { return get_pool(pool, dev, 0); }
KC_EXPORT CUresult cuDeviceGetMemPool(CUhandle *pool, int dev) { return get_pool(pool, dev, 1); }

KC_EXPORT CUresult cuDeviceSetMemPool(int dev, CUhandle pool) {
    CUresult rc = lock_dev(dev);
    if (rc) return rc;
    int i = pool_of(pool);
    if (i < 0 || pools[i].dev != dev) rc = CUDA_ERROR_INVALID_VALUE;
    else current_pool[dev] = i + 1;
    kc_unlock();
    return rc;
}

static CUresult alloc_from(CUdeviceptr *dptr, size_t size, int pool_idx, CUhandle stream) {
    if (!dptr || size == 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    pools_fresh();
    int dev;
    uint64_t sh, p;
    rc = kc_resolve_stream(stream, &dev, &sh);
    if (!rc && kc_capture_of(stream)) {          /* a memory node: not offered */
        void *cap = kc_capture_of(stream);
        kc_unlock();
        kc_log("kubecash: cuMemAllocAsync during stream capture (a memory node) is not supported");
        return kc_capture_fail(cap, CUDA_ERROR_NOT_SUPPORTED);
    }
    int i = rc ? -1 : pool_idx == -2 ? device_pool(dev) : pool_idx;
    if (!rc && i < 0) rc = CUDA_ERROR_OUT_OF_MEMORY;
    if (!rc && pools[i].dev != dev) rc = CUDA_ERROR_INVALID_VALUE;      /* a pool of another device */
    if (!rc && pools[i].max_size && size > pools[i].max_size - (pools[i].used < pools[i].max_size ? pools[i].used : pools[i].max_size))
        rc = CUDA_ERROR_OUT_OF_MEMORY;                                  /* the pool's own maxSize */
    if (!rc && npallocs == cappallocs) {
        size_t cap = cappallocs ? cappallocs * 2 : 64;
        struct pool_alloc *q = realloc(pallocs, cap * sizeof *q);
        if (q) { pallocs = q; cappallocs = cap; } else rc = CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (!rc) rc = kc_exec_alloc(dev, size, &p);      /* the quota */
    if (!rc) {
        pallocs[npallocs++] = (struct pool_alloc){p, size, i};
        pools[i].used += size;
        if (pools[i].used > pools[i].high) pools[i].high = pools[i].used;
        *dptr = p;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUhandle hStream) {
    return alloc_from(dptr, bytesize, -2, hStream);
}
KC_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUhandle hStream) {
    return alloc_from(dptr, bytesize, -2, hStream);
}

KC_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUhandle pool, CUhandle hStream) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    pools_fresh();
    int i = pool_of(pool);
    kc_unlock();
    return i < 0 ? CUDA_ERROR_INVALID_VALUE : alloc_from(dptr, bytesize, i, hStream);
}
KC_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUhandle pool, CUhandle hStream) {
    return cuMemAllocFromPoolAsync(dptr, bytesize, pool, hStream);
}

KC_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUhandle hStream) {
    int dev;
    uint64_t sh;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    pools_fresh();
    rc = kc_resolve_stream(hStream, &dev, &sh);
    if (!rc && kc_capture_of(hStream)) {
        void *cap = kc_capture_of(hStream);
        kc_unlock();
        kc_log("kubecash: cuMemFreeAsync during stream capture (a memory node) is not supported");
        return kc_capture_fail(cap, CUDA_ERROR_NOT_SUPPORTED);
    }
    if (!rc && kc_device_of(dptr) != dev) rc = CUDA_ERROR_INVALID_VALUE;   /* not this device's memory */
    /* after host functions queued on the stream: lock_stream's rule, kept here by hand */
    while (!rc && kc_hostfn_pending(dev, sh)) {
        kc_unlock();
        kc_hostfn_wait(dev, sh);
        if ((rc = kc_lock(0))) return rc;
    }
    if (!rc) {
        struct kc_buf b = {0};
        mp_str(&b, KCP_EXECUTOR_MEM_FREE_PTR); mp_uint(&b, dptr);
        /* Waited for, not posted: the executor frees after the work queued before it, and the
         * memory must be back once the stream is synchronized (its queue is not the stream's).
         * The call blocks until then: correct before fast. */
        struct mp_val r;
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, KCP_EXECUTOR_MEM_FREE, &b, 1, &r);
        mp_free(&b);
    }
    if (!rc) {
        kc_alloc_forget(dptr);
        for (size_t k = 0; k < npallocs; k++)
            if (pallocs[k].ptr == dptr) {
                int i = pallocs[k].pool;
                if (i >= 0 && pools[i].gen) pools[i].used -= pallocs[k].size < pools[i].used ? pallocs[k].size : pools[i].used;
                pallocs[k] = pallocs[--npallocs];
                break;
            }
    }
    kc_unlock();
    return rc;
}
KC_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUhandle hStream) { return cuMemFreeAsync(dptr, hStream); }

KC_EXPORT CUresult cuMemPoolSetAttribute(CUhandle pool, int attr, void *value) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    int i;
    CUresult rc = lock_pool(pool, &i);
    if (rc) return rc;
    struct pool *p = &pools[i];
    switch (attr) {
    case ATTR_FOLLOW_EVENTS: case ATTR_OPPORTUNISTIC: case ATTR_INTERNAL_DEPS:
        p->reuse[attr - 1] = *(int *)value != 0;
        break;
    case ATTR_RELEASE_THRESHOLD: p->threshold = *(uint64_t *)value; break;
    case ATTR_RESERVED_HIGH: case ATTR_USED_HIGH:          /* only a reset to the current value */
        if (*(uint64_t *)value != 0) rc = CUDA_ERROR_INVALID_VALUE;
        else p->high = p->used;
        break;
    default: rc = CUDA_ERROR_INVALID_VALUE;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemPoolGetAttribute(CUhandle pool, int attr, void *value) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    int i;
    CUresult rc = lock_pool(pool, &i);
    if (rc) return rc;
    struct pool *p = &pools[i];
    switch (attr) {
    case ATTR_FOLLOW_EVENTS: case ATTR_OPPORTUNISTIC: case ATTR_INTERNAL_DEPS: *(int *)value = p->reuse[attr - 1]; break;
    case ATTR_RELEASE_THRESHOLD: *(uint64_t *)value = p->threshold; break;
    case ATTR_RESERVED_CURRENT: case ATTR_USED_CURRENT: *(uint64_t *)value = p->used; break;   /* nothing cached */
    case ATTR_RESERVED_HIGH: case ATTR_USED_HIGH: *(uint64_t *)value = p->high; break;
    default: rc = CUDA_ERROR_INVALID_VALUE;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemPoolTrimTo(CUhandle pool, size_t minBytesToKeep) {
    int i;
    CUresult rc = lock_pool(pool, &i);     /* nothing is cached: nothing to release */
    if (!rc) kc_unlock();
    return rc;
}
