// SIMD microkernels, written once over a vector type V and instantiated per instruction set by
// isa_avx2.cpp / isa_avx512.cpp (each under its own `#pragma GCC target`). Include nothing here
// but <immintrin.h> and kernels.h: see kernels.h for why.
//
// One register-tile shape covers the BSR products: the rank-1 form
//   C[r][v] += A[r, t] * B[t, v-th vector]   (broadcast A, vector loads of B),
// for the forward (A = x rows, B = stored block, contraction over kk; accumulators live across
// a whole block row), dX (the forward over the transposed index and transposed blocks) and dW
// (A = x columns, B = dy rows, contraction over the batch).
// CSR products read operands as batch panels (kernels.h): one stored scalar times a contiguous
// run of batch rows, two sparse rows interleaved so eight independent FMA chains are in flight.

namespace {

#define SK_INLINE inline __attribute__((always_inline))

template <int N>
struct Int {
  static constexpr int value = N;
};

// Calls f(Int<k>{}) with k = min(rows, MAX): full tiles get MAX, edge tiles an exact-size kernel.
template <int MAX, class F>
SK_INLINE void with_rows(int64_t rows, F&& f) {
  if constexpr (MAX == 1) {
    f(Int<1>{});
  } else {
    if (rows >= MAX) {
      f(Int<MAX>{});
    } else {
      with_rows<MAX - 1>(rows, f);
    }
  }
}

SK_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Calls body(start, rows) over [begin, end) in the fewest tiles of at most MAX rows, all of
// nearly equal height: 32 rows with MAX=6 become 6,6,5,5,5,5 rather than 6,6,6,6,6,2, whose
// last tile would have too few accumulators to hide the FMA latency.
template <int MAX, class F>
SK_INLINE void balanced_tiles(int64_t begin, int64_t end, F&& body) {
  const int64_t total = end - begin;
  int64_t tiles = (total + MAX - 1) / MAX;
  for (int64_t start = begin; tiles > 0; --tiles) {
    const int64_t rows = (end - start + tiles - 1) / tiles;
    body(start, rows);
    start += rows;
  }
}

struct V8 {
  using reg = __m256;
  static constexpr int L = 8;
  static SK_INLINE reg zero() { return _mm256_setzero_ps(); }
  static SK_INLINE reg load(const float* p) { return _mm256_loadu_ps(p); }
  static SK_INLINE void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static SK_INLINE reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static SK_INLINE reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static SK_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static SK_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static SK_INLINE __m256 half_sum(reg v) { return v; }
};

#ifdef SK_WITH_V16
struct V16 {
  using reg = __m512;
  static constexpr int L = 16;
  static SK_INLINE reg zero() { return _mm512_setzero_ps(); }
  static SK_INLINE reg load(const float* p) { return _mm512_loadu_ps(p); }
  static SK_INLINE void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static SK_INLINE reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static SK_INLINE reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static SK_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static SK_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  // 16 lanes -> 8 lanes with the same total, so the 8-lane reductions below serve both.
  static SK_INLINE __m256 half_sum(reg v) {
    const reg high = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2));
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_castps512_ps256(high));
  }
};
#endif

// out[0..4) = horizontal sums of a0..a3 (3 hadds + 1 add instead of four separate reductions).
template <class V>
SK_INLINE __m128 hsum4(typename V::reg a0, typename V::reg a1, typename V::reg a2,
                       typename V::reg a3) {
  const __m256 t01 = _mm256_hadd_ps(V::half_sum(a0), V::half_sum(a1));
  const __m256 t23 = _mm256_hadd_ps(V::half_sum(a2), V::half_sum(a3));
  const __m256 t = _mm256_hadd_ps(t01, t23);
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <class V>
SK_INLINE float hsum1(typename V::reg a) {
  const __m256 h = V::half_sum(a);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// In-register 8x8 transpose: r[j] (row j) -> r[i] (column i).
SK_INLINE void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols (rows, cols <= 8).
SK_INLINE void transpose_block(const float* src, int64_t ld_src, int64_t rows, int64_t cols,
                               float* dst, int64_t ld_dst) {
  if (rows == 8 && cols == 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
    transpose8(r);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * ld_dst, r[j]);
    return;
  }
  // Edge blocks (a 7x7 feature map has nothing else): masked loads and stores, which neither
  // read nor write past the block, keep them in registers too.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i col_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols)), lane);
  const __m256i row_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(rows)), lane);
  __m256 r[8];
  for (int i = 0; i < 8; ++i)
    r[i] = i < rows ? _mm256_maskload_ps(src + i * ld_src, col_mask) : _mm256_setzero_ps();
  transpose8(r);
  for (int j = 0; j < cols; ++j) _mm256_maskstore_ps(dst + j * ld_dst, row_mask, r[j]);
}

// The one register tile: acc[r][v] += sum_t A(r, t) * B(t)[v-th vector], with a_at(r, t) the
// address of A(r, t) and b_at(t) that of row t of B. The BSR products differ only in how they
// address A and B: strided rows (linear), one row pointer per output pixel and tap (conv forward
// and dX), one pointer per pixel of the contraction (conv dW).
template <class V, int MR, int NV, class AAt, class BAt>
SK_INLINE void rank1(typename V::reg (&acc)[MR][NV], AAt a_at, BAt b_at, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* b_row = b_at(t);
    typename V::reg b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = V::load(b_row + v * V::L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::reg a = V::bcast(a_at(r, t));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, b[v], acc[r][v]);
    }
  }
}

// acc[r][v] += sum_{t<T} a_row[r][t * a_ts] * B[t*b_s + v*L]
template <class V, int MR, int NV>
SK_INLINE void rank1_rows(typename V::reg (&acc)[MR][NV], const float* const (&a_row)[MR],
                          int64_t a_ts, const float* B, int64_t b_s, int64_t T) {
  rank1<V, MR, NV>(
      acc, [&](int r, int64_t t) { return a_row[r] + t * a_ts; },
      [&](int64_t t) { return B + t * b_s; }, 0, T);
}

// acc[r][v] += sum_{t<T} A[r*a_rs + t*a_ts] * B[t*b_s + v*L]
template <class V, int MR, int NV>
SK_INLINE void rank1_update(typename V::reg (&acc)[MR][NV], const float* A, int64_t a_rs,
                            int64_t a_ts, const float* B, int64_t b_s, int64_t T) {
  const float* a_row[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a_row[r] = A + r * a_rs;
  rank1_rows<V, MR, NV>(acc, a_row, a_ts, B, b_s, T);
}

// rank1_update with the contraction loop unrolled by four, for the linear BSR tiles (a block is
// bk >= 8 contraction steps, a dW chunk 64): rolled, a 6x2 step spends 4 of its 24 uops on loop
// control next to its 12 FMAs. Up to two B vectors are held and each broadcast of A is used NV
// times; wider tiles (NV = 4, see rank1_rows) cannot hold B next to their accumulators, so they
// hold the MR broadcasts instead and use each B vector MR times.
template <class V, int MR, int NV>
SK_INLINE void rank1_update_x4(typename V::reg (&acc)[MR][NV], const float* A, int64_t a_rs,
                               int64_t a_ts, const float* B, int64_t b_s, int64_t T) {
#pragma GCC unroll 4
  for (int64_t t = 0; t < T; ++t) {
    if constexpr (NV <= 2) {
      typename V::reg b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = V::load(B + t * b_s + v * V::L);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const typename V::reg a = V::bcast(A + r * a_rs + t * a_ts);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, b[v], acc[r][v]);
      }
    } else {
      typename V::reg a[MR];
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) a[r] = V::bcast(A + r * a_rs + t * a_ts);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const typename V::reg b = V::load(B + t * b_s + v * V::L);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r][v] = V::fma(a[r], b, acc[r][v]);
      }
    }
  }
}

