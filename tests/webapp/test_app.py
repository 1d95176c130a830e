"""The web app through its API, as programs call it: gradio_client against the app started in-process
(tests/app_server.py: tiny config, random weights, a free port). The mp4s it returns, the
one-line errors (the command line's text) with the server still serving, warm networks (a second
request loads none), the queue (two requests at once both finish, one waits its turn) and the
progress the page shows."""

from __future__ import annotations

import time

import pytest
import torch
from app_server import running_app

from data.video import probe
from moditalker.constants import FPS
from moditalker.errors import cli_main
from pipeline.inference import main as inference_main

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app")) as server:
        yield server


KINDS = ("face_alignment", "deep3d", "hubert", "atom", "mtov")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the server's worker thread shares the setting


@pytest.fixture(scope="module")
def client(app_server, tmp_path_factory):
    import huggingface_hub.constants

    # the client's own look-ups off, as the app sets them (HF_HUB_OFFLINE is read when the hub is imported)
    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield Client(
        app_server.url,
        verbose=False,
        download_files=str(tmp_path_factory.mktemp("downloads")),
        analytics_enabled=False,
    )
    huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _generate(client, audio, video=None, photo=None, seed=0, **settings):
    return client.predict(
        audio=handle_file(str(audio)),
        ref_video=handle_file(str(video)) if video else None,
        ref_image=handle_file(str(photo)) if photo else None,
        seed=seed,
        api_name="/generate",
        **settings,
    )


def _check_mp4(path, seconds: float, width: int = 256) -> None:
    info = probe(path)
    v, a = info["video"], info["audio"]
    assert v["fps"] == pytest.approx(FPS) and (v["width"], v["height"]) == (width, 256)
    assert v["frames"] == round(seconds * FPS) or abs(v["frames"] - seconds * FPS) <= 1
    assert a is not None and a["sample_rate"] > 0
    assert info["duration"] == pytest.approx(seconds, abs=0.1)


