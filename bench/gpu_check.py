"""The one prepared device check of seqpar: what a lent GPU runs, in time-boxed stages, writing as it goes.

    python bench/gpu_check.py --plan                      # the stages, their time boxes and expected wall times
    python bench/gpu_check.py [--quick] [--stages a,b]    # on a CUDA machine (written for one H200)
    python bench/gpu_check.py --compile-only [--quick]    # any machine, no GPU needed

A lent device has 15 minutes in all, start-up included. Each stage runs in its own process under a hard time
box (a stage that overruns is killed and the run moves on to the next) and stops starting new items itself a
little before the box. Every result is appended, as it is measured, to bench/results/gpu_check.events.jsonl and
folded into bench/results/gpu_check.json, so a run that is cut off still returns what it measured.

Stages (``STAGES``; ``--plan`` prints them):

1. ``correctness``: the attention and linear kernels against float64 references at real sizes, bf16: Triton and
   flash-attn (when it imports) forward (out, lse) and backward (dq, dk, dv) at D = 64 and 128, GQA, S = 4K
   causal and not, S = 32K causal; packed varlen with the ``max_seqlen`` hints (no host read of cu_seqlens);
   a NaN key (rows that see it NaN, the others exact); a head-dim-stride-2 view; a 1K causal sliding window at
   8K; Triton only: MLA head dims (D 192, Dv 128) with a (left, right) window, and the explicit zigzag positions
   an SP block passes with a window; the fused out/LSE merge;
   Triton linear attention (three decay kinds vs the recurrence at 4K, per-token decay at 32K vs the torch
   chunked path in float64); the Triton gated delta rule (GDN and KDA bf16, GDN fp32 at 4K vs the torch chunked
   path in float64, every gradient). Tolerance 2e-2 relative error (fp32: 1e-4); the reference sees the same
   bf16-rounded inputs.
2. ``speed``: TFLOP/s (medians, CUDA events) of softmax attention fwd and fwd+bwd, causal bf16 D = 128, B = 1,
   H = 16, S = 4K..32K (+ non-causal 16K, D = 64 at 16K) for Triton, flash-attn 2 and torch SDPA; a causal
   4K sliding window at the longest S for Triton and flash-attn (goal: Triton's windowed step <= 1.5x the visible
   share of the full causal step's time, i.e. the blocks outside the band are skipped); linear
   attention (per-token decay) for Triton, the torch chunked path and fla's chunk_simple_gla (if installed);
   gated delta rule (GDN 4K/16K, KDA 4K) for Triton, the torch chunked path and fla's chunk_gated_delta_rule;
   ratios, and the goal lines (Triton attention fwd+bwd >= 0.9x flash-attn at 16K causal; Triton linear >= 0.9x
   the best other chunked implementation).
3. ``sp_ops``: every registered SP op (``seqpar.strategies.names()``) at world size 1 on NCCL, forward and
   backward against the float64 reference: softmax ops padded and packed (with the runtime's ``max_seqlen``
   hint), linear ops with per-token decay.
4. ``train_smoke``: a 1-GPU ``seqpar-train`` run (torchrun, world size 1, NCCL), with ``--fsdp`` and
   ``--activation-checkpointing`` when seqpar-train's parser has them at run time (the output says which).

Without CUDA a run prints why and exits 0 without writing anything (``--plan`` and ``--compile-only`` need none).

``--compile-only`` compiles every Triton kernel variant ahead of time for sm_90a (H100/H200) with the launch
configurations the code uses, and reports registers, spills and shared memory (``ptxas -v``, from the ptxas
bundled with triton). It catches what the interpreter cannot. Exit status 1 if any fails.
FLOP counts: attention forward 4*B*H*Sq*Sk*D (halved when causal), forward+backward 3.5x that (flash-attn's
convention); linear attention (chunk C) forward 2*B*H*S*(C*(Dk+Dv) + 2*Dk*Dv), forward+backward 3x that;
gated delta rule forward 2*B*H*S*(C*(3*Dk+2*Dv) + 3*Dk*Dv) with C = 64 for every provider, fwd+bwd 3x that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

TOL_BF16 = 2e-2
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# This checkout's seqpar, not an installed one: here and in every process a stage starts (torchrun's ranks too).
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


@dataclass(frozen=True)
class Stage:
    """One time-boxed stage. ``box_s``: the hard limit (the stage's process is killed after it);
    ``expected_s``: the wall time expected on one H200, process start and Triton compilation included."""

    name: str
    box_s: int
    expected_s: int
    what: str


STAGES = (
    Stage("correctness", 250, 220, "kernels vs float64: bf16, D 64/128, GQA, 32K, varlen, NaN, stride 2, window, MLA, "
          "positions, delta rule"),
    Stage("speed", 250, 230, "TFLOP/s fwd, fwd+bwd: Triton vs flash-attn/SDPA (+ 4K window); Triton linear, delta rule "
          "vs torch/fla"),
    Stage("sp_ops", 100, 60, "every registered SP op at world size 1 on NCCL, fwd+bwd vs float64, padded+packed"),
    Stage("train_smoke", 120, 80, "seqpar-train, 1 GPU, NCCL, 5 steps (--fsdp --activation-checkpointing if known)"),
)
DEVICE_BUDGET_S = 15 * 60  # what a lent device gives a task, start-up included
PLAN_LIMIT_S = 12 * 60  # the stages' boxes must fit in this, leaving the rest for start-up
STOP_MARGIN_S = 20  # a stage starts no new item this close to its box


def plan_text() -> str:
    """The stages, their time boxes and expected wall times, as ``--plan`` prints them."""
    lines = ["gpu_check plan (one H200; each stage in its own process, killed at its box; results written as they "
             "come)",
             f"{'stage':<13} {'box':>6} {'expected':>9}  what"]
    for s in STAGES:
        lines.append(f"{s.name:<13} {s.box_s:>5}s {s.expected_s:>8}s  {s.what}")
    box, expected = sum(s.box_s for s in STAGES), sum(s.expected_s for s in STAGES)
    lines.append(f"{'total':<13} {box:>5}s {expected:>8}s  (boxes {box / 60:.1f} min <= {PLAN_LIMIT_S // 60} min; "
                 f"expected {expected / 60:.1f} min; device budget {DEVICE_BUDGET_S // 60} min with start-up)")
    return "\n".join(lines)


assert sum(s.box_s for s in STAGES) <= PLAN_LIMIT_S, "the stages' time boxes must fit the plan limit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the stages, time boxes and expected times; no GPU")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (S up to 16K)")
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES),
                        help="comma-separated stages to run (default: all, in order)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # internal: epoch seconds
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "gpu_check.json", help="the JSON results file")
    parser.add_argument("--compile-only", action="store_true", help="AOT-compile the kernels for sm_90a; no GPU needed")
    args = parser.parse_args(argv)
    if args.plan:
        print(plan_text())
        return 0
    if args.compile_only:
        return compile_only(quick=args.quick)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check. "
              "Run this script on a CUDA machine (--plan shows what it runs); the CPU test suite covers the Triton "
              "kernels under TRITON_INTERPRET=1.")
        return 0
    log = EventLog(args.results)
    if args.stage is not None:
        return run_stage(args.stage, log, deadline=args.deadline or time.time() + 600, quick=args.quick)
    names = [n for n in args.stages.split(",") if n]
    unknown = sorted(set(names) - {s.name for s in STAGES})
    if unknown:
        print(f"gpu_check: error: --stages: unknown {unknown}; choose from {[s.name for s in STAGES]}")
        return 2
    return run_all([s for s in STAGES if s.name in names], log, quick=args.quick)


# ----------------------------------------------------------------------------------------------------
# Stages, time boxes and the results file
# ----------------------------------------------------------------------------------------------------


class EventLog:
    """Append-only JSONL of everything measured, folded into the JSON results file after every event, so the
    file is complete up to the last measurement whenever the run is cut."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.events = results.with_suffix(".events.jsonl")

    def start_run(self, stages: list[Stage], quick: bool) -> None:
        self.results.parent.mkdir(parents=True, exist_ok=True)
        self.events.write_text("")
        self.emit({"type": "run", "plan": [asdict(s) for s in stages], "quick": quick,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__})

    def emit(self, event: dict) -> None:
        event = {"t": round(time.time(), 3), **event}
        with self.events.open("a") as f:
            f.write(json.dumps(event, default=str) + "\n")
        self.fold()

    def fold(self) -> None:
        events = [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]
        out: dict[str, Any] = {"stages": {}, "checks": [], "timings": [], "sp_ops": [], "train_smoke": None,
                               "skipped": [], "notes": []}
        for e in events:
            kind = e.get("type")
            if kind == "run":
                out.update({k: e[k] for k in ("plan", "quick", "device", "torch")})
            elif kind == "stage":
                out["stages"].setdefault(e["stage"], {}).update({k: v for k, v in e.items() if k not in ("type", "t")})
            elif kind == "check":
                out["checks"].append(e["result"])
            elif kind == "timing":
                out["timings"].append(e["result"])
            elif kind == "sp_op":
                out["sp_ops"].append(e["result"])
            elif kind == "train_smoke":
                out["train_smoke"] = e["result"]
            elif kind in ("skipped", "note"):
                out["skipped" if kind == "skipped" else "notes"].append(e["text"])
            elif kind == "summary":
                out.update(e["result"])
        tmp = self.results.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        tmp.replace(self.results)


def run_all(stages: list[Stage], log: EventLog, *, quick: bool) -> int:
    """Each stage in its own process group, killed at its box; the next stage runs regardless."""
    log.start_run(stages, quick)
    print(plan_text())
    failed = []
    for stage in stages:
        start = time.time()
        log.emit({"type": "stage", "stage": stage.name, "status": "running", "box_s": stage.box_s})
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--results", str(log.results),
               "--deadline", str(start + stage.box_s - STOP_MARGIN_S)] + (["--quick"] if quick else [])
        print(f"\n=== stage {stage.name} (box {stage.box_s} s) ===", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=stage.box_s)
            status = "passed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's whole process group: torchrun and its ranks too
            proc.wait(timeout=30)
            status = f"cut at its {stage.box_s} s box"
        if status != "passed":
            failed.append(stage.name)
        log.emit({"type": "stage", "stage": stage.name, "status": status, "elapsed_s": round(time.time() - start, 1)})
        print(f"=== stage {stage.name}: {status} in {time.time() - start:.0f} s ===", flush=True)
    print(f"\nwrote {log.results} ({log.events.name} has every event)" + (f"; NOT PASSED: {failed}" if failed else ""))
    return 1 if failed else 0