// Prefetches `len` floats of ROWS rows (leading dim ld) into L1 (HINT = _MM_HINT_T0) or L2.
template <int ROWS, int HINT = _MM_HINT_T0>
SK_INLINE void prefetch_rows(const float* p, int64_t ld, int64_t len) {
  for (int r = 0; r < ROWS; ++r)
    for (int64_t i = 0; i < len; i += 16)
      _mm_prefetch(reinterpret_cast<const char*>(p + r * ld + i), static_cast<_mm_hint>(HINT));
}

// Tile rows for the rank-1 form: as many as the register file holds next to NV operand vectors.
// NV = 4 (AVX2 only, the linear kernels; see by_width): 3 x 4 tiles in 12 accumulators, 3
// broadcasts and 1 B vector.
template <class V, int NV>
constexpr int rank1_rows() {
  static_assert(NV == 1 || NV == 2 || (NV == 4 && V::L == 8), "no register tile for this NV");
  return NV == 4 ? 3 : NV == 2 ? (V::L == 16 ? 12 : 6) : 12;
}

template <class V, int NV>
void bsr_forward_impl(const sparsekern::cpu::BsrArgs<float>& a, const float* x, int64_t ldx,
                      const float* bias, float* y, int64_t ldy, int64_t i0, int64_t i1,
                      int64_t m0, int64_t m1) {
  constexpr int MR = rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  const int64_t bn = a.bn, bk = a.bk, block = bn * bk;
  // One block row I over the x rows [m, m + rows).
  // x rows [m, m + rows) of block row I's first kept block, or null when it keeps none.
  const auto first_block = [&](int64_t I, int64_t m) -> const float* {
    const int64_t p = a.row_ptr[I];
    return p < a.row_ptr[I + 1] ? x + m * ldx + a.col_idx[p] * bk : nullptr;
  };
  // next_first: first_block of the unit that runs after this one (null: none).
  const auto block_row_tile = [&](int64_t I, int64_t m, auto R, const float* next_first) {
    constexpr int rows = decltype(R)::value;
    const bool prefetch_next = m + 2 * rows <= m1;
    const int64_t p0 = a.row_ptr[I], p1 = a.row_ptr[I + 1];
    const float* x_tile = x + m * ldx;
    // Every column tile of the block row for these x rows before the next rows: the second
    // tile finds the rows' kept blocks in L1, where sweeping all of M per column tile
    // fetched them again from L3 (x is megabytes; one block row reads 1 - s of it).
    for (int64_t n0 = 0; n0 < bn; n0 += NT) {
      const float* bias_tile = bias ? bias + I * bn + n0 : nullptr;
      const float* w_tile = a.values + n0;
      typename V::reg acc[rows][NV];
#pragma GCC unroll 16
      for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
          acc[r][v] = bias_tile ? V::load(bias_tile + v * V::L) : V::zero();
      float* y_tile = y + m * ldy + I * bn + n0;
#pragma GCC unroll 16
      for (int r = 0; r < rows; ++r)  // the tile's output lines, for writing at the end
        for (int v = 0; v < NV * V::L; v += 16) __builtin_prefetch(y_tile + r * ldy + v, 1, 3);
      // The next unit's first block (the loop below covers every later one): with few kept
      // blocks per row, an unprefetched first block is a third of all x reads.
      if (n0 + NT >= bn && next_first) prefetch_rows<rows>(next_first, ldx, bk);
      for (int64_t p = p0; p < p1; ++p) {
        // x rows of the next block: they come from DRAM when the caller has just streamed
        // something large (the usual case), in rows too scattered for the hardware prefetcher.
        // Only in the first column tile: the later ones find these rows in L1, and their
        // redundant prefetches cost 2-5% of the forward on Zen 3 (AVX2).
        if (n0 == 0 && p + 1 < p1) prefetch_rows<rows>(x_tile + a.col_idx[p + 1] * bk, ldx, bk);
        // The same block of the next tile's rows into L2, a whole group of block rows before
        // it is needed: the L1 prefetch above is one block (~200 cycles) ahead, too short to
        // hide L3 latency, which bound every x tile's first pass through the group.
        if (n0 == 0 && prefetch_next)
          prefetch_rows<rows, _MM_HINT_T1>(x_tile + rows * ldx + a.col_idx[p] * bk, ldx, bk);
        rank1_update_x4<V, rows, NV>(acc, x_tile + a.col_idx[p] * bk, ldx, 1,
                                     w_tile + p * block, bn, bk);
      }
#pragma GCC unroll 16
      for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) V::store(y_tile + r * ldy + v * V::L, acc[r][v]);
    }
  };
  // Block rows go in groups whose kept blocks fit in half of L2, and within a group every block
  // row meets a tile of x rows before the next tile: the tile's rows (6 x K floats) are read
  // from L3 once per group and from L1/L2 by its other block rows, while the group's weights
  // stay in L2. (One group per call when all fit; a block row too large alone is its own group,
  // sweeping x by itself, which beats re-streaming megabytes of weights once per tile.)
  constexpr int64_t kL2Half = 256 * 1024;
  const int64_t group_blocks = kL2Half / (block * int64_t(sizeof(float)));
  for (int64_t g0 = i0, g1; g0 < i1; g0 = g1) {
    g1 = g0 + 1;
    while (g1 < i1 && a.row_ptr[g1 + 1] - a.row_ptr[g0] <= group_blocks) ++g1;
    balanced_tiles<MR>(m0, m1, [&](int64_t m, int64_t tile_rows) {
      with_rows<MR>(tile_rows, [&](auto R) {
        const bool last_tile = m + decltype(R)::value >= m1;
        for (int64_t I = g0; I < g1; ++I) {
          const float* next_first = I + 1 < g1   ? first_block(I + 1, m)
                                    : last_tile ? nullptr
                                                : first_block(g0, m + decltype(R)::value);
          block_row_tile(I, m, R, next_first);
        }
      });
    });
  }
}

