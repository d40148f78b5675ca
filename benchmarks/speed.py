"""Speed and scale of timm_modcl, as ratios measured side by side in one process.

    python benchmarks/speed.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # smoke run

Measures (medians over repeated runs after warm-up):
  * eval forward of a modulated task / plain timm ``mobilenetv2_100`` (batch 1 and 32)   target <= 1.02
  * the same through ``forward_task`` (task chosen per call, thread-safe) and for a per-task LoRA task
  * compiled eval (``torch.compile``, inductor) of a modulated task / compiled plain timm, and the compilations
    needed when serving two tasks alternately                                          target <= 1 per task
  * train step of modcl / full fine-tuning / PEFT LoRA on the convolutions             target modcl <= 1.10 x full
  * ``set_task`` latency, eval forward with 100 tasks registered / with 1 task           target <= 1.02
  * adapter save and load time, pull time from a local Hub-compatible server
Writes ``benchmarks/results/speed.json``.
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import timm
import timm_modcl  # noqa: F401

RESULTS = Path(__file__).resolve().parent / 'results'
#: The backbone weights every model of the eval measurements starts from (``main`` sets them): timm keys, no classifier.
BACKBONE: Dict[str, object] = {'state': None, 'source': 'random initialisation (seed 0)'}


def use_imagenet_backbone() -> None:
    """Load the ImageNet MobileNetV2 backbone that ``_fetch.py`` takes from a package (offline after one download)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _fetch
    path = _fetch.backbone_weights()
    model = timm.create_model('modcl_mobilenetv2_100', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    BACKBONE['state'] = {k: v for k, v in model.state_dict().items()
                         if not k.startswith(('modcl', 'classifier.'))}
    BACKBONE['source'] = f'ImageNet MobileNetV2 ({path.name}, from {_fetch.DEEPSORT_REQ})'


def plain_model(**kwargs) -> torch.nn.Module:
    """Plain timm ``mobilenetv2_100`` (seed 0) with the benchmark's backbone weights."""
    torch.manual_seed(0)
    plain = timm.create_model('mobilenetv2_100', **kwargs)
    if BACKBONE['state'] is not None:
        plain.load_state_dict(BACKBONE['state'], strict=False)   # the classifier stays as created
    return plain


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median time of each function, alternating between them (in a new random order each round) so that machine
    noise and cache effects hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, list] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _eval_fn(model, x) -> Callable[[], None]:
    def f():
        with torch.inference_mode():
            model(x)
    return f


def bench_eval(size: int, batch: int, repeats: int) -> Dict[str, float]:
    plain = plain_model().eval()
    model = timm.create_model('modcl_mobilenetv2_100').eval()
    model.load_state_dict(plain.state_dict())
    model.add_task('t', 1000, (4, 4))
    model.classifier.load_state_dict(plain.classifier.state_dict())
    x = torch.randn(batch, 3, size, size)

    t = interleaved({'plain': _eval_fn(plain, x), 'modcl': _eval_fn(model, x)}, repeats)
    return {'plain_s': t['plain'], 'modcl_s': t['modcl'], 'ratio': t['modcl'] / t['plain']}


def _models_for_eval(size: int, batch: int):
    plain = plain_model().eval()
    model = timm.create_model('modcl_mobilenetv2_100').eval()
    model.load_state_dict(plain.state_dict())
    for name, kwargs in (('t', {}), ('u', {}), ('lora', dict(method='lora', rank=8))):
        model.add_task(name, 1000, **kwargs)
        model.classifier.load_state_dict(plain.classifier.state_dict())
        with torch.no_grad():  # trained-looking tasks: the cache must hold real effective weights
            for p in model.modcl_tasks[name].modulator.values():
                p.normal_(0, 0.01)
    model.set_task('t')
    return plain, model, torch.randn(batch, 3, size, size)


def bench_eval_paths(size: int, batch: int, repeats: int) -> Dict[str, float]:
    """Plain timm vs the bound task, ``forward_task`` (per-call task) and a LoRA-method task, interleaved."""
    plain, model, x = _models_for_eval(size, batch)

    def scoped():
        with torch.inference_mode():
            model.forward_task(x, 'u')

    def lora():
        with torch.inference_mode():
            model.forward_task(x, 'lora')
    t = interleaved({'plain': _eval_fn(plain, x), 'bound': _eval_fn(model, x), 'scoped': scoped, 'lora': lora},
                    repeats)
    return {'plain_s': t['plain'], 'bound_over_plain': t['bound'] / t['plain'],
            'forward_task_over_plain': t['scoped'] / t['plain'], 'lora_task_over_plain': t['lora'] / t['plain']}


