"""Sample inputs for the demo and the end-to-end tests, made from public-domain material.

* speech: the bundled ``assets/sample/speech.wav`` (eSpeak NG, see ``assets/sample/README.md``),
  optionally cut or zero-padded to an exact length;
* reference face: scikit-image's ``astronaut`` (NASA portrait, public domain), cropped to the head
  and shoulders like an HDTF frame, as a PNG and as a short 25 fps video with a gentle synthetic
  head motion (small rotation and shift), so the pose-driven alignment has something to follow.

``python -m data.sample_data --out_dir DIR [--seconds S] [--video_seconds V]`` writes
``DIR/speech.wav``, ``DIR/reference.png`` and ``DIR/reference.mp4``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from data.video import write_video
from moditalker.errors import UserError, cli_main
from moditalker.fileio import atomic_path, check_output

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SPEECH = REPO / "assets" / "sample" / "speech.wav"
# head-and-shoulders square in the 512x512 astronaut image (left, top, right, bottom)
SAMPLE_VIDEO_BOX = (100, 0, 350, 250)
_HEAD_CENTRE = (225.0, 125.0)


def _astronaut() -> Image.Image:
    from skimage import data as skdata

    return Image.fromarray(skdata.astronaut())


def reference_image(size: int = 256) -> np.ndarray:
    """The astronaut head crop as uint8 ``[size, size, 3]``."""
    crop = _astronaut().crop(SAMPLE_VIDEO_BOX).resize((size, size), Image.BICUBIC)
    return np.asarray(crop, dtype=np.uint8)


def reference_frames(n_frames: int, size: int = 256) -> np.ndarray:
    """``n_frames`` of the astronaut crop under a slow nod/turn (+-3 deg, +-4 px), uint8 ``[T,S,S,3]``."""
    src = _astronaut()
    out = np.empty((n_frames, size, size, 3), np.uint8)
    for k in range(n_frames):
        phase = 2 * math.pi * k / max(n_frames, 1)
        moved = src.rotate(
            3.0 * math.sin(phase),
            resample=Image.BICUBIC,
            center=_HEAD_CENTRE,
            translate=(4.0 * math.sin(phase), 2.0 * math.sin(2 * phase)),
            fillcolor=(200, 200, 200),
        )
        out[k] = np.asarray(moved.crop(SAMPLE_VIDEO_BOX).resize((size, size), Image.BICUBIC))
    return out


def write_reference_image(path: str | Path, size: int = 256) -> Path:
    """Write the astronaut crop as a PNG (atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(reference_image(size)).save(tmp, format="PNG")
    return path


def write_reference_video(path: str | Path, seconds: float = 2.0, fps: int = 25, size: int = 256) -> Path:
    """Write a silent reference video of the moving astronaut crop (H.264, ``fps``)."""
    n = max(1, int(round(seconds * fps)))
    return write_video(path, reference_frames(n, size), fps=fps)


def write_speech(path: str | Path, seconds: float | None = None, source: str | Path = SAMPLE_SPEECH) -> Path:
    """Copy the bundled speech clip to ``path`` (wav), cut or zero-padded to ``seconds`` if given."""
    source = Path(source)
    if not source.is_file():
        raise UserError(f"sample speech clip not found: {source}; restore assets/sample/ from git")
    audio, sr = sf.read(source, dtype="float32", always_2d=False)
    if seconds is not None:
        n = int(round(seconds * sr))
        audio = audio[:n] if len(audio) >= n else np.pad(audio, (0, n - len(audio)))
    path = Path(path)
    with atomic_path(path) as tmp:
        sf.write(tmp, audio, sr, subtype="PCM_16", format="WAV")
    return path


def write_talking_videos(folder: str | Path, n: int, seconds: float = 2.0, size: int = 256) -> list[Path]:
    """``n`` short videos with sound for smoke-training the stages: ``folder/clip00.mp4`` ... (the moving
    astronaut, each clip from another start of its motion, with consecutive pieces of the bundled
    speech looped as the audio track). They are not talking faces: they exercise the data tools."""
    from data.audio import load_audio

    folder = Path(folder)
    speech = load_audio(SAMPLE_SPEECH, 16000)
    frames_per_clip = max(1, int(round(seconds * 25)))
    samples = frames_per_clip * 640
    motion = reference_frames(frames_per_clip * (n + 1), size)
    paths = []
    for i in range(n):
        audio = np.resize(np.roll(speech, -i * samples), samples).astype(np.float32)
        frames = motion[i * frames_per_clip // 2 : i * frames_per_clip // 2 + frames_per_clip]
        paths.append(write_video(folder / f"clip{i:02d}.mp4", frames, fps=25, audio=audio, sample_rate=16000))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True, help="folder for speech.wav, reference.png/.mp4")
    parser.add_argument("--seconds", type=float, default=None, help="cut/pad the speech to this length")
    parser.add_argument("--video_seconds", type=float, default=2.0, help="length of reference.mp4")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--talking_videos",
        type=int,
        default=0,
        help="also write N short videos with sound to OUT_DIR/videos/ (smoke-training data) [0]",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace sample files already there")
    args = parser.parse_args(argv)
    if args.talking_videos < 0:
        raise UserError(f"--talking_videos must be >= 0, got {args.talking_videos}")
    out = Path(args.out_dir)
    names = ["speech.wav", "reference.png", "reference.mp4"]
    for name in names + [f"videos/clip{i:02d}.mp4" for i in range(args.talking_videos)]:
        check_output(out / name, args.overwrite)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for p in write_talking_videos(out / "videos", args.talking_videos, args.video_seconds, args.size):
        print(p)
    for p in (
        write_speech(out / "speech.wav", args.seconds),
        write_reference_image(out / "reference.png", args.size),
        write_reference_video(out / "reference.mp4", args.video_seconds, size=args.size),
    ):
        print(p)


if __name__ == "__main__":
    cli_main(main)