// dW is a [bk][bn] GEMM per stored block over the whole batch. Read in place, a tile pass would
// walk M rows of x and dy a row stride apart (kilobytes: one page and, as the stride is a
// multiple of 4 KB, one L1 set per row), and the twelve tile passes of a block would fetch each
// line again from L2 or L3. So the batch is cut into chunks of MC rows, and each pass reads
// contiguous chunks: the block row's dy chunk, copied into an L1 buffer once per chunk, and the
// block's x chunk (its bk columns of MC rows). x comes either in block columns (x_rs == bk:
// every chunk already contiguous, for x columns that many block rows read) or in place, each
// block's chunk then copied into an L1 buffer (the caller's choice, linear.cpp). Partial sums
// wait in dw between chunks.
template <class V, int NV>
void bsr_grad_weight_impl(const sparsekern::cpu::BsrArgs<float>& a, const float* dy,
                          int64_t lddy, const float* x, int64_t x_rs, int64_t x_cs,
                          float* dw, int64_t i0, int64_t i1) {
  constexpr int MR = rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  constexpr int64_t MC = 64;
  const int64_t M = a.M, bn = a.bn, bk = a.bk, block = bn * bk;
  if (M == 0)
    for (int64_t i = a.row_ptr[i0] * block; i < a.row_ptr[i1] * block; ++i) dw[i] = 0.f;
  // Plain new[]: a std::vector here would instantiate inline library code under this file's
  // target pragma (see the top of the file).
  float* const dy_chunk = new float[MC * bn];
  const bool pack_x = x_rs != bk;
  float* const x_buffer = pack_x ? new float[MC * bk] : nullptr;
  const int64_t passes = bn / NT * ((bk + MR - 1) / MR);  // tile passes per block and chunk
  const int64_t dy_row_lines = (bn + 15) / 16, x_row_lines = (bk + 15) / 16;
  // rows [m0, m0 + rows) of a column run (row_lines lines each, rows ld apart), as a list of
  // `lines` prefetches into L2 issued a slice at a time, one slice before each tile pass:
  // issued at once, a block's 128 lines filled the miss queue and stalled the first pass.
  struct Prefetch {
    const float* base = nullptr;
    int64_t ld = 0, row_lines = 1, lines = 0, per_pass = 0, issued = 0;
    void slice() {
      for (const int64_t end = min64(lines, issued + per_pass); issued < end; ++issued)
        _mm_prefetch(reinterpret_cast<const char*>(base + issued / row_lines * ld +
                                                   issued % row_lines * 16),
                     _MM_HINT_T1);
    }
  };
  for (int64_t I = i0; I < i1; ++I) {
    const int64_t p0 = a.row_ptr[I], p1 = a.row_ptr[I + 1];
    if (p0 == p1) continue;
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t mc = min64(MC, M - m0);
      const float* dy_rows = dy + m0 * lddy + I * bn;
      for (int64_t t = 0; t < mc; ++t)
        for (int64_t n = 0; n < bn; n += 8)
          _mm256_storeu_ps(dy_chunk + t * bn + n, _mm256_loadu_ps(dy_rows + t * lddy + n));
      for (int64_t p = p0; p < p1; ++p) {
        const float* x_rows = x + m0 * x_rs + a.col_idx[p] * x_cs;
        const float* x_chunk = pack_x ? x_buffer : x_rows;
        if (pack_x)
          for (int64_t t = 0; t < mc; ++t)
            for (int64_t kk = 0; kk < bk; kk += 8)
              _mm256_storeu_ps(x_buffer + t * bk + kk, _mm256_loadu_ps(x_rows + t * x_rs + kk));
        // While this block computes: the next block's x rows (scattered rows, which the
        // hardware prefetcher does not follow), after the last block the next chunk's dy rows.
        Prefetch next;
        const int64_t dy_next_rows = min64(M - m0, 2 * MC) - MC;
        if (p + 1 < p1) {
          next = {x + m0 * x_rs + a.col_idx[p + 1] * x_cs, x_rs, x_row_lines, mc * x_row_lines};
        } else if (dy_next_rows > 0) {
          next = {dy_rows + MC * lddy, lddy, dy_row_lines, dy_next_rows * dy_row_lines};
        }
        next.per_pass = (next.lines + passes - 1) / passes;
        float* dw_block = dw + p * block;
        for (int64_t n0 = 0; n0 < bn; n0 += NT) {
          balanced_tiles<MR>(0, bk, [&](int64_t kk, int64_t tile_rows) {
            next.slice();
            with_rows<MR>(tile_rows, [&](auto R) {
              constexpr int rows = decltype(R)::value;
              float* dw_tile = dw_block + kk * bn + n0;
              typename V::reg acc[rows][NV];
#pragma GCC unroll 16
              for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
                for (int v = 0; v < NV; ++v)
                  acc[r][v] = m0 == 0 ? V::zero() : V::load(dw_tile + r * bn + v * V::L);
              rank1_update_x4<V, rows, NV>(acc, x_chunk + kk, 1, bk, dy_chunk + n0, bn, mc);
#pragma GCC unroll 16
              for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
                for (int v = 0; v < NV; ++v) V::store(dw_tile + r * bn + v * V::L, acc[r][v]);
            });
          });
        }
      }
    }
  }
  delete[] x_buffer;
  delete[] dy_chunk;
}

// Widest vector type whose lane count divides `width` gets the work; 8 always does (bn, bk >= 8).
// kWideAvx2 (the linear kernels, on rank1_update_x4, which has a 3 x 4 form): AVX2 takes 3 x 32
// tiles wherever 32 divides `width`, so each block row is one column pass, not two of 6 x 16,
// at 7 loads per 12 FMAs instead of 8. In-process A/Bs on Zen 3: forward and dX 6-18% faster at
// every issue-8 shape, dW 3-8%.
template <class Vw, template <class, int> class Fn, bool kWideAvx2 = false, class... Args>
SK_INLINE void by_width(int64_t width, Args... args) {
  if constexpr (kWideAvx2 && Vw::L == 8) {
    if (width % 32 == 0) return Fn<V8, 4>::run(args...);
  }
  if (width % (2 * Vw::L) == 0) {
    Fn<Vw, 2>::run(args...);
  } else if (width % Vw::L == 0) {
    Fn<Vw, 1>::run(args...);
  } else {
    Fn<V8, 1>::run(args...);
  }
}

template <class V, int NV>
struct ForwardFn {
  template <class... A>
  static void run(A... args) { bsr_forward_impl<V, NV>(args...); }
};
template <class V, int NV>
struct GradWeightFn {
  template <class... A>
  static void run(A... args) { bsr_grad_weight_impl<V, NV>(args...); }
};

template <class Vw>
void bsr_forward(const sparsekern::cpu::BsrArgs<float>& a, const float* x, int64_t ldx,
                 const float* bias, float* y, int64_t ldy, int64_t i0, int64_t i1, int64_t m0,
                 int64_t m1) {
  by_width<Vw, ForwardFn, true>(a.bn, a, x, ldx, bias, y, ldy, i0, i1, m0, m1);
}

template <class Vw>
void bsr_grad_weight(const sparsekern::cpu::BsrArgs<float>& a, const float* dy, int64_t lddy,
                     const float* x, int64_t x_rs, int64_t x_cs, float* dw, int64_t i0,
                     int64_t i1) {
  by_width<Vw, GradWeightFn, true>(a.bn, a, dy, lddy, x, x_rs, x_cs, dw, i0, i1);
}

// out[q] = values[perm[q]] transposed ([bk][bn] -> [bn][bk]) for q in [q0, q1): W^T in block
// form, so that dX = dY W runs on the forward kernel over the transposed index.
template <class Vw>
void bsr_transpose_blocks(const float* values, const int32_t* perm, int64_t bk, int64_t bn,
                          float* out, int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    const float* src = values + int64_t(perm[q]) * bk * bn;
    float* dst = out + q * bk * bn;
    for (int64_t kk = 0; kk < bk; kk += 8)
      for (int64_t n = 0; n < bn; n += 8)
        transpose_block(src + kk * bn + n, bn, 8, 8, dst + n * bk + kk, bk);
  }
}

// ---- BSR conv2d ---------------------------------------------------------------------------
// The linear register tile with output pixels as rows: a tile's rows are any MR output pixels
// (consecutive in N*OH*OW order, so a tile may span image rows and images), each read through
// its own row pointer, so small feature maps (7x7, 4x4) still fill whole tiles.

