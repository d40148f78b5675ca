"""The modulated weight layer (``ModulatedWeight``): the variants, modulation resolutions, the bicubic interpolation
of a modulator (reference ``upsample_modulator`` and the matrix form ``interpolation_matrix`` the layers use), and
the effective weight of the task of the call, cached in eval mode without autograd.
"""
import functools
import math
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ResolutionError
from .cache import _SCOPED, WeightCache

#: Modulation variants and the sign they apply to the upsampled modulator.
MODULATION_VARIANTS: Dict[str, float] = {'paper': -1.0, 'identity': 1.0}


def validate_resolution(resolution, what: str = 'resolution') -> Tuple[int, int]:
    """Check a modulation resolution ``(m1, m2)`` and return it as a tuple of two positive ints.

    Raises:
        ResolutionError: if it is not a pair of positive integers (an int ``m`` means ``(m, m)``).
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


def upsample_modulator(modulator: torch.Tensor, out_channels: int, in_channels: int, chunks: int = 1) -> torch.Tensor:
    """Bicubically interpolate a modulator ``(o, i, *kernel)`` over its channel dims to ``(O, I, *kernel)``.

    The reference implementation with ``F.interpolate``; layers use the equivalent, faster matrix form
    ``U_O @ M @ U_I^T`` (``interpolation_matrix``).
    """
    o, i = modulator.shape[0] // chunks, modulator.shape[1]
    kernel = tuple(modulator.shape[2:])
    k = math.prod(kernel)
    parts = []
    for c in range(chunks):
        m = modulator[c * o:(c + 1) * o].reshape(o, i, k).permute(2, 0, 1).unsqueeze(1)  # (k, 1, o, i)
        if (o, i) != (out_channels // chunks, in_channels):
            m = F.interpolate(m, size=(out_channels // chunks, in_channels), mode='bicubic', align_corners=False)
        parts.append(m.squeeze(1).permute(1, 2, 0))
    return torch.cat(parts, 0).reshape((out_channels, in_channels) + kernel)


@functools.lru_cache(maxsize=512)
def _interpolation_matrix_cpu(size_out: int, size_in: int, chunks: int) -> torch.Tensor:
    # explicit device: model creation may run under a `with torch.device('meta')` context
    eye = torch.eye(size_in, dtype=torch.float64, device='cpu').reshape(1, 1, size_in, size_in)
    mat = F.interpolate(eye, size=(size_out, size_in), mode='bicubic', align_corners=False)[0, 0]
    return torch.block_diag(*([mat] * chunks)) if chunks > 1 else mat


def interpolation_matrix(size_out: int, size_in: int, device=None, dtype=None, chunks: int = 1) -> torch.Tensor:
    """The ``(chunks * size_out, chunks * size_in)`` matrix of 1-D bicubic interpolation as done by ``F.interpolate``
    (block-diagonal over ``chunks``).

    Bicubic interpolation is separable and linear, so ``upsample(M)[:, :, k] == U_O @ M[:, :, k] @ U_I.T``.
    """
    return _interpolation_matrix_cpu(int(size_out), int(size_in), int(chunks)).to(device=device, dtype=dtype)


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


class ModulatedWeight:
    """Mixed into the class of a weight layer (``nn.Conv*d``, ``nn.Linear`` or a subclass) by ``modulate_layer``.

    ``weight`` becomes a read-only property: the frozen tensor (a buffer, under the layer's usual state-dict key)
    modulated by the task's tensor of this layer (the task of the current ``task_scope``, else the model's bound task:
    both found through the model's ``WeightCache``), or the frozen tensor itself when the task leaves the layer
    unmodulated. The tasks' tensors live in the tasks (``model.modcl_tasks``), not in the layer.
    """

    _modcl_plain: Type[nn.Module]
    modcl_chunks: int
    modcl_cache: Optional[WeightCache]
    modcl_name: str = ''             # the layer's name in its model (what a task's tensors are keyed by)
    modcl_key: str = ''              # its key in a task's tables (``task.table_key``)

    @property
    def modulator(self) -> Optional[torch.Tensor]:
        """The bound task's tensor of this layer (``None``: the task leaves it unmodulated)."""
        cache = self.modcl_cache
        if cache is None or cache.bound is None:
            return None
        return cache.bound.modulator._parameters.get(self.modcl_key)

    @property
    def weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._modcl_compiled_weight()
        d = self.__dict__
        frozen = d['_buffers']['weight']
        cache = d.get('modcl_cache')
        call = _SCOPED.get()
        if call is not None and call[0] is cache:  # a task_scope of this model: its task, nothing shared
            task, slot, name = call[1], call[2], call[1].name
        elif cache is not None and cache.bound is not None:
            task, slot, name = cache.bound, cache.bound_slot, None
        else:
            return frozen
        modulator = task.__dict__['modulator_store'].get(self.modcl_key)
        if modulator is None:
            return frozen
        method = task.method
        if d['training'] or (torch.is_grad_enabled() and modulator.requires_grad):
            return method.weight(self, modulator)
        # eval without autograd: the cached weight if it was made from these very tensors, at these versions
        entry = slot.get(self)
        if (entry is not None and entry[0] is modulator and entry[1] == modulator._version and entry[2] is frozen
                and entry[3] == frozen._version and entry[4] is method and entry[5] == modulator.data_ptr()):
            return entry[6]
        return self._modcl_fill(frozen, modulator, method, slot, name)

    def _modcl_compiled_weight(self) -> torch.Tensor:
        """The weight as torch.compile traces it: the bound task only, no Python-side cache logic (no graph break).
        In eval without autograd, the effective weight the model prepared from its cache before the compiled call
        (``ModCLMixin._modcl_prepare``); otherwise computed in the graph."""
        frozen = self._buffers['weight']
        prepared = self.__dict__.get('_modcl_eff')
        if prepared is not None and not self.training and not torch.is_grad_enabled():
            return prepared
        task = self.modcl_cache.bound
        modulator = task.modulator._parameters.get(self.modcl_key)
        if modulator is None:
            return frozen
        return task.method.weight(self, modulator)

    def upsample(self, modulator: torch.Tensor) -> torch.Tensor:
        """``upsample_modulator`` as two small matrix products with cached interpolation matrices.

        Exact (bicubic interpolation is linear and separable) and several times faster than ``F.interpolate``, whose
        CPU backward is slow.
        """
        frozen = self._buffers['weight']
        out_ch, in_ch = frozen.shape[0], frozen.shape[1]
        o, i = modulator.shape[0], modulator.shape[1]
        if (o, i) == (out_ch, in_ch):
            return modulator
        chunks = self.modcl_chunks
        key = (o, i, modulator.device, modulator.dtype)
        mats = self._modcl_interp.get(key)
        if mats is None:
            mats = (interpolation_matrix(out_ch // chunks, o // chunks, modulator.device, modulator.dtype, chunks),
                    interpolation_matrix(in_ch, i, modulator.device, modulator.dtype))
            self._modcl_interp = {key: mats}
        up_o, up_i = mats
        kernel = tuple(modulator.shape[2:])
        k = math.prod(kernel)
        m = modulator.reshape(o, i * k)
        if o != out_ch:
            m = up_o @ m                                             # (O, i * k)
        if i == in_ch:
            return m.reshape((out_ch, in_ch) + kernel)
        if k == 1:
            return (m @ up_i.t()).reshape((out_ch, in_ch) + kernel)
        m = m.reshape(out_ch, i, k).transpose(1, 2) @ up_i.t()       # (O, k, I)
        return m.transpose(1, 2).reshape((out_ch, in_ch) + kernel)

    def _bound_sign(self) -> float:
        cache = self.modcl_cache
        return 1.0 if cache is None or cache.bound is None else cache.bound.sign

    def modulation(self, modulator: torch.Tensor, sign: Optional[float] = None) -> torch.Tensor:
        """The full-resolution multiplicative factor ``1 + sign * upsample(M)`` (default sign: the bound task's)."""
        sign = self._bound_sign() if sign is None else sign
        return 1.0 + sign * self.upsample(modulator)

    def modulated_weight(self, modulator: torch.Tensor, sign: Optional[float] = None) -> torch.Tensor:
        """``W * (1 + sign * upsample(M))`` computed as one fused ``addcmul``."""
        sign = self._bound_sign() if sign is None else sign
        frozen = self._buffers['weight']
        return torch.addcmul(frozen, frozen, self.upsample(modulator), value=sign)

    def _modcl_fill(self, frozen: torch.Tensor, modulator: torch.Tensor, method,
                    slot: Dict[nn.Module, tuple], task: Optional[str]) -> torch.Tensor:
        """Compute the effective weight and cache it in ``slot`` (``task``'s; ``None``: the bound task's), not while
        compiling or tracing."""
        cache = self.modcl_cache
        if cache is None or torch.compiler.is_compiling() or _is_tracing():
            return method.weight(self, modulator)
        # a plain tensor even under inference_mode, so later no-grad calls can reuse it
        with torch.inference_mode(False), torch.no_grad():
            if method.is_identity(self, modulator):  # an untouched task: exactly the frozen weight, nothing to store
                weight, nbytes = frozen, 0
            else:
                weight = method.weight(self, modulator)
                nbytes = weight.numel() * weight.element_size()
        cache.put(cache.active if task is None else task, slot, self,
                  (modulator, modulator._version, frozen, frozen._version, method, modulator.data_ptr(), weight,
                   nbytes))
        return weight

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript gets a plain copy of the layer with the active task's weight folded in."""
        from .factory import unmodulate_layer   # (the factory module imports this one)
        return unmodulate_layer(self, copy=True)

    def __reduce_ex__(self, protocol):
        from .factory import _new_layer   # (the factory module imports this one)
        return _new_layer, (ModulatedWeight, self._modcl_plain), self.__dict__

    def extra_repr(self) -> str:
        s = super().extra_repr()
        modulator = self.modulator
        if modulator is not None:
            s += f', modulator={tuple(modulator.shape)}, method={self.modcl_cache.bound.method!r}'
        return s
