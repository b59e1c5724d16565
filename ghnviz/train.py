"""GHN meta-training on DeepNets-1M architectures: CPU, CUDA, and ``torchrun`` with DistributedDataParallel.

One step: one image batch; a meta-batch of ``meta_batch`` training architectures (a different draw on
every rank); ONE GHN forward predicts the parameters of all of them; every network classifies the same
images; the loss is the mean cross-entropy over the networks. Adam/AdamW, a step or cosine (warm-up)
schedule, gradient-norm clipping, optional mixed precision.

Where the time goes and what avoids it:

* architectures come from a pool of train-split indices; each (architecture, width) is built once as a
  shape-only network (parameters on the ``meta`` device) together with its computation graph and kept
  in an LRU cache, so steady-state steps neither trace graphs nor construct modules
  (:mod:`ghnviz.train_archs`);
* predicted tensors are passed to the cached networks with :func:`torch.func.functional_call`;
* ops whose parameters have no graph node (they do not reach the output, e.g. cell nodes left out of the
  concatenation) are pruned from the cached network, so they are not computed at all;
* meta-batches over a node budget are dropped (as the reference sampler does), bounding GHN memory;
* optional bf16 autocast and channels-last images for the networks; ``amp='auto'`` takes bf16 only where
  it is fast (CUDA with bf16, CPUs with AVX512-BF16 or AMX): elsewhere on CPU, bf16 runs in emulation,
  several times slower than fp32 (``benchmarks/bench_train.py --amp bf16`` measures it);
* dilated convolutions and attention run through the faster equivalent kernels of :mod:`ghnviz.fastops`.

Stopping early without losing work: ``max_seconds`` (``--max-minutes``) or a file named ``STOP`` in
``out_dir`` (``touch OUT/STOP``) ends the run at the next step with a checkpoint; all ranks stop at the
same step. The file is removed (one older than the call is ignored), and ``--resume`` continues from
there.

Checkpoints (``out_dir``): ``ghn.safetensors`` (:func:`ghnviz.save_ghn` format), ``ghn.json`` (training
config, step, metrics), ``train_state.pt`` (optimizer, scheduler, scaler, RNG and sampler states; plain
tensors and containers, read with ``weights_only=True``) and ``metrics.csv`` (one row per step).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ghnviz.fastops import fast_kernels
from ghnviz.train_archs import (
    ArchBatch,
    ArchSampler,
    MetaBatchPredictor,
    TrainArch,
    meta_batch_loss,
    predict_params,
    prepare_arch,
)

__all__ = [
    'TrainConfig',
    'train',
    'build_ghn',
    'save_checkpoint',
    'load_card',
    'learning_curve',
    'ArchSampler',
    'TrainArch',
    'prepare_arch',
    'predict_params',
    'meta_batch_loss',
]

log = logging.getLogger(__name__)

CHECKPOINT = 'ghn.safetensors'
CARD = 'ghn.json'
STATE = 'train_state.pt'
METRICS = 'metrics.csv'
STOP_FILE = 'STOP'
METRIC_FIELDS = ('step', 'loss', 'acc', 'lr', 'seconds', 'archs_per_s', 'nodes', 'failures', 'elapsed_s')


@dataclass
class TrainConfig:
    """Settings of one GHN training run (stored in every checkpoint)."""

    # ---- data
    dataset: str = 'cifar10'  # a name known to ghnviz.data.load_dataset
    data_path: str | None = None  # archive/folder/torchvision root; None = the dataset's default location
    batch_size: int = 64  # images per step, shared by all networks of the meta-batch (reference: 64 on CIFAR)
    limit_per_class: int | None = None  # decode only K training images per class (tests, quick runs)
    # ---- architectures
    split: str = 'train'  # DeepNets-1M split the architectures come from
    arch_pool: int = 0  # use indices 0..arch_pool-1 of the split; 0 = the whole split
    meta_batch: int = 8  # architectures per step (reference: m=8)
    max_nodes: int = 2200  # drop meta-batches whose graphs have more nodes in total (reference: 2,200)
    resample_width: bool = True  # redraw C and fc_dim at every use, as the reference loader does
    max_width: int = 0  # cap C at this value (0 = no cap); smaller widths train faster
    max_cells: int = 0  # skip architectures with more cells (0 = keep all)
    cache_size: int = 1024  # (architecture, width) entries kept built with their graphs
    # ---- GHN
    arch: str = 'ghn2'  # 'ghn2' (gated graph network) or 'ghn3' (Graphormer)
    hid: int = 32  # node embedding width (GHN-2 uses 32; GHN-3-T 64)
    layers: int = 3  # Graphormer blocks (ghn3 only)
    heads: int = 8  # attention heads (ghn3 only)
    max_shape: tuple[int, int, int, int] = (64, 64, 11, 11)  # largest decoded block (GHN-2 CIFAR-10 value)
    weight_norm: bool = True  # rescale predicted tensors by fan-in (GHN-2 '-n')
    ve: bool = True  # virtual edges up to 50 hops (GHN-2 '-v 50')
    layernorm: bool = True  # LayerNorm on node embeddings (GHN-2 '--ln')
    # ---- optimisation
    steps: int = 1000  # optimizer updates in total (reference: 300 epochs x 782 batches)
    optimizer: str = 'adam'  # 'adam' (GHN-2 recipe) or 'adamw' (GHN-3 recipe)
    lr: float = 1e-3  # peak learning rate (GHN-2: 1e-3, GHN-3: 4e-4)
    weight_decay: float = 1e-5  # GHN-2: 1e-5 (Adam), GHN-3: 1e-2 (AdamW)
    scheduler: str = 'step'  # 'step' (MultiStepLR, GHN-2) or 'cosine' (with linear warm-up, GHN-3)
    milestones: tuple[float, ...] = (0.667, 0.833)  # step schedule: LR drops at these fractions of steps
    gamma: float = 0.1  # step schedule: factor at each milestone
    warmup_steps: int = 0  # cosine schedule: linear warm-up from `warmup_lr`
    warmup_lr: float = 1e-5  # cosine schedule: learning rate at step 0
    grad_clip: float = 5.0  # gradient-norm clipping (reference: 5)
    label_smoothing: float = 0.0  # reference: 0 on CIFAR-10, 0.1 on ImageNet
    amp: str = 'none'  # networks' forward precision: 'none', 'bf16', 'fp16' (CUDA), 'auto' (bf16 where fast)
    channels_last: bool = False  # images in channels-last layout (faster convolutions on some hardware)
    # ---- run
    device: str = 'auto'  # 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...
    threads: int = 0  # torch CPU threads (0 = torch's default)
    seed: int = 0  # seeds architecture draws, image order and augmentation (plus the rank under DDP)
    out_dir: str = 'runs/ghn'  # checkpoints, card and metrics go here
    save_every_s: float = 300.0  # checkpoint at least this often (seconds), and at the end
    log_every: int = 50  # log a summary line every this many steps
    max_failures: int = 50  # give up after this many consecutive skipped steps (NaN loss, out of memory)
    # Ignored when resuming from a checkpoint in out_dir:
    init_from: str | None = None  # start from these GHN weights (file/name), continuing their step count

    def __post_init__(self) -> None:
        self.max_shape = tuple(int(v) for v in self.max_shape)
        self.milestones = tuple(float(v) for v in self.milestones)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f'unknown optimizer {self.optimizer!r}; valid: {sorted(OPTIMIZERS)}')
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f'unknown scheduler {self.scheduler!r}; valid: {sorted(SCHEDULERS)}')
        if self.amp not in AMP_DTYPES and self.amp != 'auto':
            raise ValueError(f'unknown amp {self.amp!r}; valid: {sorted(AMP_DTYPES) + ["auto"]}')

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['max_shape'], d['milestones'] = list(self.max_shape), list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


OPTIMIZERS = {'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}
AMP_DTYPES: dict[str, torch.dtype | None] = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision a run uses on ``device``: 'auto' becomes 'bf16' where bf16 is fast, else 'none'.

    An explicit 'bf16' on a CPU without native bf16 is kept, with a warning (it runs, only slower).

    Raises:
        ValueError: 'fp16' off CUDA.
    """
    if amp == 'auto':
        if device.type == 'cuda':
            return 'bf16' if torch.cuda.is_bf16_supported() else 'none'
        return 'bf16' if device.type == 'cpu' and cpu_has_native_bf16() else 'none'
    if amp == 'fp16' and device.type != 'cuda':
        raise ValueError('amp=fp16 needs CUDA; use amp=bf16 on CPU')
    if amp == 'bf16' and device.type == 'cpu' and not cpu_has_native_bf16():
        log.warning(
            'amp=bf16 on a CPU without bf16 instructions (capability %s, no AVX512-BF16 or AMX): torch '
            'emulates bf16 here, several times slower than fp32; use amp=none or amp=auto',
            torch.backends.cpu.get_cpu_capability(),
        )
    return amp


