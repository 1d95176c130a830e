"""Does training learn? The short form of scripts/benchmark_learning.sh (RUN_SLOW=1).

One clip of the synthetic world (data.synthetic) is overfitted with the normal trainers (both tiny
autoencoders, the latent cache, the UNet from it); the sampler (MToV.generate.generate_video) driven
by that clip's own landmarks must give its frames back clearly better than copying the reference
frame, and the landmarks of another sentence (a deliberately wrong condition) must give worse frames
around the mouth. A mismatch between how the UNet is trained and how it is sampled (conditions in
another order or scale, latents normalised differently, another timestep convention) fails it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.learning import psnr, read_clip, sample_clip
from data.synthetic import crop_face, load_face, write_world
from moditalker.config import load_config
from MToV import cache_latents
from MToV.loading import MODEL_DEFAULTS, load_mtov
from MToV.train_autoencoder import main as train_ae
from MToV.train_diffusion import main as train_unet

CONFIG = "configs/mtov_tiny.yaml"
AE_CONFIG = "configs/mtov_autoencoder_tiny.yaml"


@pytest.fixture(scope="module")
def overfitted(tmp_path_factory):
    """One 2-second clip at 32x32 (the tiny configs' size), every MToV stage trained on it alone. The
    bundled face is cropped to eyes-to-chin so that at 32x32 the mouth is as large as in the
    benchmark's 64x64 frames (the lower lip travels about 2 pixels)."""
    root = tmp_path_factory.mktemp("learning")
    face = crop_face(load_face(), (64, 76, 192, 204))
    world = write_world(
        root / "world", face=face, seed=3, n_train=1, n_heldout=1, n_render=1, size=32, seconds=(2.0, 2.0),
        progress=False,
    )  # fmt: skip
    hdtf = root / "world" / "hdtf"
    data = [f"data.root={hdtf}", "data.split_mode=train", f"data.split_file={hdtf / 'train_ids.txt'}"]
    (hdtf / "train_ids.txt").write_text(world["train_ids"][0] + "\n")
    ae = ["--config", AE_CONFIG, "--device", "cpu", "--no_progress", *data, "train.amp=false"]
    train_ae([*ae, "--out_dir", str(root / "ae_rgb"), "train.max_steps=300", "train.lr=2e-3"])
    rgb = str(root / "ae_rgb" / "model_last.pth")
    train_ae(
        [*ae, "--mode", "ldmk", "--init_from", rgb, "--out_dir", str(root / "ae_ldmk"), "train.max_steps=60"]
    )
    ldmk = str(root / "ae_ldmk" / "model_last.pth")
    aes = ["--ae_rgb", rgb, "--ae_ldmk", ldmk]
    cache_latents.main(["--config", CONFIG, "--device", "cpu", "--no_progress", *aes, *data,
                        "--out", str(root / "latents")])  # fmt: skip
    train_unet(["--config", CONFIG, "--device", "cpu", "--no_progress", *aes, "--out_dir", str(root / "unet"),
                f"data.latents={root / 'latents'}", f"data.split_file={hdtf / 'train_ids.txt'}",
                "data.split_mode=train", "train.max_steps=400", "train.ema_every=1"])  # fmt: skip
    cfg = load_config(CONFIG, [], MODEL_DEFAULTS)
    models = load_mtov(rgb, ldmk, str(root / "unet" / "diffusion_model.pth"), cfg, "cpu")
    return models, world, hdtf


@pytest.mark.slow  # about 15 minutes on a busy 2-core CPU, a few minutes idle: not the default suite
@pytest.mark.xfail(
    strict=True,
    reason="the sampler ignores the landmark condition after this short training: the landmark "
    "autoencoder (initialised from the RGB one, its decoder frozen) maps every landmark clip of this "
    "world to nearly the same latent (tanh-saturated; mean |z1 - z2| about 2e-7), so the own and the "
    "wrong landmarks give the same frames (docs/training.md, 'Does training learn?')",
)
def test_sampler_gives_back_the_overfitted_clip(overfitted):
    models, world, hdtf = overfitted
    box = world["lip_box"]
    frames, lm = read_clip(hdtf, world["train_ids"][0])
    other_frames, other_lm = read_clip(hdtf, world["heldout_ids"][0])
    n = min(len(frames), len(other_lm))
    frames, lm, other_lm = frames[:n], lm[:n], other_lm[:n]
    own = sample_clip(models, frames, lm, sampling_timesteps=8)
    wrong = sample_clip(models, frames, other_lm, ref_landmarks=lm, sampling_timesteps=8)
    copy = np.repeat(frames[:1], n, axis=0)
    scores = {
        "own": (psnr(own, frames, box), psnr(own, frames)),
        "copy": (psnr(copy, frames, box), psnr(copy, frames)),
        "wrong": (psnr(wrong, frames, box), psnr(wrong, frames)),
    }
    print(json.dumps(scores))
    # the world's mouth moves: copying the first frame is a real baseline to beat
    assert scores["copy"][0] < 30.0
    assert scores["own"][0] >= scores["copy"][0] + 2.0, scores
    assert scores["own"][0] >= scores["wrong"][0] + 1.0, scores


def test_learning_benchmark_flags_and_report(tmp_path, monkeypatch, capsys):
    """--threads below 1 is refused before any work; --json gets the report, and is not replaced
    without --overwrite."""
    import benchmarks.learning as bench
    from moditalker.errors import UserError

    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(UserError, match="--threads must be >= 1, got 0"):
        bench.main(["--out", str(tmp_path / "run"), "--threads", "0"])
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: {"score": 0.5})
    monkeypatch.setattr(bench, "format_table", lambda report: "the table")
    out = tmp_path / "report.json"
    assert bench.main(["--out", str(tmp_path / "run"), "--json", str(out)]) == {"score": 0.5}
    assert json.loads(out.read_text()) == {"score": 0.5} and "the table" in capsys.readouterr().out
    with pytest.raises(UserError, match="exists"):
        bench.main(["--out", str(tmp_path / "run"), "--json", str(out)])
