// CUDA implementation of vit_fast::patch_embed_fwd / _bwd (schema, checks and the device-independent forward
// and backward are in patch_embed.cpp): a gather kernel that builds the patch matrix [B*T, C*p*p]
// reading x through its strides (NCHW, channels_last or any view) and converting / normalizing
// uint8 pixels on the way, the GEMM through ATen (cuBLAS), and an epilogue kernel that adds the
// position embedding and writes the class-token rows of the output [B, T, E] in place.
//
// Streams and guards come from c10/cuda (what at::cuda::getCurrentCUDAStream returns): ATen's
// CUDAContext.h would pull in the cuBLAS headers, which the CI's header-only nvcc check lacks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "patch_embed.h"

#include <array>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

namespace vit_fast {

namespace {

constexpr int kMaxThreads = 256;
constexpr int kGatherRows = 16;  // patch-matrix rows per block: each thread's column setup is reused for all of them
constexpr int kVectorBytes = 16;

// VEC consecutive elements moved with one 16-byte (or narrower) load or store (the epilogue's rows).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

int threads_for(int64_t work_items) {
  const int64_t warps = (work_items + 31) / 32;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, warps * 32)));
}

// The widest VEC <= 16 bytes / element size that divides n.
int vector_width(int64_t n, int64_t element_size) {
  int vec = static_cast<int>(kVectorBytes / element_size);
  while (vec > 1 && n % vec != 0) vec /= 2;
  return vec;
}

bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// patches[r, k] = x[b, c, gh*p + i, gw*p + j] (normalized if uint8) for r = b*T + cls_rows + gh*GW + gw,
// k = (c*p + i)*p + j; class-token rows (t < cls_rows) are zero. GW = W / p and GH = H / p round down: a
// remainder past the last whole patch (H or W not a multiple of p) is never read, as Conv2d(stride = p).
// Block: kGatherRows rows; thread: one column k at a time (stride blockDim.x), the same in every row, so
// its (c, i, j) decomposition is paid once for kGatherRows elements. One element per thread keeps a
// warp's loads on two image rows of a patch (p = 16) and its stores contiguous; wider per-thread
// vectors along j would spread each warp load over 32 * VEC / p image rows.
template <typename in_t, typename out_t, bool NORMALIZE>
__global__ void gather_patches_kernel(const in_t* __restrict__ x,                      // [B, C, H, W], strides sB..sW
                                      const at::opmath_type<out_t>* __restrict__ mean,  // [C] (uint8 x)
                                      const at::opmath_type<out_t>* __restrict__ std,   // [C] (uint8 x)
                                      out_t* __restrict__ patches,                      // [rows, K]
                                      int64_t rows, int64_t tokens, int64_t cls_rows, int64_t grid_w, int patch,
                                      int K, int64_t sB, int64_t sC, int64_t sH, int64_t sW) {
  using opmath_t = at::opmath_type<out_t>;
  __shared__ int64_t row_origin[kGatherRows];  // offset of the patch's top-left pixel in x; -1: class-token row
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kGatherRows;
  if (threadIdx.x < kGatherRows) {
    const int64_t r = row0 + threadIdx.x;
    int64_t origin = -1;
    if (r < rows) {
      const int64_t b = r / tokens, t = r % tokens;
      if (t >= cls_rows) {
        const int64_t l = t - cls_rows, gh = l / grid_w, gw = l % grid_w;
        origin = b * sB + gh * patch * sH + gw * patch * sW;
      }
    }
    row_origin[threadIdx.x] = origin;
  }
  __syncthreads();
  const int block_rows = static_cast<int>(rows - row0 < kGatherRows ? rows - row0 : kGatherRows);
  const int patch_area = patch * patch;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int c = k / patch_area, i = (k - c * patch_area) / patch, j = k - c * patch_area - i * patch;
    const int64_t column_offset = c * sC + i * sH + j * sW;
    opmath_t scale = 1, shift = 0;
    if constexpr (NORMALIZE) {  // (x / 255 - mean) / std as one multiply-add
      scale = opmath_t(1) / (opmath_t(255) * std[c]);
      shift = -mean[c] / std[c];
    }
    out_t* out = patches + row0 * K + k;
#pragma unroll
    for (int rr = 0; rr < kGatherRows; ++rr) {
      if (rr < block_rows) {
        const int64_t origin = row_origin[rr];
        opmath_t value = 0;
        if (origin >= 0) {
          value = static_cast<opmath_t>(x[origin + column_offset]);
          if constexpr (NORMALIZE) value = value * scale + shift;
        }
        out[static_cast<int64_t>(rr) * K] = static_cast<out_t>(value);
      }
    }
  }
}

