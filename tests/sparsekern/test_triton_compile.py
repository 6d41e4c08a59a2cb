"""Every Triton kernel x autotune config compiles ahead of time for sm_80 (A100) and sm_90
(H100) with triton's bundled ptxas, no GPU needed: no register spills, shared memory within the
architecture's limit, tensor-core MMA in the BSR kernels for 16-bit types and tf32, wgmma on sm_90 where
Triton's Hopper lowering applies (dot M dim >= 64), and fp32 -> fp16/bf16 output conversions
that round to nearest (the interpreter truncates instead, see test_triton_interpreter.py).

bfloat16 (the 16-bit tensor-core path; float16 compiles to the same tiles) runs blocks 16 and 64,
float32 (FMA path, the register-hungriest: where spills were found) and tf32 (float32 with
torch.backends.cuda.matmul.allow_tf32) block 64. The full matrix,
every dtype and block 16/32/64, is `python -m benchmarks triton-compile` (benchmarks/gpu/).

The compile runs in a subprocess: this test process runs triton in interpreter mode (chosen at
collection by the other test_triton_* modules), and the compiler needs compiled-mode triton.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsekern.triton as skt
from sparsekern.triton import aot

skt.use_interpreter()  # before anything imports triton: see test_triton_interpreter.py
from sparsekern.triton.kernels import KERNELS, configs_for  # noqa: E402  (the config lists)

ROOT = Path(__file__).resolve().parents[2]
# Largest dynamic shared memory per block (opt-in): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
RUNS = {"bf16": (["bfloat16"], ["16x16", "64x64"]),
        "fp32": (["float32", "tfloat32"], ["64x64"])}


def _compile(dtypes, blocks, tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPARSEKERN_BACKEND")}
    cmd = [sys.executable, "-m", "sparsekern.triton.aot", "--arch", "80", "90",
           "--dtype", *dtypes, "--block", *blocks, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=list(RUNS))
def report(request, tmp_path_factory):
    dtypes, blocks = RUNS[request.param]
    return dtypes, blocks, _compile(dtypes, blocks, tmp_path_factory.mktemp(request.param))


def test_every_kernel_config_arch_compiled(report):
    dtypes, blocks, rows = report
    got = {(r["kernel"], r["config_index"], r["arch"], r["dtype"]) for r in rows}
    want = {(k, ci, f"sm_{a}", d) for k in KERNELS for d in dtypes if aot.applies(k, d)
            for ci in range(len(configs_for(k, aot.ELEMENT_SIZE[d]))) for a in aot.ARCHS}
    assert got == want
    products = {(r["kernel"], r["product"]) for r in rows}
    assert products == {("bsr_spmm", "forward"), ("bsr_spmm", "grad_input"),
                        ("bsr_sddmm", "grad_weight"), ("csr_spmm", "forward"),
                        ("csr_spmm", "grad_input"), ("csr_sddmm", "grad_weight"),
                        ("bsr_conv_fwd", "conv_forward"), ("bsr_conv_dx", "conv_grad_input"),
                        ("bsr_conv_dw", "conv_grad_weight"), ("csr_conv_fwd", "conv_forward"),
                        ("csr_conv_dx", "conv_grad_input"),
                        ("csr_conv_dx", "conv_grad_input_strided"),
                        ("csr_conv_dw", "conv_grad_weight")}
    assert {r["block"] for r in rows if r["kernel"].startswith("bsr")} == set(blocks)


def test_no_spills_and_resources_fit(report):
    _, _, rows = report
    for r in rows:
        what = f"{r['kernel']}/{r['product']} {r['dtype']} {r['block']} {r['config']} {r['arch']}"
        assert r["spills"] == 0, f"{what}: {r['spills']} bytes spilled"
        assert 0 < r["regs"] <= 255, f"{what}: {r['regs']} registers"
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], f"{what}: {r['smem']} B shared memory"


def test_tensor_cores_and_wgmma_where_expected(report):
    dtypes, _, rows = report
    for r in rows:
        what = f"{r['kernel']}/{r['product']} {r['dtype']} {r['block']} {r['config']} {r['arch']}"
        block = tuple(int(v) for v in r["block"].split("x")) if r["block"] != "-" else None
        arch = int(r["arch"][3:])
        config = configs_for(r["kernel"], aot.ELEMENT_SIZE[r["dtype"]])[r["config_index"]]
        assert r["mma"] == aot.uses_tensor_cores(r["kernel"], r["dtype"]), what
        assert r["wgmma"] == aot.expect_wgmma(r["kernel"], r["product"], r["dtype"], block,
                                              config, arch), what
    if "bfloat16" in dtypes:  # the headline kernels: every 16-bit forward/dX config, sm_90
        hopper = [r for r in rows if r["kernel"] in ("bsr_spmm", "bsr_conv_fwd", "bsr_conv_dx")
                  and r["arch"] == "sm_90"]
        assert hopper and all(r["wgmma"] for r in hopper)


def test_outputs_round_to_nearest(report):
    """16-bit outputs round to nearest; only the CSR conv dW writes float32 partial sums (torch
    adds and rounds them), so it has no 16-bit conversion to check."""
    _, _, rows = report
    for r in rows:
        if r["dtype"] in ("float32", "tfloat32"):
            continue
        if r["kernel"] == "csr_conv_dw":
            assert r["round_nearest"] is None, r
        else:
            assert r["round_nearest"], f"{r['kernel']} {r['dtype']} {r['arch']}: not cvt.rn"
