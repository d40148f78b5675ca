"""Per-task weight methods: how a task's own tensor of a frozen weight layer becomes the layer's effective weight.

A method is a small per-layer protocol (``LayerMethod``): the shape of a task's tensor for a weight ``(O, I, *kernel)``,
its initialisation, the effective weight it gives (which is also what ``export_task`` folds into a plain weight), and
whether it leaves the frozen weight exactly as it is. Everything else (tasks, norm state, heads, adapter files, the
Hub, serving, the weight cache, zero forgetting) is shared by every method, because each task's tensor of a layer is
stored and validated the same way (``modulator.<layer>`` in adapter files, ``<layer>.modulator`` in state dicts).

* ``'modulation'`` (default; Adaptive Weight Modulation, arXiv 2311.15276): ``W * (1 + sign * upsample(M))`` with a
  low-resolution modulator ``M`` bicubically interpolated over the channel dimensions (``layers.modulator_shape``).
* ``'lora'``: a per-task low-rank update ``W + (alpha / r) * B @ A`` (LoRA, arXiv 2106.09685) on the same layers,
  depthwise convolutions included (``A`` spans the whole ``I * kh * kw`` fan-in of an output channel, so a depthwise
  3x3 conv gets a rank-``r`` update of its ``(O, 9)`` kernels; PEFT's LoRA does not support them). ``B`` starts at
  zero, so a new task starts exactly at the pretrained weights. The task's tensor packs both factors as one
  ``(O + I * kh * kw, r)`` matrix ``[B; A^T]``; ``r`` is capped at ``min(O, I * kh * kw)`` per layer.

``TaskConfig(method=..., rank=..., alpha=...)`` selects a method; ``method_of(config)`` gives its ``LayerMethod``.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['METHODS', 'LayerMethod', 'Modulation', 'LoRA', 'method_of', 'modulator_shape']


def modulator_shape(
        weight_shape: Tuple[int, ...], resolution: Tuple[int, int], chunks: int = 1,
) -> Optional[Tuple[int, ...]]:
    """Shape of the modulator of a weight ``(O, I, *kernel)`` at resolution ``(m1, m2)``.

    ``(O // m1, I // m2, *kernel)``; when ``O < m1`` the input dimension takes the whole reduction
    ``(O, I // (m1 * m2))``; when ``I < m2`` (depthwise convs, a stem) the output dimension takes it,
    ``(O // (m1 * m2), I)``. With ``chunks > 1`` (a fused projection) the rule applies to each of the ``chunks``
    equal parts of ``O`` and the parts are stacked. Returns ``None`` when a channel dimension would be zero (the layer
    is left unmodulated).
    """
    out_ch, in_ch = int(weight_shape[0]) // chunks, int(weight_shape[1])
    m1, m2 = resolution
    if out_ch < m1:
        o, i = out_ch, in_ch // (m1 * m2)
    elif in_ch < m2:
        o, i = out_ch // (m1 * m2), in_ch
    else:
        o, i = out_ch // m1, in_ch // m2
    if o == 0 or i == 0:
        return None
    return (chunks * o, i) + tuple(int(k) for k in weight_shape[2:])


class LayerMethod:
    """The per-layer protocol of a task method (one instance per task configuration; instances are values)."""

    name: str = ''

    def shape(self, weight_shape: Tuple[int, ...], resolution: Optional[Tuple[int, int]],
              chunks: int = 1) -> Optional[Tuple[int, ...]]:
        """Shape of a task's tensor for a weight of ``weight_shape`` given the layer's entry of the config (its
        resolution; ``None``: unmodulated), or ``None`` to leave the layer as it is."""
        raise NotImplementedError

    def init_(self, tensor: torch.Tensor, weight_shape: Tuple[int, ...]) -> None:
        """Initialise a new task's tensor (of a layer whose weight has ``weight_shape``) in place."""
        raise NotImplementedError

    def weight(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        """The effective weight of ``layer`` (a ``layers.ModulatedWeight``) under ``tensor``; differentiable."""
        raise NotImplementedError

    def is_identity(self, layer: nn.Module, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` leaves the frozen weight exactly as it is (the weight cache then stores nothing)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Modulation(LayerMethod):
    """Adaptive Weight Modulation: ``W * (1 + sign * upsample(M))`` (see ``layers.ModulatedWeight``)."""

    sign: float = 1.0
    kaiming: bool = False   # the author's 'paper' variant: kaiming-normal init (with sign -1)
    name = 'modulation'

    def shape(self, weight_shape, resolution, chunks=1):
        return None if resolution is None else modulator_shape(tuple(weight_shape), resolution, chunks)

    def init_(self, tensor, weight_shape):
        if self.kaiming:
            nn.init.kaiming_normal_(tensor)
        else:
            nn.init.zeros_(tensor)

    def weight(self, layer, tensor):
        frozen = layer._buffers['weight']
        return torch.addcmul(frozen, frozen, layer.upsample(tensor), value=self.sign)

    def is_identity(self, layer, tensor):
        return not bool(tensor.any())


@dataclass(frozen=True)
class LoRA(LayerMethod):
    """A per-task low-rank update ``W + (alpha / r) * B @ A``, packed as ``[B; A^T]`` of shape ``(O + I*k, r)``."""

    rank: int = 8
    alpha: Optional[float] = None   # default: the rank (a scale of 1)
    name = 'lora'

    def shape(self, weight_shape, resolution, chunks=1):
        if resolution is None:
            return None
        out_ch, fan_in = int(weight_shape[0]), math.prod(int(s) for s in weight_shape[1:])
        r = min(self.rank, out_ch, fan_in)
        return (out_ch + fan_in, r) if r > 0 else None

    def init_(self, tensor, weight_shape):
        out_ch = int(weight_shape[0])
        a = torch.empty(tensor.shape[1], tensor.shape[0] - out_ch, dtype=tensor.dtype, device=tensor.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))     # as PEFT initialises A; B = 0
        with torch.no_grad():
            tensor.zero_()
            tensor[out_ch:].copy_(a.t())

    def scale(self, r: int) -> float:
        return (float(self.rank) if self.alpha is None else float(self.alpha)) / float(r)

    def weight(self, layer, tensor):
        frozen = layer._buffers['weight']
        out_ch = frozen.shape[0]
        b, a_t = tensor[:out_ch], tensor[out_ch:]
        flat = torch.addmm(frozen.reshape(out_ch, -1), b, a_t.t(), alpha=self.scale(tensor.shape[1]))
        return flat.reshape(frozen.shape)

    def is_identity(self, layer, tensor):
        return not bool(tensor[:layer._buffers['weight'].shape[0]].any())  # B = 0


#: Method names accepted by ``TaskConfig(method=...)``.
METHODS = ('modulation', 'lora')

_CACHE: Dict[tuple, LayerMethod] = {}


def method_of(config) -> LayerMethod:
    """The ``LayerMethod`` of a ``TaskConfig`` (shared instances: one per distinct setting)."""
    if config.method == 'lora':
        key = ('lora', config.rank, config.alpha)
        make = lambda: LoRA(rank=config.rank, alpha=config.alpha)  # noqa: E731
    else:
        key = ('modulation', config.variant)
        make = lambda: Modulation(sign=config.sign, kaiming=config.variant == 'paper')  # noqa: E731
    method = _CACHE.get(key)
    if method is None:
        method = _CACHE[key] = make()
    return method
