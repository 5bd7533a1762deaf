/* The process's session with the broker, as client/session.py and client/device.py hold it:
 * hello on the tenant socket, then per device open_device -> connect to its executor ->
 * attach (and the staging segment), requests matched to replies by id, events handled in
 * passing, heartbeats on a connection of their own from a thread of our own.
 *
 * Nothing runs at load: the session opens at the first call that needs it. One mutex guards
 * the whole session (requests are synchronous). Fork: pthread_atfork keeps the mutex
 * consistent across fork, and a pid check makes a child that calls CUDA drop what it
 * inherited (closing its copies of the descriptors only, sending nothing) and open a session
 * of its own, as CUDA requires. No signal handlers; our thread blocks every signal, so the
 * program's handlers run on the program's threads. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "gen_protocol.h"
#include "kc.h"

#define HELLO_TIMEOUT_MS 10000
#define OPEN_TIMEOUT_MS 60000          /* open_device and attach: an executor may be starting */
#define SLICE_MS 100                   /* how often a waiting request looks at the session's health */
#define ENV_BROKER "KUBECASH_BROKER"
#define CLIENT_NAME "kubecash libcuda (C)"

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static struct {
    pid_t pid;                     /* the process whose session this is (0: none) */
    int open;
    int wanted;                    /* cuInit/nvmlInit succeeded here or in a parent process */
    CUresult failed;               /* opening failed in this process: the same answer again */
    char address[4096], dir[4096]; /* the broker address and its directory (the tenant's) */
    struct kc_conn broker;
    uint8_t token[64]; size_t token_len;
    double hb_interval, hb_timeout;
    uint8_t *hello; size_t hello_len;          /* the hello reply, which the device views point into */
    int ndev;
    struct kc_device dev[KC_MAX_DEVICES];
    CUresult dev_failed[KC_MAX_DEVICES];       /* an executor_died event's code */
    uint64_t next_id;
    unsigned epoch;                            /* sessions this process has opened */
    int broken;                                /* written by the heartbeat thread too */
    CUresult broken_code;
    char broken_why[512];
} g;

/* Where libcuda.so.1 keeps its messages for cuLogs* (cuda_logs.c); nothing in libnvidia-ml. */
__attribute__((weak)) void kc_log_record(const char *line, size_t n) { (void)line; (void)n; }

void kc_log(const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, line, (size_t)n);      /* one write: lines from threads do not interleave */
    (void)w;
    kc_log_record(line, (size_t)n);
}

int kc_debug(void) {
    const char *v = getenv("KUBECASH_DEBUG");
    return v && *v;
}

void kc_unsupported_once(const char *name, int *once) {
    if (!__atomic_exchange_n(once, 1, __ATOMIC_RELAXED)) kc_log("kubecash: %s is not supported", name);
}

static void atfork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_lock); }
static void atfork_child(void) { pthread_mutex_unlock(&g_lock); }   /* the pid check does the rest */
static void install_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

static void set_broken(CUresult code, const char *why) {
    if (__atomic_load_n(&g.broken, __ATOMIC_ACQUIRE)) return;
    snprintf(g.broken_why, sizeof g.broken_why, "%s", why);
    g.broken_code = code;
    __atomic_store_n(&g.broken, 1, __ATOMIC_RELEASE);
    kc_log("kubecash: session with the broker at %s ended: %s", g.address, why);
}

/* What a child inherited from its parent's session: closed here, never used or announced. */
static void drop_session(void) {
    if (g.open) zmtp_close(&g.broker);   /* never opened: its fd field is not a descriptor of ours */
    for (int i = 0; i < g.ndev; i++) {
        struct kc_device *d = &g.dev[i];
        if (d->attached) zmtp_close(&d->exec);
        mp_free(&d->pb);                 /* a forked child's copy of the parent's posts: not its own */
        d->pb_n = 0;
        if (d->staging) munmap(d->staging, d->staging_size);
        d->staging = NULL;
        if (d->arena) { munmap(d->arena, d->arena_size); close(d->arena_fd); }
        d->arena = NULL;
        d->attached = 0;
        g.dev_failed[i] = 0;
    }
    free(g.hello);
    g.hello = NULL;
    g.open = 0;
    g.ndev = 0;
    g.failed = 0;
    g.broken = 0;
}

