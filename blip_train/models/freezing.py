"""Freezing is explicit: `freeze_(tower)` before the engine is built, and it stays frozen.

A frozen tower must stay in eval mode even when the trainer (or DeepSpeed's engine) calls
`model.train()` on the parent at every step; otherwise dropout and other train-time behaviour would
switch on inside a module nobody trains.
"""
from __future__ import annotations

import functools

from torch import nn


def _train_stays_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    # Called in place of `Module.train` on a frozen module: whatever mode is asked for, eval it is.
    return type(self).train(self, False)


def freeze_(module: nn.Module) -> nn.Module:
    """Freeze `module` in place: no parameter requires grad, eval mode, and `.train()` cannot undo it.

    Every submodule's `train` is replaced on the instance, so neither a parent's `.train()` (which
    recurses through children) nor a direct call on a submodule switches train mode back on.
    Returns the module for chaining.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    for sub in module.modules():
        # A partial (not a bound method) so frozen modules still pickle and deepcopy.
        sub.train = functools.partial(_train_stays_eval, sub)
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """True when `freeze_` was applied to this module (or a module containing it)."""
    return getattr(module.train, "func", None) is _train_stays_eval


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts of the module's unique parameters.

    Under ZeRO-3 a partitioned parameter has numel 0 locally; its full size is in `ds_numel`, read
    here by name so models never import deepspeed.
    """
    trainable = frozen = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen
