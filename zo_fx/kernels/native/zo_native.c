/*
 * zo_fx native CPU kernels: direction streams (docs/directions.md) turned into perturbed
 * weight tiles and fused updates without materialising the directions.
 *
 * Built at first use by zo_fx/kernels/native/__init__.py with the machine's C compiler
 * (-O3 -march=native -ffp-contract=off) and called through ctypes. Every function here
 * must give, element by element, the same floating-point operations in the same order
 * as the torch reference it replaces (zo_fx/kernels/blocked.py `_perturbed_tiles`,
 * zo_fx/kernels/update.py `_update_chunk`, zo_fx/kernels/embedding.py), so that
 * Rademacher results are bit-identical. That is why:
 *   - contraction into fused multiply-adds is disabled (-ffp-contract=off): torch rounds
 *     the product and the sum separately;
 *   - a Rademacher "u * s" is never a multiply: +/-1 times s is exactly +/-s, so the
 *     result is `b - s` or `b + s`, chosen per element from the sign bit;
 *   - the rounding to bfloat16 is round-to-nearest-even on the bits (what c10 does), and
 *     float16 uses the compiler's IEEE conversion (also round-to-nearest-even).
 *
 * Parallelism: work is cut into units of BATCH consecutive elements (or rows of an
 * embedding) and the units are shared between threads; the per-element arithmetic is the
 * same whatever the split, so results do not depend on the thread count. One parallel
 * region (pthread create/join) per call keeps synchronisation coarse.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* elements per unit of work; a multiple of 128 (one Rademacher block) */
#define BATCH 2048
/* Philox blocks one unit can touch when it starts inside a block */
#define MAX_BLOCKS (BATCH / 128 + 1)
#define MAX_THREADS 256
#define MAX_SEEDS 64

int zo_abi_version(void) { return 4; }

/* ------------------------------------------------------------------------------------------ Philox */

/* Philox runs on 16 blocks at once in GCC vector types (one 512-bit register of counters, or
 * two 256-bit ones: the compiler picks the machine's widest). The 32x32 -> 64-bit products are
 * taken in 64-bit lanes. */
#define LANES 16
typedef uint32_t u32v __attribute__((vector_size(4 * LANES)));
typedef uint64_t u64v __attribute__((vector_size(8 * LANES)));

#if defined(__AVX512F__)
#include <immintrin.h>
/* hi and lo halves of x * m per 32-bit lane: two 32x32->64 multiplies (even and odd lanes, one
 * uop each) and blends; a plain 64-bit vector product would compile to the slow vpmullq */
static inline void mulhilo(uint32_t m, u32v x, u32v *hi, u32v *lo) {
    __m512i xv, mv = _mm512_set1_epi32((int)m);
    memcpy(&xv, &x, 64);
    __m512i even = _mm512_mul_epu32(xv, mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(xv, 32), mv);
    __m512i h = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    __m512i l = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    memcpy(hi, &h, 64);
    memcpy(lo, &l, 64);
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline void mulhilo(uint32_t m, u32v x, u32v *hi, u32v *lo) {
    __m256i mv = _mm256_set1_epi32((int)m), xv[2], h[2], l[2];
    memcpy(xv, &x, 64);
    for (int k = 0; k < 2; k++) {
        __m256i even = _mm256_mul_epu32(xv[k], mv), odd = _mm256_mul_epu32(_mm256_srli_epi64(xv[k], 32), mv);
        h[k] = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
        l[k] = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    }
    memcpy(hi, h, 64);
    memcpy(lo, l, 64);
}
#else
static inline void mulhilo(uint32_t m, u32v x, u32v *hi, u32v *lo) {
    u64v p = __builtin_convertvector(x, u64v) * (uint64_t)m;
    *hi = __builtin_convertvector(p >> 32, u32v);
    *lo = __builtin_convertvector(p, u32v);
}
#endif

static const u32v LANE_LO = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const u32v LANE_HI = {16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};

/* The four Philox output words of the 16 consecutive blocks from `b`, one vector per word. */
static inline void philox16(uint64_t b, uint32_t seed_lo, uint32_t seed_hi, uint32_t pid, uint32_t tag, u32v *w) {
    u32v c0 = (u32v){0} + (uint32_t)b + LANE_LO;
    /* the counter's high word, plus one in the lanes where the low word wrapped */
    u32v c1 = (u32v){0} + (uint32_t)(b >> 32) - (u32v)(c0 < ((u32v){0} + (uint32_t)b));
    u32v c2 = (u32v){0} + seed_hi, c3 = (u32v){0} + tag;
    uint32_t k0 = seed_lo, k1 = pid;
    for (int r = 0; r < 10; r++) {
        if (r) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        u32v hi0, lo0, hi1, lo1;
        mulhilo(PHILOX_M0, c0, &hi0, &lo0);
        mulhilo(PHILOX_M1, c2, &hi1, &lo1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    w[0] = c0;
    w[1] = c1;
    w[2] = c2;
    w[3] = c3;
}

/* Four 16-lane vectors (word or value w of block i in lane i) to block order: out[4*i + w], for
 * the first `count` blocks. A whole set is a 4 x 16 transpose in registers: (w0, w1) and (w2, w3)
 * interleaved by 32 bits, then the pairs by 64 bits. */
static inline void store_block_order(const u32v *w, int count, uint32_t *out) {
    if (count >= LANES) {
        const u32v lo_half = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
        const u32v hi_half = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
        u32v a = __builtin_shuffle(w[0], w[1], lo_half), b = __builtin_shuffle(w[0], w[1], hi_half);
        u32v c = __builtin_shuffle(w[2], w[3], lo_half), d = __builtin_shuffle(w[2], w[3], hi_half);
        typedef uint64_t q8 __attribute__((vector_size(64)));
        const q8 first_half = {0, 8, 1, 9, 2, 10, 3, 11}, second_half = {4, 12, 5, 13, 6, 14, 7, 15};
        q8 r[4] = {__builtin_shuffle((q8)a, (q8)c, first_half), __builtin_shuffle((q8)a, (q8)c, second_half),
                   __builtin_shuffle((q8)b, (q8)d, first_half), __builtin_shuffle((q8)b, (q8)d, second_half)};
        memcpy(out, r, sizeof(r));
        return;
    }
    for (int i = 0; i < count; i++)
        for (int k = 0; k < 4; k++) out[4 * i + k] = w[k][i];
}

/* The four output words of `nb` consecutive blocks from `first`, written word-major per block
 * (out[4*i + w]), i.e. in Rademacher element order: bit j of out[m] is element 32*m + j.
 * `out` has room for a whole multiple of LANES blocks. */
static void philox_blocks(uint64_t first, int nb, uint32_t seed_lo, uint32_t seed_hi, uint32_t pid, uint32_t tag,
                          uint32_t *out) {
    for (int i0 = 0; i0 < nb; i0 += LANES) {
        u32v w[4];
        philox16(first + (uint64_t)i0, seed_lo, seed_hi, pid, tag, w);
        store_block_order(w, nb - i0, out + 4 * i0);
    }
}

/* Sign masks of `count` (<= BATCH) consecutive elements starting `q0` elements after the start of
 * block `block0`: bit j of masks[m] is set where element 32*m + j of the range has sign -1.
 * A range that starts inside a word is shifted into place (two words funnelled into one). */
static void sign_masks(uint64_t block0, uint64_t q0, int64_t count, uint32_t seed_lo, uint32_t seed_hi, uint32_t pid,
                       uint32_t tag, uint32_t *masks) {
    uint32_t words[(MAX_BLOCKS + LANES) * 4 + 8];
    uint64_t first = q0 / 128, last = (q0 + (uint64_t)count - 1) / 128;
    int nb = (int)(last - first + 1);
    philox_blocks(block0 + first, nb, seed_lo, seed_hi, pid, tag, words);
    words[4 * nb] = 0;
    unsigned off = (unsigned)(q0 % 128);
    unsigned wo = off / 32, sh = off % 32;
    int nw = (int)((count + 31) / 32);
    if (sh == 0) {
        memcpy(masks, words + wo, (size_t)nw * sizeof(uint32_t));
    } else {
        for (int m = 0; m < nw; m++) {
            uint64_t pair = (uint64_t)words[wo + m] | ((uint64_t)words[wo + m + 1] << 32);
            masks[m] = (uint32_t)(pair >> sh);
        }
    }
}

/* ----------------------------------------------------------------------------------- conversions */

static inline uint32_t bits_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline uint64_t bits_f64(double f) {
    uint64_t u;
    memcpy(&u, &f, 8);
    return u;
}
static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* round to nearest even on the bits, NaN to the canonical quiet NaN (c10::BFloat16's rule) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = bits_f32(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)r;
}

#ifdef __FLT16_MAX__
typedef _Float16 half_t;
static inline float f16_to_f32(half_t h) { return (float)h; }
static inline half_t f32_to_f16(float f) { return (half_t)f; }
#else
/* no _Float16 in this compiler: IEEE binary16 by hand, round to nearest even */
typedef uint16_t half_t;
static inline float f16_to_f32(half_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) {
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    } else {
        u = sign;
    }
    return f32_from_bits(u);
}
static inline half_t f32_to_f16(float f) {
    uint32_t u = bits_f32(f);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (half_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0));
    if (a >= 0x477FF000u) return (half_t)(sign | 0x7C00u); /* rounds to infinity */
    if (a < 0x38800000u) {                                  /* subnormal or zero in half */
        if (a < 0x33000000u) return (half_t)sign;
        uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (r & 1u))) r++;
        return (half_t)(sign | r);
    }
    uint32_t r = ((a - 0x38000000u) >> 13), rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (half_t)(sign | r);
}
#endif

