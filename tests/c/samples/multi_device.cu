// Two devices, as NVIDIA's simpleP2P and simpleMultiGPU use them without peer access: each
// device fills its own buffer with its own kernel; copies between them every way the runtime
// offers (cudaMemcpyPeer, cudaMemcpyPeerAsync on either device's stream, cudaMemcpy with
// cudaMemcpyDefault and cudaMemcpyDeviceToDevice, one larger than a copy's piece); each
// device's memory counted in its own quota; peer access reported as not available.
// Needs a broker with two CPU devices (cpu_devices = 2).
#include "common.h"
#include <vector>

__global__ void fill(unsigned* p, size_t n, unsigned k) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (unsigned)i * 7u + k;
}
__global__ void add(unsigned* p, size_t n, unsigned k) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] += k;
}

static void expect_pattern(int dev, const unsigned* d, size_t n, unsigned k, const char* what) {
    std::vector<unsigned> h(n);
    CHECK(cudaSetDevice(dev));
    CHECK(cudaMemcpy(h.data(), d, n * sizeof(unsigned), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++)
        EXPECT(h[i] == (unsigned)i * 7u + k, "%s: word %zu on device %d is %u, not %u", what, i, dev, h[i],
               (unsigned)i * 7u + k);
}

int main() {
    int count = 0;
    CHECK(cudaGetDeviceCount(&count));
    EXPECT(count == 2, "%d devices, not 2", count);
    int can = -1;
    CHECK(cudaDeviceCanAccessPeer(&can, 0, 1));
    EXPECT(can == 0, "peer access from device 0 to 1 reported as %d", can);

    const size_t n = (20u << 20) / sizeof(unsigned);          // 20 MiB: more than one piece
    const size_t bytes = n * sizeof(unsigned);
    unsigned *a0, *b0, *a1;
    size_t free1_before, free1_after, total;
    CHECK(cudaSetDevice(1));
    CHECK(cudaMemGetInfo(&free1_before, &total));
    CHECK(cudaSetDevice(0));
    CHECK(cudaMalloc(&a0, bytes));
    CHECK(cudaMalloc(&b0, bytes));
    fill<<<64, 256>>>(a0, n, 3);
    CHECK(cudaGetLastError());
    CHECK(cudaSetDevice(1));
    CHECK(cudaMemGetInfo(&free1_after, &total));
    EXPECT(free1_after == free1_before, "device 0's allocations took %zu bytes of device 1's quota",
           free1_before - free1_after);
    CHECK(cudaMalloc(&a1, bytes));
    fill<<<64, 256>>>(a1, n, 11);
    CHECK(cudaGetLastError());
    expect_pattern(1, a1, n, 11, "device 1's own kernel");

    // device 0 -> device 1, after device 0's kernel (cudaMemcpyPeer orders after both devices' work)
    CHECK(cudaMemcpyPeer(a1, 1, a0, 0, bytes));
    expect_pattern(1, a1, n, 3, "cudaMemcpyPeer 0->1");

    // changed on device 1, back to device 0 on a stream of device 0
    CHECK(cudaSetDevice(1));
    add<<<64, 256>>>(a1, n, 100);
    CHECK(cudaGetLastError());
    CHECK(cudaSetDevice(0));
    cudaStream_t s0;
    CHECK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));
    CHECK(cudaMemcpyPeerAsync(b0, 0, a1, 1, bytes, s0));
    CHECK(cudaStreamSynchronize(s0));
    expect_pattern(0, b0, n, 103, "cudaMemcpyPeerAsync 1->0");

    // unified addressing: the pointers say which devices
    CHECK(cudaSetDevice(0));
    fill<<<64, 256>>>(a0, n, 42);
    CHECK(cudaMemcpy(a1, a0, bytes, cudaMemcpyDefault));
    expect_pattern(1, a1, n, 42, "cudaMemcpy Default 0->1");
    CHECK(cudaSetDevice(1));
    add<<<64, 256>>>(a1, n, 1);
    CHECK(cudaMemcpy(b0, a1, 4096, cudaMemcpyDeviceToDevice));
    expect_pattern(0, b0, 4096 / sizeof(unsigned), 43, "cudaMemcpy DeviceToDevice 1->0");

    CHECK(cudaSetDevice(0));
    CHECK(cudaStreamDestroy(s0));
    CHECK(cudaFree(a0));
    CHECK(cudaFree(b0));
    CHECK(cudaSetDevice(1));
    CHECK(cudaFree(a1));
    std::printf("OK multi_device\n");
    return 0;
}
