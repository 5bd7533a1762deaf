/* A small MessagePack encoder and a bounds-checked decoder: the subset the protocol uses
 * (maps with string keys; ints, floats, bools, nil, str, bin, arrays). Every read checks
 * against the end of the buffer; nesting is bounded so a hostile message cannot recurse deep. */
#include <stdlib.h>
#include <string.h>

#include "kc.h"

#define MP_MAX_DEPTH 32

static void put(struct kc_buf *b, const void *p, size_t n) {
    if (b->oom) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) { b->oom = 1; return; }
        b->p = q; b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void put_be(struct kc_buf *b, uint8_t tag, uint64_t v, int bytes) {
    uint8_t t[9]; t[0] = tag;
    for (int i = 0; i < bytes; i++) t[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    put(b, t, 1 + (size_t)bytes);
}

void mp_raw(struct kc_buf *b, const void *p, size_t n) { put(b, p, n); }

void mp_free(struct kc_buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; b->oom = 0; }

void mp_map(struct kc_buf *b, uint32_t n) {
    if (n < 16) { uint8_t t = 0x80 | (uint8_t)n; put(b, &t, 1); }
    else if (n < 65536) put_be(b, 0xde, n, 2);
    else put_be(b, 0xdf, n, 4);
}

void mp_array(struct kc_buf *b, uint32_t n) {
    if (n < 16) { uint8_t t = 0x90 | (uint8_t)n; put(b, &t, 1); }
    else if (n < 65536) put_be(b, 0xdc, n, 2);
    else put_be(b, 0xdd, n, 4);
}

void mp_str(struct kc_buf *b, const char *s) {
    size_t n = strlen(s);
    if (n < 32) { uint8_t t = 0xa0 | (uint8_t)n; put(b, &t, 1); }
    else if (n < 256) put_be(b, 0xd9, n, 1);
    else if (n < 65536) put_be(b, 0xda, n, 2);
    else put_be(b, 0xdb, n, 4);
    put(b, s, n);
}

void mp_bin(struct kc_buf *b, const void *p, size_t n) {
    if (n < 256) put_be(b, 0xc4, n, 1);
    else if (n < 65536) put_be(b, 0xc5, n, 2);
    else put_be(b, 0xc6, n, 4);
    put(b, p, n);
}

void mp_uint(struct kc_buf *b, uint64_t v) {
    if (v < 128) { uint8_t t = (uint8_t)v; put(b, &t, 1); }
    else if (v < 256) put_be(b, 0xcc, v, 1);
    else if (v < 65536) put_be(b, 0xcd, v, 2);
    else if (v <= 0xffffffffu) put_be(b, 0xce, v, 4);
    else put_be(b, 0xcf, v, 8);
}

void mp_int(struct kc_buf *b, int64_t v) {
    if (v >= 0) { mp_uint(b, (uint64_t)v); return; }
    if (v >= -32) { uint8_t t = (uint8_t)(int8_t)v; put(b, &t, 1); }
    else if (v >= -128) put_be(b, 0xd0, (uint8_t)(int8_t)v, 1);
    else if (v >= -32768) put_be(b, 0xd1, (uint16_t)(int16_t)v, 2);
    else if (v >= INT32_MIN) put_be(b, 0xd2, (uint32_t)(int32_t)v, 4);
    else put_be(b, 0xd3, (uint64_t)v, 8);
}

void mp_bool(struct kc_buf *b, int v) { uint8_t t = v ? 0xc3 : 0xc2; put(b, &t, 1); }

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

int mp_read(const uint8_t *p, const uint8_t *end, struct mp_val *o) {
    if (p >= end) return -1;
    memset(o, 0, sizeof *o);
    o->end = end;
    o->start = p;
    uint8_t t = *p++;
    size_t left = (size_t)(end - p);
    int n = 0;                                 /* size of the length/value field that follows */
#define NEED(k) do { if (left < (size_t)(k)) return -1; } while (0)
    if (t < 0x80) { o->type = MP_UINT; o->v.u = t; o->next = p; return 0; }
    if (t >= 0xe0) { o->type = MP_INT; o->v.i = (int8_t)t; o->next = p; return 0; }
    if ((t & 0xf0) == 0x80) { o->type = MP_MAP; o->len = t & 0x0f; o->next = p; return 0; }
    if ((t & 0xf0) == 0x90) { o->type = MP_ARRAY; o->len = t & 0x0f; o->next = p; return 0; }
    if ((t & 0xe0) == 0xa0) { o->type = MP_STR; o->len = t & 0x1f; goto bytes; }
    switch (t) {
    case 0xc0: o->type = MP_NIL; o->next = p; return 0;
    case 0xc2: case 0xc3: o->type = MP_BOOL; o->v.b = t == 0xc3; o->next = p; return 0;
    case 0xc4: case 0xc5: case 0xc6:
        n = 1 << (t - 0xc4); NEED(n); o->type = MP_BIN; o->len = (uint32_t)be(p, n); p += n; left -= n;
        goto bytes;
    case 0xd9: case 0xda: case 0xdb:
        n = 1 << (t - 0xd9); NEED(n); o->type = MP_STR; o->len = (uint32_t)be(p, n); p += n; left -= n;
        goto bytes;
    case 0xca: { NEED(4); uint32_t u = (uint32_t)be(p, 4); float f; memcpy(&f, &u, 4);
        o->type = MP_FLOAT; o->v.f = f; o->next = p + 4; return 0; }
    case 0xcb: { NEED(8); uint64_t u = be(p, 8); double d; memcpy(&d, &u, 8);
        o->type = MP_FLOAT; o->v.f = d; o->next = p + 8; return 0; }
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        n = 1 << (t - 0xcc); NEED(n); o->type = MP_UINT; o->v.u = be(p, n); o->next = p + n; return 0;
    case 0xd0: NEED(1); o->type = MP_INT; o->v.i = (int8_t)p[0]; o->next = p + 1; return 0;
    case 0xd1: NEED(2); o->type = MP_INT; o->v.i = (int16_t)be(p, 2); o->next = p + 2; return 0;
    case 0xd2: NEED(4); o->type = MP_INT; o->v.i = (int32_t)be(p, 4); o->next = p + 4; return 0;
    case 0xd3: NEED(8); o->type = MP_INT; o->v.i = (int64_t)be(p, 8); o->next = p + 8; return 0;
    case 0xdc: case 0xdd:
        n = t == 0xdc ? 2 : 4; NEED(n); o->type = MP_ARRAY; o->len = (uint32_t)be(p, n); o->next = p + n;
        return 0;
    case 0xde: case 0xdf:
        n = t == 0xde ? 2 : 4; NEED(n); o->type = MP_MAP; o->len = (uint32_t)be(p, n); o->next = p + n;
        return 0;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:      /* fixext: skipped, never used */
        n = 1 << (t - 0xd4); NEED(1 + n); o->type = MP_EXT; o->next = p + 1 + n; return 0;
    case 0xc7: case 0xc8: case 0xc9: {
        int k = 1 << (t - 0xc7); NEED(k + 1); uint64_t len = be(p, k);
        if (left - k - 1 < len) return -1;
        o->type = MP_EXT; o->next = p + k + 1 + len; return 0; }
    default: return -1;                                         /* 0xc1: never used */
    }
bytes:
    if (left < o->len) return -1;
    o->data = p; o->next = p + o->len;
    return 0;
#undef NEED
}

static int skip(const uint8_t *p, const uint8_t *end, const uint8_t **after, int depth) {
    struct mp_val v;
    if (depth > MP_MAX_DEPTH || mp_read(p, end, &v)) return -1;
    p = v.next;
    if (v.type == MP_ARRAY || v.type == MP_MAP) {
        uint64_t items = (uint64_t)v.len * (v.type == MP_MAP ? 2 : 1);
        for (uint64_t i = 0; i < items; i++)
            if (skip(p, end, &p, depth + 1)) return -1;
    }
    *after = p;
    return 0;
}

int mp_skip(const uint8_t *p, const uint8_t *end, const uint8_t **after) { return skip(p, end, after, 0); }

int mp_find(const struct mp_val *m, const char *key, struct mp_val *out) {
    if (m->type != MP_MAP) return -1;
    const uint8_t *p = m->next;
    size_t klen = strlen(key);
    for (uint32_t i = 0; i < m->len; i++) {
        struct mp_val k;
        if (mp_read(p, m->end, &k)) return -1;
        int match = k.type == MP_STR && k.len == klen && memcmp(k.data, key, klen) == 0;
        if (mp_skip(p, m->end, &p)) return -1;
        if (match) return mp_read(p, m->end, out) ? -1 : 1;
        if (mp_skip(p, m->end, &p)) return -1;
    }
    return 0;
}

int mp_index(const struct mp_val *a, uint32_t i, struct mp_val *out) {
    if (a->type != MP_ARRAY) return -1;
    if (i >= a->len) return 0;
    const uint8_t *p = a->next;
    for (uint32_t k = 0; k < i; k++)
        if (mp_skip(p, a->end, &p)) return -1;
    return mp_read(p, a->end, out) ? -1 : 1;
}

int mp_as_int(const struct mp_val *v, int64_t *out) {
    if (v->type == MP_INT) { *out = v->v.i; return 0; }
    if (v->type == MP_UINT && v->v.u <= (uint64_t)INT64_MAX) { *out = (int64_t)v->v.u; return 0; }
    return -1;
}

int mp_as_double(const struct mp_val *v, double *out) {
    int64_t i;
    if (v->type == MP_FLOAT) { *out = v->v.f; return 0; }
    if (mp_as_int(v, &i) == 0) { *out = (double)i; return 0; }
    return -1;
}
