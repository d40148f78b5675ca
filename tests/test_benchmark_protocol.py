"""Accuracy protocol v2 (benchmarks/accuracy.py, _protocol.py, _stats.py): the rate-grid search and its extension,
interior flags, seed-level t intervals and Holm's correction, the ``--plan`` time estimate, and the committed summary's
chosen settings. No training here: every test is pure arithmetic on synthetic numbers or on the stored JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _protocol as P  # noqa: E402
import _stats  # noqa: E402


def _peak(at, scale=1.0):
    """A smooth synthetic validation surface over ladder indices, highest at ``at``."""
    return lambda p: 1.0 - scale * sum((a - b) ** 2 for a, b in zip(p, at))


# ---------------------------------------------------------------------------------------------------- (a) grid
def test_interior_optimum_needs_no_extension():
    g = P.GridSearch(centre=(6, 6), width=3, max_extensions=2)
    res = P.run_grid(g, _peak((6, 6)))
    assert res["settings"] == 9
    assert res["interior"] and res["edge"] == [] and not res["cap_hit"]
    assert res["best"] == [6, 6] and res["position"] == [1, 1] and res["grid_size"] == [3, 3]


def test_edge_optimum_extends_until_interior():
    g = P.GridSearch(centre=(6, 6), width=3, max_extensions=2)
    res = P.run_grid(g, _peak((8, 6)))  # two steps above the grid on the adapter axis
    assert res["best"] == [8, 6]
    assert res["interior"] and not res["cap_hit"]
    assert res["extensions"] == {"0+": 2}  # a line of 3 per step
    assert res["settings"] == 9 + 3 + 3
    assert (9, 6) in g.scores and (8, 5) in g.scores and (8, 7) in g.scores


def test_head_axis_is_searched_separately():
    g = P.GridSearch(centre=(6, 6), width=3, max_extensions=2)
    res = P.run_grid(g, _peak((6, 4)))  # head rate two steps below the grid, adapter rate in the middle
    assert res["best"] == [6, 4] and res["interior"] and res["extensions"] == {"1-": 2}


def test_cap_is_flagged():
    g = P.GridSearch(centre=(6, 6), width=3, max_extensions=2)
    res = P.run_grid(g, _peak((12, 6)))  # far beyond what two extensions reach
    assert res["best"] == [9, 6]
    assert not res["interior"] and res["cap_hit"]
    assert any("cap" in w and "axis 0 high" in w for w in res["edge"])


def test_ladder_end_is_flagged_not_extended():
    g = P.GridSearch(centre=(11, 6), width=3, max_extensions=2)
    res = P.run_grid(g, _peak((20, 6)))
    assert res["best"] == [12, 6]
    assert not res["interior"] and not res["cap_hit"]
    assert res["edge"] == ["axis 0 high: ladder ends"]


def test_one_axis_gets_the_same_number_of_settings():
    g = P.GridSearch(centre=(8,), width=3, max_extensions=2)
    assert len(g.initial()) == 9
    res = P.run_grid(g, _peak((8,)))
    assert res["interior"] and res["settings"] == 9
    g = P.GridSearch(centre=(6,), width=3, max_extensions=2)
    res = P.run_grid(g, _peak((0,)))  # 9 points around 6 start at index 2: two extensions reach 0, the ladder end
    assert res["best"] == [0] and res["settings"] == 11 and not res["interior"]


def test_ties_keep_the_first_tried_point():
    g = P.GridSearch(centre=(6, 6), width=3, max_extensions=0)
    res = P.run_grid(g, lambda p: 0.5)
    assert res["best"] == [5, 5] and not res["interior"] and res["cap_hit"]


# ---------------------------------------------------------------------------------------------------- (b) stats
def test_paired_t_on_known_values():
    # diffs 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t_{0.975, 2} = 4.302652729911275
    r = _stats.paired_t([1.0, 2.0, 3.0])
    q = 4.302652729911275
    assert r["diff"] == pytest.approx(2.0)
    assert r["ci"] == pytest.approx([2 - q / math.sqrt(3), 2 + q / math.sqrt(3)], rel=1e-9)
    # t = 2 / (1/sqrt 3) = 3.4641; two-sided p with 2 df = 0.07418
    assert r["p"] == pytest.approx(0.0741799, rel=1e-4)
    assert _stats.paired_t([0.5])["ci"] is None


def test_holm_on_known_values():
    r = _stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20})
    # sorted 0.01, 0.03, 0.04, 0.20 -> 4*0.01, 3*0.03, max(0.09, 2*0.04), max(0.09, 1*0.2)
    assert r["a"]["p_holm"] == pytest.approx(0.04)
    assert r["c"]["p_holm"] == pytest.approx(0.09)
    assert r["b"]["p_holm"] == pytest.approx(0.09)  # monotone: not 0.08
    assert r["d"]["p_holm"] == pytest.approx(0.20)
    assert [k for k, v in r.items() if v["reject"]] == ["a"]
    assert _stats.holm({"x": 0.6, "y": 0.7})["y"]["p_holm"] == 1.0  # capped


def test_compare_seeds_pairs_by_seed_and_widens_for_bonferroni():
    a = {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.93}
    b = {0: 0.89, 1: 0.89, 2: 0.91, 3: 0.915, 9: 0.5}  # seed 9 has no partner: ignored
    c = _stats.compare_seeds(a, b, comparisons=8)
    assert c["seeds"] == [0, 1, 2, 3]
    assert c["diff"] == pytest.approx((0.01 + 0.02 + 0.01 + 0.015) / 4)
    lo, hi = c["ci"]
    blo, bhi = c["ci_bonferroni"]
    assert blo < lo < c["diff"] < hi < bhi


# ---------------------------------------------------------------------------------------------------- (c) summary
def test_every_chosen_setting_is_interior_or_flagged():
    path = BENCH / "results" / "accuracy_v2.json"
    if not path.is_file():
        pytest.skip("benchmarks/results/accuracy_v2.json does not exist yet (the protocol v2 run has not finished "
                    "a summary); this check runs once it does")
    summary = json.loads(path.read_text())
    checked = 0
    for name, m in summary["methods"].items():
        c = m.get("chosen")
        if not c:
            continue
        checked += 1
        assert c["interior"] or c["flag"], f"{name}: chosen setting on an edge without a flag"
        assert len(c["grid_position"]) == len(c["grid_size"]) and all(
            0 <= i < n for i, n in zip(c["grid_position"], c["grid_size"]))
    for name, r in (summary.get("recipe") or {}).get("methods", {}).items():
        if "chosen" in r:
            assert "interior" in r["chosen"], name
    assert checked or not summary["methods"], "summary has methods but none with a chosen setting"


# ---------------------------------------------------------------------------------------------------- (d) plan
def test_plan_cell_times_are_the_measured_ones():
    measured = P.measured_cell_seconds(BENCH / "results" / "accuracy_v2_cells")
    assert set(measured) == set(P.CELL_S)
    for method, cols in measured.items():
        for got, table in zip(cols, P.CELL_S[method]):
            assert (got is None) == (table is None), method
            if got is not None:
                assert table == pytest.approx(got, abs=0.06), method


def test_plan_estimates_the_committed_run():
    """The default plan's expected cell time is within 15 % of what the committed run's cells took, and its worst
    case is not below it (the cost model counts the cells the protocol runs, the table gives their times)."""
    import accuracy as A
    cells = [json.loads(p.read_text()) for p in (BENCH / "results" / "accuracy_v2_cells").glob("*.json")]
    measured = sum(c["wall_s"] for c in cells)
    pl = A.plan(A.Settings())
    assert pl["workers"] == 2
    assert pl["cell_seconds"] == pytest.approx(measured, rel=0.15), (pl["cell_seconds"] / 3600, measured / 3600)
    assert pl["worst_case_hours"] * pl["workers"] * 3600 >= measured
    assert set(pl["stages"]) == {"tune", "test", "bytes", "recipe", "defaults"}
    assert all(s["cells"] > 0 for s in pl["stages"].values())


def test_cell_seconds_grow_with_epochs():
    for method in P.CELL_S:
        five, thirty = P.cell_seconds(method, True), P.cell_seconds(method, True, epochs=30, augment=True)
        assert P.cell_seconds(method, True, epochs=1) < five
        if method != "linear_probe":  # its features are cached: 30 epochs of a linear layer cost nothing
            assert thirty > five, method
    assert P.cell_seconds("unknown", False) == P.CELL_S_DEFAULT[0]


def test_a_diverged_cell_scores_zero_and_stays_well_formed():
    """A rate at the grid's far edge may make the loss non-finite: the cell is kept with accuracy 0 (every test image
    wrong) instead of ending the whole run."""
    import numpy as np

    import _cellrun
    import baselines as B

    class S:  # the fields of _fetch.TaskSplits that a diverged record needs
        def __init__(self, n_val, n_test):
            self.y_train, self.y_val, self.y_test = np.zeros(5), np.zeros(n_val), np.zeros(n_test)

    task = {"kind": "task", "evaluate": ["val", "test"]}
    r = _cellrun.diverged_result(task, [S(7, 9)], "loss nan")
    assert r["val_acc"] == 0.0 and r["test_n"] == 9 and r["diverged"] == "loss nan"
    assert not B.unpack_bits(r["test_correct"], 9).any() and r["counts"] == {}
    seq = {"kind": "sequence", "evaluate": ["val", "test"]}
    r = _cellrun.diverged_result(seq, [S(7, 9), S(3, 4)], "loss inf")
    assert r["val_acc"] == [0.0, 0.0] and r["test_n"] == [9, 4] and len(r["test_matrix"]) == 2
    assert [B.unpack_bits(c, n).sum() for c, n in zip(r["test_correct"], (9, 4))] == [0, 0]


# ---------------------------------------------------------------------------------------------------- piggyback masks
def test_mask_agreement_against_chance(monkeypatch):
    """Two seeds that flip the same entries overlap fully; independent flips overlap about as chance predicts."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    import accuracy as A
    import baselines as B

    rng = np.random.default_rng(0)
    n = 4096
    same = rng.random(n) < 0.05
    cells = []
    for seed, flipped in ((0, same), (1, same), (2, rng.random(n) < 0.05), (3, rng.random(n) < 0.05)):
        task = "a" if seed < 2 else "b"
        counts = {"mask_sample": B.pack_bits(~flipped), "mask_sample_n": n}
        cells.append(({"seed": seed, "tasks": [task], "kind": "single"}, {"result": {"counts": counts}}))
    monkeypatch.setattr(A, "_cells", lambda store, specs: cells)
    out = A._mask_agreement(None, [])
    a, b = out["tasks"]["a"], out["tasks"]["b"]
    assert out["sample_entries"] == n and a["pairs"] == b["pairs"] == 1
    assert a["jaccard_mean"] == 1.0 and a["flipped_fraction"][0] == pytest.approx(same.mean())
    assert b["jaccard_mean"] == pytest.approx(b["jaccard_chance_mean"], abs=0.03)
    assert b["jaccard_chance_mean"] == pytest.approx(0.05 * 0.05 / (0.1 - 0.0025), rel=0.3)