def run_stage(name: str, log: EventLog, *, deadline: float, quick: bool) -> int:
    """One stage in this process: 0 when every item it ran passed."""
    check = GpuCheck(log, deadline=deadline, quick=quick)
    {"correctness": check.correctness, "speed": check.speed, "sp_ops": check.sp_ops,
     "train_smoke": check.train_smoke}[name]()
    return 1 if check.failures else 0


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU)
# ----------------------------------------------------------------------------------------------------


def _aot_variants(quick: bool):
    """(kernel, pointer dtypes by argument name, constexprs, launch options) for every variant launched."""
    from seqpar.kernels import triton_attention as ta
    from seqpar.kernels import triton_linear as tlin

    cuda = torch.device("cuda")  # only its type is read: no CUDA needed
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        t = names[dtype]
        for d, dv in ((128, 128),) if quick else ((64, 64), (128, 128), (96, 96), (192, 128)):
            cfg = ta._configs(max(d, dv), cuda, dtype)
            block = lambda n: max(16, 1 << (n - 1).bit_length())  # noqa: E731
            base = dict(HEAD_DIM=d, HEAD_DV=dv, BLOCK_D=block(d), BLOCK_DV=block(dv), PRECISION=ta._precision(dtype),
                        UPCAST=False)
            launch = lambda c: {k: v for k, v in c.items() if k in ("num_warps", "num_stages")}  # noqa: E731
            blocks = lambda c: {k: v for k, v in c.items() if k.startswith("BLOCK")}  # noqa: E731
            # masks: causal; a sliding window on the SP ops' explicit positions; none
            causal, window = dict(RIGHT=True), dict(LEFT=True, RIGHT=True, POSITIONS=True)
            masks = [causal, window, {}]
            flags = [(causal, False, False), (window, True, False), (causal, True, True), ({}, False, False)]
            for mask, varlen, merge in flags[:2] if quick else flags:
                ptrs = {"Q": t, "K": t, "V": t, "Out": "fp32" if merge else t, "Lse": "fp32", "OutAcc": "fp32",
                        "LseAcc": "fp32", "CuQ": "i32", "CuK": "i32", "QPos": "i64", "KPos": "i64", "PosSorted": "i32"}
                yield ta._attn_fwd_kernel, ptrs, dict(base, VARLEN=varlen, MERGE=merge, **mask,
                                                      **blocks(cfg["fwd"])), launch(cfg["fwd"])
            yield (ta._attn_bwd_preprocess_kernel, {"Out": t, "DOut": t, "Delta": "fp32", "CuQ": "i32"},
                   dict(HEAD_DIM=dv, BLOCK_D=base["BLOCK_DV"], VARLEN=False, **blocks(cfg["pre"])), launch(cfg["pre"]))
            ptrs = {n: t for n in ("Q", "K", "V", "DOut", "DK", "DV", "DQ")}
            ptrs.update(Lse="fp32", Delta="fp32", CuQ="i32", CuK="i32", QPos="i64", KPos="i64", PosSorted="i32")
            bwd = [(masks[0], False), (masks[1], True)] + ([] if quick else [(masks[0], True), (masks[2], False)])
            for mask, varlen in bwd:
                for kernel, c in ((ta._attn_bwd_dkdv_kernel, cfg["dkdv"]), (ta._attn_bwd_dq_kernel, cfg["dq"])):
                    yield kernel, ptrs, dict(base, VARLEN=varlen, **mask, **blocks(c)), launch(c)
        for dk in (128,) if quick else (64, 128):
            state, tiles = tlin._state_tiles(dk, dk, cuda, dtype), tlin._tiles(dk, dk, cuda, dtype)
            decays = [(True, False), (True, True)] if quick else [(True, False), (False, False), (True, True)]
            for use_g, per_key in decays:  # per_key: GLA, (B, S, H, Dk) decay
                flags = dict(PRECISION=tlin._precision(dtype), UPCAST=False, USE_G=use_g, PER_KEY=per_key,
                             C=tlin.chunk_size_for(64, dtype, cuda, per_key=per_key))
                yield (tlin._fwd_h_kernel, {"K": t, "V": t, "G": "fp32", "H0": "fp32", "Hs": "fp32", "Ht": "fp32"},
                       dict(flags, USE_H0=True, STORE_FINAL=True, **state), {})
                yield (tlin._fwd_o_kernel, {"Q": t, "K": t, "V": t, "G": "fp32", "Hs": "fp32", "O": t},
                       dict(flags, **tiles), {})
                yield (tlin._bwd_dh_kernel, {"Q": t, "DO": t, "G": "fp32", "DHt": "fp32", "DHs": "fp32", "DH0": "fp32"},
                       dict(flags, USE_DHT=True, STORE_DH0=True, **state), {})
                yield (tlin._bwd_dv_kernel, {"Q": t, "K": t, "G": "fp32", "DO": t, "DHs": "fp32", "DV": t},
                       dict(flags, **tiles), {})
                yield (tlin._bwd_dqk_kernel, {"Q": t, "K": t, "V": t, "G": "fp32", "DO": t, "Hs": "fp32", "DHs": "fp32",
                                              "DQ": "fp32", "DK": "fp32"}, dict(flags, **tiles), {})
        yield from _aot_delta_rule_variants(dtype, t, quick)


