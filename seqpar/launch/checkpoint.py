"""Checkpoints of seqpar-train: atomic, verified, locked, pickle-free, and loadable at another world size.

Layout of a ``--checkpoint-dir``::

    .lock               JSON: pid, host and start time of the job using the directory (rank 0 holds it)
    latest              the NAME of the newest complete checkpoint ("step_40"), never a path
    step_40/            one complete checkpoint
        manifest.json   format, step, world size, data position, optimizer settings, sha256 of every file
        model.pt        model state dict   } tensors, numbers and strings only: loaded with
        optim.pt        optimizer state    } ``torch.load(weights_only=True)``, which runs no code
        rng_rank{r}.pt  rank r's RNG states}
        state/          (sharded checkpoints, ``--fsdp``, instead of model.pt and optim.pt) the model and
                        optimizer tensors as ``torch.distributed.checkpoint`` writes them: every rank its shards
    step_40.tmp/        a checkpoint being written; a crash leaves it, the next start removes it
    step_40.old/        the previous step_40 while a save of the same step replaces it

Sequence parallelism shards activations, not weights: every rank holds the same model and optimizer state,
so rank 0 writes them and any world size can load them. A model sharded by FSDP2 (``sharded=True``) is saved
with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards in parallel and DCP reshards on
load, so any world size can load it too. Only tensors go through DCP (the optimizer's hyperparameters go into
``optim_settings.pt`` as plain values), and DCP's index file (``.metadata``, a pickle) is read with an unpickler
that builds only DCP's own metadata classes, so loading runs no code here either. Every file of ``state/`` has
its sha256 in the manifest like the others. The data position is global (every rank reads the same batches),
so it lives in the manifest. RNG states are per rank: a rank that has none in the checkpoint (the world changed)
is seeded with ``derived_seed(seed, step, rank)``; they never block a world-size change.

Never is the last complete checkpoint deleted before the new one is complete: a save writes ``step_N.tmp``,
fsyncs it, and renames it to ``step_N``; when ``step_N`` already exists it is first renamed to
``step_N.old`` and removed only once the new one is in place (``recover`` renames it back after a crash in
between). ``latest`` is replaced atomically after that. Only the ``keep_last`` newest checkpoints are kept.

Every wait of a save is bounded by ``seqpar.collectives.comm.default_timeout()`` (``SEQPAR_COMM_TIMEOUT_S``):
the ranks meet at the end of each stage in ``agree``, which names the stage and the rank that failed or did
not arrive, on every rank.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "DirectoryLock",
    "agree",
    "check_directory",
    "derived_seed",
    "estimated_size",
    "latest_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "recover",
    "save_checkpoint",
]

FORMAT = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
_STEP_NAME = re.compile(r"step_(\d+)")
# Point-to-point tag of the agreement messages; keeps them apart from the SP ops' streams (comm's tags are
# 11-13, token_ring's 1011-1012, the scan's 7000+).
TAG_AGREE = 9100
_MESSAGE_BYTES = 1024  # a report: a status byte and the start of the error message


class CheckpointError(RuntimeError):
    """A checkpoint save, load or agreement failed; the message names the step, the stage and the rank."""

    all_reported = False  # set by ``agree``: every rank reported back, so none can still be writing


# ---------------------------------------------------------------------------------------------------
# ranks and the bounded agreement
# ---------------------------------------------------------------------------------------------------


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _timeout_s() -> float:
    from seqpar.collectives import comm

    return comm.default_timeout().total_seconds()


def _encode(text: str, device: torch.device) -> torch.Tensor:
    data = text.encode()[: _MESSAGE_BYTES - 1]
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    buf[0] = 1 if text else 0
    if data:
        buf[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.to(device)


def _decode(buf: torch.Tensor) -> str:
    raw = bytes(buf.cpu().numpy().tobytes())
    return raw[1:].rstrip(b"\0").decode(errors="replace") if raw[0] else ""


def agree(stage: str, error: BaseException | None) -> None:
    """Meet the other ranks at the end of ``stage``; raise on every rank if any rank failed or did not arrive.

    Every rank sends its report (empty, or its error) to every other rank and waits for theirs, at most
    ``SEQPAR_COMM_TIMEOUT_S`` in all: each rank sees for itself which rank failed or never came (a coordinator
    could not pass that on: after a gloo timeout the process's connections are closed).

    Raises:
        the rank's own ``error`` if it has one (after telling the others), else
        CheckpointError: other ranks failed (their messages) or did not arrive in time (named).
            ``.all_reported`` is True when every rank reported (so nobody can still be writing).
    """
    rank, world = _rank_and_world()
    if world == 1:
        if error is not None:
            raise error
        return
    timeout = _timeout_s()
    deadline = time.monotonic() + timeout
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = "" if error is None else f"{type(error).__name__}: {error}"
    mine = str(error) if isinstance(error, CheckpointError) else mine  # its message names it already
    message = _encode(mine, device)
    peers = [r for r in range(world) if r != rank]
    buffers = {r: torch.empty(_MESSAGE_BYTES, dtype=torch.uint8, device=device) for r in peers}
    problems, reported, sends, recvs = [], [], [], {}
    if dist.get_backend() == "nccl":  # nccl wants the pairs' sends and receives posted together
        ops = [dist.P2POp(dist.isend, message, r, tag=TAG_AGREE) for r in peers]
        ops += [dist.P2POp(dist.irecv, buffers[r], r, tag=TAG_AGREE) for r in peers]
        works = dist.batch_isend_irecv(ops)
        sends, recvs = works[: len(peers)], dict(zip(peers, works[len(peers):]))
    else:  # gloo: batch_isend_irecv can hang; individual posts do not
        for r in peers:
            try:
                sends.append(dist.isend(message, dst=r, tag=TAG_AGREE))
                recvs[r] = dist.irecv(buffers[r], src=r, tag=TAG_AGREE)
            except RuntimeError as err:  # a dead peer's connection fails at once
                problems.append(f"rank {r} did not arrive (gone: {err})")
    for r, work in recvs.items():
        try:
            work.wait(datetime.timedelta(seconds=max(0.01, deadline - time.monotonic())))
        except RuntimeError as err:  # gloo reports both a timeout and a dead peer as RuntimeError
            problems.append(f"rank {r} did not arrive within {timeout:g} s (stopped, dead or slow; "
                            f"SEQPAR_COMM_TIMEOUT_S={timeout:g}): {err}")
            continue
        reported.append(r)
        if text := _decode(buffers[r]):
            problems.append(f"rank {r} failed: {text}")
    for work in sends:
        try:
            work.wait(datetime.timedelta(seconds=max(0.01, deadline - time.monotonic())))
        except RuntimeError:
            pass  # that peer is gone or stuck: its receive was reported above
    if error is not None:
        raise error
    if problems:
        failure = CheckpointError(f"seqpar-train: {stage}: {'; '.join(problems)}")
        failure.all_reported = len(reported) == len(peers)
        raise failure


# ---------------------------------------------------------------------------------------------------
# the directory: checks at start, the lock, recovery after a crash
# ---------------------------------------------------------------------------------------------------


def _os_error_text(err: OSError) -> str:
    """Name the common causes plainly (the raw messages of a full or read-only disk are easy to misread)."""
    names = {errno.ENOSPC: "disk full (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
             errno.EROFS: "read-only file system (EROFS)", errno.EACCES: "permission denied (EACCES)",
             errno.EPERM: "operation not permitted (EPERM)", errno.ENOTDIR: "a path component is not a directory"}
    cause = names.get(err.errno, err.strerror or str(err))
    return f"{cause}: {err.filename}" if err.filename else cause


def estimated_size(model: torch.nn.Module, optimizer_states_per_param: int = 2) -> int:
    """Bytes of one checkpoint: the weights plus (AdamW) two moments per weight, plus 1 MiB of small files."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights * (1 + optimizer_states_per_param) + 2**20


def check_directory(directory: Path, *, needed_bytes: int) -> None:
    """Check at start that ``directory`` is (or can be made) a writable directory with room for a checkpoint.
    Every rank runs it before any collective, so a bad ``--checkpoint-dir`` fails everywhere before training.

    Raises:
        ValueError: it is a file or lies under one, cannot be created or written (read-only, no permission,
            disk full: named as such), or has less than ``needed_bytes`` free.
    """
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--checkpoint-dir: {directory} exists and is not a directory; pass a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{socket.gethostname()}-{os.getpid()}"
        _write_probe(probe)
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--checkpoint-dir: {directory} is not writable: {_os_error_text(err)}; "
                         "pass a writable directory with free space") from err
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise ValueError(f"--checkpoint-dir: {directory} has {free / 2**20:.0f} MiB free, but one checkpoint of "
                         f"this model needs about {needed_bytes / 2**20:.0f} MiB; free space or use another directory")


