"""``timm_modcl.core`` and ``timm_modcl.layers`` are packages (issue 16: modules of about 400 lines, one job each).

What was importable from the single modules stays importable from the packages, and the names that pickled models
hold (``pickle`` stores functions and classes by module path) still resolve: a model pickled before the split loads.
"""
import pickle

import pytest
import timm

import timm_modcl
import timm_modcl.core as core
import timm_modcl.layers as layers

#: ``(module, name)`` of every timm_modcl global a pickled modcl model refers to, as pickles written before the split
#: name them (found with a find_class hook over pickles of a ResNet and a ViT with tasks).
PICKLED = [
    ('timm_modcl.core', '_FrozenTensor'), ('timm_modcl.core', '_State'), ('timm_modcl.core', '_prepare_compiled_call'),
    ('timm_modcl.layers', 'ModulatedWeight'), ('timm_modcl.layers', 'TaskNorm'), ('timm_modcl.layers', 'WeightCache'),
    ('timm_modcl.layers', '_LayerParameters'), ('timm_modcl.layers', '_new_layer'), ('timm_modcl.layers', 'check_input'),
    ('timm_modcl.model', '_new_model'),
]

#: Public names of the two modules before the split, and the private ones other code imports (benchmarks, tests).
CORE_NAMES = ['ModCLMixin', 'MAX_CLASSES', 'MAX_MODULATOR', 'STATE_DICT_FORMAT', 'TASKS_MODULE', 'CHUNKED_LAYERS',
              'register_frozen_parameters', 'frozen_parameter_names', 'attach', '_prepare_compiled_call']
LAYERS_NAMES = ['MODULATION_VARIANTS', 'ModulatedWeight', 'TaskNorm', 'WeightCache', 'frozen_names', 'plain_class',
                'task_aware_class', 'task_scope', 'scoped_task', 'modulator_shape', 'upsample_modulator',
                'interpolation_matrix', 'validate_resolution', 'is_weight_layer', 'is_norm_layer', 'modulate_layer',
                'unmodulate_layer', 'check_input', 'validate_input', 'LayerMethod', 'Modulation', '_SCOPED']


@pytest.mark.parametrize('module, name', PICKLED)
def test_names_in_pickles_of_earlier_versions_resolve(module, name):
    # a protocol-0 GLOBAL opcode: exactly how a pickle refers to a function or class by module path
    obj = pickle.loads(f'c{module}\n{name}\n.'.encode())
    assert obj.__name__ == name
    assert obj.__module__.startswith(module)


@pytest.mark.parametrize('module, names', [(core, CORE_NAMES), (layers, LAYERS_NAMES)])
def test_the_names_of_the_single_modules_are_importable_from_the_packages(module, names):
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, missing
    assert all(hasattr(module, n) for n in module.__all__)


def test_task_aware_classes_keep_their_module_path():
    model = timm_modcl.modulate(timm.create_model('resnet10t', pretrained=False, num_classes=3))
    kinds = {(type(m).__module__, type(m).__name__) for m in model.modules()
             if isinstance(m, (layers.ModulatedWeight, layers.TaskNorm))}
    assert ('timm_modcl.layers', 'ModulatedConv2d') in kinds and ('timm_modcl.layers', 'TaskBatchNorm2d') in kinds
    assert {module for module, _ in kinds} == {'timm_modcl.layers'}


def test_mixin_parts_define_each_method_once():
    """``ModCLMixin`` combines its parts; no method is defined in two of them (so the MRO order cannot change which
    code runs)."""
    parts = core.ModCLMixin.__bases__
    assert len(parts) == 5
    seen = {}
    for part in parts:
        for name in vars(part):
            if name.startswith('__') and name.endswith('__') and name not in ('__getattr__', '__prepare_scriptable__'):
                continue
            assert name not in seen or name == '_modcl', f'{name} in {seen.get(name)} and {part.__name__}'
            seen[name] = part.__name__
    for name in ('add_task', 'state_dict', 'load_state_dict', '_apply', 'layer_table', '_modcl_scan', 'task_scope'):
        assert name in seen
