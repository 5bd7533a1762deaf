/* KubeCASH's libcuda.so.1 / libnvidia-ml.so.1: what the C files share.
 * Self-contained on purpose (no cuda.h): the build needs no CUDA headers. */
#ifndef KC_H
#define KC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define KC_EXPORT __attribute__((visibility("default")))

typedef int CUresult;
enum {
    CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3, CUDA_ERROR_NO_DEVICE = 100, CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201, CUDA_ERROR_INVALID_IMAGE = 200, CUDA_ERROR_FILE_NOT_FOUND = 301,
    CUDA_ERROR_INVALID_HANDLE = 400, CUDA_ERROR_ILLEGAL_STATE = 401, CUDA_ERROR_NOT_FOUND = 500, CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE = 720,
    CUDA_ERROR_NOT_SUPPORTED = 801, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901, CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908, CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE = 910,
    CUDA_ERROR_UNKNOWN = 999,
};

/* ---- logging (session.c) ---- */
void kc_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kc_log_record(const char *line, size_t n);   /* cuda_logs.c: each kc_log line, for cuLogs* */
int kc_debug(void);        /* KUBECASH_DEBUG is set (non-empty): trace what programs ask */
/* Log "kubecash: <name> is not supported" the first time *once is seen clear. */
void kc_unsupported_once(const char *name, int *once);

