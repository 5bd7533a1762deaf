/* The driver API entry points that run work (native/table.py marks them): modules and
 * libraries, function attributes, launches, streams, events, async copies, memset, pinned
 * host memory. They speak the executor messages client/module.py, client/stream.py and
 * client/device.py send, with the same fields.
 *
 * Handles (CUmodule, CUfunction, CUkernel, CUlibrary, CUstream, CUevent) are not pointers
 * but tagged indices into one table of this library's objects: a program's stale or
 * garbage handle is looked up, never dereferenced, and answers INVALID_HANDLE. Each object
 * remembers the session it was made in (kc_session_epoch): a forked child's new session
 * does not take its parent's handles.
 *
 * Launches, async copies, memsets, event records and stream waits are posted without
 * waiting (kc_exec_post): their errors come back from the next synchronizing call, as the
 * executor keeps them, like CUDA's asynchronous errors. Everything runs under the session
 * lock (kc_lock). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gen_protocol.h"
#include "kc.h"

typedef unsigned long long CUdeviceptr;
typedef void *CUhandle;          /* every opaque handle type: CUmodule, CUfunction, CUstream... */

#define STREAM_LEGACY ((CUhandle)0x1)       /* CU_STREAM_LEGACY */
#define STREAM_PER_THREAD ((CUhandle)0x2)   /* CU_STREAM_PER_THREAD */
#define EVENT_DISABLE_TIMING 0x2
#define MAX_IMAGE (32u << 20)               /* the protocol's MODULE_IMAGE_MAX */
#define MAX_PARAMS 4096                     /* LAUNCH.max_kernel_params */
#define FATBIN_MAGIC 0xBA55ED50u
#define FATBIN_WRAPPER_MAGIC 0x466243b1u    /* cudart's __fatBinC_Wrapper_t */

/* CU_DEVICE_ATTRIBUTE_ numbers used for function attributes */
enum { DA_MAX_THREADS = 1, DA_SHARED_PER_BLOCK = 8, DA_CC_MAJOR = 75, DA_CC_MINOR = 76, DA_SHARED_OPTIN = 97 };
KC_EXPORT CUresult cuDeviceGetAttribute(int *pi, int attrib, int dev);
KC_EXPORT CUresult cuDeviceGetCount(int *count);

/* ---- the handle table ---- */
enum kind { K_MODULE = 1, K_FUNCTION, K_STREAM, K_EVENT, K_LIBRARY };
struct obj {
    enum kind kind;
    int dev;
    unsigned epoch;
    uint32_t gen;
    uint64_t h;                  /* the executor's handle (library: its module's CUmodule) */
    uint32_t module;             /* function: its module's index */
    uint32_t nparams;
    uint32_t *sizes;             /* function: each parameter's bytes (get_function's param_sizes) */
    unsigned flags;
    int max_dyn_shared, carveout;    /* function attributes set by the program */
    void *capture;               /* stream: the graph its capture records into (cuda_graph.c) */
    void *ctx;                   /* the context current when it was made (cuCtxDestroy frees it) */
    char *name;                  /* function: its name (to find it in the library on another device) */
    uint32_t library;            /* module: the library it was loaded for (index + 1), or 0 */
    uint32_t mods[KC_MAX_DEVICES];   /* library: its module on each device (index + 1), loaded on use */
    uint8_t *image; size_t image_n;  /* library: its image, kept to load it on other devices */
};
static struct obj **objs;
static uint32_t nobjs, capobjs;
static uint32_t next_gen = 1;

/* A handle: generation (32 bits) | index + 1 (28 bits) | kind (4 bits). Never 0, 1 or 2
 * (the default-stream handles). */
static CUhandle handle_of(uint32_t idx) {
    struct obj *o = objs[idx];
    return (CUhandle)(uintptr_t)(((uint64_t)o->gen << 32) | ((uint64_t)(idx + 1) << 4) | (uint64_t)o->kind);
}

static struct obj *lookup(CUhandle hv, enum kind kind, uint32_t *idx_out) {
    uint64_t v = (uint64_t)(uintptr_t)hv;
    uint32_t idx = (uint32_t)((v >> 4) & 0xFFFFFFF) - 1;
    if ((v & 0xF) != (uint64_t)kind || idx >= nobjs || !objs[idx]) return NULL;
    struct obj *o = objs[idx];
    if (o->kind != kind || o->gen != (uint32_t)(v >> 32) || o->epoch != kc_session_epoch()) return NULL;
    if (idx_out) *idx_out = idx;
    return o;
}

static int new_obj(enum kind kind, int dev, uint64_t h, uint32_t *idx_out) {
    uint32_t idx = 0;
    while (idx < nobjs && objs[idx]) idx++;
    if (idx == nobjs) {
        if (nobjs >= 0xFFFFFF0) return -1;
        if (nobjs == capobjs) {
            uint32_t cap = capobjs ? capobjs * 2 : 64;
            struct obj **p = realloc(objs, cap * sizeof *p);
            if (!p) return -1;
            objs = p;
            capobjs = cap;
        }
        objs[nobjs++] = NULL;
    }
    struct obj *o = calloc(1, sizeof *o);
    if (!o) return -1;
    o->kind = kind;
    o->dev = dev;
    o->ctx = kc_current_ctx();
    o->h = h;
    o->epoch = kc_session_epoch();
    o->gen = next_gen++;                 /* a freed slot's old handles no longer match */
    o->carveout = -1;
    objs[idx] = o;
    *idx_out = idx;
    return 0;
}

static void drop_obj(uint32_t idx) {
    free(objs[idx]->sizes);
    free(objs[idx]->name);
    free(objs[idx]->image);
    free(objs[idx]);
    objs[idx] = NULL;
}

/* ---- locking: the session plus the device a call works on ---- */
static CUresult lock_current(int *dev) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    *dev = kc_current_device();
    if (*dev < 0) { kc_unlock(); return CUDA_ERROR_INVALID_CONTEXT; }
    return CUDA_SUCCESS;
}

/* A stream argument (lock held): the default streams (0, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
 * all are the executor's default stream 0, on the current context's device) or one of ours. */
static CUresult resolve_stream(CUhandle s, int *dev, uint64_t *h) {
    if (s == NULL || s == STREAM_LEGACY || s == STREAM_PER_THREAD) {
        *dev = kc_current_device();
        *h = 0;
        return *dev < 0 ? CUDA_ERROR_INVALID_CONTEXT : CUDA_SUCCESS;
    }
    struct obj *o = lookup(s, K_STREAM, NULL);
    if (!o) return CUDA_ERROR_INVALID_HANDLE;
    *dev = o->dev;
    *h = o->h;
    return CUDA_SUCCESS;
}

CUresult kc_resolve_stream(void *s, int *dev, uint64_t *h) { return resolve_stream(s, dev, h); }

/* The capture a stream records into (lock held): NULL for the default streams (they cannot
 * capture) and streams not capturing. */
void *kc_capture_of(void *s) {
    if (s == NULL || s == STREAM_LEGACY || s == STREAM_PER_THREAD) return NULL;
    struct obj *o = lookup(s, K_STREAM, NULL);
    return o ? o->capture : NULL;
}

CUresult kc_capture_swap(void *s, void *capture, void **old) {
    if (s == NULL || s == STREAM_LEGACY) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (s == STREAM_PER_THREAD) {
        static int once;
        kc_unsupported_once("stream capture on the per-thread default stream", &once);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct obj *o = lookup(s, K_STREAM, NULL);
    if (!o) rc = CUDA_ERROR_INVALID_HANDLE;
    else { *old = o->capture; o->capture = capture; }
    kc_unlock();
    return rc;
}

/* Work on a stream waits (unlocked) for the host functions queued on it to have run: the
 * executor cannot hold a stream for the program, so later work is sent only after them. */
static CUresult lock_stream(CUhandle s, int *dev, uint64_t *h) {
    for (;;) {
        CUresult rc = kc_lock(0);
        if (rc) return rc;
        rc = resolve_stream(s, dev, h);
        if (rc || !kc_hostfn_pending(*dev, *h)) {
            if (rc) kc_unlock();
            return rc;
        }
        kc_unlock();
        kc_hostfn_wait(*dev, *h);
    }
}

int kc_uint_of(const struct mp_val *m, const char *key, uint64_t *out) {
    struct mp_val v;
    if (mp_find(m, key, &v) != 1 || v.type != MP_UINT) return -1;
    *out = v.v.u;
    return 0;
}

/* One request with one handle field (the common shape): reply in *r. */
CUresult kc_request1(int dev, const char *op, const char *key, uint64_t v, struct mp_val *r) {
    struct kc_buf b = {0};
    mp_str(&b, key); mp_uint(&b, v);
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, op, &b, 1, r);
    mp_free(&b);
    return rc;
}

/* ---- allocations of this session: which addresses are device memory (cuMemcpy) ---- */
struct range { uint64_t base, size; int dev; uint32_t module; };   /* module: 0, or index + 1 */
static struct range *ranges;
static size_t nranges, capranges;
static unsigned ranges_epoch;

static void ranges_fresh(void) {
    if (ranges_epoch != kc_session_epoch()) { nranges = 0; ranges_epoch = kc_session_epoch(); }
}

static void range_add(int dev, uint64_t p, size_t n, uint32_t module) {
    ranges_fresh();
    for (size_t i = 0; i < nranges; i++)
        if (ranges[i].base == p) { ranges[i].size = n; ranges[i].dev = dev; return; }
    if (nranges == capranges) {
        size_t cap = capranges ? capranges * 2 : 64;
        struct range *q = realloc(ranges, cap * sizeof *q);
        if (!q) return;                 /* then cuMemcpy sees it as host memory: best effort */
        ranges = q;
        capranges = cap;
    }
    size_t i = nranges++;
    while (i > 0 && ranges[i - 1].base > p) { ranges[i] = ranges[i - 1]; i--; }   /* kept sorted */
    ranges[i] = (struct range){p, n, dev, module};
}

void kc_alloc_note(int dev, uint64_t p, size_t n) { range_add(dev, p, n, 0); }

void kc_alloc_forget(uint64_t p) {
    kc_unguard(p);
    ranges_fresh();
    for (size_t i = 0; i < nranges; i++)
        if (ranges[i].base == p) {
            memmove(&ranges[i], &ranges[i + 1], (nranges - i - 1) * sizeof *ranges);
            nranges--;
            return;
        }
}

uint8_t *kc_arena_at(int dev, uint64_t p, size_t n) {
    const struct kc_device *d = kc_device(dev);
    ranges_fresh();
    if (!d->arena || p < d->arena_base || p - d->arena_base > d->arena_size ||
        n > d->arena_size - (p - d->arena_base))
        return NULL;
    size_t lo = 0, hi = nranges;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ranges[mid].base <= p) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return NULL;
    const struct range *r = &ranges[lo - 1];    /* an allocation (not a module global) of dev */
    if (r->module || r->dev != dev || p - r->base > r->size || n > r->size - (p - r->base)) return NULL;
    return d->arena + (p - d->arena_base);
}

static void ranges_forget_module(uint32_t module_idx) {
    size_t k = 0;
    for (size_t i = 0; i < nranges; i++)
        if (ranges[i].module != module_idx + 1) ranges[k++] = ranges[i];
    nranges = k;
}

/* The device whose allocation holds p, or -1 (host memory). */
static int device_of(uint64_t p) {
    ranges_fresh();
    size_t lo = 0, hi = nranges;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ranges[mid].base <= p) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return -1;
    const struct range *r = &ranges[lo - 1];
    return p - r->base < r->size ? r->dev : -1;
}

