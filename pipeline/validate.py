"""The cheap checks of a pipeline run, before any heavy work: settings, arguments, paths, output
writability, media streams, required assets. Each failure is one :class:`UserError` line."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from moditalker.constants import FPS, SAMPLE_RATE
from moditalker.errors import UserError
from moditalker.fileio import check_output
from pipeline.settings import check_settings, stage_config

__all__ = ["REQUIRED_ASSETS", "Inputs", "validate", "asset_paths", "check_assets"]

# moditalker.assets names the pipeline needs (bfm_dir covers bfm_front + bfm_similarity)
REQUIRED_ASSETS = (
    "hubert",
    "face_alignment",
    "deep3d",
    "bfm_front",
    "bfm_similarity",
    "atom",
    "autoencoder_rgb",
    "autoencoder_motion",
    "diffusion_model",
)


@dataclass
class Inputs:
    """The checked input and output paths of a run."""

    audio: Path
    ref: Path
    ref_is_image: bool
    out: Path
    preview: Path | None
    config_path: Path
    work_dir: Path
    audio_rate: int


def _check_writable(folder: Path) -> None:
    """A real write test (a read-only mount passes ``os.access``) in ``folder`` or, when it does not
    exist yet, in its nearest existing ancestor: nothing is created for a run that may be refused."""
    folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"output folder {folder} is not writable ({exc.strerror}); choose another --out"
        ) from exc


def validate(cfg: DictConfig) -> Inputs:
    """Every check that is cheap: settings, arguments, paths, output writability, media streams."""
    from data.video import probe
    from MToV.generate import check_sampling

    check_settings(cfg)
    check_sampling(float(cfg.mtov.start_ratio), int(cfg.mtov.sampling_timesteps))
    if not cfg.audio:
        raise UserError("--audio is required (a speech recording, or a video with an audio track)")
    if not cfg.ref_video and not cfg.ref_image:
        raise UserError("a reference is required: --ref_video VIDEO or --ref_image PHOTO")
    if cfg.ref_video and cfg.ref_image:
        raise UserError("give either --ref_video or --ref_image, not both")
    if not cfg.out:
        raise UserError("--out is required (the .mp4 to write)")
    out = Path(cfg.out)
    if out.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise UserError(f"--out {out}: use an .mp4 (or .mov/.mkv) file name")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'result.mp4'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"cannot write {out}: {out.parent} is a file, not a folder")
    overwrite = bool(cfg.overwrite)
    # an input is never an output, whatever --overwrite says (resolved paths and hard links)
    inputs = (cfg.audio, cfg.ref_video, cfg.ref_image, *cfg.assets.values())
    check_output(out, overwrite, inputs)
    _check_writable(out.parent if str(out.parent) else Path("."))
    preview = out.with_name(out.stem + "_preview" + out.suffix) if cfg.preview else None
    if preview is not None:
        check_output(preview, overwrite, inputs)
    config_path = out.with_suffix(".yaml")
    check_output(config_path, overwrite, inputs)
    work_dir = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.stem + "_work")
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"work folder {work_dir} exists and is not a folder; pass --work_dir")

    audio = Path(cfg.audio)
    info = probe(audio)  # UserError for missing/unreadable files
    if info["audio"] is None:
        raise UserError(f"{audio} has no audio track; pass a speech recording or a video with sound")
    ref = Path(cfg.ref_image or cfg.ref_video)
    ref_is_image = bool(cfg.ref_image)
    if ref_is_image:
        from data.video import read_image

        read_image(ref)  # cheap decode check
    else:
        rinfo = probe(ref)
        if rinfo["video"] is None:
            raise UserError(f"{ref} has no video stream; pass a video, or a photo with --ref_image")
        from data.video import read_video

        read_video(ref, fps=FPS, max_frames=1)  # headers can be fine and the frames not decode
    stage_config(cfg.atom.config)  # a stage config file that does not exist fails here, before any work
    stage_config(cfg.mtov.config)
    if int(cfg.ref_frame) < 0:
        raise UserError(f"--ref_frame must be >= 0, got {cfg.ref_frame}")
    rate = int(info["audio"]["sample_rate"] or SAMPLE_RATE)
    return Inputs(audio, ref, ref_is_image, out, preview, config_path, work_dir, rate)


def asset_paths(cfg: DictConfig) -> dict[str, Path]:
    """moditalker.assets name -> path (the ``assets.*`` setting, else the registry default)."""
    from moditalker.assets import default_path

    a = cfg.assets
    bfm_dir = Path(a.bfm_dir) if a.bfm_dir else default_path("bfm_front").parent
    out = {k: Path(v) if v else default_path(k) for k, v in a.items() if k != "bfm_dir"}
    out["bfm_front"] = bfm_dir / "BFM_model_front.mat"
    out["bfm_similarity"] = bfm_dir / "similarity_Lm3D_all.mat"
    return out


def check_assets(cfg: DictConfig) -> dict[str, Path]:
    """The asset paths; UserError listing every missing one (none are needed with ``random_weights``)."""
    from moditalker.assets import check_assets as missing_assets

    paths = asset_paths(cfg)
    if cfg.random_weights:  # only the checkpoints named explicitly are loaded (trained tiny networks)
        given = [k for k, v in cfg.assets.items() if v is not None]
        mtov = ("autoencoder_rgb", "autoencoder_motion", "diffusion_model")
        if any(k in given for k in mtov) and not all(k in given for k in mtov):
            raise UserError(
                "with --random_weights, give all three MToV checkpoints (assets.autoencoder_rgb, "
                "assets.autoencoder_motion, assets.diffusion_model) or none"
            )
        named = [k for k in given if k in ("atom", *mtov)]
        missing = missing_assets(named, {k: paths[k] for k in named}) if named else []
        if missing:
            raise UserError(missing[0])
        return paths
    missing = missing_assets(REQUIRED_ASSETS, {k: paths[k] for k in REQUIRED_ASSETS})
    if missing:
        lines = "\n".join(f"  {m}" for m in missing)
        raise UserError(
            f"{len(missing)} required asset(s) missing (or run with --random_weights to test the pipeline):\n"
            + lines
        )
    return paths
