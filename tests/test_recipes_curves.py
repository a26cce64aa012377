"""Learning curves (``--eval-steps``), the mean-pooling head, and bench's suite mechanics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_bert
from vectorfit_recipes import bench, bench_status, models
from vectorfit_recipes.train import TrainConfig, run

# a few optimizer steps on a tiny slice of the real movie data
TINY = dict(max_train_examples=64, max_eval_examples=24, batch_size=8, eval_batch_size=24, max_len=32,
            epochs=10, progress=False, eval_before=False, select_on_validation=False)


def _quiet(*_: object) -> None:
    pass


def test_curve_points_are_the_runs_at_shorter_budgets(tmp_path):
    """With a constant rate, the curve's point at step t is exactly the test metric of a run that
    stops at t (same seed, same data order): the property that lets one long run stand for every
    shorter budget. no_avf: its training does not depend on the run length (AVF's schedule does)."""
    out = tmp_path / "r.json"
    cfg = TrainConfig(method="no_avf", max_steps=5, eval_steps="2,5,99", output=str(out), **TINY)
    long = run(cfg, log=_quiet)
    # the curve-so-far file a long run keeps while training is gone once the result is written
    assert out.is_file() and not Path(f"{out}.partial").exists()
    assert [p["step"] for p in long["curve"]] == [2, 5]  # 99 is past the run's end
    assert long["curve"][-1]["test"] == long["test"]  # last point = the final weights (no selection)
    assert long["curve"][-1]["validation"] == long["validation"]
    short = run(dataclasses.replace(cfg, max_steps=2, eval_steps=None, output=None), log=_quiet)
    assert short["curve"] == []
    assert long["curve"][0]["test"] == short["test"]
    assert long["curve"][0]["validation"] == short["validation"]
    # each point records the trained vectors' strengths of its step: the short run's at its end, and
    # the long run's own at the last point (the final weights); they moved between the two
    assert long["curve"][0]["training_strengths"] == short["training_strengths"]
    assert long["curve"][-1]["training_strengths"] == long["training_strengths"] != short["training_strengths"]
    assert len(short["training_strengths"]) > 2 and all(v >= 0 for v in short["training_strengths"].values())
    assert long["curve"][0]["epoch"] == pytest.approx(2 / 8)  # 64 examples / batch 8 = 8 steps an epoch


@pytest.mark.parametrize("bad", ["1,x", "0,4", "-3"])
def test_eval_steps_are_validated(bad):
    with pytest.raises(ValueError, match="--eval-steps"):
        TrainConfig(eval_steps=bad).validate()


def test_mean_pooling_is_the_masked_mean_and_ignores_padding():
    model = make_tiny_bert(num_labels=2).eval()
    models.use_mean_pooling(model)
    assert sum(p.numel() for p in model.bert.pooler.parameters()) == 0
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output
        by_hand = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
        torch.testing.assert_close(pooled, by_hand, rtol=0, atol=1e-6)
        # the padded row gives the same logits as the same sentence alone, unpadded
        batched = model(input_ids=ids, attention_mask=mask).logits[1]
        alone = model(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits[0]
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_mean_pooling_refuses_a_model_without_a_pooler():
    from conftest import make_tiny_mpnet

    with pytest.raises(ValueError, match="pooling='pooler'"):
        models.use_mean_pooling(make_tiny_mpnet())


def test_suite_rates_and_boolean_settings_reach_the_command_line():
    runs = bench.runs_of("curves-rates")
    table = bench.suites()["curves-rates"]
    for method, lrs in table["lrs"].items():
        assert sorted(r.lr for r in runs if r.method == method) == sorted(lrs), method
    argv = runs[0].argv(Path("x.json"))
    assert "--no-select-on-validation" in argv and "--no-eval-before" in argv
    assert argv[argv.index("--max-train-examples") + 1] == "none"
    # what bench passes parses back into the suite's settings
    from vectorfit_recipes import cli

    ns = cli.build_parser().parse_args(argv)
    cfg = cli.dataclass_from_args(TrainConfig, ns)
    for k, v in table["settings"].items():
        assert getattr(cfg, k) == v, k


def test_the_64_step_suites_keep_the_pooler_they_were_run_with():
    """The committed 64-step results read transformers' pooler; their suites say so, and their
    result files are found (so `bench` does not re-run them with another head)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for name in ("main", "ablation"):
        assert dict(bench.runs_of(name)[0].settings)["pooling"] == "pooler"
        missing = [r for r in bench.runs_of(name) if not r.path(root).exists()]
        assert not missing, missing[:3]


def test_bench_runs_jobs_in_parallel_processes(tmp_path, monkeypatch):
    """Two runs at once, each a real `vectorfit train` process with one thread; both results land."""
    suite = {"tasks": ["movie"], "models": ["minilm"], "methods": ["no_avf", "bitfit"], "seeds": [0],
             "settings": {"max_steps": 1, "max_train_examples": 16, "max_eval_examples": 8, "epochs": 1,
                          "batch_size": 8, "eval_batch_size": 8, "max_len": 16, "eval_before": False}}
    monkeypatch.setattr(bench, "suites", lambda: {"tiny": suite})
    lines: list[str] = []
    assert bench.run_suite("tiny", tmp_path, log=lines.append, jobs=2) == 0
    done = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert sorted(r["method"] for r in done) == ["bitfit", "no_avf"]
    assert all(r["threads"] == 1 and r["steps"] == 1 for r in done)
    assert not list(tmp_path.rglob("*.log"))  # logs of successful runs are removed


def _curve_result(method: str, lr: float, seed: int, vals: dict) -> dict:
    curve = [{"step": s, "epoch": s / 10, "train_loss": 0.5, "validation": v, "test": v - 0.01} for s, v in vals.items()]
    return {"_suite": "curves-rates", "task": "movie", "model": "minilm", "method": method, "lr": lr, "seed": seed,
            "metric": "accuracy", "trainable_params": 10, "curve": curve, "avf": None}


def test_curve_tables_choose_rates_and_reach_steps_match_a_by_hand_computation(tmp_path):
    from vectorfit_recipes import report_curves as rc

    results = [
        _curve_result("lora_r1", 0.001, 0, {64: 0.70, 128: 0.80, 256: 0.84}),
        _curve_result("lora_r1", 0.001, 1, {64: 0.72, 128: 0.82, 256: 0.86}),
        _curve_result("lora_r1", 0.002, 0, {64: 0.78, 128: 0.86, 256: 0.83}),  # best early, worse at the end
        _curve_result("vectorfit", 0.001, 0, {64: 0.60, 128: 0.70}),           # still running: no 256 yet
        _curve_result("vectorfit", 0.003, 0, {64: 0.65, 128: 0.69, 256: 0.75}),
    ]
    groups = rc.curve_groups(results, "curves-rates")
    g = groups[("movie", "minilm", "lora_r1", 0.001)]
    assert g["steps"] == [64, 128, 256] and g["validation"][256] == [0.84, 0.86]
    # mean validation: 0.71, 0.81, 0.85 -> 99% of 0.85 is 0.8415: first reached at 256
    assert rc.first_step_within(g) == 256
    assert rc.first_step_within(g, frac=0.95) == 128  # 0.8075 <= 0.81
    chosen = rc.choose_rates(groups)
    assert chosen[("movie", "minilm", "lora_r1")] == 0.001  # 0.85 mean at 256 beats 0.83
    assert chosen[("movie", "minilm", "vectorfit")] == 0.003  # the shorter curve may not compete
    text = "\n".join(rc.curve_tables(results, "curves-rates"))
    assert "| LoRA r=1 **(chosen)** | 0.001 | 2 | 71.00 ± 1.41 (n=2) | 81.00 ± 1.41 (n=2) | 85.00 ± 1.41 (n=2) | 256 |" in text
    # the check on the choice: mean over the last 3 checkpoints; LoRA 0.001: (0.71 + 0.81 + 0.85) / 3 = 0.79,
    # 0.002: (0.78 + 0.86 + 0.83) / 3 = 0.8233 -> the late mean prefers 0.002, the last step 0.001
    assert rc.late_mean(g) == pytest.approx(0.79) and rc.late_mean(g, window=4) is None
    assert "| LoRA r=1 | 0.001 | 85.00 | 79.00 | **chosen** |" in text and "| LoRA r=1 | 0.002 | 83.00 | 82.33 | |" in text
    assert ("* LoRA r=1: the two readings disagree. The last step prefers 0.001 (85.00 against 83.00), the mean "
            "of the last 3 checkpoints 0.002 (82.33 against 79.00)") in text
    assert "| VectorFit | 0.003 |" not in text  # its other rate has not reached step 256: nothing to compare
    agree = "\n".join(rc.curve_tables([results[4], _curve_result("vectorfit", 0.01, 0, {64: 0.5, 128: 0.6, 256: 0.7})],
                                      "curves-rates"))
    assert "| VectorFit | 0.003 | 75.00 | 69.67 | **chosen** |" in agree and "Both readings choose the same rate" in agree
    pending = results + [{**_curve_result("lora_r1", 0.0005, 0, {64: 0.5}), "_partial": True}]
    assert "| LoRA r=1 | 0.001 | 85.00 | 79.00 | **chosen so far** |" in "\n".join(rc.curve_tables(pending, "curves-rates"))
    # a rate still training may beat the chosen one: the mark says so
    results[3] = {**results[3], "_partial": True}
    text = "\n".join(rc.curve_tables(results, "curves-rates"))
    assert "| VectorFit **(chosen so far)** | 0.003 |" in text and "| LoRA r=1 **(chosen)** | 0.001 |" in text
    assert rc.plot_curves(results, "curves-rates", tmp_path).is_file()
    # a rate sweep is drawn a panel per method (VectorFit first), a one-rate-per-method suite in one panel
    panels = rc._panels(rc.curve_groups(results, "curves-rates"), "movie")
    assert [[(k[2], k[3]) for k in p] for p in panels] == [[("vectorfit", 0.001), ("vectorfit", 0.003)],
                                                         [("lora_r1", 0.001), ("lora_r1", 0.002)]]
    one_rate = [results[0], results[1], results[4]]
    assert [len(p) for p in rc._panels(rc.curve_groups(one_rate, "curves-rates"), "movie")] == [2]
    assert rc.plot_curves(one_rate, "curves-rates", tmp_path).is_file()


def test_bias_rate_scale_reaches_the_optimizer_and_changes_only_the_biases():
    """--bias-lr-scale 0 keeps every bias at its initial value while the singular values train; the
    paper's single rate (scale 1) moves both."""
    cfg = TrainConfig(method="no_avf", max_steps=2, **TINY)
    frozen_bias = run(dataclasses.replace(cfg, bias_lr_scale=0.0), log=_quiet)
    plain = run(cfg, log=_quiet)
    for r, moved in ((frozen_bias, False), (plain, True)):
        bias = {k: v for k, v in r["training_strengths"].items() if k.endswith(".bias")}
        sigma = {k: v for k, v in r["training_strengths"].items() if k.endswith(".sigma")}
        assert all(v > 0 for v in sigma.values())
        assert any(v > 0 for v in bias.values()) is moved
    with pytest.raises(ValueError, match="--bias-lr-scale, --head-lr and --sigma-param"):
        TrainConfig(method="lora_r1", bias_lr_scale=0.5).validate()
    with pytest.raises(ValueError, match="--head-lr"):
        TrainConfig(head_lr=float("nan")).validate()


@pytest.mark.parametrize("method,stop", [("vectorfit", 3), ("lora_r1", 8)])
def test_a_stopped_and_resumed_run_gives_the_uninterrupted_numbers(method, stop, tmp_path):
    """--stop-at-step keeps a checkpoint; the same command resumes from it. Weights, optimizer
    moments, AVF state, data order and dropout streams continue exactly: every number matches the
    run that was never stopped. Stops mid-epoch (3) and at an epoch end (8 = one epoch)."""
    base = dict(TINY, select_on_validation=True, epochs=2)
    base.update(avf_start=2, avf_interval=2, avf_num_freezes=3, avf_k=2) if method == "vectorfit" else None
    ref = run(TrainConfig(method=method, max_steps=11, eval_steps="2,5,9", output=str(tmp_path / "ref.json"),
                          **base), log=_quiet)
    out = tmp_path / "r.json"
    cfg = TrainConfig(method=method, max_steps=11, eval_steps="2,5,9", output=str(out), **base)
    stopped = run(dataclasses.replace(cfg, stop_at_step=stop), log=_quiet)
    assert stopped["stopped_at"] == stop and not out.exists() and Path(f"{out}.ckpt").is_file()
    lines: list[str] = []
    res = run(cfg, log=lines.append)
    assert any(f"resuming from {out}.ckpt at step {stop}" in l for l in lines)
    assert res["resumed_from"] == [stop] and not Path(f"{out}.ckpt").exists()
    for key in ("test", "validation", "best_epoch", "validation_history", "final_train_loss",
                "training_strengths", "avf", "steps"):
        assert res[key] == ref[key], key
    # every curve number matches; the optimisation seconds each point records are timings, not results
    timings = ("train_seconds", "train_cpu_seconds")
    untimed = [[{k: v for k, v in p.items() if k not in timings} for p in r["curve"]] for r in (res, ref)]
    assert untimed[0] == untimed[1]
    # timings count on across the resume, on both clocks: every point's are above the one before,
    # and the result's above the last point's
    for key in timings:
        seconds = [p[key] for p in res["curve"]] + [res[key]]
        assert 0 < seconds[0] and all(a < b for a, b in zip(seconds, seconds[1:])), (key, seconds)


def test_a_run_stopped_at_a_curve_point_records_there_the_spectra_a_run_ending_there_records(tmp_path):
    """A run stopped at step 2 (``--stop-at-step``, as the converged suite stops curve runs) records
    at that curve point the ΔW spectra a run of 2 steps records at its end, so a table read at step
    2 has them; resumed to its end, the point keeps them and the end has its own. No other point
    records spectra (they are ~1.5k numbers each)."""
    out = tmp_path / "r.json"
    cfg = TrainConfig(method="no_avf", max_steps=4, eval_steps="1,2,4", output=str(out), **TINY)
    run(dataclasses.replace(cfg, stop_at_step=2), log=_quiet)
    partial = json.loads(Path(f"{out}.partial").read_text())
    short = run(dataclasses.replace(cfg, max_steps=2, eval_steps=None, output=None), log=_quiet)
    at2 = partial["curve"][1]["delta_spectra"]
    assert set(at2) == set(short["delta_spectra"]) and len(at2) == 4  # first and last block, attention and MLP
    for name, spec in short["delta_spectra"].items():
        assert at2[name] == pytest.approx(spec, rel=1e-5, abs=1e-7), name
    assert "delta_spectra" not in partial["curve"][0]
    done = run(cfg, log=_quiet)
    assert done["curve"][1]["delta_spectra"] == at2 and "delta_spectra" not in done["curve"][2]
    assert done["delta_spectra"][next(iter(at2))] != at2[next(iter(at2))]  # two more steps moved ΔW
    from vectorfit_recipes.report_curves import read_at

    (row,) = read_at([{**partial, "_suite": "converged", "_partial": True}], "converged", 2)
    assert row["delta_spectra"] == at2


def test_training_cpu_seconds_are_one_thread_s_share_of_the_wall_clock_and_survive_an_old_checkpoint(tmp_path):
    """A one-thread run's CPU seconds cannot exceed its wall seconds (one thread computes at most
    one second per second), and they are not zero. A checkpoint saved before the CPU field existed
    resumes with the CPU time unknown (None), never as a count that silently lost its first part."""
    out = tmp_path / "r.json"
    cfg = TrainConfig(method="no_avf", max_steps=6, eval_steps="2,4,6", output=str(out), threads=1, **TINY)
    run(dataclasses.replace(cfg, stop_at_step=2), log=_quiet)
    ckpt = Path(f"{out}.ckpt")
    blob = torch.load(ckpt, weights_only=False)
    (point,) = json.loads(Path(f"{out}.partial").read_text())["curve"]
    for counted in (point, blob["loop"]):  # the curve point, and the checkpoint the next invocation reads
        assert 0 < counted["train_cpu_seconds"] <= counted["train_seconds"] * 1.05 + 0.05, counted
    del blob["loop"]["train_cpu_seconds"]  # as a checkpoint from before the field
    torch.save(blob, ckpt)
    res = run(cfg, log=_quiet)
    assert res["resumed_from"] == [2] and res["train_cpu_seconds"] is None
    assert [p["train_cpu_seconds"] is None for p in res["curve"]] == [False, True, True]
    assert res["train_seconds"] > res["curve"][0]["train_seconds"]  # the wall clock still counts on


def test_a_checkpoint_of_other_settings_is_not_used(tmp_path):
    out = tmp_path / "r.json"
    cfg = TrainConfig(method="no_avf", max_steps=4, output=str(out), **TINY)
    run(dataclasses.replace(cfg, stop_at_step=2), log=_quiet)
    lines: list[str] = []
    other = run(dataclasses.replace(cfg, lr=0.5), log=lines.append)
    assert any("from other settings (lr)" in l for l in lines) and other["resumed_from"] == []
    with pytest.raises(ValueError, match="--stop-at-step"):
        TrainConfig(stop_at_step=3).validate()  # no --output: nowhere to keep the checkpoint


def test_the_trainer_and_bench_status_share_one_rule_for_which_runs_resume():
    """AdaLoRA keeps its importance scores outside the model and optimizer, so it keeps no checkpoint;
    a run without --output has nowhere to keep one. Everything else resumes from ``X.ckpt``."""
    from vectorfit_recipes.checkpoint import RESUME_UNSUPPORTED, resume_path
    assert resume_path("r.json", "vectorfit") == Path("r.json.ckpt")
    assert resume_path("r.json", "full") == Path("r.json.ckpt")
    assert [resume_path("r.json", m) for m in RESUME_UNSUPPORTED] == [None] * len(RESUME_UNSUPPORTED)
    assert "adalora" in RESUME_UNSUPPORTED and resume_path(None, "vectorfit") is None


def test_relative_sigma_runs_end_to_end_and_is_saved_with_the_adapter(tmp_path):
    res = run(TrainConfig(method="no_avf", sigma_param="relative", max_steps=2, save_adapter=str(tmp_path / "a"),
                          **TINY), log=_quiet)
    assert res["method_config"]["sigma_param"] == "relative"
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VECTORFIT" and saved["sigma_param"] == "relative"
    from vectorfit_recipes import report_curves

    assert report_curves.method_label(res) == "no_avf+relative"


def test_suite_options_are_runs_of_their_own_and_share_the_plain_one():
    recipe = bench.runs_of("recipe")
    movie0 = [r for r in recipe if r.task == "movie" and r.seed == 0]
    assert len(movie0) == 5 and len({r.settings_hash() for r in movie0}) == 5
    plain = [r for r in movie0 if not {"sigma_param", "bias_lr_scale", "head_lr"} & set(dict(r.settings))]
    assert len(plain) == 1
    assert plain and plain[0] in set(bench.runs_of("curves-rates"))  # computed once for both suites


def test_report_shows_unfinished_curves_once_under_the_first_suite_that_runs_them(tmp_path, monkeypatch):
    """A run shared by two suites that has only a .partial curve is listed under the first suite of
    the report's order, marked unfinished, and not repeated under the second."""
    from vectorfit_recipes import report

    settings = {"max_steps": 8, "eval_steps": "2,4,8", "pooling": "mean"}
    shared = {"tasks": ["movie"], "models": ["minilm"], "methods": ["lora_r1"], "seeds": [0],
              "lrs": {"lora_r1": [0.001]}, "settings": settings}
    finished = {"tasks": ["movie"], "models": ["minilm"], "methods": ["bitfit"], "seeds": [0], "settings": settings}
    monkeypatch.setattr(bench, "suites", lambda: {"curves-rates": shared, "curves": shared, "main": finished})
    run_ = bench.runs_of("curves-rates")[0]
    part = Path(f"{run_.path(tmp_path)}.partial")
    part.parent.mkdir(parents=True)
    curve = [{"step": 2, "epoch": 0.1, "train_loss": 0.6, "validation": 0.6, "test": 0.55},
             {"step": 4, "epoch": 0.2, "train_loss": 0.5, "validation": 0.7, "test": 0.65}]
    part.write_text(json.dumps({"partial": True, "task": "movie", "model": "minilm", "method": "lora_r1", "seed": 0,
                                "lr": 0.001, "metric": "accuracy", "curve": curve, "config": {"pooling": "mean"}}))
    done = bench.runs_of("main")[0]
    done.path(tmp_path).parent.mkdir(parents=True)
    done.path(tmp_path).write_text(json.dumps({
        "task": "movie", "model": "minilm", "method": "bitfit", "seed": 0, "lr": done.lr, "metric": "accuracy",
        "test": 0.7, "validation": 0.7, "trainable_params": 5, "total_params": 10, "train_seconds": 1.0,
        "config": {"epochs": 1}}))
    text = report.write_report(tmp_path, tmp_path / "R.md").read_text()
    assert "## Suite `curves-rates`" in text and "## Suite `curves`" not in text
    # no "99% of own best" step for a curve that is still going (its best so far is not its best)
    assert "| LoRA r=1 (unfinished: 1 run(s), at step 4 so far) | 0.001 | 1 | 60.00 (n=1) | 70.00 (n=1) |  |" in text


def test_report_does_not_repeat_a_suite_whose_finished_runs_were_all_shown_above(tmp_path, monkeypatch):
    """``curves`` starts with curves-rates' finished runs: while those are all it has, its section
    would repeat the same curves; once it has a run of its own (another seed), it is shown."""
    from vectorfit_recipes import report

    settings = {"max_steps": 4, "eval_steps": "2,4", "pooling": "mean"}
    rates = {"tasks": ["movie"], "models": ["minilm"], "methods": ["lora_r1"], "seeds": [0],
             "lrs": {"lora_r1": [0.001]}, "settings": settings}
    monkeypatch.setattr(bench, "suites", lambda: {"curves-rates": rates, "curves": {**rates, "seeds": [0, 1]}})

    def write(run_):
        run_.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        curve = [{"step": 2, "validation": 0.6, "test": 0.55}, {"step": 4, "validation": 0.7, "test": 0.65}]
        run_.path(tmp_path).write_text(json.dumps({
            "task": "movie", "model": "minilm", "method": "lora_r1", "seed": run_.seed, "lr": run_.lr,
            "metric": "accuracy", "test": 0.65, "validation": 0.7, "trainable_params": 5, "total_params": 10,
            "train_seconds": 1.0, "curve": curve, "config": {"pooling": "mean"}}))

    seed0, seed1 = bench.runs_of("curves")
    assert seed0 in set(bench.runs_of("curves-rates"))
    write(seed0)
    text = report.write_report(tmp_path, tmp_path / "R.md").read_text()
    assert "## Suite `curves-rates`" in text and "## Suite `curves`" not in text
    write(seed1)
    text = report.write_report(tmp_path, tmp_path / "R.md").read_text()
    assert "## Suite `curves-rates`" in text and "## Suite `curves`" in text


def test_curve_differences_are_paired_by_seed_at_the_chosen_rates():
    from vectorfit_recipes import report_curves as rc

    results = [
        _curve_result("vectorfit", 0.001, 0, {64: 0.70, 128: 0.80}),
        _curve_result("vectorfit", 0.001, 1, {64: 0.60, 128: 0.84}),
        _curve_result("vectorfit", 0.003, 0, {64: 0.50, 128: 0.50}),  # not chosen: never compared
        _curve_result("lora_r1", 0.001, 1, {64: 0.65, 128: 0.80}),     # seed order differs from VectorFit's
        _curve_result("lora_r1", 0.001, 0, {64: 0.72, 128: 0.79}),
        _curve_result("lora_r1", 0.001, 2, {64: 0.99, 128: 0.99}),     # no VectorFit seed 2: left out
    ]
    groups = rc.curve_groups(results, "curves-rates")
    paired = rc.curve_paired(groups)
    assert set(paired) == {("movie", "minilm", "lora_r1")}
    rows = paired[("movie", "minilm", "lora_r1")]
    # test = validation - 0.01 for both, so the test differences are the validation ones:
    # step 64: seed 0 0.70-0.72 = -0.02, seed 1 0.60-0.65 = -0.05; step 128: +0.01, +0.04
    assert rows[64]["n"] == 2 and rows[64]["wins"] == 0
    assert rows[64]["mean"] == pytest.approx(-0.035) and rows[64]["std"] == pytest.approx(0.03 / 2 ** 0.5)
    assert rows[128]["mean"] == pytest.approx(0.025) and rows[128]["wins"] == 2
    text = "\n".join(rc.curve_tables(results, "curves-rates"))
    assert "VectorFit minus each method at its chosen rate, paired by seed" in text
    assert "| LoRA r=1 | 0.001 − 0.001 | -3.50 ± 2.12 (0/2) | +2.50 ± 2.12 (2/2) |" in text
    # one shared seed: no paired table (the per-method tables already show the difference)
    single = rc.curve_tables([results[0], results[4]], "curves-rates")
    assert not any("paired by seed" in line for line in single)


def test_a_suite_whose_rates_a_sweep_chose_marks_and_pairs_the_sweeps_choice(tmp_path):
    """``curves`` keeps VectorFit's paper rate (1e-3, seed 0, finished) beside its chosen one (3e-3,
    3 seeds, still at step 128). Choosing among its own runs would pick 1e-3, the only rate at the
    longest step, and pair VectorFit's one seed with LoRA's three; the sweep's choice (3e-3) must
    hold, and the pairing use 3e-3's seeds, on every task (the sweep ran movie only)."""
    from vectorfit_recipes import report_curves as rc

    def run(method, lr, seed, vals, suite="curves", task="movie"):
        return {**_curve_result(method, lr, seed, vals), "_suite": suite, "task": task}

    sweep = [run("vectorfit", 0.001, 0, {64: 0.70, 128: 0.75, 256: 0.80}, "curves-rates"),
             run("vectorfit", 0.003, 0, {64: 0.72, 128: 0.78, 256: 0.82}, "curves-rates"),
             run("lora_r1", 0.001, 0, {64: 0.74, 128: 0.80, 256: 0.83}, "curves-rates")]
    curves = [run("vectorfit", 0.001, 0, {64: 0.70, 128: 0.75, 256: 0.80}),
              run("vectorfit", 0.003, 0, {64: 0.72, 128: 0.78, 256: 0.82}),
              {**run("vectorfit", 0.003, 1, {64: 0.70, 128: 0.90}), "_partial": True},
              run("lora_r1", 0.001, 0, {64: 0.74, 128: 0.80, 256: 0.83}),
              run("lora_r1", 0.001, 1, {64: 0.71, 128: 0.85, 256: 0.86}),
              run("vectorfit", 0.001, 0, {64: 0.60, 128: 0.65}, task="tweets"),
              run("vectorfit", 0.003, 0, {64: 0.61, 128: 0.66}, task="tweets"),
              run("vectorfit", 0.003, 1, {64: 0.63, 128: 0.68}, task="tweets"),
              run("lora_r1", 0.001, 1, {64: 0.62, 128: 0.64}, task="tweets"),
              # a VectorFit ablation at the paper's rate, not at VectorFit's chosen one
              run("no_avf", 0.001, 0, {64: 0.66, 128: 0.76, 256: 0.80}),
              run("no_avf", 0.001, 1, {64: 0.60, 128: 0.70, 256: 0.75}),
              run("vectorfit", 0.001, 1, {64: 0.63, 128: 0.71, 256: 0.78})]
    results = sweep + curves
    groups = rc.curve_groups(results, "curves")
    assert rc.choose_rates(groups)[("movie", "minilm", "vectorfit")] == 0.001  # what its own runs would pick
    chosen, so_far = rc.rates_from(results, groups, "curves-rates")
    assert chosen[("movie", "minilm", "vectorfit")] == 0.003 and chosen[("tweets", "minilm", "vectorfit")] == 0.003
    assert chosen[("movie", "minilm", "lora_r1")] == 0.001 and so_far == set()
    text = "\n".join(rc.curve_tables(results, "curves", rates_chosen_by="curves-rates"))
    assert "| VectorFit **(chosen in curves-rates)** (unfinished: 1 run(s), at step 128 so far) | 0.003 | 2 |" in text
    assert "| VectorFit | 0.001 | 2 |" in text and "rate choice" not in text
    # paired at 3e-3, on the seeds and steps both have: movie seeds 0 and 1 at 64 and 128 (test = val - 0.01)
    # 64: 0.72-0.74, 0.70-0.71 -> -1.50; 128: 0.78-0.80, 0.90-0.85 -> +1.50 (1 of 2 won); tweets: seed 1 only
    assert "| LoRA r=1 | 0.003 − 0.001 | -1.50 ± 0.71 (0/2) | +1.50 ± 4.95 (1/2) |" in text
    # the ablation against VectorFit at its own rate 1e-3, at every step both reached:
    # 64: 0.70-0.66, 0.63-0.60 -> +3.50; 128: -0.01, +0.01 -> 0.00 (1 won); 256: 0.00, +0.03 -> +1.50
    assert rc.paired_rates(groups, chosen=chosen)[("movie", "minilm", "no_avf")] == (0.001, 0.001)
    assert ("| VectorFit (no AVF) | 0.001 − 0.001 | +3.50 ± 0.71 (2/2) | +0.00 ± 1.41 (1/2) "
            "| +1.50 ± 2.12 (1/2) |") in text
    assert text.count("paired by seed") == 1
    # a choice the sweep may still change is marked so
    pending = results + [{**run("vectorfit", 0.01, 0, {64: 0.5}, "curves-rates"), "_partial": True}]
    assert "**(chosen so far in curves-rates)**" in "\n".join(rc.curve_tables(pending, "curves", "curves-rates"))
    # one panel per task, the reference rate dashed
    assert [len(p) for p in rc._panels(groups, "movie", one_panel=True)] == [4]
    assert rc.plot_curves(results, "curves", tmp_path, rates_chosen_by="curves-rates").is_file()


def test_bench_stop_at_step_takes_every_run_that_far_and_a_later_bench_finishes_them(tmp_path, monkeypatch):
    """Breadth first: `bench --stop-at-step 2` stops each run at step 2 with its checkpoint (a real
    `vectorfit train` process), counts it as done at that step and skips it when asked again; a bench
    without the flag then continues it to its full budget from the checkpoint."""
    suite = {"tasks": ["movie"], "models": ["minilm"], "methods": ["no_avf"], "seeds": [0],
             "settings": {"max_steps": 3, "max_train_examples": 16, "max_eval_examples": 8, "epochs": 1,
                          "batch_size": 4, "eval_batch_size": 8, "max_len": 16, "eval_before": False,
                          "eval_steps": "1,3", "select_on_validation": False}}
    monkeypatch.setattr(bench, "suites", lambda: {"tiny": suite})
    (run_,) = bench.runs_of("tiny")
    out = run_.path(tmp_path)
    lines: list[str] = []
    assert bench.run_suite("tiny", tmp_path, log=lines.append, stop_at_step=2) == 0
    assert not out.exists() and Path(f"{out}.ckpt").is_file() and not out.with_suffix(".log").exists()
    partial = json.loads(Path(f"{out}.partial").read_text())
    assert partial["stopped_at"] == 2 and [p["step"] for p in partial["curve"]] == [1]
    assert partial["curve"][0]["train_seconds"] > 0  # the pace bench --status estimates from
    assert bench.reached_step(out) == 2
    assert [(r["state"], r["step"]) for r in bench_status.status("tiny", tmp_path)] == [("stopped", 2)]
    lines.clear()
    assert bench.run_suite("tiny", tmp_path, log=lines.append, stop_at_step=2) == 0  # nothing to do
    assert "1 of 1 runs already done (1 of them only to step 2), 0 to go" in lines[0]
    assert bench.run_suite("tiny", tmp_path, log=lines.append) == 0
    res = json.loads(out.read_text())
    assert res["steps"] == 3 and res["resumed_from"] == [2] and [p["step"] for p in res["curve"]] == [1, 3]
    assert res["curve"][1]["train_seconds"] >= res["curve"][0]["train_seconds"]  # counted across the resume
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.ckpt").exists()


def test_a_run_resumed_at_its_stop_step_trains_no_further(tmp_path):
    out = tmp_path / "r.json"
    cfg = TrainConfig(method="no_avf", max_steps=4, output=str(out), stop_at_step=2, **TINY)
    first = run(cfg, log=_quiet)
    again = run(cfg, log=_quiet)  # same stop: the checkpoint is at step 2 already
    assert first["stopped_at"] == again["stopped_at"] == 2
    assert json.loads(Path(f"{out}.partial").read_text())["stopped_at"] == 2


def test_a_suite_read_at_one_step_shares_the_curve_runs_and_reads_them_there(tmp_path, monkeypatch):
    """``converged`` (the main comparison at the realistic budget) is the table at one budget read off
    the curves: a constant-rate method's run is the curve suite's run (one file), counted done once
    its curve reaches the step (finished or not) and read there, not at its end; VectorFit, whose
    AVF schedule depends on the budget, has runs of its own ("method_settings") that end at the
    step. Checked against a by-hand mean and paired difference of the step's values."""
    from vectorfit_recipes import report

    settings = {"max_steps": 4, "eval_steps": "2,4", "pooling": "mean"}
    curves = {"tasks": ["movie"], "models": ["minilm"], "methods": ["lora_r1"], "seeds": [0, 1, 2],
              "lrs": {"lora_r1": [0.001]}, "settings": settings}
    converged = {**curves, "methods": ["vectorfit", "lora_r1"], "read_at_step": 2, "lrs": {"lora_r1": [0.001],
                 "vectorfit": [0.003]}, "method_settings": {"vectorfit": {"max_steps": 2, "eval_steps": "2"}}}
    monkeypatch.setattr(bench, "suites", lambda: {"curves": curves, "converged": converged})
    runs = bench.runs_of("converged")
    lora = [r for r in runs if r.method == "lora_r1"]
    vf = [r for r in runs if r.method == "vectorfit"]
    assert set(lora) <= set(bench.runs_of("curves")) and len(lora) == 3  # shared: computed once
    assert all(dict(r.settings)["max_steps"] == 2 and r not in bench.runs_of("curves") for r in vf)

    def write(r, curve, partial=False, **extra):
        path = Path(f"{r.path(tmp_path)}.partial") if partial else r.path(tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        last = curve[-1] if curve else {}
        path.write_text(json.dumps({
            "task": "movie", "model": "minilm", "method": r.method, "seed": r.seed, "lr": r.lr, "metric": "accuracy",
            "curve": curve, "trainable_params": 5, "total_params": 10,
            "config": {"pooling": "mean", **dict(r.settings)},  # a run records its settings, its own included
            **({"partial": True} if partial else {"test": last["test"], "validation": last["validation"],
                                                   "steps": last["step"], "train_seconds": last["train_seconds"]}),
            **extra}))

    def pt(step, val, test):
        return {"step": step, "validation": val, "test": test, "train_seconds": 10.0 * step}

    write(lora[0], [pt(2, 0.70, 0.60), pt(4, 0.90, 0.95)], training_strengths={"a": 1.0, "b": 3.0})  # finished
    # still training, past step 2; its point there records strengths (as a VectorFit run's does)
    write(lora[1], [{**pt(2, 0.72, 0.66), "training_strengths": {"a": 1.0, "b": 1.0, "c": 4.0}}], partial=True)
    write(lora[2], [], partial=True)  # not at step 2 yet: not counted
    write(vf[0], [pt(2, 0.75, 0.70)], training_strengths={"a": 1.0, "b": 3.0})
    write(vf[1], [pt(2, 0.71, 0.62)], training_strengths={"a": 2.0, "b": 2.0})

    rows = {(r["run"].method, r["run"].seed): r for r in bench_status.status("converged", tmp_path)}
    assert rows[("lora_r1", 0)]["state"] == "done" and rows[("lora_r1", 0)]["test"] == 0.60  # not its end's 0.95
    assert rows[("lora_r1", 1)]["state"] == "done" and rows[("lora_r1", 1)]["test"] == 0.66
    assert rows[("lora_r1", 2)]["state"] == "stopped" and rows[("vectorfit", 2)]["state"] == "not started"
    lines: list[str] = []
    assert bench.run_suite("converged", tmp_path, dry_run=True, log=lines.append) == 0
    assert lines[0].endswith("2 to go; results in " + str(tmp_path)) and all("--stop-at-step 2" in ln for ln in lines[1:])

    text = report.write_report(tmp_path, tmp_path / "R.md").read_text()
    section = text[text.index("## Suite `converged`"):]
    assert "max_steps=4 (read at step 2)" in section.split("\n")[2]  # the Settings line: the curves' budget
    # ... and the curves' settings, though VectorFit's runs, which the suite lists first, have their own
    assert "eval_steps=2,4" in section.split("\n")[2]
    assert section.split("\n")[4] == "Methods with settings of their own: VectorFit: max_steps=2, eval_steps=2."
    assert "Training strengths (balance table) are those at step 2, from runs whose curve points" in section
    assert "#### Balance of the trained vectors (training strength = mean |change| per element, at step 2)" in section
    # step-2 test values: VectorFit (0.70 + 0.62) / 2 = 66.00, std 5.66; LoRA (0.60 + 0.66) / 2 = 63.00, std 4.24
    assert "| VectorFit | 66.00 ± 5.66 (n=2) | 73.00 ± 2.83 (n=2) |  | 5 |  | 0.003 | 20 |  |" in section
    assert "| LoRA r=1 | 63.00 ± 4.24 (n=2) | 71.00 ± 1.41 (n=2) |  | 5 |  | 0.001 | 20 |  |" in section
    # paired by seed: 0.70 - 0.60 = +10, 0.62 - 0.66 = -4 -> +3.00 ± 9.90, VectorFit ahead on 1 of 2
    assert "| LoRA r=1 | +3.00 ± 9.90 (1/2) |" in section
    # the balance table has the strengths at step 2 (VectorFit's runs ended there): cv of (1, 3) = 0.5,
    # of (2, 2) = 0
    assert "| movie | VectorFit | 0.25 ± 0.35 (n=2) |" in section
    # what a run measured at its end is not its state at step 2: dropped from a run read earlier
    from vectorfit_recipes.report_curves import read_at

    (early,) = read_at([{**json.loads(lora[0].path(tmp_path).read_text()), "_suite": "converged"}], "converged", 2)
    assert early["test"] == 0.60 and early["steps"] == 2 and "training_strengths" not in early
    (mid,) = read_at([{**json.loads(Path(f"{lora[1].path(tmp_path)}.partial").read_text()), "_suite": "converged"}],
                     "converged", 2)
    assert mid["training_strengths"] == {"a": 1.0, "b": 1.0, "c": 4.0}  # the step's, though not its end
    assert early["train_seconds"] == 20.0  # the point's time, not the run's 40 s to step 4
    # an untimed point (older runs) has no time at the step: not the run's time to its end
    old = json.loads(lora[0].path(tmp_path).read_text())
    old["curve"] = [{k: v for k, v in p.items() if k != "train_seconds"} for p in old["curve"]]
    assert read_at([{**old, "_suite": "converged"}], "converged", 2)[0]["train_seconds"] is None
    assert read_at([{**old, "_suite": "converged"}], "converged", 4)[0]["train_seconds"] == 40.0


def test_a_rate_check_read_at_one_step_chooses_by_the_mean_validation_there(tmp_path, monkeypatch):
    """``converged-rates``: several rates per method, read at one step of the shared curves; the rate
    is chosen by the mean validation over the seeds at that step, not at the runs' ends. By hand:
    at step 2, 1e-3 averages (0.80 + 0.70) / 2 = 75.00 and 2e-3 (0.74 + 0.74) / 2 = 74.00, so 1e-3
    wins there, although 2e-3 is ahead at step 4 (0.90 against 0.60 on both seeds)."""
    from vectorfit_recipes import report

    settings = {"max_steps": 4, "eval_steps": "2,4", "pooling": "mean"}
    rates = {"tasks": ["movie"], "models": ["minilm"], "methods": ["vectorfit", "lora_r1", "full"], "seeds": [0, 1],
             "lrs": {"lora_r1": [0.002, 0.001], "vectorfit": [0.003], "full": [1e-4, 5e-5]}, "settings": settings,
             "read_at_step": 2}
    monkeypatch.setattr(bench, "suites", lambda: {"converged-rates": rates})
    runs = {(r.method, r.lr, r.seed): r for r in bench.runs_of("converged-rates")}
    at2 = {("lora_r1", 0.001, 0): 0.80, ("lora_r1", 0.001, 1): 0.70, ("lora_r1", 0.002, 0): 0.74,
           ("lora_r1", 0.002, 1): 0.74, ("vectorfit", 0.003, 0): 0.78, ("vectorfit", 0.003, 1): 0.75,
           ("full", 1e-4, 0): 0.90, ("full", 1e-4, 1): 0.88, ("full", 5e-5, 0): 0.95}  # 5e-5: seed 0 only
    for (method, lr, seed), val in at2.items():
        path = runs[(method, lr, seed)].path(tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        end = 0.60 if lr == 0.001 else 0.90
        curve = [{"step": 2, "validation": val, "test": val, "train_seconds": 1.0},
                 {"step": 4, "validation": end, "test": end, "train_seconds": 2.0}]
        path.write_text(json.dumps({"task": "movie", "model": "minilm", "method": method, "seed": seed, "lr": lr,
                                    "metric": "accuracy", "curve": curve, "config": {"pooling": "mean"},
                                    "test": end, "validation": end, "steps": 4, "train_seconds": 2.0,
                                    "trainable_params": 5, "total_params": 10}))
    text = report.write_report(tmp_path, tmp_path / "R.md").read_text()
    section = text[text.index("## Suite `converged-rates`"):]
    assert "| movie | minilm | LoRA r=1 | 2 | 0.001: 75.00, 0.002: 74.00 | 0.001 |" in section
    # paired at the chosen rate: VectorFit (0.78, 0.75) minus LoRA r=1 at 1e-3 (0.80, 0.70) = (-2, +5)
    # -> +1.50 ± 4.95, ahead on 1 of 2 (against 2e-3 it would be +2.50)
    assert "| LoRA r=1 | +1.50 ± 4.95 (1/2) |" in section
    # full fine-tuning's rates share one seed of two: no choice yet, so it is paired at the rate listed
    # first, 1e-4: (0.78 - 0.90, 0.75 - 0.88) -> -12.50 ± 0.71 (at 5e-5 it would be -17.00 on one seed)
    assert "| Full FT | -12.50 ± 0.71 (0/2) |" in section


def test_a_suite_read_at_one_step_can_show_its_curves_cut_at_that_step(tmp_path, monkeypatch):
    """``converged-ablation``'s variants run in no curve suite: with ``"curves_in_report"`` the report
    tabulates their curves up to the step the suite reads at. A run that went past the step is cut
    there and counts as finished; one that has not reached it is marked as still going. Paired
    differences by checkpoint are checked against by-hand values."""
    from vectorfit_recipes import report

    spec = {"tasks": ["movie"], "models": ["minilm"], "methods": ["vectorfit", "sigma"], "seeds": [0, 1],
            "lrs": {"vectorfit": [0.001], "sigma": [0.001]}, "read_at_step": 2, "curves_in_report": True,
            "settings": {"max_steps": 4, "eval_steps": "1,2,4", "pooling": "mean"}}
    monkeypatch.setattr(bench, "suites", lambda: {"converged-ablation": spec})
    runs = {(r.method, r.seed): r for r in bench.runs_of("converged-ablation")}
    points = {("vectorfit", 0): [(1, 0.70), (2, 0.80), (4, 0.99)], ("vectorfit", 1): [(1, 0.60), (2, 0.76)],
              ("sigma", 0): [(1, 0.65), (2, 0.74)], ("sigma", 1): [(1, 0.61), (2, 0.70), (4, 0.10)]}
    for (method, seed), pts in points.items():
        path = runs[(method, seed)].path(tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        going = seed == 1 and method == "vectorfit"  # at step 2 of 4 and still training: a .partial
        curve = [{"step": s, "validation": v, "test": v, "train_seconds": float(s)} for s, v in pts]
        body = {"task": "movie", "model": "minilm", "method": method, "seed": seed, "lr": 0.001, "metric": "accuracy",
                "curve": curve, "config": {"pooling": "mean"}, "trainable_params": 5, "total_params": 10}
        if going:
            Path(f"{path}.partial").write_text(json.dumps({**body, "partial": True}))
        else:
            path.write_text(json.dumps({**body, "test": pts[-1][1], "validation": pts[-1][1], "steps": pts[-1][0],
                                        "train_seconds": 4.0}))
    section = report.write_report(tmp_path, tmp_path / "R.md").read_text().split("## Suite `converged-ablation`")[1]
    assert "The same runs at each checkpoint up to step 2:" in section
    assert "![test learning curves](plots/converged-ablation_curves_test.png)" in section
    assert (tmp_path / "plots" / "converged-ablation_curves_test.png").stat().st_size > 0
    curves = section.split("The same runs at each checkpoint up to step 2:")[1]
    assert "| method | lr | seeds | 1 | 2 | 99% of own best at |" in curves  # cut at 2: no step-4 column
    assert "unfinished" not in curves  # every run reached step 2
    # VectorFit minus Σ by seed: step 1 (0.70-0.65, 0.60-0.61) = (+5, -1) -> +2.00 ± 4.24 (1/2);
    # step 2 (0.80-0.74, 0.76-0.70) = (+6, +6) -> +6.00 ± 0.00 (2/2)
    row = next(ln for ln in curves.splitlines() if ln.startswith("| VectorFit(Σ) | 0.001 − 0.001 |"))
    assert "+2.00 ± 4.24 (1/2)" in row and "+6.00 ± 0.00 (2/2)" in row
    # Σ's step-2 test mean over both seeds: (0.74 + 0.70) / 2 = 72.00, not its step-4 value
    assert any(ln.startswith("| VectorFit(Σ) | 0.001 | 2 |") and "72.00 ± 2.83" in ln for ln in curves.splitlines())
    # a run still short of the step keeps its mark of a run going on; other suites' runs are dropped
    from vectorfit_recipes.report_curves import cut_at

    short = {"_suite": "converged-ablation", "_partial": True, "curve": [{"step": 1, "validation": 0.5, "test": 0.5}]}
    assert [r["_partial"] for r in cut_at([short, {**short, "_suite": "curves"}], "converged-ablation", 2)] == [True]


def test_diagnostic_plots_read_a_converged_suite_at_its_step(tmp_path, monkeypatch):
    """The heat-map and spectra prefer the converged suite (the main comparison at the realistic
    budget), each run as it stood at the suite's step: strengths from the curve point there, ΔW
    spectra from a run that ended there or recorded them at that point (none here). Seed 0's no-AVF
    run records strengths at its end (step 4) but not at step 2, so the pair is seed 1's; full
    fine-tuning's spectra exist only at step 4, so the spectra fall back to `curves`."""
    from vectorfit_recipes import report

    settings = {"max_steps": 4, "eval_steps": "2,4", "pooling": "mean"}
    curves = {"tasks": ["movie"], "models": ["minilm"], "methods": ["no_avf", "full", "vectorfit"], "seeds": [0, 1],
              "lrs": {"no_avf": [0.001], "full": [1e-4], "vectorfit": [0.001]}, "settings": settings}
    converged = {**curves, "read_at_step": 2, "method_settings": {"vectorfit": {"max_steps": 2, "eval_steps": "2"}}}
    monkeypatch.setattr(bench, "suites", lambda: {"curves": curves, "converged": converged})
    layer = "bert.encoder.layer.0.attention.self.query"
    ends = {f"{layer}.sigma": 0.2, f"{layer}.bias": 0.1}
    runs = set(bench.runs_of("curves")) | set(bench.runs_of("converged"))
    for r in runs:
        steps = dict(r.settings)["max_steps"]
        point2 = {"step": 2, "validation": 0.7, "test": 0.7}
        if r.method == "no_avf" and r.seed == 1:
            point2["training_strengths"] = ends
        curve = [point2] + ([{"step": 4, "validation": 0.8, "test": 0.8}] if steps == 4 else [])
        path = r.path(tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "task": "movie", "model": "minilm", "method": r.method, "seed": r.seed, "lr": r.lr, "metric": "accuracy",
            "curve": curve, "config": {"pooling": "mean", **dict(r.settings)}, "test": 0.8, "validation": 0.8,
            "steps": steps, "train_seconds": 1.0, "trainable_params": 5, "total_params": 10,
            "training_strengths": ends, "delta_spectra": {layer: [3.0, 2.0, 1.0]}}))
    text = report.write_report(tmp_path, tmp_path / "R.md").read_text()
    heat = text.split("## Training strength per vector")[1].split("##")[0]
    assert ("Drawn from suite `converged`, task movie, each run as it stood at step 2 "
            "(VectorFit: seed 1, lr 0.001; VectorFit (no AVF): seed 1, lr 0.001).") in heat
    spectra = text.split("## Spectrum of ΔW")[1]
    assert "Drawn from suite `curves`, task movie, each run at the end of its training" in spectra
    assert "Full FT: seed 0, lr 0.0001, 4 steps" in spectra
