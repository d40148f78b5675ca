"""Layering: no module of timm_modcl reaches into another module's private members (issue 16, item 6).

The test reads the package's source with ``ast``: every private name (``_x``, not a dunder) that a module defines
(functions, methods, classes, module globals, attributes it assigns, class-level annotations) belongs to that module.
An attribute access ``obj._x`` on anything but ``self`` / ``cls`` / ``super()`` in a module that does not define
``_x`` itself reaches into another module's internals: the protocol between modules must be public (documented)
methods and functions instead. Names of ``torch.nn.Module``'s own protected API (``_parameters``, ``_buffers``,
``_apply``, ...) belong to PyTorch, not to a timm_modcl module, and are not counted.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import torch.nn as nn

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_modcl'

#: Known reaches still to remove (issue 16): each entry is a module path relative to the package, or
#: ``(path, function)`` for one function of it; the stale-entry test below fails once an entry is clean.
ALLOWED: Set = {
    ('scorers/decoding.py', 'decoded'),          # core's _task (per-call hot path: TaskInfo costs about 44 us a task)
    ('scorers/classes.py', 'predict_classes'),   # serving's _check_batch / _candidates, core's _modcl (class names)
    ('serving/prototypes.py', 'prototype_dim'),  # core's _modcl (per prediction: model.tasks builds every TaskInfo)
}
#: Modules that must be clean now (the brief of the payload branch), whatever the allowlist says.
MUST_BE_CLEAN = ('core/', 'adapter/', 'checkpoint/', 'hub/', 'task.py', 'payload.py')   # a folder: every module in it
MUST_BE_CLEAN_FUNCTIONS = (('cli/share.py', 'cmd_push'), ('cli/share.py', 'cmd_pull'), ('cli/share.py', 'cmd_merge'),
                           ('cli/tasks.py', 'cmd_info'))

#: Issue 16: modules of about 400 lines at most, each with one job. No module may be longer than ``MAX_LINES``, except
#: the ones still to split, each at most its size when this list was written; the stale-entry test below fails once
#: one is short enough, so the list can only shrink.
MAX_LINES = 450
TOO_LONG = {
    'payload.py': 451,   # TaskPayload and LayerTable (left for after the core rework, which changes TaskPayload too)
}

_TORCH_NAMES = {n for n in set(dir(nn.Module)) | set(dir(nn.Module())) if n.startswith('_')}


def _private(name: str) -> bool:
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


def _modules() -> Dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob('*.py'))}


def _target_names(target: ast.expr) -> Set[str]:
    """Names an assignment target binds: ``x``, ``obj.x`` (not what ``obj`` itself is made of), tuples of them."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, ast.Attribute):
        return {target.attr}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*map(_target_names, target.elts)) if target.elts else set()
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return set()


def _defined(tree: ast.Module) -> Set[str]:
    """The private names a module defines."""
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                out |= _target_names(t)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'setattr' \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            out.add(node.args[1].value)
    return {n for n in out if _private(n)}


def _own_object(value: ast.expr) -> bool:
    if isinstance(value, ast.Name) and value.id in ('self', 'cls'):
        return True
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == 'super'


def _violations() -> List[Tuple[str, str, int, str]]:
    """``(module, enclosing function, line, expression)`` of every reach into another module's private member."""
    trees = _modules()
    defined = {path: _defined(tree) for path, tree in trees.items()}
    package_private = set().union(*defined.values()) - _TORCH_NAMES
    out = []
    for path, tree in trees.items():
        own = defined[path]

        def visit(node: ast.AST, func: str) -> None:
            for child in ast.iter_child_nodes(node):
                name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and func == '' \
                    else func
                if isinstance(child, ast.ClassDef):
                    name = ''
                if isinstance(child, ast.Attribute) and _private(child.attr) and child.attr in package_private \
                        and child.attr not in own and not _own_object(child.value):
                    out.append((path, func, child.lineno, ast.unparse(child)))
                visit(child, name)
        visit(tree, '')
    return out


def _allowed(path: str, func: str) -> bool:
    return any(path == a or path.startswith(a) if isinstance(a, str) else (path, func) == a for a in ALLOWED)


def test_the_checker_finds_a_reach_into_another_module(tmp_path):
    tree = ast.parse('def f(model):\n    return model._task("a")\n')
    found = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)
             and not _own_object(n.value)]
    assert [ast.unparse(n) for n in found] == ['model._task']
    assert '_task' in _defined(_modules()['core/lifecycle.py'])   # core owns it: other modules may not call it
    assert '_apply' not in set().union(*map(_defined, _modules().values())) - _TORCH_NAMES


def test_no_module_reaches_into_another_modules_private_members():
    bad = [v for v in _violations() if not _allowed(v[0], v[1])]
    listed = '\n'.join(f'  timm_modcl/{p}:{line} in {f or "<module>"}: {expr}' for p, f, line, expr in bad)
    assert not bad, f'{len(bad)} reach(es) into another module\'s private members:\n{listed}'


def test_the_payload_modules_and_cli_commands_are_clean_without_the_allowlist():
    assert all((PACKAGE / m).exists() for m in MUST_BE_CLEAN), 'a module of MUST_BE_CLEAN moved: re-point it'
    bad = [v for v in _violations()
           if v[0] in MUST_BE_CLEAN or v[0].startswith(tuple(m for m in MUST_BE_CLEAN if m.endswith('/')))
           or (v[0], v[1]) in MUST_BE_CLEAN_FUNCTIONS]
    assert not bad, bad
    assert all(not (isinstance(a, str) and a in MUST_BE_CLEAN) for a in ALLOWED)


def test_the_allowlist_has_no_stale_entries():
    found = {(p, f) for p, f, _, _ in _violations()}
    for a in ALLOWED:
        if isinstance(a, str):
            assert any(p == a or p.startswith(a) for p, _ in found), f'{a} is clean now: remove it from ALLOWED'
        else:
            assert a in found, f'{a} is clean now: remove it from ALLOWED'


def _line_counts() -> Dict[str, int]:
    return {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob('*.py'))}


def test_no_module_is_longer_than_the_limit():
    long = {p: n for p, n in _line_counts().items() if n > TOO_LONG.get(p, MAX_LINES)}
    listed = '\n'.join(f'  timm_modcl/{p}: {n} lines (limit {TOO_LONG.get(p, MAX_LINES)})' for p, n in long.items())
    assert not long, f'{len(long)} module(s) too long; split them by job:\n{listed}'


def test_the_line_allowlist_has_no_stale_entries():
    counts = _line_counts()
    for p in TOO_LONG:
        assert p in counts, f'timm_modcl/{p} is gone: remove it from TOO_LONG'
        assert counts[p] > MAX_LINES, f'timm_modcl/{p} has {counts[p]} lines: remove it from TOO_LONG'
