"""The methods of the accuracy benchmark, one training recipe for all of them, and the per-cell runner.

Every method starts from the same ImageNet MobileNetV2 (timm ``mobilenetv2_100``; modcl uses
``modcl_mobilenetv2_100`` with the same weights), gets one new linear head per task (task identity is known at test
time) and is trained by the same recipe (:class:`Recipe`: Adam through ``timm.optim.create_optimizer_v2`` with one
learning rate for the method's own parameters and one for the head, the schedule through
``timm.scheduler.create_scheduler_v2``, batch 32, a seeded shuffle, the same epochs), exactly as
``timm_modcl.train_task`` trains a modcl task (modcl is trained *by* ``train_task``; ``tests/test_benchmark.py``
checks that this module's loop gives bit-identical modulators).

BatchNorm, the same for every method that keeps per-task state (BN + head, LoRA, IA3, Piggyback, modcl, full
fine-tuning): the task gets its own BN affine (gamma, beta; trained from the ImageNet values) and its own running
statistics (BN layers in train mode while training, then recomputed as plain averages over one pass of the training
images with the final weights, as ``train_task(recalibrate_bn=True)`` does). modcl's per-task BN affine is its
``bn_affine`` option, which the protocol explores. The linear probe keeps the ImageNet network untouched (eval mode);
sequential fine-tuning trains and recalibrates the one shared network; LwF keeps the ImageNet BN statistics (BN
layers in eval mode while training; hp ``bn="per_task"``: recalibrated and kept per task instead).

Every method's hp also takes ``weight_decay`` (Adam's L2, both groups) and ``label_smoothing``; :data:`STRUCTURE`
lists three structural options per method (the first its default) for the protocol to search, :data:`BUDGETS` the
settings of the accuracy-vs-bytes curve, and :func:`budget_bytes` what one task of a setting costs stored, without
training.

Methods (``METHODS``):

``linear_probe``  frozen backbone in eval mode, one head per task (features of the training images are cached).
``bn_head``       per-task BN affine + statistics + head; everything else frozen (the TinyTL / BitFit-style baseline).
``lora``          PEFT LoRA (``LoraConfig`` / ``get_peft_model``, one adapter per task) on every ungrouped Conv2d
                  (stem, all 1x1 expand / project convs, head conv: 35 layers), ``lora_alpha = alpha_mult * r``
                  (default 2 r), optionally rsLoRA or without the head conv, no dropout; rank ``hp["rank"]`` (e.g.
                  from :func:`lora_rank_for_budget`). The 17 depthwise convs are not targeted: PEFT's LoRA for a
                  grouped conv needs a rank divisible by ``groups`` (32..960 here) with a dense ``C x C x 3 x 3``
                  ``lora_A``, i.e. more values than the layer has (they hold 64,224 of the 2,189,760 conv weights,
                  2.9 %).
``ia3``           PEFT IA3 (``IA3Config``) on every ungrouped Conv2d, as *feed-forward* modules: a learnt scale per
                  *input* channel (T-Few scales the FFN's intermediate activations, i.e. the input of its second
                  projection, which is what the project convs get here). Output scaling is not used: every conv here
                  feeds a BatchNorm whose per-task statistics would cancel a per-output-channel scale exactly (same
                  for the depthwise convs, where input and output channels coincide). hp ``modules``: which convs
                  (:func:`ia3_targets`). Its head lr is the recipe's ``head_lr`` like every method's (a free axis).
``piggyback``     Piggyback (Mallya et al. 2018): a real-valued mask per weight of every Conv2d (depthwise included),
                  binarised at 5e-3 in the forward pass, straight-through gradient, stored as 1 bit per weight. The
                  masks train with Adam at the method's rate, with the per-task BN affine (the "adapter" group).
                  The scores start at ``5e-3 + margin * travel`` (``travel``: how far Adam can move a score over
                  the task's steps at the scheduled rates, :func:`schedule_travel`; hp ``margin``, default 0.5), so
                  an entry flips only if its gradient pushes it down through half of the run, at any lr and
                  step count (the paper's fixed 1e-2 over its ~10^4 steps at 1e-4 is the same idea; the 0.2
                  benchmark's fixed init flipped 24 % of entries whatever the data). Reports the fraction flipped
                  (overall and per layer), the SHA-256 of the mask bits and a fixed 65,536-entry sample of them.
``full_finetune`` a copy of the whole network per task, everything trained (upper bound; stores all of it).
``seq_finetune``  one shared network trained on each task in turn, a head per task: the forgetting reference.
``lwf``           Learning without Forgetting (Li & Hoiem): sequential fine-tuning plus, for every old head, the
                  distillation loss ``-sum softmax(y_o / T) log softmax(y / T)`` (T = 2, weight 1) against the outputs
                  the network gave on the new task's training images before training on it; old heads train too.
``modcl``         ``timm_modcl``: ``add_task(config=...)`` and ``train_task`` (modulators + BN + head per task).
``modcl_lora``    the library's own per-task LoRA (``TaskConfig(method="lora", rank=r, alpha=...)``: every conv,
                  depthwise included, per-task BN affine), trained by ``train_task`` like modcl.

What is counted per task (``counts``), the same way for every method: ``trainable`` = the values an optimizer trains
for the task and that the task must keep (adapter / modulators / all weights for full fine-tuning, per-task BN affine,
head); ``bn_stats`` = its own BN running mean and variance (``num_batches_tracked`` is not counted); ``mask_bits`` =
Piggyback's binary masks; ``values = trainable + bn_stats`` (Piggyback's real-valued training masks are not stored
and not counted); ``bytes = 4 * values + mask_bits / 8`` (fp32, masks as bits). Sequential fine-tuning and LwF store
only a head per task (their shared network is overwritten by every task).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

try:  # benchmarks/ on sys.path (scripts, tests)
    import _fetch
except ImportError:  # pragma: no cover - imported as a package
    from . import _fetch  # type: ignore

__all__ = [
    "METHODS", "FORGETTING_FREE", "Recipe", "Context", "BudgetExceeded", "ImageSet", "make_loader",
    "plain_backbone", "modcl_model", "lora_target_modules", "lora_params_per_rank", "lora_rank_for_budget",
    "build_method", "run_task_cell", "run_sequence_cell", "pack_bits", "unpack_bits", "STRUCTURE", "BUDGETS",
    "budget_bytes", "budget_counts", "ia3_targets", "schedule_travel", "mask_sample_indices",
]

METHODS = ("linear_probe", "bn_head", "lora", "ia3", "piggyback", "full_finetune", "seq_finetune", "lwf", "modcl",
           "modcl_lora")
FORGETTING_FREE = ("linear_probe", "bn_head", "lora", "ia3", "piggyback", "full_finetune", "modcl", "modcl_lora")
FEAT_DIM = 1280
_BN = nn.modules.batchnorm._BatchNorm


class BudgetExceeded(RuntimeError):
    """The run's time budget ended during a cell."""


