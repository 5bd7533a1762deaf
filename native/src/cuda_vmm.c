/* Virtual memory management: cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess,
 * cuMemUnmap, cuMemRelease, cuMemAddressFree and the queries around them (what PyTorch's
 * expandable segments and NCCL use).
 *
 * The executor owns the truth (broker/executor/ops_vmm.py): a reservation is address space
 * in the device's arena, a physical allocation a range of the arena file (charged to the
 * quota), a mapping that file range placed at a reserved address. This process mirrors each
 * step in its own view of the arena (the same address where the arena is mapped at the
 * executor's), so a device pointer into a mapping is the same memory here and two mappings
 * of one allocation alias. Handles, properties and retain counts are kept here.
 * Shareable handles (cuMemExportToShareableHandle and its import) are cross-process: stubs. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "gen_protocol.h"
#include "kc.h"

typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

/* cuda.h's layouts (12.x and 13.x agree) */
struct mem_location { int type; int id; };
struct mem_prop {
    int type, requested_handle_types;
    struct mem_location location;
    void *win32_metadata;
    struct { unsigned char compression, rdma; unsigned short usage; unsigned char reserved[4]; } flags;
};
struct mem_access_desc { struct mem_location location; int flags; };
enum { LOC_DEVICE = 1, TYPE_PINNED = 1, ACCESS_NONE = 0, ACCESS_READ = 1, ACCESS_RW = 3 };

#ifndef MAP_NORESERVE
#define MAP_NORESERVE 0x4000
#endif
#define G ((uint64_t)KCP_VMM_GRANULARITY)
#define HANDLE_TAG 0x4b43000000000000ull    /* "KC": a handle value no pointer or count is */

/* refs: cuMemCreate's and each cuMemRetainAllocationHandle's, undone by cuMemRelease; the
 * executor hears of the release when they are gone (told) and frees the memory with the last
 * mapping; the entry stays while mappings remain (cuMemGetAccess and retains look it up). */
struct vphys { uint64_t h, exec; int dev; size_t size; unsigned refs, maps; int told; struct mem_prop prop; };
struct vres { uint64_t p; size_t size; int dev; };
/* mirrored: this process's view holds the pages (else copies there go through the executor) */
struct vmap { uint64_t p; size_t size; uint64_t h; int access, mirrored; };
static struct vphys *phys; static size_t nphys, capphys;
static struct vres *res; static size_t nres, capres;
static struct vmap *maps; static size_t nmaps, capmaps;
static unsigned vmm_epoch;
static uint64_t next_handle;

static void vmm_fresh(void) {        /* a new session (a forked child's): the old tables are not ours */
    if (vmm_epoch != kc_session_epoch()) { nphys = nres = nmaps = 0; vmm_epoch = kc_session_epoch(); }
}

static CUresult lock_vmm(void) {     /* the session lock, and tables of this session */
    CUresult rc = kc_lock(0);
    if (!rc) vmm_fresh();
    return rc;
}

static int grow(void **p, size_t *cap, size_t n, size_t elem) {
    if (n < *cap) return 0;
    size_t c = *cap ? *cap * 2 : 16;
    void *q = realloc(*p, c * elem);
    if (!q) return -1;
    *p = q; *cap = c;
    return 0;
}

static struct vphys *phys_of(uint64_t h) {
    for (size_t i = 0; i < nphys; i++) if (phys[i].h == h) return &phys[i];
    return NULL;
}
static struct vres *res_of(uint64_t p, size_t n) {      /* the reservation holding [p, p+n) */
    for (size_t i = 0; i < nres; i++)
        if (p >= res[i].p && n <= res[i].size && p - res[i].p <= res[i].size - n) return &res[i];
    return NULL;
}
static struct vmap *map_at(uint64_t p) {                /* the mapping holding address p */
    for (size_t i = 0; i < nmaps; i++) if (p >= maps[i].p && p - maps[i].p < maps[i].size) return &maps[i];
    return NULL;
}

