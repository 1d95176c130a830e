"""The web page as a service, tried as a caller and as an attacker would (tiny config, random weights,
a server in this process on a free port with ``--max_queue 1`` and ``--max_upload_mb 1``):

* what a caller gets back (run log, timings, errors) names no folder of the server;
* an upload over the limit is refused while it arrives (HTTP 413, one line), nothing of it is stored;
* Gradio's file routes serve only the page's folders: not absolute paths elsewhere, not ``..`` out of
  them, not symlinks placed in the upload folder, not the stage cache; an input path outside the upload
  folder is refused;
* a burst of requests over the queue: each one a result or a clear refusal, none lost or hung;
* ``--host 0.0.0.0`` warns, ``--auth USER:PASS`` asks for a login;
* (``RUN_SLOW=1``) memory stays bounded over 50 requests.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from app_server import TINY, free_port

pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from moditalker.errors import UserError, cli_main  # noqa: E402

MAX_QUEUE, MAX_UPLOAD_MB = 1, 1.0
ABSOLUTE = re.compile(r"(?<![\w.:/~\-])/[^\s'\"]+")  # a path from the root (not a URL, not "1/2")


@contextlib.contextmanager
def _server(root: Path, job_class=None, **serve_args):
    from webapp.app import build_app, prepare_environment, serve
    from webapp.job import AppFolders, PageJob

    names = ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "HF_HUB_OFFLINE")
    names += ("HF_HUB_DISABLE_TELEMETRY",)
    saved = {k: os.environ.get(k) for k in names}
    demo = None
    try:
        folders = AppFolders(root / "app").create()
        prepare_environment(folders)
        job = (job_class or PageJob)(
            folders,
            config=TINY,
            device="cpu",
            random_weights=True,
            max_upload_mb=serve_args.get("max_upload_mb"),
        )
        demo = build_app(job)
        url = serve(demo, job, port=free_port(), block=False, quiet=True, **serve_args)
        yield url, job
    finally:
        if demo is not None:
            demo.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def inputs(speech_and_photo, tmp_path_factory) -> dict[str, Path]:
    """The sample speech and photo, and an upload over the page's limit."""
    big = _big(tmp_path_factory.mktemp("big") / "big.wav", int(1.5 * 1024 * 1024))
    return {**speech_and_photo, "big": big}


def _big(path: Path, size: int) -> Path:
    path.write_bytes(b"RIFF" + bytes(size - 4))
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with _server(tmp_path_factory.mktemp("service"), max_queue=MAX_QUEUE, max_upload_mb=MAX_UPLOAD_MB) as s:
        yield s
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(app, tmp_path_factory):
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield Client(
        app[0], verbose=False, download_files=str(tmp_path_factory.mktemp("dl")), analytics_enabled=False
    )
    huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _submit(client, audio, photo, seed=0, **settings):
    return client.submit(
        audio=handle_file(str(audio)),
        ref_video=None,
        ref_image=handle_file(str(photo)),
        seed=seed,
        api_name="/generate",
        **settings,
    )


def _server_paths(job) -> list[str]:
    from moditalker.fileio import REPO_ROOT

    root = job.folders.root
    return [str(root.resolve()), str(root.absolute()), str(REPO_ROOT), str(Path.home()), "/tmp"]


def _assert_no_server_path(text: str, job) -> None:
    for folder in _server_paths(job):
        assert folder not in text, (folder, text)
    assert not ABSOLUTE.findall(text), ABSOLUTE.findall(text)


# ----------------------------------------------------------------------------- what a caller sees
def test_log_timings_and_errors_name_no_server_folder(client, app, inputs):
    url, job = app
    mp4, _preview, timings, log = _submit(client, inputs["speech"], inputs["photo"]).result(timeout=300)
    assert Path(mp4).is_file() and "[mtov] computed" in log and "stage timings" in log
    _assert_no_server_path(log, job)
    assert "face.png" in log or "speech.wav" in log  # files are named by their base names
    assert all(isinstance(k, str) and "/" not in k for k in timings)
    # an error about an uploaded file: its base name, not the upload folder
    with pytest.raises(Exception) as bad:  # noqa: PT011 - gradio_client's AppError
        _submit(client, inputs["photo"], inputs["photo"]).result(timeout=120)
    message = str(bad.value)
    assert "face.png" in message and "\n" not in message
    _assert_no_server_path(message, job)
    # the server's own log still has the full paths (only what goes back to the caller is cut)
    assert (
        job.public(f"cannot read {job.folders.uploads.resolve()}/abcd/my face.png")
        == "cannot read my face.png"
    )


