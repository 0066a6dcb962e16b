"""torch.fx graphs of a user's network, split where unlearning starts to move it (`prefix.plan_split`).

`trace` gives a network's graph (torch.fx's symbolic trace; for a forward that branches on its
input's shape, a trace on a meta copy of one input row; a torch.export program's module is its
own graph). `split_graph` cuts it at the one activation through which every operation that
depends on a trainable parameter sees the input: a prefix graph (frozen, run once per fragment)
and a suffix graph (the model's own trainable parameters). `center_taps` swaps convolutions on
1 x 1 inputs for their centre tap. The caller checks the split against the model.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import fx, nn

__all__ = ["center_taps", "not_eager", "split_graph", "trace"]

TRACED = "_streamer_traced"  # set on the graph modules this module traces from eager code


def not_eager(m: nn.Module) -> bool:
    """TorchScript, or a graph not traced here from eager code (torch.export's): not split, copied
    or batched freely."""
    return isinstance(m, torch.jit.ScriptModule) or (isinstance(m, fx.GraphModule) and not getattr(m, TRACED, False))


def trace(net: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule | None, str]:
    """The network's graph: itself when it is one (torch.export), else torch.fx's trace of it --
    symbolic, then (for a forward that branches on shapes) with a meta copy of one input row."""
    if isinstance(net, fx.GraphModule):
        return net, ""
    try:
        traced = fx.symbolic_trace(net)
    except Exception:  # a forward that branches on its input's shape: trace on a meta tensor
        try:
            from torch.fx.experimental.meta_tracer import symbolic_trace as meta_trace
            name = next(iter(inspect.signature(net.forward).parameters))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = meta_trace(net, meta_args={name: example[:1].to("meta")})
        except Exception as e:
            return None, f"whole model: torch.fx cannot trace it ({type(e).__name__}: {str(e)[:120]})"
    setattr(traced, TRACED, True)
    return traced, ""


def split_graph(gm: fx.GraphModule, chosen: set[str]) -> tuple[tuple[nn.Module, nn.Module] | None, str]:
    """(prefix, suffix) graph modules of `gm` cut at the one activation that every operation
    depending on a parameter in `chosen` reaches the input through; else None and why."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"whole model: {len(inputs)} inputs"

    ids = {id(p) for n, p in gm.named_parameters() if n in chosen}  # by identity: a tied weight has one name

    def moves(node: fx.Node) -> bool:
        if node.op == "call_module":
            return any(id(p) in ids for p in gm.get_submodule(node.target).parameters())
        if node.op != "get_attr":
            return False
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return id(obj) in ids or (isinstance(obj, nn.Module) and any(id(p) in ids for p in obj.parameters()))

    moving, fed = set(), {inputs[0]}  # depends on a trainable parameter / on the input
    for node in nodes:
        if node.op != "output":
            if moves(node) or any(i in moving for i in node.all_input_nodes):
                moving.add(node)
            if any(i in fed for i in node.all_input_nodes):
                fed.add(node)
    cut = [n for n in nodes if n in fed and n not in moving and any(u in moving or u.op == "output" for u in n.users)]
    if len(cut) != 1 or cut[0].op == "placeholder" or not moving:
        return None, (f"whole model: {len(cut)} activations cross the cut" if len(cut) != 1
                      else "whole model: its first operation moves")
    if any(_in_place(user, gm) for user in cut[0].users):
        return None, "whole model: the suffix writes into its input"
    prefix_graph, suffix_graph = fx.Graph(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op != "output" and node not in moving:
            env[node] = prefix_graph.node_copy(node, env.__getitem__)
    prefix_graph.output(env[cut[0]])
    env = {cut[0]: suffix_graph.placeholder("features")}
    for node in nodes:
        if node.op == "output":
            out = node.args[0]
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out  # torch.export: (logits,)
            suffix_graph.output(fx.graph.map_arg(out, env.__getitem__))
        elif node in moving or node not in fed:
            env[node] = suffix_graph.node_copy(node, env.__getitem__)
    parts = []
    for graph in (prefix_graph, suffix_graph):
        part = fx.GraphModule(gm, graph)
        part.graph.eliminate_dead_code()
        part.recompile()
        part.delete_all_unused_submodules()
        setattr(part, TRACED, getattr(gm, TRACED, False))
        parts.append(part)
    return (parts[0], parts[1]), cut[0].name


class _CenterTap(nn.Module):
    """A Conv2d on a 1 x 1 input whose output is 1 x 1: only the kernel's tap at (padding_h,
    padding_w) meets the input (the others meet zero padding), so it is that tap's matrix product
    -- the same output and the same weight gradient (zero on the other taps), with the conv's own
    parameters. oneDNN's weight gradient for that shape is slow: measured, 2 CPU threads, 216 rows,
    512 -> 512 channels, 3 x 3: 0.30 s a backward; the matrix product's ~0.03 s."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        weight = c.weight[:, :, c.padding[0], c.padding[1]]
        return nn.functional.linear(x.flatten(1), weight, c.bias).view(len(x), -1, 1, 1)


def center_taps(suffix: fx.GraphModule, prefix: nn.Module, example: torch.Tensor) -> None:
    """Replace, in a traced suffix, each Conv2d that maps a 1 x 1 input to a 1 x 1 output by its
    `_CenterTap` (the last stage of an ImageNet ResNet on 32 x 32 inputs). Shapes are those of
    `example` rows (torch.fx ShapeProp); the caller checks the result against the model."""
    from torch.fx.passes.shape_prop import ShapeProp
    try:
        with torch.no_grad():
            ShapeProp(suffix).propagate(prefix(example))
    except Exception:
        return
    changed = False
    for node in suffix.graph.nodes:
        conv = suffix.get_submodule(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros" \
                or conv.dilation != (1, 1) or isinstance(conv.padding, str):
            continue
        shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in (node.args[0], node)]
        if all(s is not None and tuple(s[2:]) == (1, 1) for s in shapes) \
                and all(p < k for p, k in zip(conv.padding, conv.kernel_size)):
            name = f"center_tap_{node.name}"
            suffix.add_submodule(name, _CenterTap(conv))
            node.target, changed = name, True
    if changed:
        suffix.recompile()
        suffix.delete_all_unused_submodules()


def _in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """An operation that writes into its first argument: `t.mul_(...)`, `torch.relu_`, `t[i] = v`,
    a module built with inplace=True."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    schema = getattr(node.target, "_schema", None)  # an aten operator (torch.export): mul_.Tensor, copy_
    if schema is not None:
        return bool(schema.is_mutable)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op != "get_attr" and isinstance(name, str) and (
        name in ("setitem", "__setitem__") or (name.endswith("_") and not name.endswith("__")))
