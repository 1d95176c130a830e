"""docs/training.md, "Train everything small": scripts/walkthrough_tiny.sh on a fresh output folder, every
stage consuming the previous one's output, ending in a video made with the trained tiny checkpoints.

The default suite runs it with 2 short videos and 2 steps per trainer; ``RUN_SLOW=1`` runs it exactly as
docs/training.md shows (4 videos of 1.5 s, 50 steps).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(out: Path, steps: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "walkthrough_tiny.sh"), str(out), str(steps)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=3600,
    )


def _check(out: Path, steps: int, videos: int) -> None:
    from data.video import probe

    assert len(list((out / "hdtf" / "meta").glob("*.json"))) == videos
    assert len(list((out / "lrs3").glob("*.npz"))) == videos
    assert (out / "atom" / "checkpoints" / f"step_{steps:08d}.pt").is_file()
    for name in ("ae_rgb/model_last.pth", "ae_ldmk/model_last.pth", "unet/diffusion_model.pth"):
        assert (out / name).is_file(), name
    info = probe(out / "talk.mp4")
    assert info["video"]["fps"] == 25.0 and (info["video"]["width"], info["video"]["height"]) == (256, 256)
    assert info["audio"] is not None and (out / "talk_preview.mp4").is_file()
    run = yaml.safe_load((out / "talk.yaml").read_text())
    assert run["random_weights"] is True
    assert run["assets"]["diffusion_model"] == str(out / "unet" / "diffusion_model.pth")
    assert run["assets"]["atom"].endswith(f"step_{steps:08d}.pt")


def test_walkthrough_short(tmp_path):
    out = tmp_path / "walk"
    proc = _run(out, 2, {"WALK_VIDEOS": "2", "WALK_SECONDS": "1.0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(out, 2, 2)


@pytest.mark.slow
def test_walkthrough_as_in_the_readme(tmp_path):
    out = tmp_path / "walk"
    proc = _run(out, 50, {})
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(out, 50, 4)