// Callers hand it pixel ranges small enough for their input rows to stay in L2 while every
// block row sweeps them (conv.cpp, pixel_chunk): the pixels are the long dimension here.
template <class V, int NV>
void bsr_conv_forward_impl(const sparsekern::cpu::BsrArgs<float>& a,
                           const sparsekern::cpu::ConvGeometry& g, const float* x,
                           const float* bias, float* y, int64_t ldy, int64_t i0, int64_t i1,
                           int64_t m0, int64_t m1) {
  // Eight rows, not twelve, for one-vector blocks on AVX2: a row is a pointer per pixel, and
  // twelve of them next to the loop nest's own values spill, reloaded on every step (16@32x32
  // at block 8: 3.65 -> 3.45 ms; four rows instead of six for two vectors lost 10%).
  constexpr int MR = V::L == 8 && NV == 1 ? 8 : rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  const int64_t bn = a.bn, bk = a.bk, taps = g.taps, tap_block = bk * bn;
  // With implicit padding (g.tap_mask), a border pixel reads its missing taps from a row of
  // zeros: the same FMAs as a padded input, without the padded copy. Plain new[]: see
  // bsr_grad_weight_impl.
  const uint64_t all_taps = taps >= 64 ? ~uint64_t(0) : (uint64_t(1) << taps) - 1;
  float* const zeros = g.tap_mask ? new float[bk]() : nullptr;
  for (int64_t I = i0; I < i1; ++I) {
    const int64_t p0 = a.row_ptr[I], p1 = a.row_ptr[I + 1];
    for (int64_t n0 = 0; n0 < bn; n0 += NT) {
      const float* bias_tile = bias ? bias + I * bn + n0 : nullptr;
      balanced_tiles<MR>(m0, m1, [&](int64_t m, int64_t tile_rows) {
        with_rows<MR>(tile_rows, [&](auto R) {
          constexpr int rows = decltype(R)::value;
          typename V::reg acc[rows][NV];
#pragma GCC unroll 16
          for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v)
              acc[r][v] = bias_tile ? V::load(bias_tile + v * V::L) : V::zero();
          const int64_t* pix = g.pix_off + m;
          const uint64_t* mask = g.tap_mask ? g.tap_mask + m : nullptr;
          bool border = false;
          if (mask)
#pragma GCC unroll 16
            for (int r = 0; r < rows; ++r) border |= mask[r] != all_taps;
          for (int64_t p = p0; p < p1; ++p) {
            const float* w_block = a.values + p * taps * tap_block + n0;
            const float* x_block = x + a.col_idx[p] * bk;
            for (int64_t t = 0; t < taps; ++t) {
              const float* x_tap = x_block + g.tap_off[t];
              // The next tap's rows (next block's first tap after the last): they lie in L2,
              // and a rank-1 sweep that starts on rows still in flight stalls on every one.
              // Not for blocks under 16 channels: a row is then half a line that the previous
              // taps brought into L1, and issuing the prefetches costs more than it saves
              // (16@32x32 at block 8: 3.42 -> 3.15 ms without them).
              const float* x_next = t + 1 < taps ? x_block + g.tap_off[t + 1]
                                    : p + 1 < p1 ? x + a.col_idx[p + 1] * bk : nullptr;
              if (x_next && bk >= 16)
#pragma GCC unroll 16
                for (int r = 0; r < rows; ++r)
                  for (int64_t k = 0; k < bk; k += 16) _mm_prefetch(
                      reinterpret_cast<const char*>(x_next + pix[r] + k), _MM_HINT_T0);
              const float* a_row[rows];
              if (border) {
#pragma GCC unroll 16
                for (int r = 0; r < rows; ++r)
                  a_row[r] = mask[r] >> t & 1 ? x_tap + pix[r] : zeros;
              } else {
#pragma GCC unroll 16
                for (int r = 0; r < rows; ++r) a_row[r] = x_tap + pix[r];
              }
              rank1_rows<V, rows, NV>(acc, a_row, 1, w_block + t * tap_block, bn, bk);
            }
          }
          float* y_tile = y + m * ldy + I * bn + n0;
#pragma GCC unroll 16
          for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) V::store(y_tile + r * ldy + v * V::L, acc[r][v]);
        });
      });
    }
  }
  delete[] zeros;
}

// dX by scatter (kernels.h): per tap, the tile's contribution is accumulated over every stored
// block of the column in registers, then added to dx once. A gather form would need a different
// tap set per output phase whenever stride > 1; the scatter form is one loop for every stride.
template <class V, int NV>
void bsr_conv_grad_input_impl(const sparsekern::cpu::BsrArgs<float>& a,
                              const sparsekern::cpu::ConvGeometry& g, const float* dy,
                              int64_t lddy, float* dx, int64_t j0, int64_t j1, int64_t m0,
                              int64_t m1) {
  constexpr int MR = rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  const int64_t bn = a.bn, bk = a.bk, taps = g.taps, tap_block = bk * bn;
  for (int64_t J = j0; J < j1; ++J) {
    const int64_t q0 = a.row_ptr[J], q1 = a.row_ptr[J + 1];
    if (q0 == q1) continue;  // no stored block in this input-channel block: dx stays zero
    for (int64_t n0 = 0; n0 < bn; n0 += NT) {
      balanced_tiles<MR>(m0, m1, [&](int64_t m, int64_t tile_rows) {
        with_rows<MR>(tile_rows, [&](auto R) {
          constexpr int rows = decltype(R)::value;
          for (int64_t t = 0; t < taps; ++t) {
            typename V::reg acc[rows][NV];
#pragma GCC unroll 16
            for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
              for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
            for (int64_t q = q0; q < q1; ++q) {
              const float* dy_block = dy + m * lddy + a.col_idx[q] * bk;
              rank1_update<V, rows, NV>(acc, dy_block, lddy, 1,
                                        a.values + (q * taps + t) * tap_block + n0, bn, bk);
            }
            const int64_t offset = g.tap_off[t] + J * bn + n0;
#pragma GCC unroll 16
            for (int r = 0; r < rows; ++r) {
              float* out = dx + g.pix_off[m + r] + offset;
#pragma GCC unroll 16
              for (int v = 0; v < NV; ++v)
                V::store(out + v * V::L, V::add(V::load(out + v * V::L), acc[r][v]));
            }
          }
        });
      });
    }
  }
}

// dW of one stored block and tap is a [bk][bn] GEMM over every output pixel. Pixels are the
// outer loop, in chunks whose x and dy rows stay in L2 while all of this call's (block, tap)
// units sweep them; partial sums go through dw (one load/store per chunk and unit).
template <class V, int NV>
void bsr_conv_grad_weight_impl(const sparsekern::cpu::BsrArgs<float>& a,
                               const sparsekern::cpu::ConvGeometry& g, const int32_t* block_row,
                               const float* dy, int64_t lddy, const float* x, float* dw,
                               int64_t u0, int64_t u1) {
  constexpr int MR = rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  constexpr int64_t CHUNK = 128;
  const int64_t bn = a.bn, bk = a.bk, taps = g.taps;
  if (g.M == 0)
    for (int64_t i = u0 * bk * bn; i < u1 * bk * bn; ++i) dw[i] = 0.f;
  for (int64_t c0 = 0; c0 < g.M; c0 += CHUNK) {
    const int64_t c1 = min64(g.M, c0 + CHUNK);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u / taps, t = u % taps;
      float* dw_tap = dw + u * bk * bn;
      const float* x_tap = x + g.tap_off[t] + a.col_idx[p] * bk;
      const float* dy_block = dy + block_row[p] * bn;
      for (int64_t n0 = 0; n0 < bn; n0 += NT) {
        balanced_tiles<MR>(0, bk, [&](int64_t kk, int64_t tile_rows) {
          with_rows<MR>(tile_rows, [&](auto R) {
            constexpr int rows = decltype(R)::value;
            float* dw_tile = dw_tap + kk * bn + n0;
            typename V::reg acc[rows][NV];
#pragma GCC unroll 16
            for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
              for (int v = 0; v < NV; ++v)
                acc[r][v] = c0 == 0 ? V::zero() : V::load(dw_tile + r * bn + v * V::L);
            rank1<V, rows, NV>(
                acc, [&](int r, int64_t m) { return x_tap + g.pix_off[m] + kk + r; },
                [&](int64_t m) { return dy_block + m * lddy + n0; }, c0, c1);
#pragma GCC unroll 16
            for (int r = 0; r < rows; ++r)
#pragma GCC unroll 16
              for (int v = 0; v < NV; ++v) V::store(dw_tile + r * bn + v * V::L, acc[r][v]);
          });
        });
      }
    }
  }
}

