"""Round-trip checks shared by every modcl model (PEFT-style test mixin).

A test class mixes ``RoundTripChecks`` in and sets ``model_name``; every check builds tasks, saves them one way,
restores them into a freshly created model with the same backbone and asserts bit-identical logits (fp32).
"""
import torch

import timm


class RoundTripChecks:
    model_name = 'modcl_mobilenetv2_050'
    input_size = 32

    def make_model(self, seed: int = 0):
        torch.manual_seed(seed)  # same seed: same random backbone, same fingerprint
        return timm.create_model(self.model_name, pretrained=False).eval()

    def x(self):
        return torch.randn(2, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(3))

    def trained_model(self):
        model = self.make_model()
        model.add_task('alpha', 3, (4, 4), class_names=['a', 'b', 'c'], metadata={'metric.val_acc': '0.5'})
        model.add_task('beta', 5, (2, 2), variant='identity')
        model.add_task('gamma', 2, (8, 8), layer_resolution={'conv_stem': None})
        model.train()
        x = self.x()
        for name in ('alpha', 'beta', 'gamma'):  # a forward in train mode changes BN stats, a step the modulators
            model.set_task(name)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        return model.eval()

    @staticmethod
    def logits(model, x, task):
        with torch.no_grad(), model.use_task(task):
            return model(x)

    def assert_same_tasks(self, a, b, names=('alpha', 'beta', 'gamma')):
        x = self.x()
        for n in names:
            assert torch.equal(self.logits(a, x, n), self.logits(b, x, n)), n
            assert a.tasks[n] == b.tasks[n], n

    def test_roundtrip_state_dict(self):
        model = self.trained_model()
        fresh = self.make_model(seed=1)
        fresh.load_state_dict(model.state_dict())
        self.assert_same_tasks(model, fresh)

    def test_roundtrip_adapter_files(self, tmp_path):
        model = self.trained_model()
        fresh = self.make_model()
        for n in ('alpha', 'beta', 'gamma'):
            path = model.save_task(n, tmp_path / f'{n}.safetensors')
            fresh.load_task(path)
        self.assert_same_tasks(model, fresh)

    def test_roundtrip_adapter_folder_and_create_model(self, tmp_path):
        model = self.trained_model()
        model.save_tasks(tmp_path / 'adapters')
        fresh = self.make_model()
        assert fresh.load_tasks(tmp_path / 'adapters') == ['alpha', 'beta', 'gamma']
        self.assert_same_tasks(model, fresh)
        torch.manual_seed(0)
        created = timm.create_model(self.model_name, adapters=tmp_path / 'adapters').eval()
        self.assert_same_tasks(model, created)

    def test_roundtrip_rename_on_load(self, tmp_path):
        model = self.trained_model()
        path = model.save_task('alpha', tmp_path / 'alpha.safetensors')
        fresh = self.make_model()
        fresh.load_task(path, name='alpha2', activate=True)
        assert fresh.active_task == 'alpha2'
        x = self.x()
        assert torch.equal(self.logits(fresh, x, 'alpha2'), self.logits(model, x, 'alpha'))
