"""Values for parameter tensors a GHN has no graph node for: "fills".

A GHN predicts exactly the tensors that appear as nodes of the computation graph. Some tensors of
otherwise supported architectures never become nodes: ConvNeXt layer scales, Swin and MaxViT relative
position bias tables, Swin V2 logit scales, a ViT's class token, timm's position embeddings and tokens,
the affine parameters of norm layers without a primitive type (``GroupNorm``, ...). With
``ghn.predict(model, complete=True)`` each such tensor gets a deterministic value from the first
matching rule of :data:`FILL_RULES` (mostly the value the architecture's own initialisation gives it)
and is listed in ``Prediction.filled`` (name -> rule), never in ``Prediction.predicted``.

Tensors no rule matches stay in ``Prediction.skipped`` with their reason: the parameters of layers a GHN
cannot represent at all (``nn.LSTM``, ``nn.Conv1d``, ...) are filled only with ``module_init=True``,
which re-runs the owning module's ``reset_parameters()`` (labelled as such).

Random fills draw from their own CPU generator seeded with :attr:`FillConfig.seed`, in
``named_parameters()`` order, so they are reproducible, identical on every device and leave torch's
global generator alone.

Adding a rule: :func:`register_fill_rule` with a :class:`FillRule` (rules are tried in order).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = ['FILL_RULES', 'FillConfig', 'FillRule', 'fill_missing', 'register_fill_rule']


@dataclass
class FillConfig:
    """Settings of the fill rules (see :data:`FILL_RULES`)."""

    # Layer scales: ConvNeXt's initial value in torchvision and timm; it is also what a ConvNeXt predicted
    # by the original GHN code runs with (its layer scales keep their initial value).
    layer_scale: float = 1e-6
    # Class/distillation/register tokens ~ N(0, std^2): the std of the class-token row a GHN itself puts
    # in front of a ViT position embedding.
    token_std: float = 0.02
    # Relative position bias tables and position embeddings ~ truncated N(0, std^2) (+-2 std): the
    # Swin, MaxViT and timm ViT initialisation.
    table_std: float = 0.02
    # Swin V2 attention logit scale: log(10), its initialisation.
    logit_scale: float = math.log(10.0)
    # Seed of the generator every random fill draws from (one generator per model).
    seed: int = 0
    # Weight 1 and bias 0 for norm layers the graph has no node for (their usual initialisation).
    norm_affine: bool = True
    # Last resort, off by default: re-run reset_parameters() of the module that owns a tensor no other
    # rule fills (LSTM, Conv1d, ...), so that every tensor has a value that depends on no earlier state.
    module_init: bool = False


@dataclass(frozen=True)
class FillRule:
    """One way of giving a value to a tensor without a graph node.

    Attributes:
        name: short rule name (the start of each ``Prediction.filled`` label).
        matches: ``(module, attr, name, tensor, config) -> bool``: whether the rule applies to parameter
            ``attr`` of ``module`` (full name ``name``).
        value: ``(module, attr, tensor, config, generator) -> tensor`` of the tensor's shape (any device,
            float).
        describe: ``config -> str``: how the value is made, for the label.
    """

    name: str
    matches: Callable[[nn.Module, str, str, torch.Tensor, FillConfig], bool]
    value: Callable[[nn.Module, str, torch.Tensor, FillConfig, torch.Generator], torch.Tensor]
    describe: Callable[[FillConfig], str]


FILL_RULES: list[FillRule] = []


def register_fill_rule(rule: FillRule, first: bool = False) -> FillRule:
    """Add a rule (tried before the built-in ones when ``first``)."""
    FILL_RULES.insert(0, rule) if first else FILL_RULES.append(rule)
    return rule


# ---- built-in rules ------------------------------------------------------------------------------------


def _last_segment(name: str) -> str:
    """Name of the module owning a parameter: ``'blocks.0.ls1.gamma'`` -> ``'ls1'``."""
    parts = name.split('.')
    return parts[-2] if len(parts) > 1 else ''


def _per_channel(t: torch.Tensor) -> bool:
    """One value per channel: ``(C,)``, ``(C, 1, 1)``, ``(1, 1, C)``, ..."""
    return sum(s > 1 for s in t.shape) <= 1


def _constant(get: Callable[[FillConfig], float]):
    return lambda m, attr, t, cfg, gen: torch.full(t.shape, get(cfg))


def _normal(get_std: Callable[[FillConfig], float], truncate: bool):
    def make(m: nn.Module, attr: str, t: torch.Tensor, cfg: FillConfig, gen: torch.Generator) -> torch.Tensor:
        std = get_std(cfg)
        out = torch.empty(t.shape)
        if truncate:
            return nn.init.trunc_normal_(out, std=std, a=-2 * std, b=2 * std, generator=gen)
        return nn.init.normal_(out, std=std, generator=gen)

    return make


_RES_SCALE = re.compile(r'^res_?scale_?\d*$')
_LAYER_SCALE = re.compile(r'^(layer_?scale|ls|gamma)_?(\d+|xca)?$')  # gamma, gamma_1, ls1, gamma_xca
_SKIPINIT = re.compile(r'^skipinit_gain$')
_GAIN = re.compile(r'^gain$')
_LOGIT_SCALE = re.compile(r'^logit_scale$')
_TEMPERATURE = re.compile(r'^temperature$')
_GATING = re.compile(r'^gating_param$')
_QKV_BIAS = re.compile(r'^([qkv]|mlp)_bias$')
_REL_POS = re.compile(r'relative_position|rel_pos|^(height|width)_rel$|^attention_biases$')
_TOKEN = re.compile(r'^(class|cls|dist|reg|register|mask)_tokens?(_?\d+)?$|^latent$')
_POS_EMBED = re.compile(r'^(absolute_|cls_)?pos(ition)?_(embed|embedding|emb)\w*$|^(patch|pixel)_pos$')
_AFFINE = frozenset({'scale', 'alpha', 'bias', 'beta'})
_ACTIVATION = re.compile(r'(ReLU|GELU|SiLU|Swish|Mish|Sigmoid|Tanh|Act)\d*$')


@contextlib.contextmanager
def _seeded(module: nn.Module, seed: int):
    """Global generators seeded for code that draws from them (``reset_parameters``), restored after."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == 'cuda'})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        yield


