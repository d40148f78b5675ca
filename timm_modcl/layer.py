"""The modulated convolution of Adaptive Weight Modulation (arXiv 2311.15276).

A frozen convolution weight ``W`` of shape ``(O, I, kh, kw)`` is multiplied element-wise by a task-specific
modulation mask that is learnt at a low channel resolution ``(o, i, kh, kw)`` and bicubically interpolated over
the two channel dimensions up to ``(O, I)``::

    W_task = W * (1 + sign * upsample(M))

``sign = -1`` with a kaiming-normal ``M`` is the author's formulation ``W * (1 - M)`` (variant ``"paper"``);
``sign = +1`` with ``M = 0`` starts exactly at the pretrained weights (variant ``"identity"``).

The frozen weight is a buffer, never a parameter; the modulator slot holds the *active* task's parameter and is
re-bound by the model when the task changes. In eval mode without autograd the effective weight is cached and
reused until the modulator or the weight changes (detected through tensor version counters), so inference costs
what a plain convolution costs.
"""
import functools
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError, ResolutionError

__all__ = [
    'MODULATION_VARIANTS',
    'ModulatedConv2d',
    'modulator_shape',
    'upsample_modulator',
    'interpolation_matrix',
    'validate_resolution',
    'LayerResolution',
]

#: Modulation variants and the sign they apply to the upsampled modulator.
MODULATION_VARIANTS: Dict[str, float] = {'paper': -1.0, 'identity': 1.0}

#: Per-layer resolution override: a mapping of layer name (fnmatch pattern) to a resolution or ``None``
#: (leave the layer unmodulated), or a callable ``(layer_name, weight_shape) -> resolution | None``.
LayerResolution = Union[
    Dict[str, Optional[Tuple[int, int]]],
    Callable[[str, Tuple[int, ...]], Optional[Tuple[int, int]]],
]


def validate_resolution(resolution, what: str = 'resolution') -> Tuple[int, int]:
    """Check a modulation resolution ``(m1, m2)`` and return it as a tuple of two positive ints.

    Raises:
        ResolutionError: if it is not a pair of positive integers.
    """
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = (resolution, resolution)
    try:
        m1, m2 = resolution
    except (TypeError, ValueError):
        raise ResolutionError(f'{what} must be a pair of positive integers (m1, m2), got {resolution!r}') from None
    for m in (m1, m2):
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ResolutionError(f'{what} must be a pair of positive integers (m1, m2), got {resolution!r}')
    return int(m1), int(m2)


def modulator_shape(weight_shape: Tuple[int, ...], resolution: Tuple[int, int]) -> Optional[Tuple[int, ...]]:
    """Shape of the modulator of a conv weight ``(O, I, kh, kw)`` at resolution ``(m1, m2)``.

    ``(O // m1, I // m2, kh, kw)``; when ``O < m1`` the input dimension takes the whole reduction
    ``(O, I // (m1 * m2))``; when ``I < m2`` (depthwise convs, the stem) the output dimension takes it,
    ``(O // (m1 * m2), I)``. Returns ``None`` when a channel dimension would be zero (layer left unmodulated).
    """
    out_ch, in_ch = int(weight_shape[0]), int(weight_shape[1])
    m1, m2 = resolution
    if out_ch < m1:
        o, i = out_ch, in_ch // (m1 * m2)
    elif in_ch < m2:
        o, i = out_ch // (m1 * m2), in_ch
    else:
        o, i = out_ch // m1, in_ch // m2
    if o == 0 or i == 0:
        return None
    return (o, i) + tuple(int(k) for k in weight_shape[2:])


def upsample_modulator(modulator: torch.Tensor, out_channels: int, in_channels: int) -> torch.Tensor:
    """Bicubically interpolate a modulator ``(o, i, kh, kw)`` over its channel dims to ``(O, I, kh, kw)``.

    The reference implementation with ``F.interpolate`` (used under TorchScript); eager code uses the equivalent,
    faster ``interpolation_matrix`` form ``U_O @ M @ U_I^T``.
    """
    o, i, kh, kw = modulator.shape[0], modulator.shape[1], modulator.shape[2], modulator.shape[3]
    if o == out_channels and i == in_channels:
        return modulator
    m = modulator.permute(2, 3, 0, 1).reshape(kh * kw, 1, o, i)
    m = F.interpolate(m, size=(out_channels, in_channels), mode='bicubic', align_corners=False)
    return m.reshape(kh, kw, out_channels, in_channels).permute(2, 3, 0, 1)


@functools.lru_cache(maxsize=512)
def _interpolation_matrix_cpu(size_out: int, size_in: int) -> torch.Tensor:
    eye = torch.eye(size_in, dtype=torch.float64).reshape(1, 1, size_in, size_in)
    return F.interpolate(eye, size=(size_out, size_in), mode='bicubic', align_corners=False)[0, 0]


def interpolation_matrix(size_out: int, size_in: int, device=None, dtype=None) -> torch.Tensor:
    """The ``(size_out, size_in)`` matrix of 1-D bicubic interpolation as done by ``F.interpolate``.

    Bicubic interpolation is separable and linear, so ``upsample(M)[:, :, k] == U_O @ M[:, :, k] @ U_I.T``.
    """
    return _interpolation_matrix_cpu(int(size_out), int(size_in)).to(device=device, dtype=dtype)


