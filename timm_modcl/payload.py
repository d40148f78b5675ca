"""One task as a value: ``TaskPayload`` (its tensors by role and its description), the ``LayerTable`` of an
architecture it is checked against, and the package's one reader of safetensors bytes.

A payload is what passes between a model (``model.task_payload(name)`` takes a task out, ``model.load_payloads``
puts tasks in), adapter files (``timm_modcl.adapter``), training checkpoints, state dicts and the Hub. It is
validated here and only here:

* on construction, everything a payload can say about itself: the task name, class count, class names, config and
  metadata; every tensor's name (``modulator.<layer>``, ``bn.<layer>.<stat>``, ``norm.<layer>.weight|bias``,
  ``head.<key>``, ``stats.<name>``), dtype, finiteness and value bounds; the head's class dimension; the prototype
  statistics;
* by ``check(table)``, its fit to an architecture: exactly the tensors the task's config needs on those layers, each
  of the right shape.

A ``LayerTable`` lists an architecture's modulated layers (weight shapes), its norm layers (statistics and affine
shapes), the per-class shapes of its head and its feature size. A model gives its own (``model.layer_table()``) and
adapter folders record it in their index, so folders and Hub repos are checked without building a backbone.

Payload errors are ``PayloadError``; the readers of files and state dicts report them as their own error types
(``AdapterFormatError``, ``CheckpointError``, ``StateDictError``) with the file named.
"""
import json
import math
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ._io import load_json
from .config import TaskConfig
from .errors import PayloadError, TaskError
from .methods import method_of
from .task import BN_STATS, task_meta, validate_metadata, validate_task_name

__all__ = ['TaskPayload', 'LayerTable', 'read_safetensors', 'modulator_shapes', 'MAX_CLASSES', 'MAX_MODULATOR']

#: Largest head a task may have (a clear error instead of an allocation failure).
MAX_CLASSES = 1_000_000
#: Largest modulator value accepted: it scales a weight by a million (trained modulators stay within a few units; a
#: larger value comes from a corrupt file or a diverged run, and gives non-finite outputs).
MAX_MODULATOR = 1e6
#: Largest safetensors header read (JSON text).
MAX_HEADER = 64 * 1024 * 1024
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATS_NAME = re.compile(r'[a-z][a-z0-9_]{0,63}')
_KINDS = ('modulator', 'bn', 'norm', 'head', 'stats')
_PICKLE_MAGIC = (b'PK', b'\x80\x02', b'\x80\x03', b'\x80\x04', b'\x80\x05')
_Shape = Tuple[int, ...]


