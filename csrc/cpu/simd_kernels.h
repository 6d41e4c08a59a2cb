// SIMD microkernels, written once over a vector type V and instantiated per instruction set by
// isa_avx2.cpp / isa_avx512.cpp (each under its own `#pragma GCC target`). Include nothing here
// but <immintrin.h> and kernels.h: see kernels.h for why.
//
// Two register-tile shapes cover every product:
//  * rank-1 form  C[r][v] += A[r, t] * B[t, v-th vector]   (broadcast A, vector loads of B):
//    BSR forward (A = x rows, B = stored block, contraction over kk) and BSR dW (A = x columns,
//    B = dy rows, contraction over the batch). Accumulators live across a whole block row.
//  * dot form     C[r][j] += <A row r, B row j>            (vector loads of both, reduced once):
//    BSR dX, whose stored blocks are contiguous along n, the contraction axis.
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

struct V8 {
  using reg = __m256;
  static constexpr int L = 8;
  static SK_INLINE reg zero() { return _mm256_setzero_ps(); }
  static SK_INLINE reg load(const float* p) { return _mm256_loadu_ps(p); }
  static SK_INLINE void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static SK_INLINE reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static SK_INLINE reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static SK_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
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

// acc[r][v] += sum_{t<T} A[r*a_rs + t*a_ts] * B[t*b_s + v*L]
template <class V, int MR, int NV>
SK_INLINE void rank1_update(typename V::reg (&acc)[MR][NV], const float* A, int64_t a_rs,
                            int64_t a_ts, const float* B, int64_t b_s, int64_t T) {
  const float* a_row[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a_row[r] = A + r * a_rs;
  for (int64_t t = 0; t < T; ++t) {
    typename V::reg b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = V::load(B + t * b_s + v * V::L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::reg a = V::bcast(a_row[r] + t * a_ts);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, b[v], acc[r][v]);
    }
  }
}

// Tile rows for the rank-1 form: as many as the register file holds next to NV operand vectors.
template <class V, int NV>
constexpr int rank1_rows() {
  return NV == 2 ? (V::L == 16 ? 12 : 6) : 12;
}

template <class V, int NV>
void bsr_forward_impl(const sparsekern::cpu::BsrArgs<float>& a, const float* x, int64_t ldx,
                      const float* bias, float* y, int64_t ldy, int64_t i0, int64_t i1,
                      int64_t m0, int64_t m1) {
  constexpr int MR = rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  const int64_t bn = a.bn, bk = a.bk, block = bn * bk;
  for (int64_t I = i0; I < i1; ++I) {
    const int64_t p0 = a.row_ptr[I], p1 = a.row_ptr[I + 1];
    for (int64_t n0 = 0; n0 < bn; n0 += NT) {
      const float* bias_tile = bias ? bias + I * bn + n0 : nullptr;
      const float* w_tile = a.values + n0;
      for (int64_t m = m0; m < m1; m += MR) {
        with_rows<MR>(m1 - m, [&](auto R) {
          constexpr int rows = decltype(R)::value;
          typename V::reg acc[rows][NV];
          for (int r = 0; r < rows; ++r)
            for (int v = 0; v < NV; ++v)
              acc[r][v] = bias_tile ? V::load(bias_tile + v * V::L) : V::zero();
          const float* x_tile = x + m * ldx;
          for (int64_t p = p0; p < p1; ++p)
            rank1_update<V, rows, NV>(acc, x_tile + a.col_idx[p] * bk, ldx, 1,
                                      w_tile + p * block, bn, bk);
          float* y_tile = y + m * ldy + I * bn + n0;
          for (int r = 0; r < rows; ++r)
            for (int v = 0; v < NV; ++v) V::store(y_tile + r * ldy + v * V::L, acc[r][v]);
        });
      }
    }
  }
}

template <class V, int NV>
void bsr_grad_weight_impl(const sparsekern::cpu::BsrArgs<float>& a, const float* dy,
                          int64_t lddy, const float* x, int64_t ldx, float* dw, int64_t i0,
                          int64_t i1) {
  constexpr int MR = rank1_rows<V, NV>();
  constexpr int NT = NV * V::L;
  const int64_t bn = a.bn, bk = a.bk, block = bn * bk;
  for (int64_t I = i0; I < i1; ++I) {
    for (int64_t p = a.row_ptr[I]; p < a.row_ptr[I + 1]; ++p) {
      const float* x_block = x + a.col_idx[p] * bk;
      float* dw_block = dw + p * block;
      for (int64_t n0 = 0; n0 < bn; n0 += NT) {
        const float* dy_tile = dy + I * bn + n0;
        for (int64_t kk = 0; kk < bk; kk += MR) {
          with_rows<MR>(bk - kk, [&](auto R) {
            constexpr int rows = decltype(R)::value;
            typename V::reg acc[rows][NV];
            for (int r = 0; r < rows; ++r)
              for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
            rank1_update<V, rows, NV>(acc, x_block + kk, 1, ldx, dy_tile, lddy, a.M);
            for (int r = 0; r < rows; ++r)
              for (int v = 0; v < NV; ++v)
                V::store(dw_block + (kk + r) * bn + n0 + v * V::L, acc[r][v]);
          });
        }
      }
    }
  }
}

// Dot-form tile rows: KR=4 outputs per row, MR rows, plus MR operand registers and one spare.
template <class V>
constexpr int dot_rows() {
  return V::L == 16 ? 6 : 3;
}

template <class V>
void bsr_grad_input_impl(const sparsekern::cpu::BsrArgs<float>& a, const float* dy,
                         int64_t lddy, float* dx, int64_t lddx, int64_t j0, int64_t j1,
                         int64_t m0, int64_t m1) {
  constexpr int MR = dot_rows<V>();
  constexpr int KR = 4;
  const int64_t bn = a.bn, bk = a.bk, block = bn * bk;
  for (int64_t J = j0; J < j1; ++J) {
    const int64_t q0 = a.col_ptr[J], q1 = a.col_ptr[J + 1];
    for (int64_t kk = 0; kk < bk; kk += KR) {
      for (int64_t m = m0; m < m1; m += MR) {
        with_rows<MR>(m1 - m, [&](auto R) {
          constexpr int rows = decltype(R)::value;
          typename V::reg acc[rows][KR];
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < KR; ++j) acc[r][j] = V::zero();
          for (int64_t q = q0; q < q1; ++q) {
            const float* w = a.values + a.perm[q] * block + kk * bn;
            const float* d = dy + m * lddy + a.row_idx[q] * bn;
            for (int64_t n = 0; n < bn; n += V::L) {
              typename V::reg dv[rows];
#pragma GCC unroll 16
              for (int r = 0; r < rows; ++r) dv[r] = V::load(d + r * lddy + n);
#pragma GCC unroll 4
              for (int j = 0; j < KR; ++j) {
                const typename V::reg wv = V::load(w + j * bn + n);
#pragma GCC unroll 16
                for (int r = 0; r < rows; ++r) acc[r][j] = V::fma(dv[r], wv, acc[r][j]);
              }
            }
          }
          float* dx_tile = dx + m * lddx + J * bk + kk;
          for (int r = 0; r < rows; ++r)
            _mm_storeu_ps(dx_tile + r * lddx,
                          hsum4<V>(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
        });
      }
    }
  }
}

// Widest vector type whose lane count divides `width` gets the work; 8 always does (bn, bk >= 8).
template <class Vw, template <class, int> class Fn, class... Args>
SK_INLINE void by_width(int64_t width, Args... args) {
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
  by_width<Vw, ForwardFn>(a.bn, a, x, ldx, bias, y, ldy, i0, i1, m0, m1);
}

template <class Vw>
void bsr_grad_weight(const sparsekern::cpu::BsrArgs<float>& a, const float* dy, int64_t lddy,
                     const float* x, int64_t ldx, float* dw, int64_t i0, int64_t i1) {
  by_width<Vw, GradWeightFn>(a.bn, a, dy, lddy, x, ldx, dw, i0, i1);
}

template <class Vw>
void bsr_grad_input(const sparsekern::cpu::BsrArgs<float>& a, const float* dy, int64_t lddy,
                    float* dx, int64_t lddx, int64_t j0, int64_t j1, int64_t m0, int64_t m1) {
  if (a.bn % Vw::L == 0) {
    bsr_grad_input_impl<Vw>(a, dy, lddy, dx, lddx, j0, j1, m0, m1);
  } else {
    bsr_grad_input_impl<V8>(a, dy, lddy, dx, lddx, j0, j1, m0, m1);
  }
}

// ---- CSR ----------------------------------------------------------------------------------

template <class V>
constexpr int panel_width() {
  return 4 * V::L;
}

template <class V>
SK_INLINE void spmm_accumulate(typename V::reg (&acc)[4], const float* panel, const float* values,
                               const int32_t* cols, int64_t begin, int64_t end) {
  constexpr int MB = panel_width<V>();
  for (int64_t j = begin; j < end; ++j) {
    const typename V::reg v = V::bcast(values + j);
    const float* p = panel + int64_t(cols[j]) * MB;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[i] = V::fma(v, V::load(p + i * V::L), acc[i]);
  }
}

template <class V>
void csr_spmm(const sparsekern::cpu::CsrSpmmArgs<float>& a, int64_t r0, int64_t r1) {
  constexpr int MB = panel_width<V>();
  const int32_t* rp = a.row_ptr;
  const int32_t* cols = a.col_idx;
  const float* vals = a.values;
  alignas(64) float tile[2][MB];
  for (int64_t c = 0; c * MB < a.M; ++c) {
    const float* panel = a.panels + c * a.C * MB;
    const int64_t m0 = c * MB, mv = min64(MB, a.M - m0);
    float* out = a.out + m0 * a.ldo;
    for (int64_t r = r0; r < r1; r += 2) {
      const bool pair = r + 1 < r1;
      typename V::reg acc0[4], acc1[4];
      const typename V::reg b0 = a.bias ? V::bcast(a.bias + r) : V::zero();
      const typename V::reg b1 = a.bias && pair ? V::bcast(a.bias + r + 1) : V::zero();
      for (int i = 0; i < 4; ++i) {
        acc0[i] = b0;
        acc1[i] = b1;
      }
      int64_t j0 = rp[r];
      const int64_t e0 = rp[r + 1];
      int64_t j1 = pair ? rp[r + 1] : 0;
      const int64_t e1 = pair ? rp[r + 2] : 0;
      const int64_t common = min64(e0 - j0, e1 - j1);
      for (int64_t t = 0; t < common; ++t, ++j0, ++j1) {
        const typename V::reg v0 = V::bcast(vals + j0);
        const typename V::reg v1 = V::bcast(vals + j1);
        const float* p0 = panel + int64_t(cols[j0]) * MB;
        const float* p1 = panel + int64_t(cols[j1]) * MB;
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          acc0[i] = V::fma(v0, V::load(p0 + i * V::L), acc0[i]);
          acc1[i] = V::fma(v1, V::load(p1 + i * V::L), acc1[i]);
        }
      }
      spmm_accumulate<V>(acc0, panel, vals, cols, j0, e0);
      spmm_accumulate<V>(acc1, panel, vals, cols, j1, e1);
      for (int i = 0; i < 4; ++i) {
        V::store(tile[0] + i * V::L, acc0[i]);
        V::store(tile[1] + i * V::L, acc1[i]);
      }
      // The tile is [rows r, r+1] x [MB batch rows]: written as columns of the row-major output.
      for (int64_t i = 0; i < mv; ++i) out[i * a.ldo + r] = tile[0][i];
      if (pair)
        for (int64_t i = 0; i < mv; ++i) out[i * a.ldo + r + 1] = tile[1][i];
    }
  }
}

template <class V>
void csr_sddmm(const sparsekern::cpu::CsrSddmmArgs<float>& a, int64_t r0, int64_t r1) {
  constexpr int MB = panel_width<V>();
  constexpr int G = 8;  // stored scalars reduced together
  const int32_t* rp = a.row_ptr;
  const int32_t* cols = a.col_idx;
  alignas(32) float sums[G];
  for (int64_t c = 0; c * MB < a.M; ++c) {
    const float* dy_panel = a.dy + c * a.R * MB;
    const float* x_panel = a.x + c * a.C * MB;
    const bool first = c == 0;
    for (int64_t r = r0; r < r1; ++r) {
      typename V::reg d[4];
      for (int i = 0; i < 4; ++i) d[i] = V::load(dy_panel + r * MB + i * V::L);
      int64_t j = rp[r];
      const int64_t e = rp[r + 1];
      for (; j + G <= e; j += G) {
        typename V::reg acc[G];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
          const float* p = x_panel + int64_t(cols[j + g]) * MB;
          acc[g] = V::mul(d[0], V::load(p));
#pragma GCC unroll 3
          for (int i = 1; i < 4; ++i) acc[g] = V::fma(d[i], V::load(p + i * V::L), acc[g]);
        }
        _mm_store_ps(sums, hsum4<V>(acc[0], acc[1], acc[2], acc[3]));
        _mm_store_ps(sums + 4, hsum4<V>(acc[4], acc[5], acc[6], acc[7]));
        for (int g = 0; g < G; ++g) a.out[j + g] = first ? sums[g] : a.out[j + g] + sums[g];
      }
      for (; j < e; ++j) {
        const float* p = x_panel + int64_t(cols[j]) * MB;
        typename V::reg acc = V::mul(d[0], V::load(p));
        for (int i = 1; i < 4; ++i) acc = V::fma(d[i], V::load(p + i * V::L), acc);
        const float s = hsum1<V>(acc);
        a.out[j] = first ? s : a.out[j] + s;
      }
    }
  }
}

template <class Vw>
constexpr sparsekern::cpu::KernelTable<float> make_table(const char* name) {
  return {name,
          panel_width<Vw>(),
          &bsr_forward<Vw>,
          &bsr_grad_input<Vw>,
          &bsr_grad_weight<Vw>,
          &csr_spmm<Vw>,
          &csr_sddmm<Vw>};
}

}  // namespace
