/* The routed experts of one MoE layer on the CPU, this project's own kernel (engine `native`):
 * GGUF Q4_K / Q6_K bytes read in place, float32 activations rounded to int8 per 256-block as
 * ggml's Q8_K does, integer dot products (AVX-512 VNNI, AVX2, or portable C), one pool of threads.
 *
 * Why not ggml's graph: at decode a layer reads 24 matrices of 9-14 MB once each, and what limits
 * the read rate is how the work is cut, not the arithmetic. Here every thread takes chunks of
 * contiguous rows from a shared counter (a thread the OS takes away delays one chunk, not a
 * barrier), gate and up of a row are computed together with SwiGLU and the routing weight, and
 * the down projection is cut by output rows, so no thread reduces another's partial sums.
 *
 * Phases of one call, each ending when all its chunks are done:
 *   0  round x to int8 blocks (two orders: natural for Q6_K, Q4_K's nibble order)
 *   1  h[t, s] = silu(gate_e . x_t) * (up_e . x_t) * w[t, s] for each used expert's rows
 *   2  round each h[t, s] to int8 blocks
 *   3  out[t] = sum_s down_e . h[t, s], by chunks of output rows over all used experts
 *
 * Built by hybrid_r1/cpu_kernels.py with the system compiler (-O3 -march=native; -march=haswell for
 * the AVX2 path; -DHR1_SCALAR for plain C), loaded with ctypes; the GIL is released while it runs. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#else
#define PAUSE() ((void)0)
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(HR1_SCALAR)
#define HR1_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(HR1_SCALAR)
#define HR1_AVX2 1
#endif

enum { QK = 256, T_Q4_K = 12, T_Q6_K = 14, MAX_THREADS = 512 };

typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;          /* 144 B */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K; /* 210 B */
_Static_assert(sizeof(block_q4_K) == 144, "Q4_K block");
_Static_assert(sizeof(block_q6_K) == 210, "Q6_K block");

/* One 256-block of an activation: x ~= d * q (ggml's quantize_row_q8_K rounding). */
typedef struct {
    int8_t q[256];   /* natural order (Q6_K's) */
    int8_t q4[256];  /* Q4_K's order: per 128 elements, 0-31, 64-95, 32-63, 96-127 (its nibbles) */
    int32_t s32[8];  /* sums of q over each 32: Q4_K's mins */
    int16_t s16[16]; /* sums of q over each 16: Q6_K's -32 offset */
    float d;
    float pad[15];   /* a 64-byte multiple: every block's q and q4 stay aligned for 512-bit loads */
} act_block;
_Static_assert(sizeof(act_block) % 64 == 0, "act block alignment");

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch rounds */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* ggml's quantize_row_q8_K: the signed value of largest magnitude maps to -127, round to nearest even. */
static void round_block(const float *x, act_block *a) {
    float amax = 0.f, max = 0.f;
    for (int j = 0; j < QK; j++) {
        float ax = fabsf(x[j]);
        if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (amax == 0.f) {
        memset(a, 0, sizeof *a);
        return;
    }
    const float iscale = -127.f / max;
    for (int j = 0; j < QK; j++) {
        long v = lrintf(iscale * x[j]);
        a->q[j] = (int8_t)(v > 127 ? 127 : v);
    }
    a->d = 1.f / iscale;
    for (int j = 0; j < 16; j++) {
        int s = 0;
        for (int l = 0; l < 16; l++) s += a->q[16 * j + l];
        a->s16[j] = (int16_t)s;
    }
    for (int j = 0; j < 8; j++) a->s32[j] = a->s16[2 * j] + a->s16[2 * j + 1];
    static const int src[4] = {0, 64, 32, 96};
    for (int h = 0; h < 2; h++)
        for (int p = 0; p < 4; p++) memcpy(a->q4 + 128 * h + 32 * p, a->q + 128 * h + src[p], 32);
}

/* Q4_K's 12 bytes of 6-bit scales and mins -> sc[0..7], m[0..7] (bytes 0-7 and 8-15 of out). */
static inline void q4k_scales(const uint8_t *s, uint32_t out[4]) {
    uint32_t u[3];
    memcpy(u, s, 12);
    out[0] = u[0] & 0x3f3f3f3f;
    out[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    out[2] = u[1] & 0x3f3f3f3f;
    out[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
}

#if defined(HR1_AVX512) || defined(HR1_AVX2)
static inline void prefetch_block(const uint8_t *p, int pf, int bytes) {
    if (pf)
        for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + pf + o, _MM_HINT_T0);
}

static inline float hsum256(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

/* Q6_K's offset of one block, added to accc: its stored values are q + 32, so 32 * sum_k sc_k *
 * (sum of x over sub-block k), times d (the weights' scale times the activation's) */
static inline __m256 q6k_offset(__m256 accc, __m256i sc16, const act_block *a, float d) {
    const __m256i corr = _mm256_madd_epi16(sc16, _mm256_load_si256((const __m256i *)a->s16));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(corr), _mm256_set1_ps(32.f * d), accc);
}

/* Q4_K's min term of one block, added to accm: sum_j m_j * (sum of x over sub-block j), times dmin * d_x */
static inline __m256 q4k_mins(__m256 accm, const uint32_t sm[4], const act_block *a, float dmin) {
    const __m256i mins = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sm + 2)));
    const __m256i pm = _mm256_mullo_epi32(mins, _mm256_load_si256((const __m256i *)a->s32));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_set1_ps(dmin * a->d), accm);
}
#endif

#ifdef HR1_AVX512

