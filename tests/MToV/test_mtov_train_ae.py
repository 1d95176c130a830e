"""MToV autoencoder training on the synthetic clip tree: learns, resumes, ldmk mode, GAN path, errors."""

from __future__ import annotations

import atexit
import json
import shutil
from pathlib import Path

import pytest
import torch
from mtov_synth import write_synthetic_hdtf

from moditalker.errors import UserError
from MToV.models import ViTAutoencoder
from MToV.models.autoencoder import load_autoencoder_weights
from MToV.train_autoencoder import main

REPO = Path(__file__).resolve().parents[2]


def _tiny16() -> str:
    """The shipped tiny AE config at 16x16 frames: the learning tests were sized for it (the shipped file
    is 32x32, the frame size of configs/mtov_tiny.yaml, so that autoencoders trained with it load there)."""
    import tempfile

    text = (REPO / "configs" / "mtov_autoencoder_tiny.yaml").read_text()
    assert "    resolution: 32" in text
    folder = tempfile.mkdtemp(prefix="ae_tiny16_")  # made at import, before pytest's temp folder exists
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "mtov_autoencoder_tiny16.yaml"
    path.write_text(text.replace("    resolution: 32", "    resolution: 16", 1))
    return str(path)


TINY = _tiny16()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_hdtf(tmp_path_factory.mktemp("hdtf"), n_frames=24)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """150 optimizer steps (L1 only) of the tiny RGB AE on one synthetic video: random training
    windows, PSNR on a fixed window (~20 s on one CPU thread)."""
    torch.set_num_threads(1)
    one = write_synthetic_hdtf(tmp_path_factory.mktemp("one"), ids=("WDA_Synth0_000",), heldout=())
    out = tmp_path_factory.mktemp("runs") / "rgb"
    result = main(["--config", TINY, "--out_dir", str(out), "--no_progress", f"data.root={one.root}",
                   "loss.perceptual_weight=0"])  # fmt: skip
    return out, result, one.root


def _tiny_model(out: Path) -> ViTAutoencoder:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "config.yaml")
    model = ViTAutoencoder(cfg.model.embed_dim, OmegaConf.to_container(cfg.model.ddconfig))
    return load_autoencoder_weights(model, out / "model_last.pth")


def test_rgb_training_learns(rgb_run):
    out, result, _ = rgb_run
    history = result["history"]
    assert [h["step"] for h in history] == [0, 50, 100, 150]
    first, last = history[0]["val_psnr"], history[-1]["val_psnr"]
    assert last > first + 2.0, history  # PSNR rises clearly (measured: 14.2 -> 17.8 dB)
    assert result["best_psnr"] == max(h["val_psnr"] for h in history[1:])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    for name in ("config.yaml", "model_last.pth", "model_best.pth", "state/trainer.json"):
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the checkpoint is a plain official-layout state_dict that loads strictly
    state = torch.load(out / "model_last.pth", weights_only=True)
    assert "xy_quant_attn.layers.0.0.fn.to_qkv.weight" in state and len(state) == 415
    _tiny_model(out)


def test_resume_continues_from_the_saved_step(rgb_run):
    out, _, root = rgb_run
    before = json.loads((out / "state" / "trainer.json").read_text())
    assert before["step"] == 150
    result = main(["--config", TINY, "--out_dir", str(out), "--no_progress", f"data.root={root}",
                   "train.max_steps=152", "train.val_every=1", "loss.perceptual_weight=0"])  # fmt: skip
    assert [h["step"] for h in result["history"]] == [151, 152]  # no restart, no step-0 baseline
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 152
    # the trained weights were restored (PSNR stays near the trained level, far above the start)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result["history"][0]["val_psnr"] > history[0]["val_psnr"] + 1.5


