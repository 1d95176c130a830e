"""Does training learn? The short form of scripts/benchmark_learning.sh, in the default suite.

One two-second clip of the synthetic world (data.synthetic) at 32x32 is overfitted with the normal
trainers (the tiny RGB autoencoder, the landmark autoencoder from scratch, the latent cache, the UNet
from it); the sampler (MToV.generate.generate_video, through the benchmark's sample_clip) driven by
that clip's own landmarks must give its mouth back clearly better than copying the reference frame,
and the landmarks of another sentence (a deliberately wrong condition) must give a worse mouth. A
mismatch between how the UNet is trained and how it is sampled (conditions in another order or scale,
latents normalised differently, another timestep convention, landmark dots drawn differently) fails
it. One thread throughout: the figures are the same on every run of the same machine, loaded or not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.learning import psnr, read_clip, sample_clip
from data.synthetic import crop_face, load_face, write_world
from moditalker.config import load_config
from MToV import cache_latents
from MToV.loading import MODEL_DEFAULTS, load_mtov
from MToV.train_autoencoder import main as train_ae
from MToV.train_diffusion import main as train_unet

CONFIG = "configs/mtov_tiny.yaml"
AE_CONFIG = "configs/mtov_autoencoder_tiny.yaml"
RADIUS = 1  # the dots of radius 3 at 256 x 256, scaled to 32 x 32 (radius 3 merges the mouth into one blob)
AE_STEPS, LDMK_STEPS, UNET_STEPS = 1000, 100, 1000


@pytest.fixture(scope="module")
def overfitted(tmp_path_factory):
    """The bundled face cropped to eyes-to-chin, so that at 32x32 the mouth is as large as in the
    benchmark's 64x64 frames (the lower lip travels about 2 pixels); every MToV stage trained on one
    clip alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("learning")
        face = crop_face(load_face(), (64, 76, 192, 204))
        world = write_world(
            root / "world", face=face, seed=3, n_train=1, n_heldout=1, n_render=1, size=32,
            seconds=(2.0, 2.0), progress=False,
        )  # fmt: skip
        hdtf = root / "world" / "hdtf"
        (hdtf / "train_ids.txt").write_text(world["train_ids"][0] + "\n")
        data = [f"data.root={hdtf}", "data.split_mode=train", f"data.split_file={hdtf / 'train_ids.txt'}",
                f"data.landmark_radius={RADIUS}"]  # fmt: skip
        ae = ["--config", AE_CONFIG, "--device", "cpu", "--no_progress", *data, "train.amp=false",
              "loss.perceptual_weight=0", "train.lr=3e-4"]  # fmt: skip
        train_ae([*ae, "--out_dir", str(root / "ae_rgb"), f"train.max_steps={AE_STEPS}"])
        train_ae([*ae, "--mode", "ldmk", "freeze_decoder=false", "--out_dir", str(root / "ae_ldmk"),
                  f"train.max_steps={LDMK_STEPS}"])  # fmt: skip
        rgb, ldmk = str(root / "ae_rgb" / "model_last.pth"), str(root / "ae_ldmk" / "model_last.pth")
        aes = ["--ae_rgb", rgb, "--ae_ldmk", ldmk]
        cache_latents.main(["--config", CONFIG, "--device", "cpu", "--no_progress", *aes, *data,
                            "--out", str(root / "latents")])  # fmt: skip
        train_unet(["--config", CONFIG, "--device", "cpu", "--no_progress", *aes,
                    "--out_dir", str(root / "unet"), f"data.latents={root / 'latents'}", *data[1:],
                    f"train.max_steps={UNET_STEPS}", "train.ema_every=1"])  # fmt: skip
        cfg = load_config(CONFIG, [f"data.landmark_radius={RADIUS}"], MODEL_DEFAULTS)
        models = load_mtov(rgb, ldmk, str(root / "unet" / "diffusion_model.pth"), cfg, "cpu")
        frames, lm = read_clip(hdtf, world["train_ids"][0])
        _, other = read_clip(hdtf, world["heldout_ids"][0])
        n = min(len(frames), len(other))
        frames, lm, other = frames[:n], lm[:n], other[:n]
        own = sample_clip(models, frames, lm, sampling_timesteps=40)
        wrong = sample_clip(models, frames, other, ref_landmarks=lm, sampling_timesteps=40)
        yield world, frames, own, wrong
    finally:
        torch.set_num_threads(threads)


def test_sampler_gives_back_the_overfitted_clip(overfitted):
    world, frames, own, wrong = overfitted
    box = world["lip_box"]
    copy = np.repeat(frames[:1], len(frames), axis=0)
    scores = {
        "own": (psnr(own, frames, box), psnr(own, frames)),
        "copy": (psnr(copy, frames, box), psnr(copy, frames)),
        "wrong": (psnr(wrong, frames, box), psnr(wrong, frames)),
    }
    print(json.dumps(scores))
    # the world's mouth moves: copying the first frame is a real baseline to beat
    assert scores["copy"][0] < 20.0
    # the sampler gives the clip's mouth back, far better than the copy ...
    assert scores["own"][0] >= scores["copy"][0] + 3.0, scores
    # ... because it follows the landmarks: another sentence's landmarks give a worse mouth
    assert scores["own"][0] >= scores["wrong"][0] + 0.5, scores
