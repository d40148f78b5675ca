"""Checks shared by every modcl model (a PEFT-style common tester).

A test class mixes ``ModCLTester`` in and sets ``model_name`` (plus ``model_kwargs`` / ``input_size``, and ``method``
for the method axis: ``'modulation'`` or ``'lora'``). Every check builds the same three tasks with different
configurations (default; paper variant at (2, 2) with per-task BatchNorm affine; (8, 8) with the first layer
unmodulated; with ``method='lora'``: default rank, rank 2 with BN affine, rank 8 with the first layer left out),
trains each a little, and then asserts zero forgetting, round trips
(state dict, safetensors, adapter files and folders, Hub) with bit-identical logits, export to a plain timm model,
TorchScript and device/dtype moves.
"""
import pytest
import torch

import timm
from timm_modcl import BASE_TASK


class ModCLTester:
    model_name = 'modcl_mobilenetv2_050'
    model_kwargs: dict = {}
    input_size = 32
    atol = 1e-5
    method = 'modulation'

    # ------------------------------------------------------------------ helpers
    def make_model(self, seed: int = 0):
        torch.manual_seed(seed)  # same seed: same random backbone, same fingerprint
        return timm.create_model(self.model_name, pretrained=False, **self.model_kwargs).eval()

    def x(self, n: int = 2):
        return torch.randn(n, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(3))

    def task_specs(self, model):
        first = model.modulated_layers[0]
        if self.method == 'lora':
            return (
                ('alpha', 3, dict(method='lora', class_names=['a', 'b', 'c'], metadata={'metric.val_acc': 0.5})),
                ('beta', 5, dict(method='lora', rank=2, bn_affine=True)),
                ('gamma', 2, dict(method='lora', rank=8, layer_resolution={first: None})),
            )
        return (
            ('alpha', 3, dict(class_names=['a', 'b', 'c'], metadata={'metric.val_acc': 0.5})),
            ('beta', 5, dict(resolution=(2, 2), variant='paper', bn_affine=True)),
            ('gamma', 2, dict(resolution=(8, 8), layer_resolution={first: None})),
        )

    @staticmethod
    def step(model, x, lr=0.05):
        """One training step of the active task (train mode: its BN statistics move too)."""
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        y = torch.arange(x.shape[0]) % model.num_classes
        torch.nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # random backbones at 32 px: huge gradients
        opt.step()
        opt.zero_grad()
        model.eval()

    def trained_model(self):
        model = self.make_model()
        x = self.x()
        for name, k, kw in self.task_specs(model):
            model.add_task(name, k, **kw)
            self.step(model, x)
        return model.eval()

    @staticmethod
    def logits(model, x, task):
        with torch.no_grad(), model.use_task(task):
            return model(x)

    def all_logits(self, model, names=None):
        x = self.x()
        return {n: self.logits(model, x, n) for n in (names or list(model.tasks))}

    def assert_same_tasks(self, a, b, names=('alpha', 'beta', 'gamma')):
        x = self.x()
        for n in names:
            assert torch.equal(self.logits(a, x, n), self.logits(b, x, n)), n
            assert a.tasks[n] == b.tasks[n], n

    # ------------------------------------------------------------------ invariants
    def test_only_the_active_task_is_trainable(self):
        model = self.trained_model()
        for name in model.tasks:
            model.set_task(name)
            params = [p for p in model.parameters() if p.requires_grad]
            assert {id(p) for p in params} == {id(p) for p in model.task_parameters(name)}, name
            # every task's tensors are in the module tree (what DDP and optimizers capture), the others frozen
            assert {id(p) for p in model.parameters()} >= {id(p) for n in model.tasks for p in model.task_parameters(n)}
        assert not any(t.requires_grad for t in model.frozen_tensors().values())
        others = {id(p) for n in model.tasks if n != 'gamma' for p in model.task_parameters(n)}
        model.set_task('gamma')
        assert not others & {id(p) for p in model.parameters() if p.requires_grad}

    def test_zero_forgetting_after_training_another_task(self):
        model = self.trained_model()
        ref = self.all_logits(model)
        model.set_task('beta')
        for _ in range(3):
            self.step(model, self.x(4))
        after = self.all_logits(model)
        assert not torch.equal(after['beta'], ref['beta'])  # the trained task moved...
        for n in ref:
            if n != 'beta':
                assert torch.equal(after[n], ref[n]), n   # ...nothing else did, to the bit

    def test_base_task_is_the_plain_model(self):
        model = self.make_model()
        plain = timm.create_model(self.model_name[len('modcl_'):], pretrained=False, **self.model_kwargs).eval()
        plain.load_state_dict(model.export_task(BASE_TASK).state_dict())
        x = self.x()
        with torch.no_grad():
            expected = plain(x)
        model.add_task('other', 3)
        self.step(model, x)
        assert torch.equal(self.logits(model, x, BASE_TASK), expected)

    def plain_model(self, seed: int = 0):
        torch.manual_seed(seed)
        return timm.create_model(self.model_name[len('modcl_'):], pretrained=False, **self.model_kwargs).eval()

    def test_every_accepted_head_keeps_base(self):
        """Zero forgetting of ``base`` for every ``head=`` that ``modulate`` accepts ('auto', the classifier's path,
        None), and a clear refusal (model untouched) for a weight layer that is not the classifier: timm's
        ``reset_classifier`` would replace the real classifier while the named module stayed shared by all tasks."""
        from timm_modcl import UnsupportedModelError, modulate
        probe = self.make_model()
        classifier = probe.head_name
        others = [n for n in (probe.modulated_layers[0], probe.modulated_layers[-1]) if n != classifier]
        x = self.x()
        for head in ('auto', classifier, None):
            plain = self.plain_model()
            with torch.no_grad():
                expected = plain(x)
            model = modulate(plain, head=head)
            model.add_task('t', 0 if head is None else 3)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for _ in range(2):
                model(x).float().pow(2).mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            model.eval()
            assert torch.equal(self.logits(model, x, BASE_TASK), expected), head
            assert not {id(p) for p in model.task_parameters('t')} & {id(p) for p in model.task_parameters(BASE_TASK)}
        for head in others:
            plain = self.plain_model()
            with pytest.raises(UnsupportedModelError, match="not the model's classifier"):
                modulate(plain, head=head)
            assert not hasattr(plain, '_modcl') and any(p.requires_grad for p in plain.parameters()), head

    # ------------------------------------------------------------------ round trips
    def test_roundtrip_state_dict(self, tmp_path):
        from safetensors.torch import load_model, save_model
        model = self.trained_model()
        sd = model.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        fresh = self.make_model(seed=1)
        fresh.load_state_dict(sd)
        self.assert_same_tasks(model, fresh)
        assert fresh.active_task == model.active_task
        save_model(model, str(tmp_path / 'model.safetensors'))
        other = self.make_model(seed=2)
        load_model(other, str(tmp_path / 'model.safetensors'))
        self.assert_same_tasks(model, other)

    def test_roundtrip_adapter_files(self, tmp_path):
        model = self.trained_model()
        fresh = self.make_model()
        for n in ('alpha', 'beta', 'gamma'):
            fresh.load_task(model.save_task(n, tmp_path / f'{n}.safetensors'))
        self.assert_same_tasks(model, fresh)
        assert fresh.tasks['beta'].config == model.tasks['beta'].config
        assert fresh.tasks['alpha'].metadata == {'metric.val_acc': '0.5'}

    def test_roundtrip_adapter_folder_and_create_model(self, tmp_path):
        model = self.trained_model()
        model.save_tasks(tmp_path / 'adapters')
        fresh = self.make_model()
        assert fresh.load_tasks(tmp_path / 'adapters') == ['alpha', 'beta', 'gamma']
        self.assert_same_tasks(model, fresh)
        torch.manual_seed(0)
        created = timm.create_model(self.model_name, adapters=tmp_path / 'adapters', **self.model_kwargs).eval()
        self.assert_same_tasks(model, created)

    def test_roundtrip_rename_on_load(self, tmp_path):
        model = self.trained_model()
        path = model.save_task('alpha', tmp_path / 'alpha.safetensors')
        fresh = self.make_model()
        fresh.load_task(path, name='alpha2', activate=True)
        assert fresh.active_task == 'alpha2'
        x = self.x()
        assert torch.equal(self.logits(fresh, x, 'alpha2'), self.logits(model, x, 'alpha'))

    def test_roundtrip_hub(self, hub, tmp_path):
        model = self.trained_model()
        repo = f'alice/{self.model_name}'
        model.push_tasks_to_hub(repo, ['beta', 'gamma'], token=hub.alice, endpoint=hub.url)
        fresh = self.make_model()
        assert fresh.load_tasks_from_hub(repo, endpoint=hub.url, cache_dir=tmp_path / 'c') == ['beta', 'gamma']
        self.assert_same_tasks(model, fresh, ['beta', 'gamma'])

    # ------------------------------------------------------------------ export, scripting, moves
    def test_export_to_plain_timm_model(self):
        model = self.trained_model()
        base_cls = type(timm.create_model(self.model_name[len('modcl_'):], pretrained=False, **self.model_kwargs))
        x = self.x()
        for n in ('alpha', 'beta', 'gamma'):
            plain = model.export_task(n).eval()
            assert type(plain) is base_cls
            assert all(p.requires_grad for p in plain.parameters())
            with torch.no_grad():
                assert torch.allclose(plain(x), self.logits(model, x, n), atol=self.atol, rtol=1e-4), n
            fresh = timm.create_model(self.model_name[len('modcl_'):], pretrained=False,
                                      num_classes=model.tasks[n].num_classes, **self.model_kwargs).eval()
            fresh.load_state_dict(plain.state_dict())  # loadable by plain timm, without timm_modcl
        self.assert_same_tasks(model, model)  # exporting changed nothing

    def test_torchscript_scripts_the_active_task(self):
        model = self.trained_model()
        model.set_task('beta')
        scripted = torch.jit.script(model)
        x = self.x()
        with torch.no_grad():
            assert torch.allclose(scripted(x), model(x), atol=self.atol, rtol=1e-4)
        assert model.active_task == 'beta' and 'gamma' in model.tasks

    def test_dtype_moves_keep_every_task(self):
        model = self.trained_model()
        ref = self.all_logits(model)
        model.double().float()
        after = self.all_logits(model)
        for n in ref:
            assert torch.equal(after[n], ref[n]), n
        model.set_task('alpha')
        assert {id(p) for p in model.parameters() if p.requires_grad} == {
            id(p) for p in model.task_parameters('alpha')}
