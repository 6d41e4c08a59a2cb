// CPU implementations of the conv2d ops: implicit GEMM over the (C_out, C_in*kh*kw) view.
//
// Each call zero-pads its input once into NHWC (the layout conversion a channels_first input
// needs anyway, fused with the padding) and describes the convolution to the kernels by two
// offset arrays (ConvGeometry, kernels.h): where each output pixel's window starts and where each
// tap lies inside it. No im2col is built: kernels read the padded input in place. (The BSR
// forward pads implicitly, reading a channels_last input as it is.) Outputs and dX
// are channels_last, so a chain of sparse convs (with BatchNorm/ReLU between them, which keep the
// memory format) converts layout at most once, at the first layer.
#include <torch/library.h>

#include <array>

#include "common.h"

namespace sparsekern::cpu {
namespace {

using Pair = std::array<int64_t, 2>;

Pair pair_arg(at::IntArrayRef v, const char* op, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", name, " entries must be >= ", min, ", got ",
              v);
  return {v[0], v[1]};
}

void check_activation(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float64 or bfloat16 on the CPU, got ",
              t.scalar_type());
}

// Everything about one convolution's shape, checked once.
struct Conv {
  int64_t N, C, H, W;      // input (C = channels the kernels see: padded to whole blocks)
  int64_t kh, kw, OH, OW;  // kernel and output size
  Pair stride, padding, dilation;
  int64_t Hp() const { return H + 2 * padding[0]; }
  int64_t Wp() const { return W + 2 * padding[1]; }
  int64_t taps() const { return kh * kw; }
  int64_t pixels() const { return OH * OW; }
};

Conv make_conv(const char* op, int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh,
               int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation) {
  Conv c{N, C, H, W, kh, kw, 0, 0, pair_arg(stride, op, "stride", 1),
         pair_arg(padding, op, "padding", 0), pair_arg(dilation, op, "dilation", 1)};
  TORCH_CHECK(kh > 0 && kw > 0, op, ": kernel size must be positive, got ", kh, "x", kw);
  const int64_t span_h = c.dilation[0] * (kh - 1) + 1, span_w = c.dilation[1] * (kw - 1) + 1;
  TORCH_CHECK(c.Hp() >= span_h && c.Wp() >= span_w, op, ": the padded input (", c.Hp(), "x",
              c.Wp(), ") is smaller than the dilated kernel (", span_h, "x", span_w, ")");
  c.OH = (c.Hp() - span_h) / c.stride[0] + 1;
  c.OW = (c.Wp() - span_w) / c.stride[1] + 1;
  return c;
}

// Offsets in elements of the padded NHWC input with `channels` per pixel; `images` = how many
// images the pixel list spans (N for BSR, 1 for the per-image offsets of CSR panels). tap_mask
// is empty except for implicit padding (implicit_geometry).
struct GeometryArrays {
  std::vector<int64_t> pix_off, tap_off;
  std::vector<uint64_t> tap_mask;
  ConvGeometry view() const {
    return {int64_t(pix_off.size()), int64_t(tap_off.size()), pix_off.data(), tap_off.data(),
            tap_mask.empty() ? nullptr : tap_mask.data()};
  }
};

GeometryArrays geometry(const Conv& c, int64_t channels, int64_t images) {
  GeometryArrays g;
  g.pix_off.reserve(images * c.pixels());
  for (int64_t n = 0; n < images; ++n)
    for (int64_t oh = 0; oh < c.OH; ++oh)
      for (int64_t ow = 0; ow < c.OW; ++ow)
        g.pix_off.push_back(((n * c.Hp() + oh * c.stride[0]) * c.Wp() + ow * c.stride[1]) *
                            channels);
  for (int64_t dh = 0; dh < c.kh; ++dh)
    for (int64_t dw = 0; dw < c.kw; ++dw)
      g.tap_off.push_back((dh * c.dilation[0] * c.Wp() + dw * c.dilation[1]) * channels);
  return g;
}

// Channels stored per pixel of a CSR image panel: C plus one unused, so that pixels are not a
// multiple of 4 KB apart (a pixel's panel rows span C * panel floats, 32 KB at 256 channels).
// With power-of-two channel counts every tap and neighbouring pixel of a window would fall into
// the same L1 set (8 ways) and the windows the kernels read would thrash L1. The BSR kernels read
// 128-byte runs of 6 pixels and need no such padding.
int64_t panel_pixel_stride(int64_t channels) { return channels + 1; }

