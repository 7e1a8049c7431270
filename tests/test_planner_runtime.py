"""``strategy="auto"`` at a world that is not a power of two, and a plan with micro-batches, against one float64
process (tiny Llama, real gloo ranks)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import seqpar
from seqpar.solver import CostModel
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import MODELS, cpu_cost_model, reference_loss_and_grads


def cost_model_for(world: int, mem_tokens: int | None = None) -> CostModel:
    """``cpu_cost_model`` on ``world`` ranks; with ``mem_tokens``, memory for about that many packed tokens per
    rank beyond the model state (so a plan must run some groups as micro-batches)."""
    cm = cpu_cost_model()
    cluster = replace(cm.cluster, world_size=world, gpus_per_node=world)
    cm = replace(cm, cluster=cluster)
    if mem_tokens is not None:
        mem = cm.model_state_bytes() + cm.model.token_activation_bytes() * mem_tokens
        cm = replace(cm, cluster=replace(cluster, mem_bytes=mem))
    return cm


def auto_step_matches_reference(lengths, world, mem_tokens=None, cores=None):
    model = MODELS["llama"]()
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 96, (n,), generator=gen) for n in lengths]
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    cost_model = cost_model_for(world, mem_tokens)
    cost_model = replace(cost_model, cluster=replace(cost_model.cluster, cores_per_node=cores))
    sp_model = seqpar.parallelize(model, strategy="auto", cost_model=cost_model)
    loss, plan, ran = train_micro_batches(sp_model, sp_model.prepare(sequences))
    sp_model.sync_gradients()
    grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads)
    sizes = sorted(len(g.ranks) for g in plan.groups)
    return abs(loss - ref_loss) / abs(ref_loss), grad_err, sizes, plan.num_micro_batches, ran


def train_micro_batches(call, prepared):
    """Forward + backward through ``call`` of every micro-batch ``SPModel.prepare`` gave (one dict, or a list):
    the summed loss, the last step's plan and how many micro-batches ran."""
    micro_batches = prepared if isinstance(prepared, list) else [prepared]
    loss, plan = 0.0, None
    for local in micro_batches:
        out = call(**local)
        out.loss.backward()
        loss += out.loss.item()
        plan = out.plan
    return loss, plan, len(micro_batches)


def test_auto_at_three_ranks_equals_one_process():
    results = run_distributed(auto_step_matches_reference, 3, [300, 40, 24, 64], 3)
    for loss_err, grad_err, sizes, _, _ in results:
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)
        assert sum(sizes) == 3
    assert all(r[2] == results[0][2] for r in results)  # every rank ran rank 0's plan


def test_auto_on_shared_cores_equals_one_process():
    # 4 ranks on 2 cores: plans scored by the shared-core step time (the longest sequence alone, idle groups)
    results = run_distributed(auto_step_matches_reference, 4, [400, 20, 24, 16, 30, 18, 22], 4, None, 2)
    for loss_err, grad_err, sizes, _, _ in results:
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)
        assert sum(sizes) == 4
    assert all(r[2] == results[0][2] for r in results)


def test_micro_batched_auto_step_equals_one_process():
    # memory for ~160 packed tokens per rank: 4 x 150 tokens cannot run as one call anywhere on 2 ranks
    results = run_distributed(auto_step_matches_reference, 2, [150, 150, 150, 150, 20], 2, mem_tokens=160)
    for loss_err, grad_err, _, planned, ran in results:
        assert loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)
        assert planned > 1 and ran == planned


def kill_planning_worker(runner):
    """Rank 0: SIGKILL the plan-ahead worker process and wait until it is gone."""
    process = runner._prefetcher._process
    process.kill()
    process.wait()
    return process.pid


