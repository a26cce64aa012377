#!/usr/bin/env python
"""DreamBooth with VectorFit: adapt the UNet of a local Stable-Diffusion-style pipeline to a subject.

    python examples/dreambooth_unet.py --pipeline ./stable-diffusion-v1-4 \\
        --instance-dir ./dog --instance-prompt "a photo of sks dog" \\
        --class-dir ./class-dog --class-prompt "a photo of dog" --output out/dreambooth_dog

``--pipeline`` is a folder as ``StableDiffusionPipeline.save_pretrained`` writes it (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). Only the UNet is adapted: VectorFit
trains the singular values and biases of its resnet convolutions (``resnets.N.conv1``, ``conv2``,
``conv_shortcut``) and attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of the
self- and cross-attention), with Adaptive Vector Freezing; the VAE and the text encoder are frozen.
The loss is DreamBooth's (Ruiz et al., 2023): the UNet predicts the noise added to the VAE latents
of the subject's images (the velocity for a ``v_prediction`` scheduler), conditioned on the
instance prompt, plus ``--prior-loss-weight`` times the same loss on class images under the class
prompt (prior preservation). Class images missing from ``--class-dir`` (fewer than
``--num-class-images``) are first generated with the pipeline itself.

The defaults follow the paper's appendix C.5 (image generation) where it gives a setting: learning
rate 5e-5, batch size 4, 300 class images, prior-preservation weight 0.5 to 1.0 (default 1.0). It
gives no step count or resolution: 800 steps and 512 px (Stable Diffusion v1's resolution) are the
usual DreamBooth choices.

The adapter is saved with ``save_pretrained`` (a few hundred KB for Stable Diffusion v1.x). Use it:

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, safety_checker=None)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, "out/dreambooth_dog").merge_and_unload()
    image = pipe("a photo of sks dog on the beach").images[0]

No pretrained diffusion weights are available offline here (no package reachable from this
project ships any), so this script is tested on a tiny, randomly initialised pipeline that the test
builds itself: a two-step run on random weights is a smoke test of the code path, not a result.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
import peft
import torch
import torch.nn.functional as F
from PIL import Image

from vectorfit import AVFConfig, VectorFitConfig

#: Resnet convolutions and attention projections of the UNet's down, mid and up blocks (a full-match
#: regex; tests/test_diffusers.py checks that it selects exactly these 186 modules of SD 1.x's UNet).
UNET_TARGETS = (r"(?:.*\.)?(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\."
                r"(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut)"
                r"|attentions\.\d+\.(?:transformer_blocks\.\d+\.attn[12]\.)?(?:to_q|to_k|to_v|to_out\.0))")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Defaults marked (paper) are from the VectorFit paper, appendix C.5. No pretrained "
                                        "diffusion weights are available offline here: a short run on a random pipeline "
                                        "(as the tests do) is a smoke test, not a result.")
    ap.add_argument("--pipeline", required=True,
                    help="local Stable-Diffusion-style pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    ap.add_argument("--instance-dir", required=True, help="folder of images of the subject")
    ap.add_argument("--instance-prompt", required=True, help='prompt naming the subject, e.g. "a photo of sks dog"')
    ap.add_argument("--class-dir", default=None,
                    help="folder of class images for prior preservation (filled up to --num-class-images by "
                         "generating with the pipeline); omit to train without prior preservation")
    ap.add_argument("--class-prompt", default=None, help='prompt of the class, e.g. "a photo of dog" (needed with --class-dir)')
    ap.add_argument("--num-class-images", type=int, default=300, help="class images to use (paper; default: %(default)s)")
    ap.add_argument("--prior-loss-weight", type=float, default=1.0,
                    help="weight of the class-image loss (paper: 0.5 to 1.0 by subject; default: %(default)s)")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (paper; default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4,
                    help="instance images per step, plus as many class images with prior preservation (paper; default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=800, help="optimizer steps (not in the paper; default: %(default)s)")
    ap.add_argument("--resolution", type=int, default=512,
                    help="training images are resized and center-cropped to this size (not in the paper; default: %(default)s)")
    ap.add_argument("--class-inference-steps", type=int, default=50,
                    help="denoising steps for each generated class image and for --sample-prompt (default: %(default)s)")
    ap.add_argument("--sample-batch-size", type=int, default=4, help="class images generated per pipeline call (default: %(default)s)")
    ap.add_argument("--sample-prompt", default=None,
                    help="after training, merge the adapter into the pipeline's UNet and save one image of this prompt as "
                         "OUTPUT/sample.png")
    ap.add_argument("--output", default="out/dreambooth_unet", help="adapter folder (save_pretrained; default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of noise, timesteps, data order and class images (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the pipeline runs and the UNet trains (default here: %(default)s)")
    args = ap.parse_args(argv)
    if args.class_dir is not None and not args.class_prompt:
        ap.error("--class-dir needs --class-prompt (the prompt the class images were, or will be, generated from)")
    for name in ("num_class_images", "batch_size", "max_steps", "resolution", "class_inference_steps", "sample_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB, shorter side resized to ``size``, center-cropped, as a ``3 x size x size`` tensor in [-1, 1]."""
    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()


