"""streamer.engine.formats on real models: a small BatchNorm CNN (eager, scripted, exported) and
torchvision's resnet18; every round trip ends in the user's own one-line loader."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_fixtures import INPUT, MEAN, STD, exported_small_cnn, one_step, pixels, resnet18, small_cnn
from streamer.engine.formats import (
    FORMATS,
    clone_module,
    load_user_model_bytes,
    load_weights_file,
    read_state_dict,
    save_user_model,
    unwrap_state_dict,
)
from streamer.engine.models import Normalized
from streamer.engine.trainable import select_trainable
from streamer.errors import ConfigError, ModelLoadError

class UserNet(nn.Module):
    """A user's own class, pickled whole in one test."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def write(tmp_path, data: bytes, name: str = "model.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


class TestUnwrapStateDict:
    def test_bare_state_dict_is_returned(self):
        """A bare state_dict with the model's keys comes back with the same tensors."""
        sd = small_cnn().state_dict()
        out = unwrap_state_dict(sd, sd.keys())
        assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)

    def test_dataparallel_prefix_is_stripped(self):
        """nn.DataParallel's 'module.' prefix is stripped and the result loads strictly."""
        net = small_cnn()
        out = unwrap_state_dict(nn.DataParallel(net).state_dict(), net.state_dict())
        small_cnn(seed=5).load_state_dict(out)
        assert set(out) == set(net.state_dict())

    def test_lightning_checkpoint_is_unwrapped(self):
        """{'state_dict': {'model.*'}, 'epoch': 3} yields the inner network's weights."""
        net = small_cnn()
        ckpt = {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 3, "global_step": 9}
        out = unwrap_state_dict(ckpt, net.state_dict().keys())
        assert torch.equal(out["5.weight"], net.state_dict()["5.weight"])

    def test_compiled_and_dataparallel_prefixes_are_stripped_in_turn(self):
        """torch.compile's '_orig_mod.' (alone, or under DataParallel's 'module.') is stripped."""
        net = small_cnn()
        for wrapped in (torch.compile(net), nn.DataParallel(torch.compile(net))):
            assert set(unwrap_state_dict(wrapped.state_dict(), net.state_dict())) == set(net.state_dict())

    def test_model_entry_is_unwrapped(self):
        """A {'model': state_dict, 'optimizer': ...} checkpoint yields the model entry."""
        net = small_cnn()
        ckpt = {"model": net.state_dict(), "optimizer": {"state": {}}, "epoch": 1}
        assert set(unwrap_state_dict(ckpt, net.state_dict())) == set(net.state_dict())

    def test_prefix_on_some_keys_only_is_ambiguous(self):
        """'model.' on all but one key is not stripped: the one-line error names the split."""
        net = small_cnn()
        sd = {**{f"model.{k}": v for k, v in net.state_dict().items()}, "criterion.weight": torch.ones(10)}
        with pytest.raises(ModelLoadError) as err:
            unwrap_state_dict({"state_dict": sd, "epoch": 3}, net.state_dict())
        message = assert_one_line(err)
        assert f"{len(sd) - 1} of {len(sd)} keys start with 'model.' but 'criterion.weight' do not" in message

    def test_prefix_that_does_not_fix_the_keys_is_reported(self):
        """DataParallel weights of another network: 'after stripping', the first few keys, 'and N more'."""
        sd = nn.DataParallel(resnet18()).state_dict()
        with pytest.raises(ModelLoadError) as err:
            unwrap_state_dict(sd, small_cnn().state_dict())
        message = assert_one_line(err)
        assert "start with 'module.' but after stripping" in message and "more" in message
        assert message.count("'") <= 2 * 7  # the prefix plus at most 3 missing and 3 unexpected keys

    def test_foreign_prefix_is_named(self):
        """Every key under 'backbone.' (no known prefix) is named as the likely cause."""
        net = small_cnn()
        with pytest.raises(ModelLoadError) as err:
            unwrap_state_dict({f"backbone.{k}": v for k, v in net.state_dict().items()}, net.state_dict())
        assert "every key starts with 'backbone.'" in assert_one_line(err)

    def test_shape_mismatch_is_named(self):
        """Weights for 5 classes against a 10-class model: the head's shapes are in the message."""
        with pytest.raises(ModelLoadError) as err:
            unwrap_state_dict(small_cnn(num_classes=5).state_dict(), small_cnn().state_dict())
        assert "'7.weight' (5, 16) in the file, (10, 16) in the model" in assert_one_line(err)

    def test_module_object_is_refused(self):
        """A whole nn.Module (what torch.save(model) holds) gets the state_dict advice."""
        with pytest.raises(ModelLoadError, match=r"pickled nn.Module \(Sequential\).*save model.state_dict\(\)"):
            unwrap_state_dict({"model": small_cnn()}, small_cnn().state_dict())

    def test_dict_without_weights_is_refused(self):
        """A dict that is neither a state_dict nor a known wrapper names its first non-tensor key."""
        with pytest.raises(ModelLoadError, match=r"'epoch' holds a int"):
            unwrap_state_dict({"epoch": 3, "weights": [1.0]}, small_cnn().state_dict())