/* 16 int32 lanes: a in lanes 0-3, b in 4-7, c in 8-11, d in 12-15 (which scale each lane's sums take) */
static inline __m512i quads(int a, int b, int c, int d) {
    return _mm512_setr_epi32(a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d);
}

static float dot_q4_K(const uint8_t *row, const act_block *a, int nb, int pf) {
    const block_q4_K *w = (const block_q4_K *)row;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    /* lane -> scale: the sub-block of each 32-byte half of a nibble plane */
    const __m512i idx[4] = {quads(0, 0, 2, 2), quads(1, 1, 3, 3), quads(4, 4, 6, 6), quads(5, 5, 7, 7)};
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++, w++, a++) {
        prefetch_block((const uint8_t *)w, pf, 192);
        uint32_t sm[4];
        q4k_scales(w->scales, sm);
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sm));
        __m512i sumi = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            const __m512i q = _mm512_loadu_si512(w->qs + 64 * h);
            const __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            const __m512i dl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(a->q4 + 128 * h));
            const __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_load_si512(a->q4 + 128 * h + 64));
            sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(dl, _mm512_permutexvar_epi32(idx[2 * h], sc)));
            sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(dh, _mm512_permutexvar_epi32(idx[2 * h + 1], sc)));
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(f16_to_f32(w->d) * a->d), acc);
        accm = q4k_mins(accm, sm, a, f16_to_f32(w->dmin));
    }
    return _mm512_reduce_add_ps(acc) - hsum256(accm);
}

/* Q6_K's 128 elements of half h as 2 x 64 unsigned bytes (q + 32, 0-63): elements 0-63 (low
 * nibbles of ql; qh's bits 0-1, then 2-3) and 64-127 (high nibbles; bits 4-5, then 6-7) */
static inline void q6k_planes_512(const block_q6_K *w, int h, __m512i q[2]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m3 = _mm512_set1_epi8(0x03);
    /* qh's 2-bit fields for the low nibbles (shift 0 | 2) and high nibbles (4 | 6), per 256-bit half */
    const __m512i sh02 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i sh46 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    const __m512i ql = _mm512_loadu_si512(w->ql + 64 * h);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w->qh + 32 * h)));
    q[0] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sh02), m3), 4));
    q[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                           _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sh46), m3), 4));
}

static float dot_q6_K(const uint8_t *row, const act_block *a, int nb, int pf) {
    const block_q6_K *w = (const block_q6_K *)row;
    /* lane l covers elements 4l..4l+3: scale (base + l/4) */
    const __m512i idx[4] = {quads(0, 1, 2, 3), quads(4, 5, 6, 7), quads(8, 9, 10, 11), quads(12, 13, 14, 15)};
    __m512 acc = _mm512_setzero_ps();
    __m256 accc = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++, w++, a++) {
        prefetch_block((const uint8_t *)w, pf, 256);
        const __m128i s8 = _mm_loadu_si128((const __m128i *)w->scales);
        const __m512i sc = _mm512_cvtepi8_epi32(s8);
        __m512i sumi = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512i q[2];
            q6k_planes_512(w, h, q);
            const __m512i dl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], _mm512_load_si512(a->q + 128 * h));
            const __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[1], _mm512_load_si512(a->q + 128 * h + 64));
            sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(dl, _mm512_permutexvar_epi32(idx[2 * h], sc)));
            sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(dh, _mm512_permutexvar_epi32(idx[2 * h + 1], sc)));
        }
        const float d = f16_to_f32(w->d) * a->d;
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d), acc);
        accc = q6k_offset(accc, _mm256_cvtepi8_epi16(s8), a, d);
    }
    return _mm512_reduce_add_ps(acc) - hsum256(accc);
}
/* The same sums for 4 activations at once: a row's blocks are unpacked once for all of them (a
 * prefill chunk's tokens routed to one expert). Per activation, the operations and their order are
 * dot_q4_K's / dot_q6_K's, so each result is bit for bit the single-activation one. */
static void dot4_q4_K(const uint8_t *row, const act_block *const xs[4], int nb, int pf, float out[4]) {
    const block_q4_K *w = (const block_q4_K *)row;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i idx[4] = {quads(0, 0, 2, 2), quads(1, 1, 3, 3), quads(4, 4, 6, 6), quads(5, 5, 7, 7)};
    __m512 acc[4];
    __m256 accm[4];
    for (int t = 0; t < 4; t++) { acc[t] = _mm512_setzero_ps(); accm[t] = _mm256_setzero_ps(); }
    for (int i = 0; i < nb; i++, w++) {
        prefetch_block((const uint8_t *)w, pf, 192);
        uint32_t sm[4];
        q4k_scales(w->scales, sm);
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sm));
        __m512i q[4], s4[4];
        for (int h = 0; h < 2; h++) {
            const __m512i b = _mm512_loadu_si512(w->qs + 64 * h);
            q[2 * h] = _mm512_and_si512(b, m4);
            q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
            s4[2 * h] = _mm512_permutexvar_epi32(idx[2 * h], sc);
            s4[2 * h + 1] = _mm512_permutexvar_epi32(idx[2 * h + 1], sc);
        }
        const float d = f16_to_f32(w->d), dmin = f16_to_f32(w->dmin);
        for (int t = 0; t < 4; t++) {
            const act_block *a = xs[t] + i;
            __m512i sumi = _mm512_setzero_si512();
            for (int v = 0; v < 4; v++)
                sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[v], _mm512_load_si512(a->q4 + 64 * v)), s4[v]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d * a->d), acc[t]);
            accm[t] = q4k_mins(accm[t], sm, a, dmin);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = _mm512_reduce_add_ps(acc[t]) - hsum256(accm[t]);
}