@torch.no_grad()
def generate_class_images(pipe, args: argparse.Namespace) -> None:
    """Fill ``--class-dir`` up to ``--num-class-images`` with images of ``--class-prompt`` (base UNet)."""
    folder = Path(args.class_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(image_files(folder))
    missing = args.num_class_images - have
    if missing <= 0:
        return
    print(f"generating {missing} class images of {args.class_prompt!r} into {folder} ({have} there)")
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    done = 0
    while done < missing:
        n = min(args.sample_batch_size, missing - done)
        images = pipe([args.class_prompt] * n, num_inference_steps=args.class_inference_steps, generator=g,
                      height=args.resolution, width=args.resolution).images
        for img in images:
            img.save(folder / f"class-{have + done:05d}.png")
            done += 1


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str, device: str) -> torch.Tensor:
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)  # 77 for SD's CLIP
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]  # last hidden states, 1 x tokens x cross_attention_dim


def main(argv=None) -> None:
    args = parse_args(argv)
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False).to(args.device)
    prior = args.class_dir is not None
    if prior:
        generate_class_images(pipe, args)  # with the base UNet, before it is adapted

    instance = [load_image(p, args.resolution) for p in image_files(Path(args.instance_dir))]
    if not instance:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in --instance-dir {args.instance_dir}")
    classes = [load_image(p, args.resolution) for p in image_files(Path(args.class_dir))[: args.num_class_images]] if prior else []
    print(f"{len(instance)} instance images" + (f", {len(classes)} class images" if prior else ", no prior preservation"))

    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # DreamBooth trains with DDPM's noising
    instance_states = encode_prompt(tokenizer, text_encoder, args.instance_prompt, args.device)
    class_states = encode_prompt(tokenizer, text_encoder, args.class_prompt, args.device) if prior else None

    steps_per_epoch = math.ceil(len(instance) / args.batch_size)
    config = VectorFitConfig(target_modules=UNET_TARGETS,
                             avf=AVFConfig.for_training(args.max_steps, steps_per_epoch))  # AVF from the run length
    model = peft.get_peft_model(unet, config)  # one SVD per target (cached on disk for the next run)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    model.train()
    for step in range(1, args.max_steps + 1):  # optimizer steps are counted from 1
        picks = []
        while len(picks) < min(args.batch_size, len(instance)):
            if not order:
                order = torch.randperm(len(instance), generator=gen).tolist()
            picks.append(order.pop())
        pixels = [instance[i] for i in picks]
        states = [instance_states] * len(picks)
        if prior:
            cls = torch.randint(len(classes), (len(picks),), generator=gen).tolist()
            pixels += [classes[i] for i in cls]
            states += [class_states] * len(picks)
        pixels = torch.stack(pixels).to(args.device, vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(args.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = model(noisy, timesteps, encoder_hidden_states=torch.cat(states)).sample
        if prior:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
        instance_loss = F.mse_loss(pred.float(), target.float())
        loss = instance_loss + args.prior_loss_weight * prior_loss if prior else instance_loss
        loss.backward()
        model.avf.step(step)  # after backward, before the optimizer step: frozen vectors lose their gradient
        optimizer.step()
        optimizer.zero_grad()
        parts = f" (instance {instance_loss.item():.4f}, prior {prior_loss.item():.4f})" if prior else ""
        print(f"step {step}/{args.max_steps}: loss {loss.item():.4f}{parts}")
    print("AVF steps taken:", [h["step"] for h in model.avf.history])

    model.save_pretrained(args.output)
    print(f"adapter saved to {args.output}")
    if args.sample_prompt:
        model.eval()
        pipe.unet = model.merge_and_unload()  # a plain UNet2DConditionModel again, with the adapter folded in
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        image = pipe(args.sample_prompt, num_inference_steps=args.class_inference_steps, generator=g,
                     height=args.resolution, width=args.resolution).images[0]
        image.save(Path(args.output) / "sample.png")
        print(f"sample of {args.sample_prompt!r} saved to {Path(args.output) / 'sample.png'}")


if __name__ == "__main__":
    main()
