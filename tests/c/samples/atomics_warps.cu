// Histogram with shared and global atomics; a warp-shuffle reduction; ballot-based counting.
#include "common.h"
__global__ void histogram(const unsigned char* in, int n, unsigned* bins) {
    __shared__ unsigned local[64];
    for (int i = threadIdx.x; i < 64; i += blockDim.x) local[i] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&local[in[i] & 63], 1u);
    __syncthreads();
    for (int i = threadIdx.x; i < 64; i += blockDim.x) atomicAdd(&bins[i], local[i]);
}
__global__ void warp_sum(const int* in, int* out, int* odd_count) {
    int v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    unsigned odd = __ballot_sync(0xffffffffu, in[blockIdx.x * blockDim.x + threadIdx.x] & 1);
    if ((threadIdx.x & 31) == 0) { atomicAdd(out, v); atomicAdd(odd_count, __popc(odd)); }
}
int main() {
    const int n = 1 << 18;
    unsigned char* h = new unsigned char[n];
    unsigned want[64] = {0};
    for (int i = 0; i < n; i++) { h[i] = (unsigned char)(i * 2654435761u >> 13); want[h[i] & 63]++; }
    unsigned char* d; unsigned* bins;
    CHECK(cudaMalloc(&d, n)); CHECK(cudaMalloc(&bins, 64 * sizeof(unsigned)));
    CHECK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    CHECK(cudaMemset(bins, 0, 64 * sizeof(unsigned)));
    histogram<<<32, 256>>>(d, n, bins);
    CHECK(cudaGetLastError());
    unsigned got[64];
    CHECK(cudaMemcpy(got, bins, sizeof got, cudaMemcpyDeviceToHost));
    for (int i = 0; i < 64; i++) EXPECT(got[i] == want[i], "bin %d: %u, want %u", i, got[i], want[i]);

    const int m = 4096;
    int* hi = new int[m];
    long long sum = 0; int odd = 0;
    for (int i = 0; i < m; i++) { hi[i] = (i * 37) % 101 - 50; sum += hi[i]; odd += hi[i] & 1; }
    int *di, *dsum, *dodd;
    CHECK(cudaMalloc(&di, m * sizeof(int))); CHECK(cudaMalloc(&dsum, 4)); CHECK(cudaMalloc(&dodd, 4));
    CHECK(cudaMemcpy(di, hi, m * sizeof(int), cudaMemcpyHostToDevice));
    CHECK(cudaMemset(dsum, 0, 4)); CHECK(cudaMemset(dodd, 0, 4));
    warp_sum<<<m / 128, 128>>>(di, dsum, dodd);
    CHECK(cudaGetLastError());
    int gs, go;
    CHECK(cudaMemcpy(&gs, dsum, 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(&go, dodd, 4, cudaMemcpyDeviceToHost));
    EXPECT(gs == sum && go == odd, "sum %d (want %lld), odd %d (want %d)", gs, sum, go, odd);
    std::printf("OK atomics_warps\n");
    return 0;
}
