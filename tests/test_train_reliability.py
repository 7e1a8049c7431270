"""seqpar-train on real gloo ranks (tests/harness.py): a resume never destroys a checkpoint, a non-finite step stops
training before it touches the weights, optimizer settings given on resume win, two jobs cannot share a
directory, bad inputs fail on every rank before any collective, the world may grow on resume, and a stopped
peer or a full disk during a save fails every rank within the timeout, naming the stage and the rank."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tests.harness import RankError, RankTimeout, run_distributed

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

import seqpar  # noqa: E402
from seqpar.launch import checkpoint as checkpoint_mod  # noqa: E402
from seqpar.launch import train as train_mod  # noqa: E402
from tests.test_train import run_train  # noqa: E402 (one way to run seqpar-train in process)

BASE = ["--model", "llama-tiny", "--data", "uniform", "--tokens-per-step", "512", "--max-len", "128",
        "--strategy", "ring", "--lr", "1e-2", "--no-progress"]


def outcome(argv):
    """("ok", losses) or (exception type name, message): expected errors are returned, not raised, so the
    harness keeps its ranks."""
    try:
        return ("ok", run_train(argv))
    except (ValueError, train_mod.NonFiniteLossError, checkpoint_mod.CheckpointError) as err:
        return (type(err).__name__, str(err))


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def optimizer_file(path):
    return torch.load(path / "optim.pt", weights_only=True)


def test_steps_below_the_checkpoint_are_refused_and_nothing_is_written(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = BASE + ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    run_distributed(run_train, 2, argv + ["--steps", "4"])
    before = snapshot(ckpt)
    refused = run_distributed(outcome, 2, argv + ["--steps", "2", "--resume"])
    for kind, message in refused:  # every rank, before training
        assert kind == "ValueError" and message.startswith("--steps: 2 is below the step of the checkpoint"), message
    assert run_distributed(outcome, 2, argv + ["--steps", "4", "--resume"]) == [("ok", [])] * 2  # nothing to do
    for kind, message in run_distributed(outcome, 2, argv + ["--steps", "4"]):  # a fresh run would overwrite it
        assert kind == "ValueError" and "already holds checkpoints of a run (it has a 'latest')" in message, message
    assert snapshot(ckpt) == before  # step_2, step_4 and latest untouched; the lock was released


def nan_on_calls(argv, calls):
    """Train with the loss made NaN on the given forward calls (1-based), on every rank alike."""
    original = seqpar.parallelize

    class NaNLoss:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, **kwargs):
            out = self.inner(**kwargs)
            self.calls += 1
            if self.calls in calls:
                out.loss = out.loss * float("nan")
            return out

    seqpar.parallelize = lambda *a, **k: NaNLoss(original(*a, **k))
    try:
        return outcome(argv)
    finally:
        seqpar.parallelize = original


def test_a_nonfinite_loss_stops_training_before_the_optimizer_step(tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    argv = BASE + ["--steps", "4", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--metrics", str(metrics)]
    for kind, message in run_distributed(nan_on_calls, 2, argv, {2}):
        assert kind == "NonFiniteLossError", message
        assert message.startswith("step 2: non-finite loss or gradient (loss nan"), message
        assert "last checkpoint: step_1" in message
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1"]  # no step 2; the lock released
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1].get("skipped_nonfinite") is True


def test_skip_nonfinite_skips_the_optimizer_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    # --no-fsdp: the test reads the optimizer's step count from the unsharded checkpoint file
    argv = BASE + ["--steps", "4", "--checkpoint-dir", str(ckpt), "--skip-nonfinite", "1", "--no-fsdp"]
    results = run_distributed(nan_on_calls, 2, argv, {2})
    for kind, losses in results:
        assert kind == "ok" and np.isnan(losses[1]) and np.isfinite([losses[0], *losses[2:]]).all(), losses
    state = optimizer_file(ckpt / "step_4")["state"]
    assert {float(s["step"]) for s in state.values()} == {3.0}  # four steps, one of them skipped
    assert all(torch.isfinite(w).all() for w in torch.load(ckpt / "step_4" / "model.pt", weights_only=True).values())
    # a second non-finite step is one too many
    kinds = run_distributed(nan_on_calls, 2, BASE + ["--steps", "4", "--skip-nonfinite", "1"], {2, 3})
    assert [k for k, _ in kinds] == ["NonFiniteLossError"] * 2 and kinds[0][1].startswith("step 3:")


def test_a_huge_learning_rate_ends_in_an_error_and_no_nonfinite_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = BASE + ["--steps", "8", "--lr", "1e4", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1",
                   "--keep-last", "0", "--no-fsdp"]  # the attack, in process (--no-fsdp: the test reads
    # the unsharded weight file); the command's exit code is tested below
    for kind, message in run_distributed(outcome, 2, argv):  # the gradient overflows at step 2
        assert kind == "NonFiniteLossError" and "gradient norm nan" in message, message
        assert message.startswith("step 2:") and "last checkpoint: step_1" in message, message
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1"]
    for path in ckpt.glob("step_*"):
        weights = torch.load(path / "model.pt", weights_only=True)
        assert all(torch.isfinite(w).all() for w in weights.values()), path


def test_optimizer_settings_given_on_resume_win_and_are_logged(tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    # --no-fsdp: the test reads the stored settings from the unsharded optimizer file
    argv = BASE + ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--keep-last", "2", "--no-fsdp"]
    run_distributed(run_train, 2, argv + ["--steps", "2"])  # --lr 1e-2 (in BASE)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1", "step_2"]
    resume = [a for a in argv if a not in ("--lr", "1e-2")] + ["--resume", "--metrics", str(metrics)]
    run_distributed(run_train, 2, resume + ["--steps", "3", "--lr", "5e-3", "--weight-decay", "0.1"])
    group = optimizer_file(ckpt / "step_3")["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (5e-3, 0.1)
    first = json.loads(metrics.read_text().splitlines()[0])
    assert first["step"] == 3 and first["optimizer_overrides"] == {"lr": [1e-2, 5e-3], "weight_decay": [0.0, 0.1]}
    run_distributed(run_train, 2, resume + ["--steps", "4"])  # not given: the checkpoint's values stay
    group = optimizer_file(ckpt / "step_4")["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (5e-3, 0.1)
    assert "optimizer_overrides" not in json.loads(metrics.read_text().splitlines()[1])
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_3", "step_4"]  # the newest two


def test_a_directory_in_use_by_another_job_is_refused_on_every_rank(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "started": "earlier"}))
    argv = BASE + ["--steps", "1", "--checkpoint-dir", str(ckpt), "--metrics", str(tmp_path / "m.jsonl")]
    results = run_distributed(outcome, 2, argv)
    assert results[0][0] == "ValueError" and "is in use by another seqpar-train job" in results[0][1]
    assert results[1][0] == "CheckpointError" and "rank 0 failed: ValueError" in results[1][1]
    assert "start: lock the checkpoint directory" in results[1][1]
    assert not (tmp_path / "m.jsonl").exists() and sorted(p.name for p in ckpt.iterdir()) == [".lock"]


def write_tokens(path, array):
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        array.tofile(path)
    return str(path)


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: write_tokens(d / "neg.npy", np.array([5, -3] * 400, dtype=np.int64)), [],
     "data: .* has a negative token id \\(-3, first at index 1\\)"),
    (lambda d: write_tokens(d / "float.npy", np.random.rand(800)), [], "holds float64 values; token ids must be"),
    (lambda d: write_tokens(d / "ids.bin", np.arange(800, dtype=np.int32) % 200), [],
     "--data-dtype: .* is a headerless .bin; say how its ids are stored"),
    (lambda d: write_tokens(d / "ids.bin", np.arange(801, dtype=np.int32) % 200), ["--data-dtype", "int64"],
     "not a multiple of int64"),
    (lambda d: write_tokens(d / "short.npy", np.arange(100, dtype=np.int32)), [], "holds 100 tokens, fewer than"),
    (lambda d: (d / "a-file").write_text("x") and "uniform", ["--checkpoint-dir", "{d}/a-file"],
     "--checkpoint-dir: .* exists and is not a directory"),
])
def test_bad_inputs_fail_on_every_rank_before_training(tmp_path, make, extra, message):
    data = make(tmp_path)
    argv = [a for a in BASE if a not in ("--data", "uniform")] + ["--data", data, "--steps", "1"]
    results = run_distributed(outcome, 2, argv + [e.format(d=tmp_path) for e in extra])
    for kind, text in results:
        assert kind == "ValueError", text
        assert re.search(message, text), text


def test_the_world_may_grow_on_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    straight = run_distributed(run_train, 2, BASE + ["--steps", "4"])[0]
    run_distributed(run_train, 2, BASE + ["--steps", "2", "--checkpoint-dir", str(ckpt)])
    grown = run_distributed(run_train, 3, BASE + ["--steps", "4", "--checkpoint-dir", str(ckpt), "--resume"])
    for losses in grown:
        assert len(losses) == 2
        for a, b in zip(straight[2:], losses):
            assert abs(a - b) <= 1e-4 * abs(a), (straight, losses)  # same weights, optimizer and data position


def full_disk_on_rank1(argv, at_step):
    original = checkpoint_mod._save_file

    def refuse(obj, path):
        if dist.get_rank() == 1 and path.parent.name == f"step_{at_step}.tmp":
            raise OSError(28, "No space left on device", str(path))
        return original(obj, path)

    checkpoint_mod._save_file = refuse
    try:
        return outcome(argv)
    finally:
        checkpoint_mod._save_file = original


def test_a_full_disk_on_one_rank_is_named_on_every_rank_and_the_partial_checkpoint_removed(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = BASE + ["--steps", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
    (kind0, message0), (kind1, message1) = run_distributed(full_disk_on_rank1, 2, argv, 2)
    assert kind1 == "CheckpointError" and "checkpoint step 2: write on rank 1: disk full (ENOSPC)" in message1
    assert kind0 == "CheckpointError" and "checkpoint step 2: write: rank 1 failed" in message0
    assert "disk full (ENOSPC)" in message0 and "removed the partial" in message0
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1"]


TIMEOUT_S = 5


def stop_rank1_in_the_save(argv):
    """Rank 1 stops (sleeps for good) while writing its part of the step-1 checkpoint; the others must raise
    within SEQPAR_COMM_TIMEOUT_S. The elapsed time goes into the raised message for the test to read."""
    os.environ["SEQPAR_COMM_TIMEOUT_S"] = str(TIMEOUT_S)
    original = checkpoint_mod.write_rank_state
    entered = {}

    def stopping(tmp, rank, step):
        entered["t"] = time.monotonic()
        original(tmp, rank, step)
        if rank == 1:
            time.sleep(3600)

    checkpoint_mod.write_rank_state = stopping
    try:
        run_train(argv)
    except checkpoint_mod.CheckpointError as err:
        raise AssertionError(f"raised {time.monotonic() - entered['t']:.2f} s into the write stage: {err}") from None
    finally:
        checkpoint_mod.write_rank_state = original


def test_a_peer_stopped_during_a_save_fails_every_other_rank_within_the_timeout(tmp_path):
    argv = BASE + ["--steps", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    with pytest.raises((RankError, RankTimeout)) as info:
        run_distributed(stop_rank1_in_the_save, 3, argv, timeout=40)
    message = str(info.value)
    assert "ranks [1] did not answer" in message  # the stopped one; both others raised
    for rank in (0, 2):
        part = message.split(f"--- rank {rank} raised")[1].split("--- rank")[0]
        assert "seqpar-train: checkpoint step 1: write: rank 1 did not arrive" in part, part[-1500:]
        elapsed = float(re.search(r"AssertionError: raised ([0-9.]+) s into the write stage", part).group(1))
        assert elapsed <= TIMEOUT_S + 1.0, part[-1500:]


def test_the_command_exits_non_zero_when_the_loss_turns_nonfinite(tmp_path):
    """The issue's attack as a user runs it (torchrun, 2 processes): --lr 1e4 used to train on at NaN and exit 0."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, SEQPAR_COMM_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "seqpar.launch.train", *BASE, "--lr", "1e4", "--steps", "6", "--checkpoint-dir", str(ckpt),
               "--checkpoint-every", "1"]
    run = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-4000:]
    for rank in (0, 1):
        expected = f"seqpar-train: error (rank {rank}): step 2: non-finite loss or gradient"
        assert expected in run.stderr, run.stderr[-4000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1"]  # nothing after the bad step; lock gone
