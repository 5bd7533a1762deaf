/* The driver API entry points native/table.py marks "broker" or "local", with their real
 * prototypes (written with plain C types: the build needs no cuda.h). Everything else is a
 * generated NOT_SUPPORTED stub (gen_surface.c). */
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "gen_protocol.h"
#include "kc.h"

typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct kc_ctx *CUcontext;
typedef struct { char bytes[16]; } CUuuid;

#define GET_PROC_LEGACY_STREAM 1
#define GET_PROC_PER_THREAD_STREAM 2
enum { PROC_SUCCESS = 0, PROC_SYMBOL_NOT_FOUND = 1, PROC_VERSION_NOT_SUFFICIENT = 2 };

/* One primary context per device, and created ones (cuCtxCreate) from a fixed pool; the
 * handle a program sees is its address. A created context shares its device's session:
 * what is made while it is current (allocations, streams, events, modules) is its, and goes
 * with cuCtxDestroy. */
struct kc_ctx { int device; int refs; unsigned flags; int created; };
static struct kc_ctx primary[KC_MAX_DEVICES];
#define KC_MAX_CREATED 64
static struct kc_ctx created[KC_MAX_CREATED];
/* The calling thread's context stack (cuCtxPushCurrent/PopCurrent; the current context is
 * its top, which cuCtxSetCurrent replaces): a pthread key rather than __thread, whose dynamic
 * TLS model would make the library need ld-linux (__tls_get_addr) besides libc. */
#define CTX_STACK 32
struct ctx_stack { int n; struct kc_ctx *c[CTX_STACK]; };
static pthread_key_t current_key;
static pthread_once_t current_once = PTHREAD_ONCE_INIT;
static void make_key(void) { pthread_key_create(&current_key, free); }
static struct ctx_stack *stack(int create) {
    pthread_once(&current_once, make_key);
    struct ctx_stack *s = pthread_getspecific(current_key);
    if (!s && create && (s = calloc(1, sizeof *s)) && pthread_setspecific(current_key, s)) {
        free(s);
        s = NULL;
    }
    return s;
}
static int is_ctx(const struct kc_ctx *c);
/* The top of the stack; a context destroyed while current here (by another thread) is none. */
static struct kc_ctx *get_current(void) {
    struct ctx_stack *s = stack(0);
    struct kc_ctx *c = s && s->n ? s->c[s->n - 1] : NULL;
    return c && is_ctx(c) ? c : NULL;
}
static int set_current(struct kc_ctx *c) {
    struct ctx_stack *s = stack(c != NULL);
    if (!s) return c ? -1 : 0;
    if (!c) s->n = s->n ? s->n - 1 : 0;      /* as the driver: setting NULL pops the top */
    else if (s->n) s->c[s->n - 1] = c;
    else s->c[s->n++] = c;
    return 0;
}

int kc_current_device(void) {
    struct kc_ctx *c = get_current();
    return c && kc_device(c->device) ? c->device : -1;
}

void *kc_current_ctx(void) { return get_current(); }

/* One of the handles handed out, exactly: a pointer into the middle of one is no context,
 * nor is a destroyed one. */
static int is_ctx(const struct kc_ctx *c) {
    uintptr_t off = (uintptr_t)c - (uintptr_t)primary, coff = (uintptr_t)c - (uintptr_t)created;
    if ((uintptr_t)c >= (uintptr_t)primary && off < sizeof primary && off % sizeof primary[0] == 0) return 1;
    return (uintptr_t)c >= (uintptr_t)created && coff < sizeof created && coff % sizeof created[0] == 0 &&
           c->created;
}

/* The lock on an open session plus a valid device; unlocked again on failure. */
static CUresult lock_device(CUdevice dev) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    if (!kc_device(dev)) { kc_unlock(); return CUDA_ERROR_INVALID_DEVICE; }
    return CUDA_SUCCESS;
}

