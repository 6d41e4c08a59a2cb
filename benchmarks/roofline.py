"""`python -m benchmarks roofline --gpu h100|a100`: predicted GPU time of the sparsekern Triton
kernels from their own tiles, vs cuBLAS dense, for y = x W^T with a 4096 x 4096 weight and
8192 rows in bfloat16 (the issue's headline shape), at 80/90/95% sparsity, blocks 16/32/64,
forward and training step (forward + dX + dW at kept blocks).

A model, not a measurement (no GPU was available where it was written). For each kernel and each
autotune config (the autotuner would pick the fastest, so the model does too) it counts, from the
kernel's loop structure (sparsekern/triton/kernels.py):

* FLOPs: 2 x BLOCK_M x bk x bn per kept block a program visits (no padding at these shapes);
* HBM bytes: compulsory traffic (activations once, kept values once, output once, the index),
  re-reads assumed to hit L2 where the working set fits (stated per kernel below);
* L2 -> SM bytes: every tile a program loads (activation tile, weight block, 4-byte block column
  index, 4-byte perm for dX, row pointers), i.e. the re-reads of x by every block row;
* SM time: per kept-block step max(tensor-core time, shared-memory read time) + a fixed per-step
  overhead, per program a fixed prologue/epilogue latency shared by the CTAs resident on the SM
  (occupancy from the compiled kernel's registers and shared memory, `triton.compile` for the
  architecture), whole waves of CTAs.

predicted time = max(HBM time, L2 time, SM time) + launch overhead.

CSR (unstructured) rows use the same accounting for the CUDA-core kernels: every kept entry gathers
a BLOCK_M slice of the transposed activation per m-tile (1 FLOP per gathered byte in bf16), the
longest row of a BLOCK_R group sets its loop, plus the transposes. cuBLAS dense = 2MNK / (peak x
cuBLAS efficiency); training step = 3 such GEMMs. Every assumption is a named constant in GPUS and
printed into the report.

CSR conv2d rows (ResNet-50's 3x3 layers, batch 32, bf16): the same gather accounting over
[rows, BLOCK_P] tiles of shifted channel planes; the SM time of a gathered element is the
compiled loop's PTX instructions per FMA (index arithmetic, padding bounds, masks: 18-36, the
CSR linear's are ~6) at one warp instruction per scheduler and clock; plus the planar copies of
the channels_last activations, dX's column expansion and dW's pixel splits; vs cuDNN =
2 P C^2 9 / (peak x cudnn_efficiency).
"""
from __future__ import annotations

import argparse
import math
import sys

from benchmarks import gpu_report, report

M_ROWS, N_OUT, K_IN = 8192, 4096, 4096
SPARSITIES = (0.80, 0.90, 0.95)
BLOCKS = (16, 32, 64)
ELEM = 2  # bf16 bytes

GPUS = {
    "h100": dict(
        name="H100 SXM5 80GB", arch=90, sms=132, clock_ghz=1.83,
        peak_tflops=989.4,            # dense bf16 tensor (NVIDIA datasheet); = 4096 flop/clk/SM
        cublas_efficiency=0.75,       # cuBLAS bf16 8192x4096x4096 ~ 740 TFLOP/s (assumption)
        mma_sync_fraction=0.60,       # legacy mma.sync (dW with bk < 64) vs wgmma peak (assumption)
        hbm_tbs=3.35,                 # HBM3 (datasheet)
        l2_tbs=7.0,                   # L2 -> SM read bandwidth (assumption: Chips and Cheese's
                                      # ~5.5 TB/s on H100 PCIe scaled to 132 SMs / SXM clocks)
        l2_mb=50, smem_b_per_clk=128, smem_per_sm=228 * 1024, regs_per_sm=65536,
        step_overhead_clk=40,         # per kept block: index load, loop, barrier (assumption)
        program_overhead_clk=1500,    # per CTA: pipeline fill + epilogue latency (assumption)
        launch_us=4.0,                # per kernel launch (assumption)
        fp32_lanes=128,               # FP32 FMA lanes per SM per clock (CSR kernels: CUDA cores)
        issue_lanes=128,              # 4 schedulers x 1 warp instruction per clock
        cudnn_efficiency=0.5),        # cuDNN bf16 3x3 conv at ResNet-50 shapes, batch 32
                                      # (assumption: small GEMM N = C_out <= 512)
    "a100": dict(
        name="A100 SXM4 80GB", arch=80, sms=108, clock_ghz=1.41,
        peak_tflops=312.0, cublas_efficiency=0.80, mma_sync_fraction=1.0,
        hbm_tbs=2.04, l2_tbs=4.5, l2_mb=40, smem_b_per_clk=128, smem_per_sm=164 * 1024,
        regs_per_sm=65536, step_overhead_clk=40, program_overhead_clk=1500, launch_us=4.0,
        fp32_lanes=64, issue_lanes=128, cudnn_efficiency=0.5),
}


