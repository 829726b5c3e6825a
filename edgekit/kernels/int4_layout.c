/* edgekit.int4 Int4Layout: an int4 matmul on a 0.5625-byte-per-weight layout, as an ONNX Runtime custom
 * op for x86-64 (edgekit/kernels/int4_layout.py loads it; docs/platform-facts.md says why, docs/benchmarks.md
 * has the figures).
 *
 * Why: on x86, ONNX Runtime (MLAS) packs MatMulNBits' block-32 int4 weights for its int8 kernels at 0.75
 * byte per weight (4-bit data, an fp32 scale and an fp32 block sum per 32 weights) into anonymous memory
 * at load; KleidiAI on arm64 and llama.cpp's Q4_0 keep 0.5625. The block sum is -8 x scale, so this op
 * computes it on the fly, and reads its weights where ONNX Runtime mapped them from the bundle's file:
 * nothing is packed at load, and the pages are file-backed.
 *
 * Layout (llama.cpp's repacking idea; edgekit/builder/int4_layout.py writes it): output columns in groups
 * of 16; per (group, block of 32 along K) 256 bytes of nibbles, then the 16 columns' fp16 scales (32
 * bytes). Byte 4c + t of 64-byte word j holds column c's weights 8j + t (low nibble) and 8j + 4 + t (high
 * nibble), unsigned with zero point 8. One dot-product instruction then multiplies 4 weights of every
 * column in the register by the same 4 activation bytes, so each int32 lane is one column and a block
 * needs one vector scale multiply. Activations are quantized per row and block of 32 to int8 with an
 * fp32 scale, as MLAS's int8 path does.
 *
 * Two kernels on the same layout, picked once when the library registers: AVX-512 VNNI (VPDPBUSD on 16
 * columns), and AVX2 (VPMADDUBSW, 8 columns) for CPUs without AVX-512 such as the N100. Setting
 * EDGEKIT_INT4_KERNEL=avx2 picks the AVX2 kernel anywhere (tests, benchmarks). The rest of the library
 * is plain x86-64: registering on a CPU without AVX2, FMA and F16C fails with a status saying so.
 * Threads: ONNX Runtime's intra-op pool (KernelContext_ParallelFor).
 *
 * ONNX Runtime's C API is used without its header, which the onnxruntime wheel does not ship: OrtApi is
 * an append-only table of function pointers (a slot never moves once released), and the slots below are
 * their positions in onnxruntime_c_api.h (API version 30; onnxruntime_c_api.cc's static_asserts pin the
 * early ones). The tests run every slot this file uses. */
#include <immintrin.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>

#define EXPORT __attribute__((visibility("default")))
#define AVX512_FLAGS "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma"
#define AVX2_FLAGS "avx2,fma,f16c"

typedef struct OrtStatus OrtStatus;
typedef void *const *Api;
typedef struct { Api (*GetApi)(uint32_t); const char *(*GetVersionString)(void); } OrtApiBase;
enum { CreateStatus = 0, CreateCustomOpDomain = 26, CustomOpDomain_Add = 27, AddCustomOpDomain = 28,
       GetTensorMutableData = 51, GetDimensionsCount = 61, GetDimensions = 62, GetTensorTypeAndShape = 65,
       KernelInfoGetAttribute_int64 = 86, KernelContext_GetInput = 90, KernelContext_GetOutput = 91,
       ReleaseTensorTypeAndShapeInfo = 99, KernelContext_ParallelFor = 274 };
#define API(api, slot, type) ((type)((api)[slot]))
/* The API version requested: ParallelFor's slot exists from it on; edgekit needs onnxruntime 1.31+. */
enum { API_VERSION = 22 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { ONNX_FLOAT = 1, ONNX_UINT8 = 2 };
enum { GROUP = 16, BLOCK = 32, BLOCK_BYTES = 288 };  /* 256 bytes of nibbles + 16 fp16 scales */

/* onnxruntime_c_api.h's OrtCustomOp: a version, then 25 callbacks. From version 16 on ONNX Runtime calls
 * CreateKernelV2 and KernelComputeV2, which return a status, where they are set. */
typedef struct OrtCustomOp {
    uint32_t version;
    void *CreateKernel;
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void *KernelCompute;
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, Api, const void *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, void *context);
    void *InferOutputShapeFn;
    int (*GetStartVersion)(const struct OrtCustomOp *);
    int (*GetEndVersion)(const struct OrtCustomOp *);
    size_t (*GetMayInplace)(int **, int **);
    void (*ReleaseMayInplace)(int *, int *);
    size_t (*GetAliasMap)(int **, int **);
    void (*ReleaseAliasMap)(int *, int *);
} OrtCustomOp;

