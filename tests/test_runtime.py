"""The runtime layer: plans -> cached process groups, every registered strategy run through parallelize, a
hand-built hybrid plan run exactly as planned, the executed plan in SPOutput, scoped consistency checks.

Correctness is against one float64 process (test_parallelize.reference_loss_and_grads), 1e-6 in float64."""

import contextlib
import importlib

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import MODELS, reference_loss_and_grads

import seqpar
from seqpar import strategies
from seqpar.collectives import comm, count_comm
from seqpar.solver import Group, Plan

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")


WORLD = 4
HEADS, KV_HEADS = 4, 2  # the tiny Llama's and the tiny MiniMax's


def float64_model(name):
    model = MODELS[name]().double()
    if hasattr(model, "set_experts_implementation"):  # grouped_mm has no float64 kernel; eager MoE is plain math
        model.set_experts_implementation("eager")
    return model


def sequences_for(lengths):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (n,), generator=gen) for n in lengths]


@contextlib.contextmanager
def counting_registered_ops():
    """Count, per strategy name, the calls of the op the registry names for it (patched where it lives)."""
    calls = dict.fromkeys(strategies.names(), 0)
    patched = []
    for name in strategies.names():
        module_name, attr = strategies.get(name).op.split(":")
        module = importlib.import_module(module_name)
        original = getattr(module, attr)

        def counted(*args, __name=name, __original=original, **kwargs):
            calls[__name] += 1
            return __original(*args, **kwargs)

        setattr(module, attr, counted)
        patched.append((module, attr, original))
    try:
        yield calls
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)


def step_errors(model_name, lengths, *, plan=None, **options):
    """One training step of ``model_name`` in float64 through parallelize; (loss error, worst gradient error,
    parameters without a gradient, the SPOutput fields, the ops this rank communicated with, the registered
    strategies whose op ran, with their call counts)."""
    model = float64_model(model_name)
    sequences = sequences_for(lengths)
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    sp_model = seqpar.parallelize(model, **options)
    with count_comm() as stats, counting_registered_ops() as op_calls:
        out = sp_model(**sp_model.prepare(sequences, plan=plan))
        out.loss.backward()
    sp_model.sync_gradients()
    grad_errors = [rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads]
    missing = [n for n, p in model.named_parameters() if n in ref_grads and p.grad is None]
    executed = (out.plan.to_json() if out.plan is not None else None, out.group_ranks, out.softmax_strategy,
                out.linear_strategy)
    ran = {name: n for name, n in op_calls.items() if n}
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), max(grad_errors), missing, executed, set(stats.calls), ran


# ---------------------------------------------------------------------------------------------------
# every registered strategy (a newly registered one is collected here without editing this file)
# ---------------------------------------------------------------------------------------------------


def runnable_world(name):
    """WORLD when the strategy is valid there for the tiny models' heads, else the largest smaller valid one."""
    strategy = strategies.get(name)
    return next(p for p in (WORLD, 2, 1) if strategy.valid(p, HEADS, KV_HEADS))


@pytest.mark.parametrize("name", strategies.names("softmax"))
def test_every_registered_softmax_strategy_runs_a_llama_exactly(name):
    world = runnable_world(name)
    results = run_distributed(step_errors, world, "llama", [64, 24], strategy=name, verify_model=False)
    for loss_err, grad_err, missing, executed, _, ran in results:
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (name, world, loss_err, grad_err)
        assert executed == (None, tuple(range(world)), name, None), executed
        assert ran == {name: 2}, ran  # the registry's op for it, once per layer


@pytest.mark.parametrize("name", strategies.names("linear"))
def test_every_registered_linear_strategy_runs_the_minimax_hybrid_exactly(name):
    world = runnable_world(name)
    results = run_distributed(step_errors, world, "minimax", [64, 24], strategy="ring", linear_strategy=name,
                              verify_model=False)
    for loss_err, grad_err, missing, executed, _, ran in results:
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (name, world, loss_err, grad_err)
        assert executed == (None, tuple(range(world)), "ring", name), executed
        assert ran == {"ring": 1, name: 1}, ran  # one softmax layer; one linear call for the packed batch


# ---------------------------------------------------------------------------------------------------
# hand-built hybrid plans
# ---------------------------------------------------------------------------------------------------