def test_the_api_is_named_generate(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/generate"]  # the tab-clearing helpers stay private
    params = api["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names == ["audio", "ref_video", "ref_image", "seed", "steps", "guidance"] + [
        "mtov_steps",
        "start_ratio",
        "batch_size",
    ]
    optional = {p["parameter_name"] for p in params if p["parameter_has_default"]}
    assert {"steps", "guidance", "mtov_steps", "start_ratio", "batch_size"} <= optional
    assert len(api["named_endpoints"]["/generate"]["returns"]) == 4


def test_generate_the_bundled_sample(client, app_server):
    from data.sample_data import SAMPLE_SPEECH

    mp4, preview, timings, log = _generate(client, SAMPLE_SPEECH, video=app_server.inputs["video"])
    assert mp4.endswith("talking_head.mp4") and preview.endswith("talking_head_preview.mp4")
    _check_mp4(mp4, 4.18)
    _check_mp4(preview, 4.18, width=512)  # landmarks | generated
    for stage in ("reference", "landmarks", "recon", "hubert", "atom", "align", "mtov", "write", "total"):
        assert timings[stage] >= 0
    assert "stage timings" in log and "[atom] computed" in log
    runs = sorted(app_server.job.folders.runs.iterdir())
    assert runs and (runs[-1] / "talking_head.mp4").is_file()  # outputs stay under --out_dir


def _cli_error(argv, capsys) -> str:
    """The one line ``scripts/inference.sh ARGV`` prints, without its ``error: `` prefix."""
    capsys.readouterr()  # what the server printed so far
    with pytest.raises(SystemExit):
        cli_main(inference_main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0][len("error: ") :]


def test_bad_input_is_one_line_and_the_next_request_loads_no_network(client, app_server, tmp_path, capsys):
    inputs, models = app_server.inputs, app_server.job.models
    if set(models.kinds()) != set(KINDS):  # run alone: warm the networks first
        _generate(client, inputs["speech"], video=inputs["video"])
    loads, hits = dict(models.loads), dict(models.hits)

    # audio without sound: the command line's message for the same file, the upload's path in front
    with pytest.raises(AppError) as bad:
        _generate(client, inputs["video"], video=inputs["video"])
    message = str(bad.value)
    cli = _cli_error(["--audio", str(inputs["video"]), "--ref_video", str(inputs["video"])]
                     + ["--out", str(tmp_path / "o.mp4")], capsys)  # fmt: skip
    assert "\n" not in message and message.endswith(cli.split(str(inputs["video"]))[1])
    assert message.split(" has no audio track")[0].endswith("ref.mp4")

    # a setting out of range: word for word what `--steps 0` prints
    with pytest.raises(AppError) as bad_steps:
        _generate(client, inputs["speech"], video=inputs["video"], steps=0)
    cli_argv = ["--audio", str(inputs["speech"]), "--ref_video", str(inputs["video"]), "--steps", "0"]
    assert str(bad_steps.value) == _cli_error(cli_argv + ["--out", str(tmp_path / "o.mp4")], capsys)
    assert str(bad_steps.value) == "atom.steps must be >= 1, got 0"

    # the server still serves; new audio and a new reference: every stage runs, no network is loaded
    mp4, _preview, _timings, log = _generate(client, inputs["speech2s"], photo=inputs["photo"])
    _check_mp4(mp4, 2.0)
    for stage in ("reference", "landmarks", "recon", "hubert", "atom", "align"):
        assert f"[{stage}] computed" in log
    assert dict(models.loads) == loads
    assert all(models.hits[k] == hits.get(k, 0) + 1 for k in KINDS), models.hits


def test_two_requests_at_once_both_finish_one_at_a_time(client, app_server):
    inputs = app_server.inputs
    jobs = [
        client.submit(
            audio=handle_file(str(inputs["speech2s"])),
            ref_video=handle_file(str(inputs["video"])),
            ref_image=None,
            seed=seed,  # new seeds: every stage runs
            # one clip per batch and 10 UNet passes per clip: the MToV stage lasts long enough (and
            # reports often enough) to be seen by the polling below even on an idle machine,
            # where the tiny stage once finished between two polls
            batch_size=1,
            mtov_steps=40,
            api_name="/generate",
        )
        for seed in (11, 12)
    ]
    seen: list[tuple] = []
    deadline = time.time() + 240
    while not all(j.done() for j in jobs) and time.time() < deadline:
        seen.append(tuple((s.code, s.rank) for s in (j.status() for j in jobs)))
        time.sleep(0.01)
    results = [j.result(timeout=60) for j in jobs]
    for mp4, *_ in results:
        _check_mp4(mp4, 2.0)
    assert results[0][0] != results[1][0]
    busy = (Status.PROCESSING, Status.PROGRESS, Status.ITERATING)
    # one ran while the other waited in the queue, its position shown (rank 0: next)
    assert any({c for c, _ in pair} >= {Status.IN_QUEUE} and any(c in busy for c, _ in pair) for pair in seen)
    assert any(c == Status.IN_QUEUE and rank == 0 for pair in seen for c, rank in pair)
    # the bar follows the stage events and the MToV clips: every progress message the server sent (the
    # client queues them all), each one the bar the page shows at that moment.
    # Each job's stage lines come in order. Only the stages that last long enough to meet one of Gradio's
    # progress sends are asserted: recon (about 1 s) and MToV (about 1.5 s). The short ones (reference,
    # 0.04 s) and the closing "done" line (the event ends right after it) may fall between two sends.
    for job in jobs:
        shown = [[(str(u.desc), u.progress) for u in update.progress_data] for update in _updates(job)
                 if getattr(update, "progress_data", None)]  # fmt: skip
        assert all(len(bars) == 1 for bars in shown), shown  # one bar: the page's own
        lines = [bars[0] for bars in shown]
        numbers = [int(text.split("/")[0]) for text, _ in lines if text[0].isdigit()]
        assert numbers == sorted(numbers) and {3, 7} <= set(numbers), shown
        fractions = [f for _, f in lines]
        assert fractions == sorted(fractions), shown
        # while MToV runs, its frames: one clip per batch, 16 frames each, of the 50 (2 s at 25 fps)
        frames = [text for text, _ in lines if text.startswith("7/8 mtov: MToV: video frames, ")]
        assert any(text.endswith(f"{k} of 50 frames") for text in frames for k in (16, 32, 48)), shown


def _updates(job) -> list:
    """Every update the client received for ``job`` (gradio_client queues them all for async readers)."""
    queue, out = job.communicator.updates, []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_no_connection_leaves_this_machine(app_server):
    assert app_server.outside() == []
    assert any(h in ("127.0.0.1", "localhost") for h in app_server.connections)
