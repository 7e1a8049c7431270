"""Peak extra memory of ``SPModel.sync_gradients``: bounded buckets against the former one flat copy.

    python bench/grad_sync_memory.py [--model-mib 1024] [--bucket-mib 25]

Two gloo ranks each hold a ~1 GiB fp32 model (a stack of 4 MiB Linear layers behind one SDPA attention block)
with its gradients filled in, and sum the gradients over the ranks twice: with the former implementation (one
``torch.cat`` of every gradient per dtype, reduced, copied back) and with today's bucketed ``sync_gradients``.
Extra memory is measured two ways, both allocator-level (tracemalloc does not see torch's allocations):

* ``peak_new_tensor_mib``: a ``TorchDispatchMode`` records every storage the call allocates and its release, and
  reports the largest total alive at once;
* ``rss_peak_mib``: the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
  before the call) minus its resident size before the call.

The ranks start with glibc's ``MALLOC_MMAP_THRESHOLD_`` pinned at 1 MiB, so every freed bucket goes back to the
OS at once and the RSS peak is the live memory. (With glibc's default, dynamic threshold, freed 24 MiB buckets
stay in the heap for reuse and the bucketed run's RSS peak reads ~220 MiB: cached, not live; the tensor count
is unaffected.) Both ranks check that the result is the sum. Runtime: well under a minute. Writes
bench/results/grad_sync_memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_ranks, save_results  # noqa: E402

MIB = 2**20


class NewStorageHighWater(TorchDispatchMode):
    """Largest total size of the storages allocated inside the block that were alive at the same time."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.seen = set(existing)
        self.alive = 0
        self.peak = 0

    def _released(self, nbytes: int) -> None:
        self.alive -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen and storage.nbytes():
                    self.seen.add(storage.data_ptr())
                    self.alive += storage.nbytes()
                    self.peak = max(self.peak, self.alive)
                    weakref.finalize(t, self._released, storage.nbytes())
        return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(call, model: torch.nn.Module) -> dict:
    existing = {p.untyped_storage().data_ptr() for p in model.parameters()}
    existing |= {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size
        f.write("5")
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    with NewStorageHighWater(existing) as mode:
        call()
    elapsed = time.perf_counter() - start
    return {"peak_new_tensor_mib": mode.peak / MIB, "rss_peak_mib": (_status_kib("VmHWM") - rss_before) / 1024,
            "seconds": elapsed}


def flat_copy_sync(model: torch.nn.Module) -> None:
    """The former ``sync_gradients``: every gradient of a dtype concatenated into one buffer, reduced, copied back."""
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


class BigModel(torch.nn.Module):
    """One SDPA attention block (so ``parallelize`` accepts it) and a stack of square Linear layers."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 64)
        self.qkv = torch.nn.Linear(64, 3 * 64)
        self.stack = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))

    def forward(self, input_ids, position_ids=None):
        q, k, v = self.qkv(self.embed(input_ids)).view(*input_ids.shape, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum(1)


def run(model_mib: int, bucket_mib: int, width: int) -> dict:
    import seqpar

    torch.manual_seed(0)
    layers = max(1, round(model_mib * MIB / (width * width * 4)))
    with torch.device("meta"):
        model = BigModel(width, layers)
    model = model.to_empty(device="cpu")
    sp_model = seqpar.parallelize(model, strategy="ring", verify_model=False, grad_bucket_bytes=bucket_mib * MIB)
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = sum(r + 1 for r in range(world))
    results = {"model_mib": sum(p.numel() * 4 for p in model.parameters()) / MIB, "bucket_mib": bucket_mib}
    for name, call in (("flat copy (before)", lambda: flat_copy_sync(model)),
                       ("bucketed sync_gradients", sp_model.sync_gradients)):
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.fill_(rank + 1.0)
        results[name] = measure(call, model)
        results[name]["sum_correct"] = all(bool((p.grad == expected).all()) for p in model.parameters())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mib", type=int, default=1024)
    parser.add_argument("--bucket-mib", type=int, default=25)
    parser.add_argument("--width", type=int, default=1024,
                        help="Linear layers are width x width: 1024 gives 4 MiB gradients, ~6 to a 25 MiB bucket "
                             "(a gradient larger than a bucket is reduced in place, without a copy)")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MIB)  # read by glibc when the rank processes start
    per_rank = run_ranks(run, 2, args.model_mib, args.bucket_mib, args.width)
    rows = []
    for name in ("flat copy (before)", "bucketed sync_gradients"):
        worst = {k: max(r[name][k] for r in per_rank) for k in ("peak_new_tensor_mib", "rss_peak_mib", "seconds")}
        rows.append({"method": name, "model MiB": per_rank[0]["model_mib"], "bucket MiB": per_rank[0]["bucket_mib"],
                     "layer MiB": args.width**2 * 4 / MIB,
                     "peak new tensors MiB": worst["peak_new_tensor_mib"], "RSS peak MiB": worst["rss_peak_mib"],
                     "seconds": worst["seconds"], "sum correct": all(r[name]["sum_correct"] for r in per_rank)})
    print_table(rows, list(rows[0]))
    path = save_results("grad_sync_memory", {"world_size": 2, "dtype": "float32", "malloc_mmap_threshold": MIB,
                                             "rows": rows,
                                             "per_rank": per_rank})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