# Settings whose change makes a checkpoint's weights or optimizer state meaningless for a resumed run.
MODEL_FIELDS = (
    'arch',
    'hid',
    'layers',
    'heads',
    'max_shape',
    'weight_norm',
    've',
    'layernorm',
    'dataset',
    'optimizer',
)


def _step_lambda(cfg: TrainConfig):
    marks = sorted(round(f * cfg.steps) for f in cfg.milestones)
    return lambda step: cfg.gamma ** sum(step >= m for m in marks)


def _cosine_lambda(cfg: TrainConfig):
    start = cfg.warmup_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return start + (1 - start) * step / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


SCHEDULERS = {'step': _step_lambda, 'cosine': _cosine_lambda}


# ---------------------------------------------------------------------------------------- images


class ImageStream:
    """Endless, resumable stream of augmented, normalised training batches (epochs without repeats)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, seed: int):
        from ghnviz.data import BatchLoader, load_dataset

        data = load_dataset(cfg.dataset, cfg.data_path, 'train', limit_per_class=cfg.limit_per_class)
        self.loader = BatchLoader(data, cfg.batch_size, shuffle=True, augment=True, seed=seed, device=device)
        self.data, self.batch_size = data, min(cfg.batch_size, len(data))
        self.order = torch.randperm(len(data), generator=self.loader.gen)
        self.pos = 0

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.data), generator=self.loader.gen), 0
        idx = self.order[self.pos : self.pos + self.batch_size]  # (B,)
        self.pos += self.batch_size
        x = self.loader.transform(self.data.images[idx])  # (B, C, H, W)
        return x, self.data.labels[idx].to(x.device)

    def state_dict(self) -> dict:
        return {'gen': self.loader.gen.get_state(), 'order': self.order, 'pos': self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.loader.gen.set_state(state['gen'])
        self.order, self.pos = state['order'], int(state['pos'])


# ---------------------------------------------------------------------------------------- setup


def build_ghn(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A freshly initialised GHN of the configured architecture."""
    from ghnviz.hyper.ghn import get_ghn_class

    cls = get_ghn_class(cfg.arch)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    values = dict(
        max_shape=cfg.max_shape, num_classes=num_classes, hid=cfg.hid, weight_norm=cfg.weight_norm,
        ve=cfg.ve, layernorm=cfg.layernorm, layers=cfg.layers, heads=cfg.heads,
    )  # fmt: skip
    return cls(cls.config_class(**{k: v for k, v in values.items() if k in names}))


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank)
    return device


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group).

    Initialises the process group when launched by torchrun (WORLD_SIZE > 1) and none exists yet.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def _close_distributed(completed: bool) -> None:
    """Tear down the process group this run created.

    A gloo group left to interpreter shutdown can abort the process ("terminate called without an
    active exception") after the work is done, so a finished run waits for every rank and then
    destroys the group explicitly; a failed run destroys it without waiting for ranks that may be gone.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def _all_reduce(t: torch.Tensor, world: int, op: str = 'sum') -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == 'min' else dist.ReduceOp.SUM)
    return t


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e)


# ---------------------------------------------------------------------------------------- checkpoints


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    write(tmp)
    os.chmod(tmp, 0o644)  # some writers create private temporary files
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: Path, ghn: nn.Module, cfg: TrainConfig, step: int, info: dict, state: dict
) -> Path:
    """Write ``ghn.safetensors``, ``ghn.json`` and ``train_state.pt`` into ``out_dir`` (each atomically)."""
    from ghnviz.hyper.io import save_ghn

    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(out_dir / CHECKPOINT, lambda p: save_ghn(ghn, p))
    card = {'format': 'ghnviz-train', 'step': step, 'arch': ghn.arch, 'ghn_config': ghn.config.to_dict()}
    card.update(train_config=cfg.to_dict(), **info)
    _atomic(out_dir / CARD, lambda p: p.write_text(json.dumps(card, indent=1)))
    _atomic(out_dir / STATE, lambda p: torch.save(state, p))
    return out_dir / CHECKPOINT


def load_card(out_dir: str | os.PathLike) -> dict:
    """The ``ghn.json`` of a training directory."""
    return json.loads((Path(out_dir) / CARD).read_text())


def _check_resumable(cfg: TrainConfig, card: dict) -> None:
    old = TrainConfig.from_dict(card['train_config'])
    diff = [f for f in MODEL_FIELDS if getattr(old, f) != getattr(cfg, f)]
    if diff:
        raise ValueError(
            f'cannot resume: the checkpoint was trained with other {diff} '
            f'({", ".join(f"{f}={getattr(old, f)!r}" for f in diff)}); use another out_dir'
        )


class _MetricsCSV:
    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        rows = []
        if keep_until is not None and path.exists():  # resumed: drop rows past the checkpoint's step
            with open(path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if int(r['step']) <= keep_until]
        self.f = open(path, 'w', newline='')
        self.w = csv.DictWriter(self.f, fieldnames=METRIC_FIELDS)
        self.w.writeheader()
        self.w.writerows(rows)

    def write(self, row: dict) -> None:
        self.w.writerow({k: row[k] for k in METRIC_FIELDS})

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class _Parts:
    """Everything a run holds, so that checkpointing and resuming see one object."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    owns_group: bool
    ghn: nn.Module
    images: ImageStream
    sampler: ArchSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0
    elapsed: float = 0.0
    failures: int = 0

    def rank_state(self) -> dict:
        return {
            'sampler': self.sampler.state_dict(),
            'images': self.images.state_dict(),
            'torch_rng': torch.get_rng_state(),
        }

    def save(self, last: dict) -> None:
        """Checkpoint (collective under DDP: every rank calls it, rank 0 writes)."""
        ranks = [self.rank_state()]
        if self.world > 1:
            import torch.distributed as dist

            gathered = [None] * self.world if self.rank == 0 else None
            dist.gather_object(ranks[0], gathered, dst=0)
            ranks = gathered
        if self.rank != 0:
            return
        state = {
            'step': self.step,
            'elapsed_s': self.elapsed,
            'failures': self.failures,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'ranks': ranks,
        }
        info = {
            'elapsed_s': round(self.elapsed, 1),
            'world_size': self.world,
            'device': str(self.device),
            'hardware': _hardware(self.device),
            'last': last,
        }
        save_checkpoint(Path(self.cfg.out_dir), self.ghn, self.cfg, self.step, info, state)
        log.info('step %d: checkpoint saved to %s', self.step, self.cfg.out_dir)

    def _position_schedule(self) -> None:
        """Set the learning rate to this run's ``lr`` times its schedule at the current step."""
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            self.scheduler.last_epoch = self.step - 1
            self.scheduler.step()

    def init_from(self, path_or_name: str) -> None:
        """Start from another run's GHN weights, continuing its step count and time (fresh optimizer)."""
        from ghnviz.hyper.io import load_ghn, resolve_checkpoint

        path = resolve_checkpoint(path_or_name)
        src = load_ghn(path)
        ours, theirs = self.ghn.config.to_dict(), src.config.to_dict()
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ValueError(
                f'cannot start from {path}: its GHN differs in {diff} '
                f'({", ".join(f"{k}={theirs.get(k)!r} here {ours.get(k)!r}" for k in diff)}); '
                'set the same GHN options'
            )
        self.ghn.load_state_dict(src.state_dict())
        card_path = Path(path).with_suffix('.json')
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        self.step = int(card.get('step', 0))
        self.elapsed = float(card.get('elapsed_s', card.get('wall_time_s', 0.0)))
        if self.step:
            self._position_schedule()
        log.info('starting from the weights of %s at step %d (fresh optimizer state)', path, self.step)

    def resume(self) -> bool:
        """Load the checkpoint in ``out_dir`` if there is one; returns whether it did."""
        from ghnviz.hyper.io import load_ghn

        out_dir = Path(self.cfg.out_dir)
        if not ((out_dir / CHECKPOINT).exists() and (out_dir / STATE).exists()):
            log.info('no checkpoint in %s: starting a new run', out_dir)
            return False
        _check_resumable(self.cfg, load_card(out_dir))
        self.ghn.load_state_dict(load_ghn(out_dir / CHECKPOINT).state_dict())
        state = torch.load(out_dir / STATE, map_location='cpu', weights_only=True)
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.step, self.elapsed, self.failures = (
            int(state['step']),
            float(state['elapsed_s']),
            int(state['failures']),
        )
        # the loaded states carry the old run's lr and weight decay: this run's settings apply from here on
        for group in self.optimizer.param_groups:
            group['initial_lr'] = self.cfg.lr
            group['weight_decay'] = self.cfg.weight_decay
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        self._position_schedule()
        if len(state['ranks']) == self.world:
            mine = state['ranks'][self.rank]
            self.sampler.load_state_dict(mine['sampler'])
            self.images.load_state_dict(mine['images'])
            torch.set_rng_state(mine['torch_rng'])
        else:
            log.warning(
                'resuming with %d processes instead of %d: architecture and image streams start afresh',
                self.world,
                len(state['ranks']),
            )
        log.info('resumed from %s at step %d', out_dir, self.step)
        return True


