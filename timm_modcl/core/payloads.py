"""Tasks as values (``PayloadMixin``): the model's ``layer_table``, a task as a ``TaskPayload`` and its info,
tensors, statistics and metadata, and checking, building and loading tasks from payloads.
"""
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import PayloadError, TaskExistsError
from ..methods import method_of
from ..payload import LayerTable, TaskPayload
from ..task import BASE_TASK, TaskInfo, TaskState, validate_metadata
from .state import _affine_norm, _State, _tracks_stats


class PayloadMixin:
    """Tasks as validated values (``TaskPayload``): reading them from the model, checking and loading them (see the
    package docstring)."""

    _modcl: _State

    # ------------------------------------------------------------------ payloads: tasks as values
    @property
    def has_head(self) -> bool:
        """Whether the model has a classifier head (``False``: a feature extractor, tasks have 0 classes)."""
        return self._modcl.head is not None

    def layer_table(self) -> LayerTable:
        """The layers a task's tensors describe (weight, norm and head shapes, feature size): what payloads are
        checked against, and what adapter folders record so they can be checked without a model."""
        from ..serving import prototype_dim
        st = self._modcl
        bn, affine = OrderedDict(), OrderedDict()
        for layer, m in st.norm_layers.items():
            if _tracks_stats(m):
                bn[layer] = tuple(m._buffers['running_mean'].shape)
            shapes = {k: tuple(m._buffers[k].shape) for k in ('weight', 'bias') if m._buffers.get(k) is not None}
            if shapes:
                affine[layer] = (shapes, _affine_norm(m))
        head = None
        if st.head is not None:
            head = {k: s[1:] for k, s in self._head_shapes(1).items()}
        return LayerTable(weights=self._weight_table(), bn_stats=bn, affine=affine, head=head,
                          feature_dim=prototype_dim(self))

    def task_payload(self, name: Optional[str] = None, *, head: bool = True, stats: bool = True) -> TaskPayload:
        """A task (default: the active one) as a ``TaskPayload``: its description and its tensors by flat name.

        The tensors are the task's own, detached (no copy): copy them before changing them.

        Args:
            name: The task.
            head: Include the head's tensors (only a Linear head is stored; other heads are made by the model).
            stats: Include the task's statistics (class prototypes).

        Raises:
            TaskNotFoundError: no such task.
            PayloadError: a tensor a loader would refuse (NaN or Inf values, negative variances, modulators beyond
                ``MAX_MODULATOR``).
        """
        task = self._task(self._modcl.active if name is None else name)
        keep_head = head and isinstance(task.head, nn.Linear)
        tensors = OrderedDict((k, v.detach()) for k, v in task.tensors(stats=stats).items()
                              if keep_head or not k.startswith('head.'))
        return TaskPayload(task.name, task.num_classes, task.config, tensors, task.class_names, task.metadata,
                           headless=task.num_classes > 0 and not keep_head)

    def task_info(self, name: Optional[str] = None) -> TaskInfo:
        """The ``TaskInfo`` of one task (default: the active one); ``model.tasks[name]`` without building the others'.

        Raises:
            TaskNotFoundError: no such task.
        """
        return self._task(self._modcl.active if name is None else name).info()

    def task_tensors(self, name: Optional[str] = None, *, stats: bool = False) -> 'OrderedDict[str, torch.Tensor]':
        """The live tensors of a task (default: the active one) by flat name, for in-place updates (restoring a
        checkpoint, broadcasting across processes): changing them changes the task.

        Raises:
            TaskNotFoundError: no such task.
        """
        return self._task(self._modcl.active if name is None else name).tensors(stats=stats)

    def task_statistics(self, name: Optional[str] = None) -> 'OrderedDict[str, torch.Tensor]':
        """A task's statistics (class prototypes, RanPAC moments, ...) by name: the live tensors (do not change
        them in place; use ``update_task_statistics``).

        Raises:
            TaskNotFoundError: no such task.
        """
        return OrderedDict(self._task(self._modcl.active if name is None else name).stats)

    def update_task_statistics(self, name: str, stats: Mapping[str, torch.Tensor], drop: Iterable[str] = ()) -> None:
        """Add or replace statistics of a task (and remove those named in ``drop``), validated as loading them from an
        adapter would (names, dtypes, finite values, prototype statistics complete and of this model's feature size);
        kept in their dtype, on the model's device.

        Raises:
            TaskNotFoundError: no such task.
            PayloadError: statistics a loader would refuse (the task is unchanged).
        """
        task = self._task(name)
        drop = [k for k in drop if k not in stats]
        merged = {k: v for k, v in dict(task.stats, **stats).items() if k not in drop}
        payload = TaskPayload(task.name, task.num_classes, task.config,
                              OrderedDict((f'stats.{k}', v.detach()) for k, v in merged.items()), task.class_names,
                              task.metadata)
        payload.check_statistics(self.layer_table().feature_dim)
        device = self._ref_tensor().device
        for k in drop:
            task.stats.pop(k, None)
        for k, v in stats.items():
            task.stats[k] = v.detach().to(device)

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The floating dtype of the frozen backbone (what task tensors are stored in)."""
        return self._ref_tensor().dtype

    @property
    def backbone_device(self) -> torch.device:
        """The device of the frozen backbone (where task tensors live)."""
        return self._ref_tensor().device

    def update_task_metadata(self, name: str, metadata: Mapping[str, Any]) -> Dict[str, str]:
        """Add or change entries of a task's free-form metadata (numbers and booleans stored as strings).

        Returns:
            The task's whole metadata.

        Raises:
            TaskNotFoundError: no such task.
            TaskError: metadata that ``add_task`` would refuse (the task is unchanged).
        """
        task = self._task(name)
        merged = validate_metadata(dict(task.metadata, **validate_metadata(metadata)))
        task.metadata = merged
        return dict(merged)

    def check_payload(self, payload: TaskPayload) -> None:
        """Check that ``payload`` fits this model exactly as ``load_payloads`` would, changing nothing.

        Raises:
            PayloadError: naming the problem.
        """
        self._task_from_payload(payload, fresh_head=False)

    def load_payloads(self, payloads: Sequence[TaskPayload], *, replace: bool = False, activate: bool = False
                      ) -> List[str]:
        """Add tasks from payloads, all or nothing: every payload is checked and built before the first is added.

        A headless payload (``payload.headless``) gets a fresh, untrained head.

        Args:
            payloads: The tasks.
            replace: Replace tasks of the same names instead of raising.
            activate: Make the last one the active task.

        Returns:
            The added task names.

        Raises:
            PayloadError: a payload that does not fit (missing, extra or wrongly shaped tensors, weights that
                overflow, statistics of another feature size), or ``base`` among the names.
            TaskExistsError: a task of that name exists (unless ``replace``), or a name given twice.
        """
        built: 'OrderedDict[str, TaskState]' = OrderedDict()
        for payload in payloads:
            if not isinstance(payload, TaskPayload):
                raise PayloadError(f'expected a TaskPayload, got {type(payload).__name__}')
            if payload.name == BASE_TASK:
                raise PayloadError(f'a task named {BASE_TASK!r} cannot be added (the name is reserved)')
            if payload.name in built or (payload.name in self._modcl.tasks and not replace):
                raise TaskExistsError(f'task {payload.name!r} already exists (pass replace=True, or load it under '
                                      f'another name)')
            built[payload.name] = self._task_from_payload(payload)
        for i, task in enumerate(built.values()):
            self._insert_task(task, activate=activate and i == len(built) - 1)
        return list(built)

    def _task_from_payload(self, payload: TaskPayload, fresh_head: bool = True) -> TaskState:
        """Build (but do not insert) a task from a payload checked against this model; nothing of the model (or the
        global random state) changes. The tensors are copied to the model's device and dtype.

        Raises:
            PayloadError: naming the problem.
        """
        payload.check(self.layer_table())
        name, config, tensors = payload.name, payload.config, payload.tensors
        ref = self._ref_tensor()

        def take(k: str) -> torch.Tensor:
            t = tensors[k].detach()
            if k.endswith('.num_batches_tracked'):
                return t.to(device=ref.device, dtype=torch.long).clone()
            return t.to(device=ref.device, dtype=ref.dtype).clone()

        modulators = OrderedDict((layer, nn.Parameter(take(f'modulator.{layer}'))) for layer in payload.modulators)
        with torch.no_grad():
            for layer, m in modulators.items():
                if not torch.isfinite(method_of(config).weight(self._modcl.weight_layers[layer], m)).all():
                    raise PayloadError(f'task {name!r}: modulator.{layer} makes the layer\'s weights overflow '
                                       f'{ref.dtype} (values up to {float(m.abs().max()):.3g})')
        norm_stats = OrderedDict((layer, {k: take(f'bn.{layer}.{k}') for k in s})
                                 for layer, s in payload.norm_stats.items())
        norm_affine = OrderedDict((layer, {k: nn.Parameter(take(f'norm.{layer}.{k}')) for k in a})
                                  for layer, a in payload.norm_affine.items())
        stats = OrderedDict((k, take(f'stats.{k}')) for k in payload.stats)
        head: nn.Module = nn.Identity()
        if self._modcl.head is not None and payload.num_classes > 0 and (fresh_head or not payload.headless):
            with torch.random.fork_rng(devices=[]):  # initialised (then overwritten): leave the global RNG alone
                head = self._new_head(payload.num_classes)
            if not payload.headless:
                with torch.no_grad():
                    for k, v in head.state_dict(keep_vars=True).items():
                        v.copy_(take(f'head.{k}'))
        return TaskState(name, payload.num_classes, head, config, modulators=modulators, norm_stats=norm_stats,
                         norm_affine=norm_affine, stats=stats, class_names=payload.class_names,
                         metadata=payload.metadata)
