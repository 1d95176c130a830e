"""evaluation: each metric against an independent reference, analytic cases, the CLI's errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from data.video import read_video, write_video
from evaluation import metrics as M
from evaluation import protocol, weights
from evaluation.evaluate import main, run_metrics
from evaluation.frechet import RunningGaussian, frechet_distance
from evaluation.syncnet import offset_search
from moditalker.errors import cli_main

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- fixtures
def _frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth moving pattern whose brightness changes over time: uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3)).astype(np.float32)
    img = np.kron(base, np.ones((8, 8, 1)))
    out = [np.roll(img, 3 * k, axis=1) * (0.6 + 0.4 * np.sin(k / 2.0) ** 2) for k in range(n)]
    return np.stack(out).clip(0, 255).astype(np.uint8)


def _audio(n_frames: int) -> np.ndarray:
    t = np.arange(n_frames * 640) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


@pytest.fixture
def no_weights(ckpt):
    """An empty checkpoints folder and torch-hub cache (tests/conftest.py): no metric weights anywhere."""
    return ckpt


def _pair_dirs(tmp_path, pred: dict[str, np.ndarray], gt: dict[str, np.ndarray], audio: bool = False):
    for side, videos in (("pred", pred), ("gt", gt)):
        (tmp_path / side).mkdir(parents=True, exist_ok=True)
        for name, frames in videos.items():
            write_video(tmp_path / side / f"{name}.mp4", frames, audio=_audio(len(frames)) if audio else None)
    return tmp_path / "pred", tmp_path / "gt"


# ----------------------------------------------------------------------------- protocol
def test_streamed_frames_equal_read_video_and_the_packet_count(tmp_path):
    path = write_video(tmp_path / "v.mp4", _frames(17), fps=30)
    streamed = np.concatenate(list(protocol.iter_frames(path, 25, chunk=4)))
    ref, _ = read_video(path, fps=25)
    assert streamed.shape == ref.shape
    assert np.array_equal(streamed, ref)
    assert protocol.count_frames(path, 25) == len(ref)
    x = protocol.to_protocol(streamed[:2], CPU)
    assert x.shape == (2, 3, 256, 256) and x.dtype == torch.uint8


# ----------------------------------------------------------------------------- references
def test_frechet_distance_matches_a_direct_scipy_computation():
    import scipy.linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ga, gb = RunningGaussian(), RunningGaussian()
    for chunk in np.array_split(a, 7):
        ga.update(chunk)
    gb.update(torch.from_numpy(b))
    mu1, s1 = ga.stats()
    mu2, s2 = gb.stats()
    assert np.allclose(mu1, a.mean(0)) and np.allclose(s1, np.cov(a, rowvar=False))
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = _frames(3, 64, seed=1)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    psnr, ssim = M.psnr_frames(ta, tb).numpy(), M.ssim_frames(ta, tb).numpy()
    for i in range(3):
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(b[i], a[i], data_range=255), abs=1e-6)
        ref = structural_similarity(
            a[i] / 255.0,
            b[i] / 255.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=-1,
        )
        assert ssim[i] == pytest.approx(ref, abs=2e-4)
    assert M.psnr_frames(ta, ta).tolist() == [M.PSNR_MAX] * 3


def test_lpips_matches_the_lpips_package_with_the_same_alexnet(tmp_path, monkeypatch):
    import lpips
    import torchvision

    torch.manual_seed(3)
    alex = torchvision.models.alexnet(weights=None)
    torch.save(alex.state_dict(), tmp_path / "alexnet.pth")
    ours = weights.build_lpips(tmp_path / "alexnet.pth", CPU)
    # the reference: the lpips package building its own AlexNet slices from the same torchvision model
    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", lambda *a, **k: alex)
    ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, verbose=False).eval()
    a = torch.from_numpy(_frames(2, 64, seed=4)).permute(0, 3, 1, 2)
    b = torch.from_numpy(_frames(2, 64, seed=5)).permute(0, 3, 1, 2)
    metric = M.LPIPS(ours)
    metric.start(None)
    metric.update(M.Chunk(a, b))
    with torch.no_grad():
        expected = ref(a.float() / 127.5 - 1, b.float() / 127.5 - 1).mean().item()
    assert metric.finish_video()["lpips"] == pytest.approx(expected, rel=1e-5)
    assert ours(a.float() / 127.5 - 1, a.float() / 127.5 - 1).abs().max().item() < 1e-6


def test_fvd_preprocess_resizes_the_shorter_side_crops_the_centre_and_maps_to_minus_one_one():
    frames = torch.zeros(2, 3, 256, 320, dtype=torch.uint8)
    frames[..., :, 20:40] = (
        255  # a bright band 20..40 px -> 17.5..35 px at scale 0.875; the crop starts at 28
    )
    x = M.fvd_preprocess(frames)
    assert x.shape == (3, 2, 224, 224)
    assert x.min().item() == -1.0 and x.max().item() == pytest.approx(1.0)
    assert (x[..., :, :5] > 0.9).all() and (x[..., :, 10:] < -0.99).all()
    square = M.fvd_preprocess(torch.full((1, 3, 256, 256), 255, dtype=torch.uint8))
    assert square.shape == (3, 1, 224, 224) and torch.allclose(square, torch.ones_like(square))


def test_fid_inception_sees_299_pixels_in_minus_one_one_and_returns_2048_features():
    net = weights.build_inception(None, CPU, random=True)
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
    metric = M.FID(net)
    frames = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    frames[1] = 255
    metric.update(M.Chunk(frames, frames))
    x = seen[0]
    assert x.shape == (4, 3, 299, 299)
    assert x[0].eq(-1).all() and x[1].eq(1).all()
    assert metric.fake.n == 2 and metric.fake.sum.shape == (2048,)


def test_lmd_hand_computed_case():
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    mouth = np.stack([100 + 3 * np.cos(angles), 150 + 3 * np.sin(angles)], axis=1)
    gt = np.zeros((1, 68, 2))
    gt[0, 48:68] = mouth
    pred = gt.copy()
    pred[0, 48:68] = 2 * (mouth - mouth.mean(0)) + mouth.mean(0) + [7.0, -4.0]  # scaled x2, moved
    assert M.mouth_distance(pred, gt)[0] == pytest.approx(3.0)  # |2r - r| = 3 px for every point
    assert M.mouth_distance(gt, gt)[0] == 0.0


@pytest.mark.parametrize("shift", [3, -2, 0])
def test_syncnet_offset_search_finds_a_known_shift(shift):
    rng = np.random.default_rng(6)
    aud = torch.from_numpy(rng.normal(size=(60, 32))).float()
    lip = torch.from_numpy(rng.normal(size=(60, 32))).float()
    for i in range(60):
        if 0 <= i - shift < 60:
            lip[i] = aud[i - shift] + 0.05 * torch.randn(32)  # video frame i shows audio window i - shift
    res = offset_search(lip, aud)
    assert res["offset"] == shift
    assert res["lse_c"] > 1.0 and res["lse_d"] < 2.0


def test_networks_load_their_state_dicts_and_reject_foreign_ones(tmp_path):
    from evaluation.arcface import IResNet
    from evaluation.i3d import InceptionI3d
    from evaluation.syncnet import SyncNet
    from moditalker.errors import UserError

    def save(net, name):  # old checkpoints have no BN counters
        state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        torch.save(state, tmp_path / name)
        return tmp_path / name

    i3d = save(InceptionI3d(), "i3d.pt")
    assert sum(p.numel() for p in weights.build_i3d(i3d, CPU).parameters()) == 12_697_264
    sync = save(SyncNet(), "sync.model")
    weights.build_syncnet(sync, CPU)
    net = weights.build_arcface(save(IResNet(34), "arc.pth"), CPU)
    assert len(net.layer3) == 6  # depth read from the file
    with pytest.raises(UserError, match="SyncNet .* does not match") as err:
        weights.build_syncnet(i3d, CPU)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- analytic cases
class _TinyImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.proj = nn.Conv2d(3, 8, 8, 8)

    def forward(self, x):
        return self.proj(x).mean(dim=(2, 3))


class _TinyVideoNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.proj = nn.Conv3d(3, 8, (4, 16, 16), (4, 16, 16))

    def forward(self, x):
        return self.proj(x).flatten(2).std(-1)


def _brightness_detector(frames):
    """Landmarks whose mouth opens with the frame's brightness (a stand-in for FAN)."""
    from data.landmarks import template_face_detector

    lm = template_face_detector(frames)
    lm[:, 48:68, 1] += (frames.reshape(len(frames), -1).mean(1) / 10.0)[:, None] * np.sign(
        lm[:, 48:68, 1] - lm[:, 48:68, 1].mean(1, keepdims=True)
    )
    return lm