def _file_refs(data) -> list[dict]:
    if isinstance(data, dict):
        return (
            [data] if "path" in data and "url" in data else [r for v in data.values() for r in _file_refs(v)]
        )
    return [r for v in data for r in _file_refs(v)] if isinstance(data, list) else []


def test_result_references_name_the_run_not_a_server_path(app, inputs):
    """Through the raw HTTP API (what any caller sees): an upload is answered as ``uploads/<hash>/<file>``
    and taken back by that name, the two videos come back as ``runs/<id>/<file>`` (reference path and
    url), both served by those names; the page and its configuration (the examples) name no folder of
    the server either."""
    import json

    url, job = app
    for page in ("", "config", "gradio_api/info"):  # (they hold routes like /gradio_api: folders only)
        text = httpx.get(f"{url}{page}", timeout=30).text
        assert not [folder for folder in _server_paths(job) if folder in text], page

    def upload(path: Path) -> dict:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, path.read_bytes())}, timeout=60)
        (name,) = r.json()
        assert re.fullmatch(rf"uploads/\w+/{path.name}", name), name
        served = httpx.get(f"{url}gradio_api/file={name}", timeout=30)
        assert served.status_code == 200 and served.content == path.read_bytes()
        return {"path": name, "meta": {"_type": "gradio.FileData"}}

    args = [upload(inputs["speech"]), None, upload(inputs["photo"]), 0, None, None, None, None, None]
    event = httpx.post(f"{url}gradio_api/call/generate", json={"data": args}, timeout=60).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=300).text
    assert "event: complete" in stream, stream[-500:]
    _assert_no_server_path(stream.replace(url, "URL/"), job)
    data = json.loads(stream.split("event: complete\ndata: ")[1].splitlines()[0])
    refs = _file_refs(data)
    assert [Path(r["path"]).name for r in refs] == ["talking_head.mp4", "talking_head_preview.mp4"]
    for ref in refs:
        assert re.fullmatch(r"runs/\d{8}-\d{6}-\d{3}/talking_head(_preview)?\.mp4", ref["path"]), ref
        assert ref["url"] == f"{url}gradio_api/file={ref['path']}", ref
        got = httpx.get(ref["url"], timeout=30)
        assert got.status_code == 200 and got.content == (job.folders.root / ref["path"]).read_bytes()
    # only result names are mapped: nothing else of the app folder by a relative name
    npy = next(job.folders.work.rglob("*.npy")).relative_to(job.folders.root)
    run = Path(refs[0]["path"]).parent
    for name in (
        f"runs/../{npy}",
        f"{run}/../../{npy}",
        f"runs/%2e%2e/{npy}",
        f"{run}/x/y",
        str(npy),
        "runs/.x/y",
        f"uploads/../{npy}",
        f"uploads/x/../../{npy}",
        f"uploads/%2e%2e/{npy}",
        "uploads/x",
    ):
        r = httpx.get(f"{url}gradio_api/file={name}", timeout=30)
        assert r.status_code in (403, 404) and b"NUMPY" not in r.content[:8], (name, r.status_code)


def test_a_request_body_over_the_limit_is_refused_before_it_is_read(app):
    """A JSON request over MAX_REQUEST_BYTES gets 413: at once when its length says so, and after the
    limit (the rest never sent) when it comes in chunks."""
    import socket
    from urllib.parse import urlparse

    from webapp.app import MAX_REQUEST_BYTES

    url, _job = app
    where = urlparse(url)

    def answer(head: bytes, body: bytes) -> bytes:
        with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
            sock.sendall(head + body)  # and never the rest of the body
            got = b""
            while b"\r\n\r\n" not in got or not got.endswith(b")"):  # the status, then the message
                more = sock.recv(4096)
                if not more:
                    break
                got += more
            return got

    head = f"POST /gradio_api/call/generate HTTP/1.1\r\nHost: {where.netloc}\r\n"
    head += "Content-Type: application/json\r\n"
    declared = answer(f"{head}Content-Length: {100 * MAX_REQUEST_BYTES}\r\n\r\n".encode(), b'{"data": [')
    assert declared.startswith(b"HTTP/1.1 413"), declared
    chunk = b"x" * 65536
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_REQUEST_BYTES // len(chunk) + 1)
    )
    chunked = answer(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(), chunks)
    assert chunked.startswith(b"HTTP/1.1 413") and b"request body over" in chunked, chunked
    small = httpx.post(f"{url}gradio_api/call/generate", json={"data": [None, None, None, 0]}, timeout=30)
    assert small.status_code != 413


