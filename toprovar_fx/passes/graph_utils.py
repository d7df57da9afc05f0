"""Small helpers shared by the passes: fake values, static inputs, clean-up."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

LINEAR_FUNCS = {torch.nn.functional.linear, torch._C._nn.linear}


def example_value(node: fx.Node):
    """The fake tensor (or SymInt) Dynamo attached to ``node``, if any."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def is_static_input(node: fx.Node) -> bool:
    """True for parameters and buffers (module state), which never carry tokens, and for the
    hoisted cross-attention context (``passes/hoist_context.py``), held at a fixed address too."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    if node.meta.get("toprovar_context"):
        return True
    src = node.meta.get("grapharg")
    name = str(getattr(src, "source", "")) if src is not None else ""
    if "Param" in name or "_parameters" in node.name or "_buffers" in node.name:
        return True
    ex = getattr(src, "example", None) if src is not None else None
    return isinstance(ex, torch.nn.Parameter)


_VIEW_OPS = {
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "select", "narrow",
    "as_strided", "chunk", "split", "unflatten", "flatten", "t", "view_as", "unbind", "contiguous",
}


def op_name(node: fx.Node) -> str:
    """A call's target as a name (``add_``, ``linear``, ``getitem``)."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def writes_into(graph: fx.Graph, roots: set[fx.Node]) -> bool:
    """Whether an in-place op (``add_``, ``copy_``, ``x[i] = v``) writes into a value of ``roots`` or
    a view of one."""
    aliases = set(roots)
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = op_name(node)
        first = node.args[0] if node.args else None
        if first in aliases and (name in _VIEW_OPS or name == "getitem"):
            aliases.add(node)
        in_place = (name.endswith("_") and not name.endswith("__")) or name in ("setitem", "__setitem__")
        if in_place and first in aliases:
            return True
    return False


def ancestors(node: fx.Node, stop: set[fx.Node] | None = None, values_only: bool = False) -> set[fx.Node]:
    """Every node ``node`` depends on (not including itself). ``values_only``: through tensor
    values only, not through sizes (under dynamic shapes a size read from a tensor, e.g. an
    interpolation to ``f_hat.shape[-2:]``, is a node too, but no dependency on its values)."""
    seen: set[fx.Node] = set()

    def inputs(n: fx.Node) -> list[fx.Node]:
        if not values_only:
            return list(n.all_input_nodes)
        return [i for i in n.all_input_nodes if not isinstance(example_value(i), (torch.SymInt, int))]

    stack = inputs(node)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop is not None and n in stop:
            continue
        stack.extend(inputs(n))
    return seen


def copy_meta(new: fx.Node, old: fx.Node, keys: Iterable[str] = ("nn_module_stack", "stack_trace", "source_fn_stack")) -> None:
    for k in keys:
        if k in old.meta:
            new.meta[k] = old.meta[k]


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Shared clean-up at the end of a pass: lint and regenerate code.

    No general dead-code elimination: Dynamo graphs can hold in-place methods
    (``f_hat.add_(h)``) whose results are unused; passes erase the nodes they replace.
    """
    gm.graph.lint()
    gm.recompile()
    return gm


def module_path(node: fx.Node) -> str:
    """Innermost module path of ``node`` from Dynamo's ``nn_module_stack`` ('' if none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def linear_flops(node: fx.Node) -> float:
    """2 * in * out per token for a linear layer with a static weight, else 0."""
    if node.op != "call_function" or node.target not in LINEAR_FUNCS:
        return 0.0
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    val = example_value(w)
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return 0.0
    return 2.0 * shape[0] * shape[1]
