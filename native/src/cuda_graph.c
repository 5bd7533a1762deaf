/* Graphs: stream capture, explicit construction, instantiation and launch (native/table.py
 * marks the entry points).
 *
 * A capture makes the calls issued on one stream (kernel launches, async copies and
 * memsets, host functions, event records and waits) nodes of a graph, each depending on the
 * one before, instead of running them. Explicit construction adds kernel, memset, host and
 * empty nodes with the dependencies the program gives. Instantiation orders a copy of the
 * nodes topologically; a launch replays them on its stream through the same entry points a
 * program calls (their arguments as captured: a kernel's parameters are copied when it is
 * recorded, copies read and write their memory when the graph runs). One stream runs the
 * whole graph in that order: what a graph says may run concurrently runs in sequence, which
 * gives the same results. Captures across streams (a second stream joining through an
 * event), memory nodes, child graphs and conditional nodes are refused by name.
 *
 * Handles (CUgraph, CUgraphNode, CUgraphExec) are this file's own allocations, checked
 * against the live ones before use, so a stale or garbage handle is INVALID_VALUE, never
 * dereferenced. A mutex of its own guards them; it is never held while calling an entry
 * point that takes the session lock (which may be held when the hooks here are called). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kc.h"

typedef unsigned long long CUdeviceptr;
typedef void *CUhandle;

KC_EXPORT CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemsetD2D8Async(CUdeviceptr d, size_t pitch, unsigned char v, size_t w, size_t h, CUhandle s);
KC_EXPORT CUresult cuMemsetD2D16Async(CUdeviceptr d, size_t pitch, unsigned short v, size_t w, size_t h, CUhandle s);
KC_EXPORT CUresult cuMemsetD2D32Async(CUdeviceptr d, size_t pitch, unsigned int v, size_t w, size_t h, CUhandle s);
KC_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUhandle s);
KC_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUhandle s);
KC_EXPORT CUresult cuLaunchHostFunc(CUhandle hStream, void (*fn)(void *), void *userData);
KC_EXPORT CUresult cuEventRecord(CUhandle hEvent, CUhandle hStream);
KC_EXPORT CUresult cuStreamWaitEvent(CUhandle hStream, CUhandle hEvent, unsigned int Flags);
KC_EXPORT CUresult cuStreamIsCapturing(CUhandle hStream, int *status);

#define LAUNCH_PARAM_END ((void *)0x00)
#define LAUNCH_PARAM_BUFFER_POINTER ((void *)0x01)
#define LAUNCH_PARAM_BUFFER_SIZE ((void *)0x02)
enum { STATUS_NONE = 0, STATUS_ACTIVE = 1, STATUS_INVALIDATED = 2 };

struct node {
    struct kc_gnode n;
    struct graph *g;
    struct node **deps;
    size_t ndeps;
    void *extra[5];              /* GetParams hands out the args as an `extra` buffer */
};
struct graph {
    struct node **nodes;
    size_t n, cap;
    /* a capture's: the stream, the last node (the next one's dependency), its state */
    CUhandle stream;
    int capturing, invalid;
    CUresult why;
    unsigned long long id;
    CUhandle dep_out;            /* what GetCaptureInfo's dependencies point at (no TLS: -z defs on libc only) */
};
struct exec {
    struct kc_gnode *nodes;      /* in launch order, args copied */
    struct node **from;          /* the graph node each came from (for SetParams) */
    size_t **deps, *ndeps;       /* each one's dependencies, as positions in that order (for update) */
    size_t n;
};

static pthread_mutex_t gm = PTHREAD_MUTEX_INITIALIZER;
static struct graph **graphs;
static size_t ngraphs, capgraphs;
static struct exec **execs;
static size_t nexecs, capexecs;
static unsigned long long next_capture_id = 1;
static int active_captures;

static int push(void ***arr, size_t *n, size_t *cap, void *p) {
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        void **q = realloc(*arr, c * sizeof *q);
        if (!q) return -1;
        *arr = q;
        *cap = c;
    }
    (*arr)[(*n)++] = p;
    return 0;
}

static int find(void **arr, size_t n, const void *p) {
    for (size_t i = 0; i < n; i++)
        if (arr[i] == p) return (int)i;
    return -1;
}

static struct graph *live_graph(const void *h) {          /* gm held */
    return h && find((void **)graphs, ngraphs, h) >= 0 ? (struct graph *)h : NULL;
}

static struct exec *live_exec(const void *h) {
    return h && find((void **)execs, nexecs, h) >= 0 ? (struct exec *)h : NULL;
}