template <class V, int NV>
struct ConvForwardFn {
  template <class... A>
  static void run(A... args) { bsr_conv_forward_impl<V, NV>(args...); }
};
template <class V, int NV>
struct ConvGradInputFn {
  template <class... A>
  static void run(A... args) { bsr_conv_grad_input_impl<V, NV>(args...); }
};
template <class V, int NV>
struct ConvGradWeightFn {
  template <class... A>
  static void run(A... args) { bsr_conv_grad_weight_impl<V, NV>(args...); }
};

template <class Vw>
void bsr_conv_forward(const sparsekern::cpu::BsrArgs<float>& a,
                      const sparsekern::cpu::ConvGeometry& g, const float* x, const float* bias,
                      float* y, int64_t ldy, int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
  by_width<Vw, ConvForwardFn>(a.bn, a, g, x, bias, y, ldy, i0, i1, m0, m1);
}

template <class Vw>
void bsr_conv_grad_input(const sparsekern::cpu::BsrArgs<float>& a,
                         const sparsekern::cpu::ConvGeometry& g, const float* dy, int64_t lddy,
                         float* dx, int64_t j0, int64_t j1, int64_t m0, int64_t m1) {
  by_width<Vw, ConvGradInputFn>(a.bn, a, g, dy, lddy, dx, j0, j1, m0, m1);
}

template <class Vw>
void bsr_conv_grad_weight(const sparsekern::cpu::BsrArgs<float>& a,
                          const sparsekern::cpu::ConvGeometry& g, const int32_t* block_row,
                          const float* dy, int64_t lddy, const float* x, float* dw, int64_t u0,
                          int64_t u1) {
  by_width<Vw, ConvGradWeightFn>(a.bn, a, g, block_row, dy, lddy, x, dw, u0, u1);
}

// ---- CSR ----------------------------------------------------------------------------------

template <class V>
constexpr int panel_width() {
  return 4 * V::L;
}

// acc += values[j] * (the panel row of entry j) for j in [begin, end); addr(j) = that row.
template <class V, class Addr>
SK_INLINE void spmm_accumulate(typename V::reg (&acc)[4], const float* values, Addr addr,
                               int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const typename V::reg v = V::bcast(values + j);
    const float* p = addr(j);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[i] = V::fma(v, V::load(p + i * V::L), acc[i]);
  }
}

// acc0 += entries [j0, e0), acc1 += entries [j1, e1): two sparse rows interleaved so eight
// independent FMA chains are in flight. addr(j) is entry j's panel row: the column's row of the
// batch panel (linear) or, for a conv, the input channel at the entry's tap of the current pixel.
template <class V, class Addr>
SK_INLINE void spmm_pair(typename V::reg (&acc0)[4], typename V::reg (&acc1)[4],
                         const float* vals, Addr addr, int64_t j0, int64_t e0, int64_t j1,
                         int64_t e1) {
  const int64_t common = min64(e0 - j0, e1 - j1);
  for (int64_t t = 0; t < common; ++t, ++j0, ++j1) {
    const typename V::reg v0 = V::bcast(vals + j0);
    const typename V::reg v1 = V::bcast(vals + j1);
    const float* p0 = addr(j0);
    const float* p1 = addr(j1);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      acc0[i] = V::fma(v0, V::load(p0 + i * V::L), acc0[i]);
      acc1[i] = V::fma(v1, V::load(p1 + i * V::L), acc1[i]);
    }
  }
  spmm_accumulate<V>(acc0, vals, addr, j0, e0);
  spmm_accumulate<V>(acc1, vals, addr, j1, e1);
}

// tile[r - g][lane] = bias[r] + sum_j values[j] * addr(j)[lane] for sparse rows [g, g + rows).
template <class V, class Addr>
SK_INLINE void spmm_tile(float (*tile)[panel_width<V>()], const int32_t* rp,
                         const float* vals, Addr addr, const float* bias, int64_t g,
                         int64_t rows) {
  for (int64_t r = g; r < g + rows; r += 2) {
    const bool pair = r + 1 < g + rows;
    typename V::reg acc0[4], acc1[4];
    const typename V::reg b0 = bias ? V::bcast(bias + r) : V::zero();
    const typename V::reg b1 = bias && pair ? V::bcast(bias + r + 1) : V::zero();
#pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) {
      acc0[i] = b0;
      acc1[i] = b1;
    }
    spmm_pair<V>(acc0, acc1, vals, addr, rp[r], rp[r + 1], pair ? rp[r + 1] : 0,
                 pair ? rp[r + 2] : 0);
#pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) {
      V::store(tile[r - g] + i * V::L, acc0[i]);
      if (pair) V::store(tile[r - g + 1] + i * V::L, acc1[i]);
    }
  }
}

// Rows r0..r1 of out = dense S^T, sixteen sparse rows at a time: the [16][MB] result tile is
// transposed in registers into out's row-major layout, both 8x8 blocks of an output row back to
// back, so each 64-byte line of out is written whole while in L1. (With eight rows, the two
// halves of a line came a tile apart; out's rows a multiple of 4 KB apart share one L1 set, so
// the line was evicted in between and fetched again: 10-17% of a forward at N = 1024-3072.)
template <class V>
void csr_spmm(const sparsekern::cpu::CsrSpmmArgs<float>& a, int64_t r0, int64_t r1) {
  constexpr int MB = panel_width<V>();
  alignas(64) float tile[16][MB];
  for (int64_t c = 0; c * MB < a.M; ++c) {
    const float* panel = a.panels + c * a.C * MB;
    const auto addr = [&](int64_t j) { return panel + int64_t(a.col_idx[j]) * MB; };
    const int64_t m0 = c * MB, mv = min64(MB, a.M - m0);
    float* out = a.out + m0 * a.ldo;
    for (int64_t g = r0; g < r1; g += 16) {
      const int64_t rows = min64(16, r1 - g);
      spmm_tile<V>(tile, a.row_ptr, a.values, addr, a.bias, g, rows);
      for (int64_t i = 0; i < mv; i += 8)
        for (int64_t h = 0; h < rows; h += 8)
          transpose_block(tile[h] + i, MB, min64(8, rows - h), min64(8, mv - i),
                          out + i * a.ldo + g + h, a.ldo);
    }
  }
}

// dst[c][k][i] = src[(c*P + i) * ld + k] for chunks [c0, c1), zero past row M (kernels.h).
// Eight source rows at a time over all of C, so consecutive 8x8 blocks read the two halves of
// each 64-byte source line back to back. Sweeping all P rows per 8-column step instead read P
// lines a row stride apart, which for strides a multiple of 4 KB share one L1 set: each line
// was evicted before its second half was read, and P streams are more than the hardware
// prefetcher follows. Measured on AVX2 (Zen 4, one thread, x of 1024x1024 and 256x3072):
// 2.0-2.4x faster from L2/L3, 10-25% from DRAM.
template <class V>
void pack_panels(const float* src, int64_t M, int64_t C, int64_t ld, float* dst, int64_t c0,
                 int64_t c1) {
  constexpr int P = panel_width<V>();
  alignas(32) float zeros[8 * 8] = {};
  for (int64_t c = c0; c < c1; ++c) {
    float* panel = dst + c * C * P;
    for (int64_t i = 0; i < P; i += 8) {
      const int64_t m = c * P + i, rows = min64(8, M - m);
      for (int64_t k = 0; k < C; k += 8) {
        const int64_t cols = min64(8, C - k);
        if (rows <= 0) {
          transpose_block(zeros, 8, 8, cols, panel + k * P + i, P);
        } else if (rows == 8) {
          transpose_block(src + m * ld + k, ld, 8, cols, panel + k * P + i, P);
        } else {  // last rows of the batch: pad to 8 with zeros
          alignas(32) float block[8 * 8] = {};
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j) block[r * 8 + j] = src[(m + r) * ld + k + j];
          transpose_block(block, 8, 8, cols, panel + k * P + i, P);
        }
      }
    }
  }
}

