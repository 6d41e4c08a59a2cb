"""`python -m benchmarks gpu-bench --device cuda`: measured GPU time of the sparsekern Triton
kernels vs cuBLAS dense and torch's own block-sparse kernels, with `triton.testing.do_bench`
(median of its repeats, after warm-up, L2 flushed between runs).

Cases: bf16 (or --dtype float16), x [M, K] with M = 8192 (and --rows), weights 4096x4096 and the
BERT-base / ViT-B MLP shapes (3072x768, 768x3072), square blocks 16/32/64 at 80/90/95% sparsity
with an exact kept count per block row. Modes: forward (y = x W^T) and training step (forward +
dX + dW at kept blocks, through autograd). Conv: ResNet-50's 3x3 convs (batch 32, channels_last)
with channel blocks pruned (BSR) and unstructured (CSR; --no-conv-csr leaves it out), vs cuDNN.
Peers: forward torch.sparse `bsr_dense_mm` (Triton, torch/sparse/_triton_ops.py) on the same
blocks; dW `sampled_addmm` on a BSR layout, where torch
supports the case (else reported n/a with torch's message). Unstructured (CSR) linear at the
same shapes and sparsities (each weight kept with probability 1 - sparsity): the default
Triton kernels and, beside them, the opt-in CUDA C++ kernels (csrc/cuda/csr_spmm.cu,
sk.set_csr_cuda) for forward and training step, so a GPU session can decide which should be
the default (--no-csr leaves them out). Writes benchmarks/gpu/cuda.json and regenerates
benchmarks/gpu/RESULTS.md. Needs a CUDA device (exits with a message otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from benchmarks import gpu_report, report

SHAPES = {"4096x4096": (4096, 4096), "mlp_up_3072x768": (3072, 768),
          "mlp_down_768x3072": (768, 3072)}
# ResNet-50's 3x3 convs (C_in = C_out, H = W), batch 32, channels_last: name -> (C, H)
CONV_SHAPES = {"res2_3x3": (64, 56), "res3_3x3": (128, 28), "res4_3x3": (256, 14),
               "res5_3x3": (512, 7)}


def _block_mask(n, k, block, sparsity, generator, device):
    nb, kb = n // block, k // block
    keep = max(1, round((1 - sparsity) * kb))
    scores = torch.rand(nb, kb, generator=generator)
    present = torch.zeros(nb, kb, dtype=torch.bool)
    present.scatter_(1, scores.argsort(1)[:, :keep], True)
    return present.repeat_interleave(block, 0).repeat_interleave(block, 1).to(device)


def _peer_forward(w_dense, block):
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except ImportError as exc:
        return None, f"import: {exc}"
    try:
        bsr = w_dense.to_sparse_bsr((block, block))
        fn = lambda x: bsr_dense_mm(bsr, x.t())  # noqa: E731  (W x^T = y^T)
        return fn, None
    except (RuntimeError, ValueError, TypeError) as exc:
        return None, f"n/a: {str(exc)[:120]}"


def _do_bench(fn):
    import triton.testing as tt
    return tt.do_bench(fn, return_mode="median")


def run_case(name, n, k, m, block, sparsity, dtype, generator, dev="cuda", bench=_do_bench):
    import sparsekern as sk
    mask = _block_mask(n, k, block, sparsity, generator, dev)
    w = torch.randn(n, k, device=dev, dtype=dtype) * mask
    W = sk.BlockSparse.from_dense(w, mask, block=(block, block))
    x = torch.randn(m, k, device=dev, dtype=dtype)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    rows = []
    # forward
    dense_ms = bench(lambda: torch.nn.functional.linear(x, w))
    sparse_ms = bench(lambda: sk.linear(x, W))
    peer, why = _peer_forward(w, block)
    if peer is not None:
        try:
            peer(x)  # torch rejects some cases (dtype, block): report n/a with its message
        except (RuntimeError, ValueError, TypeError) as exc:
            peer, why = None, f"n/a: {str(exc)[:120]}"
    peer_ms = bench(lambda: peer(x)) if peer else None
    rows.append(dict(case=name, block=block, sparsity=sparsity, mode="forward",
                     dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                     peer="bsr_dense_mm" if peer else why, peer_ms=peer_ms))
    # training step: forward + dX + dW (dense: the three GEMMs through autograd)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    values = W.values.clone().requires_grad_()
    Wt = sk.BlockSparse(values, W.block_row_ptr, W.block_col_idx, W.shape, W.block_col_ptr,
                        W.block_row_idx, W.block_perm)

    def dense_step():
        torch.autograd.grad(torch.nn.functional.linear(xg, wg), (xg, wg), dy)

    def sparse_step():
        torch.autograd.grad(sk.linear(xg, Wt), (xg, values), dy)

    dense_ms = bench(dense_step)
    sparse_ms = bench(sparse_step)
    rows.append(dict(case=name, block=block, sparsity=sparsity, mode="train",
                     dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                     peer=None, peer_ms=None))
    return rows


@contextlib.contextmanager
def _csr_cuda(enabled):
    import sparsekern as sk
    previous = sk.csr_cuda_enabled()
    sk.set_csr_cuda(enabled)
    try:
        yield
    finally:
        sk.set_csr_cuda(previous)


def run_csr_case(name, n, k, m, sparsity, dtype, generator, dev="cuda", bench=_do_bench,
                 cuda_cpp=True):
    """Unstructured linear: cuBLAS dense vs the Triton CSR kernels (the default dispatch) and,
    with cuda_cpp, the CUDA C++ ones (sk.set_csr_cuda(True)), forward and training step."""
    import sparsekern as sk
    mask = (torch.rand(n, k, generator=generator) >= sparsity).to(dev)
    w = torch.randn(n, k, device=dev, dtype=dtype) * mask
    W = sk.CSR.from_dense(w, mask)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    values = W.values.clone().requires_grad_()
    Wt = sk.CSR(values, W.row_ptr, W.col_idx, W.shape, W.col_ptr, W.row_idx, W.perm)
    modes = {
        "forward": (lambda: torch.nn.functional.linear(x, w), lambda: sk.linear(x, W)),
        "train": (lambda: torch.autograd.grad(torch.nn.functional.linear(xg, wg), (xg, wg), dy),
                  lambda: torch.autograd.grad(sk.linear(xg, Wt), (xg, values), dy)),
    }
    rows = []
    for mode, (dense, sparse) in modes.items():
        dense_ms = bench(dense)
        with _csr_cuda(False):
            sparse_ms = bench(sparse)
        cpp_ms = None
        if cuda_cpp:
            with _csr_cuda(True):
                cpp_ms = bench(sparse)
        rows.append(dict(case=name, block="csr", sparsity=sparsity, mode=mode,
                         dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                         peer=None, peer_ms=None, cuda_cpp_ms=cpp_ms))
    return rows


def _conv_weight(c, block, sparsity, dtype, generator, dev):
    """(dense masked weight, sparsekern weight, rebuild(values) -> weight) of a C -> C 3x3 conv:
    block = an int prunes (block x block) channel blocks spanning the window (BSR); "csr" prunes
    single weights (each kept with probability 1 - sparsity)."""
    import sparsekern as sk
    if block == "csr":
        mask = (torch.rand(c, c, 3, 3, generator=generator) >= sparsity).to(dev)
        w = torch.randn(c, c, 3, 3, device=dev, dtype=dtype) * mask
        W = sk.CSR.from_dense(w, mask)
        return w, W, lambda v: sk.CSR(v, W.row_ptr, W.col_idx, W.shape, W.col_ptr, W.row_idx,
                                      W.perm)
    mask2 = _block_mask(c, c, block, sparsity, generator, dev)
    mask = mask2[:, :, None, None].expand(-1, -1, 3, 3).contiguous()
    w = torch.randn(c, c, 3, 3, device=dev, dtype=dtype) * mask
    W = sk.BlockSparse.from_dense(w, mask, block=(block, block))
    return w, W, lambda v: sk.BlockSparse(v, W.block_row_ptr, W.block_col_idx, W.shape,
                                          W.block_col_ptr, W.block_row_idx, W.block_perm)


def run_conv_case(name, c, hw, batch, block, sparsity, dtype, generator, dev="cuda",
                  bench=_do_bench):
    """3x3 stride-1 'same' conv with channel blocks (block x block over C_out x C_in) pruned,
    or unstructured (block="csr"): sparsekern vs cuDNN (F.conv2d, channels_last), forward and
    training step."""
    import sparsekern as sk
    w, W, rebuild = _conv_weight(c, block, sparsity, dtype, generator, dev)
    x = torch.randn(batch, c, hw, hw, device=dev, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    dy = torch.randn(batch, c, hw, hw, device=dev, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    wc = w.contiguous(memory_format=torch.channels_last)
    rows = []
    dense_ms = bench(lambda: torch.nn.functional.conv2d(x, wc, None, 1, 1))
    sparse_ms = bench(lambda: sk.conv2d(x, W, None, stride=1, padding=1))
    rows.append(dict(case=f"{name} N={batch}", block=block, sparsity=sparsity, mode="forward",
                     dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                     peer=None, peer_ms=None))
    xg, wg = x.clone().requires_grad_(), wc.clone().requires_grad_()
    values = W.values.clone().requires_grad_()
    Wt = rebuild(values)
    dense_ms = bench(lambda: torch.autograd.grad(
        torch.nn.functional.conv2d(xg, wg, None, 1, 1), (xg, wg), dy))
    sparse_ms = bench(lambda: torch.autograd.grad(
        sk.conv2d(xg, Wt, None, stride=1, padding=1), (xg, values), dy))
    rows.append(dict(case=f"{name} N={batch}", block=block, sparsity=sparsity, mode="train",
                     dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                     peer=None, peer_ms=None))
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--rows", type=int, nargs="+", default=[8192])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES),
                   help="linear weight shapes (none: no linear cases)")
    p.add_argument("--blocks", type=int, nargs="*", default=[16, 32, 64],
                   help="square block sizes of the BSR cases (none: CSR only)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--conv", nargs="*", default=list(CONV_SHAPES), choices=list(CONV_SHAPES),
                   help="ResNet-50 3x3 conv shapes (none: skip conv)")
    p.add_argument("--csr", action=argparse.BooleanOptionalAction, default=True,
                   help="also the unstructured (CSR) linear: Triton and the CUDA C++ kernels")
    p.add_argument("--conv-batch", type=int, default=32)
    p.add_argument("--conv-csr", action=argparse.BooleanOptionalAction, default=True,
                   help="also the unstructured (CSR) conv at each sparsity")
    p.add_argument("--out", type=report.out_folder, default=None,
                   help="output folder (default benchmarks/gpu)")
    p.add_argument("--append", action="store_true",
                   help="add these rows to the folder's cuda.json (replacing rows of the same "
                        "case, block, sparsity, mode and dtype) instead of rewriting it")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-bench: no CUDA device on this machine; nothing measured (the roofline and "
              "compile sections need no GPU)", file=sys.stderr)
        return 2
    import sparsekern.triton as skt
    if skt.interpreter_active():
        print("gpu-bench: triton runs in the interpreter here (TRITON_INTERPRET=1); unset it",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in a.shapes:
        n, k = SHAPES[name]
        for m in a.rows:
            for block in a.blocks:
                for s in a.sparsities:
                    for r in run_case(f"{name} M={m}", n, k, m, block, s, dtype, gen):
                        rows.append(r)
                        print(f"{r['case']} b{block} {s:.0%} {r['mode']}: dense "
                              f"{r['dense_ms']:.3f} ms, sparse {r['sparse_ms']:.3f} ms "
                              f"({r['speedup']:.2f}x)", flush=True)
    import sparsekern as sk
    cuda_cpp = sk.ops.cuda_csr_built()
    if a.csr and not cuda_cpp:
        print("gpu-bench: this sparsekern._C has no CUDA kernels (a CPU-only build): the CSR "
              "rows time the Triton kernels only", file=sys.stderr)
    for name in a.shapes if a.csr else []:
        n, k = SHAPES[name]
        for m in a.rows:
            for s in a.sparsities:
                for r in run_csr_case(f"{name} M={m}", n, k, m, s, dtype, gen,
                                      cuda_cpp=cuda_cpp):
                    rows.append(r)
                    cpp = "" if r["cuda_cpp_ms"] is None else \
                        f", CUDA C++ {r['cuda_cpp_ms']:.3f} ms"
                    print(f"{r['case']} csr {s:.0%} {r['mode']}: dense {r['dense_ms']:.3f} ms, "
                          f"Triton {r['sparse_ms']:.3f} ms ({r['speedup']:.2f}x){cpp}",
                          flush=True)
    for name in a.conv:
        c, hw = CONV_SHAPES[name]
        for block in a.blocks + (["csr"] if a.conv_csr else []):
            for s in a.sparsities:
                if block != "csr" and c % block:
                    continue
                for r in run_conv_case(name, c, hw, a.conv_batch, block, s, dtype, gen):
                    rows.append(r)
                    print(f"{r['case']} b{block} {s:.0%} {r['mode']}: cuDNN "
                          f"{r['dense_ms']:.3f} ms, sparse {r['sparse_ms']:.3f} ms "
                          f"({r['speedup']:.2f}x)", flush=True)
    for r in rows:
        r["dtype"] = a.dtype
    paths = gpu_report.save_section("cuda", ["python", "-m", "benchmarks", "gpu-bench", *argv],
                                    {"rows": rows}, a.out, append=a.append)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