static void dot4_q6_K(const uint8_t *row, const act_block *const xs[4], int nb, int pf, float out[4]) {
    const block_q6_K *w = (const block_q6_K *)row;
    const __m512i idx[4] = {quads(0, 1, 2, 3), quads(4, 5, 6, 7), quads(8, 9, 10, 11), quads(12, 13, 14, 15)};
    __m512 acc[4];
    __m256 accc[4];
    for (int t = 0; t < 4; t++) { acc[t] = _mm512_setzero_ps(); accc[t] = _mm256_setzero_ps(); }
    for (int i = 0; i < nb; i++, w++) {
        prefetch_block((const uint8_t *)w, pf, 256);
        const __m128i s8 = _mm_loadu_si128((const __m128i *)w->scales);
        const __m512i sc = _mm512_cvtepi8_epi32(s8);
        const __m256i sc16 = _mm256_cvtepi8_epi16(s8);
        __m512i q[4], s4[4];
        for (int h = 0; h < 2; h++) {
            q6k_planes_512(w, h, q + 2 * h);
            s4[2 * h] = _mm512_permutexvar_epi32(idx[2 * h], sc);
            s4[2 * h + 1] = _mm512_permutexvar_epi32(idx[2 * h + 1], sc);
        }
        const float dw = f16_to_f32(w->d);
        for (int t = 0; t < 4; t++) {
            const act_block *a = xs[t] + i;
            __m512i sumi = _mm512_setzero_si512();
            for (int v = 0; v < 4; v++)
                sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[v], _mm512_load_si512(a->q + 64 * v)), s4[v]));
            const float d = dw * a->d;
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d), acc[t]);
            accc[t] = q6k_offset(accc[t], sc16, a, d);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = _mm512_reduce_add_ps(acc[t]) - hsum256(accc[t]);
}
#define HR1_DOT4 1
#elif defined(HR1_AVX2)
/* Q6_K's 128 elements of half h as 4 x 32 unsigned bytes (q + 32, 0-63): elements 0-31, 32-63,
 * 64-95, 96-127 (their qh bits 0-1, 2-3, 4-5, 6-7) */
static inline void q6k_planes_avx2(const block_q6_K *w, int h, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
    const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
    const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4));
}
/* AVX2 (no VNNI): u8 x s8 pair sums (maddubs: at most 2 * 63 * 127, no saturation), then the
 * sub-block's scale in a 16-bit multiply-add. 32 bytes of a nibble plane are 32 elements in order. */
static float dot_q4_K(const uint8_t *row, const act_block *a, int nb, int pf) {
    const block_q4_K *w = (const block_q4_K *)row;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++, w++, a++) {
        prefetch_block((const uint8_t *)w, pf, 192);
        uint32_t sm[4];
        q4k_scales(w->scales, sm);
        const uint8_t *sc = (const uint8_t *)sm;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {  /* 64 elements: low nibbles, then high nibbles of 32 bytes */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(a->q + 64 * j)));
            const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(a->q + 64 * j + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(pl, _mm256_set1_epi16(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(ph, _mm256_set1_epi16(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(f16_to_f32(w->d) * a->d), acc);
        accm = q4k_mins(accm, sm, a, f16_to_f32(w->dmin));
    }
    return hsum256(acc) - hsum256(accm);
}

static float dot_q6_K(const uint8_t *row, const act_block *a, int nb, int pf) {
    const block_q6_K *w = (const block_q6_K *)row;
    __m256 acc = _mm256_setzero_ps(), accc = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++, w++, a++) {
        prefetch_block((const uint8_t *)w, pf, 256);
        const __m128i s8 = _mm_loadu_si128((const __m128i *)w->scales);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6k_planes_avx2(w, h, q);
            for (int g = 0; g < 4; g++) {  /* 32 elements = sub-blocks 8h + 2g and 8h + 2g + 1 */
                const int8_t *sc = w->scales + 8 * h + 2 * g;
                const __m256i p = _mm256_maddubs_epi16(q[g], _mm256_load_si256((const __m256i *)(a->q + 128 * h + 32 * g)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_set_m128i(_mm_set1_epi16(sc[1]),
                                                                                     _mm_set1_epi16(sc[0]))));
            }
        }
        const float d = f16_to_f32(w->d) * a->d;
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d), acc);
        accc = q6k_offset(accc, _mm256_cvtepi8_epi16(s8), a, d);
    }
    return hsum256(acc) - hsum256(accc);
}

/* 4 activations at once, as the AVX-512 dot4s: per activation the same operations, in order. */
static void dot4_q4_K(const uint8_t *row, const act_block *const xs[4], int nb, int pf, float out[4]) {
    const block_q4_K *w = (const block_q4_K *)row;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[4], accm[4];
    for (int t = 0; t < 4; t++) { acc[t] = _mm256_setzero_ps(); accm[t] = _mm256_setzero_ps(); }
    for (int i = 0; i < nb; i++, w++) {
        prefetch_block((const uint8_t *)w, pf, 192);
        uint32_t sm[4];
        q4k_scales(w->scales, sm);
        const uint8_t *sc = (const uint8_t *)sm;
        __m256i sumi[4];
        for (int t = 0; t < 4; t++) sumi[t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i sl = _mm256_set1_epi16(sc[2 * j]), sh = _mm256_set1_epi16(sc[2 * j + 1]);
            for (int t = 0; t < 4; t++) {
                const act_block *a = xs[t] + i;
                const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(a->q + 64 * j)));
                const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(a->q + 64 * j + 32)));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(pl, sl));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(ph, sh));
            }
        }
        const float d = f16_to_f32(w->d), dmin = f16_to_f32(w->dmin);
        for (int t = 0; t < 4; t++) {
            const act_block *a = xs[t] + i;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(d * a->d), acc[t]);
            accm[t] = q4k_mins(accm[t], sm, a, dmin);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = hsum256(acc[t]) - hsum256(accm[t]);
}