/* The lock plus the calling thread's current context's device (*dev). */
static CUresult lock_current(int *dev) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct kc_ctx *c = get_current();
    if (!c || !kc_device(c->device)) { kc_unlock(); return CUDA_ERROR_INVALID_CONTEXT; }
    *dev = c->device;
    return CUDA_SUCCESS;
}

/* ---- initialisation, version, errors ---- */
KC_EXPORT CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(1);
    if (rc) return rc;
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuDriverGetVersion(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = kc_driver_version;
    return CUDA_SUCCESS;
}

static const struct kc_errname *errname(CUresult code) {
    for (int i = 0; i < kc_nerrnames; i++)
        if (kc_errnames[i].code == code) return &kc_errnames[i];
    return NULL;
}

KC_EXPORT CUresult cuGetErrorName(CUresult error, const char **str) {
    if (!str) return CUDA_ERROR_INVALID_VALUE;
    const struct kc_errname *e = errname(error);
    *str = e ? e->name : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

KC_EXPORT CUresult cuGetErrorString(CUresult error, const char **str) {
    if (!str) return CUDA_ERROR_INVALID_VALUE;
    const struct kc_errname *e = errname(error);
    *str = e ? e->text : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ---- cuGetProcAddress: the generated (name, version, flavour) table ---- */
static CUresult get_proc(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    if (!symbol || !pfn || flags > (GET_PROC_LEGACY_STREAM | GET_PROC_PER_THREAD_STREAM)) {
        if (pfn) *pfn = NULL;
        return CUDA_ERROR_INVALID_VALUE;
    }
    /* The default (0) is the legacy default stream: a driver cannot know how the program was
     * compiled; cudart built for per-thread streams asks with the flag. */
    int per_thread = (flags & GET_PROC_PER_THREAD_STREAM) != 0;
    const struct kc_proc *plain = NULL, *pt = NULL;
    int known = 0;
    for (int i = 0; i < kc_nprocs; i++) {
        const struct kc_proc *p = &kc_procs[i];
        if (strcmp(p->name, symbol) != 0) continue;
        known = 1;
        if (p->version > version) continue;
        const struct kc_proc **best = p->per_thread ? &pt : &plain;
        if (!*best || (*best)->version < p->version) *best = p;
    }
    const struct kc_proc *hit = per_thread && pt ? pt : plain;
    *pfn = hit ? hit->fn : NULL;
    /* What a runtime asks for (cudart resolves nearly everything here): the trace to read
     * when a program stops at a call we do not answer. */
    if (kc_debug()) kc_log("kubecash: cuGetProcAddress %s v%d flags %llu: %s", symbol, version, flags,
                           hit ? "found" : known ? "version too new" : "unknown");
    if (status) *status = hit ? PROC_SUCCESS : known ? PROC_VERSION_NOT_SUFFICIENT : PROC_SYMBOL_NOT_FOUND;
    return hit ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

KC_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags) {
    return get_proc(symbol, pfn, cudaVersion, flags, NULL);
}

KC_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags,
                                       int *symbolStatus) {
    return get_proc(symbol, pfn, cudaVersion, flags, symbolStatus);
}

/* ---- devices: answered from the hello reply's device descriptions ---- */
KC_EXPORT CUresult cuDeviceGetCount(int *count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    *count = kc_device_count();
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(ordinal);
    if (rc) return rc;
    *device = ordinal;
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    const char *m = kc_device(dev)->model;
    size_t n = strlen(m) < (size_t)len - 1 ? strlen(m) : (size_t)len - 1;
    memcpy(name, m, n);
    name[n] = 0;
    kc_unlock();
    return CUDA_SUCCESS;
}

static CUresult get_uuid(CUuuid *uuid, CUdevice dev) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    memcpy(uuid->bytes, kc_device(dev)->uuid, 16);
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return get_uuid(uuid, dev); }
KC_EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) { return get_uuid(uuid, dev); }

KC_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    *bytes = (size_t)kc_device(dev)->memory_limit;          /* the tenant's quota, not the card */
    kc_unlock();
    return CUDA_SUCCESS;
}

