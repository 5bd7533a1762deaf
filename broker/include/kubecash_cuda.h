/* kubecash_cuda.h -- the CUDA C dialect for KubeCASH's CPU backend.
 *
 * A module's CUDA C source is compiled with the host g++ as:
 *     #include "kubecash_cuda.h"          (part 1: keywords, types, built-ins, intrinsics)
 *     <tenant source, already preprocessed>
 *     #define __KC_RUNTIME__ 1
 *     #include "kubecash_cuda.h"          (part 2: block scheduler, fibers, exported tables)
 *     <generated kernel and variable tables>
 * The tenant part is scanned by kubecash.broker.cpukernels before it gets here; this header
 * only has to make the accepted dialect compile and behave like a GPU would.
 *
 * Part 2 comes after the tenant source so that <setjmp.h>, <ucontext.h> and <dlfcn.h> (and
 * their REG_* / jmp_buf names) never collide with tenant identifiers.
 */
#ifndef KUBECASH_CUDA_H
#define KUBECASH_CUDA_H

#include <stdint.h>
#include <stddef.h>
#include <limits.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <assert.h>
#include <cstdint>
#include <cstddef>
#include <climits>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

/* What tenant code may test for.  __CUDA_ARCH__ is defined by the module compiler (from
 * -arch, default 700) right after this header, never inside it. */
#define __CUDACC__ 1
#define __NVCC__ 1
#define __CUDACC_VER_MAJOR__ 12
#define __CUDACC_VER_MINOR__ 0
#define __CUDACC_VER_BUILD__ 0
#define CUDART_VERSION 12000
#define __CUDART_API_VERSION 12000
#define __KUBECASH_CPU__ 1

/* In scan mode (g++ -E run by cpukernels to find kernels and refused constructs) the CUDA
 * keywords must survive preprocessing as plain identifiers, so they are only defined for
 * the real compile. */
#ifndef __KC_SCAN__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
/* Per-block memory: a block's threads all run on one OS thread and an OS thread runs one
 * block at a time, so a thread_local (implicitly static at block scope) is exactly it. */
#define __shared__ thread_local
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __device_builtin__
#define __cudart_builtin__
#endif

/* ---- vector types (sizes and alignments as in CUDA's vector_types.h) -------------------- */
#define __KC_VEC(N, B, A1, A2, A4)                                                            \
    struct __attribute__((aligned(A1))) N##1 { B x; };                                        \
    struct __attribute__((aligned(A2))) N##2 { B x, y; };                                     \
    struct N##3 { B x, y, z; };                                                               \
    struct __attribute__((aligned(A4))) N##4 { B x, y, z, w; };                               \
    static inline constexpr N##1 make_##N##1(B x) { return N##1{x}; }                         \
    static inline constexpr N##2 make_##N##2(B x, B y) { return N##2{x, y}; }                 \
    static inline constexpr N##3 make_##N##3(B x, B y, B z) { return N##3{x, y, z}; }         \
    static inline constexpr N##4 make_##N##4(B x, B y, B z, B w) { return N##4{x, y, z, w}; }
__KC_VEC(char, signed char, 1, 2, 4)
__KC_VEC(uchar, unsigned char, 1, 2, 4)
__KC_VEC(short, short, 2, 4, 8)
__KC_VEC(ushort, unsigned short, 2, 4, 8)
__KC_VEC(int, int, 4, 8, 16)
__KC_VEC(uint, unsigned int, 4, 8, 16)
__KC_VEC(long, long, sizeof(long), 2 * sizeof(long), 16)
__KC_VEC(ulong, unsigned long, sizeof(long), 2 * sizeof(long), 16)
__KC_VEC(longlong, long long, 8, 16, 16)
__KC_VEC(ulonglong, unsigned long long, 8, 16, 16)
__KC_VEC(float, float, 4, 8, 16)
__KC_VEC(double, double, 8, 16, 16)
#undef __KC_VEC

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

/* ---- per-thread built-ins: thread_local state the block loop sets ------------------------
 * Fibers of a block share their OS thread; the scheduler stores each fiber's threadIdx
 * before resuming it, so a kernel always reads its own. */
static thread_local uint3 threadIdx;
static thread_local uint3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;
static constexpr int warpSize = 32;

namespace __kc {
/* Start of this launch's dynamic shared memory (extern __shared__ arrays are rewritten to
 * pointers into it). */
static thread_local void* dyn_shared;
}