int kc_device_of(uint64_t p) { return device_of(p); }

/* ---- module images: how long one is, from its own header ---- */
static size_t elf_size(const uint8_t *p) {
    if (p[4] != 2) return 0;                      /* 64-bit ELF only */
    uint64_t phoff, shoff;
    uint16_t phentsize, phnum, shentsize, shnum;
    memcpy(&phoff, p + 0x20, 8); memcpy(&shoff, p + 0x28, 8);
    memcpy(&phentsize, p + 0x36, 2); memcpy(&phnum, p + 0x38, 2);
    memcpy(&shentsize, p + 0x3A, 2); memcpy(&shnum, p + 0x3C, 2);
    uint64_t size = 64;
    if (phoff + (uint64_t)phentsize * phnum > size) size = phoff + (uint64_t)phentsize * phnum;
    if (shoff + (uint64_t)shentsize * shnum > size) size = shoff + (uint64_t)shentsize * shnum;
    if (size > MAX_IMAGE || shentsize < 0x28) return size > MAX_IMAGE ? 0 : (size_t)size;
    for (uint16_t i = 0; i < shnum; i++) {       /* section contents may lie past the table */
        const uint8_t *sh = p + shoff + (uint64_t)i * shentsize;
        uint32_t type; uint64_t off, sz;
        memcpy(&type, sh + 4, 4); memcpy(&off, sh + 0x18, 8); memcpy(&sz, sh + 0x20, 8);
        if (type != 8 && off + sz > size) size = off + sz;    /* SHT_NOBITS takes no file space */
        if (size > MAX_IMAGE) return 0;
    }
    return (size_t)size;
}

/* The kind and bytes of an image as cuModuleLoadData takes it: a fatbin (or cudart's wrapper
 * around one: {magic, version, data}), an ELF CUBIN, or NUL-terminated PTX. `avail`: how many
 * bytes are known to be there (a file's size; SIZE_MAX for a bare address). */
static CUresult image_of(const void *image, size_t avail, const char **kind, const uint8_t **data, size_t *n) {
    if (!image) return CUDA_ERROR_INVALID_VALUE;
    const uint8_t *p = image;
    uint32_t magic = 0;
    /* no magic has a NUL byte: a shorter string is PTX text, and nothing past its end is read */
    if (strnlen((const char *)p, 4) == 4) memcpy(&magic, p, 4);
    if (magic == FATBIN_WRAPPER_MAGIC) {
        if (avail != SIZE_MAX) return CUDA_ERROR_INVALID_IMAGE;   /* a file holds no pointers */
        memcpy(&p, p + 8, sizeof p);
        if (!p) return CUDA_ERROR_INVALID_IMAGE;
        avail = SIZE_MAX;
        memcpy(&magic, p, 4);
    }
    if (magic == FATBIN_MAGIC) {
        uint16_t hsize; uint64_t fsize;
        memcpy(&hsize, p + 6, 2);
        memcpy(&fsize, p + 8, 8);
        if (hsize < 16 || fsize > MAX_IMAGE) return CUDA_ERROR_INVALID_IMAGE;
        *kind = "fatbin"; *data = p; *n = hsize + (size_t)fsize;
        return *n <= avail ? CUDA_SUCCESS : CUDA_ERROR_INVALID_IMAGE;
    }
    if (magic == 0x464C457Fu) {                  /* "\x7fELF" */
        size_t sz = elf_size(p);
        if (!sz || sz > avail) return CUDA_ERROR_INVALID_IMAGE;
        *kind = "cubin"; *data = p; *n = sz;
        return CUDA_SUCCESS;
    }
    size_t len = strnlen((const char *)p, avail < MAX_IMAGE + 1 ? avail : MAX_IMAGE + 1);
    if (len == 0 || len > MAX_IMAGE) return CUDA_ERROR_INVALID_IMAGE;
    *kind = "ptx"; *data = p; *n = len;
    return CUDA_SUCCESS;
}

/* module_load on device dev (lock held): a new K_MODULE object. */
static CUresult load_module(int dev, const void *image, size_t avail, uint32_t *idx) {
    const char *kind;
    const uint8_t *data;
    size_t n;
    CUresult rc = image_of(image, avail, &kind, &data, &n);
    if (rc) return rc;
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_MODULE_LOAD_KIND); mp_str(&b, kind);
    mp_str(&b, KCP_EXECUTOR_MODULE_LOAD_IMAGE); mp_bin(&b, data, n);
    struct mp_val r;
    uint64_t h;
    rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, KCP_EXECUTOR_MODULE_LOAD, &b, 2, &r);
    mp_free(&b);
    if (!rc && kc_uint_of(&r, KCP_EXECUTOR_MODULE_LOAD_R_MODULE, &h)) rc = CUDA_ERROR_UNKNOWN;
    if (!rc && new_obj(K_MODULE, dev, h, idx)) {
        kc_request1(dev, KCP_EXECUTOR_MODULE_UNLOAD, KCP_EXECUTOR_MODULE_UNLOAD_MODULE, h, &r);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    }
    return rc;
}

static CUresult module_load_here(CUhandle *mod, const void *image, size_t avail) {
    if (!mod) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    uint32_t idx;
    rc = load_module(dev, image, avail, &idx);
    if (!rc) *mod = handle_of(idx);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuModuleLoadData(CUhandle *module, const void *image) { return module_load_here(module, image, SIZE_MAX); }

KC_EXPORT CUresult cuModuleLoadFatBinary(CUhandle *module, const void *fatCubin) {
    return module_load_here(module, fatCubin, SIZE_MAX);
}

/* JIT options are for NVIDIA's compiler; the executor builds the module its own way. The log
 * buffers the program hands in are left empty strings, so printing them is safe. */
static void empty_jit_logs(unsigned n, const int *options, void **values) {
    if (!options || !values) return;
    for (unsigned i = 0; i < n; i++) {
        if (options[i] != 3 && options[i] != 5) continue;    /* CU_JIT_INFO/ERROR_LOG_BUFFER */
        for (unsigned j = 0; j < n; j++)                     /* ..._SIZE_BYTES, the next number */
            if (options[j] == options[i] + 1 && values[i] && (uintptr_t)values[j] > 0)
                ((char *)values[i])[0] = 0;
    }
}

KC_EXPORT CUresult cuModuleLoadDataEx(CUhandle *module, const void *image, unsigned int numOptions,
                                      int *options, void **optionValues) {
    empty_jit_logs(numOptions, options, optionValues);
    return module_load_here(module, image, SIZE_MAX);
}

/* A file's bytes, NUL-padded (PTX text ends at a NUL; headers read past a tiny file read
 * zeros), in *buf (the caller frees it). */
#define FILE_PAD 64
static CUresult read_file(const char *fname, char **buf, size_t *n) {
    *buf = NULL;
    int fd = open(fname, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return CUDA_ERROR_FILE_NOT_FOUND;
    struct stat st;
    CUresult rc = CUDA_ERROR_INVALID_IMAGE;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 && (uint64_t)st.st_size <= MAX_IMAGE &&
        (*buf = calloc(1, (size_t)st.st_size + FILE_PAD))) {
        size_t got = 0;
        ssize_t k;
        while (got < (size_t)st.st_size && (k = read(fd, *buf + got, (size_t)st.st_size - got)) > 0) got += (size_t)k;
        *n = got;
        rc = got == (size_t)st.st_size ? CUDA_SUCCESS : CUDA_ERROR_INVALID_IMAGE;
    }
    close(fd);
    return rc;
}

/* A module or library from a file: `load` is module_load_here or load_library. */
static CUresult from_file(const char *fname, CUresult (*load)(CUhandle *, const void *, size_t), CUhandle *out) {
    if (!out || !fname) return CUDA_ERROR_INVALID_VALUE;
    char *buf;
    size_t n;
    CUresult rc = read_file(fname, &buf, &n);
    if (!rc) rc = load(out, buf, n);
    free(buf);
    return rc;
}

KC_EXPORT CUresult cuModuleLoad(CUhandle *module, const char *fname) { return from_file(fname, module_load_here, module); }

/* module_unload (lock held): the module's functions and globals go with it. */
static CUresult unload_module(uint32_t idx) {
    struct obj *m = objs[idx];
    struct mp_val r;
    CUresult rc = kc_request1(m->dev, KCP_EXECUTOR_MODULE_UNLOAD, KCP_EXECUTOR_MODULE_UNLOAD_MODULE, m->h, &r);
    if (rc == CUDA_ERROR_INVALID_HANDLE || rc == CUDA_SUCCESS) {   /* gone there either way */
        for (uint32_t i = 0; i < nobjs; i++)
            if (objs[i] && objs[i]->kind == K_FUNCTION && objs[i]->module == idx) drop_obj(i);
        ranges_forget_module(idx);
        drop_obj(idx);
    }
    return rc;
}

KC_EXPORT CUresult cuModuleUnload(CUhandle hmod) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t idx;
    rc = lookup(hmod, K_MODULE, &idx) ? unload_module(idx) : CUDA_ERROR_INVALID_HANDLE;
    kc_unlock();
    return rc;
}

/* A destroyed context's streams, events and modules (a library's modules are the library's:
 * libraries belong to no context). */
void kc_ctx_objects_free(void *ctx) {
    struct mp_val r;
    for (uint32_t i = 0; i < nobjs; i++) {
        struct obj *o = objs[i];
        if (!o || o->ctx != ctx) continue;
        if (o->kind == K_MODULE && !o->library) unload_module(i);
        else if (o->kind == K_STREAM || o->kind == K_EVENT) {
            if (o->kind == K_STREAM) kc_request1(o->dev, KCP_EXECUTOR_STREAM_DESTROY, KCP_EXECUTOR_STREAM_DESTROY_STREAM,
                                                 o->h, &r);
            else kc_request1(o->dev, KCP_EXECUTOR_EVENT_DESTROY, KCP_EXECUTOR_EVENT_DESTROY_EVENT, o->h, &r);
            drop_obj(i);
        }
    }
}

/* get_function (lock held): one object per kernel, as the executor keeps one handle per
 * (module, name), with its parameter sizes for packing kernelParams. */
static CUresult get_function(uint32_t midx, const char *name, uint32_t *fidx) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    struct obj *m = objs[midx];
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_GET_FUNCTION_MODULE); mp_uint(&b, m->h);
    mp_str(&b, KCP_EXECUTOR_GET_FUNCTION_NAME); mp_str(&b, name);
    struct mp_val r, sizes, e;
    uint64_t h;
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(m->dev, KCP_EXECUTOR_GET_FUNCTION, &b, 2, &r);
    mp_free(&b);
    if (rc) return rc;
    if (kc_uint_of(&r, KCP_EXECUTOR_GET_FUNCTION_R_FUNCTION, &h) ||
        mp_find(&r, KCP_EXECUTOR_GET_FUNCTION_R_PARAM_SIZES, &sizes) != 1 || sizes.type != MP_ARRAY ||
        sizes.len > MAX_PARAMS)
        return CUDA_ERROR_UNKNOWN;
    for (uint32_t i = 0; i < nobjs; i++)
        if (objs[i] && objs[i]->kind == K_FUNCTION && objs[i]->module == midx && objs[i]->h == h) {
            *fidx = i;
            return CUDA_SUCCESS;
        }
    uint32_t *sz = calloc(sizes.len ? sizes.len : 1, sizeof *sz);
    if (!sz) return CUDA_ERROR_OUT_OF_MEMORY;
    for (uint32_t i = 0; i < sizes.len; i++) {
        int64_t v;
        if (mp_index(&sizes, i, &e) != 1 || mp_as_int(&e, &v) || v < 0 || v > 1 << 20) { free(sz); return CUDA_ERROR_UNKNOWN; }
        sz[i] = (uint32_t)v;
    }
    char *fname = strdup(name);
    if (!fname || new_obj(K_FUNCTION, m->dev, h, fidx)) { free(sz); free(fname); return CUDA_ERROR_OUT_OF_MEMORY; }
    struct obj *f = objs[*fidx];
    f->name = fname;
    f->module = midx;
    f->nparams = sizes.len;
    f->sizes = sz;
    return CUDA_SUCCESS;
}

