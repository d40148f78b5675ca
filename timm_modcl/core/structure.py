"""timm's structural methods of a modulated model (``TimmStructureMixin``): ``forward_head`` (a scoped task's head),
``group_matcher`` (task tensors grouped with their layers), ``reset_classifier``, ``set_input_size``,
``prune_intermediate_layers`` and ``no_weight_decay``, each keeping the tasks in step with the structure.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..errors import FrozenBackboneError, TaskError
from ..layers import scoped_task
from ..payload import MAX_CLASSES
from ..task import BASE_TASK, table_name
from .state import TASKS_MODULE, _check_head, _fx_tracing, _State


class TimmStructureMixin:
    """timm's structural methods (wrapped by ``modcl_class`` where the timm class has them), kept in step with the
    tasks (see the package docstring)."""

    _modcl: _State

    def _modcl_forward_head(self, x, *args, **kwargs):
        """timm's ``forward_head``; inside a ``task_scope`` of another task than the bound one, its head classifies
        the pre-logits features (every timm head computes ``classifier(forward_head(x, pre_logits=True))``)."""
        if not torch.compiler.is_compiling() and not torch.jit.is_scripting():
            task = scoped_task(self._modcl.cache)
            if (task is not None and self._modcl.head is not None and task.head is not self._get_head()
                    and not (args and args[0]) and not kwargs.get('pre_logits', False)):
                return task.head(self._modcl.plain_class.forward_head(self, x, *args, **dict(kwargs, pre_logits=True)))
        if _fx_tracing():  # an identity call: the traced graph module then holds the tasks its layers read
            x = self._modules[TASKS_MODULE](x)
        return self._modcl.plain_class.forward_head(self, x, *args, **kwargs)

    def _modcl_group_matcher(self, coarse: bool = False):
        """timm's ``group_matcher`` (layer-wise learning-rate decay, ``group_parameters``) for task tensors: each
        is grouped with the layer it belongs to (``modcl_tasks.<task>.modulator.blocks/0/0/conv`` with
        ``blocks.0.0.conv.weight``), by a matcher callable."""
        from timm.models._manipulate import group_with_matcher
        st = self._modcl
        matcher = st.plain_class.group_matcher(self, coarse=coarse)
        natural = {n: self._natural_param_name(n) for n, _ in self.named_parameters(remove_duplicate=False)}
        natural.update((n, n) for n, _ in self.named_buffers(remove_duplicate=False))
        ids = group_with_matcher(((n, None) for n in dict.fromkeys(natural.values())), matcher, reverse=True)
        last = max(ids.values(), default=0) + 1
        return lambda name: ids.get(natural.get(name, name), last)

    def _natural_param_name(self, name: str) -> str:
        """The timm name of the layer tensor a task tensor belongs to (other names unchanged)."""
        if not name.startswith(TASKS_MODULE + '.'):
            return name
        _, _, rest = name.partition('.')
        _, _, rest = rest.partition('.')           # the task name
        table, _, key = rest.partition('.')
        if table == 'modulator':
            return table_name(key) + '.weight'
        if table in ('norm', 'bn'):
            return table_name(key)
        if table == 'head' and self._modcl.head is not None:
            return f'{self._modcl.head}.{key}'
        return name

    # ------------------------------------------------------------------ timm methods that change the structure
    def _modcl_reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, *args, **kwargs) -> None:
        """timm's head reset, applied to the active task's head.

        Raises:
            TaskError: for a bad ``num_classes``, or a new ``global_pool`` once the model has tasks beside ``'base'``
                (the pooling is shared by every task: changing it would change their outputs).
        """
        st = self._modcl
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= MAX_CLASSES:
            raise TaskError(f'num_classes must be an integer from 0 to {MAX_CLASSES:,}, got {num_classes!r}')
        if global_pool is not None and len(st.tasks) > 1:
            raise TaskError(f'reset_classifier(global_pool={global_pool!r}) would change the pooling of every task '
                            f'({", ".join(st.tasks)}); choose the pooling before adding tasks')
        if global_pool is None:  # keep the class's own default (timm keeps the current pooling)
            st.plain_class.reset_classifier(self, num_classes, *args, **kwargs)
        else:
            st.plain_class.reset_classifier(self, num_classes, global_pool, *args, **kwargs)
        task = st.tasks[st.active]
        if st.head is not None:
            head = self._get_head()
            _check_head(head, st.head)
            task.head = head
            task.num_classes = int(num_classes)
            if task.class_names is not None and len(task.class_names) != num_classes:
                task.class_names = None
        self._modcl_scan()

    def _refuse_structural_change(self, what: str) -> None:
        st = self._modcl
        learned = [n for n in st.tasks if n != BASE_TASK]
        if learned:
            raise FrozenBackboneError(
                f'{what} would change the layers that the tasks {", ".join(map(repr, learned[:5]))} were learned on '
                f'(their modulators and norm state describe the current layers); call it before adding tasks, or on '
                f'a plain model from export_task(name)')

    def _modcl_set_input_size(self, *args, **kwargs):
        """timm's ``set_input_size``. A new input size resamples the frozen, shared position embedding and is allowed
        at any time; a new ``patch_size`` resamples a modulated weight and is refused once tasks exist.

        Raises:
            FrozenBackboneError: ``patch_size`` given once tasks beside ``'base'`` exist (nothing changes).
        """
        patch_size = kwargs.get('patch_size', args[1] if len(args) > 1 else None)
        if patch_size is not None:
            self._refuse_structural_change(f'set_input_size(patch_size={patch_size!r})')
        out = self._modcl.plain_class.set_input_size(self, *args, **kwargs)
        self._modcl_scan()  # a resized position embedding is a new Parameter: freeze it again
        return out

    def _modcl_prune_intermediate_layers(self, *args, **kwargs):
        """timm's ``prune_intermediate_layers``, before tasks exist.

        Raises:
            FrozenBackboneError: once tasks beside ``'base'`` exist (nothing changes).
        """
        self._refuse_structural_change('prune_intermediate_layers()')
        out = self._modcl.plain_class.prune_intermediate_layers(self, *args, **kwargs)
        st = self._modcl
        if st.head is not None and (not self._has_module(st.head) or isinstance(self._get_head(), nn.Identity)):
            st.head = None  # the head was pruned: the model is a feature extractor now, for every task
            for task in st.tasks.values():
                task.head, task.num_classes = nn.Identity(), 0
        self._modcl_scan()
        return out

    def _modcl_no_weight_decay(self):
        """timm's no-weight-decay names, restricted to what is still a parameter (frozen tensors are buffers)."""
        names = {n for n, _ in self.named_parameters()}
        import fnmatch
        return {p for p in self._modcl.plain_class.no_weight_decay(self) if any(fnmatch.fnmatch(n, p) for n in names)}

    def _has_module(self, path: str) -> bool:
        try:
            self.get_submodule(path)
            return True
        except AttributeError:
            return False