// [N, C, H, W] (any memory format) -> NHWC [N, H + 2 ph, W + 2 pw, channels] zero-padded by
// (ph, pw) (channels >= C: ragged channel blocks or a padded pixel stride), in one pass, into
// this thread's scratch `slot` (so for the kernels only); no copy when nothing needs to change.
Tensor padded_nhwc(const Tensor& x, int64_t ph, int64_t pw, int64_t channels, PanelSlot slot) {
  const Tensor nhwc = x.permute({0, 2, 3, 1});
  if (ph == 0 && pw == 0 && channels == x.size(1) && nhwc.is_contiguous()) return nhwc;
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), Hp = H + 2 * ph, Wp = W + 2 * pw;
  // Zero only what the copy does not write: the border rows/columns and the extra channels.
  Tensor out = panel_scratch(slot, {N, Hp, Wp, channels}, x.options());
  if (ph > 0) {
    out.narrow(1, 0, ph).zero_();
    out.narrow(1, ph + H, ph).zero_();
  }
  Tensor rows = out.narrow(1, ph, H);
  if (pw > 0) {
    rows.narrow(2, 0, pw).zero_();
    rows.narrow(2, pw + W, pw).zero_();
  }
  Tensor interior = rows.narrow(2, pw, W);
  if (channels > x.size(1)) interior.narrow(3, x.size(1), channels - x.size(1)).zero_();
  const KernelTable<float>* k = float_kernels();
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && k->nchw_to_nhwc) {
    // An NCHW input (a model's first sparse conv): transposed by 8x8 register tiles.
    const float* src = x.data_ptr<float>();
    float* dst = interior.data_ptr<float>();
    const int64_t C = x.size(1), image = C * H * W, padded_image = Hp * Wp * channels;
    // Without width padding the interior rows are contiguous: one row of H*W pixels has fewer
    // edge blocks than H rows of W (a 7x7 map: one instead of seven per 8 channels).
    const bool flat = pw == 0;
    const int64_t rows_h = flat ? 1 : H, row_w = flat ? H * W : W, row_wp = flat ? H * W : Wp;
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        k->nchw_to_nhwc(src + n * image, C, rows_h, row_w, dst + n * padded_image, row_wp,
                        channels);
    });
  } else {
    interior.narrow(3, 0, x.size(1)).copy_(nhwc);
  }
  return out;
}

// The interior of a padded NHWC gradient as a channels_last [N, C, H, W] tensor (a view when
// there is nothing to crop).
Tensor crop_nhwc(const Tensor& padded, const Conv& c, int64_t C) {
  if (c.padding[0] == 0 && c.padding[1] == 0 && padded.size(3) == C && padded.is_contiguous())
    return padded.permute({0, 3, 1, 2});
  Tensor out = at::empty({c.N, C, c.H, c.W},
                         padded.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.copy_(padded.narrow(1, c.padding[0], c.H).narrow(2, c.padding[1], c.W).narrow(3, 0, C)
                .permute({0, 3, 1, 2}));
  return out;
}

// grad_out [N, C_out, OH, OW] -> NHWC rows [N*OH*OW, cols] (cols >= C_out: ragged blocks).
Tensor rows_nhwc(const Tensor& grad_out, int64_t cols) {
  const Tensor nhwc = grad_out.permute({0, 2, 3, 1}).contiguous();
  return padded_cols(nhwc.view({-1, grad_out.size(1)}), cols);
}

// The block row of every stored block (int32 [nnzb]).
Tensor expand_rows(const Tensor& ptr, int64_t rows, int64_t nnz) {
  Tensor out = at::empty({nnz}, ptr.options());
  const int32_t* p = ptr.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int32_t j = p[r]; j < p[r + 1]; ++j) o[j] = int32_t(r);
  return out;
}

Tensor channels_last_empty(const Tensor& like, int64_t N, int64_t C, int64_t H, int64_t W) {
  return at::empty({N, C, H, W}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// ---- BSR -----------------------------------------------------------------------------------

// Output pixels per unit of forward work: their input rows (channels floats each, times the
// window's overlap) should stay in L2 while every block row of the weight sweeps them. Sweeping
// all pixels per block row instead streams the activations from DRAM once per block row.
int64_t pixel_chunk(int64_t channels) {
  return std::clamp<int64_t>(32768 / std::max<int64_t>(channels, 1), 48, 384);
}

// fn(i0, i1, m0, m1) over chunks of `chunk` pixels x all block rows; only when there are too
// few chunks to feed every thread are the block rows split as well.
template <class F>
void parallel_pixels_rows(int64_t M, int64_t chunk, int64_t rows, F fn) {
  if (M == 0 || rows == 0) return;
  const int64_t chunks = ceil_div(M, chunk), want = 2 * at::get_num_threads();
  const int64_t groups = std::min<int64_t>(rows, ceil_div(want, chunks));
  at::parallel_for(0, chunks * groups, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t c = w / groups, grp = w % groups, m0 = c * chunk;
      fn(rows * grp / groups, rows * (grp + 1) / groups, m0, std::min(M, m0 + chunk));
    }
  });
}

// A 1x1 stride-1 conv without padding is a linear layer over the NHWC pixels: the conv's
// values [nnzb][1][1][bk][bn] are the linear kernels' blocks [nnzb][bk][bn].
bool pointwise(const Conv& c) {
  return c.taps() == 1 && c.stride[0] == 1 && c.stride[1] == 1 && c.padding[0] == 0 &&
         c.padding[1] == 0;
}

// A padded conv with whole channel blocks pads implicitly: a channels_last input is read in
// place, an NCHW one only transposed. The padded copy was a read and a write of the whole
// activation, as long as a small-channel layer's kernel takes to read it once. Offsets are
// those of a virtually padded input, relative to the unpadded one, and tap_mask (kernels.h)
// says which taps of each output pixel fall inside it.

bool implicit_padding(const Tensor& x, const Conv& c) {
  return (c.padding[0] > 0 || c.padding[1] > 0) && c.C == x.size(1) && c.taps() <= 64;
}