/* ---- barriers (defined in part 2) ------------------------------------------------------- */
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

/* ---- fences ----------------------------------------------------------------------------- */
static inline void __threadfence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void __trap(void) { __builtin_trap(); }
static inline void __brkpt(void) { __builtin_trap(); }

/* ---- atomics: real ones, blocks run on several OS threads ------------------------------- */
#define __KC_AO __ATOMIC_SEQ_CST
#define __KC_AI static inline __attribute__((always_inline))

namespace __kc {
template <class T> __KC_AI T cas(T* p, T cmp, T val) {
    __atomic_compare_exchange_n(p, &cmp, val, false, __KC_AO, __KC_AO);
    return cmp;  // the old value whether or not the exchange happened
}
/* Read-modify-write through a compare-and-swap loop on the value's bits. */
template <class T, class Bits, class Op> __KC_AI T rmw(T* addr, Op op) {
    static_assert(sizeof(T) == sizeof(Bits), "bits");
    Bits* p = reinterpret_cast<Bits*>(addr);
    Bits old = __atomic_load_n(p, __ATOMIC_RELAXED), nw;
    T oldv;
    do {
        memcpy(&oldv, &old, sizeof(T));
        T nv = op(oldv);
        memcpy(&nw, &nv, sizeof(T));
    } while (!__atomic_compare_exchange_n(p, &old, nw, true, __KC_AO, __ATOMIC_RELAXED));
    return oldv;
}
}  // namespace __kc

#define __KC_INT_ATOMICS(T)                                                                     \
    __KC_AI T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __KC_AO); }                \
    __KC_AI T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __KC_AO); }                \
    __KC_AI T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __KC_AO); }              \
    __KC_AI T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __KC_AO); }                \
    __KC_AI T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __KC_AO); }                  \
    __KC_AI T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __KC_AO); }                \
    __KC_AI T atomicCAS(T* a, T c, T v) { return __kc::cas(a, c, v); }                          \
    __KC_AI T atomicMin(T* a, T v) { return __kc::rmw<T, T>(a, [v](T o) { return v < o ? v : o; }); } \
    __KC_AI T atomicMax(T* a, T v) { return __kc::rmw<T, T>(a, [v](T o) { return v > o ? v : o; }); }
__KC_INT_ATOMICS(int)
__KC_INT_ATOMICS(unsigned int)
__KC_INT_ATOMICS(long long)
__KC_INT_ATOMICS(unsigned long long)
#undef __KC_INT_ATOMICS
__KC_AI unsigned short atomicCAS(unsigned short* a, unsigned short c, unsigned short v) { return __kc::cas(a, c, v); }
__KC_AI float atomicAdd(float* a, float v) { return __kc::rmw<float, uint32_t>(a, [v](float o) { return o + v; }); }
__KC_AI double atomicAdd(double* a, double v) { return __kc::rmw<double, uint64_t>(a, [v](double o) { return o + v; }); }
__KC_AI float atomicExch(float* a, float v) { return __kc::rmw<float, uint32_t>(a, [v](float) { return v; }); }
__KC_AI unsigned int atomicInc(unsigned int* a, unsigned int m) {
    return __kc::rmw<unsigned int, unsigned int>(a, [m](unsigned int o) { return o >= m ? 0u : o + 1u; });
}
__KC_AI unsigned int atomicDec(unsigned int* a, unsigned int m) {
    return __kc::rmw<unsigned int, unsigned int>(a, [m](unsigned int o) { return (o == 0u || o > m) ? m : o - 1u; });
}
/* Scoped variants: every scope is the whole machine here. */
#define __KC_SCOPED(F)                                                                   \
    template <class... A> __KC_AI auto F##_block(A... a) -> decltype(F(a...)) { return F(a...); } \
    template <class... A> __KC_AI auto F##_system(A... a) -> decltype(F(a...)) { return F(a...); }
__KC_SCOPED(atomicAdd) __KC_SCOPED(atomicSub) __KC_SCOPED(atomicExch) __KC_SCOPED(atomicMin)
__KC_SCOPED(atomicMax) __KC_SCOPED(atomicInc) __KC_SCOPED(atomicDec) __KC_SCOPED(atomicCAS)
__KC_SCOPED(atomicAnd) __KC_SCOPED(atomicOr) __KC_SCOPED(atomicXor)
#undef __KC_SCOPED

