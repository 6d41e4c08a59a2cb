// AVX-512F instantiation of simd_kernels.h (16-lane tiles; 8-lane tiles for 8-wide blocks).
// Only reached after a run-time CPU check.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12 reports its own _mm512_undefined_* placeholders as uninitialized (GCC PR105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels.h"
#define SK_WITH_V16
#include "simd_kernels.h"

namespace {
constexpr sparsekern::cpu::KernelTable<float> kAvx512 = make_table<V16>("avx512");
}
#pragma GCC pop_options

namespace sparsekern::cpu {
const KernelTable<float>* avx512_kernels() { return &kAvx512; }
}  // namespace sparsekern::cpu
#else
#include "kernels.h"
namespace sparsekern::cpu {
const KernelTable<float>* avx512_kernels() { return nullptr; }
}  // namespace sparsekern::cpu
#endif
