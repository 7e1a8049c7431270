"""bench/gpu_check.py without a GPU: its ``--plan`` (the stages a lent device runs, their time boxes and expected
wall times, which must fit the device's 15 minutes with start-up) and its results file, which must hold every
result emitted so far whenever a run is cut."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
STAGES = ["correctness", "speed", "sp_ops", "train_smoke"]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plan_lists_the_four_stages_with_boxes_and_expected_times_under_12_minutes():
    run = subprocess.run([sys.executable, str(SCRIPT), "--plan"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^(\w+)\s+(\d+)s\s+(\d+)s\s+(.+)$", run.stdout, flags=re.M)
    stages = [(name, int(box), int(expected)) for name, box, expected, _ in rows if name != "total"]
    assert [s[0] for s in stages] == STAGES, run.stdout
    total = [(int(box), int(expected)) for name, box, expected, _ in rows if name == "total"]
    assert total == [(sum(s[1] for s in stages), sum(s[2] for s in stages))], run.stdout
    box_total, expected_total = total[0]
    assert expected_total < 12 * 60 and box_total <= 12 * 60, run.stdout
    assert all(0 < expected <= box for _, box, expected in stages), stages
    assert "--fsdp --activation-checkpointing" in run.stdout and "NCCL" in run.stdout


def test_plan_in_the_readme_is_the_scripts_plan():
    plan = subprocess.run([sys.executable, str(SCRIPT), "--plan"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120).stdout.strip()
    assert plan and plan in (ROOT / "README.md").read_text(), "README's gpu_check section: paste `--plan` output"


def test_without_cuda_a_run_writes_nothing_and_says_why(tmp_path):
    results = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0 and "no CUDA device" in run.stdout, run.stdout + run.stderr
    assert not results.exists()


def test_results_file_holds_everything_emitted_so_far(tmp_path):
    """What a run cut off mid-stage leaves: the JSON has every result up to the last emitted event."""
    gpu_check = _load_script()
    log = gpu_check.EventLog(tmp_path / "gpu_check.json")
    log.events.write_text("")
    log.emit({"type": "stage", "stage": "correctness", "status": "running", "box_s": 240})
    log.emit({"type": "check", "result": {"name": "attention triton S=4096", "errors": {"out": 1e-3}, "pass": True}})
    log.emit({"type": "timing", "result": {"kind": "attention", "provider": "triton", "S": 4096, "ms": 1.5}})
    first = json.loads((tmp_path / "gpu_check.json").read_text())
    assert first["stages"] == {"correctness": {"stage": "correctness", "status": "running", "box_s": 240}}
    assert [c["name"] for c in first["checks"]] == ["attention triton S=4096"]
    assert first["timings"][0]["ms"] == 1.5
    log.emit({"type": "stage", "stage": "correctness", "status": "cut at its 240 s box", "elapsed_s": 240.0})
    log.emit({"type": "train_smoke", "result": {"pass": False, "steps": 2}})
    cut = json.loads((tmp_path / "gpu_check.json").read_text())
    assert cut["stages"]["correctness"]["status"] == "cut at its 240 s box"
    assert cut["checks"] == first["checks"] and cut["train_smoke"] == {"pass": False, "steps": 2}