static CUresult get_global(uint32_t midx, const char *name, CUdeviceptr *dptr, size_t *bytes) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    struct obj *m = objs[midx];
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_GET_GLOBAL_MODULE); mp_uint(&b, m->h);
    mp_str(&b, KCP_EXECUTOR_GET_GLOBAL_NAME); mp_str(&b, name);
    struct mp_val r;
    uint64_t p, n;
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(m->dev, KCP_EXECUTOR_GET_GLOBAL, &b, 2, &r);
    mp_free(&b);
    if (!rc && (kc_uint_of(&r, KCP_EXECUTOR_GET_GLOBAL_R_PTR, &p) || kc_uint_of(&r, KCP_EXECUTOR_GET_GLOBAL_R_SIZE, &n)))
        rc = CUDA_ERROR_UNKNOWN;
    if (rc) return rc;
    if (n) range_add(m->dev, p, (size_t)n, midx + 1);     /* device memory, for cuMemcpy */
    if (dptr) *dptr = p;
    if (bytes) *bytes = (size_t)n;
    return CUDA_SUCCESS;
}

/* ---- libraries (CUDA 12+; cudart loads its fatbins this way, lazily): a library is a
 * module per device, loaded on the current context's device (device 0 when none is current)
 * and on another device when it is first used there (its image is kept for that); a CUkernel
 * is the CUfunction of the device it was got on, and a launch on another device finds the
 * same kernel there (function_on). ---- */

/* Library lidx's module on device dev (lock held) in *midx, loaded there now if it is not
 * yet; INVALID_HANDLE once the program unloaded the module it had there. */
static CUresult library_on(uint32_t lidx, int dev, uint32_t *midx) {
    struct obj *l = lidx < nobjs ? objs[lidx] : NULL;
    if (!l || l->kind != K_LIBRARY || dev < 0 || dev >= KC_MAX_DEVICES || !kc_device(dev))
        return CUDA_ERROR_INVALID_HANDLE;
    uint32_t k = l->mods[dev];
    if (k) {
        struct obj *m = k - 1 < nobjs ? objs[k - 1] : NULL;
        if (!m || m->kind != K_MODULE || m->library != lidx + 1) return CUDA_ERROR_INVALID_HANDLE;
        *midx = k - 1;
        return CUDA_SUCCESS;
    }
    if (!l->image) return CUDA_ERROR_INVALID_HANDLE;      /* one device: never elsewhere */
    CUresult rc = load_module(dev, l->image, l->image_n, midx);
    if (rc) return rc;
    objs[*midx]->library = lidx + 1;
    l->mods[dev] = *midx + 1;
    return CUDA_SUCCESS;
}

