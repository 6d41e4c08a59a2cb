"""--device and --autocast: bf16 autocast trains for real (on the CPU too, where torch.autocast
also has bf16), sparse layers run under it (sparsekern registers its ops for autocast), and on a
GPU block / N:M tickets train on the sparse kernels with their step times in the summary."""
import json
import os

import pytest
import torch

from _lth_helpers import TINY, load, run_inprocess

ARGS = TINY + ["--branches", "none", "--rounds", "1", "--epochs", "2"]


def summary(run):
    return json.load(open(os.path.join(run, "summary.json")))


def test_bf16_autocast_trains_masked_dense_on_cpu(tmp_path):
    plain = run_inprocess(ARGS + ["--sparse-policy", "dense"], tmp_path)
    bf16 = run_inprocess(ARGS + ["--sparse-policy", "dense", "--autocast", "bf16"], tmp_path)
    assert plain != bf16  # --autocast is part of the run's identity
    for e in summary(bf16):
        assert (e["autocast"], e["device"]) == ("bf16", "cpu")
        assert e["test_acc"] > 0.5 and e["step_ms_sparse"] > 0
    assert {e["autocast"] for e in summary(plain)} == {"none"}
    a = load(os.path.join(plain, "round_01", "checkpoint.pt"))["model"]
    b = load(os.path.join(bf16, "round_01", "checkpoint.pt"))["model"]
    assert a["fcs.0.weight"].dtype == b["fcs.0.weight"].dtype == torch.float32
    assert not torch.equal(a["fcs.0.weight"], b["fcs.0.weight"])  # bf16 arithmetic trained it


def test_bf16_autocast_on_sparse_kernels(tmp_path):
    """Sparse layers follow torch.autocast (sparsekern registers its ops for it): a bf16 run
    trains its pruned rounds on the sparse kernels."""
    run = run_inprocess(ARGS[2:] + ["--autocast", "bf16", "--sparse-policy", "sparse",
                                    "--model", "lenet5", "--rewind", "init"], tmp_path)
    ticket = summary(run)[1]
    assert ticket["autocast"] == "bf16" and ticket["sparse_layers"] == "3/3"
    assert ticket["test_acc"] > 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("ticket", [["--granularity", "block", "--block", "16x16",
                                     "--sparse-format", "bsr"],
                                    ["--granularity", "nm", "--nm", "2:4"]])
def test_cuda_tickets_train_on_sparse_kernels_with_bf16(tmp_path, ticket):
    run = run_inprocess(["--widths", "64,64", "--epochs", "2", "--rounds", "2", "--no-progress",
                         "--timing-repeats", "3", "--branches", "none", "--device", "cuda",
                         "--autocast", "bf16", "--sparse-policy", "sparse", *ticket], tmp_path)
    entries = summary(run)
    assert {e["device"] for e in entries} == {"cuda:0"}
    last = entries[-1]
    assert last["sparse_layers"] == "2/2" and last["sparsity"] > 0.3
    assert last["step_ms_sparse"] > 0 and last["step_ms_dense"] > 0
    ck = load(os.path.join(run, "round_02", "checkpoint.pt"))
    assert {d["chosen"] for d in ck["decisions"].values()} == {"sparse"}