GeometryArrays implicit_geometry(const Conv& c) {
  GeometryArrays g;
  for (int64_t dh = 0; dh < c.kh; ++dh)
    for (int64_t dw = 0; dw < c.kw; ++dw)
      g.tap_off.push_back((dh * c.dilation[0] * c.W + dw * c.dilation[1]) * c.C);
  // One image's offsets and masks, then every image's: the masks do not depend on the image.
  const int64_t P = c.pixels(), image = c.H * c.W * c.C;
  g.pix_off.resize(std::max<int64_t>(c.N, 1) * P);
  g.tap_mask.resize(std::max<int64_t>(c.N, 1) * P);
  for (int64_t oh = 0; oh < c.OH; ++oh)
    for (int64_t ow = 0; ow < c.OW; ++ow) {
      const int64_t ih = oh * c.stride[0] - c.padding[0], iw = ow * c.stride[1] - c.padding[1];
      uint64_t mask = 0;
      for (int64_t dh = 0; dh < c.kh; ++dh)
        for (int64_t dw = 0; dw < c.kw; ++dw) {
          const int64_t h = ih + dh * c.dilation[0], w = iw + dw * c.dilation[1];
          if (h >= 0 && h < c.H && w >= 0 && w < c.W) mask |= uint64_t(1) << (dh * c.kw + dw);
        }
      g.pix_off[oh * c.OW + ow] = (ih * c.W + iw) * c.C;
      g.tap_mask[oh * c.OW + ow] = mask;
    }
  for (int64_t n = 1; n < c.N; ++n)
    for (int64_t j = 0; j < P; ++j) {
      g.pix_off[n * P + j] = n * image + g.pix_off[j];
      g.tap_mask[n * P + j] = g.tap_mask[j];
    }
  g.pix_off.resize(c.N * P);
  g.tap_mask.resize(c.N * P);
  return g;
}

struct BsrConvShape {
  int64_t kh, kw, bk, bn, nnzb;
};

BsrConvShape check_bsr_conv_values(const Tensor& values, const char* op) {
  TORCH_CHECK(values.dim() == 5, op,
              ": values must be [nnz_blocks, kh, kw, block_k, block_n], got shape ",
              values.sizes());
  const int64_t bk = values.size(3), bn = values.size(4);
  TORCH_CHECK(bk % 8 == 0 && bn % 8 == 0 && bk > 0 && bn > 0, op,
              ": block dims must be positive multiples of 8, got block_k=", bk, " block_n=", bn);
  return {values.size(1), values.size(2), bk, bn, values.size(0)};
}

Tensor bsr_conv2d(const Tensor& x, const Tensor& values, const Tensor& block_row_ptr,
                  const Tensor& block_col_idx, const Tensor& block_col_ptr,
                  const Tensor& block_row_idx, const Tensor& block_perm,
                  const std::optional<Tensor>& bias, int64_t out_channels,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "sparsekern.bsr_conv2d";
  check_activation(x, op, "x");
  check_float(values, op, "values", x);
  if (bias) check_float(*bias, op, "bias", x);
  if (is_bf16(x))
    return narrow_bf16(bsr_conv2d(widen(x), widen(values), block_row_ptr, block_col_idx,
                                  block_col_ptr, block_row_idx, block_perm, widen(bias),
                                  out_channels, stride, padding, dilation))
        .contiguous(at::MemoryFormat::ChannelsLast);
  const auto [kh, kw, bk, bn, nnzb] = check_bsr_conv_values(values, op);
  const int64_t Co = out_channels;
  TORCH_CHECK(Co >= 0, op, ": out_channels must be >= 0, got ", Co);
  const int64_t Nb = ceil_div(Co, bn), Kb = ceil_div(x.size(1), bk);
  check_compressed(op, "block_row_ptr", block_row_ptr, "block_col_idx", block_col_idx, Nb, Kb,
                   nnzb);
  const Conv c = make_conv(op, x.size(0), Kb * bk, x.size(2), x.size(3), kh, kw, stride,
                           padding, dilation);
  Tensor bias_padded;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Co, op, ": bias must have shape [", Co,
                "], got ", bias->sizes());
    bias_padded = padded_cols(bias->view({1, Co}), Nb * bn).view({Nb * bn});
  }
  const bool in_place = implicit_padding(x, c);
  const Tensor xp = in_place ? padded_nhwc(x, 0, 0, c.C, kOperandSlot)
                             : padded_nhwc(x, c.padding[0], c.padding[1], c.C, kOperandSlot);
  const Tensor vals = values.contiguous();
  const int64_t M = c.N * c.pixels();
  const bool ragged = Nb * bn != Co;
  Tensor y = channels_last_empty(x, c.N, Co, c.OH, c.OW);
  Tensor y_rows = ragged ? at::empty({M, Nb * bn}, x.options()) : y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const BsrArgs<scalar_t> args{M, bn, bk, block_row_ptr.data_ptr<int32_t>(),
                                 block_col_idx.data_ptr<int32_t>(), vals.data_ptr<scalar_t>()};
    const scalar_t* b = bias ? bias_padded.data_ptr<scalar_t>() : nullptr;
    if (pointwise(c)) {
      // x as rows [M, C]: the linear layer's product, whose blocking (block-row groups that
      // fit L2, each meeting a tile of x while it is hot) the conv kernel does not have.
      parallel_block_row_ranges(args.row_ptr, Nb, M, [&](int64_t i0, int64_t i1, int64_t m0,
                                                         int64_t m1) {
        k->bsr_forward(args, xp.data_ptr<scalar_t>(), c.C, b, y_rows.data_ptr<scalar_t>(),
                       Nb * bn, i0, i1, m0, m1);
      });
      return;
    }
    const GeometryArrays g = in_place ? implicit_geometry(c) : geometry(c, c.C, c.N);
    const ConvGeometry geo = g.view();
    parallel_pixels_rows(M, pixel_chunk(c.C), Nb, [&](int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
      k->bsr_conv_forward(args, geo, xp.data_ptr<scalar_t>(), b, y_rows.data_ptr<scalar_t>(),
                          Nb * bn, i0, i1, m0, m1);
    });
  });
  if (ragged) y.permute({0, 2, 3, 1}).copy_(y_rows.narrow(1, 0, Co).view({c.N, c.OH, c.OW, Co}));
  return y;
}