def planned_ahead_steps_match_reference(lengths_per_step, world, kill_workers=False):
    """``kill_workers``: rank 0 kills the planning worker right after the first plan_ahead (before it can answer:
    its start-up alone takes longer) and again before the last step's plan_ahead."""
    model = MODELS["llama"]()
    gen = torch.Generator().manual_seed(2)
    steps = [[torch.randint(0, 96, (n,), generator=gen) for n in lengths] for lengths in lengths_per_step]
    sp_model = seqpar.parallelize(model, strategy="auto", cost_model=cost_model_for(world))
    runner = sp_model.runner
    errors, killed = [], []
    sp_model.plan_ahead([s.numel() for s in steps[0]])
    if kill_workers and runner.rank == 0:
        killed.append(kill_planning_worker(runner))
    for k, sequences in enumerate(steps):
        ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            local = sp_model.prepare(sequences)
        killed += [str(w.message) for w in caught if "planning it inline" in str(w.message)]
        if k + 1 < len(steps):
            if kill_workers and runner.rank == 0 and k + 2 == len(steps):
                killed.append(kill_planning_worker(runner))
            sp_model.plan_ahead([s.numel() for s in steps[k + 1]])
        out = sp_model(**local)
        out.loss.backward()
        sp_model.sync_gradients()
        grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads)
        errors.append((abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err))
        model.zero_grad(set_to_none=True)
    worker = runner._prefetcher.worker_pid if runner._prefetcher is not None else None
    return errors, runner.plans_from_ahead, killed, worker


def test_plans_made_a_step_ahead_are_used_and_correct():
    results = run_distributed(planned_ahead_steps_match_reference, 2, [[200, 30, 60], [90, 90, 16, 120]], 2)
    for errors, *_ in results:
        assert all(loss_err < 1e-5 and grad_err < 1e-4 for loss_err, grad_err in errors), errors
    assert results[0][1] == 2  # rank 0 took both plans from the background planner
    assert results[0][3] is not None and results[0][3] != os.getpid()  # ... a child process of its own


def test_a_killed_planning_worker_costs_one_inline_plan_and_is_replaced():
    lengths = [[200, 30, 60], [90, 90, 16, 120], [50, 150, 70]]
    results = run_distributed(planned_ahead_steps_match_reference, 2, lengths, 2, True)
    for errors, *_ in results:
        assert all(loss_err < 1e-5 and grad_err < 1e-4 for loss_err, grad_err in errors), errors
    errors, from_ahead, killed, worker = results[0]
    first_pid, lost, second_pid = killed
    assert "exited with code -9" in lost  # step 0's plan was lost with the worker: planned inline, with a warning
    assert from_ahead == 2  # steps 1 and 2: a new worker after each kill (the second found dead at submit)
    assert len({first_pid, second_pid, worker}) == 3


def calibrate_twice(path):
    from seqpar.launch import calibrate

    model = MODELS["llama"]()
    sp_model = seqpar.parallelize(model, strategy="auto", cost_model=cost_model_for(2))
    base = sp_model.config.cost_model
    first = calibrate.calibrated_cost_model(sp_model, base, path, model_name="tiny", lengths=(32, 128), repeats=1,
                                            vocab_size=96)
    measured = calibrate._read(Path(path))["measurements"]

    def no_profile(*args, **kwargs):
        raise AssertionError("profiled again although the cache matches")

    profile, calibrate.profile = calibrate.profile, no_profile
    try:  # the rank processes are reused by later tests: put profile back
        second = calibrate.calibrated_cost_model(sp_model, base, path, model_name="tiny", lengths=(32, 128),
                                                 vocab_size=96)
    finally:
        calibrate.profile = profile
    calibrate.use_cost_model(sp_model, second)
    return first.coefficients, second.coefficients, measured, sp_model.runner.config.cost_model is second


def test_calibration_profiles_every_shape_at_two_lengths_and_is_cached(tmp_path):
    path = str(tmp_path / "calibration.json")
    for first, second, measured, installed in run_distributed(calibrate_twice, 2, path):
        assert first == second and installed
        shapes = {(m["degree"], m["strategy"]) for m in measured}
        assert shapes == {(1, "ulysses"), (2, "ulysses"), (2, "ring"), (2, "token_ring")}
        assert {m["length"] for m in measured if m["sequences"] == 1} == {32, 128}
        assert all(m["seconds"] > 0 for m in measured)
        # one packed call per shape, of short sequences of unequal lengths (real batches take the per-sequence path)
        packed = [m for m in measured if m["sequences"] > 1]
        assert len(packed) == len(shapes)
        assert all(len(set(m["lengths"])) > 1 and max(m["lengths"]) < 32 for m in packed)


def calibrate_on_batches(path, batches, other_batches):
    from seqpar.launch import calibrate

    sp_model = seqpar.parallelize(MODELS["llama"](), strategy="auto", cost_model=cost_model_for(2))
    base = sp_model.config.cost_model
    options = dict(model_name="tiny", lengths=(32, 128), repeats=1, vocab_size=96)
    fitted = calibrate.calibrated_cost_model(sp_model, base, path, batches=batches, **options)
    first = calibrate._read(Path(path))
    again = calibrate.calibrated_cost_model(sp_model, base, path, batches=batches, **options)  # the cache
    calibrate.calibrated_cost_model(sp_model, base, path, batches=other_batches, **options)  # profiled
    return fitted.coefficients, again.coefficients, first, calibrate._read(Path(path))


