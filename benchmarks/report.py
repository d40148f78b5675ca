"""Tables, plots and README section of the accuracy benchmark, from its JSON.

    python benchmarks/report.py                          # accuracy.md and plots from benchmarks/results/accuracy.json
    python benchmarks/report.py --json benchmarks/results/accuracy_v2.json   # protocol v2: accuracy_v2.md + plot
    python benchmarks/report.py --readme README.md       # also rewrite README's table between its markers
    python benchmarks/report.py --json benchmarks/results/accuracy_v2.json --readme README.md   # from protocol v2

README's section sits between ``<!-- accuracy-benchmark:start -->`` and ``<!-- accuracy-benchmark:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- accuracy-benchmark:start -->", "<!-- accuracy-benchmark:end -->"
SHORT = {"fashion_mnist": "F-MNIST", "animal_shape": "Animal", "mnist5k": "MNIST-5k", "digits": "digits"}


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _ms(d: Optional[Dict[str, float]], digits: int = 1) -> str:
    if not d:
        return "–"
    return f"{100 * d['mean']:.{digits}f} ± {100 * d['sd']:.{digits}f}"


def _kib(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / 1024:,.0f} KiB"


def _diff(s: Dict[str, Any]) -> str:
    d = s.get("diff_vs_modcl")
    if not d:
        return "(reference)" if s.get("_is_ref") else "–"
    lo, hi = d["ci"]
    v = d.get("verdict")
    tag = "" if v is None else (" **modcl better**" if v == "modcl better" else " **baseline better**")
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{tag}"


def _lr(row: Optional[Dict[str, Any]]) -> str:
    if not row:
        return "–"
    if abs(row["head_lr"] - row["lr"]) < 1e-12:
        return f"{row['lr']:g}"
    return f"{row['lr']:g} / {row['head_lr']:g}"


def _config(hp: Dict[str, Any]) -> str:
    c = hp.get("config")
    if not c:
        return ", ".join(f"{k}={v}" for k, v in hp.items()) or "–"
    parts = [f"resolution {tuple(c['resolution']) if c['resolution'] else None}", f"variant {c['variant']}",
             f"bn_affine {c['bn_affine']}"]
    if c.get("layer_resolution"):
        parts.append("layers " + ", ".join(f"{p}: {tuple(r) if r else None}" for p, r in c["layer_resolution"]))
    return "; ".join(parts)


def main_table(summary: Dict[str, Any], with_tasks: bool = True) -> str:
    tasks = summary["settings"]["tasks"]
    head = ["method", "test accuracy, mean ± sd (%)"]
    if with_tasks:
        head += [SHORT.get(t, t) for t in tasks]
    head += ["vs modcl default, points [95 % CI]", "values / task", "bytes / task", "forgetting (points)",
             "lr / head lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary["methods"].items():
        s = dict(s, _is_ref=name == "modcl")
        rank = (s.get("counts_per_task") or {}).get(tasks[0], {}).get("rank")
        row = [s["label"] + (f", rank {rank}" if rank else ""), _ms(s.get("test_avg"))]
        if with_tasks:
            row += [_ms(s.get("test_per_task", {}).get(t)) for t in tasks]
        vals = s.get("values_per_task")
        if s.get("mask_bits_per_task"):
            vals_s = f"{vals:,} + {s['mask_bits_per_task']:,} mask bits"
        else:
            vals_s = "–" if vals is None else f"{vals:,}"
        forg = s.get("forgetting", {})
        row += [_diff(s), vals_s, _kib(s.get("bytes_per_task")),
                f"{100 * forg.get('mean', 0):.1f}" + (f" ± {100 * forg['sd']:.1f}" if forg.get("sd") else ""),
                _lr(s.get("chosen"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def validation_tables(summary: Dict[str, Any]) -> str:
    out = []
    for name, s in summary["methods"].items():
        rows = s.get("validation") or []
        if not rows:
            continue
        out.append(f"\n**{s['label']}** (chosen: lr {_lr(s['chosen'])}, {s['chosen'].get('sched')}"
                   + (f", warm-up {s['chosen']['warmup_epochs']}" if s['chosen'].get('warmup_epochs') else "")
                   + (f"; {_config(s['chosen']['hp'])}" if name == "modcl" else "") + ")\n")
        out.append("| step | lr | head lr | sched | setting | validation accuracy (%) |")
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            setting = _config(r["hp"]) if name == "modcl" else ""
            if r.get("warmup_epochs"):
                setting += f" warm-up {r['warmup_epochs']}"
            out.append(f"| {r['stage']} | {r['lr']:g} | {r['head_lr']:g} | {r['sched']} | {setting} | "
                       f"{100 * r['val_mean']:.2f} |")
    return "\n".join(out)


def sweep_table(summary: Dict[str, Any]) -> str:
    sw = summary.get("sweep")
    if not sw:
        return ""
    sizes = sw["sizes"]
    lines = ["| method | " + " | ".join(f"{n:,} images" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m, by_n in sw["methods"].items():
        cells = []
        for n in sizes:
            r = by_n.get(str(n), {})
            cell = _ms(r.get("test_avg"))
            d = r.get("diff_vs_modcl")
            if d:
                cell += f" ({100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}])"
            if r.get("chosen"):
                cell += f", lr {_lr(r['chosen'])}"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    cross = []
    for m, c in sw.get("crossings", {}).items():
        diffs = ", ".join("–" if d is None else f"{100 * d:+.1f}" for d in c["modcl_minus_other"])
        where = "; crosses " + ", ".join(c["crossings"]) if c["crossings"] else "; no crossing in this range"
        cross.append(f"- modcl − {m}: {diffs} points at {', '.join(f'{n:,}' for n in sizes)}{where}.")
    return "\n".join(lines) + ("\n\n" + "\n".join(cross) if cross else "")


def target_text(summary: Dict[str, Any]) -> str:
    t = summary.get("target", {})
    if not t.get("evaluated"):
        return "Target not evaluated (incomplete run)."
    beats = t.get("beats_every_smaller_or_equal_baseline", {})
    missing = [m for m, ok in beats.items() if not ok]
    parts = [f"modcl default {_kib(t.get('modcl_bytes'))} per task vs LoRA {_kib(t.get('lora_bytes'))}"]
    parts.append("better than every baseline of at most LoRA's size (interval excluding 0)" if not missing else
                 "not shown better than: " + ", ".join(missing))
    if "full_finetune_minus_modcl" in t:
        lo, hi = t["full_finetune_minus_modcl_ci"]
        parts.append(f"full fine-tuning − modcl = {100 * t['full_finetune_minus_modcl']:+.1f} points "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (target: at most +1.0)")
    return ("**Target met.** " if t.get("met") else "**Target not met.** ") + "; ".join(parts) + "."


def protocol_text(summary: Dict[str, Any]) -> str:
    st = summary["settings"]
    data = summary.get("data", {})
    sizes = ", ".join(f"{SHORT.get(t, t)} {d.get('train', '?')}/{d.get('val', '?')}/{d.get('test', '?')}"
                      for t, d in data.items() if t in st["tasks"])
    dec = summary.get("decisions", {})
    return (f"{st['size']} px, {st['epochs']} epochs, batch {st['batch_size']}, Adam, schedule "
            f"`{dec.get('sched', '?')}` (chosen on modcl's validation, used by every method); seeds "
            f"{', '.join(map(str, st['seeds']))} (training subsets resampled per seed; rates chosen on seed "
            f"{st['tune_seed']}'s validation split and reused); train / validation / test images per task: {sizes}. "
            f"Bytes per task: fp32 trainable values (adapter, per-task BN affine, head) + per-task BN statistics, "
            f"Piggyback's masks as bits. Intervals: paired bootstrap over seeds and test images "
            f"({st['bootstrap']} replicates).")


def markdown(summary: Dict[str, Any], stem: str = "accuracy") -> str:
    m = summary["machine"]
    st = summary["settings"]
    mod = summary["methods"].get("modcl", {})
    lines = [f"# Accuracy benchmark ({summary['mode']})", "",
             f"{'Complete' if summary['complete'] else '**Partial** (time budget or interruption)'} run; "
             f"{m['platform']}, {m['device']}, {m['workers']} worker(s) x {m['torch_threads_per_worker']} torch "
             f"thread(s); wall {summary['wall_s'] / 60:.1f} min this invocation, "
             f"{summary.get('cell_wall_s_total', 0) / 3600:.2f} h of cell time in all "
             f"({summary.get('cells_total', '?')} cells).", "", protocol_text(summary), ""]
    if mod.get("chosen"):
        c = mod["chosen"]
        lines += [f"**modcl default (chosen on validation):** {_config(c['hp'])}; lr {c['lr']:g}, head lr "
                  f"{c['head_lr']:g}, schedule {c['sched']}, warm-up {c['warmup_epochs']} epoch(s).", ""]
    lines += [main_table(summary), "", target_text(summary), ""]
    pig = summary["methods"].get("piggyback", {})
    if pig.get("piggyback_mask_zero_fraction_range"):
        lo, hi = pig["piggyback_mask_zero_fraction_range"]
        lines += [f"Piggyback masks: {100 * lo:.2f}–{100 * hi:.2f} % of the entries flipped to 0 (mask sparsity; "
                  f"they start all ones), per task and seed.", ""]
    reruns = {n: s.get("rerun_val_max_abs_diff") for n, s in summary["methods"].items()
              if s.get("rerun_val_max_abs_diff") is not None}
    if reruns:
        worst = max(reruns.values())
        lines += [f"Reproducibility: the test runs of seed {st['tune_seed']} retrain the chosen setting; their "
                  f"validation accuracy differs from the tuning run's by at most {100 * worst:.2f} points.", ""]
    sw = sweep_table(summary)
    if sw:
        lines += [f"## Data-size sweep ({SHORT.get(summary['sweep']['task'], summary['sweep']['task'])}, test "
                  f"accuracy %, mean ± sd over seeds; in brackets the difference from modcl with its 95 % interval)",
                  "", sw, ""]
    lines += ["## Validation (seed %d): every setting tried" % st["tune_seed"], validation_tables(summary), ""]
    lines += ["## Wall time per method (cell seconds: tuning / test runs)", "",
              "| method | tuning | test runs | cells | training images / s |", "|---|---|---|---|---|"]
    for name, s in summary["methods"].items():
        w = s.get("wall_s", {})
        lines.append(f"| {name} | {w.get('tuning', 0):,.0f} | {w.get('final', 0):,.0f} | {w.get('cells', 0)} | "
                     f"{s.get('train_images_per_s', 0):.0f} |")
    return "\n".join(lines) + "\n"


def readme_section(summary: Dict[str, Any]) -> str:
    cell_h, workers = summary.get('cell_wall_s_total', 0) / 3600, summary['machine']['workers']
    lines = [START, "", f"`nice -n 10 python benchmarks/accuracy.py` ({cell_h:.1f} h of cell time with {workers} "
             f"worker processes on a {summary['machine']['cpus']}-core CPU machine, about {cell_h / workers:.1f} h "
             f"wall in one go; the invocation that finished it took {summary['wall_s'] / 3600:.1f} h, the saved "
             "cells of earlier, interrupted ones reused; `--quick` for a smoke run). "
             "Fashion-MNIST → Animal-Shape → MNIST-5k → scikit-learn digits on ImageNet MobileNetV2 (offline "
             "weights), " + protocol_text(summary) + " Every method's rates come from the same staged search on "
             "validation; test accuracy is computed once per seed for the chosen setting. Full tables (every "
             "setting tried, per-task numbers, data-size sweep): `benchmarks/results/accuracy.md`; regenerate "
             "this section with `python benchmarks/report.py --readme README.md`.", ""]
    mod = summary["methods"].get("modcl", {})
    if mod.get("chosen"):
        c = mod["chosen"]
        lines += [f"modcl default (chosen on validation): {_config(c['hp'])}; lr {c['lr']:g}, head lr "
                  f"{c['head_lr']:g}, schedule `{c['sched']}`.", ""]
    lines += [main_table(summary, with_tasks=False), "", target_text(summary), ""]
    sw = sweep_table(summary)
    if sw:
        lines += ["Data-size sweep on Fashion-MNIST (test accuracy %, mean ± sd over seeds; difference from modcl "
                  "[95 % CI]):", "", sw, ""]
    lines += ["![accuracy vs bytes](benchmarks/results/accuracy_vs_bytes.png)", "", END]
    return "\n".join(lines)


def update_readme(path: Path, section: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    from timm_modcl._io import atomic_write_bytes
    atomic_write_bytes(path, (head + section + tail).encode())


def plots(summary: Dict[str, Any], out_dir: Path, stem: str = "accuracy") -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for name, s in summary["methods"].items():
        if "test_avg" not in s or s.get("bytes_per_task") is None:
            continue
        x, y, e = s["bytes_per_task"] / 1024, 100 * s["test_avg"]["mean"], 100 * s["test_avg"]["sd"]
        forgets = s.get("forgetting", {}).get("mean", 0) > 1e-9
        color = "tab:blue" if name == "modcl" else ("tab:red" if forgets else "tab:gray")
        ax.errorbar([x], [y], yerr=[e], fmt="o" if name == "modcl" else "s", color=color, capsize=4, ms=7)
        ax.annotate(name, (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored per task (KiB, log scale)")
    ax.set_ylabel("average test accuracy after the last task (%)")
    ax.set_title("Accuracy vs bytes per task (mean ± sd over seeds; blue: modcl, red: forgets)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / f"{stem}_vs_bytes.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    sw = summary.get("sweep")
    if sw and sw.get("methods"):
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for m, by_n in sw["methods"].items():
            pts = [(int(n), r["test_avg"]) for n, r in by_n.items() if r.get("test_avg")]
            pts.sort()
            if not pts:
                continue
            ax.errorbar([n for n, _ in pts], [100 * r["mean"] for _, r in pts], yerr=[100 * r["sd"] for _, r in pts],
                        marker="o", capsize=3, label=m, lw=2.2 if m == "modcl" else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel(f"training images ({sw['task']})")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Data-size sweep (mean ± sd over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out_dir / f"{stem}_data_size_sweep.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def write_all(summary: Dict[str, Any], out_dir: Path, stem: str = "accuracy") -> None:
    from timm_modcl._io import atomic_write_bytes
    atomic_write_bytes(Path(out_dir) / f"{stem}.md", markdown(summary, stem).encode())
    plots(summary, Path(out_dir), stem)


# ---------------------------------------------------------------------------------------------------- protocol v2
def _ci(c: Optional[Dict[str, Any]]) -> str:
    if not c or c.get("ci") is None:
        return "–"
    lo, hi = c["ci"]
    return f"{100 * c['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _mci(d: Optional[Dict[str, Any]]) -> str:
    if not d or "mean" not in d:
        return "–"
    s = f"{100 * d['mean']:.2f}"
    if d.get("ci"):
        s += f" [{100 * d['ci'][0]:.2f}, {100 * d['ci'][1]:.2f}]"
    return s + f" (n={d['n']})"


def v2_main_table(summary: Dict[str, Any]) -> str:
    head = ["method", "test accuracy, mean [95 % t CI] over seeds (%)", "minus modcl, points [95 % t CI]",
            "Holm p", "bytes / task", "settings tried", "chosen lr / head lr", "grid position", "interior"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary["methods"].items():
        if "chosen" not in s:
            lines.append(f"| {s['label']} | {s.get('status', 'missing')} |" + " |" * (len(head) - 2))
            continue
        c, b = s["chosen"], s.get("budget", {})
        d = s.get("diff_vs_modcl")
        holm = "–" if not d or d.get("p_holm") is None else f"{d['p_holm']:.3g}" + (" *" if d.get("reject") else "")
        pos = "x".join(str(i + 1) for i in c["grid_position"]) + " of " + "x".join(map(str, c["grid_size"]))
        inter = "yes" if c["interior"] else f"**no** ({c['flag']})"
        lines.append("| " + " | ".join([
            s["label"], _mci(s.get("test_avg")), "(reference)" if name == "modcl" else _ci(d), holm,
            _kib(s.get("bytes_per_task")), str(b.get("settings_tried", "–")), f"{c['lr']:g} / {c['head_lr']:g}",
            pos, inter]) + " |")
    return "\n".join(lines)


def v2_per_seed_table(summary: Dict[str, Any]) -> str:
    seeds = sorted({int(k) for s in summary["methods"].values() for k in s.get("per_seed_mean", {})})
    if not seeds:
        return ""
    lines = ["| method | " + " | ".join(f"seed {k}" for k in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, s in summary["methods"].items():
        ps = s.get("per_seed_mean", {})
        lines.append(f"| {name} | " + " | ".join(_pct(ps.get(str(k)), 2) for k in seeds) + " |")
    return "\n".join(lines)


def v2_bytes_table(summary: Dict[str, Any]) -> str:
    b = summary.get("bytes") or {}
    if not b.get("configs"):
        return str(b.get("missing", "not run"))
    lines = ["| configuration | method | bytes / task | test accuracy, mean [95 % t CI] (%) |", "|---|---|---|---|"]
    for label, r in sorted(b["configs"].items(), key=lambda kv: kv[1].get("bytes_per_task") or 0):
        lines.append(f"| {label} | {r['method']} | {_kib(r.get('bytes_per_task'))} | "
                     f"{_mci(r.get('test_avg')) if 'test_avg' in r else r.get('missing', '–')} |")
    if b.get("matched"):
        lines += ["", "Accuracy at matched bytes (the modcl configuration nearest in bytes; paired over seeds):", "",
                  "| baseline | bytes | modcl peer | bytes | modcl − baseline, points [95 % t CI] |",
                  "|---|---|---|---|---|"]
        for m in b["matched"]:
            lines.append(f"| {m['baseline']} | {_kib(m['baseline_bytes'])} | {m['modcl']} | "
                         f"{_kib(m['modcl_bytes'])} | {_ci(m['modcl_minus_baseline'])} |")
    return "\n".join(lines)


def v2_recipe_table(summary: Dict[str, Any]) -> str:
    r = summary.get("recipe") or {}
    if not r.get("methods"):
        return "not run"
    lines = [f"{r['epochs']} epochs, {r['sched']}, augmentation: {r['augment']}; tasks {', '.join(r['tasks'])}; "
             f"seeds {', '.join(map(str, r['seeds']))}. Tuning: {r['tuning_rule']}.", "",
             "| method | test accuracy, mean [95 % t CI] (%) | minus modcl [95 % t CI] | chosen lr / head lr | "
             "augmented |", "|---|---|---|---|---|"]
    for m, row in r["methods"].items():
        label = (summary.get("methods", {}).get(m) or {}).get("label", m)
        if "chosen" not in row:
            lines.append(f"| {label} | {row.get('missing')} | | | |")
            continue
        c = row["chosen"]
        lines.append(f"| {label} | {_mci(row.get('test_avg'))} | "
                     f"{'(reference)' if m == 'modcl' else _ci(row.get('diff_vs_modcl'))} | "
                     f"{c['lr']:g} / {c['head_lr']:g} ({c.get('settings_tried', 3)} tried"
                     f"{'' if c.get('interior') else ', on the edge'}) | "
                     f"{row.get('augment_applied')} |")
    return "\n".join(lines)


def v2_defaults_text(summary: Dict[str, Any]) -> str:
    """The check of ``train_task``'s default rates against the recipe stage's choice, in one paragraph."""
    d = summary.get("defaults") or {}
    if "settings" not in d:
        return d.get("missing", "not run")
    lib, ours = d["settings"]["library default"], d["settings"]["recipe choice"]
    return (f"modcl at the library recipe on the tuning-only cells ({len(d['cells'])}: {', '.join(d['cells'])}), "
            f"validation accuracy: `train_task`'s defaults (lr {lib['lr']:g}, head lr {lib['head_lr']:g}) "
            f"{_pct(lib['val_mean'])} %, the recipe stage's choice (lr {ours['lr']:g}, head lr {ours['head_lr']:g}) "
            f"{_pct(ours['val_mean'])} %; choice − default {_points(d['recipe_choice_minus_default'])} (t over the cells). "
            f"Preferred: {d['prefers']}. Rule: {d['rule']}." + _preferred_text(d, summary.get("methods") or {})
            + _diagnosis_text(d))


def _points(d: Dict[str, Any]) -> str:
    """A mean difference (fractions) in points with its t interval when there is one."""
    ci = f" [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]" if d.get("ci") else ""
    return f"{100 * d['mean']:+.2f} points{ci}"


def _preferred_text(d: Dict[str, Any], methods: Dict[str, Any]) -> str:
    pt = d.get("preferred_test")
    if not pt or pt.get("missing_cells") or "mean" not in (pt.get("test_avg") or {}):
        return " Its test cells are missing." if pt else ""
    names = {m: r.get("label", m) for m, r in methods.items()}
    names["modcl"] = "modcl at the rule's choice"
    others = "; ".join(f"{names.get(m, m)} {_ci(c)}"
                       + (f", Holm p {c['p_holm']:.3g}" if c.get("p_holm") is not None else "")
                       for m, c in pt["others_minus_preferred"].items())
    return (f" Tested once on the recipe stage's seeds and tasks, modcl at the library's defaults scores "
            f"{_mci(pt['test_avg'])}; each recipe-stage method minus it: {others}.")


def _diagnosis_text(d: Dict[str, Any]) -> str:
    diag = d.get("diagnosis")
    if not diag:
        return ""
    parts = []
    for name, diff in diag["minus_recipe_choice"].items():
        row = d["settings"][name]
        extra = "".join(f", {k} {v:g}" for k, v in (row.get("hp") or {}).items() if isinstance(v, (int, float)))
        parts.append(f"{name} (lr {row['lr']:g}, head lr {row['head_lr']:g}{extra}) "
                     f"{_pct(row['val_mean'])} %, {_points(diff)} against the recipe choice")
    return " Diagnosis (" + diag["note"] + "): " + "; ".join(parts) + "."


def v2_markdown(summary: Dict[str, Any], stem: str = "accuracy_v2") -> str:
    m = summary["machine"]
    st = summary["settings"]
    code = summary.get("code", {})
    lines = [f"# Accuracy benchmark, protocol v{summary['protocol_version']} ({summary['mode']})", "",
             f"{'Complete' if summary['complete'] else '**Partial** (time budget, interruption or waiting stages)'} "
             f"run; {m['platform']}, {m['device']}, {m['workers']} worker(s) x {m['torch_threads_per_worker']} "
             f"torch thread(s); wall {summary['wall_s'] / 60:.1f} min this invocation, "
             f"{summary.get('cell_wall_s_total', 0) / 3600:.2f} h of cell time in all "
             f"({summary.get('cells_total', '?')} cells).", "",
             f"{st['size']} px, {st['epochs']} epochs, batch {st['batch_size']}, Adam, `{st['sched']}` for every "
             f"method; tuning seeds {st['tune_seeds']} on the validation splits of {', '.join(st['tune_tasks'])}; "
             f"test seeds {st['test_seeds']} on {', '.join(st['tasks'])}. Estimated protocol wall time "
             f"{summary['plan']['hours']:.1f} h (worst case {summary['plan']['worst_case_hours']:.1f} h).", "",
             "Cut to fit the time: " + "; ".join(summary.get("cuts", [])) + ".", ""]
    if summary.get("missing"):
        lines += ["**Missing:** " + "; ".join(f"{k}: {v}" for k, v in summary["missing"].items()), ""]
    lines += ["## Test (chosen settings, fresh seeds)", "", v2_main_table(summary), "",
              f"Intervals: {summary['comparisons']['interval']}; {summary['comparisons']['correction']} "
              f"({summary['comparisons']['count']} comparisons; * = rejected at 0.05 after Holm).", ""]
    t = summary.get("target", {})
    if t.get("evaluated"):
        lines += [f"Target (default budget): {'met' if t.get('met') else 'not met'}; "
                  f"significantly better than: {', '.join(t.get('significantly_better_than') or []) or 'none'}; "
                  f"full fine-tuning − modcl: {_pct(t.get('full_finetune_minus_modcl'), 2)} points.", ""]
    lines += ["## Seed-level means (mean over tasks per seed, %)", "", v2_per_seed_table(summary), "",
              "## Accuracy vs bytes", "", v2_bytes_table(summary), "",
              f"![accuracy vs bytes]({_plot_name(stem)})", "",
              "## Library recipe", "", v2_recipe_table(summary), "",
              "## The library's default rates", "", v2_defaults_text(summary), ""]
    pig = (summary["methods"].get("piggyback") or {}).get("mask_agreement")
    if pig:
        lines += ["## Piggyback's masks", "", f"From a fixed sample of {pig['sample_entries']:,} mask entries per "
                  "test cell: the share flipped to 0, and the Jaccard overlap of two seeds' flipped entries beside "
                  "what two independent masks with those rates would share by chance.", "",
                  "| task | flipped (% per seed) | Jaccard across seeds | by chance |", "|---|---|---|---|"]
        for task, a in pig["tasks"].items():
            flips = ", ".join(f"{100 * f:.2f}" for f in a["flipped_fraction"])
            lines.append(f"| {task} | {flips} | {_pct(a['jaccard_mean'], 2)} % | "
                         f"{_pct(a['jaccard_chance_mean'], 2)} % |")
        lines.append("")
    lines += ["## Budgets and searches", ""]
    for name, s in summary["methods"].items():
        b = s.get("budget")
        if not b:
            continue
        lines.append(f"- **{name}**: {b['settings_tried']} settings on validation ({' x '.join(b['axes'])} grid "
                     f"{'x'.join(map(str, b['grid_size']))}, extensions {b['extensions'] or 'none'}"
                     f"{', cap hit' if b['cap_hit'] else ''}; {b['structure_options']} structural option(s) from "
                     f"{b['structure_source']}), tuning seeds {b['tuning_seeds']}, {b['tuning_cell_s'] / 60:.0f} "
                     f"min of cell time; chosen structure {s['chosen']['structure']}: "
                     f"{s['chosen']['structure_option']}")
    lines += ["", "## Code", "", f"Benchmark code hash {code.get('bench_code_hash')}, timm_modcl source hash "
              f"{code.get('package_hash')}, commit {code.get('git_commit')}. Cells by hash:", ""]
    lines += [f"- {k}: {v} cells" for k, v in (code.get("cells_by_hash") or {}).items()]
    return "\n".join(lines) + "\n"


def readme_section_v2(summary: Dict[str, Any]) -> str:
    """README's benchmark section (between the markers) from a protocol v2 summary; a partial run says so and lists
    what is missing."""
    st, m = summary["settings"], summary["machine"]
    cell_h = summary.get("cell_wall_s_total", 0) / 3600
    busy = f" ({summary['busy_wall_s'] / 3600:.1f} h of wall time)" if summary.get("busy_wall_s") else ""
    status = ("complete" if summary["complete"] else
              "**partial: the run goes on** (resumable cells; this section is rebuilt as they land)")
    lines = [START, "",
             f"Protocol v2, `nice -n 10 python benchmarks/accuracy.py --workers {m['workers']}` ({status}; "
             f"{summary.get('cells_total', '?')} cells, {cell_h:.1f} h of cell time{busy} "
             f"{'' if summary['complete'] else 'so far '}on a {m['cpus']}-core CPU, {m['workers']} worker processes; "
             f"the plan, priced at these cells' times, estimates {summary['plan']['hours']:.1f} h of wall "
             f"time, worst case {summary['plan']['worst_case_hours']:.1f} h). ImageNet MobileNetV2 (offline weights), "
             f"{st['size']} px, {st['epochs']} epochs, batch {st['batch_size']}, Adam, `{st['sched']}` for every "
             f"method, 500 training images per task. Every method gets the same search: a joint adapter-lr x head-lr "
             f"grid extended while its best point is on an edge (at most {st['max_extensions']} extensions per axis "
             f"and side), then 3 structural options, chosen on the mean validation accuracy of tuning-only seeds "
             f"{', '.join(map(str, st['tune_seeds']))} on {', '.join(st['tune_tasks'])}; test once on fresh seeds "
             f"{st['test_seeds'][0]}-{st['test_seeds'][-1]} x {len(st['tasks'])} tasks "
             f"({', '.join(st['tasks'])}). Intervals: t over seeds (the seed's mean over tasks), Holm over the "
             f"comparisons with modcl. Everything else (per-task numbers, every setting tried, bytes curve, library "
             f"recipe, Piggyback's masks): `benchmarks/results/accuracy_v2.md`; this section: `python "
             f"benchmarks/report.py --json benchmarks/results/accuracy_v2.json --readme README.md`.", ""]
    b, r = summary.get("bytes") or {}, summary.get("recipe") or {}
    n_seeds = len(b.get("seeds") or [])
    bytes_done = [k for k, c in (b.get("configs") or {}).items() if (c.get("test_avg") or {}).get("n") == n_seeds]
    recipe_done = [k for k, row in (r.get("methods") or {}).items() if "test_avg" in row
                   and not row.get("missing_cells")]
    missing = [f"{k}: {v}" for k, v in (summary.get("missing") or {}).items()]
    if len(bytes_done) < len(b.get("configs") or {}) or not b.get("configs"):
        missing.append(f"accuracy vs bytes: {len(bytes_done)} of {len(b.get('configs') or {})} configurations")
    if len(recipe_done) < len(r.get("methods") or {}) or not r.get("methods"):
        missing.append(f"library recipe: {len(recipe_done)} of {len(r.get('methods') or {})} methods")
    dft = summary.get("defaults") or {}
    if "missing" in dft or (dft.get("preferred_test") or {}).get("missing_cells"):
        missing.append("library defaults check: " + dft.get("missing", "test cells missing"))
    if missing and not summary["complete"]:
        lines += ["Missing so far: " + "; ".join(missing) + ".", ""]
    lines += [v2_main_table(summary), ""]
    t = summary.get("target", {})
    if t.get("evaluated"):
        ft = t.get("full_finetune_minus_modcl")
        lines += [f"Target at the default budget: {'met' if t.get('met') else '**not met**'} "
                  f"(modcl significantly better than: {', '.join(t.get('significantly_better_than') or []) or 'none'};"
                  f" full fine-tuning − modcl: {'not measured yet' if ft is None else _pct(ft, 2) + ' points'})"
                  f"{'' if summary['complete'] else ', on the cells so far'}.", ""]
    if b.get("configs") and len(bytes_done) == len(b["configs"]):
        lines += ["Accuracy against bytes per task:", "", v2_bytes_table(summary), "",
                  "![accuracy vs bytes](benchmarks/results/accuracy_vs_bytes_v2.png)", ""]
    if r.get("methods") and len(recipe_done) == len(r["methods"]):
        lines += ["At the library's own recipe:", "", v2_recipe_table(summary), ""]
    if "settings" in (summary.get("defaults") or {}):
        lines += [v2_defaults_text(summary), ""]
    lines.append(END)
    return "\n".join(lines)


def v2_plot(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Accuracy vs bytes per task (log x), one line per method family, t intervals as error bars."""
    b = summary.get("bytes") or {}
    rows = [(l, r) for l, r in (b.get("configs") or {}).items()
            if r.get("bytes_per_task") and (r.get("test_avg") or {}).get("n")]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    fams: Dict[str, List] = {}
    for label, r in rows:
        fams.setdefault(r["method"], []).append((r["bytes_per_task"] / 1024, r["test_avg"], label))
    for fam, pts in sorted(fams.items()):
        pts.sort(key=lambda p: p[0])
        x = [p[0] for p in pts]
        y = [100 * p[1]["mean"] for p in pts]
        err = [[100 * (p[1]["mean"] - p[1]["ci"][0]) if p[1].get("ci") else 0 for p in pts],
               [100 * (p[1]["ci"][1] - p[1]["mean"]) if p[1].get("ci") else 0 for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o" if fam == "modcl" else "s", capsize=3, label=fam,
                    lw=2.2 if fam == "modcl" else 1.2)
        for xi, yi, p in zip(x, y, pts):
            ax.annotate(p[2], (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored per task (KiB, log scale)")
    ax.set_ylabel(f"test accuracy, mean over {', '.join(b.get('tasks', []))} (%)")
    ax.set_title("Accuracy vs bytes (mean and 95 % t interval over seeds)" + ("" if rows else ": no cells yet"),
                 fontsize=10)
    ax.grid(alpha=0.3)
    if fams:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all_v2(summary: Dict[str, Any], out_dir: Path, stem: str = "accuracy_v2") -> None:
    """``<stem>.md`` and ``accuracy_vs_bytes_v2[...].png`` from a protocol v2 summary."""
    from timm_modcl._io import atomic_write_bytes
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / f"{stem}.md", v2_markdown(summary, stem).encode())
    v2_plot(summary, out_dir / _plot_name(stem))


def _plot_name(stem: str) -> str:
    """``accuracy_v2`` -> ``accuracy_vs_bytes_v2.png`` (``accuracy_v2_quick`` -> ``accuracy_vs_bytes_v2_quick.png``)."""
    return stem.replace("accuracy", "accuracy_vs_bytes", 1) + ".png"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(RESULTS / "accuracy.json"))
    ap.add_argument("--readme", default=None, help="rewrite this README's benchmark section")
    a = ap.parse_args(argv)
    path = Path(a.json)
    summary = json.loads(path.read_text())
    stem = path.stem
    if summary.get("protocol_version", 1) >= 2:
        write_all_v2(summary, path.parent, stem)
        if a.readme:
            update_readme(Path(a.readme), readme_section_v2(summary))
        print(v2_main_table(summary))
        return 0
    write_all(summary, path.parent, stem)
    if a.readme:
        update_readme(Path(a.readme), readme_section(summary))
    print(main_table(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
