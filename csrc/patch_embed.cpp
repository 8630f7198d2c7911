// vit_fast._C: patch embedding, images [B, C, H, W] -> tokens [B, (1+)L, E], as one gather, one GEMM
// and one epilogue instead of the eager pipeline's six passes (to float, normalize, conv2d, flatten,
// cat the class token, add the position embedding).
//
// This file: the op schemas (TORCH_LIBRARY), the input checks, the device-independent forward and
// backward (GEMMs and reductions through ATen) and the CPU gather and epilogue. patch_embed_cuda.cu
// supplies the CUDA gather and epilogue kernels and registers the CUDA implementations; fake
// implementations and autograd are registered in Python (vit_fast/ops/patch_embed.py).
//
// The patch matrix has one row per output token, B*T rows with T = cls_rows + L: row b*T + t holds
// patch t - cls_rows of image b (patches in row-major grid order), the class-token row (t = 0 when
// there is a class token) holds zeros, so one GEMM writes every token row of the output in place.
// Its columns are ordered (c, i, j) like the Conv2d weight [E, C, p, p] flattened to [E, C*p*p].
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "patch_embed.h"

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vit_fast {

// GatherPatches, AddPosAndCls (the device kernels the shared forward / backward call), the
// declarations of patch_embed_fwd / patch_embed_bwd and register_patch_embed_backend (the
// TORCH_LIBRARY_IMPL registration of both backends): patch_embed.h.

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_on_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "patch_embed: expected ", name, " on x's device ", x.device(), ", got ",
              t.device());
}

void check_param(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef expected,
                 const at::Tensor& x, const at::Tensor& weight) {
  if (!t.has_value()) return;
  check_on_device(name, *t, x);
  TORCH_CHECK_VALUE(t->sizes() == expected, "patch_embed: expected ", name, " of shape ", expected, ", got ",
                    t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == weight.scalar_type(), "patch_embed: expected ", name,
                    " of the weight's dtype ", weight.scalar_type(), ", got ", t->scalar_type());
}

void check_channel_values(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(t.has_value(), "patch_embed: uint8 x needs mean and std, one value per channel (", C,
                    "): pixel = (x / 255 - mean[c]) / std[c]; ", name, " is missing");
  check_on_device(name, *t, x);
  TORCH_CHECK_VALUE(t->numel() == C, "patch_embed: expected ", name, " with one value per channel (", C,
                    "), got shape ", t->sizes());
  TORCH_CHECK_VALUE(is_float_dtype(t->scalar_type()), "patch_embed: expected ", name,
                    " of a floating dtype, got ", t->scalar_type());
}

// Every TORCH_CHECK of the op; returns the number of patches L.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                     const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  TORCH_CHECK_VALUE(x.dim() == 4, "patch_embed: expected x of rank 4 [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) > 0,
                    "patch_embed: expected weight [E, C, p, p] (a Conv2d weight with a square kernel), got shape ",
                    weight.sizes());
  check_on_device("weight", weight, x);
  TORCH_CHECK_VALUE(is_float_dtype(weight.scalar_type()),
                    "patch_embed: expected weight of dtype float32, float16, bfloat16 or float64, got ",
                    weight.scalar_type());
  const auto x_dtype = x.scalar_type();
  TORCH_CHECK_VALUE(x_dtype == at::kByte || is_float_dtype(x_dtype),
                    "patch_embed: expected x of dtype float32, float16, bfloat16, float64 or uint8, got ", x_dtype);
  TORCH_CHECK_VALUE(x_dtype == at::kByte || x_dtype == weight.scalar_type(),
                    "patch_embed: expected floating-point x of the weight's dtype ", weight.scalar_type(), ", got ",
                    x_dtype, " (uint8 x is converted to the weight's dtype)");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), E = weight.size(0), p = weight.size(2);
  TORCH_CHECK_VALUE(C == weight.size(1), "patch_embed: x has ", C, " channels but weight [E, C, p, p] = ",
                    weight.sizes(), " expects ", weight.size(1));
  // As Conv2d(kernel = stride = p): a remainder of H or W past the last whole patch is dropped (timm's
  // PatchEmbed with strict_img_size, e.g. 384 = 27 * 14 + 6 pixels -> 27 patches); the module decides
  // whether a size is allowed, the op takes any size holding at least one patch.
  TORCH_CHECK_VALUE(H >= p && W >= p, "patch_embed: expected H and W of at least the patch size ", p,
                    ", got H = ", H, ", W = ", W);
  const int64_t L = (H / p) * (W / p);
  const int64_t T = L + (cls_token.has_value() ? 1 : 0);
  check_param("bias", bias, {E}, x, weight);
  check_param("cls_token", cls_token, {1, 1, E}, x, weight);
  TORCH_CHECK_VALUE(!pos_embed.has_value() || pos_embed->sizes() == at::IntArrayRef({1, T, E}),
                    "patch_embed: expected pos_embed of shape [1, ", T, ", ", E, "] (", L, " patches",
                    cls_token.has_value() ? " + the class token" : ", no class token", "), got ",
                    pos_embed.has_value() ? pos_embed->sizes() : at::IntArrayRef());
  check_param("pos_embed", pos_embed, {1, T, E}, x, weight);
  if (x_dtype == at::kByte) {  // floating-point x counts as normalized already: mean and std are ignored
    check_channel_values("mean", mean, x);
    check_channel_values("std", std, x);
  }
  return L;
}