static void put_envelope_as(struct kc_buf *b, uint64_t id, const char *op, uint32_t nfields, int session,
                            int async) {
    mp_map(b, 3 + (session ? 1 : 0) + (async ? 1 : 0) + nfields);
    mp_str(b, KCP_ENV_V); mp_uint(b, KCP_VERSION);
    mp_str(b, KCP_ENV_ID); mp_uint(b, id);
    mp_str(b, KCP_ENV_OP); mp_str(b, op);
    if (async) { mp_str(b, KCP_ENV_ASYNC); mp_bool(b, 1); }
    /* every request after hello carries the token under the same name (heartbeat's stands for all) */
    if (session) { mp_str(b, KCP_TENANT_HEARTBEAT_SESSION); mp_bin(b, g.token, g.token_len); }
}

static void put_envelope(struct kc_buf *b, uint64_t id, const char *op, uint32_t nfields, int session) {
    put_envelope_as(b, id, op, nfields, session, 0);
}

static int str_field(const struct mp_val *m, const char *key, char *out, size_t outlen) {
    struct mp_val v;
    if (mp_find(m, key, &v) != 1 || v.type != MP_STR) return -1;
    size_t n = v.len < outlen - 1 ? v.len : outlen - 1;
    memcpy(out, v.data, n);
    out[n] = 0;
    return 0;
}

static int int_field(const struct mp_val *m, const char *key, int64_t *out) {
    struct mp_val v;
    return mp_find(m, key, &v) == 1 && mp_as_int(&v, out) == 0 ? 0 : -1;
}

/* An event (a map with "event"): handled here; 1 if it was one. */
static int on_event(const struct mp_val *m) {
    char name[32];
    if (str_field(m, "event", name, sizeof name)) return 0;
    struct mp_val v;
    if (!strcmp(name, KCP_EVENT_STDOUT)) {              /* device printf, at the next call */
        if (mp_find(m, KCP_EVENT_STDOUT_DATA, &v) == 1 && v.type == MP_BIN) {
            fflush(stdout);
            ssize_t w = write(1, v.data, v.len);
            (void)w;
        }
    } else if (!strcmp(name, KCP_EVENT_SESSION_ENDED)) {
        char why[400] = "session ended by the broker";
        int64_t code = CUDA_ERROR_UNKNOWN;
        str_field(m, KCP_EVENT_SESSION_ENDED_ERROR, why, sizeof why);
        int_field(m, KCP_EVENT_SESSION_ENDED_CODE, &code);
        set_broken((CUresult)code, why);
    } else if (!strcmp(name, KCP_EVENT_EXECUTOR_DIED)) {
        char dev[65] = "", why[400] = "";
        int64_t code = CUDA_ERROR_UNKNOWN;
        str_field(m, KCP_EVENT_EXECUTOR_DIED_DEVICE, dev, sizeof dev);
        str_field(m, KCP_EVENT_EXECUTOR_DIED_ERROR, why, sizeof why);
        int_field(m, KCP_EVENT_EXECUTOR_DIED_CODE, &code);
        for (int i = 0; i < g.ndev; i++)
            if (!strcmp(g.dev[i].name, dev)) {
                g.dev_failed[i] = code ? (CUresult)code : CUDA_ERROR_UNKNOWN;
                kc_log("kubecash: the executor for %s ended: %s", dev, why);
            }
    }
    /* throttled: the broker reads this tenant again soon; the wait just goes on */
    return 1;
}

/* The executor's connection broke: its context is gone for good (as a GPU context is after
 * a fatal error). The broker says why in an executor_died event, which may come just after. */
static CUresult executor_lost(int device, char *err, size_t errlen) {
    const uint8_t *msg; size_t n;
    char why[512];
    snprintf(why, sizeof why, "%s", err);
    for (int k = 0; k < 30 && !g.dev_failed[device]; k++)      /* up to 3 s: a loaded machine */
        if (zmtp_recv(&g.broker, &msg, &n, SLICE_MS, err, errlen) > 0) {
            struct mp_val m;
            if (mp_read(msg, msg + n, &m) == 0 && m.type == MP_MAP) on_event(&m);
        }
    if (!g.dev_failed[device]) {
        g.dev_failed[device] = CUDA_ERROR_UNKNOWN;
        kc_log("kubecash: lost the executor for %s: %s", g.dev[device].name, why);
    }
    snprintf(err, errlen, "the executor for %s ended (%s)", g.dev[device].name, why);
    return g.dev_failed[device];
}

/* ---- the push buffer (client/transport.py's): posted requests leave as one "batch"
 * message at the next synchronizing request, at KCP_BATCH_MAX_OPS or _BYTES, or after
 * KCP_BATCH_DELAY_US (the flusher thread), so a launch costs a memcpy, not a system call. */
static pthread_mutex_t flush_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t flush_cv = PTHREAD_COND_INITIALIZER;
static int flush_wanted;                  /* under flush_mu */
static pid_t flusher_pid;                 /* the process whose flusher runs (lock held) */

