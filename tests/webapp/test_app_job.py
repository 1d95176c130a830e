"""webapp.job and the app's command line, without a server: the day-old clean-up, the progress
and the log made from the stage events, a request's config (as the command line resolves the same
flags), and the errors that stop the app before it serves."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moditalker.errors import UserError, cli_main
from pipeline.events import STAGES, TIMING_ORDER, StageLog, StageTimes, Subscribers
from pipeline.settings import check_settings
from webapp.app import build_parser
from webapp.app import main as app_main
from webapp.job import APP_MARKER, DAY, AppFolders, PageJob, PageProgress, clean_old

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "inference_tiny.yaml")


def _touch(path: Path, age: float, now: float, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (now - age, now - age))
    return path


def _age(folder: Path, age: float, now: float) -> None:
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (now - age, now - age))


def test_app_folder_is_new_empty_or_marked(tmp_path):
    """The app deletes old files in its folder, so it refuses a folder with somebody else's files
    (here a training folder with its own runs/) and leaves it as it was; its own folder comes back."""
    other = tmp_path / "checkout"
    _touch(other / "runs" / "atom" / "model_last.pth", 2 * DAY, time.time())
    with pytest.raises(UserError, match=r"already holds files and is not a folder of this app"):
        AppFolders(other).create()
    assert (other / "runs" / "atom" / "model_last.pth").is_file() and not (other / APP_MARKER).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    f = AppFolders(empty).create()
    assert f.marker.is_file() and f.uploads.is_dir()
    _touch(f.runs / "20250101-000000-000" / "talking_head.mp4", 0.0, time.time())
    assert AppFolders(empty).create() == f  # its own folder, with results in it
    f.marker.unlink()  # an app folder made before the marker: its four folders, examples/ among them
    assert AppFolders(empty).create().marker.is_file()


def test_clean_old_removes_whole_units_older_than_a_day(tmp_path):
    f = AppFolders(tmp_path / "app").create()
    now = time.time()
    old, fresh = 2 * DAY, 3600.0
    _touch(f.uploads / "aaa" / "speech.wav", old, now)
    _touch(f.uploads / "bbb" / "face.png", fresh, now)
    _touch(f.runs / "20250101-000000-000" / "talking_head.mp4", old, now)
    _touch(f.runs / "20250101-000000-000" / "talking_head.yaml", old, now)
    _touch(f.runs / "20250102-000000-000" / "talking_head.mp4", fresh, now)
    # a stage entry whose files are old but one was written recently stays whole
    _touch(f.work / "shared" / "recon-1" / "coeff.npy", old, now)
    _touch(f.work / "shared" / "recon-1" / ".done", fresh, now)
    _touch(f.work / "shared" / "hubert-2" / "hubert.npy", old, now)
    _touch(f.work / "shared" / "hubert-2" / ".done", old, now)
    _touch(f.work / "random-seed3" / "mtov-3" / "frames.npy", old, now)
    _touch(f.examples / "speech.wav", old, now)
    for folder in (f.uploads / "aaa", f.runs / "20250101-000000-000", f.work / "shared" / "hubert-2"):
        _age(folder, old, now)
    _age(f.work / "random-seed3", old, now)

    removed = clean_old(f, DAY, now=now)
    names = sorted(str(p.relative_to(f.root)) for p in removed)
    assert names == [
        "runs/20250101-000000-000",
        "uploads/aaa",
        "work/random-seed3/mtov-3",
        "work/shared/hubert-2",
    ]
    assert (f.uploads / "bbb" / "face.png").is_file() and (f.runs / "20250102-000000-000").is_dir()
    assert (f.work / "shared" / "recon-1" / "coeff.npy").is_file()  # never half an entry
    assert not (f.work / "random-seed3").exists()  # an emptied work folder goes too
    assert (f.examples / "speech.wav").is_file()  # the examples stay
    assert clean_old(f, DAY, now=now) == []


def test_progress_follows_the_stage_events():
    reports = []
    progress = PageProgress(lambda fraction, text: reports.append((fraction, text)))
    progress.started("reference")
    progress.finished("reference", cached=False, seconds=0.1, entry=Path("work/reference-1"))
    progress.started("landmarks")
    progress.finished("render", cached=False, seconds=0.01)  # a part of a stage: no step of its own
    progress.started("mtov")
    progress.progress("mtov", 0, 50)
    progress.progress("mtov", 32, 50)
    progress.finished("mtov", cached=False, seconds=2.0)
    progress.started("write")
    progress.finished("write", cached=False, seconds=0.2)
    n = len(STAGES)
    assert reports == [
        (0.0, f"1/{n} reference: reading the reference"),
        (1 / n, f"2/{n} landmarks: face landmarks"),
        (6 / n, f"7/{n} mtov: MToV: video frames"),
        (6 / n, f"7/{n} mtov: MToV: video frames, 0 of 50 frames"),
        ((6 + 32 / 50) / n, f"7/{n} mtov: MToV: video frames, 32 of 50 frames"),
        (7 / n, f"8/{n} write: writing the mp4"),
        (1.0, "done"),
    ]


def test_the_log_and_the_timing_table_are_made_from_the_events():
    lines, now = [], [0.0]
    log = StageLog(lines.append, every=30.0, clock=lambda: now[0])
    times = StageTimes()
    events = Subscribers(log, times)
    events.finished("hubert", cached=True, seconds=0.01, entry=Path("/w/hubert-2"))
    events.finished("atom", cached=False, seconds=1.5, entry=Path("/w/atom-3"))
    events.progress("mtov", 100, 500)  # resumed at frame 100: the rate counts the frames made now
    for t, done in ((10.0, 200), (31.0, 300), (40.0, 400), (62.0, 500)):
        now[0] = t
        events.progress("mtov", done, 500)
    events.finished("render", cached=False, seconds=0.5)
    events.finished("mtov", cached=False, seconds=60.0, entry=Path("/w/mtov-4"))
    assert lines == [
        "[hubert] reused hubert-2 (0.01 s)",
        "[atom] computed in 1.50 s -> /w/atom-3",
        "[mtov] 300/500 frames (60 %), 0:00:31 so far, ~0:00:31 left",
        "[mtov] computed in 60.00 s -> /w/mtov-4",
    ]
    table = times.table(50, 25, 70.0, {"mtov": "(note)"})
    assert table[0] == "stage timings (50 frames = 2.00 s of video):"
    assert [line.split()[0] for line in table[1:]] == ["hubert", "atom", "render", "mtov", "total"]
    assert table[1].endswith("(reused)") and table[4].endswith("s per s of video  (note)")
    assert TIMING_ORDER.index("render") == TIMING_ORDER.index("mtov") - 1


def test_request_config_is_the_command_lines(tmp_path):
    job = PageJob(AppFolders(tmp_path / "app"), config=TINY, device="cpu", random_weights=True)
    assert job.defaults() == dict(seed=0, steps=4, guidance=2.0, mtov_steps=8, start_ratio=0.25, batch_size=2)
    out = tmp_path / "o.mp4"
    cfg = job.request_config("a.wav", "v.mp4", None, out, seed=7.0, steps=3.0, guidance=1.5, start_ratio=0.5)
    assert cfg.audio == "a.wav" and cfg.ref_video == "v.mp4" and cfg.ref_image is None and cfg.out == str(out)
    assert cfg.seed == 7 and cfg.atom.seed == 7 and cfg.mtov.seed == 7  # stage seeds follow the page's
    assert cfg.atom.steps == 3 and isinstance(cfg.atom.steps, int) and cfg.atom.guidance_weight == 1.5
    assert cfg.mtov.start_ratio == 0.5 and cfg.mtov.sampling_timesteps == 8 and cfg.mtov.batch_size == 2
    assert cfg.preview is True and cfg.random_weights is True and cfg.device == "cpu"
    assert cfg.work_dir == str(job.folders.work / "random-seed7")
    check_settings(cfg)
    bad = job.request_config("a.wav", "v.mp4", None, out, steps=2.5)
    with pytest.raises(UserError, match=r"^atom.steps must be an integer, got 2.5$"):
        check_settings(bad)


def test_the_page_settings_come_from_the_schema_and_win_over_the_apps_overrides(tmp_path):
    from pipeline.settings import SETTINGS
    from webapp.job import PAGE_SETTINGS, page_name

    assert [page_name(k) for k in PAGE_SETTINGS] == [
        "seed",
        "steps",
        "guidance",
        "mtov_steps",
        "start_ratio",
        "batch_size",
    ]  # the endpoint's parameter names, as before
    assert all(SETTINGS[k].label for k in PAGE_SETTINGS)
    job = PageJob(
        AppFolders(tmp_path / "app"),
        config=TINY,
        device="cpu",
        random_weights=True,
        overrides=("atom.steps=3", "mtov.start_ratio=0.4"),
    )
    assert job.defaults()["steps"] == 3 and job.defaults()["start_ratio"] == 0.4
    out = tmp_path / "o.mp4"
    assert job.request_config("a.wav", "v.mp4", None, out).atom.steps == 3  # the app's override
    cfg = job.request_config("a.wav", "v.mp4", None, out, steps=5.0, start_ratio=0.5)
    assert cfg.atom.steps == 5 and cfg.mtov.start_ratio == 0.5  # the request's own
    with pytest.raises(TypeError, match="not a setting of the page: eta"):
        job.request_config("a.wav", "v.mp4", None, out, eta=0.5)


def test_a_failed_request_leaves_no_run_folder(tmp_path):
    job = PageJob(AppFolders(tmp_path / "app"), config=TINY, device="cpu", random_weights=True)
    with pytest.raises(UserError, match="a reference is required"):
        job(str(REPO / "assets" / "sample" / "speech.wav"), None, None)
    with pytest.raises(UserError, match="no/such.wav"):
        job("no/such.wav", str(tmp_path / "v.mp4"), None)
    assert list(job.folders.runs.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "no/such.yaml"], "no/such.yaml"),
        (["atom.stesp=3"], "unknown setting atom.stesp; see configs/inference.yaml"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--port", "0"], "--port must be in 1..65535, got 0"),
        (["--port", "web"], "argument --port: invalid int value: 'web'"),
    ],
)
def test_the_app_stops_with_one_line_before_serving(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(app_main, argv + ["--out_dir", str(tmp_path / "app")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "app").exists()  # refused before its folder was made


def test_the_app_refuses_a_file_as_its_folder(tmp_path):
    (tmp_path / "app").write_text("notes\n")
    with pytest.raises(UserError, match=r"--out_dir .*app is a file, not a folder"):
        app_main(["--config", TINY, "--random_weights", "--out_dir", str(tmp_path / "app")])
    assert (tmp_path / "app").read_text() == "notes\n"
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / APP_MARKER).mkdir()
    with pytest.raises(UserError, match=f"{APP_MARKER} is not a file"):
        app_main(["--config", TINY, "--random_weights", "--out_dir", str(tmp_path / "marked")])


def test_app_flags_default_to_this_machine_and_no_share_link():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.out_dir) == ("127.0.0.1", 7860, False, "outputs/app")
    assert args.keep_hours == 24 and args.random_weights is False


def test_scripts_app_sh_serves_the_page_until_interrupted(tmp_path):
    """The launcher as a user runs it: the page comes up on the port asked for, only on 127.0.0.1, and
    Ctrl-C (SIGINT) stops it."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from app_server import free_port

    port = free_port()
    cmd = ["bash", str(REPO / "scripts" / "app.sh"), "--random_weights", "--config", TINY, "--device", "cpu"]
    cmd += ["--port", str(port), "--out_dir", str(tmp_path / "app")]
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
    # the output goes to a file, not a pipe: a pipe nobody reads any more once the URL line has come
    # can fill up and block the server's own shutdown message, so the process would never end
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        lines: list[str] = []
        while proc.poll() is None and time.monotonic() < deadline:  # the URL line comes once it answers
            lines = log.read_text().splitlines()
            if any(line.startswith("page: ") for line in lines):
                break
            time.sleep(0.2)
        page = [line for line in lines if line.startswith("page: ")]
        assert page and page[0].strip().startswith(f"page: http://127.0.0.1:{port}/"), log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        assert (tmp_path / "app" / "examples" / "reference.png").is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) in (0, 130), log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_page_errors_name_the_page_fields_not_flags():
    from omegaconf import OmegaConf

    from pipeline.settings import DEFAULTS
    from pipeline.validate import validate
    from webapp.job import page_text

    with pytest.raises(UserError) as missing:
        validate(OmegaConf.create({**DEFAULTS, "audio": "a.wav", "out": "o.mp4"}))
    assert "--ref_video" in str(missing.value)  # the command line's words
    assert page_text(str(missing.value)) == "a reference is required: a face video or a face photo"
    assert page_text("give either --ref_video or --ref_image, not both") == (
        "give either the face video or the face photo, not both"
    )
    assert page_text("atom.steps must be >= 1, got 0") == "atom.steps must be >= 1, got 0"
    assert page_text("--steps_x and --seeds stay") == "--steps_x and --seeds stay"