class TestLoadWeightsFile:
    def test_pickled_sequential_gets_one_line_advice(self, tmp_path):
        """torch.save(model) is refused by weights_only=True; the advice names the class."""
        buffer = io.BytesIO()
        torch.save(small_cnn(), buffer)
        with pytest.raises(ModelLoadError) as err:
            load_weights_file(write(tmp_path, buffer.getvalue()))
        message = assert_one_line(err)
        assert "a pickled nn.Module (torch.nn.modules.container.Sequential)" in message
        assert "save model.state_dict()" in message

    def test_pickled_user_class_is_recognised(self, tmp_path):
        """A user's own nn.Module subclass, pickled whole, is recognised as a module."""
        buffer = io.BytesIO()
        torch.save(UserNet(), buffer)
        with pytest.raises(ModelLoadError, match=r"a pickled nn.Module \(.*UserNet\)"):
            load_weights_file(write(tmp_path, buffer.getvalue()))

    def test_torchscript_and_pt2_archives_are_named(self, tmp_path):
        """A TorchScript archive and a .pt2 archive are each named for what they are."""
        script, pt2 = io.BytesIO(), io.BytesIO()
        torch.jit.save(torch.jit.script(small_cnn()), script)
        torch.export.save(torch.export.export(small_cnn(), (pixels(2),)), pt2)
        with pytest.raises(ModelLoadError, match="TorchScript archive"):
            load_weights_file(write(tmp_path, script.getvalue(), "a.pt"))
        with pytest.raises(ModelLoadError, match=r"\.pt2 archive"):
            load_weights_file(write(tmp_path, pt2.getvalue(), "b.pt2"))

    def test_garbage_is_a_model_load_error(self, tmp_path):
        """Bytes that are no torch file at all raise ModelLoadError, not KeyError."""
        with pytest.raises(ModelLoadError, match="cannot read weights"):
            load_weights_file(write(tmp_path, b"hello"))

    def test_lightning_file_loads_strictly(self, tmp_path):
        """A Lightning .ckpt (weights plus epoch) loads and unwraps into the user's class."""
        net = small_cnn(seed=3)
        buffer = io.BytesIO()
        torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, buffer)
        fresh = small_cnn()
        loaded = load_weights_file(write(tmp_path, buffer.getvalue()))
        fresh.load_state_dict(unwrap_state_dict(loaded, fresh.state_dict()))
        assert torch.equal(fresh(pixels()), net(pixels()))


