/* kubecash_runtime.h -- the block scheduler every CPU-backend module runs on.
 *
 * A module is C++ translated from PTX (kubecash.broker.ptx); it is built as
 *     #define __KC_FIBERS 0 or 1        (1: the module has barriers or warp operations)
 *     #include "kubecash_runtime.h"      (this: built-ins, barriers, scheduler, exports)
 *     #include "kubecash_ptx.h"          (what translated instructions call)
 *     <translated functions>             (names re-spelled: none collides with ours)
 *     <kernel and variable tables> __KC_EXPORTS
 * A block's threads run as a plain loop, or as fibers (one stack each, switched by
 * __kc_switch below) where they must meet at barriers and warp operations.
 */
#ifndef KUBECASH_RUNTIME_H
#define KUBECASH_RUNTIME_H

#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <setjmp.h>
#include <sched.h>
#include <dlfcn.h>
#include <type_traits>
#include <utility>

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

/* ---- per-thread built-ins: thread_local state the block loop sets ------------------------
 * Fibers of a block share their OS thread; the scheduler stores each fiber's threadIdx
 * before resuming it, so a kernel always reads its own. */
static thread_local uint3 threadIdx;
static thread_local uint3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;

namespace __kc {
/* Start of this launch's dynamic shared memory. */
static thread_local void* dyn_shared;
}

/* ---- barriers (defined below) ----------------------------------------------------------- */
static void __syncthreads(void);
static int __syncthreads_count(int predicate);
static int __syncthreads_and(int predicate);
static int __syncthreads_or(int predicate);

/* ---- warp-level operations (PTX shfl, vote, match, redux, activemask, bar.warp.sync) ----
 * A lane that reaches one parks with its operands in a WarpOp; once every live lane of its
 * warp has parked (at a warp operation, the block barrier, or its end), the scheduler
 * computes each waiting lane's result from all of theirs, as the warp would in lockstep. */
namespace __kc {
enum WarpKind : uint32_t { WARP_SHFL = 1, WARP_VOTE, WARP_MATCH_ANY, WARP_MATCH_ALL, WARP_REDUX, WARP_SYNC };
struct WarpOp {
    uint32_t kind, mode;    /* shfl: up down bfly idx; vote: all any uni ballot; redux: add min max and or xor, +8 signed */
    uint64_t a;             /* this lane's value (a predicate as 0 or 1) */
    uint32_t b, c, mask;    /* shfl's lane/offset and clamp|segmask; the member mask */
    uint64_t result;        /* out */
    uint32_t pred;          /* out: shfl's and match.all's predicate */
};
}
static void __kc_warp_op(__kc::WarpOp* op);

#ifndef __KC_FIBERS
#define __KC_FIBERS 0
#endif

/* ---- the fiber switch ------------------------------------------------------------------
 * __kc_switch(save, to): push the callee-saved registers on the running stack, store its
 * stack pointer in *save, load `to`, pop, return there. What _setjmp/_longjmp did, without
 * their pointer mangling and unwinding checks: a barrier costs two of these per thread.
 * It leaves by an indirect jump, not a return: the return predictor would expect the caller
 * on the stack being left and miss on every switch (half of a barrier's cost, measured).
 * The floating-point control state is not switched: it is the OS thread's, and translated
 * code changes it only around one instruction (kc::rounded), never across a switch.
 * __kc_fiber_frame builds the frame a fiber not yet run is resumed from. Hidden symbols:
 * each loaded module has its own. */
extern "C" {
__attribute__((visibility("hidden"))) void __kc_switch(void** save, void* to);
__attribute__((visibility("hidden"), noreturn)) void __kc_fiber_main(int idx);
__attribute__((visibility("hidden"))) void __kc_fiber_start(void);
}
#if defined(__x86_64__)
asm(R"(
    .pushsection .text
    .p2align 4
    .globl __kc_switch
    .hidden __kc_switch
    .type __kc_switch, @function
__kc_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    popq %rcx
    jmpq *%rcx
    .size __kc_switch, .-__kc_switch
    .globl __kc_fiber_start
    .hidden __kc_fiber_start
    .type __kc_fiber_start, @function
__kc_fiber_start:
    movl %r12d, %edi
    call __kc_fiber_main
    ud2
    .size __kc_fiber_start, .-__kc_fiber_start
    .popsection
)");
/* Popped from low to high: r15 r14 r13 r12 (the index) rbx rbp, the return address;
 * __kc_fiber_start then runs on a 16-byte aligned stack, as a call expects. */
