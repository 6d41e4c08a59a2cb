"""KD ticket: the loss is the formula (batchmean, not mean), the teacher is the dense round 0 (or
--teacher, pruned on sparse kernels) in eval mode without gradients, alpha=0 is exactly imp."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from _lth_helpers import TINY, load, run_inprocess
from lth.cli import parse_config
from lth.methods import Phase
from lth.methods.kd import kd_loss
from lth.train import Experiment

ARGS = TINY + ["--branches", "none", "--rounds", "1", "--epochs", "2"]


def test_kd_loss_is_the_formula_on_known_logits():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, -2.0]])
    y = torch.tensor([0, 1])
    t, alpha = 4.0, 0.9
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for sv, tv in zip(s_row, t_row):
            p, q = math.exp(tv / t) / zt, math.exp(sv / t) / zs
            kl += p * math.log(p / q)
    kl /= len(y)  # per example: summed over the classes
    ce = sum(-math.log(math.exp(r[c]) / sum(math.exp(v) for v in r))
             for r, c in zip(student.tolist(), y.tolist())) / len(y)
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert float(kd_loss(student, teacher, y, t, alpha)) == pytest.approx(expected, rel=1e-6)
    # the pitfall: reduction="mean" divides by batch x classes, C times too small a soft term
    with pytest.warns(UserWarning, match="batchmean"):  # torch itself warns about it
        mean = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1),
                        reduction="mean")
    assert float(mean) * student.shape[1] == pytest.approx(kl, rel=1e-6)
    assert float(kd_loss(student, teacher, y, t, 1.0)) == pytest.approx(t * t * kl, rel=1e-6)


def test_kd_loss_is_zero_soft_term_when_student_equals_teacher():
    s = torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    assert float(kd_loss(s, s.clone(), y, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_alpha_zero_is_exactly_imp_and_alpha_point_nine_is_not(tmp_path):
    # policy sparse: runs compared bit for bit must not time their way to different kernels
    pinned = ARGS + ["--sparse-policy", "sparse"]
    imp = load(os.path.join(run_inprocess(pinned, tmp_path), "round_01", "checkpoint.pt"))
    kd0 = run_inprocess(pinned + ["--method", "kd", "--kd-alpha", "0"], tmp_path)
    kd = run_inprocess(ARGS + ["--method", "kd"], tmp_path)
    a = load(os.path.join(kd0, "round_01", "checkpoint.pt"))
    b = load(os.path.join(kd, "round_01", "checkpoint.pt"))
    assert all(torch.equal(imp["model"][k], a["model"][k]) for k in imp["model"])
    assert not torch.equal(imp["model"]["fcs.0.weight"], b["model"]["fcs.0.weight"])
    summary = json.load(open(os.path.join(kd, "summary.json")))
    assert summary[1]["method"] == "kd"
    assert (summary[1]["kd_teacher"], summary[1]["kd_temperature"], summary[1]["kd_alpha"]) == \
        ("round_00", 4.0, 0.9)
    assert "kd_teacher" not in summary[0]


def test_teacher_is_round_zero_or_a_pruned_checkpoint_on_sparse_kernels(tmp_path):
    run = run_inprocess(ARGS + ["--method", "kd", "--sparse-policy", "sparse"], tmp_path)
    exp = Experiment(parse_config(ARGS + ["--method", "kd", "--sparse-policy", "sparse",
                                          "--runs-dir", str(tmp_path)]))
    exp.method.begin_phase(None, None, Phase(1))
    teacher = exp.method.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    round0 = load(os.path.join(run, "round_00", "checkpoint.pt"))["model"]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, round0[k])
    # a pruned teacher from a checkpoint runs on sparse layers holding exactly its weights
    path = os.path.join(run, "round_01", "checkpoint.pt")
    args = ARGS + ["--method", "kd", "--teacher", path, "--runs-dir", str(tmp_path / "b")]
    exp = Experiment(parse_config(args))
    exp.method.begin_phase(None, None, Phase(1))
    teacher = exp.method.teacher
    assert any(isinstance(m, sk.SparseLinear) for m in teacher.modules())
    saved = load(path)["model"]
    dense = sk.densify(teacher).state_dict()
    assert all(torch.equal(dense[k], saved[k]) for k in saved)
    # the switch to cross-entropy after epoch E
    exp = Experiment(parse_config(args[:-2] + ["--kd-ce-after", "1", "--runs-dir",
                                               str(tmp_path / "b")]))
    exp.method.begin_phase(None, None, Phase(1))
    spe = exp.steps_per_epoch
    assert exp.method.distilling(spe - 1) and not exp.method.distilling(spe)


@pytest.mark.parametrize("argv, words", [
    (["--kd-alpha", "0.5"], "--kd-alpha: applies to --method kd only"),
    (["--method", "kd", "--kd-alpha", "1.5"], "--kd-alpha: must be in [0, 1]"),
    (["--method", "kd", "--teacher", "/nowhere.pt"], "--teacher: no such file"),
    (["--method", "kd", "--kd-ce-after", "12"], "--kd-ce-after: epoch 12 is not before"),
])
def test_kd_settings_errors_name_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert words in capsys.readouterr().err


def test_a_teacher_of_another_model_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "t.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    from lth.train import main
    code = main(ARGS + ["--method", "kd", "--teacher", str(path), "--runs-dir",
                        str(tmp_path / "r")])
    assert code == 2
    assert "--teacher:" in capsys.readouterr().err
