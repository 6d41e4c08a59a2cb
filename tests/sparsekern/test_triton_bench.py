"""The GPU benchmark harness and the roofline model, without a GPU: gpu-bench's cases run end to
end on CPU tensors through the Triton interpreter (a plain wall-clock timer stands in for
triton.testing.do_bench, which needs CUDA), and the roofline's counts follow from the kernels'
loop structure (FLOPs, compulsory bytes, index traffic)."""
import json
import time

import pytest
import torch

import sparsekern.triton as skt
from benchmarks import gpu_bench, gpu_report, roofline

skt.use_interpreter()


def _wall_ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.fixture
def triton_backend():
    with skt.backend("triton"):
        yield


def test_gpu_bench_cases_run_on_the_interpreter(triton_backend):
    gen = torch.Generator().manual_seed(0)
    rows = gpu_bench.run_case("tiny", 64, 48, 16, 16, 0.5, torch.float32, gen, dev="cpu",
                              bench=_wall_ms)
    rows += gpu_bench.run_conv_case("tiny_conv", 16, 5, 1, 16, 0.0, torch.float32, gen,
                                    dev="cpu", bench=_wall_ms)
    rows += gpu_bench.run_conv_case("tiny_csr_conv", 4, 4, 1, "csr", 0.5, torch.float32, gen,
                                    dev="cpu", bench=_wall_ms)
    # the CUDA C++ CSR kernels run CUDA tensors only: on the CPU the case times Triton alone
    rows += gpu_bench.run_csr_case("tiny_csr", 48, 64, 16, 0.5, torch.float32, gen, dev="cpu",
                                   bench=_wall_ms, cuda_cpp=False)
    assert [r["mode"] for r in rows] == ["forward", "train"] * 4
    assert rows[-3]["block"] == rows[-1]["block"] == "csr"
    assert rows[-1]["cuda_cpp_ms"] is None
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    # torch's bsr_dense_mm peer is timed or reported n/a with torch's reason, never crashes
    assert rows[0]["peer_ms"] is not None or rows[0]["peer"].startswith("n/a")


def _row(case, block, sparsity, mode, dtype, sparse_ms):
    return dict(case=case, block=block, sparsity=sparsity, mode=mode, dtype=dtype,
                dense_ms=1.0, sparse_ms=sparse_ms, speedup=1.0 / sparse_ms, peer=None,
                peer_ms=None, cuda_cpp_ms=None)


def test_gpu_bench_append_replaces_only_the_rows_it_measures_again(tmp_path):
    """A lease measures in several short commands (.ci/gpu-session): each --append keeps the
    earlier rows it does not measure again and replaces those it does."""
    first = [_row("4096x4096 M=8192", 64, 0.9, "forward", "bfloat16", 0.2),
             _row("4096x4096 M=8192", 64, 0.9, "train", "bfloat16", 0.6),
             _row("res4_3x3 N=32", "csr", 0.9, "forward", "bfloat16", 0.5)]
    gpu_report.save_section("cuda", ["gpu-bench", "first"], {"rows": first}, tmp_path)
    again = [_row("4096x4096 M=8192", 64, 0.9, "forward", "bfloat16", 0.15),
             _row("4096x4096 M=8192", 64, 0.9, "forward", "float16", 0.18)]
    gpu_report.save_section("cuda", ["gpu-bench", "second"], {"rows": again}, tmp_path,
                            append=True)
    saved = json.loads((tmp_path / "cuda.json").read_text())
    by_key = {gpu_report.row_key(r): r["sparse_ms"] for r in saved["rows"]}
    assert len(saved["rows"]) == 4
    assert by_key[("4096x4096 M=8192", "64", 0.9, "forward", "bfloat16")] == 0.15
    assert by_key[("4096x4096 M=8192", "64", 0.9, "train", "bfloat16")] == 0.6
    assert by_key[("res4_3x3 N=32", "csr", 0.9, "forward", "bfloat16")] == 0.5
    assert saved["meta"]["command"] == "gpu-bench first; then gpu-bench second"
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 4096x4096 M=8192 | float16 | 64 | 90% | forward |" in text
    # without --append the section is rewritten
    gpu_report.save_section("cuda", ["gpu-bench", "third"], {"rows": again[:1]}, tmp_path)
    assert len(json.loads((tmp_path / "cuda.json").read_text())["rows"]) == 1


FACTS = {"regs": 128, "smem": 49152, "wgmma": True}


