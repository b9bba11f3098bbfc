/* mixprec's CPU kernels: one pass of Adam(W) from half gradients, and the overflow check.

   Built at first use by mixprec/core/native.py with -ffp-contract=off: every rounding is the
   one written here. The Adam(W) arithmetic is that of torch's fused CPU kernel as its wheels
   compute it (an FMA exactly where theirs has one); mixprec checks that bit for bit against
   torch's kernel in each configuration before using it (mixprec/engine/native_adam.py).
*/
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_MXCSR 1
#endif

typedef struct {
    float c1;       /* 1 - beta1 */
    float b2;       /* beta2 */
    float c2;       /* 1 - beta2 */
    float bc2s;     /* sqrt(1 - beta2 ** step) */
    float eps;
    float neg_step; /* -lr / (1 - beta1 ** step) */
    float c7;       /* AdamW: 1 - lr * weight_decay; else 1 */
    float wd;       /* Adam: weight_decay (L2, added to the gradient) */
    float scale;    /* the gradients are divided by it when has_scale */
    float sign;     /* -1 to maximize, else 1 */
    int32_t l2, amsgrad, has_scale, zero_grad;
    uint32_t mxcsr; /* the calling thread's floating-point mode, for worker threads */
} adam_args;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's copy_ */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint16_t r = (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0xffff : r;
}

static inline uint32_t f32_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

static inline float bits_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* One element's update: returns the new master; m, v and mx are updated in place. */
static inline __attribute__((always_inline)) float adam_element(
    float p, float g, float *m, float *v, float *mx, const adam_args *a, const int l2,
    const int ams, const int hs) {
    if (hs) g = g / a->scale;
    g = g * a->sign;
    if (l2) g = fmaf(p, a->wd, g);
    p = p * a->c7;
    float mi = *m;
    float e = fmaf(a->c1, g - mi, mi);
    float s = fmaf(a->c2 * g, g, *v * a->b2);
    *m = e;
    *v = s;
    float d;
    if (ams) {
        float o = *mx;
        float x = (o != o || o > s) ? o : s;
        *mx = x;
        d = sqrtf(x) / a->bc2s + a->eps;
    } else {
        d = sqrtf(s) / a->bc2s + a->eps;
    }
    return p + a->neg_step * e / d;
}

#define DISPATCH(impl, ...)                                                                  \
    do {                                                                                     \
        switch ((a->l2 << 3) | (a->amsgrad << 2) | (a->has_scale << 1) | a->zero_grad) {     \
        case 0: impl(__VA_ARGS__, 0, 0, 0, 0); break;                                         \
        case 1: impl(__VA_ARGS__, 0, 0, 0, 1); break;                                         \
        case 2: impl(__VA_ARGS__, 0, 0, 1, 0); break;                                         \
        case 3: impl(__VA_ARGS__, 0, 0, 1, 1); break;                                         \
        case 4: impl(__VA_ARGS__, 0, 1, 0, 0); break;                                         \
        case 5: impl(__VA_ARGS__, 0, 1, 0, 1); break;                                         \
        case 6: impl(__VA_ARGS__, 0, 1, 1, 0); break;                                         \
        case 7: impl(__VA_ARGS__, 0, 1, 1, 1); break;                                         \
        case 8: impl(__VA_ARGS__, 1, 0, 0, 0); break;                                         \
        case 9: impl(__VA_ARGS__, 1, 0, 0, 1); break;                                         \
        case 10: impl(__VA_ARGS__, 1, 0, 1, 0); break;                                        \
        case 11: impl(__VA_ARGS__, 1, 0, 1, 1); break;                                        \
        case 12: impl(__VA_ARGS__, 1, 1, 0, 0); break;                                        \
        case 13: impl(__VA_ARGS__, 1, 1, 0, 1); break;                                        \
        case 14: impl(__VA_ARGS__, 1, 1, 1, 0); break;                                        \
        default: impl(__VA_ARGS__, 1, 1, 1, 1); break;                                        \
        }                                                                                    \
    } while (0)

#ifdef HAVE_MXCSR
#define ENTER(a)                                                                             \
    const unsigned int saved_mxcsr = _mm_getcsr();                                           \
    _mm_setcsr((a)->mxcsr)
#define LEAVE() _mm_setcsr(saved_mxcsr)
#else
#define ENTER(a) (void)(a)
#define LEAVE() (void)0
#endif

