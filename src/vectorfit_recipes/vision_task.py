"""Image classification through the one training loop: MobileNetV2 on MNIST / Fashion-MNIST.

``train.py`` dispatches here at three points, and everything else (optimizer, AVF hooks, data order,
validation and learning curves, checkpoints, the result file) is the text tasks':

* :func:`load_splits` (``prepare_data``): the splits as :class:`ImageTensors`, whose ``batch`` gives
  ``pixel_values`` and ``labels`` instead of token ids;
* :func:`base_model` (``build_method``): MobileNetV2 with the ImageNet weights (``vision.py``) and a new
  10-way head, and what each method adapts on it;
* :func:`evaluate` (``evaluate``): accuracy over a split.

Pre-processing: the 28 x 28 grey images (uint8) are scaled to [0, 1] (/255), resized bilinearly to
``--image-size`` (default 32 x 32, for speed on CPUs; ImageNet's 224 is 49x the pixels), repeated to 3
channels and normalised with ImageNet's mean and std, batch by batch (nothing is held beyond the uint8
arrays). No augmentation.

Methods on MobileNetV2 (``classifier`` = Dropout(0.2) + the new Linear(1280, 10), trained in full by
every method, as the text tasks' head):

* VectorFit variants: every Conv2d under ``features`` (``vision.CONV_TARGETS``: the 3x3 stem, 17 3x3
  depthwise, 34 1x1 pointwise; 52 layers), not the classifier (it is the new head). The convolutions
  have no bias, so VectorFit gives each a zero-initialised bias vector (the paper's Σ+b);
* LoRA r=1 / r=8 (peft): the same convolutions except the 17 depthwise ones, which peft refuses
  (its Conv2d LoRA needs the rank divisible by ``groups``, 32..960 here): 35 layers;
* BitFit: the convolutions have no biases; it trains the bias (beta) of every BatchNorm, the additive
  term that follows each convolution (52 vectors; a conv bias before an eval-mode BatchNorm is the same
  function up to a per-channel scale);
* head: the new classifier only (a linear probe of the frozen backbone);
* full: every parameter.

BatchNorm: frozen (eval mode, ImageNet running statistics) for every method except ``full``, whose
BatchNorms train as in ordinary fine-tuning (statistics updated, saved with the model). A PEFT method's
adapter is then everything that changed: running statistics updated in train mode would be a hidden,
unsaved change of the backbone that the adapter alone could not reproduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import vision
from . import vision_data

__all__ = ["ImageTensors", "ImageClassifier", "load_splits", "base_model", "evaluate", "preprocess", "BN_TRAINS"]

#: Methods whose BatchNorm layers train (statistics and affine parameters); all others keep them frozen.
BN_TRAINS = ("full",)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float N x 3 x size x size, ImageNet-normalised."""
    x = images.float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(vision.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(vision.IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


class ImageTensors:
    """One split: uint8 images and labels; batches pre-processed as they are drawn."""

    images_task = True  # evaluate() in train.py dispatches on it

    def __init__(self, images: Any, labels: Any, size: int) -> None:
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.astype("int64"))
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Any, device: Any) -> dict:
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return {"pixel_values": preprocess(self.images[idx], self.size).to(device), "labels": self.labels[idx].to(device)}