def _aot_delta_rule_variants(dtype: torch.dtype, t: str, quick: bool):
    """The Triton gated delta rule's kernels (GDN per-head gate, KDA per-key gate, no gate) at Dk = Dv = 128."""
    from seqpar.kernels import triton_delta_rule as tdr

    cuda = torch.device("cuda")
    f32 = "fp32"
    gates = [(True, False), (True, True)] if quick else [(True, False), (True, True), (False, False)]
    for use_g, per_key in gates:
        chunk = tdr.delta_rule_chunk_size(64, cuda, per_key=per_key)
        flags = dict(tdr.kernel_flags(128, dtype, chunk, use_g=use_g, per_key=per_key), BV=tdr.value_tile(128, cuda))
        inputs = {"Q": t, "K": t, "V": t, "BETA": t, "DO": t, "O": t, "G": f32}
        work = {n: f32 for n in ("T_out", "A_out", "W_out", "U_out", "T_in", "A", "W", "U0", "H0", "Hs", "VNEW", "Ht",
                                 "DHt", "DHs", "DU", "DH0", "DQ", "DK", "DV", "DBETA", "DC")}
        ptrs = {**inputs, **work}
        extra = {tdr._fwd_h_kernel: dict(USE_H0=True, STORE_FINAL=True), tdr._bwd_dh_kernel: dict(USE_DHT=True,
                                                                                                 STORE_DH0=True)}
        for kernel in (tdr._prep_kernel, tdr._fwd_h_kernel, tdr._fwd_o_kernel, tdr._bwd_dh_kernel,
                       tdr._bwd_chunk_kernel):
            yield kernel, ptrs, dict(flags, **extra.get(kernel, {})), tdr.launch_options(kernel.__name__, cuda)