static CUresult load_library(CUhandle *lib, const void *code, size_t avail) {
    if (!lib) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    int dev = kc_current_device();
    if (dev < 0) dev = 0;
    const char *kind;
    const uint8_t *data;
    size_t n = 0;
    uint32_t lidx, midx;
    uint8_t *copy = NULL;
    rc = kc_device(dev) ? image_of(code, avail, &kind, &data, &n) : CUDA_ERROR_NO_DEVICE;
    /* The image is kept only where another device may load it later (cudart's fatbins,
     * PyTorch's included, can be hundreds of MiB): with one device it loads from `code`. */
    int keep = kc_device_count() > 1;
    if (!rc && keep && !(copy = malloc(n + 1))) rc = CUDA_ERROR_OUT_OF_MEMORY;
    if (copy) {
        memcpy(copy, data, n);
        copy[n] = 0;                     /* PTX text ends at a NUL */
    }
    if (!rc && new_obj(K_LIBRARY, dev, 0, &lidx)) { free(copy); rc = CUDA_ERROR_OUT_OF_MEMORY; }
    if (!rc) {
        objs[lidx]->image = copy;
        objs[lidx]->image_n = n + 1;
        rc = keep ? library_on(lidx, dev, &midx) : load_module(dev, code, avail, &midx);
        if (!rc && !keep) {
            objs[midx]->library = lidx + 1;
            objs[lidx]->mods[dev] = midx + 1;
        }
        if (rc) drop_obj(lidx);
        else *lib = handle_of(lidx);
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuLibraryLoadData(CUhandle *library, const void *code, int *jitOptions, void **jitOptionsValues,
                                     unsigned int numJitOptions, int *libraryOptions, void **libraryOptionValues,
                                     unsigned int numLibraryOptions) {
    empty_jit_logs(numJitOptions, jitOptions, jitOptionsValues);
    return load_library(library, code, SIZE_MAX);
}

KC_EXPORT CUresult cuLibraryLoadFromFile(CUhandle *library, const char *fileName, int *jitOptions,
                                         void **jitOptionsValues, unsigned int numJitOptions, int *libraryOptions,
                                         void **libraryOptionValues, unsigned int numLibraryOptions) {
    empty_jit_logs(numJitOptions, jitOptions, jitOptionsValues);
    return from_file(fileName, load_library, library);
}

/* The library's module on the current context's device (lock held), or NULL. */
static struct obj *library_module(CUhandle library, uint32_t *midx) {
    uint32_t lidx;
    struct obj *l = lookup(library, K_LIBRARY, &lidx);
    int dev = kc_current_device();
    return l && !library_on(lidx, dev < 0 ? l->dev : dev, midx) ? objs[*midx] : NULL;
}

/* f as a function of device dev (lock held): itself, or for a library's kernel the same
 * kernel of that library on dev; NULL when there is none. */
static struct obj *function_on(struct obj *f, int dev, uint32_t *fidx) {
    uint32_t midx;
    struct obj *m = f ? objs[f->module] : NULL;
    if (!f || f->dev == dev) return f;
    if (!m || !m->library || !f->name || library_on(m->library - 1, dev, &midx) ||
        get_function(midx, f->name, fidx))
        return NULL;
    return objs[*fidx];
}

KC_EXPORT CUresult cuLibraryUnload(CUhandle library) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t lidx, midx;
    struct obj *l = lookup(library, K_LIBRARY, &lidx);
    if (!l) rc = CUDA_ERROR_INVALID_HANDLE;
    else {
        for (int d = 0; d < KC_MAX_DEVICES; d++)      /* only what it has: none is loaded now */
            if (l->mods[d] && !library_on(lidx, d, &midx)) {
                CUresult r = unload_module(midx);
                if (!rc) rc = r;
            }
        drop_obj(lidx);
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuLibraryGetModule(CUhandle *pMod, CUhandle library) {
    if (!pMod) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t midx;
    if (library_module(library, &midx)) *pMod = handle_of(midx);
    else rc = CUDA_ERROR_INVALID_HANDLE;
    kc_unlock();
    return rc;
}

/* A function or global of a module (library 0) or a library's module (library 1). */
static int module_index(CUhandle h, int library, uint32_t *midx) {
    return library ? library_module(h, midx) != NULL : lookup(h, K_MODULE, midx) != NULL;
}

static CUresult function_in(CUhandle h, int library, const char *name, CUhandle *out) {
    if (!out || !name) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t midx, fidx;
    rc = module_index(h, library, &midx) ? get_function(midx, name, &fidx) : CUDA_ERROR_INVALID_HANDLE;
    if (!rc) *out = handle_of(fidx);
    kc_unlock();
    return rc;
}

static CUresult global_in(CUhandle h, int library, const char *name, CUdeviceptr *dptr, size_t *bytes) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t midx;
    rc = module_index(h, library, &midx) ? get_global(midx, name, dptr, bytes) : CUDA_ERROR_INVALID_HANDLE;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuModuleGetFunction(CUhandle *hfunc, CUhandle hmod, const char *name) {
    return function_in(hmod, 0, name, hfunc);
}

KC_EXPORT CUresult cuLibraryGetKernel(CUhandle *pKernel, CUhandle library, const char *name) {
    return function_in(library, 1, name, pKernel);
}

KC_EXPORT CUresult cuModuleGetGlobal_v2(CUdeviceptr *dptr, size_t *bytes, CUhandle hmod, const char *name) {
    return global_in(hmod, 0, name, dptr, bytes);
}

KC_EXPORT CUresult cuLibraryGetGlobal(CUdeviceptr *dptr, size_t *bytes, CUhandle library, const char *name) {
    return global_in(library, 1, name, dptr, bytes);
}

KC_EXPORT CUresult cuKernelGetFunction(CUhandle *pFunc, CUhandle kernel) {
    if (!pFunc) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t fidx = 0;
    struct obj *f = lookup(kernel, K_FUNCTION, &fidx);
    int dev = kc_current_device();
    if (f && dev >= 0) f = function_on(f, dev, &fidx);     /* the current context's */
    if (f) *pFunc = handle_of(fidx);
    else rc = CUDA_ERROR_INVALID_HANDLE;
    kc_unlock();
    return rc;
}

/* ---- function attributes: answered here. The executor reports no static resource use
 * (shared, constant, local bytes, registers: a CPU device has no register file), so those
 * read 0; limits come from the device's attributes; what the program set reads back. ---- */
enum {
    FA_MAX_THREADS = 0, FA_SHARED = 1, FA_CONST = 2, FA_LOCAL = 3, FA_REGS = 4, FA_PTX_VERSION = 5,
    FA_BINARY_VERSION = 6, FA_CACHE_MODE_CA = 7, FA_MAX_DYN_SHARED = 8, FA_CARVEOUT = 9,
    FA_LAST = 15,           /* CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE */
};

static CUresult func_state(CUhandle hfunc, int *dev, int *dyn, int *carveout) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct obj *f = lookup(hfunc, K_FUNCTION, NULL);
    if (f) { *dev = f->dev; *dyn = f->max_dyn_shared; *carveout = f->carveout; }
    kc_unlock();
    return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

KC_EXPORT CUresult cuFuncGetAttribute(int *pi, int attrib, CUhandle hfunc) {
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    int dev, dyn, carveout, major, minor;
    CUresult rc = func_state(hfunc, &dev, &dyn, &carveout);
    if (rc) return rc;
    switch (attrib) {
    case FA_MAX_THREADS: return cuDeviceGetAttribute(pi, DA_MAX_THREADS, dev);
    case FA_PTX_VERSION: case FA_BINARY_VERSION:
        if ((rc = cuDeviceGetAttribute(&major, DA_CC_MAJOR, dev)) || (rc = cuDeviceGetAttribute(&minor, DA_CC_MINOR, dev)))
            return rc;
        *pi = major * 10 + minor;
        return CUDA_SUCCESS;
    case FA_MAX_DYN_SHARED:
        if (dyn) { *pi = dyn; return CUDA_SUCCESS; }
        return cuDeviceGetAttribute(pi, DA_SHARED_PER_BLOCK, dev);
    case FA_CARVEOUT: *pi = carveout; return CUDA_SUCCESS;
    default:
        if (attrib < 0 || attrib > FA_LAST) return CUDA_ERROR_INVALID_VALUE;
        *pi = 0;                  /* static sizes, registers, cache mode, cluster requirements */
        return CUDA_SUCCESS;
    }
}

KC_EXPORT CUresult cuFuncSetAttribute(CUhandle hfunc, int attrib, int value) {
    int dev, dyn, carveout, optin;
    CUresult rc = func_state(hfunc, &dev, &dyn, &carveout);
    if (rc) return rc;
    if (attrib == FA_MAX_DYN_SHARED) {
        if ((rc = cuDeviceGetAttribute(&optin, DA_SHARED_OPTIN, dev)) && (rc = cuDeviceGetAttribute(&optin, DA_SHARED_PER_BLOCK, dev)))
            return rc;
        if (value < 0 || value > optin) return CUDA_ERROR_INVALID_VALUE;
    } else if (attrib == FA_CARVEOUT) {
        if (value < -1 || value > 100) return CUDA_ERROR_INVALID_VALUE;
    } else {
        static int once;
        kc_unsupported_once("cuFuncSetAttribute (other than max dynamic shared size and carveout)", &once);
        return attrib < 0 || attrib > FA_LAST ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_NOT_SUPPORTED;
    }
    if ((rc = kc_lock(0))) return rc;
    struct obj *f = lookup(hfunc, K_FUNCTION, NULL);     /* again: it may have gone meanwhile */
    if (!f) rc = CUDA_ERROR_INVALID_HANDLE;
    else if (attrib == FA_MAX_DYN_SHARED) f->max_dyn_shared = value;
    else f->carveout = value;
    kc_unlock();
    return rc;
}

/* A CUkernel is its CUfunction here (cuLibraryGetKernel): its attributes are the function's,
 * the same on every device. */
KC_EXPORT CUresult cuKernelGetAttribute(int *pi, int attrib, CUhandle kernel, int dev) {
    int n = 0;
    CUresult rc = cuDeviceGetCount(&n);
    if (rc) return rc;
    if (dev < 0 || dev >= n) return CUDA_ERROR_INVALID_DEVICE;
    return cuFuncGetAttribute(pi, attrib, kernel);
}

KC_EXPORT CUresult cuKernelSetAttribute(int attrib, int val, CUhandle kernel, int dev) {
    int n = 0;
    CUresult rc = cuDeviceGetCount(&n);
    if (rc) return rc;
    if (dev < 0 || dev >= n) return CUDA_ERROR_INVALID_DEVICE;
    return cuFuncSetAttribute(kernel, attrib, val);
}

KC_EXPORT CUresult cuFuncSetCacheConfig(CUhandle hfunc, int config) {
    int dev, dyn, carveout;
    if (config < 0 || config > 3) return CUDA_ERROR_INVALID_VALUE;   /* CU_FUNC_CACHE_PREFER_* */
    return func_state(hfunc, &dev, &dyn, &carveout);                 /* a hint: nothing to do on a CPU */
}

/* ---- occupancy: from the device's limits (shim/devattr.py's table for a CPU device), as
 * CUDA's occupancy calculator does with a kernel that uses no registers and no static shared
 * memory (what cuFuncGetAttribute reports here): threads, blocks and shared memory per
 * multiprocessor bound it. A GPU's answer needs the kernel's registers, which the executor
 * does not report: refused there (the device has no such limits in its table). ---- */
enum { DA_WARP = 10, DA_SM_COUNT = 16, DA_THREADS_PER_SM = 39, DA_SHARED_PER_SM = 81, DA_BLOCKS_PER_SM = 106 };
struct occ { int warp, threads_block, threads_sm, blocks_sm, sm_count, smem_sm, smem_block; };

static CUresult occ_limits(CUhandle hfunc, struct occ *o) {
    int dev, dyn, carveout;
    CUresult rc = func_state(hfunc, &dev, &dyn, &carveout);
    if (rc) return rc;
    if ((rc = cuDeviceGetAttribute(&o->warp, DA_WARP, dev)) ||
        (rc = cuDeviceGetAttribute(&o->threads_block, DA_MAX_THREADS, dev)) ||
        (rc = cuDeviceGetAttribute(&o->threads_sm, DA_THREADS_PER_SM, dev)) ||
        (rc = cuDeviceGetAttribute(&o->blocks_sm, DA_BLOCKS_PER_SM, dev)) ||
        (rc = cuDeviceGetAttribute(&o->sm_count, DA_SM_COUNT, dev)) ||
        (rc = cuDeviceGetAttribute(&o->smem_sm, DA_SHARED_PER_SM, dev)) ||
        (rc = cuDeviceGetAttribute(&o->smem_block, DA_SHARED_PER_BLOCK, dev))) {
        static int once;
        if (rc == CUDA_ERROR_NOT_SUPPORTED) kc_unsupported_once("cuOccupancy* on a GPU device", &once);
        return rc;
    }
    if (dyn) o->smem_block = dyn;              /* what the program set as the kernel's limit */
    if (o->warp <= 0 || o->threads_block <= 0) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

/* Blocks of `block` threads using `dyn` bytes of dynamic shared memory one multiprocessor holds. */
static int occ_blocks(const struct occ *o, int block, size_t dyn) {
    if (block <= 0 || block > o->threads_block || dyn > (size_t)o->smem_block) return 0;
    int threads = (block + o->warp - 1) / o->warp * o->warp;       /* whole warps */
    int n = o->threads_sm / threads;
    if (n > o->blocks_sm) n = o->blocks_sm;
    if (dyn && (size_t)o->smem_sm / dyn < (size_t)n) n = (int)((size_t)o->smem_sm / dyn);
    return n;
}

KC_EXPORT CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *numBlocks, CUhandle func, int blockSize,
                                                                       size_t dynamicSMemSize, unsigned int flags) {
    struct occ o;
    if (!numBlocks || flags > 1) return CUDA_ERROR_INVALID_VALUE;   /* CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE */
    CUresult rc = occ_limits(func, &o);
    if (rc) return rc;
    *numBlocks = occ_blocks(&o, blockSize, dynamicSMemSize);
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int *numBlocks, CUhandle func, int blockSize,
                                                              size_t dynamicSMemSize) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(numBlocks, func, blockSize, dynamicSMemSize, 0);
}

typedef size_t (*kc_b2d_size)(int blockSize);

/* The block size with the most threads resident per multiprocessor (the largest such, as
 * cuda_occupancy.h searches: from the limit down, a warp at a time), and the grid that fills
 * the device with it. */
KC_EXPORT CUresult cuOccupancyMaxPotentialBlockSizeWithFlags(int *minGridSize, int *blockSize, CUhandle func,
                                                            kc_b2d_size b2d, size_t dynamicSMemSize,
                                                            int blockSizeLimit, unsigned int flags) {
    struct occ o;
    if (!minGridSize || !blockSize || flags > 1 || blockSizeLimit < 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = occ_limits(func, &o);
    if (rc) return rc;
    int limit = blockSizeLimit == 0 || blockSizeLimit > o.threads_block ? o.threads_block : blockSizeLimit;
    int best = 0, best_block = 0, best_blocks = 0;
    for (int aligned = (limit + o.warp - 1) / o.warp * o.warp; aligned > 0; aligned -= o.warp) {
        int b = aligned < limit ? aligned : limit;
        int n = occ_blocks(&o, b, b2d ? b2d(b) : dynamicSMemSize);
        if (n * b > best) { best = n * b; best_block = b; best_blocks = n; }
        if (best == o.threads_sm) break;                          /* cannot do better */
    }
    *minGridSize = best_blocks * o.sm_count;
    *blockSize = best_block;
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuOccupancyMaxPotentialBlockSize(int *minGridSize, int *blockSize, CUhandle func, kc_b2d_size b2d,
                                                   size_t dynamicSMemSize, int blockSizeLimit) {
    return cuOccupancyMaxPotentialBlockSizeWithFlags(minGridSize, blockSize, func, b2d, dynamicSMemSize,
                                                     blockSizeLimit, 0);
}

/* The dynamic shared memory each of numBlocks blocks of blockSize threads may use with all of
 * them resident on one multiprocessor (0 when that many cannot be). */
KC_EXPORT CUresult cuOccupancyAvailableDynamicSMemPerBlock(size_t *dynamicSmemSize, CUhandle func, int numBlocks,
                                                          int blockSize) {
    struct occ o;
    if (!dynamicSmemSize || numBlocks <= 0 || blockSize <= 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = occ_limits(func, &o);
    if (rc) return rc;
    size_t per = 0;
    if (occ_blocks(&o, blockSize, 0) >= numBlocks) {
        per = (size_t)o.smem_sm / (size_t)numBlocks;
        if (per > (size_t)o.smem_block) per = (size_t)o.smem_block;
    }
    *dynamicSmemSize = per;
    return CUDA_SUCCESS;
}

/* ---- launches ---- */
#define LAUNCH_PARAM_END ((void *)0x00)
#define LAUNCH_PARAM_BUFFER_POINTER ((void *)0x01)
#define LAUNCH_PARAM_BUFFER_SIZE ((void *)0x02)

/* Where parameter i starts in an `extra` buffer. get_function's reply gives sizes, not
 * alignments: each parameter is taken as aligned to the largest power of two (at most 8)
 * dividing its size, which is the C layout of scalars, pointers, vector types and structs
 * of them; a struct with a stricter __align__ than that is placed wrong (the buffer size
 * check below catches a layout that cannot be it). */
static size_t param_align(uint32_t size) {
    size_t a = 1;
    while (a < 8 && size % (a * 2) == 0) a *= 2;
    return a;
}

/* The launch message's "args": one bin per parameter, from kernelParams or extra. */
static CUresult pack_args(struct kc_buf *b, const struct obj *f, void **params, void **extra) {
    if (params && extra) return CUDA_ERROR_INVALID_VALUE;
    mp_str(b, KCP_EXECUTOR_LAUNCH_ARGS);
    mp_array(b, f->nparams);
    if (extra) {
        const uint8_t *buf = NULL;
        size_t size = 0;
        int have_size = 0;
        for (int i = 0; i < 64 && extra[i] != LAUNCH_PARAM_END; i += 2) {
            if (extra[i] == LAUNCH_PARAM_BUFFER_POINTER) buf = extra[i + 1];
            else if (extra[i] == LAUNCH_PARAM_BUFFER_SIZE && extra[i + 1]) { size = *(size_t *)extra[i + 1]; have_size = 1; }
            else return CUDA_ERROR_INVALID_VALUE;
        }
        if (f->nparams && (!buf || !have_size)) return CUDA_ERROR_INVALID_VALUE;
        size_t off = 0;
        for (uint32_t i = 0; i < f->nparams; i++) {
            size_t a = param_align(f->sizes[i]);
            off = (off + a - 1) / a * a;
            if (off + f->sizes[i] > size) {
                kc_log("kubecash: cuLaunchKernel: the extra buffer of %zu bytes is too small for parameter %u "
                       "(%u bytes at offset %zu)", size, i, f->sizes[i], off);
                return CUDA_ERROR_INVALID_VALUE;
            }
            mp_bin(b, buf + off, f->sizes[i]);
            off += f->sizes[i];
        }
        return CUDA_SUCCESS;
    }
    if (f->nparams && !params) return CUDA_ERROR_INVALID_VALUE;
    for (uint32_t i = 0; i < f->nparams; i++) {
        if (!params[i]) return CUDA_ERROR_INVALID_VALUE;
        mp_bin(b, params[i], f->sizes[i]);
    }
    return CUDA_SUCCESS;
}

/* A launch's parameters as one buffer laid out as an `extra` buffer is (param_align): what a
 * graph keeps of them, since kernelParams point at the program's memory of the moment. */
static CUresult flat_args(const struct obj *f, void **params, void **extra, uint8_t **out, size_t *out_size) {
    struct kc_buf b = {0};
    CUresult rc = pack_args(&b, f, params, extra);      /* validates, as a launch would */
    mp_free(&b);
    if (rc) return rc;
    size_t size = 0;
    for (uint32_t i = 0; i < f->nparams; i++) {
        size_t a = param_align(f->sizes[i]);
        size = (size + a - 1) / a * a + f->sizes[i];
    }
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return CUDA_ERROR_OUT_OF_MEMORY;
    const uint8_t *src = NULL;
    if (extra)
        for (int i = 0; i < 64 && extra[i] != LAUNCH_PARAM_END; i += 2)
            if (extra[i] == LAUNCH_PARAM_BUFFER_POINTER) src = extra[i + 1];
    size_t off = 0;
    for (uint32_t i = 0; i < f->nparams; i++) {
        size_t a = param_align(f->sizes[i]);
        off = (off + a - 1) / a * a;
        memcpy(buf + off, src ? src + off : params[i], f->sizes[i]);
        off += f->sizes[i];
    }
    *out = buf;
    *out_size = size;
    return CUDA_SUCCESS;
}

CUresult kc_flat_args(void *hf, void **params, void **extra, uint8_t **out, size_t *size) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct obj *f = lookup(hf, K_FUNCTION, NULL);
    rc = f ? flat_args(f, params, extra, out, size) : CUDA_ERROR_INVALID_HANDLE;
    kc_unlock();
    return rc;
}

/* A cooperative grid larger than the device holds resident: refused now, as CUDA does (a
 * CPU device's limits are known here; a GPU's executor asks the GPU). */
static CUresult coop_check(CUhandle hf, const unsigned grid[3], const unsigned block[3], unsigned shared) {
    struct occ o;
    if (occ_limits(hf, &o)) return CUDA_SUCCESS;
    uint64_t n = (uint64_t)grid[0] * grid[1] * grid[2];
    int per_sm = occ_blocks(&o, (int)(block[0] * block[1] * block[2]), shared);
    if (n <= (uint64_t)per_sm * (uint64_t)o.sm_count) return CUDA_SUCCESS;
    kc_log("kubecash: cooperative launch of %llu blocks: at most %d (%d per multiprocessor x %d) are resident "
           "at once", (unsigned long long)n, per_sm * o.sm_count, per_sm, o.sm_count);
    return CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE;
}

/* coop: cuLaunchCooperativeKernel (or the COOPERATIVE launch attribute): every block
 * resident at once, so that grid-wide barriers (cooperative_groups' grid.sync) work. */
static CUresult launch(CUhandle hf, const unsigned grid[3], const unsigned block[3], unsigned shared,
                       CUhandle stream, void **params, void **extra, int coop) {
    /* CUDA's own bounds (LAUNCH in client/limits.py), answered now rather than at the next sync */
    static const unsigned max_grid[3] = {0x7FFFFFFFu, 65535, 65535}, max_block[3] = {1024, 1024, 64};
    for (int i = 0; i < 3; i++)
        if (!grid[i] || !block[i] || grid[i] > max_grid[i] || block[i] > max_block[i]) return CUDA_ERROR_INVALID_VALUE;
    if ((uint64_t)block[0] * block[1] * block[2] > 1024) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = coop ? coop_check(hf, grid, block, shared) : CUDA_SUCCESS;
    if (rc) return rc;
    int dev;
    uint64_t sh;
    rc = lock_stream(stream, &dev, &sh);
    if (rc) return rc;
    uint32_t fidx;
    struct obj *f = function_on(lookup(hf, K_FUNCTION, NULL), dev, &fidx);
    if (!f) {
        kc_unlock();
        return CUDA_ERROR_INVALID_HANDLE;
    }
    void *cap = kc_capture_of(stream);
    if (cap) {                             /* recorded into the capture's graph, not run */
        uint8_t *args = NULL;
        size_t size = 0;
        rc = flat_args(f, params, extra, &args, &size);
        kc_unlock();
        struct kc_gnode n = {.kind = KC_G_KERNEL, .f = hf, .shared = shared, .args = args, .size = size,
                             .coop = coop};
        memcpy(n.grid, grid, sizeof n.grid);
        memcpy(n.block, block, sizeof n.block);
        return rc ? kc_capture_fail(cap, rc) : kc_capture_add(cap, &n);
    }
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_LAUNCH_FUNCTION); mp_uint(&b, f->h);
    mp_str(&b, KCP_EXECUTOR_LAUNCH_GRID); mp_array(&b, 3);
    for (int i = 0; i < 3; i++) mp_uint(&b, grid[i]);
    mp_str(&b, KCP_EXECUTOR_LAUNCH_BLOCK); mp_array(&b, 3);
    for (int i = 0; i < 3; i++) mp_uint(&b, block[i]);
    mp_str(&b, KCP_EXECUTOR_LAUNCH_SHARED); mp_uint(&b, shared);
    mp_str(&b, KCP_EXECUTOR_LAUNCH_STREAM); mp_uint(&b, sh);
    rc = pack_args(&b, f, params, extra);
    if (coop) { mp_str(&b, KCP_EXECUTOR_LAUNCH_COOPERATIVE); mp_bool(&b, 1); }
    if (!rc) rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_post(dev, KCP_EXECUTOR_LAUNCH, &b, coop ? 7 : 6);
    mp_free(&b);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuLaunchKernel(CUhandle f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                  unsigned bz, unsigned shared, CUhandle stream, void **params, void **extra) {
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    return launch(f, grid, block, shared, stream, params, extra, 0);
}

CUresult kc_launch(void *f, const unsigned grid[3], const unsigned block[3], unsigned shared, void *stream,
                   void **params, void **extra, int coop) {
    return launch(f, grid, block, shared, stream, params, extra, coop);
}

KC_EXPORT CUresult cuLaunchCooperativeKernel(CUhandle f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                             unsigned by, unsigned bz, unsigned shared, CUhandle stream,
                                             void **params) {
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    return launch(f, grid, block, shared, stream, params, NULL, 1);
}

KC_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUhandle f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                                  unsigned by, unsigned bz, unsigned shared, CUhandle stream,
                                                  void **params) {
    return cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shared, stream, params);
}

KC_EXPORT CUresult cuLaunchKernel_ptsz(CUhandle f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                       unsigned bz, unsigned shared, CUhandle stream, void **params, void **extra) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra);
}

