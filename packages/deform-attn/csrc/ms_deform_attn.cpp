// Schema of the deform_attn ops and the Python extension module.
//
// Like torchvision's csrc/ops: the schema lives here, each backend registers its kernels in its own file
// (cpu/ms_deform_attn_cpu.cpp, cuda/ms_deform_attn_cuda.cu) with TORCH_LIBRARY_IMPL. Autograd and the
// fake (meta) kernels are registered from Python (deform_attn/ops.py) with torch.library, which keeps
// them visible to torch.compile and torch.export.
#include <pybind11/stl.h>
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
  m.def("cpu_isa", &deform_attn::cpu_isa_name,
        "The CPU kernel copy in use: generic, avx2, avx512 or avx512bf16 (the first call reads "
        "DEFORM_ATTN_CPU_ISA; ValueError / RuntimeError for a bad value)");
  m.def("set_cpu_isa", &deform_attn::set_cpu_isa, pybind11::arg("name"),
        "Select the CPU kernel copy: auto, generic, avx2, avx512, avx512bf16. ValueError for an unknown name, "
        "RuntimeError when the CPU lacks the copy.");
  m.def("cpu_isas_supported", &deform_attn::cpu_isas_supported, "The CPU kernel copies this CPU and OS can run");
  m.def("cpu_flags", &deform_attn::cpu_flags, "The CPU/OS flags the kernel copies depend on that are present");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