def test_readme_section_v2_from_the_committed_summary(tmp_path):
    """README's section is generated from the v2 summary: every method's row, the missing cells of a partial run,
    and a rewrite between the markers that leaves the rest of the file as it was."""
    path = BENCH / "results" / "accuracy_v2.json"
    if not path.is_file():
        pytest.skip("benchmarks/results/accuracy_v2.json does not exist yet")
    import report
    summary = json.loads(path.read_text())
    section = report.readme_section_v2(summary)
    assert section.startswith(report.START) and section.endswith(report.END)
    for s in summary["methods"].values():
        assert f"| {s['label']} |" in section
    assert ("Missing so far" in section) == (not summary["complete"])
    assert ("partial" in section) == (not summary["complete"])
    done = all((c.get("test_avg") or {}).get("n") == len(summary["bytes"]["seeds"])
               for c in summary["bytes"].get("configs", {}).values())
    assert ("Accuracy against bytes per task" in section) == (done and bool(summary["bytes"].get("configs")))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.START}\nold\n{report.END}\nafter\n")
    report.update_readme(readme, section)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "\nold\n" not in text
    assert section in text


class _DictStore(dict):
    """An in-memory cell store: ``key in store`` and ``store.get(key)``, as :class:`_cellrun.Store`."""


@pytest.mark.parametrize("peak_step, settings, interior", [(0, 3, True), (-1, 4, True), (-3, 5, False)])
def test_recipe_tuning_extends_past_an_edge_like_the_tuning_stage(peak_step, settings, interior):
    import accuracy as A
    st = A.Settings()
    st.max_extensions = 2
    store = _DictStore()
    p = A.Protocol(st, store)
    i = 6
    p.chosen["modcl"] = {"lr": P.LADDER[i], "head_lr": P.LADDER[i] / 3, "hp": {}}
    val = _peak((i + peak_step,), 0.01)
    g = p.recipe_stage("modcl")
    batch = next(g)
    while not any("test" in s["evaluate"] for s in batch):
        for s in batch:  # every tuning cell: the synthetic validation surface at its adapter rate
            j = P.nearest_index(s["recipe"]["lr"])
            assert s["recipe"]["epochs"] == st.recipe_epochs and s["recipe"]["augment"] == "timm"
            store[A.cell_key(s)] = {"result": {"val_acc": val((j,))}}
        batch = g.send(None)
    best = p.recipe_out["modcl"]["chosen"]
    assert best["settings_tried"] == settings and len(p.recipe_out["modcl"]["validation"]) == settings
    assert best["interior"] is interior
    assert P.nearest_index(best["lr"]) == i + max(peak_step, -1 - st.max_extensions)
    assert all(s["recipe"]["lr"] == best["lr"] for s in batch)  # the test cells run the chosen rate


