// OpenVINO extension: deform_attn::ms_deform_attn as one custom node, run by this package's own CPU kernels.
//
// The exported ONNX graph of the "custom" form holds one node MSDeformAttn (domain "deform_attn", version 1)
// per attention instead of GridSample decompositions; the ONNX frontend maps it to the op below once this
// library is added to the Core (`core.add_extension(path)`, see deform_attn/openvino.py, which compiles it).
// Inputs and output are those of the torch op: value (N, S, M, D), spatial_shapes (L, 2) int64,
// level_start_index (L) int64, sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P)
// -> (N, Q, M * D); float32 only (a bf16 OpenVINO model runs this node in float32).
//
// The kernels are the ones of the torch extension (ms_deform_attn_cpu_kernel_bodies.inc, raw pointers, no
// torch): the generic copy is compiled in this file, the AVX2 and AVX-512 copies come from their own
// translation units. The copy is chosen from the CPU at run time, DEFORM_ATTN_CPU_ISA forces one as in the
// torch op. Work is split over OpenVINO's own threads (ov::parallel_nt).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../cpu/ms_deform_attn_cpu_kernel.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#define DEFORM_ATTN_ISA 0
#include "../cpu/ms_deform_attn_cpu_kernel_bodies.inc"
DEFORM_ATTN_DEFINE_ENTRY_POINTS(generic)

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

namespace deform_attn {
namespace openvino_ext {

using cpu::Isa;

Isa detect_isa() {
#ifdef DEFORM_ATTN_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* forced = std::getenv("DEFORM_ATTN_CPU_ISA");
  const std::string want = forced ? forced : "auto";
  // float32 only here: the avx512bf16 copy differs from avx512 in its bfloat16 entry points alone
  if (want == "auto" || want.empty()) return avx512 ? Isa::avx512 : (avx2 ? Isa::avx2 : Isa::generic);
  if (want == "generic") return Isa::generic;
  if (want == "avx2" && avx2) return Isa::avx2;
  if ((want == "avx512" || want == "avx512bf16") && avx512) return Isa::avx512;
  OPENVINO_THROW("deform_attn: DEFORM_ATTN_CPU_ISA=", want, " is not a copy this CPU can run (generic",
                 avx2 ? ", avx2" : "", avx512 ? ", avx512" : "", ")");
#else
  return Isa::generic;
#endif
}

void run_forward(Isa isa, const cpu::Problem& pr, const cpu::Tensors& t, void* buf, int64_t begin, int64_t end) {
#ifdef DEFORM_ATTN_X86
  if (isa == Isa::avx512) return cpu::forward_avx512(pr, t, buf, begin, end);
  if (isa == Isa::avx2) return cpu::forward_avx2(pr, t, buf, begin, end);
#endif
  (void)isa;
  cpu::forward_generic(pr, t, buf, begin, end);
}

std::vector<int64_t> as_int64(const ov::Tensor& t) {
  std::vector<int64_t> out(t.get_size());
  if (t.get_element_type() == ov::element::i64) {
    std::memcpy(out.data(), t.data(), out.size() * sizeof(int64_t));
  } else {
    OPENVINO_ASSERT(t.get_element_type() == ov::element::i32, "MSDeformAttn: level table of type ",
                    t.get_element_type());
    const int32_t* p = t.data<const int32_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  }
  return out;
}

class MSDeformAttn : public ov::op::Op {
 public:
  OPENVINO_OP("MSDeformAttn", "deform_attn");