class ModulatedConv2d(nn.Conv2d):
    """A ``Conv2d`` with a frozen weight and a re-bindable, low-resolution multiplicative modulator.

    ``weight`` (and ``bias``) are buffers: they never receive gradients and never appear in ``parameters()``.
    ``modulator`` is a parameter slot holding the active task's modulator, or ``None`` (plain convolution).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._freeze()
        self.register_parameter('modulator', None)
        self.mod_sign: float = -1.0
        self.check_input: bool = False
        self._cache: Optional[torch.Tensor] = None
        self._interp: Dict[Tuple[int, int, torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_key: Tuple[int, int, int, int] = (0, 0, 0, 0)

    def _freeze(self) -> None:
        for name in ('weight', 'bias'):
            p = self._parameters.pop(name, None)
            self.register_buffer(name, None if p is None else p.detach().requires_grad_(False))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> 'ModulatedConv2d':
        """Build a modulated conv that shares (a frozen copy of) ``conv``'s configuration and weights."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f'only plain nn.Conv2d layers can be modulated, got {type(conv).__name__}')
        mod = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device='meta',
        )
        mod.weight = conv.weight.detach()
        mod.bias = None if conv.bias is None else conv.bias.detach()
        return mod

    def bind(self, modulator: Optional[nn.Parameter], sign: float) -> None:
        """Attach a task's modulator (or ``None``) and its sign; drops the cached effective weight."""
        self._parameters['modulator'] = modulator
        self.mod_sign = float(sign)
        self.invalidate()

    def invalidate(self) -> None:
        """Drop the cached effective weight."""
        self._cache = None

    @torch.jit.unused
    def upsample(self, modulator: torch.Tensor) -> torch.Tensor:
        """``upsample_modulator`` as small matrix products ``U_O @ M @ U_I^T`` with cached interpolation matrices.

        Exact (bicubic interpolation is linear and separable) and several times faster than ``F.interpolate``, whose
        CPU backward is slow. (A 4-tap gather formulation does fewer FLOPs but its scatter backward is slower.)
        """
        out_ch, in_ch = self.weight.shape[0], self.weight.shape[1]
        o, i, kh, kw = modulator.shape
        if (o, i) == (out_ch, in_ch):
            return modulator
        key = (o, i, modulator.device, modulator.dtype)
        mats = self._interp.get(key)
        if mats is None:
            mats = (interpolation_matrix(out_ch, o, modulator.device, modulator.dtype),
                    interpolation_matrix(in_ch, i, modulator.device, modulator.dtype))
            self._interp = {key: mats}
        up_o, up_i = mats
        m = modulator.reshape(o, i * kh * kw)
        if o != out_ch:
            m = up_o @ m                                                    # (O, i * kh * kw)
        if i == in_ch:
            return m.reshape(out_ch, in_ch, kh, kw)
        if kh * kw == 1:
            return (m @ up_i.t()).reshape(out_ch, in_ch, 1, 1)
        m = m.reshape(out_ch, i, kh * kw).transpose(1, 2) @ up_i.t()        # (O, kh * kw, I)
        return m.transpose(1, 2).reshape(out_ch, in_ch, kh, kw)

    @torch.jit.unused
    def modulation(self, modulator: torch.Tensor, sign: Optional[float] = None) -> torch.Tensor:
        """The full-resolution multiplicative factor ``1 + sign * upsample(M)`` (default sign: the bound one)."""
        sign = self.mod_sign if sign is None else sign
        return 1.0 + sign * self.upsample(modulator)

    @torch.jit.unused
    def modulated_weight(self, modulator: torch.Tensor, sign: Optional[float] = None) -> torch.Tensor:
        """``W * (1 + sign * upsample(M))`` computed as one fused ``addcmul``."""
        sign = self.mod_sign if sign is None else sign
        return torch.addcmul(self.weight, self.weight, self.upsample(modulator), value=sign)

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution uses for the active task."""
        modulator = self.modulator
        if modulator is None:
            return self.weight
        else:
            if torch.jit.is_scripting():
                up = upsample_modulator(modulator, self.weight.shape[0], self.weight.shape[1])
                return self.weight * (1.0 + self.mod_sign * up)
            return self._cached_effective_weight(modulator)

    @torch.jit.unused
    def _cached_effective_weight(self, modulator: torch.Tensor) -> torch.Tensor:
        cacheable = not self.training and not (torch.is_grad_enabled() and modulator.requires_grad)
        if not cacheable or torch.compiler.is_compiling():
            return self.modulated_weight(modulator)
        key = (id(modulator), modulator._version, id(self.weight), self.weight._version)
        cache = self._cache
        if cache is None or key != self._cache_key:
            # a plain tensor even under inference_mode, so later no-grad calls can reuse it
            with torch.inference_mode(False), torch.no_grad():
                cache = self.modulated_weight(modulator)
            self._cache = cache
            self._cache_key = key
        return cache

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(f'expected an image batch of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_input and not torch.jit.is_scripting():
            self._check_input(x)
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.modulator is not None:
            s += f', modulator={tuple(self.modulator.shape)}, sign={self.mod_sign:+.0f}'
        return s