static struct node *live_node(const void *h, struct graph *in) {   /* in: NULL for any graph */
    for (size_t i = 0; i < ngraphs; i++) {
        if (in && graphs[i] != in) continue;
        if (h && find((void **)graphs[i]->nodes, graphs[i]->n, h) >= 0) return (struct node *)h;
    }
    return NULL;
}

static void free_graph(struct graph *g) {
    for (size_t i = 0; i < g->n; i++) {
        free(g->nodes[i]->n.args);
        free(g->nodes[i]->deps);
        free(g->nodes[i]);
    }
    free(g->nodes);
    free(g);
}

static struct graph *new_graph(void) {                    /* gm held */
    struct graph *g = calloc(1, sizeof *g);
    if (!g || push((void ***)&graphs, &ngraphs, &capgraphs, g)) { free(g); return NULL; }
    return g;
}

/* A node in g after deps (gm held); n's args are taken over, freed on failure. */
static CUresult add_node(struct graph *g, const struct kc_gnode *n, struct node *const *deps, size_t ndeps,
                         struct node **out) {
    struct node *x = calloc(1, sizeof *x);
    if (!x || (ndeps && !(x->deps = malloc(ndeps * sizeof *x->deps))) ||
        push((void ***)&g->nodes, &g->n, &g->cap, x)) {
        if (x) free(x->deps);
        free(x);
        free(n->args);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    x->n = *n;
    x->g = g;
    if (ndeps) memcpy(x->deps, deps, ndeps * sizeof *deps);
    x->ndeps = ndeps;
    if (out) *out = x;
    return CUDA_SUCCESS;
}

/* ---- the hooks cuda_exec.c and cuda_more.c call for a capturing stream ---- */
CUresult kc_capture_add(void *capture, const struct kc_gnode *n) {
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(capture);
    CUresult rc;
    if (!g || !g->capturing) { free(n->args); rc = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED; }
    else if (g->invalid) { free(n->args); rc = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED; }
    else {
        struct node *last = g->n ? g->nodes[g->n - 1] : NULL;
        rc = add_node(g, n, &last, last ? 1 : 0, NULL);
        if (rc) { g->invalid = 1; g->why = rc; }
    }
    pthread_mutex_unlock(&gm);
    return rc;
}

CUresult kc_capture_fail(void *capture, CUresult rc) {
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(capture);
    if (g && g->capturing && !g->invalid) { g->invalid = 1; g->why = rc; }
    pthread_mutex_unlock(&gm);
    return rc;
}

int kc_capture_status(void *capture) {
    if (!capture) return STATUS_NONE;
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(capture);
    int st = !g || !g->capturing ? STATUS_NONE : g->invalid ? STATUS_INVALIDATED : STATUS_ACTIVE;
    pthread_mutex_unlock(&gm);
    return st;
}

int kc_capture_recorded(void *event) {
    int found = 0;
    pthread_mutex_lock(&gm);
    for (size_t i = 0; i < ngraphs && !found; i++) {
        if (!graphs[i]->capturing) continue;
        for (size_t j = 0; j < graphs[i]->n && !found; j++)
            found = graphs[i]->nodes[j]->n.kind == KC_G_EVENT_RECORD && graphs[i]->nodes[j]->n.event == event;
    }
    pthread_mutex_unlock(&gm);
    return found;
}

int kc_captures_active(void) {
    pthread_mutex_lock(&gm);
    int n = active_captures;
    pthread_mutex_unlock(&gm);
    return n;
}

/* ---- stream capture ---- */
static CUresult begin_capture(CUhandle stream, int mode) {
    if (mode < 0 || mode > 2) return CUDA_ERROR_INVALID_VALUE;   /* GLOBAL, THREAD_LOCAL, RELAXED */
    int st = 0;
    CUresult rc = cuStreamIsCapturing(stream, &st);   /* a stream of this session, not capturing */
    if (rc) return rc;
    if (st) return CUDA_ERROR_ILLEGAL_STATE;
    pthread_mutex_lock(&gm);
    struct graph *g = new_graph();
    if (g) { g->stream = stream; g->capturing = 1; g->id = next_capture_id++; active_captures++; }
    pthread_mutex_unlock(&gm);
    if (!g) return CUDA_ERROR_OUT_OF_MEMORY;
    void *old = NULL;
    rc = kc_capture_swap(stream, g, &old);
    if (!rc && old) {                        /* it was capturing already: put that one back */
        kc_capture_swap(stream, old, &old);
        rc = CUDA_ERROR_ILLEGAL_STATE;
    }
    if (rc) {
        pthread_mutex_lock(&gm);
        int i = find((void **)graphs, ngraphs, g);
        graphs[i] = graphs[--ngraphs];
        active_captures--;
        free_graph(g);
        pthread_mutex_unlock(&gm);
    }
    return rc;
}

KC_EXPORT CUresult cuStreamBeginCapture_v2(CUhandle hStream, int mode) { return begin_capture(hStream, mode); }
KC_EXPORT CUresult cuStreamBeginCapture_v2_ptsz(CUhandle hStream, int mode) { return begin_capture(hStream, mode); }
KC_EXPORT CUresult cuStreamBeginCapture(CUhandle hStream) { return begin_capture(hStream, 0); }
KC_EXPORT CUresult cuStreamBeginCapture_ptsz(CUhandle hStream) { return begin_capture(hStream, 0); }

static CUresult end_capture(CUhandle stream, CUhandle *graph) {
    if (!graph) return CUDA_ERROR_INVALID_VALUE;
    void *cap = NULL;
    CUresult rc = kc_capture_swap(stream, NULL, &cap);
    if (rc) return rc;
    if (!cap) return CUDA_ERROR_ILLEGAL_STATE;              /* not capturing */
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(cap);
    if (g && g->capturing) {
        g->capturing = 0;
        active_captures--;
        if (g->invalid) {
            int i = find((void **)graphs, ngraphs, g);
            graphs[i] = graphs[--ngraphs];
            free_graph(g);
            g = NULL;
            rc = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        }
    } else {
        g = NULL;
        rc = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    pthread_mutex_unlock(&gm);
    *graph = g;
    return rc;
}

KC_EXPORT CUresult cuStreamEndCapture(CUhandle hStream, CUhandle *phGraph) { return end_capture(hStream, phGraph); }
KC_EXPORT CUresult cuStreamEndCapture_ptsz(CUhandle hStream, CUhandle *phGraph) { return end_capture(hStream, phGraph); }

/* status, id, and (v2, v3) the graph and the node the stream's next work depends on */
static CUresult capture_info(CUhandle stream, int *status, unsigned long long *id, CUhandle *graph,
                             const CUhandle **deps, const void **edges, size_t *ndeps) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    int st = 0;
    CUresult rc = cuStreamIsCapturing(stream, &st);
    if (rc) return rc;
    void *cap = NULL;
    if (st && !(rc = kc_lock(0))) {
        cap = kc_capture_of(stream);
        kc_unlock();
    }
    if (rc) return rc;
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(cap);
    *status = g && g->capturing ? (g->invalid ? STATUS_INVALIDATED : STATUS_ACTIVE) : STATUS_NONE;
    if (id) *id = g ? g->id : 0;
    if (graph) *graph = g;
    CUhandle dep = g && g->n ? g->nodes[g->n - 1] : NULL;
    if (g) g->dep_out = dep;            /* valid while the capture lasts */
    if (deps) *deps = dep ? &g->dep_out : NULL;
    if (edges) *edges = NULL;
    if (ndeps) *ndeps = dep ? 1 : 0;
    pthread_mutex_unlock(&gm);
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuStreamGetCaptureInfo(CUhandle s, int *status, unsigned long long *id) {
    return capture_info(s, status, id, NULL, NULL, NULL, NULL);
}
KC_EXPORT CUresult cuStreamGetCaptureInfo_ptsz(CUhandle s, int *status, unsigned long long *id) {
    return capture_info(s, status, id, NULL, NULL, NULL, NULL);
}
KC_EXPORT CUresult cuStreamGetCaptureInfo_v2(CUhandle s, int *status, unsigned long long *id, CUhandle *graph,
                                             const CUhandle **deps, size_t *ndeps) {
    return capture_info(s, status, id, graph, deps, NULL, ndeps);
}
KC_EXPORT CUresult cuStreamGetCaptureInfo_v2_ptsz(CUhandle s, int *status, unsigned long long *id, CUhandle *graph,
                                                  const CUhandle **deps, size_t *ndeps) {
    return capture_info(s, status, id, graph, deps, NULL, ndeps);
}
KC_EXPORT CUresult cuStreamGetCaptureInfo_v3(CUhandle s, int *status, unsigned long long *id, CUhandle *graph,
                                             const CUhandle **deps, const void **edges, size_t *ndeps) {
    return capture_info(s, status, id, graph, deps, edges, ndeps);
}
KC_EXPORT CUresult cuStreamGetCaptureInfo_v3_ptsz(CUhandle s, int *status, unsigned long long *id, CUhandle *graph,
                                                  const CUhandle **deps, const void **edges, size_t *ndeps) {
    return capture_info(s, status, id, graph, deps, edges, ndeps);
}

/* Capture modes only decide which calls of other threads a capture refuses; calls here are
 * refused by stream, whatever the mode: the mode is kept and swapped as asked (per process:
 * thread-local storage would make the library need the dynamic loader's TLS). */
static int capture_mode;                  /* CU_STREAM_CAPTURE_MODE_GLOBAL; the process's, not per thread */

KC_EXPORT CUresult cuThreadExchangeStreamCaptureMode(int *mode) {
    if (!mode || *mode < 0 || *mode > 2) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gm);
    int old = capture_mode;
    capture_mode = *mode;
    pthread_mutex_unlock(&gm);
    *mode = old;
    return CUDA_SUCCESS;
}

/* ---- explicit construction ---- */
KC_EXPORT CUresult cuGraphCreate(CUhandle *phGraph, unsigned int flags) {
    if (!phGraph || flags) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gm);
    struct graph *g = new_graph();
    pthread_mutex_unlock(&gm);
    *phGraph = g;
    return g ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

KC_EXPORT CUresult cuGraphDestroy(CUhandle hGraph) {
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(hGraph);
    CUresult rc = !g ? CUDA_ERROR_INVALID_VALUE : g->capturing ? CUDA_ERROR_ILLEGAL_STATE : CUDA_SUCCESS;
    if (!rc) {
        int i = find((void **)graphs, ngraphs, g);
        graphs[i] = graphs[--ngraphs];
        /* execs made from it keep copies; their `from` pointers are never dereferenced once
         * the graph is gone (live_node checks first) */
        free_graph(g);
    }
    pthread_mutex_unlock(&gm);
    return rc;
}

/* A new node of g (its args taken over) after deps, which must be g's. */
static CUresult add_explicit(CUhandle *out, CUhandle hGraph, const CUhandle *deps, size_t ndeps,
                             const struct kc_gnode *n) {
    if (!out || (ndeps && !deps)) { free(n->args); return CUDA_ERROR_INVALID_VALUE; }
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(hGraph);
    CUresult rc = !g || g->capturing ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
    for (size_t i = 0; !rc && i < ndeps; i++)
        if (!live_node(deps[i], g)) rc = CUDA_ERROR_INVALID_VALUE;
    struct node *x = NULL;
    if (rc) free(n->args);
    else rc = add_node(g, n, (struct node *const *)deps, ndeps, &x);
    pthread_mutex_unlock(&gm);
    if (!rc) *out = x;
    return rc;
}

KC_EXPORT CUresult cuGraphAddEmptyNode(CUhandle *phNode, CUhandle hGraph, const CUhandle *deps, size_t ndeps) {
    struct kc_gnode n = {.kind = KC_G_EMPTY};
    return add_explicit(phNode, hGraph, deps, ndeps, &n);
}

/* cuda.h's CUDA_KERNEL_NODE_PARAMS (v2: kern and ctx after v1's fields) */
struct kernel_params {
    CUhandle func;
    unsigned grid[3], block[3], shared;
    void **kernelParams, **extra;
    CUhandle kern, ctx;
};

static CUresult kernel_node(struct kc_gnode *n, const struct kernel_params *p, int v2) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    CUhandle f = p->func ? p->func : v2 ? p->kern : NULL;      /* a CUkernel is its CUfunction here */
    if (!f) return CUDA_ERROR_INVALID_VALUE;
    *n = (struct kc_gnode){.kind = KC_G_KERNEL, .f = f, .shared = p->shared};
    memcpy(n->grid, p->grid, sizeof n->grid);
    memcpy(n->block, p->block, sizeof n->block);
    for (int i = 0; i < 3; i++)
        if (!n->grid[i] || !n->block[i]) return CUDA_ERROR_INVALID_VALUE;
    return kc_flat_args(f, p->kernelParams, p->extra, &n->args, &n->size);
}