// CSR conv image panels hold two vectors of images per channel row, half the linear panels'
// four: a padded image row of a 64-channel 32-wide map is then 139 KB, so the three input rows
// a row of output pixels reads stay in L2 (512 KB) while it is computed and the next two reuse
// them; at 278 KB a row each was fetched from L3 three times. The kernels keep 12 accumulators
// by taking twice the pixels per pass.
template <class V>
constexpr int conv_panel_width() {
  return 2 * V::L;
}
template <class V>
constexpr int conv_vectors() {
  return conv_panel_width<V>() / V::L;
}

// Zeroes lanes [lanes, P) of `rows` conv panel rows (the images past N of the last chunk).
template <class V>
SK_INLINE void zero_lanes(float* rows_begin, int64_t rows, int64_t lanes) {
  constexpr int P = conv_panel_width<V>();
  if (lanes >= P) return;
  for (int64_t r = 0; r < rows; ++r)
    __builtin_memset(rows_begin + r * P + lanes, 0, (P - lanes) * sizeof(float));
}

// Images -> CSR conv panels (kernels.h, ImagePanels), by 8x8 register transposes of eight images
// by eight pixels of a row (NCHW: one channel per unit, so each image's plane is read front to
// back and its pages stay in the TLB; a row per unit would touch every plane of the chunk, a
// page each) or by eight channels of a pixel (channels_last: one image row per unit).
template <class V>
void to_image_panels(const float* src, const sparsekern::cpu::ImagePanels& p, float* panels,
                     int64_t u0, int64_t u1) {
  constexpr int P = conv_panel_width<V>();
  const int64_t Hp = p.Hp(), Wp = p.Wp(), pixel = p.pixel_stride * P, chunk = Hp * Wp * pixel;
  const int64_t per_chunk = p.units_per_chunk();
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u / per_chunk, n0 = c * P, lanes = min64(P, p.N - n0);
    float* out = panels + c * chunk;
    const float* images = src + n0 * p.s_n;
    if (p.s_w == 1) {
      const int64_t ch = u % per_chunk;
      const auto zero_pixels = [&](int64_t hp, int64_t wp0, int64_t wp1) {
        for (int64_t wp = wp0; wp < wp1; ++wp)
          __builtin_memset(out + (hp * Wp + wp) * pixel + ch * P, 0, P * sizeof(float));
      };
      for (int64_t hp = 0; hp < Hp; ++hp) {
        if (hp < p.pad_h || hp >= p.pad_h + p.H) {
          zero_pixels(hp, 0, Wp);
          continue;
        }
        zero_pixels(hp, 0, p.pad_w);
        zero_pixels(hp, p.pad_w + p.W, Wp);
        float* interior = out + (hp * Wp + p.pad_w) * pixel + ch * P;
        const float* rows = images + ch * p.s_c + (hp - p.pad_h) * p.s_h;
        for (int64_t w = 0; w < p.W && lanes < P; ++w)
          zero_lanes<V>(interior + w * pixel, 1, lanes);
        // The same row of the next channel, into L2 for the next unit: 32 planes 256 KB apart
        // (one L1 set) read 32 bytes at a time are too many streams for the hardware prefetcher.
        if (ch + 1 < p.C)
          for (int64_t i = 0; i < lanes; ++i)
            for (int64_t w = 0; w < p.W; w += 16)
              _mm_prefetch(reinterpret_cast<const char*>(rows + p.s_c + i * p.s_n + w),
                           _MM_HINT_T1);
        // Eight images' rows at a time: the planes are 4 KB multiples apart, so one row of all
        // of the chunk's images falls into one L1 set and would be evicted between w blocks.
        for (int64_t i = 0; i < lanes; i += 8)
          for (int64_t w = 0; w < p.W; w += 8)
            transpose_block(rows + i * p.s_n + w, p.s_n, min64(8, lanes - i), min64(8, p.W - w),
                            interior + w * pixel + i, pixel);
      }
    } else {
      const int64_t h = u % per_chunk;
      float* row = out + (h + p.pad_h) * Wp * pixel;  // padded row h + pad_h
      if (h == 0) __builtin_memset(out, 0, p.pad_h * Wp * pixel * sizeof(float));
      if (h == p.H - 1)
        __builtin_memset(row + Wp * pixel, 0, p.pad_h * Wp * pixel * sizeof(float));
      __builtin_memset(row, 0, p.pad_w * pixel * sizeof(float));
      __builtin_memset(row + (p.pad_w + p.W) * pixel, 0, p.pad_w * pixel * sizeof(float));
      float* interior = row + p.pad_w * pixel;
      // The next image row, into L2 for the next unit (see above).
      if (h + 1 < p.H)
        for (int64_t i = 0; i < lanes; ++i)
          for (int64_t e = 0; e < p.W * p.s_w; e += 16)
            _mm_prefetch(reinterpret_cast<const char*>(images + i * p.s_n + (h + 1) * p.s_h + e),
                         _MM_HINT_T1);
      for (int64_t w = 0; w < p.W; ++w) {
        zero_lanes<V>(interior + w * pixel, p.C, lanes);
        for (int64_t ch = 0; ch < p.C; ch += 8)
          for (int64_t i = 0; i < lanes; i += 8)
            transpose_block(images + i * p.s_n + h * p.s_h + w * p.s_w + ch, p.s_n,
                            min64(8, lanes - i), min64(8, p.C - ch),
                            interior + w * pixel + ch * P + i, P);
      }
    }
  }
}

// CSR conv panels -> the interior of channels_last images (kernels.h, ImagePanels).
template <class V>
void from_image_panels(const float* panels, const sparsekern::cpu::ImagePanels& p, float* dst,
                       int64_t u0, int64_t u1) {
  constexpr int P = conv_panel_width<V>();
  const int64_t Wp = p.Wp(), pixel = p.pixel_stride * P, chunk = p.Hp() * Wp * pixel;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u / p.H, h = u % p.H, n0 = c * P, lanes = min64(P, p.N - n0);
    const float* interior = panels + c * chunk + ((h + p.pad_h) * Wp + p.pad_w) * pixel;
    float* images = dst + n0 * p.s_n + h * p.s_h;
    for (int64_t w = 0; w < p.W; ++w)
      for (int64_t ch = 0; ch < p.C; ch += 8)
        for (int64_t i = 0; i < lanes; i += 8)
          transpose_block(interior + w * pixel + ch * P + i, P, min64(8, p.C - ch),
                          min64(8, lanes - i), images + i * p.s_n + w * p.s_w + ch, p.s_n);
  }
}

// 8x8 register transposes: the strided gather torch's copy would do costs ~10x more.
template <class V>
void nchw_to_nhwc(const float* src, int64_t C, int64_t H, int64_t W, float* dst, int64_t Wp,
                  int64_t stride) {
  const int64_t plane = H * W;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; w += 8)
      for (int64_t c = 0; c < C; c += 8)
        transpose_block(src + c * plane + h * W + w, plane, min64(8, C - c), min64(8, W - w),
                        dst + (h * Wp + w) * stride + c, stride);
}

