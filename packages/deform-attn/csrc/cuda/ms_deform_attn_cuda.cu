// CUDA kernels of deform_attn::ms_deform_attn (float32, float64, float16, bfloat16; float32 accumulation
// for the 16-bit types, float64 for float64; and bfloat16 / float16 values with float32 locations and
// weights: the kernels are templated on the value type and the location type).
//
// Design (differs from the original one-thread-per-output-element kernel):
// * One warp per (batch, query, head). Lane t owns channels t, t+32, ... so every bilinear corner is read
//   as one coalesced 32-wide row of the head's D channels.
// * Sampling locations and attention weights are read once per sample, coalesced (lane j loads sample j
//   of a chunk of 32) and broadcast with warp shuffles; corner weights are computed once per sample per
//   warp (all lanes evaluate the same instruction stream, no divergence).
// * Backward: the per-sample reductions over channels (attention-weight and location gradients) are warp
//   shuffles, not shared-memory atomics; only grad_value needs atomics (several queries hit one corner),
//   and it accumulates in a float32 (float64) buffer that is cast once at the end, so 16-bit inputs do not
//   lose the small contributions.
// * The op needs no im2col buffer, so im2col_step (kept for signature compatibility) is ignored.
// * Non-finite locations or attention weights take a separate (warp-uniform) branch that follows
//   F.grid_sample's arithmetic, so NaN propagates as in the reference and the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "../ms_deform_attn.h"

#define DEFORM_ATTN_STR2(...) #__VA_ARGS__
#define DEFORM_ATTN_STR(...) DEFORM_ATTN_STR2(__VA_ARGS__)

