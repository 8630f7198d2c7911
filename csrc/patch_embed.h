// vit_fast._C's internal interface between patch_embed.cpp (schemas, checks, the device-independent
// forward and backward, the CPU kernels) and patch_embed_cuda.cu (the CUDA kernels): the device
// kernels' signatures, the shared forward / backward both implementations call and the one
// registration both backends use. One copy, included by both files.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace vit_fast {

// gather: fills patches [B*T, C*p*p] from x; mean/std ([C], opmath dtype) are defined for uint8 x.
using GatherPatches = void (*)(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                               const at::Tensor& patches, int64_t patch, int64_t cls_rows);
// epilogue: out [B, T, E] holds patches @ weight^T + bias; adds pos_embed [1, T, E] to every row and
// writes cls_token [1, 1, E] (+ pos_embed[0, 0]) into row 0. Either tensor may be undefined.
using AddPosAndCls = void (*)(const at::Tensor& out, const at::Tensor& cls_token, const at::Tensor& pos_embed);

// The forward, defined in patch_embed.cpp: checks, gather, one GEMM, then the epilogue.
at::Tensor patch_embed_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                               GatherPatches gather, AddPosAndCls add_pos_and_cls);

// The backward, defined in patch_embed.cpp: (dx, dweight, dbias, dcls, dpos) for output_mask, the
// others empty [0] tensors; gather recomputes the patch matrix from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& std, std::array<bool, 5> output_mask, GatherPatches gather);

// One backend's implementations of the two ops: the shared forward and backward bound to that
// backend's gather and epilogue, with the schemas' signatures (what m.impl registers).
template <GatherPatches gather, AddPosAndCls add_pos_and_cls>
struct PatchEmbedBackend {
  static at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                            const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
    return patch_embed_fwd(x, weight, bias, cls_token, pos_embed, mean, std, gather, add_pos_and_cls);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std, std::array<bool, 5> output_mask) {
    return patch_embed_bwd(grad_out, x, weight, mean, std, output_mask, gather);
  }
};

// Registers patch_embed and patch_embed_bwd for the backend of a TORCH_LIBRARY_IMPL block `m`:
// patch_embed.cpp (CPU) and patch_embed_cuda.cu (CUDA) each call it with their own gather and epilogue.
template <GatherPatches gather, AddPosAndCls add_pos_and_cls>
void register_patch_embed_backend(torch::Library& m) {
  using Backend = PatchEmbedBackend<gather, add_pos_and_cls>;
  m.impl("patch_embed_fwd", &Backend::forward);
  m.impl("patch_embed_bwd", &Backend::backward);
}

}  // namespace vit_fast
