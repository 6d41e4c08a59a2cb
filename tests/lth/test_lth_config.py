"""Config and CLI: every flag documented with its default, --config files (JSON and YAML) with
the command line overriding them, clear validation errors naming the flag before any work, and a
stable run hash."""
import json
import os

import pytest

from lth import train
from lth.cli import build_parser, parse_config
from lth.hparams import Config, ConfigError, flags

PINNED = ["--widths", "128,128", "--rounds", "3", "--prune-fraction", "0.3"]


def test_every_flag_has_help_with_its_default():
    text = build_parser().format_help()
    for fl in flags():
        assert fl.option in text
        help_text = fl.field.metadata["help"]
        assert help_text
    assert text.count("(default:") >= len(flags())
    assert "--prune-fraction PRUNE_FRACTION" in text


def test_no_arguments_gives_the_documented_main_job():
    c = parse_config([])
    assert c == Config()
    assert (c.dataset.name, c.model.name, c.method.name) == ("digits", "mlp", "imp")
    assert min(c.model.widths) >= 1024
    assert c.pruning.fraction == 0.2
    assert (1 - c.pruning.fraction) ** c.method.rounds < 0.11  # past 89% sparsity
    assert c.method.branches == ("random_reinit",) and c.method.branch_rounds == "last"


def test_hash_is_pinned_and_stable():
    c = parse_config(PINNED)
    assert c.non_default() == {"model.widths": [128, 128], "pruning.fraction": 0.3,
                               "method.rounds": 3}
    # pinned: changing this breaks the names of existing run folders
    assert c.hash() == "6a8f378a4f"
    assert c.run_name() == "imp_mlp_digits-6a8f378a4f"
    assert parse_config([]).hash() == "44136fa355"  # sha256("{}")
    # order, settings that do not change results, and explicit defaults do not matter
    same = ["--prune-fraction", "0.30", "--rounds", "3", "--widths", "128, 128",
            "--runs-dir", "/elsewhere", "--no-progress", "--threads", "1", "--lr", "0.05",
            "--timing-repeats", "3"]
    assert parse_config(same).hash() == c.hash()
    assert parse_config(PINNED + ["--name", "x"]).run_name() == "x-6a8f378a4f"
    assert parse_config(PINNED + ["--seed", "1"]).hash() != c.hash()


def test_config_file_nested_and_flat_with_cli_override(tmp_path):
    nested = tmp_path / "c.json"
    nested.write_text(json.dumps({"model": {"widths": [128, 128]}, "method": {"rounds": 3},
                                  "pruning": {"fraction": 0.3}, "training": {"lr": 0.1}}))
    c = parse_config(["--config", str(nested), "--lr", "0.2"])
    assert c.model.widths == (128, 128) and c.method.rounds == 3
    assert c.training.lr == 0.2  # the command line wins
    flat = tmp_path / "c.yaml"
    flat.write_text("widths: 128,128\nrounds: 3\nprune-fraction: 0.3\nmodel: mlp\n"
                    "branches: [random_reinit, shuffled]\n")
    c2 = parse_config(["--config", str(flat), "--branches", "none"])
    assert c2.method.branches == ()
    assert parse_config(["--config", str(flat)]).method.branches == ("random_reinit",
                                                                     "shuffled")
    assert Config.from_dict({"widths": "128,128", "rounds": 3, "prune_fraction": 0.3}).hash() \
        == parse_config(PINNED).hash()