/* A device's PCI bus id as CUDA writes it ("0000:3b:00.0"); a CPU device's is 0000:00:<index>.0. */
KC_EXPORT CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev) {
    if (!pciBusId || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    unsigned loc[3];
    if (kc_pci_of(kc_device(dev), loc)) rc = CUDA_ERROR_NOT_SUPPORTED;
    else snprintf(pciBusId, (size_t)len, "%04x:%02x:%02x.0", loc[0], loc[1], loc[2]);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId) {
    if (!dev || !pciBusId) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(1);
    if (rc) return rc;
    int i = kc_device_by_pci(pciBusId);
    if (i < 0) rc = CUDA_ERROR_INVALID_DEVICE;
    else *dev = i;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuDeviceGetAttribute(int *pi, int attrib, CUdevice dev) {
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    const struct kc_device *d = kc_device(dev);
    rc = CUDA_ERROR_NOT_SUPPORTED;      /* what shim/devattr.py answers for an attribute it cannot */
    for (int i = 0; i < kc_nattrs; i++) {
        const struct kc_attr *a = &kc_attrs[i];
        if (a->attr != attrib) continue;
        long long v = a->value;
        if (a->kind == KC_ATTR_PROP && kc_desc_int(d, a->key, a->index, &v)) break;
        if (a->kind == KC_ATTR_CPU && strcmp(d->kind, "cpu") != 0) break;
        if (a->kind == KC_ATTR_ON_CPU && strcmp(d->kind, "cpu") != 0) v = a->index;
        *pi = (int)v;
        rc = CUDA_SUCCESS;
        break;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuDeviceComputeCapability(int *major, int *minor, CUdevice dev) {
    if (!major || !minor) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    long long ma, mi;
    const struct kc_device *d = kc_device(dev);
    if (kc_desc_int(d, "compute_capability", 0, &ma) || kc_desc_int(d, "compute_capability", 1, &mi)) {
        rc = CUDA_ERROR_NOT_SUPPORTED;
    } else {
        *major = (int)ma;
        *minor = (int)mi;
    }
    kc_unlock();
    return rc;
}

/* ---- contexts: the primary context of each device; retaining one attaches its executor ---- */
KC_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    rc = kc_device_attach(dev);
    if (!rc) {
        primary[dev].device = dev;
        primary[dev].refs++;
        *pctx = &primary[dev];
    }
    kc_unlock();
    return rc;
}

/* The device of context handle ctx, or -1 (lock held). */
int kc_ctx_device(void *ctx) {
    const struct kc_ctx *c = ctx;
    return c && is_ctx(c) && kc_device(c->device) ? c->device : -1;
}

/* Peer access (a kernel of one device reaching another's memory) is not offered: each device
 * is its own executor process. Copies between devices are (cuMemcpyPeer, cuda_exec.c). */
KC_EXPORT CUresult cuDeviceCanAccessPeer(int *can, CUdevice dev, CUdevice peer) {
    if (!can) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    rc = kc_device(peer) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
    if (!rc) *can = 0;
    kc_unlock();
    return rc;
}

void *kc_primary_of(int dev) {
    if (!kc_device(dev)) return NULL;
    primary[dev].device = dev;
    return &primary[dev];
}

/* The primary context's handle without retaining it (and so without attaching the executor):
 * what cudart asks of CUDART_INTERFACE slot 2 while it merely counts devices. */
CUresult kc_primary_context(int dev, void **pctx) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    *pctx = kc_primary_of(dev);
    kc_unlock();
    return CUDA_SUCCESS;
}

static CUresult primary_release(CUdevice dev) {
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    if (primary[dev].refs > 0) primary[dev].refs--;
    else rc = CUDA_ERROR_INVALID_CONTEXT;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) { return primary_release(dev); }
KC_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice dev) { return primary_release(dev); }

KC_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    kc_unlock();
    *pctx = get_current();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    if (ctx && (!is_ctx(ctx) || !kc_device(ctx->device))) rc = CUDA_ERROR_INVALID_CONTEXT;
    else if (set_current(ctx)) rc = CUDA_ERROR_OUT_OF_MEMORY;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuCtxGetDevice(CUdevice *device) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    *device = dev;
    kc_unlock();
    return CUDA_SUCCESS;
}