static void dot4_q6_K(const uint8_t *row, const act_block *const xs[4], int nb, int pf, float out[4]) {
    const block_q6_K *w = (const block_q6_K *)row;
    __m256 acc[4], accc[4];
    for (int t = 0; t < 4; t++) { acc[t] = _mm256_setzero_ps(); accc[t] = _mm256_setzero_ps(); }
    for (int i = 0; i < nb; i++, w++) {
        prefetch_block((const uint8_t *)w, pf, 256);
        const __m128i s8 = _mm_loadu_si128((const __m128i *)w->scales);
        const __m256i sc16 = _mm256_cvtepi8_epi16(s8);
        __m256i sumi[4];
        for (int t = 0; t < 4; t++) sumi[t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6k_planes_avx2(w, h, q);
            for (int g = 0; g < 4; g++) {
                const int8_t *sc = w->scales + 8 * h + 2 * g;
                const __m256i s2 = _mm256_set_m128i(_mm_set1_epi16(sc[1]), _mm_set1_epi16(sc[0]));
                for (int t = 0; t < 4; t++) {
                    const act_block *a = xs[t] + i;
                    const __m256i p = _mm256_maddubs_epi16(q[g], _mm256_load_si256((const __m256i *)(a->q + 128 * h + 32 * g)));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, s2));
                }
            }
        }
        const float dw = f16_to_f32(w->d);
        for (int t = 0; t < 4; t++) {
            const act_block *a = xs[t] + i;
            const float d = dw * a->d;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(d), acc[t]);
            accc[t] = q6k_offset(accc[t], sc16, a, d);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = hsum256(acc[t]) - hsum256(accc[t]);
}
#define HR1_DOT4 1
#else
/* Portable C, the same integer sums per block (the compiler vectorises what it can). */
static float dot_q4_K(const uint8_t *row, const act_block *a, int nb, int pf) {
    (void)pf;
    const block_q4_K *w = (const block_q4_K *)row;
    float sum = 0.f;
    for (int i = 0; i < nb; i++, w++, a++) {
        uint32_t sm[4];
        q4k_scales(w->scales, sm);
        const uint8_t *sc = (const uint8_t *)sm, *mn = sc + 8;
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 4; j++) {
            int32_t lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += (w->qs[32 * j + l] & 15) * a->q[64 * j + l];
                hi += (w->qs[32 * j + l] >> 4) * a->q[64 * j + 32 + l];
            }
            sumi += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
        for (int j = 0; j < 8; j++) summ += mn[j] * a->s32[j];
        sum += f16_to_f32(w->d) * a->d * (float)sumi - f16_to_f32(w->dmin) * a->d * (float)summ;
    }
    return sum;
}

static float dot_q6_K(const uint8_t *row, const act_block *a, int nb, int pf) {
    (void)pf;
    const block_q6_K *w = (const block_q6_K *)row;
    float sum = 0.f;
    for (int i = 0; i < nb; i++, w++, a++) {
        int32_t sumi = 0;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = w->ql + 64 * h, *qh = w->qh + 32 * h;
            const int8_t *sc = w->scales + 8 * h, *x = a->q + 128 * h;
            for (int l = 0; l < 32; l++) {
                const int q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                sumi += sc[l / 16] * q1 * x[l] + sc[2 + l / 16] * q2 * x[l + 32] +
                        sc[4 + l / 16] * q3 * x[l + 64] + sc[6 + l / 16] * q4 * x[l + 96];
            }
        }
        sum += f16_to_f32(w->d) * a->d * (float)sumi;
    }
    return sum;
}
#endif

typedef float (*dot_fn)(const uint8_t *, const act_block *, int, int);
typedef void (*dot4_fn)(const uint8_t *, const act_block *const[4], int, int, float[4]);

static dot_fn dot_of(int type) { return type == T_Q4_K ? dot_q4_K : type == T_Q6_K ? dot_q6_K : NULL; }

#ifndef HR1_DOT4
/* where no 4-at-once kernel is written: the single one, four times */
static void dot4_q4_K(const uint8_t *row, const act_block *const xs[4], int nb, int pf, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q4_K(row, xs[t], nb, pf);
}

static void dot4_q6_K(const uint8_t *row, const act_block *const xs[4], int nb, int pf, float out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_q6_K(row, xs[t], nb, pf);
}
#endif

static dot4_fn dot4_of(int type) { return type == T_Q4_K ? dot4_q4_K : dot4_q6_K; }

static size_t block_bytes(int type) { return type == T_Q4_K ? sizeof(block_q4_K) : sizeof(block_q6_K); }

/* ---- one call ------------------------------------------------------------------------------- */

typedef struct {
    atomic_int claimed, done;
    int n, chunk;
} phase;

typedef struct {
    const uint8_t *w[3];  /* gate, up, down: [n_experts][rows][row bytes] */
    dot_fn dot[3];
    dot4_fn dot4[3];
    size_t row[3], stride[3];  /* bytes of a row, of an expert */
    int hidden, inter, T, k, na, pf;
    const float *x, *wt;
    const uint16_t *x16;  /* x as bf16 (else x, float32) */
    float *out, *h;       /* out: float32, the caller's or (out16) a scratch the rows pass through */
    uint16_t *out16;
    act_block *xq, *hq;   /* [T][hidden/256], [T*k][inter/256] */
    const int *order;     /* the T*k slots (t*k+s) grouped by expert */
    const int *start;     /* group g: order[start[g] .. start[g+1]) */
    const int *expert;    /* group g's expert */
    phase ph[4];
} job;

