"""The MToV latent cache: built once, resumed after a kill, sharded; training from it equals the frame
path (loss and gradients), draws the same windows, learns and resumes; mismatched caches are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from mtov_synth import write_synthetic_hdtf
from torch.utils.data import DataLoader

from benchmarks.prepare import randomize_zero_params
from moditalker.config import load_config
from moditalker.errors import UserError
from MToV import cache_latents
from MToV.dataset import build_dataset
from MToV.diffusion import DDPM
from MToV.latents import KINDS, CachedLatents, CachedWindowDataset, LatentCache, from_storage, to_storage
from MToV.loading import build_models
from MToV.models.autoencoder import load_autoencoder_weights
from MToV.train_diffusion import DEFAULTS, KEYS, LatentBatcher
from MToV.train_diffusion import main as train_main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "mtov_tiny.yaml")
IDS = ("WDA_A_000", "WDA_B_000", "RD_C_000")  # 10, 9, 8 frames: 3 + 2 training windows of 8, 1 held out


class Setup:
    def __init__(self, root: Path) -> None:
        self.info = write_synthetic_hdtf(root / "hdtf", ids=IDS, heldout=("RD_C_000",), n_frames=[10, 9, 8])
        models = []
        for seed in (0, 1):  # two different random autoencoders, saved as checkpoint files
            set_seed(seed)
            ae, _, _ = build_models(load_config(TINY, (), DEFAULTS))
            models.append(ae)
        self.rgb, self.ldmk = root / "ae_rgb.pth", root / "ae_ldmk.pth"
        torch.save(models[0].state_dict(), self.rgb)
        torch.save(models[1].state_dict(), self.ldmk)
        self.data = [f"data.root={self.info.root}", f"data.split_file={self.info.split_file}"]
        self.aes = ["--ae_rgb", str(self.rgb), "--ae_ldmk", str(self.ldmk)]
        self.cache, self.bf16 = root / "cache", root / "bf16"
        self.build(self.cache)
        # the same cache in bf16 by two independent jobs (shards) writing one folder
        self.shards = [self.build(self.bf16, "--dtype", "bf16", "--num_shards", "2", "--shard", str(k))
                       for k in (0, 1)]  # fmt: skip

    def build(self, out: Path, *extra: str) -> dict:
        args = ["--config", TINY, "--device", "cpu", "--no_progress", "--batch_size", "1", *self.aes]
        return cache_latents.main([*args, *self.data, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    torch.set_num_threads(1)  # one thread everywhere: bit-identical encodes from build to build
    return Setup(tmp_path_factory.mktemp("latents"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def assert_same_cache(a: Path, b: Path, dtype: str = "fp32") -> None:
    """``a`` holds exactly what ``b`` (an fp32 cache) holds, stored as ``dtype``."""
    ma, mb = (json.loads((root / "manifest.json").read_text()) for root in (a, b))
    spread_a, spread_b = ma.pop("latent_spread"), mb.pop("latent_spread")  # from rounded latents
    for kind in ("z", "z_l"):
        assert spread_a[kind]["windows"] == spread_b[kind]["windows"]
        assert spread_a[kind]["spread_median"] == pytest.approx(spread_b[kind]["spread_median"], rel=0.02)
    shrink = {"fp32": 1, "bf16": 2, "fp16": 2}[dtype]
    assert ma == {**mb, "dtype": dtype, "bytes_per_window": mb["bytes_per_window"] // shrink}
    for vid in IDS:
        for kind in (*KINDS, "starts"):
            x, y = (np.load(root / "videos" / vid / f"{kind}.npy") for root in (a, b))
            if kind != "starts":
                y = to_storage(torch.from_numpy(y), dtype)
            assert x.dtype == y.dtype and np.array_equal(x, y), (vid, kind)


def test_build_resumes_after_a_kill_and_two_shards_make_one_build(setup, tmp_path, monkeypatch, capsys):
    manifest = json.loads((setup.cache / "manifest.json").read_text())
    assert manifest["videos"] == {
        "WDA_A_000": {"frames": 10, "windows": 3},
        "WDA_B_000": {"frames": 9, "windows": 2},
        "RD_C_000": {"frames": 8, "windows": 1},
    }
    assert manifest["splits"] == {"train": ["WDA_A_000", "WDA_B_000"], "test": ["RD_C_000"]}
    assert manifest["bytes_per_window"] == 4 * (3 * 80 + 16) * 4
    z = np.load(setup.cache / "videos" / "WDA_A_000" / "z.npy", mmap_mode="r")
    assert z.shape == (3, 4, 80) and z.dtype == np.float32 and np.abs(z).max() > 0

    # two independent shards (longest video first: A alone, then B and C), bf16: one build, rounded
    assert [(r["complete"], r["built"]) for r in setup.shards] == [(False, 1), (True, 2)]
    assert_same_cache(setup.bf16, setup.cache, "bf16")

    # a build killed in the middle of its second video (windows one at a time: A has 3, B 2, C 1)
    killed, real, calls = tmp_path / "killed", cache_latents.encode, []

    def dies_on_the_fifth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # B's second window: B is half-written
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_latents, "encode", dies_on_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        setup.build(killed)
    assert "latent cache: 3 videos, 6 windows x 4.0 KiB (fp32)" in capsys.readouterr().out
    videos = killed / "videos"
    assert (videos / "WDA_A_000" / "video.json").is_file()
    assert not (videos / "WDA_B_000").exists() and len(list(videos.glob("WDA_B_000.tmp-*"))) == 1
    assert not (killed / "manifest.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        LatentCache(killed)
    monkeypatch.setattr(cache_latents, "encode", real)
    resumed = setup.build(killed)
    assert resumed["complete"] and resumed["built"] == 2  # A was kept, B rebuilt, C built
    assert not list(videos.glob("*.tmp-*"))
    assert_same_cache(killed, setup.cache)
    # a video folder without its video.json (not a built video) is made again in its place
    (videos / "WDA_A_000" / "video.json").unlink()
    (killed / "manifest.json").unlink()
    again = setup.build(killed)
    assert again["complete"] and again["built"] == 1
    assert_same_cache(killed, setup.cache)
    with pytest.raises(UserError, match=r"other settings \(stride differ\).*--overwrite"):
        setup.build(killed, "--stride", "2")
    # a folder without build.json is not a cache to resume: refused, nothing in it removed
    other = tmp_path / "mine"
    (other / "videos").mkdir(parents=True)
    (other / "videos" / "talk1.mp4").write_bytes(b"not ours")
    with pytest.raises(UserError, match="no build.json.*--overwrite"):
        setup.build(other)
    assert (other / "videos" / "talk1.mp4").read_bytes() == b"not ours"


def test_training_refuses_a_cache_of_other_autoencoders_or_settings(setup, tmp_path):
    run = ["--config", TINY, "--device", "cpu", "--no_progress", "--out_dir", str(tmp_path / "run")]
    latents = [f"data.latents={setup.cache}", f"data.split_file={setup.info.split_file}"]
    swapped = ["--ae_rgb", str(setup.ldmk), "--ae_ldmk", str(setup.rgb)]
    with pytest.raises(UserError, match=r"other settings: autoencoders\.ldmk\.sha256") as info:
        train_main([*run, *latents, *swapped])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"data\.landmark_radius: 3 \(cache\) vs 2 \(this run\)"):
        train_main([*run, *latents, *setup.aes, "data.landmark_radius=2"])
    with pytest.raises(UserError, match=r"data\.split_file_sha256"):
        train_main([*run, f"data.latents={setup.cache}", *setup.aes])  # no split file: another split
    # from the command line: one `error:` line, exit status 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "MToV.train_diffusion", *run, *latents, *swapped],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: latent cache"), (
        proc.stderr
    )


def test_fp32_cache_gives_the_frame_path_loss_and_gradients(setup):
    cfg = load_config(TINY, [*setup.data, "train.device=cpu"], DEFAULTS)
    set_seed(0)
    ae_rgb, ae_ldmk, unet = build_models(cfg)
    load_autoencoder_weights(ae_rgb, setup.rgb)
    load_autoencoder_weights(ae_ldmk, setup.ldmk)
    for ae in (ae_rgb, ae_ldmk):
        ae.eval().requires_grad_(False)
    randomize_zero_params(unet, 1)  # a zero output layer would make every loss 1 and most gradients 0
    ddpm = DDPM(unet, channels=4, image_size=ae_rgb.r, frames=ae_rgb.s)
    frames = build_dataset(cfg.data, "train", KEYS, ae_rgb.timesteps, ae_rgb.res, skip_unreadable=False)
    items = [frames.clip(v, s) for v, s in ((0, 0), (0, 2), (1, 1))]
    batch = {k: torch.stack([it[k] for it in items]) for k in KEYS}
    cache = LatentCache(setup.cache)
    cached = [cache.window(it["id"], it["start"]) for it in items]
    gen = torch.Generator().manual_seed(5)
    t = torch.tensor([3, 400, 999])
    noise = torch.randn(3, 4, ae_rgb.latent_length, generator=gen)
    params = [p for p in unet.parameters() if p.requires_grad]

    def loss_and_grads(latents):
        unet.zero_grad(set_to_none=True)
        loss, _ = ddpm.p_losses(*latents, t, noise=noise)
        loss.backward()
        return float(loss.detach()), [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params
        ]

    from_frames = LatentBatcher(ae_rgb, ae_ldmk)(batch)
    from_cache = CachedLatents()({k: torch.stack([c[k] for c in cached]) for k in KINDS})
    for a, b in zip(from_frames, from_cache):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    loss_f, grads_f = loss_and_grads(from_frames)
    loss_c, grads_c = loss_and_grads(from_cache)
    assert abs(loss_c - loss_f) <= 1e-6 * abs(loss_f), (loss_f, loss_c)
    assert sum(float(g.abs().sum()) for g in grads_f[:-4]) > 0  # gradients reach the early layers
    for gf, gc in zip(grads_f, grads_c):
        torch.testing.assert_close(gc, gf, rtol=1e-4, atol=1e-6)

    # the bf16 cache (the fp32 latents rounded to bf16, see above): its loss differs a little
    stored = np.load(setup.bf16 / "videos" / "WDA_A_000" / "z.npy")
    rounded = LatentCache(setup.bf16)
    cached_b = [rounded.window(it["id"], it["start"]) for it in items]
    assert torch.equal(cached_b[0]["z"], from_storage(stored[0], "bf16"))
    loss_b, _ = loss_and_grads(CachedLatents()({k: torch.stack([c[k] for c in cached_b]) for k in KINDS}))
    print(f"loss: frames {loss_f:.7f}, fp32 cache {loss_c:.7f}, bf16 cache {loss_b:.7f}")
    assert 0 < abs(loss_b - loss_f) < 1e-3


def test_cache_training_draws_the_frame_windows_learns_and_resumes(setup, tmp_path):
    cfg = load_config(TINY, [*setup.data, "data.train_clips_per_video=2"], DEFAULTS)
    frames = build_dataset(cfg.data, "train", ("x_ref",), 8, 32)
    cached = CachedWindowDataset(LatentCache(setup.cache), "train", clips_per_video=2)

    def draws(ds) -> list[tuple[str, int]]:
        torch.manual_seed(7)
        loader = DataLoader(ds, batch_size=2, shuffle=True)
        return [(i, int(s)) for _ in range(4) for b in loader for i, s in zip(b["id"], b["start"])]

    drawn = draws(frames)
    assert drawn == draws(cached) and len({s for _, s in drawn}) > 2  # random starts, the same ones

    out = tmp_path / "run"
    common = ["--config", TINY, "--out_dir", str(out), "--device", "cpu", "--no_progress", *setup.aes,
              f"data.latents={setup.cache}", f"data.split_file={setup.info.split_file}", "train.batch_size=4",
              "train.save_every=20", "train.ema_every=5", "data.max_val_clips=4"]  # fmt: skip
    first = train_main([*common, "train.max_steps=20"])  # no data.root: the frames are not needed
    assert first["step"] == 20 and len(first["train_losses"]) == 20
    second = train_main([*common, "train.max_steps=60"])
    assert second["step"] == 60 and len(second["train_losses"]) == 40
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 20, 40, 60]
    val = [r["val_loss"] for r in records]
    assert val[-1] < 0.6 * val[0], val
    losses = first["train_losses"] + second["train_losses"]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    (ema_file,) = (out / "state").glob("custom_checkpoint_*.pkl")
    assert int(torch.load(ema_file, weights_only=True)["num_updates"]) == 12
    assert any((out / "tb").iterdir()) and (out / "diffusion_model.pth").is_file()


def test_benchmark_training_tiny_writes_the_report(tmp_path):
    from benchmarks.training import main as bench_main

    path = tmp_path / "bench.json"
    args = ["--tiny", "--device", "cpu", "--batch_size", "2", "--steps", "1", "--warmup", "0"]
    bench_main([*args, "--workers", "0", "--no_progress", "--json", str(path)])
    report = json.loads(path.read_text())
    for key in ("device", "batch_size", "frames_s_per_step", "latents_s_per_step", "speedup",
                "max_abs_loss_diff", "cache_bytes_per_window"):  # fmt: skip
        assert key in report, key
    assert report["batch_size"] == 2 and report["cache_bytes_per_window"] == 4096
    assert report["speedup"] == pytest.approx(report["frames_s_per_step"] / report["latents_s_per_step"])
    assert report["max_abs_loss_diff"] <= 1e-4 and 0 < report["bf16_cache_max_abs_loss_diff"] < 1e-2
    assert report["device"].startswith("cpu (") and 0 <= report["latents_data_wait_fraction"] < 1
    with pytest.raises(UserError, match="already exists"):
        bench_main([*args, "--json", str(path)])


def test_an_unreadable_video_is_left_out_within_max_bad_items(tmp_path, capsys):
    info = write_synthetic_hdtf(tmp_path / "hdtf", ids=("WDA_A_000", "WDA_B_000"), heldout=(), n_frames=8)
    (info.frames_dir / "WDA_B_000" / "00003.png").write_bytes(b"not a png")
    args = ["--config", TINY, "--device", "cpu", "--no_progress", "random_autoencoders=true"]
    args += [f"data.root={info.root}", "--out", str(tmp_path / "cache")]
    with pytest.raises(
        UserError, match=r"1 videos are unreadable, more than data\.max_bad_items=0\.01 allows"
    ):
        cache_latents.main(args)
    assert "warning: skipped unreadable video WDA_B_000: cannot read frame" in capsys.readouterr().err
    result = cache_latents.main([*args, "data.max_bad_items=1"])  # resumes: A is kept, B retried
    assert result["complete"] and result["built"] == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert list(manifest["videos"]) == ["WDA_A_000"] and list(manifest["unreadable"]) == ["WDA_B_000"]
    assert manifest["splits"] == {"train": ["WDA_A_000"], "test": ["WDA_A_000"]}


def test_latent_spread_flags_a_saturated_autoencoder(setup, tmp_path, capsys):
    from MToV.latents import MIN_SPREAD, latent_spread

    # the setup's random autoencoders: unsaturated, the 5 training windows (3 + 2) differ
    spread = json.loads((setup.cache / "manifest.json").read_text())["latent_spread"]
    assert spread["z"]["windows"] == 5 and spread["z"]["saturated"] < 0.05
    assert (
        spread["z"]["spread_median"] > 100 * MIN_SPREAD and spread["z_l"]["spread_median"] > 100 * MIN_SPREAD
    )
    # by hand: a nearly constant latent at the tanh's end, and a varied one
    flat, varied = tmp_path / "flat", tmp_path / "varied"
    rng = np.random.default_rng(0)
    for folder, z in (
        (flat, 0.9999 + 1e-6 * rng.standard_normal((6, 4, 10))),
        (varied, rng.uniform(-0.5, 0.5, (6, 4, 10))),
    ):
        folder.mkdir()
        np.save(folder / "z.npy", z.astype(np.float32))
    low = latent_spread([flat], "fp32")
    assert low["windows"] == 6 and low["saturated"] == 1.0 and low["spread_median"] < 1e-5
    one = tmp_path / "one"
    one.mkdir()
    np.save(one / "z.npy", np.full((1, 4, 10), 0.2, np.float32))
    assert latent_spread([one], "fp32")["spread_median"] is None  # one window: nothing to compare
    high = latent_spread([varied], "fp32")
    assert high["saturated"] == 0.0 and 0.2 < high["spread_median"] < 0.4  # uniform(-0.5, 0.5): sd 0.29
    assert 0.2 < high["spread_mean"] < 0.4 and low["spread_mean"] < 1e-5
    # a saturated RGB autoencoder (its planes' pre-tanh biases pushed to +30) is named at build time
    state = torch.load(setup.rgb, weights_only=True)
    for plane in ("pre_xy", "pre_yt", "pre_xt"):
        state[f"{plane}.bias"] = torch.full_like(state[f"{plane}.bias"], 30.0)
    saturated = tmp_path / "saturated.pth"
    torch.save(state, saturated)
    capsys.readouterr()
    args = ["--config", TINY, "--device", "cpu", "--no_progress", "--ae_rgb", str(saturated), "--ae_ldmk"]
    cache_latents.main([*args, str(setup.ldmk), *setup.data, "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert "the RGB autoencoder's latent hardly varies" in err and "loss.latent_weight" in err
    assert "landmark autoencoder's latent" not in err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["latent_spread"]["z"]["saturated"] == 1.0