// mean and std as [C] contiguous tensors in the weight's opmath dtype (what the gather computes in);
// undefined for floating-point x.
std::pair<at::Tensor, at::Tensor> channel_values(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& mean,
                                                 const std::optional<at::Tensor>& std) {
  if (x.scalar_type() != at::kByte) return {};
  const auto opmath = at::toOpMathType(weight.scalar_type());
  return {mean->reshape({-1}).to(opmath).contiguous(), std->reshape({-1}).to(opmath).contiguous()};
}

at::Tensor gather_patch_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& std, int64_t L, int64_t cls_rows, GatherPatches gather) {
  const int64_t p = weight.size(2), K = weight.size(1) * p * p;
  auto patches = at::empty({x.size(0) * (cls_rows + L), K}, weight.options());
  if (patches.numel() > 0) {
    const auto [mean_c, std_c] = channel_values(x, weight, mean, std);
    gather(x, mean_c, std_c, patches, p, cls_rows);
  }
  return patches;
}

// The memory format dx gets: channels_last when x is, else contiguous (the Python fake impl agrees).
at::MemoryFormat grad_memory_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

}  // namespace

// The forward, shared by the CPU and CUDA implementations: checks, gather, one GEMM (bias folded
// into addmm) written straight into the output, then the epilogue when there is a cls or pos.
at::Tensor patch_embed_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                               GatherPatches gather, AddPosAndCls add_pos_and_cls) {
  const int64_t L = check_inputs(x, weight, bias, cls_token, pos_embed, mean, std);
  const int64_t B = x.size(0), E = weight.size(0), cls_rows = cls_token.has_value() ? 1 : 0, T = cls_rows + L;
  const auto patches = gather_patch_rows(x, weight, mean, std, L, cls_rows, gather);
  auto out = at::empty({B, T, E}, weight.options());
  auto out_rows = out.view({B * T, E});
  const auto weight_t = weight.reshape({E, patches.size(1)}).t();  // [K, E]
  if (bias.has_value()) {
    at::addmm_out(out_rows, *bias, patches, weight_t);
  } else {
    at::mm_out(out_rows, patches, weight_t);
  }
  if (out.numel() > 0 && (cls_token.has_value() || pos_embed.has_value())) {
    add_pos_and_cls(out, cls_token.has_value() ? cls_token->contiguous() : at::Tensor(),
                    pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor());
  }
  return out;
}

// The backward, shared by the CPU and CUDA implementations. output_mask picks which of
// (dx, dweight, dbias, dcls, dpos) to compute; the others come back as empty [0] tensors.
// The patch matrix is recomputed from x rather than saved by the forward: it has as many elements
// as x (B*C*H*W) in the weight's dtype (2-4x x's bytes for uint8 images), and one gather pass
// costs little next to the dweight GEMM.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& std, std::array<bool, 5> output_mask, GatherPatches gather) {
  const int64_t L = check_inputs(x, weight, std::nullopt, std::nullopt, std::nullopt, mean, std);
  const int64_t B = x.size(0), E = weight.size(0), p = weight.size(2);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(2) == E &&
                        (grad_out.size(1) == L || grad_out.size(1) == L + 1),
                    "patch_embed_bwd: expected grad_out of shape [", B, ", ", L, " or ", L + 1, ", ", E,
                    "], got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == weight.scalar_type(), "patch_embed_bwd: expected grad_out of the ",
                    "weight's dtype ", weight.scalar_type(), ", got ", grad_out.scalar_type());
  check_on_device("grad_out", grad_out, x);
  const int64_t T = grad_out.size(1), cls_rows = T - L, K = weight.size(1) * p * p;
  const auto grad_rows = grad_out.contiguous().view({B * T, E});
  const auto unused = at::empty({0}, weight.options());
  at::Tensor dx = unused, dweight = unused, dbias = unused, dcls = unused, dpos = unused;
  if (output_mask[0]) {
    TORCH_CHECK_VALUE(x.scalar_type() != at::kByte, "patch_embed_bwd: uint8 x has no gradient");
    const int64_t C = x.size(1), grid_h = x.size(2) / p, grid_w = x.size(3) / p;
    // col2im: patches do not overlap, so dx is the patch-matrix gradient permuted back to images;
    // the dropped remainder rows / columns (H or W not a multiple of p) read nothing: zero gradient.
    const auto grad_patches = at::mm(grad_rows, weight.reshape({E, K})).view({B, T, K}).narrow(1, cls_rows, L);
    const bool remainder = x.size(2) != grid_h * p || x.size(3) != grid_w * p;
    const auto dx_options = x.options().memory_format(grad_memory_format(x));
    dx = remainder ? at::zeros(x.sizes(), dx_options) : at::empty(x.sizes(), dx_options);
    // the covered part as a strided view (splitting H and W into (grid, p) needs no contiguity)
    dx.narrow(2, 0, grid_h * p)
        .narrow(3, 0, grid_w * p)
        .view({B, C, grid_h, p, grid_w, p})
        .copy_(grad_patches.reshape({B, grid_h, grid_w, C, p, p}).permute({0, 3, 1, 4, 2, 5}));
  }
  if (output_mask[1]) {
    const auto patches = gather_patch_rows(x, weight, mean, std, L, cls_rows, gather);
    dweight = at::mm(grad_rows.t(), patches).view(weight.sizes());
  }
  if (output_mask[2]) dbias = grad_out.narrow(1, cls_rows, L).sum(at::IntArrayRef({0, 1}));
  if (output_mask[3]) {
    TORCH_CHECK_VALUE(cls_rows == 1, "patch_embed_bwd: a cls_token gradient needs grad_out with the class row");
    dcls = grad_out.narrow(1, 0, 1).sum(0, /*keepdim=*/true);
  }
  if (output_mask[4]) dpos = grad_out.sum(0, /*keepdim=*/true);
  return {dx, dweight, dbias, dcls, dpos};
}

