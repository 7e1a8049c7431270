"""seqpar-train under torchrun on 2 "nodes" of 2 ranks: two torchrun agents on this machine meeting through a c10d
rendezvous, as on a cluster. The node size comes from the launcher (LOCAL_WORLD_SIZE) and reaches the planner,
whose SP groups then never straddle a node boundary unless made of whole nodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_two_ranks_train_3_steps_with_node_aligned_auto_plans(tmp_path):
    metrics, port = tmp_path / "m.jsonl", free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"seqpar-{port}",
               "-m", "seqpar.launch.train", "--model", "llama-tiny", "--data", "longtail", "--tokens-per-step", "2048",
               "--max-len", "1024", "--steps", "3", "--strategy", "auto", "--no-progress", "--metrics", str(metrics)]
    env = dict(os.environ, PYTHONPATH=str(REPO), SEQPAR_COMM_TIMEOUT_S="120", OMP_NUM_THREADS="1")
    agents = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=float(os.environ.get("SEQPAR_TEST_TIMEOUT_S", "300")))[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum(log.count("seqpar-train summary") for log in logs) == 1  # rank 0 only
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]
    for r in records:
        assert r["ranks_per_node"] == 2, r  # from torchrun's LOCAL_WORLD_SIZE, not the world size
        assert sorted(rank for group in r["plan_ranks"] for rank in group) == [0, 1, 2, 3]
        for group in r["plan_ranks"]:
            nodes = {rank // 2 for rank in group}
            assert len(nodes) == 1 or set(group) == {rank for n in nodes for rank in (2 * n, 2 * n + 1)}, group


def test_the_node_size_reaches_the_cost_model(monkeypatch):
    from seqpar.launch import train as train_mod

    model = train_mod.build_model("llama-tiny", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    options = train_mod.cost_model_options(model, strategy="auto", world_size=8)
    assert options["cost_model"].cluster.gpus_per_node == 2 and options["cost_model"].cluster.world_size == 8
    assert train_mod.cost_model_options(model, strategy="ring", world_size=8) == {}  # nothing to plan
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train_mod.cost_model_options(model, strategy="auto", world_size=8) == {}  # one node: the default