def bench_compiled(size: int, batch: int, repeats: int) -> Dict[str, float]:
    """torch.compile (inductor) of plain timm and of a modcl model serving two tasks alternately."""
    from torch._dynamo.utils import counters
    plain, model, x = _models_for_eval(size, batch)
    torch._dynamo.reset()
    c_plain, c_model = torch.compile(plain), torch.compile(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        c_plain(x)
    compile_plain_s = time.perf_counter() - t0
    frames, before = [], int(counters['stats']['unique_graphs'])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for task in ('t', 'u', 't', 'u'):
            model.set_task(task)
            c_model(x)
            frames.append(int(counters['stats']['unique_graphs']) - before)
    compile_modcl_s = time.perf_counter() - t0
    model.set_task('t')
    t = interleaved({'plain': _eval_fn(c_plain, x), 'modcl': _eval_fn(c_model, x)}, repeats)
    return {'plain_s': t['plain'], 'modcl_s': t['modcl'], 'ratio': t['modcl'] / t['plain'],
            'unique_graphs_after_each_call': frames, 'compile_plain_s': compile_plain_s,
            'compile_modcl_two_tasks_s': compile_modcl_s}


def bench_train(size: int, batch: int, repeats: int) -> Dict[str, float]:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    full = plain_model(num_classes=10).train()
    modcl = timm.create_model('modcl_mobilenetv2_100')
    modcl.load_state_dict(plain_model().state_dict())
    modcl.add_task('t', 10, (4, 4))
    modcl.train()
    base = plain_model(num_classes=10)
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=targets, modules_to_save=['classifier']))
    lora.train()

    def step(m):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)

        def f():
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f
    t = interleaved({'full': step(full), 'modcl': step(modcl), 'lora': step(lora)}, repeats)
    return {
        'full_s': t['full'], 'modcl_s': t['modcl'], 'lora_s': t['lora'],
        'modcl_over_full': t['modcl'] / t['full'], 'lora_over_full': t['lora'] / t['full'],
        'trainable': {
            'full': sum(p.numel() for p in full.parameters()),
            'modcl': sum(p.numel() for p in modcl.task_parameters()),
            'lora': sum(p.numel() for p in lora.parameters() if p.requires_grad),
        },
    }


