"""`assets check` looks at what files hold; `assets download moditalker` fetches through gdown from a local
stand-in for Google Drive (tests/http_stub.py), checks, then renames; a bad download leaves nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from http_stub import StubServer, official_like, save_tiny_hubert, torch_bytes, zero_state

from moditalker import asset_content, assets
from moditalker.assets import GDRIVE_IDS, main
from moditalker.errors import UserError, cli_main

MANIFESTS = assets.REPO_ROOT / "tests" / "reference" / "manifests"


def atom_bytes(pad: int = 0) -> bytes:
    sd = official_like("atom")
    return torch_bytes(
        {"model_state_dict": sd, "ema_state_dict": sd, "optimizer_state_dict": {"pad": torch.ones(pad)}}
    )


def ae_bytes() -> bytes:
    return torch_bytes(official_like("autoencoder"))


HTML = (
    b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body></body></html>"
)


def run_check(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli_main(main, ["check", *args])
        raise SystemExit(0)
    out = capsys.readouterr().out
    return exc.value.code, [line for line in out.splitlines() if line.startswith("  - ")]


def test_shipped_layouts_equal_the_reference_manifests():
    layouts = asset_content.official_layouts()
    for name, manifest in (("atom", "atom"), ("autoencoder", "mtov_ae_rgb"), ("unet", "mtov_unet")):
        sd = json.loads((MANIFESTS / f"{manifest}.json").read_text())["state_dict"]
        assert layouts[name] == {k: tuple(v["shape"]) for k, v in sd.items()}
    ldmk = json.loads((MANIFESTS / "mtov_ae_ldmk.json").read_text())["state_dict"]
    assert layouts["autoencoder"] == {k: tuple(v["shape"]) for k, v in ldmk.items()}


def test_check_names_web_pages_truncated_and_foreign_checkpoints(ckpt, capsys):
    good = atom_bytes()
    (ckpt / "atom.pt").write_bytes(good)
    (ckpt / "autoencoder_rgb.pth").write_bytes(ae_bytes())
    assert run_check(capsys, "--only", "atom", "autoencoder_rgb") == (0, [])
    assert run_check(capsys, "--only", "atom", "autoencoder_rgb", "--deep") == (0, [])

    (ckpt / "atom.pt").write_bytes(HTML)  # the page Drive serves instead of a large file
    code, lines = run_check(capsys, "--only", "atom", "autoencoder_rgb")
    assert code == 2 and len(lines) == 1 and "atom" in lines[0] and "web page" in lines[0]

    (ckpt / "atom.pt").write_bytes(good[: len(good) // 2])
    code, lines = run_check(capsys, "--only", "atom")
    assert code == 2 and len(lines) == 1 and "truncated" in lines[0]

    (ckpt / "atom.pt").write_bytes(b"")
    code, lines = run_check(capsys, "--only", "atom")
    assert code == 2 and "empty file" in lines[0]

    # a readable archive with another layout: the tiny autoencoder fixture, and an AE saved as atom.pt
    tiny = assets.REPO_ROOT / "tests" / "reference" / "fixtures" / "mtov_ae_rgb_tiny_seed0.pt"
    obj = torch.load(tiny, weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, ckpt / "autoencoder_rgb.pth")
    (ckpt / "atom.pt").write_bytes(ae_bytes())
    code, lines = run_check(capsys, "--only", "atom", "autoencoder_rgb")
    assert code == 2 and len(lines) == 2
    assert "not an AToM checkpoint" in lines[0] and "official autoencoder_rgb layout" in lines[1]


def test_deep_check_finds_a_file_damaged_in_the_middle(ckpt, capsys):
    data = bytearray(atom_bytes(pad=20000))
    mid = data.find(b"\x00\x00\x80\x3f" * 4)  # inside the ones of the padding tensor
    assert mid > 0
    data[mid + 2] ^= 0xFF
    (ckpt / "atom.pt").write_bytes(bytes(data))
    assert run_check(capsys, "--only", "atom") == (0, [])  # the cheap check reads no tensor data
    code, lines = run_check(capsys, "--only", "atom", "--deep")
    assert code == 2 and len(lines) == 1 and "CRC" in lines[0]


def test_check_mat_files(ckpt, capsys):
    import numpy as np
    import scipy.io as sio

    from data.face3d import write_synthetic_bfm

    write_synthetic_bfm(ckpt / "BFM")
    assert run_check(capsys, "--only", "bfm_front", "bfm_similarity", "--deep") == (0, [])
    sio.savemat(str(ckpt / "BFM" / "BFM_model_front.mat"), {"meanshape": np.zeros((1, 9))})
    sio.savemat(str(ckpt / "BFM" / "similarity_Lm3D_all.mat"), {"lm": np.zeros((5, 3))})
    code, lines = run_check(capsys, "--only", "bfm_front", "bfm_similarity")
    assert code == 2 and len(lines) == 2
    assert "lacks the variables ['idBase', 'exBase', 'keypoints']" in lines[0] and "(68, 3)" in lines[1]
    (ckpt / "BFM" / "BFM_model_front.mat").write_bytes(HTML)
    code, lines = run_check(capsys, "--only", "bfm_front")
    assert code == 2 and "web page" in lines[0]


def test_check_hubert_folder(ckpt, capsys):
    folder = ckpt / "hubert-large-ls960-ft"
    save_tiny_hubert(folder)
    assert run_check(capsys, "--only", "hubert", "--deep") == (0, [])
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    code, lines = run_check(capsys, "--only", "hubert")
    assert code == 2 and len(lines) == 1 and "truncated safetensors" in lines[0]


# ----------------------------------------------------------------------------- downloads (gdown)


@pytest.fixture
def drive(monkeypatch):
    with StubServer() as server:
        monkeypatch.setenv(assets.GDRIVE_URL_ENV, server.url + "/uc/{id}")
        yield server


def _drive_path(name):
    return f"/uc/{GDRIVE_IDS[name]}"


def test_download_moditalker_good_files(ckpt, drive, capsys):
    for name in ("atom", "autoencoder_rgb", "autoencoder_motion"):
        drive.files[_drive_path(name)] = atom_bytes() if name == "atom" else ae_bytes()
    assert main(["download", "moditalker", "--retries", "0"]) == 0
    for rel in ("atom.pt", "autoencoder_rgb.pth", "autoencoder_motion.pth"):
        assert (ckpt / rel).is_file()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "atom.pt",
        "autoencoder_motion.pth",
        "autoencoder_rgb.pth",
    ]
    assert run_check(capsys, "--only", "atom", "autoencoder_rgb", "autoencoder_motion", "--deep") == (0, [])
    n = len(drive.requests)
    assert main(["download", "atom"]) == 0 and len(drive.requests) == n  # present and sound: nothing fetched


@pytest.mark.parametrize("case", ["web_page", "truncated", "dead"])
def test_a_bad_download_leaves_nothing(tmp_path, monkeypatch, drive, case):
    root = tmp_path / "new" / "checkpoints"  # not there yet: a failure must not leave empty folders
    monkeypatch.setenv("MODITALKER_CHECKPOINTS", str(root))
    if case == "web_page":
        drive.files[_drive_path("atom")] = HTML
        drive.content_types[_drive_path("atom")] = "text/html"
    elif case == "truncated":
        drive.files[_drive_path("atom")] = atom_bytes()[:3000]
    with pytest.raises(UserError) as exc:
        main(["download", "atom", "--retries", "0"])
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"place it at {root / 'atom.pt'}" in msg and "in a browser" in msg
    assert f"https://drive.google.com/file/d/{GDRIVE_IDS['atom']}/view" in msg
    assert {"web_page": "web page", "truncated": "truncated", "dead": "404"}[case] in msg
    assert not (root / "atom.pt").exists()
    if case == "dead":
        assert not (tmp_path / "new").exists()
    else:
        assert list(root.iterdir()) == []  # the download was checked, found wrong and deleted


def test_an_interrupted_download_resumes(ckpt, drive):
    data = atom_bytes(pad=1_000_000)  # 4 MB: gdown writes whole chunks before the cut
    drive.files[_drive_path("atom")] = data
    drive.cut_once.add(_drive_path("atom"))
    with pytest.raises(UserError, match="bytes received are kept in .*run the same command again to resume"):
        main(["download", "atom", "--retries", "0"])
    assert not (ckpt / "atom.pt").exists()
    (partial,) = ckpt.glob(".atom.pt.download*.part")
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    assert main(["download", "atom", "--retries", "0"]) == 0
    assert (ckpt / "atom.pt").read_bytes() == data
    assert (_drive_path("atom"), f"bytes={kept}-") in drive.requests  # only the rest was fetched
    assert [p.name for p in ckpt.iterdir()] == ["atom.pt"]


def test_an_existing_bad_file_is_kept_and_named(ckpt, drive):
    (ckpt / "atom.pt").write_bytes(HTML)
    with pytest.raises(UserError, match="web page.*nothing is overwritten"):
        main(["download", "atom"])
    assert (ckpt / "atom.pt").read_bytes() == HTML and drive.requests == []


def test_bfm_needs_the_licence_flag_and_a_link(ckpt, drive):
    with pytest.raises(UserError, match="Basel Face Model licence.*register at https://faces"):
        main(["download", "bfm_front"])
    from data.face3d import write_synthetic_bfm

    write_synthetic_bfm(ckpt.parent / "src")
    drive.files["/bfm.mat"] = (ckpt.parent / "src" / "BFM_model_front.mat").read_bytes()
    with pytest.raises(UserError, match="registration required"):
        main(["download", "bfm_front", "--url", drive.url + "/bfm.mat"])
    assert drive.requests == []
    assert main(["download", "bfm_front", "--accept-bfm-licence", "--url", drive.url + "/bfm.mat"]) == 0
    assert (ckpt / "BFM" / "BFM_model_front.mat").is_file()


def test_offline_public_download_leaves_no_empty_folder(ckpt, monkeypatch):
    import torch.hub

    def offline(url, dst, progress=True):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="cannot download"):
        main(["download", "lpips_vgg16"])
    with pytest.raises(UserError, match="cannot download"):
        main(["download", "face_alignment"])
    assert list(ckpt.iterdir()) == []
    assert os.listdir(ckpt) == []


def test_public_files_from_a_mirror(ckpt, monkeypatch, capsys):
    with StubServer() as server:
        data = torch_bytes({"features.0.weight": torch.zeros(2, 3)})
        server.files["/download.pytorch.org/models/vgg16-397923af.pth"] = data
        monkeypatch.setenv(assets.MIRROR_ENV, server.url + "/")
        assert main(["download", "lpips_vgg16"]) == 0
    assert (ckpt / "lpips" / "vgg16.pth").read_bytes() == data
    assert run_check(capsys, "--only", "lpips_vgg16", "--deep") == (0, [])


def test_check_deep3d_fits_the_regressor(ckpt, capsys):
    from data.recon3d import ReconNet

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ReconNet().state_dict().items()}
    state = zero_state({k: s for k, s in shapes.items() if "num_batches" not in k})
    path = ckpt / "deep3d" / "epoch_20.pth"
    path.parent.mkdir()
    torch.save({"net_recon": state, "epoch": 20}, path)  # old checkpoints lack the step counters: fine
    assert run_check(capsys, "--only", "deep3d", "--deep") == (0, [])
    state.pop("backbone.conv1.weight")
    torch.save({"net_recon": state}, path)
    code, lines = run_check(capsys, "--only", "deep3d")
    assert code == 2 and "does not fit the Deep3DFaceRecon ResNet-50" in lines[0] and "conv1" in lines[0]


def test_shipped_deep3d_layout_equals_the_regressor():
    import torch

    from data.recon3d import ReconNet

    with torch.device("meta"):
        own = ReconNet().state_dict()
    want = {k: tuple(v.shape) for k, v in own.items() if not k.endswith("num_batches_tracked")}
    assert asset_content.deep3d_layout() == want


def test_a_public_download_that_is_a_web_page_leaves_nothing(ckpt, monkeypatch):
    target = ckpt / "lpips" / "vgg16.pth"
    with StubServer() as server:
        server.files["/download.pytorch.org/models/vgg16-397923af.pth"] = b"<!DOCTYPE html><html>error</html>"
        monkeypatch.setenv(assets.MIRROR_ENV, server.url + "/")
        with pytest.raises(UserError, match="a web page"):
            main(["download", "lpips_vgg16"])
        assert not target.exists() and os.listdir(ckpt) == []
        # a bad file already at the path is named, not skipped as done, and left for the user
        target.parent.mkdir()
        target.write_bytes(b"<html>saved by a browser</html>")
        with pytest.raises(UserError, match="a web page"):
            main(["download", "lpips_vgg16"])
        assert target.read_bytes() == b"<html>saved by a browser</html>"
