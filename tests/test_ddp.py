"""torchrun with 2 CPU processes (gloo) gives the one-process run: the same learned tensors (to
float rounding) and the same accuracies; only rank 0 writes; a failing rank stops the run; a
run interrupted on 2 processes resumes on 1. Toy world, shipped toy CLIP."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import resolve
from runs import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*argv, script="train.py", timeout=240):
    """`torchrun --standalone --nproc_per_node=2 SCRIPT ARGV` (a free port on this machine);
    on a timeout the whole process group is killed, so no worker outlives the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes share the two cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def learned(out):
    return torch.load(os.path.join(out, "learned.pt"), weights_only=True)["learned"]


@pytest.mark.parametrize("method, extra", [("coop", []), ("cocoop", ["--batch-size", "2"]),
                                           ("maple", [])])
def test_two_processes_give_the_one_process_run(toy_root, tmp_path, method, extra):
    argv = ["--method", method, "--root", toy_root, "--epochs", "2", "--device", "cpu", *extra]
    one = train.main([*argv, "--out", str(tmp_path / "one")])
    run = torchrun(*argv, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["accuracy"] == one["accuracy"] and two["config"]["world_size"] == 2
    a, b = learned(tmp_path / "one"), learned(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # rank 0 alone writes and prints: one log, each epoch's lines once
    log = (tmp_path / "two" / "log.txt").read_text()
    assert log.count("* base accuracy") == 1 and "world_size: 2" in log


def test_batch_that_the_processes_do_not_divide(monkeypatch):
    """Refused while resolving the configuration, on every rank, before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for 2 processes
    with pytest.raises(UsageError, match=r"--batch-size 1 is the global batch, split over 2 "
                                         r"processes: pass a multiple of 2"):
        resolve("--method", "cocoop")
    cfg = resolve("--method", "cocoop", "--batch-size", "2")
    assert cfg["world_size"] == 2


def test_a_failing_rank_stops_every_rank(toy_root, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import runs, train\n"
        "if os.environ['RANK'] == '1':  # rank 1 fails at its first evaluation\n"
        "    train.evaluate = lambda *a: (_ for _ in ()).throw(runs.UsageError('rank 1 broke'))\n"
        "runs.run_cli(train.main)\n")
    run = torchrun("--method", "coop", "--root", toy_root, "--epochs", "1", "--device", "cpu",
                   "--out", str(tmp_path / "fail"), script=str(script), timeout=180)
    assert run.returncode != 0 and "[rank 1] error: rank 1 broke" in run.stderr
    assert not (tmp_path / "fail" / "results.json").exists()


def test_interrupted_on_two_processes_resumes_on_one(toy_root, tmp_path):
    argv = ["--method", "coop", "--root", toy_root, "--epochs", "3", "--device", "cpu"]
    run = torchrun(*argv, "--out", str(tmp_path / "cut"), "--stop-after-epoch", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = train.main([*argv, "--out", str(tmp_path / "cut"), "--resume"])
    whole = train.main([*argv, "--out", str(tmp_path / "whole")])
    assert resumed["accuracy"] == whole["accuracy"]
    a, b = learned(tmp_path / "cut"), learned(tmp_path / "whole")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
