"""Adapter file sizes of modcl_mobilenetv2_100: the default configuration and uniform resolutions (with the default's
per-task BN affine), fp32/fp16, with and without head.

    python benchmarks/adapter_sizes.py
"""
import os
import tempfile

import torch
from safetensors.torch import save_file

import timm
import timm_modcl  # noqa: F401


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        plain = timm.create_model('mobilenetv2_100')
        save_file(plain.state_dict(), f'{d}/full.safetensors')
        full = os.path.getsize(f'{d}/full.safetensors')
        print(f'full fp32 checkpoint (timm mobilenetv2_100, safetensors): {full:,} bytes')
        model = timm.create_model('modcl_mobilenetv2_100')
        print('| configuration | modulator values | fp32 + head | fp32, no head | fp16 + head | fp16, no head |')
        print('|---|---|---|---|---|---|')
        for res in ['default', (2, 2), (4, 4), (8, 8)]:
            name = 'tdefault' if res == 'default' else f't{res[0]}x{res[1]}'
            info = model.add_task(name, 10, res)
            sizes = {}
            for dtype in (torch.float32, torch.float16):
                for head in (True, False):
                    path = model.save_task(name, f'{d}/{name}-{dtype}-{head}.safetensors', dtype=dtype,
                                           include_head=head)
                    sizes[dtype, head] = os.path.getsize(path)

            def fmt(b: int) -> str:
                return f'{b / 1024:.0f} KiB ({100 * b / full:.1f}%)'
            label = '`DEFAULT_CONFIG`' if res == 'default' else f'{res}'
            print(f'| {label} | {info.num_modulator_params:,} | {fmt(sizes[torch.float32, True])} | '
                  f'{fmt(sizes[torch.float32, False])} | {fmt(sizes[torch.float16, True])} | '
                  f'{fmt(sizes[torch.float16, False])} |')


if __name__ == '__main__':
    main()
