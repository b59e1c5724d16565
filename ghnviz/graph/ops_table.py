"""Op typing: which modules and autograd ops become graph nodes, and their DeepNets-1M primitive.

Two tables, one per kind of node:

* :data:`MODULE_TABLE` maps an ``nn.Module`` type to a function ``(module, name) -> primitive``
  for nodes that stand for a parameter tensor. Lookup walks the module's MRO, so subclasses of a
  listed type are typed like their base.
* :data:`OP_TABLE` maps an autograd op name (the ``grad_fn`` class name without its
  ``Backward<k>`` suffix) to a primitive, for parameter-free nodes.

Some module types are optional or come from other packages (Hugging Face ``Conv1D``, the
DeepNets-1M ``PosEnc`` of several code bases); they are recognised by name in
:func:`module_rule` without importing those packages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

__all__ = [
    'MODULE_TABLE',
    'OP_TABLE',
    'module_rule',
    'module_primitive',
    'op_name',
    'op_primitive',
    'is_supported_param',
]

Rule = Callable[[nn.Module, str], str]


def _conv_rule(module: nn.Module, name: str) -> str:
    """Convolutions and linear layers: ``bias`` for bias tensors, grouped convs by dilation."""
    if 'bias' in name:
        return 'bias'
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return 'dil_conv' if min(module.dilation) > 1 else 'sep_conv'
    return 'conv'


def _const(primitive: str) -> Rule:
    return lambda module, name: primitive


# nn.Module type -> primitive rule (types are matched along the MRO).
MODULE_TABLE: dict[type, Rule] = {
    nn.Conv2d: _conv_rule,
    nn.Linear: _conv_rule,  # a linear layer is a 1x1 convolution
    nn.MultiheadAttention: _conv_rule,  # in_proj_weight / in_proj_bias
    nn.BatchNorm2d: _const('bn'),
    nn.LayerNorm: _const('ln'),  # also torchvision's LayerNorm2d (a subclass)
    nn.Embedding: _const('pos_enc'),  # any embedding table is typed as a position encoding
}

# Module class names recognised without importing their package: (module prefix, class name) -> rule.
_NAMED_MODULES: dict[tuple[str, str], Rule] = {
    ('torchvision.models.vision_transformer', 'Encoder'): _const('pos_enc'),  # owns pos_embedding
    ('transformers.pytorch_utils', 'Conv1D'): _conv_rule,
}
# Any class called PosEnc (the DeepNets-1M learned position encoding, whatever code base defines it).
_POS_ENC_CLASS = 'PosEnc'

# autograd op name (grad_fn class name up to 'Backward') -> primitive.
OP_TABLE: dict[str, str] = {
    'input': 'input',
    'Mean': 'glob_avg',
    'AdaptiveAvgPool2D': 'glob_avg',
    'MaxPool2DWithIndices': 'max_pool',
    'AvgPool2D': 'avg_pool',
    'Softmax': 'msa',  # a softmax marks a self-attention block
    'Mul': 'cse',  # a gating product marks a squeeze-and-excitation block
    'Add': 'sum',
    'Cat': 'concat',
    'skip_connect': 'sum',
}


def module_rule(module: nn.Module | None) -> Rule | None:
    """The primitive rule for a parameter owned by ``module``, or None if such parameters get no node."""
    if module is None:
        return None
    cls = type(module)
    for base in cls.__mro__:
        rule = MODULE_TABLE.get(base)
        if rule is not None:
            return rule
        if base.__name__ == _POS_ENC_CLASS:
            return _const('pos_enc')
        named = _NAMED_MODULES.get((base.__module__, base.__name__))
        if named is not None:
            return named
    return None


def module_primitive(module: nn.Module, name: str) -> str:
    """Primitive of the node for parameter ``name`` (normalised name) of ``module``."""
    rule = module_rule(module)
    if rule is None:
        raise KeyError(f'{type(module).__name__} parameters have no primitive type')
    return rule(module, name)


def is_supported_param(module: nn.Module | None, name: str) -> bool:
    """Whether a parameter node is kept in the graph.

    Norm-layer biases are dropped (every norm layer has one, so their nodes carry no information;
    the GHN still predicts them together with the norm weight).
    """
    if module is None:
        return False
    if 'norm' in type(module).__name__.lower() and name.endswith('.bias'):
        return False
    return module_rule(module) is not None


def op_name(name: str) -> str:
    """Op name of a grad_fn class name: ``'MaxPool2DWithIndicesBackward0'`` -> ``'MaxPool2DWithIndices'``."""
    k = name.find('Backward')
    return name if k < 0 else name[:k]


def op_primitive(name: str) -> str:
    """Primitive of a parameter-free node; unknown ops (kept only as merge points) are ``sum``."""
    return OP_TABLE.get(op_name(name), 'sum')
