"""Builds sparsekern._C from csrc/: the op library, the CPU kernels and, when a CUDA toolkit
matching torch is found (or SPARSEKERN_CUDA=1), the CUDA kernels in csrc/cuda/.

Portable by construction: no native-CPU tuning or fast-math flags. SIMD kernels are compiled per
instruction set with `#pragma GCC target` and chosen at run time (csrc/cpu/isa.cpp).
"""
import glob
import os
import shutil

from setuptools import setup


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the toolkit nvcc belongs to.

    `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one), so
    torch's guess (the parent of nvcc's directory) can be wrong; a root must hold
    include/cuda_runtime.h and bin/nvcc to count.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script names the real nvcc
            for word in f.read(4096).decode("utf-8", "replace").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and \
                os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    return None


def build_with_cuda(cu_sources):
    """The toolkit root to build csrc/cuda/ with, or None for a CPU-only build: a root when torch
    is a CUDA build and a toolkit is found, unless SPARSEKERN_CUDA=0 (SPARSEKERN_CUDA=1 makes a
    missing one an error)."""
    import torch

    setting = os.environ.get("SPARSEKERN_CUDA", "auto").lower()
    if setting in ("0", "false", "no") or not cu_sources:
        return None
    cuda_home = find_cuda_home()
    possible = torch.version.cuda is not None and cuda_home is not None
    if setting in ("1", "true", "yes") and not possible:
        raise RuntimeError(
            "SPARSEKERN_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA toolkit found at {cuda_home!r}")
    return cuda_home if possible else None


# The GPUs the project targets: A100 (sm_80) and H100 (sm_90), compiled explicitly. Unset,
# torch derives the list from the GPUs visible at build time: a GPU build machine would compile
# for its own card only, and one without a GPU (CI) has no list at all (torch 2.14's
# _get_cuda_arch_flags then fails on an empty list). A user's TORCH_CUDA_ARCH_LIST still wins.
CUDA_ARCHS = "8.0;9.0"


def extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_home = build_with_cuda(cu_sources)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # -fopenmp: at::parallel_for is inline OpenMP; without it the kernels silently run on one
    # thread. At run time the libgomp torch already loaded is reused (same soname), so
    # torch.set_num_threads governs our threads too.
    cxx = ["-O3", "-std=c++20", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    link = ["-fopenmp"]
    if cuda_home:
        return [CUDAExtension(
            "sparsekern._C", cpp_sources + cu_sources,
            define_macros=[("SPARSEKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link)]
    return [CppExtension("sparsekern._C", cpp_sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=link)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})