def _analytic_metrics():
    from data.landmarks import FaceLandmarkDetector

    lp = weights.build_lpips(None, CPU, random=True)
    metrics = {
        "psnr": M.PSNR(),
        "ssim": M.SSIM(),
        "lpips": M.LPIPS(lp),
        "fid": M.FID(_TinyImageNet()),
        "fvd": M.FVD(_TinyVideoNet(), clip=8),
        "lmd": M.LMD(),
    }
    return metrics, FaceLandmarkDetector(CPU, detector=_brightness_detector)


def test_identical_videos_are_perfect_and_a_one_frame_shift_is_worse(tmp_path):

    videos = {f"v{i}": _frames(17, seed=10 + i) for i in range(2)}
    pred, gt = _pair_dirs(tmp_path / "same", {}, {k: v[:16] for k, v in videos.items()})
    for name in videos:  # the same file (two encodes of the same frames may differ slightly)
        shutil.copy(gt / f"{name}.mp4", pred / f"{name}.mp4")
    metrics, lm = _analytic_metrics()
    same, per_video, _ = run_metrics(protocol.make_pairs(pred, gt), metrics, CPU, lm, chunk=6, progress=False)
    assert same["psnr"] == M.PSNR_MAX
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5)  # float32 SSIM maps
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert same["lmd"] == 0.0
    assert set(per_video) == {"v0", "v1"} and per_video["v0"]["frames"] == 16

    shifted = {k: v[1:17] for k, v in videos.items()}
    pred, gt = _pair_dirs(tmp_path / "shift", shifted, {k: v[:16] for k, v in videos.items()})
    metrics, lm = _analytic_metrics()
    worse, _, _ = run_metrics(protocol.make_pairs(pred, gt), metrics, CPU, lm, chunk=6, progress=False)
    assert worse["psnr"] < 40 and worse["ssim"] < 0.98 and worse["lpips"] > 1e-4
    assert worse["fvd"] > 1e-3 and worse["lmd"] > 0.1