/* Send device i's push buffer (lock held): 0, or what zmtp_send returned. */
static int flush_device(int i, char *err, size_t errlen) {
    struct kc_device *d = &g.dev[i];
    if (!d->pb_n) return 0;
    int bad;
    if (d->pb_n == 1) {
        bad = zmtp_send(&d->exec, d->pb.p, d->pb.n, err, errlen);
    } else {
        struct kc_buf b = {0};
        mp_map(&b, 6);
        mp_str(&b, KCP_ENV_V); mp_uint(&b, KCP_VERSION);
        mp_str(&b, KCP_ENV_ID); mp_uint(&b, 0);          /* nobody waits for it */
        mp_str(&b, KCP_ENV_OP); mp_str(&b, KCP_EXECUTOR_BATCH);
        mp_str(&b, KCP_ENV_ASYNC); mp_bool(&b, 1);
        mp_str(&b, KCP_EXECUTOR_BATCH_SESSION); mp_bin(&b, g.token, g.token_len);
        mp_str(&b, KCP_EXECUTOR_BATCH_OPS); mp_array(&b, d->pb_n);
        mp_raw(&b, d->pb.p, d->pb.n);
        bad = b.oom ? (snprintf(err, errlen, "out of memory"), -1) : zmtp_send(&d->exec, b.p, b.n, err, errlen);
        mp_free(&b);
    }
    d->pb.n = 0;
    d->pb.oom = 0;
    d->pb_n = 0;
    return bad;
}

/* Every device's push buffer, before a request that waits (lock held). A device whose
 * connection broke is marked lost, as a failed post would be. */
static void flush_all(void) {
    char err[512];
    for (int i = 0; i < g.ndev; i++)
        if (g.dev[i].pb_n && flush_device(i, err, sizeof err)) executor_lost(i, err, sizeof err);
}

static void *flusher_main(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&flush_mu);
        while (!flush_wanted) pthread_cond_wait(&flush_cv, &flush_mu);
        flush_wanted = 0;
        pthread_mutex_unlock(&flush_mu);
        struct timespec ts = {0, KCP_BATCH_DELAY_US * 1000L};
        while (nanosleep(&ts, &ts) && errno == EINTR) {}
        pthread_mutex_lock(&g_lock);
        if (g.open && g.pid == getpid()) flush_all();
        pthread_mutex_unlock(&g_lock);
    }
    return NULL;
}

static void start_thread(void *(*fn)(void *), const char *what);

/* A batch was opened: have the flusher send it after the delay (lock held). */
static void batch_opened(void) {
    if (flusher_pid != g.pid) {              /* this process's first (a child has no flusher) */
        flusher_pid = g.pid;
        pthread_mutex_init(&flush_mu, NULL);  /* a fork may have copied it held */
        pthread_cond_init(&flush_cv, NULL);
        flush_wanted = 0;
        start_thread(flusher_main, "flusher");
    }
    pthread_mutex_lock(&flush_mu);
    flush_wanted = 1;
    pthread_cond_signal(&flush_cv);
    pthread_mutex_unlock(&flush_mu);
}

/* Send request `op` on `c` and wait for its reply, watching the broker socket for events.
 * timeout_ms < 0: as long as the session and the device's executor live. */
