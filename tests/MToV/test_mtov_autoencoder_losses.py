"""MToV autoencoder losses and discriminators: LPIPS from a local VGG16 file, hinge, feature matching."""

from __future__ import annotations

import pytest
import torch
import torchvision

from moditalker.errors import UserError
from MToV.losses import (
    AELossWeights,
    AutoencoderLoss,
    build_lpips,
    feature_matching_loss,
    hinge_d_loss,
    pick_frames,
)
from MToV.models.discriminator import PatchDiscriminator2D, PatchDiscriminator3D


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def test_lpips_reads_a_local_torchvision_vgg16(tmp_path):
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    model = build_lpips(path)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    torch.testing.assert_close(getattr(model.net.slice3, "10").weight, features[10].weight, rtol=0, atol=0)
    torch.testing.assert_close(getattr(model.net.slice5, "28").bias, features[28].bias, rtol=0, atol=0)
    # LPIPS by hand with the same layers: sum over stages of lin(normalised feature diff^2), averaged
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b = (x - shift) / scale, (y - shift) / scale
    total = 0
    for stage, lin in zip([model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                           model.net.slice5], model.lins):  # fmt: skip
        a, b = stage(a), stage(b)
        na = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + lin((na - nb) ** 2).mean(dim=(2, 3), keepdim=True)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, y), total, rtol=1e-4, atol=1e-6)
        assert model(x, x).abs().max() < 1e-6


def test_lpips_missing_or_bad_file(tmp_path):
    with pytest.raises(UserError, match=r"python -m moditalker.assets check"):
        build_lpips(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not a torchvision VGG16"):
        build_lpips(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        build_lpips(junk)


def test_hinge_and_feature_matching_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6 ; relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    f_fake = [torch.ones(2, 3), torch.zeros(4), torch.full((1,), 9.0)]
    f_real = [torch.zeros(2, 3), torch.ones(4), torch.zeros(1)]
    # two intermediate blocks (the logits are left out), each weighted 4 / 2
    assert feature_matching_loss(f_fake, f_real).item() == pytest.approx(2.0 * 1 + 2.0 * 1)


def test_pick_frames():
    video = torch.arange(2 * 1 * 4).float().view(2, 1, 4, 1, 1)
    out = pick_frames(video, torch.tensor([3, 1]))
    assert out.flatten().tolist() == [3.0, 5.0]


def test_discriminator_shapes_and_generator_objective():
    torch.manual_seed(0)
    d2, d3 = PatchDiscriminator2D(3, 8, 2), PatchDiscriminator3D(3, 8, 2)
    logits, feats = d2(torch.rand(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and len(feats) == 4 and feats[-1] is logits
    logits3, feats3 = d3(torch.rand(2, 3, 8, 32, 32))
    assert logits3.dim() == 5 and logits3.shape[:2] == (2, 1) and len(feats3) == 4
    target = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    recon = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    idx = torch.tensor([0, 5])
    crit = AutoencoderLoss(None, AELossWeights(l1=4.0, perceptual=0.0))
    loss, logs = crit.generator(target, recon, idx)
    assert loss.item() == pytest.approx(4.0 * (target - recon).abs().mean().item(), rel=1e-6)
    loss_gan, logs_gan = crit.generator(target, recon, idx, d2, d3)
    assert {"g_adv", "feat_match"} <= set(logs_gan)
    expected = loss + logs_gan["g_adv"] + 4.0 * logs_gan["feat_match"]
    assert loss_gan.item() == pytest.approx(expected.item(), rel=1e-5)
    loss_gan.backward()
    assert recon.grad is not None and torch.isfinite(recon.grad).all()
    d_loss, d_logs = AutoencoderLoss.discriminator(target, recon, idx, d2, d3)
    assert torch.isfinite(d_loss) and d_loss.item() == pytest.approx(float(d_logs["d_2d"] + d_logs["d_3d"]))
    with pytest.raises(ValueError, match="LPIPS"):
        AutoencoderLoss(None)


def test_foreground_weight_makes_missed_dots_cost_more():
    # a black image with a few lit pixels (landmark dots), as the landmark autoencoder sees
    target = -torch.ones(1, 3, 2, 8, 8)
    target[:, :, :, 2, 3] = 1.0
    target[:, :, :, 5, 5] = 1.0
    all_black = -torch.ones_like(target)
    idx = torch.zeros(1, dtype=torch.long)
    plain = AutoencoderLoss(None, AELossWeights(l1=1.0, perceptual=0.0))
    loss, logs = plain.generator(target, all_black, idx)
    assert loss.item() == pytest.approx(2.0 * 2 / 64)  # plain L1: 2 of 64 pixels off by 2
    weighted = AutoencoderLoss(None, AELossWeights(l1=1.0, perceptual=0.0, foreground=10.0))
    loss_w, _ = weighted.generator(target, all_black, idx)
    # weighted mean: the 2 lit pixels weigh 10, the 62 dark ones 1
    assert loss_w.item() == pytest.approx(2.0 * 2 * 10 / (2 * 10 + 62))
    # lighting a dark pixel by mistake costs the same in both (weight 1), relative to the weights' mean
    spurious = target.clone()
    spurious[:, :, :, 0, 0] = 1.0
    assert weighted.generator(target, spurious, idx)[0].item() == pytest.approx(2.0 / (2 * 10 + 62))
    assert logs["l1"].item() == pytest.approx(loss.item())
