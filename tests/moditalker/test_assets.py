"""moditalker.assets: the registry, the presence check and its CLI, checkpoints/README.md in sync."""

from __future__ import annotations

import pytest
from http_stub import official_like, tiny_hubert, zero_state

from moditalker import assets
from moditalker.assets import (
    ASSETS,
    asset_present,
    check_assets,
    default_path,
    main,
    markdown_table,
    require_asset,
)
from moditalker.errors import UserError, cli_main

EXPECTED_DEFAULTS = {
    "atom": "atom.pt",
    "autoencoder_rgb": "autoencoder_rgb.pth",
    "autoencoder_motion": "autoencoder_motion.pth",
    "diffusion_model": "diffusion_model.pth",
    "bfm_front": "BFM/BFM_model_front.mat",
    "bfm_similarity": "BFM/similarity_Lm3D_all.mat",
    "deep3d": "deep3d/epoch_20.pth",
    "hubert": "hubert-large-ls960-ft",
    "face_alignment": "face_alignment",
    "lpips_vgg16": "lpips/vgg16.pth",
    "lpips_alexnet": "lpips/alexnet.pth",
    "fid_inception": "fid/pt_inception-2015-12-05-6726825d.pth",
    "i3d_400": "fvd/i3d_pretrained_400.pt",
    "syncnet": "syncnet/syncnet_v2.model",
    "arcface": "arcface/backbone.pth",
}


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _save(path, layout=None):
    """A torch archive at ``path``: the official ``layout``'s keys and shapes (zero-stride views, a few KB)
    as an AToM checkpoint, or one small tensor; what `assets check` accepts, which a touched file is not."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if layout is None:
        torch.save({"w": torch.zeros(1)}, path)
    elif layout == "deep3d":  # the ResNet-50 regressor's keys and shapes, as {"net_recon": state_dict}
        from data.recon3d import ReconNet

        with torch.device("meta"):
            shapes = {k: v.shape for k, v in ReconNet().state_dict().items()}
        torch.save({"net_recon": zero_state(shapes)}, path)
    else:
        torch.save({"model_state_dict": official_like(layout)}, path)


def test_registry_defaults_match_the_agreed_table(ckpt):
    assert set(ASSETS) == set(EXPECTED_DEFAULTS)
    for name, rel in EXPECTED_DEFAULTS.items():
        assert default_path(name) == ckpt / rel
        a = ASSETS[name]
        assert a.source and a.licence and a.what and a.used_by


def test_check_reports_missing_and_present(ckpt):
    missing = check_assets()
    assert len(missing) == len(ASSETS)
    assert all("python -m moditalker.assets check" in line for line in missing)
    _touch(ckpt / "atom.pt")
    _touch(ckpt / "BFM" / "BFM_model_front.mat")
    assert check_assets(["atom", "bfm_front"]) == []
    assert len(check_assets()) == len(ASSETS) - 2
    # a folder asset needs its files: config + one of the weight files + preprocessor config
    hub = ckpt / "hubert-large-ls960-ft"
    _touch(hub / "config.json")
    (line,) = check_assets(["hubert"])
    assert "model.safetensors or pytorch_model.bin" in line and "preprocessor_config.json" in line
    _touch(hub / "pytorch_model.bin")
    _touch(hub / "preprocessor_config.json")
    assert check_assets(["hubert"]) == []


def test_overrides_and_require(ckpt, tmp_path):
    other = tmp_path / "elsewhere" / "my_atom.pt"
    assert not asset_present("atom")
    with pytest.raises(UserError, match="atom.pt.*moditalker.assets check"):
        require_asset("atom")
    _save(other, "atom")
    assert check_assets(["atom"], overrides={"atom": other}) == []
    assert require_asset("atom", other) == other
    assert main(["check", "--only", "atom", "--set", f"atom={other}"]) == 0
    with pytest.raises(UserError, match="unknown asset"):
        check_assets(["nope"])


def test_face_alignment_torch_hub_fallback(ckpt, tmp_path):
    assert not asset_present("face_alignment")
    hub = tmp_path / "hub" / "checkpoints"
    _touch(hub / "2DFAN4-11f355bf06.pth.tar")
    assert not asset_present("face_alignment")  # detector weights still missing
    _touch(hub / "s3fd-619a316812.pth")
    assert asset_present("face_alignment")


def test_cli_exit_codes(ckpt, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(main, ["check", "--only", "atom", "deep3d"])
    assert exc.value.code == 2
    out = capsys.readouterr().out
    assert "MISSING atom" in out and "MISSING deep3d" in out and "bfm_front" not in out
    _touch(ckpt / "atom.pt")
    _touch(ckpt / "deep3d" / "epoch_20.pth")
    with pytest.raises(SystemExit) as exc:  # present, but not checkpoints: BAD
        cli_main(main, ["check", "--only", "atom", "deep3d"])
    assert exc.value.code == 2
    out = capsys.readouterr().out
    assert "BAD     atom" in out and "BAD     deep3d" in out and "not a torch checkpoint" in out
    _save(ckpt / "atom.pt", "atom")
    _save(ckpt / "deep3d" / "epoch_20.pth", "deep3d")
    assert main(["check", "--only", "atom", "deep3d"]) == 0
    assert "all requested assets present" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(main, ["check", "--only", "bogus"])
    assert exc.value.code == 2
    assert "unknown asset" in capsys.readouterr().err
    # --required skips the optional LPIPS backbone
    with pytest.raises(SystemExit):
        main(["check", "--required"])
    assert "lpips_vgg16" not in capsys.readouterr().out


def test_checkpoints_readme_has_the_current_table():
    readme = assets.REPO_ROOT / "checkpoints" / "README.md"
    text = readme.read_text()
    assert markdown_table() in text, "regenerate the table with `python -m moditalker.assets table`"


def test_download_names_reachable_from_assets():
    """The download code's names are reachable as moditalker.assets.<name>; other names are not."""
    from moditalker import asset_download

    assert assets.download_asset is asset_download.download_asset
    assert assets.DOWNLOAD_URLS is asset_download.DOWNLOAD_URLS and "syncnet" in assets.DOWNLOAD_URLS
    for name in ("not_a_name", "shutil", "describe"):  # the download module's imports are not forwarded
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(assets, name)
    assert all(hasattr(asset_download, n) for n in asset_download.__all__)