static void* __kc_fiber_frame(uintptr_t top, int idx) {
    uint64_t* f = (uint64_t*)(top - 56);
    f[0] = f[1] = f[2] = 0;
    f[3] = (uint64_t)(uint32_t)idx;
    f[4] = f[5] = 0;
    f[6] = (uint64_t)(uintptr_t)&__kc_fiber_start;
    return f;
}
#elif defined(__aarch64__)
asm(R"(
    .pushsection .text
    .p2align 4
    .globl __kc_switch
    .hidden __kc_switch
    .type __kc_switch, %function
__kc_switch:
    sub sp, sp, #160
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #160
    br x30
    .size __kc_switch, .-__kc_switch
    .globl __kc_fiber_start
    .hidden __kc_fiber_start
    .type __kc_fiber_start, %function
__kc_fiber_start:
    mov w0, w19
    bl __kc_fiber_main
    brk #0
    .size __kc_fiber_start, .-__kc_fiber_start
    .popsection
)");
/* 160 bytes: x19..x30 (x19: the index, x30: where the switch jumps), d8..d15. */
static void* __kc_fiber_frame(uintptr_t top, int idx) {
    uint64_t* f = (uint64_t*)(top - 160);
    for (int k = 0; k < 20; ++k) f[k] = 0;
    f[0] = (uint64_t)(uint32_t)idx;
    f[11] = (uint64_t)(uintptr_t)&__kc_fiber_start;
    return f;
}
#elif defined(__riscv) && __riscv_xlen == 64 && defined(__riscv_float_abi_double)
asm(R"(
    .pushsection .text
    .p2align 2
    .globl __kc_switch
    .hidden __kc_switch
    .type __kc_switch, @function
__kc_switch:
    addi sp, sp, -208
    sd ra, 0(sp)
    sd s0, 8(sp)
    sd s1, 16(sp)
    sd s2, 24(sp)
    sd s3, 32(sp)
    sd s4, 40(sp)
    sd s5, 48(sp)
    sd s6, 56(sp)
    sd s7, 64(sp)
    sd s8, 72(sp)
    sd s9, 80(sp)
    sd s10, 88(sp)
    sd s11, 96(sp)
    fsd fs0, 104(sp)
    fsd fs1, 112(sp)
    fsd fs2, 120(sp)
    fsd fs3, 128(sp)
    fsd fs4, 136(sp)
    fsd fs5, 144(sp)
    fsd fs6, 152(sp)
    fsd fs7, 160(sp)
    fsd fs8, 168(sp)
    fsd fs9, 176(sp)
    fsd fs10, 184(sp)
    fsd fs11, 192(sp)
    sd sp, 0(a0)
    mv sp, a1
    ld ra, 0(sp)
    ld s0, 8(sp)
    ld s1, 16(sp)
    ld s2, 24(sp)
    ld s3, 32(sp)
    ld s4, 40(sp)
    ld s5, 48(sp)
    ld s6, 56(sp)
    ld s7, 64(sp)
    ld s8, 72(sp)
    ld s9, 80(sp)
    ld s10, 88(sp)
    ld s11, 96(sp)
    fld fs0, 104(sp)
    fld fs1, 112(sp)
    fld fs2, 120(sp)
    fld fs3, 128(sp)
    fld fs4, 136(sp)
    fld fs5, 144(sp)
    fld fs6, 152(sp)
    fld fs7, 160(sp)
    fld fs8, 168(sp)
    fld fs9, 176(sp)
    fld fs10, 184(sp)
    fld fs11, 192(sp)
    addi sp, sp, 208
    mv t1, ra
    jr t1
    .size __kc_switch, .-__kc_switch
    .globl __kc_fiber_start
    .hidden __kc_fiber_start
    .type __kc_fiber_start, @function
__kc_fiber_start:
    mv a0, s1
    call __kc_fiber_main
    ebreak
    .size __kc_fiber_start, .-__kc_fiber_start
    .popsection
)");
/* 208 bytes (a multiple of 16): ra (where the switch jumps), s0..s11 (s1: the index), fs0..fs11. */
static void* __kc_fiber_frame(uintptr_t top, int idx) {
    uint64_t* f = (uint64_t*)(top - 208);
    for (int k = 0; k < 26; ++k) f[k] = 0;
    f[0] = (uint64_t)(uintptr_t)&__kc_fiber_start;
    f[2] = (uint64_t)(uint32_t)idx;
    return f;
}
#else
#error "kubecash: no fiber switch for this architecture (x86-64, aarch64 and riscv64 have one)"
#endif
#define __KC_ABI 2  /* must match cpukernels._ABI_VERSION */

