"""Benchmark side: every method builds and trains what it should; bench resumes; report renders."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_bert
from vectorfit import target_module_names
from vectorfit_recipes import bench, bench_status, methods, report
from vectorfit_recipes.train import TrainConfig, run

from test_recipes_cli import RESULT_KEYS


def _trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_builds_trains_its_own_parameters_and_keeps_outputs_at_init(method, tmp_path):
    base = make_tiny_bert()
    base.eval()
    targets = target_module_names(base)
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = base(input_ids=x).logits
    built = methods.build(method, base, total_steps=20, steps_per_epoch=5)
    model = built.model.eval()
    trainable = _trainable(model)
    assert trainable, method
    assert any("classifier" in n for n in trainable), f"{method} must train the new head"
    with torch.no_grad():
        out = model(input_ids=x).logits
    # Every method starts from the base model's function (zero/identity init of what it adds).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=method)
    if method == "bitfit":
        assert trainable == {f"{t}.bias" for t in targets} | {"classifier.weight", "classifier.bias"}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    if method in methods.VECTORFIT_METHODS:
        assert (built.avf is not None) == (method == "vectorfit")
    # one optimizer step through the same hooks the training loop uses
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
    if built.before_optimizer_step:
        built.before_optimizer_step(1)
    opt.step()
    if built.after_optimizer_step:
        built.after_optimizer_step(1)
    opt.zero_grad()
    built.save(str(tmp_path / "saved"))
    assert any((tmp_path / "saved").iterdir())


def test_methods_table_records_lr_and_source_for_every_method():
    table = methods.method_table()
    for m in methods.METHODS:
        assert table[m]["lr"] > 0 and table[m]["source"], m
    # One rate for every VectorFit variant (as in the paper), and the paper's value is on record.
    assert len({methods.default_lr(m) for m in methods.VECTORFIT_METHODS}) == 1
    assert "1e-3" in table["vectorfit"]["source"]
    for m in methods.METHODS:  # the chosen rate is one that the sweep actually ran
        if "sweep" in table[m]:
            assert table[m]["lr"] in table[m]["sweep"], m


def test_the_rates_checked_at_1024_steps_are_the_ones_the_realistic_suites_run():
    """methods.json's 3-seed check at 1,024 steps (the rate check at the realistic budget) and the
    suites must agree: its rate is the best recorded mean validation, every recorded rate was a rate
    of the check suite on those seeds, and converged (and curves, for the methods curves runs) run
    that rate."""
    table, suites = methods.method_table(), bench.suites()
    checked = {m: t["at_1024_steps"] for m, t in table.items() if "at_1024_steps" in t}
    assert {"vectorfit", "lora_r1", "lora_r8", "full", "bitfit"} <= set(checked)
    rates = suites["converged-rates"]
    for m, c in checked.items():
        means = {float(lr): v for lr, v in c["mean_validation"].items()}
        assert c["lr"] == max(means, key=means.get), m
        assert set(means) <= set(rates["lrs"][m]) and set(c["seeds"]) <= set(rates["seeds"]), m
        assert suites["converged"]["lrs"][m] == [c["lr"]], m
        if m in suites["curves"]["lrs"] and m != "vectorfit":  # curves runs VectorFit at two rates
            # curves keeps its own choice (2,048 steps, seed 0) only where the record says so
            assert suites["curves"]["lrs"][m] == [c.get("curves_lr", c["lr"])], m
    assert suites["converged"]["lrs"]["no_avf"] == [checked["vectorfit"]["lr"]]  # one rate for the variants


def test_suites_are_well_formed_and_shared_runs_are_computed_once():
    for name, s in bench.suites().items():
        for m in s["methods"]:
            assert m in methods.METHODS, (name, m)
        assert bench.runs_of(name)
    main = {r for r in bench.runs_of("main")}
    ablation = {r for r in bench.runs_of("ablation")}
    shared = main & ablation
    assert {(r.method) for r in shared} == {"vectorfit", "no_avf"}
    assert len({r.path(Path("x")) for r in bench.runs_of("main")}) == len(bench.runs_of("main"))
    # converged: only VectorFit, whose AVF schedule depends on the budget, has 1,024-step runs of its
    # own; every other run (no-AVF included: constant rate, no schedule) is a curves-length run read
    # at 1,024: curves' own, or, for full fine-tuning, whose 3-seed check at 1,024 steps chose another
    # rate than curves runs, the rate check's runs on movie and runs with curves' settings elsewhere
    conv, conv_abl = set(bench.runs_of("converged")), bench.runs_of("converged-ablation")
    curves = set(bench.runs_of("curves"))
    own = {r for r in conv if r not in curves}
    assert {r.method for r in own if r.task != "movie-score"} == {"vectorfit", "full"}
    assert {r for r in conv if r.method == "full" and r.task == "movie"} <= set(bench.runs_of("converged-rates"))
    assert {dict(r.settings)["max_steps"] for r in conv if r.method == "full"} == {2048}
    assert {dict(r.settings)["max_steps"] for r in conv if r.method == "vectorfit"} == {1024}
    assert {r for r in conv if r.method == "no_avf" and r.task != "movie-score"} <= curves
    # the converged ablation shares VectorFit's and no-AVF's runs with converged (each pair trained
    # once); its three Sigma variants are its own, curves-length runs like no-AVF's
    assert {r.method for r in conv_abl if r in conv} == {"vectorfit", "no_avf"}
    assert {r.task for r in conv_abl} == {"movie", "bbc"} and {r.seed for r in conv_abl} == {0, 1, 2}
    assert {r.lr for r in conv_abl} == {0.001}
    assert {dict(r.settings)["max_steps"] for r in conv_abl if r.method != "vectorfit"} == {2048}
    # movie-score's own rate check: its runs at the rate converged uses are converged's runs (trained
    # once), so only the second rate of each method is new
    score = set(bench.runs_of("converged-rates-score"))
    assert {r.task for r in score} == {"movie-score"} and {r.seed for r in score} == {0, 1, 2}
    at_conv = {r for r in score if [r.lr] == bench.suites()["converged"]["lrs"][r.method]}
    assert at_conv and at_conv <= conv
    assert {(r.method, r.lr) for r in score - conv} == {("vectorfit", 0.003), ("vectorfit", 0.01), ("lora_r1", 0.001),
                                                       ("lora_r1", 0.002)}


def test_a_suite_with_options_names_each_run_s_option_outside_its_identity(tmp_path):
    """recipe's options share task, method, rate and seed; only the settings tell them apart.
    Status and progress lines must name the option, and the name must not enter the run's path (a
    renamed option would otherwise orphan its finished runs)."""
    runs = [r for r in bench.runs_of("recipe") if (r.task, r.seed) == ("movie", 0)]
    assert [r.option for r in runs] == list(bench.suites()["recipe"]["options"])
    assert [r.label for r in runs][1] == "movie/vectorfit[relative]/lr0.001/seed0"
    renamed = bench.Run(*[getattr(runs[1], f) for f in ("task", "model", "method", "seed", "lr", "settings")], "other")
    assert renamed == runs[1] and renamed.path(tmp_path) == runs[1].path(tmp_path)
    lines = []
    bench_status.print_status("recipe", tmp_path, only={"tasks": ["movie"], "seeds": [0]}, log=lines.append)
    assert [ln.split()[3] for ln in lines if ln.startswith("  ")] == [
        "vectorfit[paper]", "vectorfit[relative]", "vectorfit[bias_lr_0.1]", "vectorfit[head_lr_1e-2]",
        "vectorfit[head_lr_1e-4]"]
    assert lines[-1] == "[bench] training left: not known yet (5 run(s) with no pace or step budget to go by)"
    assert [r.option for r in bench.select(runs, {"options": ["relative", "paper"]})] == ["paper", "relative"]
    with pytest.raises(SystemExit, match="its options: bias_lr_0.1, head_lr_1e-2, head_lr_1e-4, paper, relative"):
        bench.select(runs, {"options": ["relativ"]}, "recipe")
    # a suite without options shows the bare method
    assert all(r.option == "" and r.shown_method == r.method for r in bench.runs_of("main"))


def test_every_run_of_every_suite_is_a_valid_train_command(tmp_path):
    """Each suite run is a `vectorfit train` command line. Parsed by the real CLI parser, it must
    give a config that validates and carries the run's identity. A typo in suites.json (an unknown
    flag, a bad value, an option that contradicts a setting) fails here, not hours into a bench."""
    from vectorfit_recipes import cli

    parser = cli.build_parser()
    for name in bench.suites():
        for r in bench.runs_of(name):
            ns = parser.parse_args(r.argv(r.path(tmp_path)))
            cfg = cli.dataclass_from_args(TrainConfig, ns)
            cfg.validate()
            assert (cfg.task, cfg.model, cfg.method, cfg.seed, cfg.lr) == (r.task, r.model, r.method, r.seed, r.lr), name
            for k, v in r.settings:
                assert getattr(cfg, k) == v, (name, k, getattr(cfg, k), v)


@pytest.mark.slow
def test_train_one_vectorfit_and_one_peft_run_then_report(tmp_path, monkeypatch):
    """End to end on a tiny slice of the real movie data: result schema, bench resume, report."""
    results = tmp_path / "results"
    smoke = bench.runs_of("smoke")
    assert {r.method for r in smoke} == {"vectorfit", "lora_r1"}
    for r in smoke:
        settings = dict(r.settings)
        cfg = TrainConfig(task=r.task, model=r.model, method=r.method, seed=r.seed, lr=r.lr, progress=False,
                          output=str(r.path(results)), eval_batch_size=64, max_len=32, **settings)
        res = run(cfg, log=lambda *a: None)
        assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
        assert res["steps"] == settings["max_steps"] and res["lr"] == r.lr
        on_disk = json.loads(r.path(results).read_text())
        assert not Path(f"{r.path(results)}.lock").exists()  # a finished run leaves only its result
        assert on_disk["test"] == res["test"] and 0.0 <= res["test"] <= 1.0
        assert res["adapter_bytes"] > 0 and res["trainable_params"] < res["total_params"]
        if r.method == "vectorfit":
            assert res["avf"]["history"] and res["delta_spectra"]
            assert res["adapter_bytes"] < 400_000  # vectors + head only
    assert [(row["state"], row["step"]) for row in bench_status.status("smoke", results)] == [("done", 3), ("done", 3)]
    # bench sees both runs done and runs nothing
    lines = []
    assert bench.run_suite("smoke", results, log=lines.append) == 0
    assert "2 of 2 runs already done, 0 to go" in lines[0]
    out = report.write_report(results, tmp_path / "RESULTS.md", suite_names=["smoke"])
    text = out.read_text()
    assert "VectorFit" in text and "LoRA r=1" in text and "#### movie" in text


def _fake_result(method: str, task: str, seed: int, test: float) -> dict:
    return {"_suite": "main", "task": task, "model": "minilm", "method": method, "lr": 0.01, "seed": seed,
            "test": test, "validation": test, "metric": "accuracy", "trainable_params": 10, "total_params": 100,
            "train_seconds": 1.0}


def test_paired_differences_match_a_by_hand_computation():
    vf = {0: 0.70, 1: 0.74, 2: 0.71}
    lora = {0: 0.72, 1: 0.73}  # seed 2 missing: it must not be paired with anything
    results = [_fake_result("vectorfit", "movie", s, v) for s, v in vf.items()]
    results += [_fake_result("lora_r1", "movie", s, v) for s, v in lora.items()]
    results += [_fake_result("ia3", "bbc", 0, 0.5)]  # no VectorFit run on bbc: no row
    diffs = report.paired_differences(report.aggregate(results), "main")
    assert set(diffs) == {("minilm", "movie", "lora_r1")}
    d = diffs[("minilm", "movie", "lora_r1")]
    by_hand = [0.70 - 0.72, 0.74 - 0.73]
    assert d["n"] == 2 and d["wins"] == 1
    assert d["mean"] == pytest.approx(sum(by_hand) / 2, abs=1e-12)
    assert d["std"] == pytest.approx(abs(by_hand[0] - by_hand[1]) / 2 ** 0.5, abs=1e-12)
    table = "\n".join(report._paired_table(report.aggregate(results), "main"))
    assert "| LoRA r=1 | -0.50 ± 2.12 (1/2) |" in table


def test_task_average_covers_the_tasks_every_method_ran_and_names_the_rest():
    vals = {("vectorfit", "movie"): (0.80, 0.82), ("vectorfit", "tweets"): (0.70, 0.74),
            ("lora_r1", "movie"): (0.84, 0.86), ("lora_r1", "tweets"): (0.76, 0.78), ("lora_r1", "bbc"): (0.97, 0.99)}
    results = [_fake_result(m, t, seed, v) for (m, t), vs in vals.items() for seed, v in enumerate(vs)]
    table = "\n".join(report._suite_tables(report.aggregate(results), "main"))
    assert "#### Average over 2 tasks (minilm: movie, tweets)" in table
    assert "Left out of the average: bbc (not every method ran it yet)." in table
    # VectorFit: per-seed task averages 0.75 and 0.78 -> mean 76.50, sample std 2.12
    assert "| VectorFit | 76.50 ± 2.12 (n=2) | 10 |" in table
    assert "| LoRA r=1 | 81.00 ± 1.41 (n=2) | 10 |" in table
    # Without VectorFit's tweets runs only movie is shared: fall back to all tasks, complete methods only
    only_movie = [r for r in results if not (r["method"] == "vectorfit" and r["task"] == "tweets")]
    table = "\n".join(report._suite_tables(report.aggregate(only_movie), "main"))
    assert "#### Average over 3 tasks (minilm: bbc, movie, tweets)" in table
    assert "Only the methods that ran every task are averaged; left out: VectorFit." in table
    assert "| LoRA r=1 | 86.67 ± 1.41 (n=2) | 10 |" in table and "| VectorFit | " not in table.split("Average over")[1]


def test_task_average_counts_on_each_task_only_the_seeds_every_method_ran():
    vals = {("vectorfit", "movie"): (0.80, 0.82), ("vectorfit", "tweets"): (0.70,),
            ("lora_r1", "movie"): (0.84, 0.86), ("lora_r1", "tweets"): (0.76, 0.60)}  # LoRA's tweets seed 1: extra
    results = [_fake_result(m, t, seed, v) for (m, t), vs in vals.items() for seed, v in enumerate(vs)]
    table = "\n".join(report._suite_tables(report.aggregate(results), "main"))
    assert "Each task counts the seeds every method ran on it: tweets: seed 0." in table
    # LoRA r=1: movie (0.84 + 0.86) / 2 = 0.85, tweets seed 0 only 0.76 -> 80.50 (with seed 1: 76.50);
    # only seed 0 ran both tasks, so one per-seed average and no spread
    assert "| LoRA r=1 | 80.50 (n=1) | 10 |" in table
    assert "| VectorFit | 75.50 (n=1) | 10 |" in table
    # disjoint seeds on a task: it has no seed in common, so it is left out like a task not run
    disjoint = results + [_fake_result(m, "bbc", s, 0.9) for m, s in (("vectorfit", 0), ("lora_r1", 1))]
    table = "\n".join(report._suite_tables(report.aggregate(disjoint), "main"))
    assert "#### Average over 2 tasks (minilm: movie, tweets)" in table and "Left out of the average: bbc" in table
    # no method ran two tasks: no average at all (and no error)
    apart = [_fake_result("vectorfit", "movie", 0, 0.8), _fake_result("lora_r1", "tweets", 0, 0.7)]
    assert "Average over" not in "\n".join(report._suite_tables(report.aggregate(apart), "main"))


def test_one_seed_is_not_shown_with_a_zero_spread():
    assert report._fmt(0.731, 0.0, 1) == "73.10 (n=1)"
    assert report._fmt(0.731, 0.012, 3) == "73.10 ± 1.20"


def test_strength_spread_ignores_untrained_vectors_and_matches_by_hand():
    s = report.strength_spread({"a.sigma": 1.0, "b.sigma": 3.0, "k.bias": 0.0})
    # population std of (1, 3) is 1, mean 2; the zero key bias is left out
    assert s == {"cv": 0.5, "max_over_mean": 1.5}
    assert report.strength_spread({"a.sigma": 1.0, "k.bias": 0.0}) is None


def test_pooling_effect_is_paired_by_seed_against_the_main_suite():
    main = [_fake_result("lora_r1", "movie", s, v) for s, v in {0: 0.70, 1: 0.74, 2: 0.71}.items()]
    pooled = [{**_fake_result("lora_r1", "movie", s, v), "_suite": "pooling"} for s, v in {0: 0.75, 1: 0.73}.items()]
    eff = report.pooling_effect(report.aggregate(main + pooled))
    e = eff[("movie", "lora_r1")]
    assert e["n"] == 2 and e["wins"] == 1
    assert e["mean"] == pytest.approx(((0.75 - 0.70) + (0.73 - 0.74)) / 2, abs=1e-12)
    assert "| movie | LoRA r=1 | 71.67 | 74.00 | +2.00 ± 4.24 | 1/2 |" in "\n".join(report._pooling_table(report.aggregate(main + pooled)))


def test_rate_choice_takes_the_best_mean_validation_over_the_seeds_every_rate_ran():
    def run(lr, seed, val):
        return {**_fake_result("vectorfit", "movie", seed, val - 0.05), "_suite": "main-job-rate", "lr": lr,
                "validation": val}

    results = [run(0.01, 0, 0.80), run(0.01, 1, 0.70), run(0.01, 2, 0.78),     # mean 76.00
               run(0.003, 0, 0.77), run(0.003, 1, 0.78), run(0.003, 2, 0.76),  # mean 77.00: best
               run(0.001, 0, 0.90)]                                            # one seed: does not compete
    choice = report.rate_choice(report.aggregate(results), "main-job-rate")
    c = choice[("movie", "minilm", "vectorfit")]
    assert c["lr"] == 0.003 and c["n"] == 3
    assert c["rates"] == pytest.approx({0.003: 0.77, 0.01: 0.76})
    assert ("| movie | minilm | VectorFit | 3 | 0.003: 77.00, 0.01: 76.00 | 0.003 |"
            in "\n".join(report._rate_choice_lines(report.aggregate(results), "main-job-rate")))
    # a tie goes to the smaller rate; a method at one rate has no choice to show
    tie = [run(0.01, 0, 0.8), run(0.003, 0, 0.8), {**run(0.01, 0, 0.8), "method": "lora_r1"}]
    assert report.rate_choice(report.aggregate(tie), "main-job-rate") == {
        ("movie", "minilm", "vectorfit"): {"lr": 0.003, "n": 1, "rates": {0.003: 0.8, 0.01: 0.8}}}


def test_bench_filters_keep_the_suite_order_and_name_what_a_suite_lacks():
    runs = bench.runs_of("curves-rates")
    only = bench.select(runs, {"methods": ["lora_r1", "vectorfit"]}, "curves-rates")
    assert only == [r for r in runs if r.method in ("vectorfit", "lora_r1")]  # suite order, not the filter's
    lrs = bench.suites()["curves-rates"]["lrs"]
    assert {r.method for r in only} == {"vectorfit", "lora_r1"}
    assert len(only) == len(lrs["vectorfit"]) + len(lrs["lora_r1"])
    assert bench.select(runs, {"seeds": ["0"], "tasks": ["movie"]}, "x") == runs
    with pytest.raises(SystemExit, match=r"has no methods lora_r2; its methods: .*lora_r1"):
        bench.select(runs, {"methods": ["lora_r1", "lora_r2"]}, "curves-rates")
    with pytest.raises(SystemExit, match="has no seeds 5"):
        bench.select(runs, {"seeds": ["5"]}, "curves-rates")
    # rates compare as numbers: 3e-3 is the suite's 0.003, and 2.5e-4 its 0.00025
    vf = bench.select(runs, {"methods": ["vectorfit"], "lrs": ["3e-3", " 2.5e-4"]}, "curves-rates")
    assert [r.lr for r in vf] == [0.003] and [r.lr for r in bench.select(runs, {"lrs": ["2.5e-4"]}, "x")] == [0.00025]
    with pytest.raises(SystemExit, match="has no lrs 0.007"):
        bench.select(runs, {"lrs": ["7e-3"]}, "curves-rates")
    with pytest.raises(SystemExit, match="--lrs takes learning rates"):
        bench.select(runs, {"lrs": ["fast"]}, "curves-rates")
    with pytest.raises(SystemExit, match="has no options relative; it has no named options"):
        bench.select(runs, {"options": ["relative"]}, "curves-rates")


def test_a_run_being_trained_elsewhere_is_skipped_and_a_second_trainer_refused(tmp_path, capsys):
    """Two processes on one --output would resume from one checkpoint and overwrite each other's
    files. The lock is the OS's flock, taken here on a second open file: the same conflict a
    second process meets."""
    from vectorfit_recipes import checkpoint, cli

    results = tmp_path / "results"
    first, second = bench.runs_of("smoke")
    out = first.path(results)
    assert not checkpoint.output_busy(str(out))
    with checkpoint.output_lock(str(out)):
        assert checkpoint.output_busy(str(out))
        lines = []
        assert bench.run_suite("smoke", results, dry_run=True, log=lines.append) == 0
        assert "0 of 2 runs already done, 1 to go" in lines[0]
        assert f"skipping movie/{first.method}/" in lines[1] and "another process is training it" in lines[1]
        listed = [line for line in lines if line.startswith("  vectorfit train")]
        assert len(listed) == 1 and f"--method {second.method} " in listed[0]
        # a hand-typed `vectorfit train` on the same output stops before touching any file
        code = cli.main(first.argv(out))
        assert code == 2 and f"another process is writing {out}" in capsys.readouterr().err
        assert not out.exists() and not checkpoint.checkpoint_path(str(out)).exists()
        assert not Path(f"{out}.partial").exists()
        assert [row["state"] for row in bench_status.status("smoke", results)] == ["running", "not started"]
    assert not checkpoint.output_busy(str(out))  # released with the context
    # an interrupted run: its curve so far, no lock holder -> "stopped" at its last curve step
    Path(f"{out}.partial").write_text(json.dumps({"partial": True, "curve": [{"step": 64}, {"step": 128}]}))
    rows = bench_status.status("smoke", results)
    assert [(row["state"], row["step"]) for row in rows] == [("stopped", 128), ("not started", None)]
    lines = []
    bench_status.print_status("smoke", results, log=lines.append)
    assert "0 done, 0 running, 1 stopped, 1 not started" in lines[0]
    assert lines[1].split()[:3] == ["stopped", "movie", first.method] and "step 128" in lines[1]
    assert not Path(f"{second.path(results)}.lock").exists()  # looking at a run does not make a lock file
    # timed curve points: the time left is the steps left at the last interval's pace
    # (64 -> 128 took 228 - 100 = 128 s, 2 s a step; 256 - 128 = 128 steps left -> 256 s)
    # (the CPU clock ran at half the wall clock's pace: 64 -> 128 took 64 CPU seconds, 1 s a step)
    Path(f"{out}.partial").write_text(json.dumps({"partial": True, "total_steps": 256, "curve": [
        {"step": 32, "train_seconds": 10.0}, {"step": 64, "train_seconds": 100.0, "train_cpu_seconds": 50.0},
        {"step": 128, "train_seconds": 228.0, "train_cpu_seconds": 114.0}]}))
    assert bench_status.training_left(out) == pytest.approx(256.0)
    # no checkpoint beside the curve (a fresh clone: git ignores them): the next invocation trains
    # from step 0, so all 256 steps are left at 2 s (512 s), and the line says it starts over
    row = bench_status.status("smoke", results)[0]
    assert (row["state"], row["step"], row.get("restarts")) == ("stopped", 128, True)
    assert (row["left_s"], row["cpu_left_s"]) == (pytest.approx(512.0), pytest.approx(256.0))
    lines = []
    bench_status.print_status("smoke", results, log=lines.append)
    assert lines[1].endswith(" step 128   no checkpoint: trains again from step 0, ~9 min of training left")
    # with its checkpoint (status looks only at whether the file is there) it resumes at step 128
    checkpoint.checkpoint_path(str(out)).write_bytes(b"")
    assert not bench_status.status("smoke", results)[0].get("restarts")
    lines = []
    bench_status.print_status("smoke", results, log=lines.append)
    assert "step 128 " in lines[1] and lines[1].endswith(" ~4 min of training left")
    # asked at step 128 (bench --status --stop-at-step 128): reached, so done, with its numbers there
    timed = Path(f"{out}.partial").read_text()
    Path(f"{out}.partial").write_text(json.dumps({**json.loads(timed), "curve": [
        {"step": 64, "train_seconds": 100.0}, {"step": 128, "train_seconds": 228.0, "test": 0.7, "validation": 0.6}]}))
    assert [(r["state"], r["step"], r.get("test")) for r in bench_status.status("smoke", results, at_step=128)] == [
        ("done", 128, 0.7), ("not started", None, None)]
    assert bench_status.status("smoke", results, at_step=256)[0]["state"] == "stopped"
    # not there yet: the time left is to that step (160 - 128 = 32 steps at 2 s), not to the run's end
    assert bench_status.status("smoke", results, at_step=160)[0]["left_s"] == pytest.approx(64.0)
    Path(f"{out}.partial").write_text(timed)  # back to the timed curve the checks below use
    # a running run has trained on since its last point was written (100 s ago here): 256 - 100 s left;
    # a stopped one has not, so its estimate stays
    # (the lock's time is its holder's start: taken now, then dated back as if taken 150 s ago)
    def ago(path, seconds):
        os.utime(path, (time.time() - seconds, time.time() - seconds))

    ago(f"{out}.partial", 100.0)
    with checkpoint.output_lock(str(out)):
        assert time.time() - Path(f"{out}.lock").stat().st_mtime < 5.0
        ago(f"{out}.lock", 150.0)
        row = bench_status.status("smoke", results)[0]
        assert row["state"] == "running" and row["left_s"] == pytest.approx(156.0, abs=10.0)
        # its CPU estimate (128 steps at 1 s = 128 s) loses the 100 s at its half share: 78 s
        assert row["cpu_left_s"] == pytest.approx(78.0, abs=5.0)
        # resumed after its last point was written: it counts from its own start, not the old point
        ago(f"{out}.partial", 3000.0)
        assert bench_status.status("smoke", results)[0]["left_s"] == pytest.approx(106.0, abs=10.0)
    # looking does not date the lock anew (only its holder does)
    ago(f"{out}.lock", 500.0)
    assert not checkpoint.output_busy(str(out)) and time.time() - Path(f"{out}.lock").stat().st_mtime > 400.0
    row = bench_status.status("smoke", results)[0]
    assert (row["left_s"], row["cpu_left_s"]) == (pytest.approx(256.0), pytest.approx(128.0))
    # one timed point (or an untimed partial from before) gives no estimate rather than a wrong one
    Path(f"{out}.partial").write_text(json.dumps({"partial": True, "total_steps": 256, "curve": [
        {"step": 64}, {"step": 128, "train_seconds": 228.0}]}))
    assert bench_status.training_left(out) is None and bench_status.status("smoke", results)[0]["left_s"] is None


def test_status_adds_up_the_training_left_from_the_paces_like_runs_measured(tmp_path):
    """A suite's remaining machine time: a run with a pace of its own counts to the step asked at
    that pace; a run that has not started counts at the median pace of one-thread runs of its task,
    model, method and batch shape, else of its method on any task, else of its task. A two-thread
    run, or one with another batch shape, goes at another pace and must not be borrowed from."""
    results = tmp_path / "results"
    cfg = {"batch_size": 32, "max_len": 64, "threads": 1}

    def write(path: Path, d: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d))

    runs = {(r.task, r.method, r.seed): r for r in bench.runs_of("curves") if r.lr in (0.001, 0.0005)}
    # movie VectorFit seed 0 finished: 200 s for 100 steps, 2 s a step (1 s of CPU: it shared its core)
    write(runs["movie", "vectorfit", 0].path(results),
          {"steps": 100, "train_seconds": 200.0, "train_cpu_seconds": 100.0, "threads": 1, "config": cfg,
           "test": 0.8, "validation": 0.8})
    # movie LoRA r=1 seed 0 stopped at 128: its last interval went at 3 s a step (1.5 s of CPU)
    write(Path(f"{runs['movie', 'lora_r1', 0].path(results)}.partial"), {"partial": True, "total_steps": 2048,
          "config": cfg, "curve": [{"step": 64, "train_seconds": 150.0, "train_cpu_seconds": 100.0},
                                   {"step": 128, "train_seconds": 342.0, "train_cpu_seconds": 196.0}]})
    Path(f"{runs['movie', 'lora_r1', 0].path(results)}.ckpt").write_bytes(b"")  # it resumes at 128
    # paces that must not be borrowed: a two-thread VectorFit run and a batch of 16 (1,000 s a step)
    for seed, other in ((1, {"threads": 2}), (2, {"batch_size": 16})):
        write(runs["movie", "vectorfit", seed].path(results).with_name(f"x{seed}-00000000.json"),
              {"steps": 1, "train_seconds": 1000.0, "threads": other.get("threads", 1), "config": {**cfg, **other}})
    paces = bench_status.measured_paces(results)
    assert paces["movie", "minilm", "vectorfit", (32, 64)] == [2.0]
    assert sorted(paces["movie", "minilm", "", (32, 64)]) == [2.0, 3.0]

    def left(**only) -> dict:
        rows = bench_status.status("curves", results, {**only, "lrs": ["1e-3", "5e-4"]}, at_step=1024)
        return bench_status.time_left(rows, paces, 1024)

    # movie, seeds 0-1: LoRA s0 (1024 - 128) x 3 = 2688 s of its own; VectorFit s1 1024 x 2; LoRA s1 1024 x 3
    assert left(tasks=["movie"], methods=["vectorfit", "lora_r1"], seeds=["0", "1"]) == {
        "seconds": 2688.0 + 2048.0 + 3072.0, "runs": 3, "borrowed": 2, "unknown": 0}
    # tweets VectorFit borrows movie's pace (its method, any task); LoRA r=8, measured nowhere, its task's
    assert left(tasks=["tweets"], methods=["vectorfit"], seeds=["0"])["seconds"] == 2048.0
    assert left(tasks=["movie"], methods=["lora_r8"], seeds=["0"])["seconds"] == 1024 * 2.5
    assert left(tasks=["tweets"], methods=["lora_r8"], seeds=["0"])["unknown"] == 1  # nothing on tweets
    # with no step asked for, a run counts to its own budget (curves: 2,048 steps)
    only = {"tasks": ["movie"], "methods": ["vectorfit"], "seeds": ["1"], "lrs": ["1e-3"]}
    rows = bench_status.status("curves", results, only)
    assert bench_status.time_left(rows, paces)["seconds"] == 2048 * 2.0
    lines: list[str] = []
    bench_status.print_status("curves", results, {"tasks": ["movie"], "methods": ["vectorfit", "lora_r1"],
                                           "seeds": ["0", "1"], "lrs": ["1e-3", "5e-4"]}, lines.append, at_step=1024)
    assert lines[-2].startswith("[bench] training left: about 2.2 core-hours for 3 run(s) (2 at the pace of like runs")
    # the same on the CPU clock: LoRA s0 (1024 - 128) x 1.5 of its own, VectorFit s1 1024 x 1, LoRA s1
    # 1024 x 1.5: 3,904 s. The two-thread and batch-16 files record no CPU time: nothing to borrow there
    assert lines[-1] == "[bench] at the CPU time a step took (a quiet core's pace): about 1.1 core-hours for 3 run(s)"
    cpu_paces = bench_status.measured_paces(results, bench_status.CPU)
    assert sorted(cpu_paces["movie", "minilm", "", (32, 64)]) == [1.0, 1.5]
    rows = bench_status.status("curves", results, {"tasks": ["movie"], "methods": ["lora_r8"], "seeds": ["0"],
                                                   "lrs": ["5e-4"]}, at_step=1024)
    # its task's median
    assert bench_status.time_left(rows, cpu_paces, 1024, bench_status.CPU)["seconds"] == 1024 * 1.25
    # a run whose like runs recorded no CPU time (results from before the field) is not counted on
    # that clock, and the line says so: tweets LoRA r=8 seed 1 has seed 0's wall pace only
    write(runs["tweets", "lora_r8", 0].path(results), {"steps": 100, "train_seconds": 300.0, "threads": 1,
                                                      "config": cfg, "test": 0.7, "validation": 0.7})
    lines.clear()
    bench_status.print_status("curves", results, {"tasks": ["tweets"], "methods": ["vectorfit", "lora_r8"],
                                                  "seeds": ["1"], "lrs": ["1e-3", "5e-4"]}, lines.append, at_step=1024)
    assert lines[-2].startswith("[bench] training left: about 1.4 core-hours for 2 run(s)")  # 1024 x (2 + 3)
    assert lines[-1] == ("[bench] at the CPU time a step took (a quiet core's pace): about 0.3 core-hours for 1 run(s) "
                         "(1 not counted: no CPU time recorded for them or like runs)")  # VectorFit: 1024 x 1
    # a suite counted in epochs (no max_steps) with no step asked for has no step budget to count
    main_rows = bench_status.status("main", results, {"tasks": ["movie"], "methods": ["vectorfit"], "seeds": ["0"]})
    assert bench_status.time_left(main_rows, paces) == {"seconds": 0.0, "runs": 0, "borrowed": 0, "unknown": 1}


def test_a_bench_beside_another_bench_gives_its_runs_one_thread(tmp_path):
    """Two benches over one results folder share the work; the second one's runs must not take
    torch's default of one thread per core beside the first one's (the cores would be oversubscribed,
    benchmarks/THREADS.md). Another process's run is recognised by the lock it holds."""
    from vectorfit_recipes import checkpoint

    results = tmp_path / "results"
    other = bench.runs_of("sweep")[0].path(results)
    other.parent.mkdir(parents=True)

    def commands(**kw) -> list[str]:
        lines: list[str] = []
        assert bench.run_suite("smoke", results, dry_run=True, log=lines.append, **kw) == 0
        return lines

    alone = commands()
    assert not any("--threads" in line for line in alone) and len(alone) == 3  # header + 2 runs
    with checkpoint.output_lock(str(other)):
        beside = commands()
        assert f"1 run(s) under {results} are training in other processes (e.g. {other.relative_to(results)})" \
            in beside[1]
        assert [line.endswith("--threads 1") for line in beside[2:]] == [True, True]
        chosen = commands(threads=2)  # an explicit choice stands
        assert len(chosen) == 3 and all(line.endswith("--threads 2") for line in chosen[1:])
    assert bench.runs_training_under(results) == []  # released: an idle lock file is not a run


