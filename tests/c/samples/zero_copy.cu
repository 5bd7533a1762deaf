// Zero-copy: mapped pinned host memory (cudaHostAllocMapped) that kernels read and write
// through its device pointer, the host seeing the results without a copy; its flags and
// pointer attributes; it counts in the memory quota (it is the CPU device's memory); plain
// pinned memory has no device pointer here.
#include "common.h"
__global__ void scale(const float* in, float* out, float k, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i] * k;
}
int main() {
    const int n = 1 << 20;
    int can = 0;
    CHECK(cudaDeviceGetAttribute(&can, cudaDevAttrCanMapHostMemory, 0));
    EXPECT(can == 1, "cudaDevAttrCanMapHostMemory %d", can);
    float *a, *b;
    size_t free0, free1, free2, total;
    scale<<<1, 1>>>(nullptr, nullptr, 0.f, 0);        // the module loads (and is charged) first
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemGetInfo(&free0, &total));
    CHECK(cudaHostAlloc((void**)&a, n * sizeof(float), cudaHostAllocMapped));
    CHECK(cudaHostAlloc((void**)&b, n * sizeof(float), cudaHostAllocMapped | cudaHostAllocPortable));
    CHECK(cudaMemGetInfo(&free1, &total));
    EXPECT(free0 - free1 >= 2 * n * sizeof(float), "mapped memory not in the quota: free %zu, then %zu", free0, free1);
    for (int i = 0; i < n; i++) a[i] = (float)i;
    float *da, *db;
    CHECK(cudaHostGetDevicePointer((void**)&da, a, 0));
    CHECK(cudaHostGetDevicePointer((void**)&db, b, 0));
    unsigned flags = 0;
    CHECK(cudaHostGetFlags(&flags, b));
    EXPECT(flags & cudaHostAllocMapped, "flags %#x", flags);
    cudaPointerAttributes attr;
    CHECK(cudaPointerGetAttributes(&attr, a + 5));
    EXPECT(attr.type == cudaMemoryTypeHost && attr.devicePointer == (void*)(da + 5) && attr.hostPointer == (void*)(a + 5),
           "type %d device %p host %p", (int)attr.type, attr.devicePointer, attr.hostPointer);
    scale<<<(n + 255) / 256, 256>>>(da, db, 2.5f, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < n; i++) EXPECT(b[i] == 2.5f * i, "b[%d] = %f", i, b[i]);   // no copy: the same memory
    a[7] = -1.f;                                       // host writes, the next kernel sees them
    scale<<<(n + 255) / 256, 256>>>(da, db, 1.f, n);
    CHECK(cudaDeviceSynchronize());
    EXPECT(b[7] == -1.f && b[8] == 8.f, "b[7] = %f, b[8] = %f", b[7], b[8]);
    float* plain;
    CHECK(cudaMallocHost((void**)&plain, 4096));
    void* none = nullptr;
    EXPECT(cudaHostGetDevicePointer(&none, plain, 0) != cudaSuccess, "plain pinned memory has a device pointer %p", none);
    (void)cudaGetLastError();
    CHECK(cudaFreeHost(plain));
    CHECK(cudaFreeHost(a));
    CHECK(cudaFreeHost(b));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemGetInfo(&free2, &total));
    EXPECT(free2 == free0, "free %zu after cudaFreeHost, %zu before", free2, free0);
    std::printf("OK zero_copy\n");
    return 0;
}