typedef struct { Api api; int64_t n, k; } Kernel;
typedef struct { const int8_t *aq; const int32_t *asum8; const float *as; const uint8_t *b; float *y; int m, n, blocks, groups, chunk; } Work;

enum Isa { NONE, AVX2, AVX512_VNNI };
static enum Isa isa = NONE;

static enum Isa pick(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) return NONE;
    const char *forced = getenv("EDGEKIT_INT4_KERNEL");
    if (forced && forced[0] == 'a' && forced[1] == 'v' && forced[2] == 'x' && forced[3] == '2' && !forced[4]) return AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512vnni"))
        return AVX512_VNNI;
    return AVX2;
}

/* Per row and block of 32: int8 activations, their scale, and 8 x their sum (the zero point's share).
 * Both kernels share it, so they see the same int8 activations. */
__attribute__((target(AVX2_FLAGS)))
static void quantize(const float *a, int m, int k, int8_t *aq, int32_t *asum8, float *as) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int blocks = k / BLOCK;
    for (int r = 0; r < m; r++)
        for (int kb = 0; kb < blocks; kb++) {
            const float *x = a + (size_t)r * k + kb * BLOCK;
            size_t i = (size_t)r * blocks + kb;
            __m256 v[4];
            for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(x + 8 * j);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
            __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            as[i] = amax / 127.f;
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
            /* The packs interleave 128-bit lanes; the permute puts the 32 bytes back in order. */
            __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)(aq + i * BLOCK), _mm256_permutevar8x32_epi32(packed, order));
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            asum8[i] = 8 * _mm_cvtsi128_si32(s4);
        }
}

/* ROWS rows of the output for one group of 16 columns: the nibbles are unpacked once per block and used
 * by every row. */
__attribute__((target(AVX512_FLAGS), always_inline))
static inline void group512(int rows, const Work *w, int m0, int g) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    const uint8_t *p = w->b + (size_t)g * w->blocks * BLOCK_BYTES;
    for (int kb = 0; kb < w->blocks; kb++, p += BLOCK_BYTES) {
        __m512i nib[8];
        for (int j = 0; j < 4; j++) {
            __m512i z = _mm512_loadu_si512(p + 64 * j);
            nib[2 * j] = _mm512_and_si512(z, low);
            nib[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 256)));
        for (int r = 0; r < rows; r++) {
            size_t i = (size_t)(m0 + r) * w->blocks + kb;
            const int32_t *a4 = (const int32_t *)(w->aq + i * BLOCK);
            __m512i d = _mm512_setzero_si512();
            for (int s = 0; s < 8; s++) d = _mm512_dpbusd_epi32(d, nib[s], _mm512_set1_epi32(a4[s]));
            d = _mm512_sub_epi32(d, _mm512_set1_epi32(w->asum8[i]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(scale, _mm512_set1_ps(w->as[i])), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(w->y + (size_t)(m0 + r) * w->n + g * GROUP, acc[r]);
}

/* The same with 256-bit registers: each half of a word (8 columns) in turn. VPMADDUBSW's int16 pair sums
 * add up over the 8 products of a block without overflow (at most 15 x 128 x 16 = 30,720), so one
 * VPMADDWD per block widens them. */
__attribute__((target(AVX2_FLAGS), always_inline))
static inline void group256(int rows, const Work *w, int m0, int g) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {
        __m256 acc[4];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *p = w->b + (size_t)g * w->blocks * BLOCK_BYTES + 32 * half;
        for (int kb = 0; kb < w->blocks; kb++, p += BLOCK_BYTES) {
            __m256i nib[8];
            for (int j = 0; j < 4; j++) {
                __m256i z = _mm256_loadu_si256((const __m256i *)(p + 64 * j));
                nib[2 * j] = _mm256_and_si256(z, low);
                nib[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low);
            }
            __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p - 32 * half + 256 + 16 * half)));
            for (int r = 0; r < rows; r++) {
                size_t i = (size_t)(m0 + r) * w->blocks + kb;
                const int32_t *a4 = (const int32_t *)(w->aq + i * BLOCK);
                __m256i pairs = _mm256_maddubs_epi16(nib[0], _mm256_set1_epi32(a4[0]));
                for (int s = 1; s < 8; s++) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(nib[s], _mm256_set1_epi32(a4[s])));
                __m256i d = _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones), _mm256_set1_epi32(w->asum8[i]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(scale, _mm256_set1_ps(w->as[i])), acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) _mm256_storeu_ps(w->y + (size_t)(m0 + r) * w->n + g * GROUP + 8 * half, acc[r]);
    }
}

