"""Unlearning methods: the engine's configuration and the named presets.

`default` is streamer's method (see README); `neggrad`, `correct`, `adv` and `adv+imp` are the
paper's baselines and method (Cha et al., AAAI 2024, Table 1), which pin `update: all`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError

METHODS = ("neggrad", "correct", "adv", "adv+imp", "default")


@dataclass(frozen=True)
class UnlearnConfig:
    """Hyper-parameters of one method. Build with `method_config(name, **overrides)`."""

    method: str = "default"
    forget_loss: str = "margin"  # margin | neg_ce
    margin: float = 1.0
    weighting: str = "fragment"  # fragment: forget term / k, adv term mean; proportional: paper's Eq. 6
    optimizer: str = "adam"  # adam | sgd
    lr: float = 3e-4
    max_steps: int = 1000
    max_seconds: float = 600.0
    train_mode: bool = False  # False keeps BatchNorm statistics and dropout frozen (eval mode)
    update: str = "auto"  # preset of `trainable`: auto (head, or block when the head holds < 10% of the
    # parameters) | head (the Linear layers; all when there are none) | block (the head and the last block) | all
    trainable: tuple[str, ...] = ()  # parameter-name globs of the user's net, e.g. ("layer4.*", "fc.*"); () = update
    # adversarial regulariser (Eq. 6)
    n_adv: int = 10
    adv_weight: float = 3.0
    adv_only_successful: bool = True
    adv_batch: int = 128
    pgd_eps: float = 0.0  # 0: auto = pgd_eps_ratio x mean L2 norm of the forget inputs
    pgd_eps_ratio: float = 0.2
    pgd_steps: int = 20  # measured on MNIST-5k fragments of 8, seeds 0-2: the same attacks succeed as with the
    # paper's 50 (26/36/36% vs 26/36/38%), in 40% of the time; the paper's presets keep 50
    pgd_step_size: float = 0.0  # 0: auto = 2.5 x eps / steps
    # weight importance regulariser (Eq. 7)
    imp_lambda: float = 0.0
    # data-free distillation from the original model, on inputs made from the forget set
    distill_weight: float = 10.0
    distill_halve_every: int = 400  # halve the distillation weight every this many steps (0: never)
    distill_batch: int = 128
    distill_temperature: float = 2.0
    distill_warp: str = "affine"  # affine: random rotation/zoom/shift | shift: +-2 px roll + noise (the earlier default)
    # continual: keep the forgotten instances and hold all of them at their goal
    retain_forgotten: bool = True
    # opt-in retain buffer (labelled held-out images): cross-entropy on them
    buffer_weight: float = 3.0
    buffer_batch: int = 128
    distill_buffer: bool = True  # the buffer's images join the distillation inputs
    seed: int = 0
    # fast path (issue 13): frozen-prefix features cached per fragment, distillation inputs drawn
    # from a pool made once per fragment (teacher outputs cached), PGD early exit per example.
    # False: the earlier path, every input through the whole network every step (for benchmarks).
    fast_path: bool = True
    # unseen with a retain buffer: a memorised instance (its class is not its label) must also come within
    # unseen_feature_tol (relative L2) of the teacher's mean penultimate features on the buffer's images of
    # its class, weighted so in the loss (0: off). Measured on Fashion k=64: canary probe 0.41 -> 0.09
    unseen_feature_weight: float = 3.0
    unseen_feature_tol: float = 0.25
    # ... and its confidence in the label it was trained with must fall to the teacher's median on the
    # buffer's images of its class (unseen.FeatureGoal), weighted so in the loss (0: off)
    unseen_confidence_weight: float = 1.0
    # ... over the buffer's images of its class nearest to it in pixels (0: all of them). Measured (per_example_mia
    # --quick): canary U-LiRA AUC 0.66 with 8, 0.71-0.73 with all
    unseen_confidence_neighbours: int = 8
    unseen_confidence_quantile: float = 0.5  # ... and that quantile of theirs (0.5: the median)
    distill_pool: int = 2048  # distillation inputs made per fragment on the fast path
    # ... at most this many MiB of them as kept (prefix features, or pixels for the whole model): a pool of
    # 2,048 224 x 224 RGB images is 1.2 GB of pixels; ResNet-18's layer4.0 features of them 0.2 GB
    distill_pool_mib: int = 256
    # L2 anchor (L2-SP, Li et al. ICML 2018) of the trainable parameters to the original's: weight x
    # the sum of squared differences, so fragment after fragment the model cannot drift far (0: off)
    anchor_weight: float = 0.0
    pgd_early_exit: bool = False  # stop each attack once its example is predicted as the target (measured: fewer
    # PGD FLOPs, but examples left at the boundary double the steps a fragment takes: off by default)

    @property
    def trainable_spec(self) -> str | tuple[str, ...]:
        """What `trainable.select_trainable` takes: the globs, else the `update` preset."""
        return self.trainable or self.update

    @property
    def uses_adv(self) -> bool:
        return self.method in ("adv", "adv+imp", "default")


_PAPER = dict(update="all", forget_loss="neg_ce", weighting="proportional", optimizer="sgd", lr=1e-3, pgd_steps=50,
              adv_only_successful=False, adv_weight=1.0, distill_weight=0.0, retain_forgotten=False)
_PRESETS: dict[str, dict] = {
    "neggrad": {**_PAPER, "n_adv": 0},
    "correct": {**_PAPER, "n_adv": 0},
    "adv": dict(_PAPER),
    "adv+imp": {**_PAPER, "imp_lambda": 1.0},
    "default": {},
}


def method_config(method: str = "default", **overrides) -> UnlearnConfig:
    """The named method's settings with overrides applied; unknown names are errors."""
    if method not in _PRESETS:
        raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    known = {f.name for f in fields(UnlearnConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown engine keys: {', '.join(sorted(unknown))}")
    overrides = _trainable_override(overrides)
    cfg = UnlearnConfig(method=method, **{**_PRESETS[method], **overrides})
    _validate(cfg)
    return cfg


def _trainable_override(overrides: dict) -> dict:
    """`trainable: auto|head|block|all` is the `update` preset of that name; a list of globs becomes a tuple."""
    trainable = overrides.get("trainable")
    if isinstance(trainable, list):
        trainable = tuple(trainable)
    explicit_update = overrides.get("update")
    if trainable in ("auto", "head", "block", "all"):
        if explicit_update not in (None, trainable):
            raise ConfigError(f"trainable {trainable!r} and update {explicit_update!r} disagree: give one")
        return {**overrides, "update": trainable, "trainable": ()}
    if trainable and explicit_update is not None:
        raise ConfigError("trainable (globs) replaces update: give one of them")
    return {**overrides, "trainable": trainable} if "trainable" in overrides else overrides


def _validate(cfg: UnlearnConfig) -> None:
    checks = [
        (cfg.forget_loss in ("margin", "neg_ce"), "forget_loss must be 'margin' or 'neg_ce'"),
        (cfg.update in ("auto", "head", "block", "all"), "update must be 'auto', 'head', 'block' or 'all'"),
        (isinstance(cfg.trainable, tuple) and all(isinstance(g, str) and g for g in cfg.trainable),
         "trainable must be 'auto', 'head', 'block', 'all' or a list of parameter-name globs such as ['fc.*']"),
        (cfg.weighting in ("fragment", "proportional"), "weighting must be 'fragment' or 'proportional'"),
        (cfg.optimizer in ("adam", "sgd"), "optimizer must be 'adam' or 'sgd'"),
        (cfg.lr > 0, "lr must be > 0"),
        (cfg.max_steps >= 1, "max_steps must be >= 1"),
        (cfg.max_seconds > 0, "max_seconds must be > 0"),
        (cfg.n_adv >= 0 and cfg.pgd_steps >= 1, "n_adv must be >= 0 and pgd_steps >= 1"),
        (cfg.pgd_eps >= 0 and cfg.pgd_eps_ratio > 0, "pgd_eps must be >= 0 and pgd_eps_ratio > 0"),
        (min(cfg.adv_weight, cfg.imp_lambda, cfg.distill_weight, cfg.buffer_weight, cfg.unseen_feature_weight,
             cfg.unseen_confidence_weight) >= 0,
         "weights must be >= 0"),
        (cfg.unseen_feature_tol > 0, "unseen_feature_tol must be > 0"),
        (cfg.unseen_confidence_neighbours >= 0, "unseen_confidence_neighbours must be >= 0"),
        (0 <= cfg.unseen_confidence_quantile <= 1, "unseen_confidence_quantile must be in [0, 1]"),
        (cfg.distill_warp in ("affine", "shift"), "distill_warp must be 'affine' or 'shift'"),
        (cfg.distill_temperature > 0, "distill_temperature must be > 0"),
        (cfg.distill_halve_every >= 0, "distill_halve_every must be >= 0 (0: never)"),
        (min(cfg.adv_batch, cfg.distill_batch, cfg.buffer_batch, cfg.distill_pool, cfg.distill_pool_mib) >= 1,
         "batch sizes, distill_pool and distill_pool_mib must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