static CUresult add_kernel(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                           const struct kernel_params *p, int v2) {
    struct kc_gnode n;
    CUresult rc = kernel_node(&n, p, v2);
    return rc ? rc : add_explicit(out, g, deps, ndeps, &n);
}

KC_EXPORT CUresult cuGraphAddKernelNode_v2(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                                           const struct kernel_params *p) {
    return add_kernel(out, g, deps, ndeps, p, 1);
}
KC_EXPORT CUresult cuGraphAddKernelNode(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                                        const struct kernel_params *p) {
    return add_kernel(out, g, deps, ndeps, p, 0);
}

/* cuda.h's CUDA_MEMSET_NODE_PARAMS */
struct memset_params { CUdeviceptr dst; size_t pitch; unsigned value, elementSize; size_t width, height; };

KC_EXPORT CUresult cuGraphAddMemsetNode(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                                        const struct memset_params *p, CUhandle ctx) {
    (void)ctx;             /* the memory's own device: an allocation names it */
    if (!p || (p->elementSize != 1 && p->elementSize != 2 && p->elementSize != 4) || !p->height ||
        (p->height > 1 && p->pitch < p->width * p->elementSize))
        return CUDA_ERROR_INVALID_VALUE;
    struct kc_gnode n = {.kind = KC_G_MEMSET, .dst = p->dst, .pitch = p->pitch, .value = p->value,
                         .elem = p->elementSize, .width = p->width, .height = p->height};
    return add_explicit(out, g, deps, ndeps, &n);
}

