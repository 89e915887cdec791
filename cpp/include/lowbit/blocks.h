// Block structs of every quantized type: the one definition shared by the CPU core and cuda/.
//
// Byte layouts and formulas: spec/quant-types.md. ggml's names (block_q4_0, QK4_0, ...) are kept so a
// reader can cross-reference llama.cpp's ggml-common.h. All multi-byte fields are little-endian.
#pragma once

#include <stdint.h>

// fp16 / bf16 are carried as raw bits; conversion helpers live in types.h (host) and cuda/ (device).
typedef uint16_t lb_half;
typedef uint16_t lb_bf16;

#define QK4_0 32
// d: fp16 scale. qs[j] low nibble = element j, high nibble = element j + 16.  18 bytes.
typedef struct {
    lb_half d;
    uint8_t qs[QK4_0 / 2];
} block_q4_0;

#define QK4_1 32
// d: fp16 scale, m: fp16 minimum; same nibble layout as Q4_0.  20 bytes.
typedef struct {
    lb_half d;
    lb_half m;
    uint8_t qs[QK4_1 / 2];
} block_q4_1;

#define QK8_0 32
// d: fp16 scale, qs: 32 signed bytes.  34 bytes.
typedef struct {
    lb_half d;
    int8_t qs[QK8_0];
} block_q8_0;

#define QK_NF4 64
// bitsandbytes NF4: one fp32 absmax per 64 elements, 4-bit indices into the NF4 code book,
// packed two per byte with the FIRST element of a pair in the HIGH nibble (bitsandbytes' order,
// the opposite of ggml's).  qs[j] = q[2j] << 4 | q[2j+1].  36 bytes.
typedef struct {
    float absmax;
    uint8_t qs[QK_NF4 / 2];
} block_nf4;

#define QK5_0 32
// d: fp16 scale; qh: bit j = fifth bit of element j (j < 32); qs as Q4_0 (low nibble element j, high
// nibble element j + 16). w = (q - 16) * d.  22 bytes.
typedef struct {
    lb_half d;
    uint8_t qh[4];
    uint8_t qs[QK5_0 / 2];
} block_q5_0;

#define QK5_1 32
// d, m: fp16 scale and minimum; qh, qs as Q5_0. w = q * d + m.  24 bytes.
typedef struct {
    lb_half d;
    lb_half m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
} block_q5_1;

#define QK4_NL 32
// IQ4_NL: fp16 d; 4-bit indices into the fixed non-linear table kIQ4NLValues (int8), nibbles in Q4_0's
// order. w = d * kIQ4NLValues[q].  18 bytes.
typedef struct {
    lb_half d;
    uint8_t qs[QK4_NL / 2];
} block_iq4_nl;

// bitsandbytes FP4 (private id): same layout as NF4 (fp32 absmax per 64, first element of a pair in the
// HIGH nibble), code book bitsandbytes' get_4bit_type("fp4").  36 bytes.
#define QK_FP4 64
typedef struct {
    float absmax;
    uint8_t qs[QK_FP4 / 2];
} block_fp4;

// ---- K-quants: super-blocks of QK_K = 256 elements (spec/quant-types.md#k-quants) -----------------
#define QK_K 256
#define K_SCALE_SIZE 12

// 16 sub-blocks of 16. scales[i]: low nibble = scale, high nibble = min of sub-block i. qs: 2-bit values,
// byte l of 32-byte chunk c holds elements 128c + l + 32s in bits 2s..2s+1 (s = 0..3).
// w = d * scale * q - dmin * min.  84 bytes.
typedef struct {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    lb_half d;
    lb_half dmin;
} block_q2_K;

// 16 sub-blocks of 16 with 6-bit scales stored + 32 (low 4 bits in scales[0..7] nibbles, high 2 bits in
// scales[8..11]); qs low 2 bits as Q2_K; hmask: high bit (bit set = no -4 offset).
// w = d * (scale - 32) * (q - (hbit ? 0 : 4)).  110 bytes.
typedef struct {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    lb_half d;
} block_q3_K;

// 8 sub-blocks of 32 with 6-bit scale and 6-bit min packed in scales[12] (get_scale_min_k4); in each
// 32-byte chunk of qs the low nibbles hold 32 elements and the high nibbles the next 32.
// w = d * scale * q - dmin * min.  144 bytes.
typedef struct {
    lb_half d;
    lb_half dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
} block_q4_K;

// As Q4_K plus qh: bit (2c + h) of qh[l] is the fifth bit of element 64c + 32h + l.  176 bytes.
typedef struct {
    lb_half d;
    lb_half dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K;

// 16 sub-blocks of 16 with int8 scales; q = (4 low bits from ql | 2 high bits from qh << 4) - 32.
// w = d * scale * q.  210 bytes.
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    lb_half d;
} block_q6_K;

// Activation-side K block (llama.cpp's intermediate for K-quant dot products; never in files lowbit
// writes): float d, 256 int8, and the sums of each 16 of them.  292 bytes.
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K;

// IQ4_XS: 8 sub-blocks of 32 with 6-bit scales stored + 32 (low 4 bits in scales_l nibbles, high 2 bits
// in scales_h), values from the IQ4_NL table, nibbles per 32-element sub-block in Q4_0's order.
// w = d * (scale - 32) * kIQ4NLValues[q].  136 bytes.
typedef struct {
    lb_half d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
} block_iq4_xs;

// Activation blocks used only at run time (never written to files).
// Q8_0-style with an fp32 scale and the block sum (for Q4_1's minimum term): 40 bytes.
typedef struct {
    float d;         // scale
    float s;         // d * sum(qs)
    int8_t qs[32];
} block_q8_act;

#ifdef __cplusplus
static_assert(sizeof(block_q4_0) == 18, "wrong q4_0 block size/padding");
static_assert(sizeof(block_q4_1) == 20, "wrong q4_1 block size/padding");
static_assert(sizeof(block_q8_0) == 34, "wrong q8_0 block size/padding");
static_assert(sizeof(block_nf4) == 36, "wrong nf4 block size/padding");
static_assert(sizeof(block_q8_act) == 40, "wrong q8_act block size/padding");
static_assert(sizeof(block_q5_0) == 22, "wrong q5_0 block size/padding");
static_assert(sizeof(block_q5_1) == 24, "wrong q5_1 block size/padding");
static_assert(sizeof(block_iq4_nl) == 18, "wrong iq4_nl block size/padding");
static_assert(sizeof(block_fp4) == 36, "wrong fp4 block size/padding");
static_assert(sizeof(block_q2_K) == 84, "wrong q2_K block size/padding");
static_assert(sizeof(block_q3_K) == 110, "wrong q3_K block size/padding");
static_assert(sizeof(block_q4_K) == 144, "wrong q4_K block size/padding");
static_assert(sizeof(block_q5_K) == 176, "wrong q5_K block size/padding");
static_assert(sizeof(block_q6_K) == 210, "wrong q6_K block size/padding");
static_assert(sizeof(block_q8_K) == 292, "wrong q8_K block size/padding");
static_assert(sizeof(block_iq4_xs) == 136, "wrong iq4_xs block size/padding");
#endif
