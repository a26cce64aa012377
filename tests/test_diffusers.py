"""VectorFit on diffusers UNets: ``UNet2DModel`` and ``UNet2DConditionModel`` (Stable Diffusion's
architecture, with cross-attention), tiny and randomly initialised from a fixed seed (no downloads).

The targets are every resnet convolution (``resnets.N.conv1``, ``conv2``, ``conv_shortcut``) and
every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of the down, mid and up
blocks, named by :data:`UNET_TARGETS`, a full-match regex that also selects exactly those modules
of the real Stable Diffusion 1.x UNet (checked on a meta-device copy of its architecture).

Each model is checked as peft users would use it: exact at init, a few AdamW steps train only the
VectorFit vectors, save -> a fresh copy of the same base -> ``PeftModel.from_pretrained`` gives the
same output, ``merge_adapter`` / ``merge_and_unload`` give the adapted output (the latter a plain
diffusers model of plain ``nn.Conv2d`` / ``nn.Linear`` layers), ``disable_adapter`` the base one.
diffusers models are called ``model(sample, timestep, encoder_hidden_states=...)`` and return an
object with ``.sample``; a ``PeftModel`` without ``task_type`` passes those arguments through.
"""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
import peft  # noqa: E402
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402

import vectorfit  # noqa: E402
from vectorfit.targets import find_targets  # noqa: E402

#: Resnet convolutions and attention projections of a diffusers UNet's down/mid/up blocks. The
#: optional ``transformer_blocks.N.attn1|attn2`` part is there in UNet2DConditionModel (self- and
#: cross-attention of Stable Diffusion), absent in UNet2DModel (``attentions.N.to_q``). The leading
#: ``(?:.*\.)?`` lets the same regex name them inside a larger module (a pipeline's ``unet.``).
UNET_TARGETS = (r"(?:.*\.)?(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\."
                r"(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut)"
                r"|attentions\.\d+\.(?:transformer_blocks\.\d+\.attn[12]\.)?(?:to_q|to_k|to_v|to_out\.0))")

CROSS_DIM = 16


def make_unet2d(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def make_unet_cond(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=CROSS_DIM,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def inputs_for(model: nn.Module, seed: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a forward call: a batch of 2 noisy samples at two timesteps (and text states)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.tensor([10, 500])
    if isinstance(model, UNet2DConditionModel):
        return (x, t), {"encoder_hidden_states": torch.randn(2, 5, CROSS_DIM, generator=g)}
    return (x, t), {}


MODELS = {"unet2d": make_unet2d, "unet_cond": make_unet_cond}


@pytest.fixture(params=sorted(MODELS))
def make(request):
    return MODELS[request.param]


def config(**kw) -> vectorfit.VectorFitConfig:
    return vectorfit.VectorFitConfig(target_modules=UNET_TARGETS, avf=vectorfit.AVFConfig.for_training(4, 1), **kw)


@torch.no_grad()
def run(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return model(*args, **kwargs).sample


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to float32 round-off, relative to the output's scale (not elementwise)."""
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} x output scale {scale:.3g}"


def expected_targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and re.fullmatch(UNET_TARGETS, n)]


def train(model: nn.Module, args: tuple, kwargs: dict, steps: int = 3, lr: float = 3e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.randn_like(run(model, args, kwargs))
    model.train()
    for step in range(1, steps + 1):
        loss = nn.functional.mse_loss(model(*args, **kwargs).sample, target)
        loss.backward()
        model.avf.step(step)
        opt.step()
        opt.zero_grad()
    model.eval()


def trained_model(make, seed: int = 0):
    base = make(seed)
    args, kwargs = inputs_for(base)
    model = peft.get_peft_model(base, config())
    train(model, args, kwargs)
    return model, args, kwargs


# ------------------------------------------------------------------------------------------ targets
SD15_TARGET_KINDS = {"conv1", "conv2", "conv_shortcut", "to_q", "to_k", "to_v", "to_out.0"}


#: runwayml/stable-diffusion-v1-5's unet/config.json (the same for v1-4), as far as it shapes the modules.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}


def test_regex_selects_the_sd15_unet_targets():
    """On Stable Diffusion 1.x's UNet, built on the meta device (no memory, no weights), the regex
    selects the convolutions of its 22 resnets and the 8 projections of each of its 16 transformer
    blocks, and nothing else (no conv_in/out, proj_in/out, ff, time embeddings, down/upsamplers)."""
    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15_UNET)
    names = [n for n, _, _ in find_targets(sd, UNET_TARGETS, check_weights=False)]
    kinds = {"to_out.0" if n.endswith("to_out.0") else n.rsplit(".", 1)[-1] for n in names}
    assert kinds == SD15_TARGET_KINDS
    assert sum(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in names) == 16 * 2 * 4
    assert sum(n.endswith((".conv1", ".conv2")) for n in names) == 22 * 2
    assert sum(n.endswith(".conv_shortcut") for n in names) == 14
    assert len(names) == 186
    for n in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv_shortcut",
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "mid_block.resnets.1.conv2",
              "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k", "up_blocks.0.resnets.2.conv1"):
        assert n in names
    for n in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj",
              "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
              "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"):
        assert n not in names and re.fullmatch(UNET_TARGETS, n) is None
    assert re.fullmatch(UNET_TARGETS, "unet.mid_block.resnets.0.conv1")  # inside a larger module too