# ---------------------------------------------------------------------------------------------------- data
class ImageSet(Dataset):
    """uint8 images ``(N, H, W)`` and labels; items are ``(image, label, index)`` (the index lets LwF and the linear
    probe look up per-image values; ``train_task`` reads only the first two)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


_MEAN = torch.tensor(_fetch.IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(_fetch.IMAGENET_STD).view(1, 3, 1, 1)


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 gray ``(N, H, W)`` or RGB ``(N, H, W, 3)`` images to the model's input: resized (bilinear) to ``size``,
    3 channels, ImageNet-normalised float32 ``(N, 3, size, size)``."""
    x = (images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return (x - _MEAN) / _STD


class Preprocess:
    """Collate function: stack a batch of ``ImageSet`` items and turn it into model input (:func:`to_input`)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, items):
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
        idx = torch.as_tensor([int(it[2]) for it in items])
        return to_input(torch.stack([it[0] for it in items]), self.size), y, idx


def make_loader(ds: ImageSet, size: int, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The DataLoader ``train_task`` would build from a Dataset (seeded shuffle; a last batch of one is dropped)."""
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    n = len(ds)
    drop_last = shuffle and n > 1 and n % batch_size == 1
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=Preprocess(size), pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------------------------------- recipe
@dataclass
class Recipe:
    """How every method trains one task (``train_task``'s arguments)."""
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-2
    head_lr: Optional[float] = None
    sched: str = "step"
    warmup_epochs: int = 0
    gamma: float = 0.1

    @property
    def milestones(self) -> List[int]:
        return [self.epochs // 2] if self.epochs >= 2 else []


@dataclass
class Context:
    """Where and how cells run."""
    weights: Optional[Path] = None          # backbone file; None: random init (tests)
    device: str = "cpu"
    amp: bool = False
    size: int = 64
    num_workers: int = 0
    deadline: Optional[float] = None        # time.time() after which training stops (BudgetExceeded)
    on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None   # progress callback (per finished epoch)

    def check_deadline(self) -> None:
        if self.deadline is not None and time.time() > self.deadline:
            raise BudgetExceeded("time budget used up")


def make_optimizer(groups: List[Dict[str, Any]], recipe: Recipe):
    """Adam with the groups' own learning rates and the recipe's schedule, built as ``train_task`` builds them."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    optimizer = create_optimizer_v2(groups, opt="adam", lr=float(recipe.lr), weight_decay=0.0)
    cosine = recipe.sched == "cosine"
    epochs, warm = recipe.epochs, recipe.warmup_epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine" if cosine else "multistep",
        num_epochs=max(epochs - warm, 1) if cosine else max(epochs, 1),
        decay_milestones=[m + 1 for m in recipe.milestones] or [max(epochs, 1) + 1], decay_rate=recipe.gamma,
        warmup_epochs=warm, warmup_lr=float(recipe.lr) * 1e-5, warmup_prefix=cosine, min_lr=0.0)
    return optimizer, scheduler


def _amp(device: torch.device, enabled: bool):
    if not enabled:
        return None, None
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and dtype == torch.float16) else None
    return dtype, scaler


@torch.no_grad()
def recalibrate_bn(bns: Sequence[nn.Module], forward: Callable[[torch.Tensor], Any], loader: DataLoader,
                   device: torch.device) -> None:
    """Running statistics of ``bns`` recomputed as plain averages over one pass of ``loader`` (as ``train_task``)."""
    bns = [m for m in bns if m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    try:
        for x, *_ in loader:
            if x.shape[0] < 2:
                continue
            forward(x.to(device, non_blocking=True))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom


# ---------------------------------------------------------------------------------------------------- backbones
def modcl_model(weights: Optional[Path], **kwargs) -> nn.Module:
    """``modcl_mobilenetv2_100`` with the offline ImageNet weights (timm's pretrained path and our key filter)."""
    import timm
    import timm_modcl  # noqa: F401  (registers the models)
    if weights is None:
        return timm.create_model("modcl_mobilenetv2_100", pretrained=False, **kwargs)
    return timm.create_model("modcl_mobilenetv2_100", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)


_PLAIN: Dict[str, nn.Module] = {}


def plain_backbone(weights: Optional[Path]) -> nn.Module:
    """The same weights in a plain timm ``mobilenetv2_100`` without classifier (1280-d pooled features): the
    ``base`` task of ``modcl_model(weights)`` exported with ``export_task`` (a fresh copy per call)."""
    key = str(weights)
    if key not in _PLAIN or weights is None:
        plain = modcl_model(weights).export_task("base")
        plain.reset_classifier(0)
        _PLAIN[key] = plain
    plain = copy.deepcopy(_PLAIN[key])
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def _n(params) -> int:
    return int(sum(p.numel() for p in params))


def _bn_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN)]


def _bn_affine_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in _bn_layers(model) for p in (m.weight, m.bias) if p is not None]


def _bn_stats_count(model: nn.Module) -> int:
    return int(sum(m.running_mean.numel() + m.running_var.numel() for m in _bn_layers(model) if m.track_running_stats))


def _snapshot_bn(model: nn.Module):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in _bn_layers(model)]


def _restore_bn(model: nn.Module, snap) -> None:
    with torch.no_grad():
        for m, sd in zip(_bn_layers(model), snap):
            for k, v in m.state_dict(keep_vars=True).items():
                v.copy_(sd[k])


