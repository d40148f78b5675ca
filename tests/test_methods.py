"""The method interface (timm_modcl.methods) and its second method, per-task LoRA (issue 16, item 5)."""
import math

import pytest
import torch

import timm
import timm_modcl
from timm_modcl import TaskConfig, TaskError
from timm_modcl.methods import LoRA, Modulation, method_of


@pytest.fixture
def model():
    torch.manual_seed(0)
    return timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()


def test_config_selects_the_method_and_round_trips():
    c = TaskConfig(method='lora', rank=4, alpha=8)
    assert isinstance(method_of(c), LoRA) and method_of(c).rank == 4 and method_of(c).alpha == 8.0
    assert TaskConfig.from_dict(c.to_dict()) == c
    assert isinstance(method_of(TaskConfig()), Modulation)
    # modulation configs are written as before the method axis existed (adapter files stay byte-identical)
    assert set(TaskConfig().to_dict()) == {'resolution', 'variant', 'layer_resolution', 'bn_affine'}


@pytest.mark.parametrize('kwargs', [dict(method='dora'), dict(method='lora', rank=0), dict(method='lora', rank=2.5),
                                    dict(method='lora', rank=True), dict(method='lora', alpha=float('nan')),
                                    dict(method='lora', alpha=-1.0)])
def test_bad_method_settings_are_refused(model, kwargs):
    with pytest.raises(TaskError):
        TaskConfig(**kwargs)
    with pytest.raises(TaskError):
        model.add_task('t', 3, **{k: v for k, v in kwargs.items() if k in ('method', 'rank')},
                       config=None if 'alpha' not in kwargs else TaskConfig(**kwargs))
    assert list(model.tasks) == ['base']


def test_lora_covers_every_weight_layer_depthwise_included_and_starts_at_the_pretrained_weights(model):
    x = torch.randn(2, 3, 32, 32)
    model.add_task('l', 3, method='lora', rank=4)
    tensors = model.modcl_tasks['l'].modulators
    assert set(tensors) == set(model.modulated_layers)
    dw = [n for n in tensors if n.endswith('conv_dw')]
    assert dw
    for name, t in tensors.items():
        w = model.frozen_tensors()[name + '.weight']
        fan_in = math.prod(w.shape[1:])
        assert t.shape == (w.shape[0] + fan_in, min(4, w.shape[0], fan_in)), name
        assert not t[:w.shape[0]].any() and t[w.shape[0]:].any()          # B = 0, A random
    with torch.no_grad():
        feats = model.forward_features(x)
        with model.use_task('base'):
            assert torch.equal(model.forward_features(x), feats)          # exactly the pretrained weights


def test_lora_effective_weight_is_w_plus_scaled_b_a(model):
    model.add_task('l', 3, method='lora', rank=3, config=TaskConfig(method='lora', rank=3, alpha=6.0))
    name = next(n for n in model.modulated_layers if n.endswith('conv_dw'))
    layer = model.get_submodule(name)
    t = model.modcl_tasks['l'].modulators[name]
    with torch.no_grad():
        t.normal_()
    w = model.frozen_tensors()[name + '.weight']
    o = w.shape[0]
    b, a = t[:o], t[o:].t()
    expected = w + (6.0 / t.shape[1]) * (b @ a).reshape(w.shape)
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    model.train()
    assert torch.allclose(layer.weight, expected, atol=1e-6)              # the differentiable path agrees


def test_lora_and_modulation_tasks_live_side_by_side(model, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    model.add_task('mod', 3)
    model.add_task('lora', 5, method='lora', rank=2)
    for name in ('mod', 'lora'):
        model.set_task(name)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4) % model.num_classes)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ref = {n: model.forward_task(x, n) for n in model.tasks}
    model.save_tasks(tmp_path / 'a')
    torch.manual_seed(0)
    fresh = timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()
    assert fresh.load_tasks(tmp_path / 'a') == ['mod', 'lora']
    assert fresh.tasks['lora'].config.method == 'lora'
    for n in ('mod', 'lora'):
        assert torch.equal(fresh.forward_task(x, n), ref[n]), n
    mixed = fresh.forward_tasks(x, ['mod', 'lora', 'lora', 'mod'])
    assert torch.equal(mixed[1], ref['lora'][1]) and torch.equal(mixed[0], ref['mod'][0])
    plain = fresh.export_task('lora').eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), ref['lora'], atol=1e-5)


def test_lora_adapter_with_wrong_shapes_is_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    model.add_task('l', 3, method='lora', rank=2)
    path = model.save_task('l', tmp_path / 'l.safetensors')
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith('modulator.'))
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, str(tmp_path / 'bad.safetensors'), metadata=meta)
    torch.manual_seed(0)
    fresh = timm.create_model('modcl_mobilenetv2_050', pretrained=False)
    with pytest.raises(timm_modcl.AdapterFormatError, match=key):
        fresh.load_task(tmp_path / 'bad.safetensors')
    assert list(fresh.tasks) == ['base']
