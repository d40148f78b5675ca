"""The layer kinds of Adaptive Weight Modulation (arXiv 2311.15276), for any timm model.

A frozen weight ``W`` of shape ``(O, I, *kernel)`` (every ``nn.Conv1d/2d/3d`` and ``nn.Linear``, and their subclasses
that read ``self.weight`` such as timm's ``Conv2dSame`` or ``StdConv2d``) is multiplied element-wise by a task-specific
modulator learnt at a low channel resolution ``(o, i, *kernel)`` and bicubically interpolated over the two channel
dimensions up to ``(O, I)``::

    W_task = W * (1 + sign * upsample(M))

``sign = -1`` with a kaiming-normal ``M`` is the author's formulation ``W * (1 - M)`` (variant ``"paper"``);
``sign = +1`` with ``M = 0`` starts exactly at the pretrained weights (variant ``"identity"``). A fused projection
(ViT's ``qkv``) is modulated per chunk, so q, k and v are never blended by the interpolation.

Layers are modulated *in place*: their class is swapped for a subclass that adds a ``weight`` property (the frozen
tensor stays a buffer under the same state-dict key), so every forward of the original class, and every reference timm
keeps to the module, keeps working. Normalisation layers get the same treatment for their affine (a task's own affine
in front of the frozen one) and their BatchNorm running statistics (the task's own; the layer's buffers are the base
task's). The tensors themselves live in the model's tasks (``TaskState`` modules); a layer reads those of the task of
the call on every forward.

In eval mode without autograd the effective weight is cached in the model's ``WeightCache`` and reused until the
modulator or the weight changes (tensor version counters), so inference costs what the plain layer costs.

**Tasks per call.** Besides the task the model binds into its layers (``set_task``, one per model: global state), a
computation can name its task for the current thread or asyncio task only: ``task_scope`` sets a context variable that
every layer of that model reads (modulator, norm affine, BatchNorm statistics), so any number of threads can run
different tasks on one model at once without changing anything shared.
"""
import contextlib
import contextvars
import functools
import math
import threading
from collections import OrderedDict
from typing import Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FrozenBackboneError, InputError, ResolutionError
from .methods import LayerMethod, Modulation, modulator_shape

__all__ = [
    'MODULATION_VARIANTS',
    'frozen_names',
    'plain_class',
    'task_aware_class',
    'task_scope',
    'scoped_task',
    'ModulatedWeight',
    'TaskNorm',
    'WeightCache',
    'modulator_shape',
    'upsample_modulator',
    'interpolation_matrix',
    'validate_resolution',
    'is_weight_layer',
    'is_norm_layer',
    'modulate_layer',
    'unmodulate_layer',
]

#: Modulation variants and the sign they apply to the upsampled modulator.
MODULATION_VARIANTS: Dict[str, float] = {'paper': -1.0, 'identity': 1.0}

#: The task of the current thread / asyncio task, per model: ``(the model's WeightCache, TaskState, cache slot)``.
_SCOPED: 'contextvars.ContextVar[Optional[tuple]]' = contextvars.ContextVar('timm_modcl_task', default=None)


@contextlib.contextmanager
def task_scope(cache: 'WeightCache', task) -> Iterator[None]:
    """Run the layers bound to ``cache`` (one model's) on ``task`` (a ``TaskState``) in this thread / asyncio task
    only. Nothing shared changes; nesting restores the outer scope. The model's ``task_scope(name)`` is the public
    entry point."""
    token = _SCOPED.set((cache, task, cache.use(task.name)))
    try:
        yield
    finally:
        _SCOPED.reset(token)


def scoped_task(cache: 'WeightCache'):
    """The ``TaskState`` that ``task_scope`` set for the model owning ``cache`` in this context, or ``None``."""
    call = _SCOPED.get()
    return call[1] if call is not None and call[0] is cache else None


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