# ----------------------------------------------------------------------------- upload limit
def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_upload_over_the_limit_is_refused_before_it_is_stored(app, inputs):
    url, job = app
    before = _listing(job.folders.root)
    with open(inputs["big"], "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.wav", f, "audio/wav")}, timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text and "\n" not in r.text.strip()
    assert _listing(job.folders.root) == before  # nothing of it was kept
    assert not [s for s in _listing(job.folders.uploads).values() if s > MAX_UPLOAD_MB * 1024 * 1024]
    # a file under the limit is taken
    with open(inputs["speech"], "rb") as f:
        ok = httpx.post(
            f"{url}gradio_api/upload", files={"files": ("speech.wav", f, "audio/wav")}, timeout=60
        )
    assert ok.status_code == 200 and (job.folders.root / ok.json()[0]).is_file()  # named uploads/...
    # the job refuses a file over the limit that reached it another way (a path)
    with pytest.raises(UserError, match=r"audio big\.wav is 1\.5 MB, over the page's limit of 1 MB"):
        job(str(inputs["big"]), None, str(inputs["photo"]))


# ----------------------------------------------------------------------------- file routes
def test_file_routes_serve_nothing_outside_the_page_folders(client, app, inputs, tmp_path):
    url, job = app
    f = job.folders
    if not any(f.work.rglob("*.npy")):
        _submit(client, inputs["speech"], inputs["photo"]).result(timeout=300)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page\n")
    npy = next(f.work.rglob("*.npy"))
    upload = f.uploads / "attacker"
    upload.mkdir(exist_ok=True)
    (upload / "passwd.txt").symlink_to("/etc/passwd")
    (upload / "secret.txt").symlink_to(secret)
    (upload / "work").symlink_to(f.work.resolve(), target_is_directory=True)
    (upload / "root").symlink_to("/", target_is_directory=True)
    run = next(p for p in f.runs.rglob("*.mp4"))
    uploads = str(f.uploads.resolve())
    tries = {
        "absolute /etc/passwd": "/etc/passwd",
        "absolute outside file": str(secret),
        "the repository": str(Path(__file__).resolve()),
        "the stage cache": str(npy.resolve()),
        "'..' out of the uploads": f"{uploads}/../work/{npy.relative_to(f.work)}",
        "'..' to the root": f"{uploads}/attacker/../../../../../../../../etc/passwd",
        "relative '..'": "../../../../../../../../etc/passwd",
        "symlink to /etc/passwd": f"{uploads}/attacker/passwd.txt",
        "symlink to a file outside": f"{uploads}/attacker/secret.txt",
        "symlinked folder to the cache": f"{uploads}/attacker/work/{npy.relative_to(f.work)}",
        "symlinked folder to /": f"{uploads}/attacker/root/etc/passwd",
        "a loopback URL (the server itself)": f"{url}config",
    }
    served = {}
    for name, path in tries.items():
        for route in ("gradio_api/file=", "file="):
            for encoded in (path, quote(path, safe="")):
                r = httpx.get(f"{url}{route}{encoded}", timeout=30)
                if r.status_code == 200 or "not for the page" in r.text or "root:" in r.text:
                    served[f"{name} via /{route}"] = r.status_code
    assert not served, served
    # the control: a result in the runs folder is served
    r = httpx.get(f"{url}gradio_api/file={run.resolve()}", timeout=30)
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"
    # an input given as a path outside the upload folder is refused before the job sees it
    for path in ("/etc/passwd", str(secret), str(npy.resolve())):
        with pytest.raises(Exception, match=r"(?i)not allowed|cannot|upload|access"):  # noqa: PT011
            client.predict(
                audio={"path": path, "meta": {"_type": "gradio.FileData"}},
                ref_video=None,
                ref_image=handle_file(str(inputs["photo"])),
                seed=0,
                api_name="/generate",
            )


