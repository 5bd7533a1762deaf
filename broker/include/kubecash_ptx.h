/* kubecash_ptx.h -- what C++ translated from PTX (kubecash.broker.ptx) builds on.
 *
 * Included after kubecash_runtime.h (threadIdx and friends, __syncthreads) and before
 * the translated functions. Registers are C++ locals of their declared type; an instruction
 * reads them as its own type (kc_as: the same bits, or the low bits / zero-extended), and
 * writes its result back (kc_put: sign-extended where the value's type is signed). */
#ifndef KUBECASH_PTX_H
#define KUBECASH_PTX_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <fenv.h>
#include <time.h>
#include <type_traits>

namespace kc {

template <size_t N> struct uint_of;
template <> struct uint_of<1> { using t = uint8_t; };
template <> struct uint_of<2> { using t = uint16_t; };
template <> struct uint_of<4> { using t = uint32_t; };
template <> struct uint_of<8> { using t = uint64_t; };

/* `v` read as T: the same bits where the sizes match, else its low bits (or zero-extended). */
template <class T, class F> static inline __attribute__((always_inline)) T as(F v) {
    if constexpr (sizeof(T) == sizeof(F)) {
        T t;
        __builtin_memcpy(&t, &v, sizeof t);
        return t;
    } else {
        typename uint_of<sizeof(F)>::t u;
        __builtin_memcpy(&u, &v, sizeof u);
        typename uint_of<sizeof(T)>::t w = (typename uint_of<sizeof(T)>::t)u;
        T t;
        __builtin_memcpy(&t, &w, sizeof t);
        return t;
    }
}
/* A value of type F stored in a register of type R: sign-extended if F is a signed integer. */
template <class R, class F> static inline __attribute__((always_inline)) R put(F v) {
    if constexpr (sizeof(R) == sizeof(F)) {
        return as<R>(v);
    } else if constexpr (std::is_same_v<F, bool>) {
        return (R)v;
    } else if constexpr (std::is_signed_v<F> && std::is_integral_v<F>) {
        using S = std::make_signed_t<typename uint_of<sizeof(R)>::t>;
        return as<R>((S)v);
    } else {
        return as<R>((typename uint_of<sizeof(R)>::t)as<typename uint_of<sizeof(F)>::t>(v));
    }
}
template <class T> static inline T ld(const void* p) { T t; __builtin_memcpy(&t, p, sizeof t); return t; }
template <class T> static inline void st(void* p, T v) { __builtin_memcpy(p, &v, sizeof v); }
/* ld/st .volatile, .relaxed, .acquire, .release: one access each time, never cached in a
 * register or moved (another block may be writing: a spin on a flag must see it). */
template <class T> static inline T ld_atomic(const void* p) {
    using B = typename uint_of<sizeof(T)>::t;
    return as<T>(__atomic_load_n((const B*)p, __ATOMIC_ACQUIRE));
}
template <class T> static inline void st_atomic(void* p, T v) {
    using B = typename uint_of<sizeof(T)>::t;
    __atomic_store_n((B*)p, as<B>(v), __ATOMIC_RELEASE);
}

/* Integer arithmetic wraps, as on the device (in unsigned types: no C++ overflow). */
template <class T> using U = std::make_unsigned_t<T>;
template <class T> static inline T add(T a, T b) { return (T)((U<T>)a + (U<T>)b); }
template <class T> static inline T sub(T a, T b) { return (T)((U<T>)a - (U<T>)b); }
template <class T> static inline T mul(T a, T b) { return (T)((U<T>)a * (U<T>)b); }
template <class T> static inline T neg(T a) { return (T)(-(U<T>)a); }
template <class T> static inline T mulhi(T a, T b) {
    if constexpr (sizeof(T) == 8) {
        using W = std::conditional_t<std::is_signed_v<T>, __int128, unsigned __int128>;
        return (T)(((W)a * (W)b) >> 64);
    } else {
        using W = std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>;
        return (T)(((W)a * (W)b) >> (8 * sizeof(T)));
    }
}
/* A float operation in a directed rounding mode (.rz .rm .rp; FE_TOWARDZERO and friends):
   the host's mode set around it, its operands and result pinned between the two changes so
   that the compiler neither folds nor moves the arithmetic out (PTX's mode is per instruction). */
template <class T> static inline __attribute__((always_inline)) void pin(T& v) {
    asm volatile("" : "+m"(v) : : "memory");
}
template <int MODE, class F, class... A> static inline auto rounded(F f, A... a) {
    const int old = fegetround();
    fesetround(MODE);
    (pin(a), ...);
    auto r = f(a...);
    pin(r);
    fesetround(old);
    return r;
}
/* Division by zero and INT_MIN / -1 do not trap on the device: all ones / the dividend. */
template <class T> static inline T div(T a, T b) {
    if (b == 0) return (T)~(U<T>)0;
    if constexpr (std::is_signed_v<T>) if (b == -1) return neg(a);
    return a / b;
}
template <class T> static inline T rem(T a, T b) {
    if (b == 0) return a;
    if constexpr (std::is_signed_v<T>) if (b == -1) return 0;
    return a % b;
}
template <class T> static inline T shl(T a, uint32_t n) { return n >= 8 * sizeof(T) ? 0 : (T)((U<T>)a << n); }
template <class T> static inline T shr(T a, uint32_t n) {
    if constexpr (std::is_signed_v<T>) return a >> (n >= 8 * sizeof(T) ? 8 * sizeof(T) - 1 : n);
    else return n >= 8 * sizeof(T) ? 0 : a >> n;
}
template <class T> static inline T iabs(T a) { return a < 0 ? neg(a) : a; }
template <class T> static inline uint32_t popc(T a) { return (uint32_t)__builtin_popcountll((uint64_t)(U<T>)a); }
template <class T> static inline uint32_t clz(T a) {
    return a == 0 ? 8 * sizeof(T) : (uint32_t)__builtin_clzll((uint64_t)(U<T>)a) - (64 - 8 * sizeof(T));
}
template <class T> static inline T brev(T a) {
    U<T> v = (U<T>)a, r = 0;
    for (unsigned i = 0; i < 8 * sizeof(T); ++i) { r = (U<T>)((r << 1) | (v & 1)); v >>= 1; }
    return (T)r;
}
template <class T> static inline T bfe(T a, uint32_t pos, uint32_t len) {
    const uint32_t bits = 8 * sizeof(T);
    pos &= 0xff; len &= 0xff;
    U<T> u = (U<T>)a;
    bool sign = false;
    if constexpr (std::is_signed_v<T>) {
        uint32_t top = len == 0 ? 0 : (pos + len - 1 < bits ? pos + len - 1 : bits - 1);
        sign = len != 0 && ((u >> top) & 1);
    }
    U<T> r = 0;
    for (uint32_t i = 0; i < bits; ++i) {
        bool bit = i < len ? (pos + i < bits ? ((u >> (pos + i)) & 1) : sign) : sign;
        r |= (U<T>)bit << i;
    }
    return (T)r;
}
template <class T> static inline T bfi(T a, T b, uint32_t pos, uint32_t len) {
    const uint32_t bits = 8 * sizeof(T);
    pos &= 0xff; len &= 0xff;
    U<T> r = (U<T>)b, ua = (U<T>)a;
    for (uint32_t i = 0; i < len && pos + i < bits; ++i)
        r = (U<T>)((r & ~((U<T>)1 << (pos + i))) | (((ua >> i) & 1) << (pos + i)));
    return (T)r;
}
static inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
    uint64_t x = ((uint64_t)b << 32) | a;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) {
        uint32_t sel = (c >> (4 * i)) & 0xf;
        uint8_t byte = (uint8_t)(x >> (8 * (sel & 7)));
        if (sel & 8) byte = (byte & 0x80) ? 0xff : 0;
        r |= (uint32_t)byte << (8 * i);
    }
    return r;
}
/* dp4a / dp2a: c plus a dot product of a's bytes (dp2a: 16-bit halves) with b's bytes. */
static inline uint32_t dp4a(uint32_t a, uint32_t b, uint32_t c, bool as, bool bs) {
    uint32_t r = c;
    for (int i = 0; i < 4; ++i) {
        const int32_t x = as ? (int32_t)(int8_t)(a >> 8 * i) : (int32_t)(uint8_t)(a >> 8 * i);
        const int32_t y = bs ? (int32_t)(int8_t)(b >> 8 * i) : (int32_t)(uint8_t)(b >> 8 * i);
        r += (uint32_t)(x * y);
    }
    return r;
}
static inline uint32_t dp2a(uint32_t a, uint32_t b, uint32_t c, bool as, bool bs, bool hi) {
    uint32_t r = c;
    for (int i = 0; i < 2; ++i) {
        const int k = i + (hi ? 2 : 0);
        const int32_t x = as ? (int32_t)(int16_t)(a >> 16 * i) : (int32_t)(uint16_t)(a >> 16 * i);
        const int32_t y = bs ? (int32_t)(int8_t)(b >> 8 * k) : (int32_t)(uint8_t)(b >> 8 * k);
        r += (uint32_t)(x * y);
    }
    return r;
}
/* mul24: the 48-bit product of the low 24 bits (sign-extended if s): bits 31..0 or 47..16. */
static inline uint32_t mul24(uint32_t a, uint32_t b, bool s, bool hi) {
    const int64_t x = s ? (int64_t)((int32_t)(a << 8) >> 8) : (int64_t)(a & 0xffffffu);
    const int64_t y = s ? (int64_t)((int32_t)(b << 8) >> 8) : (int64_t)(b & 0xffffffu);
    const uint64_t p = (uint64_t)(x * y);
    return hi ? (uint32_t)(p >> 16) : (uint32_t)p;
}
/* sad: c + |a - b| (wrapping). */
template <class T> static inline T sad(T a, T b, T c) {
    const U<T> d = a > b ? (U<T>)((U<T>)a - (U<T>)b) : (U<T>)((U<T>)b - (U<T>)a);
    return (T)(U<T>)((U<T>)c + d);
}
/* bmsk and szext, as the PTX ISA's semantics give them (clamp: operands of 32 and up
 * saturate; wrap: taken mod 32). */