static CUresult request(struct kc_conn *c, int device, const char *op, int session,
                        const struct kc_buf *body, uint32_t nfields, struct mp_val *reply,
                        int timeout_ms, char *err, size_t errlen) {
    struct kc_buf b = {0};
    uint64_t id = ++g.next_id;
    put_envelope(&b, id, op, nfields, session);
    if (body && body->n) mp_raw(&b, body->p, body->n);     /* the fields, encoded by the caller */
    if (b.oom) { mp_free(&b); snprintf(err, errlen, "out of memory"); return CUDA_ERROR_OUT_OF_MEMORY; }
    flush_all();                        /* what was posted runs before this */
    if (device >= 0 && g.dev_failed[device]) {
        mp_free(&b);
        snprintf(err, errlen, "the executor for %s ended", g.dev[device].name);
        return g.dev_failed[device];
    }
    int sent = zmtp_send(c, b.p, b.n, err, errlen);
    mp_free(&b);
    if (sent) return device >= 0 && c != &g.broker ? executor_lost(device, err, errlen) : CUDA_ERROR_UNKNOWN;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        const uint8_t *msg; size_t n;
        int r = zmtp_recv(c, &msg, &n, SLICE_MS, err, errlen);
        if (r < 0) {
            if (device >= 0 && c != &g.broker) return executor_lost(device, err, errlen);
            return CUDA_ERROR_UNKNOWN;
        }
        if (r > 0) {
            struct mp_val m;
            int64_t rid;
            if (mp_read(msg, msg + n, &m) || m.type != MP_MAP) continue;   /* not a message: dropped */
            if (on_event(&m)) continue;
            if (int_field(&m, KCP_ENV_ID, &rid) || (uint64_t)rid != id) continue;  /* a stale reply */
            struct mp_val ok;
            if (mp_find(&m, "ok", &ok) == 1 && ok.type == MP_BOOL && ok.v.b) { *reply = m; return CUDA_SUCCESS; }
            int64_t code = CUDA_ERROR_UNKNOWN;
            int_field(&m, "code", &code);
            if (str_field(&m, "error", err, errlen)) snprintf(err, errlen, "%s failed", op);
            return code ? (CUresult)code : CUDA_ERROR_UNKNOWN;     /* the broker's code, unchanged */
        }
        if (c != &g.broker) {          /* an executor request: the broker may say it died */
            while (zmtp_recv(&g.broker, &msg, &n, 0, err, errlen) > 0) {
                struct mp_val m;
                if (mp_read(msg, msg + n, &m) == 0 && m.type == MP_MAP) on_event(&m);
            }
        }
        if (__atomic_load_n(&g.broken, __ATOMIC_ACQUIRE)) {
            snprintf(err, errlen, "%s", g.broken_why);
            return g.broken_code;
        }
        if (device >= 0 && g.dev_failed[device]) {
            snprintf(err, errlen, "the executor for %s ended", g.dev[device].name);
            return g.dev_failed[device];
        }
        if (timeout_ms >= 0) {
            struct timespec t1;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            long long ms = (t1.tv_sec - t0.tv_sec) * 1000LL + (t1.tv_nsec - t0.tv_nsec) / 1000000;
            if (ms >= timeout_ms) {
                snprintf(err, errlen, "no answer to %s from %s within %d s", op, g.address, timeout_ms / 1000);
                return CUDA_ERROR_NOT_INITIALIZED;
            }
        }
    }
}

/* ---- heartbeats (client/session.py's _heartbeat): their own connection and thread ---- */
static void *heartbeat_main(void *arg) {
    (void)arg;
    struct kc_conn hb;
    char err[512];
    if (zmtp_connect(&hb, g.address, HELLO_TIMEOUT_MS, err, sizeof err)) {
        char why[700];
        snprintf(why, sizeof why, "heartbeat connection failed: %s", err);
        set_broken(CUDA_ERROR_UNKNOWN, why);
        return NULL;
    }
    struct timespec iv = {(time_t)g.hb_interval, (long)((g.hb_interval - (time_t)g.hb_interval) * 1e9)};
    int timeout_ms = (int)(g.hb_timeout * 1000);
    uint64_t id = 0;
    for (;;) {
        while (nanosleep(&iv, &iv) && errno == EINTR) {}
        iv.tv_sec = (time_t)g.hb_interval;
        iv.tv_nsec = (long)((g.hb_interval - (time_t)g.hb_interval) * 1e9);
        struct kc_buf b = {0};
        put_envelope(&b, ++id, KCP_TENANT_HEARTBEAT, 0, 1);
        int bad = b.oom || zmtp_send(&hb, b.p, b.n, err, sizeof err);
        mp_free(&b);
        if (bad) break;
        int answered = 0;
        while (!answered) {
            const uint8_t *msg; size_t n;
            int r = zmtp_recv(&hb, &msg, &n, timeout_ms, err, sizeof err);
            if (r < 0) goto out;
            if (r == 0) { snprintf(err, sizeof err, "the broker stopped answering heartbeats"); goto out; }
            struct mp_val m, ok;
            if (mp_read(msg, msg + n, &m) || m.type != MP_MAP || mp_find(&m, "event", &ok) == 1) continue;
            if (mp_find(&m, "ok", &ok) == 1 && ok.type == MP_BOOL && ok.v.b) { answered = 1; continue; }
            char why[400] = "heartbeat refused";
            str_field(&m, "error", why, sizeof why);
            snprintf(err, sizeof err, "%s", why);
            goto out;
        }
    }
out:
    set_broken(CUDA_ERROR_UNKNOWN, err);
    zmtp_close(&hb);
    return NULL;
}

