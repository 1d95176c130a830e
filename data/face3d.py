"""BFM 3D morphable model helpers: the 68 keypoint bases and the ``idexp_lm3d`` landmark space.

AToM works on ``idexp_lm3d = 10 * (key_id_base @ id + key_exp_base @ exp)`` (offsets from the BFM
mean shape at the 68 keypoint vertices, x10); the absolute frontal landmark used for alignment and
rendering is ``idexp_lm3d / 10 + key_mean_shape`` (BFM units, roughly [-1, 1], y up).

Keypoint-index quirk (kept on purpose): ``BFM_model_front.mat["keypoints"]`` stores 1-based MATLAB
vertex indices, but GeneFace's helper (and so MoDiTalker, its LRS3 data and ``atom.pt``) uses them as
0-based indices without subtracting 1. Every landmark therefore sits on the vertex *after* the
intended one. We keep that off-by-one so released data and checkpoints stay compatible; the
"correct" 0-based indices are still available as :attr:`Face3DHelper.kp_inds`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io as sio
import torch

from moditalker.device import resolve_device
from moditalker.errors import UserError, describe
from moditalker.fileio import atomic_path

BFM_FILE = "BFM_model_front.mat"
SIMILARITY_FILE = "similarity_Lm3D_all.mat"
ASSET_HINT = "see `python -m moditalker.assets check`"

# Coefficient layout of Deep3DFaceRecon's 257-d vector.
COEFF_SLICES: dict[str, slice] = {
    "identity": slice(0, 80),
    "expression": slice(80, 144),
    "texture": slice(144, 224),
    "angles": slice(224, 227),
    "gamma": slice(227, 254),
    "translation": slice(254, 257),
}

_REQUIRED_KEYS = ("meanshape", "idBase", "exBase", "keypoints")


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=torch.float32)


def load_bfm(bfm_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read ``bfm_dir/BFM_model_front.mat`` (or a ``.mat`` path; None: ``checkpoints/BFM``)."""
    if bfm_dir is None:
        from moditalker.assets import default_path

        bfm_dir = default_path("bfm_front").parent
    path = Path(bfm_dir)
    if path.is_dir() or path.suffix != ".mat":
        path = path / BFM_FILE
    if not path.is_file():
        raise UserError(f"BFM model not found: {path}; {ASSET_HINT}")
    try:
        mat = sio.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for corrupt files
        raise UserError(f"cannot read BFM model {path}: {describe(exc)}; {ASSET_HINT}") from exc
    missing = [k for k in _REQUIRED_KEYS if k not in mat]
    if missing:
        raise UserError(f"BFM model {path} lacks keys {missing}; is it BFM_model_front.mat? {ASSET_HINT}")
    return mat


def idexp_to_lm3d(idexp_lm3d, key_mean_shape):
    """Absolute frontal landmarks from identity+expression offsets: ``idexp / 10 + key_mean_shape``
    (not re-centred); the space AToM reads and writes. Both arguments NumPy arrays or both tensors."""
    return idexp_lm3d / 10 + key_mean_shape


def lm3d_to_idexp(lm3d, key_mean_shape):
    """Inverse of :func:`idexp_to_lm3d`: ``(lm3d - key_mean_shape) * 10``."""
    return (lm3d - key_mean_shape) * 10


