"""Helpers for the lth tests: tiny runs in-process or as a subprocess, and reading run dirs."""
import glob
import os
import subprocess
import sys

import torch

from lth.cli import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a few seconds on 2 cores: digits, a small mlp, 2 pruned rounds, no timing repeats
TINY = ["--widths", "48,48", "--epochs", "3", "--rounds", "2", "--batch-size", "64",
        "--timing-repeats", "1", "--timing-warmup", "0", "--no-progress", "--threads", "1"]


def run_dir_of(args, runs_dir) -> str:
    return os.path.join(str(runs_dir), parse_config(list(args)).run_name())


def run_inprocess(args, runs_dir) -> str:
    from lth.train import main
    args = list(args) + ["--runs-dir", str(runs_dir)]
    assert main(args) == 0
    return run_dir_of(args, runs_dir)


def lth_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_subprocess(args, runs_dir, timeout=180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lth.train", *args, "--runs-dir", str(runs_dir)],
                          cwd=ROOT, env=lth_env(), capture_output=True, text=True,
                          timeout=timeout, **kw)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "round_*", "checkpoint.pt")))
