// A cooperative launch: a grid as large as the device holds resident (occupancy x
// multiprocessors), phases separated by grid-wide barriers (cooperative_groups' grid.sync),
// each block's shared memory its own across them; a grid one block too large refused;
// the same kernel through cudaLaunchKernelEx's cooperative attribute and a captured graph.
#include <cooperative_groups.h>
#include "common.h"
namespace cg = cooperative_groups;

// Each round: every thread writes its slot, the grid meets, every thread reads a slot
// another block wrote, and block b's shared memory must still hold what block b put there.
__global__ void rounds(int* slots, int* out, int rounds_n, int* bad) {
    cg::grid_group grid = cg::this_grid();
    extern __shared__ int mine[];
    const unsigned n = grid.size(), r = grid.thread_rank();
    for (int k = 0; k < rounds_n; ++k) {
        slots[r] = k * 7 + (int)r;
        if (threadIdx.x == 0) mine[0] = (int)blockIdx.x * 131 + k;
        grid.sync();
        const unsigned peer = (r + blockDim.x * 3 + 1) % n;        // another block's slot
        if (slots[peer] != k * 7 + (int)peer) atomicAdd(bad, 1);
        __syncthreads();
        if (mine[0] != (int)blockIdx.x * 131 + k) atomicAdd(bad, 1000);
        grid.sync();
    }
    out[r] = slots[(r + 1) % n];
}

// A grid-wide sum: partial sums per block, the grid meets, block 0 adds them, it meets again.
__global__ void grid_sum(const int* in, int n, int* partial, int* total, int* seen) {
    cg::grid_group grid = cg::this_grid();
    __shared__ int acc;
    if (threadIdx.x == 0) acc = 0;
    __syncthreads();
    int s = 0;
    for (int i = grid.thread_rank(); i < n; i += grid.size()) s += in[i];
    atomicAdd(&acc, s);
    __syncthreads();
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
    grid.sync();
    if (grid.thread_rank() == 0) {
        int t = 0;
        for (unsigned b = 0; b < gridDim.x; ++b) t += partial[b];
        *total = t;
    }
    grid.sync();
    if (threadIdx.x == 0) seen[blockIdx.x] = *total;     // every block sees block 0's sum
}

int main() {
    int dev = 0, coop = 0, sms = 0, per_sm = 0;
    CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
    EXPECT(coop == 1, "cudaDevAttrCooperativeLaunch is %d", coop);
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const int threads = 256, shared = 64;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, rounds, threads, shared));
    EXPECT(per_sm > 0, "occupancy %d", per_sm);
    const int blocks = per_sm * sms, n = blocks * threads, rounds_n = 5;
    int *slots, *out, *bad;
    CHECK(cudaMalloc(&slots, n * sizeof(int)));
    CHECK(cudaMalloc(&out, n * sizeof(int)));
    CHECK(cudaMalloc(&bad, sizeof(int)));
    CHECK(cudaMemset(bad, 0, sizeof(int)));
    int rn = rounds_n;
    void* args[] = {&slots, &out, &rn, &bad};
    CHECK(cudaLaunchCooperativeKernel((void*)rounds, blocks, threads, args, shared, 0));
    CHECK(cudaDeviceSynchronize());
    int* h = new int[n];
    int hbad = 0;
    CHECK(cudaMemcpy(h, out, n * sizeof(int), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(&hbad, bad, sizeof(int), cudaMemcpyDeviceToHost));
    EXPECT(hbad == 0, "%d wrong reads across grid.sync (x1000: a block's shared memory changed)", hbad);
    for (int i = 0; i < n; i++)
        EXPECT(h[i] == (rounds_n - 1) * 7 + (i + 1) % n, "out[%d] = %d", i, h[i]);

    // One block more than can be resident: refused at the launch, and not sticky.
    cudaError_t e = cudaLaunchCooperativeKernel((void*)rounds, blocks + 1, threads, args, shared, 0);
    EXPECT(e == cudaErrorCooperativeLaunchTooLarge, "a grid of %d blocks: %s", blocks + 1, cudaGetErrorString(e));
    (void)cudaGetLastError();

    // cudaLaunchKernelEx with the cooperative attribute, a grid-wide sum.
    const int m = 100000;
    int* hin = new int[m];
    long long want = 0;
    for (int i = 0; i < m; i++) { hin[i] = (i * 37) % 1001 - 500; want += hin[i]; }
    int *din, *partial, *total, *seen;
    CHECK(cudaMalloc(&din, m * sizeof(int)));
    CHECK(cudaMalloc(&seen, blocks * sizeof(int)));
    CHECK(cudaMalloc(&partial, blocks * sizeof(int)));
    CHECK(cudaMalloc(&total, sizeof(int)));
    CHECK(cudaMemcpy(din, hin, m * sizeof(int), cudaMemcpyHostToDevice));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks); cfg.blockDim = dim3(threads);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr; cfg.numAttrs = 1;
    CHECK(cudaLaunchKernelEx(&cfg, grid_sum, (const int*)din, m, partial, total, seen));
    int got = 0;
    CHECK(cudaMemcpy(&got, total, sizeof(int), cudaMemcpyDeviceToHost));
    EXPECT(got == want, "grid sum %d, want %lld", got, want);
    int* hseen = new int[blocks];
    CHECK(cudaMemcpy(hseen, seen, blocks * sizeof(int), cudaMemcpyDeviceToHost));
    for (int b = 0; b < blocks; b++) EXPECT(hseen[b] == want, "block %d saw the sum %d", b, hseen[b]);

    // Captured into a graph, replayed twice: still cooperative.
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK(cudaMemset(total, 0, sizeof(int)));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    void* sargs[] = {&din, (void*)&m, &partial, &total, &seen};
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cudaLaunchCooperativeKernel((void*)grid_sum, blocks, threads, sargs, 0, s));
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 2; i++) {
        CHECK(cudaMemset(total, 0, sizeof(int)));
        CHECK(cudaGraphLaunch(ge, s));
        CHECK(cudaStreamSynchronize(s));
        CHECK(cudaMemcpy(&got, total, sizeof(int), cudaMemcpyDeviceToHost));
        EXPECT(got == want, "graph replay %d: grid sum %d, want %lld", i, got, want);
    }
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    CHECK(cudaStreamDestroy(s));
    std::printf("OK cooperative_grid (%d blocks of %d threads: %d per multiprocessor x %d)\n",
                blocks, threads, per_sm, sms);
    return 0;
}
