"""Model files as users write and read them: state_dicts in their usual wrappers, TorchScript and
torch.export archives, and cloning that keeps TorchScript trainable.

Pure torch: files are read by `load_weights_file` only; everything else takes or returns bytes.
Names are those of the user's network (not of streamer's `Normalized` wrapper around it).

    format        the published file            the user's one-line load
    state_dict    model.pt                      net.load_state_dict(torch.load(path, weights_only=True))
    torchscript   model.pt (TorchScript)        torch.jit.load(path)
    export        model.pt2 (ExportedProgram)   torch.export.load(path).module()
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError

__all__ = ["FORMATS", "USER_LOADERS", "clone_module", "load_user_model_bytes", "load_weights_file",
           "read_state_dict", "save_user_model", "unwrap_state_dict"]

FORMATS = ("state_dict", "torchscript", "export")
USER_LOADERS = {  # what a serving stack writes to load a published file; {path} is filled in
    "state_dict": "net.load_state_dict(torch.load({path!r}, weights_only=True))",
    "torchscript": "torch.jit.load({path!r})",
    "export": "torch.export.load({path!r}).module()",
}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # Lightning, the PyTorch tutorial, many repos
_PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning, torch.compile
_SHOWN = 3  # keys named in an error message


# --- state_dicts -------------------------------------------------------------------------------

def unwrap_state_dict(obj: Any, expected_keys: Collection[str]) -> dict[str, torch.Tensor]:
    """The bare state_dict inside `obj` (a dict of tensors, or one under 'state_dict' /
    'model_state_dict' / 'model') with keys exactly `expected_keys`. A 'module.', 'model.' or
    '_orig_mod.' prefix is stripped only when every key carries it. When `expected_keys` is a
    state_dict, shapes are checked too. Raises a one-line ModelLoadError naming the likely cause
    and the first differing keys."""
    state = _find_state_dict(obj, "the weights")
    expected, stripped = set(expected_keys), []
    while set(state) != expected:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped.append(prefix)
    if set(state) != expected:
        raise ModelLoadError(_mismatch(list(state), list(expected_keys), stripped))
    if isinstance(expected_keys, Mapping):
        wrong = [k for k, v in expected_keys.items()
                 if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(state[k].shape)]
        if wrong:
            shown = "; ".join(f"{k!r} {tuple(state[k].shape)} in the file, {tuple(expected_keys[k].shape)} "
                              "in the model" for k in wrong[:_SHOWN])
            raise ModelLoadError(f"{len(wrong)} tensors have other shapes (another architecture or num_classes?): "
                                 f"{shown}{_more(wrong)}")
    return state


def _find_state_dict(obj: Any, where: str, depth: int = 0) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        raise ModelLoadError(f"{where} holds a pickled nn.Module ({type(obj).__name__}), not a state_dict: "
                             "save model.state_dict()")
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ModelLoadError(f"{where} holds {what}, expected a state_dict (a dict of tensors)")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    for key in _WRAPPER_KEYS:
        if key in obj and depth < 2:
            return _find_state_dict(obj[key], f"{where}[{key!r}]", depth + 1)
    other = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    raise ModelLoadError(f"{where} is a dict but not a state_dict: {other!r} holds a {type(obj[other]).__name__} "
                         f"and there is no {' / '.join(map(repr, _WRAPPER_KEYS))} entry; keys: {_few(list(obj))}")


def _mismatch(keys: list[str], expected: list[str], stripped: list[str]) -> str:
    have, want = set(keys), set(expected)
    missing = [k for k in expected if k not in have]  # in the model's order
    unexpected = [k for k in keys if k not in want]  # in the file's order
    detail = f"{len(missing)} missing: {_few(missing)}; {len(unexpected)} unexpected: {_few(unexpected)}"
    if stripped:
        return f"keys start with {''.join(stripped)!r} but after stripping it the keys still differ: {detail}"
    for prefix in _PREFIXES:
        odd = [k for k in keys if not k.startswith(prefix)]
        if len(odd) < len(keys):  # some keys carry it, not all: which to keep is a guess, so none is stripped
            return (f"{len(keys) - len(odd)} of {len(keys)} keys start with {prefix!r} but {_few(odd)} do not "
                    f"(ambiguous, not stripped: save the wrapped network's own state_dict): {detail}")
    tops = {k.split(".", 1)[0] + "." for k in keys}
    if len(tops) == 1 and all("." in k for k in keys) and not any(k.startswith(tuple(tops)) for k in expected):
        return f"every key starts with {tops.pop()!r}, which no key of the model does: {detail}"
    return f"the weights do not fit the model (another architecture?): {detail}"


def _few(keys: Sequence[str]) -> str:
    return ", ".join(repr(k) for k in keys[:_SHOWN]) + _more(keys) if keys else "none"


def _more(items: Sequence[Any]) -> str:
    return f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


def load_weights_file(path: str | os.PathLike[str] | BinaryIO) -> object:
    """`torch.load(weights_only=True)` onto the CPU. Raises a one-line ModelLoadError saying what
    the file is instead when it is no weights file: a pickled module, TorchScript, a .pt2 archive."""
    where = path if isinstance(path, (str, os.PathLike)) else "the data"
    try:
        with warnings.catch_warnings():  # a TorchScript archive: the error below says so, the warning adds nothing
            warnings.filterwarnings("ignore", message=".torch.load. received a zip file")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle of anything: random bytes, a text file, a truncated download
            raise ModelLoadError(f"{where} is not a file torch.save writes, so not a state_dict (no pickle in it)") from err
        name = found.group(1)
        what = "a pickled nn.Module" if _is_module_class(name) else "a pickled object"
        raise ModelLoadError(f"{where}: {what} ({name}), not a state_dict, which weights_only=True refuses: "
                             "save model.state_dict() (of a training checkpoint, its 'state_dict' alone)") from err
    except RuntimeError as err:
        text = str(err)
        if "TorchScript archives" in text:
            raise ModelLoadError(f"{where} is a TorchScript archive, not a state_dict: "
                                 "use model.source torchscript:PATH") from err
        if "data.pkl" in text:
            raise ModelLoadError(f"{where} is a zip without data.pkl (a torch.export .pt2 archive?), "
                                 "not a state_dict: use model.source export:PATH") from err
        raise ModelLoadError(f"cannot read weights {where}: {_first_line(err)}") from err
    except (OSError, ValueError, EOFError, KeyError) as err:
        raise ModelLoadError(f"cannot read weights {where}: {type(err).__name__}: {_first_line(err)}") from err


def _is_module_class(name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    cls = getattr(sys.modules.get(module_name), attr, None)  # never imports: only what is loaded already
    return isinstance(cls, type) and issubclass(cls, nn.Module)


# --- whole-model formats -----------------------------------------------------------------------

def save_user_model(net: nn.Module, fmt: str, input_shape: Sequence[int] | None = None) -> bytes:
    """The user's network with its current weights, in eval mode on the CPU, as `fmt` bytes (see
    the module docstring for how each loads); `export` needs `input_shape` (C, H, W) and makes the
    batch dimension dynamic. `net` is not modified. Raises ModelLoadError when `net` cannot be
    written in `fmt` (not scriptable, not exportable), ConfigError for an unknown format."""
    buffer = io.BytesIO()
    if fmt == "state_dict":
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buffer)
    elif fmt == "torchscript":
        work = _eval_copy(net)
        if not isinstance(work, torch.jit.ScriptModule):
            try:
                work = torch.jit.script(work)
            except Exception as err:  # the TorchScript compiler raises many types
                raise ModelLoadError(f"{type(net).__name__} cannot be scripted ({_first_line(err)}): "
                                     "use the state_dict or export format") from err
        torch.jit.save(work, buffer)
    elif fmt == "export":
        if isinstance(net, torch.jit.ScriptModule):
            raise ModelLoadError("torch.export refuses TorchScript modules: use the torchscript or state_dict format")
        if input_shape is None:
            raise ModelLoadError("the export format needs the input shape (C, H, W) of one example")
        example = torch.zeros(2, *input_shape)  # batch 2: export specialises sizes 0 and 1
        try:
            program = torch.export.export(_eval_copy(net), (example,),
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        except Exception as err:  # torch.export raises many types (UserError, Unsupported, ...)
            raise ModelLoadError(f"{type(net).__name__} cannot be exported ({_first_line(err)}): "
                                 "use the state_dict or torchscript format") from err
        torch.export.save(program, buffer)
    else:
        raise ConfigError(f"model format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return buffer.getvalue()


def load_user_model_bytes(data: bytes, fmt: str, template_net: nn.Module | None = None) -> nn.Module:
    """The network in `data` (as `save_user_model` or the user wrote it), on the CPU. state_dict
    needs `template_net` (not modified: a clone gets the weights); an exported program comes back
    pinned to eval mode (see `_pin_eval`). Raises a one-line ModelLoadError."""
    if fmt == "state_dict":
        if template_net is None:
            raise ValueError("the state_dict format needs template_net")
        state = unwrap_state_dict(load_weights_file(io.BytesIO(data)), template_net.state_dict())
        net = clone_module(template_net)
        net.load_state_dict(state)
        return net
    if fmt not in FORMATS:
        raise ConfigError(f"model format {fmt!r}: expected one of {', '.join(FORMATS)}")
    try:
        if fmt == "torchscript":
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        program = torch.export.load(io.BytesIO(data))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ModelLoadError(f"cannot load a {fmt} model: {_first_line(err)}") from err
    _check_exported(program)
    return _pin_eval(program.module())


def read_state_dict(data: bytes, fmt: str) -> dict[str, torch.Tensor]:
    """The weights inside a model file of any format, keyed as the user's network names them (a
    TorchScript or exported module's state_dict has the eager class's keys). No template needed.
    Raises ModelLoadError."""
    if fmt == "state_dict":
        return _find_state_dict(load_weights_file(io.BytesIO(data)), "the model file")
    return {k: v.detach() for k, v in load_user_model_bytes(data, fmt).state_dict().items()}


def _eval_copy(net: nn.Module) -> nn.Module:
    work = clone_module(net).cpu()
    try:
        return work.eval()
    except NotImplementedError:  # an unpinned ExportedProgram.module(): its graph's mode is fixed already
        return work


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _check_exported(program: torch.export.ExportedProgram) -> None:
    """A program the daemon can batch and fine-tune: one input with a dynamic batch dimension,
    traced in eval mode (BatchNorm on running statistics, dropout off)."""
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(inputs) != 1:
        raise ModelLoadError(f"the program takes {len(inputs)} inputs: streamer calls it with one image batch")
    value = inputs[0].meta.get("val")
    if value is not None and not isinstance(value.shape[0], torch.SymInt):
        raise ModelLoadError(f"the program was exported with a fixed batch size of {value.shape[0]}: export with "
                             "dynamic_shapes=({0: torch.export.Dim('batch')},)")
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        for i, arg in enumerate(schema.arguments if node.op == "call_function" and schema else ()):
            flag = node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else False)
            if arg.name in ("training", "train") and flag is True:
                raise ModelLoadError(f"the program was exported in training mode ({node.target} with {arg.name}=True): "
                                     "call model.eval() before torch.export.export")


def _pin_eval(module: nn.Module) -> nn.Module:
    """`ExportedProgram.module()` raises NotImplementedError on train()/eval(), and so does every
    parent's train()/eval(): eval becomes a no-op here (the graph already runs in eval mode) and
    train(True) raises ConfigError saying why it cannot be."""
    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        if mode:
            raise ConfigError("an exported program runs in the mode it was exported in (eval): "
                              "unlearning.train_mode must be false")
        return nn.Module.train(self, False)

    module.train = types.MethodType(train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: self.train(False), module)  # type: ignore[method-assign]
    return module.eval()


# --- trainable copies ------------------------------------------------------------------------------

def clone_module(net: nn.Module) -> nn.Module:
    """An independent copy whose parameters are leaves: `copy.deepcopy` for eager modules and
    exported programs; TorchScript (also inside an eager wrapper) goes through
    `torch.jit.save`/`load`, because a deep-copied ScriptModule's parameters are not leaves."""
    if isinstance(net, torch.jit.ScriptModule):
        return _jit_round_trip(net)
    memo: dict[int, Any] = {id(m): _jit_round_trip(m) for m in _outer_scripted(net)}
    return copy.deepcopy(net, memo)


def _outer_scripted(module: nn.Module) -> Iterator[torch.jit.ScriptModule]:
    for child in module.children():
        if isinstance(child, torch.jit.ScriptModule):
            yield child
        else:
            yield from _outer_scripted(child)


def _jit_round_trip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)  # keeps devices, requires_grad flags and the training flag
    buffer.seek(0)
    return torch.jit.load(buffer)