static inline uint32_t bmsk(uint32_t a, uint32_t b, bool clamp) {
    const uint32_t a1 = a & 31u, b1 = b & 31u, sum = a1 + b1;
    uint32_t mask0 = ~0u << a1, mask1 = sum >= 32 ? 0u : ~0u << sum;
    bool overflow = sum >= 32;
    if (clamp && a >= 32) { mask0 = 0; overflow = true; }
    if (clamp && b >= 32) overflow = true;
    if (overflow) mask1 = 0;
    else if (b1 == 0) mask1 = ~0u;
    return mask0 & ~mask1;
}
static inline uint32_t szext(uint32_t a, uint32_t b, bool clamp, bool s) {
    const uint32_t b1 = b & 31u;
    const bool too_large = b >= 32 && clamp;
    const uint32_t mask = too_large ? 0u : ~0u << b1;
    const bool sign = !(b1 == 0 || too_large || !s) && ((a >> ((b1 - 1) & 31u)) & 1u);
    return (a & ~mask) | (sign ? mask : 0u);
}
/* Funnel shifts: the 64 bits b:a shifted, 32 of them kept (rotates when a == b). */
static inline uint32_t shf_l(uint32_t a, uint32_t b, uint32_t n) {
    return n == 0 ? b : n >= 32 ? a : (b << n) | (a >> (32 - n));
}
static inline uint32_t shf_r(uint32_t a, uint32_t b, uint32_t n) {
    return n == 0 ? a : n >= 32 ? b : (b << (32 - n)) | (a >> n);
}
static inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
    uint32_t r = 0;
    for (int k = 0; k < 8; ++k)
        if (lut & (1u << k)) r |= ((k & 4) ? a : ~a) & ((k & 2) ? b : ~b) & ((k & 1) ? c : ~c);
    return r;
}
template <class T> static inline T sat_add(T a, T b) {
    int64_t r = (int64_t)a + (int64_t)b;
    return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (T)r;
}
template <class T> static inline T sat_sub(T a, T b) {
    int64_t r = (int64_t)a - (int64_t)b;
    return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (T)r;
}

