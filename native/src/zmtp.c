/* A minimal ZMTP 3.1 DEALER (rfc.zeromq.org/spec/23, NULL mechanism /37) over a Unix stream
 * socket: what libzmq's DEALER does on the wire, for the peers KubeCASH has (the broker's
 * hand-parsed tenant socket, broker/gate.py, and the executors' libzmq ROUTERs). A DEALER
 * sends a message as one frame; a ROUTER strips its routing frame, so replies arrive as one
 * frame too (no empty delimiter: that is REQ/REP's envelope, which neither side uses).
 * Every wait is bounded by the caller's timeout; sends use MSG_NOSIGNAL (no SIGPIPE, so no
 * signal handling of ours interferes with the program's). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "kc.h"

#define F_MORE 1
#define F_LONG 2
#define F_COMMAND 4
#define MAX_FRAME (512u << 20)      /* nothing the protocol sends is near this */
#define SEND_TIMEOUT_MS 30000

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int wait_fd(int fd, short ev, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = {fd, ev, 0};
        int r = poll(&p, 1, left > 1000000 ? 1000000 : (int)left);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
    }
}

static int send_all(int fd, const uint8_t *p, size_t n, char *err, size_t errlen) {
    long long deadline = now_ms() + SEND_TIMEOUT_MS;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int w = wait_fd(fd, POLLOUT, deadline);
            if (w > 0) continue;
            if (w == 0) snprintf(err, errlen, "send timed out after %d s (peer not reading)", SEND_TIMEOUT_MS / 1000);
            else snprintf(err, errlen, "poll: %s", strerror(errno));
            return -1;
        }
        snprintf(err, errlen, "send: %s", k < 0 ? strerror(errno) : "connection closed");
        return -1;
    }
    return 0;
}

/* Read more bytes into the buffer; 1 read some, 0 timed out, -1 failed/closed. */
static int fill(struct kc_conn *c, long long deadline, char *err, size_t errlen) {
    if (c->rdone) {                        /* drop what the last returned message used */
        memmove(c->rbuf, c->rbuf + c->rdone, c->rlen - c->rdone);
        c->rlen -= c->rdone;
        c->rdone = 0;
    }
    if (c->rcap - c->rlen < 65536) {
        size_t cap = c->rcap ? c->rcap * 2 : 131072;
        uint8_t *q = realloc(c->rbuf, cap);
        if (!q) { snprintf(err, errlen, "out of memory"); return -1; }
        c->rbuf = q; c->rcap = cap;
    }
    for (;;) {
        ssize_t k = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, MSG_DONTWAIT);
        if (k > 0) { c->rlen += (size_t)k; return 1; }
        if (k == 0) { snprintf(err, errlen, "connection closed by the peer"); return -1; }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            snprintf(err, errlen, "recv: %s", strerror(errno));
            return -1;
        }
        int w = wait_fd(c->fd, POLLIN, deadline);
        if (w == 0) return 0;
        if (w < 0) { snprintf(err, errlen, "poll: %s", strerror(errno)); return -1; }
    }
}

