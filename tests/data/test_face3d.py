"""Face3DHelper against the official helper's numbers (fixtures/face3d_seed0.pt) and the synthetic BFM."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io as sio
import torch
from conftest import FIXTURES, load_fixture

from data.face3d import Face3DHelper, canonical_face_lm68, write_synthetic_bfm
from moditalker.errors import UserError

ATOL = 1e-5


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture("face3d_seed0.pt")


@pytest.fixture(scope="module")
def helper(fx) -> Face3DHelper:
    return Face3DHelper(FIXTURES / fx["bfm"]["file"])


def _close(a, b, atol=ATOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.double(), b.double(), atol=atol, rtol=0), (a.double() - b.double()).abs().max()


def test_bases_match_official(fx, helper):
    ref = fx["atom_helper"]
    assert helper.n_vertices == fx["bfm"]["n_vertices"]
    assert helper.key_points.dtype == torch.int64
    assert torch.equal(helper.key_points, ref["key_points"])  # the off-by-one quirk, kept
    assert torch.equal(helper.kp_inds, fx["data_helper"]["kp_inds"])
    _close(helper.meanshape, fx["data_helper"]["meanshape_attr"], 0)
    for name in ("key_mean_shape", "key_id_base", "key_exp_base"):
        _close(getattr(helper, name), ref[name], 0)


def test_reconstructions_match_official(fx, helper):
    ref, inp = fx["atom_helper"], fx["inputs"]
    ids, exps = inp["id_coeff"], inp["exp_coeff"]
    for name, part in helper.split_coeff(inp["coeff"]).items():
        _close(part, ref["split_coeff"][name], 0)
    _close(helper.reconstruct_idexp_lm3d(ids, exps), ref["reconstruct_idexp_lm3d"])
    _close(helper.reconstruct_lm3d(ids, exps), ref["reconstruct_lm3d"])
    _close(helper.reconstruct_face_mesh(ids, exps), ref["reconstruct_face_mesh"])
    _close(helper.get_lm3d_from_coeff_seq(inp["coeff"]), ref["get_lm3d_from_coeff_seq"])
    _close(helper.get_lm3d_from_identity_exp(inp["identity"], inp["exp"]), ref["get_lm3d_from_identity_exp"])
    # numpy input works the same
    _close(helper.reconstruct_idexp_lm3d(ids.numpy(), exps.numpy()), ref["reconstruct_idexp_lm3d"])


def test_eye_mouth_helpers_match_official(fx, helper):
    ref = fx["atom_helper"]
    idexp = ref["reconstruct_idexp_lm3d"].clone()
    _close(helper.close_mouth_for_idexp_lm3d(idexp, True), ref["close_mouth_for_idexp_lm3d_freeze"])
    _close(helper.close_mouth_for_idexp_lm3d(idexp, False), ref["close_mouth_for_idexp_lm3d_nofreeze"])
    _close(helper.close_eyes_for_idexp_lm3d(idexp), ref["close_eyes_for_idexp_lm3d"])
    assert torch.equal(idexp, ref["reconstruct_idexp_lm3d"])  # inputs are not modified
    eye, mouth = helper.get_eye_mouth_lm_from_lm3d(idexp)
    _close(eye, ref["get_eye_mouth_lm_from_lm3d"]["eye"], 0)
    _close(mouth, ref["get_eye_mouth_lm_from_lm3d"]["mouth"], 0)


def test_idexp_lm3d_round_trip(fx, helper):
    idexp = fx["atom_helper"]["reconstruct_idexp_lm3d"]
    lm3d = helper.idexp_to_lm3d(idexp)
    _close(lm3d, idexp / 10 + fx["atom_helper"]["key_mean_shape"], 1e-6)
    _close(helper.lm3d_to_idexp(lm3d), idexp, 1e-5)


def test_folder_and_errors(tmp_path, fx):
    folder = tmp_path / "BFM"
    folder.mkdir()
    (folder / "BFM_model_front.mat").write_bytes((FIXTURES / fx["bfm"]["file"]).read_bytes())
    assert Face3DHelper(folder).key_points.shape == (68,)
    with pytest.raises(UserError, match="moditalker.assets check"):
        Face3DHelper(tmp_path / "nowhere")
    sio.savemat(str(tmp_path / "bad.mat"), {"meanshape": np.zeros((1, 30), np.float32)})
    with pytest.raises(UserError, match="lacks keys"):
        Face3DHelper(tmp_path / "bad.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(UserError, match="cannot read"):
        Face3DHelper(tmp_path / "junk.mat")
    with pytest.raises(UserError, match="257"):
        Face3DHelper.split_coeff(torch.zeros(2, 256))


def test_synthetic_bfm_is_face_like(tmp_path):
    folder = write_synthetic_bfm(tmp_path / "syn", seed=3)
    helper = Face3DHelper(folder)
    face = canonical_face_lm68()
    _close(helper.key_mean_shape, face, 1e-6)  # exactly where the quirk reads
    lm = helper.idexp_to_lm3d(
        helper.reconstruct_idexp_lm3d(
            torch.randn(4, 80, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 64)
        )
    )
    assert (lm - torch.as_tensor(face, dtype=torch.float32)).abs().max() < 0.1  # small random bases
    assert lm[..., :2].abs().max() < 1.05
    # y up: brows above eyes above nose tip above mouth above chin; left/right symmetric
    y = torch.as_tensor(face[:, 1])
    assert y[17:27].min() > y[36:48].max() > y[30] > y[48:68].max() > y[8]
    assert np.allclose(face[[36, 45], 0], [-face[45, 0], face[45, 0]], atol=1e-9)
    template = sio.loadmat(str(folder / "similarity_Lm3D_all.mat"))["lm"]
    assert template.shape == (68, 3)
    # deterministic per seed, different across seeds
    again = sio.loadmat(str(write_synthetic_bfm(tmp_path / "again", seed=3) / "BFM_model_front.mat"))
    other = sio.loadmat(str(write_synthetic_bfm(tmp_path / "other", seed=4) / "BFM_model_front.mat"))
    first = sio.loadmat(str(folder / "BFM_model_front.mat"))
    assert np.array_equal(first["idBase"], again["idBase"])
    assert not np.array_equal(first["idBase"], other["idBase"])