/* ---- min / max: templates so that mixed argument types resolve as CUDA's overloads do,
 * and so that a tenant's own min/max (a better, non-template match) still wins. ---------- */
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
__KC_AI std::common_type_t<A, B> max(A a, B b) {
    using T = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<T>) return std::fmax(T(a), T(b));
    else return T(a) > T(b) ? T(a) : T(b);
}
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
__KC_AI std::common_type_t<A, B> min(A a, B b) {
    using T = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<T>) return std::fmin(T(a), T(b));
    else return T(a) < T(b) ? T(a) : T(b);
}
__KC_AI unsigned int umin(unsigned int a, unsigned int b) { return a < b ? a : b; }
__KC_AI unsigned int umax(unsigned int a, unsigned int b) { return a > b ? a : b; }
__KC_AI long long llmin(long long a, long long b) { return a < b ? a : b; }
__KC_AI long long llmax(long long a, long long b) { return a > b ? a : b; }
__KC_AI unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
__KC_AI unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

/* ---- float intrinsics (the fast ones are the accurate libm ones here) ------------------- */
__KC_AI float rsqrtf(float x) { return 1.0f / sqrtf(x); }
__KC_AI double rsqrt(double x) { return 1.0 / sqrt(x); }
__KC_AI float rcbrtf(float x) { return 1.0f / cbrtf(x); }
__KC_AI double rcbrt(double x) { return 1.0 / cbrt(x); }
/* glibc's <math.h> already declares (but does not export) __expf, __sinf, ... as its own
 * internal names, so these CUDA intrinsics are macros onto the libm functions. */