# groups of sizes 2, 1, 1, each with its own (softmax, linear) pair. Ranks 0-1 run Ulysses + LASP-2, which
# communicate only by all-to-all and all-gather: a "send" there would mean ring / token_ring / ZeCO ran instead.
HYBRID_PLAN = Plan(
    groups=[Group((0, 1), "ulysses", "lasp2", [0], 0.0), Group((2,), "ring", "zeco", [2], 0.0),
            Group((3,), "token_ring", "lasp2", [1], 0.0)],
    makespan_s=0.0, solver_status="static", note="hand-built",
)


def test_a_hand_built_hybrid_plan_runs_exactly_as_planned():
    results = run_distributed(step_errors, WORLD, "minimax", [64, 24, 40], plan=HYBRID_PLAN, verify_model=False)
    for rank, (loss_err, grad_err, missing, executed, ops, ran) in enumerate(results):
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (rank, loss_err, grad_err)
        plan_json, group_ranks, softmax, linear = executed
        assert Plan.from_json(plan_json) == HYBRID_PLAN  # SPOutput.plan is the plan the step ran
        mine = next(g for g in HYBRID_PLAN.groups if rank in g.ranks)
        assert (group_ranks, softmax, linear) == (mine.ranks, mine.softmax_strategy, mine.linear_strategy)
        assert set(ran) == {softmax, linear}, ran  # what was planned, nothing else
        if rank < 2:
            assert {"all_to_all", "all_gather"} <= ops and "send" not in ops, ops


def test_the_auto_plan_is_returned_and_equal_on_every_rank():
    from tests.test_parallelize import cpu_cost_model

    results = run_distributed(step_errors, WORLD, "llama", [200, 16, 40, 24], strategy="auto",
                              cost_model=cpu_cost_model(), verify_model=False)
    plans = [Plan.from_json(r[3][0]) for r in results]
    assert all(p == plans[0] for p in plans)
    for rank, (loss_err, grad_err, _, (_, group_ranks, softmax, _), _, _) in enumerate(results):
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)
        mine = next(g for g in plans[0].groups if rank in g.ranks)
        assert group_ranks == mine.ranks and softmax == mine.softmax_strategy


def test_auto_on_a_hybrid_model_with_the_default_cost_model_mixes_group_sizes_and_equals_one_process():
    # one long sequence and several short ones: the long one wants a group of several ranks, the short ones
    # are cheapest alone, so the planned groups differ in size (and every group runs a softmax + linear pair)
    results = run_distributed(step_errors, WORLD, "minimax", [512, 24, 16, 8, 40, 32], strategy="auto")
    plans = [Plan.from_json(r[3][0]) for r in results]
    assert all(p == plans[0] for p in plans)
    assert len({g.degree for g in plans[0].groups}) > 1, plans[0]
    assert all(g.softmax_strategy and g.linear_strategy for g in plans[0].groups), plans[0]
    for rank, (loss_err, grad_err, missing, (_, group_ranks, softmax, linear), _, ran) in enumerate(results):
        assert loss_err < 1e-6 and grad_err < 1e-6 and not missing, (loss_err, grad_err, missing)
        mine = next(g for g in plans[0].groups if rank in g.ranks)
        assert (group_ranks, softmax, linear) == (mine.ranks, mine.softmax_strategy, mine.linear_strategy)
        assert set(ran) <= {softmax, linear}, ran


# ---------------------------------------------------------------------------------------------------
# process groups: created once per (parent, ranks), reused by later steps and other plans
# ---------------------------------------------------------------------------------------------------


def plan_of(*groups):
    return Plan(groups=[Group(ranks, "ring", None, seqs, 0.0) for ranks, seqs in groups], makespan_s=0.0,
                solver_status="static")


def groups_of_three_steps():
    model = MODELS["llama"]()
    sp_model = seqpar.parallelize(model, strategy="ring", verify_model=False)  # a plan given to prepare wins
    sequences = sequences_for([32, 16, 24])
    first = plan_of(((0, 1), [0]), ((2,), [1]), ((3,), [2]))
    second = plan_of(((0, 1), [1]), ((2, 3), [0, 2]))
    steps = [sp_model.prepare(sequences, plan=p)["seqpar_step"] for p in (first, first, second)]
    rank = dist.get_rank()
    return (steps[0].group is steps[1].group,  # same plan again: the same group object
            steps[0].group is steps[2].group,  # another plan with the same group for this rank: reused
            [dist.get_process_group_ranks(s.group) for s in steps], rank)