/* cuda.h's CUDA_HOST_NODE_PARAMS */
struct host_params { void (*fn)(void *); void *userData; };

KC_EXPORT CUresult cuGraphAddHostNode(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                                      const struct host_params *p) {
    if (!p || !p->fn) return CUDA_ERROR_INVALID_VALUE;
    struct kc_gnode n = {.kind = KC_G_HOST, .fn = p->fn, .data = p->userData};
    return add_explicit(out, g, deps, ndeps, &n);
}

KC_EXPORT CUresult cuGraphAddEventRecordNode(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                                             CUhandle event) {
    if (!event) return CUDA_ERROR_INVALID_VALUE;
    struct kc_gnode n = {.kind = KC_G_EVENT_RECORD, .event = event};
    return add_explicit(out, g, deps, ndeps, &n);
}

KC_EXPORT CUresult cuGraphAddEventWaitNode(CUhandle *out, CUhandle g, const CUhandle *deps, size_t ndeps,
                                           CUhandle event) {
    if (!event) return CUDA_ERROR_INVALID_VALUE;
    struct kc_gnode n = {.kind = KC_G_EVENT_WAIT, .event = event};
    return add_explicit(out, g, deps, ndeps, &n);
}

KC_EXPORT CUresult cuGraphGetNodes(CUhandle hGraph, CUhandle *nodes, size_t *numNodes) {
    if (!numNodes) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(hGraph);
    CUresult rc = g ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    if (g) {
        if (nodes)
            for (size_t i = 0; i < g->n && i < *numNodes; i++) nodes[i] = g->nodes[i];
        *numNodes = g->n;              /* with nodes given: how many exist (CUDA's rule too) */
    }
    pthread_mutex_unlock(&gm);
    return rc;
}