enum { ROWS1 = 16, ROWS3 = 32 };  /* rows of a chunk: 16 gate+up rows (126 KB of Q4_K at 7168), 32 down rows */

/* projection m's row against n (1-4) activations; xs padded to 4 (repeats of the first). One
 * activation (decode) takes the single-row kernel, the hot path measured on its own. */
static inline void dots(const job *j, int m, const uint8_t *row, const act_block *const xs[4], int n, int nb,
                        float out[4]) {
    if (n == 1)
        out[0] = j->dot[m](row, xs[0], nb, j->pf);
    else
        j->dot4[m](row, xs, nb, j->pf, out);
}

static void phase_items(job *j, int p, int lo, int hi) {
    const int nbh = j->hidden / QK, nbi = j->inter / QK;
    if (p == 0) {  /* blocks of x */
        float tmp[QK];
        for (int i = lo; i < hi; i++) {
            const float *b = j->x + (size_t)i * QK;
            if (j->x16) {
                for (int l = 0; l < QK; l++) tmp[l] = bf16_to_f32(j->x16[(size_t)i * QK + l]);
                b = tmp;
            }
            round_block(b, j->xq + i);
        }
    } else if (p == 1) {  /* item = (group, chunk of rows) */
        const int per = (j->inter + ROWS1 - 1) / ROWS1;
        for (int i = lo; i < hi; i++) {
            const int g = i / per, r0 = (i % per) * ROWS1, r1 = r0 + ROWS1 < j->inter ? r0 + ROWS1 : j->inter;
            const size_t e = (size_t)j->expert[g];
            for (int r = r0; r < r1; r++) {
                const uint8_t *gr = j->w[0] + e * j->stride[0] + (size_t)r * j->row[0];
                const uint8_t *ur = j->w[1] + e * j->stride[1] + (size_t)r * j->row[1];
                for (int o = j->start[g]; o < j->start[g + 1]; o += 4) {
                    const int n = j->start[g + 1] - o < 4 ? j->start[g + 1] - o : 4;
                    const act_block *xs[4];
                    float gv[4], uv[4];
                    for (int q = 0; q < 4; q++) xs[q] = j->xq + (size_t)(j->order[o + (q < n ? q : 0)] / j->k) * nbh;
                    dots(j, 0, gr, xs, n, nbh, gv);
                    dots(j, 1, ur, xs, n, nbh, uv);
                    for (int q = 0; q < n; q++) {
                        const int slot = j->order[o + q];
                        j->h[(size_t)slot * j->inter + r] = gv[q] / (1.f + expf(-gv[q])) * uv[q] * j->wt[slot];
                    }
                }
            }
        }
    } else if (p == 2) {  /* blocks of h */
        for (int i = lo; i < hi; i++) round_block(j->h + (size_t)i * QK, j->hq + i);
    } else {  /* item = chunk of output rows, over every used expert */
        for (int i = lo; i < hi; i++) {
            const int r0 = i * ROWS3, r1 = r0 + ROWS3 < j->hidden ? r0 + ROWS3 : j->hidden;
            for (int t = 0; t < j->T; t++) memset(j->out + (size_t)t * j->hidden + r0, 0, sizeof(float) * (r1 - r0));
            for (int g = 0; g < j->na; g++) {
                const uint8_t *base = j->w[2] + (size_t)j->expert[g] * j->stride[2];
                for (int r = r0; r < r1; r++) {
                    const uint8_t *dr = base + (size_t)r * j->row[2];
                    for (int o = j->start[g]; o < j->start[g + 1]; o += 4) {
                        const int n = j->start[g + 1] - o < 4 ? j->start[g + 1] - o : 4;
                        const act_block *hs[4];
                        float dv[4];
                        for (int q = 0; q < 4; q++) hs[q] = j->hq + (size_t)j->order[o + (q < n ? q : 0)] * nbi;
                        dots(j, 2, dr, hs, n, nbi, dv);
                        for (int q = 0; q < n; q++)
                            j->out[(size_t)(j->order[o + q] / j->k) * j->hidden + r] += dv[q];
                    }
                }
            }
            if (j->out16)
                for (int t = 0; t < j->T; t++)
                    for (int r = r0; r < r1; r++)
                        j->out16[(size_t)t * j->hidden + r] = f32_to_bf16(j->out[(size_t)t * j->hidden + r]);
        }
    }
}

static void run_job(job *j) {
    for (int p = 0; p < 4; p++) {
        phase *ph = &j->ph[p];
        for (;;) {
            const int lo = atomic_fetch_add_explicit(&ph->claimed, ph->chunk, memory_order_relaxed);
            if (lo >= ph->n) break;
            const int hi = lo + ph->chunk < ph->n ? lo + ph->chunk : ph->n;
            phase_items(j, p, lo, hi);
            atomic_fetch_add_explicit(&ph->done, hi - lo, memory_order_release);
        }
        for (int i = 0; atomic_load_explicit(&ph->done, memory_order_acquire) < ph->n; i++) {
            PAUSE();
            if (i > 4096) sched_yield();  /* more threads than CPUs: let the one still computing run */
        }
    }
}

/* ---- the pool ------------------------------------------------------------------------------- */