/* This process's view of device address p (NULL: the arena is not mapped here). */
static void *view(int dev, uint64_t p) {
    const struct kc_device *d = kc_device(dev);
    return d && d->arena ? d->arena + (p - d->arena_base) : NULL;
}
/* Do in this process's view what the executor did: 1 done, 0 not (no view, or it failed). */
static int mirror(int dev, uint64_t p, size_t n, int prot, int fd, off_t off, const char *what) {
    void *v = view(dev, p);
    if (!v) return 0;
    int flags = MAP_FIXED | MAP_NORESERVE | (fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED);
    if (mmap(v, n, prot, flags, fd, off) != MAP_FAILED) return 1;
    kc_log("kubecash: %s: mirroring %#llx+%zu in this process failed: %s (copies there go through the executor)",
           what, (unsigned long long)p, n, strerror(errno));
    return 0;
}

static int prot_of(int access) {
    return access == ACCESS_RW ? PROT_READ | PROT_WRITE : access == ACCESS_READ ? PROT_READ : PROT_NONE;
}

static CUresult check_prop(const struct mem_prop *prop, const char *call) {
    if (!prop || prop->type != TYPE_PINNED || prop->location.type != LOC_DEVICE) {
        if (prop && prop->type != TYPE_PINNED)
            kc_log("kubecash: %s: allocation type %d: only CU_MEM_ALLOCATION_TYPE_PINNED is offered", call, prop->type);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!kc_device(prop->location.id)) return CUDA_ERROR_INVALID_DEVICE;
    if (prop->flags.compression) {
        kc_log("kubecash: %s: compressible memory is not supported", call);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}

static CUresult request2(int dev, const char *op, const char *k1, uint64_t v1, const char *k2, uint64_t v2,
                         struct mp_val *r) {
    struct kc_buf b = {0};
    mp_str(&b, k1); mp_uint(&b, v1);
    mp_str(&b, k2); mp_uint(&b, v2);
    CUresult rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(dev, op, &b, 2, r);
    mp_free(&b);
    return rc;
}

/* A request naming [ptr, ptr+size) of reservation v (NULL: none, INVALID_VALUE). */
static CUresult range_request(const struct vres *v, const char *op, const char *kp, const char *ks, uint64_t ptr,
                              size_t size) {
    struct mp_val r;
    return v ? request2(v->dev, op, kp, ptr, ks, size, &r) : CUDA_ERROR_INVALID_VALUE;
}

KC_EXPORT CUresult cuMemGetAllocationGranularity(size_t *granularity, const struct mem_prop *prop, int option) {
    if (!granularity || (option != 0 && option != 1)) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = kc_lock(0);
    if (rc) return rc;
    rc = check_prop(prop, "cuMemGetAllocationGranularity");
    if (!rc) *granularity = (size_t)G;          /* minimum and recommended alike */
    kc_unlock();
    return rc;
}

/* The device a reservation belongs to: the calling thread's current context's (a reservation
 * is address space of one device's arena here, where CUDA's spans every device). */
KC_EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                       unsigned long long flags) {
    (void)addr;                                 /* a hint: CUDA may place it elsewhere, and so do we */
    if (!ptr || size == 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    int dev = kc_current_device();
    struct mp_val r;
    uint64_t p;
    if (dev < 0) rc = CUDA_ERROR_INVALID_CONTEXT;
    else if (grow((void **)&res, &capres, nres, sizeof *res)) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else rc = request2(dev, KCP_EXECUTOR_VMM_RESERVE, KCP_EXECUTOR_VMM_RESERVE_SIZE, size,
                       KCP_EXECUTOR_VMM_RESERVE_ALIGN, alignment, &r);
    if (!rc && kc_uint_of(&r, KCP_EXECUTOR_VMM_RESERVE_R_PTR, &p)) rc = CUDA_ERROR_UNKNOWN;
    if (!rc) {
        mirror(dev, p, size, PROT_NONE, -1, 0, "cuMemAddressReserve");
        res[nres++] = (struct vres){p, size, dev};
        *ptr = p;
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vres *v = res_of(ptr, size);
    rc = v && v->p == ptr && v->size == size
         ? range_request(v, KCP_EXECUTOR_VMM_FREE, KCP_EXECUTOR_VMM_FREE_PTR, KCP_EXECUTOR_VMM_FREE_SIZE, ptr, size)
         : CUDA_ERROR_INVALID_VALUE;
    if (!rc) {
        const struct kc_device *d = kc_device(v->dev);
        if (d && d->arena)            /* the arena's own pages there again, as the executor did */
            mirror(v->dev, ptr, size, PROT_READ | PROT_WRITE, d->arena_fd, (off_t)(ptr - d->arena_base),
                   "cuMemAddressFree");
        *v = res[--nres];
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const struct mem_prop *prop,
                               unsigned long long flags) {
    if (!handle || size == 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    /* requestedHandleTypes is accepted (PyTorch asks for POSIX fds); exporting is refused */
    rc = check_prop(prop, "cuMemCreate");
    struct mp_val r;
    uint64_t h;
    int dev = rc ? -1 : prop->location.id;
    if (!rc && grow((void **)&phys, &capphys, nphys, sizeof *phys)) rc = CUDA_ERROR_OUT_OF_MEMORY;
    if (!rc) rc = kc_request1(dev, KCP_EXECUTOR_VMM_CREATE, KCP_EXECUTOR_VMM_CREATE_SIZE, size, &r);
    if (!rc && kc_uint_of(&r, KCP_EXECUTOR_VMM_CREATE_R_HANDLE, &h)) rc = CUDA_ERROR_UNKNOWN;
    if (!rc) {
        phys[nphys++] = (struct vphys){HANDLE_TAG | ++next_handle, h, dev, size, 1, 0, 0, *prop};
        *handle = phys[nphys - 1].h;
    }
    kc_unlock();
    return rc;
}

static void drop_if_done(struct vphys *v) {
    if (v->refs == 0 && v->maps == 0) *v = phys[--nphys];
}

static CUresult release(struct vphys *v) {
    if (v->refs == 0) return CUDA_ERROR_INVALID_VALUE;      /* released already, still mapped */
    CUresult rc = CUDA_SUCCESS;
    if (--v->refs == 0 && !v->told) {
        struct mp_val r;
        rc = kc_request1(v->dev, KCP_EXECUTOR_VMM_RELEASE, KCP_EXECUTOR_VMM_RELEASE_HANDLE, v->exec, &r);
        if (rc) { v->refs = 1; return rc; }
        v->told = 1;
    }
    drop_if_done(v);
    return rc;
}

KC_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vphys *v = phys_of(handle);
    rc = v ? release(v) : CUDA_ERROR_INVALID_VALUE;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                            unsigned long long flags) {
    if (size == 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vphys *v = phys_of(handle);
    struct vres *rv = res_of(ptr, size);
    struct mp_val r;
    uint64_t file_off;
    if (!v || !rv || v->refs == 0) rc = CUDA_ERROR_INVALID_VALUE;
    else if (v->dev != rv->dev) {
        kc_log("kubecash: cuMemMap: memory of device %d mapped in a range reserved on device %d is not supported",
               v->dev, rv->dev);
        rc = CUDA_ERROR_NOT_SUPPORTED;
    } else if (grow((void **)&maps, &capmaps, nmaps, sizeof *maps)) rc = CUDA_ERROR_OUT_OF_MEMORY;
    else {
        struct kc_buf b = {0};
        mp_str(&b, KCP_EXECUTOR_VMM_MAP_PTR); mp_uint(&b, ptr);
        mp_str(&b, KCP_EXECUTOR_VMM_MAP_SIZE); mp_uint(&b, size);
        mp_str(&b, KCP_EXECUTOR_VMM_MAP_OFFSET); mp_uint(&b, offset);
        mp_str(&b, KCP_EXECUTOR_VMM_MAP_HANDLE); mp_uint(&b, v->exec);
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(v->dev, KCP_EXECUTOR_VMM_MAP, &b, 4, &r);
        mp_free(&b);
        if (!rc && kc_uint_of(&r, KCP_EXECUTOR_VMM_MAP_R_FILE_OFFSET, &file_off)) rc = CUDA_ERROR_UNKNOWN;
    }
    if (!rc) {
        const struct kc_device *d = kc_device(v->dev);
        int mirrored = d->arena && mirror(v->dev, ptr, size, PROT_NONE, d->arena_fd, (off_t)file_off, "cuMemMap");
        maps[nmaps++] = (struct vmap){ptr, size, handle, ACCESS_NONE, mirrored};
        v->maps++;                      /* a mapping holds its allocation (cuMemRelease may come first) */
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vres *rv = size ? res_of(ptr, size) : NULL;
    rc = range_request(rv, KCP_EXECUTOR_VMM_UNMAP, KCP_EXECUTOR_VMM_UNMAP_PTR, KCP_EXECUTOR_VMM_UNMAP_SIZE, ptr, size);
    if (!rc) {
        mirror(rv->dev, ptr, size, PROT_NONE, -1, 0, "cuMemUnmap");
        for (size_t i = nmaps; i-- > 0;)          /* the executor checked: whole mappings */
            if (maps[i].p >= ptr && maps[i].p - ptr < size) {
                struct vmap m = maps[i];
                maps[i] = maps[--nmaps];
                if (m.access == ACCESS_RW) kc_alloc_forget(m.p);     /* noted or not: a no-op then */
                struct vphys *v = phys_of(m.h);
                if (v) { v->maps--; drop_if_done(v); }   /* the executor frees it likewise */
            }
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const struct mem_access_desc *desc, size_t count) {
    if (!desc || count == 0 || size == 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vres *rv = res_of(ptr, size);
    int access = -1;
    struct mp_val r;
    if (!rv) rc = CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; !rc && i < count; i++) {
        int f = desc[i].flags;
        if (desc[i].location.type != LOC_DEVICE || (f != ACCESS_NONE && f != ACCESS_READ && f != ACCESS_RW))
            rc = CUDA_ERROR_INVALID_VALUE;
        else if (!kc_device(desc[i].location.id)) rc = CUDA_ERROR_INVALID_DEVICE;
        else if (desc[i].location.id != rv->dev) {
            kc_log("kubecash: cuMemSetAccess: access from device %d to memory of device %d (peer access) is not supported",
                   desc[i].location.id, rv->dev);
            rc = CUDA_ERROR_NOT_SUPPORTED;
        } else access = f;
    }
    if (!rc) {
        struct kc_buf b = {0};
        mp_str(&b, KCP_EXECUTOR_VMM_ACCESS_PTR); mp_uint(&b, ptr);
        mp_str(&b, KCP_EXECUTOR_VMM_ACCESS_SIZE); mp_uint(&b, size);
        mp_str(&b, KCP_EXECUTOR_VMM_ACCESS_ACCESS); mp_uint(&b, (uint64_t)access);
        rc = b.oom ? CUDA_ERROR_OUT_OF_MEMORY : kc_exec_request(rv->dev, KCP_EXECUTOR_VMM_ACCESS, &b, 3, &r);
        mp_free(&b);
    }
    if (!rc) {
        void *v = view(rv->dev, ptr);
        int ok = v && mprotect(v, size, prot_of(access)) == 0;
        if (v && !ok) kc_log("kubecash: cuMemSetAccess: mprotect of this process's view failed: %s", strerror(errno));
        for (size_t i = 0; i < nmaps; i++)
            if (maps[i].p >= ptr && maps[i].p - ptr < size) {
                /* read-write mappings this view holds are device memory for cuMemcpy and
                 * copied in place here; the others go through the executor, which checks */
                if (maps[i].access == ACCESS_RW) kc_alloc_forget(maps[i].p);
                maps[i].mirrored &= ok;
                if (access == ACCESS_RW && maps[i].mirrored) kc_alloc_note(rv->dev, maps[i].p, maps[i].size);
                maps[i].access = access;
            }
    }
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemGetAccess(unsigned long long *flags, const struct mem_location *location, CUdeviceptr ptr) {
    if (!flags || !location) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vmap *m = map_at(ptr);
    struct vphys *v = m ? phys_of(m->h) : NULL;
    if (!m || !v || location->type != LOC_DEVICE) rc = CUDA_ERROR_INVALID_VALUE;
    else *flags = location->id == v->dev ? (unsigned long long)m->access : ACCESS_NONE;
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr) {
    if (!handle) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vmap *m = map_at((uint64_t)(uintptr_t)addr);
    struct vphys *v = m ? phys_of(m->h) : NULL;
    if (!v) rc = CUDA_ERROR_INVALID_VALUE;
    else { v->refs++; *handle = v->h; }       /* undone by a matching cuMemRelease */
    kc_unlock();
    return rc;
}

KC_EXPORT CUresult cuMemGetAllocationPropertiesFromHandle(struct mem_prop *prop, CUmemGenericAllocationHandle handle) {
    if (!prop) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = lock_vmm();
    if (rc) return rc;
    struct vphys *v = phys_of(handle);
    if (!v) rc = CUDA_ERROR_INVALID_VALUE;
    else *prop = v->prop;
    kc_unlock();
    return rc;
}