# ---------------------------------------------------------------------------------------------------- safetensors
def read_safetensors(data: bytes, label: str, max_header: int = MAX_HEADER
                     ) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """``(header metadata, tensors)`` of safetensors bytes, never unpickling anything.

    Args:
        data: The file's bytes.
        label: How errors name the source (e.g. the quoted path).
        max_header: Largest header accepted, in bytes.

    Raises:
        PayloadError: a pickle / torch.save file, fewer than 8 bytes, a header length beyond ``max_header`` or the
            data, a corrupt header (JSON nested too deeply included) or corrupt tensor data.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    if data[:2] in _PICKLE_MAGIC:
        raise PayloadError(f'{label} looks like a pickle / torch.save file; timm_modcl only reads safetensors files '
                           f'and never unpickles files')
    if len(data) < 8:
        raise PayloadError(f'{label} is not a safetensors file (only {len(data)} bytes)')
    (n,) = struct.unpack('<Q', data[:8])
    if n > max_header or 8 + n > len(data):
        raise PayloadError(f'{label} is truncated or not a safetensors file (header length {n})')
    header = load_json(data[8:8 + n], PayloadError, f'the safetensors header of {label}')
    if not isinstance(header, dict):
        raise PayloadError(f'{label} has a corrupt safetensors header')
    meta = header.get('__metadata__')
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise PayloadError(f'{label} has a corrupt safetensors header (its metadata is not text)')
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise PayloadError(f'{label} is corrupt: {e}') from None
    return {str(k): v for k, v in (meta or {}).items()}, tensors


# ---------------------------------------------------------------------------------------------------- layer table
def modulator_shapes(weights: Mapping[str, Tuple[_Shape, int]], config: TaskConfig) -> 'OrderedDict[str, _Shape]':
    """Shape of a task's tensor of each weight layer ``{layer: (weight shape, chunks)}`` under ``config`` (layers
    the config leaves unmodulated are left out)."""
    method = method_of(config)
    out: 'OrderedDict[str, _Shape]' = OrderedDict()
    for layer, (shape, chunks) in weights.items():
        res = config.layer(layer)
        if res is None:
            continue
        s = method.shape(tuple(shape), res, chunks)
        if s is not None:
            out[layer] = tuple(s)
    return out


def _shape(v: Any, what: str) -> _Shape:
    if not isinstance(v, (list, tuple)) or len(v) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2 ** 31 for d in v):
        raise PayloadError(f'the layer table has a bad shape for {what}: {v!r}')
    return tuple(v)


@dataclass(frozen=True)
class LayerTable:
    """The layers of an architecture a task's tensors describe (see the module docstring).

    Attributes:
        weights: ``{layer: (weight shape, chunks)}`` of the modulated weight layers, in model order.
        bn_stats: ``{layer: shape of its running statistics}`` of the norm layers that track statistics.
        affine: ``{layer: ({'weight'|'bias': shape}, always)}`` of the norm layers with an affine; ``always``: each
            task has its own (LayerNorm, GroupNorm, ...), else only with ``TaskConfig.bn_affine`` (BatchNorm).
        head: ``{key: shape without the class dimension}`` of a one-class head, or ``None`` (no classifier).
        feature_dim: Size of the pre-logits features (what prototype statistics describe), if known.
    """
    weights: Mapping[str, Tuple[_Shape, int]]
    bn_stats: Mapping[str, _Shape] = field(default_factory=dict)
    affine: Mapping[str, Tuple[Mapping[str, _Shape], bool]] = field(default_factory=dict)
    head: Optional[Mapping[str, _Shape]] = None
    feature_dim: Optional[int] = None

    def head_shapes(self, num_classes: int) -> Dict[str, _Shape]:
        """Shapes of the tensors of a ``num_classes`` head (empty without a classifier or classes)."""
        if self.head is None or num_classes <= 0:
            return {}
        return {k: (num_classes,) + tuple(s) for k, s in self.head.items()}

    def check_fresh_head(self, name: Any, num_classes: Any, max_values: int) -> None:
        """Refuse a fresh head of ``num_classes`` classes with more than ``max_values`` values (a headless adapter
        asking for a huge allocation).

        Raises:
            PayloadError: naming the size.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 < num_classes <= MAX_CLASSES:
            return  # the payload's own check names a bad class count
        fresh = sum(math.prod(s) for s in self.head_shapes(num_classes).values())
        if fresh > max_values:
            raise PayloadError(f'task {name!r} has no head and asks for a fresh one of {num_classes:,} classes '
                               f'({fresh:,} values), far more than the file holds; save the adapter with its head')

    def expected(self, config: TaskConfig, num_classes: int, head: bool = True) -> 'OrderedDict[str, _Shape]':
        """Flat names and shapes of the tensors a task of ``config`` must have (statistics excluded)."""
        out: 'OrderedDict[str, _Shape]' = OrderedDict()
        for layer, shape in modulator_shapes(self.weights, config).items():
            out[f'modulator.{layer}'] = shape
        for layer, shape in self.bn_stats.items():
            for k in BN_STATS:
                out[f'bn.{layer}.{k}'] = () if k == 'num_batches_tracked' else tuple(shape)
        for layer, (shapes, always) in self.affine.items():
            if always or config.bn_affine:
                for k in ('weight', 'bias'):
                    if k in shapes:
                        out[f'norm.{layer}.{k}'] = tuple(shapes[k])
        if head:
            for k, shape in self.head_shapes(num_classes).items():
                out[f'head.{k}'] = shape
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (stored in adapter folder indexes; lists keep the model's layer order)."""
        return {
            'weights': [[n, list(s), c] for n, (s, c) in self.weights.items()],
            'bn_stats': [[n, list(s)] for n, s in self.bn_stats.items()],
            'affine': [[n, {k: list(v) for k, v in s.items()}, bool(a)] for n, (s, a) in self.affine.items()],
            'head': None if self.head is None else {k: list(s) for k, s in self.head.items()},
            'feature_dim': self.feature_dim,
        }

    @classmethod
    def from_dict(cls, d: Any) -> 'LayerTable':
        """Rebuild a table from ``to_dict()`` output, checking its form.

        Raises:
            PayloadError: a malformed table.
        """
        def rows(key: str, width: int) -> list:
            value = d.get(key) or []
            if not isinstance(value, list) or not all(
                    isinstance(r, list) and len(r) == width and isinstance(r[0], str) for r in value):
                raise PayloadError(f'the layer table is malformed ({key!r})')
            return value

        if not isinstance(d, Mapping) or not isinstance(d.get('weights'), list):
            raise PayloadError('the layer table is malformed (no weights)')
        weights = OrderedDict()
        for n, shape, chunks in rows('weights', 3):
            if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
                raise PayloadError(f'the layer table has a bad entry for {n!r}')
            weights[n] = (_shape(shape, n), chunks)
        bn = OrderedDict((n, _shape(shape, n)) for n, shape in rows('bn_stats', 2))
        affine = OrderedDict()
        for n, shapes, always in rows('affine', 3):
            if not isinstance(shapes, Mapping) or not set(shapes) <= {'weight', 'bias'} or not isinstance(always, bool):
                raise PayloadError(f'the layer table has a bad affine entry for {n!r}')
            affine[n] = ({k: _shape(v, n) for k, v in shapes.items()}, always)
        head, dim = d.get('head'), d.get('feature_dim')
        if not (head is None or isinstance(head, Mapping)) or not (
                dim is None or isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
            raise PayloadError('the layer table is malformed (head)')
        return cls(weights=weights, bn_stats=bn, affine=affine,
                   head=None if head is None else {str(k): _shape(s, k) for k, s in head.items()}, feature_dim=dim)


# ---------------------------------------------------------------------------------------------------- payload
def _fields(meta: Any) -> Tuple[str, int, TaskConfig, Optional[Tuple[str, ...]], Dict[str, str]]:
    """The checked description fields of a task's JSON description (``TaskPayload.meta()``)."""
    if not isinstance(meta, Mapping):
        raise PayloadError('task metadata must be a mapping')
    name = meta.get('name')
    try:
        validate_task_name(name)
    except TaskError as e:
        raise PayloadError(str(e)) from None
    num_classes = meta.get('num_classes')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= MAX_CLASSES:
        raise PayloadError(f'task {name!r}: num_classes must be an integer from 0 to {MAX_CLASSES:,}, got '
                           f'{num_classes!r}')
    try:
        config = meta.get('config')
        config = config if isinstance(config, TaskConfig) else TaskConfig.from_dict(config)
    except TaskError as e:
        raise PayloadError(f'task {name!r}: {e}') from None
    class_names = meta.get('class_names')
    if class_names is not None:
        if not isinstance(class_names, (list, tuple)) or len(class_names) != num_classes \
                or not all(isinstance(c, str) for c in class_names):
            raise PayloadError(f'task {name!r}: class_names must be {num_classes} strings')
        class_names = tuple(class_names)
    try:
        metadata = validate_metadata(meta.get('metadata'))
    except TaskError as e:
        raise PayloadError(f'task {name!r}: {e}') from None
    return name, num_classes, config, class_names, metadata


@dataclass(frozen=True)
class TaskPayload:
    """One task's tensors (flat names, by role) and description, checked on construction (see the module docstring).

    Attributes:
        name: Task name.
        num_classes: Classes of its head (0: no head).
        config: Its ``TaskConfig``.
        tensors: ``{flat name: tensor}``; a model's payload shares memory with the model's tensors (copy before
            changing them).
        class_names: One name per class, or ``None``.
        metadata: Free-form ``{str: str}`` description.
        headless: Stored without its head on purpose (a loader gives the task a fresh, untrained head).

    Raises:
        PayloadError: on construction, naming the first field or tensor that is not valid.
    """
    name: str
    num_classes: int
    config: TaskConfig
    tensors: Mapping[str, torch.Tensor]
    class_names: Optional[Tuple[str, ...]] = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    headless: bool = False

    def __post_init__(self) -> None:
        name, num_classes, config, class_names, metadata = _fields(self.meta())
        object.__setattr__(self, 'config', config)
        object.__setattr__(self, 'class_names', class_names)
        object.__setattr__(self, 'metadata', metadata)
        object.__setattr__(self, 'tensors', OrderedDict(self.tensors))
        self._check_tensors()

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], headless: bool = False
                  ) -> 'TaskPayload':
        """A payload from a task's JSON description (``meta()``: name, num_classes, class_names, config, metadata)
        and its flat tensors.

        Raises:
            PayloadError: as the constructor.
        """
        name, num_classes, config, class_names, metadata = _fields(meta)
        return cls(name, num_classes, config, tensors, class_names, metadata, headless)

    def meta(self) -> Dict[str, Any]:
        """JSON-ready description (everything but the tensors), as adapter headers and state dicts store it."""
        return task_meta(self.name, self.num_classes, self.class_names, self.config, self.metadata)

    def replace(self, **changes: Any) -> 'TaskPayload':
        """A copy with some fields changed (checked again)."""
        from dataclasses import replace
        return replace(self, **changes)

    # -------------------------------------------------------------- roles
    def _role(self, kind: str) -> 'OrderedDict[str, torch.Tensor]':
        p = kind + '.'
        return OrderedDict((k[len(p):], v) for k, v in self.tensors.items() if k.startswith(p))

    @property
    def modulators(self) -> 'OrderedDict[str, torch.Tensor]':
        """``{layer: tensor}``: the task's tensor of each weight layer (modulators, or packed LoRA factors)."""
        return self._role('modulator')

    @property
    def norm_stats(self) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
        """``{layer: {running_mean|running_var|num_batches_tracked: tensor}}``."""
        out: 'OrderedDict[str, Dict[str, torch.Tensor]]' = OrderedDict()
        for k, v in self._role('bn').items():
            layer, _, stat = k.rpartition('.')
            out.setdefault(layer, {})[stat] = v
        return out

    @property
    def norm_affine(self) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
        """``{layer: {weight|bias: tensor}}``: the task's own norm affine."""
        out: 'OrderedDict[str, Dict[str, torch.Tensor]]' = OrderedDict()
        for k, v in self._role('norm').items():
            layer, _, which = k.rpartition('.')
            out.setdefault(layer, {})[which] = v
        return out

    @property
    def head(self) -> 'OrderedDict[str, torch.Tensor]':
        """``{key: tensor}`` of the head's state dict (empty for a headless payload or a feature extractor)."""
        return self._role('head')

    @property
    def stats(self) -> 'OrderedDict[str, torch.Tensor]':
        """``{name: tensor}``: scorer statistics (e.g. class prototypes for task-agnostic prediction)."""
        return self._role('stats')

    @property
    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    # -------------------------------------------------------------- checks
    def _check_tensors(self) -> None:
        name = self.name
        for k, t in self.tensors.items():
            kind, _, rest = k.partition('.') if isinstance(k, str) else ('', '', '')
            if kind not in _KINDS or not rest:
                raise PayloadError(f'task {name!r}: unexpected tensor {k!r}')
            if not isinstance(t, torch.Tensor):
                raise PayloadError(f'task {name!r}: {k!r} is not a tensor')
            if kind == 'stats' and not _STATS_NAME.fullmatch(rest):
                raise PayloadError(f'task {name!r}: bad statistics name {k!r}')
            if kind == 'bn' and rest.rpartition('.')[2] not in BN_STATS or \
                    kind == 'norm' and rest.rpartition('.')[2] not in ('weight', 'bias'):
                raise PayloadError(f'task {name!r}: unexpected tensor {k!r}')
            if k.endswith('.num_batches_tracked'):
                if t.dtype not in (torch.int64, torch.int32):
                    raise PayloadError(f'task {name!r}: {k!r} must be an integer tensor, got {t.dtype}')
                continue
            if t.dtype not in FLOAT_DTYPES:
                raise PayloadError(f'task {name!r}: {k!r} must be float16, bfloat16, float32 or float64, got '
                                   f'{t.dtype}')
            if not torch.isfinite(t).all():
                raise PayloadError(f'task {name!r}: {k!r} contains NaN or Inf values')
            if kind == 'modulator' and t.numel() and float(t.abs().max()) > MAX_MODULATOR:
                raise PayloadError(f'task {name!r}: {k!r} has values beyond +-{MAX_MODULATOR:g} (up to '
                                   f'{float(t.abs().max()):.3g}): a corrupt file or a diverged training run')
            if k.endswith('.running_var') and (t < 0).any():
                raise PayloadError(f'task {name!r}: {k!r} has negative values')
        head = self.head
        if head and self.headless:
            raise PayloadError(f'task {name!r} is stored without its head but has head tensors')
        for k, t in head.items():
            if t.ndim == 0 or t.shape[0] != self.num_classes:
                raise PayloadError(f'task {name!r}: {"head." + k!r} has shape {tuple(t.shape)}, which does not '
                                   f'fit its {self.num_classes} classes')
        self.check_statistics(None)

    def check_statistics(self, feature_dim: Optional[int]) -> None:
        """Check the prototype statistics (complete, consistent, of ``num_classes`` and, unless ``None``, of
        ``feature_dim`` features; ``serving.check_prototype_statistics``).

        Raises:
            PayloadError: naming the problem.
        """
        stats = self.stats
        if not stats:
            return
        from .errors import StatisticsError
        from .serving import check_prototype_statistics
        try:
            check_prototype_statistics(dict(stats), self.num_classes, feature_dim, self.name)
        except StatisticsError as e:
            raise PayloadError(str(e)) from None

    def check(self, table: LayerTable, max_fresh_head: Optional[int] = None) -> 'TaskPayload':
        """Check that the payload fits an architecture: exactly the tensors its config needs on ``table``'s layers
        (statistics aside), each of the right shape, its prototype statistics of the table's feature size.

        Args:
            table: The architecture's layers.
            max_fresh_head: For a headless payload, the most head values a loader may create (``None``: any).

        Returns:
            ``self``.

        Raises:
            PayloadError: naming the first tensor missing, unexpected or of the wrong shape.
        """
        name, config = self.name, self.config
        if self.num_classes > 0 and table.head is None:
            raise PayloadError(f'task {name!r} has {self.num_classes} classes but this model has no classifier head')
        expected = table.expected(config, self.num_classes, head=not self.headless)
        given = [k for k in self.tensors if not k.startswith('stats.')]
        missing = [k for k in expected if k not in self.tensors]
        unexpected = [k for k in given if k not in expected]
        if missing:
            raise PayloadError(f'task {name!r}: missing tensor(s) {missing[:5]} (its config {config.to_dict()} '
                               f'needs them)')
        if unexpected:
            raise PayloadError(f'task {name!r}: unexpected tensor(s) {sorted(unexpected)[:5]}')
        for k, shape in expected.items():
            t = self.tensors[k]
            if tuple(t.shape) != tuple(shape):
                raise PayloadError(f'task {name!r}: {k!r} has shape {tuple(t.shape)}, expected {tuple(shape)}')
        if self.headless and max_fresh_head is not None:
            table.check_fresh_head(name, self.num_classes, max_fresh_head)
        if table.feature_dim is not None:
            self.check_statistics(table.feature_dim)
        return self

    def describe(self) -> Dict[str, Any]:
        """Sizes by role (what ``modcl info`` prints)."""
        count = lambda role: sum(t.numel() for t in role.values())  # noqa: E731
        out = {
            'num_modulator_params': count(self.modulators),
            'num_head_params': count(self.head),
            'num_norm_values': count(self._role('norm')) + sum(
                t.numel() for k, t in self._role('bn').items() if not k.endswith('num_batches_tracked')),
            'num_stats_values': count(self.stats),
            'num_values': self.num_values,
            'tensor_bytes': sum(t.numel() * t.element_size() for t in self.tensors.values()),
        }
        out['num_added_values'] = out['num_modulator_params'] + out['num_head_params'] + out['num_norm_values']
        return out


def task_json(meta: Mapping[str, Any]) -> str:
    """A task description as the sorted JSON text files store."""
    return json.dumps(meta, sort_keys=True)
