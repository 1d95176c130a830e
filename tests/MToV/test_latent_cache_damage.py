"""The MToV latent cache against damaged files: JSON of the wrong type or with wrong values in
``build.json``, ``manifest.json`` or a ``video.json`` is one ``error:`` line naming the file and the
fix when training reads it, and a rerun of the build repairs it; NaN weights and NaN keypoints are
refused (one line) or counted as unreadable, never a traceback or a cache of NaN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from mtov_synth import write_synthetic_hdtf

from data.imageops import draw_dots, mask_below_nose
from moditalker.config import load_config
from moditalker.errors import UserError
from MToV import cache_latents, cache_manifest
from MToV.dataset import HDTFClipDataset
from MToV.latents import LatentCache, latent_spread
from MToV.loading import build_models
from MToV.train_diffusion import DEFAULTS

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "mtov_tiny.yaml")
IDS = ("WDA_A_000", "WDA_B_000", "RD_C_000")  # 10, 9, 8 frames: 3 + 2 training windows of 8, 1 held out


class Built:
    def __init__(self, root: Path) -> None:
        self.info = write_synthetic_hdtf(root / "hdtf", ids=IDS, heldout=("RD_C_000",), n_frames=[10, 9, 8])
        set_seed(0)
        ae, _, _ = build_models(load_config(TINY, (), DEFAULTS))
        self.ae = root / "ae.pth"
        torch.save(ae.state_dict(), self.ae)
        self.args = ["--config", TINY, "--device", "cpu", "--no_progress", "--batch_size", "1"]
        self.args += [f"data.root={self.info.root}", f"data.split_file={self.info.split_file}"]
        self.clean = root / "clean"
        self.build(self.clean)

    def build(self, out: Path, ae: Path | None = None, *extra: str) -> dict:
        ae = str(ae or self.ae)
        return cache_latents.main([*self.args, "--ae_rgb", ae, "--ae_ldmk", ae, "--out", str(out), *extra])

    def copy(self, to: Path) -> Path:
        shutil.copytree(self.clean, to)
        return to


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    torch.set_num_threads(1)  # one thread in every build: bit-identical encodes
    return Built(tmp_path_factory.mktemp("latents"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_json(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def read_all(cache_dir: Path) -> None:
    """What training reads: the manifest, then every window of every cached video."""
    cache = LatentCache(cache_dir)
    for vid in IDS:
        for start in cache.arrays(vid)["starts"]:
            cache.window(vid, int(start))


def one_line_error(cache_dir: Path) -> str:
    with pytest.raises(UserError) as info:
        read_all(cache_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


BAD_JSON = {"list": "[1, 2]", "string": '"hello"', "null": "null", "number": "5"}


@pytest.mark.parametrize("kind", list(BAD_JSON))
def test_json_that_is_not_an_object_is_named_by_training_and_repaired_by_the_build(
    built, tmp_path, capsys, kind
):
    # video.json: training names the video and the fix; the build warns and builds that video again
    out = built.copy(tmp_path / "video")
    meta = out / "videos" / "WDA_B_000" / "video.json"
    meta.write_text(BAD_JSON[kind])
    message = one_line_error(out)
    assert f"cached latents of WDA_B_000 in {meta.parent}" in message and "not a JSON object" in message
    assert message.endswith("rerun scripts/cache_mtov_latents.sh with the same settings to build it again")
    capsys.readouterr()
    result = built.build(out)
    assert result["complete"] and result["built"] == 1
    assert (
        "warning: latent cache video WDA_B_000: its video.json is damaged: it holds"
        in capsys.readouterr().err
    )
    assert tree(out) == tree(built.clean)

    # manifest.json: training names it and the fix; the build writes it again from the built videos
    out = built.copy(tmp_path / "manifest")
    manifest = out / "manifest.json"
    manifest.write_text(BAD_JSON[kind])
    message = one_line_error(out)
    assert message.startswith(f"{manifest} is damaged: it holds ") and "not a JSON object" in message
    assert message.endswith(f"with the same settings and --out {out} to write it again")
    capsys.readouterr()
    result = built.build(out)
    assert result["complete"] and result["built"] == 0
    assert f"warning: {manifest} is damaged: it holds" in capsys.readouterr().err
    assert tree(out) == tree(built.clean)
    read_all(out)

    # build.json (only the build reads it): written again from an intact manifest ...
    out = built.copy(tmp_path / "build")
    (out / "build.json").write_text(BAD_JSON[kind])
    capsys.readouterr()
    result = built.build(out)
    assert result["complete"] and result["built"] == 0
    assert f"warning: {out / 'build.json'} is damaged: it holds" in capsys.readouterr().err
    assert tree(out) == tree(built.clean)
    # ... and refused in one line (nothing removed) when no intact manifest tells the settings
    (out / "build.json").write_text(BAD_JSON[kind])
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(manifest[: len(manifest) // 2])
    before = tree(out)
    with pytest.raises(UserError, match=r"build\.json is damaged: .*no intact manifest\.json .*--overwrite"):
        built.build(out)
    assert tree(out) == before


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"files": []}, "its files are [], not a record of files"),
        ({"files": {}}, "its files are {}, not a record of files"),
        ({"files": {"z.npy": 5}}, "its record of z.npy is 5, not [size, sha256]"),
        ({"files": {"z.npy": [1, 2, 3]}}, "its record of z.npy is [1, 2, 3], not [size, sha256]"),
        ({"windows": "abc"}, 'its windows is "abc", not a count'),
        ({"frames": None}, "its frames is null, not a count"),
        ({"windows": 7}, "its video.json records 9 frames and 7 windows, expected 9 and 2"),
    ],
)
def test_a_video_json_with_wrong_values_is_refused_and_built_again(built, tmp_path, capsys, values, problem):
    out = built.copy(tmp_path / "cache")
    meta = out / "videos" / "WDA_B_000" / "video.json"
    edit_json(meta, **values)
    if "windows" not in values:  # training reads the files' records (the counts are the manifest's)
        message = one_line_error(out)
        assert f"cached latents of WDA_B_000 in {meta.parent}: {meta} is damaged: {problem}" in message
        assert message.endswith(
            "rerun scripts/cache_mtov_latents.sh with the same settings to build it again"
        )
    capsys.readouterr()
    result = built.build(out)
    assert result["complete"] and result["built"] == 1
    err = capsys.readouterr().err
    said = problem if "expected" in problem else f"its video.json is damaged: {problem}"
    assert f"warning: latent cache video WDA_B_000: {said}; building it again" in err
    assert tree(out) == tree(built.clean)


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"stride": "abc"}, 'its stride is "abc", not a count >= 1'),
        ({"stride": 0}, "its stride is 0, not a count >= 1"),
        ({"splits": []}, "its splits are [], not {train, test}"),
        (
            {"splits": {"train": "WDA_A_000", "test": []}},
            'its splits.train is "WDA_A_000", not a list of ids',
        ),
        (
            {"splits": {"train": ["WDA_A_000", "WDA_X_000"], "test": []}},
            'its splits.train lists "WDA_X_000", which is not among its videos',
        ),
        ({"videos": {"WDA_A_000": 3}}, "its record of video WDA_A_000 is 3, not {frames, windows}"),
        ({"dtype": "fp8"}, 'its dtype is "fp8", not one of fp32, fp16, bf16'),
        ({"data": []}, "its data.timesteps is not a count >= 1"),
        ({"shapes": {"z": [4]}}, "its shapes.z is [4], not [channels, length]"),
    ],
)
def test_a_manifest_with_wrong_values_is_named_by_training_and_written_again(
    built, tmp_path, capsys, values, problem
):
    out = built.copy(tmp_path / "cache")
    manifest = out / "manifest.json"
    edit_json(manifest, **values)
    message = one_line_error(out)
    assert message == (
        f"{manifest} is damaged: {problem}; rerun scripts/cache_mtov_latents.sh (python -m "
        f"MToV.cache_latents) with the same settings and --out {out} to write it again"
    )
    capsys.readouterr()
    result = built.build(out)
    assert result["complete"] and result["built"] == 0
    assert f"warning: {manifest} is damaged: {problem}; writing it again" in capsys.readouterr().err
    assert tree(out) == tree(built.clean)


def test_a_manifest_that_disagrees_with_the_arrays_is_refused_and_written_again(built, tmp_path, capsys):
    out = built.copy(tmp_path / "cache")
    manifest = out / "manifest.json"
    edit_json(manifest, dtype="bf16")  # the arrays are float32: read as bf16 they had twice the length
    message = one_line_error(out)
    assert "cached latents of WDA_A_000" in message
    assert "z.npy holds float32 [3, 4, 80], the manifest says uint16 (bf16) [3, 4, 80]" in message
    assert message.endswith("to build it again")
    edit_json(manifest, dtype="fp32", stride=2)  # a valid manifest, but not what was built
    capsys.readouterr()
    assert built.build(out)["complete"]
    assert f"warning: {manifest} does not match the built videos (stride differ); writing it again" in (
        capsys.readouterr().err
    )
    assert tree(out) == tree(built.clean)


@pytest.mark.parametrize("damage", ["truncated", "empty", "folder"])
def test_a_damaged_manifest_names_the_fix_and_the_build_repairs_it(built, tmp_path, capsys, damage):
    out = built.copy(tmp_path / "cache")
    manifest = out / "manifest.json"
    text = manifest.read_text()
    if damage == "folder":
        manifest.unlink()
        (manifest / "inside").mkdir(parents=True)
        with pytest.raises(UserError, match=r"is incomplete .*rerun scripts/cache_mtov_latents\.sh"):
            read_all(out)
    else:
        manifest.write_text(text[: len(text) // 2] if damage == "truncated" else "")
        message = one_line_error(out)
        assert message.startswith(f"{manifest} cannot be read (")
        assert message.endswith(f"--out {out} to write it again")
    capsys.readouterr()
    result = built.build(out)  # the manifest was only checked to exist: "complete", still broken
    assert result["complete"] and result["built"] == 0
    if damage != "folder":
        assert f"warning: {manifest} cannot be read (" in capsys.readouterr().err
    assert tree(out) == tree(built.clean)
    read_all(out)


def test_nan_weights_are_refused_at_build_time_and_nan_latents_fail_the_spread_check(built, tmp_path, capsys):
    state = torch.load(built.ae, weights_only=True)
    state["pre_xy.bias"] = torch.full_like(state["pre_xy.bias"], float("nan"))
    nan_ae = tmp_path / "nan.pth"
    torch.save(state, nan_ae)
    out = tmp_path / "nan"
    with pytest.raises(UserError) as info:
        built.build(out, nan_ae)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the RGB autoencoder ({nan_ae}) and the landmark autoencoder ({nan_ae}) made")
    assert (
        "latents with NaN or Inf (z, z_l, masked_z, ref) for video WDA_A_000, windows from frame 0" in message
    )
    assert not (out / "manifest.json").exists() and not list((out / "videos").iterdir())  # nothing written

    # latents of an older build with NaN: the spread (NaN) fails the check, with a warning
    cache = built.copy(tmp_path / "old")
    for vid in ("WDA_A_000", "WDA_B_000"):
        z = np.load(cache / "videos" / vid / "z.npy")
        z[:, 0, 0] = np.nan
        np.save(cache / "videos" / vid / "z.npy", z)
    spread = latent_spread([cache / "videos" / v for v in ("WDA_A_000", "WDA_B_000")], "fp32")
    assert spread["windows"] == 5 and np.isnan(spread["spread_median"])
    (cache / "manifest.json").unlink()
    settings = json.loads((built.clean / "manifest.json").read_text())  # what the build recorded
    shapes = {k: tuple(s) for k, s in settings.pop("shapes").items()}
    for key in ("bytes_per_window", "windows", "splits", "unreadable", "videos", "latent_spread"):
        settings.pop(key)
    videos = [{"id": vid} for vid in IDS]
    splits = {"train": ["WDA_A_000", "WDA_B_000"], "test": ["RD_C_000"]}
    capsys.readouterr()
    assert cache_manifest.write_manifest(cache, settings, videos, splits, shapes, 0.0)
    err = capsys.readouterr().err
    assert "warning: the RGB autoencoder's cached latents are not finite (NaN or Inf)" in err
    assert "landmark autoencoder" not in err


def test_nan_keypoints_are_an_unreadable_video_not_a_crash(built, tmp_path, capsys):
    info = write_synthetic_hdtf(tmp_path / "hdtf", ids=("WDA_A_000", "WDA_B_000"), heldout=(), n_frames=8)
    kp_file = info.keypoints_dir / "WDA_B_000" / "00003.npy"
    kp = np.load(kp_file)
    kp[33, 1] = np.nan
    np.save(kp_file, kp)
    ds = HDTFClipDataset(info.root, split="all", timesteps=8, resolution=32)
    assert ds.clip(0, 0)["x_l"].shape == (3, 8, 32, 32)
    with pytest.raises(UserError, match=rf"keypoints {kp_file} hold NaN or Inf values"):
        ds.clip(1, 0)
    kp[33, 1] = np.inf
    np.save(kp_file, kp)
    with pytest.raises(UserError, match="hold NaN or Inf values"):
        ds.clip(1, 0)
    # the image operations refuse them in one line too (they used to raise cv2.error)
    with pytest.raises(UserError, match="NaN or Inf"):
        draw_dots(np.array([[[1.0, np.nan]]]), 8)
    with pytest.raises(UserError, match="NaN or Inf"):
        mask_below_nose(np.zeros((1, 8, 8, 3), np.uint8), np.full((1, 68, 2), np.nan))

    args = ["--config", TINY, "--device", "cpu", "--no_progress", "random_autoencoders=true"]
    args += [f"data.root={info.root}", "--out", str(tmp_path / "cache"), "data.max_bad_items=1"]
    capsys.readouterr()
    result = cache_latents.main(args)
    assert result["complete"] and result["built"] == 1
    assert (
        f"warning: skipped unreadable video WDA_B_000: keypoints {kp_file} hold NaN"
        in capsys.readouterr().err
    )
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert list(manifest["videos"]) == ["WDA_A_000"] and list(manifest["unreadable"]) == ["WDA_B_000"]
