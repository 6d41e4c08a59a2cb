"""The CUDA C++ kernels compiled into sparsekern._C (csrc/cuda/), read back from the built .so
with cuobjdump, no GPU needed: which architectures have a cubin (`--list-elf`) and, per kernel
and architecture, registers, stack frame and local memory per thread, and static shared memory
per block (`--dump-resource-usage`). Register spills live in the stack frame (ptxas's "N bytes
stack frame, N bytes spill stores"), so stack and local 0 means no spills. The compile report of
`python -m benchmarks triton-compile` carries them beside the Triton kernels.

cuobjdump is taken from PATH, the CUDA toolkit setup.py builds with, or the copy that ships with
triton (triton/backends/nvidia/bin), in that order.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def extension_path() -> Path | None:
    """The loaded sparsekern._C shared object, None when the extension is not loaded."""
    from sparsekern import _extension
    return Path(_extension._C.__file__) if _extension.available() else None


def _toolkit_root() -> str | None:
    """The toolkit setup.py would build with (its find_cuda_home), when setup.py is at hand."""
    path = REPO_ROOT / "setup.py"
    if not path.exists():  # an installed copy of benchmarks: no setup.py beside it
        return None
    spec = importlib.util.spec_from_file_location("sparsekern_setup", path)
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.find_cuda_home()


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    root = _toolkit_root()
    if root and os.path.isfile(os.path.join(root, "bin", "cuobjdump")):
        return os.path.join(root, "bin", "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def _cuobjdump(flag: str, so: Path) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump found (PATH, the CUDA toolkit, triton's bundled copy)")
    done = subprocess.run([tool, flag, str(so)], capture_output=True, text=True)
    if done.returncode != 0:
        # cuobjdump exits non-zero on a file without device code
        if "does not contain device code" in done.stderr:
            return ""
        raise RuntimeError(f"{tool} {flag} {so} failed: {done.stderr.strip()}")
    return done.stdout


def cubin_archs(so: Path) -> list[str]:
    """The sm_XX of every cubin in `so` (sorted, unique); [] when it holds no device code."""
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", _cuobjdump("--list-elf", so))))


def _demangle(names: list[str]) -> list[str]:
    """Readable kernel names (`csr_spmm_kernel<c10::Half, 32>`): c++filt when present, else the
    mangled names."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    if done.returncode != 0:
        return names
    # "void ns::(anonymous namespace)::kernel<T, 32>(args)" -> "kernel<T, 32>"
    names = [full.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
             for full in done.stdout.splitlines()]
    return [re.sub(r"^(?:\w+::)+", "", name) for name in names]


def resource_usage(so: Path) -> list[dict]:
    """One row per kernel and architecture: regs, stack (bytes per thread; spills land here),
    local (bytes per thread), smem (static shared memory per block, bytes)."""
    rows, arch = [], None
    mangled = []
    lines = _cuobjdump("--dump-resource-usage", so).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if not m or i + 1 >= len(lines):
            continue
        usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1]))
        mangled.append(m.group(1))
        rows.append(dict(arch=arch, regs=int(usage["REG"]), local=int(usage["LOCAL"]),
                         stack=int(usage["STACK"]), smem=int(usage["SHARED"])))
    for row, name in zip(rows, _demangle(mangled)):
        row["kernel"] = name
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"]))


def report(so: Path | None = None) -> dict:
    """{"archs", "rows"} of the built extension, or {"skipped": reason} when there is nothing to
    read (no extension, a CPU-only build, no cuobjdump)."""
    so = so or extension_path()
    if so is None:
        return {"skipped": "sparsekern._C is not loaded"}
    if find_cuobjdump() is None:
        return {"skipped": "no cuobjdump found (PATH, the CUDA toolkit, triton's bundled copy)"}
    archs = cubin_archs(so)
    if not archs:
        return {"skipped": f"{so.name} has no CUDA code (a CPU-only build: no CUDA toolkit or "
                           "torch without CUDA at build time, or SPARSEKERN_CUDA=0)"}
    return {"so": so.name, "archs": archs, "rows": resource_usage(so)}


def spills(row: dict) -> bool:
    """Whether a kernel of `report()` uses stack or local memory (spilled registers live there)."""
    return row["stack"] > 0 or row["local"] > 0
