// Schema of the deform_attn ops and the Python extension module.
//
// Like torchvision's csrc/ops: the schema lives here, each backend registers its kernels in its own file
// (cpu/ms_deform_attn_cpu.cpp, cuda/ms_deform_attn_cuda.cu) with TORCH_LIBRARY_IMPL. Autograd and the
// fake (meta) kernels are registered from Python (deform_attn/ops.py) with torch.library, which keeps
// them visible to torch.compile and torch.export.
#include <torch/extension.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

TORCH_LIBRARY(deform_attn, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, int im2col_step) "
      "-> (Tensor, Tensor, Tensor)");
}

#ifndef WITH_CUDA
namespace deform_attn {
std::string cuda_build_info() { return ""; }
}  // namespace deform_attn
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deform_attn kernels; the ops are torch.ops.deform_attn.ms_deform_attn and _ms_deform_attn_backward";
  m.def("cuda_build_info", &deform_attn::cuda_build_info,
        "CUDA archs and toolkit of the compiled CUDA kernels, empty when built without CUDA");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