/* Floating point. .ftz: subnormal inputs and results count as zero (of the same sign). */
template <class T> static inline T ftz(T x) { return fpclassify(x) == FP_SUBNORMAL ? copysign((T)0, x) : x; }
template <class T> static inline T sat01(T x) { return x != x ? (T)0 : x < 0 ? (T)0 : x > 1 ? (T)1 : x; }
template <class T> static inline T fmin_(T a, T b) { return fmin(a, b); }    /* NaN: the other */
template <class T> static inline T fmax_(T a, T b) { return fmax(a, b); }
template <class T> static inline T fmin_nan(T a, T b) { return a != a || b != b ? (T)NAN : fmin(a, b); }
template <class T> static inline T fmax_nan(T a, T b) { return a != a || b != b ? (T)NAN : fmax(a, b); }

/* Float to integer: rounded as asked, saturated to the destination's range, NaN to 0. */
template <class I, class F> static inline I f2i(F x) {
    if (x != x) return 0;
    if (x <= (F)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
    if (x >= (F)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
    return (I)x;
}
/* Integer to integer with .sat: clamped to the destination's range. */
template <class D, class S> static inline D isat(S v) {
    if constexpr (std::is_signed_v<S>) {
        if ((int64_t)v < (int64_t)std::numeric_limits<D>::min()) return std::numeric_limits<D>::min();
        if (v > 0 && (uint64_t)v > (uint64_t)std::numeric_limits<D>::max()) return std::numeric_limits<D>::max();
    } else if ((uint64_t)v > (uint64_t)std::numeric_limits<D>::max()) {
        return std::numeric_limits<D>::max();
    }
    return (D)v;
}

/* Atomics on any address (global, shared or generic: all are this process's memory). */
template <class T> static inline T atom_cas(void* p, T cmp, T val) {
    using B = typename uint_of<sizeof(T)>::t;
    B c = as<B>(cmp);
    __atomic_compare_exchange_n((B*)p, &c, as<B>(val), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return as<T>(c);
}
template <class T, class Op> static inline T atom_rmw(void* p, Op op) {
    using B = typename uint_of<sizeof(T)>::t;
    B old = __atomic_load_n((B*)p, __ATOMIC_RELAXED);
    for (;;) {
        B nv = as<B>(op(as<T>(old)));
        if (__atomic_compare_exchange_n((B*)p, &old, nv, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            return as<T>(old);
    }
}

/* Half and bfloat16, stored as their bits: converted through float (round to nearest even).
 * By hand, not through _Float16, which g++ before 13 lacks in C++ on aarch64 and riscv64. */
static inline float h2f(uint16_t h) {
    const uint32_t sg = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu, u;
    if (e == 0x1f) u = sg | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0);   /* inf; NaN made quiet */
    else if (e) u = sg | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sg;
    else {                                                              /* subnormal: normalise */
        const uint32_t s = (uint32_t)__builtin_clz(m) - 21;
        u = sg | ((113 - s) << 23) | (((m << s) & 0x3ffu) << 13);
    }
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f2h(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    const uint16_t sg = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sg | 0x7e00u | ((a >> 13) & 0x3ffu));   /* NaN: quiet */
    if (a >= 0x477ff000u) return (uint16_t)(sg | 0x7c00u);    /* 65520 and up: inf (and inf) */
    if (a >= 0x38800000u) {                                   /* a normal half: re-bias, round */
        const uint32_t r = a - 0x38000000u;
        return (uint16_t)(sg | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) return sg;                           /* below 2^-25: zero */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;   /* 14..24 */
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;         /* may carry into the smallest normal */
    return (uint16_t)(sg | q);
}
static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- half-precision arithmetic (PTX .f16 .f16x2 .bf16 .bf16x2) --------------------------
 * Each result is the exact one rounded once to the 16-bit format, in the instruction's mode.
 * Operands widen exactly to double. The exact a*b + c of 16-bit operands is a sum of two
 * doubles (a*b is exact: 22 significant bits at most); TwoSum gives its rounding error, and
 * a non-zero error makes the double round-to-odd (the last bit set, by stepping one double
 * ulp towards the error). Round-to-odd to 53 bits then rounding to 11 (or 8) bits, in any
 * mode, is the correct single rounding (Boldo & Melquiond: p + 2 <= 53 bits suffice), where
 * plain double rounding is not (bf16: 7 * 37 + -2^-100 would round to 260, not 258).
 * add is a*1 + b, sub b*-1 + a, mul a*b + -0 (so -0 * x keeps its sign). NaN results are the
 * canonical NaN 0x7fff, as the device gives. */
enum HalfMode : int { H_RN = 0, H_RZ = 1, H_RM = 2, H_RP = 3 };
enum HalfFlag : int { H_FTZ = 1, H_SAT = 2, H_RELU = 4 };
static constexpr uint16_t kHalfNaN = 0x7fff;

/* x (any double) rounded to the binary format of E exponent and M fraction bits, in `mode`. */
template <int E, int M> static inline uint16_t round_small(double x, int mode) {
    constexpr int bias = (1 << (E - 1)) - 1, emin = 1 - bias, emax = bias;
    constexpr uint16_t inf = (uint16_t)(((1u << E) - 1) << M), maxf = (uint16_t)(inf - 1);
    if (x != x) return kHalfNaN;
    const bool neg = signbit(x);
    const uint16_t sg = neg ? (uint16_t)(1u << (E + M)) : 0;
    const double a = fabs(x);
    if (a == 0) return sg;
    if (isinf(a)) return sg | inf;
    const bool up = (mode == H_RP && !neg) || (mode == H_RM && neg);   /* away from zero */
    int e;
    frexp(a, &e);
    int ex = e - 1;                                 /* a in [2^ex, 2^(ex+1)) */
    if (ex > emax) return sg | ((mode == H_RN || up) ? inf : maxf);    /* inf too */
    if (ex < emin) ex = emin;                       /* subnormal: the fixed quantum */
    const double r = ldexp(a, M - ex);              /* exact: a in units of the result's ulp */
    double n = floor(r);
    const double f = r - n;
    if (f != 0 && (mode == H_RN ? (f > 0.5 || (f == 0.5 && fmod(n, 2.0) != 0)) : up)) n += 1;
    /* n < 2^M: subnormal (ex == emin); n == 2^(M+1): carried into the next binade (or inf) */
    return sg | (uint16_t)(((uint32_t)(ex + bias) << M) + (uint32_t)n - (1u << M));
}
template <bool BF> static inline double hget(uint16_t v) { return BF ? (double)bf2f(v) : (double)h2f(v); }
template <bool BF> static inline uint16_t hround(double x, int mode) {
    return BF ? round_small<8, 7>(x, mode) : round_small<5, 10>(x, mode);
}
template <bool BF> static inline uint16_t hftz(uint16_t v) {
    const uint16_t expo = BF ? 0x7f80 : 0x7c00;
    return (v & expo) == 0 ? (uint16_t)(v & 0x8000) : v;
}
/* a*b + c rounded to odd (a*b must be exact in double). */
static inline double fma_odd(double a, double b, double c) {
    const double p = a * b;
    const double s = p + c;
    if (s != s || isinf(s)) return s;
    const double bb = s - p;
    const double err = (p - (s - bb)) + (c - bb);   /* TwoSum: s + err == p + c exactly */
    uint64_t bits;
    __builtin_memcpy(&bits, &s, 8);
    if (err != 0 && (bits & 1) == 0) return nextafter(s, err > 0 ? INFINITY : -INFINITY);
    return s;
}
/* The exact result x (rounded to odd) to the format, with .sat / .relu / .ftz applied. */
template <bool BF> static inline uint16_t hfinish(double x, int mode, int flags) {
    if (x != x) return (flags & H_SAT) ? 0 : kHalfNaN;
    if (flags & H_SAT) x = x <= 0 ? 0.0 : x > 1 ? 1.0 : x;    /* before rounding: same result; -0 is +0 */
    if ((flags & H_RELU) && x < 0) x = 0.0;
    uint16_t r = hround<BF>(x, mode);
    return (flags & H_FTZ) ? hftz<BF>(r) : r;
}
template <bool BF> static inline uint16_t hfma(uint16_t a, uint16_t b, uint16_t c, int mode, int flags) {
    if (flags & H_FTZ) { a = hftz<BF>(a); b = hftz<BF>(b); c = hftz<BF>(c); }
    return hfinish<BF>(fma_odd(hget<BF>(a), hget<BF>(b), hget<BF>(c)), mode, flags);
}
template <bool BF> static inline uint16_t hadd(uint16_t a, uint16_t b, int mode, int flags) {
    if (flags & H_FTZ) { a = hftz<BF>(a); b = hftz<BF>(b); }
    return hfinish<BF>(fma_odd(hget<BF>(a), 1.0, hget<BF>(b)), mode, flags);
}
template <bool BF> static inline uint16_t hsub(uint16_t a, uint16_t b, int mode, int flags) {
    if (flags & H_FTZ) { a = hftz<BF>(a); b = hftz<BF>(b); }
    return hfinish<BF>(fma_odd(hget<BF>(b), -1.0, hget<BF>(a)), mode, flags);
}
template <bool BF> static inline uint16_t hmul(uint16_t a, uint16_t b, int mode, int flags) {
    if (flags & H_FTZ) { a = hftz<BF>(a); b = hftz<BF>(b); }
    return hfinish<BF>(fma_odd(hget<BF>(a), hget<BF>(b), -0.0), mode, flags);
}
/* min / max: a NaN operand gives the other (both NaN, or .NaN: the canonical NaN); -0 < +0. */
template <bool BF> static inline uint16_t hminmax(uint16_t a, uint16_t b, bool is_max, bool nan, int flags) {
    if (flags & H_FTZ) { a = hftz<BF>(a); b = hftz<BF>(b); }
    const double x = hget<BF>(a), y = hget<BF>(b);
    uint16_t r;
    if (x != x || y != y) {
        if (nan || (x != x && y != y)) return kHalfNaN;
        r = x != x ? b : a;
    } else if (x == y) {
        r = (signbit(x) != is_max) ? a : b;
    } else {
        r = ((x > y) == is_max) ? a : b;
    }
    if ((flags & H_RELU) && (r & 0x8000)) r = 0;
    return r;
}
template <bool BF> static inline uint16_t hneg(uint16_t a, int flags) {
    return (uint16_t)(((flags & H_FTZ) ? hftz<BF>(a) : a) ^ 0x8000);
}
template <bool BF> static inline uint16_t habs(uint16_t a, int flags) {
    return (uint16_t)(((flags & H_FTZ) ? hftz<BF>(a) : a) & 0x7fff);
}
/* The .x2 forms: the operation on the low halves and on the high halves. */
template <class F> static inline uint32_t h2(F f, uint32_t a, uint32_t b = 0, uint32_t c = 0) {
    return (uint32_t)f((uint16_t)a, (uint16_t)b, (uint16_t)c) |
           ((uint32_t)f((uint16_t)(a >> 16), (uint16_t)(b >> 16), (uint16_t)(c >> 16)) << 16);
}
/* cvt.{rz,rm,rp} between f64 and f32: the conversion alone in that mode. */
template <int MODE> static inline float f64_to_f32(double x) {
    return rounded<MODE>([](double v) { return (float)v; }, x);
}

static inline uint64_t clock64() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static inline uint64_t globaltimer() {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static inline uint32_t linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

template <size_t N, size_t A> struct alignas(A) param { unsigned char b[N]; };

/* Device printf (PTX's vprintf): the format, and its arguments packed as CUDA packs them,
 * each at its own alignment (ints 4 bytes, long and pointers 8, floating point as double).
 * One line goes to stdout at once; %n is printed, never done. */
static int vprintf_(const char* fmt, const unsigned char* args) {
    char out[4096];
    size_t n = 0, off = 0;
    auto put = [&](const char* t, size_t len) {
        if (len > sizeof out - 1 - n) len = sizeof out - 1 - n;
        memcpy(out + n, t, len);
        n += len;
    };
    auto arg = [&](size_t size) -> uint64_t {
        off = (off + size - 1) & ~(size - 1);
        uint64_t v = 0;
        memcpy(&v, args + off, size);
        off += size;
        return v;
    };
    if (!fmt) return -1;
    for (const char* p = fmt; *p;) {
        if (*p != '%') { put(p++, 1); continue; }
        if (p[1] == '%') { put("%", 1); p += 2; continue; }
        char spec[48];
        size_t k = 0;
        spec[k++] = *p++;
        while (*p && strchr("-+ #0", *p) && k < 8) spec[k++] = *p++;
        for (int part = 0; part < 2; ++part) {           /* width, then .precision */
            if (part == 1) {
                if (*p != '.') break;
                spec[k++] = *p++;
            }
            if (*p == '*') {
                k += (size_t)snprintf(spec + k, 12, "%d", (int32_t)arg(4));
                ++p;
            } else {
                while (*p >= '0' && *p <= '9' && k < 30) spec[k++] = *p++;
            }
        }
        bool wide = false;
        while (*p && strchr("hlLqjzt", *p)) { if (*p == 'l' || *p == 'L' || *p == 'q' || *p == 'j' || *p == 'z' || *p == 't') wide = true; ++p; }
        char c = *p ? *p++ : 0;
        char buf[512];
        int len = 0;
        if (c && strchr("diouxXc", c)) {
            spec[k++] = 'l'; spec[k++] = 'l'; spec[k++] = c; spec[k] = 0;
            uint64_t v = arg(wide ? 8 : 4);
            long long sv = wide ? (long long)v : (long long)(int32_t)(uint32_t)v;
            len = (c == 'd' || c == 'i') ? snprintf(buf, sizeof buf, spec, sv)
                : c == 'c' ? snprintf(buf, sizeof buf, "%c", (int)(unsigned char)v)
                : snprintf(buf, sizeof buf, spec, (unsigned long long)(wide ? v : (uint32_t)v));
        } else if (c && strchr("eEfFgGaA", c)) {
            spec[k++] = c; spec[k] = 0;
            uint64_t bits = arg(8);
            double d;
            memcpy(&d, &bits, 8);
            len = snprintf(buf, sizeof buf, spec, d);
        } else if (c == 's') {
            spec[k++] = 's'; spec[k] = 0;
            const char* str = (const char*)(uintptr_t)arg(8);
            len = snprintf(buf, sizeof buf, spec, str ? str : "(null)");
        } else if (c == 'p') {
            len = snprintf(buf, sizeof buf, "%p", (void*)(uintptr_t)arg(8));
        } else {                                         /* %n, or an unknown conversion */
            spec[k++] = c; spec[k] = 0;
            put(spec, k);
            continue;
        }
        if (len > 0) put(buf, (size_t)len < sizeof buf ? (size_t)len : sizeof buf - 1);
    }
    fwrite(out, 1, n, stdout);
    return (int)n;
}

}  // namespace kc

#endif