struct InputSize {
  int64_t N, C, H, W;
};

InputSize input_size_arg(at::IntArrayRef s, const char* op) {
  TORCH_CHECK(s.size() == 4 && s[0] >= 0 && s[1] >= 0 && s[2] > 0 && s[3] > 0, op,
              ": input_size must be [N, C, H, W] with positive H, W, got ", s);
  return {s[0], s[1], s[2], s[3]};
}

void check_grad_out(const Tensor& grad_out, const Conv& c, int64_t Co, const char* op) {
  TORCH_CHECK(grad_out.size(0) == c.N && grad_out.size(1) == Co && grad_out.size(2) == c.OH &&
                  grad_out.size(3) == c.OW,
              op, ": grad_out must have shape [", c.N, ", ", Co, ", ", c.OH, ", ", c.OW,
              "], got ", grad_out.sizes());
}

Tensor bsr_conv2d_grad_input(const Tensor& grad_out, const Tensor& values,
                             const Tensor& block_col_ptr, const Tensor& block_row_idx,
                             const Tensor& block_perm, at::IntArrayRef input_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  constexpr const char* op = "sparsekern.bsr_conv2d_grad_input";
  check_activation(grad_out, op, "grad_out");
  check_float(values, op, "values", grad_out);
  if (is_bf16(grad_out))
    return narrow_bf16(bsr_conv2d_grad_input(widen(grad_out), widen(values), block_col_ptr,
                                             block_row_idx, block_perm, input_size, stride,
                                             padding, dilation))
        .contiguous(at::MemoryFormat::ChannelsLast);
  const auto [kh, kw, bk, bn, nnzb] = check_bsr_conv_values(values, op);
  const InputSize in = input_size_arg(input_size, op);
  const int64_t Co = grad_out.size(1), Nb = ceil_div(Co, bn), Kb = ceil_div(in.C, bk);
  check_compressed(op, "block_col_ptr", block_col_ptr, "block_row_idx", block_row_idx, Kb, Nb,
                   nnzb);
  check_index(block_perm, op, "block_perm", nnzb);
  check_range(block_perm, op, "block_perm", nnzb);
  const Conv c = make_conv(op, in.N, Kb * bk, in.H, in.W, kh, kw, stride, padding, dilation);
  check_grad_out(grad_out, c, Co, op);
  const int64_t taps = c.taps(), M = c.N * c.pixels();
  const Tensor dy = rows_nhwc(grad_out, Nb * bn);
  const Tensor vals = values.contiguous();
  // W^T in block form, per tap: transposed block q = stored block perm[q], each tap transposed.
  std::vector<int32_t> tap_perm(nnzb * taps);
  const int32_t* perm = block_perm.data_ptr<int32_t>();
  for (int64_t q = 0; q < nnzb; ++q)
    for (int64_t t = 0; t < taps; ++t) tap_perm[q * taps + t] = int32_t(perm[q] * taps + t);
  Tensor t_vals = at::empty({nnzb, kh, kw, bn, bk}, vals.options());
  // Scratch when crop_nhwc copies out of it (padding or ragged channel blocks), else dx itself.
  const bool cropped = c.padding[0] > 0 || c.padding[1] > 0 || c.C != in.C;
  Tensor dx_padded =
      cropped ? panel_scratch(kSecondSlot, {c.N, c.Hp(), c.Wp(), c.C}, grad_out.options()).zero_()
              : at::zeros({c.N, c.Hp(), c.Wp(), c.C}, grad_out.options());
  const GeometryArrays g = geometry(c, c.C, c.N);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    at::parallel_for(0, nnzb * taps, 16, [&](int64_t q0, int64_t q1) {
      k->bsr_transpose_blocks(vals.data_ptr<scalar_t>(), tap_perm.data(), bk, bn,
                              t_vals.data_ptr<scalar_t>(), q0, q1);
    });
    const BsrArgs<scalar_t> args{M, bk, bn, block_col_ptr.data_ptr<int32_t>(),
                                 block_row_idx.data_ptr<int32_t>(),
                                 t_vals.data_ptr<scalar_t>()};
    const ConvGeometry geo = g.view();
    // dX is a scatter: two units may only run together when their writes cannot overlap, which
    // holds for different input-channel blocks or different images. Image-major order, so each
    // thread gets whole images over every channel block: kept blocks are rarely spread evenly
    // over the channel blocks, images always cost the same.
    const int64_t P = c.pixels();
    at::parallel_for(0, Kb * c.N, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / Kb, J = u % Kb;
        k->bsr_conv_grad_input(args, geo, dy.data_ptr<scalar_t>(), Nb * bn,
                               dx_padded.data_ptr<scalar_t>(), J, J + 1, n * P, (n + 1) * P);
      }
    });
  });
  return crop_nhwc(dx_padded, c, in.C);
}