# ----------------------------------------------------------------------------- the CLI
def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_errors_are_one_line(tmp_path, capsys, no_weights):
    v = _frames(10)
    assert "does not exist" in _cli(["--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)], capsys)
    pred, gt = _pair_dirs(tmp_path / "names", {"a": v, "b": v}, {"a": v, "c": v})
    msg = _cli(["--pred", str(pred), "--gt", str(gt)], capsys)
    assert "names do not match" in msg and "b.mp4" in msg and "c.mp4" in msg
    pred, gt = _pair_dirs(tmp_path / "len", {"a": _frames(14)}, {"a": v})
    msg = _cli(["--pred", str(pred), "--gt", str(gt)], capsys)
    assert "14 frames" in msg and "10" in msg
    pred, gt = _pair_dirs(tmp_path / "ok", {"a": v}, {"a": v})
    msg = _cli(["--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,lpips"], capsys)
    assert "lpips_alexnet" in msg and "lpips/alexnet.pth" in msg
    assert "unknown metric" in _cli(["--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,foo"], capsys)
    pred, gt = _pair_dirs(tmp_path / "text", {}, {"a": v})
    (pred / "a.mp4").write_text("not a video")
    msg = _cli(["--pred", str(pred), "--gt", str(gt), "--metrics", "psnr"], capsys)
    assert msg.endswith("a.mp4: not a video file that FFmpeg can decode (another format, or damaged)"), msg
    (tmp_path / "r.json").write_text("{}")
    msg = _cli(["--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path / "r.json")], capsys)
    assert "--overwrite" in msg


def test_table_explains_nan():
    from evaluation.scoring import NAN_NOTE, format_table

    plain = format_table({"psnr": 30.0, "lse_c": 1.0}, {"lse_c": 2.0})
    assert "nan" not in plain
    table = format_table({"psnr": 30.0, "lse_c": float("nan")}, {"lse_c": float("nan")})
    assert table.splitlines()[-1] == NAN_NOTE and "lse: no audio track" in NAN_NOTE
    assert table.splitlines()[2].split()[-1] == "nan"


def test_cli_default_runs_what_is_present_and_skips_the_rest(tmp_path, capsys, no_weights):
    v = _frames(6)
    pred, gt = _pair_dirs(tmp_path, {}, {"a": v})
    shutil.copy(gt / "a.mp4", pred / "a.mp4")  # one encode: two encodes of the same frames may differ
    report = main(["--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim", "--no_progress"])
    assert report["metrics"]["psnr"] == M.PSNR_MAX
    main(
        [
            "--pred",
            str(pred / "a.mp4"),
            "--gt",
            str(gt / "a.mp4"),
            "--no_progress",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr()
    for name in ("lpips", "fid", "fvd", "lmd", "lse", "csim"):
        assert f"skipped {name}: missing weights" in out.err
    skipped = [line for line in out.err.splitlines() if line.startswith("skipped ")]
    assert max(map(len, skipped)) <= 130, skipped  # one short line each: the assets, and where to look
    assert "skipped csim: missing weights: arcface, face_alignment (" in out.err
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {"metrics", "per_video", "settings", "reference"}
    assert set(data["metrics"]) == {"psnr", "ssim", "cpbd"} and "cpbd" in data["reference"]
    assert data["settings"]["protocol"]["fps"] == 25


def test_cli_random_weights_smoke_with_audio(tmp_path, capsys):
    gt_frames = _frames(12, seed=20)
    pred, gt = _pair_dirs(tmp_path, {"a": gt_frames[::-1].copy()}, {"a": gt_frames}, audio=True)
    out = tmp_path / "report.json"
    argv = ["--pred", str(pred), "--gt", str(gt), "--random_weights", "--no_progress", "--json", str(out)]
    main([*argv, "--metrics", "lse,csim,lmd", "--batch_size", "5"])
    data = json.loads(out.read_text())
    assert data["settings"]["random_weights"] is True
    for key in ("lse_c", "lse_d", "csim", "lmd"):
        assert np.isfinite(data["metrics"][key]), key
    assert set(data["reference"]) == {"lse_c", "lse_d", "csim"}
    assert "lse_offset" in data["per_video"]["a"]
    assert "random weights" in capsys.readouterr().err


def test_pred_gt_and_the_protocols_score_through_one_call(monkeypatch):
    """``--pred/--gt`` and the protocols both score with :func:`evaluation.scoring.score_args`, which
    passes the command line's settings to :func:`score`."""
    from evaluation import evaluate, protocols, scoring

    seen = {}

    def fake_score(pairs, requested, overrides, **kwargs):
        seen.update(kwargs, pairs=pairs, requested=requested, overrides=overrides)
        return {"scored": True}

    monkeypatch.setattr(scoring, "score", fake_score)
    argv = ["--pred", "p", "--gt", "g", "--random_weights", "--device", "cpu", "--batch_size", "3"]
    args = evaluate.build_parser().parse_args([*argv, "--no_progress"])
    got = scoring.score_args(args, ["pair"], ["psnr"], {"lpips": "w.pth"}, ranks=None, pool=("psnr",))
    assert got == {"scored": True}
    assert seen == dict(
        pairs=["pair"], requested=["psnr"], overrides={"lpips": "w.pth"}, random=True, device="cpu", batch=3,
        progress=False, pool=("psnr",), ranks=None,
    )  # fmt: skip
    assert evaluate.score_args is scoring.score_args and protocols.score_args is scoring.score_args
    assert scoring.score_args(evaluate.build_parser().parse_args(argv), [], None, {})["scored"]
    assert seen["progress"] is True and seen["pool"] == weights.METRICS