  MSDeformAttn() = default;
  explicit MSDeformAttn(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 5, "MSDeformAttn takes 5 inputs, got ", get_input_size());
    for (size_t i : {size_t{0}, size_t{3}, size_t{4}}) {
      const auto et = get_input_element_type(i);
      NODE_VALIDATION_CHECK(this, et == ov::element::f32 || et.is_dynamic(), "MSDeformAttn input ", i,
                            " must be float32, got ", et);
    }
    for (size_t i : {size_t{1}, size_t{2}}) {
      const auto et = get_input_element_type(i);
      // the CPU plugin lowers int64 to int32 before it validates the nodes again
      NODE_VALIDATION_CHECK(this, et == ov::element::i64 || et == ov::element::i32 || et.is_dynamic(),
                            "MSDeformAttn input ", i, " (level table) must be int64 or int32, got ", et);
    }
    const ov::PartialShape& value = get_input_partial_shape(0);
    const ov::PartialShape& loc = get_input_partial_shape(3);
    ov::PartialShape out = ov::PartialShape::dynamic(3);
    if (value.rank().is_static() && loc.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, value.rank().get_length() == 4 && loc.rank().get_length() == 6,
                            "MSDeformAttn: value must be (N, S, M, D) and sampling_locations (N, Q, M, L, P, 2)");
      out = ov::PartialShape{loc[0], loc[1], value[2] * value[3]};
    }
    set_output_type(0, ov::element::f32, out);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
    check_new_args_count(this, new_args);
    return std::make_shared<MSDeformAttn>(new_args);
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }
  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const ov::Tensor& value = inputs[0];
    const ov::Tensor& shapes = inputs[1];
    const ov::Tensor& starts = inputs[2];
    const ov::Tensor& loc = inputs[3];
    const ov::Tensor& attn = inputs[4];
    const ov::Shape vs = value.get_shape(), ls = loc.get_shape(), as = attn.get_shape();
    OPENVINO_ASSERT(vs.size() == 4 && ls.size() == 6 && ls[5] == 2 && ls[0] == vs[0] && ls[2] == vs[2],
                    "MSDeformAttn: value ", vs, " and sampling_locations ", ls, " do not match");
    OPENVINO_ASSERT(as.size() == 5 && as[0] == ls[0] && as[1] == ls[1] && as[2] == ls[2] && as[3] == ls[3] &&
                        as[4] == ls[4],
                    "MSDeformAttn: attention_weights ", as, " do not match sampling_locations ", ls);
    const int64_t L = static_cast<int64_t>(ls[3]);
    OPENVINO_ASSERT(shapes.get_shape() == ov::Shape({ls[3], 2}) && starts.get_shape() == ov::Shape({ls[3]}),
                    "MSDeformAttn: level table ", shapes.get_shape(), " / ", starts.get_shape(), " for ", L,
                    " levels");
    const std::vector<int64_t> shapes64 = as_int64(shapes), starts64 = as_int64(starts);
    const int64_t* sh = shapes64.data();
    const int64_t* st = starts64.data();
    const int64_t S = static_cast<int64_t>(vs[1]);
    for (int64_t l = 0; l < L; ++l) {
      OPENVINO_ASSERT(sh[2 * l] > 0 && sh[2 * l + 1] > 0 && sh[2 * l] < (int64_t{1} << 31) / sh[2 * l + 1] &&
                          st[l] >= 0 && st[l] + sh[2 * l] * sh[2 * l + 1] <= S,
                      "MSDeformAttn: level ", l, " (", sh[2 * l], "x", sh[2 * l + 1], " at ", st[l],
                      ") does not fit in value length ", S);
    }
    const cpu::Problem pr{sh, st, static_cast<int64_t>(vs[0]), S, static_cast<int64_t>(vs[2]),
                          static_cast<int64_t>(vs[3]), static_cast<int64_t>(ls[1]), L,
                          static_cast<int64_t>(ls[4]), cpu::DType::f32, cpu::DType::f32};
    ov::Tensor& out = outputs[0];
    out.set_shape(ov::Shape{vs[0], ls[1], vs[2] * vs[3]});
    float* out_ptr = out.data<float>();
    const int64_t rows = pr.N * pr.Q;
    if (rows == 0) return true;
    if (value.get_size() == 0) {
      std::memset(out_ptr, 0, out.get_byte_size());
      return true;
    }
    const cpu::Tensors t{value.data(), loc.data(), attn.data(), out_ptr, nullptr, nullptr, nullptr, nullptr};
    const Isa isa = isa_;
    const int64_t buf_bytes = cpu::task_buffer_bytes(pr);
    ov::parallel_nt(0, [&](const int ithr, const int nthr) {
      const int64_t begin = rows * ithr / nthr, end = rows * (ithr + 1) / nthr;
      if (begin >= end) return;
      std::vector<char> bytes(static_cast<size_t>(buf_bytes) + 64);
      const uintptr_t p = reinterpret_cast<uintptr_t>(bytes.data());
      run_forward(isa, pr, t, reinterpret_cast<void*>((p + 63) & ~static_cast<uintptr_t>(63)), begin, end);
    });
    return true;
  }

 private:
  Isa isa_ = detect_isa();
};

}  // namespace openvino_ext
}  // namespace deform_attn

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<deform_attn::openvino_ext::MSDeformAttn>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<deform_attn::openvino_ext::MSDeformAttn>>(
         "MSDeformAttn", "deform_attn")}));
