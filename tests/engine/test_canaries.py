"""Canaries planted in reference training, the Fashion ResNet and the `unseen` goal's warp vote."""
from __future__ import annotations

import pytest
import torch

from streamer.engine.canaries import CanarySpec, plant_canaries, training_set
from streamer.engine.data import Dataset
from streamer.engine.models import fashion_resnet
from streamer.engine.prefix import split_frozen_prefix
from streamer.engine.trainable import select_trainable
from streamer.engine.train import train_reference
from streamer.engine.unlearn import Fragment, Unlearner, method_config
from streamer.engine.unseen import UNSEEN, unseen_classes


def _data(n: int = 200) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10)


def test_canaries_are_seeded_labelled_and_repeated():
    data = _data()
    spec = CanarySpec(interclass=5, source=6, sink=0, random_label=4, repeat=3, seed=1)
    a, b = plant_canaries(data, spec), plant_canaries(data, spec)
    assert torch.equal(a.index, b.index) and len(a) == 9 and len(set(a.index.tolist())) == 9
    assert (data.y[a.index[:5]] == 6).all() and (a.canary_y[:5] == 0).all()
    assert (a.canary_y[5:] != a.true_y[5:]).all() and torch.equal(a.true_y, data.y[a.index])
    assert a.kind == ("interclass",) * 5 + ("random_label",) * 4
    assert not torch.equal(plant_canaries(data, CanarySpec(5, 6, 0, 4, 3, seed=2)).index, a.index)
    full = training_set(data, a)
    assert len(full) == len(data) + 2 * 9  # each canary 3 times
    relabelled = data.y.clone()
    relabelled[a.index] = a.canary_y
    expected = torch.bincount(relabelled, minlength=10) + 2 * torch.bincount(a.canary_y, minlength=10)
    assert torch.equal(torch.bincount(full.y, minlength=10), expected)
    assert torch.equal(data.y, torch.arange(200) % 10)  # the split itself is untouched
    without = training_set(data, a, exclude=torch.cat([a.index[:2], torch.tensor([1, 3])]))
    assert len(without) == len(data) - 4 + 2 * 7


def test_canary_spec_errors():
    with pytest.raises(ValueError, match="class 6 has 20"):
        plant_canaries(_data(), CanarySpec(interclass=21, source=6, sink=0))
    with pytest.raises(ValueError, match="source != sink"):
        plant_canaries(_data(), CanarySpec(interclass=1, source=3, sink=3))


def test_fashion_resnet_splits_at_a_stage():
    net = fashion_resnet().eval()
    assert 250_000 < sum(p.numel() for p in net.parameters()) < 350_000
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    names = select_trainable(net, ["layer3.*", "fc.*"])
    split = split_frozen_prefix(net, names)
    assert split is not None and split.cut == "child 3 of the Sequential"  # stem, layer1, layer2 cached
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(split.suffix(split.features(x)), net(x), atol=1e-5)
    assert select_trainable(net, "head") == ["fc.weight", "fc.bias"]


def test_train_reference_caches_by_recipe(tmp_path, monkeypatch):
    import streamer.engine.train as train

    monkeypatch.setitem(train._EPOCHS, "digits", 1)
    out = tmp_path / "d.pt"
    spec = CanarySpec(interclass=4, source=1, sink=7, random_label=2, repeat=2)
    first = train_reference("digits", out, canaries=spec, cached=True)
    assert not first.get("cached") and len(first["canaries"]["index"]) == 6
    assert "canary_label_acc" in first and out.with_suffix(".json").is_file()
    assert train_reference("digits", out, canaries=spec, cached=True)["cached"] is True
    other = train_reference("digits", out, canaries=spec, exclude=torch.tensor([0, 1]), cached=True)
    assert not other.get("cached") and other["recipe"]["exclude"] == [0, 1]


class _Memoriser(torch.nn.Module):
    """Predicts class 3 everywhere except exactly at `point`, where it predicts 7 (a memorised
    instance with a wrong label)."""

    def __init__(self, point: torch.Tensor):
        super().__init__()
        self.register_buffer("point", point)
        self.fc = torch.nn.Linear(1, 10)

    def forward(self, x):
        at_point = ((x - self.point).flatten(1).abs().amax(1) < 1e-6).float()[:, None]
        logits = torch.zeros(len(x), 10)
        logits[:, 3] = 5.0 * (1 - at_point[:, 0])
        logits[:, 7] = 5.0 * at_point[:, 0]
        return logits + 0 * self.fc.weight.sum()