/* -------------------------------------------------------------------------- Gaussian values */

/* Box-Muller as the frozen layout defines it (docs/directions.md): pair (even, odd) of a block's
 * words gives u1 = ((even >> 8) + 1) * 2**-24, u2 = (odd >> 8) * 2**-24 (both exact in float32),
 * then r = sqrt(-2 * log(u1)), theta = u2 * float32(2 pi), values (r cos theta, r sin theta), every
 * step in float32 like the torch reference. Only log, cos and sin differ from torch's: log is
 * fdlibm's logf (its reduction and polynomial, under 1 ulp), cos and sin are Cephes' float32
 * polynomials on a remainder that is reduced in double precision (a float32 reduction would lose
 * the remainder's relative accuracy where cos or sin crosses zero). 16 lanes of float32 at a time.
 * The values agree with torch's to a few float32 ulps (tests/test_native_kernel.py measures it)
 * and, being nothing but IEEE basic operations and conversions, are the same bit for bit on every
 * CPU and build. */
typedef double d8 __attribute__((vector_size(64)));
typedef float f32v __attribute__((vector_size(64)));
typedef int64_t i8v __attribute__((vector_size(64)));
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8s __attribute__((vector_size(32)));

#define TWO_OVER_PI_D 0.636619772367581343075535053490
#define PIO2_HI 1.57079632673412561417e+00 /* pi/2 to 33 bits: n * PIO2_HI is exact for small n */
#define PIO2_LO 6.07710050650619224932e-11 /* pi/2 - PIO2_HI */
#define TWO_PI_F32 6.28318548202514648438f  /* float32(2 pi), the layout's constant */

typedef int32_t i32v __attribute__((vector_size(64)));

/* a where mask is all ones, else b */
static inline __attribute__((always_inline)) f32v select_f32(i32v mask, f32v a, f32v b) {
    return (f32v)(((i32v)a & mask) | ((i32v)b & ~mask));
}

/* log(u1) for u1 = k * 2**-24, k in [1, 2**24]: fdlibm's e_logf reduction and polynomial (< 1 ulp) */
static inline __attribute__((always_inline)) f32v logf16(f32v x) {
    i32v ix = (i32v)x;
    i32v k = (ix >> 23) - 127;
    ix &= 0x007FFFFF;
    i32v i = (ix + (0x95F64 << 3)) & 0x800000; /* m >= sqrt(2): halve it */
    f32v m = (f32v)(ix | (i ^ 0x3F800000));
    k += i >> 23;
    f32v f = m - 1.0f;
    f32v sq = f / (2.0f + f), dk = __builtin_convertvector(k, f32v);
    f32v z = sq * sq, w = z * z;
    f32v t1 = w * (4.0000000596e-01f + w * 2.2222198546e-01f);
    f32v t2 = z * (6.6666668653e-01f + w * 2.8571429849e-01f);
    f32v hfsq = 0.5f * f * f;
    return dk * 6.9313812256e-01f - ((hfsq - (sq * (hfsq + (t2 + t1)) + dk * 9.0580006145e-06f)) - f);
}