/* One task: a run of groups, every row. Rows go four at a time (the nibbles unpacked once serve four). */
#define CHUNK(name, group, isa_flags)                                                          \
    __attribute__((target(isa_flags))) static void name(void *data, size_t c) {                  \
        const Work *w = data;                                                                 \
        int g1 = (int)(c + 1) * w->chunk < w->groups ? (int)(c + 1) * w->chunk : w->groups;   \
        for (int g = (int)c * w->chunk; g < g1; g++) {                                        \
            int r = 0;                                                                        \
            for (; r + 4 <= w->m; r += 4) group(4, w, r, g);                                  \
            for (; r + 2 <= w->m; r += 2) group(2, w, r, g);                                  \
            for (; r < w->m; r++) group(1, w, r, g);                                          \
        }                                                                                     \
    }
CHUNK(chunk512, group512, AVX512_FLAGS)
CHUNK(chunk256, group256, AVX2_FLAGS)

static OrtStatus *fail(Api api, int code, const char *message) {
    return API(api, CreateStatus, OrtStatus *(*)(int, const char *))(code, message);
}

/* Scratch for a call's int8 activations: on the stack for decode and verify steps, else from the heap
 * (a prompt chunk's; glibc hands blocks this large back when freed). */
enum { STACK_SCRATCH = 32768 };

static OrtStatus *compute(void *kernel, void *context) {
    const Kernel *self = kernel;
    Api api = self->api;
    const void *a_value, *b_value;
    void *y_value, *info;
    size_t rank, b_rank;
    int64_t dims[8], b_dims[8];
    OrtStatus *status;
#define TRY(call) if ((status = (call)) != NULL) return status
    TRY(API(api, KernelContext_GetInput, OrtStatus *(*)(void *, size_t, const void **))(context, 0, &a_value));
    TRY(API(api, KernelContext_GetInput, OrtStatus *(*)(void *, size_t, const void **))(context, 1, &b_value));
    TRY(API(api, GetTensorTypeAndShape, OrtStatus *(*)(const void *, void **))(b_value, &info));
    API(api, GetDimensionsCount, OrtStatus *(*)(const void *, size_t *))(info, &b_rank);
    if (b_rank == 1) API(api, GetDimensions, OrtStatus *(*)(const void *, int64_t *, size_t))(info, b_dims, 1);
    API(api, ReleaseTensorTypeAndShapeInfo, void (*)(void *))(info);
    if (b_rank != 1 || b_dims[0] != self->n / GROUP * (self->k / BLOCK) * BLOCK_BYTES)
        return fail(api, ORT_INVALID_ARGUMENT, "Int4Layout: input B must be 1-D with N/16 x K/32 x 288 bytes");
    TRY(API(api, GetTensorTypeAndShape, OrtStatus *(*)(const void *, void **))(a_value, &info));
    API(api, GetDimensionsCount, OrtStatus *(*)(const void *, size_t *))(info, &rank);
    if (rank >= 1 && rank <= 8) API(api, GetDimensions, OrtStatus *(*)(const void *, int64_t *, size_t))(info, dims, rank);
    API(api, ReleaseTensorTypeAndShapeInfo, void (*)(void *))(info);
    if (rank < 1 || rank > 8 || dims[rank - 1] != self->k)
        return fail(api, ORT_INVALID_ARGUMENT, "Int4Layout: input A's last dimension must be K (rank 1 to 8)");
    int64_t m = 1;
    for (size_t i = 0; i + 1 < rank; i++) m *= dims[i];
    dims[rank - 1] = self->n;
    TRY(API(api, KernelContext_GetOutput, OrtStatus *(*)(void *, size_t, const int64_t *, size_t, void **))(context, 0, dims, rank, &y_value));
    if (m == 0) return NULL;
    float *a, *y;
    uint8_t *b;
    TRY(API(api, GetTensorMutableData, OrtStatus *(*)(const void *, void **))(a_value, (void **)&a));
    TRY(API(api, GetTensorMutableData, OrtStatus *(*)(const void *, void **))(b_value, (void **)&b));
    TRY(API(api, GetTensorMutableData, OrtStatus *(*)(const void *, void **))(y_value, (void **)&y));
#undef TRY
    int k = (int)self->k, blocks = k / BLOCK;
    size_t bytes = (size_t)m * k + (size_t)m * blocks * (sizeof(int32_t) + sizeof(float));
    _Alignas(64) unsigned char local[STACK_SCRATCH];
    unsigned char *scratch = bytes <= sizeof local ? local : malloc(bytes);
    if (!scratch) return fail(api, ORT_FAIL, "Int4Layout: out of memory for the activations");
    int8_t *aq = (int8_t *)scratch;
    int32_t *asum8 = (int32_t *)(scratch + (size_t)m * k);
    float *as = (float *)(asum8 + (size_t)m * blocks);
    quantize(a, (int)m, k, aq, asum8, as);
    /* A few groups per task for one row (less scheduling per column), one per task for many rows. */
    Work w = {aq, asum8, as, b, y, (int)m, (int)self->n, blocks, (int)self->n / GROUP, m > 8 ? 1 : 4};
    status = API(api, KernelContext_ParallelFor, OrtStatus *(*)(const void *, void (*)(void *, size_t), size_t, size_t, void *))(
        context, isa == AVX512_VNNI ? chunk512 : chunk256, (size_t)(w.groups + w.chunk - 1) / w.chunk, 0, &w);
    if (scratch != local) free(scratch);
    return status;
}

