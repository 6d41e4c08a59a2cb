"""Bad runs fail clearly: a diverged run stops at the first non-finite loss naming the round, epoch
and flag; pruning that can remove nothing is refused before training; a phase whose masks join
no output to the input gets no verdict; an unreadable file of a run folder is one line naming it
(or the phase is redone where that is safe), never a traceback."""
import json
import os
import shutil

import torch

from _lth_helpers import load, run_dir_of, run_inprocess
from lth import report, train

# one pruned round, one epoch: what a rerun needs to redo is a second or two
SMALL = ["--widths", "32,32", "--epochs", "1", "--rounds", "1", "--batch-size", "128",
         "--branches", "none", "--rewind", "init", "--timing-repeats", "1",
         "--timing-warmup", "0", "--no-progress", "--threads", "1"]


def _main(args, runs_dir, capsys):
    code = train.main(list(args) + ["--runs-dir", str(runs_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("python -m lth.train")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_diverged_run_stops_at_the_first_non_finite_loss(tmp_path, capsys):
    code, out, err = _main(SMALL + ["--lr", "1e30"], tmp_path, capsys)
    assert code == 2
    line = _error_line(err)
    assert "round_00" in line and "(round 0) diverged in epoch 1" in line, line
    assert "lower --lr (now 1e+30)" in line, line
    run = run_dir_of(SMALL + ["--lr", "1e30"], tmp_path)
    assert not os.path.exists(os.path.join(run, "round_00", "result.json"))


def test_a_diverged_phase_at_a_constant_lr_names_the_flag_that_set_it(tmp_path, capsys):
    """RST's penalty phase trains at a constant --lr; IMP's finetune rounds at --finetune-lr
    when given, else at the last epoch's rate of the --lr schedule."""
    cases = ((["--method", "rst", "--lr", "1e30", "--rst-stabilize", "2it"], "--lr (now 1e+30)"),
             (["--rewind", "finetune", "--finetune-lr", "1e30"], "--finetune-lr (now 1e+30)"))
    at = SMALL.index("--rewind")
    base = SMALL[:at] + SMALL[at + 2:]  # the cases set their own rewind
    for flags, named in cases:
        code, out, err = _main(base + flags, tmp_path, capsys)
        assert code == 2
        assert f"lower {named} and run again" in _error_line(err), err


def test_blocks_larger_than_every_layer_are_refused_before_training(tmp_path, capsys):
    args = SMALL + ["--granularity", "block", "--block", "64x64", "--widths", "30"]
    code, out, err = _main(args, tmp_path, capsys)
    assert code == 2
    line = _error_line(err)
    assert "--block 64x64: every prunable layer is a single block" in line, line
    assert list(tmp_path.iterdir()) == []  # refused before the run folder is made


def test_a_round_that_would_prune_nothing_is_refused_before_training(tmp_path, capsys):
    at = SMALL.index("--rounds")
    base = SMALL[:at] + SMALL[at + 2:]
    cases = (  # a fraction that rounds to no weight; two blocks at 20%; N:M reached in round 2
        (["--rounds", "2", "--prune-fraction", "0.0001"],
         "round 1 of --rounds 2 would prune nothing: --prune-fraction 0.0001 of the weights"),
        (["--rounds", "1", "--granularity", "block", "--block", "64x32", "--widths", "30"],
         "round 1 of --rounds 1 would prune nothing: --prune-fraction 0.2 of the 64x32 blocks "
         "left (2 at first) rounds to none: raise --prune-fraction or use a smaller --block"),
        (["--rounds", "4", "--granularity", "nm", "--nm", "2:4"],
         "round 3 of --rounds 4 would prune nothing: every group of 4 already keeps 2 after "
         "round 2: use --rounds 2"))
    for flags, message in cases:
        code, out, err = _main(base + flags, tmp_path, capsys)
        assert code == 2
        assert message in _error_line(err), err
    assert list(tmp_path.iterdir()) == []  # refused before any run folder is made


def test_idle_round_counts_what_each_round_removes():
    from lth import pruning
    assert pruning.idle_round({"a": 100}, 0.2, 10) is None
    assert pruning.idle_round({"a": 8}, 0.2, 10) == 6  # 8 -> 6 -> 5 -> 4 -> 3 -> 2 -> idle
    assert pruning.idle_round({"a": 3, "b": 200}, 0.2, 3, scope="layerwise") is None
    assert pruning.idle_round({"a": 2, "b": 2}, 0.2, 1, scope="layerwise") == 1
    assert pruning.idle_round({}, 0.2, 2, granularity="nm", nm=(2, 4)) is None
    assert pruning.idle_round({}, 0.2, 3, granularity="nm", nm=(2, 4)) == 3
    assert pruning.idle_round({}, 0.5, 2, granularity="nm", nm=(1, 4)) is None


def test_a_phase_with_an_empty_layer_gets_no_verdict():
    entries = [{"round": 0, "branch": "ticket", "test_acc": 0.95, "sparsity": 0.0},
               {"round": 1, "branch": "ticket", "test_acc": 0.10, "sparsity": 0.96,
                "empty_layers": ["fc2.weight"]},
               {"round": 1, "branch": "random_reinit", "test_acc": 0.10, "sparsity": 0.96,
                "empty_layers": ["fc2.weight"]},
               {"round": 2, "branch": "ticket", "test_acc": 0.95, "sparsity": 0.97,
                "empty_layers": []},
               {"round": 2, "branch": "random_ticket", "test_acc": 0.5, "sparsity": 0.97,
                "empty_layers": ["fc1.weight"]}]
    rows = {r["round"]: r for r in report.verdicts(entries)}
    assert rows[1]["verdict"] == ("no result: no path of kept weights from the input to the "
                                  "output (fc2.weight pruned entirely)")
    assert rows[1]["reaches_dense"] is None and rows[1]["best_baseline"] is None
    assert rows[2]["best_baseline"] is None  # a baseline without signal is no baseline
    assert rows[2]["verdict"] == "no baseline"


def test_the_signal_check_decides_over_empty_layers():
    """A cut without an empty layer is no result; an empty branch conv of a residual block,
    bypassed by its skip path, is a result."""
    entries = [{"round": 0, "branch": "ticket", "test_acc": 0.95, "sparsity": 0.0,
                "empty_layers": [], "signal_outputs": 10, "outputs": 10},
               {"round": 1, "branch": "ticket", "test_acc": 0.10, "sparsity": 0.9,
                "empty_layers": [], "signal_outputs": 0, "outputs": 10},
               {"round": 2, "branch": "ticket", "test_acc": 0.93, "sparsity": 0.95,
                "empty_layers": ["blocks.4.conv2.weight"], "signal_outputs": 10,
                "outputs": 10}]
    rows = {r["round"]: r for r in report.verdicts(entries, tolerance=0.05)}
    assert rows[1]["verdict"] == "no result: no path of kept weights from the input to the output"
    assert rows[2]["verdict"] == "no baseline" and rows[2]["reaches_dense"] is True


def test_masks_that_cut_the_network_without_an_empty_layer_are_no_result(tmp_path, capsys,
                                                                         monkeypatch):
    """IMP's pruning made to return masks with a kept weight in every layer but no path: fc1
    feeds only hidden unit 3, fc2 reads only unit 7."""
    from lth import pruning

    def cut(scores, masks, *args, **kwargs):
        out = {n: torch.zeros_like(m) for n, m in masks.items()}
        out["fcs.0.weight"][3, :] = True
        out["fcs.1.weight"][:, 7] = True
        return out

    monkeypatch.setattr(pruning, "prune", cut)
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 0, err
    assert ("round_01: no path of kept weights joins its input to any output: it trains a "
            "constant function, and its accuracy is reported as no result") in out
    assert "NO SIGNAL: no output joined to the input" in out
    run = run_dir_of(SMALL, tmp_path)
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert (result["empty_layers"], result["signal_outputs"], result["outputs"]) == ([], 0, 10)
    rows = report.verdicts(json.load(open(os.path.join(run, "summary.json"))))
    assert rows[0]["verdict"] == "no result: no path of kept weights from the input to the output"


def _finished(tmp_path):
    run = run_inprocess(SMALL, tmp_path)
    result = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert result["empty_layers"] == []
    assert result["signal_outputs"] == result["outputs"] == 10
    return run, result


def _corrupt(path, how="truncate"):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncate" else b"")


def test_unreadable_result_json_redoes_the_phase_from_its_checkpoint(tmp_path, capsys):
    run, result = _finished(tmp_path)
    capsys.readouterr()
    _corrupt(os.path.join(run, "round_01", "result.json"))
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 0, err
    assert "round_01/result.json is unreadable (JSONDecodeError" in out
    again = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert {k: again[k] for k in ("test_acc", "sparsity", "steps", "step_ms_sparse")} == \
        {k: result[k] for k in ("test_acc", "sparsity", "steps", "step_ms_sparse")}


def test_unreadable_checkpoint_of_an_unfinished_phase_starts_it_over(tmp_path, capsys):
    run, result = _finished(tmp_path)
    capsys.readouterr()
    os.remove(os.path.join(run, "round_01", "result.json"))
    _corrupt(os.path.join(run, "round_01", "checkpoint.pt"))
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 0, err
    assert "round_01/checkpoint.pt is unreadable (" in out and "starts over" in out
    again = json.load(open(os.path.join(run, "round_01", "result.json")))
    assert again["sparsity"] == result["sparsity"] and again["steps"] == result["steps"]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert sum(r["phase"] == "round_01" for r in rows) == 1  # the old epoch's line is gone


def test_unreadable_checkpoint_that_a_later_phase_needs_is_one_line(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    capsys.readouterr()
    shutil.rmtree(os.path.join(run, "round_01"))
    _corrupt(os.path.join(run, "round_00", "checkpoint.pt"), how="empty")
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 2
    line = _error_line(err)
    assert "round_00/checkpoint.pt is unreadable (EOFError)" in line, line
    assert f"delete {os.path.join(run, 'round_00')} and rerun the same command" in line


def test_unreadable_masks_are_computed_again(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    masks = load(os.path.join(run, "round_01", "masks.pt"))
    capsys.readouterr()
    for name in ("result.json", "checkpoint.pt"):
        os.remove(os.path.join(run, "round_01", name))
    _corrupt(os.path.join(run, "round_01", "masks.pt"))
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 0, err
    assert "round_01/masks.pt is unreadable" in out and "computed again" in out
    again = load(os.path.join(run, "round_01", "masks.pt"))
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_unreadable_config_json_is_written_again(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    info = json.load(open(os.path.join(run, "config.json")))
    capsys.readouterr()
    os.remove(os.path.join(run, "round_01", "result.json"))  # unfinished: the folder is opened
    _corrupt(os.path.join(run, "config.json"))
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 0, err
    assert "config.json is unreadable (JSONDecodeError" in out and "written again" in out
    assert json.load(open(os.path.join(run, "config.json")))["non_default"] == \
        info["non_default"]


# ---- files that parse but hold something else (lth.run_files) -------------------------------

def test_a_result_json_of_the_wrong_shape_redoes_the_phase(tmp_path, capsys):
    run, result = _finished(tmp_path)
    for content, why in (([], "must be a JSON object, got list"), ({}, "has no 'round'"),
                         ({**result, "test_acc": "abc"}, "'test_acc' is 'abc'"),
                         ({**result, "round": 0}, "the result of round 0 ticket, not of round 1")):
        capsys.readouterr()
        json.dump(content, open(os.path.join(run, "round_01", "result.json"), "w"))
        code, out, err = _main(SMALL, tmp_path, capsys)
        assert code == 0, err
        assert "round_01/result.json is unreadable (ValueError: " in out and why in out, out
        assert json.load(open(os.path.join(run, "round_01", "result.json")))["test_acc"] == \
            result["test_acc"]


def test_a_checkpoint_of_another_run_or_shape_is_never_resumed(tmp_path, capsys):
    run, result = _finished(tmp_path)
    lr = run_inprocess(SMALL + ["--lr", "0.3"], tmp_path / "lr")
    wide = run_inprocess([*SMALL[:1], "16,16", *SMALL[2:]], tmp_path / "wide")
    os.remove(os.path.join(run, "round_01", "result.json"))
    for source in (lr, wide):  # same architecture, other lr; other widths
        capsys.readouterr()
        shutil.copy(os.path.join(source, "round_01", "checkpoint.pt"),
                    os.path.join(run, "round_01", "checkpoint.pt"))
        code, out, err = _main(SMALL, tmp_path, capsys)
        assert code == 0, err
        assert "round_01/checkpoint.pt is unreadable (ValueError: it is a checkpoint of a run " \
               "with other settings" in out, out
        assert "starts over" in out
        again = json.load(open(os.path.join(run, "round_01", "result.json")))
        assert again["test_acc"] == result["test_acc"]
        os.remove(os.path.join(run, "round_01", "result.json"))
    # one a later phase starts from: one line
    shutil.rmtree(os.path.join(run, "round_01"))
    shutil.copy(os.path.join(lr, "round_00", "checkpoint.pt"),
                os.path.join(run, "round_00", "checkpoint.pt"))
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 2
    assert "round_00/checkpoint.pt is unreadable (ValueError: it is a checkpoint of a run " \
           "with other settings" in _error_line(err)


def test_masks_of_the_wrong_shape_are_computed_again(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    masks = load(os.path.join(run, "round_01", "masks.pt"))
    for bad, why in (({}, "non-empty dict of bool masks, got dict (empty)"),
                     ({n: m[:, :3] for n, m in masks.items()}, "is a bool tensor"),
                     ({n: m.float() for n, m in masks.items()}, "is a float32 tensor")):
        capsys.readouterr()
        for name in ("result.json", "checkpoint.pt"):
            os.remove(os.path.join(run, "round_01", name))
        torch.save(bad, os.path.join(run, "round_01", "masks.pt"))
        code, out, err = _main(SMALL, tmp_path, capsys)
        assert code == 0, err
        assert "round_01/masks.pt is unreadable (ValueError: " in out and why in out, out
        again = load(os.path.join(run, "round_01", "masks.pt"))
        assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_a_config_json_of_the_wrong_shape_is_written_again_even_when_finished(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    info = json.load(open(os.path.join(run, "config.json")))
    for bad in ([], {}, "x"):
        capsys.readouterr()
        json.dump(bad, open(os.path.join(run, "config.json"), "w"))
        code, out, err = _main(SMALL, tmp_path, capsys)
        assert code == 0, err
        assert "config.json is unreadable (ValueError: a run's config" in out, out
        assert "run already finished" in out
        assert json.load(open(os.path.join(run, "config.json")))["non_default"] == \
            info["non_default"]


def test_metrics_lines_that_are_not_this_loops_are_dropped_on_resume(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    os.remove(os.path.join(run, "round_01", "result.json"))
    with open(os.path.join(run, "metrics.jsonl"), "ab") as f:
        f.write(b"\x80\xfe garbage\n[1, 2]\n")
    code, out, err = _main(SMALL, tmp_path, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all(isinstance(r, dict) for r in rows)


def test_report_on_bad_files_is_one_line_and_changes_nothing(tmp_path, capsys):
    run, _ = _finished(tmp_path)
    summary = os.path.join(run, "summary.json")
    good = open(summary, "rb").read()
    for bad, why in ((b"\x80\xfe", "UnicodeDecodeError"), (b"{}", "non-empty JSON list"),
                     (b"[]", "non-empty JSON list"), (b'[{"round": 1}]', "has no 'branch'")):
        open(summary, "wb").write(bad)
        assert report.main([run]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m lth.report: error: ") and why in err, err
        assert "rerun the run's python -m lth.train command" in err and "\n" not in err
    open(summary, "wb").write(good)
    # --time: a bad result.json is left out, and stays where it is
    result = os.path.join(run, "round_01", "result.json")
    open(result, "w").write("{}")
    assert report.main(["--time", run]) == 0
    out = capsys.readouterr().out
    assert "result.json is unreadable" in out and "left out" in out
    assert open(result).read() == "{}"
    # a run killed before it finished a phase: said so, not "not a run folder"
    os.remove(summary)
    try:
        report.main([run])
    except SystemExit as exc:
        assert exc.code == 2
    assert "has no finished phase yet (no summary.json)" in capsys.readouterr().err


def test_usage_errors_are_one_line_before_anything_trains(tmp_path, capsys):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x80\xfe\xff")
    not_a_checkpoint = tmp_path / "teacher.pt"
    not_a_checkpoint.write_text("x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = (
        (["--config", str(garbage)], "--config: cannot read"),
        (["--method", "kd", "--teacher", str(not_a_checkpoint)],
         "--teacher: cannot load"),
        (["--skip-branches"], "--skip-branches: MLP has no conv"),
        (["--model", "lenet5", "--activation", "swish"], "--activation: torch.fx cannot trace"),
    )
    runs = tmp_path / "runs"
    for flags, message in cases:
        base = SMALL[2:] if "--model" in flags else SMALL  # --widths is for the mlp only
        try:
            code = train.main(base + flags + ["--runs-dir", str(runs)])
        except SystemExit as exc:  # a flag's own error: argparse's exit
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and message in err, err
    assert not runs.exists()  # nothing trained, no folder made
    code = train.main(SMALL + ["--runs-dir", str(a_file)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot make the run folder" in _error_line(err)
    assert "Not a directory" in err


def test_a_run_name_is_a_plain_folder_name(tmp_path):
    import pytest
    from lth.cli import parse_config
    for bad in ("../escape", "a/b", ".hidden"):
        with pytest.raises(SystemExit):
            parse_config(SMALL + ["--name", bad])
    assert parse_config(SMALL + ["--name", "my_run-1.5"]).run_name().startswith("my_run-1.5-")
