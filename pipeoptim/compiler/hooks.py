"""User hooks on modules: which survive tracing, and keeping them quiet while profiling.

A module that stays a module in the stage graphs (a leaf: named in ``leaf_modules``, one of
:func:`~pipeoptim.compiler.trace.is_default_leaf`, or inside one) is called as a module at
run time, so its forward pre-hooks, forward hooks and backward hooks run exactly as in the
plain model (once per micro-batch). A module ``torch.fx`` traces through is inlined: its hooks
ran once while tracing, on symbolic values, so a hook's effect on the output is in the graph
but its side effects (a counter, a tensor hook, a log line) never happen in training;
``torch.export`` drops them the same way. :func:`dropped_hooks_warning` names those modules.

A submodule the user wrapped in ``torch.compile`` (an ``OptimizedModule``) is traced through
the same way: the stages run its code eagerly, and :func:`compiled_modules_warning` says so.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

from torch import nn

from pipeoptim.compiler.trace import TracedModel, is_default_leaf

#: ``nn.Module`` attribute holding each kind of hook, with the kind's name for messages.
HOOK_KINDS: dict[str, str] = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}


def hooked_modules(model: nn.Module) -> dict[str, list[str]]:
    """``{qualified module name: [kinds of hook registered on it]}`` (root: ``""``)."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        kinds = [kind for attr, kind in HOOK_KINDS.items() if getattr(module, attr, None)]
        if kinds:
            found[name] = kinds
    return found


def _kept_as_module(model: nn.Module, name: str, traced: TracedModel) -> bool:
    """Whether module ``name`` or one of its ancestors is a leaf of the fx graph."""
    if traced.method != "fx" or not name:
        return False
    leaves = set(traced.leaf_modules)
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in leaves or is_default_leaf(model.get_submodule(prefix)):
            return True
    return False


def dropped_hooks_warning(model: nn.Module, traced: TracedModel) -> str | None:
    """The warning for hooks of ``model`` that will not run in training, or ``None``.

    Args:
        model: the user's model (the module tree ``traced`` was traced from).
        traced: its trace.
    """
    dropped = {
        name: kinds
        for name, kinds in hooked_modules(model).items()
        if not _kept_as_module(model, name, traced)
    }
    if not dropped:
        return None
    listed = ", ".join(f"{name or '<root>'} ({', '.join(kinds)})" for name, kinds in dropped.items())
    named = [n for n in dropped if n]
    fix = f"keep them as modules with leaf_modules={named!r}" if named else ""
    if traced.method != "fx":  # leaves are honoured by torch.fx, which is tried first
        how = "torch.export inlined these modules (their hooks ran once, while exporting)"
    else:
        how = "torch.fx traced through these modules (their hooks ran once, on symbolic values)"
    if "" in dropped:
        root = "the whole model is never called as a module: move its hooks to a submodule"
        fix = f"{fix}; {root}" if fix else root
    return f"hooks on {listed} will not run during training: {how}. Fix: {fix}"


def compiled_modules_warning(model: nn.Module) -> str | None:
    """The warning for submodules of ``model`` wrapped in ``torch.compile``, or ``None``."""
    from torch._dynamo.eval_frame import OptimizedModule

    names = [name or "<root>" for name, m in model.named_modules() if isinstance(m, OptimizedModule)]
    if not names:
        return None
    return (
        f"torch.compile on {', '.join(names)} does not survive tracing: the stages run that code "
        "eagerly (parameter names keep '_orig_mod.'). Fix: pass the module without torch.compile"
    )


@contextlib.contextmanager
def hooks_silenced(module: nn.Module) -> Iterator[None]:
    """Within the block no forward or backward hook of ``module`` or its submodules runs
    (profiling at compile time must not run user code); restored afterwards."""
    saved = []
    for sub in module.modules():
        for attr in HOOK_KINDS:
            hooks = getattr(sub, attr, None)
            if hooks:
                saved.append((sub, attr, hooks))
                setattr(sub, attr, OrderedDict())
    try:
        yield
    finally:
        for sub, attr, hooks in saved:
            setattr(sub, attr, hooks)
