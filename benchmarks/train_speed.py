"""Single-device training speed of a modcl task against full fine-tuning, side by side in one run.

    python benchmarks/train_speed.py --device cuda            # 224 px, batch 64, bf16 autocast (an H100: ~1 min)
    python benchmarks/train_speed.py --device cpu --dry-run   # the same code on the CPU with tiny sizes

Three training steps on the same random batch, timed in interleaved blocks (so that clock and load changes hit all
alike), medians over the blocks:

* ``modcl``: a task of ``modcl_mobilenetv2_100`` at the default configuration (``model.add_task``), Adam over
  ``model.parameters()`` (of which only the task's modulators and head require grad): forward, loss, backward, optimizer step;
* ``full_ft``: full fine-tuning of plain timm ``mobilenetv2_100`` (Adam over all parameters), the same step;
* ``plain_fwd_bwd``: the plain model's forward and backward only (no optimizer step): the floor of any method that
  back-propagates through the whole network.

Prints images/s and the ratios modcl / full fine-tuning and modcl / plain forward+backward, the peak memory of each
on CUDA, and writes ``benchmarks/results/train_speed.json`` (``train_speed_dry_run.json`` for ``--dry-run``).
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import timm
import timm_modcl  # noqa: F401

RESULTS = Path(__file__).resolve().parent / 'results'


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--classes', type=int, default=1000, help='head size of every method (default: 1000)')
    p.add_argument('--amp', default='bf16', choices=['bf16', 'fp16', 'off'], help='autocast dtype (default: bf16)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format for all three')
    p.add_argument('--steps', type=int, default=20, help='steps per block (default: 20)')
    p.add_argument('--blocks', type=int, default=5, help='timed blocks per method (default: 5)')
    p.add_argument('--warmup', type=int, default=10, help='warm-up steps per method (default: 10)')
    p.add_argument('--dry-run', action='store_true', help='tiny sizes (64 px, batch 4, 2 steps x 2 blocks)')
    p.add_argument('--out', default=None, help='JSON output (default: benchmarks/results/train_speed[_dry_run].json)')
    args = p.parse_args(argv)
    if args.dry_run:
        args.size, args.batch, args.steps, args.blocks, args.warmup = 64, 4, 2, 2, 1
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('CUDA is not available; run with --device cpu --dry-run for a dry run', file=sys.stderr)
        return 2
    if device.type == 'cpu':
        torch.set_num_threads(max(1, torch.get_num_threads()))
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None}[args.amp]
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    modcl = timm.create_model('modcl_mobilenetv2_100')
    modcl.add_task('t', args.classes)  # the default task configuration
    full = timm.create_model('mobilenetv2_100', num_classes=args.classes)
    plain = timm.create_model('mobilenetv2_100', num_classes=args.classes)
    for m in (modcl, full, plain):
        m.to(device, memory_format=memory_format).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    scaler = torch.amp.GradScaler('cuda') if amp_dtype is torch.float16 and device.type == 'cuda' else None

    from timm.optim import create_optimizer_v2

    def trainer(model, optimize: bool):
        opt = create_optimizer_v2(model.parameters(), opt='adam', lr=1e-4) if optimize else None

        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x).float(), y)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if opt is not None:
                    scaler.step(opt)
                    scaler.update()
            else:
                loss.backward()
                if opt is not None:
                    opt.step()
        return step

    methods = {'modcl': trainer(modcl, True), 'full_ft': trainer(full, True), 'plain_fwd_bwd': trainer(plain, False)}
    trainable = {'modcl': sum(p.numel() for p in modcl.parameters()),
                 'full_ft': sum(p.numel() for p in full.parameters()),
                 'plain_fwd_bwd': sum(p.numel() for p in plain.parameters())}
    peak = {}
    for name, step in methods.items():
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        _sync(device)
        if device.type == 'cuda':
            peak[name] = torch.cuda.max_memory_allocated(device)
    times = {k: [] for k in methods}
    for _ in range(args.blocks):
        for name, step in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    ips = {k: [args.batch / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in ips.items()}
    # ratios per interleaved block, then the median (the blocks ran back to back)
    ratio_full = statistics.median(a / b for a, b in zip(ips['modcl'], ips['full_ft']))
    ratio_plain = statistics.median(a / b for a, b in zip(ips['modcl'], ips['plain_fwd_bwd']))
    card = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    result = {
        'device': str(device), 'card': card, 'torch': torch.__version__, 'timm': timm.__version__,
        'dry_run': args.dry_run,
        'config': {'input_size': args.size, 'batch': args.batch, 'classes': args.classes, 'amp': args.amp,
                   'channels_last': args.channels_last, 'steps_per_block': args.steps, 'blocks': args.blocks,
                   'warmup': args.warmup, 'optimizer': 'adam'},
        'images_per_s': {k: {'median': med[k], 'min': min(v), 'max': max(v)} for k, v in ips.items()},
        'modcl_over_full_ft': ratio_full,
        'modcl_over_plain_fwd_bwd': ratio_plain,
        'trainable_params': trainable,
        'peak_memory_bytes': peak or None,
    }
    out = Path(args.out) if args.out else RESULTS / ('train_speed_dry_run.json' if args.dry_run else 'train_speed.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'{card} ({device}), {args.size} px, batch {args.batch}, amp {args.amp}; images/s, median [min-max] of '
          f'{args.blocks} blocks of {args.steps} steps')
    for k, v in result['images_per_s'].items():
        mem = f'  peak {peak[k] / 2 ** 30:.2f} GiB' if k in peak else ''
        print(f'  {k:14s} {v["median"]:9.1f} [{v["min"]:.1f}-{v["max"]:.1f}]  trainable {trainable[k]:>9,}{mem}')
    print(f'modcl / full fine-tuning: {ratio_full:.2f}x   modcl / plain forward+backward: {ratio_plain:.2f}x')
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
