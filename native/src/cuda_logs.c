/* The driver's logs (cuLogs*, CUDA 12.9+): what this library says on stderr (kc_log: why a
 * call was refused, what is not supported) is also kept here, the last LOG_BYTES of it, and
 * handed to the callbacks a program registered, as CUDA's driver does with its own messages.
 * Every message is CU_LOG_LEVEL_ERROR: each explains a call that did not do what was asked.
 * A callback runs on the thread whose call failed, often with the session lock held: one that
 * calls back into CUDA would wait for itself (the dumps take only the logs' own lock). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kc.h"

typedef void (*kc_logs_fn)(void *data, int level, char *message, size_t length);
typedef unsigned int CUlogIterator;
enum { LOG_BYTES = 25600, MAX_CALLBACKS = 16, LEVEL_ERROR = 0 };

struct callback { kc_logs_fn fn; void *data; int used; };
static pthread_mutex_t logs_lock = PTHREAD_MUTEX_INITIALIZER;
static char ring[LOG_BYTES];             /* messages, each ending in '\n', oldest first */
static size_t ring_len;
static unsigned first_seq, next_seq;     /* the oldest message kept, and the next to come */
static struct callback callbacks[MAX_CALLBACKS];

/* kc_log's hook (session.c): keep the line, then tell the callbacks (not under logs_lock, so
 * that one may dump the logs). */
void kc_log_record(const char *line, size_t n) {
    if (n == 0 || n >= LOG_BYTES) return;
    struct callback cbs[MAX_CALLBACKS];
    int ncb = 0;
    pthread_mutex_lock(&logs_lock);
    while (ring_len + n > LOG_BYTES) {        /* the oldest go: CUDA's buffer is bounded too */
        char *nl = memchr(ring, '\n', ring_len);
        size_t drop = nl ? (size_t)(nl - ring) + 1 : ring_len;
        memmove(ring, ring + drop, ring_len - drop);
        ring_len -= drop;
        first_seq++;
    }
    memcpy(ring + ring_len, line, n);
    ring_len += n;
    next_seq++;
    for (int i = 0; i < MAX_CALLBACKS; i++)
        if (callbacks[i].used) cbs[ncb++] = callbacks[i];
    pthread_mutex_unlock(&logs_lock);
    if (!ncb) return;
    char msg[1024];
    size_t m = n - (line[n - 1] == '\n') < sizeof msg - 1 ? n - (line[n - 1] == '\n') : sizeof msg - 1;
    for (int i = 0; i < ncb; i++) {
        memcpy(msg, line, m);                 /* a copy each: a callback may write into it */
        msg[m] = 0;
        cbs[i].fn(cbs[i].data, LEVEL_ERROR, msg, m);
    }
}

KC_EXPORT CUresult cuLogsRegisterCallback(kc_logs_fn fn, void *data, void **handle_out) {
    if (!fn || !handle_out) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&logs_lock);
    for (int i = 0; i < MAX_CALLBACKS; i++)
        if (!callbacks[i].used) {
            callbacks[i] = (struct callback){fn, data, 1};
            *handle_out = &callbacks[i];
            rc = CUDA_SUCCESS;
            break;
        }
    pthread_mutex_unlock(&logs_lock);
    return rc;
}

KC_EXPORT CUresult cuLogsUnregisterCallback(void *handle) {
    struct callback *c = handle;
    uintptr_t off = (uintptr_t)c - (uintptr_t)callbacks;
    if (!c || (uintptr_t)c < (uintptr_t)callbacks || off >= sizeof callbacks || off % sizeof callbacks[0])
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&logs_lock);
    CUresult rc = c->used ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    c->used = 0;
    pthread_mutex_unlock(&logs_lock);
    return rc;
}

KC_EXPORT CUresult cuLogsCurrent(CUlogIterator *iterator_out, unsigned int flags) {
    if (!iterator_out || flags) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&logs_lock);
    *iterator_out = next_seq;
    pthread_mutex_unlock(&logs_lock);
    return CUDA_SUCCESS;
}

/* The kept messages from *it on (all if it is NULL), as one text (lock held). */
static const char *from(const CUlogIterator *it, size_t *len) {
    const char *p = ring;
    if (it && *it > first_seq)
        for (unsigned s = first_seq; s < *it && p < ring + ring_len; s++) {
            const char *nl = memchr(p, '\n', (size_t)(ring + ring_len - p));
            p = nl ? nl + 1 : ring + ring_len;
        }
    *len = (size_t)(ring + ring_len - p);
    return p;
}

KC_EXPORT CUresult cuLogsDumpToFile(CUlogIterator *iterator, const char *pathToFile, unsigned int flags) {
    if (!pathToFile || flags) return CUDA_ERROR_INVALID_VALUE;
    FILE *f = fopen(pathToFile, "we");
    if (!f) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&logs_lock);
    size_t n;
    const char *p = from(iterator, &n);
    size_t w = fwrite(p, 1, n, f);
    if (iterator) *iterator = next_seq;
    pthread_mutex_unlock(&logs_lock);
    return fclose(f) == 0 && w == n ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* As much of the newest as fits, whole messages, NUL-terminated; *size: the bytes written. */
KC_EXPORT CUresult cuLogsDumpToMemory(CUlogIterator *iterator, char *buffer, size_t *size, unsigned int flags) {
    if (!buffer || !size || flags) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_SUCCESS;
    pthread_mutex_lock(&logs_lock);
    size_t n;
    const char *p = from(iterator, &n);
    const int any = n > 0;
    while (n && n + 1 > *size) {              /* drop the oldest until it fits */
        const char *nl = memchr(p, '\n', n);
        size_t drop = nl ? (size_t)(nl - p) + 1 : n;
        p += drop;
        n -= drop;
    }
    if (any && n == 0) rc = CUDA_ERROR_INVALID_VALUE;      /* not even the newest fits */
    if (*size) {
        memcpy(buffer, p, n);
        buffer[n] = 0;
    }
    *size = n;
    if (iterator && !rc) *iterator = next_seq;
    pthread_mutex_unlock(&logs_lock);
    return rc;
}
