/* The native path's side of bench/datapath.py: the same copies, launches and synchronous
 * calls as its client-library process, made by a C program through KubeCASH's libcuda.so.1
 * (built against cuda.h, linked -l:libcuda.so.1). Prints one line of JSON.
 *
 *   datapath <device index> <bytes> <launches> <reps> <nop.ptx> */
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define TRY(call) do { CUresult r_ = (call); if (r_) { const char *n_ = "?"; cuGetErrorName(r_, &n_); \
    fprintf(stderr, "%s: %s\n", #call, n_); exit(1); } } while (0)

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* median microseconds of one call, after warming up */
static double p50_mem_info(int n) {
    double *ts = malloc(n * sizeof *ts);
    size_t fr, tot;
    for (int i = 0; i < 200; i++) TRY(cuMemGetInfo(&fr, &tot));
    for (int i = 0; i < n; i++) { double t = now(); TRY(cuMemGetInfo(&fr, &tot)); ts[i] = now() - t; }
    qsort(ts, n, sizeof *ts, cmp);
    double m = ts[n / 2] * 1e6;
    free(ts);
    return m;
}

static double p50_sync(int n) {
    double *ts = malloc(n * sizeof *ts);
    for (int i = 0; i < 200; i++) TRY(cuCtxSynchronize());
    for (int i = 0; i < n; i++) { double t = now(); TRY(cuCtxSynchronize()); ts[i] = now() - t; }
    qsort(ts, n, sizeof *ts, cmp);
    double m = ts[n / 2] * 1e6;
    free(ts);
    return m;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: datapath DEVICE BYTES LAUNCHES REPS NOP.PTX\n"); return 2; }
    int index = atoi(argv[1]), launches = atoi(argv[3]), reps = atoi(argv[4]);
    size_t nbytes = strtoull(argv[2], NULL, 10);
    FILE *f = fopen(argv[5], "rb");
    if (!f) { perror(argv[5]); return 2; }
    static char ptx[1 << 16];
    size_t len = fread(ptx, 1, sizeof ptx - 1, f);
    fclose(f);
    ptx[len] = 0;
    CUdevice dev;
    CUcontext ctx;
    TRY(cuInit(0));
    TRY(cuDeviceGet(&dev, index));
    TRY(cuDevicePrimaryCtxRetain(&ctx, dev));
    TRY(cuCtxSetCurrent(ctx));
    unsigned char *host = malloc(nbytes), *back = malloc(nbytes);
    for (size_t i = 0; i < nbytes; i++) host[i] = (unsigned char)(i * 2654435761u >> 24);
    CUdeviceptr d;
    TRY(cuMemAlloc(&d, nbytes));
    TRY(cuMemcpyHtoD(d, host, nbytes));            /* warm up: maps, first touches */
    TRY(cuMemcpyDtoH(back, d, nbytes));
    double t = now();
    for (int i = 0; i < reps; i++) TRY(cuMemcpyHtoD(d, host, nbytes));
    double h2d = reps * (double)nbytes / (now() - t);
    t = now();
    for (int i = 0; i < reps; i++) TRY(cuMemcpyDtoH(back, d, nbytes));
    double d2h = reps * (double)nbytes / (now() - t);
    if (memcmp(host, back, nbytes)) { fprintf(stderr, "copies differ\n"); return 1; }
    CUmodule mod;
    CUfunction fn;
    TRY(cuModuleLoadData(&mod, ptx));
    TRY(cuModuleGetFunction(&fn, mod, "nop"));
    CUdeviceptr small;
    TRY(cuMemAlloc(&small, 4));
    int one = 1;
    void *args[] = {&small, &one};
    for (int i = 0; i < 50; i++) TRY(cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, NULL, args, NULL));
    TRY(cuCtxSynchronize());
    t = now();
    for (int i = 0; i < launches; i++) TRY(cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, NULL, args, NULL));
    TRY(cuCtxSynchronize());
    double launch_us = (now() - t) / launches * 1e6;
    double query_us = p50_mem_info(2000), sync_us = p50_sync(2000);
    printf("{\"h2d\": %.0f, \"d2h\": %.0f, \"launch_us\": %.3f, \"query_us\": %.3f, \"sync_us\": %.3f}\n",
           h2d, d2h, launch_us, query_us, sync_us);
    TRY(cuMemFree(d));
    TRY(cuMemFree(small));
    return 0;
}