Tensor bsr_conv2d_grad_weight(const Tensor& grad_out, const Tensor& x,
                              const Tensor& block_row_ptr, const Tensor& block_col_idx,
                              at::IntArrayRef kernel_size, int64_t block_n, int64_t block_k,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  constexpr const char* op = "sparsekern.bsr_conv2d_grad_weight";
  check_activation(grad_out, op, "grad_out");
  check_activation(x, op, "x");
  check_float(x, op, "x", grad_out);
  if (is_bf16(x))
    return narrow_bf16(bsr_conv2d_grad_weight(widen(grad_out), widen(x), block_row_ptr,
                                              block_col_idx, kernel_size, block_n, block_k,
                                              stride, padding, dilation));
  const int64_t bn = block_n, bk = block_k;
  TORCH_CHECK(bk % 8 == 0 && bn % 8 == 0 && bk > 0 && bn > 0, op,
              ": block dims must be positive multiples of 8, got block_n=", bn, " block_k=", bk);
  const Pair ks = pair_arg(kernel_size, op, "kernel_size", 1);
  const int64_t Co = grad_out.size(1), Nb = ceil_div(Co, bn), Kb = ceil_div(x.size(1), bk);
  const int64_t nnzb = block_col_idx.numel();
  check_compressed(op, "block_row_ptr", block_row_ptr, "block_col_idx", block_col_idx, Nb, Kb,
                   nnzb);
  const Conv c = make_conv(op, x.size(0), Kb * bk, x.size(2), x.size(3), ks[0], ks[1], stride,
                           padding, dilation);
  check_grad_out(grad_out, c, Co, op);
  const int64_t taps = c.taps(), M = c.N * c.pixels();
  const Tensor dy = rows_nhwc(grad_out, Nb * bn);
  const Tensor xp = padded_nhwc(x, c.padding[0], c.padding[1], c.C, kOperandSlot);
  const GeometryArrays g = geometry(c, c.C, c.N);
  const Tensor block_row = expand_rows(block_row_ptr, Nb, nnzb);
  Tensor dw = at::empty({nnzb, ks[0], ks[1], bk, bn}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const BsrArgs<scalar_t> args{M, bn, bk, block_row_ptr.data_ptr<int32_t>(),
                                 block_col_idx.data_ptr<int32_t>(), nullptr};
    const ConvGeometry geo = g.view();
    at::parallel_for(0, nnzb * taps, 1, [&](int64_t u0, int64_t u1) {
      k->bsr_conv_grad_weight(args, geo, block_row.data_ptr<int32_t>(), dy.data_ptr<scalar_t>(),
                              Nb * bn, xp.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), u0, u1);
    });
  });
  return dw;
}

// ---- CSR -----------------------------------------------------------------------------------

// An [N, C, H, W] activation as a CSR conv operand, zero-padded by (pad_h, pad_w) with
// pixel_stride floats per pixel: batch panels [chunks][Hp*Wp*pixel_stride][panel] packed in one
// pass from the tensor as it is (NCHW or channels_last), or, for kernels with panel == 0, the
// padded NHWC rows [N][Hp*Wp*pixel_stride].
template <class T>
Tensor csr_operand(const KernelTable<T>* k, const Tensor& t, int64_t pad_h, int64_t pad_w,
                   int64_t pixel_stride, PanelSlot slot) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  if (k->conv_panel == 0)
    return padded_nhwc(t, pad_h, pad_w, pixel_stride, slot)
        .reshape({N, (H + 2 * pad_h) * (W + 2 * pad_w) * pixel_stride});
  const Tensor src = t.stride(3) == 1 || t.stride(1) == 1 ? t : t.contiguous();
  const ImagePanels p{N, C, H, W, src.stride(0), src.stride(1), src.stride(2), src.stride(3),
                      pad_h, pad_w, pixel_stride};
  const int64_t chunks = ceil_div(N, k->conv_panel);
  Tensor panels =
      panel_scratch(slot, {chunks, p.Hp() * p.Wp() * pixel_stride, k->conv_panel}, t.options());
  at::parallel_for(0, chunks * p.units_per_chunk(), 1, [&](int64_t u0, int64_t u1) {
    k->to_image_panels(src.data_ptr<T>(), p, panels.data_ptr<T>(), u0, u1);
  });
  return panels;
}

template <class T>
int64_t chunks_of(const KernelTable<T>* k, int64_t N) {
  return k->conv_panel > 0 ? ceil_div(N, k->conv_panel) : N;
}

// The arguments of image chunk `ch` (the kernels' own loop over chunks then runs once), so that
// threads can split a call by chunks.
template <class T>
CsrConvArgs<T> chunk_args(CsrConvArgs<T> args, const KernelTable<T>* k, int64_t ch) {
  const int64_t lanes = std::max<int64_t>(k->conv_panel, 1);
  args.chunks = 1;
  args.images = std::min(lanes, args.images - ch * lanes);
  return args;
}