def bench_scale(size: int, batch: int, repeats: int, n_tasks: int) -> Dict[str, float]:
    one = timm.create_model('modcl_mobilenetv2_100').eval()
    one.load_state_dict(plain_model().state_dict())
    one.add_task('t0', 10)
    many = timm.create_model('modcl_mobilenetv2_100').eval()
    many.load_state_dict(one.state_dict())
    for i in range(1, n_tasks):
        many.add_task(f't{i}', 10, activate=False)
    x = torch.randn(batch, 3, size, size)

    t = interleaved({'one': _eval_fn(one, x), 'many': _eval_fn(many, x)}, repeats)
    names = list(many.tasks)
    i = [0]

    def switch():
        i[0] = (i[0] + 1) % len(names)
        many.set_task(names[i[0]])
    set_task_s = median_time(switch, repeats=200)
    switch_and_forward = median_time(lambda: (switch(), _eval_fn(many, x)()), repeats=max(3, repeats // 2))
    return {'one_task_s': t['one'], 'many_tasks_s': t['many'], 'ratio': t['many'] / t['one'],
            'n_tasks': n_tasks, 'set_task_s': set_task_s, 'switch_then_forward_s': switch_and_forward}


def bench_io(repeats: int) -> Dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
    from hub_server import FakeHub
    from huggingface_hub import constants
    constants.HF_HUB_DISABLE_TELEMETRY = True
    torch.manual_seed(0)
    model = timm.create_model('modcl_mobilenetv2_100')
    model.add_task('t', 10, (4, 4))
    out: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / 't.safetensors'
        out['save_s'] = median_time(lambda: model.save_task('t', path), repeats)
        out['file_bytes'] = path.stat().st_size

        def load():
            model.load_task(path, name='t2', replace=True)
        out['load_s'] = median_time(load, repeats)
        with FakeHub(tokens={'hf_bench': 'bench'}) as hub:
            model.push_tasks_to_hub('bench/t', ['t'], token='hf_bench', endpoint=hub.url)
            k = [0]

            def pull():  # a fresh cache each time: a real download
                k[0] += 1
                model.load_tasks_from_hub('bench/t', endpoint=hub.url, cache_dir=Path(d) / f'c{k[0]}', replace=True)
            out['pull_s'] = median_time(pull, repeats)
            out['push_s'] = median_time(
                lambda: model.push_tasks_to_hub('bench/t', ['t'], token='hf_bench', endpoint=hub.url), max(2, repeats // 2))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='few repeats, small inputs (smoke run)')
    ap.add_argument('--out', default=str(RESULTS / 'speed.json'))
    ap.add_argument('--threads', type=int, default=1,
                    help='torch threads (1: steadiest ratios when other processes share the cores; 0: default)')
    ap.add_argument('--weights', choices=('imagenet', 'random'), default='imagenet',
                    help='backbone weights of every model (imagenet: from a package, see _fetch.py; default)')
    ap.add_argument('--compile', action=argparse.BooleanOptionalAction, default=True,
                    help='also measure torch.compile (inductor; minutes of compilation on a CPU)')
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    if args.weights == 'imagenet':
        use_imagenet_backbone()
    results = {
        'machine': {'platform': platform.platform(), 'processor': platform.processor(), 'cpus': os.cpu_count(),
                    'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'timm': timm.__version__},
        'quick': q, 'backbone_weights': BACKBONE['source'],
    }
    t0 = time.perf_counter()
    results['eval_bs1'] = bench_eval(size=224, batch=1, repeats=5 if q else 60)
    print(f"eval  bs1  224px: modcl/plain = {results['eval_bs1']['ratio']:.3f}", flush=True)
    results['eval_bs32'] = bench_eval(size=64 if q else 224, batch=32 if not q else 8, repeats=3 if q else 10)
    print(f"eval  bs32 {64 if q else 224}px: modcl/plain = {results['eval_bs32']['ratio']:.3f}", flush=True)
    results['eval_paths'] = bench_eval_paths(size=224, batch=1, repeats=5 if q else 30)
    ep = results['eval_paths']
    print(f"eval  bs1  224px over plain: bound {ep['bound_over_plain']:.3f}, forward_task "
          f"{ep['forward_task_over_plain']:.3f}, LoRA task {ep['lora_task_over_plain']:.3f}", flush=True)
    if args.compile:
        results['compiled'] = bench_compiled(size=64 if q else 224, batch=1, repeats=5 if q else 30)
        cp = results['compiled']
        print(f"compiled eval bs1: modcl/plain = {cp['ratio']:.3f}; unique graphs after serving t, u, t, u: "
              f"{cp['unique_graphs_after_each_call']}", flush=True)
    results['train'] = bench_train(size=64 if q else 96, batch=8 if q else 32, repeats=3 if q else 10)
    tr = results['train']
    print(f"train step: modcl/full = {tr['modcl_over_full']:.3f}, lora/full = {tr['lora_over_full']:.3f}", flush=True)
    results['scale'] = bench_scale(size=224, batch=1, repeats=5 if q else 30, n_tasks=10 if q else 100)
    sc = results['scale']
    print(f"eval with {sc['n_tasks']} tasks / 1 task = {sc['ratio']:.3f}; set_task {sc['set_task_s'] * 1e6:.0f} us",
          flush=True)
    results['io'] = bench_io(repeats=3 if q else 10)
    io = results['io']
    print(f"adapter save {io['save_s'] * 1e3:.1f} ms, load {io['load_s'] * 1e3:.1f} ms, "
          f"Hub pull {io['pull_s'] * 1e3:.1f} ms, push {io['push_s'] * 1e3:.1f} ms ({io['file_bytes']:,} bytes)")
    results['wall_s'] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + '\n')
    print(f'wrote {args.out} in {results["wall_s"]:.0f} s')
    return results


if __name__ == '__main__':
    main()
