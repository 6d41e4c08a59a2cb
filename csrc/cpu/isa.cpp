#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "kernels.h"

namespace sparsekern::cpu {
namespace {

bool cpu_has(const char* name) {
#if defined(__x86_64__) || defined(_M_X64)
  if (std::string(name) == "avx512") return __builtin_cpu_supports("avx512f");
  if (std::string(name) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(name) == "scalar";
}

const KernelTable<float>* table_named(const std::string& name) {
  if (name == "avx512") return avx512_kernels();
  if (name == "avx2") return avx2_kernels();
  if (name == "scalar") return scalar_kernels<float>();
  return nullptr;
}

std::atomic<const KernelTable<float>*>& active_table() {
  static std::atomic<const KernelTable<float>*> table{[] {
    const std::vector<std::string> usable = available_isas();
    const char* wanted = std::getenv("SPARSEKERN_ISA");
    for (const std::string& name : usable)
      if (wanted && name == wanted) return table_named(name);
    return table_named(usable.front());
  }()};
  return table;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* name : {"avx512", "avx2", "scalar"})
    if (cpu_has(name) && table_named(name)) out.emplace_back(name);
  return out;
}

std::string active_isa() { return active_table().load()->name; }

int64_t active_panel_rows() { return active_table().load()->panel; }

void set_isa(const std::string& name) {
  for (const std::string& usable : available_isas())
    if (usable == name) {
      active_table().store(table_named(name));
      return;
    }
  throw std::invalid_argument("sparsekern.set_isa: isa='" + name +
                              "' is not available on this CPU/build");
}

// The float32 kernels used by linear.cpp.
const KernelTable<float>* float_kernels() { return active_table().load(); }

}  // namespace sparsekern::cpu