def _write_probe(path: Path) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryLock:
    """An exclusive lock on a checkpoint directory: the file ``.lock`` created with ``O_CREAT | O_EXCL``, holding
    the pid, host and start time of its holder. A lock whose holder pid no longer runs on this host is stale
    (a crashed job) and is taken over; a lock held by a live process, or by another host, is refused."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.held = False

    def acquire(self) -> DirectoryLock:
        """Take the lock.

        Raises:
            ValueError: another job holds it (its pid, host and start time are named).
        """
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_stale(holder) and self._take_over(holder):
                    continue
                raise ValueError(
                    f"--checkpoint-dir: {self.directory} is in use by another seqpar-train job (lock {self.path}: "
                    f"{holder or 'unreadable'}); wait for it to end or pass another directory. If no such job "
                    f"runs, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise ValueError(f"--checkpoint-dir: could not take the lock {self.path} (another job raced for it)")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another host's pid cannot be checked from here
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # it exists, owned by someone else
        return False

    def _take_over(self, stale: dict) -> bool:
        """Move the stale lock aside (atomic), and put it back if a racing job replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it: try to create ours
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != stale:  # we moved a fresh lock of a racing job: give it back
            os.replace(aside, self.path)
            return False
        aside.unlink(missing_ok=True)
        return True