def test_the_page_fetches_no_url_for_a_caller(app, monkeypatch, tmp_path):
    """A local HTTP server stands in for a public URL: Gradio's own check (public addresses only) is
    patched to let it through, so only the page's middleware can be what refuses."""
    import http.server
    import threading

    import safehttpx

    from webapp.app import fetches_url

    url, _job = app
    (tmp_path / "public.txt").write_text("public content\n")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            hits.append(self.path)

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    checked = []

    async def public(host):  # Gradio's SSRF check would refuse 127.0.0.1; here it lets it through
        checked.append(host)
        return "127.0.0.1"

    monkeypatch.setattr(safehttpx, "async_validate_url", public)
    target = f"http://127.0.0.1:{origin.server_address[1]}/public.txt"
    try:
        assert httpx.get(target, timeout=10).text == "public content\n"  # the stand-in serves
        hits.clear()
        for route in ("gradio_api/file=", "file=", "gradio_api/file/", "gradio_api/proxy=", "proxy="):
            for form in (target, quote(target, safe=""), quote(quote(target, safe=""), safe="")):
                r = httpx.get(f"{url}{route}{form}", timeout=30)
                assert r.status_code == 403 and r.text == "this page fetches no URL", (route, form, r.text)
                assert "public content" not in r.text
        # a file input given as the URL (a raw API call) is not downloaded either
        for form in (target, f" {target}", target.upper().replace("PUBLIC.TXT", "public.txt")):
            r = httpx.post(
                f"{url}gradio_api/call/generate",
                json={"data": [{"path": form, "meta": {"_type": "gradio.FileData"}}, None, None, 0]},
                timeout=30,
            )
            assert r.status_code == 403 and r.text == "this page fetches no URL", (form, r.text)
    finally:
        origin.shutdown()
        origin.server_close()
    assert hits == [] and checked == []  # the request never reached Gradio's fetch
    # the path check itself: results and uploads pass, URLs (any case, any encoding) do not
    assert not fetches_url("/gradio_api/file=/srv/app/uploads/ab/a:b.mp4")
    assert fetches_url("/gradio_api/file=HTTPS%253A%252F%252Fexample.com%252Fx")


# ----------------------------------------------------------------------------- a burst over the queue
def test_a_burst_over_the_queue_gets_results_or_refusals(client, app, inputs):
    """1 running + ``MAX_QUEUE`` waiting are served; the rest are refused at once, none is lost or hung."""
    # one seed: the first request computes every stage (seconds), the second reuses them
    jobs = [_submit(client, inputs["speech"], inputs["photo"], seed=30) for _ in range(5)]
    outcomes = []
    deadline = time.monotonic() + 600
    for j in jobs:
        try:
            mp4, *_ = j.result(timeout=max(1.0, deadline - time.monotonic()))
            outcomes.append("result" if Path(mp4).is_file() else f"no file: {mp4}")
        except TimeoutError:
            outcomes.append("hung")
        except Exception as exc:  # noqa: BLE001 - the refusal
            outcomes.append(str(exc))
    results = outcomes.count("result")
    refused = [o for o in outcomes if o != "result"]
    assert 1 <= results <= 1 + MAX_QUEUE and len(refused) == 5 - results, outcomes
    assert all("queue is full" in o.lower() for o in refused), outcomes
    # and the server serves the next request as usual
    mp4, *_ = _submit(client, inputs["speech"], inputs["photo"], seed=30).result(timeout=300)
    assert Path(mp4).is_file()