namespace __kc {
__KC_AI void sincosf_(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
}
#define __expf(x) (::expf(x))
#define __exp10f(x) (::powf(10.0f, (x)))
#define __logf(x) (::logf(x))
#define __log2f(x) (::log2f(x))
#define __log10f(x) (::log10f(x))
#define __sinf(x) (::sinf(x))
#define __cosf(x) (::cosf(x))
#define __tanf(x) (::tanf(x))
#define __sincosf(x, s, c) (::__kc::sincosf_((x), (s), (c)))
#define __powf(x, y) (::powf((x), (y)))
__KC_AI float __fdividef(float x, float y) { return x / y; }
__KC_AI float fdividef(float x, float y) { return x / y; }
__KC_AI float sinpif(float x) { return sinf(float(M_PI) * x); }
__KC_AI float cospif(float x) { return cosf(float(M_PI) * x); }
__KC_AI double sinpi(double x) { return sin(M_PI * x); }
__KC_AI double cospi(double x) { return cos(M_PI * x); }
__KC_AI float normcdff(float x) { return 0.5f * erfcf(-x * float(M_SQRT1_2)); }
__KC_AI double normcdf(double x) { return 0.5 * erfc(-x * M_SQRT1_2); }
__KC_AI float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
/* Only round-to-nearest variants: the host runs in that mode, other modes would be wrong. */
__KC_AI float __fadd_rn(float a, float b) { return a + b; }
__KC_AI float __fsub_rn(float a, float b) { return a - b; }
__KC_AI float __fmul_rn(float a, float b) { return a * b; }
__KC_AI float __fdiv_rn(float a, float b) { return a / b; }
__KC_AI float __frcp_rn(float a) { return 1.0f / a; }
__KC_AI float __fsqrt_rn(float a) { return sqrtf(a); }
__KC_AI float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
__KC_AI float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
__KC_AI double __dadd_rn(double a, double b) { return a + b; }
__KC_AI double __dsub_rn(double a, double b) { return a - b; }
__KC_AI double __dmul_rn(double a, double b) { return a * b; }
__KC_AI double __ddiv_rn(double a, double b) { return a / b; }
__KC_AI double __drcp_rn(double a) { return 1.0 / a; }
__KC_AI double __dsqrt_rn(double a) { return sqrt(a); }
__KC_AI double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

/* ---- conversions (saturating, NaN -> 0, as the GPU's cvt does) -------------------------- */
namespace __kc {
template <class I, class F> __KC_AI I sat(F v) {
    if (v != v) return 0;
    if (v <= F(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
    if (v >= F(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
    return I(v);
}
}  // namespace __kc
#define __KC_CVT(NAME, I, F)                                                  \
    __KC_AI I NAME##_rn(F v) { return __kc::sat<I>(nearbyint(v)); }          \
    __KC_AI I NAME##_rz(F v) { return __kc::sat<I>(trunc(v)); }              \
    __KC_AI I NAME##_rd(F v) { return __kc::sat<I>(floor(v)); }              \
    __KC_AI I NAME##_ru(F v) { return __kc::sat<I>(ceil(v)); }
__KC_CVT(__float2int, int, float)
__KC_CVT(__float2uint, unsigned int, float)
__KC_CVT(__float2ll, long long, float)
__KC_CVT(__float2ull, unsigned long long, float)
__KC_CVT(__double2int, int, double)
__KC_CVT(__double2uint, unsigned int, double)
__KC_CVT(__double2ll, long long, double)
__KC_CVT(__double2ull, unsigned long long, double)
#undef __KC_CVT
__KC_AI float __int2float_rn(int v) { return float(v); }
__KC_AI float __uint2float_rn(unsigned int v) { return float(v); }
__KC_AI float __ll2float_rn(long long v) { return float(v); }
__KC_AI float __ull2float_rn(unsigned long long v) { return float(v); }
__KC_AI double __int2double_rn(int v) { return double(v); }
__KC_AI double __uint2double_rn(unsigned int v) { return double(v); }
__KC_AI double __ll2double_rn(long long v) { return double(v); }
__KC_AI double __ull2double_rn(unsigned long long v) { return double(v); }
__KC_AI float __double2float_rn(double v) { return float(v); }
namespace __kc {
template <class To, class From> __KC_AI To bits(From f) {
    static_assert(sizeof(To) == sizeof(From), "size");
    To t;
    memcpy(&t, &f, sizeof t);
    return t;
}
}  // namespace __kc
__KC_AI int __float_as_int(float f) { return __kc::bits<int>(f); }
__KC_AI unsigned int __float_as_uint(float f) { return __kc::bits<unsigned int>(f); }
__KC_AI float __int_as_float(int i) { return __kc::bits<float>(i); }
__KC_AI float __uint_as_float(unsigned int i) { return __kc::bits<float>(i); }
__KC_AI long long __double_as_longlong(double d) { return __kc::bits<long long>(d); }
__KC_AI double __longlong_as_double(long long i) { return __kc::bits<double>(i); }
__KC_AI int __double2hiint(double d) { return int(uint64_t(__double_as_longlong(d)) >> 32); }
__KC_AI int __double2loint(double d) { return int(uint32_t(uint64_t(__double_as_longlong(d)))); }
__KC_AI double __hiloint2double(int hi, int lo) {
    return __longlong_as_double((long long)((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo)));
}

/* ---- integer intrinsics ----------------------------------------------------------------- */
__KC_AI int __popc(unsigned int x) { return __builtin_popcount(x); }
__KC_AI int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__KC_AI int __clz(int x) { return x ? __builtin_clz((unsigned int)x) : 32; }
__KC_AI int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
__KC_AI int __ffs(int x) { return __builtin_ffs(x); }
__KC_AI int __ffsll(long long x) { return __builtin_ffsll(x); }
__KC_AI unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    return __builtin_bswap32(x);
}
__KC_AI unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned int)x) << 32) | __brev((unsigned int)(x >> 32));
}
__KC_AI unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a * b) >> 32); }
__KC_AI int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
__KC_AI unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
__KC_AI long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
__KC_AI int __mul24(int a, int b) { return ((int)((unsigned)a << 8) >> 8) * ((int)((unsigned)b << 8) >> 8); }
__KC_AI unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }
__KC_AI unsigned int __sad(int x, int y, unsigned int z) { return (x > y ? (unsigned)x - (unsigned)y : (unsigned)y - (unsigned)x) + z; }
__KC_AI unsigned int __usad(unsigned int x, unsigned int y, unsigned int z) { return (x > y ? x - y : y - x) + z; }
__KC_AI int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
__KC_AI int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }
__KC_AI unsigned int __uhadd(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a + b) >> 1); }
__KC_AI unsigned int __urhadd(unsigned int a, unsigned int b) { return (unsigned int)(((uint64_t)a + b + 1) >> 1); }
__KC_AI unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}
__KC_AI unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int sh) {
    return (unsigned int)(((((uint64_t)hi << 32) | lo) << (sh & 31)) >> 32);
}
__KC_AI unsigned int __funnelshift_lc(unsigned int lo, unsigned int hi, unsigned int sh) {
    sh = sh > 32 ? 32 : sh;
    return (unsigned int)(((((uint64_t)hi << 32) | lo) << sh) >> 32);
}
__KC_AI unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int sh) {
    return (unsigned int)((((uint64_t)hi << 32) | lo) >> (sh & 31));
}
__KC_AI unsigned int __funnelshift_rc(unsigned int lo, unsigned int hi, unsigned int sh) {
    sh = sh > 32 ? 32 : sh;
    return (unsigned int)((((uint64_t)hi << 32) | lo) >> sh);
}