/* The lock plus ctx's device (ctx NULL: the current context's). */
static CUresult lock_ctx(CUcontext ctx, int *dev) {
    if (!ctx) return lock_current(dev);
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    if (!is_ctx(ctx) || !kc_device(ctx->device)) { kc_unlock(); return CUDA_ERROR_INVALID_CONTEXT; }
    *dev = ctx->device;
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuCtxGetDevice_v2(CUdevice *device, CUcontext ctx) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_ctx(ctx, &dev);
    if (rc) return rc;
    *device = dev;
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct ctx_stack *s = NULL;
    if (!ctx || !is_ctx(ctx) || !kc_device(ctx->device)) rc = CUDA_ERROR_INVALID_CONTEXT;
    else if (!(s = stack(1))) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else if (s->n == CTX_STACK) rc = CUDA_ERROR_OUT_OF_MEMORY;    /* deeper than anyone nests */
    else s->c[s->n++] = ctx;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct ctx_stack *s = stack(0);
    if (!s || !s->n) rc = CUDA_ERROR_INVALID_CONTEXT;
    else {
        struct kc_ctx *c = s->c[--s->n];
        if (pctx) *pctx = c;
    }
    kc_unlock();
    return rc;
}

/* The API version a context was created with: 3020 is what every context since CUDA 3.2
 * reports (cudart refuses older ones). */
KC_EXPORT CUresult cuCtxGetApiVersion(CUcontext ctx, unsigned int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_ctx(ctx, &dev);
    if (rc) return rc;
    *version = 3020;
    kc_unlock();
    return CUDA_SUCCESS;
}

/* A context's id: unique in the process, here its device's index plus one. */
KC_EXPORT CUresult cuCtxGetId(CUcontext ctx, unsigned long long *id) {
    if (!id) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_ctx(ctx, &dev);
    if (rc) return rc;
    *id = (unsigned long long)dev + 1;
    kc_unlock();
    return CUDA_SUCCESS;
}

/* Flags (CU_CTX_SCHED_*, MAP_HOST...) are kept and reported, not acted on: the executor
 * schedules, and host memory is always mappable. */
