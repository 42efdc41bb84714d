// softmax(scale * q.k + rel_h[i, row(j)] + rel_w[i, col(j)]) . v on x86-64 with AVX2 and FMA.
//
// SAM's image encoder adds a decomposed relative-position bias to every attention logit.
// torch's fused CPU attention can only read that bias from memory, so it has to be built
// first (805 MB per global block of SAM-B, 12 heads x 4096 x 4096 floats) and streamed
// through the kernel. Here each query row's two small factors are computed from q and the
// gathered tables, the bias of a key block is formed from them as the logits are computed,
// and the keys are consumed in blocks with an online softmax, four groups of six query rows
// taking turns on each block, so the working set stays in the first- and second-level
// caches. slimseg compiles this file on first use (slimseg/modeling/sam/native_attention.py)
// and calls it through ctypes.
//
// The tokens form a grid_h x grid_w grid per image, attended in height x width windows (one
// window covering the grid for global attention). Windows that run past the grid's edge
// hold padding tokens, as SAM's window partition pads with zeros before the q, k and v
// projections: their keys and values are the projections' biases (k_pad, v_pad: (heads, dim)
// and (heads, vdim)), and their queries, whose results SAM drops, are not computed.
// Layouts, in floats; an "item" is one (batch, window, head), item = (batch * windows + window)
// * heads + head, windows numbered row by row; token n of a window is its row n / width,
// column n % width:
//   q:      element (batch, head, grid row y, grid column x, c) at batch * q.batch
//           + head * q.head + y * q.y + x * q.x + c
//   k, v, out: the same with their own strides
//   table_h: (height, dim, height8), element (query row, channel, key row): the
//            relative-position embedding of that offset (gathered as slimseg.modeling.sam.rel_pos
//            does), key rows zero-padded to height8 = height rounded up to 8, and
//   table_w: (width, dim, width8) the same for columns; rel_h[i, r] = q_i . table_h[row(i), :, r]
// Each thread repacks the keys and values of the item it works on into its own scratch
// (pack_item): packed by the thread that reads them, they are in its own caches, where keys
// packed beforehand by torch's threads had first to be fetched from the other core's.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "rel_pos_attention_simd.h"
#include "rel_pos_attention_terms.h"