def test_calibration_on_the_runs_batches_times_every_static_plan_and_scales_each_shape(tmp_path):
    path = str(tmp_path / "calibration.json")
    batches, other = [[60, 20, 90], [130, 12]], [[100, 100]]
    results = run_distributed(calibrate_on_batches, 2, path, batches, other)
    for fitted, again, first, last in results:
        assert again == fitted == results[0][0]  # every rank plans with the same model; the cache matched
        timed = first["static_plans"]
        shapes = {(1, "ulysses"), (2, "ulysses"), (2, "ring"), (2, "token_ring")}
        assert sorted((m["degree"], m["strategy"], tuple(m["lengths"])) for m in timed) == sorted(
            (d, s, tuple(b)) for d, s in shapes for b in batches)
        assert {(s, d) for s, d, _ in fitted.shape_scales} == {(s, d) for d, s in shapes}
        # scaled, each shape's static plans are off their measurements by factors whose geometric mean is 1
        for degree, name in shapes:
            logs = [math.log(p / m["seconds"]) for m, p in zip(timed, first["static_plans_predicted_s"])
                    if (m["degree"], m["strategy"]) == (degree, name)]
            assert abs(sum(logs)) < 1e-9 and len(logs) == len(batches)
        assert first["key"]["batches"] == batches and last["key"]["batches"] == other
        assert [m["lengths"] for m in last["static_plans"]] == [[100, 100]] * len(shapes)


def calibrate_on_shared_cores(path, world):
    from seqpar.launch import calibrate

    cost_model = cost_model_for(world)
    cost_model = replace(cost_model, cluster=replace(cost_model.cluster, cores_per_node=1))
    sp_model = seqpar.parallelize(MODELS["llama"](), strategy="auto", cost_model=cost_model)
    fitted = calibrate.calibrated_cost_model(sp_model, cost_model, path, model_name="tiny", lengths=(32, 128),
                                             repeats=1, vocab_size=96)
    return fitted.coefficients.effective_cores, calibrate._read(Path(path))["measurements"]