/* A kernel node's parameters: kernelParams NULL, the captured ones as an `extra` buffer
 * (valid while the node lives), so a program can set them back or change the geometry. */
static CUresult kernel_get(CUhandle hNode, struct kernel_params *p, int v2) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gm);
    struct node *x = live_node(hNode, NULL);
    CUresult rc = !x ? CUDA_ERROR_INVALID_VALUE : x->n.kind != KC_G_KERNEL ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
    if (!rc) {
        x->extra[0] = LAUNCH_PARAM_BUFFER_POINTER; x->extra[1] = x->n.args;
        x->extra[2] = LAUNCH_PARAM_BUFFER_SIZE; x->extra[3] = &x->n.size; x->extra[4] = LAUNCH_PARAM_END;
        p->func = x->n.f;
        memcpy(p->grid, x->n.grid, sizeof p->grid);
        memcpy(p->block, x->n.block, sizeof p->block);
        p->shared = x->n.shared;
        p->kernelParams = NULL;
        p->extra = x->extra;
        if (v2) { p->kern = NULL; p->ctx = NULL; }
    }
    pthread_mutex_unlock(&gm);
    return rc;
}

KC_EXPORT CUresult cuGraphKernelNodeGetParams_v2(CUhandle hNode, struct kernel_params *p) { return kernel_get(hNode, p, 1); }
KC_EXPORT CUresult cuGraphKernelNodeGetParams(CUhandle hNode, struct kernel_params *p) { return kernel_get(hNode, p, 0); }

static CUresult kernel_set(CUhandle hNode, const struct kernel_params *p, int v2) {
    struct kc_gnode n;
    CUresult rc = kernel_node(&n, p, v2);      /* before the lock: it takes the session's */
    if (rc) return rc;
    pthread_mutex_lock(&gm);
    struct node *x = live_node(hNode, NULL);
    if (!x || x->n.kind != KC_G_KERNEL) rc = CUDA_ERROR_INVALID_VALUE;
    else { free(x->n.args); x->n = n; n.args = NULL; }
    pthread_mutex_unlock(&gm);
    free(n.args);
    return rc;
}

KC_EXPORT CUresult cuGraphKernelNodeSetParams_v2(CUhandle hNode, const struct kernel_params *p) { return kernel_set(hNode, p, 1); }
KC_EXPORT CUresult cuGraphKernelNodeSetParams(CUhandle hNode, const struct kernel_params *p) { return kernel_set(hNode, p, 0); }

/* ---- instantiation and launch ---- */
static void free_exec(struct exec *e) {
    for (size_t i = 0; i < e->n; i++) {
        free(e->nodes[i].args);
        if (e->deps) free(e->deps[i]);
    }
    free(e->nodes);
    free(e->from);
    free(e->deps);
    free(e->ndeps);
    free(e);
}

