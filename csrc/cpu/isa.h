// Run-time choice of the CPU instruction set used by the float32 kernels.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace sparsekern::cpu {
// Instruction sets this CPU can run, best first; "scalar" is always last.
std::vector<std::string> available_isas();
std::string active_isa();
// Batch rows per panel of the active CSR kernels (kernels.h; 0: they read x row-major).
int64_t active_panel_rows();
// Select one of available_isas(); throws on anything else. Initial value: SPARSEKERN_ISA or best.
void set_isa(const std::string& name);

template <class T>
struct KernelTable;
// The float32 kernels of the active instruction set.
const KernelTable<float>* float_kernels();
}  // namespace sparsekern::cpu