namespace deform_attn {

std::string cuda_build_info() {
  std::string info = "CUDA ";
  info += std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef __CUDA_ARCH_LIST__
  info += " archs " DEFORM_ATTN_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per block
constexpr unsigned kFull = 0xffffffffu;

template <typename acc_t>
struct Footprint {
  int64_t off[4];  // corner row within the level, -1 if outside
  acc_t w[4];      // bilinear weights (0 for missing corners)
  acc_t lh, lw;
};

template <typename acc_t>
__device__ __forceinline__ bool footprint(acc_t x, acc_t y, int64_t H, int64_t W, Footprint<acc_t>& f) {
  const acc_t w_im = x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t h_im = y * static_cast<acc_t>(H) - acc_t(0.5);
  if (!(h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    return false;
  }
  const acc_t hf = floor(h_im), wf = floor(w_im);
  const int64_t h0 = static_cast<int64_t>(hf), w0 = static_cast<int64_t>(wf);
  f.lh = h_im - hf;
  f.lw = w_im - wf;
  const acc_t hh = acc_t(1) - f.lh, hw = acc_t(1) - f.lw;
  const bool in_h0 = h0 >= 0, in_h1 = h0 + 1 < H, in_w0 = w0 >= 0, in_w1 = w0 + 1 < W;
  f.off[0] = (in_h0 && in_w0) ? h0 * W + w0 : -1;
  f.off[1] = (in_h0 && in_w1) ? h0 * W + w0 + 1 : -1;
  f.off[2] = (in_h1 && in_w0) ? (h0 + 1) * W + w0 : -1;
  f.off[3] = (in_h1 && in_w1) ? (h0 + 1) * W + w0 + 1 : -1;
  f.w[0] = f.off[0] >= 0 ? hh * hw : acc_t(0);
  f.w[1] = f.off[1] >= 0 ? hh * f.lw : acc_t(0);
  f.w[2] = f.off[2] >= 0 ? f.lh * hw : acc_t(0);
  f.w[3] = f.off[3] >= 0 ? f.lh * f.lw : acc_t(0);
  return true;
}

template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t v) {
  return v - v == acc_t(0);  // false for inf and NaN
}

// F.grid_sample's footprint at pixel coordinates (ix, iy) that may be non-finite: corner weights as it
// computes them (NaN where a coordinate is non-finite) and the in-bound corners (none then).
template <typename acc_t>
struct RefFootprint {
  acc_t w[4];
  acc_t dx[4], dy[4];  // d w_c / d ix, d w_c / d iy
  int64_t off[4];      // corner row within the level, -1 if not read
};

template <typename acc_t>
__device__ __forceinline__ void ref_footprint(acc_t ix, acc_t iy, int64_t H, int64_t W, RefFootprint<acc_t>& f) {
  const acc_t fx = floor(ix), fy = floor(iy);  // floor keeps inf / NaN
  const acc_t lw = ix - fx, hw = (fx + acc_t(1)) - ix, lh = iy - fy, hh = (fy + acc_t(1)) - iy;
  f.w[0] = hw * hh;
  f.w[1] = lw * hh;
  f.w[2] = hw * lh;
  f.w[3] = lw * lh;
  f.dx[0] = -hh;
  f.dx[1] = hh;
  f.dx[2] = -lh;
  f.dx[3] = lh;
  f.dy[0] = -hw;
  f.dy[1] = -lw;
  f.dy[2] = hw;
  f.dy[3] = lw;
  const bool fin = is_finite(ix) && is_finite(iy) && fx > acc_t(-2) && fy > acc_t(-2) &&
                   fx < static_cast<acc_t>(W) && fy < static_cast<acc_t>(H);
  const int64_t x0 = fin ? static_cast<int64_t>(fx) : -2, y0 = fin ? static_cast<int64_t>(fy) : -2;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int64_t x = x0 + (c & 1), y = y0 + (c >> 1);
    f.off[c] = (fin && x >= 0 && x < W && y >= 0 && y < H) ? y * W + x : -1;
  }
}

// CPL: channels per lane held in registers (D <= 32 * CPL per pass; larger D loops over passes).
// scalar_t: value / output type; loc_t: locations / weights type (scalar_t, or float for 16-bit values).
template <typename scalar_t, typename loc_t, int CPL>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const loc_t* __restrict__ loc, const loc_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t N,
    int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nqm = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (nqm >= N * Q * M) return;  // uniform per warp: the whole warp leaves together
  const int64_t m = nqm % M, n = nqm / (Q * M);
  const int64_t row = M * D;
  const scalar_t* vhead = value + n * S * row + m * D;
  const int64_t LP = L * P;
  for (int64_t c0 = 0; c0 < D; c0 += kWarp * CPL) {
    acc_t acc[CPL];
#pragma unroll
    for (int t = 0; t < CPL; ++t) acc[t] = acc_t(0);
    for (int64_t base = 0; base < LP; base += kWarp) {
      const int64_t j = base + lane;
      acc_t my_x = 0, my_y = 0, my_a = 0;
      if (j < LP) {
        const int64_t i = nqm * LP + j;
        my_x = static_cast<acc_t>(loc[2 * i]);
        my_y = static_cast<acc_t>(loc[2 * i + 1]);
        my_a = static_cast<acc_t>(attn[i]);
      }
      const int cnt = static_cast<int>(LP - base < kWarp ? LP - base : kWarp);
      for (int k = 0; k < cnt; ++k) {
        const acc_t x = __shfl_sync(kFull, my_x, k);
        const acc_t y = __shfl_sync(kFull, my_y, k);
        const acc_t a = __shfl_sync(kFull, my_a, k);
        const int64_t l = (base + k) / P;
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
        if (start < 0 || start + H * W > S) continue;  // inconsistent level table: never read out of bounds
        const scalar_t* vlevel = vhead + start * row;
        const acc_t ix = x * static_cast<acc_t>(W) - acc_t(0.5), iy = y * static_cast<acc_t>(H) - acc_t(0.5);
        if (!(is_finite(ix) && is_finite(iy) && is_finite(a))) {  // rare, uniform over the warp
          RefFootprint<acc_t> r;
          ref_footprint(ix, iy, H, W, r);
#pragma unroll
          for (int t = 0; t < CPL; ++t) {
            const int64_t d = c0 + lane + t * kWarp;
            if (d >= D) continue;
            acc_t sv = acc_t(0);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              sv += r.w[c] * (r.off[c] >= 0 ? static_cast<acc_t>(vlevel[r.off[c] * row + d]) : acc_t(0));
            }
            acc[t] += a * sv;
          }
          continue;
        }
        Footprint<acc_t> f;
        if (!footprint(x, y, H, W, f)) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (f.off[c] < 0) continue;
          const scalar_t* vr = vlevel + f.off[c] * row;
          const acc_t wc = a * f.w[c];
#pragma unroll
          for (int t = 0; t < CPL; ++t) {
            const int64_t d = c0 + lane + t * kWarp;
            if (d < D) acc[t] += wc * static_cast<acc_t>(vr[d]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < CPL; ++t) {
      const int64_t d = c0 + lane + t * kWarp;
      if (d < D) out[nqm * D + d] = static_cast<scalar_t>(acc[t]);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename scalar_t, typename loc_t, int CPL>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const loc_t* __restrict__ loc, const loc_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
    at::opmath_type<scalar_t>* __restrict__ grad_value, loc_t* __restrict__ grad_loc,
    loc_t* __restrict__ grad_attn, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L,
    int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nqm = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (nqm >= N * Q * M) return;
  const int64_t m = nqm % M, n = nqm / (Q * M);
  const int64_t row = M * D;
  const int64_t head_off = n * S * row + m * D;
  const int64_t LP = L * P;
  for (int64_t base = 0; base < LP; base += kWarp) {
    const int64_t j = base + lane;
    acc_t my_x = 0, my_y = 0, my_a = 0;
    if (j < LP) {
      const int64_t i = nqm * LP + j;
      my_x = static_cast<acc_t>(loc[2 * i]);
      my_y = static_cast<acc_t>(loc[2 * i + 1]);
      my_a = static_cast<acc_t>(attn[i]);
    }
    // Lane k collects the gradients of sample base + k, written coalesced after the chunk.
    acc_t out_ga = 0, out_gx = 0, out_gy = 0;
    const int cnt = static_cast<int>(LP - base < kWarp ? LP - base : kWarp);
    for (int k = 0; k < cnt; ++k) {
      const acc_t x = __shfl_sync(kFull, my_x, k);
      const acc_t y = __shfl_sync(kFull, my_y, k);
      const acc_t a = __shfl_sync(kFull, my_a, k);
      const int64_t l = (base + k) / P;
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      if (start < 0 || start + H * W > S) continue;
      const int64_t level_off = head_off + start * row;
      const acc_t ix = x * static_cast<acc_t>(W) - acc_t(0.5), iy = y * static_cast<acc_t>(H) - acc_t(0.5);
      if (!(is_finite(ix) && is_finite(iy) && is_finite(a))) {  // rare, uniform over the warp
        RefFootprint<acc_t> r;
        ref_footprint(ix, iy, H, W, r);
        acc_t ga = 0, gx = 0, gy = 0;
        for (int64_t d = lane; d < D; d += kWarp) {
          const acc_t g = static_cast<acc_t>(grad_out[nqm * D + d]);
          const acc_t gs = a * g;
          acc_t sv = 0;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t idx = level_off + r.off[c] * row + d;
            const acc_t v = r.off[c] >= 0 ? static_cast<acc_t>(value[idx]) : acc_t(0);
            sv += r.w[c] * v;
            gx += r.dx[c] * v * gs;
            gy += r.dy[c] * v * gs;
            if (r.off[c] >= 0) atomicAdd(grad_value + idx, r.w[c] * gs);
          }
          ga += g * sv;
        }
        ga = warp_sum(ga);
        gx = warp_sum(gx);
        gy = warp_sum(gy);
        if (lane == k) {
          out_ga = ga;
          out_gx = gx * static_cast<acc_t>(W);
          out_gy = gy * static_cast<acc_t>(H);
        }
        continue;
      }
      Footprint<acc_t> f;
      if (!footprint(x, y, H, W, f)) continue;
      acc_t dot[4] = {0, 0, 0, 0};
      for (int64_t c0 = 0; c0 < D; c0 += kWarp * CPL) {
#pragma unroll
        for (int t = 0; t < CPL; ++t) {
          const int64_t d = c0 + lane + t * kWarp;
          if (d >= D) continue;
          const acc_t g = static_cast<acc_t>(grad_out[nqm * D + d]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (f.off[c] < 0) continue;
            const int64_t idx = level_off + f.off[c] * row + d;
            dot[c] += g * static_cast<acc_t>(value[idx]);
            atomicAdd(grad_value + idx, a * f.w[c] * g);
          }
        }
      }
      const acc_t hh = acc_t(1) - f.lh, hw = acc_t(1) - f.lw;
      const acc_t ga = warp_sum(f.w[0] * dot[0] + f.w[1] * dot[1] + f.w[2] * dot[2] + f.w[3] * dot[3]);
      const acc_t gw = warp_sum(hh * (dot[1] - dot[0]) + f.lh * (dot[3] - dot[2]));
      const acc_t gh = warp_sum(hw * (dot[2] - dot[0]) + f.lw * (dot[3] - dot[1]));
      if (lane == k) {
        out_ga = ga;
        out_gx = a * gw * static_cast<acc_t>(W);
        out_gy = a * gh * static_cast<acc_t>(H);
      }
    }
    if (j < LP) {
      const int64_t i = nqm * LP + j;
      grad_attn[i] = static_cast<scalar_t>(out_ga);
      grad_loc[2 * i] = static_cast<scalar_t>(out_gx);
      grad_loc[2 * i + 1] = static_cast<scalar_t>(out_gy);
    }
  }
}

// Calls f.template operator()<CPL>() with the smallest register tile covering D in one pass (max 8).
template <typename F>
void with_cpl(int64_t D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<loc_t>) with loc_t = scalar_t, or float for the mixed form (16-bit value, float32
// locations and weights). Only 16-bit value types instantiate the mixed form.
template <typename scalar_t, typename F>
void with_loc_type(bool mixed, F&& f) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (mixed) return f(TypeTag<float>{});
  }
  f(TypeTag<scalar_t>{});
}

int64_t num_blocks(const Sizes& s) { return (s.N * s.Q * s.M * kWarp + kThreads - 1) / kThreads; }

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, int64_t im2col_step) {
  (void)im2col_step;
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  at::Tensor out = at::empty({s.N, s.Q, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  if (value.numel() == 0) return out.zero_();
  TORCH_CHECK(num_blocks(s) < (int64_t{1} << 31), "deform_attn: too many (batch, query, head) triples");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool mixed = loc.scalar_type() != value.scalar_type();  // 16-bit value, float32 locations / weights
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    with_loc_type<scalar_t>(mixed, [&](auto loc_tag) {
      using loc_t = typename decltype(loc_tag)::type;
      with_cpl(s.D, [&](auto cpl) {
        ms_deform_attn_forward_kernel<scalar_t, loc_t, decltype(cpl)::value><<<num_blocks(s), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<loc_t>(), attn.data_ptr<loc_t>(), out.data_ptr<scalar_t>(), s.N, s.S, s.M, s.D, s.Q, s.L,
            s.P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    int64_t im2col_step) {
  (void)im2col_step;
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.N && grad_output.size(1) == s.Q &&
                  grad_output.size(2) == s.M * s.D,
              "deform_attn: grad_output must be (N, Q, M*D), got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  const at::Tensor gout = grad_output.contiguous().to(value.scalar_type());
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  if (grad_attn.numel() > 0 && value.numel() > 0) {
    TORCH_CHECK(num_blocks(s) < (int64_t{1} << 31), "deform_attn: too many (batch, query, head) triples");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool mixed = loc.scalar_type() != value.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      with_loc_type<scalar_t>(mixed, [&](auto loc_tag) {
        using loc_t = typename decltype(loc_tag)::type;
        with_cpl(s.D, [&](auto cpl) {
          ms_deform_attn_backward_kernel<scalar_t, loc_t, decltype(cpl)::value><<<num_blocks(s), kThreads, 0, stream>>>(
              value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
              loc.data_ptr<loc_t>(), attn.data_ptr<loc_t>(), gout.data_ptr<scalar_t>(),
              grad_value_acc.data_ptr<at::opmath_type<scalar_t>>(), grad_loc.data_ptr<loc_t>(),
              grad_attn.data_ptr<loc_t>(), s.N, s.S, s.M, s.D, s.Q, s.L, s.P);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(deform_attn, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace deform_attn