/* cuda.h's CUlaunchConfig and CUlaunchAttribute (a 64-byte value union after an 8-byte id). */
struct launch_attr { int id; char pad[4]; union { char bytes[64]; int i; unsigned u[3]; } value; };
struct launch_config {
    unsigned grid[3], block[3], shared;
    CUhandle stream;
    const struct launch_attr *attrs;
    unsigned nattrs;
};

static const char *const attr_names[] = {
    "IGNORE", "ACCESS_POLICY_WINDOW", "COOPERATIVE", "SYNCHRONIZATION_POLICY", "CLUSTER_DIMENSION",
    "CLUSTER_SCHEDULING_POLICY_PREFERENCE", "PROGRAMMATIC_STREAM_SERIALIZATION", "PROGRAMMATIC_EVENT",
    "PRIORITY", "MEM_SYNC_DOMAIN_MAP", "MEM_SYNC_DOMAIN", "PREFERRED_CLUSTER_DIMENSION",
    "LAUNCH_COMPLETION_EVENT", "DEVICE_UPDATABLE_KERNEL_NODE", "PREFERRED_SHARED_MEMORY_CARVEOUT",
};

/* Attributes that change nothing here are accepted (hints; priority: the range is (0, 0);
 * a 1x1x1 cluster: the plain launch); cooperative sets *coop. The rest are refused by name:
 * the protocol has no cluster launch yet. */
static CUresult check_attr(const struct launch_attr *a, int *coop) {
    switch (a->id) {
    case 0: case 1: case 8: case 9: case 10: case 14: return CUDA_SUCCESS;
    case 2: *coop = a->value.i != 0; return CUDA_SUCCESS;
    case 4: if (a->value.u[0] <= 1 && a->value.u[1] <= 1 && a->value.u[2] <= 1) return CUDA_SUCCESS; break;
    case 6: if (a->value.i == 0) return CUDA_SUCCESS; break;
    }
    int n = (int)(sizeof attr_names / sizeof *attr_names);
    kc_log("kubecash: cuLaunchKernelEx: launch attribute CU_LAUNCH_ATTRIBUTE_%s (%d)%s is not supported",
           a->id >= 0 && a->id < n ? attr_names[a->id] : "?", a->id, a->id == 4 || a->id == 6 ? " with this value" : "");
    return CUDA_ERROR_NOT_SUPPORTED;
}

KC_EXPORT CUresult cuLaunchKernelEx(const struct launch_config *config, CUhandle f, void **params, void **extra) {
    if (!config || (config->nattrs && !config->attrs)) return CUDA_ERROR_INVALID_VALUE;
    int coop = 0;
    for (unsigned i = 0; i < config->nattrs; i++) {
        CUresult rc = check_attr(&config->attrs[i], &coop);
        if (rc) return rc;
    }
    return launch(f, config->grid, config->block, config->shared, config->stream, params, extra, coop);
}

KC_EXPORT CUresult cuLaunchKernelEx_ptsz(const struct launch_config *config, CUhandle f, void **params, void **extra) {
    return cuLaunchKernelEx(config, f, params, extra);
}

/* ---- streams and events: made and destroyed alike ---- */
struct made { enum kind kind; const char *create, *flags, *reply, *destroy, *field; };
static const struct made STREAMS = {K_STREAM, KCP_EXECUTOR_STREAM_CREATE, KCP_EXECUTOR_STREAM_CREATE_FLAGS,
                                    KCP_EXECUTOR_STREAM_CREATE_R_STREAM, KCP_EXECUTOR_STREAM_DESTROY,
                                    KCP_EXECUTOR_STREAM_DESTROY_STREAM};
static const struct made EVENTS = {K_EVENT, KCP_EXECUTOR_EVENT_CREATE, KCP_EXECUTOR_EVENT_CREATE_FLAGS,
                                   KCP_EXECUTOR_EVENT_CREATE_R_EVENT, KCP_EXECUTOR_EVENT_DESTROY,
                                   KCP_EXECUTOR_EVENT_DESTROY_EVENT};

static CUresult create(const struct made *k, unsigned flags, CUhandle *out) {
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    struct kc_buf b = {0};
    mp_str(&b, k->flags); mp_uint(&b, flags);
    struct mp_val r;
    uint64_t h;
    uint32_t idx;
    rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, k->create, &b, 1, &r);
    mp_free(&b);
    if (!rc && kc_uint_of(&r, k->reply, &h)) rc = CUDA_ERROR_UNKNOWN;
    if (!rc && new_obj(k->kind, dev, h, &idx)) {
        kc_request1(dev, k->destroy, k->field, h, &r);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (!rc) {
        objs[idx]->flags = flags;
        *out = handle_of(idx);
    }
    kc_unlock();
    return rc;
}