def test_defaults_check_pairs_the_library_default_with_the_recipe_choice():
    import accuracy as A
    import report
    st = A.Settings()
    store = _DictStore()
    p = A.Protocol(st, store)
    lib = A.library_defaults()
    assert lib["epochs"] == st.recipe_epochs and lib["sched"] == st.sched and lib["batch_size"] == st.batch_size
    p.chosen["modcl"] = {"lr": 3e-3, "head_lr": 1e-3, "hp": {}}
    g = p.defaults_check()
    assert next(g) == []  # waits for the recipe stage's choice
    p.recipe_out["modcl"] = {"chosen": {"lr": 1e-3, "head_lr": 1e-3 / 3}}
    assert g.send(None) == []  # and for BN + head's (the diagnosis runs on its rates)
    p.chosen["bn_head"] = {"lr": 1e-2, "head_lr": 3e-5, "hp": {}}
    p.recipe_out["bn_head"] = {"chosen": {"lr": 1e-2, "head_lr": 3e-5}}
    batch = g.send(None)
    n = len(st.tune_seeds) * len(st.tune_tasks)
    assert len(batch) == 4 * n
    assert sum(s["method"] == "bn_head" for s in batch) == n
    diag = [s for s in batch if s["hp"].get("norm_lr_mult")]
    assert len(diag) == n and all(s["hp"]["norm_lr_mult"] == 10 and s["recipe"]["head_lr"] == 3e-5 for s in diag)
    for s in batch:  # the recipe choice is 2 points better on every tuning cell but one, where it is 1 point worse
        ours = s["method"] == "modcl" and s["recipe"]["lr"] == 1e-3 and not s["hp"]
        worse = s["seed"] == st.tune_seeds[0] and s["tasks"] == [st.tune_tasks[0]]
        store[A.cell_key(s)] = {"result": {"val_acc": 0.80 + (0.0 if not ours else -0.01 if worse else 0.02)}}
        assert s["recipe"]["augment"] == "timm" and s["recipe"]["epochs"] == st.recipe_epochs
        assert "test" not in s["evaluate"] and s["seed"] in st.tune_seeds
    with pytest.raises(StopIteration):  # the recipe choice is preferred: nothing more to run
        g.send(None)
    d = A._defaults_summary(p, st)
    assert d["prefers"] == "recipe choice" and "preferred_test" not in d
    assert d["recipe_choice_minus_default"]["mean"] == pytest.approx((0.02 * 3 - 0.01) / 4)
    assert sorted(d["per_cell_diff"].values()) == pytest.approx([-0.01, 0.02, 0.02, 0.02])
    assert d["settings"]["library default"]["lr"] == lib["lr"]
    assert d["diagnosis"]["minus_recipe_choice"]["BN + head"]["mean"] == pytest.approx(-(0.02 * 3 - 0.01) / 4)
    text = report.v2_defaults_text({"defaults": d})
    assert "Preferred: recipe choice" in text and "+1.25 points" in text and "norm_lr_mult 10" in text