# ------------------------------------------------------------------------------------------- models
def test_exact_at_init_and_targets(make):
    base = make()
    args, kwargs = inputs_for(base)
    want = run(base, args, kwargs)
    expected = expected_targets(base)
    assert any(n.endswith("conv_shortcut") for n in expected) and any(n.endswith("to_out.0") for n in expected)
    model = peft.get_peft_model(make(), config())
    adapted = [n[len("base_model.model."):] for n, m in model.named_modules() if type(m).__name__ == "VectorFitLayer"]
    assert adapted == expected
    got = model(*args, **kwargs)  # PeftModel (no task_type) passes diffusers' call through
    assert hasattr(got, "sample")
    assert_close(got.sample.detach(), want)
    out = model(*args, **kwargs, return_dict=False)
    assert isinstance(out, tuple)
    assert_close(out[0].detach(), want)


def test_training_changes_output_and_trains_only_vectors(make):
    base = make()
    args, kwargs = inputs_for(base)
    want = run(base, args, kwargs)
    model = peft.get_peft_model(make(), config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.vectorfit_(sigma|bias)\.default$", n) for n in trainable)
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "VectorFitLayer"]
    # The default variant trains the singular values and the bias of every target.
    assert trainable == {f"{n}.vectorfit_{k}.default" for n in layers for k in ("sigma", "bias")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.numel() > 1}
    train(model, args, kwargs)
    assert model.avf.history, "AVF never ran"
    got = run(model, args, kwargs)
    assert (got - want).abs().max() > 1e-3 * want.abs().max()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen parameter {n} changed"
    # AVF freezes some vectors by switching requires_grad off; nothing else ever becomes trainable.
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= trainable