static void put_frame_header(uint8_t *h, size_t *hl, uint8_t flags, size_t n) {
    if (n < 256) { h[0] = flags; h[1] = (uint8_t)n; *hl = 2; return; }
    h[0] = flags | F_LONG;
    for (int i = 0; i < 8; i++) h[1 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
    *hl = 9;
}

static int send_frame(struct kc_conn *c, uint8_t flags, const uint8_t *p, size_t n, char *err, size_t errlen) {
    uint8_t h[9]; size_t hl;
    put_frame_header(h, &hl, flags, n);
    if (n < 4096) {                         /* one write for small frames */
        uint8_t tmp[4096 + 9];
        memcpy(tmp, h, hl); memcpy(tmp + hl, p, n);
        return send_all(c->fd, tmp, hl + n, err, errlen);
    }
    return send_all(c->fd, h, hl, err, errlen) || send_all(c->fd, p, n, err, errlen) ? -1 : 0;
}

int zmtp_send(struct kc_conn *c, const uint8_t *p, size_t n, char *err, size_t errlen) {
    return send_frame(c, 0, p, n, err, errlen);
}

/* Parse one frame at the buffer's front: 1 complete (*flags, *body, *n, consumed), 0 need more,
 * -1 malformed. */
static int parse_frame(struct kc_conn *c, size_t at, uint8_t *flags, const uint8_t **body, size_t *n,
                       size_t *used) {
    size_t have = c->rlen - at;
    const uint8_t *p = c->rbuf + at;
    if (have < 2) return 0;
    *flags = p[0];
    if (*flags & ~(F_MORE | F_LONG | F_COMMAND)) return -1;
    size_t hl = 2; uint64_t size = p[1];
    if (*flags & F_LONG) {
        if (have < 9) return 0;
        size = 0;
        for (int i = 0; i < 8; i++) size = (size << 8) | p[1 + i];
        hl = 9;
    }
    if (size > MAX_FRAME) return -1;
    if (have - hl < size) return 0;
    *body = p + hl; *n = (size_t)size; *used = hl + (size_t)size;
    return 1;
}

/* Handle a command frame: PING gets its PONG; ERROR ends the connection with its reason. */
static int command(struct kc_conn *c, const uint8_t *b, size_t n, char *err, size_t errlen) {
    if (n < 1 || (size_t)b[0] + 1 > n) { snprintf(err, errlen, "malformed ZMTP command"); return -1; }
    const uint8_t *name = b + 1, *data = b + 1 + b[0];
    size_t nl = b[0], dl = n - 1 - nl;
    if (nl == 4 && !memcmp(name, "PING", 4)) {
        uint8_t pong[1 + 4 + 16];
        size_t ctx = dl > 2 ? dl - 2 : 0;
        if (ctx > 16) ctx = 16;
        pong[0] = 4; memcpy(pong + 1, "PONG", 4); memcpy(pong + 5, data + 2, ctx);
        return send_frame(c, F_COMMAND, pong, 5 + ctx, err, errlen);
    }
    if (nl == 5 && !memcmp(name, "ERROR", 5)) {
        int rl = dl ? data[0] : 0;
        if ((size_t)rl + 1 > dl) rl = 0;
        snprintf(err, errlen, "refused by the peer: %.*s", rl, (const char *)data + 1);
        return -1;
    }
    return 0;                               /* PONG, READY again, SUBSCRIBE...: nothing to do */
}

static int recv_until(struct kc_conn *c, long long deadline, int want_command, const uint8_t **msg,
                      size_t *n, char *err, size_t errlen) {
    int discarding = 0;                     /* inside a multi-frame message (none is expected) */
    size_t at = c->rdone;
    for (;;) {
        uint8_t flags; const uint8_t *body; size_t len, used;
        int r = parse_frame(c, at, &flags, &body, &len, &used);
        if (r < 0) { snprintf(err, errlen, "malformed ZMTP frame"); return -1; }
        if (r == 0) {
            c->rdone = at;                  /* consumed frames can go; keep the partial one */
            int f = fill(c, deadline, err, errlen);
            if (f <= 0) return f;
            at = c->rdone;
            continue;
        }
        at += used;
        if (flags & F_COMMAND) {
            if (want_command) { *msg = body; *n = len; c->rdone = at; return 1; }
            if (command(c, body, len, err, errlen)) return -1;
            continue;
        }
        if (want_command) { snprintf(err, errlen, "a message before the ZMTP handshake ended"); return -1; }
        if (flags & F_MORE) { discarding = 1; continue; }
        if (discarding) { discarding = 0; continue; }
        *msg = body; *n = len; c->rdone = at;
        return 1;
    }
}

int zmtp_recv(struct kc_conn *c, const uint8_t **msg, size_t *n, int timeout_ms, char *err, size_t errlen) {
    return recv_until(c, now_ms() + timeout_ms, 0, msg, n, err, errlen);
}

int zmtp_connect(struct kc_conn *c, const char *address, int timeout_ms, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    if (strncmp(address, "ipc://", 6) != 0) {
        snprintf(err, errlen, "only ipc:// broker addresses are supported, not '%s'", address);
        return -1;
    }
    const char *path = address + 6;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t pl = strlen(path);
    if (pl == 0 || pl >= sizeof sa.sun_path) {
        snprintf(err, errlen, "socket path of '%s' is empty or too long", address);
        return -1;
    }
    memcpy(sa.sun_path, path, pl);
    if (path[0] == '@') sa.sun_path[0] = 0;          /* abstract namespace, as libzmq spells it */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) { snprintf(err, errlen, "socket: %s", strerror(errno)); return -1; }
    c->fd = fd;
    long long deadline = now_ms() + timeout_ms;
    socklen_t sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + pl);
    if (connect(fd, (struct sockaddr *)&sa, sl) < 0) {
        if (errno != EINPROGRESS && errno != EAGAIN) {
            snprintf(err, errlen, "connect: %s", strerror(errno));
            goto fail;
        }
        if (wait_fd(fd, POLLOUT, deadline) <= 0) { snprintf(err, errlen, "connect timed out"); goto fail; }
        int e = 0; socklen_t el = sizeof e;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el);
        if (e) { snprintf(err, errlen, "connect: %s", strerror(e)); goto fail; }
    }
    uint8_t g[64] = {0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 1, 'N', 'U', 'L', 'L'};  /* as-server 0 */
    if (send_all(fd, g, sizeof g, err, errlen)) goto fail;
    while (c->rlen < 64) {
        int f = fill(c, deadline, err, errlen);
        if (f == 0) snprintf(err, errlen, "no ZMTP greeting within %d ms", timeout_ms);
        if (f <= 0) goto fail;
        if (c->rbuf[0] != 0xff) { snprintf(err, errlen, "the peer does not speak ZMTP"); goto fail; }
    }
    const uint8_t *pg = c->rbuf;
    if (!(pg[9] & 1) || pg[10] < 3 || memcmp(pg + 12, "NULL", 5) != 0) {
        snprintf(err, errlen, "the peer's ZMTP greeting (version %d, mechanism %.20s) is not 3.x NULL",
                 pg[10], (const char *)pg + 12);
        goto fail;
    }
    c->rdone = 64;
    static const uint8_t ready[] = {5, 'R', 'E', 'A', 'D', 'Y', 11, 'S', 'o', 'c', 'k', 'e', 't', '-',
                                    'T', 'y', 'p', 'e', 0, 0, 0, 6, 'D', 'E', 'A', 'L', 'E', 'R'};
    if (send_frame(c, F_COMMAND, ready, sizeof ready, err, errlen)) goto fail;
    const uint8_t *cmd; size_t cl;
    int r = recv_until(c, deadline, 1, &cmd, &cl, err, errlen);
    if (r == 0) snprintf(err, errlen, "no ZMTP READY within %d ms", timeout_ms);
    if (r <= 0) goto fail;
    if (cl >= 6 && cmd[0] == 5 && !memcmp(cmd + 1, "ERROR", 5)) {
        command(c, cmd, cl, err, errlen);
        goto fail;
    }
    if (cl < 6 || cmd[0] != 5 || memcmp(cmd + 1, "READY", 5) != 0) {
        snprintf(err, errlen, "expected the peer's ZMTP READY");
        goto fail;
    }
    return 0;
fail:
    zmtp_close(c);
    return -1;
}

void zmtp_close(struct kc_conn *c) {
    if (c->fd >= 0) close(c->fd);
    free(c->rbuf);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}