// col_off[j] = tap_off[tap] + ci of every stored weight (column = ci * taps + tap).
std::vector<int64_t> column_offsets(const Tensor& col_idx, const GeometryArrays& g) {
  const int64_t taps = int64_t(g.tap_off.size());
  const int32_t* cols = col_idx.data_ptr<int32_t>();
  std::vector<int64_t> off(col_idx.numel());
  for (int64_t j = 0; j < col_idx.numel(); ++j) off[j] = g.tap_off[cols[j] % taps] + cols[j] / taps;
  return off;
}

// Column segments for the SIMD forward and dW (kernels.h, CsrConvArgs::seg_ptr): wide enough
// that a row holds ~16 entries per segment at this density (with ~8, reloading and storing the
// partial sums between segments was a tenth of all loads: 5-15% slower on 4x4 to 16x16 maps),
// narrow enough that a segment's panel rows stay in L1 or L2.
// seg[r * (S + 1) + b] = first entry of row r at column >= b * width.
struct Segments {
  std::vector<int32_t> ptr;
  int64_t count;
};

Segments column_segments(const int32_t* rp, const int32_t* ci, int64_t rows, int64_t cols) {
  const int64_t nnz = rp[rows];
  const double density = rows * cols > 0 ? double(nnz) / double(rows * cols) : 1.0;
  const int64_t width = std::clamp<int64_t>(int64_t(16.0 / std::max(density, 1e-9)), 64, 512);
  Segments s{{}, std::max<int64_t>(ceil_div(cols, width), 1)};
  s.ptr.resize(rows * (s.count + 1));
  for (int64_t r = 0; r < rows; ++r) {
    int32_t j = rp[r];
    for (int64_t b = 0; b <= s.count; ++b) {
      while (j < rp[r + 1] && (b == s.count || ci[j] < b * width)) ++j;
      s.ptr[r * (s.count + 1) + b] = b == 0 ? rp[r] : j;
    }
  }
  return s;
}

void check_csr_conv_values(const Tensor& values, const char* op) {
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
}

Tensor csr_conv2d(const Tensor& x, const Tensor& values, const Tensor& row_ptr,
                  const Tensor& col_idx, const Tensor& col_ptr, const Tensor& row_idx,
                  const Tensor& perm, const std::optional<Tensor>& bias, int64_t out_channels,
                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  constexpr const char* op = "sparsekern.csr_conv2d";
  check_activation(x, op, "x");
  check_float(values, op, "values", x);
  if (bias) check_float(*bias, op, "bias", x);
  if (is_bf16(x))
    return narrow_bf16(csr_conv2d(widen(x), widen(values), row_ptr, col_idx, col_ptr, row_idx,
                                  perm, widen(bias), out_channels, kernel_size, stride, padding,
                                  dilation))
        .contiguous(at::MemoryFormat::ChannelsLast);
  check_csr_conv_values(values, op);
  const Pair ks = pair_arg(kernel_size, op, "kernel_size", 1);
  const int64_t Co = out_channels, nnz = values.numel();
  TORCH_CHECK(Co >= 0, op, ": out_channels must be >= 0, got ", Co);
  const Conv c = make_conv(op, x.size(0), x.size(1), x.size(2), x.size(3), ks[0], ks[1], stride,
                           padding, dilation);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, Co, c.C * c.taps(), nnz);
  if (bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Co, op, ": bias must have shape [", Co,
                "], got ", bias->sizes());
  const int64_t in_rows = c.Hp() * c.Wp() * panel_pixel_stride(c.C);
  const GeometryArrays g = geometry(c, panel_pixel_stride(c.C), 1);
  const std::vector<int64_t> col_off = column_offsets(col_idx, g);
  const Segments seg = column_segments(row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), Co,
                                       c.C * c.taps());
  const Tensor vals = values.contiguous();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  Tensor y = channels_last_empty(x, c.N, Co, c.OH, c.OW);
  if (c.N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const Tensor xs = csr_operand(k, x, c.padding[0], c.padding[1], panel_pixel_stride(c.C),
                                  kOperandSlot);
    const CsrConvArgs<scalar_t> args{chunks_of(k, c.N), c.N, in_rows, Co,
                                     row_ptr.data_ptr<int32_t>(), col_off.data(),
                                     vals.data_ptr<scalar_t>(), seg.ptr.data(), seg.count};
    const ConvGeometry geo = g.view();
    const scalar_t* bp = bias ? b.data_ptr<scalar_t>() : nullptr;
    const int64_t lanes = std::max<int64_t>(k->conv_panel, 1);
    parallel_chunks_by_cost(args.row_ptr, Co, 4, args.chunks,
                            [&](int64_t ch, int64_t r0, int64_t r1) {
      k->csr_conv_forward(chunk_args(args, k, ch), geo,
                          xs.data_ptr<scalar_t>() + ch * in_rows * lanes, bp,
                          y.data_ptr<scalar_t>() + ch * lanes * c.pixels() * Co, r0, r1);
    });
  });
  return y;
}

