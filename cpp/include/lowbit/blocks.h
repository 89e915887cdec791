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
#endif