def test_download_writes_where_check_looks(ckpt, monkeypatch):
    """The download command (network replaced by a stub) fills the default locations."""
    import torch.hub

    fetched = []

    def fake_download(url, dst, progress=True):
        fetched.append(url)
        torch.save({"w": torch.zeros(1)}, dst)  # a torch archive: the download is checked before renaming

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert main(["download", "face_alignment", "lpips_vgg16"]) == 0
    assert check_assets(["face_alignment", "lpips_vgg16"]) == []
    assert len(fetched) == 3 and all(u.startswith("https://") for u in fetched)
    assert main(["download", "face_alignment"]) == 0 and len(fetched) == 3  # present: nothing fetched
    with pytest.raises(UserError, match="Basel Face Model licence"):
        assets.download_asset("bfm_front")
    with pytest.raises(UserError, match="cannot be downloaded automatically"):
        assets.download_asset("deep3d")


def test_download_hubert_saves_a_loadable_folder(ckpt, monkeypatch):
    import transformers
    from transformers import Wav2Vec2FeatureExtractor

    tiny = tiny_hubert()
    monkeypatch.setattr(transformers.HubertModel, "from_pretrained", classmethod(lambda cls, *a, **k: tiny))
    monkeypatch.setattr(
        transformers.AutoFeatureExtractor,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: Wav2Vec2FeatureExtractor()),
    )
    path = assets.download_asset("hubert")
    assert path == ckpt / "hubert-large-ls960-ft" and asset_present("hubert")
    monkeypatch.undo()
    from data.audio import HubertExtractor

    assert HubertExtractor(path).hidden_size == 16