def test_save_load_roundtrip(make, tmp_path):
    model, args, kwargs = trained_model(make)
    want = run(model, args, kwargs)
    model.save_pretrained(tmp_path / "adapter")
    assert '"peft_type": "VECTORFIT"' in (tmp_path / "adapter" / "adapter_config.json").read_text()
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "adapter")
    got = run(loaded, args, kwargs)
    # Bit for bit: both are the first no-grad call with these vectors (the same computation).
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_merge_and_unload(make):
    base = make()
    base_attrs = {n: m for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    model, args, kwargs = trained_model(make)
    want = run(model, args, kwargs)
    model.merge_adapter()
    assert_close(run(model, args, kwargs), want)
    model.unmerge_adapter()
    assert_close(run(model, args, kwargs), want)
    trained_bias = {n[len("base_model.model."):] for n, m in model.named_modules()
                    if type(m).__name__ == "VectorFitLayer" and "default" in m.vectorfit_bias}

    merged = model.merge_and_unload()
    assert type(merged) is type(base)
    assert not any(type(m).__name__ == "VectorFitLayer" for m in merged.modules())
    assert_close(run(merged, args, kwargs), want)
    for n, m in merged.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        b = base_attrs[n]
        assert type(m) is type(b), n
        assert m.weight.shape == b.weight.shape and torch.isfinite(m.weight).all(), n
        if isinstance(b, nn.Conv2d):
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
                assert getattr(m, attr) == getattr(b, attr), (n, attr)
        else:
            assert (m.in_features, m.out_features) == (b.in_features, b.out_features), n
        # A bias where the base had one or where one was trained (to_q/to_k/to_v have none), else none.
        assert (m.bias is not None) == (b.bias is not None or n in trained_bias), n
    if isinstance(base, UNet2DConditionModel):  # its to_q/to_k/to_v have no bias (UNet2DModel's have one)
        assert any(base_attrs[n].bias is None for n in trained_bias)


def test_disable_adapter_gives_the_base(make):
    base = make()
    args, kwargs = inputs_for(base)
    want = run(base, args, kwargs)
    model, _, _ = trained_model(make)
    with model.disable_adapter():
        assert_close(run(model, args, kwargs), want)
    assert (run(model, args, kwargs) - want).abs().max() > 1e-3 * want.abs().max()


def test_get_base_model_call_matches_peft_call(make):
    """``peft_model(...)`` and ``peft_model.get_base_model()(...)`` are the same adapted forward (to
    round-off: from its second no-grad call with the same vectors on, a layer computes with a cached
    dense weight instead of the factors, see vectorfit.functional)."""
    model, args, kwargs = trained_model(make)
    assert_close(run(model.get_base_model(), args, kwargs), run(model, args, kwargs), rtol=1e-6)



# ------------------------------------------------------------------------------- roles and merged biases
def test_unet_attention_projections_have_the_attention_role(make):
    from vectorfit.targets import role_of

    model = make()
    roles = {n: role_of(model, n) for n in expected_targets(model)}
    assert all((r == "attn") == bool(re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", n)) for n, r in roles.items()), roles


def test_merged_unet_with_new_biases_reloads_or_warns(tmp_path):
    import warnings

    model, args, kwargs = trained_model(make_unet_cond)
    want = run(model, args, kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    warned = any(issubclass(w.category, vectorfit.VectorFitWarning) for w in caught)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    err = (run(reloaded, args, kwargs) - want).abs().max().item()
    assert warned or err <= 1e-5 * want.abs().max().item(), f"silently lost: reloaded output off by {err:.3g}"

# ------------------------------------------------------------------------------ a tiny SD pipeline
def make_tiny_sd_pipeline(folder, seed: int = 0):
    """A tiny, random Stable-Diffusion-style pipeline saved to ``folder`` as ``save_pretrained`` writes
    it (unet/, vae/, text_encoder/, tokenizer/, scheduler/), built offline: a CLIP BPE tokenizer over
    the letters a-z, a 1-layer CLIP text encoder of width ``CROSS_DIM``, a 2-block VAE (32 x 32
    images -> 4 x 16 x 16 latents) and the tiny conditional UNet above. Returns the pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")).eval()
    unet = make_unet_cond(seed)
    unet.register_to_config(sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,  # SD v1's
                                                           beta_schedule="scaled_linear", steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)  # the pipeline's tokenizer/ folder has its own copy
    return pipe


def write_images(folder, n: int, size: int = 32, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_tiny_pipeline_runs_with_a_merged_adapter(tmp_path):
    """The tiny pipeline (the example's test input) generates, and a merged VectorFit UNet drops into it."""
    from diffusers import StableDiffusionPipeline

    make_tiny_sd_pipeline(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    model = peft.get_peft_model(pipe.unet, config())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    pipe.unet = model.merge_and_unload()
    assert type(pipe.unet) is UNet2DConditionModel
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