// dX of a stride-1 conv is a stride-1 conv too: of grad_out zero-padded by dilation * (k - 1) -
// padding, with the kernel flipped and transposed (rows = input channels). The transposed index
// already lists each input channel's entries by tap, then output channel, so the forward kernel
// runs on it as it is. Its gather writes every dx element once, where the scatter (kept for
// strided convs) adds into a zeroed padded copy that is then cropped: two passes over dx fewer.
Tensor csr_grad_input_as_conv(const Tensor& grad_out, const Conv& c,
                              const std::vector<int32_t>& channel_ptr, const Tensor& col_ptr,
                              const Tensor& row_idx, const Tensor& t_vals) {
  constexpr const char* op = "sparsekern.csr_conv2d_grad_input";
  const int64_t Co = grad_out.size(1), taps = c.taps();
  const int64_t pad_h = c.dilation[0] * (c.kh - 1) - c.padding[0];
  const int64_t pad_w = c.dilation[1] * (c.kw - 1) - c.padding[1];
  const Conv t = make_conv(op, c.N, Co, c.OH, c.OW, c.kh, c.kw, {1, 1}, {pad_h, pad_w},
                           c.dilation);
  TORCH_INTERNAL_ASSERT(t.OH == c.H && t.OW == c.W);
  const int64_t ps = panel_pixel_stride(Co), in_rows = t.Hp() * t.Wp() * ps;
  const GeometryArrays g = geometry(t, ps, 1);
  const int64_t nnz = t_vals.numel();
  std::vector<int64_t> col_off(nnz);
  std::vector<int32_t> column(nnz);  // tap * Co + r: ascending within a channel, for segments
  const int32_t* cp = col_ptr.data_ptr<int32_t>();
  const int32_t* rows = row_idx.data_ptr<int32_t>();
  for (int64_t ch = 0; ch < c.C; ++ch)
    for (int64_t tap = 0; tap < taps; ++tap)
      for (int64_t q = cp[ch * taps + tap]; q < cp[ch * taps + tap + 1]; ++q) {
        col_off[q] = g.tap_off[taps - 1 - tap] + rows[q];
        column[q] = int32_t(tap * Co + rows[q]);
      }
  const Segments seg = column_segments(channel_ptr.data(), column.data(), c.C, taps * Co);
  Tensor dx = channels_last_empty(grad_out, c.N, c.C, c.H, c.W);
  if (c.N == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const Tensor dys = csr_operand(k, grad_out, pad_h, pad_w, ps, kOperandSlot);
    const CsrConvArgs<scalar_t> args{chunks_of(k, c.N), c.N, in_rows, c.C, channel_ptr.data(),
                                     col_off.data(), t_vals.data_ptr<scalar_t>(),
                                     seg.ptr.data(), seg.count};
    const ConvGeometry geo = g.view();
    const int64_t lanes = std::max<int64_t>(k->conv_panel, 1);
    parallel_chunks_by_cost(channel_ptr.data(), c.C, 4, args.chunks,
                            [&](int64_t ch, int64_t r0, int64_t r1) {
      k->csr_conv_forward(chunk_args(args, k, ch), geo,
                          dys.data_ptr<scalar_t>() + ch * in_rows * lanes, nullptr,
                          dx.data_ptr<scalar_t>() + ch * lanes * c.H * c.W * c.C, r0, r1);
    });
  });
  return dx;
}

Tensor csr_conv2d_grad_input(const Tensor& grad_out, const Tensor& values, const Tensor& col_ptr,
                             const Tensor& row_idx, const Tensor& perm,
                             at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  constexpr const char* op = "sparsekern.csr_conv2d_grad_input";
  check_activation(grad_out, op, "grad_out");
  check_float(values, op, "values", grad_out);
  if (is_bf16(grad_out))
    return narrow_bf16(csr_conv2d_grad_input(widen(grad_out), widen(values), col_ptr, row_idx,
                                             perm, input_size, kernel_size, stride, padding,
                                             dilation))
        .contiguous(at::MemoryFormat::ChannelsLast);
  check_csr_conv_values(values, op);
  const InputSize in = input_size_arg(input_size, op);
  const Pair ks = pair_arg(kernel_size, op, "kernel_size", 1);
  const Conv c = make_conv(op, in.N, in.C, in.H, in.W, ks[0], ks[1], stride, padding, dilation);
  const int64_t Co = grad_out.size(1), nnz = values.numel(), taps = c.taps();
  check_grad_out(grad_out, c, Co, op);
  check_compressed(op, "col_ptr", col_ptr, "row_idx", row_idx, c.C * taps, Co, nnz);
  check_index(perm, op, "perm", nnz);
  check_range(perm, op, "perm", nnz);
  const Tensor t_vals = values.index_select(0, perm);
  // An input channel's stored weights over all taps (col_ptr every taps columns): its cost, and
  // the row pointer of the transposed conv below.
  std::vector<int32_t> channel_ptr(c.C + 1);
  const int32_t* cp = col_ptr.data_ptr<int32_t>();
  for (int64_t ch = 0; ch <= c.C; ++ch) channel_ptr[ch] = cp[ch * taps];
  if (c.stride[0] == 1 && c.stride[1] == 1 && c.dilation[0] * (c.kh - 1) >= c.padding[0] &&
      c.dilation[1] * (c.kw - 1) >= c.padding[1])
    return csr_grad_input_as_conv(grad_out, c, channel_ptr, col_ptr, row_idx, t_vals);
  const GeometryArrays g = geometry(c, panel_pixel_stride(c.C), 1);
  const int64_t in_rows = c.Hp() * c.Wp() * panel_pixel_stride(c.C);
  Tensor dx = channels_last_empty(grad_out, c.N, c.C, c.H, c.W);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const int64_t chunks = chunks_of(k, c.N), lanes = std::max<int64_t>(k->conv_panel, 1);
    const Tensor dys = csr_operand(k, grad_out, 0, 0, Co, kOperandSlot);
    Tensor dxs = panel_scratch(kSecondSlot, {chunks, in_rows, lanes}, grad_out.options()).zero_();
    const CsrConvArgs<scalar_t> args{chunks,  c.N,     in_rows, Co, col_ptr.data_ptr<int32_t>(),
                                     nullptr, t_vals.data_ptr<scalar_t>(), nullptr, 0};
    const ConvGeometry geo = g.view();
    const int64_t dy_chunk = c.pixels() * Co * lanes, dx_chunk = in_rows * lanes;
    if (c.N > 0)
      parallel_chunks_by_cost(channel_ptr.data(), c.C, 4, chunks,
                              [&](int64_t ch, int64_t c0, int64_t c1) {
        k->csr_conv_grad_input(chunk_args(args, k, ch), geo, row_idx.data_ptr<int32_t>(),
                               dys.data_ptr<scalar_t>() + ch * dy_chunk,
                               dxs.data_ptr<scalar_t>() + ch * dx_chunk, c0, c1);
      });
    if (k->conv_panel > 0) {
      const ImagePanels p{c.N, c.C, c.H, c.W, dx.stride(0), dx.stride(1), dx.stride(2),
                          dx.stride(3), c.padding[0], c.padding[1], panel_pixel_stride(c.C)};
      at::parallel_for(0, chunks * c.H, 1, [&](int64_t u0, int64_t u1) {
        k->from_image_panels(dxs.data_ptr<scalar_t>(), p, dx.data_ptr<scalar_t>(), u0, u1);
      });
    } else {
      dx.copy_(dxs.view({c.N, c.Hp(), c.Wp(), panel_pixel_stride(c.C)})
                   .narrow(1, c.padding[0], c.H)
                   .narrow(2, c.padding[1], c.W)
                   .narrow(3, 0, c.C)
                   .permute({0, 3, 1, 2}));
    }
  });
  return dx;
}