def _is_norm(module: nn.Module) -> bool:
    if isinstance(
        module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm | nn.LocalResponseNorm
    ):
        return True
    return any('Norm' in c.__name__ for c in type(module).__mro__[:-1])


def _is_activation(module: nn.Module) -> bool:
    """An activation with parameters, or a leaf module holding only a scale (``scale``/``alpha``) and
    perhaps a shift (``bias``/``beta``): an elementwise affine such as timm's ``LearnableAffineBlock`` or
    ResMLP's ``Affine``."""
    if isinstance(module, nn.PReLU) or _ACTIVATION.search(type(module).__name__) is not None:
        return True
    own = {n for n, _ in module.named_parameters(recurse=False)}
    return bool(own & {'scale', 'alpha'}) and own <= _AFFINE and not any(True for _ in module.children())


def _activation_value(
    m: nn.Module, attr: str, t: torch.Tensor, cfg: FillConfig, gen: torch.Generator
) -> torch.Tensor:
    """The activation's own ``reset_parameters()`` values (on a copy), else 0 for a bias and 1 otherwise."""
    if callable(getattr(m, 'reset_parameters', None)):
        clone = copy.deepcopy(m)
        with _seeded(clone, cfg.seed):
            clone.reset_parameters()
        return getattr(clone, attr).detach().float().cpu()
    return torch.zeros(t.shape) if attr in ('bias', 'beta') else torch.ones(t.shape)


def _is_response_norm(module: nn.Module) -> bool:
    return type(module).__name__ == 'GlobalResponseNorm'


def _norm_value(
    m: nn.Module, attr: str, t: torch.Tensor, cfg: FillConfig, gen: torch.Generator
) -> torch.Tensor:
    """What the norm layer's own ``reset_parameters()`` gives (on a copy), else weight 1 and bias 0."""
    if callable(getattr(m, 'reset_parameters', None)):
        clone = copy.deepcopy(m)
        with _seeded(clone, cfg.seed):
            clone.reset_parameters()
        return getattr(clone, attr).detach().float().cpu()
    return torch.ones(t.shape) if attr == 'weight' else torch.zeros(t.shape)