namespace __kc {

/* A launch's device-side error (trap, a failed assert), set by the first thread to hit one
 * (claimed atomically: first one wins); cpukernels/launch.py mirrors it as _KcDeviceError. */
struct DeviceError {
    uint32_t claimed;       /* 0 until a thread has claimed the record */
    int32_t code;           /* the CUresult: CUDA_ERROR_ASSERT, CUDA_ERROR_ILLEGAL_INSTRUCTION */
    char message[1024];     /* NUL-terminated */
};
static constexpr int kDeviceError = -6;  /* run's code for that; cpukernels/launch.py names it */

/* Mirrors of the ctypes structures in cpukernels/launch.py and loader.py. */
struct Launch {
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t nblocks;
    uint64_t* next_block;   /* shared by all workers of the launch: blocks are grabbed from it */
    uint64_t shared_bytes;
    uint64_t module_id;     /* unique per loaded module instance, never reused */
    DeviceError* error;     /* where a trap or failed assert is recorded (may be null) */
    uint64_t coop;          /* cooperative launch: the blocks each worker holds resident at once (0: none) */
    uint64_t* workspace;    /* cooperative launch: the grid's barrier words (%envreg1:2), zeroed; else null */
};
/* One per Launcher worker thread, owned by Python, reused by every launch and module. */
struct Worker {
    void* shared;           /* >= 48 KiB, 16-byte aligned: the dynamic shared memory */
    char* stacks;           /* nslots slots of slot_size bytes: [guard page | stack | FiberRec] */
    uint64_t slot_size;
    uint64_t guard_size;
    uint64_t nslots;
    uint64_t nfibers;       /* fibers already started (parked) for owner_module/owner_thread */
    uint64_t owner_module;
    const void* owner_thread;
    unsigned char* coop_area;   /* cooperative launches: per resident block, a CoopBlock */
    uint64_t coop_blocks;       /* how many CoopBlocks it holds */
};

struct FiberRec {
    void* sp;               /* where the fiber is parked: its stack pointer in __kc_switch */
    uint3 tid;
    int done;
    int state;              /* FIBER_READY, or what it waits at */
    WarpOp* op;             /* at a warp operation: its operands and result */
    int waiting;            /* its last mbarrier wait failed (a yield of it is no progress) */
};
/* FIBER_YIELD: runnable again next round (mbarrier waits, nanosleep), after the others ran */
enum { FIBER_READY = 0, FIBER_AT_BARRIER = 1, FIBER_AT_WARP_OP = 2, FIBER_YIELD = 3 };
/* Rounds in a row where every lane that ran only waited again, no mbarrier changed, and no
 * lane ended or reached a barrier: the block can never go on (run_fibers fails the launch). */
static constexpr uint32_t kIdleRounds = 4096;
static constexpr int kDeadlock = -5;     /* run's code for that; cpukernels/launch.py names it */
static constexpr uint64_t kRecBytes = (sizeof(FiberRec) + 63) & ~uint64_t(63);
/* Each fiber's record, with its stack's hot top just below, sits this far below the end of
 * its slot. Slots are a whole number of pages apart, so without the stagger every record
 * would fall in the same cache sets and a barrier round would miss on each one. */
static constexpr uint64_t kRecStagger = 15 * 256;
static inline uint64_t rec_offset(uint64_t i) { return kRecBytes + ((i >> 4) & 15) * 256; }

typedef int (*RunFn)(void**, const Launch*, Worker*);
struct KernelEntry {
    const char* name;
    const char* qualname;
    void* addr;
    RunFn run;
    uint64_t nparams;
    const uint64_t* sizes;
    const uint64_t* aligns;
};
struct VarEntry {
    const char* name;
    const char* qualname;
    void* addr;
    uint64_t size;
};

/* Parameter types are deduced from the kernel's own function type, never parsed. */
template <class F> struct Traits;
template <class... A> struct Traits<void (*)(A...)> {
    static constexpr uint64_t n = sizeof...(A);
    static constexpr uint64_t sizes[sizeof...(A) ? sizeof...(A) : 1] = {sizeof(std::remove_reference_t<A>)...};
    static constexpr uint64_t aligns[sizeof...(A) ? sizeof...(A) : 1] = {alignof(std::remove_reference_t<A>)...};
    template <auto F, size_t... I>
    static inline __attribute__((always_inline)) void call(void** a, std::index_sequence<I...>) {
        F(*reinterpret_cast<std::remove_reference_t<A>*>(a[I])...);
    }
};
template <class... A> struct Traits<void (*)(A...) noexcept> : Traits<void (*)(A...)> {};

/* The scheduler's per-OS-thread state, in one object so that a function pays for one TLS
 * address lookup (dlopen'ed modules use the general-dynamic TLS model). */
struct Rt {
    void* sched;                /* the block scheduler's stack pointer while a fiber runs */
    FiberRec* cur;              /* the running fiber, null outside fiber mode */
    Worker* worker;
    void (*invoke)(void**);
    void** args;
    int bar_count, bar_n;       /* __syncthreads_count/and/or accumulators of this phase */
    int res_count, res_n;       /* ... and their results from the last phase */
    uint64_t progress;          /* bumped by whatever lets a waiting lane go on (mbarrier changes...) */
    int busy_yield;             /* a lane yielded this round without waiting on an mbarrier */
    int coop;                   /* a cooperative launch's blocks run here, a round each in turn */
    unsigned char* smem;        /* then: the running block's shared window (else the thread's own) */
};
static thread_local Rt rt;      /* its address also identifies the OS thread */

static inline FiberRec* rec(Worker* W, uint64_t i) {
    return reinterpret_cast<FiberRec*>(W->stacks + (i + 1) * W->slot_size - rec_offset(i));
}

static void no_fiber_barrier(void) {
    if ((uint64_t)blockDim.x * blockDim.y * blockDim.z == 1) return;
    fprintf(stderr, "kubecash: __syncthreads reached in a module compiled without barrier support\n");
    abort();
}

/* A fiber's whole life: run one CUDA thread each time it is resumed, mark it done, park. */
extern "C" __attribute__((visibility("hidden"), noreturn)) void __kc_fiber_main(int idx) {
    FiberRec* r = rec(rt.worker, (uint64_t)idx);
    for (;;) {
        rt.invoke(rt.args);
        r->done = 1;
        __kc_switch(&r->sp, rt.sched);
    }
}

/* A fiber not yet run: a stack whose top holds the frame __kc_switch pops, returning into
 * __kc_fiber_start (which calls __kc_fiber_main with the fiber's index), with this thread's
 * floating-point control state. Once per (worker, module); nothing runs until resumed. */
static int start_fibers(Worker* W, uint64_t upto) {
    for (uint64_t i = W->nfibers; i < upto; ++i) {
        uintptr_t top = (uintptr_t)rec(W, i) & ~(uintptr_t)15;
        rec(W, i)->sp = __kc_fiber_frame(top, (int)i);
        W->nfibers = i + 1;
    }
    return 0;
}

static inline void set_block(const Launch* L, uint64_t b) {
    uint64_t gx = L->grid[0], gy = L->grid[1];
    blockIdx.x = (unsigned int)(b % gx);
    blockIdx.y = (unsigned int)((b / gx) % gy);
    blockIdx.z = (unsigned int)(b / (gx * gy));
}

static inline void setup(const Launch* L, Worker* W) {
    blockDim = dim3(L->block[0], L->block[1], L->block[2]);
    gridDim = dim3(L->grid[0], L->grid[1], L->grid[2]);
    dyn_shared = W->shared;
    rt.cur = nullptr;
}

static inline bool warp_value_lt(uint32_t mode, uint64_t x, uint64_t y) {
    return (mode & 8) ? (int32_t)(uint32_t)x < (int32_t)(uint32_t)y : (uint32_t)x < (uint32_t)y;
}

/* Results for the lanes of the warp at fibers base..base+n-1 that wait at a warp operation,
 * each from the values of all of them (a lane not waiting is not active: not a source). */
static void resolve_warp(Worker* W, uint64_t base, uint64_t n) {
    WarpOp* ops[32];
    uint32_t active = 0;
    for (uint64_t l = 0; l < n; ++l) {
        FiberRec* r = rec(W, base + l);
        ops[l] = (!r->done && r->state == FIBER_AT_WARP_OP) ? r->op : nullptr;
        if (ops[l]) active |= 1u << l;
    }
    for (uint32_t l = 0; l < n; ++l) {
        WarpOp* o = ops[l];
        if (!o) continue;
        const uint32_t members = o->mask & active;
        uint64_t r = 0;
        uint32_t p = 0;
        switch (o->kind) {
        case WARP_SHFL: {
            const int32_t lane = (int32_t)l, bval = (int32_t)(o->b & 31), cval = (int32_t)(o->c & 31);
            const int32_t seg = (int32_t)((o->c >> 8) & 31);
            const int32_t max_lane = (lane & seg) | (cval & ~seg), min_lane = lane & seg;
            int32_t j = lane;
            bool in = false;
            switch (o->mode) {
            case 0: j = lane - bval; in = j >= max_lane; break;
            case 1: j = lane + bval; in = j <= max_lane; break;
            case 2: j = lane ^ bval; in = j <= max_lane; break;
            default: j = min_lane | (bval & ~seg); in = j <= max_lane; break;
            }
            if (!in || j < 0 || j >= (int32_t)n || !ops[j]) j = lane;    /* out of range: its own */
            r = ops[j]->a;
            p = in;
            break;
        }
        case WARP_VOTE: {
            uint32_t ballot = 0;
            for (uint32_t k = 0; k < n; ++k)
                if ((members >> k & 1) && ops[k]->a) ballot |= 1u << k;
            r = o->mode == 0 ? (ballot == members) : o->mode == 1 ? (ballot != 0)
              : o->mode == 2 ? (ballot == 0 || ballot == members) : ballot;
            break;
        }
        case WARP_MATCH_ANY:
        case WARP_MATCH_ALL: {
            uint32_t same = 0;
            for (uint32_t k = 0; k < n; ++k)
                if ((members >> k & 1) && ops[k]->a == o->a) same |= 1u << k;
            if (o->kind == WARP_MATCH_ANY) r = same;
            else { p = same == members; r = p ? members : 0; }
            break;
        }
        case WARP_REDUX: {
            bool first = true;
            for (uint32_t k = 0; k < n; ++k) {
                if (!(members >> k & 1)) continue;
                uint64_t v = (uint32_t)ops[k]->a;
                if (first) { r = v; first = false; continue; }
                switch (o->mode & 7) {
                case 0: r = (uint32_t)(r + v); break;
                case 1: if (warp_value_lt(o->mode, v, r)) r = v; break;
                case 2: if (warp_value_lt(o->mode, r, v)) r = v; break;
                case 3: r &= v; break;
                case 4: r |= v; break;
                default: r ^= v; break;
                }
            }
            break;
        }
        default:            /* WARP_SYNC: bar.warp.sync, activemask */
            r = active;
            break;
        }
        o->result = r;
        o->pred = p;
    }
    for (uint64_t l = 0; l < n; ++l)
        if (ops[l]) rec(W, base + l)->state = FIBER_READY;
}

/* One block on its way through its rounds. A worker runs one block at a time, or, in a
 * cooperative launch, all of its share of the grid at once: a round of each in turn, so
 * that a block spinning on the grid barrier lets the others reach it. */
struct BlockRun {
    uint64_t base;          /* its first fiber slot */
    uint64_t alive;         /* its threads not yet ended */
    uint32_t idle;          /* rounds in a row that got nowhere (kIdleRounds) */
    int bar_count, bar_n, res_count, res_n;    /* Rt's, while another block runs */
    uint3 idx;
    unsigned char* smem;    /* its shared window (cooperative launches) */
};
/* What a worker holds per resident block of a cooperative launch (Python maps coop_area):
 * the block's shared window (static and dynamic, as the translator lays them out) and its
 * BlockRun. */
static constexpr uint64_t kCoopWindow = 96 * 1024;
static constexpr uint64_t kCoopStride = kCoopWindow + 64;    /* _COOP_STRIDE in cpukernels/launch.py */
static_assert(sizeof(BlockRun) <= 64, "a BlockRun fits its place in the stride");

static inline void begin_block(Worker* W, BlockRun* B, uint64_t base, const Launch* L, uint64_t b) {
    const uint32_t bx = L->block[0], by = L->block[1], bz = L->block[2];
    set_block(L, b);
    B->idx = blockIdx;
    B->base = base;
    B->alive = (uint64_t)bx * by * bz;
    B->idle = 0;
    B->bar_count = B->bar_n = B->res_count = B->res_n = 0;
    uint64_t i = base;
    for (uint32_t z = 0; z < bz; ++z)
        for (uint32_t y = 0; y < by; ++y)
            for (uint32_t x = 0; x < bx; ++x, ++i) {
                FiberRec* r = rec(W, i);
                r->tid = uint3{x, y, z};
                r->done = 0;
                r->state = FIBER_READY;
                r->waiting = 0;
            }
}

/* A block that can never go on ends the launch; its fibers are parked mid-kernel, so they
 * start afresh next time. */
static int deadlocked(const Launch* L, Worker* W, Rt* R) {
    fprintf(stderr, "kubecash: block (%u,%u,%u) deadlocked: every live thread waits on an "
            "mbarrier that cannot complete\n", blockIdx.x, blockIdx.y, blockIdx.z);
    uint32_t unclaimed = 0;     /* the launch has failed: a cooperative grid's other workers stop */
    if (L->error && __atomic_compare_exchange_n(&L->error->claimed, &unclaimed, 1, false, __ATOMIC_ACQ_REL,
                                                __ATOMIC_RELAXED)) {
        L->error->code = 702;   /* CUDA_ERROR_LAUNCH_TIMEOUT, as run's kDeadlock reports it */
        snprintf(L->error->message, sizeof L->error->message, "a block deadlocked");
    }
    __atomic_store_n(L->next_block, L->nblocks, __ATOMIC_RELAXED);
    W->nfibers = 0;
    R->cur = nullptr;
    R->coop = 0;
    R->smem = nullptr;
    return kDeadlock;
}

/* One round of block B: a warp at a time, its lanes run until each waits at the block
 * barrier, has ended, or yielded; lanes waiting at a warp operation get their results and
 * run on (once no lane of the warp still yields, or the last round got nowhere). Then the
 * barrier opens, or the lanes that yielded may try again. False: the block can never go on. */
static inline __attribute__((always_inline)) bool block_round(Worker* W, Rt* R, uint3* tid, BlockRun* B,
                                                              uint64_t T) {
    const uint64_t before = R->progress;
    bool yielded = false;
    R->busy_yield = 0;
    for (uint64_t w0 = 0; w0 < T; w0 += 32) {
        const uint64_t n = T - w0 < 32 ? T - w0 : 32;
        for (;;) {
            bool at_warp_op = false, warp_yield = false;
            for (uint64_t l = 0; l < n; ++l) {
                FiberRec* r = rec(W, B->base + w0 + l);
                if (r->done) continue;
                if (r->state == FIBER_READY) {
                    if (l + 1 < n) {    /* the next lane's record and stack top, fetched while this one runs */
                        const char* nx = reinterpret_cast<const char*>(rec(W, B->base + w0 + l + 1));
                        __builtin_prefetch(nx);
                        __builtin_prefetch(nx - 64);
                        __builtin_prefetch(nx - 128);
                    }
                    R->cur = r;
                    *tid = r->tid;
                    __kc_switch(&R->sched, r->sp);
                    if (r->done) {
                        --B->alive;
                        ++R->progress;
                        continue;
                    }
                    if (r->state != FIBER_YIELD) ++R->progress;
                }
                at_warp_op |= r->state == FIBER_AT_WARP_OP;   /* a lane's state changes only as it runs */
                warp_yield |= r->state == FIBER_YIELD;
            }
            yielded |= warp_yield;
            if (!at_warp_op || (warp_yield && B->idle == 0)) break;
            resolve_warp(W, B->base + w0, n);
            ++R->progress;
        }
    }
    if (yielded) {      /* a lane waits: the others run first, then it tries again */
        B->idle = (R->progress == before && !R->busy_yield) ? B->idle + 1 : 0;
        if (B->idle > kIdleRounds) return false;
        for (uint64_t k = 0; k < T; ++k)
            if (rec(W, B->base + k)->state == FIBER_YIELD) rec(W, B->base + k)->state = FIBER_READY;
        return true;
    }
    B->idle = 0;
    for (uint64_t k = 0; k < T; ++k) rec(W, B->base + k)->state = FIBER_READY;   /* the barrier opens */
    R->res_count = R->bar_count;
    R->res_n = R->bar_n;
    R->bar_count = R->bar_n = 0;
    return true;
}

/* A cooperative launch's share of the grid on this worker: L->coop blocks taken at once,
 * all resident, each with its own shared window, a round of each in turn. */
static int run_coop(const Launch* L, Worker* W, Rt* R, uint3* tid, uint64_t T) {
    const uint64_t first = __atomic_fetch_add(L->next_block, L->coop, __ATOMIC_RELAXED);
    if (first >= L->nblocks) return 0;
    const uint64_t nb = L->nblocks - first < L->coop ? L->nblocks - first : L->coop;
    if (nb * T > W->nslots || nb > W->coop_blocks || !W->coop_area) return -2;
    if (W->nfibers < nb * T) start_fibers(W, nb * T);
    R->coop = 1;
    for (uint64_t j = 0; j < nb; ++j) {
        BlockRun* B = reinterpret_cast<BlockRun*>(W->coop_area + j * kCoopStride + kCoopWindow);
        begin_block(W, B, j * T, L, first + j);
        B->smem = W->coop_area + j * kCoopStride;
    }
    for (uint64_t left = nb; left;) {
        const uint64_t pass = R->progress;
        for (uint64_t j = 0; j < nb; ++j) {
            BlockRun* B = reinterpret_cast<BlockRun*>(W->coop_area + j * kCoopStride + kCoopWindow);
            if (!B->alive) continue;
            blockIdx = B->idx;
            R->smem = B->smem;
            R->bar_count = B->bar_count; R->bar_n = B->bar_n;
            R->res_count = B->res_count; R->res_n = B->res_n;
            if (!block_round(W, R, tid, B, T)) return deadlocked(L, W, R);
            B->bar_count = R->bar_count; B->bar_n = R->bar_n;
            B->res_count = R->res_count; B->res_n = R->res_n;
            if (!B->alive) --left;
        }
        /* Every block only spun (on the grid barrier: the others are another worker's):
         * give their worker the core, should they share one. */
        if (left && R->progress == pass) sched_yield();
        /* Another worker's block trapped or deadlocked: the grid barrier will never open, and
         * the launch has failed (that worker reports it). These blocks are abandoned. */
        if (left && L->error && __atomic_load_n(&L->error->claimed, __ATOMIC_ACQUIRE)) {
            W->nfibers = 0;
            break;
        }
    }
    R->cur = nullptr;
    R->coop = 0;
    R->smem = nullptr;
    return 0;
}

/* Runs each block's threads as fibers on this OS thread: each fiber runs until it reaches
 * a barrier (or returns); once every live fiber has, the next phase starts. */
static int run_fibers(void (*invoke)(void**), void** args, const Launch* L, Worker* W) {
    const uint64_t bx = L->block[0], by = L->block[1], bz = L->block[2];
    const uint64_t T = bx * by * bz;
    if (T > W->nslots || W->slot_size < W->guard_size + kRecBytes + kRecStagger + 16384) return -2;
    setup(L, W);
    /* This OS thread's state, looked up once: laundered so that the compiler keeps the
     * addresses rather than calling __tls_get_addr again after every switch. */
    Rt* R = &rt;
    uint3* tid = &threadIdx;
    __asm__("" : "+r"(R), "+r"(tid));
    if (W->owner_module != L->module_id || W->owner_thread != R) {
        W->nfibers = 0;  /* parked fibers belong to another module (or thread): start anew */
        W->owner_module = L->module_id;
        W->owner_thread = R;
    }
    R->worker = W;
    R->invoke = invoke;
    R->args = args;
    if (L->coop) return run_coop(L, W, R, tid, T);
    if (W->nfibers < T) {
        int rc = start_fibers(W, T);
        if (rc) return rc;
    }
    for (;;) {
        uint64_t b = __atomic_fetch_add(L->next_block, 1, __ATOMIC_RELAXED);
        if (b >= L->nblocks) break;
        BlockRun B;
        begin_block(W, &B, 0, L, b);
        R->bar_count = R->bar_n = 0;
        while (B.alive)
            if (!block_round(W, R, tid, &B, T)) return deadlocked(L, W, R);
        R->cur = nullptr;
    }
    return 0;
}

/* Where a thread that traps or fails an assert leaves its block, and the launch it is in:
 * per OS thread, set by Kernel::run before any block runs (see __kc_device_error). */
struct FaultRt {
    jmp_buf jb;
    const Launch* launch;
};
static thread_local FaultRt fault;

/* After a device error: this worker runs no more blocks. Its fibers are parked mid-kernel
 * (or abandoned mid-block): they start afresh next time. */
static int after_device_error(Worker* W) {
    rt.cur = nullptr;
    rt.coop = 0;
    rt.smem = nullptr;
    W->nfibers = 0;
    return kDeviceError;
}

template <auto F> struct Kernel {
    using Tr = Traits<decltype(F)>;
    static void invoke(void** a) { Tr::template call<F>(a, std::make_index_sequence<Tr::n>{}); }
    static int run(void** a, const Launch* L, Worker* W) {
        fault.launch = L;
        if (_setjmp(fault.jb)) return after_device_error(W);
        return run_blocks(a, L, W);
    }
    static __attribute__((noinline)) int run_blocks(void** a, const Launch* L, Worker* W) {
#if __KC_FIBERS
        return run_fibers(&invoke, a, L, W);
#else
        /* No barrier anywhere in the module: a block's threads are a plain loop, and the
         * kernel body inlines into it. */
        setup(L, W);
        const uint32_t bx = L->block[0], by = L->block[1], bz = L->block[2];
        for (;;) {
            uint64_t b = __atomic_fetch_add(L->next_block, 1, __ATOMIC_RELAXED);
            if (b >= L->nblocks) break;
            set_block(L, b);
            for (uint32_t z = 0; z < bz; ++z)
                for (uint32_t y = 0; y < by; ++y)
                    for (uint32_t x = 0; x < bx; ++x) {
                        threadIdx = uint3{x, y, z};
                        Tr::template call<F>(a, std::make_index_sequence<Tr::n>{});
                    }
        }
        return 0;
#endif
    }
};

static const char* symbol_of(void* addr) {
    Dl_info di;
    if (addr && dladdr(addr, &di) && di.dli_sname && di.dli_saddr == addr) return di.dli_sname;
    return nullptr;  /* not in the dynamic symbol table (static): Python uses the plain name */
}

}  // namespace __kc