static CUresult destroy(const struct made *k, CUhandle hv) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    uint32_t idx;
    struct obj *o = lookup(hv, k->kind, &idx);
    struct mp_val r;
    if (!o) rc = CUDA_ERROR_INVALID_HANDLE;
    else {
        rc = kc_request1(o->dev, k->destroy, k->field, o->h, &r);
        if (!rc || rc == CUDA_ERROR_INVALID_HANDLE) drop_obj(idx);    /* gone there either way */
    }
    kc_unlock();
    return rc;
}

static CUresult stream_create(CUhandle *ph, unsigned flags) {
    if (!ph || flags > 1) return CUDA_ERROR_INVALID_VALUE;     /* CU_STREAM_DEFAULT, NON_BLOCKING */
    return create(&STREAMS, flags, ph);
}

KC_EXPORT CUresult cuStreamCreate(CUhandle *phStream, unsigned int Flags) { return stream_create(phStream, Flags); }

/* Priorities are not supported: the range is (0, 0), and CUDA clamps a priority into it. */
KC_EXPORT CUresult cuStreamCreateWithPriority(CUhandle *phStream, unsigned int flags, int priority) {
    return stream_create(phStream, flags);
}

static CUresult stream_destroy(CUhandle s) { return destroy(&STREAMS, s); }

KC_EXPORT CUresult cuStreamDestroy_v2(CUhandle hStream) { return stream_destroy(hStream); }
KC_EXPORT CUresult cuStreamDestroy(CUhandle hStream) { return stream_destroy(hStream); }