def _step_of(path: Path) -> int | None:
    match = _STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def recover(directory: Path) -> list[str]:
    """After a crash (rank 0, holding the lock): put back a ``step_N.old`` whose replacement never completed,
    remove ``step_N.old`` that was replaced and partial ``step_N.tmp``. Returns what it did (for the log)."""
    done = []
    for aside in sorted(directory.glob("step_*.old")):
        final = aside.with_suffix("")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
            done.append(f"restored {final.name} (its replacement did not complete)")
    for tmp in sorted(directory.glob("step_*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the partial {tmp.name}")
    (directory / "latest.tmp").unlink(missing_ok=True)
    return done


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``directory/latest`` names, or None when there is none yet.

    ``latest`` holds a name (``step_N``), never a path, and the checkpoint must resolve inside ``directory``.

    Raises:
        ValueError: ``latest`` is not a plain file naming an existing ``step_N`` directory inside ``directory``.
    """
    pointer = directory / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise ValueError(f"--resume: {pointer} must be a plain file holding a checkpoint name such as step_20")
    name = pointer.read_text().strip()
    if _STEP_NAME.fullmatch(name) is None:
        raise ValueError(f"--resume: {pointer} names {name[:80]!r}, which is not a checkpoint name (step_N in "
                         f"{directory}); write the name of a complete checkpoint into it")
    path = directory / name
    if path.resolve().parent != directory.resolve():
        raise ValueError(f"--resume: {path} resolves outside {directory} ({path.resolve()}); a checkpoint must "
                         "live in its directory")
    if not path.is_dir():
        raise ValueError(f"--resume: {pointer} names {name}, but {path} is missing; write the name of a complete "
                         "checkpoint into it")
    return path


# ---------------------------------------------------------------------------------------------------
# files: writing with fsync, checksums
# ---------------------------------------------------------------------------------------------------


def _save_file(obj: object, path: Path) -> None:
    """torch.save ``obj`` (tensors, numbers, strings: nothing that needs code to load) and fsync it."""
    with open(path, "xb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _files_of(directory: Path) -> list[Path]:
    """Every file under ``directory`` (a DCP ``state/`` holds several), sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_of(manifest: dict) -> str:
    """sha256 of the manifest's content (the step and data position in it must not change unnoticed either)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "x") as f:
        json.dump({**obj, "sha256": _digest_of(obj)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint ``path``.

    Raises:
        ValueError: it is missing (e.g. a checkpoint of an older seqpar-train, which stored pickles: not loaded),
            unreadable, or not of this format.
    """
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"--resume: {path} has no {MANIFEST}: it is not a complete checkpoint of this seqpar-train "
                         "version (older versions stored pickled extras, which are not loaded); start a fresh "
                         "--checkpoint-dir")
    try:
        manifest = json.loads(file.read_text())
        intact = manifest.pop("sha256") == _digest_of(manifest)
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("files"), dict)
        int(manifest["step"]), int(manifest["world_size"]), dict(manifest["data"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--resume: {file} is unreadable or corrupted ({err}); resume from an earlier checkpoint "
                         f"by writing its name into {path.parent / 'latest'}") from err
    if not intact:
        raise ValueError(f"--resume: {file} is corrupted (its sha256 does not match its content); resume from an "
                         f"earlier checkpoint by writing its name into {path.parent / 'latest'}")
    if not ok:
        raise ValueError(f"--resume: {file} is not a format-{FORMAT} seqpar-train manifest")
    return manifest


def _verified(path: Path, name: str, manifest: dict) -> Path:
    """``path/name`` after checking its sha256 against the manifest.

    Raises:
        ValueError: the file is not in the manifest, missing, or its bytes changed (names the file).
    """
    file, expected = path / name, manifest["files"].get(name)
    if expected is None or not file.is_file():
        raise ValueError(f"--resume: {file} is missing from the checkpoint; resume from an earlier one by writing "
                         f"its name into {path.parent / 'latest'}")
    actual = _sha256(file)
    if actual != expected:
        raise ValueError(f"--resume: {file} is corrupted (sha256 {actual[:16]}..., the manifest says "
                         f"{expected[:16]}...); resume from an earlier checkpoint by writing its name into "
                         f"{path.parent / 'latest'}")
    return file


def _load(file: Path) -> object:
    # weights_only: the restricted unpickler builds tensors and plain containers only, so a crafted file cannot
    # run code; it raises on anything else.
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler raises several types
        raise ValueError(f"--resume: {file} does not load as plain tensors and numbers ({type(err).__name__}: "
                         f"{str(err)[:300]}); it is not a seqpar-train checkpoint file") from err


# ---------------------------------------------------------------------------------------------------
# save and load
# ---------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def write_rank_state(tmp: Path, rank: int, step: int) -> None:
    """Write this rank's RNG states into the checkpoint being written (tests hook here to stop a rank mid-save)."""
    _save_file(_rng_state(), tmp / f"rng_rank{rank}.pt")


def save_checkpoint(directory: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    data_state: dict, keep_last: int = 3, sharded: bool = False) -> Path:
    """Save step ``step`` as ``directory/step_{step}`` (every rank calls it); returns that path.

    Stages, each ended by ``agree``: prepare (every rank checks its weights are finite, rank 0 makes
    ``step_N.tmp``), write (rank 0 the model and optimizer, or with ``sharded`` every rank its shards through
    ``torch.distributed.checkpoint``; every rank its RNG state; fsynced), publish (rank 0: manifest with sha256
    of every file, renames, ``latest``, pruning to the ``keep_last`` newest; 0 keeps all).

    ``sharded``: the model's parameters are FSDP2 DTensors (``fully_shard``); see the module docstring.

    Raises:
        CheckpointError: a stage failed on some rank (named, with its cause: "disk full (ENOSPC)" and the like)
            or a rank did not arrive within the timeout. When every rank reported, the partial ``step_N.tmp``
            is removed; the previous checkpoint and ``latest`` are untouched in every case.
    """
    rank, world = _rank_and_world()
    final, tmp = directory / f"step_{step}", directory / f"step_{step}.tmp"
    where = f"checkpoint step {step}"

    def stage(name: str, work) -> None:
        error = None
        try:
            work()
        except OSError as err:
            error = CheckpointError(f"seqpar-train: {where}: {name} on rank {rank}: {_os_error_text(err)}")
            error.__cause__ = err
        except Exception as err:  # noqa: BLE001 -- reported to every rank, then raised here
            error = err
        try:
            agree(f"{where}: {name}", error)
        except BaseException as failure:
            if rank == 0 and tmp.exists() and (error is not None or getattr(failure, "all_reported", False)):
                shutil.rmtree(tmp, ignore_errors=True)  # every rank reported: nobody writes there any more
                if isinstance(failure, CheckpointError):
                    failure.args = (f"{failure.args[0]}; removed the partial {tmp}",)
            raise

    def prepare() -> None:
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        if bad:
            raise CheckpointError(f"seqpar-train: {where}: refusing to save non-finite weights ({', '.join(bad[:3])}"
                                  f"{'...' if len(bad) > 3 else ''})")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> None:
        if sharded:
            tensors, settings = _sharded_state(model, optimizer)
            _save_sharded(tensors, tmp / SHARDED_STATE)
            if rank == 0:
                _save_file(settings, tmp / "optim_settings.pt")
        elif rank == 0:
            _save_file(model.state_dict(), tmp / "model.pt")
            _save_file(optimizer.state_dict(), tmp / "optim.pt")
        write_rank_state(tmp, rank, step)

    def publish() -> None:
        if rank != 0:
            return
        manifest = {
            "format": FORMAT, "step": step, "world_size": world, "data": data_state,
            "optimizer": _optimizer_settings(optimizer),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sharded": sharded,
            "files": {f.relative_to(tmp).as_posix(): _sha256(f) for f in _files_of(tmp)},
        }
        _write_json(tmp / MANIFEST, manifest)
        if sharded:
            _fsync_dir(tmp / SHARDED_STATE)
        _fsync_dir(tmp)
        aside = final.with_name(final.name + ".old")
        if final.exists():  # replacing the same step: the complete old one stays until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except OSError:
            if aside.exists() and not final.exists():
                os.replace(aside, final)
            raise
        pointer = directory / "latest.tmp"
        pointer.unlink(missing_ok=True)
        with open(pointer, "x") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, directory / "latest")
        _fsync_dir(directory)
        shutil.rmtree(aside, ignore_errors=True)
        if keep_last:
            _prune(directory, keep_last, keep=final)

    stage("prepare", prepare)
    stage("write", write)
    stage("publish", publish)
    return final