def test_resume_in_the_middle_of_a_pass_is_exact(tmp_path):
    """A run resumed mid-pass (3 batches a pass, saved after 2) began a new pass with a new shuffle and
    new random windows; now it reads the pass again and goes on as the uninterrupted run did."""
    data = write_synthetic_hdtf(tmp_path / "hdtf", ids=tuple(f"WDA_S{c}_000" for c in "ABCDEF"), heldout=())
    common = ["--config", TINY, "--no_progress", f"data.root={data.root}", "loss.perceptual_weight=0",
              "train.save_every=2", "train.val_every=2", "train.batch_size=2"]  # fmt: skip
    main([*common, "--out_dir", str(tmp_path / "straight"), "train.max_steps=6"])
    main([*common, "--out_dir", str(tmp_path / "resumed"), "train.max_steps=2"])
    saved = json.loads((tmp_path / "resumed" / "state" / "trainer.json").read_text())["data_pass"]
    assert (saved["passes"], saved["batch"]) == (0, 2)  # in the middle of the first pass
    main([*common, "--out_dir", str(tmp_path / "resumed"), "train.max_steps=6"])
    a = torch.load(tmp_path / "straight" / "model_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_last.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_needs_overwrite(synth, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        main(["--config", TINY, "--out_dir", str(out), f"data.root={synth.root}"])


def test_a_non_finite_training_loss_stops_the_run(synth, tmp_path):
    """A diverging run (a learning rate of 1e30) stops at its first NaN or infinite loss with one line,
    before that step's update, instead of training on to NaN weights."""
    out = tmp_path / "diverged"
    with pytest.raises(
        UserError, match=r"^training loss became (nan|inf) at step \d+; lower train.lr"
    ) as raised:
        main(["--config", TINY, "--out_dir", str(out), "--no_progress", f"data.root={synth.root}",
              "loss.perceptual_weight=0", "train.lr=1e30", "train.max_steps=20",
              "train.save_every=100"])  # fmt: skip
    step = int(str(raised.value).split("at step ")[1].split(";")[0])
    assert 1 < step <= 20 and not (out / "model_last.pth").exists() and not (out / "state").exists()


def test_ldmk_mode_inits_from_rgb_and_freezes_the_decoder(rgb_run, synth, tmp_path):
    rgb_out = rgb_run[0]
    out = tmp_path / "ldmk"
    with pytest.raises(UserError, match="init_from"):
        main(["--config", TINY, "--mode", "ldmk", "--out_dir", str(out), f"data.root={synth.root}"])
    init = torch.load(rgb_out / "model_last.pth", weights_only=True)
    result = main(["--config", TINY, "--mode", "ldmk", "--init_from", str(rgb_out / "model_last.pth"),
                   "--out_dir", str(out), "--no_progress", f"data.root={synth.root}",
                   "train.max_steps=3", "train.val_every=3"])  # fmt: skip
    assert [h["step"] for h in result["history"]] == [0, 3]
    trained = torch.load(out / "model_last.pth", weights_only=True)
    decoder = [k for k in init if k.startswith("decoder.")]
    others = [k for k in init if not k.startswith("decoder.") and k not in ("coords",) and "rot_emb" not in k]
    assert decoder and all(torch.equal(init[k], trained[k]) for k in decoder)
    changed = [k for k in others if not torch.equal(init[k], trained[k])]
    assert "encoder.to_patch_embedding.weight" in changed and "to_pixel.1.weight" in changed
    assert len(changed) == len(others)
    with pytest.raises(UserError, match="does not match the configured model"):
        main(["--config", TINY, "--mode", "ldmk", "--init_from", str(rgb_out / "model_last.pth"),
              "--out_dir", str(tmp_path / "x"), f"data.root={synth.root}",
              "model.ddconfig.channels=24"])  # fmt: skip


def test_ldmk_mode_from_scratch_trains_the_decoder_too(synth, tmp_path):
    """Without init_from the landmark autoencoder starts from its seeded initialisation, which needs
    the decoder trained (freeze_decoder=false): a frozen random decoder is refused."""
    out = tmp_path / "scratch"
    with pytest.raises(UserError, match="freeze_decoder=false"):
        main(["--config", TINY, "--mode", "ldmk", "--out_dir", str(out), f"data.root={synth.root}"])
    result = main(["--config", TINY, "--mode", "ldmk", "freeze_decoder=false", "--out_dir", str(out),
                   "--no_progress", f"data.root={synth.root}", "train.max_steps=2", "train.val_every=2",
                   "loss.perceptual_weight=0"])  # fmt: skip
    assert [h["step"] for h in result["history"]] == [0, 2]
    # the start is the seeded initialisation (train.seed): a second run gives the same weights
    trained = torch.load(out / "model_last.pth", weights_only=True)
    again = tmp_path / "again"
    main(["--config", TINY, "--mode", "ldmk", "freeze_decoder=false", "--out_dir", str(again),
          "--no_progress", f"data.root={synth.root}", "train.max_steps=2", "train.val_every=2",
          "loss.perceptual_weight=0"])  # fmt: skip
    second = torch.load(again / "model_last.pth", weights_only=True)
    assert trained.keys() == second.keys() and all(torch.equal(trained[k], second[k]) for k in trained)


def test_gan_phase_with_accumulation(synth, tmp_path):
    out = tmp_path / "gan"
    result = main(["--config", TINY, "--out_dir", str(out), "--no_progress", f"data.root={synth.root}",
                   "loss.disc_start=1", "train.max_steps=2", "train.grad_accum=2", "train.val_every=2",
                   "loss.perceptual_weight=0", "train.log_every=1"])  # fmt: skip
    assert result["step"] == 2 and all(torch.isfinite(torch.tensor(h["val_psnr"])) for h in result["history"])
    # model, both discriminators and both optimizers are in the resumable state
    state = out / "state"
    assert len(list(state.glob("model*.safetensors"))) == 3
    assert len(list(state.glob("optimizer*.bin"))) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/l1", "train/g_adv", "train/feat_match", "train/d_2d", "train/d_3d", "val/psnr"} <= tags
    assert [e.step for e in events.Scalars("train/d_2d")] == [2]  # GAN from disc_start=1 (0-based step)


def test_cli_error_exit_code(tmp_path, capsys):
    from moditalker.errors import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(
            main, ["--config", TINY, "--out_dir", str(tmp_path / "o"), f"data.root={tmp_path / 'nowhere'}"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: frames folder not found") and "Traceback" not in err


def test_training_with_splits(synth, tmp_path):
    """splits=2: each 8-frame window is cut into two 4-frame clips; loss/PSNR see the whole window."""
    out = tmp_path / "splits"
    result = main(["--config", TINY, "--out_dir", str(out), "--no_progress", f"data.root={synth.root}",
                   "model.ddconfig.splits=2", "train.max_steps=1", "train.val_every=1",
                   "loss.perceptual_weight=0"])  # fmt: skip
    assert result["step"] == 1 and len(result["history"]) == 2
    model = _tiny_model(out)
    assert (model.splits, model.s) == (2, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_saves_the_grad_scaler(synth, tmp_path):
    out = tmp_path / "cuda"
    result = main(["--config", TINY, "--out_dir", str(out), "--no_progress", "--device", "cuda",
                   f"data.root={synth.root}", "train.max_steps=2", "train.val_every=2",
                   "train.amp=true"])  # fmt: skip
    assert result["step"] == 2 and all(h["val_psnr"] == h["val_psnr"] for h in result["history"])
    assert (out / "state" / "scaler.pt").is_file()


def test_unreadable_frames_are_skipped_and_check_lists_them(tmp_path, capsys):
    """A truncated frame or a keypoint file of the wrong shape stopped the run with a traceback."""
    from mtov_synth import write_synthetic_hdtf

    synth = write_synthetic_hdtf(tmp_path / "hdtf", n_frames=16)
    bad_vid = synth.train_ids[0]
    frame = sorted((synth.frames_dir / bad_vid).iterdir())[3]
    frame.write_bytes(frame.read_bytes()[:20])  # truncated PNG
    argv = [
        "--config",
        TINY,
        "--no_progress",
        f"data.root={synth.root}",
        "train.max_steps=2",
        "train.val_every=2",
    ]
    result = main([*argv, "--out_dir", str(tmp_path / "run"), "data.max_bad_items=1"])
    assert result["step"] == 2
    err = capsys.readouterr().err
    assert f"warning: skipped an unreadable training item {synth.frames_dir / bad_vid}" in err, err
    with pytest.raises(UserError, match="more than data.max_bad_items=0.0"):
        main([*argv, "--out_dir", str(tmp_path / "strict"), "data.max_bad_items=0"])
    with pytest.raises(UserError, match="unreadable"):
        main(["--config", TINY, "--check", f"data.root={synth.root}"])
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("unreadable: ")] == [
        f"unreadable: {synth.frames_dir / bad_vid}: cannot read frame {frame} (corrupt or not an image)"
    ], out


def _latent(out: Path, root: Path) -> torch.Tensor:
    """The tri-plane latent of the first 8 frames of the one training video."""
    import numpy as np

    from data.video import read_frame_folder

    frames = read_frame_folder(next((root / "frames").iterdir()), what="frames")[:8]
    model = _tiny_model(out).eval()
    size = model.res
    x = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)[None]
    x = torch.nn.functional.interpolate(x[0].transpose(0, 1), size=(size, size), mode="area")
    with torch.inference_mode():
        return model.extract(x.transpose(0, 1)[None])


def test_latent_weight_keeps_the_latent_out_of_saturation(rgb_run, tmp_path):
    """Without a bound the planes' pre-tanh values grow until tanh saturates and a clip's latent is
    nearly constant (a diffusion model cannot draw the small differences left); ``loss.latent_weight``
    penalises their mean square."""
    out_plain, plain_result, root = rgb_run
    out = tmp_path / "bounded"
    result = main(["--config", TINY, "--out_dir", str(out), "--no_progress", f"data.root={root}",
                   "loss.perceptual_weight=0", "loss.latent_weight=0.01"])  # fmt: skip
    plain, bounded = _latent(out_plain, root), _latent(out, root)
    # measured after 150 steps: plain 100 % of the values beyond 0.99 (mean |z| 0.999999), bounded 0 %
    # (mean |z| 0.33); validation PSNR 17.8 vs 17.7 dB
    assert (plain.abs() > 0.99).float().mean() > 0.9
    assert (bounded.abs() > 0.99).float().mean() < 0.05 and bounded.abs().mean() < 0.6
    assert result["history"][-1]["val_psnr"] > plain_result["history"][-1]["val_psnr"] - 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    penalty = [e.value for e in events.Scalars("train/latent_l2")]  # logged, and it falls
    assert len(penalty) == 150 // 10 and penalty[-1] < penalty[0] / 5  # measured 3.56 -> 0.17