/* Barriers.  noinline: a call the kernel's code cannot see into (its registers live across it). */
static __attribute__((noinline)) void __syncthreads(void) {
    __kc::FiberRec* r = __kc::rt.cur;
    if (__builtin_expect(r == nullptr, 0)) {
        __kc::no_fiber_barrier();
        return;
    }
    r->state = __kc::FIBER_AT_BARRIER;
    __kc_switch(&r->sp, __kc::rt.sched);
}
static __attribute__((noinline)) void __kc_warp_op(__kc::WarpOp* op) {
    __kc::FiberRec* r = __kc::rt.cur;
    if (__builtin_expect(r == nullptr, 0)) {    /* no fibers: a warp of this one lane */
        op->result = op->kind == __kc::WARP_SHFL || op->kind == __kc::WARP_REDUX ? op->a
                   : op->kind == __kc::WARP_VOTE ? (op->mode == 3 ? (op->a ? 1 : 0) : (op->a ? 1 : op->mode == 2))
                   : 1;
        op->pred = op->kind == __kc::WARP_SHFL ? (op->b & 31) == 0 : 1;
        return;
    }
    r->op = op;
    r->state = __kc::FIBER_AT_WARP_OP;
    __kc_switch(&r->sp, __kc::rt.sched);
}
/* Yield: the lane runs again in the block's next round, after the other lanes. */
static __attribute__((noinline)) void __kc_yield(void) {
    __kc::FiberRec* r = __kc::rt.cur;
    if (r == nullptr) return;       /* no fibers: nothing else could run */
    if (!r->waiting) __kc::rt.busy_yield = 1;
    r->state = __kc::FIBER_YIELD;
    __kc_switch(&r->sp, __kc::rt.sched);
}
/* After an ordered load from global memory (ld.acquire / .relaxed / .volatile): in a
 * cooperative launch the lane yields, since it may be spinning on a flag that a block
 * resident on the same worker sets (the grid barrier cooperative_groups builds so). */