class TestSaveUserModel:
    def test_state_dict_round_trip_from_eager(self, tmp_path):
        """Eager net -> step -> state_dict file: the user's class loads it strictly, same logits."""
        model = Normalized(small_cnn(), MEAN, STD).eval()
        one_step(model)
        path = write(tmp_path, save_user_model(model.net, "state_dict"))
        mine = small_cnn(seed=9)
        mine.load_state_dict(torch.load(path, weights_only=True))  # the user's one-liner
        x = pixels()
        assert torch.equal(Normalized(mine.eval(), MEAN, STD)(x), model(x))

    @pytest.mark.parametrize("make", [small_cnn, lambda: torch.jit.script(small_cnn())], ids=["eager", "scripted"])
    def test_torchscript_round_trip(self, tmp_path, make):
        """Eager or scripted net -> clone -> step -> TorchScript file: torch.jit.load predicts the same."""
        model = Normalized(clone_module(make()), MEAN, STD).eval()
        one_step(model)
        path = write(tmp_path, save_user_model(model.net, "torchscript"))
        loaded = torch.jit.load(path)  # the user's one-liner
        x = pixels()
        assert not loaded.training and torch.equal(Normalized(loaded, MEAN, STD)(x), model(x))

    def test_scripted_state_dict_loads_into_the_eager_class(self, tmp_path):
        """A scripted model's state_dict file has the user's keys and loads into the eager class."""
        model = Normalized(clone_module(torch.jit.script(small_cnn())), MEAN, STD).eval()
        one_step(model, select_trainable(model, "head"))
        mine = small_cnn(seed=9)
        mine.load_state_dict(torch.load(write(tmp_path, save_user_model(model.net, "state_dict")), weights_only=True))
        assert torch.equal(Normalized(mine, MEAN, STD)(pixels()), model(pixels()))

    @pytest.mark.parametrize("source", ["eager", "exported"])
    def test_export_round_trip(self, tmp_path, source):
        """Eager or exported net -> step -> .pt2: the user's export.load(...).module() predicts the same, any batch."""
        net = small_cnn() if source == "eager" else exported_small_cnn()
        model = Normalized(net, MEAN, STD).eval()
        one_step(model, select_trainable(model, "head"))
        loaded = torch.export.load(write(tmp_path, save_user_model(model.net, "export", INPUT), "m.pt2")).module()
        for n in (1, 5):
            z = (pixels(n) - model.mean) / model.std
            assert torch.equal(loaded(z), model.net(z))

    def test_exported_state_dict_loads_into_the_eager_class(self, tmp_path):
        """An exported program, fine-tuned, saves a state_dict that the user's eager class loads."""
        model = Normalized(exported_small_cnn(), MEAN, STD).eval()
        one_step(model)
        mine = small_cnn(seed=9)
        mine.load_state_dict(torch.load(write(tmp_path, save_user_model(model.net, "state_dict")), weights_only=True))
        assert torch.allclose(Normalized(mine, MEAN, STD)(pixels()), model(pixels()), atol=1e-6)

    def test_saving_leaves_the_net_as_it_was(self):
        """Saving in every format keeps the net's train mode, device and weights."""
        net = small_cnn().train()
        before = copy.deepcopy(net.state_dict())
        for fmt in FORMATS:
            save_user_model(net, fmt, INPUT)
        assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    def test_saved_model_is_in_eval_mode(self, tmp_path):
        """A net in train mode is saved in eval mode: BatchNorm uses running statistics."""
        net = small_cnn().train()
        loaded = torch.jit.load(write(tmp_path, save_user_model(net, "torchscript")))
        assert torch.equal(loaded(pixels()), net.eval()(pixels()))

    def test_bad_requests_are_refused(self):
        """Unknown format, export without a shape, export of TorchScript: each says so."""
        with pytest.raises(ConfigError, match="'onnx'"):
            save_user_model(small_cnn(), "onnx")
        with pytest.raises(ModelLoadError, match="input shape"):
            save_user_model(small_cnn(), "export")
        with pytest.raises(ModelLoadError, match="refuses TorchScript"):
            save_user_model(torch.jit.script(small_cnn()), "export", INPUT)


class TestLoadUserModelBytes:
    def test_state_dict_needs_and_keeps_the_template(self):
        """state_dict bytes go into a clone of the template; the template keeps its weights."""
        template, trained = small_cnn(), small_cnn(seed=4)
        before = copy.deepcopy(template.state_dict())
        net = load_user_model_bytes(save_user_model(trained, "state_dict"), "state_dict", template)
        assert torch.equal(net(pixels()), trained(pixels()))
        assert all(torch.equal(v, before[k]) for k, v in template.state_dict().items())
        with pytest.raises(ValueError, match="template_net"):
            load_user_model_bytes(b"", "state_dict")

    def test_exported_program_supports_eval_not_train(self):
        """A loaded .pt2 takes the wrapper's eval() (NotImplementedError in torch) and refuses train()."""
        model = Normalized(exported_small_cnn(), MEAN, STD)
        assert model.eval() is model and not model.net.training
        with pytest.raises(ConfigError, match="train_mode must be false"):
            model.train()

    def test_exported_program_gives_input_gradients(self):
        """The attacks need d(loss)/d(input) through an exported program: it is there and non-zero."""
        model = Normalized(exported_small_cnn(), MEAN, STD).eval()
        x = pixels().requires_grad_(True)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0

    def test_train_mode_export_is_refused(self):
        """A program exported with BatchNorm in training mode is refused with the fix."""
        with pytest.raises(ModelLoadError, match=r"training mode .*call model.eval\(\) before"):
            exported_small_cnn(train=True)

    def test_static_batch_export_is_refused(self):
        """A program exported with a fixed batch size cannot take fragments: refused with the fix."""
        with pytest.raises(ModelLoadError, match="fixed batch size of 2"):
            exported_small_cnn(dynamic=False)

    def test_wrong_bytes_are_a_model_load_error(self):
        """state_dict bytes read as TorchScript or .pt2 raise a one-line ModelLoadError."""
        data = save_user_model(small_cnn(), "state_dict")
        for fmt in ("torchscript", "export"):
            with pytest.raises(ModelLoadError, match=f"cannot load a {fmt} model") as err:
                load_user_model_bytes(data, fmt)
            assert_one_line(err)


