/* What the tour programs of tests/c share: self-checks printed as check_<name>=1 or =0
 * (with what was got), counted in `failed`, and reading an image file NUL-terminated. */
#ifndef TOUR_H
#define TOUR_H
#include <stdio.h>
#include <stdlib.h>

static int failed;
#define CHECK(name, cond, fmt, ...)                                                   \
    do {                                                                              \
        int ok_ = !!(cond);                                                           \
        printf("check_%s=%d", name, ok_);                                             \
        if (!ok_) { printf("  (" fmt ")", __VA_ARGS__); failed++; }                  \
        printf("\n");                                                                 \
    } while (0)
#define RC(name, call, want)                                                          \
    do {                                                                              \
        CUresult r_ = (call);                                                         \
        CHECK(name, r_ == (want), "%s returned %d, expected %d", #call, (int)r_, (int)(want)); \
    } while (0)
#define OK(name, call) RC(name, call, CUDA_SUCCESS)

static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = calloc(1, (size_t)len + 1);           /* PTX text: NUL-terminated */
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) { free(buf); buf = NULL; }
    fclose(f);
    *n = (size_t)len;
    return buf;
}
#endif
