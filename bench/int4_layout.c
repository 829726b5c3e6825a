/* An int4 matmul on a 0.5625-byte-per-weight layout, as an ONNX Runtime custom op (domain edgekit.int4,
 * op Int4Layout), to measure against MatMulNBits (bench/int4_layout.py). Not part of edgekit's runtime:
 * it answers whether the x86 memory gap can close without costing speed.
 *
 * Why: on x86, MLAS packs MatMulNBits' block-32 int4 weights for its int8 kernels at 0.75 byte per weight
 * (4-bit data, an fp32 scale and an fp32 block sum per 32 weights); KleidiAI on arm64 and llama.cpp's Q4_0
 * keep 0.5625. The block sum is -8 x scale, so it can be computed on the fly instead of stored.
 *
 * Layout (llama.cpp's repacking idea): columns in groups of 16; per (group, block of 32 along K) 256
 * bytes of nibbles, then the 16 columns' fp16 scales (32 bytes). Byte 4c + t of 64-byte word j holds
 * column c's weights 8j + t (low nibble) and 8j + 4 + t (high nibble), unsigned with zero point 8. One
 * VPDPBUSD then multiplies 4 weights of all 16 columns by the same 4 activation bytes, so every int32
 * lane is one column and each block needs a single scale multiply, loaded as a vector. The op reads the
 * weights where ONNX Runtime put the initializer (mapped from the external data file): nothing is
 * repacked at load, and the pages are file-backed.
 *
 * Activations are quantized per block of 32 to int8 with an fp32 scale, as MLAS's int8 path does.
 * Threads: ONNX Runtime's intra-op pool (KernelContext_ParallelFor). Needs AVX-512 F/BW/VL/VNNI and
 * F16C; N a multiple of 16, K of 32.
 *
 * The C API is used without its header (the onnxruntime wheel ships none): OrtApi is an append-only table
 * of function pointers, and the slots below are their positions in onnxruntime_c_api.h (checked against
 * the static_asserts of onnxruntime_c_api.cc up to version 16; ParallelFor is slot 274). */
#include <immintrin.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct OrtStatus OrtStatus;
typedef void *const *Api;
typedef struct { Api (*GetApi)(uint32_t); const char *(*GetVersionString)(void); } OrtApiBase;
enum { CreateCustomOpDomain = 26, CustomOpDomain_Add = 27, AddCustomOpDomain = 28, GetTensorMutableData = 51,
       GetDimensionsCount = 61, GetDimensions = 62, GetTensorTypeAndShape = 65, KernelInfoGetAttribute_int64 = 86,
       KernelContext_GetInput = 90, KernelContext_GetOutput = 91, ReleaseTensorTypeAndShapeInfo = 99,
       KernelContext_ParallelFor = 274 };
#define API(api, slot, type) ((type)((api)[slot]))
enum { ONNX_FLOAT = 1, ONNX_UINT8 = 2 };

/* onnxruntime_c_api.h's OrtCustomOp: a version, then 25 callbacks. */
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, Api, const void *info);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *kernel, void *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    void *CreateKernelV2, *KernelComputeV2, *InferOutputShapeFn;
    int (*GetStartVersion)(const struct OrtCustomOp *);
    int (*GetEndVersion)(const struct OrtCustomOp *);
    size_t (*GetMayInplace)(int **, int **);
    void (*ReleaseMayInplace)(int *, int *);
    size_t (*GetAliasMap)(int **, int **);
    void (*ReleaseAliasMap)(int *, int *);
} OrtCustomOp;

typedef struct { Api api; int64_t n, k; } Kernel;
typedef struct { const int8_t *aq; const int32_t *asum8; const float *as; const uint8_t *b; float *y; int m, n, blocks, groups, chunk; } Work;