static inline __attribute__((always_inline)) f32v radius16f(u32v even) {
    f32v u1 = __builtin_convertvector((even >> 8) + 1u, f32v) * (1.0f / 16777216.0f);
    f32v x = -2.0f * logf16(u1);
#if defined(__AVX512F__)
    __m512 v;
    memcpy(&v, &x, 64);
    v = _mm512_sqrt_ps(v);
    memcpy(&x, &v, 64);
#else
    for (int i = 0; i < 16; i++) x[i] = __builtin_sqrtf(x[i]);
#endif
    return x;
}

/* cos and sin of theta in [0, 2 pi): the quadrant and the remainder r in [-pi/4, pi/4] taken in double (a
 * float32 reduction loses r's relative accuracy where cos or sin crosses zero), r rounded to float32,
 * then Cephes' float32 polynomials on it */
static inline __attribute__((always_inline)) void trig16f(u32v odd, f32v *cos_v, f32v *sin_v) {
    f32v theta = (__builtin_convertvector((i32v)(odd >> 8), f32v) * (1.0f / 16777216.0f)) * TWO_PI_F32;
    f32v r, lo;
    i32v n;
#if defined(__AVX512F__)
    /* the same operations on the two halves in 512-bit registers: halves split and joined by
     * extract/insert (through memory, 256-bit stores read back as one 512-bit vector stall on
     * store forwarding) */
    __m512 th;
    memcpy(&th, &theta, 64);
    __m512d xd[2] = {_mm512_cvtps_pd(_mm512_castps512_ps256(th)),
                     _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(th), 1)))};
    __m256 rh[2], rl[2];
    __m256i nh[2];
    for (int k = 0; k < 2; k++) {
        __m512d x = xd[k];
        /* x >= 0: truncation rounds; n <= 4 fits int32, so the int32 truncation is the int64 one */
        nh[k] = _mm512_cvttpd_epi32(_mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(TWO_OVER_PI_D)),
                                                  _mm512_set1_pd(0.5)));
        __m512d nd = _mm512_cvtepi32_pd(nh[k]);
        __m512d rd = _mm512_sub_pd(_mm512_sub_pd(x, _mm512_mul_pd(nd, _mm512_set1_pd(PIO2_HI))),
                                   _mm512_mul_pd(nd, _mm512_set1_pd(PIO2_LO)));
        rh[k] = _mm512_cvtpd_ps(rd);
        rl[k] = _mm512_cvtpd_ps(_mm512_sub_pd(rd, _mm512_cvtps_pd(rh[k]))); /* what rounding r lost */
    }
    __m512 rv = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(rh[0])),
                                                    _mm256_castps_pd(rh[1]), 1));
    __m512 lv = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(rl[0])),
                                                    _mm256_castps_pd(rl[1]), 1));
    __m512i nv = _mm512_inserti64x4(_mm512_castsi256_si512(nh[0]), nh[1], 1);
    memcpy(&r, &rv, 64);
    memcpy(&lo, &lv, 64);
    memcpy(&n, &nv, 64);
#else
    f8 half[2];
    i8s nh[2];
    memcpy(half, &theta, 64);
    f8 rh[2], rl[2];
    for (int k = 0; k < 2; k++) {
        d8 x = __builtin_convertvector(half[k], d8);
        i8v nk = __builtin_convertvector(x * TWO_OVER_PI_D + 0.5, i8v); /* x >= 0: truncation rounds */
        d8 nd = __builtin_convertvector(nk, d8);
        d8 rd = (x - nd * PIO2_HI) - nd * PIO2_LO;
        rh[k] = __builtin_convertvector(rd, f8);
        rl[k] = __builtin_convertvector(rd - __builtin_convertvector(rh[k], d8), f8); /* what rounding r lost */
        nh[k] = __builtin_convertvector(nk, i8s);
    }
    memcpy(&r, rh, 64);
    memcpy(&lo, rl, 64);
    memcpy(&n, nh, 64);
#endif
    /* sin(r + lo) = r + (lo + r z P(z)), cos(r + lo) = 1 - z/2 + z^2 Q(z) - r lo, the 1 - z/2 with its rounding
     * error carried (fdlibm's kernel_cos) */
    f32v z = r * r;
    f32v sr = r + (lo + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f)));
    f32v pc = 4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f);
    f32v hz = 0.5f * z, one_hz = 1.0f - hz;
    f32v cr = one_hz + (((1.0f - one_hz) - hz) + (z * z * pc - r * lo));
    i32v swap = -(n & 1), cos_neg = ((n + 1) & 2) << 30, sin_neg = (n & 2) << 30;
    *cos_v = (f32v)((i32v)select_f32(swap, sr, cr) ^ cos_neg);
    *sin_v = (f32v)((i32v)select_f32(swap, cr, sr) ^ sin_neg);
}

/* pair q of a block gives its values 2q (r cos) and 2q + 1 (r sin); `count` blocks in element order */
static inline __attribute__((always_inline)) void store_values16(const f32v *r, const f32v *c, const f32v *sn,
                                                                 int count, float *out) {
    f32v v[4] = {r[0] * c[0], r[0] * sn[0], r[1] * c[1], r[1] * sn[1]};
    u32v bits[4];
    memcpy(bits, v, sizeof(bits));
    store_block_order(bits, count, (uint32_t *)out);
}

#define GAUSS_SETS ((BATCH / 4 + 1 + LANES - 1) / LANES)
/* Values of `count` (<= BATCH) consecutive elements starting `q0` elements after block `block0`.
 * Each step is a pass over all the piece's 16-block sets, so that the long dependency chains of
 * the polynomials of independent sets overlap in the CPU's pipelines. */
