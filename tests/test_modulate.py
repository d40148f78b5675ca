"""``timm_modcl.modulate(model)`` on ordinary timm models: nothing of the original stays trainable and shared."""
import pytest
import torch
import torch.nn as nn

import timm
import timm_modcl
from timm_modcl import BASE_TASK, UnsupportedModelError


@pytest.mark.parametrize('name, kwargs', [
    ('resnet18', {}),                       # 0.1 would have left fc (513,000 values) shared and trainable
    ('convnext_atto', {}),                  # LayerNorms, layer-scale gammas and MLP Linears
    ('vit_tiny_patch16_224', dict(img_size=32)),  # 5.5 M values: qkv/proj/fc Linears, tokens, LayerNorms
    ('tf_efficientnet_b0', {}),             # Conv2dSame convs
])
def test_modulate_plain_timm_model(name, kwargs):
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
    model = timm_modcl.modulate(plain)
    assert model is plain and timm_modcl.is_modcl_model(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # the base task is the model as it was
    model.add_task('t', 3)
    # the invariant: trainable tensors are exactly the active task's
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.task_parameters('t')}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), model.use_task(BASE_TASK):
        assert torch.equal(model(x), expected)


def test_modulate_finds_layers_head_and_frozen_parameters():
    model = timm_modcl.modulate(timm.create_model('vit_tiny_patch16_224', img_size=32))
    assert model.head_name == 'head'
    layers = model.modulated_layers
    assert 'patch_embed.proj' in layers and 'blocks.0.attn.qkv' in layers and 'head' not in layers
    assert model.get_submodule('blocks.0.attn.qkv').modcl_chunks == 3
    assert {'cls_token', 'pos_embed'} <= set(model.frozen_tensors())
    assert all(not p.requires_grad for p in model.frozen_tensors().values())
    convnext = timm_modcl.modulate(timm.create_model('convnext_atto'))
    assert convnext.head_name == 'head.fc' and 'head.norm' in convnext.norm_layers
    assert 'stages.0.blocks.0.gamma' in convnext.frozen_tensors()


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.scale = nn.Parameter(torch.ones(16, 1, 1))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean((2, 3)))


def test_unknown_parameter_owner_is_an_error_with_a_way_out():
    model = _Custom()
    with pytest.raises(UnsupportedModelError, match=r"scale \(_Custom\).*freeze=\['scale'\]"):
        timm_modcl.modulate(model, head='fc')
    assert type(model) is _Custom and isinstance(model.scale, nn.Parameter)  # unchanged
    timm_modcl.modulate(model, head='fc', freeze=['scale'])
    assert 'scale' in model._buffers and not any(p is model.scale for p in model.parameters())
    model.add_task('t', 2)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_register_frozen_parameters_for_a_module_type():
    class Scaled(_Custom):
        pass
    timm_modcl.register_frozen_parameters(Scaled, ['scale'])
    model = timm_modcl.modulate(Scaled(), head='fc')
    assert 'scale' in model._buffers


def test_head_argument_and_bad_heads():
    with pytest.raises(UnsupportedModelError, match='no module'):
        timm_modcl.modulate(_Custom(), head='nope', freeze=['scale'])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match='single-layer'):
        timm_modcl.modulate(model, head='2')
    headless = timm_modcl.modulate(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)), head=None)
    headless.add_task('t', 0)
    assert headless.tasks['t'].num_modulator_params > 0


def test_modulate_is_idempotent_and_refuses_wrappers():
    model = timm_modcl.modulate(timm.create_model('resnet18'))
    assert timm_modcl.modulate(model) is model
    with pytest.raises(UnsupportedModelError, match='not its DataParallel'):
        timm_modcl.modulate(nn.DataParallel(timm.create_model('resnet18')))


def test_modulated_models_pickle_and_deepcopy(tmp_path):
    import copy
    import pickle
    model = timm_modcl.modulate(timm.create_model('resnet18')).eval()
    model.add_task('t', 3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(clone(x), ref)
        assert clone.tasks == model.tasks and type(clone) is type(model)


@pytest.mark.parametrize('arch', ['modcl_mobilenetv2_050', 'modcl_resnet18'])   # timm's BatchNormAct2d, nn.BatchNorm2d
def test_batchnorm_eval_fast_path_equals_the_plain_forward(arch):
    """In eval mode BatchNorm layers resolve the task's four tensors at once; their output equals the plain class's
    forward (which reads them one property at a time) for the bound task, a scoped task and the base task, and
    training still goes through the plain forward (it updates the bound task's statistics)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    for t in ('a', 'b'):
        model.add_task(t, 3)
        with torch.no_grad():
            for v in model.task_tensors(t).values():
                if v.is_floating_point():
                    v.add_(torch.rand_like(v) * 0.5)   # every task's statistics and affine differ from the base's
    model.set_task('a')
    bns = {n: model.get_submodule(n) for n in model.norm_layers}
    bns = {n: m for n, m in bns.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bns and all(type(m).forward is not type(m)._modcl_plain.forward for m in bns.values())
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0])) for n, m in bns.items()]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    outs = {}
    with torch.no_grad():
        for name, m in bns.items():
            x, plain = inputs[name], type(m)._modcl_plain.forward
            outs[name] = [m(x)]
            assert torch.equal(outs[name][0], plain(m, x)), name
            with model.task_scope('b'):
                outs[name].append(m(x))
                assert torch.equal(outs[name][1], plain(m, x)), name
            with model.use_task(BASE_TASK):
                outs[name].append(m(x))
                assert torch.equal(outs[name][2], plain(m, x)), name
    # the three tasks give three different outputs through the fast path
    assert all(not torch.equal(a, b) and not torch.equal(a, base) for a, b, base in outs.values())
    name, m = next(iter(bns.items()))
    x = inputs[name]
    with pytest.raises((AssertionError, ValueError)):
        m(x[0, 0])                                                  # a 2-D input: the plain forward's error
    key = f'bn.{name}.running_mean'
    before = model.task_tensors('a')[key].clone()
    model.train()
    m(x)
    assert not torch.equal(model.task_tensors('a')[key], before)   # training: the bound task's statistics move
