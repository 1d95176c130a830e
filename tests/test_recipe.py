"""docs/recipe.md: every command of the page runs, in order, on tiny stand-ins.

The commands are read from the page's ```bash blocks (continuation lines joined). Each one must match
exactly one entry of STAND_INS, which says what the test adds to it: environment variables pointing
the downloads at a local HTTP server (Google Drive: MODITALKER_GDRIVE_URL; the public weight hosts:
MODITALKER_MIRROR; Hugging Face: its offline cache holding a tiny HuBERT), arguments appended for the
tiny networks (configs/*_tiny.yaml, --random_weights, 2-4 steps) and a few replacements (the tiny
autoencoders for the official ones, which the tiny configs cannot load; the local HDTF metadata
repository for GitHub's; the stand-in downloads folder for ~/Downloads). The commands run with
``bash -euo pipefail`` in a copy of the repository (the files git tracks or would add) using this
test's Python environment, so their outputs (checkpoints/, data/, runs/, results/, eval/) stay there.

Default suite: the page's commands all have a stand-in, and steps 1-2 (assets, HDTF) run. RUN_SLOW=1:
the whole page, through training, a video and both evaluation protocols.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from http_stub import StubServer, module_state, official_like, save_tiny_hubert, torch_bytes
from repo_copy import copy_repository

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "docs" / "recipe.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)

TINY_AES = {
    "checkpoints/autoencoder_rgb.pth": "$STANDIN/ae_rgb_tiny.pth",
    "checkpoints/autoencoder_motion.pth": "$STANDIN/ae_ldmk_tiny.pth",
}
TINY_PIPELINE = (
    "--config configs/inference_tiny.yaml --random_weights"
    " assets.autoencoder_rgb=$STANDIN/ae_rgb_tiny.pth assets.autoencoder_motion=$STANDIN/ae_ldmk_tiny.pth"
    " assets.diffusion_model=checkpoints/diffusion_model.pth"
)
TINY_EVAL = (
    "--config configs/inference_tiny.yaml --random_weights --set"
    " assets.autoencoder_rgb=$STANDIN/ae_rgb_tiny.pth assets.autoencoder_motion=$STANDIN/ae_ldmk_tiny.pth"
    " assets.diffusion_model=checkpoints/diffusion_model.pth"
)

# (pattern matched at the start of the command, {"env", "append", "replace"}); one per command
STAND_INS: list[tuple[str, dict]] = [
    (r"scripts/setup\.sh$", {}),  # finds the linked environment installed and does nothing
    (r"\.venv/bin/python -m moditalker\.assets download ", {}),  # the local server (environment)
    (r"mkdir -p checkpoints/BFM checkpoints/deep3d$", {}),
    (r"cp ~/Downloads/", {"replace": {"~/Downloads": "$STANDIN/downloads"}}),
    (r"\.venv/bin/python -m moditalker\.assets check --deep ", {}),
    (r"git clone ", {"replace": {"https://github.com/MRzzm/HDTF": "$STANDIN/HDTF.git"}}),
    (r"scripts/download_hdtf\.sh ", {"append": "--no_progress"}),
    (r"scripts/preprocess_hdtf\.sh ", {"append": "--random_weights"}),
    (
        r"scripts/cache_mtov_latents\.sh ",
        {"env": {"CONFIG": "configs/mtov_tiny.yaml"}, "append": "--device cpu", "replace": TINY_AES},
    ),
    (
        r"scripts/train_mtov_diffusion\.sh ",
        {
            "env": {"CONFIG": "configs/mtov_tiny.yaml"},
            "append": "--device cpu train.max_steps=2",
            "replace": TINY_AES,
        },
    ),
    (
        r"NUM_PROCESSES=8 scripts/train_mtov_diffusion\.sh ",
        {
            "env": {"CONFIG": "configs/mtov_tiny.yaml"},
            "append": "--device cpu train.max_steps=4",  # resumes the run above: 2 more steps on 2 processes
            "replace": {**TINY_AES, "NUM_PROCESSES=8": "NUM_PROCESSES=2"},
        },
    ),
    (r"cp runs/mtov_diffusion/diffusion_model\.pth checkpoints/diffusion_model\.pth$", {}),
    (r"scripts/inference\.sh ", {"append": TINY_PIPELINE}),
    (r"scripts/evaluate\.sh --protocol ", {"append": TINY_EVAL}),
    (r"scripts/preprocess_lrs3\.sh ", {"append": "--random_weights --hubert_dim 16"}),
    (
        r"scripts/train_atom\.sh ",
        {"env": {"CONFIG": "configs/atom_tiny.yaml"}, "append": "--device cpu train.max_steps=2"},
    ),
]


def recipe_commands() -> list[str]:
    commands = []
    for block in BLOCK.findall(RECIPE.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def stand_in(command: str) -> tuple[str, dict[str, str]]:
    """The command the test runs for ``command`` and the environment it adds."""
    rules = [rule for pattern, rule in STAND_INS if re.match(pattern, command)]
    if len(rules) != 1:
        raise AssertionError(f"{len(rules)} stand-ins match the recipe command {command!r}; give it one")
    rule = rules[0]
    for old, new in rule.get("replace", {}).items():
        assert old in command, f"stand-in replaces {old!r}, which {command!r} does not hold"
        command = command.replace(old, new)
    if rule.get("append"):
        command = f"{command} {rule['append']}"
    return command, dict(rule.get("env", {}))


def test_every_recipe_command_has_one_stand_in():
    commands = recipe_commands()
    assert len(commands) >= 15
    for command in commands:
        stand_in(command)
    for pattern, _ in STAND_INS:  # and no stand-in is left over from a command the page lost
        assert any(re.match(pattern, c) for c in commands), f"no recipe command matches {pattern!r}"


# ----------------------------------------------------------------------------- the stand-ins
def _hf_cache(root: Path) -> None:
    """A Hugging Face cache holding a tiny model under facebook/hubert-large-ls960-ft."""
    snap = root / "hub" / "models--facebook--hubert-large-ls960-ft" / "snapshots" / ("0" * 40)
    save_tiny_hubert(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)


HDTF_VIDEOS = {"RD": ["Radio46", "Radio6"], "WDA": ["JackyRosen"], "WRA": ["DianeBlack1"]}


def _hdtf_repo(root: Path, url: str) -> None:
    """A git repository like MRzzm/HDTF: HDTF_dataset/ whose links point at the local server. Two of
    its clips are test ids of the shipped split (RD_Radio46_000, WDA_JackyRosen_000)."""
    meta = root / "HDTF_dataset"
    meta.mkdir(parents=True)
    for subset, names in HDTF_VIDEOS.items():
        (meta / f"{subset}_video_url.txt").write_text("".join(f"{n} {url}/videos/{n}.mp4\n" for n in names))
        (meta / f"{subset}_annotion_time.txt").write_text("".join(f"{n}.mp4 00:00-00:02\n" for n in names))
        (meta / f"{subset}_crop_wh.txt").write_text("".join(f"{n}_0.mp4 0 128 0 128\n" for n in names))
        (meta / f"{subset}_resolution.txt").write_text("".join(f"{n}.mp4 128\n" for n in names))
    git = [
        "git",
        "-C",
        str(root),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "-c",
        "init.defaultBranch=main",
    ]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "metadata"]):
        subprocess.run([*git, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The local server and the files it serves, the tiny autoencoders, the downloads folder."""
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    from data.face3d import write_synthetic_bfm
    from data.recon3d import ReconNet
    from data.sample_data import write_talking_videos
    from moditalker.assets import GDRIVE_IDS
    from MToV.loading import build_models, model_config

    root = tmp_path_factory.mktemp("standin")
    with StubServer() as server:
        atom = official_like("atom")
        server.files[f"/uc/{GDRIVE_IDS['atom']}"] = torch_bytes(
            {"model_state_dict": atom, "ema_state_dict": atom}
        )
        for name in ("autoencoder_rgb", "autoencoder_motion"):
            server.files[f"/uc/{GDRIVE_IDS[name]}"] = torch_bytes(official_like("autoencoder"))
        fan = "/www.adrianbulat.com/downloads/python-fan/"
        with torch.device("meta"):
            fan_net, s3fd_net = FAN(4), s3fd()
        server.files[fan + "2DFAN4-11f355bf06.pth.tar"] = torch_bytes(module_state(fan_net))
        server.files[fan + "s3fd-619a316812.pth"] = torch_bytes(module_state(s3fd_net))
        small = torch_bytes({"weight": torch.zeros(4)})
        for path in (
            "/download.pytorch.org/models/vgg16-397923af.pth",
            "/download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            "/github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            "/www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",
        ):
            server.files[path] = small
        videos = write_talking_videos(root / "sample", 4, seconds=2.2, size=128)
        names = [n for subset in HDTF_VIDEOS.values() for n in subset]
        for name, video in zip(names, videos):
            server.files[f"/videos/{name}.mp4"] = video.read_bytes()
        _hdtf_repo(root / "HDTF.git", server.url)
        _hf_cache(root / "hf")
        write_synthetic_bfm(root / "downloads" / "BFM")
        (root / "downloads" / "deep3d").mkdir()
        with torch.device("meta"):
            recon = ReconNet()
        torch.save(module_state(recon), root / "downloads" / "deep3d" / "epoch_20.pth")
        ae_rgb, ae_ldmk, _ = build_models(model_config(REPO / "configs" / "mtov_tiny.yaml"))
        torch.save(ae_rgb.state_dict(), root / "ae_rgb_tiny.pth")
        torch.save(ae_ldmk.state_dict(), root / "ae_ldmk_tiny.pth")
        env = {
            "STANDIN": str(root),
            "MODITALKER_GDRIVE_URL": server.url + "/uc/{id}",
            "MODITALKER_MIRROR": server.url,
            "HF_HOME": str(root / "hf"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        yield root, env, videos


def _checkout(root: Path, videos: list[Path]) -> Path:
    """A copy of the repository's files, running this test's Python environment as .venv, with the
    licence-gated LRS3 stood in for by the sample videos."""
    copy_repository(root)
    for split, speaker, clips in (("trainval", "spk0", videos[:3]), ("test", "spk9", videos[3:])):
        for k, video in enumerate(clips):
            dest = root / "data" / "LRS3" / split / speaker / f"{k:05d}.mp4"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(video, dest)
    return root


def _run_recipe(repo: Path, env: dict, stop_before: str | None = None) -> list[str]:
    ran = []
    for command in recipe_commands():
        if stop_before and re.match(stop_before, command):
            break
        run, extra = stand_in(command)
        full_env = {
            **os.environ,
            **env,
            **extra,
            "MODITALKER_CHECKPOINTS": str(repo / "checkpoints"),
            "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        full_env.pop("PYTHON", None)
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", run],
            cwd=repo,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert proc.returncode == 0, (
            f"recipe command failed (exit {proc.returncode}):\n{command}\nstand-in:\n{run}\n"
            f"--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-3000:]}"
        )
        ran.append(command)
    return ran


def test_recipe_assets_and_hdtf(standin, tmp_path):
    root, env, videos = standin
    repo = _checkout(tmp_path / "repo", videos)
    _run_recipe(repo, env, stop_before=r"scripts/preprocess_hdtf\.sh")
    for rel in ("atom.pt", "autoencoder_rgb.pth", "autoencoder_motion.pth", "BFM/BFM_model_front.mat"):
        assert (repo / "checkpoints" / rel).is_file(), rel
    assert (repo / "checkpoints" / "hubert-large-ls960-ft" / "config.json").is_file()
    clips = sorted(p.name for p in (repo / "data" / "HDTF" / "videos").glob("*.mp4"))
    assert clips == [
        "RD_Radio46_000.mp4",
        "RD_Radio6_000.mp4",
        "WDA_JackyRosen_000.mp4",
        "WRA_DianeBlack1_000.mp4",
    ]


@pytest.mark.slow
def test_the_whole_recipe(standin, tmp_path):
    root, env, videos = standin
    repo = _checkout(tmp_path / "repo", videos)
    assert _run_recipe(repo, env) == recipe_commands()
    assert (repo / "checkpoints" / "diffusion_model.pth").is_file()
    assert (repo / "results" / "talk.mp4").is_file()
    for protocol in ("selfrecon", "cross"):
        assert (repo / "eval" / protocol / "report.txt").is_file()
    assert list((repo / "runs" / "atom" / "checkpoints").glob("step_*.pt"))