/* ---- loads and clocks ------------------------------------------------------------------- */
template <class T> __KC_AI T __ldg(const T* p) { return *p; }
__KC_AI long long clock64(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#undef __KC_AI
#endif /* KUBECASH_CUDA_H */


/* ============================================================================================
 * Part 2: the runtime.  Included once more, after the tenant source, by generated code.
 * ========================================================================================== */
#if defined(__KC_RUNTIME__) && !defined(KUBECASH_CUDA_RUNTIME_DONE)
#define KUBECASH_CUDA_RUNTIME_DONE
/* The keyword macros must not leak into the system headers below (glibc spells
 * __attribute__((__noinline__)) and the like). */
#undef __global__
#undef __device__
#undef __host__
#undef __constant__
#undef __managed__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __align__
/* Layout and visibility pragmas the tenant left open must not reach libc's structures or
 * our exported entry points. */
#pragma pack(push)
#pragma pack()
#pragma GCC visibility push(default)
#include <setjmp.h>
#include <ucontext.h>
#include <dlfcn.h>

#ifndef __KC_FIBERS
#define __KC_FIBERS 0
#endif
#define __KC_ABI 1  /* must match cpukernels._ABI_VERSION */

namespace __kc {

/* Mirrors of the ctypes structures in cpukernels.py. */
struct Launch {
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t nblocks;
    uint64_t* next_block;   /* shared by all workers of the launch: blocks are grabbed from it */
    uint64_t shared_bytes;
    uint64_t module_id;     /* unique per loaded module instance, never reused */
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
};

struct FiberRec {
    jmp_buf jb;             /* where the fiber is parked */
    uint3 tid;
    int done;
    int state;              /* FIBER_READY, or what it waits at */
    WarpOp* op;             /* at a warp operation: its operands and result */
};
enum { FIBER_READY = 0, FIBER_AT_BARRIER = 1, FIBER_AT_WARP_OP = 2 };
static constexpr uint64_t kRecBytes = (sizeof(FiberRec) + 63) & ~uint64_t(63);

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
    jmp_buf sched;              /* the block scheduler's resume point */
    FiberRec* cur;              /* the running fiber, null outside fiber mode */
    Worker* worker;
    void (*invoke)(void**);
    void** args;
    int bar_count, bar_n;       /* __syncthreads_count/and/or accumulators of this phase */
    int res_count, res_n;       /* ... and their results from the last phase */
};
static thread_local Rt rt;      /* its address also identifies the OS thread */

static inline FiberRec* rec(Worker* W, uint64_t i) {
    return reinterpret_cast<FiberRec*>(W->stacks + (i + 1) * W->slot_size - kRecBytes);
}

static void no_fiber_barrier(void) {
    if ((uint64_t)blockDim.x * blockDim.y * blockDim.z == 1) return;
    fprintf(stderr, "kubecash: __syncthreads reached in a module compiled without barrier support\n");
    abort();
}

/* A fiber's whole life: park, run one CUDA thread when resumed, mark it done, park again.
 * Parking is _setjmp here + _longjmp to the scheduler: no syscalls, unlike swapcontext. */
static void fiber_main(int idx) {
    FiberRec* r = rec(rt.worker, (uint64_t)idx);
    for (;;) {
        if (!_setjmp(r->jb)) _longjmp(rt.sched, 1);
        rt.invoke(rt.args);
        r->done = 1;
    }
}

/* makecontext + one swapcontext per fiber, once per (worker, module): the fiber parks
 * itself straight away and every later switch is _setjmp/_longjmp. */
static int start_fibers(Worker* W, uint64_t upto) {
    for (uint64_t i = W->nfibers; i < upto; ++i) {
        char* slot = W->stacks + i * W->slot_size;
        ucontext_t uc, back;
        if (getcontext(&uc) != 0) return -3;
        uc.uc_stack.ss_sp = slot + W->guard_size;
        uc.uc_stack.ss_size = W->slot_size - W->guard_size - kRecBytes;
        uc.uc_link = nullptr;
        makecontext(&uc, (void (*)(void))fiber_main, 1, (int)i);
        if (!_setjmp(rt.sched)) swapcontext(&back, &uc);
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

static void extern_shared_hook(void* p);  /* generated: namespace-scope extern __shared__ */

static inline void setup(const Launch* L, Worker* W) {
    blockDim = dim3(L->block[0], L->block[1], L->block[2]);
    gridDim = dim3(L->grid[0], L->grid[1], L->grid[2]);
    dyn_shared = W->shared;
    extern_shared_hook(W->shared);
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

/* Runs each block's threads as fibers on this OS thread: each fiber runs until it reaches
 * a barrier (or returns); once every live fiber has, the next phase starts. */
static int run_fibers(void (*invoke)(void**), void** args, const Launch* L, Worker* W) {
    const uint64_t bx = L->block[0], by = L->block[1], bz = L->block[2];
    const uint64_t T = bx * by * bz;
    if (T > W->nslots || W->slot_size < W->guard_size + kRecBytes + 16384) return -2;
    setup(L, W);
    if (W->owner_module != L->module_id || W->owner_thread != &rt) {
        W->nfibers = 0;  /* parked fibers belong to another module (or thread): start anew */
        W->owner_module = L->module_id;
        W->owner_thread = &rt;
    }
    rt.worker = W;
    if (W->nfibers < T) {
        int rc = start_fibers(W, T);
        if (rc) return rc;
    }
    rt.invoke = invoke;
    rt.args = args;
    for (;;) {
        uint64_t b = __atomic_fetch_add(L->next_block, 1, __ATOMIC_RELAXED);
        if (b >= L->nblocks) break;
        set_block(L, b);
        uint64_t i = 0;
        for (uint32_t z = 0; z < bz; ++z)
            for (uint32_t y = 0; y < by; ++y)
                for (uint32_t x = 0; x < bx; ++x, ++i) {
                    FiberRec* r = rec(W, i);
                    r->tid = uint3{x, y, z};
                    r->done = 0;
                    r->state = FIBER_READY;
                }
        uint64_t alive = T;
        rt.bar_count = rt.bar_n = 0;
        while (alive) {
            /* A warp at a time: its lanes run until each waits at the block barrier or has
             * ended; lanes waiting at a warp operation get their results and run on. */
            for (uint64_t w0 = 0; w0 < T; w0 += 32) {
                const uint64_t n = T - w0 < 32 ? T - w0 : 32;
                for (;;) {
                    bool at_warp_op = false;
                    for (uint64_t l = 0; l < n; ++l) {
                        FiberRec* r = rec(W, w0 + l);
                        if (r->done || r->state != FIBER_READY) continue;
                        rt.cur = r;
                        threadIdx = r->tid;
                        if (!_setjmp(rt.sched)) _longjmp(r->jb, 1);
                        if (r->done) --alive;
                        else if (r->state == FIBER_AT_WARP_OP) at_warp_op = true;
                    }
                    if (!at_warp_op) break;
                    resolve_warp(W, w0, n);
                }
            }
            for (uint64_t k = 0; k < T; ++k) rec(W, k)->state = FIBER_READY;   /* the barrier opens */
            rt.res_count = rt.bar_count;
            rt.res_n = rt.bar_n;
            rt.bar_count = rt.bar_n = 0;
        }
        rt.cur = nullptr;
    }
    return 0;
}

template <auto F> struct Kernel {
    using Tr = Traits<decltype(F)>;
    static void invoke(void** a) { Tr::template call<F>(a, std::make_index_sequence<Tr::n>{}); }
    static int run(void** a, const Launch* L, Worker* W) {
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

/* Barriers.  noinline: the _setjmp must live in this frame, not in the kernel's. */
static __attribute__((noinline)) void __syncthreads(void) {
    __kc::FiberRec* r = __kc::rt.cur;
    if (__builtin_expect(r == nullptr, 0)) {
        __kc::no_fiber_barrier();
        return;
    }
    r->state = __kc::FIBER_AT_BARRIER;
    if (!_setjmp(r->jb)) _longjmp(__kc::rt.sched, 1);
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
    if (!_setjmp(r->jb)) _longjmp(__kc::rt.sched, 1);
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

#endif /* __KC_RUNTIME__ */
