"""seqpar-train: exact resume, a crash during a checkpoint write, and option errors."""

import json
import os
import shutil

import pytest
import torch.distributed as dist
from tests.harness import RankError, RankTimeout, run_distributed

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

from seqpar.launch import checkpoint as checkpoint_mod  # noqa: E402
from seqpar.launch import train as train_mod  # noqa: E402

BASE = ["--model", "llama-tiny", "--data", "uniform", "--tokens-per-step", "768", "--max-len", "256",
        "--strategy", "ring", "--lr", "1e-2", "--no-progress"]


def run_train(argv):
    args = train_mod.build_parser().parse_args(argv)
    train_mod.validate_args(args)
    return [h["loss"] for h in train_mod.train(args)]


def test_a_hybrid_model_trains_with_auto_plans(tmp_path):
    # the solver names a hybrid group's strategies as a (softmax, linear) pair; the runtime runs exactly that
    argv = ["--model", "minimax-tiny", "--strategy", "auto", "--data", "longtail", "--tokens-per-step", "1024",
            "--max-len", "512", "--steps", "3", "--lr", "1e-2", "--no-progress",
            "--metrics", str(tmp_path / "m.jsonl")]
    losses = run_distributed(run_train, 4, argv, timeout=600)
    assert all(len(run) == 3 and run == pytest.approx(losses[0], rel=1e-6) for run in losses), losses
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all("+" in line["plan"] for line in lines), [line["plan"] for line in lines]  # softmax+linear pairs


def crash_during_checkpoint(argv, crash_at_step):
    """Train, but rank 1 dies inside the checkpoint write of ``crash_at_step`` (after writing its shard,
    before the rename that completes it)."""
    original = checkpoint_mod.write_rank_state

    def dying_write(tmp, rank, step):
        original(tmp, rank, step)
        if step == crash_at_step and dist.get_rank() == 1:
            os._exit(3)

    checkpoint_mod.write_rank_state = dying_write
    try:
        return run_train(argv)
    finally:
        checkpoint_mod.write_rank_state = original


def test_resume_continues_the_exact_run(tmp_path):
    straight = run_distributed(run_train, 2, BASE + ["--steps", "6"])[0]
    ckpt = tmp_path / "ckpt"
    first = run_distributed(run_train, 2, BASE + ["--steps", "3", "--checkpoint-dir", str(ckpt)])[0]
    second = run_distributed(run_train, 2, BASE + ["--steps", "6", "--checkpoint-dir", str(ckpt), "--resume"])[0]
    assert len(first) == 3 and len(second) == 3
    assert straight[0] > straight[-1]  # it learns
    for a, b in zip(straight, first + second):
        assert abs(a - b) <= 1e-6 * abs(a), (straight, first + second)


def test_a_crash_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = BASE + ["--steps", "4", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    with pytest.raises((RankError, RankTimeout)):
        run_distributed(crash_during_checkpoint, 2, argv, 4, timeout=60)
    assert (ckpt / "latest").read_text() == "step_2"  # step 4 never completed
    assert (ckpt / "step_4.tmp").exists() and not (ckpt / "step_4").exists()
    resumed = run_distributed(run_train, 2, argv + ["--resume"])[0]
    straight = run_distributed(run_train, 2, BASE + ["--steps", "4"])[0]
    assert len(resumed) == 2
    for a, b in zip(straight[2:], resumed):
        assert abs(a - b) <= 1e-6 * abs(a)
    shutil.rmtree(ckpt)


def test_metrics_file_has_one_line_per_step(tmp_path):
    metrics = tmp_path / "m.jsonl"
    run_distributed(run_train, 2, BASE + ["--steps", "2", "--metrics", str(metrics)])
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(x["bytes_sent_rank"] > 0 and x["tokens"] > 0 and x["plan"] for x in lines)


@pytest.mark.parametrize("argv, starts", [
    (["--strategy", "spiral"], "--strategy:"),
    (["--linear-strategy", "x"], "--linear-strategy:"),
    (["--model", "no-such-model"], "--model:"),
    (["--data", "nowhere.npy"], "--data:"),
    (["--steps", "0"], "--steps:"),
    (["--lr", "-1"], "--lr:"),
    (["--resume"], "--resume:"),
    (["--lr", "inf"], "--lr:"),
    (["--lr", "nan"], "--lr:"),
    (["--weight-decay", "-0.1"], "--weight-decay:"),
    (["--max-len", "1"], "--max-len:"),
    (["--tokens-per-step", "0"], "--tokens-per-step:"),
    (["--keep-last", "-1"], "--keep-last:"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite:"),
    (["--checkpoint-every", "-2"], "--checkpoint-every:"),
    (["--data-dtype", "uint16"], "--data-dtype:"),  # synthetic data has no dtype
    (["--data", __file__, "--data-dtype", "int32"], "--data-dtype:"),  # not a .bin file
])
def test_bad_options_are_named(argv, starts):
    args = train_mod.build_parser().parse_args(argv)
    with pytest.raises(ValueError) as err:
        train_mod.validate_args(args)
    assert str(err.value).startswith(starts)


def test_a_bin_file_needs_an_integer_dtype(tmp_path):
    path = tmp_path / "tokens.bin"
    path.write_bytes(bytes(64))
    args = train_mod.build_parser().parse_args(["--data", str(path), "--data-dtype", "float32"])
    with pytest.raises(ValueError, match="--data-dtype: 'float32' is not an integer dtype"):
        train_mod.validate_args(args)


@pytest.mark.parametrize("kind", ["uniform", "longtail", "bimodal"])
def test_a_short_max_len_gives_sequences_up_to_it(kind):
    import numpy as np

    from seqpar.launch.data import step_lengths

    lengths = step_lengths(kind, 64, 4, np.random.default_rng(0))  # the 16-token floor used to exceed --max-len 4
    assert sum(lengths) <= 64 and all(2 <= n <= 4 for n in lengths), lengths


def test_a_bimodal_batch_is_one_long_sequence_and_short_ones():
    import numpy as np

    from seqpar.launch.data import step_lengths

    lengths = step_lengths("bimodal", 8192, 2048, np.random.default_rng(1))
    assert lengths[0] == 2048 and all(16 <= n <= 128 for n in lengths[1:]), lengths
    assert 8192 - 128 < sum(lengths) <= 8192