def lora_target_modules(model: nn.Module) -> List[str]:
    """Names of the Conv2d layers PEFT's LoRA can adapt at a small rank (``groups == 1``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def lora_params_per_rank(model: nn.Module, targets: Sequence[str]) -> int:
    """LoRA values per unit of rank on ``targets``: ``lora_A`` Conv(in, r, k x k) + ``lora_B`` Conv(r, out, 1x1)."""
    mods = dict(model.named_modules())
    return int(sum(mods[n].in_channels * math.prod(mods[n].kernel_size) + mods[n].out_channels for n in targets))


def lora_rank_for_budget(model: nn.Module, budget: int, targets: Optional[Sequence[str]] = None) -> int:
    """The smallest rank whose LoRA values on ``targets`` (default: :func:`lora_target_modules`) reach ``budget``."""
    targets = lora_target_modules(model) if targets is None else targets
    return max(1, math.ceil(budget / lora_params_per_rank(model, targets)))


# ---------------------------------------------------------------------------------------------------- methods
class Method:
    """One continual learner. ``fit_task`` trains task ``t`` (``begin_task`` returns the parameter groups), then
    ``predict(t, x)`` gives its logits. Tasks are numbered 0, 1, ... in the order they are added."""

    name = ""
    forgetting_free = True
    recalibrate = True          # recompute the BN statistics of the trained network after training

    def __init__(self, ctx: Context, hp: Dict[str, Any]) -> None:
        self.ctx = ctx
        self.hp = hp
        self.device = torch.device(ctx.device)
        self.heads = nn.ModuleList()
        self.counts_: List[Dict[str, Any]] = []

    # -- to implement
    def begin_task(self, t: int, num_classes: int, train_eval: DataLoader) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def train_mode(self, t: int) -> None:
        raise NotImplementedError

    def forward(self, t: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def network(self, t: int) -> nn.Module:
        """The module whose BN layers hold task ``t``'s statistics while it trains."""
        raise NotImplementedError

    def end_task(self, t: int) -> Dict[str, Any]:
        raise NotImplementedError

    def predict(self, t: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared
    def loss(self, t: int, x, y, idx) -> torch.Tensor:
        return self._ce(self.forward(t, x, idx), y)

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the method's ``label_smoothing`` hp (default 0)."""
        return F.cross_entropy(logits.float(), y, label_smoothing=float(self.hp.get("label_smoothing", 0.0)))

    def _new_head(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(FEAT_DIM, num_classes).to(self.device)
        self.heads.append(head)
        return head

    def _groups(self, adapter: List[nn.Parameter], head: List[nn.Parameter], recipe: Recipe):
        """Optimizer groups: the method's own parameters at ``recipe.lr``, the head at ``recipe.head_lr``; the hp
        ``weight_decay`` (default 0, Adam's L2 penalty) applies to both."""
        wd = float(self.hp.get("weight_decay", 0.0))
        groups = [{"params": head, "lr": float(recipe.head_lr if recipe.head_lr is not None else recipe.lr),
                   "weight_decay": wd}]
        if adapter:
            groups.insert(0, {"params": adapter, "lr": float(recipe.lr), "weight_decay": wd})
        return groups

    def fit_task(self, t: int, num_classes: int, loader: DataLoader, train_eval: DataLoader, recipe: Recipe,
                 seed: int) -> Dict[str, Any]:
        """Train task ``t`` with ``recipe`` (what ``train_task`` does, for any method)."""
        self.recipe = recipe
        torch.manual_seed(seed)
        groups = self.begin_task(t, num_classes, train_eval)
        optimizer, scheduler = make_optimizer(groups, recipe)
        params = [p for g in groups for p in g["params"]]
        torch.manual_seed(seed)
        amp_dtype, scaler = _amp(self.device, self.ctx.amp)
        hist: Dict[str, List[float]] = {"train_loss": [], "train_acc": [], "epoch_s": []}
        for epoch in range(recipe.epochs):
            scheduler.step(epoch)
            self.train_mode(t)
            t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            for x, y, idx in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, logits = self._loss_and_logits(t, x, y, idx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.name}: loss {loss.item()} in epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                loss_sum += float(loss.detach()) * y.shape[0]
                correct += int((logits.argmax(1) == y).sum())
                seen += int(y.shape[0])
            hist["train_loss"].append(loss_sum / max(seen, 1))
            hist["train_acc"].append(correct / max(seen, 1))
            hist["epoch_s"].append(time.perf_counter() - t0)
            if self.ctx.on_epoch is not None:
                self.ctx.on_epoch({"task": t, "epoch": epoch + 1, **{k: v[-1] for k, v in hist.items()}})
            if epoch + 1 < recipe.epochs:  # no new epoch after the deadline
                self.ctx.check_deadline()
        optimizer.zero_grad(set_to_none=True)
        del params
        if self.recalibrate and recipe.epochs:
            net = self.network(t)
            net.train()
            recalibrate_bn(_bn_layers(net), net, loader, self.device)
        self.counts_.append(self.end_task(t))
        return hist

    def _loss_and_logits(self, t, x, y, idx):
        logits = self.forward(t, x, idx)
        return self._ce(logits, y), logits

    def counts(self, t: int) -> Dict[str, Any]:
        return self.counts_[t]


def _counts(trainable: int, bn_stats: int = 0, mask_bits: int = 0, **parts) -> Dict[str, Any]:
    values = int(trainable) + int(bn_stats)
    return {"trainable": int(trainable), "bn_stats": int(bn_stats), "mask_bits": int(mask_bits), "values": values,
            "bytes": 4 * values + math.ceil(mask_bits / 8), "parts": {k: int(v) for k, v in parts.items()}}


class LinearProbe(Method):
    name = "linear_probe"
    recalibrate = False

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.backbone = plain_backbone(ctx.weights).to(self.device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.cache: Optional[torch.Tensor] = None

    @torch.no_grad()
    def _features(self, x):
        self.backbone.eval()
        return self.backbone(x).float()

    def begin_task(self, t, num_classes, train_eval):
        # the training images are not augmented, so their features are computed once
        feats, order = [], []
        for x, _, idx in train_eval:
            feats.append(self._features(x.to(self.device)))
            order.append(idx)
        order = torch.cat(order)
        self.cache = torch.empty(int(order.max()) + 1, FEAT_DIM, device=self.device)
        self.cache[order.to(self.device)] = torch.cat(feats)
        return self._groups([], list(self._new_head(num_classes).parameters()), self.recipe)

    def train_mode(self, t):
        self.backbone.eval()
        self.heads[t].train()

    def forward(self, t, x, idx):
        return self.heads[t](self.cache[idx.to(self.device)])

    def end_task(self, t):
        self.cache = None
        return _counts(_n(self.heads[t].parameters()), head=_n(self.heads[t].parameters()))

    @torch.no_grad()
    def predict(self, t, x):
        return self.heads[t](self._features(x))


class _SharedNet:
    """A method whose tasks share one network ``self.net`` (with their own adapters or BN state) under a head each."""

    def train_mode(self, t):
        self.net.train()
        self.heads[t].train()

    def forward(self, t, x, idx):
        return self.heads[t](self.net(x))

    def network(self, t):
        return self.net


class _PerTaskBN:
    """Per-task BN affine and statistics on ``self.net`` (restored from the ImageNet values for every new task)."""

    net: nn.Module

    def _bn_setup(self) -> None:
        self.bn_init = _snapshot_bn(self.net)
        self.bn_tasks: List = []

    def _bn_begin(self) -> List[nn.Parameter]:
        _restore_bn(self.net, self.bn_init)
        params = _bn_affine_params(self.net)
        for p in params:
            p.requires_grad_(True)
        return params

    def _bn_end(self) -> Dict[str, int]:
        self.bn_tasks.append(_snapshot_bn(self.net))
        return {"bn_affine": _n(_bn_affine_params(self.net)), "bn_stats": _bn_stats_count(self.net)}

    def _bn_use(self, t: int) -> None:
        _restore_bn(self.net, self.bn_tasks[t])


class BNHead(_SharedNet, Method, _PerTaskBN):
    name = "bn_head"

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.net = plain_backbone(ctx.weights).to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._bn_setup()

    def begin_task(self, t, num_classes, train_eval):
        bn = self._bn_begin()
        return self._groups(bn, list(self._new_head(num_classes).parameters()), self.recipe)

    def end_task(self, t):
        bn = self._bn_end()
        head = _n(self.heads[t].parameters())
        return _counts(bn["bn_affine"] + head, bn["bn_stats"], bn_affine=bn["bn_affine"], head=head)

    @torch.no_grad()
    def predict(self, t, x):
        self._bn_use(t)
        self.net.eval()
        return self.heads[t](self.net(x))


class _Peft(_SharedNet, Method, _PerTaskBN):
    """A PEFT adapter per task (``add_adapter`` / ``set_adapter``) plus per-task BN and head."""

    kind = ""

    def _config(self, base: nn.Module):
        raise NotImplementedError

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        from peft import get_peft_model
        base = plain_backbone(ctx.weights)
        self.targets = lora_target_modules(base)
        self.config = self._config(base)
        self.net = get_peft_model(base, copy.deepcopy(self.config), adapter_name="task0").to(self.device)
        self._bn_setup()
        self.adapter_values = 0

    def begin_task(self, t, num_classes, train_eval):
        name = f"task{t}"
        if name not in self.net.peft_config:
            self.net.add_adapter(name, copy.deepcopy(self.config))
        self.net.set_adapter(name)
        for n, p in self.net.named_parameters():
            p.requires_grad_(self.kind in n and (f".{name}." in n or n.endswith(f".{name}")))
        adapter = [p for p in self.net.parameters() if p.requires_grad]
        self.adapter_values = _n(adapter)
        bn = self._bn_begin()
        return self._groups(adapter + bn, list(self._new_head(num_classes).parameters()), self.recipe)

    def end_task(self, t):
        bn = self._bn_end()
        for p in self.net.parameters():
            p.requires_grad_(False)
        head = _n(self.heads[t].parameters())
        out = _counts(self.adapter_values + bn["bn_affine"] + head, bn["bn_stats"],
                      **{self.name: self.adapter_values}, bn_affine=bn["bn_affine"], head=head)
        out.update(self._extra())
        return out

    def _extra(self) -> Dict[str, int]:
        return {}

    @torch.no_grad()
    def predict(self, t, x):
        self.net.set_adapter(f"task{t}")
        self._bn_use(t)
        self.net.eval()
        return self.heads[t](self.net(x))


class LoRA(_Peft):
    """PEFT LoRA; hp: ``rank``, ``alpha_mult`` (``lora_alpha = alpha_mult * rank``, default 2), ``rslora``
    (PEFT's ``use_rslora``: scale ``alpha / sqrt(r)`` instead of ``alpha / r``; default False), ``head_conv``
    (adapt ``conv_head`` too; default True)."""
    name = "lora"
    kind = "lora_"

    def _config(self, base):
        from peft import LoraConfig
        self.rank = int(self.hp["rank"])
        if not self.hp.get("head_conv", True):
            self.targets = [n for n in self.targets if n != "conv_head"]
        alpha = float(self.hp.get("alpha_mult", 2.0)) * self.rank
        return LoraConfig(r=self.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(self.targets),
                          bias="none", use_rslora=bool(self.hp.get("rslora", False)))

    def _extra(self):
        return {"rank": self.rank, "layers": len(self.targets)}


IA3_MODULES = ("all", "no_head", "blocks")


def ia3_targets(model: nn.Module, modules: str = "all") -> List[str]:
    """The convs IA3 scales: ``"all"`` ungrouped convs (stem, every 1x1 conv, head conv), ``"no_head"`` (without
    ``conv_head``) or ``"blocks"`` (the 1x1 convs inside the blocks only: no stem, no head conv)."""
    if modules not in IA3_MODULES:
        raise ValueError(f"ia3: modules must be one of {IA3_MODULES}, got {modules!r}")
    names = lora_target_modules(model)
    if modules == "no_head":
        return [n for n in names if n != "conv_head"]
    if modules == "blocks":
        return [n for n in names if n.startswith("blocks.")]
    return names


class IA3(_Peft):
    """PEFT IA3; hp ``modules`` (:func:`ia3_targets`, default ``"all"``)."""
    name = "ia3"
    kind = "ia3_"

    def _config(self, base):
        from peft import IA3Config
        self.targets = ia3_targets(base, self.hp.get("modules", "all"))
        return IA3Config(target_modules=list(self.targets), feedforward_modules=list(self.targets))

    def _extra(self):
        return {"layers": len(self.targets)}


class _BinarizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask_real, threshold):
        return (mask_real > threshold).to(mask_real.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PiggybackConv2d(nn.Module):
    """A frozen Conv2d whose weight is multiplied by a binary mask (real-valued while training, straight-through)."""

    def __init__(self, conv: nn.Conv2d, init: float, threshold: float) -> None:
        super().__init__()
        self.conv = conv
        for p in conv.parameters():
            p.requires_grad_(False)
        self.init, self.threshold = init, threshold
        self.mask_real = nn.Parameter(torch.full_like(conv.weight, init))
        self.fixed_mask: Optional[torch.Tensor] = None

    def reset_mask(self) -> None:
        with torch.no_grad():
            self.mask_real.fill_(self.init)
        self.fixed_mask = None

    def binary_mask(self) -> torch.Tensor:
        return self.mask_real.detach() > self.threshold

    def forward(self, x):
        if self.fixed_mask is not None:
            mask = self.fixed_mask.to(self.conv.weight.dtype)
        else:
            mask = _BinarizeSTE.apply(self.mask_real, self.threshold)
        return self.conv._conv_forward(x, self.conv.weight * mask, self.conv.bias)


def schedule_travel(recipe: Recipe, steps_per_epoch: int) -> float:
    """How far one value can move under Adam with ``recipe`` over ``steps_per_epoch * recipe.epochs`` steps: the sum
    of the scheduled learning rates of ``recipe.lr``'s group (an Adam step moves a value by at most about its rate,
    exactly that when its gradient keeps its sign)."""
    if recipe.epochs < 1 or steps_per_epoch < 1:
        return 0.0
    probe = nn.Parameter(torch.zeros(1))
    optimizer, scheduler = make_optimizer([{"params": [probe], "lr": float(recipe.lr)}], recipe)
    total = 0.0
    for epoch in range(recipe.epochs):
        scheduler.step(epoch)
        total += float(optimizer.param_groups[0]["lr"]) * steps_per_epoch
    return total


MASK_SAMPLE_N = 65_536  # entries of the concatenated masks kept per cell (the same indices for every cell)


def mask_sample_indices(total: int, n: int = MASK_SAMPLE_N) -> np.ndarray:
    """The fixed sample of mask entries a Piggyback cell reports (seed 0, sorted; all entries if fewer)."""
    if total <= n:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).choice(total, size=n, replace=False))


class Piggyback(_SharedNet, Method, _PerTaskBN):
    """Piggyback; hp ``margin`` (default 0.5): the real-valued mask scores start at ``THRESHOLD + margin * travel``
    where ``travel`` (:func:`schedule_travel`) is how far Adam can move a score over the task's steps, so an entry
    flips only when its gradient pushed it down for more than that fraction of the run, whatever the lr and the
    number of steps (a fixed init flips everything whose first gradients point down once the rate is large enough:
    the 0.2 benchmark flipped 24 % of entries at any data). Each cell reports the flipped fraction (overall, per
    layer), the SHA-256 of the packed mask bits and the packed bits of a fixed sample of entries
    (:func:`mask_sample_indices`) for agreement across seeds."""
    name = "piggyback"
    THRESHOLD = 5e-3
    DEFAULT_MARGIN = 0.5

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.margin = float(hp.get("margin", self.DEFAULT_MARGIN))
        if not self.margin > 0:
            raise ValueError(f"piggyback: margin must be positive, got {self.margin!r}")
        self.net = plain_backbone(ctx.weights)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.layers: List[PiggybackConv2d] = []
        for name, mod in list(self.net.named_modules()):
            if isinstance(mod, nn.Conv2d):
                parent = self.net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.net
                wrapped = PiggybackConv2d(mod, 2 * self.THRESHOLD, self.THRESHOLD)
                setattr(parent, name.rsplit(".", 1)[-1], wrapped)
                self.layers.append(wrapped)
        self.net.to(self.device)
        self._bn_setup()
        self.masks: List[List[torch.Tensor]] = []
        self.init = 2 * self.THRESHOLD

    def begin_task(self, t, num_classes, train_eval):
        for layer in self.layers:
            layer.init = self.init
            layer.reset_mask()
            layer.mask_real.requires_grad_(True)
        bn = self._bn_begin()
        masks = [layer.mask_real for layer in self.layers]
        return self._groups(masks + bn, list(self._new_head(num_classes).parameters()), self.recipe)

    def end_task(self, t):
        masks = [layer.binary_mask().clone() for layer in self.layers]
        for layer, m in zip(self.layers, masks):  # statistics are recomputed with the binary masks already fixed
            layer.fixed_mask = m
        self.masks.append(masks)
        bn = self._bn_end()
        for p in self.net.parameters():
            p.requires_grad_(False)
        bits = sum(m.numel() for m in masks)
        zeros = sum(int((~m).sum()) for m in masks)
        head = _n(self.heads[t].parameters())
        out = _counts(bn["bn_affine"] + head, bn["bn_stats"], bits, bn_affine=bn["bn_affine"], head=head)
        out["mask_zero_fraction"] = zeros / bits  # the masks start all ones: this is the fraction that flipped
        out["mask_zero_fraction_per_layer"] = [float((~m).float().mean()) for m in masks]
        flat = torch.cat([m.reshape(-1) for m in masks]).cpu().numpy()
        out["mask_sha256"] = hashlib.sha256(np.packbits(flat).tobytes()).hexdigest()
        out["mask_sample"] = pack_bits(flat[mask_sample_indices(flat.size)])
        out["mask_sample_n"] = int(min(flat.size, MASK_SAMPLE_N))
        out["mask_init"] = self.init
        out["mask_margin"] = self.margin
        return out

    @torch.no_grad()
    def predict(self, t, x):
        for layer, m in zip(self.layers, self.masks[t]):
            layer.fixed_mask = m
        self._bn_use(t)
        self.net.eval()
        return self.heads[t](self.net(x))

    def fit_task(self, t, num_classes, loader, train_eval, recipe, seed):
        self.init = self.THRESHOLD + self.margin * schedule_travel(recipe, len(loader))
        # BN statistics must be recalibrated with the final *binary* masks: fix them before the recalibration pass
        recalibrate, self.recalibrate = self.recalibrate, False
        try:
            hist = super().fit_task(t, num_classes, loader, train_eval, recipe, seed)
        finally:
            self.recalibrate = recalibrate
        if recalibrate and recipe.epochs:
            for layer, m in zip(self.layers, self.masks[t]):
                layer.fixed_mask = m
            self.net.train()
            recalibrate_bn(_bn_layers(self.net), self.net, loader, self.device)
            self.bn_tasks[t] = _snapshot_bn(self.net)
        return hist


class FullFinetune(Method):
    name = "full_finetune"

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.template = plain_backbone(ctx.weights)
        self.models = nn.ModuleList()

    def begin_task(self, t, num_classes, train_eval):
        net = copy.deepcopy(self.template).to(self.device)
        self.models.append(net)
        return self._groups(list(net.parameters()), list(self._new_head(num_classes).parameters()), self.recipe)

    def train_mode(self, t):
        self.models[t].train()
        self.heads[t].train()

    def forward(self, t, x, idx):
        return self.heads[t](self.models[t](x))

    def network(self, t):
        return self.models[t]

    def end_task(self, t):
        net = _n(self.models[t].parameters())
        head = _n(self.heads[t].parameters())
        for p in self.models[t].parameters():
            p.requires_grad_(False)
        return _counts(net + head, _bn_stats_count(self.models[t]), network=net, head=head)

    @torch.no_grad()
    def predict(self, t, x):
        self.models[t].eval()
        return self.heads[t](self.models[t](x))


class SeqFinetune(Method):
    name = "seq_finetune"
    forgetting_free = False

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.net = plain_backbone(ctx.weights).to(self.device)

    def begin_task(self, t, num_classes, train_eval):
        return self._groups(list(self.net.parameters()), list(self._new_head(num_classes).parameters()), self.recipe)

    def train_mode(self, t):
        self.net.train()
        self.heads.train()

    def forward(self, t, x, idx):
        return self.heads[t](self.net(x))

    def network(self, t):
        return self.net

    def end_task(self, t):
        head = _n(self.heads[t].parameters())
        out = _counts(head, head=head)
        out["shared_values"] = _n(self.net.parameters()) + _bn_stats_count(self.net)
        return out

    @torch.no_grad()
    def predict(self, t, x):
        self.net.eval()
        return self.heads[t](self.net(x))


class LwF(SeqFinetune):
    """LwF; hp ``bn``: ``"frozen"`` (default: the BN running statistics stay the ImageNet ones, BN layers in eval
    mode while training, no recalibration; the affine is shared and trained) or ``"per_task"`` (train-mode BN, then
    the statistics recalibrated and kept per task, restored for prediction; counted in the task's bytes)."""
    name = "lwf"
    LAMBDA, T = 1.0, 2.0
    BN_MODES = ("frozen", "per_task")

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.bn_mode = hp.get("bn", "frozen")
        if self.bn_mode not in self.BN_MODES:
            raise ValueError(f"lwf: bn must be one of {self.BN_MODES}, got {self.bn_mode!r}")
        self.recalibrate = self.bn_mode == "per_task"
        self.bn_stats: List[List[Dict[str, torch.Tensor]]] = []

    def train_mode(self, t):
        super().train_mode(t)
        if self.bn_mode == "frozen":
            for m in _bn_layers(self.net):
                m.eval()

    def _stats(self) -> List[Dict[str, torch.Tensor]]:
        return [{"running_mean": m.running_mean.detach().clone(), "running_var": m.running_var.detach().clone()}
                for m in _bn_layers(self.net)]

    def end_task(self, t):
        out = super().end_task(t)
        if self.bn_mode == "per_task":
            self.bn_stats.append(self._stats())
            stats = _bn_stats_count(self.net)
            head = out["parts"]["head"]
            out.update({k: v for k, v in _counts(head, stats, head=head).items()})
        out["bn"] = self.bn_mode
        return out

    @torch.no_grad()
    def predict(self, t, x):
        if self.bn_mode == "per_task":
            for m, st in zip(_bn_layers(self.net), self.bn_stats[t]):
                m.running_mean.copy_(st["running_mean"])
                m.running_var.copy_(st["running_var"])
        return super().predict(t, x)

    def begin_task(self, t, num_classes, train_eval):
        if self.bn_mode == "per_task" and self.bn_stats:  # the network as the last task left it
            for m, st in zip(_bn_layers(self.net), self.bn_stats[-1]):
                m.running_mean.copy_(st["running_mean"])
                m.running_var.copy_(st["running_var"])
        self.old: List[torch.Tensor] = []
        if t > 0:  # outputs of the old heads on the new task's images, before training on it
            self.net.eval()
            outs: List[List[torch.Tensor]] = [[] for _ in range(t)]
            order = []
            with torch.no_grad():
                for x, _, idx in train_eval:
                    f = self.net(x.to(self.device))
                    for k in range(t):
                        outs[k].append(self.heads[k](f).float())
                    order.append(idx)
            order = torch.cat(order).to(self.device)
            for k in range(t):
                o = torch.cat(outs[k])
                table = torch.empty(int(order.max()) + 1, o.shape[1], device=self.device)
                table[order] = o
                self.old.append(table)
        head = self._new_head(num_classes)
        old_heads = [p for k in range(t) for p in self.heads[k].parameters()]
        return self._groups(list(self.net.parameters()), list(head.parameters()) + old_heads, self.recipe)

    def _loss_and_logits(self, t, x, y, idx):
        f = self.net(x)
        logits = self.heads[t](f)
        loss = self._ce(logits, y)
        idx = idx.to(self.device)
        for k, table in enumerate(self.old):
            log_p = F.log_softmax(self.heads[k](f).float() / self.T, dim=1)
            q = F.softmax(table[idx] / self.T, dim=1)
            loss = loss + self.LAMBDA * -(q * log_p).sum(1).mean()
        return loss, logits


class ModCL(Method):
    """timm_modcl trained by its own ``train_task`` (``use_train_task=False`` runs this module's loop instead).

    hp: ``config`` (a ``TaskConfig`` dict; default the library's), ``weight_decay`` / ``label_smoothing`` (passed to
    ``train_task``; its weight decay covers modulators, norm affine and head alike), and three structural options
    ``train_task`` has no argument for, which train through this module's loop (the same loop, bit for bit, see
    ``tests/test_benchmark.py``): ``norm_lr_mult`` (the per-task norm affine, ``task_weight`` / ``task_bias``, at
    ``lr * norm_lr_mult``), ``modulator_weight_decay`` (L2 on the modulators only: modulation is ``W * (1 + M)``,
    so this pulls the task towards the pretrained weights, while weight decay on the norm affine would pull gamma
    towards 0), and ``head_init="probe"`` (LP-FT: the new head is first fitted by L-BFGS on the frozen
    network's features of the training images, the task's modulators still at identity, then everything trains).
    """
    name = "modcl"
    use_train_task = True
    PROBE_STEPS, PROBE_L2 = 100, 1e-4

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        from timm_modcl.config import TaskConfig
        self.config = TaskConfig.from_dict(hp["config"]) if "config" in hp else None
        self.model = modcl_model(ctx.weights).to(self.device)
        self.norm_lr_mult = hp.get("norm_lr_mult")
        self.modulator_wd = hp.get("modulator_weight_decay")
        self.head_init = hp.get("head_init")
        if self.head_init not in (None, "probe"):
            raise ValueError(f"modcl: head_init must be None or 'probe', got {self.head_init!r}")
        if self.norm_lr_mult is not None or self.modulator_wd is not None:
            self.use_train_task = False  # separate groups: train_task has one group for modulators and norm affine

    def _name(self, t):
        return f"task{t}"

    def begin_task(self, t, num_classes, train_eval):
        kwargs = {} if self.config is None else {"config": self.config}
        self.model.add_task(self._name(t), num_classes, **kwargs)
        head = list(self.model._task(self._name(t)).head.parameters())
        if self.head_init == "probe":
            self._probe_head(t, head, train_eval)
        ids = {id(p) for p in head}
        own = self.model.task_parameters(self._name(t))   # the new task's tensors (every task's are in the model)
        if self.norm_lr_mult is None and self.modulator_wd is None:
            return self._groups([p for p in own if id(p) not in ids], head, self.recipe)
        norm_ids = {id(v) for k, v in self.model.task_tensors(self._name(t)).items() if k.startswith("norm.")}
        norm = [p for p in own if id(p) not in ids and id(p) in norm_ids]
        ids |= {id(p) for p in norm}
        groups = self._groups([p for p in own if id(p) not in ids], head, self.recipe)
        if self.modulator_wd is not None:
            groups[0]["weight_decay"] = float(self.modulator_wd)
        if norm:
            groups.insert(1, {"params": norm, "lr": float(self.recipe.lr) * float(self.norm_lr_mult or 1.0),
                              "weight_decay": float(self.hp.get("weight_decay", 0.0))})
        return groups

    def _probe_head(self, t: int, head: List[nn.Parameter], train_eval: DataLoader) -> None:
        """Fit the new head (``weight``, ``bias``) on the network's features (eval mode) by full-batch L-BFGS."""
        model = self.model
        model.set_task(self._name(t))
        was_training = model.training
        model.eval()
        feats, labels = [], []
        with torch.no_grad():
            for x, y, _ in train_eval:
                f = model.forward_head(model.forward_features(x.to(self.device)), pre_logits=True)
                feats.append(f.float())
                labels.append(y.to(self.device))
        model.train(was_training)
        f, y = torch.cat(feats), torch.cat(labels)
        weight, bias = head
        w = weight.detach().clone().requires_grad_(True)
        b = bias.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.PROBE_STEPS, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(f @ w.t() + b, y) + self.PROBE_L2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            weight.copy_(w)
            bias.copy_(b)

    def train_mode(self, t):
        self.model.train()

    def forward(self, t, x, idx):
        return self.model(x)

    def network(self, t):
        return self.model

    def end_task(self, t):
        info = self.model.tasks[self._name(t)]
        stats = info.num_norm_values - info.num_norm_affine
        return _counts(info.num_trainable_params, stats, modulators=info.num_modulator_params,
                       bn_affine=info.num_norm_affine, head=info.num_head_params)

    @torch.no_grad()
    def predict(self, t, x):
        self.model.set_task(self._name(t))
        self.model.eval()
        return self.model(x)

    def fit_task(self, t, num_classes, loader, train_eval, recipe, seed):
        if not self.use_train_task:
            return super().fit_task(t, num_classes, loader, train_eval, recipe, seed)
        from timm_modcl.train import train_task
        self.recipe = recipe
        torch.manual_seed(seed)
        self.begin_task(t, num_classes, train_eval)
        ctx = self.ctx

        def callback(history):
            if ctx.on_epoch is not None:
                ctx.on_epoch({"task": t, "epoch": history.epochs, "train_loss": history.train_loss[-1],
                              "train_acc": history.train_acc[-1], "epoch_s": history.epoch_time_s[-1]})
            if history.epochs < recipe.epochs:
                ctx.check_deadline()
            return False

        h = train_task(self.model, self._name(t), loader, epochs=recipe.epochs, batch_size=recipe.batch_size,
                       lr=recipe.lr, head_lr=recipe.head_lr, sched=recipe.sched, warmup_epochs=recipe.warmup_epochs,
                       milestones=recipe.milestones, gamma=recipe.gamma, seed=seed, amp=ctx.amp, device=self.device,
                       progress=False, callback=callback, recalibrate_bn=True,
                       weight_decay=float(self.hp.get("weight_decay", 0.0)),
                       label_smoothing=float(self.hp.get("label_smoothing", 0.0)),
                       prototypes=False)  # task-agnostic statistics are optional and not what is compared
        self.counts_.append(self.end_task(t))
        return {"train_loss": h.train_loss, "train_acc": h.train_acc, "epoch_s": h.epoch_time_s}


class ModCLLoRA(ModCL):
    """The library's own per-task LoRA (``TaskConfig(method="lora")``: every conv, depthwise included, per-task BN
    affine), trained by ``train_task`` exactly like :class:`ModCL`. hp: ``rank`` (default 8), ``alpha_mult``
    (``alpha = alpha_mult * rank``, default 1: the library's scale 1), ``rslora`` (scale ``alpha_mult *
    sqrt(rank)``, i.e. ``alpha = alpha_mult * rank * sqrt(rank)``); and ModCL's other hp."""
    name = "modcl_lora"

    def __init__(self, ctx, hp):
        hp = dict(hp)
        rank = int(hp.get("rank", 8))
        alpha = float(hp.get("alpha_mult", 1.0)) * rank * (math.sqrt(rank) if hp.get("rslora", False) else 1.0)
        hp["config"] = {"method": "lora", "rank": rank, "alpha": alpha, "bn_affine": True, "resolution": [4, 4],
                        "variant": "identity", "layer_resolution": []}
        self.rank = rank
        super().__init__(ctx, hp)

    def end_task(self, t):
        out = super().end_task(t)
        out["rank"] = self.rank
        return out


_REGISTRY = {cls.name: cls for cls in (LinearProbe, BNHead, LoRA, IA3, Piggyback, FullFinetune, SeqFinetune, LwF,
                                       ModCL, ModCLLoRA)}


def build_method(name: str, ctx: Context, hp: Dict[str, Any]) -> Method:
    """A fresh method object (``hp``: its options, e.g. ``rank`` for LoRA or ``config`` for modcl)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return _REGISTRY[name](ctx, hp)


# ---------------------------------------------------------------------------------------------------- evaluation
def pack_bits(correct: np.ndarray) -> str:
    """A boolean vector as base64 of its packed bits (per-image correctness kept for paired bootstraps)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


@torch.inference_mode()
def correctness(method: Method, t: int, loader: DataLoader) -> np.ndarray:
    """Per-image top-1 correctness of task ``t`` on ``loader``'s images (eval mode)."""
    out = []
    for x, y, _ in loader:
        x = x.to(method.device, non_blocking=True)
        with torch.autocast(method.device.type, dtype=torch.bfloat16,
                            enabled=method.ctx.amp and method.device.type == "cuda"):
            pred = method.predict(t, x).float().argmax(1).cpu()
        out.append((pred == y).numpy())
    return np.concatenate(out)


def _eval_loaders(splits: _fetch.TaskSplits, ctx: Context, batch_size: int = 256):
    pin = ctx.device.startswith("cuda")
    return {
        "val": make_loader(ImageSet(splits.x_val, splits.y_val), ctx.size, batch_size, False,
                           num_workers=ctx.num_workers, pin_memory=pin),
        "test": make_loader(ImageSet(splits.x_test, splits.y_test), ctx.size, batch_size, False,
                            num_workers=ctx.num_workers, pin_memory=pin),
    }


def _train_loaders(splits: _fetch.TaskSplits, ctx: Context, recipe: Recipe, seed: int):
    ds = ImageSet(splits.x_train, splits.y_train)
    pin = ctx.device.startswith("cuda")
    return (make_loader(ds, ctx.size, recipe.batch_size, True, seed, ctx.num_workers, pin),
            make_loader(ds, ctx.size, 256, False, num_workers=ctx.num_workers, pin_memory=pin))


def task_seed(seed: int, task_index: int) -> int:
    """The RNG seed of one task of one run: the same whether the task is trained alone or in a sequence."""
    return int(seed) * 1000 + int(task_index)


def run_task_cell(method_name: str, hp: Dict[str, Any], recipe: Recipe, splits: _fetch.TaskSplits,
                  task_index: int, seed: int, ctx: Context, evaluate: Sequence[str] = ("val",)) -> Dict[str, Any]:
    """Train one task of a forgetting-free method on a fresh model and evaluate it (``evaluate``: splits).

    Tasks of these methods never touch each other (each starts from the frozen ImageNet network), so a task trained
    alone gives what it gives inside a sequence (``tests/test_benchmark.py`` checks that old tasks do not drift).
    """
    t0 = time.perf_counter()
    sseed = task_seed(seed, task_index)
    torch.manual_seed(sseed)  # adapters created with the method (PEFT's first adapter) start from the same values
    method = build_method(method_name, ctx, hp)
    loader, train_eval = _train_loaders(splits, ctx, recipe, sseed)
    hist = method.fit_task(0, splits.num_classes, loader, train_eval, recipe, sseed)
    t1 = time.perf_counter()
    out: Dict[str, Any] = {"history": hist, "counts": method.counts(0), "train_images": len(splits.y_train),
                           "train_s": t1 - t0}
    loaders = _eval_loaders(splits, ctx)
    for split in evaluate:
        c = correctness(method, 0, loaders[split])
        out[f"{split}_acc"] = float(c.mean())
        out[f"{split}_n"] = int(c.size)
        if split == "test":
            out["test_correct"] = pack_bits(c)
    out["eval_s"] = time.perf_counter() - t1
    return out


def run_sequence_cell(method_name: str, hp: Dict[str, Any], recipe: Recipe, tasks: List[_fetch.TaskSplits],
                      task_indices: Sequence[int], seed: int, ctx: Context,
                      evaluate: Sequence[str] = ("val",)) -> Dict[str, Any]:
    """Train a method on the tasks in order; after each task evaluate every task seen so far (accuracy matrices)."""
    t0 = time.perf_counter()
    torch.manual_seed(task_seed(seed, task_indices[0]))
    method = build_method(method_name, ctx, hp)
    loaders = [_eval_loaders(s, ctx) for s in tasks]
    T = len(tasks)
    mats = {split: [[None] * T for _ in range(T)] for split in evaluate}
    out: Dict[str, Any] = {"history": [], "counts": [], "train_images": [], "train_s": 0.0, "eval_s": 0.0}
    final_correct = {}
    for t, (splits, ti) in enumerate(zip(tasks, task_indices)):
        s0 = time.perf_counter()
        sseed = task_seed(seed, ti)
        loader, train_eval = _train_loaders(splits, ctx, recipe, sseed)
        out["history"].append(method.fit_task(t, splits.num_classes, loader, train_eval, recipe, sseed))
        out["counts"].append(method.counts(t))
        out["train_images"].append(len(splits.y_train))
        s1 = time.perf_counter()
        out["train_s"] += s1 - s0
        for split in evaluate:
            for j in range(t + 1):
                c = correctness(method, j, loaders[j][split])
                mats[split][t][j] = float(c.mean())
                if t == T - 1 and split == "test":
                    final_correct[j] = pack_bits(c)
        out["eval_s"] += time.perf_counter() - s1
    for split in evaluate:
        out[f"{split}_matrix"] = mats[split]
        out[f"{split}_acc"] = mats[split][T - 1]
        out[f"{split}_n"] = [int(len(s.y_val if split == "val" else s.y_test)) for s in tasks]
    if final_correct:
        out["test_correct"] = [final_correct[j] for j in range(T)]
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------------- budgets
def budget_counts(method: str, hp: Dict[str, Any], num_classes: int, ctx: Optional[Context] = None) -> Dict[str, Any]:
    """What one task of ``method`` with ``hp`` stores (the ``counts`` a trained cell reports), without training:
    the method is built (random init unless ``ctx`` says otherwise: the shapes are the same) and set up for a
    ``num_classes`` task with zero epochs on a few synthetic images.

    Raises:
        ValueError: an unknown method or a bad hp value.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes!r}")
    ctx = ctx or Context(weights=None, size=32)
    n = max(2 * int(num_classes), 4)
    x = np.random.default_rng(0).integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    y = np.arange(n) % int(num_classes)
    loader = make_loader(ImageSet(x, y), ctx.size, 4, shuffle=False)
    method_obj = build_method(method, ctx, hp)
    method_obj.fit_task(0, int(num_classes), loader, loader, Recipe(epochs=0), seed=0)
    return method_obj.counts(0)


def budget_bytes(method: str, hp: Dict[str, Any], num_classes: int, ctx: Optional[Context] = None) -> int:
    """Bytes one task of ``method`` with ``hp`` costs stored (``counts["bytes"]``: fp32 values + BN statistics +
    head, Piggyback's masks as bits), computed without training (:func:`budget_counts`).

    Raises:
        ValueError: an unknown method or a bad hp value.
    """
    return int(budget_counts(method, hp, num_classes, ctx)["bytes"])


#: Three structural options per method, merged into the method's hp (``{**hp, **option}``); the first is the
#: method's default structure. Every option changes training (``tests/test_benchmark_baselines.py``).
STRUCTURE: Dict[str, List[Dict[str, Any]]] = {
    "linear_probe": [{}, {"weight_decay": 1e-3}, {"label_smoothing": 0.1}],
    "bn_head": [{}, {"weight_decay": 1e-3}, {"label_smoothing": 0.1}],
    "lora": [{}, {"alpha_mult": 1.0}, {"rslora": True}],  # alpha 2r / r / rsLoRA (2r / sqrt r; = default at r 1)
    "ia3": [{}, {"modules": "no_head"}, {"modules": "blocks"}],          # all ungrouped convs / no head conv / blocks
    "piggyback": [{}, {"margin": 0.25}, {"margin": 0.75}],               # medium 0.5 / small / large
    "full_finetune": [{}, {"weight_decay": 1e-3}, {"label_smoothing": 0.1}],
    "seq_finetune": [{}, {"weight_decay": 1e-3}, {"label_smoothing": 0.1}],
    "lwf": [{}, {"bn": "per_task"}, {"label_smoothing": 0.1}],            # frozen BN statistics / per-task / smoothing
    "modcl": [{}, {"norm_lr_mult": 0.1}, {"head_init": "probe"}],         # default / norm affine at lr/10 / LP-FT
    "modcl_lora": [{}, {"alpha_mult": 2.0}, {"rslora": True}],            # alpha r / 2r / rsLoRA (r / sqrt r)
}


def _modcl_profile(resolution, layers=()) -> Dict[str, Any]:
    return {"config": {"resolution": list(resolution), "variant": "identity", "bn_affine": True,
                       "layer_resolution": [[p, list(r)] for p, r in layers]}}


#: The accuracy-vs-bytes curve: ``(label, method, hp)``. modcl from coarse to fine modulation (a larger resolution
#: is a coarser modulator: fewer values), one profile whose bytes equal PEFT LoRA rank 4's within 2 % (uniform
#: (6, 6) with a (4, 4) head conv: 619,788 vs 621,528 bytes for 10 classes, -0.3 %), the library's default
#: profile; PEFT LoRA and the library's per-task LoRA at ranks 1, 2, 4, 8; IA3, BN + head, Piggyback. Bytes per
#: task for 10 classes (:func:`budget_bytes`): modcl 357,952 / 460,888 / 619,788 / 793,024 / 871,576; PEFT LoRA
#: 398,484 / 472,832 / 621,528 / 918,920; library LoRA 427,640 / 531,144 / 738,152 / 1,152,168; IA3 358,708;
#: BN + head 324,136; Piggyback 597,856.
BUDGETS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("modcl (16,16)", "modcl", _modcl_profile((16, 16))),
    ("modcl (8,8)", "modcl", _modcl_profile((8, 8))),
    ("modcl (6,6), head (4,4) = LoRA r4 bytes", "modcl", _modcl_profile((6, 6), [("conv_head", (4, 4))])),
    ("modcl default profile", "modcl", {}),
    ("modcl (4,4)", "modcl", _modcl_profile((4, 4))),
    *[(f"PEFT LoRA r{r}", "lora", {"rank": r}) for r in (1, 2, 4, 8)],
    *[(f"library LoRA r{r}", "modcl_lora", {"rank": r}) for r in (1, 2, 4, 8)],
    ("PEFT IA3", "ia3", {}),
    ("BN + head", "bn_head", {}),
    ("Piggyback", "piggyback", {}),
]