class TestCloneModule:
    def test_deepcopy_of_scripted_is_not_trainable(self):
        """The premise: copy.deepcopy of a ScriptModule gives non-leaf parameters an optimizer refuses."""
        copied = copy.deepcopy(torch.jit.script(small_cnn()))
        assert not any(p.is_leaf for p in copied.parameters())
        with pytest.raises(ValueError, match="non-leaf"):
            torch.optim.SGD(copied.parameters(), lr=0.1)

    def test_scripted_clone_steps_independently(self):
        """A scripted clone has leaf parameters, takes requires_grad_ and a step; the original stays."""
        original = torch.jit.script(small_cnn())
        before = original(pixels()).detach().clone()
        clone = clone_module(original)
        assert all(p.is_leaf for p in clone.parameters())
        next(clone.parameters()).requires_grad_(False).requires_grad_(True)
        one_step(clone)
        assert torch.equal(original(pixels()), before)

    def test_scripted_inside_wrapper_is_cloned_trainable(self):
        """Normalized(scripted), as the daemon deep-copies it for the teacher, clones with leaf parameters."""
        model = Normalized(torch.jit.script(small_cnn()), MEAN, STD).eval()
        clone = clone_module(model)
        assert isinstance(clone.net, torch.jit.ScriptModule) and clone.net is not model.net
        assert all(p.is_leaf for p in clone.parameters())
        one_step(clone)
        assert not torch.equal(clone(pixels()), model(pixels()))

    def test_flags_and_mode_survive(self):
        """A frozen eval-mode teacher clones frozen and in eval mode, scripted or eager."""
        for net in (small_cnn(), torch.jit.script(small_cnn())):
            for param in net.eval().parameters():  # Module.requires_grad_ is "not supported on ScriptModules"
                param.requires_grad_(False)
            clone = clone_module(net)
            assert not clone.training and not any(p.requires_grad for p in clone.parameters())

    def test_exported_clone_is_independent_and_pinned(self):
        """A clone of a loaded .pt2 is trainable on its own and still takes eval()."""
        original = exported_small_cnn()
        clone = clone_module(original)
        assert clone.eval() is clone
        one_step(clone)
        assert not torch.equal(clone(pixels()), original(pixels()))




class TestReadStateDict:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_every_format_gives_the_user_keys(self, fmt):
        """The weights inside a file of each format load strictly into the eager class, same logits."""
        trained = small_cnn(seed=3)
        state = read_state_dict(save_user_model(trained, fmt, INPUT), fmt)
        mine = small_cnn()
        mine.load_state_dict(state)
        assert torch.equal(mine(pixels()), trained(pixels()))

    def test_format_mismatch_is_a_model_load_error(self):
        """TorchScript bytes read as a state_dict, and the reverse, raise one-line ModelLoadErrors."""
        script = save_user_model(small_cnn(), "torchscript")
        with pytest.raises(ModelLoadError, match="TorchScript archive") as err:
            read_state_dict(script, "state_dict")
        assert_one_line(err)
        with pytest.raises(ModelLoadError, match="cannot load a torchscript model"):
            read_state_dict(save_user_model(small_cnn(), "state_dict"), "torchscript")


def test_random_bytes_are_not_called_a_pickled_object(tmp_path):
    """A file that is no pickle at all (random bytes) is named as such, not as a pickled object."""
    import os

    from streamer.engine.formats import load_weights_file
    from streamer.errors import ModelLoadError

    path = tmp_path / "junk.pt"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(ModelLoadError) as err:
        load_weights_file(path)
    assert "pickled object" not in str(err.value) and "\n" not in str(err.value)