def test_preferred_library_defaults_are_tested_once_beside_the_recipe_methods():
    import accuracy as A
    st = A.Settings()
    store = _DictStore()
    p = A.Protocol(st, store)
    lib = A.library_defaults()
    for m, (lr, head_lr) in {"modcl": (1e-3, 1e-3 / 3), "bn_head": (1e-2, 3e-5)}.items():
        p.chosen[m] = {"lr": lr, "head_lr": head_lr, "hp": {}}
        p.recipe_out[m] = {"chosen": {"lr": lr, "head_lr": head_lr}, "specs": [
            sp for seed in st.recipe_seeds for sp in A.specs_for(st, m, {}, p.recipe(lr, head_lr, 30, True),
                                                                  st.recipe_tasks, seed, ["val", "test"], 4, "r")]}
    g = p.defaults_check()
    batch = next(g)
    for s in batch:  # the library default wins every tuning cell
        is_lib = s["method"] == "modcl" and s["recipe"]["lr"] == lib["lr"] and s["recipe"]["head_lr"] == lib["head_lr"]
        store[A.cell_key(s)] = {"result": {"val_acc": 0.9 if is_lib else 0.8}}
    tests = g.send(None)
    assert len(tests) == len(st.recipe_seeds) * len(st.recipe_tasks)
    assert all(s["recipe"]["lr"] == lib["lr"] and "test" in s["evaluate"] for s in tests)
    with pytest.raises(StopIteration):
        g.send(None)
    B = pytest.importorskip("baselines")
    for s in tests + p.recipe_out["bn_head"]["specs"]:  # BN + head 2 points above on every seed
        n = 100
        acc = 0.88 if s["method"] == "bn_head" else 0.86
        acc += 0.01 * s["seed"]
        store[A.cell_key(s)] = {"wall_s": 1.0, "result": {
            "val_acc": acc, "test_acc": acc, "test_n": n, "counts": {},
            "test_correct": B.pack_bits(__import__("numpy").arange(n) < round(acc * n))}}
    d = A._defaults_summary(p, st)
    pt = d["preferred_test"]
    assert d["prefers"] == "library default" and pt["missing_cells"] == 0
    assert pt["test_avg"]["mean"] == pytest.approx(0.86 + 0.01)
    assert pt["others_minus_preferred"]["bn_head"]["diff"] == pytest.approx(0.02)
    assert "modcl" not in pt["others_minus_preferred"]  # modcl's recipe cells are missing here: no comparison