KC_EXPORT CUresult cuCtxGetFlags(unsigned int *flags) {
    if (!flags) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    *flags = primary[dev].flags;
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active) {
    if (!flags || !active) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    *flags = primary[dev].flags;
    *active = primary[dev].refs > 0;
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags) {
    if (flags & ~0xffu) return CUDA_ERROR_INVALID_VALUE;   /* CU_CTX_FLAGS_MASK */
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    primary[dev].flags = flags;
    kc_unlock();
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuCtxSynchronize_v2(CUcontext ctx) {
    if (kc_captures_active()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;   /* as in a capture's global mode */
    kc_hostfn_wait(-1, 0);           /* host functions are work of the context too */
    int dev;
    CUresult rc = lock_ctx(ctx, &dev);
    if (rc) return rc;
    struct mp_val r;
    rc = kc_exec_request(dev, KCP_EXECUTOR_CTX_SYNC, NULL, 0, &r);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuCtxSynchronize(void) {
    if (kc_captures_active()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;   /* as in a capture's global mode */
    kc_hostfn_wait(-1, 0);           /* host functions are work of the context too */
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    struct mp_val r;
    rc = kc_exec_request(dev, KCP_EXECUTOR_CTX_SYNC, NULL, 0, &r);
    kc_unlock();
    return rc;
}

/* ---- memory ---- */
static int uint_of(const struct mp_val *m, const char *key, uint64_t *out) {
    struct mp_val v;
    if (mp_find(m, key, &v) != 1 || v.type != MP_UINT) return -1;
    *out = v.v.u;
    return 0;
}

/* Live allocations, per device, so that a primary context's reset frees them as the driver
 * does (cudaDeviceReset). Changed with the session lock held. */
struct alloc { int dev; CUdeviceptr p; void *ctx; };      /* ctx: current when it was made */
static struct alloc *allocs;
static size_t nallocs, capallocs;

static void track(int dev, CUdeviceptr p) {
    if (nallocs == capallocs) {
        size_t cap = capallocs ? 2 * capallocs : 64;
        struct alloc *a = realloc(allocs, cap * sizeof *a);
        if (!a) return;           /* untracked: still freed by cuMemFree, only not by a reset */
        allocs = a;
        capallocs = cap;
    }
    allocs[nallocs++] = (struct alloc){dev, p, get_current()};
}

static void untrack(CUdeviceptr p) {
    for (size_t i = 0; i < nallocs; i++)
        if (allocs[i].p == p) { allocs[i] = allocs[--nallocs]; return; }
}

static CUresult mem_free(int dev, CUdeviceptr dptr) {            /* lock held */
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_MEM_FREE_PTR); mp_uint(&b, dptr);
    struct mp_val r;
    CUresult rc = kc_exec_request(dev, KCP_EXECUTOR_MEM_FREE, &b, 1, &r);
    mp_free(&b);
    if (!rc) { untrack(dptr); kc_alloc_forget(dptr); }   /* reset's list; cuMemcpy's ranges */
    return rc;
}

KC_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    if (!dptr || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    uint64_t p;
    rc = kc_exec_alloc(dev, bytesize, &p);      /* over quota: the executor's OOM; noted for cuMemcpy */
    if (!rc) { *dptr = p; track(dev, p); }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    if (dptr == 0) return CUDA_SUCCESS;            /* as the driver: freeing NULL is a no-op */
    kc_hostfn_wait(-1, 0);           /* cuMemFree synchronizes: queued host functions first */
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    rc = mem_free(dev, dptr);
    kc_unlock();
    return rc;
}

/* cudaDeviceReset: what was queued finishes, the runtime's per-context state is destroyed
 * (its destructor, registered through the context-local-storage table, runs without the
 * session lock: it calls back into the driver), then every allocation made on the device
 * is freed. The handle stays valid (the next use starts afresh) and keeps its retains. */
KC_EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev) {
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    kc_unlock();
    kc_context_reset(&primary[dev]);
    if ((rc = lock_device(dev))) return rc;
    struct mp_val r;
    if (kc_device(dev)->attached) rc = kc_exec_request(dev, KCP_EXECUTOR_CTX_SYNC, NULL, 0, &r);
    for (size_t i = nallocs; !rc && i-- > 0;)
        if (allocs[i].dev == dev) rc = mem_free(dev, allocs[i].p);
    primary[dev].flags = 0;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuDevicePrimaryCtxReset(CUdevice dev) { return cuDevicePrimaryCtxReset_v2(dev); }

/* cuCtxCreate: a context of the device's session, made current (pushed) for this thread. */
static CUresult ctx_create(CUcontext *pctx, unsigned flags, CUdevice dev) {
    if (!pctx || flags > 0xFF) return CUDA_ERROR_INVALID_VALUE;   /* CU_CTX_SCHED_* .. CU_CTX_SYNC_MEMOPS */
    CUresult rc = lock_device(dev);
    if (rc) return rc;
    struct kc_ctx *c = NULL;
    for (int i = 0; i < KC_MAX_CREATED && !c; i++)
        if (!created[i].created) c = &created[i];
    struct ctx_stack *s = stack(1);
    if (!c || !s || s->n == CTX_STACK) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else if (!(rc = kc_device_attach(dev))) {
        *c = (struct kc_ctx){.device = dev, .refs = 1, .flags = flags, .created = 1};
        s->c[s->n++] = c;
        *pctx = c;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    return ctx_create(pctx, flags, dev);
}

KC_EXPORT CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    return ctx_create(pctx, flags, dev);
}

/* Execution affinity (SM counts, green contexts' business) cannot be honoured: refused by name. */
KC_EXPORT CUresult cuCtxCreate_v3(CUcontext *pctx, void *paramsArray, int numParams, unsigned int flags,
                                  CUdevice dev) {
    if (numParams < 0 || (numParams && !paramsArray)) return CUDA_ERROR_INVALID_VALUE;
    if (numParams) {
        kc_log("kubecash: cuCtxCreate_v3: execution affinity parameters are not supported");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    return ctx_create(pctx, flags, dev);
}

struct ctx_create_params { void *exec_affinity; int n_exec_affinity; void *cig; };   /* CUctxCreateParams */

KC_EXPORT CUresult cuCtxCreate_v4(CUcontext *pctx, const struct ctx_create_params *params, unsigned int flags,
                                  CUdevice dev) {
    if (params && (params->n_exec_affinity || params->cig)) {
        kc_log("kubecash: cuCtxCreate_v4: execution affinity and CIG (graphics interop) parameters are not supported");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    return ctx_create(pctx, flags, dev);
}

/* cuCtxDestroy: what was queued finishes; the runtime's per-context state, then the context's
 * allocations, streams, events and modules go; it leaves this thread's stack. A primary
 * context is released, not destroyed. */
KC_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    int ok = ctx && is_ctx(ctx) && ctx->created;
    kc_unlock();
    if (!ok) return CUDA_ERROR_INVALID_CONTEXT;
    kc_context_reset(ctx);
    if ((rc = kc_lock(0))) return rc;
    if (!is_ctx(ctx) || !ctx->created) {            /* destroyed meanwhile by another thread */
        kc_unlock();
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    int dev = ctx->device;
    struct mp_val r;
    rc = kc_exec_request(dev, KCP_EXECUTOR_CTX_SYNC, NULL, 0, &r);
    for (size_t i = nallocs; i-- > 0;)
        if (allocs[i].ctx == ctx) {
            CUresult e = mem_free(dev, allocs[i].p);
            if (!rc) rc = e;
        }
    for (size_t i = 0; i < nallocs; i++)
        if (allocs[i].ctx == ctx) allocs[i].ctx = NULL;    /* could not be freed: the session's now */
    kc_ctx_objects_free(ctx);
    struct ctx_stack *s = stack(0);
    for (int i = 0, j = 0; s && i <= s->n; i++) {      /* out of this thread's stack, order kept */
        if (i == s->n) { s->n = j; break; }
        if (s->c[i] != ctx) s->c[j++] = s->c[i];
    }
    *ctx = (struct kc_ctx){0};
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuCtxDestroy(CUcontext ctx) { return cuCtxDestroy_v2(ctx); }

KC_EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    struct mp_val r;
    uint64_t f, t;
    rc = kc_exec_request(dev, KCP_EXECUTOR_MEM_INFO, NULL, 0, &r);
    if (!rc && (uint_of(&r, KCP_EXECUTOR_MEM_INFO_R_FREE, &f) || uint_of(&r, KCP_EXECUTOR_MEM_INFO_R_TOTAL, &t)))
        rc = CUDA_ERROR_UNKNOWN;
    if (!rc) { *free_bytes = (size_t)f; *total = (size_t)t; }
    kc_unlock();
    return rc;
}

/* Copies, as client/device.py's write/read: inline pieces of KCP_INLINE_MAX, or through the
 * staging segment when the executor gave one (one chunk at a time, staging-sized). One
 * function for both directions: to_device says which. On a stream with `async`, inline
 * host-to-device pieces are queued without waiting (their bytes travel in the message). */
CUresult kc_copy(int dev, int to_device, uint64_t stream, int async, uint64_t dptr, void *host, size_t n) {
    if (n && !host) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_device_attach(dev);
    struct kc_device *d = kc_device(dev);
    /* A CPU device's own memory, mapped: once the stream is idle, one memcpy on this CPU
     * (client/device.py's _direct). A small async copy stays queued, in stream order. */
    uint8_t *direct = rc || !n || (async && n <= KCP_INLINE_MAX) ? NULL : kc_arena_at(dev, dptr, n);
    if (direct) {
        struct kc_buf b = {0};
        struct mp_val r;
        mp_str(&b, KCP_EXECUTOR_STREAM_SYNC_STREAM); mp_uint(&b, stream);
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, KCP_EXECUTOR_STREAM_SYNC, &b, 1, &r);
        mp_free(&b);
        if (!rc) memcpy(to_device ? (void *)direct : host, to_device ? host : (void *)direct, n);
        return rc;
    }
    int staged = n > KCP_INLINE_MAX && d->staging;
    size_t piece = staged ? d->staging_size : KCP_INLINE_MAX;
    for (size_t off = 0; !rc && off < n; off += piece) {
        size_t m = n - off < piece ? n - off : piece;
        char *h = (char *)host + off;
        struct kc_buf b = {0};
        mp_str(&b, to_device ? KCP_EXECUTOR_MEMCPY_HTOD_DST : KCP_EXECUTOR_MEMCPY_DTOH_SRC);
        mp_uint(&b, dptr + off);
        mp_str(&b, to_device ? KCP_EXECUTOR_MEMCPY_HTOD_SIZE : KCP_EXECUTOR_MEMCPY_DTOH_SIZE);
        mp_uint(&b, m);
        mp_str(&b, to_device ? KCP_EXECUTOR_MEMCPY_HTOD_STREAM : KCP_EXECUTOR_MEMCPY_DTOH_STREAM);
        mp_uint(&b, stream);
        if (staged) {
            if (to_device) memcpy(d->staging, h, m);
            mp_str(&b, to_device ? KCP_EXECUTOR_MEMCPY_HTOD_OFFSET : KCP_EXECUTOR_MEMCPY_DTOH_OFFSET);
            mp_uint(&b, 0);
        } else if (to_device) {
            mp_str(&b, KCP_EXECUTOR_MEMCPY_HTOD_DATA);
            mp_bin(&b, h, m);
        }
        struct mp_val r, data;
        uint32_t nfields = 3 + (staged || to_device);
        const char *op = to_device ? KCP_EXECUTOR_MEMCPY_HTOD : KCP_EXECUTOR_MEMCPY_DTOH;
        if (b.oom) rc = CUDA_ERROR_OUT_OF_MEMORY;
        else if (async && to_device && !staged) rc = kc_exec_post(dev, op, &b, nfields);  /* staged: must wait */
        else rc = kc_exec_request(dev, op, &b, nfields, &r);
        mp_free(&b);
        if (rc || to_device) continue;
        if (staged) memcpy(h, d->staging, m);
        else if (mp_find(&r, KCP_EXECUTOR_MEMCPY_DTOH_R_DATA, &data) == 1 && data.type == MP_BIN && data.len == m)
            memcpy(h, data.data, m);
        else rc = CUDA_ERROR_UNKNOWN;          /* a reply without the bytes asked for */
    }
    return rc;
}

static CUresult copy(int to_device, CUdeviceptr dptr, void *host, size_t n) {
    kc_hostfn_wait(-1, 0);           /* the legacy default stream: after queued host functions */
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    rc = kc_copy(dev, to_device, 0, 0, dptr, host, n);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    return copy(1, dst, (void *)src, n);
}

KC_EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { return copy(0, src, dst, n); }

/* The per-thread-default-stream flavours (nvcc --default-stream per-thread): a synchronous
 * copy that waits for everything before it waits for the thread's own stream too. */
KC_EXPORT CUresult cuMemcpyHtoD_v2_ptds(CUdeviceptr dst, const void *src, size_t n) {
    return copy(1, dst, (void *)src, n);
}

KC_EXPORT CUresult cuMemcpyDtoH_v2_ptds(void *dst, CUdeviceptr src, size_t n) { return copy(0, src, dst, n); }
