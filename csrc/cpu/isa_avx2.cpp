// AVX2 + FMA instantiation of simd_kernels.h. Only reached after a run-time CPU check.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "kernels.h"
#include "simd_kernels.h"

namespace {
constexpr sparsekern::cpu::KernelTable<float> kAvx2 = make_table<V8>("avx2");
}
#pragma GCC pop_options

namespace sparsekern::cpu {
const KernelTable<float>* avx2_kernels() { return &kAvx2; }
}  // namespace sparsekern::cpu
#else
#include "kernels.h"
namespace sparsekern::cpu {
const KernelTable<float>* avx2_kernels() { return nullptr; }
}  // namespace sparsekern::cpu
#endif