/* Every loop asks for its data AHEAD elements before it reaches them (4 KiB ahead in an fp32
   array, 2 KiB in a 16-bit one): one core's hardware prefetchers leave its streaming bandwidth
   bound by memory latency, on a Xeon most of all (benchmarks/RESULTS.md measures the step with
   and without). Lines the step rewrites are fetched for writing. A prefetch is only a hint: one
   past the end of an array never faults. */
#define AHEAD 1024
#define FETCH_R(p) __builtin_prefetch((p), 0, 3)
#define FETCH_W(p) __builtin_prefetch((p), 1, 3)
#define FETCH_F32(p, k) (FETCH_W((p) + (k)), FETCH_W((p) + (k) + 16)) /* 32 floats: 2 lines */

/* Over [0, n) in blocks of 32 (one 64-byte line of each 16-bit array): FETCH(k) prefetches
   the block at element k, STEP(i, out) updates element i and sets `out` to its half weight.
   With `stream` (a large call) the half weights go past the cache in 64-byte stores: they are
   only written, and a plain store would first read each line for ownership (2 bytes a
   parameter more traffic). A small call keeps them in cache for the next forward. */
#define STREAM_MIN ((int64_t)1 << 19)
#ifdef __AVX512F__
#define STREAMED_BLOCKS(T, FETCH, STEP, ...)                                                 \
    if (stream) {                                                                            \
        for (; i < n && ((uintptr_t)(half + i) & 63); i++) STEP(i, half[i], __VA_ARGS__);    \
        for (; i + 32 <= n; i += 32) {                                                       \
            T buf[32] __attribute__((aligned(64)));                                          \
            FETCH(i + AHEAD);                                                                \
            for (int j = 0; j < 32; j++) STEP(i + j, buf[j], __VA_ARGS__);                   \
            _mm512_stream_si512((__m512i *)(half + i), _mm512_load_si512((const void *)buf)); \
        }                                                                                    \
        _mm_sfence();                                                                        \
    }
#else
#define STREAMED_BLOCKS(T, FETCH, STEP, ...) (void)stream;
#endif
#define STREAMED_LOOP(T, FETCH, STEP, ...)                                                   \
    int64_t i = 0;                                                                           \
    STREAMED_BLOCKS(T, FETCH, STEP, __VA_ARGS__)                                             \
    for (; i + 32 <= n; i += 32) {                                                           \
        FETCH(i + AHEAD);                                                                    \
        FETCH_W(half + i + AHEAD);                                                           \
        for (int j = 0; j < 32; j++) STEP(i + j, half[i + j], __VA_ARGS__);                  \
    }                                                                                        \
    for (; i < n; i++) STEP(i, half[i], __VA_ARGS__)

/* Over [0, n) in blocks of 32: FETCH(k) prefetches the block at element k, STEP(i) steps
   element i */
#define BLOCKED_LOOP(FETCH, STEP)                                                            \
    int64_t i = 0;                                                                           \
    for (; i + 32 <= n; i += 32) {                                                           \
        FETCH(i + AHEAD);                                                                    \
        for (int64_t j = i; j < i + 32; j++) STEP(j);                                        \
    }                                                                                        \
    for (; i < n; i++) STEP(i)

/* The 16-bit gradients of the block at element k: written too when they are zeroed */
#define FETCH_GRAD(k)                                                                        \
    do {                                                                                     \
        if (zg) FETCH_W(grad + (k));                                                         \
        else FETCH_R(grad + (k));                                                            \
    } while (0)

/* The moments of the block at element k, and the max of their squares with amsgrad */
#define FETCH_MOMENTS(k)                                                                     \
    do {                                                                                     \
        FETCH_F32(m, k);                                                                     \
        FETCH_F32(v, k);                                                                     \
        if (ams) FETCH_F32(mx, k);                                                           \
    } while (0)

static inline float f16_to_f32(_Float16 h) { return (float)h; }
static inline _Float16 f32_to_f16(float f) { return (_Float16)f; } /* round to nearest even */

/* One element of a half model: the gradient read (and zeroed), the master stepped, `out`
   set to the new half weight. */
#define HALF_STEP(i, out, TO_F32, FROM_F32)                                                  \
    do {                                                                                     \
        float g = TO_F32(grad[i]);                                                           \
        if (zg) grad[i] = 0;                                                                 \
        float p = adam_element(master[i], g, m + (i), v + (i), mx + (i), a, l2, ams, hs);    \
        master[i] = p;                                                                       \
        out = FROM_F32(p);                                                                   \
    } while (0)

#define HALF_FETCH(k)                                                                        \
    do {                                                                                     \
        FETCH_GRAD(k);                                                                       \
        FETCH_F32(master, k);                                                                \
        FETCH_MOMENTS(k);                                                                    \
    } while (0)

