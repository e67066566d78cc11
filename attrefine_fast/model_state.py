"""The model state that attacks and explanations change while they run: each module's train/eval
mode (eval for explanations and attacks) and each parameter's ``requires_grad`` (off for attacks,
which need gradients of the input only).

The first caller to hold a model saves that state and the last one to let go restores it, under
one lock: calls on one model from several threads, or nested calls, leave the model as it was
before any of them (each restoring what it saw on entry would freeze the model for good when two
threads overlap, and let one thread's exit switch another's forward passes back to train mode).

    with frozen(model):          # eval mode, parameters without requires_grad
        ...
    with evaluating(model):      # eval mode only
        ...
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator

from torch import nn

_lock = threading.Lock()
# model -> {aspect: [holders, saved state]}, aspect "mode" or "grad"
_held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (it is switched to eval mode and its parameters frozen), "
                        f"got {type(model).__name__}")


@contextlib.contextmanager
def _holding(model: nn.Module, aspect: str, save: Callable, apply: Callable, restore: Callable) -> Iterator[None]:
    with _lock:
        entry = _held.setdefault(model, {})
        if aspect in entry:
            entry[aspect][0] += 1
        else:
            entry[aspect] = [1, save()]
        try:
            apply()
        except BaseException as error:  # (an overridden train() that raises): let go as on a normal exit
            try:
                _release(model, entry, aspect, restore)
            except Exception as also:  # the restore may fail the same way: the first error is the cause
                if hasattr(error, "add_note"):  # (Python 3.11 and later)
                    error.add_note(f"restoring the model's state failed too: {type(also).__name__}: {also}")
            raise
    try:
        yield
    finally:
        with _lock:
            _release(model, entry, aspect, restore)


def _release(model: nn.Module, entry: dict, aspect: str, restore: Callable) -> None:
    """One holder fewer; the last restores the saved state (under _lock)."""
    slot = entry[aspect]
    slot[0] -= 1
    if slot[0] == 0:
        del entry[aspect]
        if not entry:
            _held.pop(model, None)
        restore(slot[1])


def _restore_modes(model: nn.Module, saved) -> None:
    """Each module's mode as saved, through train(): a module may do more there than set its flag
    (a LoRA layer merges its low-rank weights on train(False) and takes them out on train(True)).
    train() sets a whole subtree, so the model first, then each module that differs, parents before
    their children (the modules' order), each one's last call with its own flag."""
    model.train(saved[0][1])
    for m, training in saved[1:]:
        if m.training != training:
            m.train(training)
    # a module shared by two parents is listed once: the later parent's train() may have reset it
    for m, training in saved:
        m.training = training


def _modes(model: nn.Module):
    return _holding(
        model, "mode",
        save=lambda: [(m, m.training) for m in model.modules()],
        apply=model.eval,
        restore=lambda saved: _restore_modes(model, saved),
    )


def _grads(model: nn.Module):
    params = list(model.parameters())
    return _holding(
        model, "grad",
        save=lambda: [(p, p.requires_grad) for p in params],
        apply=lambda: [p.requires_grad_(False) for p in params],
        restore=lambda saved: [p.requires_grad_(requires_grad) for p, requires_grad in saved],
    )


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; each module's ``training`` flag as it was before restored by the
    last block holding the model."""
    _check_module(model)
    with _modes(model):
        yield model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` for the parameters inside the block; each module's
    ``training`` flag and each parameter's ``requires_grad`` as they were before restored by the
    last block holding the model."""
    _check_module(model)
    with _modes(model), _grads(model):
        yield model