@pytest.mark.parametrize("world", [2, 3])
def test_calibration_on_shared_cores_profiles_a_step_with_idle_groups(tmp_path, world):
    # ranks on one core: the profile adds one degree-1 step with the second half of the groups idle, and the fit
    # sets effective_cores between the host's core and the node's ranks
    results = run_distributed(calibrate_on_shared_cores, world, str(tmp_path / "calibration.json"), world)
    cores, measured = results[0]
    idle_steps = [m for m in measured if m["busy_groups"] is not None]
    assert [(m["degree"], m["busy_groups"]) for m in idle_steps] == [(1, (world + 1) // 2)]
    assert 1.0 <= cores <= world
    assert all(r[0] == cores for r in results)  # every rank plans with the same model


def plan_ahead_budgets(lengths_per_step, world, step_seconds, gain_first=None):
    """Run steps that last at least ``step_seconds`` each (a sleep stands in for training) with every step's
    plan made a step ahead; rank 0's budget for each solve, the step time it scaled with, and its waits.
    ``gain_first``: ``PLAN_GAIN_FIRST`` for this run (more plans than it runs: never the cheap budget)."""
    import time

    from seqpar.runtime import steps as steps_mod

    if gain_first is not None:
        first = steps_mod.PLAN_GAIN_FIRST
        steps_mod.PLAN_GAIN_FIRST = gain_first
        try:
            return plan_ahead_budgets(lengths_per_step, world, step_seconds)
        finally:  # the rank processes are reused by later tests
            steps_mod.PLAN_GAIN_FIRST = first

    model = MODELS["llama"]()
    gen = torch.Generator().manual_seed(4)
    batches = [[torch.randint(0, 96, (n,), generator=gen) for n in lengths] for lengths in lengths_per_step]
    sp_model = seqpar.parallelize(model, strategy="auto", cost_model=cost_model_for(world))
    runner = sp_model.runner
    sp_model.plan_ahead([s.numel() for s in batches[0]])
    budgets, measured, predicted, waits = [runner.last_plan_budget_s], [], [], []
    for k, sequences in enumerate(batches):
        started = time.perf_counter()
        local = sp_model.prepare(sequences)
        waits.append(runner.last_plan_wait_s)
        measured.append(runner._step_seconds)
        predicted.append(local["seqpar_step"].plan.makespan_s)
        if k + 1 < len(batches):
            sp_model.plan_ahead([s.numel() for s in batches[k + 1]])
            budgets.append(runner.last_plan_budget_s)
        sp_model(**local).loss.backward()
        model.zero_grad(set_to_none=True)
        time.sleep(max(step_seconds - (time.perf_counter() - started), 0.0))
    return budgets, measured, predicted, waits, runner.plans_from_ahead, steps_mod.PLAN_AHEAD_SHARE["cpu"]


def inline_budgets(lengths_per_step, world, step_seconds):
    """Run steps of at least ``step_seconds`` with nothing planned ahead; rank 0's budget for each inline solve
    and the step time it scaled with."""
    import time

    import seqpar.solver as solver
    from seqpar.runtime import steps as steps_mod

    model = MODELS["llama"]()
    gen = torch.Generator().manual_seed(4)
    batches = [[torch.randint(0, 96, (n,), generator=gen) for n in lengths] for lengths in lengths_per_step]
    sp_model = seqpar.parallelize(model, strategy="auto", cost_model=cost_model_for(world))
    budgets, measured, original = [], [], solver.plan_step

    def recording(seq_lens, cost_model, **options):
        budgets.append(options.get("time_limit_s"))
        return original(seq_lens, cost_model, **options)

    solver.plan_step = recording
    try:
        for sequences in batches:
            started = time.perf_counter()
            local = sp_model.prepare(sequences)
            measured.append(sp_model.runner._step_seconds)
            sp_model(**local).loss.backward()
            model.zero_grad(set_to_none=True)
            time.sleep(max(step_seconds - (time.perf_counter() - started), 0.0))
    finally:
        solver.plan_step = original
    return budgets, measured, steps_mod.PLAN_INLINE_SHARE


def test_plans_made_inside_the_step_get_a_share_of_the_last_step():
    # nothing planned ahead (a user who never calls plan_ahead, or --no-plan-ahead): a 1 s solve inside every
    # 0.25 s step halved auto's tokens/s on the CPU; from the second step the budget scales with the last step
    lengths = [[200, 30, 60], [90, 90, 16, 120], [40, 40, 40, 40]]
    results = run_distributed(inline_budgets, 2, lengths, 2, 0.6)
    budgets, measured, share = results[0]
    assert budgets[0] == 1.0 and measured[0] is None  # no step measured yet: plan_step's default
    for k in (1, 2):
        assert measured[k] > 0.55 and budgets[k] == pytest.approx(min(max(share * measured[k], 0.01), 1.0))
    assert results[1][0] == []  # only rank 0 plans


def test_plans_made_ahead_get_a_share_of_the_step_and_are_ready_when_it_ends():
    # issue 16: a 5 s solve per step in the background took the CPU's cores from training (auto 10-35% slower than
    # the same layout run as --dp); the budget is now a share of the step it overlaps, so the solve ends within it
    lengths = [[200, 30, 60], [90, 90, 16, 120], [40, 40, 40, 40], [150, 60]]
    results = run_distributed(plan_ahead_budgets, 2, lengths, 2, 0.6, len(lengths))  # (cheap budgets: below)
    budgets, measured, predicted, waits, from_ahead, share = results[0]
    assert from_ahead == 4
    assert budgets[0] == 1.0  # before any step: plan_step's inline budget
    assert budgets[1] == pytest.approx(max(share * predicted[0], 0.01))  # one step in: its predicted makespan
    # then the step time measured between prepares: the 0.6 s each step lasted, less the difference of the two
    # prepares' time before they read the clock (CI once measured 0.59982)
    for k in (2, 3):
        assert measured[k - 1] >= 0.59 and budgets[k] == pytest.approx(min(max(share * measured[k - 1], 0.01), 5.0))
    # each solve had at most 5% of a 0.6 s step: it was ready before the step ended (the wait is the queue's)
    assert max(waits[1:]) < 0.1, waits
    assert all(set(r[0]) == {None} and r[4] == 0 for r in results[1:])  # only rank 0 plans


CHEAP_MARK_S = 0.0123  # PLAN_AHEAD_CHEAP_S in these runs: no other budget equals it (the floor, 0.01, may)


def budgets_and_gains(lengths_per_step, world, step_seconds):
    """``plan_ahead_budgets``' run, also returning each step's predicted gain over the fastest static plan; the
    cheap budget is ``CHEAP_MARK_S``, so the budgets that are cheap can be told from the others."""
    from seqpar.runtime import steps as steps_mod
    from seqpar.runtime.steps import StepRunner

    gains, static_only = [], []
    original, cheap = StepRunner.prepare, steps_mod.PLAN_AHEAD_CHEAP_S
    steps_mod.PLAN_AHEAD_CHEAP_S = CHEAP_MARK_S

    def recording(self, batch, **options):
        local = original(self, batch, **options)
        plan = local["seqpar_step"].plan
        gains.append(plan.static_makespan_s / plan.makespan_s - 1.0)
        static_only.append("solver='static'" in plan.note)
        return local

    StepRunner.prepare = recording
    try:
        budgets, *_ = plan_ahead_budgets(lengths_per_step, world, step_seconds)
    finally:  # the rank processes are reused by later tests
        StepRunner.prepare, steps_mod.PLAN_AHEAD_CHEAP_S = original, cheap
    return budgets, gains, static_only


def test_plans_made_ahead_get_little_time_while_planning_gains_nothing():
    # on the CPU the solve's cores are training's: on the short mix a 5%-of-step solve cost ~2.5% of the step for
    # plans predicted 0.1% faster than the static one; balanced equal lengths are such batches
    from seqpar.runtime import steps as steps_mod

    lengths = [[64] * 4] * 11
    budgets, gains, static_only = run_distributed(budgets_and_gains, 2, lengths, 2, 0.05)[0]
    assert max(gains) < steps_mod.PLAN_GAIN_WORTH and min(gains) >= 0.0
    full = [k for k, b in enumerate(budgets) if b != CHEAP_MARK_S]
    # budgets[k] is asked for once step k - 1 has its plan: cheap from the 2nd plan that gained nothing on, but
    # for the probe (the 8th plan asked for, budgets[7]) that looks for batches where planning pays again
    assert full == [0, 1, 7], budgets
    assert budgets[0] == 1.0 and all(b >= 0.01 for b in budgets[1:2] + budgets[7:8])
    # a cheap plan scores the static plans only (plan_step's solver="static"); the others search
    assert static_only == [k not in full for k in range(len(lengths))], static_only


def scripted_gain_budgets(lengths_per_step, gains, world, step_seconds):
    """``budgets_and_gains`` with each step's plan reporting the gain ``gains[k]`` over the static plans (the
    plans made in a thread of rank 0, so the scripted planner is the one used)."""
    import functools

    import seqpar.solver as solver
    import seqpar.solver.prefetch as prefetch

    real, real_prefetcher = prefetch.plan_step, solver.PlanPrefetcher
    gain_of = {tuple(lengths): gain for lengths, gain in zip(lengths_per_step, gains)}

    def scripted(seq_lens, cost_model, **options):
        plan = real(seq_lens, cost_model, **options)
        plan.static_makespan_s = plan.makespan_s * (1.0 + gain_of[tuple(int(n) for n in seq_lens)])
        return plan

    prefetch.plan_step = solver.plan_step = scripted
    solver.PlanPrefetcher = functools.partial(real_prefetcher, use_process=False)
    try:
        return budgets_and_gains(lengths_per_step, world, step_seconds)
    finally:
        prefetch.plan_step, solver.plan_step, solver.PlanPrefetcher = real, real, real_prefetcher


def test_plans_made_ahead_get_their_share_back_once_planning_gains():

    lengths = [[64, 64, 64, 64 + k] for k in range(12)]
    scripted = [0.0] * 12
    scripted[5] = 0.05  # step 5's plan gains 5% over the static plans
    budgets, gains, _ = run_distributed(scripted_gain_budgets, 2, lengths, scripted, 2, 0.05)[0]
    assert gains == pytest.approx(scripted)
    cheap = [k for k, b in enumerate(budgets) if b == CHEAP_MARK_S]
    # budgets[k] is asked for once step k - 1 has its plan: cheap after 2 plans that gained nothing, full again
    # from the plan after step 5's, for as long as step 5 is among the last PLAN_GAIN_WINDOW plans
    assert cheap == [2, 3, 4, 5], budgets
