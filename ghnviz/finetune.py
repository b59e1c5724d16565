"""Short fine-tuning runs of a classifier from its default, GHN-predicted or post-processed init.

The loop (one "step" is one optimiser update on one batch):

- **Init** (:data:`INITS`): ``'default'`` keeps the model's own initialisation; ``'ghn'`` predicts
  its parameters with a GHN; ``'ghn+orth'`` then orthogonalises them and ``'ghn+orth+noise'`` also
  adds noise first (:func:`ghnviz.postprocess`, beta 3e-5 by default as in the published
  100-shot CIFAR-10 recipes). When the GHN was trained for a different number of classes than the
  task has, the classifier is not predicted and keeps its default init.
- **Schedule**: linear warm-up from 0 to ``lr`` over ``warmup_steps`` (default 5 % of the steps),
  then cosine decay to 0 at the last step. SGD uses momentum 0.9; gradients are clipped at norm 5.
- **BatchNorm**: running statistics are never predicted, so after a GHN init they hold their
  initial values (mean 0, variance 1). Training runs with BN in train mode (batch statistics, which
  also update the running statistics with momentum 0.1); evaluation runs in eval mode with the
  running statistics, as in the reference fine-tuning. Short runs leave those statistics partly at
  their initial values; ``bn_recalibrate=N`` re-estimates them on N training batches before each
  evaluation (off by default).
- **Logging**: with a run store, every step logs ``train/loss``, ``train/acc`` (batch top-1, %) and
  ``lr``; every ``eval_every`` steps (and at the start and the end) ``test/acc`` (top-1, %) and
  ``test/loss`` on the test split (a class-balanced subset of ``eval_limit`` images). The store's
  cancel flag is checked every step.
- **Randomness**: model init, augmentation and batch order derive from ``seed``, the training and
  test subsets from ``data_seed`` (``seed`` when unset); the global torch
  RNG is forked for the duration of the run, so the caller's RNG state is left untouched.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ghnviz.runs import RunCancelled, RunStore, Tracking

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI can build its parser cheaply
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# init name -> (predict with a GHN, orthogonalise, default noise beta)
INITS: dict[str, tuple[bool, bool, float]] = {
    'default': (False, False, 0.0),
    'ghn': (True, False, 0.0),
    'ghn+orth': (True, True, 0.0),
    'ghn+orth+noise': (True, True, 3e-5),  # beta of the published 100-shot recipes
}

# model name -> first post-processed layer (ppuda fine-tuning recipes: ResNet-50 37, ConvNeXt-Base 94)
LAYER_PRESETS: dict[str, int] = {'resnet50': 37, 'convnext_base': 94}

# optimizer name -> (torch.optim class name, keyword arguments from the config)
OPTIMIZERS: dict[str, tuple[str, Callable[[FinetuneConfig], dict[str, Any]]]] = {
    'sgd': (
        'SGD',
        lambda c: dict(
            lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0, weight_decay=c.wd
        ),
    ),
    'adamw': ('AdamW', lambda c: dict(lr=c.lr, weight_decay=c.wd)),
    'adam': ('Adam', lambda c: dict(lr=c.lr, weight_decay=c.wd)),
}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; stored as the run's config (``asdict``)."""

    model: str = 'resnet18'  # a ghnviz zoo / torchvision model name; with model_code, its class name
    model_code: str | None = None  # Python source defining the class ``model`` (pasted code); None: zoo
    num_classes: int | None = None  # None: the dataset's number of classes
    init: str = 'default'  # one of INITS
    ghn: str = 'default'  # GHN file or name, for the ghn* inits
    beta: float | None = None  # noise scale; None: the init's default (3e-5 for '+noise', else 0)
    layer: int | None = None  # first post-processed layer; None: LAYER_PRESETS for the model, else 0
    max_sz: int = 0  # post-process only layers with max(out, in) > max_sz (0: all)
    dataset: str = 'cifar10'  # a ghnviz.data dataset name
    data_path: str | None = None  # where the dataset lives (archive or folder); None: the data default
    shots: int | None = 100  # training images per class (100-shot as in the published recipes); None: all
    steps: int = 200  # optimiser steps; ignored when epochs is set
    epochs: float | None = None  # passes over the training subset; when set, overrides steps
    lr: float = 0.01  # ppuda ResNet-50 100-shot recipe (SGD)
    wd: float = 0.01  # same recipe
    opt: str = 'sgd'  # one of OPTIMIZERS
    momentum: float = 0.9  # SGD momentum (the reference default)
    nesterov: bool = False  # plain momentum, as the reference
    batch_size: int = 64  # the reference's CIFAR batch size for GHN training and fine-tuning runs
    image_size: int = 32  # inputs are resized to this; <= 32 adapts the model's stem to small images
    augment: bool = True  # random crop (padding 4) and horizontal flip on training batches
    label_smoothing: float = 0.0  # cross-entropy label smoothing (the reference uses none on CIFAR)
    grad_clip: float | None = 5.0  # gradient-norm clip (the reference default); None: no clipping
    warmup_steps: int | None = None  # None: 5 % of the steps (rounded)
    eval_every: int = 50  # steps between test evaluations (0: only at the start and the end)
    eval_at_start: bool = True  # evaluate the initialisation before the first step (step 0)
    eval_limit: int | None = 1000  # class-balanced test subset size; None: the whole test split
    eval_batch_size: int = 256  # evaluation batch (no gradients, so larger)
    bn_recalibrate: int = 0  # training batches to re-estimate BN statistics before each eval (0: off)
    seed: int = 0  # model init, post-processing noise, subset, augmentation and batch order
    data_seed: int | None = None  # seed of the training / test subset choice; None: seed
    device: str = 'auto'  # 'auto': cuda when available, else cpu
    threads: int | None = None  # torch CPU threads for the run; None: leave torch's setting

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f'unknown init {self.init!r}; valid inits: {", ".join(INITS)}')
        if self.opt not in OPTIMIZERS:
            raise ValueError(f'unknown optimizer {self.opt!r}; valid optimizers: {", ".join(OPTIMIZERS)}')
        if self.epochs is None and self.steps < 0:
            raise ValueError(f'steps must be >= 0, got {self.steps}')

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> FinetuneConfig:
        """Build from a stored run config (ignores the runner's ``kind`` and ``name`` keys)."""
        known = {f.name for f in fields(cls)}
        extra = set(config) - known - {'kind', 'name'}
        if extra:
            raise ValueError(f'unknown fine-tuning options {sorted(extra)}; valid: {sorted(known)}')
        return cls(**{k: v for k, v in config.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The config as a run config for the store / runner (``kind='finetune'``)."""
        return {'kind': 'finetune', **asdict(self)}

    def resolved_beta(self) -> float:
        return INITS[self.init][2] if self.beta is None else self.beta

    def resolved_layer(self) -> int:
        return LAYER_PRESETS.get(self.model, 0) if self.layer is None else self.layer


@dataclass
class FinetuneResult:
    """What a run ended with. ``model`` is the fine-tuned network (eval mode, on the run's device)."""

    status: str  # 'done' or 'cancelled'
    steps: int  # optimiser steps completed
    metrics: dict[str, float]  # final test/acc, test/loss, train/loss (mean of the last 10 steps)
    history: list[dict[str, float]]  # one dict per evaluation: step, test/acc, test/loss
    init: dict[str, Any]  # what the initialisation did (predicted / skipped tensors, changed layers)
    seconds: float  # wall time of the whole run
    run_id: int | None = None
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary stored with the run."""
        return {k: v for k, v in asdict(self).items() if k not in ('model', 'history', 'run_id')} | {
            'evaluations': len(self.history)
        }


# ---------------------------------------------------------------------------------------------- pieces
def resolve_device(device: str) -> torch.device:
    import torch

    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def build_model(name: str, num_classes: int, image_size: int, code: str | None = None) -> nn.Module:
    """A freshly initialised classifier (:func:`ghnviz.create_model`) for ``image_size`` inputs.

    With ``image_size <= 32``, torchvision models get :func:`~ghnviz.zoo.adapt.adapt_to_small_images`
    and DeepNets-1M networks are built with their CIFAR stem (``is_imagenet_input=False``).

    With ``code`` (pasted Python source), ``name`` is a class defined there; it is built with
    ``num_classes`` when its constructor takes that argument, is not adapted, and must map a batch of
    3 x ``image_size`` x ``image_size`` images to ``num_classes`` logits (checked on two blank images).
    Pasted code runs in this process: it is refused when ``GHNVIZ_ALLOW_CODE=0``.
    """
    from ghnviz.zoo.factory import DEEPNETS_PREFIX, create_model

    if code is not None:
        return _build_pasted(name, code, num_classes, image_size)
    small = image_size <= 32
    if name.startswith(DEEPNETS_PREFIX):
        return create_model(name, num_classes=num_classes, is_imagenet_input=not small)
    model = create_model(name, num_classes=num_classes)
    if small:
        from ghnviz.zoo.adapt import adapt_to_small_images

        model = adapt_to_small_images(model)
    return model


def _build_pasted(name: str, code: str, num_classes: int, image_size: int) -> nn.Module:
    import torch

    from ghnviz.zoo.pasted import PastedCodeError, _construct, _execute, code_allowed

    if not code_allowed():
        raise PastedCodeError('disabled', 'pasted code is disabled (GHNVIZ_ALLOW_CODE=0)')
    cls = _execute(code).get(name)
    if not isinstance(cls, type):
        raise PastedCodeError('no_module', f'class {name!r} is not defined by the pasted code')
    model = _construct(cls, num_classes)
    model.expected_input_sz = (3, image_size, image_size)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, 3, image_size, image_size))
    except Exception as e:
        raise ValueError(
            f'the pasted model {name} fails on 3x{image_size}x{image_size} images '
            f'({type(e).__name__}: {str(e)[:200]}); give it a stem that accepts that size or choose '
            'another image size'
        ) from None
    finally:
        model.train(was_training)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f'the pasted model {name} returns {got} for 2 images, not (2, {num_classes}) class scores; '
            f'build it for {num_classes} classes (a num_classes argument in its constructor is passed on)'
        )
    return model


def _ghn_num_classes(ghn: Any) -> int | None:
    config = getattr(ghn, 'config', None)
    n = getattr(config, 'num_classes', None) or getattr(ghn, 'num_classes', None)
    return int(n) if n else None


def initialise(model: nn.Module, cfg: FinetuneConfig, num_classes: int) -> dict[str, Any]:
    """Apply ``cfg.init`` to ``model`` in place; returns a JSON-able report of what was done."""
    use_ghn, orth, _ = INITS[cfg.init]
    report: dict[str, Any] = {'init': cfg.init}
    if not use_ghn:
        return report
    import ghnviz

    ghn = ghnviz.load_ghn(cfg.ghn)
    ghn_classes = _ghn_num_classes(ghn)
    predict_cls = ghn_classes == num_classes
    pred = ghn.predict(model, predict_class_layers=predict_cls)
    report.update(
        ghn=str(cfg.ghn),
        ghn_num_classes=ghn_classes,
        class_layers_predicted=predict_cls,
        predicted=len(pred.predicted),
        skipped=len(pred.skipped),
        skipped_reasons=dict(list(pred.skipped.items())[:50]),  # parameter name -> why it kept its init
        predict_seconds=round(float(pred.seconds.get('total', 0.0)), 4),
    )
    beta = cfg.resolved_beta()
    if orth or beta > 0:
        from ghnviz.postprocess import postprocess

        layer = cfg.resolved_layer()
        res = postprocess(model, orth=orth, beta=beta, layer=layer, max_sz=cfg.max_sz, seed=cfg.seed)
        report.update(orth=orth, beta=beta, layer=layer, max_sz=cfg.max_sz, postprocessed=len(res.changed()))
    return report


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr at 0-based ``step``: linear warm-up, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def evaluate(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` (eval mode) over ``batches``."""
    import torch

    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)  # (B, num_classes)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction='sum'))
            correct += int((logits.argmax(1) == y).sum())
            n += y.numel()
    return {'test/acc': 100.0 * correct / max(n, 1), 'test/loss': loss_sum / max(n, 1)}


def recalibrate_bn(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int, device
) -> None:
    """Re-estimate BatchNorm running statistics as the plain average over ``n`` batches."""
    import torch

    bn_type = torch.nn.modules.batchnorm._BatchNorm
    bns = [m for m in model.modules() if isinstance(m, bn_type) and m.track_running_stats]
    if not bns or n <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _, (x, _) in zip(range(n), batches):
            model(x.to(device, non_blocking=True))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum


# ---------------------------------------------------------------------------------------------- data
class _Data:
    """The training subset and the test subset of a run, with their batch loaders."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device) -> None:
        from ghnviz import data

        self._data, self.cfg, self.device = data, cfg, device
        train = data.load_dataset(cfg.dataset, cfg.data_path, 'train')
        test = data.load_dataset(cfg.dataset, cfg.data_path, 'test')
        self.num_classes = train.num_classes
        subset_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self.train = train if cfg.shots is None else data.n_shot_subset(train, cfg.shots, seed=subset_seed)
        if cfg.eval_limit is not None and cfg.eval_limit < len(test):
            per_class = max(1, cfg.eval_limit // test.num_classes)
            test = data.n_shot_subset(test, per_class, seed=subset_seed + 1)
        self.test = test

    def _loader(self, dataset, batch_size: int, train: bool, seed: int = 0):
        return self._data.BatchLoader(
            dataset,
            batch_size,
            shuffle=train,
            augment=train and self.cfg.augment,  # the dataset's default (crop + flip for CIFAR)
            image_size=self.cfg.image_size,
            seed=seed,
            drop_last=train and len(dataset) >= batch_size,
            device=self.device,
            channels=3,  # grey-scale sets repeated to RGB for the image models
        )

    def steps_per_epoch(self) -> int:
        return len(self._loader(self.train, self.cfg.batch_size, train=True))

    def train_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches: a new order (and augmentation) every epoch, all from ``seed``."""
        loader = self._loader(self.train, self.cfg.batch_size, train=True, seed=seed)
        while True:
            yield from loader

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader(self.test, self.cfg.eval_batch_size, train=False))


# ---------------------------------------------------------------------------------------------- loop
def finetune(
    config: FinetuneConfig | Mapping[str, Any],
    store: RunStore | None = None,
    run_id: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.dataset`` (see the module docstring).

    Args:
        config: a :class:`FinetuneConfig` (or a dict of its fields).
        store: run store for metrics, events, status and the cancel flag; None: nothing is logged.
        run_id: the stored run to execute; None with a store: a new run is created.
        progress: show a tqdm bar (only when standard output is a terminal).

    Returns:
        A :class:`FinetuneResult`; ``status`` is ``'cancelled'`` when the cancel flag stopped the run.
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(config)
    if store is not None and run_id is None:
        run_id = store.create_run(cfg.to_dict(), status='running')  # 'queued' would invite the runner
    result = FinetuneResult(
        status='running', steps=0, metrics={}, history=[], init={}, seconds=0.0, run_id=run_id
    )
    from ghnviz.fastops import fast_kernels  # imports torch: only when a run starts

    if store is None:
        with fast_kernels():
            _run(cfg, None, None, progress, result)
        return result
    with store.track(run_id) as tracking, fast_kernels():
        _run(cfg, store, run_id, progress, result, tracking)
    result.status = tracking.status
    return result


def _run(
    cfg: FinetuneConfig,
    store: RunStore | None,
    run_id: int | None,
    progress: bool,
    result: FinetuneResult,
    tracking: Tracking | None = None,
) -> None:
    """The loop itself; fills ``result`` in place (so a cancelled run keeps what it reached)."""
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng_devices = [device.index or 0] if device.type == 'cuda' else []

    def event(message: str, level: str = 'info') -> None:
        log.log(logging.WARNING if level == 'warning' else logging.INFO, 'run %s: %s', run_id, message)
        if store is not None:
            store.log_event(run_id, message, level)

    def check_cancel(where: str) -> None:
        if store is not None and store.cancel_requested(run_id):
            raise RunCancelled(f'cancel requested {where}')

    bar = None
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(cfg.seed)
            data = _Data(cfg, device)
            check_cancel('while loading data')
            num_classes = cfg.num_classes or data.num_classes
            event(f'data: {cfg.dataset}, {len(data.train)} training and {len(data.test)} test images')
            model = build_model(cfg.model, num_classes, cfg.image_size, cfg.model_code)
            result.init = initialise(model, cfg, num_classes)
            event(f'init: {result.init}')
            check_cancel('during initialisation')
            model.to(device)
            result.model = model

            total = cfg.steps
            if cfg.epochs is not None:
                total = max(1, math.ceil(cfg.epochs * data.steps_per_epoch()))
            warmup = round(0.05 * total) if cfg.warmup_steps is None else cfg.warmup_steps
            opt_name, opt_kwargs = OPTIMIZERS[cfg.opt]
            opt = getattr(torch.optim, opt_name)(model.parameters(), **opt_kwargs(cfg))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
            criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
            batches = data.train_batches(cfg.seed)
            event(f'training {total} steps (warm-up {warmup}), {cfg.opt} lr={cfg.lr} wd={cfg.wd} on {device}')

            def run_eval(step: int) -> None:
                if cfg.bn_recalibrate > 0:
                    recalibrate_bn(
                        model, data.train_batches(cfg.seed + 10_000 + step), cfg.bn_recalibrate, device
                    )
                metrics = evaluate(model, data.test_batches(), device)
                result.history.append({'step': step, **metrics})
                result.metrics.update(metrics)
                if store is not None:
                    store.log_metrics(run_id, step, metrics)
                    store.flush()
                if tracking is not None:
                    tracking.summary = result.summary()

            if cfg.eval_at_start:
                run_eval(0)

            bar = tqdm(total=total, disable=not (progress and sys.stdout.isatty()), desc=cfg.model)
            recent: list[float] = []
            for step in range(total):
                check_cancel(f'at step {step}')
                model.train()
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, 3, H, W), (B,)
                logits = model(x)  # (B, num_classes)
                loss = criterion(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = opt.param_groups[0]['lr']
                opt.step()
                sched.step()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f'loss is {loss_value} at step {step + 1}')
                recent = (recent + [loss_value])[-10:]
                result.steps = step + 1
                step_metrics = {
                    'train/loss': loss_value,
                    'train/acc': 100.0 * float((logits.argmax(1) == y).float().mean()),
                    'lr': lr,
                }
                result.metrics['train/loss'] = sum(recent) / len(recent)
                if store is not None:
                    store.log_metrics(run_id, step + 1, step_metrics)
                bar.update(1)
                bar.set_postfix(loss=f'{loss_value:.3f}')
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                    run_eval(step + 1)
            if total > 0 or not cfg.eval_at_start:
                run_eval(total)
            result.status = 'done'
    except RunCancelled:
        result.status = 'cancelled'
        raise
    finally:
        if bar is not None:
            bar.close()
        if result.model is not None:
            result.model.eval()
        if cfg.threads:
            torch.set_num_threads(old_threads)
        result.seconds = time.perf_counter() - start
        if tracking is not None:
            tracking.summary = result.summary()


def execute_run(config: Mapping[str, Any], store: RunStore, run_id: int) -> FinetuneResult:
    """Runner job: execute the stored fine-tuning run ``run_id`` (no progress bar)."""
    return finetune(FinetuneConfig.from_dict(config), store=store, run_id=run_id, progress=False)