def test_unseen_vote_escapes_a_memorised_point_and_ignores_the_fragment():
    g = torch.Generator().manual_seed(0)
    point = torch.rand(1, 1, 12, 12, generator=g) * 0.5 + 0.25
    teacher = _Memoriser(point)
    assert teacher(point).argmax(1).item() == 7
    assert unseen_classes(teacher, point).tolist() == [3]
    others = torch.rand(5, 1, 12, 12, generator=g)
    alone = unseen_classes(fashion_like := _Linear(), others[2:3], seed=4)
    together = unseen_classes(fashion_like, others, seed=4)
    assert together[2] == alone[0]  # an image's class does not depend on its fragment


class _Blurring(torch.nn.Module):
    """A teacher by relative L2 distance d from a memorised point: the memorised label 7 close to
    it, the true class 5 a little further, and class 2 for blurred, far-warped copies."""

    def __init__(self, point):
        super().__init__()
        self.point = point
        self.fc = torch.nn.Linear(1, 1)

    def forward(self, x):
        d = (x - self.point).flatten(1).norm(dim=1) / self.point.norm()
        logits = torch.zeros(len(x), 10)
        logits[:, 7] = 10 - 40 * d
        logits[:, 5] = 4 - 7.7 * d
        logits[:, 2] = 7.7 * d
        return logits + 0 * self.fc.weight.sum()


def test_second_stage_takes_the_best_class_but_the_label_close_to_the_instance():
    """Strong warps blur the instance into class 2; with its trained label 7 given, the class is
    the best one other than 7 on half-strength warps: 5. A vote that is the label stays."""
    i = torch.arange(12.0)
    point = torch.exp(-((i[:, None] - 5.5) ** 2 + (i[None, :] - 4) ** 2) / 8)[None, None]
    teacher = _Blurring(point)
    assert teacher(point).argmax(1).tolist() == [7]
    assert unseen_classes(teacher, point).tolist() == [2]
    assert unseen_classes(teacher, point, y=torch.tensor([7])).tolist() == [5]
    assert unseen_classes(teacher, point, y=torch.tensor([2])).tolist() == [2]
    two = torch.cat([point, point])
    assert unseen_classes(teacher, two, y=torch.tensor([7, 2])).tolist() == [5, 2]


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = torch.nn.Linear(144, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_unlearner_resolves_unseen_targets_and_reports_them():
    g = torch.Generator().manual_seed(0)
    point = torch.rand(1, 1, 12, 12, generator=g) * 0.5 + 0.25
    model = _Memoriser(point)
    unlearner = Unlearner(model, method_config("default", n_adv=0, distill_weight=0.0, max_steps=2), 10)
    fragment = Fragment(point, torch.tensor([7]), torch.tensor([UNSEEN]))
    assert unlearner.resolve_unseen(fragment).target.tolist() == [3]
    mixed = Fragment(torch.cat([point, point]), torch.tensor([7, 7]), torch.tensor([-1, UNSEEN]))
    assert unlearner.resolve_unseen(mixed).target.tolist() == [-1, 3]
    outcome = unlearner.unlearn(mixed)  # the memoriser cannot move: the step cap ends it
    assert outcome.targets == [-1, 3] and outcome.stopped_by == "step_cap"
    assert "unseen" in outcome.stage_seconds and unlearner.forgotten.target.tolist() == [-1, 3]


def test_the_vote_stops_when_cancelled_and_takes_empty_input():
    from streamer.errors import Interrupted

    with pytest.raises(Interrupted):
        unseen_classes(_Linear(), torch.rand(3, 1, 12, 12), should_stop=lambda: True)
    assert unseen_classes(_Linear(), torch.rand(0, 1, 12, 12)).shape == (0,)


def test_a_fragment_already_at_its_goal_runs_no_attack():
    """Unseen typical instances usually resolve to the class the model already predicts: the
    fragment ends at once, without PGD or steps, and joins the retained set."""
    model = _Linear()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    predicted = model(x).argmax(1)
    unlearner = Unlearner(model, method_config("default"), 10)
    outcome = unlearner.unlearn(Fragment(x, predicted, predicted.clone()))
    assert outcome.goal_reached and outcome.steps == 0 and outcome.fragment_met == [True] * 4
    assert "adversarial" not in outcome.stage_seconds and len(unlearner.forgotten) == 4
