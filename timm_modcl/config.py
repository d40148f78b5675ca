"""``TaskConfig``: how one task modulates its model (resolution, variant, per-layer overrides, per-task BN affine).

A config is a frozen value that round-trips through JSON (``to_dict`` / ``from_dict``), so an adapter file or a state
dict records exactly how its task was built and a loader can check every tensor against it.

    TaskConfig()                                            # uniform (4, 4), no BN affine (DEFAULT_CONFIG differs)
    TaskConfig(resolution=(8, 8), layer_resolution={'conv_stem': None, 'blocks.*.conv_dw': (2, 2)})
    TaskConfig(resolution=None)                             # no modulators: norm state + head only
    TaskConfig(method='lora', rank=8)                       # a per-task low-rank update instead (methods.py)
"""
import fnmatch
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .errors import ResolutionError, TaskError
from .layers import MODULATION_VARIANTS, validate_resolution
from .methods import METHODS

__all__ = ['TaskConfig', 'DEFAULT_CONFIG', 'LayerResolution', 'Resolution']

Resolution = Optional[Tuple[int, int]]
#: Per-layer resolution override: a mapping of layer name or fnmatch pattern to a resolution or ``None`` (leave the
#: layer unmodulated), or a callable ``(layer_name, weight_shape) -> resolution | None``.
LayerResolution = Union[Mapping[str, Resolution], Callable[[str, Tuple[int, ...]], Resolution]]

_MAX_PATTERNS = 10_000
_MAX_RANK = 4096