/* Waiting on a capturing stream is refused, and ends its capture (as CUDA's does). */
static CUresult refuse_if_capturing(CUhandle stream) {
    void *cap = kc_capture_of(stream);
    if (!cap) return CUDA_SUCCESS;
    kc_unlock();
    return kc_capture_fail(cap, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
}

KC_EXPORT CUresult cuStreamSynchronize(CUhandle hStream) {
    int dev;
    uint64_t h;
    CUresult rc = lock_stream(hStream, &dev, &h);
    if (rc) return rc;
    if ((rc = refuse_if_capturing(hStream))) return rc;
    struct mp_val r;
    rc = kc_request1(dev, KCP_EXECUTOR_STREAM_SYNC, KCP_EXECUTOR_STREAM_SYNC_STREAM, h, &r);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuStreamSynchronize_ptsz(CUhandle hStream) { return cuStreamSynchronize(hStream); }

/* A request whose reply says "ready" (stream_query, event_query): NOT_READY when not. */
static CUresult ready_of(int dev, const char *op, const char *key, uint64_t h, const char *rkey) {
    struct mp_val r, v;
    CUresult rc = kc_request1(dev, op, key, h, &r);
    if (rc) return rc;
    if (mp_find(&r, rkey, &v) != 1 || v.type != MP_BOOL) return CUDA_ERROR_UNKNOWN;
    return v.v.b ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

KC_EXPORT CUresult cuStreamQuery(CUhandle hStream) {
    int dev;
    uint64_t h;
    CUresult rc = lock_stream(hStream, &dev, &h);
    if (rc) return rc;
    if ((rc = refuse_if_capturing(hStream))) return rc;
    rc = ready_of(dev, KCP_EXECUTOR_STREAM_QUERY, KCP_EXECUTOR_STREAM_QUERY_STREAM, h, KCP_EXECUTOR_STREAM_QUERY_R_READY);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuStreamQuery_ptsz(CUhandle hStream) { return cuStreamQuery(hStream); }

KC_EXPORT CUresult cuStreamGetPriority(CUhandle hStream, int *priority) {
    if (!priority) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t h;
    CUresult rc = lock_stream(hStream, &dev, &h);
    if (rc) return rc;
    kc_unlock();
    *priority = 0;
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuStreamGetPriority_ptsz(CUhandle hStream, int *priority) { return cuStreamGetPriority(hStream, priority); }

KC_EXPORT CUresult cuStreamGetFlags(CUhandle hStream, unsigned int *flags) {
    if (!flags) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    int dev;
    uint64_t h;
    rc = resolve_stream(hStream, &dev, &h);
    if (!rc) {
        struct obj *o = h ? lookup(hStream, K_STREAM, NULL) : NULL;
        *flags = o ? o->flags : 0;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuStreamGetFlags_ptsz(CUhandle hStream, unsigned int *flags) { return cuStreamGetFlags(hStream, flags); }

/* What cuda.core and the runtime ask before each stream-ordered allocation (cuda_graph.c
 * says NONE, ACTIVE or INVALIDATED). */
KC_EXPORT CUresult cuStreamIsCapturing(CUhandle hStream, int *status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    int dev;
    uint64_t h;
    rc = resolve_stream(hStream, &dev, &h);
    void *cap = rc ? NULL : kc_capture_of(hStream);
    kc_unlock();
    if (!rc) *status = kc_capture_status(cap);
    return rc;
}
KC_EXPORT CUresult cuStreamIsCapturing_ptsz(CUhandle hStream, int *status) { return cuStreamIsCapturing(hStream, status); }

/* ---- events ---- */
KC_EXPORT CUresult cuEventCreate(CUhandle *phEvent, unsigned int Flags) {
    if (!phEvent || Flags > 0x7) return CUDA_ERROR_INVALID_VALUE;   /* BLOCKING_SYNC, DISABLE_TIMING, INTERPROCESS */
    if (Flags & 0x4) return CUDA_ERROR_NOT_SUPPORTED;              /* interprocess: nothing cross-process */
    return create(&EVENTS, Flags, phEvent);
}

static CUresult event_destroy(CUhandle ev) { return destroy(&EVENTS, ev); }

KC_EXPORT CUresult cuEventDestroy_v2(CUhandle hEvent) { return event_destroy(hEvent); }
KC_EXPORT CUresult cuEventDestroy(CUhandle hEvent) { return event_destroy(hEvent); }

/* An event and a stream of the same device (lock taken; released on failure). */
static CUresult lock_event_stream(CUhandle ev, CUhandle stream, struct obj **e, uint64_t *sh) {
    int dev;
    CUresult rc = lock_stream(stream, &dev, sh);
    if (rc) return rc;
    *e = lookup(ev, K_EVENT, NULL);
    if (!*e || (*e)->dev != dev) { kc_unlock(); return CUDA_ERROR_INVALID_HANDLE; }
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuEventRecord(CUhandle hEvent, CUhandle hStream) {
    struct obj *e;
    uint64_t sh;
    CUresult rc = lock_event_stream(hEvent, hStream, &e, &sh);
    if (rc) return rc;
    void *cap = kc_capture_of(hStream);
    if (cap) {
        kc_unlock();
        struct kc_gnode n = {.kind = KC_G_EVENT_RECORD, .event = hEvent};
        return kc_capture_add(cap, &n);
    }
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_EVENT_RECORD_EVENT); mp_uint(&b, e->h);
    mp_str(&b, KCP_EXECUTOR_EVENT_RECORD_STREAM); mp_uint(&b, sh);
    rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_post(e->dev, KCP_EXECUTOR_EVENT_RECORD, &b, 2);
    mp_free(&b);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuEventRecord_ptsz(CUhandle hEvent, CUhandle hStream) { return cuEventRecord(hEvent, hStream); }

KC_EXPORT CUresult cuEventRecordWithFlags(CUhandle hEvent, CUhandle hStream, unsigned int flags) {
    if (flags & ~1u) return CUDA_ERROR_INVALID_VALUE;   /* CU_EVENT_RECORD_EXTERNAL: graphs only */
    return cuEventRecord(hEvent, hStream);
}

KC_EXPORT CUresult cuEventRecordWithFlags_ptsz(CUhandle hEvent, CUhandle hStream, unsigned int flags) {
    return cuEventRecordWithFlags(hEvent, hStream, flags);
}

KC_EXPORT CUresult cuStreamWaitEvent(CUhandle hStream, CUhandle hEvent, unsigned int Flags) {
    if (Flags & ~1u) return CUDA_ERROR_INVALID_VALUE;    /* CU_EVENT_WAIT_DEFAULT / _EXTERNAL */
    struct obj *e;
    uint64_t sh;
    CUresult rc = lock_event_stream(hEvent, hStream, &e, &sh);
    if (rc) return rc;
    void *cap = kc_capture_of(hStream);
    if (cap || kc_capture_recorded(hEvent)) {
        kc_unlock();
        if (!cap) {                /* another stream joining a capture: a fork in its graph */
            kc_log("kubecash: cuStreamWaitEvent: a stream waiting on an event recorded by a capturing stream "
                   "(capture across streams) is not supported");
            return CUDA_ERROR_NOT_SUPPORTED;
        }
        struct kc_gnode n = {.kind = KC_G_EVENT_WAIT, .event = hEvent};
        return kc_capture_add(cap, &n);
    }
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_STREAM_WAIT_EVENT_STREAM); mp_uint(&b, sh);
    mp_str(&b, KCP_EXECUTOR_STREAM_WAIT_EVENT_EVENT); mp_uint(&b, e->h);
    rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_post(e->dev, KCP_EXECUTOR_STREAM_WAIT_EVENT, &b, 2);
    mp_free(&b);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuStreamWaitEvent_ptsz(CUhandle hStream, CUhandle hEvent, unsigned int Flags) {
    return cuStreamWaitEvent(hStream, hEvent, Flags);
}

/* An event's device and handle (lock taken; released on failure). */
static CUresult lock_event(CUhandle ev, struct obj **e) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    *e = lookup(ev, K_EVENT, NULL);
    if (!*e) { kc_unlock(); return CUDA_ERROR_INVALID_HANDLE; }
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuEventSynchronize(CUhandle hEvent) {
    struct obj *e;
    CUresult rc = lock_event(hEvent, &e);
    if (rc) return rc;
    struct mp_val r;
    rc = kc_request1(e->dev, KCP_EXECUTOR_EVENT_SYNC, KCP_EXECUTOR_EVENT_SYNC_EVENT, e->h, &r);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuEventQuery(CUhandle hEvent) {
    struct obj *e;
    CUresult rc = lock_event(hEvent, &e);
    if (rc) return rc;
    rc = ready_of(e->dev, KCP_EXECUTOR_EVENT_QUERY, KCP_EXECUTOR_EVENT_QUERY_EVENT, e->h, KCP_EXECUTOR_EVENT_QUERY_R_READY);
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuEventElapsedTime(float *pMilliseconds, CUhandle hStart, CUhandle hEnd) {
    if (!pMilliseconds) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct obj *a = lookup(hStart, K_EVENT, NULL), *z = lookup(hEnd, K_EVENT, NULL);
    if (!a || !z || a->dev != z->dev || (a->flags | z->flags) & EVENT_DISABLE_TIMING) {
        kc_unlock();
        return CUDA_ERROR_INVALID_HANDLE;
    }
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_EVENT_ELAPSED_START); mp_uint(&b, a->h);
    mp_str(&b, KCP_EXECUTOR_EVENT_ELAPSED_END); mp_uint(&b, z->h);
    struct mp_val r, v;
    double ms;
    rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(a->dev, KCP_EXECUTOR_EVENT_ELAPSED, &b, 2, &r);
    mp_free(&b);
    if (!rc && (mp_find(&r, KCP_EXECUTOR_EVENT_ELAPSED_R_MS, &v) != 1 || mp_as_double(&v, &ms))) rc = CUDA_ERROR_UNKNOWN;
    if (!rc) *pMilliseconds = (float)ms;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuEventElapsedTime_v2(float *pMilliseconds, CUhandle hStart, CUhandle hEnd) {
    return cuEventElapsedTime(pMilliseconds, hStart, hEnd);
}

/* ---- copies and memset on streams ---- */

/* memcpy_dtod on device dev (lock held); async: posted. */
static CUresult dtod(int dev, uint64_t sh, int async, CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (n == 0) return CUDA_SUCCESS;
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_MEMCPY_DTOD_DST); mp_uint(&b, dst);
    mp_str(&b, KCP_EXECUTOR_MEMCPY_DTOD_SRC); mp_uint(&b, src);
    mp_str(&b, KCP_EXECUTOR_MEMCPY_DTOD_SIZE); mp_uint(&b, n);
    mp_str(&b, KCP_EXECUTOR_MEMCPY_DTOD_STREAM); mp_uint(&b, sh);
    struct mp_val r;
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY
                : async ? kc_exec_post(dev, KCP_EXECUTOR_MEMCPY_DTOD, &b, 4)
                        : kc_exec_request(dev, KCP_EXECUTOR_MEMCPY_DTOD, &b, 4, &r);
    mp_free(&b);
    return rc;
}

/* A copy between two devices' memory (lock held), through this process in pieces: the
 * devices are separate executor processes, which cannot reach each other's memory. Stream sh
 * is device dev's: the side on that device uses it, the other its device's default stream,
 * so the copy comes after the work queued on either side; it returns when both are done. */
static CUresult peer_copy(int dev, uint64_t sh, int ddev, CUdeviceptr dst, int sdev, CUdeviceptr src, size_t n) {
    uint64_t ds = ddev == dev ? sh : 0, ss = sdev == dev ? sh : 0;
    size_t piece = n < ((size_t)8 << 20) ? n : ((size_t)8 << 20);
    uint8_t *buf = n ? malloc(piece) : NULL;
    if (n && !buf) return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult rc = CUDA_SUCCESS;
    for (size_t off = 0; !rc && off < n; off += piece) {
        size_t m = n - off < piece ? n - off : piece;
        rc = kc_copy(sdev, 0, ss, 0, src + off, buf, m);
        if (!rc) rc = kc_copy(ddev, 1, ds, 0, dst + off, buf, m);
    }
    free(buf);
    return rc;
}

/* Copies with their direction given, on a stream (NULL: the default stream). Host to device
 * queues inline pieces when async (the bytes travel in the message, so the program may reuse
 * its buffer at once); device to host waits for the bytes. */
enum { HTOD = KC_COPY_HTOD, DTOH = KC_COPY_DTOH, DTOD = KC_COPY_DTOD, ANY = KC_COPY_ANY };

/* A copy on a capturing stream (lock held, released): recorded if async, refused if not. */
static CUresult capture_copy(CUhandle stream, int what, int async, uint64_t dst, uint64_t src, size_t n) {
    void *cap = kc_capture_of(stream);
    kc_unlock();
    if (!async) return kc_capture_fail(cap, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    struct kc_gnode g = {.kind = KC_G_COPY, .what = what, .dst = dst, .src = src, .n = n};
    return kc_capture_add(cap, &g);
}

static CUresult copy_on(CUhandle stream, int what, int async, uint64_t dst, uint64_t src, size_t n) {
    int dev;
    uint64_t sh;
    CUresult rc = lock_stream(stream, &dev, &sh);
    if (rc) return rc;
    if (kc_capture_of(stream)) return capture_copy(stream, what, async, dst, src, n);
    int ddev = what == DTOD ? device_of(dst) : -1, sdev = what == DTOD ? device_of(src) : -1;
    if (ddev >= 0 && sdev >= 0 && ddev != sdev)
        rc = peer_copy(dev, sh, ddev, dst, sdev, src, n);
    else rc = what == DTOD ? dtod(dev, sh, async, dst, src, n)
       : what == HTOD ? kc_copy(dev, 1, sh, async, dst, (void *)(uintptr_t)src, n)
                      : kc_copy(dev, 0, sh, 0, src, (void *)(uintptr_t)dst, n);
    kc_unlock();
    return rc;
}

static CUresult dtod_on(CUhandle stream, int async, CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy_on(stream, DTOD, async, dst, src, n);
}

KC_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUhandle stream) {
    return copy_on(stream, HTOD, 1, dst, (uintptr_t)src, n);
}
KC_EXPORT CUresult cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUhandle stream) {
    return copy_on(stream, HTOD, 1, dst, (uintptr_t)src, n);
}
KC_EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUhandle stream) {
    return copy_on(stream, DTOH, 1, (uintptr_t)dst, src, n);
}
KC_EXPORT CUresult cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUhandle stream) {
    return copy_on(stream, DTOH, 1, (uintptr_t)dst, src, n);
}

/* cuMemcpy with unified addressing: an address inside one of this session's device
 * allocations (or module globals) is device memory, anything else host memory. Host to
 * host is a plain memmove (not ordered on the stream: it touches no device memory). */
static CUresult memcpy_any(CUhandle stream, int async, CUdeviceptr dst, CUdeviceptr src, size_t n) {
    int dev;
    uint64_t sh;
    CUresult rc = lock_stream(stream, &dev, &sh);
    if (rc) return rc;
    if (kc_capture_of(stream)) return capture_copy(stream, ANY, async, dst, src, n);
    int ddev = device_of(dst), sdev = device_of(src);
    if (n == 0) rc = CUDA_SUCCESS;
    else if (ddev >= 0 && sdev >= 0)
        rc = ddev != sdev ? peer_copy(dev, sh, ddev, dst, sdev, src, n)
           : ddev != dev ? CUDA_ERROR_INVALID_VALUE : dtod(dev, sh, async, dst, src, n);
    else if (ddev >= 0)
        rc = ddev != dev ? CUDA_ERROR_INVALID_VALUE : kc_copy(dev, 1, sh, async, dst, (void *)(uintptr_t)src, n);
    else if (sdev >= 0)
        rc = sdev != dev ? CUDA_ERROR_INVALID_VALUE : kc_copy(dev, 0, sh, 0, src, (void *)(uintptr_t)dst, n);
    else if (!dst || !src) rc = CUDA_ERROR_INVALID_VALUE;
    else memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    kc_unlock();
    return rc;
}

/* cuMemcpyPeer: devices named by their contexts; the Async flavour is ordered on its stream
 * (of either device) and returns once done, as peer_copy does. */
static CUresult memcpy_peer(CUdeviceptr dst, void *dctx, CUdeviceptr src, void *sctx, size_t n, int on_stream,
                            CUhandle stream) {
    int dev = -1;
    uint64_t sh = 0;
    CUresult rc = on_stream ? lock_stream(stream, &dev, &sh) : kc_lock(0);
    if (rc) return rc;
    if (on_stream && kc_capture_of(stream)) {
        void *cap = kc_capture_of(stream);
        kc_unlock();
        kc_log("kubecash: cuMemcpyPeerAsync during stream capture is not supported");
        return kc_capture_fail(cap, CUDA_ERROR_NOT_SUPPORTED);
    }
    int ddev = kc_ctx_device(dctx), sdev = kc_ctx_device(sctx);
    if (ddev < 0 || sdev < 0) rc = CUDA_ERROR_INVALID_CONTEXT;
    else if (device_of(dst) != ddev || device_of(src) != sdev) rc = CUDA_ERROR_INVALID_VALUE;
    else if (ddev == sdev) rc = dtod(ddev, ddev == dev ? sh : 0, 0, dst, src, n);
    else rc = peer_copy(dev, sh, ddev, dst, sdev, src, n);
    kc_unlock();
    return rc;
}
KC_EXPORT CUresult cuMemcpyPeer(CUdeviceptr dst, void *dctx, CUdeviceptr src, void *sctx, size_t n) {
    return memcpy_peer(dst, dctx, src, sctx, n, 0, NULL);
}
KC_EXPORT CUresult cuMemcpyPeer_ptds(CUdeviceptr dst, void *dctx, CUdeviceptr src, void *sctx, size_t n) {
    return memcpy_peer(dst, dctx, src, sctx, n, 0, NULL);
}
KC_EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void *dctx, CUdeviceptr src, void *sctx, size_t n, CUhandle s) {
    return memcpy_peer(dst, dctx, src, sctx, n, 1, s);
}
KC_EXPORT CUresult cuMemcpyPeerAsync_ptsz(CUdeviceptr dst, void *dctx, CUdeviceptr src, void *sctx, size_t n,
                                          CUhandle s) {
    return memcpy_peer(dst, dctx, src, sctx, n, 1, s);
}

/* the synchronous and stream-ordered flavours of dtod_on and memcpy_any */
#define COPY(name, fn) \
    KC_EXPORT CUresult name(CUdeviceptr dst, CUdeviceptr src, size_t n) { return fn(NULL, 0, dst, src, n); }
#define COPY_ASYNC(name, fn) \
    KC_EXPORT CUresult name(CUdeviceptr dst, CUdeviceptr src, size_t n, CUhandle s) { return fn(s, 1, dst, src, n); }
COPY(cuMemcpyDtoD_v2, dtod_on)
COPY(cuMemcpyDtoD_v2_ptds, dtod_on)
COPY_ASYNC(cuMemcpyDtoDAsync_v2, dtod_on)
COPY_ASYNC(cuMemcpyDtoDAsync_v2_ptsz, dtod_on)
COPY(cuMemcpy, memcpy_any)
COPY(cuMemcpy_ptds, memcpy_any)
COPY_ASYNC(cuMemcpyAsync, memcpy_any)
COPY_ASYNC(cuMemcpyAsync_ptsz, memcpy_any)

static CUresult memset_on(CUhandle stream, int async, CUdeviceptr dst, unsigned value, unsigned width, size_t count) {
    int dev;
    uint64_t sh;
    CUresult rc = lock_stream(stream, &dev, &sh);
    if (rc) return rc;
    void *cap = kc_capture_of(stream);
    if (cap) {
        kc_unlock();
        if (!async) return kc_capture_fail(cap, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        struct kc_gnode g = {.kind = KC_G_MEMSET, .dst = dst, .value = value, .elem = width, .width = count,
                             .height = 1};
        return kc_capture_add(cap, &g);
    }
    if (count) {
        struct kc_buf b = {0};
        mp_str(&b, KCP_EXECUTOR_MEMSET_DST); mp_uint(&b, dst);
        mp_str(&b, KCP_EXECUTOR_MEMSET_VALUE); mp_uint(&b, value);
        mp_str(&b, KCP_EXECUTOR_MEMSET_WIDTH); mp_uint(&b, width);
        mp_str(&b, KCP_EXECUTOR_MEMSET_COUNT); mp_uint(&b, count);
        mp_str(&b, KCP_EXECUTOR_MEMSET_STREAM); mp_uint(&b, sh);
        struct mp_val r;
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY
           : async ? kc_exec_post(dev, KCP_EXECUTOR_MEMSET, &b, 5) : kc_exec_request(dev, KCP_EXECUTOR_MEMSET, &b, 5, &r);
        mp_free(&b);
    }
    kc_unlock();
    return rc;
}

#define MEMSET(name, T, width, async) \
    KC_EXPORT CUresult name(CUdeviceptr dst, T v, size_t n) { return memset_on(NULL, async, dst, v, width, n); }
#define MEMSET_ASYNC(name, T, width) \
    KC_EXPORT CUresult name(CUdeviceptr dst, T v, size_t n, CUhandle s) { return memset_on(s, 1, dst, v, width, n); }
MEMSET(cuMemsetD8_v2, unsigned char, 1, 0)
MEMSET(cuMemsetD8_v2_ptds, unsigned char, 1, 0)
MEMSET(cuMemsetD16_v2, unsigned short, 2, 0)
MEMSET(cuMemsetD16_v2_ptds, unsigned short, 2, 0)
MEMSET(cuMemsetD32_v2, unsigned int, 4, 0)
MEMSET(cuMemsetD32_v2_ptds, unsigned int, 4, 0)
MEMSET_ASYNC(cuMemsetD8Async, unsigned char, 1)
MEMSET_ASYNC(cuMemsetD8Async_ptsz, unsigned char, 1)
MEMSET_ASYNC(cuMemsetD16Async, unsigned short, 2)
MEMSET_ASYNC(cuMemsetD16Async_ptsz, unsigned short, 2)
MEMSET_ASYNC(cuMemsetD32Async, unsigned int, 4)
MEMSET_ASYNC(cuMemsetD32Async_ptsz, unsigned int, 4)

/* ---- pinned host memory. Plain blocks are page-aligned host memory: copies from them go
 * as from any host memory (inline or staged); they are not charged to the quota and have no
 * device address. Mapped blocks (CU_MEMHOSTALLOC_DEVICEMAP, zero-copy) are a file of the
 * tenant's shm/ the executor made and mapped (host_alloc: charged to the quota on a CPU
 * device, as the memory it is), mapped here too, at the executor's address where that is
 * free, so that the device pointer is the host pointer, as with unified addressing. The
 * blocks are remembered so that cuMemFreeHost refuses a pointer that is not one. ---- */
enum { HOSTALLOC_DEVICEMAP = 0x2 };
struct hblock { void *p; size_t n; unsigned flags; int dev; uint64_t dptr; };   /* dptr: mapped ones' */
static struct hblock *hosts;
static size_t nhosts, caphosts;

static CUresult map_host(int dev, size_t n, void **pp, uint64_t *dptr) {             /* lock held */
    struct kc_buf b = {0};
    mp_str(&b, KCP_EXECUTOR_HOST_ALLOC_SIZE); mp_uint(&b, n);
    struct mp_val r, path;
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, KCP_EXECUTOR_HOST_ALLOC, &b, 1, &r);
    mp_free(&b);
    if (rc) return rc;
    char name[256] = "";
    if (kc_uint_of(&r, KCP_EXECUTOR_HOST_ALLOC_R_PTR, dptr) || mp_find(&r, KCP_EXECUTOR_HOST_ALLOC_R_PATH, &path) != 1 ||
        path.type != MP_STR || path.len >= sizeof name)
        return CUDA_ERROR_UNKNOWN;
    memcpy(name, path.data, path.len);
    void *p = kc_shm_map(name, n, *dptr);
    kc_request1(dev, KCP_EXECUTOR_HOST_MAPPED, KCP_EXECUTOR_HOST_MAPPED_PTR, *dptr, &r);   /* the name can go */
    if (!p) {
        kc_log("kubecash: cuMemHostAlloc: cannot map the executor's %zu bytes of mapped host memory: %s", n,
               strerror(errno));
        kc_request1(dev, KCP_EXECUTOR_HOST_FREE, KCP_EXECUTOR_HOST_FREE_PTR, *dptr, &r);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *pp = p;
    return CUDA_SUCCESS;
}

static CUresult host_alloc(void **pp, size_t n, unsigned flags) {
    if (!pp || n == 0) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult rc = lock_current(&dev);
    if (rc) return rc;
    void *p = NULL;
    uint64_t dptr = 0;
    long page = sysconf(_SC_PAGESIZE);
    if (nhosts == caphosts) {
        size_t cap = caphosts ? caphosts * 2 : 16;
        struct hblock *q = realloc(hosts, cap * sizeof *q);
        if (q) { hosts = q; caphosts = cap; }
    }
    if (nhosts == caphosts) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else if (flags & HOSTALLOC_DEVICEMAP) rc = map_host(dev, n, &p, &dptr);
    else if (posix_memalign(&p, page > 0 ? (size_t)page : 4096, n)) rc = CUDA_ERROR_OUT_OF_MEMORY;
    if (!rc) { hosts[nhosts++] = (struct hblock){p, n, flags, dev, dptr}; *pp = p; }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t bytesize) { return host_alloc(pp, bytesize, 0); }

KC_EXPORT CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags) {
    if (Flags & ~0x7u) return CUDA_ERROR_INVALID_VALUE;   /* PORTABLE, DEVICEMAP, WRITECOMBINED */
    return host_alloc(pp, bytesize, Flags);
}

static struct hblock *host_block(const void *p) {                                    /* lock held */
    for (size_t i = 0; i < nhosts; i++)
        if ((uintptr_t)p - (uintptr_t)hosts[i].p < hosts[i].n) return &hosts[i];
    return NULL;
}

KC_EXPORT CUresult cuMemFreeHost(void *p) {
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct hblock *h = host_block(p);
    if (!h || h->p != p) rc = CUDA_ERROR_INVALID_VALUE;
    else {
        if (h->dptr) {          /* after the work queued before it, as the executor orders it */
            struct mp_val r;
            munmap(p, h->n);
            rc = kc_request1(h->dev, KCP_EXECUTOR_HOST_FREE, KCP_EXECUTOR_HOST_FREE_PTR, h->dptr, &r);
        } else {
            free(p);
        }
        *h = hosts[--nhosts];
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *pdptr, void *p, unsigned int Flags) {
    if (!pdptr || !p || Flags) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct hblock *h = host_block(p);
    if (!h) rc = CUDA_ERROR_INVALID_VALUE;
    else if (!h->dptr) {
        kc_log("kubecash: cuMemHostGetDevicePointer: %p is pinned memory not allocated with "
               "CU_MEMHOSTALLOC_DEVICEMAP (cudaHostAllocMapped): it has no device address here", p);
        rc = CUDA_ERROR_INVALID_VALUE;
    } else {
        *pdptr = h->dptr + ((uintptr_t)p - (uintptr_t)h->p);
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemHostGetFlags(unsigned int *pFlags, void *p) {
    if (!pFlags || !p) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct hblock *h = host_block(p);
    if (!h) rc = CUDA_ERROR_INVALID_VALUE;
    else *pFlags = h->flags;
    kc_unlock();
    return rc;
}

/* ---- pointer attributes: what an address is, from this library's own records (device
 * allocations and module globals of this session, pinned host blocks). ---- */
enum {
    PA_CONTEXT = 1, PA_MEMORY_TYPE = 2, PA_DEVICE_POINTER = 3, PA_HOST_POINTER = 4, PA_SYNC_MEMOPS = 6,
    PA_BUFFER_ID = 7, PA_IS_MANAGED = 8, PA_DEVICE_ORDINAL = 9, PA_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
    PA_RANGE_START_ADDR = 11, PA_RANGE_SIZE = 12, PA_MAPPED = 13, PA_IS_GPU_DIRECT_RDMA_CAPABLE = 15,
};
enum { MT_NONE = 0, MT_HOST = 1, MT_DEVICE = 2 };
/* dptr, hptr: the address's device and host addresses (0: it has none; a mapped host block has both) */
struct pinfo { int type, dev; uint64_t base, size, dptr, hptr; };

static struct pinfo pointer_info(uint64_t p) {                 /* lock held */
    struct pinfo i = {MT_NONE, -2, 0, 0, 0, 0};
    ranges_fresh();
    size_t lo = 0, hi = nranges;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ranges[mid].base <= p) lo = mid + 1; else hi = mid;
    }
    if (lo && p - ranges[lo - 1].base < ranges[lo - 1].size)
        return (struct pinfo){MT_DEVICE, ranges[lo - 1].dev, ranges[lo - 1].base, ranges[lo - 1].size, p, 0};
    for (size_t k = 0; k < nhosts; k++) {
        const struct hblock *h = &hosts[k];
        const uint64_t host = (uint64_t)(uintptr_t)h->p;
        if (p - host < h->n)
            return (struct pinfo){MT_HOST, h->dptr ? h->dev : kc_current_device(), host, h->n,
                                  h->dptr ? h->dptr + (p - host) : 0, p};
        if (h->dptr && p - h->dptr < h->n)          /* a mapped block by its device address */
            return (struct pinfo){MT_HOST, h->dev, host, h->n, p, host + (p - h->dptr)};
    }
    return i;
}

/* One attribute into *out. Unknown memory (MT_NONE) reads as CUDA's defaults for it; so
 * does (`plural`: cuPointerGetAttributes) what the memory has not, as NULL. */
static CUresult pointer_attr(const struct pinfo *i, int attr, uint64_t p, void *out, int plural) {
    int device = i->type == MT_DEVICE, known = i->type != MT_NONE;
    switch (attr) {
    case PA_CONTEXT: {
        *(void **)out = known ? kc_primary_of(i->dev) : NULL;     /* lock held: not kc_primary_context */
        return CUDA_SUCCESS;
    }
    case PA_MEMORY_TYPE: *(unsigned *)out = (unsigned)i->type; return CUDA_SUCCESS;
    case PA_DEVICE_POINTER:                        /* plain pinned blocks have no device address here */
        if (known && !i->dptr && !plural) return CUDA_ERROR_NOT_SUPPORTED;
        *(uint64_t *)out = i->dptr;
        return CUDA_SUCCESS;
    case PA_HOST_POINTER:
        if (device) return CUDA_ERROR_INVALID_VALUE;            /* device memory: no host address */
        *(void **)out = (void *)(uintptr_t)i->hptr;
        return CUDA_SUCCESS;
    case PA_SYNC_MEMOPS: *(int *)out = known; return CUDA_SUCCESS;   /* the executor orders copies itself */
    case PA_BUFFER_ID: *(unsigned long long *)out = known ? i->base : 0; return CUDA_SUCCESS;
    case PA_IS_MANAGED: case PA_IS_LEGACY_CUDA_IPC_CAPABLE: case PA_IS_GPU_DIRECT_RDMA_CAPABLE:
        *(int *)out = 0;
        return CUDA_SUCCESS;
    case PA_DEVICE_ORDINAL: *(int *)out = known ? i->dev : -2; return CUDA_SUCCESS;
    case PA_RANGE_START_ADDR: *(uint64_t *)out = i->base; return CUDA_SUCCESS;
    case PA_RANGE_SIZE: *(size_t *)out = (size_t)i->size; return CUDA_SUCCESS;
    case PA_MAPPED: *(int *)out = device || i->dptr; return CUDA_SUCCESS;
    }
    kc_log("kubecash: cuPointerGetAttribute: attribute %d is not supported", attr);
    return CUDA_ERROR_NOT_SUPPORTED;
}

KC_EXPORT CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr ptr) {
    if (!data) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct pinfo i = pointer_info(ptr);
    rc = i.type == MT_NONE ? CUDA_ERROR_INVALID_VALUE : pointer_attr(&i, attribute, ptr, data, 0);
    kc_unlock();
    return rc;
}

/* Unlike the singular call, an address no allocation holds is no error: its attributes read
 * as CUDA's defaults (memory type 0, what cudart calls unregistered memory). */
KC_EXPORT CUresult cuPointerGetAttributes(unsigned int n, int *attributes, void **data, CUdeviceptr ptr) {
    if (n && (!attributes || !data)) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    struct pinfo i = pointer_info(ptr);
    for (unsigned k = 0; !rc && k < n; k++)
        rc = data[k] ? pointer_attr(&i, attributes[k], ptr, data[k], 1) : CUDA_ERROR_INVALID_VALUE;
    kc_unlock();
    return rc;
}
