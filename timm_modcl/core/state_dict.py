"""The state dict of a modulated model and what leaves the model (``StateDictMixin``): ``state_dict`` /
``load_state_dict`` (format 3 over the module tree, format 2 still loads, plain timm state dicts), loading as part of a
parent module, ``export_task`` (a plain timm model), scripting, and device / dtype moves.
"""
import copy
import json
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._io import load_json
from ..config import TaskConfig
from ..errors import PayloadError, StateDictError, TaskError
from ..layers import unmodulate_layer
from ..payload import TaskPayload
from ..task import BASE_TASK, BN_STATS, TaskState, table_name
from .scan import _prepare_compiled_call
from .state import TASKS_MODULE, _State

#: Version of the ``state_dict`` layout: PyTorch's own over the module tree (timm's keys for the backbone, the base
#: task's BatchNorm statistics and the bound task's head; ``modcl_tasks.<name>.<table>.<key>`` for every task's tensors)
#: plus ``modcl.meta``, a uint8 tensor holding the JSON task list. Format 2 (0.2: the active task under timm's keys,
#: the others under ``modcl.tasks.<name>.<flat name>``) still loads.
STATE_DICT_FORMAT = 3
_META_KEY = 'modcl.meta'
_TASKS_PREFIX = 'modcl.tasks.'   # format 2's task section
_MAX_META_BYTES = 64 * 1024 * 1024


def _json_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8).clone()


def _read_json_tensor(t: Any) -> Any:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 1 or t.numel() > _MAX_META_BYTES:
        raise StateDictError(f'{_META_KEY!r} must be a 1-D uint8 tensor of JSON text')
    return load_json(bytes(t.cpu().numpy().tobytes()), StateDictError, f'{_META_KEY!r}')


