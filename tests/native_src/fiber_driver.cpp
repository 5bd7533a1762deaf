/* Runs kernel 0 of one translated module linked into this program (no Python, no dlopen):
 * what the fiber switch test builds for each architecture and runs under qemu-user.
 *     driver N BLOCK [coop]    a[i] = i % 7, b[i] = i % 3 (floats); prints c[0..N) as %a, one per line
 * coop: a cooperative launch, every block resident on this one worker (grid.sync).
 * The structures mirror kubecash_runtime.h's Launch and Worker (and cpukernels/launch.py's). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct DeviceError { uint32_t claimed; int32_t code; char message[1024]; };
struct Launch {
    uint32_t grid[3], block[3];
    uint64_t nblocks;
    uint64_t* next_block;
    uint64_t shared_bytes, module_id;
    DeviceError* error;
    uint64_t coop;
    uint64_t* workspace;
};
struct Worker {
    void* shared;
    char* stacks;
    uint64_t slot_size, guard_size, nslots, nfibers, owner_module;
    const void* owner_thread;
    unsigned char* coop_area;
    uint64_t coop_blocks;
};
static const uint64_t kCoopStride = 96 * 1024 + 64;    /* kubecash_runtime.h's */
extern "C" int __kc_run(int, void**, const Launch*, Worker*);

int main(int argc, char** argv) {
    if (argc != 3 && argc != 4) return 2;
    const int n = atoi(argv[1]), block = atoi(argv[2]), nb = (n + block - 1) / block;
    const bool coop = argc == 4 && strcmp(argv[3], "coop") == 0;
    const int slots = coop ? nb * block : block;
    float* a = (float*)malloc(n * sizeof(float));
    float* b = (float*)malloc(n * sizeof(float));
    float* c = (float*)calloc(n, sizeof(float));
    for (int i = 0; i < n; ++i) { a[i] = (float)(i % 7); b[i] = (float)(i % 3); }
    const long page = sysconf(_SC_PAGESIZE);
    const uint64_t slot = page + (64 << 10);
    char* stacks = (char*)mmap(nullptr, slot * slots, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stacks == MAP_FAILED) return 3;
    for (int i = 0; i < slots; ++i) mprotect(stacks + i * slot, page, PROT_NONE);   /* guard pages */
    unsigned char* area = coop ? (unsigned char*)calloc(nb, kCoopStride) : nullptr;
    Worker W = {aligned_alloc(16, 64 << 10), stacks, slot, (uint64_t)page, (uint64_t)slots, 0, 0, nullptr,
                area, coop ? (uint64_t)nb : 0};
    for (int rep = 0; rep < 2; ++rep) {     /* twice: the second launch resumes parked fibers */
        uint64_t next = 0;
        DeviceError e = {};
        uint64_t workspace[2] = {0, 0};
        Launch L = {{(uint32_t)nb, 1, 1}, {(uint32_t)block, 1, 1}, (uint64_t)nb, &next, 0, 1, &e,
                    coop ? (uint64_t)nb : 0, coop ? workspace : nullptr};
        const float* pa = a;
        const float* pb = b;
        float* pc = c;
        int nn = n;
        void* args[] = {&pa, &pb, &pc, &nn};
        memset(c, 0, n * sizeof(float));
        const int rc = __kc_run(0, args, &L, &W);
        if (rc != 0) { fprintf(stderr, "__kc_run: %d %s\n", rc, e.message); return 1; }
    }
    for (int i = 0; i < n; ++i) printf("%a\n", c[i]);
    return 0;
}