def _diag_run(suite: str, method: str, seed: int, steps: int, lr: float) -> dict:
    layers = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    strengths = {f"{n}.{kind}": 0.1 * (i + 1) for i, n in enumerate(layers) for kind in ("sigma", "bias")}
    return {"_suite": suite, "task": "movie", "model": "minilm", "method": method, "seed": seed, "lr": lr,
            "steps": steps, "training_strengths": strengths, "delta_spectra": {layers[0]: [3.0, 2.0, 1.0]}}


def test_diagnostic_plots_name_the_suite_seed_rate_and_steps_they_were_drawn_from(tmp_path):
    from vectorfit_recipes.report_plots import plot_spectra, plot_strengths

    short = [_diag_run("main", m, 0, 64, lr) for m, lr in (("vectorfit", 1e-2), ("no_avf", 1e-2), ("full", 1e-4))]
    # the curve suite is preferred; its full fine-tuning run has only seed 1, VectorFit seeds 1 and 2
    long = [_diag_run("curves", "vectorfit", s, 2048, 1e-3) for s in (2, 1)] + [
        _diag_run("curves", "no_avf", 2, 2048, 1e-3), _diag_run("curves", "full", 1, 2048, 1e-4)]
    path, caption = plot_strengths(short + long, tmp_path)
    assert path.exists()
    assert caption == ("Drawn from suite `curves`, task movie, each run at the end of its training "
                       "(VectorFit: seed 2, lr 0.001, 2,048 steps; VectorFit (no AVF): seed 2, lr 0.001, 2,048 steps). "
                       "Coefficient of variation over the vectors that moved (the balance table's measure): "
                       "0.33 with AVF, 0.33 without.")  # strengths 0.1, 0.1, 0.2, 0.2: std 0.05 / mean 0.15
    path, caption = plot_spectra(short + long, tmp_path)
    assert path.exists()
    assert caption == ("Drawn from suite `curves`, task movie, each run at the end of its training "
                       "(VectorFit: seed 1, lr 0.001, 2,048 steps; Full FT: seed 1, lr 0.0001, 2,048 steps).")
    # without the curve suite both fall back to the short-budget runs, and say so
    assert plot_strengths(short, tmp_path)[1].startswith("Drawn from suite `main`")
    assert "VectorFit: seed 0, lr 0.01, 64 steps" in plot_spectra(short, tmp_path)[1]
    assert plot_spectra(short[:2], tmp_path) is None  # no full fine-tuning run: no spectra plot


def test_the_heatmap_spread_leaves_out_vectors_that_never_moved_like_the_balance_table(tmp_path):
    from vectorfit_recipes.report_plots import plot_strengths

    q, k = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"
    avf, plain = _diag_run("converged", "vectorfit", 0, 1024, 1e-3), _diag_run("converged", "no_avf", 0, 1024, 1e-3)
    avf["training_strengths"] = {f"{q}.sigma": 1.0, f"{q}.bias": 3.0, f"{k}.bias": 0.0}
    plain["training_strengths"] = {f"{q}.sigma": 2.0, f"{q}.bias": 2.0, f"{k}.bias": 0.0}
    caption = plot_strengths([avf, plain], tmp_path)[1]
    # moved vectors 1 and 3: std 1 / mean 2 = 0.50 (with the key bias' 0 it would be 0.94); 2 and 2: 0.00
    assert caption.endswith("0.50 with AVF, 0.00 without.")
    assert report.strength_spread(avf["training_strengths"])["cv"] == 0.5