class WeightCache:
    """Effective weights of several tasks, least recently used first out, under a memory limit in bytes.

    Entries are grouped per task; the active task is never evicted (it is what the model computes now), so a model
    always runs at the plain model's eval cost, and switching between a few hot tasks recomputes nothing while they
    fit. Every entry records the identity and version counter of the modulator and of the frozen weight it was made
    from, so a stale weight is never served after an optimizer step, an in-place edit or a load. The cache also knows
    the model's bound task (``bound``, with its slot): what every layer computes outside a ``task_scope``, which
    carries the slot of its own task. The cache is safe to use from several threads (one lock around its
    bookkeeping).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.active: Optional[str] = None
        self.bound = None                      # the bound task (a TaskState): what unscoped calls compute
        self.bound_slot: Dict[nn.Module, tuple] = {}
        self._tasks: 'OrderedDict[str, Dict[nn.Module, tuple]]' = OrderedDict()
        self.bytes = 0
        self.misses = 0
        self._lock = threading.RLock()

    def activate(self, task: str) -> Dict[nn.Module, tuple]:
        """Make ``task`` the active (never evicted) and most recently used one and return its slot."""
        with self._lock:
            self.active = task
            return self.use(task)

    def bind(self, task) -> None:
        """Make ``task`` (a ``TaskState``) the one every layer of the model computes outside a ``task_scope``."""
        with self._lock:
            self.bound_slot = self.activate(task.name)
            self.bound = task

    def use(self, task: str) -> Dict[nn.Module, tuple]:
        """Make ``task`` the most recently used one and return its slot (the active task is unchanged)."""
        with self._lock:
            slot = self._tasks.setdefault(task, {})
            self._tasks.move_to_end(task)
            self._evict()
            return slot

    def put(self, task: str, slot: Dict[nn.Module, tuple], layer: nn.Module, entry: tuple) -> None:
        """Store a layer's entry (whose last item is its size in bytes) in ``task``'s slot; nothing is stored when
        the slot was evicted or dropped meanwhile (another thread's call), so the byte count stays exact."""
        with self._lock:
            self.misses += 1
            if self._tasks.get(task) is not slot:
                return
            old = slot.get(layer)
            if old is not None:
                self.bytes -= old[-1]
            slot[layer] = entry
            self.bytes += entry[-1]
            self._evict()

    def _evict(self) -> None:
        # never the active task, nor the most recently used one (the task of the call that is filling the cache)
        while self.bytes > self.max_bytes:
            keep = (self.active, next(reversed(self._tasks), None))
            victim = next((t for t in self._tasks if t not in keep), None)
            if victim is None:
                break
            self.drop(victim)

    def drop(self, task: str) -> None:
        """Forget the cached weights of one task (removed, replaced or reloaded)."""
        with self._lock:
            slot = self._tasks.get(task)
            if slot is None:
                return
            self.bytes -= sum(e[-1] for e in slot.values())
            if task == self.active:
                slot.clear()  # in place: the layers hold this dict
            else:
                del self._tasks[task]

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            if old in self._tasks:
                self._tasks = OrderedDict((new if k == old else k, v) for k, v in self._tasks.items())
            if self.active == old:
                self.active = new

    def clear(self) -> None:
        with self._lock:
            for task in list(self._tasks):
                self.drop(task)

    def set_limit(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def cached_tasks(self) -> Tuple[str, ...]:
        """Tasks with cached weights, least recently used first."""
        with self._lock:
            return tuple(t for t, slot in self._tasks.items() if slot)

    def __getstate__(self) -> dict:
        # a pickled or deep-copied model starts with an empty cache: the entries are keyed on the identity of this
        # model's tensors, so a copy could never use them, and they would hold up to max_bytes of memory (and file)
        state = self.__dict__.copy()
        state['_tasks'] = OrderedDict()
        state['bytes'] = 0
        state['bound_slot'] = {}
        del state['_lock']
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        if self.active is not None:
            self._tasks[self.active] = self.bound_slot

    def __repr__(self) -> str:
        return (f'WeightCache({len(self.cached_tasks())} task(s), {self.bytes / 2 ** 20:.1f} of '
                f'{self.max_bytes / 2 ** 20:.1f} MiB, misses={self.misses})')


class ModulatedWeight:
    """Mixed into the class of a weight layer (``nn.Conv*d``, ``nn.Linear`` or a subclass) by ``modulate_layer``.

    ``weight`` becomes a read-only property: the frozen tensor (a buffer, under the layer's usual state-dict key)
    modulated by the task's tensor of this layer (the task of the current ``task_scope``, else the model's bound task:
    both found through the model's ``WeightCache``), or the frozen tensor itself when the task leaves the layer
    unmodulated. The tasks' tensors live in the tasks (``model.modcl_tasks``), not in the layer.
    """

    _modcl_base: Type[nn.Module]
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
        frozen = self._buffers['weight']
        cache = self.modcl_cache
        call = _SCOPED.get()
        if call is not None and call[0] is cache:  # a task_scope of this model: its task, nothing shared
            task, slot, name = call[1], call[2], call[1].name
        elif cache is not None and cache.bound is not None:
            task, slot, name = cache.bound, cache.bound_slot, None
        else:
            return frozen
        modulator = task.__dict__['modulator_store'].get(self.modcl_key)
        method = task.method
        if modulator is None:
            return frozen
        if self.training or (modulator.requires_grad and torch.is_grad_enabled()):
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
        return unmodulate_layer(self, copy=True)

    def __reduce_ex__(self, protocol):
        return _new_layer, (ModulatedWeight, self._modcl_base), self.__dict__

    def extra_repr(self) -> str:
        s = super().extra_repr()
        modulator = self.modulator
        if modulator is not None:
            s += f', modulator={tuple(modulator.shape)}, method={self.modcl_cache.bound.method!r}'
        return s


class TaskNorm:
    """Mixed into the class of a normalisation layer by ``modulate_layer``.

    ``weight`` / ``bias`` become properties: the active task's own affine (``task_weight`` / ``task_bias``
    parameters) when it has one for this layer, else the frozen pretrained affine (buffers under the usual keys).
    BatchNorm running statistics are plain buffers that the model re-binds per task.
    """

    _modcl_base: Type[nn.Module]
    modcl_cache: Optional[WeightCache] = None   # the model's cache: identifies the model in a task_scope
    modcl_name: str = ''
    modcl_key: str = ''

    def _modcl_task(self):
        """The task this call computes: the current ``task_scope``'s for this model, else the bound one."""
        cache = self.modcl_cache
        call = _SCOPED.get()
        if call is not None and call[0] is cache:
            return call[1]
        return None if cache is None else cache.bound

    # read on every forward: one context-variable read and one dict lookup. torch.compile traces the read (no graph
    # break) and sees no scope (a scope on a compiled call is refused)
    @property
    def weight(self) -> Optional[torch.Tensor]:
        task = self._modcl_task()
        own = None if task is None else task.__dict__['norm_store'].get(self.modcl_key + '/weight')
        return self._buffers['weight'] if own is None else own

    @property
    def bias(self) -> Optional[torch.Tensor]:
        task = self._modcl_task()
        own = None if task is None else task.__dict__['norm_store'].get(self.modcl_key + '/bias')
        return self._buffers['bias'] if own is None else own

    @property
    def task_weight(self) -> Optional[torch.Tensor]:
        """The bound task's own affine weight of this layer (``None``: it uses the frozen one)."""
        cache = self.modcl_cache
        return None if cache is None or cache.bound is None else cache.bound.norm.store.get(self.modcl_key + '/weight')

    @property
    def task_bias(self) -> Optional[torch.Tensor]:
        """The bound task's own affine bias of this layer (``None``: it uses the frozen one)."""
        cache = self.modcl_cache
        return None if cache is None or cache.bound is None else cache.bound.norm.store.get(self.modcl_key + '/bias')

    def __prepare_scriptable__(self) -> nn.Module:
        return unmodulate_layer(self, copy=True)

    def __reduce_ex__(self, protocol):
        return _new_layer, (TaskNorm, self._modcl_base), self.__dict__


def _scoped_stat(name: str) -> property:
    suffix = '/' + name

    def get(self) -> Optional[torch.Tensor]:
        task = self._modcl_task()
        if task is not None:
            t = task.__dict__['bn_store'].get(self.modcl_key + suffix)
            if t is not None:
                return t
        return self._buffers[name]   # the base task's statistics are the layer's own buffers (the checkpoint's)
    return property(get, doc=f'The {name} of the task of the current ``task_scope``, else the bound task\'s.')


class _TaskStats:
    """Mixed in front of BatchNorm layers' ``TaskNorm`` class: the running statistics of the task of the call (its
    ``task_scope``'s, else the bound one's); the layer's own buffers are the base task's."""
    running_mean = _scoped_stat('running_mean')
    running_var = _scoped_stat('running_var')
    num_batches_tracked = _scoped_stat('num_batches_tracked')


_TASK_STATS = ('running_mean', 'running_var', 'num_batches_tracked')


class _FrozenGuard:
    """Refuses module surgery on a layer's frozen tensors (every task shares them): assigning or deleting them
    (``conv.weight = ...``, ``del conv.weight``), registering new parameters (``torch.nn.utils.prune``), or
    reparametrizing them (``torch.nn.utils.parametrizations.weight_norm``). Each raises ``FrozenBackboneError``
    before anything changes, naming the supported way."""

    _modcl_trainable: Tuple[str, ...] = ()     # the views of the bound task's tensors (``modulator``, ...)

    def _modcl_refuse(self, what: str) -> None:
        raise FrozenBackboneError(
            f'{what} on {type(self).__name__} {self.modcl_name!r}: its frozen tensors are shared by every task, so '
            f'changing them would change the outputs of every task. Train a task (add_task) to adapt the layer; to '
            f'edit, prune or reparametrize weights, work on a plain model: model.export_task(name)')

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get('_modcl_frozen', ()):
            self._modcl_refuse(f'assigning .{name}')
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get('_modcl_frozen', ()) or name in type(self)._modcl_trainable:
            self._modcl_refuse(f'deleting .{name}')
        super().__delattr__(name)

    def register_parameter(self, name: str, param) -> None:
        self._modcl_refuse(f'registering a new parameter {name!r}')


class _LayerParameters(OrderedDict):
    """The ``_parameters`` of a task-aware layer: deleting a frozen tensor from it (as the deprecated
    ``torch.nn.utils.weight_norm`` does) is refused like the other surgery, with nothing changed."""

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise FrozenBackboneError(
                f'deleting parameter {key!r} of a task-aware layer: its frozen tensors are buffers shared by every '
                f'task; to edit, prune or reparametrize weights, work on a plain model: model.export_task(name)')
        super().__delitem__(key)


_CLASSES: Dict[Tuple[type, type], type] = {}


def task_aware_class(mixin: type, base: type) -> type:
    """The (cached) subclass of ``base`` with ``mixin`` in front, registered as a torch.fx leaf."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        from timm.models._features_fx import register_notrace_module
        prefix = 'Modulated' if mixin is ModulatedWeight else 'Task'
        mixins = (_TaskStats, mixin) if mixin is TaskNorm and issubclass(base, nn.modules.batchnorm._BatchNorm) else (
            mixin,)
        task_views = ('modulator',) if mixin is ModulatedWeight else ('task_weight', 'task_bias')
        cls = type(f'{prefix}{base.__name__}', (_FrozenGuard,) + mixins + (base,),
                   {'__module__': __name__, '_modcl_base': base, '_modcl_trainable': task_views})
        register_notrace_module(cls)  # its caching is Python-side logic: a leaf for feature extraction
        _CLASSES[(mixin, base)] = cls
    return cls


def plain_class(module: nn.Module) -> type:
    """The plain class a task-aware layer was made from (``nn.Conv2d``, timm's ``BatchNormAct2d``, ...)."""
    return type(module)._modcl_base


def _new_layer(mixin: type, base: type) -> nn.Module:
    """Unpickling helper: an empty instance of the modulated subclass of ``base``."""
    return object.__new__(task_aware_class(mixin, base))


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose weight ``(O, I, *kernel)`` can be modulated (convs and linears)."""
    if isinstance(module, (ModulatedWeight, TaskNorm)):
        return isinstance(module, ModulatedWeight)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return not module.transposed and isinstance(module._parameters.get('weight'), torch.Tensor)
    return isinstance(module, nn.Linear) and isinstance(module._parameters.get('weight'), torch.Tensor)


#: Normalisation layers whose affine becomes per-task (timm's own are subclasses of these, or listed by name).
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_NORM_NAMES = {'timm.layers.norm.RmsNorm', 'timm.layers.norm.RmsNorm2d', 'timm.layers.norm.SimpleNorm',
               'timm.layers.norm.SimpleNorm2d', 'timm.layers.fast_norm.RmsNorm'}


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with per-task state (BatchNorm, LayerNorm, GroupNorm, RmsNorm)."""
    if isinstance(module, TaskNorm):
        return True
    if isinstance(module, _NORM_TYPES):
        return True
    return any(f'{c.__module__}.{c.__qualname__}' in _NORM_NAMES for c in type(module).__mro__)


def _freeze(module: nn.Module) -> Tuple[str, ...]:
    """Turn every parameter of ``module`` into a frozen buffer under the same name; returns their names."""
    names = tuple(module._parameters)
    for name in names:
        p = module._parameters.pop(name)
        module._buffers[name] = None if p is None else p.detach().requires_grad_(False)
    return names


def modulate_layer(module: nn.Module) -> str:
    """Swap a weight or norm layer's class in place for its task-aware subclass and freeze its parameters.

    Returns ``'weight'`` or ``'norm'``. Already modulated layers are left as they are.

    Raises:
        TypeError: if the module is neither kind.
    """
    if isinstance(module, ModulatedWeight):
        return 'weight'
    if isinstance(module, TaskNorm):
        return 'norm'
    base = type(module)
    if is_weight_layer(module):
        module._modcl_frozen = _freeze(module)            # weight, bias (and a gain): frozen buffers
        module.__class__ = task_aware_class(ModulatedWeight, base)
        module._parameters = _LayerParameters(module._parameters)
        module.modcl_chunks = 1
        module.modcl_cache = None
        module._modcl_interp = {}
        return 'weight'
    if is_norm_layer(module):
        frozen = _freeze(module)
        for name in ('weight', 'bias'):                   # a norm without affine still answers .weight (None)
            module._buffers.setdefault(name, None)
        module._modcl_frozen = frozen
        module.__class__ = task_aware_class(TaskNorm, base)
        module._parameters = _LayerParameters(module._parameters)
        return 'norm'
    raise TypeError(f'{base.__name__} is neither a weight layer (conv, linear) nor a normalisation layer')


_LAYER_ATTRS = ('modcl_chunks', 'modcl_cache', '_modcl_interp', '_modcl_frozen', 'modcl_bn_guard', 'modcl_name',
                'modcl_key', '_modcl_eff')


def frozen_names(module: nn.Module) -> Tuple[str, ...]:
    """Names of the frozen, shared tensors (buffers) of a layer made task-aware by ``modulate_layer`` (its weight,
    bias, ...); empty for any other module."""
    return tuple(module.__dict__.get('_modcl_frozen', ()))


def unmodulate_layer(module: nn.Module, copy: bool = False) -> nn.Module:
    """Turn a modulated layer back into its plain class with the active task folded in (trainable parameters).

    The effective weight (or the task's affine) and the other frozen tensors become parameters again, and the
    running statistics bound now stay as buffers. With ``copy=True`` the original is left untouched and a new
    module (sharing nothing but child modules) is returned.
    """
    if not isinstance(module, (ModulatedWeight, TaskNorm)):
        return module
    current = {'weight': module.weight, 'bias': module.bias} if isinstance(module, TaskNorm) else {
        'weight': module.weight}
    frozen_names = module._modcl_frozen
    params = OrderedDict()
    for name in frozen_names:
        t = current.get(name, module._buffers.get(name))
        params[name] = None if t is None else nn.Parameter(t.detach().clone())
    buffers = OrderedDict()
    for n, b in module._buffers.items():
        if n not in frozen_names and n not in ('weight', 'bias'):
            if isinstance(module, _TaskStats) and n in _TASK_STATS:
                b = getattr(module, n)   # the bound task's statistics
            buffers[n] = b.detach().clone() if copy and b is not None else b
    if copy:
        out = object.__new__(module._modcl_base)
        out.__dict__ = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    else:
        out = module
    for attr in _LAYER_ATTRS:
        out.__dict__.pop(attr, None)
    out.__class__ = module._modcl_base
    out._parameters = params
    out._buffers = buffers
    out._non_persistent_buffers_set = {n for n in out._non_persistent_buffers_set if n in buffers}
    for hooks in (out._forward_pre_hooks,):
        for k in [k for k, h in hooks.items() if h is check_input]:
            del hooks[k]
    return out


def check_input(module: nn.Module, args) -> None:
    """Forward pre-hook of a model's first weight layer: ``validate_input`` in the layer's train/eval mode."""
    if _is_tracing() or torch.compiler.is_compiling() or torch.jit.is_scripting():
        return
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        validate_input(module, x, module.training)


def validate_input(module: nn.Module, x: torch.Tensor, training: bool) -> None:
    """A clear ``InputError`` for an input the model's first weight layer ``module`` cannot take: a wrong channel count
    or dtype, an empty dimension (0-pixel images), a meta tensor for a model with data, NaN/Inf values, or
    (``training``) a single-sample batch when the model has BatchNorm. Each would fail deep inside the network or give
    NaN outputs, after the active task's BatchNorm statistics of the earlier layers were already updated (a NaN batch
    in train mode would poison them).

    Raises:
        InputError: naming the problem.
    """
    frozen = module._buffers['weight']
    in_ch = frozen.shape[1] * getattr(module, 'groups', 1)
    expected = (f'(N, {in_ch}, H, W)' if isinstance(module, nn.Conv2d) else f'(..., {in_ch})')
    if isinstance(module, nn.Conv2d) and (x.ndim != 4 or x.shape[1] != in_ch):
        raise InputError(f'expected an image batch of shape {expected}, got {tuple(x.shape)}')
    if x.ndim and 0 in x.shape[1:]:
        raise InputError(f'the input has an empty dimension: shape {tuple(x.shape)} (a 0-pixel image?)')
    if x.device.type == 'meta' and frozen.device.type != 'meta':
        raise InputError(f'the input is a meta tensor (no data) but the model is on {frozen.device}; give a real '
                         f'tensor on {frozen.device}')
    if training and x.shape[0] == 1 and getattr(module, 'modcl_bn_guard', False):
        raise InputError('a batch of 1 sample cannot train BatchNorm statistics (the model is in train mode); use a '
                         'batch of 2 or more, or model.eval() to run a single image')
    if not x.is_floating_point():
        raise InputError(f'expected a floating-point image batch ({frozen.dtype}), got {x.dtype}; convert it with '
                         f'x.float() (and normalise it as the model expects)')
    if x.dtype != frozen.dtype and not torch.is_autocast_enabled(x.device.type) and frozen.device.type != 'meta':
        raise InputError(f'the model computes in {frozen.dtype} but the input is {x.dtype}; convert the input '
                         f'(x.to({frozen.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast')
    if x.numel() and x.device.type != 'meta' and not _all_finite(x):
        raise InputError(f'the input contains NaN or Inf values ({int((~torch.isfinite(x)).sum())} of {x.numel()}); '
                         f'check the images and their preprocessing')


def _all_finite(x: torch.Tensor) -> bool:
    """Whether a non-empty tensor has no NaN/Inf: its min and max (NaN propagates), one fused pass without a mask
    tensor (24x faster than ``isfinite(x).all()`` on a 32x3x224x224 batch on one CPU thread)."""
    lo, hi = torch.aminmax(x)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())