class StateDictMixin:
    """The state dict (save, validate, load), ``export_task`` and device / dtype moves of a modcl model (see the
    package docstring)."""

    _modcl: _State

    # ------------------------------------------------------------------ state dict
    def _natural_task_keys(self, task_meta: Mapping[str, Any], config: TaskConfig, prefix: str = ''
                           ) -> 'OrderedDict[str, str]':
        """Module-tree keys under which a task's tensors appear when it is active, mapped to its flat names."""
        st = self._modcl
        out: 'OrderedDict[str, str]' = OrderedDict()
        num_classes = task_meta.get('num_classes')
        num_classes = num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else 0
        for flat in self.layer_table().expected(config, max(num_classes, 0)):
            kind, _, rest = flat.partition('.')
            if kind == 'modulator':
                out[f'{prefix}{rest}.modulator'] = flat
            elif kind == 'bn':
                out[f'{prefix}{rest}'] = flat
            elif kind == 'norm':
                layer, _, which = rest.rpartition('.')
                out[f'{prefix}{layer}.task_{which}'] = flat
            elif kind == 'head':
                out[f'{prefix}{st.head}.{rest}'] = flat
        return out

    def _natural_keys(self, prefix: str = '') -> 'OrderedDict[str, str]':
        """Keys of the module tree that hold task state outside ``modcl_tasks``, mapped to flat names: the bound
        task's head (at the model's head path) and the BatchNorm statistics (the layers' own: the base task's)."""
        st = self._modcl
        out: 'OrderedDict[str, str]' = OrderedDict()
        for layer in self._stat_layers():
            for k in BN_STATS:
                out[f'{prefix}{layer}.{k}'] = f'bn.{layer}.{k}'
        if st.head is not None:
            for k in self._get_head().state_dict():
                out[f'{prefix}{st.head}.{k}'] = f'head.{k}'
        return out

    def state_dict(self, *args, destination=None, prefix: str = '', keep_vars: bool = False):
        """PyTorch's state dict of the module tree (the frozen backbone and the base task's BatchNorm statistics under
        timm's keys, the bound task's head at the head path, every task's tensors under
        ``modcl_tasks.<name>.<table>.<key>``), plus ``modcl.meta`` (a uint8 tensor of JSON describing the tasks).

        Tensors only, and no tensor appears twice, so ``safetensors.torch.save_file`` works. ``load_state_dict``
        recreates the tasks from it."""
        st = self._modcl
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        sd[prefix + _META_KEY] = _json_tensor({
            'format': STATE_DICT_FORMAT,
            'active': st.active,
            'tasks': [t.meta() for t in st.tasks.values()],
        })
        return sd

    def _plan_load(self, state_dict: Mapping[str, Any], prefix: str = ''
                   ) -> Optional[Tuple['OrderedDict[str, TaskState]', str, List[str]]]:
        """Validate the task section of a state dict (format 3, or format 2 of timm_modcl 0.2) and build its tasks,
        changing nothing.

        Returns ``None`` for a plain timm state dict (no task section), else ``(tasks, active name, keys of the
        state dict outside the task section that belong to tasks)``.
        """
        if prefix + _META_KEY not in state_dict:
            if any(k.startswith((prefix + _TASKS_PREFIX, prefix + TASKS_MODULE + '.')) for k in state_dict):
                raise StateDictError(f'state dict has task tensors but no {_META_KEY!r} entry')
            return None
        meta = _read_json_tensor(state_dict[prefix + _META_KEY])
        fmt = meta.get('format') if isinstance(meta, Mapping) else None
        if fmt not in (2, STATE_DICT_FORMAT):
            raise StateDictError(f'unsupported {_META_KEY!r} entry (expected format 2 or {STATE_DICT_FORMAT})')
        metas = meta.get('tasks')
        if not isinstance(metas, list) or not metas or not all(isinstance(m, Mapping) for m in metas):
            raise StateDictError(f'{_META_KEY!r} lists no tasks')
        names = [m.get('name') for m in metas]
        if names[0] != BASE_TASK or len(set(map(str, names))) != len(names):
            raise StateDictError(f'state dict tasks {names!r} must start with {BASE_TASK!r} and be unique')
        active = meta.get('active')
        if active not in names:
            raise StateDictError(f'active task {active!r} is not among the state dict tasks')
        grouped: Dict[str, Dict[str, Any]] = {n: {} for n in names}
        section = prefix + (TASKS_MODULE + '.' if fmt == STATE_DICT_FORMAT else _TASKS_PREFIX)
        for k, v in state_dict.items():
            if k.startswith(section):
                tname, _, rest = k[len(section):].partition('.')
                if tname not in grouped:
                    raise StateDictError(f'state dict has tensors of task {tname!r}, which {_META_KEY!r} does not list')
                if fmt == STATE_DICT_FORMAT:
                    table, _, key = rest.partition('.')
                    rest = rest if table == 'head' else f'{table}.{table_name(key)}'
                elif tname == active and not rest.startswith('stats.'):
                    raise StateDictError(f'the active task {tname!r} must be stored under the natural keys, found {k!r}')
                grouped[tname][rest] = v
        if fmt == STATE_DICT_FORMAT:
            natural = self._natural_keys(prefix)
            for key, flat in natural.items():
                owner = active if flat.startswith('head.') else BASE_TASK
                if key in state_dict:
                    grouped[owner][flat] = state_dict[key]
        else:
            active_meta = metas[names.index(active)]
            try:
                active_config = TaskConfig.from_dict(active_meta.get('config'))
            except TaskError as e:
                raise StateDictError(f'task {active!r}: {e}') from None
            natural = self._natural_task_keys(active_meta, active_config, prefix)
            for key, flat in natural.items():
                if key in state_dict:
                    grouped[active][flat] = state_dict[key]
        plan: 'OrderedDict[str, TaskState]' = OrderedDict()
        for m in metas:
            try:
                plan[m['name']] = self._task_from_payload(TaskPayload.from_meta(m, grouped[m['name']]))
            except PayloadError as e:
                raise StateDictError(str(e)) from None
        return plan, active, list(natural)

    def _install_tasks(self, tasks: 'OrderedDict[str, TaskState]', active: str) -> None:
        """Replace every task by ``tasks`` (built and checked by ``_plan_load``) and bind ``active``."""
        st = self._modcl
        tasks[BASE_TASK].move_stats_to_layers(self._stat_layers())   # the base task's statistics live in the layers
        st.tasks.clear()
        for name, task in tasks.items():
            task.set_trainable(False)
            task.train(self.training)
            st.task_dict[name] = task
        st.cache.clear()
        st.cache.bound = None
        self._bind(active)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a state dict written by ``state_dict()`` (format 3, or format 2 of timm_modcl 0.2: replacing all tasks
        by the saved ones and binding the saved active task), or a plain timm state dict of the same architecture
        (loaded into the frozen backbone and the bound task's norm statistics, affine and head; its modulators are
        kept).

        Everything is validated first: on error nothing changes.

        Raises:
            StateDictError: if the state dict does not fit (other width or architecture, bad task section, missing
                or unexpected keys when ``strict``).
        """
        if assign:
            raise StateDictError('load_state_dict(assign=True) is not supported by modcl models')
        if not isinstance(state_dict, Mapping):
            raise StateDictError(f'expected a mapping of names to tensors, got {type(state_dict).__name__}')
        st = self._modcl
        own = super().state_dict(keep_vars=True)
        natural = self._natural_keys()
        task_keys = {k for k in own if k.startswith(TASKS_MODULE + '.')}
        frozen_keys = set(own) - task_keys - set(natural)
        # the backbone first: the clearest message for another width
        self._check_shapes(state_dict, {k: own[k] for k in frozen_keys})
        plan = self._plan_load(state_dict)
        given = {k for k in state_dict if not k.startswith(('modcl.', TASKS_MODULE + '.'))}
        if plan is not None:
            expected = frozen_keys | set(plan[2])
        else:
            self._check_shapes(state_dict, own)
            expected = frozen_keys | set(natural)
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if strict and (missing or unexpected):
            raise StateDictError(f'state dict keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}')
        if plan is not None:
            self._install_tasks(plan[0], plan[1])
            rest = {k: v for k, v in state_dict.items() if k in frozen_keys}
        else:
            rest = {k: v for k, v in state_dict.items() if k in frozen_keys or k in natural}
            bound = st.tasks[st.active]
            if st.active != BASE_TASK:  # the statistics of a plain model are the bound task's
                live = bound.tensors(stats=False)
                with torch.no_grad():
                    for key, flat in natural.items():
                        if flat.startswith('bn.') and key in rest:
                            live[flat].copy_(rest.pop(key))
        self.__dict__['_modcl_loading'] = True
        try:
            super().load_state_dict(rest, strict=False)
        finally:
            del self.__dict__['_modcl_loading']
        if plan is None:  # a plain model's affine is the task's affine: give it to the bound task
            with torch.no_grad():
                for layer, affine in st.tasks[st.active].norm_affine.items():
                    for k, p in affine.items():
                        if f'{layer}.{k}' in state_dict:
                            p.copy_(st.norm_layers[layer]._buffers[k])
        from torch.nn.modules.module import _IncompatibleKeys
        return _IncompatibleKeys(missing, unexpected)

    def _check_shapes(self, state_dict: Mapping[str, Any], own: Mapping[str, torch.Tensor]) -> None:
        mismatched = []
        for k, v in state_dict.items():
            if k in own and own[k] is not None:
                if not isinstance(v, torch.Tensor):
                    raise StateDictError(f'{k!r} is not a tensor')
                if tuple(v.shape) != tuple(own[k].shape):
                    mismatched.append(f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}')
        if mismatched:
            raise StateDictError(
                f'state dict does not fit this model ({len(mismatched)} shape mismatches, e.g. a different width): '
                + '; '.join(mismatched[:3]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # loaded as part of a parent module (our own load_state_dict has done the tasks): build and install them here
        if not self.__dict__.get('_modcl_loading'):
            plan = self._plan_load(state_dict, prefix)
            if plan is not None:
                self._install_tasks(plan[0], plan[1])
                for k in plan[2]:
                    state_dict.pop(k, None)
                for k in [k for k in state_dict if k.startswith(prefix + TASKS_MODULE + '.')]:
                    del state_dict[k]
        for k in [k for k in state_dict if k.startswith(prefix + 'modcl.')]:
            del state_dict[k]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ export
    def export_task(self, name: Optional[str] = None) -> nn.Module:
        """A plain timm model (the original class, no timm_modcl needed) computing one task (default: the active one).

        The task's modulation is folded into ordinary weights, its norm statistics and affine become the norm
        layers' own, and its head becomes the classifier; every tensor is a trainable parameter again. Outputs are
        equal to the task's (up to float rounding); the copy is independent of this model.

        Raises:
            TaskNotFoundError: if there is no such task.
        """
        st = self._modcl
        task = self._task(st.active if name is None else name)
        with self.use_task(task.name):
            memo = {id(st): None, id(st.cache): None, id(st.task_dict): None}
            for layer in list(st.weight_layers.values()) + list(st.norm_layers.values()):
                memo[id(layer)] = unmodulate_layer(layer, copy=True)   # the task folded in, a plain layer
            plain = copy.deepcopy(self, memo)
        for k in [k for k, h in plain._forward_pre_hooks.items() if h is _prepare_compiled_call]:
            del plain._forward_pre_hooks[k]
        for module_name, k in st.extra_frozen:
            module = plain.get_submodule(module_name)
            module._parameters[k] = nn.Parameter(module._buffers.pop(k))
        del plain.__dict__['_modcl']
        plain._modules.pop('_modcl_frozen', None)
        plain._modules.pop(TASKS_MODULE, None)
        plain.__class__ = st.plain_class
        for p in plain.parameters():
            p.requires_grad_(True)
        cfg = getattr(plain, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            arch = str(cfg.get('architecture', ''))
            plain.pretrained_cfg = dict(cfg, architecture=arch[len('modcl_'):] if arch.startswith('modcl_') else arch,
                                        modcl_task=task.name)
            if hasattr(plain, 'default_cfg'):
                plain.default_cfg = plain.pretrained_cfg
        return plain

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script(model)`` scripts the active task as a plain timm model (``export_task``)."""
        return self.export_task()

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn, recurse: bool = True):
        """PyTorch's ``_apply`` (every task's tensors are in the module tree); then the weight cache and the
        fingerprint, which describe the old tensors, are cleared."""
        super()._apply(fn, recurse)
        if not recurse:
            return self
        st = self._modcl
        holders = self._modules.get('_modcl_frozen')
        if holders is not None:
            for k, holder in holders.items():
                holder._buffers['tensor'] = self._buffers[k]
        st.cache.clear()
        st.fingerprint = None
        return self