/* Per row and block of 32: int8 activations, their scale, and 8 x their sum (the zero point's share). */
static void quantize(const float *a, int m, int k, int8_t *aq, int32_t *asum8, float *as) {
    int blocks = k / 32;
    for (int r = 0; r < m; r++)
        for (int kb = 0; kb < blocks; kb++) {
            const float *x = a + (size_t)r * k + kb * 32;
            size_t i = (size_t)r * blocks + kb;
            __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            as[i] = amax / 127.f;
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            _mm_storeu_si128((__m128i *)(aq + i * 32), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(aq + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
            asum8[i] = 8 * (_mm512_reduce_add_epi32(q0) + _mm512_reduce_add_epi32(q1));
        }
}

/* ROWS rows of the output for one group of 16 columns: the nibbles are unpacked once per block and used
 * by every row. */
static inline __attribute__((always_inline)) void group(int rows, const Work *w, int m0, int g) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    const uint8_t *p = w->b + (size_t)g * w->blocks * 288;
    for (int kb = 0; kb < w->blocks; kb++, p += 288) {
        __m512i nib[8];
        for (int j = 0; j < 4; j++) {
            __m512i z = _mm512_loadu_si512(p + 64 * j);
            nib[2 * j] = _mm512_and_si512(z, low);
            nib[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 256)));
        for (int r = 0; r < rows; r++) {
            size_t i = (size_t)(m0 + r) * w->blocks + kb;
            const int32_t *a4 = (const int32_t *)(w->aq + i * 32);
            __m512i d = _mm512_setzero_si512();
            for (int s = 0; s < 8; s++) d = _mm512_dpbusd_epi32(d, nib[s], _mm512_set1_epi32(a4[s]));
            d = _mm512_sub_epi32(d, _mm512_set1_epi32(w->asum8[i]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(scale, _mm512_set1_ps(w->as[i])), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(w->y + (size_t)(m0 + r) * w->n + g * 16, acc[r]);
}

static void chunk(void *data, size_t c) {
    const Work *w = data;
    int g1 = (int)(c + 1) * w->chunk < w->groups ? (int)(c + 1) * w->chunk : w->groups;
    for (int g = (int)c * w->chunk; g < g1; g++) {
        int r = 0;
        for (; r + 4 <= w->m; r += 4) group(4, w, r, g);
        for (; r + 2 <= w->m; r += 2) group(2, w, r, g);
        for (; r < w->m; r++) group(1, w, r, g);
    }
}

static void compute(void *kernel, void *context) {
    const Kernel *self = kernel;
    Api api = self->api;
    const void *a_value, *b_value;
    void *y_value, *info;
    size_t rank;
    int64_t dims[8];
    API(api, KernelContext_GetInput, OrtStatus *(*)(void *, size_t, const void **))(context, 0, &a_value);
    API(api, KernelContext_GetInput, OrtStatus *(*)(void *, size_t, const void **))(context, 1, &b_value);
    API(api, GetTensorTypeAndShape, OrtStatus *(*)(const void *, void **))(a_value, &info);
    API(api, GetDimensionsCount, OrtStatus *(*)(const void *, size_t *))(info, &rank);
    API(api, GetDimensions, OrtStatus *(*)(const void *, int64_t *, size_t))(info, dims, rank);
    API(api, ReleaseTensorTypeAndShapeInfo, void (*)(void *))(info);
    int64_t m = 1;
    for (size_t i = 0; i + 1 < rank; i++) m *= dims[i];
    dims[rank - 1] = self->n;
    API(api, KernelContext_GetOutput, OrtStatus *(*)(void *, size_t, const int64_t *, size_t, void **))(context, 0, dims, rank, &y_value);
    float *a, *y;
    uint8_t *b;
    API(api, GetTensorMutableData, OrtStatus *(*)(const void *, void **))(a_value, (void **)&a);
    API(api, GetTensorMutableData, OrtStatus *(*)(const void *, void **))(b_value, (void **)&b);
    API(api, GetTensorMutableData, OrtStatus *(*)(const void *, void **))(y_value, (void **)&y);
    if (m == 0) return;
    int k = (int)self->k, blocks = k / 32;
    int8_t *aq = malloc((size_t)m * k);
    int32_t *asum8 = malloc(sizeof(int32_t) * m * blocks);
    float *as = malloc(sizeof(float) * m * blocks);
    quantize(a, (int)m, k, aq, asum8, as);
    /* A few groups per task for one row (less scheduling per column), one per task for many rows. */
    Work w = {aq, asum8, as, b, y, (int)m, (int)self->n, blocks, (int)self->n / 16, m > 8 ? 1 : 4};
    API(api, KernelContext_ParallelFor, OrtStatus *(*)(const void *, void (*)(void *, size_t), size_t, size_t, void *))(
        context, chunk, (size_t)(w.groups + w.chunk - 1) / w.chunk, 0, &w);
    free(aq); free(asum8); free(as);
}

static void *create(const OrtCustomOp *op, Api api, const void *info) {
    (void)op;
    Kernel *self = malloc(sizeof(Kernel));
    self->api = api;
    API(api, KernelInfoGetAttribute_int64, OrtStatus *(*)(const void *, const char *, int64_t *))(info, "N", &self->n);
    API(api, KernelInfoGetAttribute_int64, OrtStatus *(*)(const void *, const char *, int64_t *))(info, "K", &self->k);
    return self;
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

static OrtCustomOp op = {20, create, name, cpu, input_type, two, output_type, one, compute, destroy, zero, zero, zero,
                         unit, unit, unit, unit, NULL, NULL, NULL, unit, int_max, no_map, release_map, no_map, release_map};

/* Called by SessionOptions.register_custom_ops_library. */
OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
    Api api = base->GetApi(22);
    void *domain;
    OrtStatus *status = API(api, CreateCustomOpDomain, OrtStatus *(*)(const char *, void **))("edgekit.int4", &domain);
    if (!status) status = API(api, CustomOpDomain_Add, OrtStatus *(*)(void *, const OrtCustomOp *))(domain, &op);
    if (!status) status = API(api, AddCustomOpDomain, OrtStatus *(*)(void *, void *))(options, domain);
    return status;
}