static void gauss_values(uint64_t block0, uint64_t q0, int64_t count, uint32_t seed_lo, uint32_t seed_hi, uint32_t pid,
                         uint32_t tag, float *vals) {
    u32v w[GAUSS_SETS][4];
    f32v r[GAUSS_SETS][2], c[GAUSS_SETS][2], sn[GAUSS_SETS][2];
    float buf[GAUSS_SETS * LANES * 4] __attribute__((aligned(64)));
    uint64_t first = q0 / 4, last = (q0 + (uint64_t)count - 1) / 4;
    int nb = (int)(last - first + 1), sets = (nb + LANES - 1) / LANES;
    for (int k = 0; k < sets; k++) philox16(block0 + first + (uint64_t)(k * LANES), seed_lo, seed_hi, pid, tag, w[k]);
    for (int k = 0; k < sets; k++)
        for (int q = 0; q < 2; q++) r[k][q] = radius16f(w[k][2 * q]);
    for (int k = 0; k < sets; k++)
        for (int q = 0; q < 2; q++) trig16f(w[k][2 * q + 1], &c[k][q], &sn[k][q]);
    for (int k = 0; k < sets; k++)
        store_values16(r[k], c[k], sn[k], nb - k * LANES, buf + 4 * LANES * k);
    memcpy(vals, buf + q0 % 4, (size_t)count * sizeof(float));
}

/* --------------------------------------------------------------------------------------- threads */

typedef void (*unit_fn)(const void *ctx, int64_t u0, int64_t u1);

/* units [0, units) split into `threads` contiguous shares; the caller runs the first one.
 *
 * Built with -fopenmp, the shares run as one OpenMP parallel region: the library then links the
 * libgomp.so.1 that torch has already loaded (the loader matches the soname), so the kernel's threads
 * are torch's own pool. That matters at all cores: after each GEMM torch's OpenMP workers keep
 * spinning for a while, and a pthread of ours started then would fight one of them for a core.
 * Without OpenMP, a pthread per extra share (created and joined per call). Either way the per-element
 * arithmetic does not depend on the split. */
#if defined(_OPENMP)
#include <omp.h>
static void parallel_units(unit_fn fn, const void *ctx, int64_t units, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = (int)units;
    if (threads <= 1) {
        if (units > 0) fn(ctx, 0, units);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t u0 = units * t / n, u1 = units * (t + 1) / n;
        if (u1 > u0) fn(ctx, u0, u1);
    }
}
#else
struct share {
    unit_fn fn;
    const void *ctx;
    int64_t u0, u1;
};

static void *run_share(void *p) {
    struct share *s = (struct share *)p;
    if (s->u1 > s->u0) s->fn(s->ctx, s->u0, s->u1);
    return NULL;
}

static void parallel_units(unit_fn fn, const void *ctx, int64_t units, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = (int)units;
    if (threads <= 1) {
        if (units > 0) fn(ctx, 0, units);
        return;
    }
    struct share shares[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        shares[t].fn = fn;
        shares[t].ctx = ctx;
        shares[t].u0 = units * t / threads;
        shares[t].u1 = units * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_share, &shares[t]) == 0;
    run_share(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_share(&shares[t]); /* no thread to be had: do its share here, same arithmetic */
    }
}
#endif

/* ----------------------------------------------------------------------------- perturbed tiles */

/* One call's description, shared by the tile, update and embedding kernels.
 * Element t of the range is element `skip + t` of the stream counted from block `block0`. */
struct job {
    const void *base; /* [n] tile, or the [V, D] table for the embedding */
    void *out;        /* [G, ostride] perturbed tiles (tile and embedding kernels) */
    int64_t n, ostride;
    uint64_t block0, skip;
    int seeds, groups;
    const uint32_t *seed_lo, *seed_hi;
    uint32_t pid, tag;
    const int32_t *which;  /* group -> distinct seed */
    const double *scales;  /* one per group (tile kernels) or per direction (update: coefs) */
    double lr, wd;         /* update */
    const int64_t *ids;    /* embedding: row ids */
    int64_t dim;           /* embedding: D */
    int64_t elsize;        /* embedding: bytes per element */
    void (*row_fn)(const void *ctx, int64_t u0, int64_t u1); /* embedding: the tile kernel run on each row */
};

/* Loads and stores of 32 consecutive elements between a storage type and float/double. Written
 * as plain loops over restrict pointers so that the compiler vectorises them; float16 uses the
 * F16C conversion instructions where the machine has them (round to nearest even, as torch). */
/* Full-width moves on AVX-512. A 128-byte memcpy is expanded in 256-bit pieces under gcc's default tuning
 * for AVX-512 CPUs, and the 512-bit loads of the helpers below then read each pair of them back from the
 * stack: a store-forwarding stall per vector (on an Intel Xeon, 3.4 instead of 9 G elements/s). */
static inline void copy32_f32(const float *restrict src, float *restrict dst) {
#if defined(__AVX512F__)
    for (int k = 0; k < 32; k += 16) _mm512_storeu_ps(dst + k, _mm512_loadu_ps(src + k));
#else
    memcpy(dst, src, 32 * sizeof(float));
#endif
}
static inline void load32_f32(const float *restrict b, float *restrict x) { copy32_f32(b, x); }
static inline void store32_f32(const float *restrict v, float *restrict o) { copy32_f32(v, o); }
static inline void load32_bf16(const uint16_t *restrict b, float *restrict x) {
    for (int j = 0; j < 32; j++) x[j] = bf16_to_f32(b[j]);
}
static inline void store32_bf16(const float *restrict v, uint16_t *restrict o) {
    for (int j = 0; j < 32; j++) o[j] = f32_to_bf16(v[j]);
}
#if defined(__F16C__) && defined(__FLT16_MAX__)
#include <immintrin.h>
static inline void load32_f16(const half_t *restrict b, float *restrict x) {
    for (int j = 0; j < 32; j += 8) _mm256_storeu_ps(x + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j))));
}
static inline void store32_f16(const float *restrict v, half_t *restrict o) {
    for (int j = 0; j < 32; j += 8)
        _mm_storeu_si128((__m128i *)(o + j), _mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT));
}
#else
static inline void load32_f16(const half_t *restrict b, float *restrict x) {
    for (int j = 0; j < 32; j++) x[j] = f16_to_f32(b[j]);
}
static inline void store32_f16(const float *restrict v, half_t *restrict o) {
    for (int j = 0; j < 32; j++) o[j] = f32_to_f16(v[j]);
}
#endif
static inline void copy32_f64(const double *restrict src, double *restrict dst) {
#if defined(__AVX512F__)
    for (int k = 0; k < 32; k += 8) _mm512_storeu_pd(dst + k, _mm512_loadu_pd(src + k));
#else
    memcpy(dst, src, 32 * sizeof(double));
#endif
}
static inline void load32_f64(const double *restrict b, double *restrict x) { copy32_f64(b, x); }
static inline void store32_f64(const double *restrict v, double *restrict o) { copy32_f64(v, o); }

