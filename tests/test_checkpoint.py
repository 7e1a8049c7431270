"""seqpar.launch.checkpoint on one process: atomic replacement, checksums, no code run on load, the lock,
``latest`` confined to its directory, pruning, a full or read-only disk, the start-up directory checks."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from seqpar.launch import checkpoint as ckpt


def make_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(directory, step, seed=0, **kwargs):
    model, optimizer = make_model(seed)
    ckpt.save_checkpoint(directory, step, model=model, optimizer=optimizer, data_state={"step": step}, **kwargs)
    return model


def loaded_weight(path):
    model, optimizer = make_model(99)
    manifest = ckpt.load_checkpoint(path, model=model, optimizer=optimizer, seed=0)
    return model.weight.detach().clone(), manifest


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class Crash(BaseException):
    """Stands for the process dying: no ``except Exception`` handler sees it."""


def test_resaving_a_step_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    old = save(tmp_path, 2, seed=1)
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if str(src).endswith("step_2.tmp"):
            raise Crash()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    with pytest.raises(Crash):
        save(tmp_path, 2, seed=2)
    monkeypatch.setattr(os, "replace", real_replace)
    # the crash came between moving the complete old step_2 aside and putting the new one in place
    assert not (tmp_path / "step_2").exists() and (tmp_path / "step_2.old" / "manifest.json").is_file()
    assert ckpt.recover(tmp_path) == ["restored step_2 (its replacement did not complete)",
                                      "removed the partial step_2.tmp"]
    weight, _ = loaded_weight(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(weight, old.weight)
    new = save(tmp_path, 2, seed=2)
    weight, _ = loaded_weight(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(weight, new.weight) and not torch.equal(weight, old.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2"]


def test_a_failed_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    old = save(tmp_path, 2, seed=1)
    real_replace = os.replace

    def failing(src, dst):
        if str(src).endswith("step_2.tmp"):
            raise OSError(errno.EIO, "I/O error", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint step 2: publish on rank 0"):
        save(tmp_path, 2, seed=2)
    monkeypatch.setattr(os, "replace", real_replace)
    weight, _ = loaded_weight(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(weight, old.weight)


def test_a_corrupted_file_is_named_on_load(tmp_path):
    save(tmp_path, 3)
    model_file = tmp_path / "step_3" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    model_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"step_3/model.pt is corrupted \(sha256"):
        loaded_weight(tmp_path / "step_3")


def test_a_changed_manifest_is_refused(tmp_path):
    save(tmp_path, 3)
    manifest_file = tmp_path / "step_3" / "manifest.json"
    manifest_file.write_text(manifest_file.read_text().replace('"step": 3', '"step": 8'))  # e.g. a flipped digit
    with pytest.raises(ValueError, match="manifest.json is corrupted"):
        loaded_weight(tmp_path / "step_3")


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    save(tmp_path, 1)
    marker = tmp_path / "pwned"
    path = tmp_path / "step_1"
    (path / "optim.pt").unlink()
    torch.save({"state": RunsACommand(f"touch {marker}")}, path / "optim.pt")
    manifest = json.loads((path / "manifest.json").read_text())  # the attacker rewrites the checksums too
    del manifest["sha256"]
    manifest["files"]["optim.pt"] = ckpt._sha256(path / "optim.pt")
    (path / "manifest.json").unlink()
    ckpt._write_json(path / "manifest.json", manifest)
    with pytest.raises(ValueError, match="optim.pt does not load as plain tensors"):
        loaded_weight(path)
    assert not marker.exists()


def test_an_old_pickled_checkpoint_is_not_loaded(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "step_5").mkdir()
    torch.save({"rng": RunsACommand(f"touch {marker}")}, tmp_path / "step_5" / "extra_rank0.pt")
    (tmp_path / "latest").write_text("step_5")
    with pytest.raises(ValueError, match="has no manifest.json"):
        loaded_weight(ckpt.latest_checkpoint(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside", "/tmp", "step_1/../../outside", "", "step_1/model.pt"])
def test_latest_holds_a_name_inside_its_directory(tmp_path, name):
    save(tmp_path / "ckpt", 1)
    (tmp_path / "ckpt" / "latest").write_text(name)
    with pytest.raises(ValueError, match="not a checkpoint name"):
        ckpt.latest_checkpoint(tmp_path / "ckpt")


def test_a_checkpoint_linked_from_outside_is_refused(tmp_path):
    save(tmp_path / "elsewhere", 7)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step_7").symlink_to(tmp_path / "elsewhere" / "step_7")
    (tmp_path / "ckpt" / "latest").write_text("step_7")
    with pytest.raises(ValueError, match="resolves outside"):
        ckpt.latest_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "latest").unlink()
    (tmp_path / "ckpt" / "latest").symlink_to(tmp_path / "elsewhere" / "latest")
    with pytest.raises(ValueError, match="must be a plain file"):
        ckpt.latest_checkpoint(tmp_path / "ckpt")


def test_only_the_newest_k_are_kept(tmp_path):
    for step in range(1, 5):
        save(tmp_path / "two", step, keep_last=2)
        save(tmp_path / "all", step, keep_last=0)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["latest", "step_3", "step_4"]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["latest", "step_1", "step_2", "step_3", "step_4"]
    assert (tmp_path / "two" / "latest").read_text() == "step_4"


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    before = snapshot(tmp_path)
    real_save_file = ckpt._save_file

    def full_disk(obj, path):
        if path.name == "optim.pt":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save_file(obj, path)

    monkeypatch.setattr(ckpt, "_save_file", full_disk)
    with pytest.raises(ckpt.CheckpointError) as info:
        save(tmp_path, 2)
    message = str(info.value)
    assert "checkpoint step 2: write on rank 0: disk full (ENOSPC)" in message and "optim.pt" in message
    assert "removed the partial" in message
    assert not (tmp_path / "step_2.tmp").exists() and snapshot(tmp_path) == before


def test_the_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = ckpt.DirectoryLock(tmp_path).acquire()
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    with pytest.raises(ValueError, match=rf"in use by another seqpar-train job .*'pid': {os.getpid()}"):
        ckpt.DirectoryLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00+00:00"}))
    lock = ckpt.DirectoryLock(tmp_path).acquire()  # the holder is gone: stale
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()

    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "another-host", "started": "x"}))
    with pytest.raises(ValueError, match="another-host"):  # another host's pid cannot be checked: refused
        ckpt.DirectoryLock(tmp_path).acquire()


def test_the_directory_is_checked_at_start(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--checkpoint-dir: .* exists and is not a directory"):
        ckpt.check_directory(a_file, needed_bytes=1)
    with pytest.raises(ValueError, match="--checkpoint-dir: .* is not writable: a path component is not a directory"):
        ckpt.check_directory(a_file / "ckpt", needed_bytes=1)
    with pytest.raises(ValueError, match="has .* MiB free, but one checkpoint of this model needs about"):
        ckpt.check_directory(tmp_path / "big", needed_bytes=shutil.disk_usage(tmp_path).free + 2**40)
    for code, named in ((errno.EROFS, "read-only file system"), (errno.ENOSPC, "disk full")):
        # root ignores chmod, so a read-only or full disk is simulated at the probe write
        def refuse(path, code=code):
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(ckpt, "_write_probe", refuse)
        with pytest.raises(ValueError, match=f"--checkpoint-dir: .* is not writable: {named}"):
            ckpt.check_directory(tmp_path / "ro", needed_bytes=1)
    monkeypatch.undo()
    ckpt.check_directory(tmp_path / "fine" / "nested", needed_bytes=1)
    assert list((tmp_path / "fine" / "nested").iterdir()) == []  # the probe is removed


def test_a_rank_without_a_saved_rng_state_gets_the_derived_seed(tmp_path):
    save(tmp_path, 3)
    (tmp_path / "step_3" / "rng_rank0.pt").unlink()
    manifest = json.loads((tmp_path / "step_3" / "manifest.json").read_text())
    del manifest["files"]["rng_rank0.pt"], manifest["sha256"]  # as if rank 0 had not been in the writing world
    (tmp_path / "step_3" / "manifest.json").unlink()
    ckpt._write_json(tmp_path / "step_3" / "manifest.json", manifest)
    loaded_weight(tmp_path / "step_3")
    after_load = torch.rand(3)
    torch.manual_seed(ckpt.derived_seed(0, 3, 0))
    assert torch.equal(after_load, torch.rand(3))
