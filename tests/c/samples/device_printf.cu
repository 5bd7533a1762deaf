// Device printf reaches the program's stdout at the next synchronization.
#include "common.h"
__global__ void hello(int tag) {
    if (threadIdx.x < 2) printf("hello from block %d thread %d tag %d\n", blockIdx.x, threadIdx.x, tag);
}
int main() {
    hello<<<2, 32>>>(42);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::fflush(stdout);
    std::printf("OK device_printf\n");
    return 0;
}