def _setup(cfg: TrainConfig) -> _Parts:
    device = _resolve_device(cfg.device, int(os.environ.get('LOCAL_RANK', '0')))
    rank, world, owns_group = _init_distributed(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    amp = resolve_amp(cfg.amp, device)
    if amp != cfg.amp:
        log.info('amp=%s: using %s on %s', cfg.amp, amp, device)
        cfg = dataclasses.replace(cfg, amp=amp)  # the run (and its card) records what it used
    torch.manual_seed(cfg.seed * 1000 + rank)  # the global generator only drives dropout inside the networks
    images = ImageStream(cfg, device, seed=cfg.seed * 1000 + rank)
    ghn = build_ghn(cfg, images.num_classes).to(device).train()
    optimizer = OPTIMIZERS[cfg.optimizer](ghn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _Parts(
        cfg=cfg,
        device=device,
        rank=rank,
        world=world,
        owns_group=owns_group,
        ghn=ghn,
        images=images,
        sampler=ArchSampler(cfg, images.num_classes, ghn.config.ve_cutoff, rank, world),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULERS[cfg.scheduler](cfg)),
        scaler=torch.amp.GradScaler(device.type, enabled=AMP_DTYPES[cfg.amp] == torch.float16),
    )


@fast_kernels()
def train(
    cfg: TrainConfig, resume: bool = False, progress: bool = False, max_seconds: float | None = None
) -> dict:
    """Train a GHN; checkpoints go to ``cfg.out_dir``.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``), every process trains one DDP replica: gloo on CPU,
    nccl on CUDA; ranks draw different architectures and images.

    Args:
        cfg: the run's settings.
        resume: continue from the checkpoint in ``cfg.out_dir`` (step count, GHN, optimizer, scheduler,
            scaler, RNG and sampler states); starts afresh when there is none.
        progress: show a tqdm progress bar (rank 0 only).
        max_seconds: stop, with a checkpoint, once this call has run this long (``STOP`` in ``out_dir``
            stops it the same way); the schedule still spans ``cfg.steps``.

    Returns:
        Summary: steps, last metrics, training seconds, failed steps, world size, checkpoint path, and
        ``stopped`` (None, or why the run ended before ``cfg.steps``: ``'time limit'``, ``'STOP file'``).

    Raises:
        RuntimeError: ``max_failures`` consecutive steps failed (non-finite loss or gradients, out of memory).
    """
    run = _setup(cfg)
    cfg = run.cfg  # with amp resolved
    resumed = run.resume() if resume else False
    if not resumed and cfg.init_from:
        run.init_from(cfg.init_from)
    out_dir = Path(cfg.out_dir)
    predictor: nn.Module = MetaBatchPredictor(run.ghn)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [run.device.index] if run.device.type == 'cuda' else None
        predictor = DistributedDataParallel(predictor, device_ids=ids)
    metrics = bar = None
    if run.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = _MetricsCSV(out_dir / METRICS, keep_until=run.step if resume or cfg.init_from else None)
        n_params = sum(p.numel() for p in run.ghn.parameters())
        log.info(
            'training a %s GHN (%d parameters) on %s, %d process(es)',
            cfg.arch,
            n_params,
            run.device,
            run.world,
        )
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=run.step, desc='train', dynamic_ncols=True)
            bar.mininterval = 1.0 if sys.stderr.isatty() else 30.0
    last: dict = {}
    window: list[dict] = []
    started = last_save = time.perf_counter()
    consecutive, stopped = 0, None
    stop_file = out_dir / STOP_FILE
    called_at = time.time()  # a STOP file older than this call is left over from an earlier one
    completed = False
    try:
        while run.step < cfg.steps:
            x, y = run.images.next()
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            ok, loss, correct, archs = _try_step(
                cfg, predictor, run.sampler, run.optimizer, run.scaler, x, y, run.world
            )
            if not ok:
                consecutive += 1
                run.failures += 1
                if consecutive >= cfg.max_failures:
                    raise RuntimeError(
                        f'{consecutive} consecutive steps failed (non-finite loss or gradients, out of '
                        f'memory); lower the learning rate, or resume from the checkpoint in {out_dir}'
                    )
                continue
            consecutive = 0
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            run.step += 1
            seconds = time.perf_counter() - t0
            run.elapsed += seconds
            last = _step_metrics(run, loss, correct, archs, len(y), lr, seconds)
            window.append(last)
            if metrics is not None:
                metrics.write(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f'{last["loss"]:.3f}', acc=f'{last["acc"]:.3f}', refresh=False)
            if run.step % cfg.log_every == 0 and run.rank == 0:
                _log_window(run, window)
                window.clear()
                metrics.flush()
            now = time.perf_counter()
            flags = torch.tensor(  # [checkpoint due, time limit reached, stop file seen], agreed by all ranks
                [
                    float(now - last_save >= cfg.save_every_s),
                    float(max_seconds is not None and now - started >= max_seconds),
                    float(_stop_requested(stop_file, called_at)),
                ],
                dtype=torch.float64,
            )
            due, out_of_time, asked = (_all_reduce(flags, run.world) > 0).tolist()
            if out_of_time or asked:
                stopped = 'time limit' if out_of_time else 'STOP file'
            if run.step == cfg.steps or due or stopped:
                if metrics is not None:
                    metrics.flush()  # the CSV never lags behind a checkpoint
                run.save(last)
                last_save = time.perf_counter()
            if stopped:
                if run.rank == 0:
                    stop_file.unlink(missing_ok=True)
                    log.info('stopped at step %d (%s); --resume goes on from %s', run.step, stopped, out_dir)
                break
        completed = True
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if run.owns_group:
            del predictor  # DDP's reducer goes before the group it talks over
            _close_distributed(completed)
    return {
        'steps': run.step,
        'last': last,
        'elapsed_s': run.elapsed,
        'failures': run.failures,
        'world_size': run.world,
        'checkpoint': str(out_dir / CHECKPOINT),
        'stopped': stopped,
        'cache': {'hits': run.sampler.hits, 'misses': run.sampler.misses, 'dropped': run.sampler.dropped},
    }