/* Stubs for the entry points the table leaves NOT_SUPPORTED (gen_surface.c, gen_nvml.c). */
#define KC_STUB(name) \
    KC_EXPORT CUresult name(void) { static int once; kc_unsupported_once(#name, &once); \
                                    return CUDA_ERROR_NOT_SUPPORTED; }
#define KC_NVML_STUB(name) \
    KC_EXPORT int name(void) { static int once; kc_unsupported_once(#name, &once); \
                               return 3; /* NVML_ERROR_NOT_SUPPORTED */ }

/* ---- generated tables ---- */
struct kc_proc { const char *name; int version; int per_thread; void *fn; };
extern const struct kc_proc kc_procs[];
extern const int kc_nprocs;
struct kc_errname { int code; const char *name; const char *text; };
extern const struct kc_errname kc_errnames[];
extern const int kc_nerrnames;
extern const int kc_driver_version;
/* KC_ATTR_ON_CPU: value on a CPU device, index on others */
enum kc_attr_kind { KC_ATTR_PROP, KC_ATTR_CONST, KC_ATTR_CPU, KC_ATTR_ON_CPU };
struct kc_attr { int attr; enum kc_attr_kind kind; const char *key; int index; long long value; };
extern const struct kc_attr kc_attrs[];
extern const int kc_nattrs;

/* ---- MessagePack (mpack.c): an encoder into a growing buffer, a bounds-checked reader ---- */
struct kc_buf { uint8_t *p; size_t n, cap; int oom; };
void mp_free(struct kc_buf *b);
void mp_raw(struct kc_buf *b, const void *p, size_t n);   /* already-encoded bytes */
void mp_map(struct kc_buf *b, uint32_t n);
void mp_array(struct kc_buf *b, uint32_t n);
void mp_str(struct kc_buf *b, const char *s);
void mp_bin(struct kc_buf *b, const void *p, size_t n);
void mp_uint(struct kc_buf *b, uint64_t v);
void mp_int(struct kc_buf *b, int64_t v);
void mp_bool(struct kc_buf *b, int v);

enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_UINT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_EXT };
/* One decoded value: scalars in place, str/bin point into the message, array/map give their
 * count and `next` points at their first element. */
struct mp_val {
    enum mp_type type;
    union { int b; int64_t i; uint64_t u; double f; } v;
    const uint8_t *data; uint32_t len;     /* str/bin bytes; array/map element count */
    const uint8_t *next;                   /* just past the header (for containers) or the value */
    const uint8_t *start;                  /* where the value's encoding begins */
    const uint8_t *end;                    /* the end of the whole buffer */
};
int mp_read(const uint8_t *p, const uint8_t *end, struct mp_val *out);   /* 0 ok, -1 malformed */
int mp_skip(const uint8_t *p, const uint8_t *end, const uint8_t **after); /* past one value */
/* In map `m` (a MP_MAP value), find `key`: 1 found (*out), 0 absent, -1 malformed. */
int mp_find(const struct mp_val *m, const char *key, struct mp_val *out);
/* Element i of array `a` (MP_ARRAY). 1 found, 0 out of range, -1 malformed. */
int mp_index(const struct mp_val *a, uint32_t i, struct mp_val *out);
int mp_as_int(const struct mp_val *v, int64_t *out);    /* an integer that fits: 0, else -1 */
int mp_as_double(const struct mp_val *v, double *out);

/* ---- ZMTP 3.1 DEALER over a Unix socket (zmtp.c) ---- */
struct kc_conn { int fd; uint8_t *rbuf; size_t rlen, rcap, rdone; };
/* Connect to ipc:// `address` and handshake within timeout_ms; on failure write why to err. */
int zmtp_connect(struct kc_conn *c, const char *address, int timeout_ms, char *err, size_t errlen);
int zmtp_send(struct kc_conn *c, const uint8_t *p, size_t n, char *err, size_t errlen);
/* Receive one message into *msg (owned by the connection until the next call): 1 got one,
 * 0 timed out, -1 failed (err says why). Commands (PING) are answered in passing. */
int zmtp_recv(struct kc_conn *c, const uint8_t **msg, size_t *n, int timeout_ms, char *err, size_t errlen);
void zmtp_close(struct kc_conn *c);     /* also right in a forked child: closes its copy only */

/* ---- the session with the broker (session.c) ---- */
#define KC_MAX_DEVICES 16
struct kc_device {
    char name[65], kind[16], model[256], model_prop[256];   /* model: model_prop or the name */
    uint64_t memory_limit;
    uint8_t uuid[16];
    uint8_t *desc; size_t desc_len;      /* the device's description map from hello, as sent */
    /* the executor for it, once attached (kc_device_attach) */
    int attached;
    struct kc_conn exec;
    uint8_t *staging; size_t staging_size;
    /* a CPU device's memory itself, mapped (attach's "arena"): copies are one memcpy here */
    uint8_t *arena; size_t arena_size; uint64_t arena_base;
    int arena_fd;                        /* its file, open while it is mapped (cuda_vmm.c maps it) */
    uint32_t window, posted;             /* async requests allowed before a ctx_sync; sent since */
    /* the push buffer: posted requests, encoded, waiting to leave as one "batch" (session.c) */
    struct kc_buf pb; uint32_t pb_n;
};
/* Lock the session (opening it if this process has none yet; `open` 0: only if open).
 * On success the caller holds the session lock and must kc_unlock(). */
CUresult kc_lock(int open);
void kc_unlock(void);
int kc_device_count(void);
struct kc_device *kc_device(int i);
/* One integer of a device's description: key, or element `index` (>= 0) of the list at key
 * (-1 when absent); its PCI location (domain, bus, device: a CPU device's is 0:0:index), and
 * the device at a PCI bus id string, -1 if none (lock held). */
int kc_desc_int(const struct kc_device *d, const char *key, int index, long long *out);
/* A file the executor made in the tenant's shm/ directory, mapped shared: at `want` where that
 * range is free here (0: anywhere), else anywhere; NULL if it cannot be. */
void *kc_shm_map(const char *name, size_t size, uint64_t want);
int kc_pci_of(const struct kc_device *d, unsigned loc[3]);
int kc_device_by_pci(const char *bus_id);
CUresult kc_device_attach(int i);                         /* lock held */
/* One executor request for device i (lock held): fields are the map's entries after the
 * envelope and session (nfields of them, already encoded in `body`). The reply is decoded
 * into *reply (valid until the next request). */
CUresult kc_exec_request(int i, const char *op, const struct kc_buf *body, uint32_t nfields,
                         struct mp_val *reply);
/* One asynchronous executor request (lock held): sent with "async", no reply; its error is
 * kept by the executor for the next synchronization. Every `window` of them a ctx_sync
 * waits for the queue to drain (a full push buffer), returning what earlier work raised. */
CUresult kc_exec_post(int i, const char *op, const struct kc_buf *body, uint32_t nfields);
/* Changes whenever this process opens a session: handles made in another one are stale. */
unsigned kc_session_epoch(void);
CUresult kc_broker_request(const char *op, const struct kc_buf *body, uint32_t nfields,
                           struct mp_val *reply, int timeout_ms);
const char *kc_address(void);
/* cuda_api.c, for cuda_exec.c (lock held): the calling thread's current context's device
 * (-1: none), and a copy between host and device i on `stream` (async: queue small ones). */
int kc_current_device(void);
CUresult kc_copy(int i, int to_device, uint64_t stream, int async, uint64_t dptr, void *host, size_t n);
/* cuda_exec.c: the device allocations of this session, for cuMemcpy's direction (lock held). */
void kc_alloc_note(int i, uint64_t ptr, size_t n);
void kc_alloc_forget(uint64_t ptr);
/* cuda_exec.c, lock held: a CUstream's device and executor handle; the device whose
 * allocation holds p (-1: host memory). */
CUresult kc_resolve_stream(void *stream, int *dev, uint64_t *h);
int kc_device_of(uint64_t p);
/* A reply's unsigned field (0, else -1); a request with one unsigned field (lock held). */
int kc_uint_of(const struct mp_val *m, const char *key, uint64_t *out);
CUresult kc_request1(int dev, const char *op, const char *key, uint64_t v, struct mp_val *r);
/* cuda_more.c: host functions queued on (dev, stream) not yet run (caller holds the session
 * lock or not); wait, without the session lock, until none is (dev -1: any device; stream 0:
 * any stream of the device, as the legacy default stream orders against them). */
int kc_hostfn_pending(int dev, uint64_t stream);
void kc_hostfn_wait(int dev, uint64_t stream);
/* cuda_more.c, lock held: a device allocation (mem_alloc) whose range is reserved in this
 * process, so no host address of the program can be a device address (noted for cuMemcpy);
 * kc_unguard: the reservation of an allocation being freed goes. */
CUresult kc_exec_alloc(int dev, size_t size, uint64_t *ptr);
void kc_unguard(uint64_t ptr);
/* Where [ptr, ptr+n) lies in device i's mapped arena, when it is inside one allocation this
 * session made there; NULL otherwise (the executor then checks and copies). */
uint8_t *kc_arena_at(int i, uint64_t ptr, size_t n);
/* A context is being reset or destroyed: run and drop what the runtime stored in it
 * through the context-local-storage export table (export_tables.c). No lock held. */
void kc_context_reset(void *ctx);
CUresult kc_primary_context(int dev, void **pctx);      /* cuda_api.c: the handle, not retained */
void *kc_primary_of(int dev);                           /* the same, lock held (NULL: no such device) */
void *kc_current_ctx(void);                             /* cuda_api.c: the calling thread's, or NULL */
void kc_ctx_objects_free(void *ctx);                    /* cuda_exec.c, lock held: what ctx made goes */
int kc_ctx_device(void *ctx);                           /* cuda_api.c, lock held: its device, or -1 */
void kc_sha256(const void *data, size_t n, uint8_t out[32]);   /* sha256.c */

/* ---- graphs (cuda_graph.c): a stream capture records the calls made on the stream as nodes
 * of a graph; an instantiated graph replays them, in an order its dependencies allow, on the
 * stream it is launched on. ---- */
enum kc_gkind { KC_G_EMPTY, KC_G_KERNEL, KC_G_MEMSET, KC_G_COPY, KC_G_HOST, KC_G_EVENT_RECORD, KC_G_EVENT_WAIT };
enum { KC_COPY_HTOD, KC_COPY_DTOH, KC_COPY_DTOD, KC_COPY_ANY };
struct kc_gnode {
    enum kc_gkind kind;
    void *f; unsigned grid[3], block[3], shared; uint8_t *args; size_t size;   /* kernel (args: owned) */
    int coop;                                                                  /* kernel: cooperative */
    uint64_t dst, src; size_t n; int what;                                     /* copy */
    size_t pitch, width, height; unsigned value, elem;                         /* memset (and dst) */
    void (*fn)(void *); void *data;                                            /* host function */
    void *event;                                                               /* event record/wait */
};
/* cuda_exec.c (lock held): the capture stream s records into, or NULL; (lock not held) make
 * `capture` stream s's, returning the one it had. */
void *kc_capture_of(void *s);
CUresult kc_capture_swap(void *s, void *capture, void **old);
/* cuda_exec.c (lock not held): a launch, cooperative (every block resident at once) or not. */
CUresult kc_launch(void *f, const unsigned grid[3], const unsigned block[3], unsigned shared, void *stream,
                   void **params, void **extra, int coop);
/* cuda_exec.c (lock not held): f's launch parameters laid out as an `extra` buffer (malloc'd). */
CUresult kc_flat_args(void *f, void **params, void **extra, uint8_t **out, size_t *size);
/* cuda_graph.c, lock not held: append a node (its args are taken over, freed on failure); end
 * the capture with rc (its EndCapture then says INVALIDATED) and return rc; its status
 * (CU_STREAM_CAPTURE_STATUS_*: NONE for NULL); whether an active capture recorded `event`;
 * how many captures are active. */
CUresult kc_capture_add(void *capture, const struct kc_gnode *n);
CUresult kc_capture_fail(void *capture, CUresult rc);
int kc_capture_status(void *capture);
int kc_capture_recorded(void *event);
int kc_captures_active(void);
#endif
