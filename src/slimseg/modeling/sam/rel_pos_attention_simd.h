// Vector helpers of rel_pos_attention.cpp (AVX2 and FMA): the exponential, horizontal
// reductions and 8 x 8 transposes. Included by that file only, which slimseg compiles as one
// unit (the build hashes it and its headers).

#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace {

// e^(x - m) for logits x no larger than m. As 2^t with t = (x - m) log2(e) = n + f, |f| <= 1/2:
// 2^f by Cephes' exp2f polynomial, 2^n through the exponent bits. t's rounding grows with
// |t|, but only for weights below e^-1 of the largest, whose share of the softmax shrinks
// faster (below 1e-7 of it). The clamp keeps 2^n a normal float.
inline __m256 exp_below_max(__m256 x, __m256 m_log2e) {
    __m256 t = _mm256_fmsub_ps(x, _mm256_set1_ps(1.44269504088896341f), m_log2e);
    t = _mm256_max_ps(t, _mm256_set1_ps(-126.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 y = _mm256_set1_ps(1.535336188319500e-4f);
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.339887440266574e-3f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.618437357674640e-3f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.550332471162809e-2f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.402264791363012e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.931472028550421e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

inline float horizontal_sum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float horizontal_max(__m256 a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// The lane sums of a[0..8) as one vector: element i is the sum of a[i]'s eight lanes.
inline __m256 horizontal_sums8(const __m256* a) {
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    // s0123 holds a[0..4)'s partial sums, its low 128 bits from their low lanes, its high from
    // their high lanes; s4567 the same for a[4..8): pair the halves up and add them
    const __m256 low = _mm256_permute2f128_ps(s0123, s4567, 0x20), high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(low, high);
}

// GCC folds a vector that several FMAs read into each FMA as a memory operand, which makes
// the loops bound by loads; an empty asm pins it to a register.
#define KEEP_IN_REGISTER(x) __asm__("" : "+x"(x))

// dst[c * dst_stride + i] = rows[i][c] for i, c < 8: eight rows of eight channels transposed.
inline void transpose8(const float* const* rows, int64_t channel, float* dst, int64_t dst_stride) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows[i] + channel);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

// dst[c * dst_stride + i] = rows[i][c] for i < count (at most 8) and c < dim: 8 x 8 blocks
// where 8 rows and 8 channels are there (the last block of channels overlapping the one
// before when dim is not a multiple of 8), else one by one.
inline void transpose_rows(const float* const* rows, int count, int64_t dim, float* dst, int64_t dst_stride) {
    if (count == 8 && dim >= 8) {
        for (int64_t c = 0; c < dim; c += 8) {
            const int64_t first = c + 8 <= dim ? c : dim - 8;
            transpose8(rows, first, dst + first * dst_stride, dst_stride);
        }
        return;
    }
    for (int i = 0; i < count; i++)
        for (int64_t c = 0; c < dim; c++) dst[c * dst_stride + i] = rows[i][c];
}

}  // namespace