@dataclass(frozen=True)
class TaskConfig:
    """How a task modulates the frozen backbone.

    Attributes:
        resolution: Default modulation resolution ``(m1, m2)`` of every weight layer, or ``None`` for no modulators.
        variant: ``"identity"`` (``W * (1 + M)``, ``M = 0``: starts exactly at the pretrained weights) or ``"paper"``
            (the author's ``W * (1 - M)`` with kaiming-normal ``M``).
        layer_resolution: Per-layer overrides as ``(pattern, resolution or None)`` pairs; an exact layer name wins
            over patterns, and among patterns the last match wins.
        bn_affine: Give the task its own BatchNorm affine (gamma, beta), initialised from the pretrained one.
            LayerNorm / GroupNorm / RmsNorm layers always get a per-task affine (they have no running statistics).
        method: How a task adapts each weight layer (``timm_modcl.methods``): ``"modulation"`` (Adaptive Weight
            Modulation, the default) or ``"lora"`` (a per-task low-rank update ``W + alpha / r * B @ A``, depthwise
            convs included). With ``"lora"``, a layer whose resolution is ``None`` is left as it is and every other
            layer gets rank ``rank``; the resolution values themselves are not used.
        rank: LoRA rank ``r`` (``method="lora"`` only).
        alpha: LoRA scale numerator (the update is scaled by ``alpha / r``); default: ``rank`` (a scale of 1).
    """
    resolution: Resolution = (4, 4)
    variant: str = 'identity'
    layer_resolution: Tuple[Tuple[str, Resolution], ...] = field(default_factory=tuple)
    bn_affine: bool = False
    method: str = 'modulation'
    rank: int = 8
    alpha: Optional[float] = None

    def __post_init__(self) -> None:
        if self.resolution is not None:
            object.__setattr__(self, 'resolution', validate_resolution(self.resolution))
        if self.variant not in MODULATION_VARIANTS:
            raise TaskError(f'unknown modulation variant {self.variant!r}; choose one of {sorted(MODULATION_VARIANTS)}')
        if not isinstance(self.bn_affine, bool):
            raise TaskError(f'bn_affine must be True or False, got {self.bn_affine!r}')
        if self.method not in METHODS:
            raise TaskError(f'unknown method {self.method!r}; choose one of {", ".join(METHODS)}')
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= _MAX_RANK:
            raise TaskError(f'rank must be an integer from 1 to {_MAX_RANK}, got {self.rank!r}')
        if self.alpha is not None:
            if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                    or not math.isfinite(self.alpha) or not 0 < self.alpha <= 1e6):
                raise TaskError(f'alpha must be a positive finite number or None, got {self.alpha!r}')
            object.__setattr__(self, 'alpha', float(self.alpha))
        pairs = self.layer_resolution
        if isinstance(pairs, Mapping):
            pairs = tuple(pairs.items())
        try:
            pairs = tuple(pairs)
        except TypeError:
            raise ResolutionError(f'layer_resolution must be a mapping of layer name to resolution, got '
                                  f'{type(self.layer_resolution).__name__}') from None
        if len(pairs) > _MAX_PATTERNS:
            raise ResolutionError(f'layer_resolution has {len(pairs)} entries (at most {_MAX_PATTERNS})')
        checked = []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
                raise ResolutionError(f'layer_resolution entries must be (layer name, resolution) pairs, got {pair!r}')
            pattern, res = pair
            checked.append((pattern, None if res is None else validate_resolution(
                res, f'resolution of layer {pattern!r}')))
        object.__setattr__(self, 'layer_resolution', tuple(checked))

    @property
    def sign(self) -> float:
        return MODULATION_VARIANTS[self.variant]

    def layer(self, name: str) -> Resolution:
        """Resolution of one layer: its override if one names or matches it, else ``resolution``."""
        exact = [res for pattern, res in self.layer_resolution if pattern == name]
        if exact:
            return exact[-1]
        for pattern, res in reversed(self.layer_resolution):
            if fnmatch.fnmatchcase(name, pattern):
                return res
        return self.resolution

    def with_layers(self, layer_resolution: Optional[LayerResolution], shapes: Mapping[str, Tuple[int, ...]]
                    ) -> 'TaskConfig':
        """This config with ``layer_resolution`` added; a callable is evaluated on every layer in ``shapes`` and stored
        as the explicit per-layer mapping it produced, so the config stays plain data."""
        if layer_resolution is None:
            return self
        if callable(layer_resolution):
            pairs = []
            for name, shape in shapes.items():
                res = layer_resolution(name, tuple(shape))
                res = None if res is None else validate_resolution(res, f'resolution of layer {name!r}')
                if res != self.layer(name):  # what the config (with its own per-layer profile) would give
                    pairs.append((name, res))
            return replace(self, layer_resolution=self.layer_resolution + tuple(pairs))
        if not isinstance(layer_resolution, Mapping):
            raise ResolutionError(f'layer_resolution must be a mapping or a callable, got '
                                  f'{type(layer_resolution).__name__}')
        return replace(self, layer_resolution=self.layer_resolution + tuple(layer_resolution.items()))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable form (``from_dict`` inverts it)."""
        return {
            'resolution': None if self.resolution is None else list(self.resolution),
            'variant': self.variant,
            'layer_resolution': [[p, None if r is None else list(r)] for p, r in self.layer_resolution],
            'bn_affine': self.bn_affine,
            # written only for other methods, so modulation adapters stay as earlier versions wrote them
            **({} if self.method == 'modulation' else {'method': self.method, 'rank': self.rank, 'alpha': self.alpha}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> 'TaskConfig':
        """Rebuild a config from ``to_dict()``'s output.

        Raises:
            TaskError: if ``d`` is not a valid config (unknown keys, wrong types or values).
        """
        if not isinstance(d, Mapping):
            raise TaskError(f'a task config must be a mapping, got {type(d).__name__}')
        unknown = set(d) - {'resolution', 'variant', 'layer_resolution', 'bn_affine', 'method', 'rank', 'alpha'}
        if unknown:
            raise TaskError(f'unknown task config keys {sorted(unknown)}')
        res = d.get('resolution', (4, 4))
        pairs = d.get('layer_resolution') or []
        if not isinstance(pairs, (list, tuple)):
            raise TaskError(f'layer_resolution must be a list of [layer, resolution] pairs, got {pairs!r}')
        if res is not None and not isinstance(res, (list, tuple)):
            raise TaskError(f'resolution must be a pair of positive integers or null, got {res!r}')
        try:
            return cls(
                resolution=None if res is None else tuple(res),
                variant=d.get('variant', 'identity'),
                layer_resolution=tuple((p[0], None if p[1] is None else tuple(p[1])) if isinstance(p, (list, tuple))
                                       and len(p) == 2 and isinstance(p[1], (list, tuple, type(None))) else p
                                       for p in pairs),
                bn_affine=d.get('bn_affine', False),
                method=d.get('method', 'modulation'),
                rank=d.get('rank', 8),
                alpha=d.get('alpha'),
            )
        except TypeError as e:
            raise TaskError(f'invalid task config: {e}') from None


#: The configuration ``add_task`` uses when not told otherwise, chosen on validation by the accuracy benchmark
#: (``benchmarks/results/accuracy.md``, MobileNetV2): a per-task BN affine, and modulators finer in the stem and the
#: first four stages, coarser in the last two stages and the head conv. The per-layer patterns use the layer names of
#: timm's ``efficientnet`` module (``conv_stem``, ``blocks.<stage>.<block>.conv_*``, ``conv_head``), which MobileNetV2,
#: EfficientNet and MobileNetV3 share; on other families they match nothing and every layer gets ``resolution``.
DEFAULT_CONFIG = TaskConfig(
    resolution=(4, 4), variant='identity', bn_affine=True,
    layer_resolution=(('conv_stem', (1, 1)), ('blocks.[0-3].*.conv_*', (2, 2)), ('blocks.[56].*.conv_*', (6, 6)),
                      ('conv_head', (8, 8))))