def _ptxas_stats(ptx: str, ptxas: list[str]) -> str:
    """'N registers, S bytes spilled' from the first bundled ptxas that accepts this PTX version."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for exe in ptxas:
            run = subprocess.run([exe, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                regs = [ln.split("Used")[1].split(",")[0].strip() for ln in run.stderr.splitlines() if "Used" in ln]
                spill = [ln.split(",")[1].strip() for ln in run.stderr.splitlines() if "spill stores" in ln]
                return f"{regs[0] if regs else '?'}, {spill[0] if spill else '?'}"
    return "ptxas stats unavailable"


def compile_only(quick: bool) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = [str(p) for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()]
    target = GPUTarget("cuda", 90, 32)
    failures, count, t0 = [], 0, time.perf_counter()
    for kernel, ptrs, constexprs, options in _aot_variants(quick):
        count += 1
        signature, attrs = {}, {}
        for i, param in enumerate(kernel.params):
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                continue
            name = param.name
            scalar = "fp32" if "scale" in name or name == "cap" else "i32"
            signature[name] = f"*{ptrs[name]}" if name in ptrs else scalar
            if name in ptrs or name.startswith("stride_") or name.startswith("seqlen") or name.startswith("dim_"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher specialises for aligned real sizes
        label = f"{kernel.__name__} " + " ".join(
            f"{k}={v}" for k, v in constexprs.items() if k not in ("PRECISION", "UPCAST")
        ) + f" {next(iter(ptrs.values()))}"
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), target=target,
                                      options=options)
        except Exception as exc:  # noqa: BLE001
            failures.append(label)
            print(f"  FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        stats = _ptxas_stats(compiled.asm["ptx"], ptxas) if ptxas else "no ptxas"
        print(f"  ok   {label} | smem {compiled.metadata.shared} B | {stats}")
    print(f"compiled {count - len(failures)}/{count} kernel variants for sm_90a in {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED: {failures}" if failures else ""))
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------
# Float64 references
# ----------------------------------------------------------------------------------------------------


def reference_attention_grads(q, k, v, dout, *, causal, scale=None, rows=512, window=None, q_positions=None,
                              k_positions=None):
    """Float64 softmax attention and its gradients by query blocks (no S x S buffer): (out, lse, dq, dk, dv).

    q (B, Sq, H, D), k (B, Sk, H_kv, D), v (B, Sk, H_kv, Dv); the mask compares positions (1-D; default bottom-right
    aligned): causal j <= i, ``window=(left, right)`` i - left <= j <= i + right (-1 unbounded); the explicit
    formulas of the backward."""
    q, k, v, dout = (x.double() for x in (q, k, v, dout))
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = h // h_kv
    kk = k.repeat_interleave(group, 2).transpose(1, 2)  # (B, H, Sk, D)
    vv = v.repeat_interleave(group, 2).transpose(1, 2)
    out = torch.empty_like(dout)
    lse = torch.empty(b, h, sq, dtype=torch.float64, device=q.device)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(kk)
    dv = torch.zeros_like(vv)
    q_pos = torch.arange(sq, device=q.device) + (sk - sq) if q_positions is None else q_positions.to(q.device)
    k_pos = torch.arange(sk, device=q.device) if k_positions is None else k_positions.to(q.device)
    left, right = (-1, -1) if window is None else window
    for start in range(0, sq, rows):
        end = min(start + rows, sq)
        qb, dob = q[:, start:end].transpose(1, 2), dout[:, start:end].transpose(1, 2)  # (B, H, r, D)
        s = qb @ kk.transpose(-1, -2) * scale
        distance = q_pos[start:end, None] - k_pos[None, :]  # i - j
        hidden = torch.zeros_like(distance, dtype=torch.bool)
        if causal:
            hidden |= distance < 0
        if left >= 0:
            hidden |= distance > left
        if right >= 0:
            hidden |= distance < -right
        s = s.masked_fill(hidden, float("-inf"))
        row_lse = torch.logsumexp(s, -1)
        p = torch.nan_to_num(torch.exp(s - row_lse[..., None]), nan=0.0)
        o = p @ vv
        out[:, start:end], lse[:, :, start:end] = o.transpose(1, 2), row_lse
        dv += p.transpose(-1, -2) @ dob
        ds = p * (dob @ vv.transpose(-1, -2) - (dob * o).sum(-1, keepdim=True)) * scale
        dq[:, start:end] = (ds @ kk).transpose(1, 2)
        dk += ds.transpose(-1, -2) @ qb
        del s, p, ds
    fold = lambda x: x.view(b, h_kv, group, sk, x.shape[-1]).sum(2).transpose(1, 2)  # noqa: E731
    return out, lse, dq, fold(dk), fold(dv)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    finite = torch.isfinite(ref)
    return ((got[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def cuda_ms(fn: Callable[[], Any], *, budget_ms: float = 400.0, max_reps: int = 20) -> float:
    """Median milliseconds of ``fn`` (one warm-up call, then repeats until the budget or max_reps)."""
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < budget_ms and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1]
    return statistics.median(times)


def attention_flops(b, h, s, d, causal, mode):
    f = 4.0 * b * h * s * s * d / (2 if causal else 1)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def linear_flops(b, h, s, dk, dv, chunk, mode):
    f = 2.0 * b * h * s * (chunk * (dk + dv) + 2 * dk * dv)
    return f * (3.0 if mode == "fwd+bwd" else 1.0)


def delta_rule_flops(b, h, s, dk, dv, chunk, mode):
    f = 2.0 * b * h * s * (chunk * (3 * dk + 2 * dv) + 3 * dk * dv)
    return f * (3.0 if mode == "fwd+bwd" else 1.0)


# ----------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------


class GpuCheck:
    """The items of every stage; each result goes to the event log the moment it is measured."""

    def __init__(self, log: EventLog, *, deadline: float, quick: bool):
        self.log, self.deadline, self.quick = log, deadline, quick
        self.dev = torch.device("cuda")
        self.failures: list[str] = []
        self.timings: list[dict] = []
        import seqpar.kernels as kernels
        from seqpar.kernels.attention import available_attention_backends

        self.backends = available_attention_backends()
        if kernels.OPTIONAL_BACKEND_ERRORS:
            self.note(f"optional backends missing: {kernels.OPTIONAL_BACKEND_ERRORS}")
        self.fa_func = None
        try:
            from flash_attn import flash_attn_func

            self.fa_func = flash_attn_func
        except Exception as exc:  # noqa: BLE001
            self.note(f"flash_attn not importable: {type(exc).__name__}: {exc}")
        print(f"gpu_check on {torch.cuda.get_device_name()} | torch {torch.__version__} | backends {self.backends} | "
              f"{max(0.0, self.deadline - time.time()):.0f} s left in this stage", flush=True)

    # --- bookkeeping -------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log.emit({"type": "note", "text": text})
        print(f"  note: {text}", flush=True)

    def skip(self, text: str) -> None:
        self.log.emit({"type": "skipped", "text": text})
        print(f"  skipped: {text}", flush=True)

    def out_of_time(self, what: str) -> bool:
        if time.time() < self.deadline:
            return False
        self.skip(f"{what}: the stage's time box is used up")
        return True

    def record(self, name: str, errors: dict[str, float], tol: float = TOL_BF16, kind: str = "check", **extra) -> None:
        ok = bool(errors) and all(math.isfinite(e) and e < tol for e in errors.values())
        if not ok:
            self.failures.append(name)
        self.log.emit({"type": kind, "result": {"name": name, "errors": errors, "tol": tol, "pass": ok, **extra}})
        worst = max(errors.values()) if errors else float("nan")
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: worst rel err {worst:.2e} "
              + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), flush=True)

    def attempt(self, name: str, fn: Callable[[], None], kind: str = "check") -> None:
        if self.out_of_time(name):
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- one broken kernel must not hide the other results
            self.failures.append(name)
            self.log.emit({"type": kind, "result": {"name": name, "error": f"{type(exc).__name__}: {exc}",
                                                    "pass": False}})
            print(f"  [FAIL] {name}: {type(exc).__name__}: {exc}", flush=True)
        finally:
            torch.cuda.empty_cache()

    def _rand(self, *shape, seed=0):
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        return torch.randn(*shape, generator=gen, device=self.dev, dtype=torch.float32).to(torch.bfloat16)

    # --- stage 1: correctness ----------------------------------------------------------------------

    def check_attention(self, backend: str, s: int, causal: bool, h: int = 4, h_kv: int = 2, d: int = 128):
        from seqpar.kernels.attention import attention_block, attention_block_backward

        q, k, v, do = (self._rand(1, s, n, d, seed=i) for i, n in enumerate((h, h_kv, h_kv, h)))
        out, lse = attention_block(q, k, v, causal=causal, backend=backend)
        grads = attention_block_backward(do, q, k, v, out, lse, causal=causal, backend=backend)
        ref = reference_attention_grads(q, k, v, do, causal=causal)
        names = ("out", "lse", "dq", "dk", "dv")
        self.record(f"attention {backend} S={s} causal={causal} H={h}/{h_kv} D={d}",
                    {n: rel_err(g, r) for n, g, r in zip(names, (out, lse, *grads), ref)})

    def check_varlen(self, backend: str, lengths=(1000, 5000, 10384), h=4, h_kv=2, d=128):
        """Packed, with the max_seqlen hints the SP ops pass (the kernels then read no cu_seqlens on the host)."""
        from seqpar.kernels.attention import attention_block_varlen, attention_block_varlen_backward

        bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        cu = torch.tensor(bounds, dtype=torch.int32, device=self.dev)
        t, hint = sum(lengths), max(lengths)
        q, k, v, do = (self._rand(t, n, d, seed=10 + i) for i, n in enumerate((h, h_kv, h_kv, h)))
        opts = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend=backend, max_seqlen_q=hint,
                    max_seqlen_k=hint)
        out, lse = attention_block_varlen(q, k, v, **opts)
        grads = attention_block_varlen_backward(do, q, k, v, out, lse, **opts)
        refs = [torch.empty_like(x, dtype=torch.float64) for x in (q, q, k, v)]
        ref_lse = torch.empty(h, t, dtype=torch.float64, device=self.dev)
        for a, b in zip(bounds, bounds[1:]):
            o, seq_lse, dq, dk, dv = reference_attention_grads(q[None, a:b], k[None, a:b], v[None, a:b],
                                                               do[None, a:b], causal=True)
            refs[0][a:b], ref_lse[:, a:b], refs[1][a:b], refs[2][a:b], refs[3][a:b] = (
                o[0], seq_lse[0], dq[0], dk[0], dv[0])
        got = (out, lse, *grads)
        want = (refs[0], ref_lse, refs[1], refs[2], refs[3])
        self.record(f"attention varlen {backend} lengths={list(lengths)} D={d} (max_seqlen hints)",
                    {n: rel_err(g, r) for n, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, want)})

    def check_nan_key(self, backend: str, s: int = 4096, h: int = 4, h_kv: int = 2, d: int = 128):
        """A NaN in key j of K/V head 0, causal: rows >= j of the query heads that read head 0 must be NaN (a
        finite answer would be silent corruption); rows < j and the other heads must equal the clean reference."""
        from seqpar.kernels.attention import attention_block

        q, k, v = (self._rand(1, s, n, d, seed=50 + i) for i, n in enumerate((h, h_kv, h_kv)))
        j, group = s // 3, h // h_kv
        ref = reference_attention_grads(q, k, v, torch.zeros_like(q), causal=True)[0]
        k = k.clone()
        k[0, j, 0, 0] = float("nan")
        out, _ = attention_block(q, k, v, causal=True, backend=backend)
        self.record(f"attention {backend} NaN key S={s}", {
            "rows_before_nan": rel_err(out[:, :j], ref[:, :j]),
            "other_heads": rel_err(out[:, :, group:], ref[:, :, group:]),
            "nan_rows_not_nan": float(torch.isfinite(out[:, j:, :group]).float().mean()),  # 0 when all are NaN
        })

    def check_strided(self, backend: str, s: int = 4096, h: int = 4, h_kv: int = 2, d: int = 64):
        """q/k/v as head-dim-stride-2 views (x[..., ::2] of a 2D-wide tensor): a kernel that ignores the head-dim
        stride reads the wrong elements."""
        from seqpar.kernels.attention import attention_block, attention_block_backward

        q, k, v, do = (self._rand(1, s, n, 2 * d, seed=60 + i)[..., ::2] for i, n in enumerate((h, h_kv, h_kv, h)))
        out, lse = attention_block(q, k, v, causal=True, backend=backend)
        grads = attention_block_backward(do, q, k, v, out, lse, causal=True, backend=backend)
        ref = reference_attention_grads(q, k, v, do, causal=True)
        self.record(f"attention {backend} head-dim stride 2 S={s} D={d}",
                    {n: rel_err(g, r) for n, g, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref)})

    def check_options(self, backend: str, *, s: int = 8192, h: int = 8, h_kv: int = 2, d: int = 128, dv: int = 128,
                      window=(1023, 0), causal: bool = True, zigzag: bool = False):
        """A sliding window (Mistral's, shorter than S), MLA head dims (D=192, Dv=128) and, with ``zigzag``, the
        explicit positions an SP block passes (q and k: two runs of a zigzag shard at P = 4), fwd + bwd."""
        from seqpar.kernels.attention import attention_block, attention_block_backward

        q, k, do = (self._rand(1, s, n, d if i < 2 else dv, seed=90 + i) for i, n in enumerate((h, h_kv, h)))
        v = self._rand(1, s, h_kv, dv, seed=93)
        options = dict(causal=causal, window=window)
        positions = {}
        if zigzag:  # shards of a sequence of 8 chunks of s / 2 (P = 4): q holds chunks (3, 4), k chunks (2, 5)
            c = s // 2

            def runs(a, b):
                return torch.cat([torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)]).to(self.dev)

            positions = dict(q_positions=runs(3, 4), k_positions=runs(2, 5))
        batched = {n: p[None] for n, p in positions.items()}
        out, lse = attention_block(q, k, v, backend=backend, **options, **batched)
        grads = attention_block_backward(do, q, k, v, out, lse, backend=backend, **options, **batched)
        ref = reference_attention_grads(q, k, v, do, **options, **positions)
        names = ("out", "lse", "dq", "dk", "dv")
        self.record(f"attention {backend} S={q.shape[1]} window={window} causal={causal} D={d} Dv={dv}"
                    + (" zigzag positions" if zigzag else ""),
                    {n: rel_err(g, r) for n, g, r in zip(names, (out, lse, *grads), ref)})

    def check_fused_merge(self, s: int = 16384, h: int = 4, d: int = 128):
        from seqpar.kernels.fused_merge import attention_block_merge

        q, k, v = (self._rand(1, s, h, d, seed=20 + i) for i in range(3))
        # Two non-causal key blocks: their union is plain attention over all keys. (Causal blocks and rows with
        # no visible key are covered by tests/test_triton_kernels.py under the interpreter.)
        blocks = [(k[:, :s // 2], v[:, :s // 2]), (k[:, s // 2:], v[:, s // 2:])]
        out = lse = unfused_out = unfused_lse = None
        for kb, vb in blocks:
            out, lse = attention_block_merge(q, kb, vb, out, lse, backend="triton")
            unfused_out, unfused_lse = attention_block_merge(q, kb, vb, unfused_out, unfused_lse, backend="torch")
        ref_out, ref_lse, *_ = reference_attention_grads(q, k, v, torch.zeros_like(q), causal=False)
        self.record(f"fused merge triton S={s} (2 blocks)", {
            "out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse),
            "out_vs_unfused": rel_err(out, unfused_out), "lse_vs_unfused": rel_err(lse, unfused_lse),
        })

    def _linear_inputs(self, b, s, h, d, decay, seed):
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        # Unit-variance q/k with D = 128 make |S_t| grow like t: scale them so outputs stay O(1) in bf16.
        q, k, v = (torch.randn(b, s, h, d, generator=gen, device=self.dev) / math.sqrt(d) for _ in range(3))
        g = None
        if decay == "head":
            g = -torch.rand(h, generator=gen, device=self.dev) * 0.1
        elif decay == "token":
            g = torch.nn.functional.logsigmoid(torch.randn(b, s, h, generator=gen, device=self.dev) + 4)
        return [x.to(torch.bfloat16) for x in (q, k, v)], g, gen

    def check_linear(self, s: int, decay: str, reference: str, h: int = 2, d: int = 128, chunk: int = 64):
        from seqpar.kernels.linear import linear_attention_chunk
        from seqpar.kernels.reference import reference_linear_attention

        b = 1
        (q, k, v), g, gen = self._linear_inputs(b, s, h, d, decay, s + len(decay) + d)
        s0 = torch.randn(b, h, d, d, generator=gen, device=self.dev)
        do = torch.randn(b, s, h, d, generator=gen, device=self.dev)
        ds = torch.randn(b, h, d, d, generator=gen, device=self.dev)
        inputs = {"q": q, "k": k, "v": v, "s0": s0, **({"g": g} if g is not None else {})}

        def grads_of(fn, dtype):
            side = torch.float64 if dtype == torch.float64 else torch.float32  # state and decay precision
            leaves = {n: x.detach().to(dtype if n in ("q", "k", "v") else side)
                      .requires_grad_(True) for n, x in inputs.items()}
            o, final = fn(leaves)
            loss = (o.double() * do.double()).sum() + (final.double() * ds.double()).sum()
            names = list(leaves)
            return o, final, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))

        o, final, grads = grads_of(lambda x: linear_attention_chunk(
            x["q"], x["k"], x["v"], log_decay=x.get("g"), initial_state=x["s0"], output_final_state=True,
            chunk_size=chunk, backend="triton"), torch.bfloat16)
        if reference == "recurrence":
            ref_fn = lambda x: reference_linear_attention(  # noqa: E731
                x["q"], x["k"], x["v"], log_decay=x.get("g"), initial_state=x["s0"])
        else:
            ref_fn = lambda x: linear_attention_chunk(  # noqa: E731
                x["q"], x["k"], x["v"], log_decay=x.get("g"), initial_state=x["s0"], output_final_state=True,
                chunk_size=chunk, backend="torch")
        ref_o, ref_s, ref_g = grads_of(ref_fn, torch.float64)
        errors = {"o": rel_err(o, ref_o), "final_state": rel_err(final, ref_s)}
        errors.update({f"d{n}": rel_err(grads[n], ref_g[n]) for n in grads})
        self.record(f"linear triton S={s} D={d} decay={decay} vs {reference}", errors)

    def _delta_inputs(self, b, s, h, d, gate, seed):
        """Gated-delta-rule inputs as the models feed them: l2-normalised q/k, beta in (0, 1), per-head (GDN) or
        per-key (KDA) log decays mostly in (-0.1, 0) with a few strong ones, a random initial state."""
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=gen, device=self.dev)  # noqa: E731
        q, k = (torch.nn.functional.normalize(rand(b, s, h, d), dim=-1) for _ in range(2))
        v, beta = rand(b, s, h, d), torch.sigmoid(rand(b, s, h))
        g = torch.nn.functional.logsigmoid(rand(*((b, s, h) if gate == "gdn" else (b, s, h, d))) + 3)
        return {"q": q, "k": k, "v": v, "beta": beta, "g": g, "s0": rand(b, h, d, d) * 0.1}

    def check_delta_rule(self, s: int, gate: str, dtype: torch.dtype = torch.bfloat16, h: int = 4, d: int = 128):
        """The Triton gated delta rule vs the torch chunked path in float64 on the same rounded inputs: output,
        final state and the gradients of q, k, v, beta, the gate and the initial state."""
        from seqpar.kernels.delta_rule import chunk_gated_delta_rule

        inputs = self._delta_inputs(1, s, h, d, gate, s + d + len(gate))
        gen = torch.Generator(device=self.dev).manual_seed(s)
        do, ds = torch.randn(1, s, h, d, generator=gen, device=self.dev), torch.randn(1, h, d, d, generator=gen,
                                                                                       device=self.dev)

        def run(compute_dtype, backend):
            side = torch.float64 if compute_dtype == torch.float64 else torch.float32  # gate and state precision
            leaves = {n: (x.to(dtype).to(compute_dtype) if n in ("q", "k", "v", "beta") else x.to(side))
                      .detach().requires_grad_(True) for n, x in inputs.items()}
            o, final = chunk_gated_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"],
                                              log_decay=leaves["g"], initial_state=leaves["s0"],
                                              output_final_state=True, chunk_size=64 if gate == "gdn" else 16,
                                              backend=backend)
            loss = (o.double() * do.double()).sum() + (final.double() * ds.double()).sum()
            return o, final, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

        o, final, grads = run(dtype, "triton")
        ref_o, ref_final, ref_grads = run(torch.float64, "torch")
        errors = {"o": rel_err(o, ref_o), "final_state": rel_err(final, ref_final)}
        errors.update({f"d{n}": rel_err(grads[n], ref_grads[n]) for n in grads})
        tol = TOL_BF16 if dtype != torch.float32 else 1e-4
        self.record(f"delta rule triton {gate} S={s} D={d} {dtype} vs torch-chunked-float64", errors, tol=tol)

    def correctness(self) -> None:
        print(f"correctness (bf16, tol {TOL_BF16}):", flush=True)
        long_s = 16384 if self.quick else 32768
        for backend in ("triton", "flash_attn"):
            if backend not in self.backends:
                self.skip(f"{backend} correctness: backend not registered")
                continue
            for d in (64, 128):
                self.attempt(f"attention {backend} 4K causal GQA D={d}",
                             lambda: self.check_attention(backend, 4096, True, h=8, h_kv=2, d=d))
            self.attempt(f"attention {backend} 4K", lambda: self.check_attention(backend, 4096, False))
            self.attempt(f"attention {backend} long causal", lambda: self.check_attention(backend, long_s, True))
            for d in (64, 128):
                self.attempt(f"attention varlen {backend} D={d}", lambda: self.check_varlen(backend, d=d))
            self.attempt(f"attention {backend} NaN key", lambda: self.check_nan_key(backend))
            self.attempt(f"attention {backend} head-dim stride 2", lambda: self.check_strided(backend))
            self.attempt(f"attention {backend} sliding window", lambda: self.check_options(backend))
            if backend == "triton":  # flash-attn has no explicit positions or Dv != D
                self.attempt("attention triton MLA head dims, window (left, right)", lambda: self.check_options(
                    backend, d=192, dv=128, window=(700, 300), causal=False))
                self.attempt("attention triton zigzag positions + window", lambda: self.check_options(
                    backend, window=(2047, 0), zigzag=True))
        if "triton" in self.backends:
            self.attempt("fused merge", self.check_fused_merge)
        for decay in ("none", "head", "token"):
            self.attempt(f"linear {decay} 4K", lambda: self.check_linear(4096, decay, "recurrence"))
        self.attempt("linear head 4K D=64", lambda: self.check_linear(4096, "head", "recurrence", d=64))
        self.attempt("linear token long", lambda: self.check_linear(long_s, "token", "torch-chunked-float64"))
        self.attempt("delta rule gdn 4K", lambda: self.check_delta_rule(4096, "gdn"))
        self.attempt("delta rule kda 4K", lambda: self.check_delta_rule(4096, "kda"))
        self.attempt("delta rule gdn 4K fp32", lambda: self.check_delta_rule(4096, "gdn", torch.float32))

    # --- stage 2: speed ----------------------------------------------------------------------------

    def _time(self, kind: str, provider: str, s: int, mode: str, fn: Callable[[], Any], flops: float, **extra):
        what = f"timing {kind} {provider} S={s} {mode} {extra or ''}".strip()
        if self.out_of_time(what):
            return
        try:
            ms = cuda_ms(fn)
        except Exception as exc:  # noqa: BLE001
            self.skip(f"{what}: {type(exc).__name__}: {exc}")
            return
        finally:
            torch.cuda.empty_cache()
        row = {"kind": kind, "provider": provider, "S": s, "mode": mode, "ms": ms, "tflops": flops / ms / 1e9, **extra}
        self.timings.append(row)
        self.log.emit({"type": "timing", "result": row})
        print(f"  {kind:9s} {provider:14s} S={s:6d} {mode:8s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s {extra}",
              flush=True)

    def attention_timing(self, b=1, h=16) -> None:
        import torch.nn.functional as F

        from seqpar.kernels.attention import attention

        lengths = (4096, 8192, 16384) if self.quick else (4096, 8192, 16384, 32768)
        cases = [(s, True, 128) for s in lengths] + [(16384, False, 128), (16384, True, 64)]
        for s, causal, d in cases:
            q, k, v, do = (self._rand(b, s, h, d, seed=30 + i) for i in range(4))
            leaves = [x.requires_grad_(True) for x in (q.clone(), k.clone(), v.clone())]
            providers: dict[str, Callable[..., torch.Tensor]] = {}
            if "triton" in self.backends:
                providers["triton"] = lambda a, b_, c: attention(a, b_, c, causal=causal, backend="triton")
            if self.fa_func is not None:
                providers["flash_attn"] = lambda a, b_, c: self.fa_func(a, b_, c, causal=causal)
            providers["sdpa"] = lambda a, b_, c: F.scaled_dot_product_attention(
                a.transpose(1, 2), b_.transpose(1, 2), c.transpose(1, 2), is_causal=causal).transpose(1, 2)
            for name, fn in providers.items():
                with torch.no_grad():
                    self._time("attention", name, s, "fwd", lambda fn=fn, q=q, k=k, v=v: fn(q, k, v),
                               attention_flops(b, h, s, d, causal, "fwd"), causal=causal, D=d)
                self._time("attention", name, s, "fwd+bwd",
                           lambda fn=fn, leaves=leaves, do=do: fn(*leaves).backward(do),
                           attention_flops(b, h, s, d, causal, "fwd+bwd"), causal=causal, D=d)
            del q, k, v, do, leaves
        self.window_timing(b, h, lengths[-1])

    def window_timing(self, b: int, h: int, s: int, w: int = 4096, d: int = 128) -> None:
        """A causal sliding window of ``w`` keys at the longest S (Mistral's 4096): Triton (which visits only the
        blocks the band reaches) and flash-attn's ``window_size``; FLOPs count only the visible pairs."""
        from seqpar.kernels.attention import attention

        q, k, v, do = (self._rand(b, s, h, d, seed=30 + i) for i in range(4))
        leaves = [x.requires_grad_(True) for x in (q.clone(), k.clone(), v.clone())]
        pairs = w * s - w * (w - 1) // 2  # query i sees min(i + 1, w) keys
        fwd_flops = 4.0 * b * h * pairs * d
        providers: dict[str, Callable[..., torch.Tensor]] = {}
        if "triton" in self.backends:
            providers["triton"] = lambda a, b_, c: attention(a, b_, c, causal=True, window=(w - 1, 0), backend="triton")
        if self.fa_func is not None:
            providers["flash_attn"] = lambda a, b_, c: self.fa_func(a, b_, c, causal=True, window_size=(w - 1, 0))
        for name, fn in providers.items():
            with torch.no_grad():
                self._time("attention", name, s, "fwd", lambda fn=fn: fn(q, k, v), fwd_flops, causal=True, D=d,
                           window=w)
            self._time("attention", name, s, "fwd+bwd", lambda fn=fn: fn(*leaves).backward(do), 3.5 * fwd_flops,
                       causal=True, D=d, window=w)

    def linear_timing(self, b=1, h=16, d=128, chunk=64) -> None:
        from seqpar.kernels.linear import linear_attention_chunk

        providers: dict[str, Callable] = {
            "triton": lambda q, k, v, g: linear_attention_chunk(q, k, v, log_decay=g, chunk_size=chunk,
                                                                backend="triton")[0],
            "torch_chunked": lambda q, k, v, g: linear_attention_chunk(q, k, v, log_decay=g, chunk_size=chunk,
                                                                       backend="torch")[0],
        }
        try:
            from fla.ops.simple_gla import chunk_simple_gla

            providers["fla_simple_gla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g, scale=d ** -0.5)[0]
        except Exception as exc:  # noqa: BLE001
            self.note(f"fla not importable: {type(exc).__name__}: {exc}")
        lengths = (4096, 16384) if self.quick else (4096, 16384, 32768)
        for s in lengths:
            q, k, v, do = (self._rand(b, s, h, d, seed=40 + i) / math.sqrt(d) for i in range(4))
            g = torch.nn.functional.logsigmoid(torch.randn(b, s, h, device=self.dev) + 4)
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
            for name, fn in providers.items():
                with torch.no_grad():
                    self._time("linear", name, s, "fwd", lambda fn=fn, q=q, k=k, v=v, g=g: fn(q, k, v, g),
                               linear_flops(b, h, s, d, d, chunk, "fwd"))
                self._time("linear", name, s, "fwd+bwd", lambda fn=fn, leaves=leaves, do=do: fn(*leaves).backward(do),
                           linear_flops(b, h, s, d, d, chunk, "fwd+bwd"))
            del q, k, v, do, leaves

    def delta_rule_timing(self, b=1, h=16, d=128) -> None:
        """Gated DeltaNet (S = 4K, 16K) and KDA (S = 4K), bf16: Triton vs the torch chunked path (float32
        compute) and fla's chunk_gated_delta_rule (GDN, if installed)."""
        from seqpar.kernels.delta_rule import chunk_gated_delta_rule

        def ours(backend, chunk):
            return lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, beta, log_decay=g, chunk_size=chunk,
                                                                   backend=backend)[0]

        cases = [("delta_gdn", 4096), ("delta_gdn", 16384), ("delta_kda", 4096)]
        for kind, s in cases:
            gate = kind.split("_")[1]
            chunk = 64 if gate == "gdn" else 16
            providers: dict[str, Callable] = {"triton": ours("triton", chunk), "torch_chunked": ours("torch", chunk)}
            if gate == "gdn":
                try:
                    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn

                    providers["fla_gated_delta_rule"] = lambda q, k, v, beta, g: fla_gdn(q, k, v, g=g, beta=beta,
                                                                                         scale=d ** -0.5)[0]
                except Exception as exc:  # noqa: BLE001
                    self.note(f"fla gated_delta_rule not importable: {type(exc).__name__}: {exc}")
            x = self._delta_inputs(b, s, h, d, gate, 50)
            args = [x["q"].to(torch.bfloat16), x["k"].to(torch.bfloat16), x["v"].to(torch.bfloat16),
                    x["beta"].to(torch.bfloat16), x["g"]]
            do = self._rand(b, s, h, d, seed=51)
            leaves = [a.clone().requires_grad_(True) for a in args]
            for name, fn in providers.items():
                with torch.no_grad():
                    self._time(kind, name, s, "fwd", lambda fn=fn, args=args: fn(*args),
                               delta_rule_flops(b, h, s, d, d, 64, "fwd"))
                self._time(kind, name, s, "fwd+bwd", lambda fn=fn, leaves=leaves, do=do: fn(*leaves).backward(do),
                           delta_rule_flops(b, h, s, d, d, 64, "fwd+bwd"))
            del x, args, do, leaves

    def _ms(self, kind, provider, s, mode, causal=None, d=128, window=None):
        for r in self.timings:
            same = (r["kind"], r["provider"], r["S"], r["mode"]) == (kind, provider, s, mode)
            if same and r.get("causal", causal) == causal and r.get("D", d) == d and r.get("window") == window:
                return r["ms"]
        return None

    def ratios_and_goals(self) -> dict:
        print("ratios (time of other / time of triton; > 1 means triton is faster):")
        ratios = []
        for r in self.timings:
            if r["provider"] == "triton":
                continue
            mine = self._ms(r["kind"], "triton", r["S"], r["mode"], r.get("causal"), r.get("D", 128), r.get("window"))
            if mine:
                ratios.append({**{k: r[k] for k in ("kind", "provider", "S", "mode")}, "causal": r.get("causal"),
                               "D": r.get("D"), "window": r.get("window"), "triton_speedup": r["ms"] / mine})
                print(f"  {r['kind']:9s} vs {r['provider']:14s} S={r['S']:6d} {r['mode']:8s} D={r.get('D')} "
                      f"{ratios[-1]['triton_speedup']:.2f}x")
        goals = {}
        fa = self._ms("attention", "flash_attn", 16384, "fwd+bwd", True)
        tr = self._ms("attention", "triton", 16384, "fwd+bwd", True)
        goals["attention_fwd_bwd_vs_flash_attn_S16K_causal"] = (
            {"ratio": fa / tr, "goal": 0.9, "met": fa / tr >= 0.9} if fa and tr
            else {"met": None, "why": "missing timing"})
        windowed = [r for r in self.timings if r["provider"] == "triton" and r.get("window") and r["mode"] == "fwd+bwd"]
        full = self._ms("attention", "triton", windowed[0]["S"], "fwd+bwd", True) if windowed else None
        if windowed and full:  # block skipping: the windowed step should cost about its share of the visible pairs
            w, s_w = windowed[0]["window"], windowed[0]["S"]
            share = (w * s_w - w * (w - 1) / 2) / (s_w * (s_w + 1) / 2)
            ratio = windowed[0]["ms"] / full
            goals["triton_window_time_vs_causal_time"] = {"S": s_w, "window": w, "ratio": ratio, "visible_share": share,
                                                          "goal": "<= 1.5x the visible share",
                                                          "met": ratio <= 1.5 * share}
        else:
            goals["triton_window_time_vs_causal_time"] = {"met": None, "why": "missing timing"}
        s_lin = 16384
        others = {p: self._ms("linear", p, s_lin, "fwd+bwd") for p in ("torch_chunked", "fla_simple_gla")}
        others = {p: t for p, t in others.items() if t}
        mine = self._ms("linear", "triton", s_lin, "fwd+bwd")
        if others and mine:
            best = min(others, key=others.get)
            goals["linear_fwd_bwd_vs_best_chunked_S16K"] = {"best": best, "ratio": others[best] / mine, "goal": 0.9,
                                                           "met": others[best] / mine >= 0.9}
        else:
            goals["linear_fwd_bwd_vs_best_chunked_S16K"] = {"met": None, "why": "missing timing"}
        for name, goal in goals.items():
            print(f"goal {name}: {goal}")
        return {"ratios": ratios, "goals": goals}

    def speed(self) -> None:
        print("speed (bf16, B=1, H=16; medians):", flush=True)
        self.attention_timing()
        self.linear_timing()
        self.delta_rule_timing()
        self.log.emit({"type": "summary", "result": self.ratios_and_goals()})

    # --- stage 3: every SP op at world size 1 on NCCL ----------------------------------------------

    def check_sp_softmax(self, name: str, packed: bool, s: int = 8192, h: int = 8, h_kv: int = 2, d: int = 128):
        from seqpar import strategies

        strategy = strategies.get(name, "softmax")
        op, layout = strategy.load_op(), strategy.layouts[0]
        lengths = (s // 4, s - s // 4) if packed else (s,)  # two sequences of different lengths
        shape = (lambda n: (s, n, d)) if packed else (lambda n: (1, s, n, d))
        q, k, v, do = (self._rand(*shape(n), seed=70 + i) for i, n in enumerate((h, h_kv, h_kv, h)))
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        options = dict(group=None, causal=True, softmax_scale=None, layout=layout, backend="auto")
        if packed:  # what the runtime passes: boundaries on the device, the longest length from the host
            bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
            options.update(cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=self.dev), max_seqlen=max(lengths))
        out = op(*leaves, **options)
        out.backward(do)
        got = [out, *(x.grad for x in leaves)]
        if packed:
            refs = [torch.empty_like(x, dtype=torch.float64) for x in (q, q, k, v)]
            for a, b in zip(bounds, bounds[1:]):
                o, _, dq, dk, dv = reference_attention_grads(q[None, a:b], k[None, a:b], v[None, a:b], do[None, a:b],
                                                             causal=True)
                refs[0][a:b], refs[1][a:b], refs[2][a:b], refs[3][a:b] = o[0], dq[0], dk[0], dv[0]
        else:
            o, _, dq, dk, dv = reference_attention_grads(q, k, v, do, causal=True)
            refs = [o, dq, dk, dv]
        self.record(f"sp {name} {'packed' if packed else 'padded'} {layout} S={s} H={h}/{h_kv} D={d}",
                    {n: rel_err(g, r) for n, g, r in zip(("out", "dq", "dk", "dv"), got, refs)}, kind="sp_op")

    def check_sp_linear(self, name: str, s: int = 8192, h: int = 4, d: int = 128):
        from seqpar import strategies
        from seqpar.kernels.linear import linear_attention_chunk

        strategy = strategies.get(name, "linear")
        op = strategy.load_op()
        (q, k, v), g, gen = self._linear_inputs(1, s, h, d, "token", 80)
        do = torch.randn(1, s, h, d, generator=gen, device=self.dev)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = op(*leaves, log_decay=g, group=None, scale=None, layout="contiguous", backend="auto")
        got = [out, *torch.autograd.grad(out, leaves, do.to(out.dtype))]
        ref_leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
        ref = linear_attention_chunk(*ref_leaves, log_decay=g.double(), backend="torch")[0]
        refs = [ref, *torch.autograd.grad(ref, ref_leaves, do.double())]
        self.record(f"sp {name} linear per-token decay S={s} H={h} D={d}",
                    {n: rel_err(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), got, refs)}, kind="sp_op")

    def sp_ops(self) -> None:
        import torch.distributed as dist

        from seqpar import strategies

        with socket.socket() as sock:  # a free port for the one-rank rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
        print(f"SP ops at world size 1 on {dist.get_backend()}: {strategies.names()}", flush=True)
        try:
            for name in strategies.names("softmax"):
                for packed in (False, True):
                    self.attempt(f"sp {name} {'packed' if packed else 'padded'}",
                                 lambda: self.check_sp_softmax(name, packed), kind="sp_op")
            for name in strategies.names("linear"):
                self.attempt(f"sp {name} linear", lambda: self.check_sp_linear(name), kind="sp_op")
        finally:
            dist.destroy_process_group()

    # --- stage 4: seqpar-train smoke ---------------------------------------------------------------

    def train_smoke(self, steps: int = 5) -> None:
        from seqpar.launch.train import build_parser

        known = {option for action in build_parser()._actions for option in action.option_strings}
        wanted = ("--fsdp", "--activation-checkpointing")
        flags = [f for f in wanted if f in known]
        missing = [f for f in wanted if f not in known]
        if missing:
            self.note(f"train_smoke runs WITHOUT {missing}: seqpar-train's parser has no such flags in this checkout")
        metrics = self.log.results.parent / "gpu_check_train_metrics.jsonl"
        metrics.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "seqpar.launch.train", "--model", "llama-tiny", "--data", "longtail", "--steps", str(steps),
               "--tokens-per-step", "16384", "--max-len", "4096", "--metrics", str(metrics), "--no-progress", *flags]
        print("train smoke: " + " ".join(cmd[1:]), flush=True)
        result: dict[str, Any] = {"cmd": " ".join(cmd[1:]), "flags": flags, "flags_missing": missing}
        start = time.time()
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 timeout=max(10.0, self.deadline - time.time()))
            result.update(rc=run.returncode, tail=(run.stdout + run.stderr).splitlines()[-25:])
        except subprocess.TimeoutExpired as exc:
            result.update(rc=None, error=f"timed out after {exc.timeout:.0f} s")
        result["seconds"] = round(time.time() - start, 1)
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        losses = [r["loss"] for r in rows]
        result.update(steps=len(rows), losses=losses, tokens_per_s=[round(r["tokens_per_s"]) for r in rows],
                      peak_memory_bytes=max((r.get("peak_memory_bytes", 0) for r in rows), default=None))
        result["pass"] = result.get("rc") == 0 and len(rows) == steps and all(math.isfinite(x) for x in losses)
        if not result["pass"]:
            self.failures.append("train_smoke")
        self.log.emit({"type": "train_smoke", "result": result})
        print(f"  [{'PASS' if result['pass'] else 'FAIL'}] seqpar-train {flags or '(no extra flags)'}: rc "
              f"{result.get('rc')}, {len(rows)}/{steps} steps, losses {[round(x, 3) for x in losses]}", flush=True)
        if not result["pass"]:
            print("\n".join(result.get("tail", [])), flush=True)


if __name__ == "__main__":
    sys.exit(main())