def test_plan_groups_are_created_once_and_reused_across_steps_and_plans():
    for same_plan, other_plan, members, rank in run_distributed(groups_of_three_steps, WORLD):
        expected_first = [0, 1] if rank < 2 else [rank]
        assert members[0] == members[1] == expected_first
        assert same_plan
        assert members[2] == ([0, 1] if rank < 2 else [2, 3])
        assert other_plan == (rank < 2)  # ranks 0-1 keep their group; ranks 2-3 got a new, larger one


def bad_plans():
    sp_model = seqpar.parallelize(MODELS["llama"](), strategy="ring", verify_model=False)
    sequences = sequences_for([16, 16])
    cases = {
        "uncovered": plan_of(((0, 1), [0, 1])),
        "overlap": plan_of(((0, 1), [0]), ((1, 2, 3), [1])),
        "sequence-twice": plan_of(((0, 1), [0, 1]), ((2, 3), [1])),
        "unknown-strategy": Plan([Group((0, 1, 2, 3), "spiral", None, [0, 1], 0.0)], 0.0, "static"),
        "ulysses-heads": Plan([Group((0, 1, 2), "ulysses", None, [0, 1], 0.0), Group((3,), "ring", None, [], 0.0)],
                              0.0, "static"),
    }
    messages = {}
    for name, plan in cases.items():
        with count_comm() as stats:
            try:
                sp_model.prepare(sequences, plan=plan)
                messages[name] = None
            except ValueError as err:
                messages[name] = str(err)
        messages[name + "-sent"] = set(stats.calls) - {"broadcast"}  # only the plan broadcast itself
    return messages


def test_a_plan_that_cannot_run_is_refused_on_every_rank():
    per_rank = run_distributed(bad_plans, WORLD)
    for messages in per_rank:
        for name in ("uncovered", "overlap", "sequence-twice", "unknown-strategy", "ulysses-heads"):
            assert messages[name] is not None and messages[name].startswith("plan:"), (name, messages[name])
            assert messages[name + "-sent"] == set(), messages
        assert "'ulysses'" in messages["ulysses-heads"]


# ---------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------


def consistency_scope():
    with comm.agreement_checks(False):  # the surrounding setting the model's forward must not change for good
        before = comm.agreement_checks_enabled()
        model = MODELS["gpt"]()
        seen = []
        model.register_forward_hook(lambda *_: seen.append(comm.agreement_checks_enabled()))
        config = seqpar.SPConfig(check_consistency=True, strategy="ulysses")
        sp_model = seqpar.parallelize(model, config=config, strategy="token_ring", verify_model=False)  # overrides
        sp_model(**sp_model.prepare(sequences_for([32])))
        return before, seen, comm.agreement_checks_enabled(), sp_model.config


def test_check_consistency_is_scoped_to_the_forward():
    for before, during, after, config in run_distributed(consistency_scope, 2):
        assert before is False and during == [True] and after is False
        assert (config.strategy, config.check_consistency, config.verify_model) == ("token_ring", True, False)


def test_sp_config_validates_each_field_by_name():
    cases = {
        "strategy": dict(strategy="spiral"),
        "linear_strategy": dict(linear_strategy="ring"),  # a softmax strategy is not a linear one
        "layout": dict(layout="diagonal"),
        "backend": dict(backend=""),
        "cost_model": dict(strategy="ring", cost_model=object()),
        "check_consistency": dict(check_consistency="yes"),
        "verify_model": dict(verify_model=1),
        "group": dict(group="world"),
    }
    for field, options in cases.items():
        with pytest.raises(ValueError) as err:
            seqpar.SPConfig(**options).validate()
        assert str(err.value).startswith(f"{field}:"), (field, str(err.value))
    with pytest.raises(ValueError) as err:
        seqpar.parallelize(torch.nn.Linear(2, 2), config={"strategy": "ring"})
    assert str(err.value).startswith("config:")
    config = seqpar.SPConfig(strategy="auto", linear_strategy=strategies.names("linear")[0])
    assert config.validate() is config
    with pytest.raises(AttributeError):
        config.strategy = "ring"  # frozen
