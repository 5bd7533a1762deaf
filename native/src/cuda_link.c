/* The JIT linker (cuLink*), as a CPU device can offer it: a PTX (or a fatbin with PTX) is
 * the linked image itself, since the executor translates PTX when the module is loaded; the
 * "cubin" cuLinkComplete hands back is that input, which cuModuleLoadData takes. What needs
 * a real link (SASS, objects, libraries, NVVM IR, more than one input) is refused by name.
 * numba-cuda links each kernel's PTX this way when nvJitLink is not there.
 *
 * A CUlinkState is this file's own allocation, checked against the live ones before use. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kc.h"

enum { JIT_INFO_LOG = 3, JIT_INFO_LOG_SIZE = 4, JIT_ERROR_LOG = 5, JIT_ERROR_LOG_SIZE = 6 };
enum { INPUT_CUBIN, INPUT_PTX, INPUT_FATBINARY, INPUT_OBJECT, INPUT_LIBRARY, INPUT_NVVM };
static const char *const input_names[] = {"CUBIN", "PTX", "FATBINARY", "OBJECT", "LIBRARY", "NVVM"};
#define MAX_INPUT (32u << 20)                 /* the protocol's MODULE_IMAGE_MAX */

struct link { uint8_t *image; size_t size; int inputs; };
static pthread_mutex_t lm = PTHREAD_MUTEX_INITIALIZER;
static struct link **links;
static size_t nlinks, caplinks;

static int live(const struct link *l) {          /* lm held */
    for (size_t i = 0; i < nlinks; i++)
        if (links[i] == l) return (int)i;
    return -1;
}

/* The logs a program asked for: empty (a link here has nothing to say), sizes set to 1. */
static void empty_logs(unsigned n, const int *options, void **values) {
    if (!options || !values) return;
    for (unsigned i = 0; i < n; i++)
        if ((options[i] == JIT_INFO_LOG || options[i] == JIT_ERROR_LOG) && values[i]) {
            for (unsigned j = 0; j < n; j++)
                if (options[j] == options[i] + 1 && (uintptr_t)values[j] > 0) *(char *)values[i] = 0;
        }
}

static CUresult link_create(unsigned n, int *options, void **values, void **out) {
    if (!out || (n && (!options || !values))) return CUDA_ERROR_INVALID_VALUE;
    empty_logs(n, options, values);
    struct link *l = calloc(1, sizeof *l);
    if (!l) return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&lm);
    int ok = 1;
    if (nlinks == caplinks) {
        size_t cap = caplinks ? caplinks * 2 : 8;
        struct link **q = realloc(links, cap * sizeof *q);
        if (q) { links = q; caplinks = cap; } else ok = 0;
    }
    if (ok) links[nlinks++] = l;
    pthread_mutex_unlock(&lm);
    if (!ok) { free(l); return CUDA_ERROR_OUT_OF_MEMORY; }
    *out = l;
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuLinkCreate_v2(unsigned n, int *options, void **values, void **stateOut) {
    return link_create(n, options, values, stateOut);
}
KC_EXPORT CUresult cuLinkCreate(unsigned n, int *options, void **values, void **stateOut) {
    return link_create(n, options, values, stateOut);
}

static CUresult add_data(void *state, int type, const void *data, size_t size, const char *name) {
    if (!data || !size) return CUDA_ERROR_INVALID_VALUE;
    if (type != INPUT_PTX && type != INPUT_FATBINARY) {
        kc_log("kubecash: cuLinkAddData: a %s input%s%s cannot be linked on this device (it links PTX only)",
               type >= 0 && type <= INPUT_NVVM ? input_names[type] : "?", name ? " " : "", name ? name : "");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (type == INPUT_PTX) size = strnlen(data, size);     /* the text, to its NUL if there is one */
    if (size > MAX_INPUT) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lm);
    struct link *l = live(state) >= 0 ? state : NULL;
    CUresult rc = CUDA_SUCCESS;
    if (!l) rc = CUDA_ERROR_INVALID_HANDLE;
    else if (l->inputs) {
        kc_log("kubecash: cuLinkAddData: linking more than one input is not supported (this device links "
               "a single PTX)");
        rc = CUDA_ERROR_NOT_SUPPORTED;
    } else if (!(l->image = malloc(size + 1))) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        memcpy(l->image, data, size);
        l->image[size] = 0;                   /* PTX text ends with a NUL, as a loader reads it */
        l->size = size + (type == INPUT_PTX);
        l->inputs = 1;
    }
    pthread_mutex_unlock(&lm);
    return rc;
}

KC_EXPORT CUresult cuLinkAddData_v2(void *state, int type, void *data, size_t size, const char *name,
                                    unsigned n, int *options, void **values) {
    empty_logs(n, options, values);
    return add_data(state, type, data, size, name);
}
KC_EXPORT CUresult cuLinkAddData(void *state, int type, void *data, size_t size, const char *name,
                                 unsigned n, int *options, void **values) {
    return cuLinkAddData_v2(state, type, data, size, name, n, options, values);
}

static CUresult add_file(void *state, int type, const char *path) {
    if (!path) return CUDA_ERROR_INVALID_VALUE;
    FILE *f = fopen(path, "rb");
    if (!f) return errno == ENOENT ? CUDA_ERROR_FILE_NOT_FOUND : CUDA_ERROR_INVALID_VALUE;
    uint8_t *buf = malloc(MAX_INPUT + 1);
    size_t n = buf ? fread(buf, 1, MAX_INPUT + 1, f) : 0;
    fclose(f);
    CUresult rc = !buf ? CUDA_ERROR_OUT_OF_MEMORY : n > MAX_INPUT ? CUDA_ERROR_INVALID_VALUE
                : add_data(state, type, buf, n, path);
    free(buf);
    return rc;
}

KC_EXPORT CUresult cuLinkAddFile_v2(void *state, int type, const char *path, unsigned n, int *options,
                                    void **values) {
    empty_logs(n, options, values);
    return add_file(state, type, path);
}
KC_EXPORT CUresult cuLinkAddFile(void *state, int type, const char *path, unsigned n, int *options,
                                 void **values) {
    return cuLinkAddFile_v2(state, type, path, n, options, values);
}

/* The image: the input as it was given; valid until cuLinkDestroy, as CUDA's. */
KC_EXPORT CUresult cuLinkComplete(void *state, void **cubinOut, size_t *sizeOut) {
    if (!cubinOut || !sizeOut) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lm);
    struct link *l = live(state) >= 0 ? state : NULL;
    CUresult rc = !l ? CUDA_ERROR_INVALID_HANDLE : !l->inputs ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
    if (!rc) { *cubinOut = l->image; *sizeOut = l->size; }
    pthread_mutex_unlock(&lm);
    return rc;
}

KC_EXPORT CUresult cuLinkDestroy(void *state) {
    pthread_mutex_lock(&lm);
    int i = live(state);
    if (i >= 0) {
        free(links[i]->image);
        free(links[i]);
        links[i] = links[--nlinks];
    }
    pthread_mutex_unlock(&lm);
    return i >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