static void start_thread(void *(*fn)(void *), const char *what) {
    pthread_attr_t a;
    pthread_t t;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);      /* the thread inherits the mask: no signals for it */
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &a, fn, NULL))
        kc_log("kubecash: cannot start the %s thread", what);
    pthread_attr_destroy(&a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void start_heartbeat(void) { start_thread(heartbeat_main, "heartbeat (the broker will end this session)"); }

/* 16 bytes naming the device: its "uuid" property (GPU-xxxxxxxx-...) or, as shim/devattr.py
 * derives it, sha256("kubecash:<name>:<model>")[:16]. */
static void device_uuid(struct kc_device *d, const struct mp_val *desc) {
    char u[128], hex[33];
    size_t k = 0;
    if (str_field(desc, "uuid", u, sizeof u) == 0) {
        const char *p = strncmp(u, "GPU-", 4) == 0 ? u + 4 : u;
        for (; *p && k < 33; p++)
            if (*p != '-') hex[k++] = *p;
        if (k == 32) {
            int good = 1;
            for (int i = 0; i < 16 && good; i++) {
                unsigned v;
                char two[3] = {hex[2 * i], hex[2 * i + 1], 0};
                good = sscanf(two, "%2x", &v) == 1 && strchr("0123456789abcdefABCDEF", two[0]) &&
                       strchr("0123456789abcdefABCDEF", two[1]);
                d->uuid[i] = (uint8_t)v;
            }
            if (good) return;
        }
    }
    char seed[400];
    uint8_t h[32];
    int n = snprintf(seed, sizeof seed, "kubecash:%s:%s", d->name, d->model_prop);
    kc_sha256(seed, (size_t)n, h);
    memcpy(d->uuid, h, 16);
}

static CUresult open_session(char *err, size_t errlen) {
    const char *addr = getenv(ENV_BROKER);
    if (!addr || !*addr) {
        snprintf(err, errlen, "%s is not set (the broker's address, ipc://.../broker.sock)", ENV_BROKER);
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    snprintf(g.address, sizeof g.address, "%s", addr);
    snprintf(g.dir, sizeof g.dir, "%s", strncmp(addr, "ipc://", 6) == 0 ? addr + 6 : "");
    char *slash = strrchr(g.dir, '/');
    if (slash) *slash = 0; else g.dir[0] = 0;
    char why[512];
    if (zmtp_connect(&g.broker, addr, HELLO_TIMEOUT_MS, why, sizeof why)) {
        snprintf(err, errlen, "cannot reach the broker at %s: %s", addr, why);
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    struct kc_buf body = {0};
    mp_str(&body, KCP_TENANT_HELLO_PID); mp_uint(&body, (uint64_t)getpid());
    mp_str(&body, KCP_TENANT_HELLO_CLIENT); mp_str(&body, CLIENT_NAME);
    struct mp_val r;
    CUresult rc = request(&g.broker, -1, KCP_TENANT_HELLO, 0, &body, 2, &r, HELLO_TIMEOUT_MS, why, sizeof why);
    mp_free(&body);
    if (rc) {
        snprintf(err, errlen, "hello to the broker at %s failed: %s", addr, why);
        zmtp_close(&g.broker);
        return rc;
    }
    /* Keep the reply: the device descriptions are read from it on demand. */
    struct mp_val tok, devs, m;
    const uint8_t *mend;
    if (mp_skip(r.start, r.end, &mend)) {
        snprintf(err, errlen, "the broker at %s sent a malformed hello reply", addr);
        zmtp_close(&g.broker);
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    g.hello_len = (size_t)(mend - r.start);
    g.hello = malloc(g.hello_len);
    if (!g.hello) { zmtp_close(&g.broker); snprintf(err, errlen, "out of memory"); return CUDA_ERROR_OUT_OF_MEMORY; }
    memcpy(g.hello, r.start, g.hello_len);
    if (mp_read(g.hello, g.hello + g.hello_len, &m) || mp_find(&m, KCP_TENANT_HELLO_R_SESSION, &tok) != 1 ||
        tok.type != MP_BIN || tok.len == 0 || tok.len > sizeof g.token ||
        mp_find(&m, KCP_TENANT_HELLO_R_DEVICES, &devs) != 1 || devs.type != MP_ARRAY) {
        snprintf(err, errlen, "the broker at %s sent a malformed hello reply", addr);
        goto bad;
    }
    memcpy(g.token, tok.data, tok.len);
    g.token_len = tok.len;
    struct mp_val v;
    if (mp_find(&m, KCP_TENANT_HELLO_R_HEARTBEAT_INTERVAL, &v) != 1 || mp_as_double(&v, &g.hb_interval) ||
        mp_find(&m, KCP_TENANT_HELLO_R_HEARTBEAT_TIMEOUT, &v) != 1 || mp_as_double(&v, &g.hb_timeout) ||
        !(g.hb_interval > 0) || !(g.hb_timeout > 0)) {
        snprintf(err, errlen, "the broker at %s sent no usable heartbeat interval", addr);
        goto bad;
    }
    g.ndev = 0;
    for (uint32_t i = 0; i < devs.len && g.ndev < KC_MAX_DEVICES; i++) {
        struct mp_val d;
        const uint8_t *after;
        if (mp_index(&devs, i, &d) != 1 || d.type != MP_MAP) continue;
        struct kc_device *x = &g.dev[g.ndev];
        memset(x, 0, sizeof *x);
        int64_t lim;
        if (str_field(&d, "name", x->name, sizeof x->name) || int_field(&d, "memory_limit", &lim) || lim < 0)
            continue;
        str_field(&d, "kind", x->kind, sizeof x->kind);
        if (str_field(&d, "model", x->model_prop, sizeof x->model_prop)) x->model_prop[0] = 0;
        snprintf(x->model, sizeof x->model, "%s", x->model_prop[0] ? x->model_prop : x->name);
        x->memory_limit = (uint64_t)lim;
        const uint8_t *ds = d.start;
        if (mp_skip(ds, d.end, &after)) continue;
        x->desc = (uint8_t *)ds;
        x->desc_len = (size_t)(after - ds);
        device_uuid(x, &d);
        g.dev_failed[g.ndev] = 0;
        g.ndev++;
    }
    g.open = 1;
    g.broken = 0;
    g.epoch++;
    start_heartbeat();
    return CUDA_SUCCESS;
bad:
    free(g.hello);
    g.hello = NULL;
    zmtp_close(&g.broker);
    return CUDA_ERROR_NOT_INITIALIZED;
}

CUresult kc_lock(int open) {
    pthread_once(&g_once, install_atfork);
    pthread_mutex_lock(&g_lock);
    if (g.pid != getpid()) {                    /* a forked child, or the first call */
        if (g.pid) drop_session();
        g.pid = getpid();
    }
    if (!g.open) {
        if (!open && !g.wanted) { pthread_mutex_unlock(&g_lock); return CUDA_ERROR_NOT_INITIALIZED; }
        if (g.failed) { pthread_mutex_unlock(&g_lock); return g.failed; }
        char err[1024];
        CUresult rc = open_session(err, sizeof err);
        if (rc) {
            g.failed = rc;
            kc_log("kubecash: %s", err);
            pthread_mutex_unlock(&g_lock);
            return rc;
        }
        g.wanted = 1;
    }
    if (__atomic_load_n(&g.broken, __ATOMIC_ACQUIRE)) {
        CUresult rc = g.broken_code ? g.broken_code : CUDA_ERROR_UNKNOWN;
        pthread_mutex_unlock(&g_lock);
        return rc;
    }
    return CUDA_SUCCESS;
}

void kc_unlock(void) { pthread_mutex_unlock(&g_lock); }
int kc_device_count(void) { return g.ndev; }
struct kc_device *kc_device(int i) { return i >= 0 && i < g.ndev ? &g.dev[i] : NULL; }

void *kc_shm_map(const char *name, size_t size, uint64_t want) {
    if (!name[0] || strchr(name, '/') || !g.dir[0]) return NULL;
    char path[8192];
    snprintf(path, sizeof path, "%s/shm/%s", g.dir, name);
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return NULL;
    void *p = want ? mmap((void *)(uintptr_t)want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0)
                   : MAP_FAILED;
    if (p != MAP_FAILED && (uint64_t)(uintptr_t)p != want) {   /* a hint only (old kernels): moved */
        munmap(p, size);
        p = MAP_FAILED;
    }
    if (p == MAP_FAILED) p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

int kc_desc_int(const struct kc_device *d, const char *key, int index, long long *out) {
    struct mp_val m, v, e;
    int64_t i;
    if (mp_read(d->desc, d->desc + d->desc_len, &m) || mp_find(&m, key, &v) != 1) return -1;
    if (index >= 0) {
        if (mp_index(&v, (uint32_t)index, &e) != 1) return -1;
        v = e;
    }
    if (mp_as_int(&v, &i)) return -1;
    *out = i;
    return 0;
}

int kc_pci_of(const struct kc_device *d, unsigned loc[3]) {
    for (int k = 0; k < 3; k++) {
        long long v;
        if (kc_desc_int(d, "pci", k, &v) || v < 0 || v > 0xFFFFFFFFll) return -1;
        loc[k] = (unsigned)v;
    }
    return 0;
}

/* "domain:bus:device.function" (domain optional: CUDA's and NVML's forms, hex), function 0. */
static int parse_pci(const char *s, unsigned loc[3]) {
    unsigned a, b, c, f;
    char end;
    if (sscanf(s, "%x:%x:%x.%x%c", &a, &b, &c, &f, &end) == 4) { loc[0] = a; loc[1] = b; loc[2] = c; }
    else if (sscanf(s, "%x:%x.%x%c", &b, &c, &f, &end) == 3) { loc[0] = 0; loc[1] = b; loc[2] = c; }
    else return -1;
    return f == 0 ? 0 : -1;
}

int kc_device_by_pci(const char *bus_id) {
    unsigned want[3], have[3];
    if (!bus_id || parse_pci(bus_id, want)) return -1;
    for (int i = 0; i < g.ndev; i++)
        if (!kc_pci_of(&g.dev[i], have) && !memcmp(want, have, sizeof want)) return i;
    return -1;
}
const char *kc_address(void) { return g.address; }

/* A refused request's reason, on stderr (as the shim logs it): the error code alone leaves a
 * program that ignores it (CuPy's CUB calls do) silently wrong. Bounded: a program failing
 * in a loop is told 100 times, then once that the rest are not shown. */
static void log_failure(const char *op, const char *dev, CUresult rc, const char *err) {
    static int logged;
    int n = __atomic_add_fetch(&logged, 1, __ATOMIC_RELAXED);
    if (n <= 100) kc_log("kubecash: %s on %s: error %d: %s", op, dev, rc, err);
    else if (n == 101) kc_log("kubecash: further failures are not logged (KUBECASH_DEBUG=1 traces every call)");
}

CUresult kc_device_attach(int i) {
    struct kc_device *d = kc_device(i);
    if (!d) return CUDA_ERROR_INVALID_DEVICE;
    if (d->attached) return CUDA_SUCCESS;
    if (g.dev_failed[i]) return g.dev_failed[i];
    if (!g.dir[0]) return CUDA_ERROR_NOT_SUPPORTED;           /* only ipc:// (zmtp_connect said so) */
    char err[1024], addr[8192];
    struct kc_buf body = {0};
    mp_str(&body, KCP_TENANT_OPEN_DEVICE_DEVICE); mp_str(&body, d->name);
    struct mp_val r;
    CUresult rc = request(&g.broker, i, KCP_TENANT_OPEN_DEVICE, 1, &body, 1, &r, OPEN_TIMEOUT_MS, err, sizeof err);
    mp_free(&body);
    if (rc) { kc_log("kubecash: opening %s failed: %s", d->name, err); return rc; }
    char name[256];
    if (str_field(&r, KCP_TENANT_OPEN_DEVICE_R_ADDRESS, name, sizeof name) || strchr(name, '/') || !name[0]) {
        kc_log("kubecash: the broker named no usable executor socket for %s", d->name);
        return CUDA_ERROR_UNKNOWN;
    }
    snprintf(addr, sizeof addr, "ipc://%s/%s", g.dir, name);
    if (zmtp_connect(&d->exec, addr, OPEN_TIMEOUT_MS, err, sizeof err)) {
        kc_log("kubecash: cannot reach the executor for %s at %s: %s", d->name, addr, err);
        return CUDA_ERROR_UNKNOWN;
    }
    rc = request(&d->exec, i, KCP_EXECUTOR_ATTACH, 1, NULL, 0, &r, OPEN_TIMEOUT_MS, err, sizeof err);
    if (rc) {
        kc_log("kubecash: attaching to the executor for %s failed: %s", d->name, err);
        zmtp_close(&d->exec);
        return rc;
    }
    int64_t lim, ssize, queued;
    char staging[256] = "";
    if (int_field(&r, KCP_EXECUTOR_ATTACH_R_MEMORY_LIMIT, &lim) == 0 && lim >= 0) d->memory_limit = (uint64_t)lim;
    /* as client/device.py: block (a ctx_sync) at half the executor's queue bound */
    if (int_field(&r, KCP_EXECUTOR_ATTACH_R_MAX_QUEUED_OPS, &queued)) queued = 2;
    d->window = queued / 2 < 1 ? 1 : queued / 2 > 1 << 20 ? 1 << 20 : (uint32_t)(queued / 2);
    d->posted = 0;
    str_field(&r, KCP_EXECUTOR_ATTACH_R_STAGING, staging, sizeof staging);
    if (staging[0] && !strchr(staging, '/') && int_field(&r, KCP_EXECUTOR_ATTACH_R_STAGING_SIZE, &ssize) == 0 &&
        ssize > 0) {
        /* client/device.py's _conn: map the segment, then unlink it (both sides have it) */
        char path[8192];
        snprintf(path, sizeof path, "%s/shm/%s", g.dir, staging);
        int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0) {
            void *p = mmap(NULL, (size_t)ssize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            unlink(path);
            if (p != MAP_FAILED) { d->staging = p; d->staging_size = (size_t)ssize; }
        }
        if (!d->staging) kc_log("kubecash: cannot map the staging segment %s: %s (copies go inline)", path, strerror(errno));
    }
    char arena[256] = "";
    int64_t asize, abase;
    str_field(&r, KCP_EXECUTOR_ATTACH_R_ARENA, arena, sizeof arena);
    if (d->arena) { munmap(d->arena, d->arena_size); close(d->arena_fd); }   /* an earlier executor's */
    d->arena = NULL;
    if (arena[0] && !strchr(arena, '/') && int_field(&r, KCP_EXECUTOR_ATTACH_R_ARENA_SIZE, &asize) == 0 &&
        asize > 0 && int_field(&r, KCP_EXECUTOR_ATTACH_R_ARENA_BASE, &abase) == 0 && abase > 0) {
        /* client/device.py's _map_arena: the name stays, other sessions of the tenant map it too */
        char path[8192];
        snprintf(path, sizeof path, "%s/shm/%s", g.dir, arena);
        int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0) {
            /* At the executor's own address where it is free here: a device pointer is then
             * the same memory in this process (no host address can be one), and cuda_more.c's
             * guards are not needed inside it. Elsewhere if that range is taken. */
            void *p = mmap((void *)(uintptr_t)abase, (size_t)asize, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_NORESERVE | MAP_FIXED_NOREPLACE, fd, 0);
            if (p != MAP_FAILED && (uint64_t)(uintptr_t)p != (uint64_t)abase) {   /* a hint only: moved */
                munmap(p, (size_t)asize);
                p = MAP_FAILED;
            }
            if (p == MAP_FAILED)
                p = mmap(NULL, (size_t)asize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
            /* the fd stays open while it is mapped: cuMemMap puts its pages elsewhere too */
            if (p != MAP_FAILED) { d->arena = p; d->arena_size = (size_t)asize; d->arena_base = (uint64_t)abase; d->arena_fd = fd; }
            else close(fd);
        }
        if (!d->arena) kc_log("kubecash: cannot map the memory arena %s: %s (copies go through the executor)", path, strerror(errno));
    }
    d->attached = 1;
    return CUDA_SUCCESS;
}

CUresult kc_exec_request(int i, const char *op, const struct kc_buf *body, uint32_t nfields, struct mp_val *reply) {
    CUresult rc = kc_device_attach(i);
    if (rc) return rc;
    if (g.dev_failed[i]) return g.dev_failed[i];       /* a lost context stays lost (sticky) */
    char err[1024];
    rc = request(&g.dev[i].exec, i, op, 1, body, nfields, reply, -1, err, sizeof err);
    if (rc) log_failure(op, g.dev[i].name, rc, err);
    return rc;
}

CUresult kc_broker_request(const char *op, const struct kc_buf *body, uint32_t nfields, struct mp_val *reply,
                           int timeout_ms) {
    char err[1024];
    CUresult rc = request(&g.broker, -1, op, 1, body, nfields, reply, timeout_ms, err, sizeof err);
    if (rc) log_failure(op, "the broker", rc, err);
    return rc;
}

unsigned kc_session_epoch(void) { return g.epoch; }

CUresult kc_exec_post(int i, const char *op, const struct kc_buf *body, uint32_t nfields) {
    CUresult rc = kc_device_attach(i);
    if (rc) return rc;
    if (g.dev_failed[i]) return g.dev_failed[i];
    struct kc_device *d = &g.dev[i];
    char err[1024];
    size_t room = KCP_BATCH_MAX_BYTES - 1024;    /* the batch's own envelope fits beside */
    size_t need = 64 + g.token_len + (body ? body->n : 0);
    if (d->pb_n && d->pb.n + need > room && flush_device(i, err, sizeof err))
        return executor_lost(i, err, sizeof err);
    size_t before = d->pb.n;
    put_envelope_as(&d->pb, ++g.next_id, op, nfields, 1, 1);
    if (body && body->n) mp_raw(&d->pb, body->p, body->n);
    if (d->pb.oom) { d->pb.n = before; d->pb.oom = 0; return CUDA_ERROR_OUT_OF_MEMORY; }
    if (++d->pb_n >= KCP_BATCH_MAX_OPS || d->pb.n > room) {
        if (flush_device(i, err, sizeof err)) return executor_lost(i, err, sizeof err);
    } else if (d->pb_n == 1) {
        batch_opened();
    }
    if (++d->posted < d->window) return CUDA_SUCCESS;
    d->posted = 0;
    struct mp_val r;
    rc = request(&d->exec, i, KCP_EXECUTOR_CTX_SYNC, 1, NULL, 0, &r, -1, err, sizeof err);
    if (rc) log_failure(op, d->name, rc, err);
    return rc;
}
