// The relative-position terms of rel_pos_attention.cpp (AVX2 and FMA): each query row's dot
// products with its gathered table rows. Included by that file only (the build hashes it too).

#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace {

// out[r][k] = sum over c of q[r][c] * table[r][c * keys8 + k] for R rows and 8 * V keys, each
// row with its own query and table: R * V independent sums, so that the FMAs overlap instead
// of waiting on one chain per row (V and R compile-time, the accumulators in registers).
template <int V, int R>
inline void relative_terms_block(const float* const* q, const float* const* table, int64_t dim, int64_t keys8,
                                 int64_t first, float* const* out) {
    __m256 a[R][V];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) a[r][v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c++)
        for (int r = 0; r < R; r++) {
            const __m256 w = _mm256_broadcast_ss(q[r] + c);
            for (int v = 0; v < V; v++)
                a[r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(table[r] + c * keys8 + first + 8 * v), a[r][v]);
        }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) _mm256_storeu_ps(out[r] + first + 8 * v, a[r][v]);
}

// The relative-position terms of six queries, out[r][k] = sum over c of q[r][c] *
// table[r][c * keys8 + k] for k < keys8 (a multiple of 8, the tables' padded rows), 32 keys
// and up to 12 accumulators at a time.
inline void relative_terms(const float* const* q, const float* const* table, int64_t dim, int64_t keys8,
                           float* const* out) {
    for (int64_t first = 0; first < keys8; first += 32) {
        switch (keys8 - first < 32 ? (keys8 - first) / 8 : 4) {
            case 1: relative_terms_block<1, 6>(q, table, dim, keys8, first, out); break;
            case 2: relative_terms_block<2, 6>(q, table, dim, keys8, first, out); break;
            case 3:
                relative_terms_block<3, 3>(q, table, dim, keys8, first, out);
                relative_terms_block<3, 3>(q + 3, table + 3, dim, keys8, first, out + 3);
                break;
            default:
                relative_terms_block<4, 3>(q, table, dim, keys8, first, out);
                relative_terms_block<4, 3>(q + 3, table + 3, dim, keys8, first, out + 3);
                break;
        }
    }
}

}  // namespace