BAD = [
    (["--prune-fraction", "1.5"], "--prune-fraction", "must be in (0.0, 1.0)"),
    (["--widths", "0,3"], "--widths", "positive integers"),
    (["--block", "24x32"], "--block", "BNxBK"),
    (["--block", "0x32"], "--block", "expected BNxBK (output x input features)"),
    (["--nm", "4:2"], "--nm", "0 < N < M"),
    (["--sparse-format", "bsr"], "--sparse-format", "needs --granularity block"),
    (["--sparse-format", "nm"], "--sparse-format", "nm needs --granularity nm"),
    (["--target-sparsity", "0.9"], "--target-sparsity", "applies to --method oneshot or"),
    (["--rewind-to", "12ep"], "--rewind-to", "not before the end of training"),
    (["--rewind-to", "soon"], "--rewind-to", "training point"),
    (["--branch-rounds", "99"], "--branch-rounds", "not pruned rounds"),
    (["--branches", "lucky"], "--branches", "unknown branch"),
    (["--dataset", "mnist"], "--dataset", "must be one of"),
    (["--lr", "-1"], "--lr", "must be > 0"),
    (["--milestones", "3"], "--milestones", "multistep only"),
    (["--schedule", "multistep"], "--milestones", "needs milestones"),
    (["--finetune-epochs", "3"], "--finetune-epochs", "finetune only"),
    (["--rounds", "0"], "--branches", "at least one pruned round"),
    (["--device", "tpu"], "--device", "auto, cpu or cuda"),
    (["--optimizer", "adam", "--nesterov"], "--nesterov", "sgd only"),
    (["--widths", "32,,32"], "--widths", "(an empty item)"),
    # a setting that the others leave unread would only name another run folder
    (["--block", "16x16"], "--block", "applies to --granularity block only"),
    (["--nm", "1:4"], "--nm", "applies to --granularity nm only"),
    (["--model", "resnet20", "--widths", "64"], "--widths", "applies to --model mlp only"),
    (["--width-mult", "0.5"], "--width-mult", "applies to the conv models"),
    (["--rewind", "init", "--rewind-to", "2ep"], "--rewind-to",
     "applies to --rewind weights or lr only"),
    (["--branches", "none", "--branch-rounds", "all"], "--branch-rounds",
     "applies to runs with --branches only"),
]


@pytest.mark.parametrize("argv,flag,words", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_invalid_settings_are_usage_errors_naming_the_flag(argv, flag, words, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and words in err, err


def test_config_file_errors_name_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for data, words in (({"training": {"epochs": 2}, "epochs": 1}, "epochs (--epochs) is set "
                         "twice"), ({"training": 5}, "training is a section: it holds a mapping "
                                    "of its settings, got int")):
        bad.write_text(json.dumps(data))
        with pytest.raises(SystemExit):
            parse_config(["--config", str(bad)])
        assert words in capsys.readouterr().err
    bad.write_text(json.dumps({"training": {"lr": "fast"}}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad)])
    err = capsys.readouterr().err
    assert "bad.json" in err and "training.lr" in err and "--lr" in err
    bad.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad)])
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--widths"):
        Config.from_dict({"model": {"widths": []}})


def test_setting_errors_found_with_the_data_stop_before_any_work(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                       "--model", "resnet20", "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2
    assert "cifar-10-batches-py" in err and "--download" in err
    assert not runs.exists()
    code = train.main(["--prune-exclude", "fc9", "--runs-dir", str(runs), "--widths", "8"])
    assert code == 2 and "'fc9' matches no layer" in capsys.readouterr().err
    code = train.main(["--rewind-to", "400it", "--widths", "8", "--runs-dir", str(runs)])
    assert code == 2 and "--rewind-to 400it" in capsys.readouterr().err
    code = train.main(["--granularity", "nm", "--nm", "2:3", "--widths", "8",
                       "--runs-dir", str(runs)])
    assert code == 2 and "not a multiple of M=3" in capsys.readouterr().err
    code = train.main(["--warmup-steps", "400", "--epochs", "2", "--batch-size", "128",
                       "--widths", "8", "--runs-dir", str(runs)])
    assert code == 2 and ("--warmup-steps 400 is not shorter than a round's training (2 epochs "
                          "of 12 steps = 24)") in capsys.readouterr().err
    assert not runs.exists()
    assert not os.path.exists("data")  # nothing downloaded or created by default


def test_section_keys_must_belong_to_their_section():
    assert Config.from_dict({"pruning": {"prune-fraction": 0.3}}).pruning.fraction == 0.3
    with pytest.raises(ConfigError, match="unknown setting 'training.prune_fraction'"):
        Config.from_dict({"training": {"prune_fraction": 0.3}})