class Face3DHelper:
    """Keypoint bases of the BFM and the landmark reconstructions AToM and the aligner use.

    ``bfm_dir`` is the folder holding ``BFM_model_front.mat`` (the real one or the synthetic
    stand-in written by :func:`write_synthetic_bfm`), or that file itself; None means
    ``checkpoints/BFM``. All outputs are float32 tensors on ``device``.
    """

    def __init__(self, bfm_dir: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device)
        mat = load_bfm(bfm_dir)
        dev = self.device
        self.meanshape = torch.from_numpy(mat["meanshape"].astype(np.float32)).reshape(1, -1).to(dev)
        self.mean_shape = self.meanshape.reshape(-1, 3)  # [N, 3]
        self.n_vertices = self.mean_shape.shape[0]
        self.id_base = torch.from_numpy(mat["idBase"].astype(np.float32)).to(dev)  # [3N, 80]
        self.exp_base = torch.from_numpy(mat["exBase"].astype(np.float32)).to(dev)  # [3N, 64]
        if self.id_base.shape[0] != 3 * self.n_vertices or self.exp_base.shape[0] != 3 * self.n_vertices:
            raise UserError(
                f"BFM model in {bfm_dir}: idBase {tuple(self.id_base.shape)} / exBase "
                f"{tuple(self.exp_base.shape)} do not match {self.n_vertices} vertices"
            )
        raw = np.asarray(mat["keypoints"]).reshape(-1).astype(np.int64)
        if raw.shape[0] != 68:
            raise UserError(f"BFM model in {bfm_dir}: expected 68 keypoints, found {raw.shape[0]}")
        if raw.min() < 1 or raw.max() >= self.n_vertices:
            raise UserError(f"BFM model in {bfm_dir}: keypoint indices outside 1..{self.n_vertices - 1}")
        # Quirk kept for compatibility (module docstring): 1-based indices used as 0-based.
        self.key_points = torch.from_numpy(raw).to(dev)
        self.kp_inds = self.key_points - 1  # the intended 0-based indices (not used below)

        self.key_mean_shape = self.mean_shape[self.key_points]  # [68, 3]
        n_id, n_exp = self.id_base.shape[1], self.exp_base.shape[1]
        self.key_id_base = self.id_base.reshape(-1, 3, n_id)[self.key_points].reshape(-1, n_id)  # [204, 80]
        self.key_exp_base = self.exp_base.reshape(-1, 3, n_exp)[self.key_points].reshape(-1, n_exp)
        self._key_mean_center = self.key_mean_shape.mean(dim=0)  # [3]
        self._mesh_mean_center = self.mean_shape.mean(dim=0)  # [3]

    # ----------------------------------------------------------------- coefficient handling
    @staticmethod
    def split_coeff(coeff: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Slice a [..., 257] Deep3DFaceRecon coefficient array into its named parts."""
        coeff = torch.as_tensor(coeff)
        if coeff.shape[-1] != 257:
            raise UserError(f"3DMM coefficients must have 257 values per frame, got {tuple(coeff.shape)}")
        return {name: coeff[..., sl] for name, sl in COEFF_SLICES.items()}

    def _offsets(
        self, id_coeff: np.ndarray | torch.Tensor, exp_coeff: np.ndarray | torch.Tensor, full: bool = False
    ) -> torch.Tensor:
        """id + exp offsets [T, K*3] at the keypoints (or at every vertex when ``full``)."""
        ids = _as_tensor(id_coeff, self.device).reshape(-1, self.id_base.shape[1])
        exps = _as_tensor(exp_coeff, self.device).reshape(-1, self.exp_base.shape[1])
        if ids.shape[0] != exps.shape[0]:
            raise UserError(f"identity ({ids.shape[0]} frames) and expression ({exps.shape[0]}) differ")
        id_base = self.id_base if full else self.key_id_base
        exp_base = self.exp_base if full else self.key_exp_base
        return ids @ id_base.T + exps @ exp_base.T

    def reconstruct_idexp_lm3d(
        self, id_coeff: np.ndarray | torch.Tensor, exp_coeff: np.ndarray | torch.Tensor
    ) -> torch.Tensor:
        """AToM's landmark representation: 10 x (identity + expression offsets), [T, 68, 3]."""
        return (self._offsets(id_coeff, exp_coeff) * 10).reshape(-1, 68, 3)

    def reconstruct_lm3d(
        self, id_coeff: np.ndarray | torch.Tensor, exp_coeff: np.ndarray | torch.Tensor
    ) -> torch.Tensor:
        """Mean + id + exp keypoints, re-centred on the mean of the 68 mean-shape keypoints, [T, 68, 3]."""
        face = self.key_mean_shape.reshape(1, -1) + self._offsets(id_coeff, exp_coeff)
        return face.reshape(-1, 68, 3) - self._key_mean_center

    def reconstruct_face_mesh(
        self, id_coeff: np.ndarray | torch.Tensor, exp_coeff: np.ndarray | torch.Tensor
    ) -> torch.Tensor:
        """Full mesh [T, N, 3], re-centred on the mean over all mean-shape vertices."""
        face = self.meanshape + self._offsets(id_coeff, exp_coeff, full=True)
        return face.reshape(face.shape[0], -1, 3) - self._mesh_mean_center

    def get_lm3d_from_coeff_seq(self, coeff: np.ndarray | torch.Tensor) -> torch.Tensor:
        """:meth:`reconstruct_lm3d` from a [T, 257] coefficient sequence."""
        parts = self.split_coeff(coeff)
        return self.reconstruct_lm3d(parts["identity"], parts["expression"])

    def get_lm3d_from_identity_exp(
        self, identity: np.ndarray | torch.Tensor, exp: np.ndarray | torch.Tensor
    ) -> torch.Tensor:
        """:meth:`reconstruct_lm3d` of one identity [80] with an expression sequence [T, 64]."""
        exps = _as_tensor(exp, self.device).reshape(-1, self.exp_base.shape[1])
        ids = _as_tensor(identity, self.device).reshape(1, -1).expand(exps.shape[0], -1)
        return self.reconstruct_lm3d(ids, exps)

    # ----------------------------------------------------------------- landmark spaces
    def idexp_to_lm3d(self, idexp_lm3d: np.ndarray | torch.Tensor) -> torch.Tensor:
        """:func:`idexp_to_lm3d` with this model's key mean shape, [..., 68, 3]."""
        return idexp_to_lm3d(_as_tensor(idexp_lm3d, self.device), self.key_mean_shape)

    def lm3d_to_idexp(self, lm3d: np.ndarray | torch.Tensor) -> torch.Tensor:
        """:func:`lm3d_to_idexp` with this model's key mean shape."""
        return lm3d_to_idexp(_as_tensor(lm3d, self.device), self.key_mean_shape)

    @staticmethod
    def close_mouth_for_idexp_lm3d(
        idexp_lm3d: np.ndarray | torch.Tensor, freeze_as_first_frame: bool = True
    ) -> torch.Tensor:
        """Close the mouth of [T, 68, 3] idexp landmarks (returns a copy; the original edits in place).

        Lip pairs (outer 49-53 / 59-55, inner 61-63 / 67-65) are moved to their mean height, the upper
        lip of each pair first (the lower one then averages with the *updated* upper one, as the
        original's sequential in-place updates do), then the outer lips are shifted to sit 0.03 above /
        below the inner ones. ``freeze_as_first_frame=True`` reproduces the original's behaviour, which
        multiplies the repeated first-frame mouth by 0, i.e. sets all 20 mouth points to zero offset.
        """
        out = torch.as_tensor(idexp_lm3d).reshape(-1, 68, 3).clone()
        y = out[..., 1]
        for upper, lower in (([49, 50, 51, 52, 53], [59, 58, 57, 56, 55]), ([61, 62, 63], [67, 66, 65])):
            lower_y = y[:, lower].clone()
            y[:, upper] = (y[:, upper] + lower_y) / 2
            y[:, lower] = (y[:, upper] + lower_y) / 2
        outer_up, outer_lo = [49, 50, 51, 52, 53], [59, 58, 57, 56, 55]
        y[:, outer_up] += (0.03 - y[:, outer_up].mean(1) + y[:, [61, 62, 63]].mean(1)).unsqueeze(1)
        y[:, outer_lo] += (-0.03 - y[:, outer_lo].mean(1) + y[:, [67, 66, 65]].mean(1)).unsqueeze(1)
        if freeze_as_first_frame:
            out[:, 48:68] = 0.0
        return out

    @staticmethod
    def close_eyes_for_idexp_lm3d(idexp_lm3d: np.ndarray | torch.Tensor, eps: float = 0.003) -> torch.Tensor:
        """Close both eyes of [T, 68, 3] idexp landmarks (returns a copy).

        Lid pairs 37-38 / 41-40 and 43-44 / 47-46 meet at their mean height +/- ``eps``; as in the
        original, the lower lid averages with the already-moved upper lid.
        """
        out = torch.as_tensor(idexp_lm3d).reshape(-1, 68, 3).clone()
        y = out[..., 1]
        for upper, lower in (([37, 38], [41, 40]), ([43, 44], [47, 46])):
            lower_y = y[:, lower].clone()
            y[:, upper] = (y[:, upper] + lower_y) / 2 + eps
            y[:, lower] = (y[:, upper] + lower_y) / 2 - eps
        return out

    @staticmethod
    def get_eye_mouth_lm_from_lm3d(lm3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split [T, 68, 3] landmarks into brows+nose+eyes (17:48) and mouth (48:68)."""
        lm3d = torch.as_tensor(lm3d).reshape(-1, 68, 3)
        return lm3d[:, 17:48], lm3d[:, 48:68]


# ----------------------------------------------------------------------------- synthetic BFM
def canonical_face_lm68() -> np.ndarray:
    """A plausible frontal 68-point face in BFM units (x right, y up, z towards the camera), [68, 3].

    Laid out in the usual iBUG 68 order (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth
    48-67), with the eye centres, nose tip and mouth corners at the positions of the standard
    Deep3DFaceRecon 5-point template, so POS fits and ``x * 128 + 128`` renderings look like a face.
    """
    pts: list[tuple[float, float]] = []
    for phi in np.linspace(np.pi, 2 * np.pi, 17):  # jaw: ear to ear through the chin
        pts.append((0.75 * np.cos(phi), 0.2 + 1.1 * np.sin(phi)))
    for x0, x1 in ((-0.62, -0.1), (0.1, 0.62)):  # brows
        for x in np.linspace(x0, x1, 5):
            c = (x0 + x1) / 2
            pts.append((x, 0.5 - 0.6 * (x - c) ** 2))
    for y in np.linspace(0.22, -0.05, 4):  # nose bridge down to the tip (index 30)
        pts.append((0.0, y))
    for x in np.linspace(-0.14, 0.14, 5):  # nostrils
        pts.append((x, -0.15 + 0.05 * abs(x) / 0.14))
    for cx in (-0.31, 0.31):  # eyes, left to right: corner, top, top, corner, bottom, bottom
        xs = np.array([-0.12, -0.04, 0.04, 0.12]) + cx
        pts += [(xs[0], 0.29), (xs[1], 0.33), (xs[2], 0.33), (xs[3], 0.29), (xs[2], 0.25), (xs[1], 0.25)]
    outer_up = [(-0.25, -0.38), (-0.16, -0.31), (-0.06, -0.29), (0.0, -0.30), (0.06, -0.29), (0.16, -0.31)]
    outer_lo = [(0.25, -0.38), (0.16, -0.46), (0.06, -0.49), (0.0, -0.49), (-0.06, -0.49), (-0.16, -0.46)]
    inner = [(-0.2, -0.38), (-0.07, -0.35), (0.0, -0.35), (0.07, -0.35), (0.2, -0.38)]
    inner += [(0.07, -0.41), (0.0, -0.41), (-0.07, -0.41)]
    pts += outer_up + outer_lo + inner
    xy = np.asarray(pts, dtype=np.float64)
    z = 0.35 - 0.35 * xy[:, 0] ** 2 - 0.1 * xy[:, 1] ** 2
    z[27:31] += np.linspace(0.05, 0.2, 4)  # the nose sticks out
    z[31:36] += 0.05
    return np.concatenate([xy, z[:, None]], axis=1)


def write_synthetic_bfm(folder: str | Path, seed: int = 0, n_vertices: int = 500) -> Path:
    """Write a face-shaped random ``BFM_model_front.mat`` and ``similarity_Lm3D_all.mat`` into ``folder``.

    For tests and ``--random_weights`` runs: the 68 keypoint vertices (read with the same
    off-by-one as :class:`Face3DHelper`) hold :func:`canonical_face_lm68`, the other vertices lie
    on an ellipsoid around it, and the identity/expression bases are small random vectors (so
    random coefficients give slightly different but still face-like landmarks). Returns ``folder``.
    """
    if n_vertices < 140:
        raise ValueError("n_vertices must be at least 140")
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    face = canonical_face_lm68()
    # 1-based file values k in 2..N-1 so that both k (the quirk) and k - 1 (the intended) are valid.
    keypoints = rng.choice(np.arange(2, n_vertices), size=68, replace=False)
    theta = rng.uniform(0, np.pi, n_vertices)
    phi = rng.uniform(np.pi, 2 * np.pi, n_vertices)
    verts = np.stack([0.8 * np.cos(theta), 1.0 * np.cos(phi) * np.sin(theta), 0.4 + 0.3 * np.sin(phi)], 1)
    verts[keypoints - 1] = face + rng.normal(0, 0.01, face.shape)  # near the "intended" vertices
    verts[keypoints] = face  # exact where the quirk reads (written last: wins any collision)
    n_tri = 2 * n_vertices
    bfm = {
        "meanshape": verts.reshape(1, -1).astype(np.float32),
        "meantex": rng.uniform(60, 220, (1, 3 * n_vertices)).astype(np.float32),
        "idBase": rng.normal(0, 0.001, (3 * n_vertices, 80)).astype(np.float32),
        "exBase": rng.normal(0, 0.001, (3 * n_vertices, 64)).astype(np.float32),
        "texBase": rng.normal(0, 5.0, (3 * n_vertices, 80)).astype(np.float32),
        "point_buf": rng.integers(1, n_tri + 1, (n_vertices, 8)).astype(np.int32),
        "tri": rng.integers(1, n_vertices + 1, (n_tri, 3)).astype(np.int32),
        "keypoints": keypoints.reshape(1, 68).astype(np.float64),
    }
    template = face - face.mean(axis=0) * np.array([1.0, 0.0, 0.0])
    for name, arrays in ((BFM_FILE, bfm), (SIMILARITY_FILE, {"lm": template.astype(np.float64)})):
        with atomic_path(folder / name) as tmp:  # whole or absent: another run may be reading it
            sio.savemat(str(tmp), arrays)
    return folder


def synthetic_bfm_problem(folder: str | Path) -> str | None:
    """What is wrong with a :func:`write_synthetic_bfm` folder (None: both files read back with the
    arrays they must hold)."""
    need = {
        BFM_FILE: ("meanshape", "idBase", "exBase", "keypoints", "tri", "point_buf"),
        SIMILARITY_FILE: ("lm",),
    }
    for name, keys in need.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            data = sio.loadmat(str(path))
        except Exception as exc:  # scipy raises many kinds for a damaged .mat
            return f"{name} cannot be read ({describe(exc)})"
        missing = [k for k in keys if k not in data]
        if missing:
            return f"{name} lacks {', '.join(missing)}"
    return None
