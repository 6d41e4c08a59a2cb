"""`python -m lth.train` flags, built from the hparams dataclasses; `--config FILE` (JSON or YAML)
supplies settings that flags given on the command line override."""
from __future__ import annotations

import argparse
import json
import os
import sys

from lth.hparams import SECTIONS, Config, ConfigError, flags, flat_settings, format_default, \
    make_config

_JOINERS = {"block": "x", "synthetic_shape": "x", "nm": ":"}

DESCRIPTION = """\
Find lottery tickets with iterative magnitude pruning (IMP) and rewinding, train them on
sparsekern's sparse kernels, and run the sanity-check baselines. With no arguments: IMP with
weight rewinding on scikit-learn's digits, mlp 64-1536-1536-10, 14 rounds of 20% pruning
(95.6% sparse) plus a random-reinit branch at the last round. Other methods (--method): oneshot,
kd (KD ticket), rst (dual LTH), rigl / set (dynamic sparse training); a method's own settings
are in its section below. Small and paper-scale configs: lth/experiments/*.yaml.

Outputs go to <runs-dir>/<name>-<hash of the non-default settings>/; rerunning the same command
resumes after the last finished epoch, and a finished run is reported, not redone.
"""


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: cannot read {path} as text: {e}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config: {path} is YAML but PyYAML is not installed "
                              f"(pip install pyyaml), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config: {path} is not valid JSON: {e}") from None
    return {} if data is None else data


def build_parser(prog: str = "python -m lth.train") -> argparse.ArgumentParser:
    all_flags = flags()  # first: it imports the methods, which register their sections
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML file of settings, nested by section ("
                        + ", ".join(SECTIONS) + ") or flat by flag name; flags given on the "
                        "command line override it (default: none)")
    groups = {s: parser.add_argument_group(f"{s} settings") for s in SECTIONS}
    for fl in all_flags:
        meta = fl.field.metadata
        default_text = format_default(fl.default, _JOINERS.get(fl.field.name, ","))
        help_text = f"{meta['help']} (default: {default_text})"

        def convert(value, fl=fl):
            try:
                return fl.convert(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        kwargs = dict(dest=fl.dest, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if isinstance(fl.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = fl.choices()
            kwargs["type"] = convert
            kwargs["metavar"] = meta["metavar"] or ("{" + ",".join(choices) + "}" if choices
                                                    else fl.dest.upper())
        groups[fl.section].add_argument(fl.option, **kwargs)
    return parser


def parse_config(argv: list[str] | None = None, prog: str = "python -m lth.train") -> Config:
    """Command line -> validated Config; exits with a usage error naming the flag otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    settings = {}
    try:
        if ns.config:
            settings.update(flat_settings(load_config_file(ns.config), ns.config))
        settings.update({k: v for k, v in vars(ns).items() if k != "config"})
        return make_config(settings)
    except ConfigError as e:
        parser.error(str(e))