def _prune(directory: Path, keep_last: int, *, keep: Path) -> None:
    complete = sorted((p for p in directory.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
    for old in complete[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _optimizer_settings(optimizer: torch.optim.Optimizer) -> dict:
    group = optimizer.param_groups[0]
    return {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None)))}


# ---------------------------------------------------------------------------------------------------
# sharded state (FSDP2 + torch.distributed.checkpoint)
# ---------------------------------------------------------------------------------------------------

SHARDED_STATE = "state"


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(tensors, settings)``: every tensor of the model and optimizer state (DTensor shards, keyed by
    parameter name, so any world size can load them), and the optimizer's non-tensor entries (hyperparameters
    per parameter: lr, betas, ...), which are saved as plain values beside them (DCP would pickle them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"optim.{k}": v for k, v in optim_state.items() if isinstance(v, torch.Tensor)})
    settings = {k: v for k, v in optim_state.items() if not isinstance(v, torch.Tensor)}
    return tensors, settings


def _save_sharded(tensors: dict, path: Path) -> None:
    """``torch.distributed.checkpoint.save`` (a collective: every rank writes its shards; fsynced)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(path, sync_files=True))


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (dataclasses of names, shapes, offsets, dtypes) and nothing else: any other global
    the file names, a function above all, is refused, so a crafted ``.metadata`` cannot run code."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                        "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem  # noqa: F401 -- the modules the names live in
        import torch.distributed.checkpoint.metadata  # noqa: F401

        if "." not in name:
            if module in self._ALLOWED_MODULES:
                found = getattr(sys.modules[module], name, None)
                if isinstance(found, type) and found.__module__ == module and not issubclass(found, BaseException):
                    return found
            if module == "torch" and isinstance(getattr(torch, name, None),
                                                (torch.dtype, torch.layout, torch.memory_format)):
                return getattr(torch, name)
            # torch.serialization._get_layout only looks a torch.layout up by its name
            if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                  ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}:
                return getattr(sys.modules.get(module) or __import__(module), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a checkpoint's metadata")


def _safe_reader(path: Path):
    """A DCP ``FileSystemReader`` whose ``.metadata`` is read with ``_MetadataUnpickler``. Only tensors are
    stored (``_sharded_state``), so DCP's other unpickling path (non-tensor values) is never taken."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _load_sharded(path: Path, manifest: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Verify every file of the sharded state on every rank, agree, then load it (a collective: DCP reads the
    pieces this rank's shards need, whatever world size wrote them).

    Raises:
        ValueError: a file of the state is missing or corrupted (on every rank: named by the rank that found
            it), or the state does not fit this model/optimizer.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    error = None
    try:
        names = [n for n in manifest["files"] if n.startswith(f"{SHARDED_STATE}/")]
        if not any(n.endswith("/.metadata") for n in names):
            raise ValueError(f"--resume: {path / SHARDED_STATE} has no .metadata in the manifest; it is not a "
                             "complete sharded checkpoint")
        for name in names:  # every rank may read any file after resharding, so every rank checks them all
            _verified(path, name, manifest)
        settings = _load(_verified(path, "optim_settings.pt", manifest))
    except ValueError as err:
        error = err
    agree(f"resume from {path}: verify the sharded state", error)
    tensors, current_settings = _sharded_state(model, optimizer)
    try:
        dcp.load(tensors, storage_reader=_safe_reader(path / SHARDED_STATE))
    except Exception as err:  # DCP wraps a rank's failure in CheckpointException on every rank
        raise ValueError(f"--resume: {path} does not fit this model/optimizer ({str(err)[:300]}); resume with the "
                         "--model it was written with") from err
    # JSON-like values come back as saved; tuples (betas) were stored as tuples by torch.save
    optim_state = {**current_settings, **settings}
    optim_state.update({k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")})
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(flatten_optimizer_state_dict=True))


def derived_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a rank that has no RNG state in the checkpoint (the world grew): a function of the run's seed,
    the step and the rank only, so a rerun gets the same."""
    return (seed * 1_000_003 + step * 8_191 + rank) % 2**63


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> dict:
    """Load checkpoint ``path`` (every rank) and return its manifest.

    Every file is checked against the manifest's sha256 and loaded with ``weights_only=True``. The checkpoint may
    come from another world size: weights, optimizer and data position are global (a sharded checkpoint is
    resharded by DCP: a collective, entered only after every rank verified the files); a rank without an RNG
    state in it gets ``derived_seed(seed, step, rank)``. A sharded checkpoint loads into an FSDP2-sharded model,
    a replicated one into a replicated model.

    Raises:
        ValueError: no manifest, a missing or corrupted file (named), or a file that is not plain tensors.
    """
    rank, _ = _rank_and_world()
    manifest = read_manifest(path)
    if manifest.get("sharded", False):
        _load_sharded(path, manifest, model, optimizer)
    else:
        model_state = _load(_verified(path, "model.pt", manifest))
        optim_state = _load(_verified(path, "optim.pt", manifest))
        try:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"--resume: {path} does not fit this model/optimizer ({str(err)[:300]}); resume with "
                             "the --model it was written with") from err
    rng_name = f"rng_rank{rank}.pt"
    if rng_name in manifest["files"]:
        rng = _load(_verified(path, rng_name, manifest))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        torch.manual_seed(derived_seed(seed, int(manifest["step"]), rank))
    return manifest