def _stop_requested(stop_file: Path, since: float) -> bool:
    try:
        return stop_file.stat().st_mtime >= since - 1.0
    except OSError:  # absent (or removed by rank 0 meanwhile)
        return False


def _step_metrics(
    run: _Parts, loss: float, correct: int, archs: list[TrainArch], batch: int, lr, seconds
) -> dict:
    """One CSV row; under DDP loss, accuracy, nodes and throughput cover all ranks."""
    stats = torch.tensor(
        [loss, correct, batch * len(archs), sum(a.n_nodes for a in archs)], dtype=torch.float64
    )
    _all_reduce(stats, run.world)
    return {
        'step': run.step,
        'loss': round(stats[0].item() / run.world, 5),
        'acc': round(stats[1].item() / stats[2].item(), 5),
        'lr': lr,
        'seconds': round(seconds, 4),
        'archs_per_s': round(len(archs) * run.world / seconds, 3),
        'nodes': int(stats[3].item()),
        'failures': run.failures,
        'elapsed_s': round(run.elapsed, 1),
    }


def _log_window(run: _Parts, window: list[dict]) -> None:
    def mean(key: str) -> float:
        return sum(w[key] for w in window) / len(window)

    s = run.sampler
    log.info(
        'step %d/%d loss %.4f acc %.4f lr %.2e %.2f s/step %.2f archs/s (cache %d hits, %d misses; '
        '%d dropped)',
        run.step,
        run.cfg.steps,
        mean('loss'),
        mean('acc'),
        window[-1]['lr'],
        mean('seconds'),
        mean('archs_per_s'),
        s.hits,
        s.misses,
        s.dropped,
    )