/* Sign words as sign bits. `x - s` is `x + (-s)` exactly in IEEE arithmetic (signed zeros
 * included), so a Rademacher `x + s * u` is an add of `s` with its sign bit flipped where the
 * element's bit is set: one shift, one xor and one add per vector, no compare, no blend. The
 * helpers below work on 32 elements (one sign word) in GCC vector types, which the compiler maps
 * to the machine's widest registers (2 x AVX-512, 4 x AVX2, 8 x NEON). */
typedef double f64v __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
static const u64x8 LANE8[4] = {{0, 1, 2, 3, 4, 5, 6, 7},
                               {8, 9, 10, 11, 12, 13, 14, 15},
                               {16, 17, 18, 19, 20, 21, 22, 23},
                               {24, 25, 26, 27, 28, 29, 30, 31}};


/* the float32 sign flips of one word: lanes 0-15 and 16-31, 0x80000000 where the bit is set */
static inline void flips32_f32(uint32_t w, u32v *lo, u32v *hi) {
    u32v ww = (u32v){0} + w;
    *lo = ((ww >> LANE_LO) & 1u) << 31;
    *hi = ((ww >> LANE_HI) & 1u) << 31;
}

/* acc[0:32] += flip(c, w): `acc + c * u` with u = +/-1, the product exact. AVX-512 takes the
 * word as two lane masks (a masked xor sets the sign bits); elsewhere shifts make the masks. */
static inline void add_signed32_f32(f32v *acc, uint32_t w, uint32_t cbits) {
#if defined(__AVX512F__)
    __m512i c = _mm512_set1_epi32((int)cbits), sign = _mm512_set1_epi32((int)0x80000000u);
    __m512 a[2];
    memcpy(a, acc, sizeof(a));
    a[0] = _mm512_add_ps(a[0], _mm512_castsi512_ps(_mm512_mask_xor_epi32(c, (__mmask16)w, c, sign)));
    a[1] = _mm512_add_ps(a[1], _mm512_castsi512_ps(_mm512_mask_xor_epi32(c, (__mmask16)(w >> 16), c, sign)));
    memcpy(acc, a, sizeof(a));
#else
    u32v lo, hi;
    flips32_f32(w, &lo, &hi);
    u32v c = (u32v){0} + cbits;
    acc[0] += (f32v)(c ^ lo);
    acc[1] += (f32v)(c ^ hi);
#endif
}
static inline void add_signed32_f64(f64v *acc, uint32_t w, uint64_t cbits) {
    u64x8 ww = (u64x8){0} + (uint64_t)w, c = (u64x8){0} + cbits;
    for (int q = 0; q < 4; q++) acc[q] += (f64v)(c ^ (((ww >> LANE8[q]) & 1u) << 63));
}

/* v = neg ? x - s : x + s for the 32 elements of one sign word */
static inline void blend32_f32(const float *restrict x, uint32_t w, float s, float *restrict v) {
    f32v acc[2];
    memcpy(acc, x, sizeof(acc));
    add_signed32_f32(acc, w, bits_f32(s));
    memcpy(v, acc, sizeof(acc));
}
static inline void blend32_f64(const double *restrict x, uint32_t w, double s, double *restrict v) {
    f64v acc[4];
    memcpy(acc, x, sizeof(acc));
    add_signed32_f64(acc, w, bits_f64(s));
    memcpy(v, acc, sizeof(acc));
}

/* One run of `len` elements: out = round_T(neg ? b - s : b + s). Whole words through the vector
 * helpers (base converted once per word), the tail element by element with the same operations. */
#define DEFINE_RAD_RUN(SUFFIX, T, A, ACC, LOAD1, STORE1)                                                   \
    static void rad_run_##SUFFIX(const T *restrict base, int64_t len, const uint32_t *restrict masks, A s, \
                                 T *restrict out) {                                                        \
        A x[32], v[32];                                                                                    \
        int64_t full = len / 32;                                                                           \
        for (int64_t m = 0; m < full; m++) {                                                               \
            load32_##SUFFIX(base + 32 * m, x);                                                             \
            blend32_##ACC(x, masks[m], s, v);                                                              \
            store32_##SUFFIX(v, out + 32 * m);                                                             \
        }                                                                                                  \
        for (int64_t t = 32 * full; t < len; t++) {                                                        \
            A y = LOAD1(base[t]);                                                                          \
            out[t] = STORE1(((masks[t / 32] >> (t % 32)) & 1u) ? y - s : y + s);                           \
        }                                                                                                  \
    }

#define IDENT(x) (x)
DEFINE_RAD_RUN(f32, float, float, f32, IDENT, IDENT)
DEFINE_RAD_RUN(f64, double, double, f64, IDENT, IDENT)
DEFINE_RAD_RUN(bf16, uint16_t, float, f32, bf16_to_f32, f32_to_bf16)
DEFINE_RAD_RUN(f16, half_t, float, f32, f16_to_f32, f32_to_f16)

/* units are BATCH-element pieces of the tile: masks of every distinct seed once, then every group */
#define DEFINE_RAD_TILES(SUFFIX, T, A)                                                                     \
    static void rad_tiles_##SUFFIX(const void *vctx, int64_t u0, int64_t u1) {                             \
        const struct job *j = (const struct job *)vctx;                                                    \
        uint32_t masks[MAX_SEEDS][BATCH / 32 + 1];                                                         \
        for (int64_t u = u0; u < u1; u++) {                                                                \
            int64_t t0 = u * BATCH, len = j->n - t0 < BATCH ? j->n - t0 : BATCH;                           \
            for (int s = 0; s < j->seeds; s++)                                                             \
                sign_masks(j->block0, j->skip + (uint64_t)t0, len, j->seed_lo[s], j->seed_hi[s], j->pid,   \
                           j->tag, masks[s]);                                                              \
            for (int g = 0; g < j->groups; g++)                                                            \
                rad_run_##SUFFIX((const T *)j->base + t0, len, masks[j->which[g]], (A)j->scales[g],        \
                                 (T *)j->out + g * j->ostride + t0);                                       \
        }                                                                                                  \
    }

