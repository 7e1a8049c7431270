"""seqpar-train on sharded models: DCP checkpoints of FSDP2 state that resume on another world size, and the
--fsdp / --activation-checkpointing / --dp / --micro-batch-tokens options."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from tests.harness import run_distributed

from seqpar.launch import checkpoint as checkpoint_mod
from seqpar.launch import train as train_mod
from tests.test_train import run_train  # one way to run seqpar-train in process


class TinyStack(torch.nn.Module):
    """Three blocks and a head: enough parameters of different shapes (one not divisible by 4) to reshard."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))
        self.head = torch.nn.Linear(6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def sharded_tiny_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyStack().double()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95), weight_decay=0.01)


def full_state(model, optimizer) -> dict:
    """Every parameter and AdamW moment as a full float64 tensor (gathered from the shards)."""
    state = {f"param {n}": p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key} {n}"] = optimizer.state[p][key].detach().full_tensor().clone()
    return state


def train_and_save(directory, steps: int) -> dict:
    model, optimizer = sharded_tiny_model(seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    checkpoint_mod.save_checkpoint(directory, steps, model=model, optimizer=optimizer, data_state={"step": steps},
                                   sharded=True)
    return full_state(model, optimizer)


def load_and_compare(directory, expected: dict) -> dict:
    model, optimizer = sharded_tiny_model(seed=7)  # other weights: the load must replace them
    before = model.head.weight.detach().full_tensor().clone()
    manifest = checkpoint_mod.load_checkpoint(checkpoint_mod.latest_checkpoint(directory), model=model,
                                              optimizer=optimizer, seed=0)
    got = full_state(model, optimizer)
    errors = {k: float((got[k] - v).abs().max()) for k, v in expected.items()}
    # one more step from the loaded state must equal one more step from the saved one: AdamW's step count and
    # hyperparameters came back too
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    model(x).square().mean().backward()
    optimizer.step()
    return {"errors": errors, "changed": float((before - expected["param head.weight"]).abs().max()),
            "step": manifest["step"], "world_size": manifest["world_size"], "sharded": manifest["sharded"],
            "betas": optimizer.param_groups[0]["betas"], "after_step": full_state(model, optimizer)}


def one_more_step(directory) -> dict:
    model, optimizer = sharded_tiny_model(seed=7)
    checkpoint_mod.load_checkpoint(checkpoint_mod.latest_checkpoint(directory), model=model, optimizer=optimizer,
                                   seed=0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    model(x).square().mean().backward()
    optimizer.step()
    return full_state(model, optimizer)


def test_a_dcp_checkpoint_of_an_fsdp2_model_written_on_2_ranks_loads_on_4(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved = run_distributed(train_and_save, 2, ckpt, 3)[0]
    step_dir = ckpt / "step_3"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    shards = [name for name in manifest["files"] if name.startswith("state/")]
    assert "state/.metadata" in shards and len([n for n in shards if n.endswith(".distcp")]) == 2, manifest["files"]
    assert not (step_dir / "model.pt").exists()  # nothing gathered on rank 0
    loaded = run_distributed(load_and_compare, 4, ckpt, saved)
    for got in loaded:
        assert got["changed"] > 1e-3  # the fresh model really started elsewhere
        assert max(got["errors"].values()) == 0.0, got["errors"]
        assert (got["step"], got["world_size"], got["sharded"], got["betas"]) == (3, 2, True, (0.8, 0.95))
    # the step after the load, on 4 ranks, equals it on 2 ranks from the same checkpoint
    reference = run_distributed(one_more_step, 2, ckpt)[0]
    for name, value in reference.items():
        assert torch.allclose(loaded[0]["after_step"][name], value, rtol=1e-12, atol=1e-14), name


def load_outcome(directory) -> str:
    model, optimizer = sharded_tiny_model(seed=7)
    try:
        checkpoint_mod.load_checkpoint(checkpoint_mod.latest_checkpoint(directory), model=model, optimizer=optimizer,
                                       seed=0)
    except (ValueError, checkpoint_mod.CheckpointError) as err:
        return str(err)
    return "loaded"


def test_a_corrupted_shard_is_named_on_every_rank_before_loading(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_distributed(train_and_save, 2, ckpt, 1)
    shard = sorted((ckpt / "step_1" / "state").glob("*.distcp"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for message in run_distributed(load_outcome, 2, ckpt):
        assert f"{shard.name} is corrupted" in message, message


def test_a_crafted_dcp_metadata_file_is_refused_without_running_it(tmp_path):
    import pickle

    ckpt = tmp_path / "ckpt"
    run_distributed(train_and_save, 2, ckpt, 1)
    witness = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    with pytest.raises(pickle.UnpicklingError, match="open is not part of a checkpoint's metadata"):
        import io

        checkpoint_mod._MetadataUnpickler(io.BytesIO(pickle.dumps(Exploit()))).load()
    assert not witness.exists()
    # the real file passes the same unpickler
    with open(ckpt / "step_1" / "state" / ".metadata", "rb") as f:
        metadata = checkpoint_mod._MetadataUnpickler(f).load()
    assert "model.head.weight" in metadata.state_dict_metadata


# ---------------------------------------------------------------------------------------------------
# seqpar-train with the new options
# ---------------------------------------------------------------------------------------------------

BASE = ["--model", "llama-tiny", "--data", "uniform", "--tokens-per-step", "512", "--max-len", "128",
        "--strategy", "ring", "--lr", "1e-2", "--no-progress"]


def test_10_steps_on_4_ranks_equal_5_on_2_and_5_more_on_4_with_fsdp_and_checkpointing(tmp_path):
    argv = BASE + ["--fsdp", "--activation-checkpointing"]
    straight = run_distributed(run_train, 4, argv + ["--steps", "10"])[0]
    ckpt = tmp_path / "ckpt"
    first = run_distributed(run_train, 2, argv + ["--steps", "5", "--checkpoint-dir", str(ckpt)])[0]
    second = run_distributed(run_train, 4, argv + ["--steps", "10", "--checkpoint-dir", str(ckpt), "--resume"])[0]
    assert (len(first), len(second)) == (5, 5)
    assert straight[0] > straight[-1]  # it learns
    for a, b in zip(straight, first + second):
        assert abs(a - b) <= 1e-5 * abs(a), (straight, first + second)


def test_resume_drops_the_metrics_lines_after_the_checkpoint_and_the_last_step_is_saved(tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    argv = BASE + ["--no-fsdp", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--metrics", str(metrics)]
    first = run_distributed(run_train, 2, argv + ["--steps", "3"])[0]
    assert (ckpt / "latest").read_text() == "step_3"  # 3 is not a multiple of 2: saved anyway
    assert (ckpt / "step_2").is_dir()
    # as after a crash between step 3's metrics line and its checkpoint: the latest complete one is step 2
    (ckpt / "latest").write_text("step_2")
    again = run_distributed(run_train, 2, argv + ["--steps", "3", "--resume"])[0]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert abs(again[0] - first[2]) <= 1e-6 * abs(first[2]) and lines[2]["loss"] == again[0]


@pytest.mark.parametrize("argv, starts", [
    (["--dp", "0"], "--dp:"),
    (["--dp", "3"], "--dp: 3 does not divide the world size 2"),
    (["--micro-batch-tokens", "0"], "--micro-batch-tokens:"),
])
def test_bad_new_options_are_named(argv, starts):
    args = train_mod.build_parser().parse_args(BASE + argv)
    with pytest.raises(ValueError) as err:
        train_mod.validate_args(args, world_size=2)
    assert str(err.value).startswith(starts)


def test_fsdp_can_be_turned_on_and_off():
    parse = train_mod.build_parser().parse_args
    assert train_mod.resolve_fsdp(parse(BASE + ["--no-fsdp"]), world_size=4) is False
    assert train_mod.resolve_fsdp(parse(BASE + ["--fsdp"]), world_size=1) is True


def test_fsdp_is_on_by_default_on_more_than_one_rank_and_can_be_turned_off():
    parse = train_mod.build_parser().parse_args
    assert train_mod.resolve_fsdp(parse(BASE), world_size=1) is False
    assert train_mod.resolve_fsdp(parse(BASE), world_size=2) is True
    assert train_mod.resolve_fsdp(parse(BASE + ["--no-fsdp"]), world_size=4) is False
    assert train_mod.resolve_fsdp(parse(BASE + ["--fsdp"]), world_size=1) is True


def test_each_data_parallel_replica_gets_its_own_balanced_part_of_the_step():
    from seqpar.launch.data import replica_batch

    batch = [torch.full((n,), i) for i, n in enumerate([50, 10, 40, 30, 20, 5])]
    parts = [replica_batch(batch, replica=r, replicas=2) for r in range(2)]
    # every sequence exactly once, in the step's order within a replica
    seen = sorted(int(t[0]) for part in parts for t in part)
    assert seen == list(range(6))
    for part in parts:
        ids = [int(t[0]) for t in part]
        assert ids == sorted(ids)
    tokens = [sum(len(t) for t in part) for part in parts]
    assert tokens == [80, 75], tokens  # longest first onto the lighter replica: 50+20+10 / 40+30+5
    with pytest.raises(ValueError, match="--dp: the step has 1 sequences for 2 data-parallel replicas"):
        replica_batch(batch[:1], replica=0, replicas=2)


def test_data_parallel_replicas_and_micro_batches_train_the_same_steps():
    # every replica takes its own part of the same global batch and the loss is the global token mean, so the
    # (dp, sp) layout and the micro-batch split change nothing but rounding
    one_group = run_distributed(run_train, 2, BASE + ["--steps", "3"])[0]
    two_replicas = run_distributed(run_train, 4, BASE + ["--steps", "3", "--dp", "2"])[0]
    micro = run_distributed(run_train, 2, BASE + ["--steps", "3", "--micro-batch-tokens", "64"])[0]
    for a, b, c in zip(one_group, two_replicas, micro):
        assert abs(a - b) <= 1e-5 * abs(a) and abs(a - c) <= 1e-5 * abs(a), (one_group, two_replicas, micro)


def run_train_history(argv):
    args = train_mod.build_parser().parse_args(argv)
    train_mod.validate_args(args)
    return train_mod.train(args)


def test_auto_with_data_parallel_replicas_plans_each_replicas_part_a_step_ahead():
    # with --dp each replica's first rank plans that replica's part of the next step while this one trains
    # (replica_indices on the coming lengths: the part replica_batch will give it); the loss is the global token
    # mean whichever plan runs, so it equals the static --dp run's and the one-group run's
    argv = BASE[:BASE.index("--strategy")] + BASE[BASE.index("--strategy") + 2:] + ["--steps", "4", "--dp", "2"]
    auto = run_distributed(run_train_history, 4, argv + ["--strategy", "auto"], timeout=600)
    ring = run_distributed(run_train, 4, argv + ["--strategy", "ring"])[0]
    for rank, history in enumerate(auto):
        assert [h["loss"] for h in history] == pytest.approx(ring, rel=1e-5), (rank, history, ring)
        if rank in (0, 2):  # the planning rank of replica 0 and of replica 1: every step after the first
            assert [h["plans_from_ahead"] for h in history] == [0, 1, 2, 3], (rank, history)
        else:
            assert all("plans_from_ahead" not in h for h in history)


def test_replica_indices_are_the_positions_replica_batch_takes():
    from seqpar.launch.data import replica_batch, replica_indices

    lengths = [50, 10, 40, 30, 20, 5, 40]
    batch = [torch.full((n,), i) for i, n in enumerate(lengths)]
    for replicas in (1, 2, 3):
        parts = [replica_indices(lengths, replica=r, replicas=replicas) for r in range(replicas)]
        assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
        for r, part in enumerate(parts):
            assert [int(t[0]) for t in replica_batch(batch, replica=r, replicas=replicas)] == part
    # by hand at 3 replicas, longest first onto the replica with the fewest tokens (ties: the lowest)
    assert parts == [[0, 1, 5], [2, 3], [4, 6]]  # tokens 65, 70, 60
    with pytest.raises(ValueError, match="--dp: the step has 2 sequences for 3 data-parallel replicas"):
        replica_indices([5, 6], replica=0, replicas=3)
