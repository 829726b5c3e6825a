/* An int4 matmul kernel on a 0.5625-byte-per-weight layout, to measure against ONNX Runtime's MatMulNBits
 * (bench/int4_layout.py). Not part of edgekit's runtime: it answers whether the x86 memory gap can close.
 *
 * Why: on x86, MLAS packs MatMulNBits' block-32 int4 weights for its int8 kernels at 0.75 byte per weight
 * (4-bit data, an fp32 scale and an fp32 block sum per 32 weights); KleidiAI on arm64 and llama.cpp's Q4_0
 * keep 0.5625. The block sum is -8 x scale, so it can be computed on the fly instead of stored.
 *
 * Layout (llama.cpp's repacking idea): columns in groups of 16; per (group, block of 32 along K) 256
 * bytes of nibbles, then the 16 columns' fp16 scales (32 bytes). Byte 4c + t of 64-byte word j holds
 * column c's weights 8j + t (low nibble) and 8j + 4 + t (high nibble), unsigned with zero point 8. One
 * VPDPBUSD then multiplies 4 weights of all 16 columns by the same 4 activation bytes, so every int32
 * lane is one column and each block needs a single scale multiply, loaded as a vector.
 *
 * Activations are quantized per block of 32 to int8 with an fp32 scale, as MLAS's int8 path does.
 * Needs AVX-512 F/BW/VL/VNNI and F16C; N a multiple of 16, K of 32. OpenMP over column groups. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static int8_t *g_aq;
static int32_t *g_asum8;
static float *g_as;
static size_t g_cap;

static int quantize_a(const float *a, int M, int K) {
    int KB = K / 32;
    size_t need = (size_t)M * KB;
    if (need > g_cap) {
        free(g_aq); free(g_asum8); free(g_as);
        g_aq = aligned_alloc(64, need * 32); g_asum8 = malloc(need * 4); g_as = malloc(need * 4);
        if (!g_aq || !g_asum8 || !g_as) { g_cap = 0; return -1; }
        g_cap = need;
    }
    for (int m = 0; m < M; m++)
        for (int kb = 0; kb < KB; kb++) {
            const float *x = a + (size_t)m * K + kb * 32;
            size_t i = (size_t)m * KB + kb;
            __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            g_as[i] = amax / 127.f;
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            _mm_store_si128((__m128i *)(g_aq + i * 32), _mm512_cvtsepi32_epi8(q0));
            _mm_store_si128((__m128i *)(g_aq + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
            /* The zero point's share of the block's dot product: 8 x the sum of the activations. */
            g_asum8[i] = 8 * (_mm512_reduce_add_epi32(q0) + _mm512_reduce_add_epi32(q1));
        }
    return 0;
}

/* MT rows of the output for one group of 16 columns: the nibbles are unpacked once per block and used
 * by every row. */
static inline __attribute__((always_inline)) void group(int MT, int m0, int g, int N, int KB, const uint8_t *b, float *y) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[4];
    for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
    const uint8_t *p = b + (size_t)g * KB * 288;
    for (int kb = 0; kb < KB; kb++, p += 288) {
        __m512i w[8];
        for (int j = 0; j < 4; j++) {
            __m512i z = _mm512_load_si512(p + 64 * j);
            w[2 * j] = _mm512_and_si512(z, low);
            w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p + 256)));
        for (int r = 0; r < MT; r++) {
            size_t i = (size_t)(m0 + r) * KB + kb;
            const int32_t *a4 = (const int32_t *)(g_aq + i * 32);
            __m512i d = _mm512_setzero_si512();
            for (int s = 0; s < 8; s++) d = _mm512_dpbusd_epi32(d, w[s], _mm512_set1_epi32(a4[s]));
            d = _mm512_sub_epi32(d, _mm512_set1_epi32(g_asum8[i]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(scale, _mm512_set1_ps(g_as[i])), acc[r]);
        }
    }
    for (int r = 0; r < MT; r++) _mm512_storeu_ps(y + (size_t)(m0 + r) * N + g * 16, acc[r]);
}

/* y[M, N] = a[M, K] x B^T with B in the layout above (64-byte aligned). Returns 0, or -1 out of memory. */
int int4_matmul(const float *a, int M, int N, int K, const uint8_t *b, float *y) {
    int KB = K / 32, G = N / 16;
    if (quantize_a(a, M, K)) return -1;
#pragma omp parallel for schedule(static)
    for (int g = 0; g < G; g++) {
        int m = 0;
        for (; m + 4 <= M; m += 4) group(4, m, g, N, KB, b, y);
        for (; m + 2 <= M; m += 2) group(2, m, g, N, KB, b, y);
        for (; m < M; m++) group(1, m, g, N, KB, b, y);
    }
    return 0;
}