def load_splits(cfg: Any, log: Any = print) -> tuple[vision_data.ImageDatasetInfo, dict, list[ImageTensors]]:
    """The task's splits, capped by a seed-independent subsample (as the text tasks'), as tensors."""
    ds = vision_data.load_image_dataset(cfg.task)
    caps = {"train": cfg.max_train_examples, "validation": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    out = []
    for split in ("train", "validation", "test"):
        keep = vision_data.hash_order(ds.images[split], caps[split])
        out.append(ImageTensors(ds.images[split][keep], ds.labels[split][keep], cfg.image_size))
    log(f"[vectorfit] task {cfg.task}: {ds.summary()}")
    log(f"[vectorfit] using train {len(out[0])}, validation {len(out[1])}, test {len(out[2])}; images 28x28 grey -> "
        f"{cfg.image_size}x{cfg.image_size}x3; model {cfg.model}, method {cfg.method}, seed {cfg.seed}, "
        f"{torch.get_num_threads()} threads")
    stats = {**ds.stats, "image_size": cfg.image_size}
    return ds.info, stats, out


@dataclass
class ClassifierOutput:
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class ImageClassifier(nn.Module):
    """MobileNetV2's ``features`` and ``classifier`` under their own names (so ``vision.CONV_TARGETS``
    and peft's names apply), called like a transformers model: ``model(pixel_values=, labels=)`` gives
    ``.loss`` (cross-entropy) and ``.logits``. With ``frozen_bn`` its BatchNorms stay in eval mode
    whatever ``train()`` is told."""

    #: the layers whose ΔW spectrum a result records (run_info.spectra_layers; VectorFit and full
    #: fine-tuning): the first and the last inverted-residual block's 1x1 expansion and projection
    SPECTRA_LAYERS = ("features.2.conv.0.0", "features.2.conv.2", "features.17.conv.0.0", "features.17.conv.2")

    def __init__(self, net: vision.MobileNetV2, frozen_bn: bool) -> None:
        super().__init__()
        self.features, self.classifier = net.features, net.classifier
        self.frozen_bn = frozen_bn

    def train(self, mode: bool = True) -> "ImageClassifier":
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ClassifierOutput:
        x = nn.functional.adaptive_avg_pool2d(self.features(pixel_values), 1)
        logits = self.classifier(torch.flatten(x, 1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ClassifierOutput(loss, logits)


def base_model(cfg: Any, num_labels: int) -> tuple[ImageClassifier, str, dict]:
    """The model (head seeded by ``cfg.seed``), a line for the log, and ``methods.build``'s targets."""
    if cfg.model != "mobilenetv2":  # pragma: no cover - guarded by TrainConfig's choices
        raise ValueError(f"--model {cfg.model}: image tasks take --model mobilenetv2")
    net = vision.load_mobilenet_v2(num_labels, seed=cfg.seed)
    model = ImageClassifier(net, frozen_bn=cfg.method not in BN_TRAINS)
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    kwargs = {"targets": vision.CONV_TARGETS,
              "peft_targets": vision.conv_target_regex(model, ("standard", "pointwise")),
              "bitfit_params": [f"{n}.bias" for n in bn]}
    note = {"bitfit": f"the convolutions have no biases: bitfit trains the bias of each of the {len(bn)} BatchNorms "
                      "(+ the head)",
            "lora_r1": "LoRA on the 35 non-depthwise convolutions (peft refuses the 17 depthwise ones at this rank)",
            "lora_r8": "LoRA on the 35 non-depthwise convolutions (peft refuses the 17 depthwise ones at this rank)",
            "head": "only the new classifier trains (a linear probe)"}.get(cfg.method, "")
    if cfg.method.startswith(("vectorfit", "no_avf", "sigma")):
        note = "52 Conv2d targets (stem, depthwise, pointwise), none with a bias: the Σ+b variants train a zero-initialised one"
    note += ("; BatchNorm trains (statistics updated)" if cfg.method in BN_TRAINS
             else "; BatchNorm frozen (eval mode, ImageNet statistics)")
    return model, note, kwargs


def evaluate(model: Any, enc: ImageTensors, batch_size: int, device: Any, progress: bool = False,
             desc: str = "eval") -> float:
    """Accuracy of ``model`` over the split (eval mode; the model's mode is restored afterwards)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in tqdm(range(0, len(enc), batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
                      total=math.ceil(len(enc) / batch_size)):
            b = enc.batch(range(s, min(s + batch_size, len(enc))), device)
            correct += int((model(pixel_values=b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum())
    model.train(was_training)
    return correct / len(enc)
