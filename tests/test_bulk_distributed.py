"""Bulk jobs on several processes (moditalker.bulk): preprocessing, --batch_file renders and an evaluation
protocol through their scripts with NUM_PROCESSES=2 on this CPU (torchrun through the training launcher,
one gloo group), against the same work done by one process: the same files, the same decoded frames,
the same report; a killed rank's work resumed; failed items of every rank named once, by rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data.sample_data import reference_frames, write_reference_image, write_reference_video, write_speech
from data.video import read_video, write_video
from moditalker.bulk import Ranks, check_shard
from moditalker.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "inference_tiny.yaml")

# Makes rank 1 of a launched run die (SIGKILL) when it first saves an item's 3DMM coefficients: its
# frames and keypoints are written by then, its meta/{id}.json (the "finished" mark) is not.
KILL_HOOK = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("KILL_RANK_1"):
    import signal
    import data.builders as b

    def _die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    b.save_npy = _die
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, *args: str, processes: int = 2, **env_extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "NUM_PROCESSES": str(processes),
        "OMP_NUM_THREADS": "1",  # the same threads as the one-process runs below (torch.set_num_threads(1))
        "MAIN_PROCESS_PORT": str(_free_port()),
        **env_extra,
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NUM_SHARDS", "DEVICES"):
        env.pop(var, None)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(skip)
    }


# ----------------------------------------------------------------------------- helpers, in process
def test_share_device_and_shard_checks(monkeypatch):
    items = [f"id{i}" for i in (3, 0, 5, 1, 4, 2, 6)]
    parts = [Ranks(rank=r, world=3).share(items) for r in range(3)]
    assert parts == [["id0", "id3", "id6"], ["id1", "id4"], ["id2", "id5"]]
    with pytest.raises(UserError, match="--shard must be in 0..1"):
        check_shard(2, 2)
    with pytest.raises(UserError, match="--num_shards must be >= 1"):
        check_shard(0, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launched = Ranks(rank=3, world=4, local_rank=3, group_rank=3, group_size=4)
    assert launched.device("auto") == "cuda:1" and launched.device("cuda") == "cuda:1"
    assert launched.device("cpu") == "cpu" and launched.device("cuda:0") == "cuda:0"
    assert Ranks().device("auto") == "auto"  # one process: the usual choice
    # a work folder given to several ranks: one of its own each (no two compute one cache entry)
    assert [Ranks(rank=r, world=2).own_folder("w") for r in (0, 1)] == ["w/rank-0", "w/rank-1"]
    assert Ranks().own_folder("w") == "w" and Ranks(rank=1, world=2).own_folder(None) is None


def test_metric_records_replayed_in_order_give_the_one_process_result():
    """What rank 0 does with the other ranks' per-video records: FID, FVD (chunk features replayed into
    the running statistics) and a per-video metric give exactly the one-process numbers."""
    from torch import nn

    from evaluation import metrics as M
    from evaluation.protocol import VideoPair

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.proj = nn.Conv2d(3, 6, 8, 8)

        def forward(self, x):
            x = x.mean(2) if x.dim() == 5 else x  # FVD: [N, 3, T, H, W] clips
            return self.proj(x).mean(dim=(2, 3))

    rng = np.random.default_rng(0)
    videos = {f"v{i}": rng.integers(0, 256, (2, 9 + 2 * i, 3, 16, 16), dtype=np.uint8) for i in range(3)}

    class MeanDifference(M._FrameMean):  # a per-video metric (PSNR's kind, without its imports)
        name = "diff"

        def update(self, chunk):
            self.add("diff", (chunk.pred.float() - chunk.gt.float()).abs().mean(dim=(1, 2, 3)))

    def build():
        return {"diff": MeanDifference(), "fid": M.FID(Net()), "fvd": M.FVD(Net(), clip=4)}

    def run(metrics, names, keep):
        records = {}
        for name in names:
            pred, gt = (torch.from_numpy(a) for a in videos[name])
            pair = VideoPair(name, Path(name), Path(name), len(pred), len(pred), len(pred))
            for m in metrics.values():
                m.keep = keep
                m.start(pair)
            for i in range(0, len(pred), 5):  # chunks of 5 frames, as the protocol streams them
                chunk = M.Chunk(pred[i : i + 5], gt[i : i + 5])
                for m in metrics.values():
                    m.update(chunk)
            for key, m in metrics.items():
                m.finish_video()
                records.setdefault(name, {})[key] = m.record()
        return records

    one = build()
    run(one, ["v0", "v1", "v2"], keep=False)
    rank0, rank1 = build(), build()
    records = {**run(rank0, ["v0", "v2"], keep=True), **run(rank1, ["v1"], keep=True)}
    for key, m in rank0.items():
        m.reset()
        for name in ("v0", "v1", "v2"):
            m.replay(records[name][key])
        assert m.result() == one[key].result(), key
    assert np.isfinite(one["fvd"].result()[0]["fvd"]) and np.isfinite(one["fid"].result()[0]["fid"])


# ----------------------------------------------------------------------------- preprocessing
@pytest.fixture(scope="module")
def hdtf_videos(tmp_path_factory) -> Path:
    """Three 4-frame clips and one file that is not a video (it fails on rank 1 of 2)."""
    root = tmp_path_factory.mktemp("bulk_videos")
    frames = reference_frames(4, 96)
    for i in range(3):
        write_video(root / f"id_{i}.mp4", np.roll(frames, 8 * i, axis=2), fps=25)
    (root / "id_bad.mp4").write_bytes(b"not a video" * 20)
    return root


def test_preprocess_two_processes_equal_one_killed_rank_resumed_failure_named(
    hdtf_videos, tmp_path, one_thread, capsys
):
    from data.preprocess import main

    args = ["--videos", str(hdtf_videos), "--random_weights", "--device", "cpu", "--frame_format", "png"]
    single = tmp_path / "one"
    with pytest.raises(UserError, match="1 of 4 videos failed: id_bad"):
        main(["hdtf", *args, "--out_dir", str(single)])

    # two ranks; rank 1 is killed half-way through its first video (id_1)
    out = tmp_path / "two"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    killed = _launch("preprocess_hdtf.sh", *args, "--out_dir", str(out), KILL_RANK_1="1", PYTHONPATH=path)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (out / "frames" / "id_1").is_dir() and not (out / "meta" / "id_1.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "meta").glob("*.json")}

    # the same command again: the finished ids are kept, the rest is done, the bad one named by rank 0
    rerun = _launch("preprocess_hdtf.sh", *args, "--out_dir", str(out))
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    errors = [line for line in rerun.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: 1 of 4 videos failed: id_bad (rank 1): cannot read video")
    assert errors[-1] == (
        "error: hdtf preprocessing: 1 process(es) ended with exit status 2 (rank 0); their messages are above"
    )
    assert len(errors) == 2 and "Traceback" not in rerun.stderr
    assert "[rank 0/2] hdtf: " in rerun.stdout
    assert "[rank 1/2] hdtf: 1 done, 0 already finished, 1 failed" in rerun.stdout  # id_1 again, id_bad
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "meta").glob("*.json") if p.name in finished}
    assert kept == finished  # not redone

    # the same files as one process made, byte for byte (the timing in meta and the per-rank configs aside)
    skip = ("configs/", "random_weights/", "meta/")
    two, one = _tree(out, skip), _tree(single, skip)
    assert sorted(two) == sorted(one) and all(two[k] == one[k] for k in one)
    assert len([k for k in one if k.startswith("keypoints/fa/")]) == 12  # 3 ids x 4 frames
    for meta in (single / "meta").glob("*.json"):
        a, b = json.loads(meta.read_text()), json.loads((out / "meta" / meta.name).read_text())
        assert {**a, "seconds": 0} == {**b, "seconds": 0}


# ----------------------------------------------------------------------------- --batch_file
@pytest.fixture(scope="module")
def render_inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bulk_render")
    write_speech(d / "a.wav", seconds=0.6)
    write_speech(d / "b.wav", seconds=0.52)
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    write_reference_image(d / "ref.png")
    write_reference_video(d / "ref.mp4", seconds=0.3)
    return d


def _jobs(inputs: Path, out: Path) -> Path:
    lines = [
        f"--audio {inputs / 'a.wav'} --ref_image {inputs / 'ref.png'} --out {out / 'a.mp4'}",
        f"--audio {inputs / 'b.wav'} --ref_video {inputs / 'ref.mp4'} --out {out / 'b.mp4'} --seed 3",
        f"--audio {inputs / 'silent.wav'} --ref_image {inputs / 'ref.png'} --out {out / 'silent.mp4'}",
        f"--audio {inputs / 'b.wav'} --ref_image {inputs / 'ref.png'} --out {out / 'c.mp4'}",
    ]
    path = out.with_suffix(".txt")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_two_processes_render_what_one_renders(render_inputs, tmp_path, one_thread, capsys):
    from moditalker.errors import cli_main
    from pipeline.inference import main

    common = ["--config", TINY, "--random_weights", "--device", "cpu", "--clean_work"]
    two = tmp_path / "two"
    proc = _launch("inference.sh", "--batch_file", str(_jobs(render_inputs, two)), *common)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[rank 0/2] batch: 4 jobs" in proc.stdout and "this rank renders lines 1, 3" in proc.stdout
    assert "[rank 1/2] batch: 4 jobs" in proc.stdout and "this rank renders lines 2, 4" in proc.stdout
    assert "[rank 1/2] === job 2 of 2 (line 4)" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "failed: "))]
    assert errors[0].startswith("failed: line 3 (rank 0): ") and "silent" in errors[0]
    assert errors[1:] == [
        "error: 1 of 4 jobs failed (lines 3); see above",
        "error: inference: 1 process(es) ended with exit status 2 (rank 0); their messages are above",
    ]

    one = tmp_path / "one"
    with pytest.raises(SystemExit) as exc:
        cli_main(main, ["--batch_file", str(_jobs(render_inputs, one)), *common])
    assert exc.value.code == 2
    for name in ("a", "b", "c"):
        f1, _ = read_video(one / f"{name}.mp4")
        f2, _ = read_video(two / f"{name}.mp4")
        assert f1.shape == f2.shape and f1.shape[0] in (13, 15) and np.array_equal(f1, f2), name
    assert not (two / "silent.mp4").exists()

    # a rerun skips the rendered videos (same settings) and tries the failed job again
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in two.glob("*.mp4")}
    with pytest.raises(SystemExit):
        cli_main(main, ["--batch_file", str(two.with_suffix(".txt")), *common])
    out = capsys.readouterr().out
    assert "already rendered with the same settings, skipped: line(s) 1, 2, 4" in out
    assert {p: p.stat().st_mtime_ns for p in two.glob("*.mp4")} == before


# ----------------------------------------------------------------------------- evaluation protocol
def test_protocol_two_processes_report_equals_one(tmp_path):
    from data.audio import load_audio

    data = tmp_path / "data"
    data.mkdir()
    speech = load_audio(write_speech(tmp_path / "speech.wav", 2.0))
    frames = reference_frames(13, 96)
    for i in range(2):
        clip = speech[i * 8000 : i * 8000 + 8320]  # 13 frames of audio (0.52 s)
        write_video(data / f"id_{i}.mp4", np.roll(frames, 10 * i, axis=2), audio=clip)
    (tmp_path / "split.txt").write_text("id_1\nid_0\n")
    args = ["--protocol", "hdtf_selfrecon", "--data", str(data), "--split_file", str(tmp_path / "split.txt")]
    args += ["--config", TINY, "--random_weights", "--device", "cpu", "--metrics", "psnr,fid"]
    args += ["--no_progress"]
    proc = _launch("evaluate.sh", *args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0/2] id_0: generated" in proc.stdout and "[rank 1/2] id_1: generated" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # rank 0 writes the report
    # one process with the same threads per process (torchrun gives each rank OMP_NUM_THREADS=1; the
    # Frechet distance's float64 sums and eigenvalues follow the BLAS threads)
    single = _launch("evaluate.sh", *args, "--out", str(tmp_path / "one"), processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["metrics"] == one["metrics"] and np.isfinite(one["metrics"]["fid"])
    assert two["per_video"] == one["per_video"] and list(two["per_video"]) == ["id_1", "id_0"]
    gen_two, gen_one = two["settings"].pop("generation"), one["settings"].pop("generation")
    for key in ("pred", "gt"):
        two["settings"].pop(key), one["settings"].pop(key)
    assert two["settings"] == one["settings"]
    assert gen_two["generated"] == gen_one["generated"] == ["id_1", "id_0"]  # the split file's order
    done = json.loads((tmp_path / "two" / "protocol.json").read_text())["done"]
    assert sorted(done) == ["id_0", "id_1"]  # both ranks recorded theirs


@pytest.mark.slow
def test_protocol_shards_generate_then_one_run_scores_them_all(tmp_path, one_thread, capsys):
    """--shard K --num_shards N (no rendezvous): each job generates its share and stops; the same
    command without them reuses every video and scores them all."""
    from data.audio import load_audio
    from evaluation.evaluate import main

    data = tmp_path / "data"
    data.mkdir()
    speech = load_audio(write_speech(tmp_path / "speech.wav", 2.0))
    frames = reference_frames(13, 96)
    for i in range(3):
        write_video(
            data / f"id_{i}.mp4", np.roll(frames, 10 * i, axis=2), audio=speech[i * 8000 : i * 8000 + 8320]
        )
    (tmp_path / "split.txt").write_text("id_0\nid_1\nid_2\n")
    out = tmp_path / "out"
    args = ["--protocol", "hdtf_selfrecon", "--data", str(data), "--split_file", str(tmp_path / "split.txt")]
    args += ["--config", TINY, "--random_weights", "--device", "cpu", "--metrics", "psnr", "--no_progress"]
    args += ["--out", str(out)]
    with pytest.raises(UserError, match="--overwrite with --num_shards > 1"):
        main([*args, "--shard", "0", "--num_shards", "2", "--overwrite"])
    for k in (1, 0):
        assert main([*args, "--shard", str(k), "--num_shards", "2"]) == {}
        assert f"shard {k}/2: its videos are done" in capsys.readouterr().out
    assert not (out / "report.json").exists()
    assert sorted(json.loads((out / "protocol.json").read_text())["done"]) == ["id_0", "id_1", "id_2"]
    report = main(args)
    gen = report["settings"]["generation"]
    assert gen["generated"] == [] and gen["reused"] == ["id_0", "id_1", "id_2"]
    assert list(report["per_video"]) == ["id_0", "id_1", "id_2"] and (out / "report.json").is_file()


@pytest.mark.parametrize("world, skipped", [("2", True), ("1", False)])
def test_a_bulk_rank_leaves_without_the_native_teardown(tmp_path, world, skipped):
    """A rank of a launched bulk job leaves with os._exit once its output is flushed (gloo's C++
    teardown aborted such a rank now and then, after its work was done); its exit status and output are
    kept. Here the teardown's stand-in is an atexit handler: skipped by a rank, run by one process."""
    code = (
        "import atexit, sys\n"
        "from moditalker.errors import UserError, cli_main\n"
        f"atexit.register(lambda: open({str(tmp_path / 'teardown')!r}, 'w').write('ran'))\n"
        "def main(argv):\n"
        "    print('the work is done')\n"
        "    if argv: raise UserError('one item failed')\n"
        "cli_main(main, sys.argv[1:])\n"
    )
    env = {**os.environ, "MODITALKER_JOB": "test job", "WORLD_SIZE": world, "PYTHONPATH": str(REPO)}
    for args, status in (([], 0), (["fail"], 2)):
        (tmp_path / "teardown").unlink(missing_ok=True)
        run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
        assert run.returncode == status and run.stdout == "the work is done\n", run.stderr
        assert run.stderr == ("error: one item failed\n" if status else "")
        assert (tmp_path / "teardown").exists() is not skipped