def _try_step(cfg, predictor, sampler, optimizer, scaler, x, y, world: int):
    """One update attempt: (ok, loss, correct, archs). A failed attempt leaves the GHN unchanged.

    Non-finite losses and out-of-memory errors in the forward are agreed on by all ranks before any
    backward (so DDP never waits on a rank that skipped); non-finite gradient norms are identical on all
    ranks after DDP's all-reduce.
    """
    archs = sampler.next_batch()
    optimizer.zero_grad(set_to_none=True)
    try:
        params = predictor(ArchBatch(archs))
        loss, correct = meta_batch_loss(archs, params, x, y, cfg.label_smoothing, AMP_DTYPES[cfg.amp])
        fine = torch.isfinite(loss.detach()).to(torch.float64).reshape(1).cpu()
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        log.warning('out of memory on a meta-batch of %d nodes; skipping it', sum(a.n_nodes for a in archs))
        loss = params = None
        fine = torch.zeros(1, dtype=torch.float64)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if _all_reduce(fine, world, 'min').item() < 1:
        if loss is not None:
            log.warning('non-finite loss (%s); skipping the step', loss.item())
        return False, 0.0, 0, archs
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']], cfg.grad_clip)
    if not torch.isfinite(norm):
        if scaler.is_enabled():  # the scaler skips the update itself and lowers its scale
            scaler.step(optimizer)
            scaler.update()
        log.warning('non-finite gradient norm; skipping the step')
        optimizer.zero_grad(set_to_none=True)
        return False, 0.0, 0, archs
    scaler.step(optimizer)
    scaler.update()
    return True, loss.item(), correct.item(), archs


def _hardware(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f'{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads per process'


def learning_curve(metrics_csv: str | os.PathLike, window: int = 50) -> list[dict]:
    """Means of a run's ``metrics.csv`` over consecutive windows of ``window`` steps (a small curve)."""
    with open(metrics_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    out = []
    for i in range(0, len(rows), window):
        chunk = rows[i : i + window]
        n = len(chunk)
        out.append(
            {
                'step': int(chunk[-1]['step']),
                'loss': round(sum(float(r['loss']) for r in chunk) / n, 4),
                'acc': round(sum(float(r['acc']) for r in chunk) / n, 4),
                'lr': float(chunk[-1]['lr']),
                'seconds_per_step': round(sum(float(r['seconds']) for r in chunk) / n, 3),
                'archs_per_s': round(sum(float(r['archs_per_s']) for r in chunk) / n, 3),
                'elapsed_s': float(chunk[-1]['elapsed_s']),
            }
        )
    return out