register_fill_rule(
    FillRule(
        'res_scale',
        lambda m, attr, name, t, cfg: (
            _per_channel(t)
            and (_RES_SCALE.match(attr) is not None or _RES_SCALE.match(_last_segment(name)) is not None)
        ),
        _constant(lambda cfg: 1.0),
        lambda cfg: 'constant 1 (a scale on the shortcut path: identity)',
    )
)
register_fill_rule(
    FillRule(
        'layer_scale',
        lambda m, attr, name, t, cfg: (
            _per_channel(t)
            and (
                _LAYER_SCALE.match(attr) is not None
                or _LAYER_SCALE.match(_last_segment(name)) is not None
                or 'LayerScale' in type(m).__name__
            )
        ),
        _constant(lambda cfg: cfg.layer_scale),
        lambda cfg: f'constant {cfg.layer_scale:g} (the ConvNeXt layer-scale initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'skipinit_gain',
        lambda m, attr, name, t, cfg: _SKIPINIT.match(attr) is not None,
        _constant(lambda cfg: 0.0),
        lambda cfg: 'constant 0 (the NF-ResNet skip-init gain initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'gain',
        lambda m, attr, name, t, cfg: _per_channel(t) and _GAIN.match(attr) is not None,
        _constant(lambda cfg: 1.0),
        lambda cfg: 'constant 1 (the gain of a scaled weight-standardised convolution, its initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'logit_scale',
        lambda m, attr, name, t, cfg: _LOGIT_SCALE.match(attr) is not None,
        _constant(lambda cfg: cfg.logit_scale),
        lambda cfg: f'constant {cfg.logit_scale:.4g} (log 10, the Swin V2 initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'temperature',
        lambda m, attr, name, t, cfg: _per_channel(t) and _TEMPERATURE.match(attr) is not None,
        _constant(lambda cfg: 1.0),
        lambda cfg: 'constant 1 (the XCiT attention-temperature initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'gating',
        lambda m, attr, name, t, cfg: _per_channel(t) and _GATING.match(attr) is not None,
        _constant(lambda cfg: 1.0),
        lambda cfg: 'constant 1 (the ConViT gated-attention initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'qkv_bias',
        lambda m, attr, name, t, cfg: _QKV_BIAS.match(attr) is not None,
        _constant(lambda cfg: 0.0),
        lambda cfg: 'constant 0 (separate query/key/value projection biases, their initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'relative_position_bias',
        lambda m, attr, name, t, cfg: _REL_POS.search(attr) is not None,
        _normal(lambda cfg: cfg.table_std, truncate=True),
        lambda cfg: (
            f'truncated normal, std {cfg.table_std:g} (the Swin/MaxViT relative-position-bias initialisation)'
        ),
    )
)
register_fill_rule(
    FillRule(
        'token',
        lambda m, attr, name, t, cfg: _TOKEN.match(attr) is not None,
        _normal(lambda cfg: cfg.token_std, truncate=False),
        lambda cfg: (
            f'normal, std {cfg.token_std:g} (class/register tokens, latent queries; like the class-token '
            'row of a predicted position embedding)'
        ),
    )
)
register_fill_rule(
    FillRule(
        'position_embedding',
        lambda m, attr, name, t, cfg: _POS_EMBED.match(attr) is not None,
        _normal(lambda cfg: cfg.table_std, truncate=True),
        lambda cfg: f'truncated normal, std {cfg.table_std:g} (the ViT position-embedding initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'activation',
        lambda m, attr, name, t, cfg: _per_channel(t) and _is_activation(m),
        _activation_value,
        lambda cfg: (
            "an activation's or elementwise affine's own initialisation (scale 1, shift 0; PReLU 0.25)"
        ),
    )
)
register_fill_rule(
    FillRule(
        'response_norm',
        lambda m, attr, name, t, cfg: cfg.norm_affine and _is_response_norm(m),
        _constant(lambda cfg: 0.0),
        lambda cfg: 'constant 0 (global response norm as identity, its initialisation)',
    )
)
register_fill_rule(
    FillRule(
        'norm_affine',
        lambda m, attr, name, t, cfg: (
            cfg.norm_affine
            and _is_norm(m)
            and (attr in ('weight', 'bias') or callable(getattr(m, 'reset_parameters', None)))
        ),
        _norm_value,
        lambda cfg: "the norm layer's own initialisation (weight 1, bias 0)",
    )
)


# ---- applying the rules --------------------------------------------------------------------------------


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition('.')
    return (model.get_submodule(path) if path else model), attr


def _module_init(module: nn.Module, attrs: list[str], seed: int) -> bool:
    """Re-run ``module.reset_parameters()`` (seeded) and keep its new values only for ``attrs``."""
    reset = getattr(module, 'reset_parameters', None)
    if not callable(reset):
        return False
    params = dict(module.named_parameters())
    keep = {a: p.detach().clone() for a, p in params.items() if a not in attrs}  # predicted or filled already
    with _seeded(module, seed):
        reset()
        for a, v in keep.items():
            params[a].copy_(v)
    return True


def fill_missing(
    model: nn.Module,
    names: Iterable[str],
    config: FillConfig | None = None,
) -> dict[str, str]:
    """Give each tensor in ``names`` a value by the first matching rule of :data:`FILL_RULES`.

    Args:
        model: the model, written in place (without gradients).
        names: parameter names (``named_parameters`` names) to fill, typically those without a graph node.
        config: rule settings; default :class:`FillConfig`.

    Returns:
        ``name -> label`` (``'<rule>: <how>'``) for every tensor that was filled; tensors no rule matches
        are absent (the caller keeps them as skipped).
    """
    config = config or FillConfig()
    gen = torch.Generator(device='cpu').manual_seed(config.seed)
    wanted = set(names)
    filled: dict[str, str] = {}
    leftovers: dict[int, tuple[nn.Module, list[str], list[str]]] = {}
    for name, p in model.named_parameters():
        if name not in wanted:
            continue
        module, attr = _owner(model, name)
        rule = next((r for r in FILL_RULES if r.matches(module, attr, name, p, config)), None)
        if rule is None:
            leftovers.setdefault(id(module), (module, [], []))[1].append(name)
            leftovers[id(module)][2].append(attr)
            continue
        value = rule.value(module, attr, p, config, gen)  # (same shape as p)
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
        filled[name] = f'{rule.name}: {rule.describe(config)}'
    if config.module_init:
        for k, (module, mod_names, attrs) in enumerate(leftovers.values()):
            if _module_init(module, attrs, config.seed + k):
                label = f'module_init: {type(module).__name__}.reset_parameters() (layer type without a node)'
                filled.update({n: label for n in mod_names})
    if filled:
        log.debug('filled %d tensors without graph nodes', len(filled))
    return filled
