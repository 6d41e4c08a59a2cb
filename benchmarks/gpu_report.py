"""benchmarks/gpu/RESULTS.md (+ one JSON per section), generated only by the harness:

  roofline.json   python -m benchmarks roofline --gpu h100 a100   (model, no GPU needed)
  compile.json    python -m benchmarks triton-compile              (AOT sm_80/sm_90, no GPU needed)
  cuda.json       python -m benchmarks gpu-bench --device cuda     (measured; needs a GPU)

Each command rewrites its own JSON and then RESULTS.md from every JSON present, so the sections
can be produced on different machines; each section states its command, machine and date.
`gpu-bench --append` adds its rows to cuda.json instead (a row of the same case, block,
sparsity, mode and dtype is replaced), so a GPU lease can measure in several short commands
and a command cut off by the lease loses only its own rows.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import report

SECTIONS = ("roofline", "compile", "cuda")


# ---- compile facts --------------------------------------------------------------------------

def aot_rows(archs, dtypes, blocks, kernels=None):
    """sparsekern.triton.aot rows; in a subprocess when this process runs triton interpreted."""
    import sparsekern.triton as skt
    if not skt.interpreter_active() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        from sparsekern.triton import aot
        return aot.run([int(a) for a in archs], list(dtypes),
                       [tuple(int(v) for v in b.split("x")) for b in blocks], kernels)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPARSEKERN_BACKEND")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [sys.executable, "-m", "sparsekern.triton.aot", "--arch", *map(str, archs),
               "--dtype", *dtypes, "--block", *blocks, "--json", str(out)]
        if kernels:
            cmd += ["--kernel", *kernels]
        subprocess.run(cmd, check=True, env=env, cwd=report.REPO_ROOT)
        return json.loads(out.read_text())


def config_dicts(element_size=2):
    from sparsekern.triton.kernels import KERNELS, configs_for
    return {k: [dict(**c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                for c in configs_for(k, element_size)] for k in KERNELS}


# ---- sections -------------------------------------------------------------------------------

def _meta(command):
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpu = report.cpu_description()
    return {"command": shlex.join(command),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": (f"{gpu}; " if gpu else "no GPU; ") +
                       f"{cpu['model_name']}, {cpu['logical_cpus']} logical CPUs",
            "torch": torch.__version__, "triton": triton.__version__,
            "git": report.git_revision()}


def row_key(row):
    return row["case"], str(row["block"]), row["sparsity"], row["mode"], row["dtype"]


def merged_rows(earlier, fresh):
    """The earlier rows that `fresh` does not measure again, then `fresh`."""
    measured = {row_key(r) for r in fresh}
    return [r for r in earlier if row_key(r) not in measured] + fresh


def save_section(name, command, data, out=None, append=False):
    out = Path(out) if out else report.default_output_dir("gpu")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    meta = _meta(command)
    if append and path.exists():  # every command that contributed, oldest first
        earlier = json.loads(path.read_text())
        data = {**data, "rows": merged_rows(earlier["rows"], data["rows"])}
        meta["command"] = f"{earlier['meta']['command']}; then {meta['command']}"
    path.write_text(json.dumps({"meta": meta, **data}, indent=1))
    md = out / "RESULTS.md"
    md.write_text(markdown(out))
    return [path, md]


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _meta_lines(meta):
    return [f"Command `{meta['command']}`, {meta['date']} (UTC), machine: {meta['machine']}, "
            f"torch {meta['torch']}, triton {meta['triton']}, source {meta['git']}.", ""]


def _roofline_md(data):
    lines = ["## Roofline model (predicted, not measured)", ""] + _meta_lines(data["meta"])
    lines += ["Model in `benchmarks/roofline.py` (docstring): per kernel and autotune config, "
              "FLOPs, HBM bytes (compulsory), L2->SM bytes (every tile a CTA loads, incl. the "
              "4-byte block index and dX's perm), SM time (max of tensor-core and shared-memory "
              "time per kept block + per-block and per-CTA overheads, occupancy from the "
              "compiled kernel); time = max(HBM, L2, SM) + launch; the fastest config is taken "
              "(as the autotuner "
              "would). Speedup = cuBLAS dense time / predicted sparse time. "
              "Shape: x [8192, 4096] bf16, W [4096, 4096].", ""]
    for model in data["models"]:
        a = model["assumptions"]
        lines += [f"### {a['name']}", "",
                  "Assumptions: " + ", ".join(f"{k}={v}" for k, v in a.items() if k != "name")
                  + ".", ""]
        rows = []
        for r in model["rows"]:
            k = r["kernels"]
            rows.append([r["block"], f"{r['sparsity']:.0%}", f"{r['ideal']:.1f}x",
                         f"{r['dense_forward_us']:.0f}", f"{r['forward_us']:.0f}",
                         f"**{r['forward_speedup']:.2f}x**", f"{r['dense_train_us']:.0f}",
                         f"{r['train_us']:.0f}", f"**{r['train_speedup']:.2f}x**",
                         " / ".join(f"{k[p]['bound']} ({k[p]['config']})"
                                    for p in ("forward", "grad_input", "grad_weight"))])
        lines += _table(["block", "sparsity", "ideal", "cuBLAS fwd us", "sparse fwd us",
                         "fwd speedup", "cuBLAS step us", "sparse step us", "step speedup",
                         "bound (config): forward / dX / dW"], rows)
        lines += ["", "Per kernel (FLOPs, bytes):", ""]
        rows = []
        for r in model["rows"]:
            for p, kr in r["kernels"].items():
                rows.append([r["block"], f"{r['sparsity']:.0%}", p, kr["config"],
                             f"{kr['flops'] / 1e9:.1f}", f"{kr['hbm_bytes'] / 1e6:.0f}",
                             f"{kr['l2_bytes'] / 1e6:.0f}", kr["programs"], kr["occupancy"],
                             f"{kr['hbm_us']:.0f}", f"{kr['l2_us']:.0f}", f"{kr['sm_us']:.0f}",
                             f"{kr['time_us']:.0f}"])
        lines += _table(["block", "sparsity", "product", "config", "GFLOP", "HBM MB", "L2 MB",
                         "CTAs", "CTAs/SM", "HBM us", "L2 us", "SM us", "time us"], rows)
        lines.append("")
        if model.get("conv_rows"):
            lines += _conv_roofline_md(model["conv_rows"])
    return lines


def _conv_roofline_md(conv_rows):
    lines = ["CSR (unstructured) conv2d, 3x3 stride 1 padding 1, C -> C channels, batch "
             f"{conv_rows[0]['batch']}, bf16, channels_last in and out, vs cuDNN:", ""]
    rows = []
    for r in conv_rows:
        k = r["kernels"]
        rows.append([r["layer"], f"{r['channels']}x{r['spatial']}x{r['spatial']}",
                     f"{r['sparsity']:.0%}", f"{r['ideal']:.1f}x",
                     f"{r['dense_forward_us']:.0f}", f"{r['forward_us']:.0f}",
                     f"**{r['forward_speedup']:.2f}x**", f"{r['dense_train_us']:.0f}",
                     f"{r['train_us']:.0f}", f"**{r['train_speedup']:.2f}x**",
                     " / ".join(f"{k[p]['bound']} ({k[p]['config']}, "
                                f"{k[p]['occupancy']} CTAs/SM)"
                                for p in ("forward", "grad_input", "grad_weight"))])
    lines += _table(["layer", "C x H x W", "sparsity", "ideal", "cuDNN fwd us", "sparse fwd us",
                     "fwd speedup", "cuDNN step us", "sparse step us", "step speedup",
                     "bound (config): forward / dX / dW"], rows)
    return lines + [""]


def _compile_md(data):
    rows = data["rows"]
    lines = ["## Ahead-of-time compile report (sm_80 / sm_90, no GPU)", ""] + \
        _meta_lines(data["meta"])
    spills = sum(r["spills"] for r in rows)
    lines += [f"{len(rows)} kernel x product x dtype x block x config x arch builds; total spill "
              f"bytes: {spills}; wgmma in {sum(r['wgmma'] for r in rows)} sm_90 builds "
              "(16-bit BSR dots with an M dim >= 64); CSR kernels (linear and conv) are CUDA-core "
              "gathers.", ""]
    lines += _table(["kernel", "product", "dtype", "block", "config", "arch", "regs",
                     "spills (B)", "smem (B)", "tensor-core MMA", "wgmma",
                     "PTX instr / FMA (CUDA-core loop)"],
                    [[r["kernel"], r["product"], r["dtype"], r["block"], r["config"], r["arch"],
                      r["regs"], r["spills"], r["smem"], "yes" if r["mma"] else "no",
                      "yes" if r["wgmma"] else "no",
                      "-" if r.get("loop_instr_per_fma") is None else r["loop_instr_per_fma"]]
                     for r in rows])
    return lines + [""] + _cuda_cpp_md(data.get("cuda_cpp"))


def _cuda_cpp_md(cuda_cpp):
    """The CUDA C++ kernels of sparsekern._C (benchmarks/cuda_compile.py)."""
    if cuda_cpp is None:
        return []
    lines = ["### CUDA C++ kernels (csrc/cuda/, compiled into sparsekern._C by nvcc)", ""]
    if "skipped" in cuda_cpp:
        return lines + [f"Not reported: {cuda_cpp['skipped']}.", ""]
    rows = cuda_cpp["rows"]
    spilled = sum(r["stack"] + r["local"] for r in rows)
    lines += [f"`cuobjdump --list-elf {cuda_cpp['so']}`: cubins for "
              f"{', '.join(cuda_cpp['archs'])}. `cuobjdump --dump-resource-usage`: "
              f"{len(rows)} kernel x arch builds; stack + local bytes (where spills go): "
              f"{spilled}. The kernel's template arguments are the dtype and the lanes per "
              "row (subwarp).", ""]
    lines += _table(["kernel", "arch", "regs", "stack (B/thread)", "local (B/thread)",
                     "static smem (B)"],
                    [[r["kernel"], r["arch"], r["regs"], r["stack"], r["local"], r["smem"]]
                     for r in rows])
    return lines + [""]


def _cuda_md(data):
    lines = ["## Measured on a GPU (triton.testing.do_bench, median)", ""] + \
        _meta_lines(data["meta"])
    rows = [[r["case"], r["dtype"], r["block"], f"{r['sparsity']:.0%}", r["mode"],
             f"{r['dense_ms']:.3f}",
             f"{r['sparse_ms']:.3f}", f"{r['speedup']:.2f}x",
             (r.get("peer") or "-") if r.get("peer_ms") is None
             else f"{r['peer_ms']:.3f} ({r['peer']})",
             "-" if r.get("cuda_cpp_ms") is None
             else f"{r['cuda_cpp_ms']:.3f} ({r['dense_ms'] / r['cuda_cpp_ms']:.2f}x)"]
            for r in data["rows"]]
    lines += ["sparsekern ms: the default dispatch (Triton). CSR rows also time the opt-in CUDA "
              "C++ kernels (csrc/cuda/csr_spmm.cu, forward and dX; dW on Triton).", ""]
    lines += _table(["shape", "dtype", "block", "sparsity", "mode", "dense ms (cuBLAS/cuDNN)",
                     "sparsekern ms",
                     "speedup", "torch peer ms", "CUDA C++ CSR ms (speedup)"], rows)
    return lines + [""]


def markdown(out: Path) -> str:
    lines = ["# sparsekern GPU results", "",
             "Generated by `python -m benchmarks roofline`, `python -m benchmarks triton-compile` "
             "and `python -m benchmarks gpu-bench --device cuda`; do not edit by hand.", ""]
    present = {}
    for name in SECTIONS:
        path = out / f"{name}.json"
        if path.exists():
            present[name] = json.loads(path.read_text())
    if "cuda" not in present:
        lines += ["No GPU measurement yet: `python -m benchmarks gpu-bench --device cuda` has not "
                  "been run on a machine with CUDA. The figures below are predictions and "
                  "compile facts.", ""]
    render = {"roofline": _roofline_md, "compile": _compile_md, "cuda": _cuda_md}
    for name in ("cuda", "roofline", "compile"):
        if name in present:
            lines += render[name](present[name])
    return "\n".join(lines) + "\n"