Tensor csr_conv2d_grad_weight(const Tensor& grad_out, const Tensor& x, const Tensor& row_ptr,
                              const Tensor& col_idx, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  constexpr const char* op = "sparsekern.csr_conv2d_grad_weight";
  check_activation(grad_out, op, "grad_out");
  check_activation(x, op, "x");
  check_float(x, op, "x", grad_out);
  if (is_bf16(x))
    return narrow_bf16(csr_conv2d_grad_weight(widen(grad_out), widen(x), row_ptr, col_idx,
                                              kernel_size, stride, padding, dilation));
  const Pair ks = pair_arg(kernel_size, op, "kernel_size", 1);
  const Conv c = make_conv(op, x.size(0), x.size(1), x.size(2), x.size(3), ks[0], ks[1], stride,
                           padding, dilation);
  const int64_t Co = grad_out.size(1), nnz = col_idx.numel();
  check_grad_out(grad_out, c, Co, op);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, Co, c.C * c.taps(), nnz);
  const int64_t in_rows = c.Hp() * c.Wp() * panel_pixel_stride(c.C);
  const GeometryArrays g = geometry(c, panel_pixel_stride(c.C), 1);
  const std::vector<int64_t> col_off = column_offsets(col_idx, g);
  const Segments seg = column_segments(row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), Co,
                                       c.C * c.taps());
  if (c.N == 0) return at::zeros({nnz}, x.options());
  Tensor dw_chunks;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const Tensor xs = csr_operand(k, x, c.padding[0], c.padding[1], panel_pixel_stride(c.C),
                                  kOperandSlot);
    const Tensor dys = csr_operand(k, grad_out, 0, 0, Co, kSecondSlot);
    const CsrConvArgs<scalar_t> args{chunks_of(k, c.N), c.N, in_rows, Co,
                                     row_ptr.data_ptr<int32_t>(), col_off.data(), nullptr,
                                     seg.ptr.data(), seg.count};
    const ConvGeometry geo = g.view();
    // One dW per chunk (each thread sums its own images), added up once at the end: nnz floats
    // per chunk, small next to the images.
    const int64_t lanes = std::max<int64_t>(k->conv_panel, 1);
    const int64_t x_chunk = args.in_rows * lanes, dy_chunk = c.pixels() * Co * lanes;
    dw_chunks = at::empty({args.chunks, nnz}, x.options());
    parallel_chunks_by_cost(args.row_ptr, Co, 4, args.chunks,
                            [&](int64_t ch, int64_t r0, int64_t r1) {
      k->csr_conv_grad_weight(chunk_args(args, k, ch), geo,
                              dys.data_ptr<scalar_t>() + ch * dy_chunk,
                              xs.data_ptr<scalar_t>() + ch * x_chunk,
                              dw_chunks.data_ptr<scalar_t>() + ch * nnz, r0, r1);
    });
  });
  return dw_chunks.size(0) == 1 ? dw_chunks.view({nnz}) : dw_chunks.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bsr_conv2d", &bsr_conv2d);
  m.impl("bsr_conv2d_grad_input", &bsr_conv2d_grad_input);
  m.impl("bsr_conv2d_grad_weight", &bsr_conv2d_grad_weight);
  m.impl("csr_conv2d", &csr_conv2d);
  m.impl("csr_conv2d_grad_input", &csr_conv2d_grad_input);
  m.impl("csr_conv2d_grad_weight", &csr_conv2d_grad_weight);
}

}  // namespace sparsekern::cpu