DEFINE_RAD_TILES(f32, float, float)
DEFINE_RAD_TILES(f64, double, double)
DEFINE_RAD_TILES(bf16, uint16_t, float)
DEFINE_RAD_TILES(f16, half_t, float)

/* One run of `len` elements: out = round_T(b + s * (A)u), u the stream's float32 values */
#define DEFINE_GAUSS_RUN(SUFFIX, T, A)                                                                     \
    static void gauss_run_##SUFFIX(const T *restrict b, int64_t len, const float *restrict val, A s,       \
                                   T *restrict o) {                                                        \
        A x[32], v[32];                                                                                    \
        int64_t t = 0;                                                                                     \
        for (; t + 32 <= len; t += 32) {                                                                   \
            load32_##SUFFIX(b + t, x);                                                                     \
            for (int e = 0; e < 32; e++) v[e] = x[e] + s * (A)val[t + e];                                  \
            store32_##SUFFIX(v, o + t);                                                                    \
        }                                                                                                  \
        for (; t < len; t++) {                                                                             \
            A y;                                                                                           \
            load1_##SUFFIX(b + t, &y);                                                                     \
            store1_##SUFFIX(y + s * (A)val[t], o + t);                                                     \
        }                                                                                                  \
    }

/* Gaussian tiles. Per unit: each distinct seed's values once (in cache), then every group that uses
 * the seed. */
#define DEFINE_GAUSS_TILES(SUFFIX, T, A)                                                                   \
    static void gauss_tiles_##SUFFIX(const void *vctx, int64_t u0, int64_t u1) {                           \
        const struct job *j = (const struct job *)vctx;                                                    \
        float val[BATCH] __attribute__((aligned(64)));                                                     \
        for (int64_t u = u0; u < u1; u++) {                                                                \
            int64_t t0 = u * BATCH, len = j->n - t0 < BATCH ? j->n - t0 : BATCH;                           \
            for (int sd = 0; sd < j->seeds; sd++) {                                                        \
                gauss_values(j->block0, j->skip + (uint64_t)t0, len, j->seed_lo[sd], j->seed_hi[sd],       \
                             j->pid, j->tag, val);                                                         \
                for (int g = 0; g < j->groups; g++)                                                        \
                    if (j->which[g] == sd)                                                                 \
                        gauss_run_##SUFFIX((const T *)j->base + t0, len, val, (A)j->scales[g],             \
                                           (T *)j->out + g * j->ostride + t0);                             \
            }                                                                                              \
        }                                                                                                  \
    }

static inline void load1_f32(const float *b, float *y) { *y = *b; }
static inline void load1_f64(const double *b, double *y) { *y = *b; }
static inline void load1_bf16(const uint16_t *b, float *y) { *y = bf16_to_f32(*b); }
static inline void load1_f16(const half_t *b, float *y) { *y = f16_to_f32(*b); }
static inline void store1_f32(float v, float *o) { *o = v; }
static inline void store1_f64(double v, double *o) { *o = v; }
static inline void store1_bf16(float v, uint16_t *o) { *o = f32_to_bf16(v); }
static inline void store1_f16(float v, half_t *o) { *o = f32_to_f16(v); }

DEFINE_GAUSS_RUN(f32, float, float)
DEFINE_GAUSS_RUN(f64, double, double)
DEFINE_GAUSS_RUN(bf16, uint16_t, float)
DEFINE_GAUSS_RUN(f16, half_t, float)

DEFINE_GAUSS_TILES(f32, float, float)
DEFINE_GAUSS_TILES(f64, double, double)
DEFINE_GAUSS_TILES(bf16, uint16_t, float)
DEFINE_GAUSS_TILES(f16, half_t, float)

/* -------------------------------------------------------------------------------------- updates */

/* acc[0:32] = sum_i flip(c_i, masks_i[m]) from zero in direction order, for word m of a unit */
static inline void accumulate_word_f32(float *restrict out, const uint32_t (*masks)[BATCH / 32 + 1], int64_t m,
                                       const uint32_t *cbits, int seeds, int first) {
    f32v acc[2] = {{0}, {0}};
    if (!first) memcpy(acc, out, sizeof(acc));
    for (int i = 0; i < seeds; i++) add_signed32_f32(acc, masks[i][m], cbits[i]);
    memcpy(out, acc, sizeof(acc));
}
static inline void accumulate_word_f64(double *restrict out, const uint32_t (*masks)[BATCH / 32 + 1], int64_t m,
                                       const uint64_t *cbits, int seeds, int first) {
    f64v acc[4] = {{0}, {0}, {0}, {0}};
    if (!first) memcpy(acc, out, sizeof(acc));
    for (int i = 0; i < seeds; i++) add_signed32_f64(acc, masks[i][m], cbits[i]);
    memcpy(out, acc, sizeof(acc));
}

/* p = round_T(p - lr * (acc + wd * p)) over `len` elements */
#define DEFINE_FINISH(SUFFIX, T, A)                                                                        \
    static void finish_##SUFFIX(T *restrict p, const A *restrict acc, int64_t len, A lr, A wd) {           \
        A x[32], v[32];                                                                                    \
        int64_t t = 0;                                                                                     \
        for (; t + 32 <= len; t += 32) {                                                                   \
            load32_##SUFFIX(p + t, x);                                                                     \
            for (int e = 0; e < 32; e++) v[e] = x[e] - lr * (acc[t + e] + wd * x[e]);                      \
            store32_##SUFFIX(v, p + t);                                                                    \
        }                                                                                                  \
        for (; t < len; t++) {                                                                             \
            A y;                                                                                           \
            load1_##SUFFIX(p + t, &y);                                                                     \
            store1_##SUFFIX(y - lr * (acc[t] + wd * y), p + t);                                            \
        }                                                                                                  \
    }

DEFINE_FINISH(f32, float, float)
DEFINE_FINISH(f64, double, double)
DEFINE_FINISH(bf16, uint16_t, float)
DEFINE_FINISH(f16, half_t, float)