typedef struct {
    int n;               /* threads, the caller included */
    long spin_ns;        /* how long an idle worker spins before it sleeps */
    atomic_uint gen;     /* bumped for each job */
    atomic_int busy;     /* workers still in the current job */
    atomic_int sleepers;
    atomic_int quit;
    job *cur;
    pthread_mutex_t call;  /* one call at a time: Python's callers and the hand-over poller share a pool */
    pthread_t th[MAX_THREADS];
    int cpu[MAX_THREADS];  /* -1: not pinned */
    /* scratch, grown as calls need */
    size_t cap_x, cap_h, cap_slots;
    act_block *xq, *hq;
    float *h, *acc;  /* acc: float32 output rows for a bf16 output */
    size_t cap_acc;
    int *order, *start, *expert, *count;
    int cap_experts;
} pool;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void wait_gen(pool *p, unsigned last) {
    const long until = now_ns() + p->spin_ns;
    for (int i = 0;; i++) {
        if (atomic_load_explicit(&p->gen, memory_order_acquire) != last) return;
        PAUSE();
        if ((i & 63) == 63 && now_ns() > until) break;
    }
    atomic_fetch_add(&p->sleepers, 1);
    while (atomic_load(&p->gen) == last) {
#ifdef __linux__
        syscall(SYS_futex, (unsigned *)&p->gen, FUTEX_WAIT_PRIVATE, last, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&p->sleepers, 1);
}

typedef struct { pool *p; int i; } worker_arg;

static void *worker(void *arg) {
    pool *p = ((worker_arg *)arg)->p;
    const int i = ((worker_arg *)arg)->i;
    free(arg);
#ifdef __linux__
    if (p->cpu[i] >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(p->cpu[i], &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
#endif
    unsigned last = 0;
    for (;;) {
        wait_gen(p, last);
        last = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (atomic_load(&p->quit)) return NULL;
        run_job(p->cur);
        atomic_fetch_sub_explicit(&p->busy, 1, memory_order_release);
    }
}

static void wake(pool *p) {
    atomic_fetch_add(&p->gen, 1);
#ifdef __linux__
    if (atomic_load(&p->sleepers)) syscall(SYS_futex, (unsigned *)&p->gen, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
#endif
}

/* The dot products this build runs: 2 AVX-512 VNNI, 1 AVX2, 0 portable C. */
int hr1_simd(void) {
#if defined(HR1_AVX512)
    return 2;
#elif defined(HR1_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* cpus: n-1 CPU numbers for the workers (the caller is not pinned), or NULL. */
void *hr1_pool_new(int n, const int *cpus, long spin_ns) {
    if (n < 1 || n > MAX_THREADS) return NULL;
    pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n;
    p->spin_ns = spin_ns;
    pthread_mutex_init(&p->call, NULL);
    for (int i = 1; i < n; i++) {
        p->cpu[i] = cpus ? cpus[i - 1] : -1;
        worker_arg *a = malloc(sizeof *a);
        if (a) {
            a->p = p;
            a->i = i;
        }
        if (!a || pthread_create(&p->th[i], NULL, worker, a) != 0) {
            free(a);
            p->n = i;  /* the threads made so far are stopped by free */
            return p;
        }
    }
    return p;
}

int hr1_pool_threads(void *pv) { return ((pool *)pv)->n; }

void hr1_pool_free(void *pv) {
    pool *p = pv;
    atomic_store(&p->quit, 1);
    wake(p);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->call);
    free(p->xq); free(p->hq); free(p->h); free(p->acc); free(p->order); free(p->start); free(p->expert); free(p->count);
    free(p);
}

static void *grow(void *old, size_t bytes) {
    free(old);
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

enum { X_BF16 = 1, OUT_BF16 = 2 };

/* out[T, hidden] = the routed experts of x[T, hidden], ids[T, k] (int64), w[T, k] (float32); x and
 * out float32, or bf16 where flags say (X_BF16, OUT_BF16: a GPU's decode buffers, no conversion pass).
 * Returns 0, or -1 for a type it does not compute, -2 for an expert id out of range, -3 out of memory. */
static int moe(pool *p, const uint8_t *gate, const uint8_t *up, const uint8_t *down, int tg, int tu, int td,
              int n_experts, int hidden, int inter, int T, int k, const void *x, const int64_t *ids,
              const float *wt, void *out, int pf, int flags) {
    const int types[3] = {tg, tu, td};
    job j;
    memset(&j, 0, sizeof j);
    for (int m = 0; m < 3; m++) {
        if (!(j.dot[m] = dot_of(types[m]))) return -1;
        j.dot4[m] = dot4_of(types[m]);
        const int ne0 = m == 2 ? inter : hidden;
        if (ne0 % QK) return -1;
        j.row[m] = (size_t)(ne0 / QK) * block_bytes(types[m]);
        j.stride[m] = j.row[m] * (size_t)(m == 2 ? hidden : inter);
    }
    if (T <= 0) return 0;
    const size_t slots = (size_t)T * (k > 0 ? k : 0);
    if (slots == 0) {  /* no experts a token: the sum over none */
        memset(out, 0, (size_t)T * hidden * (flags & OUT_BF16 ? 2 : 4));
        return 0;
    }
    for (size_t s = 0; s < slots; s++)
        if (ids[s] < 0 || ids[s] >= n_experts) return -2;
    const size_t nx = (size_t)T * (hidden / QK), nh = slots * (inter / QK);
    if (nx > p->cap_x) { p->xq = grow(p->xq, nx * sizeof(act_block)); p->cap_x = p->xq ? nx : 0; }
    if (nh > p->cap_h) {
        p->hq = grow(p->hq, nh * sizeof(act_block));
        p->h = grow(p->h, nh * QK * sizeof(float));
        p->cap_h = p->hq && p->h ? nh : 0;
    }
    if (slots > p->cap_slots) {
        p->order = grow(p->order, slots * sizeof(int));
        p->cap_slots = p->order ? slots : 0;
    }
    if (n_experts > p->cap_experts) {
        p->start = grow(p->start, (n_experts + 1) * sizeof(int));
        p->expert = grow(p->expert, n_experts * sizeof(int));
        p->count = grow(p->count, (n_experts + 1) * sizeof(int));
        p->cap_experts = p->start && p->expert && p->count ? n_experts : 0;
    }
    const size_t nout = (size_t)T * hidden;
    if ((flags & OUT_BF16) && nout > p->cap_acc) {
        p->acc = grow(p->acc, nout * sizeof(float));
        p->cap_acc = p->acc ? nout : 0;
    }
    if (!p->cap_x || !p->cap_h || !p->cap_slots || !p->cap_experts || ((flags & OUT_BF16) && !p->cap_acc)) return -3;
    /* group the slots by expert (counting sort): each used expert's rows are read once a call */
    memset(p->count, 0, (n_experts + 1) * sizeof(int));
    for (size_t s = 0; s < slots; s++) p->count[ids[s] + 1]++;
    int na = 0;
    for (int e = 0; e < n_experts; e++) {
        if (p->count[e + 1]) { p->expert[na] = e; p->start[na] = p->count[e]; na++; }
        p->count[e + 1] += p->count[e];
    }
    p->start[na] = (int)slots;
    for (size_t s = 0; s < slots; s++) p->order[p->count[ids[s]]++] = (int)s;

    j.w[0] = gate; j.w[1] = up; j.w[2] = down;
    j.hidden = hidden; j.inter = inter; j.T = T; j.k = k; j.na = na; j.pf = pf;
    j.x = flags & X_BF16 ? NULL : (const float *)x;
    j.x16 = flags & X_BF16 ? (const uint16_t *)x : NULL;
    j.out = flags & OUT_BF16 ? p->acc : (float *)out;
    j.out16 = flags & OUT_BF16 ? (uint16_t *)out : NULL;
    j.wt = wt; j.h = p->h; j.xq = p->xq; j.hq = p->hq;
    j.order = p->order; j.start = p->start; j.expert = p->expert;
    const int n = p->n;
    j.ph[0].n = (int)nx;
    j.ph[1].n = na * ((inter + ROWS1 - 1) / ROWS1);
    j.ph[2].n = (int)nh;
    j.ph[3].n = (hidden + ROWS3 - 1) / ROWS3;
    /* the weight phases claim one chunk of rows at a time (balance); the rounding phases about
     * four claims a thread */
    j.ph[1].chunk = j.ph[3].chunk = 1;
    for (int q = 0; q < 4; q += 2) j.ph[q].chunk = j.ph[q].n / (4 * n) > 1 ? j.ph[q].n / (4 * n) : 1;
    if (n > 1) {
        p->cur = &j;
        atomic_store_explicit(&p->busy, n - 1, memory_order_relaxed);
        wake(p);
    }
    run_job(&j);
    for (int i = 0; n > 1 && atomic_load_explicit(&p->busy, memory_order_acquire) > 0; i++) {
        PAUSE();
        if (i > 4096) sched_yield();
    }
    return 0;
}

int hr1_moe(void *pv, const uint8_t *gate, const uint8_t *up, const uint8_t *down, int tg, int tu, int td,
            int n_experts, int hidden, int inter, int T, int k, const void *x, const int64_t *ids,
            const float *wt, void *out, int pf, int flags) {
    pool *p = pv;
    pthread_mutex_lock(&p->call);
    const int rc = moe(p, gate, up, down, tg, tu, td, n_experts, hidden, inter, T, k, x, ids, wt, out, pf, flags);
    pthread_mutex_unlock(&p->call);
    return rc;
}

/* ---- the hand-over poller --------------------------------------------------------------------
 * A decode step replayed as one CUDA graph hands each MoE layer's routed experts to the host through
 * control words in pinned memory (hybrid_r1/handoff.py states the protocol, kernels/handoff.py is
 * the stream's side). For layers this kernel computes, this thread is the host side: it polls the
 * request word, runs the slot's call on its pinned buffers as the pool's calling thread and
 * publishes done. Why in C: with a Python worker the interpreter (and its lock) sat between the
 * GPU's request and the kernel, 70-80 us a layer on the device host. Failures answer the stream
 * (NaN output, done) and are recorded for hr1_poller_state; after one, every request gets NaN at
 * once, with no compute on a state that went wrong. */

typedef struct {
    const uint8_t *gate, *up, *down;
    int tg, tu, td, n_experts, hidden, inter, k, max_tokens, flags, pf;
    const void *x;
    const int64_t *ids;
    const float *w;
    void *out;
} hr1_slot;

enum { MAX_SLOTS = 8192 };  /* slots are not reused: a dropped one still answers NaN */
enum { F_SEQUENCE = 1, F_SLOT = 2, F_TOKENS = 3, F_KERNEL = 4 };  /* what failed (state word 4) */

typedef struct {
    pool *p;
    int64_t *ctrl;
    int w_req, w_slot, w_ntok, w_done;
    long hot_ns, idle_ns;  /* spin this long after a request, then look every idle_ns */
    pthread_mutex_t lock;  /* the slot table, against a call in flight */
    hr1_slot slot[MAX_SLOTS];
    unsigned char state[MAX_SLOTS];  /* 0 never set, 1 live, 2 dropped (its buffers still answer NaN) */
    atomic_int quit, running;
    pthread_t th;
    atomic_long requests, busy_ns, compute_ns;
    atomic_int failed;
    int64_t fail[4];  /* kind, request, slot, detail (the last done, the tokens, the kernel's code) */
} poller;

static int64_t load_acquire(const int64_t *w) { return __atomic_load_n(w, __ATOMIC_ACQUIRE); }

static void nan_fill(const hr1_slot *s) {
    const size_t n = (size_t)s->max_tokens * s->hidden;
    if (s->flags & OUT_BF16) {
        for (size_t i = 0; i < n; i++) ((uint16_t *)s->out)[i] = 0x7FC0;
    } else {
        for (size_t i = 0; i < n; i++) ((float *)s->out)[i] = NAN;
    }
}

static void serve(poller *q, int64_t req, int64_t last) {
    const int64_t index = q->ctrl[q->w_slot], n = q->ctrl[q->w_ntok];
    pthread_mutex_lock(&q->lock);
    const int st = index >= 0 && index < MAX_SLOTS ? q->state[index] : 0;
    const hr1_slot *s = st ? &q->slot[index] : NULL;
    int kind = 0;
    int64_t detail = 0;
    if (atomic_load(&q->failed)) kind = -1;  /* NaN, nothing new to record */
    else if (req != last + 1) { kind = F_SEQUENCE; detail = last; }
    else if (st != 1) kind = F_SLOT;
    else if (n < 1 || n > s->max_tokens) { kind = F_TOKENS; detail = n; }
    else {
        const long t = now_ns();
        const int rc = hr1_moe(q->p, s->gate, s->up, s->down, s->tg, s->tu, s->td, s->n_experts, s->hidden,
                               s->inter, (int)n, s->k, s->x, s->ids, s->w, s->out, s->pf, s->flags);
        atomic_fetch_add(&q->compute_ns, now_ns() - t);
        if (rc) { kind = F_KERNEL; detail = rc; }
        else atomic_fetch_add(&q->requests, 1);
    }
    if (kind > 0) {
        q->fail[0] = kind; q->fail[1] = req; q->fail[2] = index; q->fail[3] = detail;
        atomic_store_explicit(&q->failed, 1, memory_order_release);  /* after fail[]: state reads it so */
    }
    if (kind && s) nan_fill(s);
    pthread_mutex_unlock(&q->lock);
    __atomic_store_n(&q->ctrl[q->w_done], req, __ATOMIC_RELEASE);  /* after the output (x86: stores in order) */
}

static void *poll_loop(void *arg) {
    poller *q = arg;
    int64_t last = load_acquire(&q->ctrl[q->w_done]);
    long idle_since = now_ns();
    for (unsigned i = 0; !atomic_load_explicit(&q->quit, memory_order_relaxed); i++) {
        const int64_t req = load_acquire(&q->ctrl[q->w_req]);
        if (req == last) {
            PAUSE();
            if ((i & 255) == 255 && now_ns() - idle_since > q->hot_ns) {
                struct timespec ts = {0, q->idle_ns};
                nanosleep(&ts, NULL);
            }
            continue;
        }
        const long t0 = now_ns();
        serve(q, req, last);
        last = req;
        idle_since = now_ns();
        atomic_fetch_add(&q->busy_ns, idle_since - t0);
    }
    atomic_store(&q->running, 0);
    return NULL;
}

/* ctrl: the int64 control words (pinned); w_*: the offsets of the request, slot, tokens and done
 * words in it. Starts the thread; NULL if it could not. */
void *hr1_poller_new(void *pv, int64_t *ctrl, int w_req, int w_slot, int w_ntok, int w_done, long hot_ns,
                     long idle_ns) {
    poller *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->p = pv; q->ctrl = ctrl;
    q->w_req = w_req; q->w_slot = w_slot; q->w_ntok = w_ntok; q->w_done = w_done;
    q->hot_ns = hot_ns; q->idle_ns = idle_ns;
    pthread_mutex_init(&q->lock, NULL);
    atomic_store(&q->running, 1);
    if (pthread_create(&q->th, NULL, poll_loop, q) != 0) {
        pthread_mutex_destroy(&q->lock);
        free(q);
        return NULL;
    }
    return q;
}

/* Registers (s) or drops (s NULL) slot `index`; a call in flight on it finishes first. A dropped
 * slot's requests are answered NaN in its output buffer, which the caller keeps; its weights are
 * never read again. 0, or -1 for an index out of range. */
int hr1_poller_slot(void *qv, int index, const hr1_slot *s) {
    poller *q = qv;
    if (index < 0 || index >= MAX_SLOTS) return -1;
    pthread_mutex_lock(&q->lock);
    if (s) q->slot[index] = *s;
    if (s || q->state[index]) q->state[index] = s ? 1 : 2;
    pthread_mutex_unlock(&q->lock);
    return 0;
}

/* out[8]: requests served, ns busy (request seen to done), ns in the kernel, running, and the first
 * failure: kind (0 none), request, slot, detail. Takes no lock: it never waits for a call. */
void hr1_poller_state(void *qv, int64_t *out) {
    poller *q = qv;
    out[0] = atomic_load(&q->requests); out[1] = atomic_load(&q->busy_ns); out[2] = atomic_load(&q->compute_ns);
    out[3] = atomic_load(&q->running);
    const int failed = atomic_load_explicit(&q->failed, memory_order_acquire);
    for (int i = 0; i < 4; i++) out[4 + i] = failed ? q->fail[i] : 0;
}

/* Ends the thread; a call in flight finishes first. The state stays readable until hr1_poller_free. */
void hr1_poller_stop(void *qv) {
    poller *q = qv;
    if (!atomic_exchange(&q->quit, 1)) pthread_join(q->th, NULL);
}

void hr1_poller_free(void *qv) {
    poller *q = qv;
    hr1_poller_stop(q);
    pthread_mutex_destroy(&q->lock);
    free(q);
}