namespace {

constexpr int kRows = 6;         // query rows per register block: 12 of the 16 vector registers
constexpr int64_t kKeys = 256;   // keys per softmax block: six rows of logits fill 6 KB
// Groups of kRows query rows that take turns on each block of keys and values while it is in
// the cache: SAM-B's keys and values (2 MB per head) would otherwise stream from the shared
// last-level cache once per group (SAM-B global blocks 1.1-1.2x, SlimSAM-77's 1.1x on 2 cores).
constexpr int kGroups = 4;

// A (batch, head, grid row, grid column, channel) tensor: its data and strides in floats.
struct Grid {
    float* data;
    int64_t batch, head, y, x;
};

struct Problem {
    Grid q, k, v, out;
    const float* table_h; const float* table_w; const float* k_pad; const float* v_pad;
    int64_t heads, height, width, dim, vdim;
    int64_t grid_h, grid_w, window_rows, window_cols;  // windows per grid column and row
    float scale;
    int64_t keys_padded;  // height * width rounded up to 16
    // keys_padded + 16: the spacing of value rows and of logit rows, which 16 KB apart would
    // share first-level cache sets
    int64_t row_stride;
};

// Where an item's window lies: its image and head, and the grid position of its first token.
struct Item {
    int64_t batch, head, y0, x0;
};

Item locate(const Problem& p, int64_t item) {
    const int64_t windows = p.window_rows * p.window_cols;
    const int64_t window = item / p.heads % windows;
    return {item / p.heads / windows, item % p.heads, window / p.window_cols * p.height,
            window % p.window_cols * p.width};
}

// Whether token n of the item's window is a token of the grid rather than padding.
inline bool in_grid(const Problem& p, const Item& it, int64_t n) {
    return it.y0 + n / p.width < p.grid_h && it.x0 + n % p.width < p.grid_w;
}

// The item's channels of grid token (y, x) in tensor g.
inline float* at(const Grid& g, const Item& it, int64_t y, int64_t x) {
    return g.data + it.batch * g.batch + it.head * g.head + y * g.y + x * g.x;
}

// Token n of the item in tensor g, or nullptr for a padding token.
inline float* token(const Problem& p, const Grid& g, const Item& it, int64_t n) {
    return in_grid(p, it, n) ? at(g, it, it.y0 + n / p.width, it.x0 + n % p.width) : nullptr;
}

// One item's keys as (keys_padded / 16, dim, 16) blocks of 16 keys, channel-major inside a
// block, and its values transposed as (vdim, row_stride), keys along the row; the keys past
// the window zero. Eight keys at a time, their tokens found by walking the window's rows.
void pack_item(const Problem& p, const Item& it, float* k_pack, float* v_t) {
    const int64_t n = p.height * p.width;
    // global attention passes no padding, and its windows need none
    const float* k_pad = p.k_pad ? p.k_pad + it.head * p.dim : nullptr;
    const float* v_pad = p.v_pad ? p.v_pad + it.head * p.vdim : nullptr;
    int64_t row = 0, column = 0;
    for (int64_t first = 0; first < n; first += 8) {
        const int count = n - first < 8 ? static_cast<int>(n - first) : 8;
        const float* keys[8];
        const float* values[8];
        for (int i = 0; i < count; i++) {
            const int64_t y = it.y0 + row, x = it.x0 + column;
            const bool real = y < p.grid_h && x < p.grid_w;
            keys[i] = real ? at(p.k, it, y, x) : k_pad;
            values[i] = real ? at(p.v, it, y, x) : v_pad;
            if (++column == p.width) { column = 0; row++; }
        }
        transpose_rows(keys, count, p.dim, k_pack + first / 16 * p.dim * 16 + first % 16, 16);
        transpose_rows(values, count, p.vdim, v_t + first, p.row_stride);
    }
    for (int64_t j = n; j < p.keys_padded; j++)
        for (int64_t c = 0; c < p.dim; c++) k_pack[j / 16 * p.dim * 16 + c * 16 + j % 16] = 0.0f;
    for (int64_t e = 0; e < p.vdim; e++)
        for (int64_t j = n; j < p.row_stride; j++) v_t[e * p.row_stride + j] = 0.0f;
}

// The two inner loops below are kept out of line (HOT): inlined into the one function that
// everything else is inlined into, their register allocation changed with unrelated code
// around them, and a change to the packing once made the global blocks 1.7x slower.
#define HOT __attribute__((noinline))

// Logits of kRows query rows against keys [first, last) into logits[r * stride + j];
// returns each row's maximum over those keys in max_out.
HOT void logits_block(const Problem& p, const float* k_pack, const float* q_rows, const float* const* rel_h,
                  const float* const* rel_w, float* logits, int64_t stride, int64_t first, int64_t last,
                  bool bias_from_factors, float* max_out) {
    __m256 m[kRows];
    for (int r = 0; r < kRows; r++) m[r] = _mm256_set1_ps(-3e38f);
    // the key grid position of key j, kept as a counter: a division per 16 keys is not free
    int64_t key_row = first / p.width, key_col = first % p.width;
    for (int64_t j = first; j < last; j += 16) {
        __m256 lo[kRows], hi[kRows];
        for (int r = 0; r < kRows; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        const float* keys = k_pack + j * p.dim;
        for (int64_t c = 0; c < p.dim; c++) {
            __m256 k0 = _mm256_loadu_ps(keys + c * 16), k1 = _mm256_loadu_ps(keys + c * 16 + 8);
            KEEP_IN_REGISTER(k0);
            KEEP_IN_REGISTER(k1);
            for (int r = 0; r < kRows; r++) {
                __m256 w = _mm256_broadcast_ss(q_rows + r * p.dim + c);
                lo[r] = _mm256_fmadd_ps(w, k0, lo[r]);
                hi[r] = _mm256_fmadd_ps(w, k1, hi[r]);
            }
            // else GCC keeps one of the twelve accumulators in memory, a store-to-load chain
            for (int r = 0; r < kRows; r++) { KEEP_IN_REGISTER(lo[r]); KEEP_IN_REGISTER(hi[r]); }
        }
        // scale, then bias, as torch's attention rounds them: logits far from zero keep
        // their precision better than with the scale folded into q
        const __m256 scale = _mm256_set1_ps(p.scale);
        for (int r = 0; r < kRows; r++) {
            __m256 bias_lo, bias_hi;
            if (bias_from_factors) {  // 16 keys share one row of the key grid
                const __m256 h = _mm256_set1_ps(rel_h[r][key_row]);
                bias_lo = _mm256_add_ps(h, _mm256_loadu_ps(rel_w[r] + key_col));
                bias_hi = _mm256_add_ps(h, _mm256_loadu_ps(rel_w[r] + key_col + 8));
            } else {
                bias_lo = _mm256_loadu_ps(logits + r * stride + j);
                bias_hi = _mm256_loadu_ps(logits + r * stride + j + 8);
            }
            lo[r] = _mm256_fmadd_ps(lo[r], scale, bias_lo);
            hi[r] = _mm256_fmadd_ps(hi[r], scale, bias_hi);
            _mm256_storeu_ps(logits + r * stride + j, lo[r]);
            _mm256_storeu_ps(logits + r * stride + j + 8, hi[r]);
            m[r] = _mm256_max_ps(m[r], _mm256_max_ps(lo[r], hi[r]));
        }
        key_col += 16;
        if (key_col >= p.width) { key_col = 0; key_row++; }
    }
    for (int r = 0; r < kRows; r++) max_out[r] = horizontal_max(m[r]);
}

// acc[r * vdim_pad + e] += sum over keys [first, last) of weights[r, j] * v_t[e, j], two
// value channels at a time, as 8-lane partial sums.
HOT void accumulate_values(const Problem& p, const float* v_t, const float* weights, int64_t stride,
                       int64_t first, int64_t last, __m256* acc, int64_t vdim_pad) {
    for (int64_t e = 0; e < p.vdim; e += 2) {
        const float* v0 = v_t + e * p.row_stride;
        const float* v1 = e + 1 < p.vdim ? v0 + p.row_stride : v0;
        __m256 a0[kRows], a1[kRows];
        for (int r = 0; r < kRows; r++) { a0[r] = acc[r * vdim_pad + e]; a1[r] = acc[r * vdim_pad + e + 1]; }
        for (int64_t j = first; j < last; j += 8) {
            __m256 x0 = _mm256_loadu_ps(v0 + j), x1 = _mm256_loadu_ps(v1 + j);
            KEEP_IN_REGISTER(x0);
            KEEP_IN_REGISTER(x1);
            for (int r = 0; r < kRows; r++) {
                __m256 w = _mm256_loadu_ps(weights + r * stride + j);
                KEEP_IN_REGISTER(w);
                a0[r] = _mm256_fmadd_ps(w, x0, a0[r]);
                a1[r] = _mm256_fmadd_ps(w, x1, a1[r]);
            }
        }
        for (int r = 0; r < kRows; r++) { acc[r * vdim_pad + e] = a0[r]; acc[r * vdim_pad + e + 1] = a1[r]; }
    }
}

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

static_assert(kRows == 6, "relative_terms splits a group's rows as 6 or 3 + 3");

// The running state of up to kRows query rows (window tokens): their copied queries,
// relative-position terms, softmax maximum and sum, and value accumulators.
struct RowGroup {
    int64_t row[kRows];
    int rows;
    float* q_rows;
    float* rel_rows;
    float* logits;
    __m256* acc;
    const float* rel_h[kRows];
    const float* rel_w[kRows];
    float running_max[kRows], running_sum[kRows];
};

void start_group(const Problem& p, const Item& it, RowGroup& g, int64_t stride, int64_t vdim_pad,
                 bool bias_from_factors) {
    const int64_t n = p.height * p.width;
    const int64_t height8 = round_up8(p.height), width8 = round_up8(p.width);
    const float* q[kRows];
    const float* tables_h[kRows];
    const float* tables_w[kRows];
    float* terms_h[kRows];
    float* terms_w[kRows];
    for (int r = 0; r < kRows; r++) {
        const int64_t row = g.row[r < g.rows ? r : 0];  // spare rows repeat the first
        const float* q_row = token(p, p.q, it, row);
        for (int64_t c = 0; c < p.dim; c++) g.q_rows[r * p.dim + c] = q_row[c];
        q[r] = g.q_rows + r * p.dim;
        tables_h[r] = p.table_h + row / p.width * p.dim * height8;
        tables_w[r] = p.table_w + row % p.width * p.dim * width8;
        g.rel_h[r] = terms_h[r] = g.rel_rows + r * (height8 + width8);
        g.rel_w[r] = terms_w[r] = terms_h[r] + height8;
    }
    relative_terms(q, tables_h, p.dim, height8, terms_h);
    relative_terms(q, tables_w, p.dim, width8, terms_w);
    for (int r = 0; r < kRows; r++) {
        if (!bias_from_factors) {
            // 8 columns at a time; a store that runs past the end of a key row is
            // overwritten by the next row, the last row's by the padding's -1e30
            float* bias = g.logits + r * stride;
            for (int64_t i = 0; i < p.height; i++) {
                const __m256 h = _mm256_set1_ps(g.rel_h[r][i]);
                for (int64_t j = 0; j < p.width; j += 8)
                    _mm256_storeu_ps(bias + i * p.width + j, _mm256_add_ps(h, _mm256_loadu_ps(g.rel_w[r] + j)));
            }
            for (int64_t j = n; j < p.keys_padded; j++) bias[j] = -1e30f;
        }
        g.running_max[r] = -3e38f;
        g.running_sum[r] = 0.0f;
    }
    for (int64_t i = 0; i < kRows * vdim_pad; i++) g.acc[i] = _mm256_setzero_ps();
}

// Keys [first, last) for one group: logits, online softmax, values.
void attend_block(const Problem& p, const float* k_pack, const float* v_t, RowGroup& g, int64_t stride,
                  int64_t vdim_pad, bool bias_from_factors, int64_t first, int64_t last) {
    float* logits = g.logits;
    float block_max[kRows];
    logits_block(p, k_pack, g.q_rows, g.rel_h, g.rel_w, logits, stride, first, last, bias_from_factors, block_max);
    for (int r = 0; r < kRows; r++) {
        // The sum is 0 only before the row's first block: after any block it holds the
        // weight 1 of the largest logit so far. Nothing to rescale then.
        if (g.running_sum[r] == 0.0f) {
            g.running_max[r] = block_max[r];
        } else if (block_max[r] > g.running_max[r]) {  // rescale what the earlier blocks summed
            const float alpha = expf(g.running_max[r] - block_max[r]);
            g.running_sum[r] *= alpha;
            const __m256 a = _mm256_set1_ps(alpha);
            for (int64_t e = 0; e < vdim_pad; e++) g.acc[r * vdim_pad + e] = _mm256_mul_ps(g.acc[r * vdim_pad + e], a);
            g.running_max[r] = block_max[r];
        }
        float* row = logits + r * stride;
        const __m256 m_log2e = _mm256_set1_ps(g.running_max[r] * 1.44269504088896341f);
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int64_t j = first; j < last; j += 16) {
            __m256 e0 = exp_below_max(_mm256_loadu_ps(row + j), m_log2e);
            __m256 e1 = exp_below_max(_mm256_loadu_ps(row + j + 8), m_log2e);
            _mm256_storeu_ps(row + j, e0);
            _mm256_storeu_ps(row + j + 8, e1);
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
        }
        g.running_sum[r] += horizontal_sum(_mm256_add_ps(s0, s1));
    }
    accumulate_values(p, v_t, logits, stride, first, last, g.acc, vdim_pad);
}

void finish_group(const Problem& p, const Item& it, const RowGroup& g, int64_t vdim_pad) {
    for (int r = 0; r < g.rows; r++) {
        const float inverse = 1.0f / g.running_sum[r];
        float* out = token(p, p.out, it, g.row[r]);
        const __m256 scale = _mm256_set1_ps(inverse);
        int64_t e = 0;
        for (; e + 8 <= p.vdim; e += 8)
            _mm256_storeu_ps(out + e, _mm256_mul_ps(horizontal_sums8(g.acc + r * vdim_pad + e), scale));
        for (; e < p.vdim; e++) out[e] = horizontal_sum(g.acc[r * vdim_pad + e]) * inverse;
    }
}

// The query rows rows[0, count), up to kGroups * kRows of them, in groups of kRows: each block
// of keys and values is used by every group while it is in the cache, instead of being
// fetched again per group.
void attend_rows(const Problem& p, const Item& it, const float* k_pack, const float* v_t, const int64_t* rows,
                 int64_t count, RowGroup* groups, int64_t stride, int64_t vdim_pad) {
    const bool bias_from_factors = p.width % 16 == 0;
    int groups_used = 0;
    for (int64_t first = 0; first < count; first += kRows, groups_used++) {
        RowGroup& g = groups[groups_used];
        g.rows = count - first < kRows ? static_cast<int>(count - first) : kRows;
        for (int r = 0; r < g.rows; r++) g.row[r] = rows[first + r];
        start_group(p, it, g, stride, vdim_pad, bias_from_factors);
    }
    for (int64_t first = 0; first < p.keys_padded; first += kKeys) {
        const int64_t last = first + kKeys < p.keys_padded ? first + kKeys : p.keys_padded;
        for (int i = 0; i < groups_used; i++)
            attend_block(p, k_pack, v_t, groups[i], stride, vdim_pad, bias_from_factors, first, last);
    }
    for (int i = 0; i < groups_used; i++) finish_group(p, it, groups[i], vdim_pad);
}

}  // namespace