/* Where each node of the order is, by its graph node (positions of its dependencies). */
static CUresult order_deps(struct exec *e) {
    for (size_t i = 0; i < e->n; i++) {
        struct node *x = e->from[i];
        e->ndeps[i] = x->ndeps;
        if (x->ndeps && !(e->deps[i] = malloc(x->ndeps * sizeof *e->deps[i]))) return CUDA_ERROR_OUT_OF_MEMORY;
        for (size_t k = 0; k < x->ndeps; k++)
            for (size_t j = 0; j < i; j++)              /* a dependency comes earlier in the order */
                if (e->from[j] == x->deps[k]) { e->deps[i][k] = j; break; }
    }
    return CUDA_SUCCESS;
}

/* The nodes of g in an order their dependencies allow (Kahn's, the lowest index first), copied
 * (gm held); `publish`: a graph exec handed out (else a scratch one, for an update). */
static CUresult instantiate(struct exec **out, struct graph *g, int publish) {
    struct exec *e = calloc(1, sizeof *e);
    size_t *left = calloc(g->n ? g->n : 1, sizeof *left);
    char *done = calloc(g->n ? g->n : 1, 1);
    size_t m = g->n ? g->n : 1;
    if (!e || !left || !done || !(e->nodes = calloc(m, sizeof *e->nodes)) || !(e->from = calloc(m, sizeof *e->from)) ||
        !(e->deps = calloc(m, sizeof *e->deps)) || !(e->ndeps = calloc(m, sizeof *e->ndeps))) {
        free(left); free(done);
        if (e) free_exec(e);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    for (size_t i = 0; i < g->n; i++) left[i] = g->nodes[i]->ndeps;
    while (e->n < g->n) {
        size_t i = 0;
        while (i < g->n && (done[i] || left[i])) i++;
        if (i == g->n) break;                               /* a cycle cannot be made: no API adds one */
        done[i] = 1;
        struct node *x = g->nodes[i];
        e->nodes[e->n] = x->n;
        e->nodes[e->n].args = NULL;
        if (x->n.args && !(e->nodes[e->n].args = malloc(x->n.size ? x->n.size : 1))) {
            free(left); free(done); free_exec(e);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        if (x->n.args) memcpy(e->nodes[e->n].args, x->n.args, x->n.size);
        e->from[e->n++] = x;
        for (size_t j = 0; j < g->n; j++)                   /* its dependents: one fewer to wait for */
            for (size_t k = 0; k < g->nodes[j]->ndeps; k++)
                if (g->nodes[j]->deps[k] == x) left[j]--;
    }
    free(left);
    free(done);
    if (order_deps(e) || (publish && push((void ***)&execs, &nexecs, &capexecs, e))) {
        free_exec(e);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = e;
    return CUDA_SUCCESS;
}

KC_EXPORT CUresult cuGraphInstantiateWithFlags(CUhandle *phExec, CUhandle hGraph, unsigned long long flags) {
    if (!phExec) return CUDA_ERROR_INVALID_VALUE;
    if (flags & ~1ull) {               /* AUTO_FREE_ON_LAUNCH: nothing to free; upload, device launch, priority: no */
        kc_log("kubecash: cuGraphInstantiate: flags %#llx are not supported", flags);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    pthread_mutex_lock(&gm);
    struct graph *g = live_graph(hGraph);
    struct exec *e = NULL;
    CUresult rc = !g || g->capturing ? CUDA_ERROR_INVALID_VALUE : instantiate(&e, g, 1);
    pthread_mutex_unlock(&gm);
    if (!rc) *phExec = e;
    return rc;
}

/* cuda.h's CUDA_GRAPH_INSTANTIATE_PARAMS */
struct instantiate_params { unsigned long long flags; CUhandle hUploadStream; int result_out; CUhandle errNode_out; };

static CUresult instantiate_with_params(CUhandle *phExec, CUhandle hGraph, struct instantiate_params *p) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = cuGraphInstantiateWithFlags(phExec, hGraph, p->flags);
    p->result_out = rc == CUDA_SUCCESS ? 0 : rc == CUDA_ERROR_NOT_SUPPORTED ? 4 : 1;   /* SUCCESS, NOT_SUPPORTED, ERROR */
    p->errNode_out = NULL;
    return rc;
}

KC_EXPORT CUresult cuGraphInstantiateWithParams(CUhandle *e, CUhandle g, struct instantiate_params *p) {
    return instantiate_with_params(e, g, p);
}
KC_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(CUhandle *e, CUhandle g, struct instantiate_params *p) {
    return instantiate_with_params(e, g, p);
}

KC_EXPORT CUresult cuGraphExecDestroy(CUhandle hExec) {
    pthread_mutex_lock(&gm);
    struct exec *e = live_exec(hExec);
    if (e) {
        int i = find((void **)execs, nexecs, e);
        execs[i] = execs[--nexecs];
        free_exec(e);
    }
    pthread_mutex_unlock(&gm);
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

static CUresult replay(const struct kc_gnode *n, CUhandle s) {
    switch (n->kind) {
    case KC_G_EMPTY: return CUDA_SUCCESS;
    case KC_G_KERNEL: {
        size_t size = n->size;
        void *extra[5] = {LAUNCH_PARAM_BUFFER_POINTER, n->args, LAUNCH_PARAM_BUFFER_SIZE, &size, LAUNCH_PARAM_END};
        return kc_launch(n->f, n->grid, n->block, n->shared, s, NULL, extra, n->coop);
    }
    case KC_G_MEMSET:
        if (n->height <= 1)
            return n->elem == 1 ? cuMemsetD8Async(n->dst, (unsigned char)n->value, n->width, s)
                 : n->elem == 2 ? cuMemsetD16Async(n->dst, (unsigned short)n->value, n->width, s)
                                : cuMemsetD32Async(n->dst, n->value, n->width, s);
        return n->elem == 1 ? cuMemsetD2D8Async(n->dst, n->pitch, (unsigned char)n->value, n->width, n->height, s)
             : n->elem == 2 ? cuMemsetD2D16Async(n->dst, n->pitch, (unsigned short)n->value, n->width, n->height, s)
                            : cuMemsetD2D32Async(n->dst, n->pitch, n->value, n->width, n->height, s);
    case KC_G_COPY:
        switch (n->what) {
        case KC_COPY_HTOD: return cuMemcpyHtoDAsync_v2(n->dst, (const void *)(uintptr_t)n->src, n->n, s);
        case KC_COPY_DTOH: return cuMemcpyDtoHAsync_v2((void *)(uintptr_t)n->dst, n->src, n->n, s);
        case KC_COPY_DTOD: return cuMemcpyDtoDAsync_v2(n->dst, n->src, n->n, s);
        default: return cuMemcpyAsync(n->dst, n->src, n->n, s);
        }
    case KC_G_HOST: return cuLaunchHostFunc(s, n->fn, n->data);
    case KC_G_EVENT_RECORD: return cuEventRecord(n->event, s);
    case KC_G_EVENT_WAIT: return cuStreamWaitEvent(s, n->event, 0);
    }
    return CUDA_ERROR_UNKNOWN;
}

/* The exec's nodes, copied out under the mutex and replayed without it (the entry points
 * take the session lock); the first error ends the launch, as a failed launch would. */
static CUresult graph_launch(CUhandle hExec, CUhandle stream) {
    pthread_mutex_lock(&gm);
    struct exec *e = live_exec(hExec);
    struct kc_gnode *copy = NULL;
    size_t n = 0;
    CUresult rc = e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    if (e && e->n) {
        copy = malloc(e->n * sizeof *copy);
        if (!copy) rc = CUDA_ERROR_OUT_OF_MEMORY;
        for (size_t i = 0; copy && i < e->n; i++) {
            copy[i] = e->nodes[i];
            copy[i].args = NULL;
            if (e->nodes[i].args) {
                if (!(copy[i].args = malloc(e->nodes[i].size ? e->nodes[i].size : 1))) { rc = CUDA_ERROR_OUT_OF_MEMORY; n = i; break; }
                memcpy(copy[i].args, e->nodes[i].args, e->nodes[i].size);
            }
            n = i + 1;
        }
    }
    pthread_mutex_unlock(&gm);
    for (size_t i = 0; !rc && i < n; i++) rc = replay(&copy[i], stream);
    for (size_t i = 0; i < n; i++) free(copy[i].args);
    free(copy);
    return rc;
}

KC_EXPORT CUresult cuGraphLaunch(CUhandle hExec, CUhandle hStream) { return graph_launch(hExec, hStream); }
KC_EXPORT CUresult cuGraphLaunch_ptsz(CUhandle hExec, CUhandle hStream) { return graph_launch(hExec, hStream); }

/* Nothing to upload ahead: a launch sends its work. The handles are still checked. */
static CUresult upload(CUhandle hExec, CUhandle stream) {
    int st;
    CUresult rc = cuStreamIsCapturing(stream, &st);
    if (rc) return rc;
    pthread_mutex_lock(&gm);
    rc = live_exec(hExec) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_unlock(&gm);
    return rc;
}

KC_EXPORT CUresult cuGraphUpload(CUhandle hExec, CUhandle hStream) { return upload(hExec, hStream); }
KC_EXPORT CUresult cuGraphUpload_ptsz(CUhandle hExec, CUhandle hStream) { return upload(hExec, hStream); }

/* An instantiated kernel node's parameters changed (the graph's node is not). */
static CUresult exec_kernel_set(CUhandle hExec, CUhandle hNode, const struct kernel_params *p, int v2) {
    struct kc_gnode n;
    CUresult rc = kernel_node(&n, p, v2);
    if (rc) return rc;
    pthread_mutex_lock(&gm);
    struct exec *e = live_exec(hExec);
    rc = CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; e && i < e->n; i++)
        if (e->from[i] == hNode && e->nodes[i].kind == KC_G_KERNEL && live_node(hNode, NULL)) {
            free(e->nodes[i].args);
            e->nodes[i] = n;
            n.args = NULL;
            rc = CUDA_SUCCESS;
            break;
        }
    pthread_mutex_unlock(&gm);
    free(n.args);
    return rc;
}

/* cuGraphExecUpdate: the parameters of hGraph's nodes into an instantiated graph of the same
 * topology. Nodes are paired by their place in the launch order (creation order where the
 * dependencies allow: a capture's chain, or an explicit graph built the same way); a
 * different count, kind or set of dependencies, a copy between other kinds of memory or a
 * 2D memset of another shape is refused, naming the node, and nothing is changed. */
enum { UPDATE_OK, UPDATE_ERROR, UPDATE_TOPOLOGY, UPDATE_NODE_TYPE, UPDATE_PARAMETERS = 5 };
struct update_info { int result; CUhandle error_node, error_from; };

static int update_check(const struct exec *e, const struct exec *x, struct update_info *info) {
    if (e->n != x->n) return UPDATE_TOPOLOGY;
    for (size_t i = 0; i < x->n; i++) {
        const struct kc_gnode *a = &e->nodes[i], *b = &x->nodes[i];
        info->error_node = x->from[i];
        if (a->kind != b->kind) return UPDATE_NODE_TYPE;
        if (e->ndeps[i] != x->ndeps[i]) return UPDATE_TOPOLOGY;
        for (size_t k = 0; k < x->ndeps[i]; k++) {
            int found = 0;
            for (size_t j = 0; j < e->ndeps[i] && !found; j++) found = e->deps[i][j] == x->deps[i][k];
            if (!found) { info->error_from = x->from[x->deps[i][k]]; return UPDATE_TOPOLOGY; }
        }
        if (a->kind == KC_G_COPY && a->what != b->what) return UPDATE_PARAMETERS;
        if (a->kind == KC_G_MEMSET && (a->height > 1 || b->height > 1) &&
            (a->width != b->width || a->height != b->height || a->elem != b->elem))
            return UPDATE_PARAMETERS;
        if (a->kind == KC_G_KERNEL && a->coop != b->coop) return UPDATE_PARAMETERS;
    }
    info->error_node = NULL;
    return UPDATE_OK;
}

static CUresult exec_update(CUhandle hExec, CUhandle hGraph, struct update_info *info) {
    struct update_info mine = {0};
    if (!info) info = &mine;
    *info = (struct update_info){UPDATE_ERROR, NULL, NULL};
    pthread_mutex_lock(&gm);
    struct exec *e = live_exec(hExec), *x = NULL;
    struct graph *g = live_graph(hGraph);
    CUresult rc = !e || !g || g->capturing ? CUDA_ERROR_INVALID_VALUE : instantiate(&x, g, 0);
    if (!rc) {
        info->result = update_check(e, x, info);
        if (info->result == UPDATE_OK) {   /* x's copies become e's; e's old ones go with x */
            struct exec t = *e;
            *e = *x;
            *x = t;
        } else {
            rc = CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE;
        }
        free_exec(x);
    }
    pthread_mutex_unlock(&gm);
    return rc;
}

KC_EXPORT CUresult cuGraphExecUpdate_v2(CUhandle hExec, CUhandle hGraph, struct update_info *info) {
    return exec_update(hExec, hGraph, info);
}

KC_EXPORT CUresult cuGraphExecUpdate(CUhandle hExec, CUhandle hGraph, CUhandle *error_node, int *result) {
    struct update_info info;
    CUresult rc = exec_update(hExec, hGraph, &info);
    if (error_node) *error_node = info.error_node;
    if (result) *result = info.result;
    return rc;
}

KC_EXPORT CUresult cuGraphExecKernelNodeSetParams_v2(CUhandle e, CUhandle node, const struct kernel_params *p) {
    return exec_kernel_set(e, node, p, 1);
}
KC_EXPORT CUresult cuGraphExecKernelNodeSetParams(CUhandle e, CUhandle node, const struct kernel_params *p) {
    return exec_kernel_set(e, node, p, 0);
}