# ----------------------------------------------------------------------------- --host, --auth
def test_host_warning_and_auth_flag(monkeypatch, tmp_path, capsys):
    import webapp.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "build_app", lambda job: "demo")
    monkeypatch.setattr(app_module, "serve", lambda demo, job, **kw: seen.update(kw))
    base = ["--config", TINY, "--random_weights", "--device", "cpu", "--out_dir", str(tmp_path / "a")]
    monkeypatch.delenv("MODITALKER_APP_AUTH", raising=False)
    app_module.main([*base, "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0: anyone who can reach this machine on the network can use the page" in err
    assert "--auth USER:PASS" in err and seen["auth"] is None and seen["max_upload_mb"] == 50.0
    app_module.main([*base, "--host", "0.0.0.0", "--auth", "ann:s3cret:x", "--max_upload_mb", "5"])
    err = capsys.readouterr().err
    assert (
        "after the --auth login" in err and seen["auth"] == ("ann", "s3cret:x") and seen["max_upload_mb"] == 5
    )
    app_module.main(base)  # 127.0.0.1: no warning
    assert "warning: --host" not in capsys.readouterr().err
    monkeypatch.setenv("MODITALKER_APP_AUTH", "bob:pw")  # off the command line (ps shows it to everyone)
    app_module.main(base)
    assert seen["auth"] == ("bob", "pw")
    capsys.readouterr()
    for bad in (["--auth", "nopassword"], ["--auth", ":pw"], ["--max_upload_mb", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(app_module.main, [*base, *bad])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --"), lines


class _QuickJob:
    """A stand-in job that returns a copy of the bundled example video in a new run folder at once (auth
    is the page's, not the job's)."""

    def __new__(cls, folders, **kwargs):
        import shutil

        from webapp.job import JobOutput, PageJob

        class Quick(PageJob):
            def __call__(self, audio, ref_video=None, ref_image=None, *, report=None, **settings):
                video = self.folders.new_run() / self.OUT_NAME
                shutil.copyfile(self.folders.examples / "reference.mp4", video)
                return JobOutput(video, video, {"total": 0.0}, f"audio {Path(audio).name}", None)

        return Quick(folders, **kwargs)


def test_auth_asks_for_the_login(tmp_path, inputs, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with _server(tmp_path, job_class=_QuickJob, auth=("ann", "s3cret")) as (url, job):
        with pytest.raises(Exception):  # noqa: B017, PT011 - no login: the client cannot even connect
            Client(url, verbose=False, analytics_enabled=False)
        with pytest.raises(Exception):  # noqa: B017, PT011
            Client(url, auth=("ann", "wrong"), verbose=False, analytics_enabled=False)
        example = job.folders.examples / "reference.mp4"
        r = httpx.get(f"{url}gradio_api/file={example.resolve()}", timeout=30)
        assert r.status_code in (401, 403) and b"ftyp" not in r.content[:16]
        client = Client(url, auth=("ann", "s3cret"), verbose=False, analytics_enabled=False,
                        download_files=str(tmp_path / "dl"))  # fmt: skip
        photo = handle_file(str(inputs["photo"]))
        mp4, _preview, timings, log = client.predict(
            audio=handle_file(str(inputs["speech"])),
            ref_video=None,
            ref_image=photo,
            seed=0,
            api_name="/generate",
        )
        assert Path(mp4).is_file() and log == "audio speech.wav"
        # the result by its name: for the logged-in client only
        (run,) = job.folders.runs.iterdir()
        r = httpx.get(f"{url}gradio_api/file=runs/{run.name}/{job.OUT_NAME}", timeout=30)
        assert r.status_code in (401, 403) and b"ftyp" not in r.content[:16]
        assert Path(mp4).read_bytes() == (run / job.OUT_NAME).read_bytes()


# ----------------------------------------------------------------------------- memory over many requests
def _peak_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


@pytest.mark.slow
def test_memory_stays_bounded_over_50_requests(client, app, inputs):
    """Peak RSS (VmHWM of this process, which serves the page; reset before each request) of request 50
    within 1.1x of request 5's. New seeds: every stage runs for every request."""
    peaks = []
    for i in range(50):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        mp4, *_ = _submit(client, inputs["speech"], inputs["photo"], seed=100 + i, mtov_steps=8).result(
            timeout=300
        )
        assert Path(mp4).is_file()
        peaks.append(_peak_kb())
    print(f"peak RSS per request (MB): {[round(p / 1024) for p in peaks]}")
    assert peaks[49] <= 1.1 * peaks[4], (peaks[4], peaks[49])
