"""--batch_file: several jobs with one model load, every line checked before any work, failures reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data.sample_data import write_reference_image, write_reference_video, write_speech
from data.video import probe
from pipeline.batch import read_jobs
from pipeline.events import STAGES
from pipeline.inference import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "inference_tiny.yaml")
COMMON = ["--config", TINY, "--random_weights", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("batch_inputs")
    silent = d / "silent.wav"
    sf.write(silent, np.zeros(32000, np.float32), 16000)
    return {
        "a": write_speech(d / "a.wav", seconds=1.5),
        "b": write_speech(d / "b.wav", seconds=2.2),
        "silent": silent,
        "video": write_reference_video(d / "ref.mp4", seconds=1.0),
        "image": write_reference_image(d / "ref.png"),
    }


def _jobs(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_runs_every_job_with_one_load_of_each_network(inputs, tmp_path, capsys, one_thread):
    jobs = _jobs(
        tmp_path / "jobs.txt",
        "# two videos, one model load",
        f"--audio {inputs['a']} --ref_video {inputs['video']} --out '{tmp_path / 'out dir' / 'a.mp4'}'",
        "",
        f"--audio {inputs['b']} --ref_image {inputs['image']} --out {tmp_path / 'b.mp4'} --steps 3 "
        "mtov.batch_size=2  # a comment",
    )
    result = main(["--batch_file", str(jobs), *COMMON, "--clean_work"])
    assert [j.line for j in result.jobs] == [2, 4] and not result.failed
    for job, seconds in zip(result.jobs, (1.5, 2.2), strict=True):
        info = probe(job.out)
        assert info["video"]["frames"] == round(25 * seconds) and info["audio"] is not None
        assert job.video_seconds == pytest.approx(round(25 * seconds) / 25)
        assert not job.work_dir.exists()  # --clean_work, from the command line, for every job
    models = result.models
    assert {"hubert", "atom", "mtov"} <= set(models.loads) and len(models.loads) >= 5  # + FAN, 3DMM
    assert all(n == 1 for n in models.loads.values()), models.loads  # built once for both jobs
    # (a job with another --seed builds its own random networks: they are seeded by it)
    assert sum(models.hits.values()) >= len(models.loads)
    first, second = result.jobs
    assert first.load_seconds > 0 and second.load_seconds == 0
    assert first.load_seconds == pytest.approx(sum(models.seconds.values()))
    out = capsys.readouterr().out
    assert "=== job 2 of 2 (line 4)" in out and "networks built: " in out
    table = out[out.index("batch timings") :].splitlines()
    assert table[2].split()[0] == "2" and table[3].split()[0] == "4"
    # the stages reused, from each job's stage events: different inputs, nothing reused
    assert first.stages == dict.fromkeys(STAGES, False) and table[2].split()[5] == "0/8"


def test_a_job_that_fails_while_running_does_not_stop_the_others(inputs, tmp_path, capsys, one_thread):
    jobs = _jobs(
        tmp_path / "jobs.txt",
        f"--audio {inputs['silent']} --ref_image {inputs['image']} --out {tmp_path / 'silent.mp4'}",
        f"--audio {inputs['a']} --ref_image {inputs['image']} --out {tmp_path / 'a.mp4'}",
    )
    with pytest.raises(SystemExit) as exc:
        from moditalker.errors import cli_main

        cli_main(main, ["--batch_file", str(jobs), *COMMON])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "error: 1 of 2 jobs failed (lines 1); see above"
    assert "FAILED: " in captured.out and "silent" in captured.out
    assert not (tmp_path / "silent.mp4").exists() and probe(tmp_path / "a.mp4")["video"]["frames"] == 38


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [
                "--audio {a} --ref_image {image} --out {out}/x.mp4",
                "--audio {tmp}/nope.wav --ref_image {image} --out {out}/y.mp4",
            ],
            "line 2: media file not found",
        ),
        (
            [
                "--audio {a} --ref_image {image} --out {out}/x.mp4",
                "--audio {b} --ref_video {video} --out {out}/x.mp4",
            ],
            "line 2: writes",
        ),
        (["--audio {a} --ref_image {image} --out {out}/x.mp4 --stepz 3"], "line 1: unrecognized arguments"),
        (["--audio {a} --ref_image {image} --out '{out}/x.mp4"], "line 1: No closing quotation"),
        (["# nothing but a comment", ""], "has no job"),
        (["--audio {a} --ref_image {image} --out {out}/x.mp4 --batch_file {tmp}/j.txt"], "inside a job file"),
    ],
)
def test_bad_lines_stop_the_batch_before_any_work(inputs, tmp_path, capsys, lines, message):
    out = tmp_path / "out"
    fill = {k: str(v) for k, v in inputs.items()} | {"out": str(out), "tmp": str(tmp_path)}
    jobs = _jobs(tmp_path / "jobs.txt", *(line.format(**fill) for line in lines))
    from moditalker.errors import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(main, ["--batch_file", str(jobs), *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()  # nothing ran, nothing was written


def test_read_jobs_keeps_quoted_paths_and_line_numbers(tmp_path):
    jobs = read_jobs(_jobs(tmp_path / "j.txt", "", "--audio 'my talk.wav' --out o.mp4 # note", "  # x"))
    assert (
        len(jobs) == 1 and jobs[0].line == 2 and jobs[0].argv == ["--audio", "my talk.wav", "--out", "o.mp4"]
    )


def test_a_job_may_not_read_what_another_job_writes(inputs, tmp_path, capsys):
    from data.video import write_video
    from moditalker.errors import cli_main

    talk = write_video(tmp_path / "talk.mp4", np.zeros((25, 32, 32, 3), np.uint8), audio=np.ones(16000) * 0.1)
    before = talk.stat().st_mtime_ns
    jobs = _jobs(
        tmp_path / "jobs.txt",
        f"--audio {inputs['a']} --ref_image {inputs['image']} --out {talk} --overwrite",
        f"--audio {talk} --ref_image {inputs['image']} --out {tmp_path / 'y.mp4'}",
    )
    with pytest.raises(SystemExit):
        cli_main(main, ["--batch_file", str(jobs), *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {jobs}: line 2: reads {talk}, which line 1 writes"]
    assert talk.stat().st_mtime_ns == before and not (tmp_path / "y.mp4").exists()


def test_a_finished_job_counts_as_done_only_while_its_inputs_are_older(tmp_path):
    """A batch re-run skips a job whose video exists with the same settings, unless an input (same path,
    new contents) was written after the video."""
    import os

    from omegaconf import OmegaConf

    from pipeline.batch import already_rendered

    audio, ref = tmp_path / "a.wav", tmp_path / "face.png"
    audio.write_bytes(b"audio")
    ref.write_bytes(b"face")
    out = tmp_path / "out" / "talk.mp4"
    cfg = OmegaConf.create(
        {"audio": str(audio), "ref_video": None, "ref_image": str(ref), "out": str(out), "preview": False,
         "overwrite": False, "random_weights": True, "device": "cpu", "seed": 0}
    )  # fmt: skip
    out.parent.mkdir()
    out.write_bytes(b"video")
    OmegaConf.save(cfg, out.with_suffix(".yaml"))
    t = out.stat().st_mtime
    os.utime(audio, (t - 10, t - 10))
    os.utime(ref, (t - 10, t - 10))
    assert already_rendered(cfg)
    assert not already_rendered(OmegaConf.merge(cfg, {"seed": 1}))  # other settings: not this job
    os.utime(ref, (t + 10, t + 10))  # the face replaced after the render
    assert not already_rendered(cfg)
