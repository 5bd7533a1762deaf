// simpleStreams: work split over streams from pinned memory, async copies, events timing it.
#include "common.h"
__global__ void scale(float* x, float f, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * f + 1.0f;
}
int main() {
    const int nstreams = 4, chunk = 1 << 16, n = nstreams * chunk;
    float* h;
    CHECK(cudaMallocHost(&h, n * sizeof(float)));
    for (int i = 0; i < n; i++) h[i] = i % 1000;
    float* d;
    CHECK(cudaMalloc(&d, n * sizeof(float)));
    cudaStream_t s[nstreams];
    for (auto& st : s) CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start)); CHECK(cudaEventCreate(&stop));
    CHECK(cudaEventRecord(start, 0));
    for (int k = 0; k < nstreams; k++) {
        size_t off = (size_t)k * chunk;
        CHECK(cudaMemcpyAsync(d + off, h + off, chunk * sizeof(float), cudaMemcpyHostToDevice, s[k]));
        scale<<<chunk / 256, 256, 0, s[k]>>>(d + off, 2.0f, chunk);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpyAsync(h + off, d + off, chunk * sizeof(float), cudaMemcpyDeviceToHost, s[k]));
    }
    for (auto& st : s) CHECK(cudaStreamSynchronize(st));
    CHECK(cudaEventRecord(stop, 0));
    CHECK(cudaEventSynchronize(stop));
    float ms = -1;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    EXPECT(ms >= 0 && ms < 60000, "elapsed %g ms", ms);
    EXPECT(cudaEventQuery(stop) == cudaSuccess, "a synchronized event is not complete");
    for (int i = 0; i < n; i++) EXPECT(h[i] == (i % 1000) * 2.0f + 1.0f, "h[%d] = %g", i, h[i]);
    for (auto& st : s) CHECK(cudaStreamDestroy(st));
    CHECK(cudaEventDestroy(start)); CHECK(cudaEventDestroy(stop));
    CHECK(cudaFreeHost(h)); CHECK(cudaFree(d));
    std::printf("OK streams_events %.3f ms\n", ms);
    return 0;
}