/* adam_<NAME>_impl: fp32 masters, gradients and weights of the half type T */
#define HALF_KERNEL(NAME, T, TO_F32, FROM_F32)                                               \
    static inline __attribute__((always_inline)) void adam_##NAME##_impl(                    \
        float *restrict master, T *restrict grad, float *restrict m, float *restrict v,      \
        float *restrict mx, T *restrict half, int64_t n, int stream, const adam_args *a,    \
        const int l2, const int ams, const int hs, const int zg) {                           \
        STREAMED_LOOP(T, HALF_FETCH, HALF_STEP, TO_F32, FROM_F32);                           \
    }

HALF_KERNEL(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
HALF_KERNEL(f16, _Float16, f16_to_f32, f32_to_f16)

/* split masters (mixprec/core/split.py): the bf16 weight and its int16 remainder */
static inline void store_split(float p, uint16_t *high, int16_t *low) {
    uint16_t h = f32_to_bf16(p);
    int32_t r = (int32_t)(f32_bits(p) - ((uint32_t)h << 16));
    *high = h;
    *low = (int16_t)(r > 32767 ? 32767 : r); /* the upper tie of an even high: one ulp down */
}

void mixprec_split(const float *restrict master, uint16_t *restrict high,
                   int16_t *restrict low, int64_t n) {
    for (int64_t i = 0; i < n; i++) store_split(master[i], high + i, low + i);
}

/* One element of split masters: the weight and its low bits read, stepped and written back */
#define SPLIT_STEP(i)                                                                        \
    do {                                                                                     \
        float master = bits_f32(((uint32_t)high[i] << 16) + (uint32_t)(int32_t)low[i]);       \
        float g = bf16_to_f32(grad[i]);                                                      \
        if (zg) grad[i] = 0;                                                                 \
        float p = adam_element(master, g, m + (i), v + (i), mx + (i), a, l2, ams, hs);       \
        store_split(p, high + (i), low + (i));                                               \
    } while (0)

#define SPLIT_FETCH(k)                                                                       \
    do {                                                                                     \
        FETCH_W(high + (k));                                                                 \
        FETCH_W(low + (k));                                                                  \
        FETCH_GRAD(k);                                                                       \
        FETCH_MOMENTS(k);                                                                    \
    } while (0)

static inline __attribute__((always_inline)) void adam_split_impl(
    uint16_t *restrict high, int16_t *restrict low, uint16_t *restrict grad, float *restrict m,
    float *restrict v, float *restrict mx, int64_t n, const adam_args *a, const int l2,
    const int ams, const int hs, const int zg) {
    BLOCKED_LOOP(SPLIT_FETCH, SPLIT_STEP);
}

/* fp32 weights (the norm layers a half model keeps in fp32): fp32 gradients, the master
   stepped and copied into the weight (`weight` NULL: the weight is the master) */
#define F32_STEP(i)                                                                          \
    do {                                                                                     \
        float g = grad[i];                                                                   \
        if (zg) grad[i] = 0;                                                                 \
        float p = adam_element(master[i], g, m + (i), v + (i), mx + (i), a, l2, ams, hs);    \
        master[i] = p;                                                                       \
        if (weight) weight[i] = p;                                                           \
    } while (0)

#define F32_FETCH(k)                                                                         \
    do {                                                                                     \
        FETCH_F32(grad, k);                                                                  \
        FETCH_F32(master, k);                                                                \
        if (weight) FETCH_F32(weight, k);                                                    \
        FETCH_MOMENTS(k);                                                                    \
    } while (0)

static inline __attribute__((always_inline)) void adam_f32_impl(
    float *restrict master, float *restrict grad, float *restrict m, float *restrict v,
    float *restrict mx, float *restrict weight, int64_t n, const adam_args *a, const int l2,
    const int ams, const int hs, const int zg) {
    BLOCKED_LOOP(F32_FETCH, F32_STEP);
}

/* One tensor's share of a step: its elements [0, n). */
typedef struct {
    void *master; /* the fp32 master; split masters: the bf16 weight */
    void *grad;   /* the half gradient */
    float *m, *v, *mx;
    void *half;   /* the half weight; split masters: the int16 low bits */
    int64_t n;
    int32_t kind; /* 0: bf16, 1: fp16, 2: split, 3: fp32 (half: the weight, or NULL) */
    int32_t args; /* which of the call's adam_args */
} adam_piece;

/* Adam(W) over elements [start, stop) of the pieces laid end to end: a call steps every
   tensor of an optimizer step, or one thread's share of them. */
void mixprec_adam(const adam_piece *pieces, int64_t count, const adam_args *args,
                  int64_t start, int64_t stop) {
    const int stream = stop - start >= STREAM_MIN;
    int64_t offset = 0;
    for (int64_t k = 0; k < count && offset < stop; offset += pieces[k].n, k++) {
        const adam_piece *p = pieces + k;
        const int64_t lo = start > offset ? start - offset : 0;
        const int64_t hi = stop - offset < p->n ? stop - offset : p->n;
        if (lo >= hi) continue;
        const adam_args *a = args + p->args;
        const int64_t n = hi - lo;
        float *m = p->m + lo, *v = p->v + lo, *mx = p->mx + lo;
        ENTER(a);
        if (p->kind == 0) {
            DISPATCH(adam_bf16_impl, (float *)p->master + lo, (uint16_t *)p->grad + lo, m, v, mx,
                     (uint16_t *)p->half + lo, n, stream, a);
        } else if (p->kind == 1) {
            DISPATCH(adam_f16_impl, (float *)p->master + lo, (_Float16 *)p->grad + lo, m, v, mx,
                     (_Float16 *)p->half + lo, n, stream, a);
        } else if (p->kind == 3) {
            DISPATCH(adam_f32_impl, (float *)p->master + lo, (float *)p->grad + lo, m, v, mx,
                     p->half ? (float *)p->half + lo : NULL, n, a);
        } else {
            DISPATCH(adam_split_impl, (uint16_t *)p->master + lo, (int16_t *)p->half + lo,
                     (uint16_t *)p->grad + lo, m, v, mx, n, a);
        }
        LEAVE();
    }
}

/* any = whether some y[i] over [0, n[k]) has all of e's bits set: in 64-byte lines of W
   values, one flag a lane (a vector OR, no reduction a line), prefetching 4 KiB (`ahead`
   values) ahead */
#define NONFINITE_LOOP(T, W, ahead)                                                          \
    T lane[W] = {0};                                                                         \
    int64_t i = 0;                                                                           \
    for (; i + (W) <= n[k]; i += (W)) {                                                      \
        FETCH_R(y + i + (ahead));                                                            \
        for (int j = 0; j < (W); j++) lane[j] |= (T)((y[i + j] & e) == e);                   \
    }                                                                                        \
    T any = 0;                                                                               \
    for (int j = 0; j < (W); j++) any |= lane[j];                                            \
    for (; i < n[k]; i++) any |= (T)((y[i] & e) == e)

/* 1 if any of the count tensors holds an inf or nan (its exponent bits all set), else 0:
   tensor k is n[k] values at x[k], fp32 if exponent[k] is 0x7f800000, else 16-bit ones
   whose exponent bits are exponent[k]. */
int32_t mixprec_nonfinite(const void *const *x, const int64_t *n, const uint32_t *exponent,
                          int64_t count) {
    for (int64_t k = 0; k < count; k++) {
        if (exponent[k] == 0x7f800000u) {
            const uint32_t *y = (const uint32_t *)x[k], e = 0x7f800000u;
            NONFINITE_LOOP(uint32_t, 16, AHEAD);
            if (any) return 1;
        } else {
            const uint16_t *y = (const uint16_t *)x[k], e = (uint16_t)exponent[k];
            NONFINITE_LOOP(uint16_t, 32, 2 * AHEAD);
            if (any) return 1;
        }
    }
    return 0;
}

/* 1 if the gradient of any of the count pieces (a step's table, see mixprec_adam) holds an
   inf or nan, else 0: the check of a step whose every gradient element the table holds. */
int32_t mixprec_nonfinite_pieces(const adam_piece *pieces, int64_t count) {
    for (int64_t k = 0; k < count; k++) {
        const void *x[1] = {pieces[k].grad};
        const int64_t n[1] = {pieces[k].n};
        const int32_t kind = pieces[k].kind;
        const uint32_t exponent[1] = {kind == 3 ? 0x7f800000u : kind == 1 ? 0x7c00u : 0x7f80u};
        if (mixprec_nonfinite(x, n, exponent, 1)) return 1;
    }
    return 0;
}

/* Each of the count fp32 step counters plus one, as torch's _foreach_add_ adds (one call,
   not a dispatched op per counter). */
void mixprec_count_steps(float *const *steps, int64_t count) {
    for (int64_t k = 0; k < count; k++) *steps[k] += 1.0f;
}

uint32_t mixprec_mxcsr(void) {
#ifdef HAVE_MXCSR
    return _mm_getcsr();
#else
    return 0;
#endif
}