// The eight horizontal sums of a[0..8) in one vector, in order: the SDDMM adds them to its
// output with one load and store instead of eight scalar ones.
template <class V>
SK_INLINE __m256 hsum8(const typename V::reg (&a)[8]) {
  __m256 t[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) t[i] = _mm256_hadd_ps(V::half_sum(a[2 * i]), V::half_sum(a[2 * i + 1]));
  const __m256 u0 = _mm256_hadd_ps(t[0], t[1]), u1 = _mm256_hadd_ps(t[2], t[3]);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// acc[g] = the panel-row dot product of entry j + g with d, for G entries.
template <class V, int G>
SK_INLINE void sddmm_dots(typename V::reg (&acc)[G], const typename V::reg (&d)[4],
                          const float* x_panel, const int32_t* cols, int64_t j) {
  constexpr int MB = panel_width<V>();
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    const float* p = x_panel + int64_t(cols[j + g]) * MB;
    acc[g] = V::mul(d[0], V::load(p));
#pragma GCC unroll 3
    for (int i = 1; i < 4; ++i) acc[g] = V::fma(d[i], V::load(p + i * V::L), acc[g]);
  }
}

// A row's entries go by eight, then four, then one, so that a row's remainder (3.5 entries on
// average) is not reduced and stored one scalar at a time.
template <class V>
void csr_sddmm(const sparsekern::cpu::CsrSddmmArgs<float>& a, int64_t r0, int64_t r1) {
  constexpr int MB = panel_width<V>();
  const int32_t* rp = a.row_ptr;
  const int32_t* cols = a.col_idx;
  for (int64_t c = 0; c * MB < a.M; ++c) {
    const float* dy_panel = a.dy + c * a.R * MB;
    const float* x_panel = a.x + c * a.C * MB;
    const bool first = c == 0 && !a.accumulate;
    for (int64_t r = r0; r < r1; ++r) {
      typename V::reg d[4];
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) d[i] = V::load(dy_panel + r * MB + i * V::L);
      int64_t j = rp[r];
      const int64_t e = rp[r + 1];
      for (; j + 8 <= e; j += 8) {
        typename V::reg acc[8];
        sddmm_dots<V, 8>(acc, d, x_panel, cols, j);
        const __m256 s = hsum8<V>(acc);
        _mm256_storeu_ps(a.out + j, first ? s : _mm256_add_ps(_mm256_loadu_ps(a.out + j), s));
      }
      if (j + 4 <= e) {
        typename V::reg acc[4];
        sddmm_dots<V, 4>(acc, d, x_panel, cols, j);
        const __m128 s = hsum4<V>(acc[0], acc[1], acc[2], acc[3]);
        _mm_storeu_ps(a.out + j, first ? s : _mm_add_ps(_mm_loadu_ps(a.out + j), s));
        j += 4;
      }
      for (; j < e; ++j) {
        typename V::reg acc[1];
        sddmm_dots<V, 1>(acc, d, x_panel, cols, j);
        const float s = hsum1<V>(acc[0]);
        a.out[j] = first ? s : a.out[j] + s;
      }
    }
  }
}

// ---- CSR conv2d: batch panels of images (kernels.h) -----------------------------------------

// acc[p][i] += values[j] * window_p[col_off[j]] for PX output pixels at once: one broadcast
// weight and one index read serve 4*PX FMAs, where a row pair (the linear SpMM's tile) spends
// a broadcast and an index read on every 4 FMAs and keeps only 8 chains in flight. A conv has
// no row-pair reuse to lose: the pixels' windows overlap, so their panel rows share L1 lines.
template <class V, int PX>
SK_INLINE void conv_pixels_accumulate(typename V::reg (&acc)[PX][conv_vectors<V>()],
                                      const float* values, const int64_t* col_off,
                                      const float* const (&window)[PX], int64_t begin,
                                      int64_t end) {
  constexpr int MB = conv_panel_width<V>(), NV = conv_vectors<V>();
  for (int64_t j = begin; j < end; ++j) {
    const typename V::reg v = V::bcast(values + j);
    const int64_t off = col_off[j] * MB;
#pragma GCC unroll 12
    for (int p = 0; p < PX; ++p)
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i)
        acc[p][i] = V::fma(v, V::load(window[p] + off + i * V::L), acc[p][i]);
  }
}

// Per block of RB rows (outer, so that a pixel tile reads RB rows' weights, not all of them:
// the weights and the tile's windows together stay in L2), PX output pixels at a time, one
// column segment at a time (kernels.h): a pixel's whole window (kh*kw*C_in panel rows, ~150 KB
// at 256 channels) does not fit L1, one segment's share of the tile's windows does, and every
// row of the block reads it from there. Between segments the partial sums wait in `tile` (RB
// rows x PX pixels x the panel: 24 KB on AVX2), which the last segment leaves final; it is then
// transposed into y's NHWC rows while still in L1.
template <class V>
void csr_conv_forward(const sparsekern::cpu::CsrConvArgs<float>& a,
                      const sparsekern::cpu::ConvGeometry& g, const float* x, const float* bias,
                      float* y, int64_t r0, int64_t r1) {
  constexpr int MB = conv_panel_width<V>(), NV = conv_vectors<V>(), PXMAX = 12 / NV;
  constexpr int64_t RB = 64;
  const int64_t R = a.out_channels, S = a.segments, ldseg = S + 1, ldy = g.M * R;
  alignas(64) float tile[PXMAX][RB][MB];
  for (int64_t c = 0; c < a.chunks; ++c) {
    const float* panel = x + c * a.in_rows * MB;
    const int64_t lanes = min64(MB, a.images - c * MB);
    float* y_chunk = y + c * MB * ldy;
    for (int64_t rb = r0; rb < r1; rb += RB) {
      const int64_t re = min64(r1, rb + RB);
      balanced_tiles<PXMAX>(0, g.M, [&](int64_t m0, int64_t pixels) {
        with_rows<PXMAX>(pixels, [&](auto px) {
          constexpr int PX = decltype(px)::value;
          const float* window[PX];
#pragma GCC unroll 16
          for (int p = 0; p < PX; ++p) window[p] = panel + g.pix_off[m0 + p] * MB;
          for (int64_t b = 0; b < S; ++b)
            for (int64_t r = rb; r < re; ++r) {
              const int32_t* seg = a.seg_ptr + r * ldseg + b;
              typename V::reg acc[PX][NV];
#pragma GCC unroll 16
              for (int p = 0; p < PX; ++p)
#pragma GCC unroll 16
                for (int i = 0; i < NV; ++i)
                  acc[p][i] = b > 0 ? V::load(tile[p][r - rb] + i * V::L)
                                    : bias ? V::bcast(bias + r) : V::zero();
              conv_pixels_accumulate<V, PX>(acc, a.values, a.col_off, window, seg[0], seg[1]);
#pragma GCC unroll 16
              for (int p = 0; p < PX; ++p)
#pragma GCC unroll 16
                for (int i = 0; i < NV; ++i) V::store(tile[p][r - rb] + i * V::L, acc[p][i]);
            }
          for (int p = 0; p < PX; ++p)
            for (int64_t i = 0; i < lanes; i += 8)
              for (int64_t r = rb; r < re; r += 8)
                transpose_block(tile[p][r - rb] + i, MB, min64(8, re - r), min64(8, lanes - i),
                                y_chunk + i * ldy + (m0 + p) * R + r, ldy);
        });
      });
    }
  }
}

