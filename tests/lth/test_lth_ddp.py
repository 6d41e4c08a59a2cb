"""`torchrun --nproc_per_node=2 -m lth.train`: DistributedDataParallel with gloo on CPU, the
same masks and weights on both ranks (the run checks and fails otherwise), rank 0 writes."""
import json
import os
import subprocess
import sys

from _lth_helpers import ROOT, TINY, load, lth_env, run_dir_of


def test_two_cpu_processes_train_the_same_ticket(tmp_path):
    args = TINY + ["--branches", "random_ticket"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lth.train", *args, "--runs-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=lth_env(), capture_output=True, text=True,
                         timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = run_dir_of(args, tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [(e["round"], e["branch"]) for e in summary] == [
        (0, "ticket"), (1, "ticket"), (2, "ticket"), (2, "random_ticket")]
    assert all(e["world_size"] == 2 for e in summary)
    assert summary[2]["test_acc"] > 0.5
    # rank 0 alone writes: one metrics line per epoch, one table
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [(r["phase"], r["epoch"]) for r in rows] == [
        ("round_00", 1), ("round_00", 2), ("round_00", 3), ("round_01", 2), ("round_01", 3),
        ("round_02", 2), ("round_02", 3), ("round_02_random_ticket", 2),
        ("round_02_random_ticket", 3)]
    assert res.stdout.count("round  branch") == 1
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["world_size"] == 2
    ck = load(os.path.join(run, "round_02", "checkpoint.pt"))
    for n, m in ck["masks"].items():
        assert int((ck["model"][n][~m] != 0).sum()) == 0