static inline void __kc_spin(void) {
#if __KC_FIBERS
    if (__builtin_expect(__kc::rt.coop, 0)) __kc_yield();
#endif
}
/* A function's shared window: its block's in a cooperative launch, else the thread's own. */
static inline unsigned char* __kc_smem(unsigned char* own) {
    unsigned char* w = __kc::rt.smem;
    return w ? w : own;
}
/* %envreg1:%envreg2: the grid workspace of a cooperative launch (0 in any other). */
static inline uint64_t __kc_grid_workspace(void) {
    const __kc::Launch* L = __kc::fault.launch;
    return L ? (uint64_t)(uintptr_t)L->workspace : 0;
}

/* trap / __assertfail: record the error (the first thread of the launch to get here wins),
 * stop the launch handing out blocks, and leave this block for the worker's entry in
 * Kernel::run (the block's other threads are abandoned: the launch has failed). */
static __attribute__((noreturn, noinline)) void __kc_device_error(int32_t code, const char* text) {
    const __kc::Launch* L = __kc::fault.launch;
    if (L == nullptr) abort();      /* not inside a launch: cannot happen */
    __kc::DeviceError* e = L->error;
    uint32_t unclaimed = 0;
    if (e && __atomic_compare_exchange_n(&e->claimed, &unclaimed, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        snprintf(e->message, sizeof e->message, "%s", text);
        e->code = code;
    }
    __atomic_store_n(L->next_block, L->nblocks, __ATOMIC_RELAXED);
    _longjmp(__kc::fault.jb, 1);
}
static __attribute__((noreturn)) void __kc_trap(void) {
    char text[160];
    snprintf(text, sizeof text, "trap instruction executed: block: [%u,%u,%u], thread: [%u,%u,%u]",
             blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    __kc_device_error(715, text);   /* CUDA_ERROR_ILLEGAL_INSTRUCTION */
}
/* What CUDA's device-side assert prints (and the error's message), then the error. */
static __attribute__((noreturn)) void __kc_assertfail(const char* msg, const char* file, uint32_t line,
                                                      const char* function) {
    char text[1024];
    snprintf(text, sizeof text, "%s:%u: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed.",
             file ? file : "?", line, function ? function : "?", blockIdx.x, blockIdx.y, blockIdx.z,
             threadIdx.x, threadIdx.y, threadIdx.z, msg ? msg : "?");
    fprintf(stdout, "%s\n", text);
    __kc_device_error(710, text);   /* CUDA_ERROR_ASSERT */
}

/* mbarrier objects (PTX mbarrier.*): 64 bits in shared memory, only ever touched by the
 * fibers of one block on one OS thread, so plain loads and stores. Layout (ours; the ISA
 * leaves it opaque): pending arrivals bits 0-20, expected arrivals 21-41, the transaction
 * count 42-62 (two's complement), the current phase's parity bit 63. A state (what arrive
 * returns) is the parity of the phase it arrived on (bit 63) and the pending count after. */
namespace __kc {
static constexpr uint64_t kMbField = (1u << 21) - 1;
static inline uint64_t mb_load(const unsigned char* p) { uint64_t v; __builtin_memcpy(&v, p, 8); return v; }
static inline void mb_store(unsigned char* p, uint64_t v) { __builtin_memcpy(p, &v, 8); ++rt.progress; }
static inline int64_t mb_tx(uint64_t v) { return (int64_t)(v << 1) >> 43; }
static inline uint64_t mb_make(uint64_t phase, uint64_t pending, uint64_t expected, int64_t tx) {
    return (phase << 63) | (pending & kMbField) | ((expected & kMbField) << 21) | (((uint64_t)tx & kMbField) << 42);
}
/* pending -= count (expected too for a drop), tx += tx_add; the phase completes when both
 * pending arrivals and transactions are none (unless no_complete). Returns the state. */
static inline uint64_t mb_update(unsigned char* p, uint32_t count, bool drop, bool no_complete, int64_t tx_add) {
    const uint64_t v = mb_load(p);
    uint64_t phase = v >> 63, pending = v & kMbField, expected = (v >> 21) & kMbField;
    int64_t tx = mb_tx(v) + tx_add;
    pending = (pending - count) & kMbField;
    if (drop) expected = (expected - count) & kMbField;
    const uint64_t state = (phase << 63) | pending;
    if (pending == 0 && tx == 0 && !no_complete) { phase ^= 1; pending = expected; }
    mb_store(p, mb_make(phase, pending, expected, tx));
    return state;
}
static inline bool mb_done(const unsigned char* p, uint64_t parity) { return (mb_load(p) >> 63) != (parity & 1); }
}
static inline void __kc_mbar_init(unsigned char* p, uint32_t count) {
    __kc::mb_store(p, __kc::mb_make(0, count, count, 0));
}
static inline void __kc_mbar_inval(unsigned char* p) { __kc::mb_store(p, 0); }
static inline uint64_t __kc_mbar_arrive(unsigned char* p, uint32_t count, int drop, int no_complete, int64_t tx) {
    return __kc::mb_update(p, count, drop, no_complete, tx);
}
static inline void __kc_mbar_tx(unsigned char* p, int64_t tx) { (void)__kc::mb_update(p, 0, false, false, tx); }
static inline uint32_t __kc_mbar_pending(uint64_t state) { return (uint32_t)(state & __kc::kMbField); }
/* test_wait / try_wait: has the phase of this parity completed? If not, the lane yields
 * (the others run, perhaps arriving) and looks again: a spin on it never starves them. */
static bool __kc_mbar_wait(const unsigned char* p, uint64_t parity) {
    __kc::FiberRec* r = __kc::rt.cur;
    if (__kc::mb_done(p, parity)) {
        if (r) r->waiting = 0;
        return true;
    }
    if (r) r->waiting = 1;
    __kc_yield();
    const bool done = __kc::mb_done(p, parity);
    if (r && done) r->waiting = 0;
    return done;
}
static int __syncthreads_count(int p) {
    __kc::rt.bar_count += (p != 0);
    __kc::rt.bar_n += 1;
    __syncthreads();
    return __kc::rt.cur ? __kc::rt.res_count : (p != 0);
}
static int __syncthreads_and(int p) {
    __kc::rt.bar_count += (p != 0);
    __kc::rt.bar_n += 1;
    __syncthreads();
    return __kc::rt.cur ? (__kc::rt.res_count == __kc::rt.res_n) : (p != 0);
}
static int __syncthreads_or(int p) { return __syncthreads_count(p) != 0; }

#define __KC_KERNEL(NAME, QUAL, F)                                                        \
    { NAME, QUAL, reinterpret_cast<void*>(&F), &::__kc::Kernel< &F >::run,                \
      ::__kc::Traits<decltype(&F)>::n, ::__kc::Traits<decltype(&F)>::sizes,              \
      ::__kc::Traits<decltype(&F)>::aligns },
#define __KC_VAR(NAME, QUAL, V) { NAME, QUAL, (void*)(&V), sizeof(V) },

/* The exported C API over the generated tables __kc_kernel_table / __kc_var_table (each
 * ends with a null entry so that neither is ever empty). */
#define __KC_EXPORTS                                                                       \
    static const int __kc_nk = int(sizeof(__kc_kernel_table) / sizeof(__kc_kernel_table[0])) - 1; \
    static const int __kc_nv = int(sizeof(__kc_var_table) / sizeof(__kc_var_table[0])) - 1;       \
    extern "C" {                                                                           \
    int __kc_abi_version(void) { return __KC_ABI; }                                        \
    int __kc_uses_fibers(void) { return __KC_FIBERS; }                                     \
    int __kc_kernel_count(void) { return __kc_nk; }                                        \
    const char* __kc_kernel_name(int i) { return __kc_kernel_table[i].name; }              \
    const char* __kc_kernel_qualname(int i) { return __kc_kernel_table[i].qualname; }      \
    const char* __kc_kernel_symbol(int i) { return ::__kc::symbol_of(__kc_kernel_table[i].addr); } \
    uint64_t __kc_kernel_nparams(int i) { return __kc_kernel_table[i].nparams; }           \
    const uint64_t* __kc_kernel_sizes(int i) { return __kc_kernel_table[i].sizes; }        \
    const uint64_t* __kc_kernel_aligns(int i) { return __kc_kernel_table[i].aligns; }      \
    int __kc_var_count(void) { return __kc_nv; }                                           \
    const char* __kc_var_name(int i) { return __kc_var_table[i].name; }                    \
    const char* __kc_var_qualname(int i) { return __kc_var_table[i].qualname; }            \
    const char* __kc_var_symbol(int i) { return ::__kc::symbol_of(__kc_var_table[i].addr); } \
    void* __kc_var_addr(int i) { return __kc_var_table[i].addr; }                          \
    uint64_t __kc_var_size(int i) { return __kc_var_table[i].size; }                       \
    int __kc_run(int i, void** args, const ::__kc::Launch* L, ::__kc::Worker* W) {         \
        if (i < 0 || i >= __kc_nk) return -1;                                              \
        return __kc_kernel_table[i].run(args, L, W);                                       \
    }                                                                                      \
    }

#endif /* KUBECASH_RUNTIME_H */