// dX by scatter over input channels [c0, c1) (kernels.h): per group of PG output pixels,
// channel and tap, the entries of that column are reduced in registers, then added to dx once.
// Blocks of CB channels are the outer loop (a pixel group then reads CB channels' weights, not
// all of them), pixels the next, so that a pixel's dy panel rows (C_out of them) stay in L1 for
// every column.
template <class V>
void csr_conv_grad_input(const sparsekern::cpu::CsrConvArgs<float>& a,
                         const sparsekern::cpu::ConvGeometry& g, const int32_t* t_rows,
                         const float* dy, float* dx, int64_t c0, int64_t c1) {
  constexpr int MB = conv_panel_width<V>(), NV = conv_vectors<V>(), PG = 8 / NV;
  constexpr int64_t CB = 16;
  const int64_t R = a.out_channels, taps = g.taps, M = g.M;
  const int32_t* cp = a.row_ptr;
  for (int64_t c = 0; c < a.chunks; ++c) {
    const float* dy_panel = dy + c * M * R * MB;
    float* dx_panel = dx + c * a.in_rows * MB;
    for (int64_t cb = c0; cb < c1; cb += CB)
    for (int64_t m = 0; m < M; m += PG) {
      const int64_t pixels = min64(PG, M - m);
      const float* d = dy_panel + m * R * MB;
      for (int64_t ch = cb; ch < min64(c1, cb + CB); ++ch)
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t q0 = cp[ch * taps + t], q1 = cp[ch * taps + t + 1];
          if (q0 == q1) continue;
          typename V::reg acc[PG][NV];
#pragma GCC unroll 16
          for (int p = 0; p < PG; ++p)
#pragma GCC unroll 4
            for (int i = 0; i < NV; ++i) acc[p][i] = V::zero();
          for (int64_t q = q0; q < q1; ++q) {
            const typename V::reg v = V::bcast(a.values + q);
            const float* d0 = d + int64_t(t_rows[q]) * MB;
#pragma GCC unroll 16
            for (int p = 0; p < PG; ++p) {
              // The group's missing pixels (the last of M) reread pixel 0; never stored.
              const float* dp = d0 + (p < pixels ? p : 0) * R * MB;
#pragma GCC unroll 4
              for (int i = 0; i < NV; ++i) acc[p][i] = V::fma(v, V::load(dp + i * V::L), acc[p][i]);
            }
          }
          const int64_t offset = g.tap_off[t] + ch;
          for (int p = 0; p < pixels; ++p) {
            float* out = dx_panel + (g.pix_off[m + p] + offset) * MB;
#pragma GCC unroll 4
            for (int i = 0; i < NV; ++i)
              V::store(out + i * V::L, V::add(V::load(out + i * V::L), acc[p][i]));
          }
        }
    }
  }
}

// dw[j] for rows [r0, r1), blocked like the forward: for RB rows and one column segment at a
// time, every pixel's segment window (L1) meets the RB rows' dy (L1) and adds into one vector of
// partial sums per stored weight (the segment's share of them, also L1), reduced to dw at the
// end. Sweeping all pixels per stored weight instead re-reads each input line from L3.
template <class V>
void csr_conv_grad_weight(const sparsekern::cpu::CsrConvArgs<float>& a,
                          const sparsekern::cpu::ConvGeometry& g, const float* dy,
                          const float* x, float* dw, int64_t r0, int64_t r1) {
  constexpr int MB = conv_panel_width<V>(), NV = conv_vectors<V>(), PXMAX = 8 / NV;
  constexpr int64_t RB = 64;
  const int64_t R = a.out_channels, M = g.M, S = a.segments, ldseg = S + 1;
  const int32_t* rp = a.row_ptr;
  const int64_t* col_off = a.col_off;
  // Sized for the largest row block. Plain new[]: a std::vector here would instantiate inline
  // library code under this file's target pragma (see the top of the file).
  int64_t most = 0;
  for (int64_t rb = r0; rb < r1; rb += RB) {
    const int64_t n = rp[min64(r1, rb + RB)] - rp[rb];
    most = n > most ? n : most;
  }
  float* const partial_store = new float[(most + 1) * V::L];
  for (int64_t rb = r0; rb < r1; rb += RB) {
    const int64_t re = min64(r1, rb + RB), base = rp[rb];
    float* partial = partial_store - base * V::L;  // partial + j * L: entry j's vector
    for (int64_t j = rp[rb]; j < rp[re]; ++j) V::store(partial + j * V::L, V::zero());
    for (int64_t c = 0; c < a.chunks; ++c) {
      const float* dy_chunk = dy + c * M * R * MB;
      const float* panel = x + c * a.in_rows * MB;
      for (int64_t b = 0; b < S; ++b)
        balanced_tiles<PXMAX>(0, M, [&](int64_t m0, int64_t pixels) {
          with_rows<PXMAX>(pixels, [&](auto px) {
            // PX pixels per pass: each stored weight's partial sum is loaded and stored once
            // for all of them, and the pixels' products form PX chains instead of one.
            constexpr int PX = decltype(px)::value;
            const float* window[PX];
            const float* dy_pixel[PX];
#pragma GCC unroll 8
            for (int q = 0; q < PX; ++q) {
              window[q] = panel + g.pix_off[m0 + q] * MB;
              dy_pixel[q] = dy_chunk + (m0 + q) * R * MB;
            }
            for (int64_t r = rb; r < re; ++r) {
              const int32_t* seg = a.seg_ptr + r * ldseg + b;
              if (seg[0] == seg[1]) continue;
              typename V::reg d[PX][NV];
#pragma GCC unroll 8
              for (int q = 0; q < PX; ++q)
#pragma GCC unroll 4
                for (int i = 0; i < NV; ++i) d[q][i] = V::load(dy_pixel[q] + r * MB + i * V::L);
              for (int64_t j = seg[0]; j < seg[1]; ++j) {
                typename V::reg acc[PX];
#pragma GCC unroll 8
                for (int q = 0; q < PX; ++q) {
                  const float* p = window[q] + col_off[j] * MB;
                  acc[q] = q == 0 ? V::load(partial + j * V::L) : V::zero();
#pragma GCC unroll 4
                  for (int i = 0; i < NV; ++i)
                    acc[q] = V::fma(d[q][i], V::load(p + i * V::L), acc[q]);
                }
#pragma GCC unroll 8
                for (int half = 1; half < PX; half *= 2)  // pairwise: a tree, not a chain
#pragma GCC unroll 8
                  for (int q = 0; q + half < PX; q += 2 * half) acc[q] = V::add(acc[q], acc[q + half]);
                V::store(partial + j * V::L, acc[0]);
              }
            }
          });
        });
    }
    for (int64_t j = rp[rb]; j < rp[re]; ++j) dw[j] = hsum1<V>(V::load(partial + j * V::L));
  }
  delete[] partial_store;
}

template <class Vw>
constexpr sparsekern::cpu::KernelTable<float> make_table(const char* name) {
  return {name,
          panel_width<Vw>(),
          conv_panel_width<Vw>(),
          &bsr_forward<Vw>,
          &bsr_transpose_blocks<Vw>,
          &bsr_grad_weight<Vw>,
          &csr_spmm<Vw>,
          &csr_sddmm<Vw>,
          &pack_panels<Vw>,
          &to_image_panels<Vw>,
          &from_image_panels<Vw>,
          &nchw_to_nhwc<Vw>,
          &bsr_conv_forward<Vw>,
          &bsr_conv_grad_input<Vw>,
          &bsr_conv_grad_weight<Vw>,
          &csr_conv_forward<Vw>,
          &csr_conv_grad_input<Vw>,
          &csr_conv_grad_weight<Vw>};
}

}  // namespace