/* param = round_T(p - lr * (acc + wd * p)), acc = sum_i c_i u_i accumulated in direction order
 * from zero, exactly as update.py's `_update_chunk` (acc = acc + c_i * u_i). Per unit: the sign
 * words of up to MAX_SEEDS directions, then one pass per word over all of them with the sums in
 * registers (more directions: the next MAX_SEEDS continue from the stored sums, same order). */
#define DEFINE_RAD_UPDATE(SUFFIX, T, A, ACC)                                                               \
    static void rad_update_##SUFFIX(const void *vctx, int64_t u0, int64_t u1) {                            \
        const struct job *j = (const struct job *)vctx;                                                    \
        uint32_t masks[MAX_SEEDS][BATCH / 32 + 1];                                                         \
        A acc[BATCH] __attribute__((aligned(64)));                                                         \
        for (int64_t u = u0; u < u1; u++) {                                                                \
            int64_t t0 = u * BATCH, len = j->n - t0 < BATCH ? j->n - t0 : BATCH;                           \
            int64_t words = (len + 31) / 32;                                                               \
            for (int i0 = 0; i0 < j->seeds; i0 += MAX_SEEDS) {                                             \
                int count = j->seeds - i0 < MAX_SEEDS ? j->seeds - i0 : MAX_SEEDS;                         \
                __typeof__(bits_##ACC(0)) cbits[MAX_SEEDS];                                                \
                for (int i = 0; i < count; i++) {                                                          \
                    sign_masks(j->block0, j->skip + (uint64_t)t0, len, j->seed_lo[i0 + i],                 \
                               j->seed_hi[i0 + i], j->pid, j->tag, masks[i]);                              \
                    cbits[i] = bits_##ACC((A)j->scales[i0 + i]);                                           \
                }                                                                                          \
                for (int64_t m = 0; m < words; m++)                                                        \
                    accumulate_word_##ACC(acc + 32 * m, (const uint32_t (*)[BATCH / 32 + 1])masks, m, cbits, \
                                          count, i0 == 0);                                                 \
            }                                                                                              \
            if (j->seeds == 0) memset(acc, 0, sizeof(acc));                                                \
            finish_##SUFFIX((T *)j->out + t0, acc, len, (A)j->lr, (A)j->wd);                               \
        }                                                                                                  \
    }

DEFINE_RAD_UPDATE(f32, float, float, f32)
DEFINE_RAD_UPDATE(f64, double, double, f64)
DEFINE_RAD_UPDATE(bf16, uint16_t, float, f32)
DEFINE_RAD_UPDATE(f16, half_t, float, f32)

#define DEFINE_GAUSS_UPDATE(SUFFIX, T, A)                                                                  \
    static void gauss_update_##SUFFIX(const void *vctx, int64_t u0, int64_t u1) {                          \
        const struct job *j = (const struct job *)vctx;                                                    \
        float val[BATCH] __attribute__((aligned(64)));                                                     \
        A acc[BATCH] __attribute__((aligned(64)));                                                         \
        for (int64_t u = u0; u < u1; u++) {                                                                \
            int64_t t0 = u * BATCH, len = j->n - t0 < BATCH ? j->n - t0 : BATCH;                           \
            memset(acc, 0, sizeof(acc));                                                                   \
            for (int i = 0; i < j->seeds; i++) {                                                           \
                A c = (A)j->scales[i];                                                                     \
                gauss_values(j->block0, j->skip + (uint64_t)t0, len, j->seed_lo[i], j->seed_hi[i], j->pid, \
                             j->tag, val);                                                                 \
                for (int64_t t = 0; t < len; t++) acc[t] = acc[t] + c * (A)val[t];                         \
            }                                                                                              \
            finish_##SUFFIX((T *)j->out + t0, acc, len, (A)j->lr, (A)j->wd);                               \
        }                                                                                                  \
    }

DEFINE_GAUSS_UPDATE(f32, float, float)
DEFINE_GAUSS_UPDATE(f64, double, double)
DEFINE_GAUSS_UPDATE(bf16, uint16_t, float)
DEFINE_GAUSS_UPDATE(f16, half_t, float)

/* ------------------------------------------------------------------------------------ embedding */

/* Units are looked-up rows. Row `ids[r]` is elements ids[r] * D .. + D of the table's stream: the
 * tile kernel of the direction's kind on that range (its own pieces of BATCH elements), written to
 * row r of every group's output. */
static void embed_rows(const void *vctx, int64_t u0, int64_t u1) {
    const struct job *j = (const struct job *)vctx;
    for (int64_t r = u0; r < u1; r++) {
        struct job row = *j;
        uint64_t e0 = (uint64_t)j->ids[r] * (uint64_t)j->dim;
        row.base = (const char *)j->base + (int64_t)e0 * j->elsize;
        row.out = (char *)j->out + r * j->dim * j->elsize;
        row.n = j->dim;
        row.block0 = 0;
        row.skip = e0;
        j->row_fn(&row, 0, (j->dim + BATCH - 1) / BATCH);
    }
}

/* --------------------------------------------------------------------------------- entry points */

enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };

static int64_t units_of(int64_t n) { return (n + BATCH - 1) / BATCH; }

/* out[g, t] = base[t] + scales[g] * u(seeds[which[g]]) at element skip + t from block block0 */
int zo_rademacher_tiles(int dtype, const void *base, int64_t n, uint64_t block0, uint64_t skip, int seeds,
                        const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid, uint32_t tag, int groups,
                        const int32_t *which, const double *scales, void *out, int64_t ostride, int threads) {
    if (seeds > MAX_SEEDS || dtype < 0 || dtype > 3) return -1;
    struct job j = {.base = base, .out = out, .n = n, .ostride = ostride, .block0 = block0, .skip = skip,
                    .seeds = seeds, .groups = groups, .seed_lo = seed_lo, .seed_hi = seed_hi, .pid = pid, .tag = tag,
                    .which = which, .scales = scales};
    unit_fn fns[] = {rad_tiles_f32, rad_tiles_f64, rad_tiles_bf16, rad_tiles_f16};
    parallel_units(fns[dtype], &j, units_of(n), threads);
    return 0;
}