namespace {

template <typename in_t, typename out_t>
void gather_patches_cpu_typed(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                              const at::Tensor& patches, int64_t p, int64_t cls_rows) {
  using opmath_t = at::opmath_type<out_t>;
  const int64_t C = x.size(1), grid_w = x.size(3) / p, L = (x.size(2) / p) * grid_w, T = cls_rows + L;
  const int64_t K = C * p * p, rows = patches.size(0);
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const in_t* src = x.const_data_ptr<in_t>();
  out_t* dst = patches.mutable_data_ptr<out_t>();
  // pixel = x * scale[c] + shift[c] = (x / 255 - mean[c]) / std[c]
  std::vector<opmath_t> scale(C, opmath_t(1)), shift(C, opmath_t(0));
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    const opmath_t* m = mean.const_data_ptr<opmath_t>();
    const opmath_t* s = std.const_data_ptr<opmath_t>();
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = opmath_t(1) / (opmath_t(255) * s[c]);
      shift[c] = -m[c] / s[c];
    }
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / K);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      out_t* row = dst + r * K;
      const int64_t b = r / T, t = r % T;
      if (t < cls_rows) {
        std::fill(row, row + K, out_t(0));
        continue;
      }
      const int64_t l = t - cls_rows, gh = l / grid_w, gw = l % grid_w;
      const in_t* patch = src + b * sB + gh * p * sH + gw * p * sW;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < p; ++i) {
          const in_t* line = patch + c * sC + i * sH;
          out_t* o = row + (c * p + i) * p;
          for (int64_t j = 0; j < p; ++j) {
            if constexpr (std::is_same_v<in_t, uint8_t>) {
              o[j] = static_cast<out_t>(static_cast<opmath_t>(line[j * sW]) * scale[c] + shift[c]);
            } else {
              o[j] = line[j * sW];
            }
          }
        }
      }
    }
  });
}

void gather_patches_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std, const at::Tensor& patches,
                        int64_t p, int64_t cls_rows) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "patch_embed_gather_cpu", [&] {
    if (x.scalar_type() == at::kByte) {
      gather_patches_cpu_typed<uint8_t, scalar_t>(x, mean, std, patches, p, cls_rows);
    } else {  // floating-point x has the weight's dtype (checked)
      gather_patches_cpu_typed<scalar_t, scalar_t>(x, mean, std, patches, p, cls_rows);
    }
  });
}

// On the CPU the epilogue is two vectorized ATen passes; the class row is overwritten last.
void add_pos_and_cls_cpu(const at::Tensor& out, const at::Tensor& cls_token, const at::Tensor& pos_embed) {
  if (pos_embed.defined()) out.add_(pos_embed);
  if (cls_token.defined()) {
    const auto cls_row = cls_token.select(1, 0);  // [1, E]
    out.select(1, 0).copy_(pos_embed.defined() ? cls_row + pos_embed.select(1, 0) : cls_row);
  }
}

}  // namespace

// The one TORCH_LIBRARY of namespace vit_fast: the Triton ops register into it from Python as
// fragments (torch.library.custom_op).
TORCH_LIBRARY(vit_fast, m) {
  m.set_python_module("vit_fast.ops.patch_embed");  // where the fake impls and autograd live
  m.def(
      "patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias=None, Tensor? cls_token=None, Tensor? pos_embed=None, "
      "Tensor? mean=None, Tensor? std=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "patch_embed_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? mean, Tensor? std, bool[5] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_cls_token, Tensor grad_pos_embed)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(vit_fast, CPU, m) {
  register_patch_embed_backend<gather_patches_cpu, add_pos_and_cls_cpu>(m);
}

}  // namespace vit_fast

// `import vit_fast._C` loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vit_fast's patch-embedding op (torch.ops.vit_fast)",
                                   -1, nullptr};
  return PyModule_Create(&module_def);
}
