"""The shared checks of ``modcl_tester.ModCLTester`` for the smallest registered model of every family, and for the
second task method (per-task LoRA) on a depthwise-conv family, a ConvNeXt and a ViT."""
from modcl_tester import ModCLTester


class TestMobileNetV2(ModCLTester):
    model_name = 'modcl_mobilenetv2_050'


class TestEfficientNet(ModCLTester):
    model_name = 'modcl_efficientnet_b0'


class TestTfEfficientNetSamePadding(ModCLTester):
    model_name = 'modcl_tf_efficientnet_b0'


class TestMobileNetV3(ModCLTester):
    model_name = 'modcl_mobilenetv3_large_100'


class TestResNet(ModCLTester):
    model_name = 'modcl_resnet18'


class TestConvNeXt(ModCLTester):
    model_name = 'modcl_convnext_atto'
    atol = 1e-4


class TestViT(ModCLTester):
    model_name = 'modcl_vit_tiny_patch16_224'
    model_kwargs = dict(img_size=32)
    atol = 1e-4


class TestMobileNetV2LoRA(TestMobileNetV2):
    method = 'lora'


class TestConvNeXtLoRA(TestConvNeXt):
    method = 'lora'


class TestViTLoRA(TestViT):
    method = 'lora'