def _occupancy(gpu, facts, warps):
    by_smem = gpu["smem_per_sm"] // max(facts["smem"], 1)
    by_regs = gpu["regs_per_sm"] // (max(facts["regs"], 1) * 32 * warps)
    return max(1, min(by_smem, by_regs, 64 // warps, 32))


def _tc_flops_per_clk(gpu, wgmma):
    per_clk = gpu["peak_tflops"] * 1e12 / (gpu["sms"] * gpu["clock_ghz"] * 1e9)
    return per_clk if wgmma or gpu["arch"] < 90 else per_clk * gpu["mma_sync_fraction"]


def _finish(gpu, flops, hbm, l2, programs, cycles_per_program, occ):
    # Co-resident CTAs share their SM's tensor cores and shared memory, so the SM time is the
    # throughput cycles of the busiest SM: ceil(programs / SMs) CTAs (round-robin), the tail
    # wave included; latency (program overhead) is already divided by the occupancy.
    sm_s = math.ceil(programs / gpu["sms"]) * cycles_per_program / (gpu["clock_ghz"] * 1e9)
    hbm_s, l2_s = hbm / (gpu["hbm_tbs"] * 1e12), l2 / (gpu["l2_tbs"] * 1e12)
    bound = max((hbm_s, "HBM"), (l2_s, "L2"), (sm_s, "SM"))
    return dict(flops=flops, hbm_bytes=hbm, l2_bytes=l2, programs=programs, occupancy=occ,
                hbm_us=hbm_s * 1e6, l2_us=l2_s * 1e6, sm_us=sm_s * 1e6, bound=bound[1],
                time_us=bound[0] * 1e6 + gpu["launch_us"])


def bsr_spmm(gpu, facts, config, block, sparsity, transposed):
    """Forward (block rows, x tiles) or dX (block columns, dY tiles, + perm)."""
    bm, warps = config["BLOCK_M"], config["num_warps"]
    nb, kb = N_OUT // block, K_IN // block
    nnzb = round((1 - sparsity) * nb * kb)
    out_blocks = kb if transposed else nb
    a_cols = N_OUT if transposed else K_IN
    out_cols = K_IN if transposed else N_OUT
    m_tiles = math.ceil(M_ROWS / bm)
    programs = out_blocks * m_tiles
    steps = m_tiles * nnzb  # kept blocks visited, summed over programs
    index_b = 8 if transposed else 4
    flops = 2 * M_ROWS * block * block * nnzb
    # HBM: a once (its m-tile slab, bm x a_cols, is shared by the consecutive programs of one
    # m-tile: the output block is the fastest grid axis), kept values once (they fit L2), out
    # once, the index once.
    hbm = (M_ROWS * a_cols + nnzb * block * block + M_ROWS * out_cols) * ELEM \
        + (out_blocks + 1) * 4 + nnzb * index_b
    l2 = steps * ((bm * block + block * block) * ELEM + index_b) + programs * 8 \
        + M_ROWS * out_cols * ELEM
    tc = 2 * bm * block * block / _tc_flops_per_clk(gpu, facts["wgmma"] or gpu["arch"] < 90)
    smem = (bm * block + math.ceil(bm / 64) * block * block) * ELEM / gpu["smem_b_per_clk"]
    occ = _occupancy(gpu, facts, warps)
    per_program = (steps / programs) * (max(tc, smem) + gpu["step_overhead_clk"]) \
        + gpu["program_overhead_clk"] / occ
    return _finish(gpu, flops, hbm, l2, programs, per_program, occ)


def bsr_sddmm(gpu, facts, config, block, sparsity):
    """dW at kept blocks: one CTA per kept block, BLOCK_M chunks of x^T and dY reduced."""
    bm, warps = config["BLOCK_M"], config["num_warps"]
    nb, kb = N_OUT // block, K_IN // block
    nnzb = round((1 - sparsity) * nb * kb)
    chunks = math.ceil(M_ROWS / bm)
    flops = 2 * M_ROWS * block * block * nnzb
    occ = _occupancy(gpu, facts, warps)
    resident = gpu["sms"] * occ
    # HBM: CTAs run in block-id (= block-row) order and sweep M at the same pace, so a wave of
    # resident CTAs streams the dY slabs of its block rows once and the x columns it touches
    # once; the next wave re-reads x (64 MB does not stay in L2 across waves).
    waves = max(1.0, nnzb / resident)
    rows_per_wave = resident / max(nnzb / nb, 1e-9)
    col_frac = 1 - sparsity ** min(rows_per_wave, nb)
    hbm = (waves * M_ROWS * K_IN * col_frac + M_ROWS * N_OUT + nnzb * block * block) * ELEM \
        + (nb + 1) * 4 + nnzb * 8
    l2 = nnzb * chunks * 2 * bm * block * ELEM + nnzb * (8 + block * block * ELEM)
    tc = 2 * bm * block * block / _tc_flops_per_clk(gpu, facts["wgmma"] or gpu["arch"] < 90)
    smem = 2 * bm * block * ELEM / gpu["smem_b_per_clk"]
    per_program = chunks * (max(tc, smem) + gpu["step_overhead_clk"]) \
        + gpu["program_overhead_clk"] / occ
    return _finish(gpu, flops, hbm, l2, nnzb, per_program, occ)


# expected maximum of n standard normals (rows of a CSR program: the longest row sets its loop)
_MAX_Z = {1: 0.0, 2: 0.564, 4: 1.029, 8: 1.424, 16: 1.766, 32: 2.070, 64: 2.335}


def csr_spmm(gpu, facts, config, sparsity, transposed):
    """CSR forward / dX: row-split over BLOCK_R rows x BLOCK_M activation rows on CUDA cores,
    each kept entry gathering a contiguous BLOCK_M slice of the transposed activation."""
    br, bm, warps = config["BLOCK_R"], config["BLOCK_M"], config["num_warps"]
    rows_out, src = (K_IN, N_OUT) if transposed else (N_OUT, K_IN)
    nnz = round((1 - sparsity) * N_OUT * K_IN)
    per_row = nnz / rows_out
    iters = per_row + _MAX_Z[br] * math.sqrt(src * sparsity * (1 - sparsity))
    programs = math.ceil(rows_out / br) * math.ceil(M_ROWS / bm)
    idx_b = 12 if transposed else 8   # col/row index + value (+ perm)
    flops = 2 * M_ROWS * nnz
    # HBM: the transpose (read + write), the transposed activation once (its m-tile slab is
    # shared by the consecutive programs of one m-tile), values/index, output
    transpose = 2 * M_ROWS * src * ELEM
    hbm = transpose + (M_ROWS * src + M_ROWS * rows_out) * ELEM + nnz * idx_b
    l2 = programs * iters * (br * bm * ELEM + br * idx_b) + M_ROWS * rows_out * ELEM
    occ = _occupancy(gpu, facts, warps)
    per_program = iters * (br * bm / gpu["fp32_lanes"] * 2 + gpu["step_overhead_clk"]) \
        + gpu["program_overhead_clk"] / occ  # x2: convert + FMA per element
    r = _finish(gpu, flops, hbm, l2, programs, per_program, occ)
    r["time_us"] += gpu["launch_us"]  # the transpose kernel
    return r


def csr_sddmm(gpu, facts, config, sparsity):
    """CSR dW: BLOCK_E consecutive entries per program, a BLOCK_M-chunked dot of a dY^T row
    (shared by the entries of one W row) and a gathered x^T row per entry."""
    be, bm, warps = config["BLOCK_E"], config["BLOCK_M"], config["num_warps"]
    nnz = round((1 - sparsity) * N_OUT * K_IN)
    programs = math.ceil(nnz / be)
    chunks = math.ceil(M_ROWS / bm)
    flops = 2 * M_ROWS * nnz
    occ = _occupancy(gpu, facts, warps)
    # every wave of resident CTAs sweeps all of M over (nearly) every x^T row: x^T (64 MB)
    # does not stay in L2 between waves
    waves = max(1.0, programs / (gpu["sms"] * occ))
    transpose = 2 * M_ROWS * (N_OUT + K_IN) * ELEM
    hbm = transpose + (waves * M_ROWS * K_IN + M_ROWS * N_OUT) * ELEM + nnz * (8 + ELEM)
    l2 = programs * chunks * (be * bm + bm) * ELEM + nnz * 8
    per_program = chunks * (be * bm / gpu["fp32_lanes"] * 2 + gpu["step_overhead_clk"]) \
        + gpu["program_overhead_clk"] / occ
    r = _finish(gpu, flops, hbm, l2, programs, per_program, occ)
    r["time_us"] += 2 * gpu["launch_us"]  # the two transposes
    return r


# CSR conv2d (csr_conv_kernels.py): ResNet-50's 3x3 layers (stride 1, padding 1) at the batch
# gpu_bench measures, channels_last activations as a sparse conv hands them on.
CONV_BATCH = 32
# SM cost of a gathered element: the PTX instructions per FMA of the compiled inner loop
# (sparsekern.triton.aot, loop_instr_per_fma: index arithmetic, padding bounds, masks, loads,
# widening, FMA) issued at issue_lanes per SM and clock.
CONV_INDEX_BYTES = {"forward": 4 + ELEM, "grad_input": 12 + ELEM, "grad_weight": 8}


def csr_conv(gpu, facts, config, layer, sparsity, product):
    """CSR conv2d forward / dX / dW on CUDA cores: every step of a program gathers a
    [rows, BLOCK_P] tile of shifted channel planes (one kept weight per row); the planar copies
    of the channels_last activations (forward: x; dX: dY; dW: both) are HBM traffic.
    layer = (channels, spatial) of a C -> C 3x3 conv, batch CONV_BATCH."""
    from sparsekern.triton.launch import dw_pixel_splits
    c, hw = layer
    p = CONV_BATCH * hw * hw
    nnz = round((1 - sparsity) * c * c * 9)
    warps, bp = config["num_warps"], config["BLOCK_P"]
    act = p * c * ELEM
    flops = 2 * p * nnz
    occ = _occupancy(gpu, facts, warps)
    per_elem = facts["loop_instr_per_fma"] / gpu["issue_lanes"]
    idx_b = CONV_INDEX_BYTES[product]
    if product == "grad_weight":
        be = config["BLOCK_E"]
        per_split, splits = dw_pixel_splits(p, nnz)
        programs = math.ceil(nnz / be) * splits
        chunks = math.ceil(per_split / bp)
        # both planes fit L2 at these shapes (<= 13 MB each): read once after the transposes
        hbm = 2 * 2 * act + 2 * act + nnz * idx_b + 2 * splits * nnz * 4
        l2 = programs * chunks * 2 * be * bp * ELEM + nnz * idx_b
        per_program = chunks * (be * bp * per_elem + gpu["step_overhead_clk"]) \
            + gpu["program_overhead_clk"] / occ
        r = _finish(gpu, flops, hbm, l2, programs, per_program, occ)
        r["time_us"] += 3 * gpu["launch_us"]  # two transposes, the sum of the partials
        return r
    br = config["BLOCK_R"]
    iters = nnz / c + _MAX_Z[br] * math.sqrt(c * 9 * sparsity * (1 - sparsity))
    programs = math.ceil(c / br) * math.ceil(p / bp)
    # transpose (read + write), the planar activation once, the channels_last output once
    hbm = 2 * act + act + act + nnz * idx_b
    l2 = programs * iters * (br * bp * ELEM + br * idx_b) + act
    per_program = iters * (br * bp * per_elem + gpu["step_overhead_clk"]) \
        + gpu["program_overhead_clk"] / occ
    r = _finish(gpu, flops, hbm, l2, programs, per_program, occ)
    r["time_us"] += gpu["launch_us"] * (2 if product == "grad_input" else 1)  # + dX's col_of
    return r


def cudnn_conv_us(gpu, layer):
    """Dense 3x3 conv (cuDNN implicit GEMM) at cudnn_efficiency of the tensor-core peak."""
    c, hw = layer
    flops = 2 * CONV_BATCH * hw * hw * c * c * 9
    return flops / (gpu["peak_tflops"] * 1e12 * gpu["cudnn_efficiency"]) * 1e6 + gpu["launch_us"]


def cublas_us(gpu):
    return 2 * M_ROWS * N_OUT * K_IN / (gpu["peak_tflops"] * 1e12 * gpu["cublas_efficiency"]) \
        * 1e6 + gpu["launch_us"]


def compile_facts(gpu, blocks):
    """(kernel, product, block, config_index) -> regs/smem/wgmma of the bf16 build for the GPU's
    architecture, from triton.compile (sparsekern.triton.aot; run in a subprocess if this
    process has triton in interpreter mode)."""
    rows = gpu_report.aot_rows(archs=[gpu["arch"]], dtypes=["bfloat16"],
                               blocks=[f"{b}x{b}" for b in blocks],
                               kernels=["bsr_spmm", "bsr_sddmm", "csr_spmm", "csr_sddmm",
                                        "csr_conv_fwd", "csr_conv_dx", "csr_conv_dw"])
    return {(r["kernel"], r["product"],
             None if r["block"] == "-" else int(r["block"].split("x")[0]), r["config_index"]): r
            for r in rows}


def model(gpu_name, sparsities=SPARSITIES, blocks=BLOCKS):
    gpu = GPUS[gpu_name]
    facts = compile_facts(gpu, blocks)
    configs = gpu_report.config_dicts()
    dense = cublas_us(gpu)
    rows = []
    for block in blocks:
        for s in sparsities:
            best = {}
            for product in ("forward", "grad_input", "grad_weight"):
                kernel = "bsr_sddmm" if product == "grad_weight" else "bsr_spmm"
                cands = []
                for ci, cfg in enumerate(configs[kernel]):
                    f = facts[(kernel, product, block, ci)]
                    if kernel == "bsr_spmm":
                        r = bsr_spmm(gpu, f, cfg, block, s, product == "grad_input")
                    else:
                        r = bsr_sddmm(gpu, f, cfg, block, s)
                    r.update(config=f["config"], regs=f["regs"], smem=f["smem"],
                             wgmma=f["wgmma"])
                    cands.append(r)
                best[product] = min(cands, key=lambda r: r["time_us"])
            fwd = best["forward"]["time_us"]
            train = fwd + best["grad_input"]["time_us"] + best["grad_weight"]["time_us"]
            rows.append(dict(
                gpu=gpu_name, block=block, sparsity=s, dense_forward_us=dense,
                dense_train_us=3 * dense, forward_us=fwd, train_us=train,
                forward_speedup=dense / fwd, train_speedup=3 * dense / train,
                ideal=1 / (1 - s), kernels=best))
    for s in sparsities:  # CSR (unstructured): CUDA-core gathers, no tensor cores
        best = {}
        for product in ("forward", "grad_input", "grad_weight"):
            kernel = "csr_sddmm" if product == "grad_weight" else "csr_spmm"
            cands = []
            for ci, cfg in enumerate(configs[kernel]):
                f = facts[(kernel, product, None, ci)]
                r = csr_sddmm(gpu, f, cfg, s) if kernel == "csr_sddmm" else \
                    csr_spmm(gpu, f, cfg, s, product == "grad_input")
                r.update(config=f["config"], regs=f["regs"], smem=f["smem"], wgmma=f["wgmma"])
                cands.append(r)
            best[product] = min(cands, key=lambda r: r["time_us"])
        fwd = best["forward"]["time_us"]
        train = fwd + best["grad_input"]["time_us"] + best["grad_weight"]["time_us"]
        rows.append(dict(
            gpu=gpu_name, block="csr", sparsity=s, dense_forward_us=dense,
            dense_train_us=3 * dense, forward_us=fwd, train_us=train,
            forward_speedup=dense / fwd, train_speedup=3 * dense / train,
            ideal=1 / (1 - s), kernels=best))
    return dict(gpu=gpu_name, assumptions=gpu, shape=dict(M=M_ROWS, N=N_OUT, K=K_IN,
                                                          dtype="bfloat16"), rows=rows,
                conv_rows=conv_model(gpu, facts, configs, sparsities))


CONV_KERNELS = {"forward": "csr_conv_fwd", "grad_input": "csr_conv_dx",
                "grad_weight": "csr_conv_dw"}


def conv_model(gpu, facts, configs, sparsities=SPARSITIES):
    """CSR conv2d rows: ResNet-50 3x3 layers x sparsity, best config per product, vs cuDNN."""
    from benchmarks.gpu_bench import CONV_SHAPES
    rows = []
    for name, layer in CONV_SHAPES.items():
        dense = cudnn_conv_us(gpu, layer)
        for s in sparsities:
            best = {}
            for product, kernel in CONV_KERNELS.items():
                cands = []
                for ci, cfg in enumerate(configs[kernel]):
                    f = facts[(kernel, f"conv_{product}", None, ci)]
                    r = csr_conv(gpu, f, cfg, layer, s, product)
                    r.update(config=f["config"], regs=f["regs"], smem=f["smem"],
                             wgmma=f["wgmma"])
                    cands.append(r)
                best[product] = min(cands, key=lambda r: r["time_us"])
            fwd = best["forward"]["time_us"]
            train = sum(k["time_us"] for k in best.values())
            rows.append(dict(layer=name, channels=layer[0], spatial=layer[1],
                             batch=CONV_BATCH, sparsity=s, dense_forward_us=dense,
                             dense_train_us=3 * dense, forward_us=fwd, train_us=train,
                             forward_speedup=dense / fwd, train_speedup=3 * dense / train,
                             ideal=1 / (1 - s), kernels=best))
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", nargs="+", default=["h100", "a100"], choices=list(GPUS))
    p.add_argument("--out", type=report.out_folder, default=None,
                   help="folder for RESULTS.md / roofline.json (default benchmarks/gpu)")
    a = p.parse_args(argv)
    results = [model(g) for g in a.gpu]
    for res in results:
        for r in res["rows"]:
            print(f"{res['gpu']} block {r['block']:>3} sparsity {r['sparsity']:.2f}: forward "
                  f"{r['forward_us']:7.1f} us ({r['forward_speedup']:.2f}x), train "
                  f"{r['train_us']:7.1f} us ({r['train_speedup']:.2f}x); dense "
                  f"{r['dense_forward_us']:.1f} us / step {r['dense_train_us']:.1f} us")
        for r in res["conv_rows"]:
            print(f"{res['gpu']} csr conv {r['layer']} sparsity {r['sparsity']:.2f}: forward "
                  f"{r['forward_us']:7.1f} us ({r['forward_speedup']:.2f}x), train "
                  f"{r['train_us']:7.1f} us ({r['train_speedup']:.2f}x); cuDNN "
                  f"{r['dense_forward_us']:.1f} us / step {r['dense_train_us']:.1f} us")
    paths = gpu_report.save_section("roofline", ["python", "-m", "benchmarks", "roofline",
                                                 *argv], {"models": results}, a.out)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