@pytest.mark.parametrize("block", [16, 64])
def test_roofline_counts(block):
    gpu = roofline.GPUS["h100"]
    m, n, k, e = roofline.M_ROWS, roofline.N_OUT, roofline.K_IN, roofline.ELEM
    nnzb = round(0.1 * (n // block) * (k // block))
    cfg = {"BLOCK_M": 128, "num_warps": 4, "num_stages": 3}
    fwd = roofline.bsr_spmm(gpu, FACTS, cfg, block, 0.9, transposed=False)
    dx = roofline.bsr_spmm(gpu, FACTS, cfg, block, 0.9, transposed=True)
    dw = roofline.bsr_sddmm(gpu, FACTS, {"BLOCK_M": 64, "num_warps": 4}, block, 0.9)
    for r in (fwd, dx, dw):
        assert r["flops"] == 2 * m * block * block * nnzb
        assert r["time_us"] >= max(r["hbm_us"], r["l2_us"], r["sm_us"])
    # compulsory HBM: x, kept values, y once; L2 also re-reads x once per kept block of a column
    assert fwd["hbm_bytes"] >= (m * k + nnzb * block * block + m * n) * e
    assert fwd["l2_bytes"] >= nnzb * m * block * e
    assert dx["l2_bytes"] > fwd["l2_bytes"]  # + the 4-byte perm per visited block
    # more sparsity: less time; never faster than ideal at cuBLAS's rate
    dense = roofline.cublas_us(gpu)
    assert dense / fwd["time_us"] < 1 / (1 - 0.9)
    denser = roofline.bsr_spmm(gpu, FACTS, cfg, block, 0.8, transposed=False)
    assert denser["time_us"] > fwd["time_us"]


def test_roofline_csr_counts():
    """Unstructured: 2 FLOPs per kept weight per row; every kept entry gathers its activation
    slice for every m-tile (nnz x M elements through L2)."""
    gpu = roofline.GPUS["h100"]
    m, n, k, e = roofline.M_ROWS, roofline.N_OUT, roofline.K_IN, roofline.ELEM
    nnz = round(0.1 * n * k)
    fwd = roofline.csr_spmm(gpu, FACTS, {"BLOCK_R": 16, "BLOCK_M": 128, "num_warps": 4}, 0.9,
                            transposed=False)
    dw = roofline.csr_sddmm(gpu, FACTS, {"BLOCK_E": 32, "BLOCK_M": 128, "num_warps": 4}, 0.9)
    for r in (fwd, dw):
        assert r["flops"] == 2 * m * nnz
        assert r["l2_bytes"] >= nnz * m * e


def test_roofline_csr_conv_counts():
    """CSR conv: 2 FLOPs per kept weight per output pixel; every kept weight gathers its
    shifted plane for every pixel (nnz x P elements through L2); the planar copy of the
    channels_last input is HBM traffic; sparser is faster, and never above the ideal."""
    gpu = roofline.GPUS["h100"]
    c, hw = 64, 56
    p, e = roofline.CONV_BATCH * hw * hw, roofline.ELEM
    dense = roofline.cudnn_conv_us(gpu, (c, hw))
    configs = gpu_report.config_dicts()  # the kernels' own tiles (the model has to know them)
    cfg, dw_cfg = configs["csr_conv_fwd"][0], configs["csr_conv_dw"][0]
    facts = dict(FACTS, loop_instr_per_fma=20.0)
    for s in (0.8, 0.9):
        nnz = round((1 - s) * c * c * 9)
        fwd = roofline.csr_conv(gpu, facts, cfg, (c, hw), s, "forward")
        dx = roofline.csr_conv(gpu, facts, cfg, (c, hw), s, "grad_input")
        dw = roofline.csr_conv(gpu, facts, dw_cfg, (c, hw), s, "grad_weight")
        for r in (fwd, dx, dw):
            assert r["flops"] == 2 * p * nnz
            assert r["l2_bytes"] >= nnz * p * e
            assert r["time_us"] >= max(r["hbm_us"], r["l2_us"], r["sm_us"])
        assert fwd["hbm_bytes"] >= 4 * p * c * e  # transpose (read + write), read, write
        assert dense / fwd["time_us"] < 1 / (1 - s)
    for product, kernel in roofline.CONV_KERNELS.items():  # every config the model may pick
        for config in configs[kernel]:
            assert roofline.csr_conv(gpu, facts, config, (c, hw), 0.9, product)["time_us"] > 0
    denser = roofline.csr_conv(gpu, facts, cfg, (c, hw), 0.8, "forward")
    # the SM time follows the compiled loop's instruction count
    leaner = roofline.csr_conv(gpu, dict(facts, loop_instr_per_fma=5.0), cfg, (c, hw), 0.9,
                               "forward")
    assert leaner["sm_us"] < fwd["sm_us"]
    assert denser["time_us"] > fwd["time_us"]
