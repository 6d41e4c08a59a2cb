"""Kill a run with SIGKILL in the middle of a round, rerun the same command: it resumes after
the last finished epoch, skips finished rounds, and ends with the masks and weights of an
uninterrupted run with the same seed. A finished run is reported, not redone."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from _lth_helpers import ROOT, lth_env, load, run_dir_of, run_subprocess

# about a second per round on one thread: long enough to be killed mid-round
KILL = ["--widths", "512,512", "--batch-size", "16", "--epochs", "6", "--rounds", "2",
        "--sparse-policy", "sparse", "--timing-repeats", "1", "--timing-warmup", "0",
        "--no-progress", "--threads", "1"]
PHASES = ["round_00", "round_01", "round_02", "round_02_random_reinit"]


def _metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_sigkill_mid_round_then_rerun_resumes_to_the_same_ticket(tmp_path):
    ref = run_subprocess(KILL, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_dir = run_dir_of(KILL, tmp_path / "ref")

    run = run_dir_of(KILL, tmp_path / "kill")
    proc = subprocess.Popen([sys.executable, "-m", "lth.train", *KILL,
                             "--runs-dir", str(tmp_path / "kill")], cwd=ROOT, env=lth_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            # round 2 has finished its first epoch (it starts at epoch 2: rewound to 1ep)
            if any(r["phase"] == "round_02" for r in _metrics(run)):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # killed in the middle of round 2: a checkpoint, no result
    assert os.path.isfile(os.path.join(run, "round_02", "checkpoint.pt"))
    assert not os.path.isfile(os.path.join(run, "round_02", "result.json"))
    killed_step = load(os.path.join(run, "round_02", "checkpoint.pt"))["step"]
    assert 12 <= killed_step < 6 * 90
    finished = {p: os.path.getmtime(os.path.join(run, p, "result.json"))
                for p in ("round_00", "round_01")}

    again = run_subprocess(KILL, tmp_path / "kill")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"round_02: resuming after epoch {killed_step // 90} (step {killed_step})" in \
        again.stdout
    for p, mtime in finished.items():  # finished rounds are not redone
        assert os.path.getmtime(os.path.join(run, p, "result.json")) == mtime
        assert f"{p}: resuming" not in again.stdout

    for p in PHASES:
        a, b = load(os.path.join(ref_dir, p, "checkpoint.pt")), \
            load(os.path.join(run, p, "checkpoint.pt"))
        assert a["masks"].keys() == b["masks"].keys()
        for n in a["masks"]:
            assert torch.equal(a["masks"][n], b["masks"][n]), (p, n)
            assert int((b["model"][n][~b["masks"][n]] != 0).sum()) == 0
        for n in a["model"]:
            assert torch.equal(a["model"][n], b["model"][n]), (p, n)
        assert a["step"] == b["step"]
    ref_rows = [(r["phase"], r["epoch"], r["test_acc"]) for r in _metrics(ref_dir)]
    assert [(r["phase"], r["epoch"], r["test_acc"]) for r in _metrics(run)] == ref_rows
    ref_summary = json.load(open(os.path.join(ref_dir, "summary.json")))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [e["test_acc"] for e in summary] == [e["test_acc"] for e in ref_summary]

    # a finished run is reported, not redone
    before = {p: os.path.getmtime(os.path.join(run, p, "checkpoint.pt")) for p in PHASES}
    done = run_subprocess(KILL, tmp_path / "kill")
    assert done.returncode == 0
    assert "run already finished" in done.stdout and "round  branch" in done.stdout
    assert {p: os.path.getmtime(os.path.join(run, p, "checkpoint.pt")) for p in PHASES} == before


def test_ctrl_c_says_how_to_resume_in_one_line(tmp_path):
    run = run_dir_of(KILL, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "lth.train", *KILL, "--runs-dir",
                             str(tmp_path)], cwd=ROOT, env=lth_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not _metrics(run):  # training, past its setup
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "python -m lth.train: interrupted; rerun the same command to resume after the last "
        "finished epoch")
