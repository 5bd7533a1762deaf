// Virtual memory management, as NVIDIA's vectorAddMMAP and PyTorch's expandable segments use
// it: the driver's cuMem* calls reached through cudaGetDriverEntryPointByVersion (no -lcuda).
// A reserved range backed by two physical allocations side by side, written by one kernel
// across the seam and read back whole; the same physical memory mapped a second time (and at
// an offset) aliases; unmapped addresses refuse copies; the quota counts cuMemCreate, not
// the reservation, and refuses an allocation past it; everything given back at the end.
#include "common.h"
#include <cuda.h>
#include <vector>

#define CU(call) do { CUresult r_ = (call); if (r_ != CUDA_SUCCESS) { \
    std::printf("FAIL %s:%d %s: CUresult %d\n", __FILE__, __LINE__, #call, (int)r_); std::exit(1); } } while (0)

template <class F> static F entry(const char* name) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    CHECK(cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &q));
    EXPECT(q == cudaDriverEntryPointSuccess && fn, "no driver entry point %s", name);
    return reinterpret_cast<F>(fn);
}
#define DRIVER(name) auto p_##name = entry<decltype(&name)>(#name)

__global__ void fill(unsigned* p, size_t n, unsigned k) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (unsigned)i * 3u + k;
}

int main() {
    DRIVER(cuDeviceGetAttribute); DRIVER(cuMemGetAllocationGranularity); DRIVER(cuMemAddressReserve);
    DRIVER(cuMemAddressFree); DRIVER(cuMemCreate); DRIVER(cuMemRelease); DRIVER(cuMemMap);
    DRIVER(cuMemUnmap); DRIVER(cuMemSetAccess); DRIVER(cuMemGetAccess);
    DRIVER(cuMemRetainAllocationHandle); DRIVER(cuMemGetAllocationPropertiesFromHandle);
    CHECK(cudaSetDevice(0));
    CHECK(cudaFree(0));
    int vmm = 0;
    CU(p_cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, 0));
    EXPECT(vmm == 1, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is %d", vmm);

    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t g = 0;
    CU(p_cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    EXPECT(g >= 4096 && (g & (g - 1)) == 0, "granularity %zu", g);

    fill<<<1, 1>>>(nullptr, 0, 0);          // the module loads now: its footprint is in free0
    CHECK(cudaDeviceSynchronize());
    size_t free0, total, free1;
    CHECK(cudaMemGetInfo(&free0, &total));
    CUdeviceptr base, alias;
    CU(p_cuMemAddressReserve(&base, 4 * g, 0, 0, 0));
    CU(p_cuMemAddressReserve(&alias, 2 * g, 0, 0, 0));
    CHECK(cudaMemGetInfo(&free1, &total));
    EXPECT(free1 == free0, "a reservation took %zu bytes of the quota", free0 - free1);
    CUmemGenericAllocationHandle h1, h2;
    CU(p_cuMemCreate(&h1, 2 * g, &prop, 0));
    CU(p_cuMemCreate(&h2, g, &prop, 0));
    CHECK(cudaMemGetInfo(&free1, &total));
    EXPECT(free0 - free1 == 3 * g, "cuMemCreate of %zu bytes took %zu of the quota", 3 * g, free0 - free1);

    // two allocations side by side, one kernel across the seam
    CU(p_cuMemMap(base, 2 * g, 0, h1, 0));
    CU(p_cuMemMap(base + 2 * g, g, 0, h2, 0));
    CUmemAccessDesc rw = {};
    rw.location = prop.location;
    rw.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CU(p_cuMemSetAccess(base, 3 * g, &rw, 1));
    unsigned long long flags = 0;
    CU(p_cuMemGetAccess(&flags, &prop.location, base + g));
    EXPECT(flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE, "access flags %llu", flags);
    const size_t n = 3 * g / sizeof(unsigned);
    unsigned* d = reinterpret_cast<unsigned*>(base);
    fill<<<64, 256>>>(d, n, 7);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<unsigned> got(n);
    CHECK(cudaMemcpy(got.data(), d, 3 * g, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++)
        EXPECT(got[i] == (unsigned)i * 3u + 7u, "word %zu is %u after the kernel", i, got[i]);

    // the same memory mapped again aliases: h2 whole, then h1's second half at an offset
    CU(p_cuMemMap(alias, g, 0, h2, 0));
    CU(p_cuMemMap(alias + g, g, g, h1, 0));
    CU(p_cuMemSetAccess(alias, 2 * g, &rw, 1));
    std::vector<unsigned> a(2 * g / sizeof(unsigned));
    CHECK(cudaMemcpy(a.data(), reinterpret_cast<void*>(alias), 2 * g, cudaMemcpyDeviceToHost));
    const size_t q = g / sizeof(unsigned);
    for (size_t i = 0; i < q; i++) {
        EXPECT(a[i] == got[2 * q + i], "alias of h2: word %zu is %u, not %u", i, a[i], got[2 * q + i]);
        EXPECT(a[q + i] == got[q + i], "alias of h1 at offset g: word %zu is %u, not %u", i, a[q + i], got[q + i]);
    }
    fill<<<16, 256>>>(reinterpret_cast<unsigned*>(alias), q, 1000);       // written through the alias
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(got.data(), d + 2 * q, g, cudaMemcpyDeviceToHost));  // read through the first mapping
    for (size_t i = 0; i < q; i++)
        EXPECT(got[i] == (unsigned)i * 3u + 1000u, "word %zu of h2 is %u after a write through its alias", i, got[i]);

    // handles: a mapped address gives its allocation back; its properties are what was asked
    CUmemGenericAllocationHandle back;
    CU(p_cuMemRetainAllocationHandle(&back, reinterpret_cast<void*>(base + 2 * g + 100)));
    EXPECT(back == h2, "retained handle %llx, not h2 %llx", (unsigned long long)back, (unsigned long long)h2);
    CU(p_cuMemRelease(back));
    CUmemAllocationProp got_prop = {};
    CU(p_cuMemGetAllocationPropertiesFromHandle(&got_prop, h1));
    EXPECT(got_prop.type == CU_MEM_ALLOCATION_TYPE_PINNED && got_prop.location.id == 0, "properties of h1");

    // unmapped and inaccessible addresses refuse copies (the program goes on)
    std::vector<unsigned> host(q, 5);
    EXPECT(cudaMemcpy(reinterpret_cast<void*>(base + 3 * g), host.data(), g, cudaMemcpyHostToDevice) != cudaSuccess,
           "a copy into the unmapped quarter of a reservation succeeded");
    cudaGetLastError();
    CUmemAccessDesc ro = rw;
    ro.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
    CU(p_cuMemSetAccess(alias, g, &ro, 1));
    EXPECT(cudaMemcpy(reinterpret_cast<void*>(alias), host.data(), 64, cudaMemcpyHostToDevice) != cudaSuccess,
           "a copy into a read-only mapping succeeded");
    cudaGetLastError();
    CHECK(cudaMemcpy(host.data(), reinterpret_cast<void*>(alias), 64, cudaMemcpyDeviceToHost));   // reading is allowed
    EXPECT(host[1] == 1003u, "read-only mapping reads %u", host[1]);

    // past the quota: refused at cuMemCreate
    CUmemGenericAllocationHandle big;
    size_t too_much = (total / g + 1) * g;
    CUresult r = p_cuMemCreate(&big, too_much, &prop, 0);
    EXPECT(r == CUDA_ERROR_OUT_OF_MEMORY, "cuMemCreate of %zu bytes over a %zu-byte quota gave %d", too_much, total, (int)r);

    // released while mapped: the memory stays until its last mapping goes
    CU(p_cuMemRelease(h1));
    CU(p_cuMemRelease(h2));
    CHECK(cudaMemcpy(got.data(), d, 64, cudaMemcpyDeviceToHost));
    EXPECT(got[0] == 7u, "word 0 is %u after cuMemRelease", got[0]);
    CU(p_cuMemUnmap(base, 3 * g));
    CU(p_cuMemUnmap(alias, 2 * g));
    CU(p_cuMemAddressFree(base, 4 * g));
    CU(p_cuMemAddressFree(alias, 2 * g));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemGetInfo(&free1, &total));
    EXPECT(free1 == free0, "%zu bytes of the quota not given back", free0 - free1);
    std::printf("OK vmm_mapping\n");
    return 0;
}
