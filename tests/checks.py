"""Error measures shared by the tests."""

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (the contract's relative error)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def value_errors(calls: dict) -> dict:
    """Run each zero-argument call; map its name to its ValueError message, or None when it did not raise."""
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    return messages