static OrtStatus *create(const OrtCustomOp *op, Api api, const void *info, void **kernel) {
    (void)op;
    int64_t n, k;
    OrtStatus *status = API(api, KernelInfoGetAttribute_int64, OrtStatus *(*)(const void *, const char *, int64_t *))(info, "N", &n);
    if (!status) status = API(api, KernelInfoGetAttribute_int64, OrtStatus *(*)(const void *, const char *, int64_t *))(info, "K", &k);
    if (status) return status;
    if (n <= 0 || n % GROUP || k <= 0 || k % BLOCK || n > INT_MAX || k > INT_MAX)
        return fail(api, ORT_INVALID_ARGUMENT, "Int4Layout: attribute N must be a positive multiple of 16 and K of 32");
    Kernel *self = malloc(sizeof(Kernel));
    if (!self) return fail(api, ORT_FAIL, "Int4Layout: out of memory");
    self->api = api;
    self->n = n;
    self->k = k;
    *kernel = self;
    return NULL;
}
static const char *name(const OrtCustomOp *op) { (void)op; return "Int4Layout"; }
static const char *cpu(const OrtCustomOp *op) { (void)op; return NULL; }
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? ONNX_FLOAT : ONNX_UINT8; }
static size_t two(const OrtCustomOp *op) { (void)op; return 2; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ONNX_FLOAT; }
static size_t one(const OrtCustomOp *op) { (void)op; return 1; }
static void destroy(void *kernel) { free(kernel); }
static int zero(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }  /* required; default memory */
static int unit(const OrtCustomOp *op) { (void)op; return 1; }
static int int_max(const OrtCustomOp *op) { (void)op; return INT_MAX; }
static size_t no_map(int **in, int **out) { *in = NULL; *out = NULL; return 0; }
static void release_map(int *in, int *out) { (void)in; (void)out; }

static OrtCustomOp op = {16, NULL, name, cpu, input_type, two, output_type, one, NULL, destroy, zero, zero, zero,
                         unit, unit, unit, unit, create, compute, NULL, unit, int_max, no_map, release_map, no_map, release_map};

/* Which kernel this CPU runs: "avx512-vnni", "avx2", or NULL where the op cannot run. */
EXPORT const char *edgekit_int4_kernel(void) {
    static const char *names[] = {NULL, "avx2", "avx512-vnni"};
    return names[pick()];
}

/* Called by SessionOptions.register_custom_ops_library. */
EXPORT OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
    Api api = base->GetApi(API_VERSION);
    if (!api) return NULL;  /* an onnxruntime older than the API version: it reports the missing op itself */
    isa = pick();
    if (isa == NONE) return fail(api, ORT_FAIL, "edgekit.int4: this CPU lacks AVX2, FMA or F16C, which the Int4Layout op needs");
    void *domain;
    OrtStatus *status = API(api, CreateCustomOpDomain, OrtStatus *(*)(const char *, void **))("edgekit.int4", &domain);
    if (!status) status = API(api, CustomOpDomain_Add, OrtStatus *(*)(void *, const OrtCustomOp *))(domain, &op);
    if (!status) status = API(api, AddCustomOpDomain, OrtStatus *(*)(void *, void *))(options, domain);
    return status;
}