extern "C" int slimseg_kernel_version(void) { return 7; }

// Items [item_begin, item_end), query rows (window tokens) [row_begin, row_end) of each.
// Returns 0, or 1 when scratch memory could not be allocated (nothing written then).
extern "C" int slimseg_rel_pos_attention(
    const float* q, const float* k, const float* v, const float* table_h, const float* table_w, float* out,
    const float* k_pad, const float* v_pad, int64_t heads, int64_t height, int64_t width, int64_t dim,
    int64_t vdim, int64_t grid_h, int64_t grid_w, const int64_t* strides, float scale, int64_t item_begin,
    int64_t item_end, int64_t row_begin, int64_t row_end) {
    const int64_t keys_padded = (height * width + 15) / 16 * 16;
    const int64_t* s = strides;  // batch, head, y and x strides of q, k, v and out
    const Problem p{{const_cast<float*>(q), s[0], s[1], s[2], s[3]}, {const_cast<float*>(k), s[4], s[5], s[6], s[7]},
                    {const_cast<float*>(v), s[8], s[9], s[10], s[11]}, {out, s[12], s[13], s[14], s[15]},
                    table_h, table_w, k_pad, v_pad, heads, height, width, dim, vdim,
                    grid_h, grid_w, (grid_h + height - 1) / height, (grid_w + width - 1) / width,
                    scale, keys_padded, keys_padded + 16};
    const int64_t stride = p.row_stride;
    const int64_t vdim_pad = vdim + (vdim & 1);
    const int64_t rel_floats = kRows * (round_up8(height) + round_up8(width));
    RowGroup groups[kGroups];
    float* logits = static_cast<float*>(aligned_alloc(64, sizeof(float) * kGroups * kRows * stride));
    float* q_rows = static_cast<float*>(aligned_alloc(64, sizeof(float) * ((kGroups * kRows * dim + 15) / 16 * 16)));
    float* rel_rows = static_cast<float*>(aligned_alloc(64, sizeof(float) * ((kGroups * rel_floats + 15) / 16 * 16)));
    __m256* acc = static_cast<__m256*>(aligned_alloc(64, sizeof(__m256) * kGroups * kRows * vdim_pad));
    float* k_pack = static_cast<float*>(aligned_alloc(64, sizeof(float) * keys_padded * dim));
    float* v_t = static_cast<float*>(aligned_alloc(64, sizeof(float) * vdim * p.row_stride));
    int64_t* rows = static_cast<int64_t*>(malloc(sizeof(int64_t) * (row_end - row_begin + 1)));
    int status = logits && q_rows && rel_rows && acc && k_pack && v_t && rows ? 0 : 1;
    for (int i = 0; i < kGroups; i++) {
        groups[i].logits = logits + i * kRows * stride;
        groups[i].q_rows = q_rows + i * kRows * dim;
        groups[i].rel_rows = rel_rows + i * rel_floats;
        groups[i].acc = acc + i * kRows * vdim_pad;
    }
    if (status == 0)
        for (int64_t item = item_begin; item < item_end; item++) {
            const Item it = locate(p, item);
            int64_t count = 0;  // the rows that are tokens of the grid, not padding
            for (int64_t row = row_begin; row < row_end; row++)
                if (in_grid(p, it, row)) rows[count++] = row;
            if (count == 0) continue;
            pack_item(p, it, k_pack, v_t);
            for (int64_t first = 0; first < count; first += kGroups * kRows)
                attend_rows(p, it, k_pack, v_t, rows + first,
                            count - first < kGroups * kRows ? count - first : kGroups * kRows, groups, stride, vdim_pad);
        }
    free(rows);
    free(v_t);
    free(k_pack);
    free(acc);
    free(rel_rows);
    free(q_rows);
    free(logits);
    return status;
}
