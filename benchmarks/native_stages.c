/*
 * The native kernel's stages timed in C, without Python or torch in the loop: what one core does
 * on in-cache data. Built and run by benchmarks/native_stages.py with the library's own flags
 * (zo_fx/kernels/native/__init__.py), so the numbers describe the code that zo_fx loads.
 *
 * Each line: a stage, its rate (elements or values per second, one thread), and what was timed.
 */
#include "../zo_fx/kernels/native/zo_native.c"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* repeat `body` until `seconds` have passed; the rate of `per_rep` items per repetition. The clock is
 * read once per 64 repetitions: a stage of 16 values takes a few nanoseconds, less than the clock. */
#define RATE(per_rep, seconds, body)                                             \
    ({                                                                           \
        long reps_ = 0;                                                          \
        double t0_ = now(), t_;                                                  \
        do {                                                                     \
            for (int i_ = 0; i_ < 64; i_++) {                                    \
                body;                                                            \
            }                                                                    \
            reps_ += 64;                                                         \
        } while ((t_ = now()) - t0_ < (seconds));                                \
        (double)(per_rep) * (double)reps_ / (t_ - t0_);                          \
    })

static volatile float sink;

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 0.3;
    enum { G = 8 };
    uint32_t lo[G], hi[G];
    int32_t which[G];
    double scales[G];
    const int32_t mezo[2] = {0, 0}; /* MeZO's two groups on one seed */
    for (int g = 0; g < G; g++) {
        lo[g] = 7u * (uint32_t)g + 1u;
        hi[g] = 0;
        which[g] = g;
        scales[g] = 1e-3 * (g + 1);
    }
    /* Philox and Box-Muller stages on 16 blocks at a time */
    u32v w[4];
    f32v acc = {0};
    long b = 0;
    printf("philox (16 blocks per call)\t%.3f\tG words/s\n",
           RATE(64, secs, (philox16((uint64_t)(b++) * 16, 123, 0, 7, 1, w), acc += (f32v)w[0])) / 1e9);
    u32v e = LANE_LO * 2654435761u;
    /* 16 radii serve 32 values (one per pair) */
    printf("box-muller radius sqrt(-2 log u1)\t%.3f\tG values/s\n",
           RATE(32, secs, (e += 0x9E3779B9u, acc += radius16f(e))) / 1e9);
    printf("box-muller cos and sin\t%.3f\tG values/s\n", RATE(32, secs, ({
                                                                    f32v c, s;
                                                                    e += 0x9E3779B9u;
                                                                    trig16f(e, &c, &s);
                                                                    acc += c + s;
                                                                }))
                                                               / 1e9);
    float vals[BATCH] __attribute__((aligned(64)));
    printf("gaussian values (all stages)\t%.3f\tG values/s\n",
           RATE(BATCH, secs, (gauss_values((uint64_t)(b++) * 512, 0, BATCH, 123, 0, 7, 1, vals), sink += vals[5])) / 1e9);
    uint32_t masks[BATCH / 32 + 1];
    printf("rademacher sign words\t%.3f\tG signs/s\n",
           RATE(BATCH, secs, (sign_masks((uint64_t)(b++) * 16, 0, BATCH, 123, 0, 7, 1, masks), sink += (float)masks[3])) / 1e9);
    /* whole kernels on tiles of n elements, one thread */
    const int64_t sizes[] = {4096, 16384, 1 << 18};
    for (int k = 0; k < 3; k++) {
        int64_t n = sizes[k];
        float *base = aligned_alloc(64, (size_t)n * 4), *out = aligned_alloc(64, (size_t)G * n * 4);
        float *p = aligned_alloc(64, (size_t)n * 4), *q = aligned_alloc(64, (size_t)n * 4);
        uint16_t *base16 = aligned_alloc(64, (size_t)n * 2), *out16 = aligned_alloc(64, (size_t)G * n * 2);
        for (int64_t i = 0; i < n; i++) {
            base[i] = p[i] = (float)i * 1e-3f;
            base16[i] = 0x3F80;
        }
        printf("rademacher tiles f32, G=8 x %ld\t%.3f\tG elements/s\n", (long)n,
               RATE(G * n, secs, zo_rademacher_tiles(0, base, n, 0, 0, G, lo, hi, 5, 1, G, which, scales, out, n, 1)) / 1e9);
        printf("rademacher tiles bf16, G=8 x %ld\t%.3f\tG elements/s\n", (long)n,
               RATE(G * n, secs, zo_rademacher_tiles(2, base16, n, 0, 0, G, lo, hi, 5, 1, G, which, scales, out16, n, 1)) / 1e9);
        printf("gaussian tiles f32, 1 seed, 2 groups x %ld\t%.3f\tG values/s\n", (long)n,
               RATE(n, secs, zo_gaussian_tiles(0, base, n, 0, 0, 1, lo, hi, 5, 1, 2, mezo, scales, out, n, 1)) / 1e9);
        printf("rademacher update f32, K=8, %ld\t%.3f\tG elements/s\n", (long)n,
               RATE(n, secs, zo_rademacher_update(0, p, n, 0, 0, G, lo, hi, 5, 1, scales, 1e-9, 0.0, 1)) / 1e9);
        printf("memcpy of %ld f32 (for scale)\t%.3f\tG elements/s\n", (long)n, RATE(n, secs, ({
                                                                               memcpy(q, p, (size_t)n * 4);
                                                                               __asm__ volatile("" ::"r"(q) : "memory");
                                                                               sink += q[n - 1];
                                                                           }))
                                                                              / 1e9);
        free(base), free(out), free(p), free(q), free(base16), free(out16);
    }
    sink += acc[3];
    return 0;
}
