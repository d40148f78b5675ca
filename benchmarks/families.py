"""Every registered ``modcl_*`` family at the default task configuration: what a task adds, its adapter size, and the
eval-time cost of a modulated task next to the plain timm model (same weights, same input, one run).

    python benchmarks/families.py            # all registered models (a few minutes on 1 CPU thread)
    python benchmarks/families.py --quick    # the smallest model of each family, few repeats

For each model: the weight layers a task modulates at ``DEFAULT_CONFIG`` (and the ones left unmodulated because a
channel dimension is below the resolution), the normalisation layers with per-task state, the frozen shared tensors,
the values a 10-class task adds (modulators, norm statistics and affine, head) and trains, its adapter file size in
fp32 and fp16 as a share of the plain model's fp32 safetensors checkpoint, and the median eval-forward time of the
task / the plain model at the model's default input size, batch 1, interleaved repeats after warm-up. Writes
``benchmarks/results/families.json`` and ``families.md``.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import interleaved  # noqa: E402

import timm  # noqa: E402
import timm_modcl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
SMALLEST = ('modcl_mobilenetv2_050', 'modcl_efficientnet_b0', 'modcl_tf_efficientnet_b0',
            'modcl_mobilenetv3_large_100', 'modcl_resnet18', 'modcl_convnext_atto', 'modcl_vit_tiny_patch16_224')


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(name[len('modcl_'):]).eval()
    model = timm.create_model(name).eval()
    model.load_state_dict(plain.state_dict())  # same weights: the base task is the plain model
    info = model.add_task('t', 10)
    shapes = model.modulator_shapes(timm_modcl.DEFAULT_CONFIG.resolution)
    size = plain.pretrained_cfg['input_size'][-1]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        save_file(plain.state_dict(), f'{d}/full.safetensors')
        full = os.path.getsize(f'{d}/full.safetensors')
        fp32 = os.path.getsize(model.save_task('t', f'{d}/a.safetensors'))
        fp16 = os.path.getsize(model.save_task('t', f'{d}/b.safetensors', dtype=torch.float16))
    with torch.inference_mode():  # the task's weights: computed once, cached
        model(x)

    def run(m):
        def f():
            with torch.inference_mode():
                m(x)
        return f
    t = interleaved({'plain': run(plain), 'modcl': run(model)}, repeats, warmup=2)
    return {
        'model': name,
        'weight_layers': len(model.modulated_layers),
        'modulated_layers': len(shapes),
        'norm_layers': len(model.norm_layers),
        'frozen_extras': [f'{m}.{k}' if m else k for m, k in model._modcl.extra_frozen],
        'backbone_params': sum(p.numel() for p in plain.parameters()),
        'modulator_values': info.num_modulator_params,
        'norm_values': info.num_norm_values,
        'norm_affine_values': info.num_norm_affine,
        'head_values': info.num_head_params,
        'added_values': info.num_added_params,
        'trainable_values': info.num_trainable_params,
        'checkpoint_bytes': full,
        'adapter_fp32_bytes': fp32,
        'adapter_fp16_bytes': fp16,
        'input_size': size,
        'eval_plain_s': t['plain'],
        'eval_modcl_s': t['modcl'],
        'eval_ratio': t['modcl'] / t['plain'],
    }


def markdown(rows) -> str:
    lines = [
        '| model | modulated layers | norm layers | added values / task | trainable | adapter fp32 (% of checkpoint) '
        '| fp16 | eval time modcl / plain |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['modulated_layers']} of {r['weight_layers']} | {r['norm_layers']} | "
            f"{r['added_values']:,} | {r['trainable_values']:,} | {r['adapter_fp32_bytes'] / 1024:,.0f} KiB "
            f"({100 * r['adapter_fp32_bytes'] / r['checkpoint_bytes']:.1f}%) | "
            f"{r['adapter_fp16_bytes'] / 1024:,.0f} KiB ({100 * r['adapter_fp16_bytes'] / r['checkpoint_bytes']:.1f}%) "
            f"| {r['eval_ratio']:.3f} |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='smallest model per family, few repeats')
    ap.add_argument('--repeats', type=int, default=20)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=str(RESULTS / 'families.json'))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = SMALLEST if args.quick else timm.list_models('modcl_*')
    t0 = time.perf_counter()
    rows = []
    for name in names:
        rows.append(measure(name, 5 if args.quick else args.repeats))
        r = rows[-1]
        print(f"{name}: {r['modulated_layers']}/{r['weight_layers']} layers, {r['added_values']:,} values/task, "
              f"adapter {100 * r['adapter_fp32_bytes'] / r['checkpoint_bytes']:.1f}% of the checkpoint, "
              f"eval modcl/plain {r['eval_ratio']:.3f}", flush=True)
    result = {
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                    'torch': torch.__version__, 'timm': timm.__version__},
        'config': timm_modcl.DEFAULT_CONFIG.to_dict(),
        'quick': args.quick,
        'repeats': 5 if args.quick else args.repeats,
        'rows': rows,
        'wall_s': time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    out.with_suffix('.md').write_text(markdown(rows))
    print(markdown(rows))
    print(f'wrote {out} in {result["wall_s"]:.0f} s')
    return result


if __name__ == '__main__':
    main()