/* the same with Gaussian directions (float32 Box-Muller values made here) */
int zo_gaussian_tiles(int dtype, const void *base, int64_t n, uint64_t block0, uint64_t skip, int seeds,
                      const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid, uint32_t tag, int groups,
                      const int32_t *which, const double *scales, void *out, int64_t ostride, int threads) {
    if (dtype < 0 || dtype > 3) return -1;
    struct job j = {.base = base, .out = out, .n = n, .ostride = ostride, .block0 = block0, .skip = skip,
                    .seeds = seeds, .groups = groups, .seed_lo = seed_lo, .seed_hi = seed_hi, .pid = pid, .tag = tag,
                    .which = which, .scales = scales};
    unit_fn fns[] = {gauss_tiles_f32, gauss_tiles_f64, gauss_tiles_bf16, gauss_tiles_f16};
    parallel_units(fns[dtype], &j, units_of(n), threads);
    return 0;
}

/* float32 Gaussian values of elements [skip, skip + n) of a stream from block0, for tests */
int zo_gaussian_values(float *out, int64_t n, uint64_t block0, uint64_t skip, uint32_t seed_lo, uint32_t seed_hi,
                       uint32_t pid, uint32_t tag) {
    for (int64_t t0 = 0; t0 < n; t0 += BATCH)
        gauss_values(block0, skip + (uint64_t)t0, n - t0 < BATCH ? n - t0 : BATCH, seed_lo, seed_hi, pid, tag,
                     out + t0);
    return 0;
}

/* Box-Muller of `n` blocks whose four words are given as int64 columns (the torch reference's
 * words): out[4*i + k] is value k of block i. Lets torch's own Gaussian paths use these values. */
int zo_normals_from_words(const int64_t *w0, const int64_t *w1, const int64_t *w2, const int64_t *w3, int64_t n,
                          float *out) {
    for (int64_t i0 = 0; i0 < n; i0 += LANES) {
        int count = n - i0 < LANES ? (int)(n - i0) : LANES;
        u32v w[4] = {{0}, {0}, {0}, {0}};
        for (int i = 0; i < count; i++) {
            w[0][i] = (uint32_t)w0[i0 + i];
            w[1][i] = (uint32_t)w1[i0 + i];
            w[2][i] = (uint32_t)w2[i0 + i];
            w[3][i] = (uint32_t)w3[i0 + i];
        }
        f32v r[2] = {radius16f(w[0]), radius16f(w[2])}, c[2], sn[2];
        trig16f(w[1], &c[0], &sn[0]);
        trig16f(w[3], &c[1], &sn[1]);
        store_values16(r, c, sn, count, out + 4 * i0);
    }
    return 0;
}

/* param -= lr * (sum_i coefs[i] u_i + wd * param), in place; Rademacher from the stream */
int zo_rademacher_update(int dtype, void *param, int64_t n, uint64_t block0, uint64_t skip, int seeds,
                         const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid, uint32_t tag,
                         const double *coefs, double lr, double wd, int threads) {
    if (dtype < 0 || dtype > 3) return -1;
    struct job j = {.out = param, .n = n, .block0 = block0, .skip = skip, .seeds = seeds, .seed_lo = seed_lo,
                    .seed_hi = seed_hi, .pid = pid, .tag = tag, .scales = coefs, .lr = lr, .wd = wd};
    unit_fn fns[] = {rad_update_f32, rad_update_f64, rad_update_bf16, rad_update_f16};
    parallel_units(fns[dtype], &j, units_of(n), threads);
    return 0;
}

/* the same with Gaussian directions (float32 Box-Muller values made here) */
int zo_gaussian_update(int dtype, void *param, int64_t n, uint64_t block0, uint64_t skip, int seeds,
                       const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid, uint32_t tag,
                       const double *coefs, double lr, double wd, int threads) {
    if (dtype < 0 || dtype > 3) return -1;
    struct job j = {.out = param, .n = n, .block0 = block0, .skip = skip, .seeds = seeds, .seed_lo = seed_lo,
                    .seed_hi = seed_hi, .pid = pid, .tag = tag, .scales = coefs, .lr = lr, .wd = wd};
    unit_fn fns[] = {gauss_update_f32, gauss_update_f64, gauss_update_bf16, gauss_update_f16};
    parallel_units(fns[dtype], &j, units_of(n), threads);
    return 0;
}

static const int64_t ELEMENT_BYTES[] = {4, 8, 2, 2};

static int embedding(const unit_fn *row_fns, int dtype, const void *table, int64_t dim, const int64_t *ids,
                     int64_t rows, int seeds, const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid,
                     uint32_t tag, int groups, const int32_t *which, const double *scales, void *out, int threads) {
    if (seeds > MAX_SEEDS || dtype < 0 || dtype > 3) return -1;
    struct job j = {.base = table, .out = out, .ostride = rows * dim, .seeds = seeds, .groups = groups,
                    .seed_lo = seed_lo, .seed_hi = seed_hi, .pid = pid, .tag = tag, .which = which,
                    .scales = scales, .ids = ids, .dim = dim, .elsize = ELEMENT_BYTES[dtype],
                    .row_fn = row_fns[dtype]};
    parallel_units(embed_rows, &j, rows, threads);
    return 0;
}

/* out[g, r, :] = table[ids[r], :] + scales[g] * u(seeds[which[g]]) at the row's elements */
int zo_rademacher_embedding(int dtype, const void *table, int64_t dim, const int64_t *ids, int64_t rows, int seeds,
                            const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid, uint32_t tag,
                            int groups, const int32_t *which, const double *scales, void *out, int threads) {
    static const unit_fn fns[] = {rad_tiles_f32, rad_tiles_f64, rad_tiles_bf16, rad_tiles_f16};
    return embedding(fns, dtype, table, dim, ids, rows, seeds, seed_lo, seed_hi, pid, tag, groups, which, scales, out,
                     threads);
}

/* the same with Gaussian directions (float32 Box-Muller values made here) */
int zo_gaussian_embedding(int dtype, const void *table, int64_t dim, const int64_t *ids, int64_t rows, int seeds,
                          const uint32_t *seed_lo, const uint32_t *seed_hi, uint32_t pid, uint32_t tag, int groups,
                          const int32_t *which, const double *scales, void *out, int threads) {
    static const unit_fn fns[] = {gauss_tiles_f32, gauss_tiles_f64, gauss_tiles_bf16, gauss_tiles_f16};
    return embedding(fns, dtype, table, dim, ids, rows, seeds, seed_lo, seed_hi, pid, tag, groups, which, scales, out,
                     threads);
}