template <typename in_t, typename out_t, bool NORMALIZE>
void launch_gather(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std, const at::Tensor& patches,
                   int64_t p, int64_t cls_rows) {
  using opmath_t = at::opmath_type<out_t>;
  const int64_t rows = patches.size(0), K = patches.size(1), grid_w = x.size(3) / p;
  const int64_t tokens = cls_rows + (x.size(2) / p) * grid_w;
  const int64_t blocks = (rows + kGatherRows - 1) / kGatherRows;
  TORCH_CHECK(K <= INT_MAX && blocks <= INT_MAX, "patch_embed: patch matrix [", rows, ", ", K, "] too large");
  gather_patches_kernel<in_t, out_t, NORMALIZE>
      <<<static_cast<unsigned>(blocks), threads_for(K), 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<in_t>(), NORMALIZE ? mean.const_data_ptr<opmath_t>() : nullptr,
          NORMALIZE ? std.const_data_ptr<opmath_t>() : nullptr, patches.mutable_data_ptr<out_t>(), rows, tokens,
          cls_rows, grid_w, static_cast<int>(p), static_cast<int>(K), x.stride(0), x.stride(1), x.stride(2),
          x.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_patches_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                         const at::Tensor& patches, int64_t p, int64_t cls_rows) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "patch_embed_gather_cuda", [&] {
    if (x.scalar_type() == at::kByte) {
      launch_gather<uint8_t, scalar_t, true>(x, mean, std, patches, p, cls_rows);
    } else {  // floating-point x has the weight's dtype (checked)
      launch_gather<scalar_t, scalar_t, false>(x, mean, std, patches, p, cls_rows);
    }
  });
}

// out[b, t] += pos_embed[t] for every row (class row: out[b, 0] = cls_token + pos_embed[0]); without a
// position embedding only the class rows are written (rows_per_image = 1).
// Block: blockDim.y rows, blockDim.x threads of VEC consecutive channels each, looping over E.
template <typename scalar_t, int VEC>
__global__ void add_pos_and_cls_kernel(scalar_t* __restrict__ out,              // [B, tokens, E], GEMM result + bias
                                       const scalar_t* __restrict__ cls_token,  // [E] or nullptr
                                       const scalar_t* __restrict__ pos_embed,  // [tokens, E] or nullptr
                                       int64_t rows, int64_t rows_per_image, int64_t tokens, int64_t E) {
  using opmath_t = at::opmath_type<scalar_t>;
  using VecT = Pack<scalar_t, VEC>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / rows_per_image, t = row % rows_per_image;
  scalar_t* out_row = out + (b * tokens + t) * E;
  const bool class_row = cls_token != nullptr && t == 0;
  for (int64_t e = static_cast<int64_t>(threadIdx.x) * VEC; e < E; e += static_cast<int64_t>(blockDim.x) * VEC) {
    VecT value = *reinterpret_cast<const VecT*>(class_row ? cls_token + e : out_row + e);
    if (pos_embed != nullptr) {
      const VecT pos = *reinterpret_cast<const VecT*>(pos_embed + t * E + e);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        value.v[v] = static_cast<scalar_t>(static_cast<opmath_t>(value.v[v]) + static_cast<opmath_t>(pos.v[v]));
      }
    }
    *reinterpret_cast<VecT*>(out_row + e) = value;
  }
}

template <typename scalar_t, int VEC>
void launch_add_pos_and_cls(const at::Tensor& out, const at::Tensor& cls_token, const at::Tensor& pos_embed) {
  const int64_t B = out.size(0), tokens = out.size(1), E = out.size(2);
  const int64_t rows_per_image = pos_embed.defined() ? tokens : 1;
  const int64_t rows = B * rows_per_image;
  const int threads_x = threads_for(E / VEC);
  const int threads_y = kMaxThreads / threads_x;
  const int64_t blocks = (rows + threads_y - 1) / threads_y;
  TORCH_CHECK(blocks <= INT_MAX, "patch_embed: output [", B, ", ", tokens, ", ", E, "] too large");
  add_pos_and_cls_kernel<scalar_t, VEC>
      <<<static_cast<unsigned>(blocks), dim3(threads_x, threads_y), 0, c10::cuda::getCurrentCUDAStream()>>>(
          out.mutable_data_ptr<scalar_t>(), cls_token.defined() ? cls_token.const_data_ptr<scalar_t>() : nullptr,
          pos_embed.defined() ? pos_embed.const_data_ptr<scalar_t>() : nullptr, rows, rows_per_image, tokens, E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void add_pos_and_cls_cuda(const at::Tensor& out, const at::Tensor& cls_token, const at::Tensor& pos_embed) {
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "patch_embed_epilogue_cuda", [&] {
    // Vector accesses need E % VEC == 0 and every base pointer aligned to the vector.
    int vec = vector_width(out.size(2), sizeof(scalar_t));
    for (const at::Tensor* t : {&out, &cls_token, &pos_embed}) {
      while (vec > 1 && t->defined() && !aligned_to(t->const_data_ptr(), vec * sizeof(scalar_t))) vec /= 2;
    }
    switch (vec) {
      case 8:
        return launch_add_pos_and_cls<scalar_t, 8>(out, cls_token, pos_embed);
      case 4:
        return launch_add_pos_and_cls<scalar_t, 4>(out, cls_token, pos_embed);
      case 2:
        return launch_add_pos_and_cls<scalar_t, 2>(out, cls_token, pos_embed);
      default:
        return launch_add_pos_and_cls<scalar_t, 1>(out, cls_token, pos_embed);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  register_patch_embed_backend<gather_patches_cuda, add_pos_and_cls_cuda>(m);
}

}  // namespace vit_fast
