"""A local web page: upload speech and a face, watch the talking head, with the networks kept warm.

``python -m webapp [--host 127.0.0.1] [--port 7860] [--config configs/inference.yaml]
[--device auto|cpu|cuda:N] [--random_weights] [--out_dir outputs/app] [--share] [--max_queue 20]
[--max_upload_mb 50] [--auth USER:PASS] [key=value ...]``
(also ``scripts/app.sh``) serves a Gradio page that runs the same pipeline as
``scripts/inference.sh`` (:mod:`webapp.job`), with every network loaded once and kept in memory
for the server's life (:mod:`pipeline.models`).

* inputs: speech (upload or microphone), the reference as a video or a photo (tabs), and the settings
  people change (seed, AToM steps and guidance, MToV steps and start ratio, clips per batch); the
  bundled sample as examples;
* outputs: the mp4 with the audio, the landmarks | generated preview, the stage timings, the run log;
  a progress bar follows the stages (and the MToV clips);
* one job at a time (a queue; the others wait with their position shown); a bad input shows the one
  line the command line prints, and the server keeps running;
* 127.0.0.1 only unless ``--host`` says otherwise (another address prints a warning), no share link
  unless ``--share``, no analytics; ``--auth USER:PASS`` asks for a login (Gradio's own);
  uploads and outputs live under ``--out_dir``, cleaned of what is older than a day;
* as a service: uploads over ``--max_upload_mb`` (50) are refused while they arrive, before they are
  stored; what a caller gets back (run log, timings, errors) names files by their base name, never by
  a folder of the server, and the two videos as ``runs/<id>/<file>`` (:mod:`webapp.results`);
  Gradio's file routes serve only the upload, run and example folders (the stage cache is blocked);
  a request over ``--max_queue`` is refused with "queue is full".

Programs call the named endpoint ``/generate`` (parameters ``audio``, ``ref_video``, ``ref_image``,
``seed``, and optionally ``steps``, ``guidance``, ``mtov_steps``, ``start_ratio``, ``batch_size``; it
returns the mp4 path first, then the preview, the timings and the log)::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    mp4, preview, timings, log = client.predict(
        audio=handle_file("speech.wav"), ref_video=handle_file("face.mp4"), ref_image=None, seed=0,
        api_name="/generate")
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from moditalker.errors import ArgumentParser, UserError, cli_main, describe
from pipeline.settings import SETTINGS
from webapp.job import (
    DAY,
    MB,
    PAGE_SETTINGS,
    AppFolders,
    PageJob,
    clean_old,
    page_name,
    page_text,
    sample_inputs,
)

__all__ = ["API_NAME", "build_parser", "prepare_environment", "build_app", "serve", "main", "host_warning"]

API_NAME = "generate"  # the endpoint /generate
RANDOM_BANNER = (
    "**Random weights (`--random_weights`):** every network is randomly initialised and the face model "
    "is synthetic. The video this page makes is **not** a talking head; it only exercises the pipeline. "
    "Put the real checkpoints in `checkpoints/` for real results."
)
INTRO = (
    "# MoDiTalker\n"
    "Speech + a face -> a talking-head video (AToM: audio -> facial motion; MToV: motion -> video). "
    "Upload or record the speech, give the face as a video (its head pose and background are kept) or as "
    "one photo, and press **Generate**. One job runs at a time; others wait in the queue."
)


#: the largest request body the page reads (its JSON requests; an upload's own limit is --max_upload_mb)
MAX_REQUEST_BYTES = 1024 * 1024
#: the routes through which Gradio would fetch something for a caller: ``file=<url>`` (and the older
#: ``file/<url>``) and ``proxy=<url>``
URL_FETCH = re.compile(r"/(?:file[=/]\s*[a-z][a-z0-9+.-]*:|proxy=)", re.IGNORECASE)


def fetches_url(raw_path: bytes | str) -> bool:
    """Whether a request path asks the server to fetch a URL (a file route given ``http(s)://...``, the
    proxy route), after undoing percent-encoding as often as it was applied."""
    text = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else raw_path
    for _ in range(8):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return bool(URL_FETCH.search(text))


def names_url_input(body: bytes) -> bool:
    """Whether a request body (JSON) gives a file input as a URL (``{"path": "https://..."}``), which
    Gradio would download for the caller."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    todo = [data]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and re.match(r"\s*[a-z][a-z0-9+.-]*://", path, re.IGNORECASE):
                return True
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


class RefuseUrlFetch:
    """ASGI middleware on the app Gradio builds: the page never fetches a URL on a caller's behalf
    (Gradio's file route streams a public ``http(s)`` URL, its proxy route a loaded Space, and a file
    input given as a URL is downloaded); such a request gets 403 before Gradio sees it. A request body
    (other than an upload's) over :data:`MAX_REQUEST_BYTES` gets 413 without being read to its end."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refuse = fetches_url(scope.get("raw_path") or scope.get("path", ""))
        path = scope.get("path", "")
        if not refuse and scope.get("method") == "POST" and not path.rstrip("/").endswith("/upload"):
            # a JSON request (uploads go to /upload and are not read here), read up to MAX_REQUEST_BYTES
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            too_big = declared.isdigit() and int(declared) > MAX_REQUEST_BYTES
            messages, body = [], b""
            while not too_big:
                message = await receive()
                messages.append(message)
                body += message.get("body", b"")
                too_big = len(body) > MAX_REQUEST_BYTES
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
            if too_big:
                from starlette.responses import PlainTextResponse

                text = f"request body over {MAX_REQUEST_BYTES} bytes (files go through the upload route)"
                await PlainTextResponse(text, status_code=413)(scope, receive, send)
                return
            refuse = names_url_input(body)

            async def replay() -> Any:
                return messages.pop(0) if messages else await receive()

            receive = replay
        if refuse:
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("this page fetches no URL", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def endpoint_signature(progress: Any) -> inspect.Signature:
    """The parameters of ``/generate`` as Gradio reads them: ``audio``, ``ref_video``, ``ref_image``,
    then the page's settings by their page names (``seed`` required, the others optional), then
    Gradio's ``progress``."""
    P = inspect.Parameter
    files = ("audio", "ref_video", "ref_image")
    params = [P(name, P.POSITIONAL_OR_KEYWORD, annotation=str | None) for name in files]
    for key in PAGE_SETTINGS:
        default = P.empty if key == "seed" else None
        params.append(P(page_name(key), P.POSITIONAL_OR_KEYWORD, default=default, annotation=float | None))
    params.append(P("progress", P.POSITIONAL_OR_KEYWORD, default=progress, annotation=Any))
    return inspect.Signature(params, return_annotation=tuple[str, str, dict[str, float], str])


def prepare_environment(folders: AppFolders) -> None:
    """Before Gradio is imported: no analytics, no Hugging Face Hub look-ups (the networks load from
    local files), and Gradio's upload cache under the app folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_TEMP_DIR"] = str(folders.uploads.resolve())
    # Gradio serves its examples cache too (default: .gradio/cached_examples under the working folder)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str((folders.uploads / "cached_examples").resolve())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_app(job: PageJob, *, title: str = "MoDiTalker") -> Any:
    """The page (a ``gradio.Blocks``) calling ``job``; its one public endpoint is ``/generate``."""
    import gradio as gr

    from webapp.results import result_video

    d = job.defaults()
    sample = sample_inputs(job.folders)
    runs = job.folders.runs

    def number(key: str) -> Any:
        """The field of a setting of :data:`PAGE_SETTINGS`: label, default, type and range from the schema
        (no bounds of Gradio's own: the schema checks the value and says what is wrong)."""
        s = SETTINGS[key]
        wanted = f", {s.check.wanted}" if s.check is not None else ""
        step = 1 if s.type is int else 0.05
        name = page_name(key)
        return gr.Number(value=d[name], step=step, label=s.label, info=f"{key}{wanted}", elem_id=name)

    signature = endpoint_signature(gr.Progress())

    def generate(audio: str | None, ref_video: str | None, ref_image: str | None, *rest: Any) -> Any:
        """Speech + reference (video or photo) and the page's settings -> (talking-head mp4, landmarks |
        generated preview mp4, stage timings in seconds, run log)."""
        bound = signature.bind(audio, ref_video, ref_image, *rest)
        bound.apply_defaults()
        settings = {page_name(key): bound.arguments[page_name(key)] for key in PAGE_SETTINGS}
        progress = bound.arguments["progress"]
        try:
            out = job(audio, ref_video, ref_image, report=lambda f, text: progress(f, desc=text), **settings)
        except UserError as exc:  # the server's log keeps the paths; the caller gets base names
            job.log(f"error: {exc}")
            raise gr.Error(job.public(page_text(str(exc))), duration=None, print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the server; the log has it
            traceback.print_exc()
            message = f"internal error: {describe(exc)} (the server log has the traceback)"
            raise gr.Error(job.public(message), duration=None, print_exception=False) from None
        return str(out.video), str(out.preview), out.timings, out.log

    generate.__signature__ = signature  # what Gradio reads: the endpoint's named parameters

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, int(job.max_age))) as demo:
        gr.Markdown(INTRO)
        if job.random_weights:
            gr.Markdown(RANDOM_BANNER, elem_id="random-weights")
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(
                    sources=["upload", "microphone"], type="filepath", label="Speech", elem_id="audio"
                )
                with gr.Tabs() as tabs:
                    with gr.Tab("Reference video", id="video"):
                        ref_video = gr.Video(
                            sources=["upload"],
                            label="Face video (pose and background)",
                            height=300,
                            elem_id="ref_video",
                        )
                    with gr.Tab("Reference photo", id="photo"):
                        ref_image = gr.Image(
                            sources=["upload"],
                            type="filepath",
                            label="Face photo",
                            height=300,
                            elem_id="ref_image",
                        )
                with gr.Accordion("Settings", open=False):
                    fields = []
                    for pair in range(0, len(PAGE_SETTINGS), 2):
                        with gr.Row():
                            fields += [number(key) for key in PAGE_SETTINGS[pair : pair + 2]]
                    seed = fields[PAGE_SETTINGS.index("seed")]
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                # the results reach a caller as runs/<id>/<file>, not as a path of the server
                video = result_video(
                    runs, label="Talking head", interactive=False, height=300, elem_id="result"
                )
                preview = result_video(
                    runs, label="Landmarks | generated", interactive=False, height=220, elem_id="preview"
                )
                timings = gr.JSON(label="Stage timings (seconds)", elem_id="timings")
                log = gr.Textbox(label="Run log", lines=6, max_lines=16, elem_id="log")
        gr.Examples(
            examples=[
                [str(sample["speech"]), str(sample["video"]), None, d["seed"]],
                [str(sample["speech"]), None, str(sample["photo"]), d["seed"]],
            ],
            inputs=[audio, ref_video, ref_image, seed],
            example_labels=["sample speech + reference video", "sample speech + reference photo"],
            label="Bundled sample",
            cache_examples=False,
        )
        # one reference at a time: a new upload in one tab clears the other; an example shows its tab
        ref_video.upload(lambda: None, None, ref_image, api_visibility="private", queue=False)
        ref_image.upload(lambda: None, None, ref_video, api_visibility="private", queue=False)
        for component, tab in ((ref_video, "video"), (ref_image, "photo")):
            component.change(
                lambda value, tab=tab: gr.Tabs(selected=tab) if value else gr.Tabs(),
                component,
                tabs,
                api_visibility="private",
                queue=False,
            )
        button.click(
            generate,
            inputs=[audio, ref_video, ref_image, *fields],
            outputs=[video, preview, timings, log],
            api_name=API_NAME,
            concurrency_limit=1,
            concurrency_id="device",
        )
    return demo


def serve(
    demo: Any,
    job: PageJob,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_queue: int = 20,
    max_upload_mb: float | None = 50.0,
    auth: tuple[str, str] | None = None,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Queue (one job at a time, ``max_queue`` waiting) and launch; returns the local URL. ``block``:
    serve until interrupted. ``max_upload_mb``: Gradio refuses a bigger upload while it arrives (HTTP
    413), before it is stored (None: no limit). ``auth``: (user, password) of Gradio's login."""
    from starlette.middleware import Middleware

    from webapp.results import ServeResults

    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=bool(share),
            prevent_thread_lock=True,
            allowed_paths=[str(job.folders.runs.resolve()), str(job.folders.examples.resolve())],
            blocked_paths=[str(job.folders.work.resolve())],  # the stage cache is never served
            max_file_size=None if max_upload_mb is None else int(max_upload_mb * MB),
            auth=auth,
            show_error=False,
            quiet=True,  # its hints name launch() arguments; serve() prints the URL itself
            ssr_mode=False,
            mcp_server=False,
            footer_links=["api"],
            # no URL fetched for a caller; results served by their names runs/<id>/<file>
            app_kwargs={
                "middleware": [Middleware(RefuseUrlFetch), Middleware(ServeResults, runs=job.folders.runs)]
            },
        )
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {describe(exc)}; pass another --port") from exc
    url = str(demo.local_url)
    try:  # a Ctrl-C from here on (even during the prints) closes the server: its thread must not linger
        if not quiet:
            print(f"page: {url} (one job at a time; Ctrl-C stops)", flush=True)
            share_url = getattr(demo, "share_url", None)
            link = f"public link: {share_url}" if share_url else "no public link (--share makes one)"
            print(link, flush=True)
        if block:
            demo.block_thread()
    except BaseException:
        demo.close()
        raise
    if block:
        demo.close()
    return url


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` -> (user, password); None -> no login."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASS with a non-empty user and password")
    return user, password


def host_warning(host: str, auth: bool) -> str | None:
    """The warning for a page that other machines can reach (None on a loopback address)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    text = f"warning: --host {host}: anyone who can reach this machine on the network can use the page"
    if auth:
        return text + " (after the --auth login)"
    return text + ", upload files and run jobs on it; on a shared machine pass --auth USER:PASS"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="scripts/app.sh",
        description="Web page: speech + face -> talking-head video, with the networks kept in memory.",
        epilog="Pipeline settings may follow as key=value (atom.eta=0.5), as for scripts/inference.sh.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=7860, help="port [7860]")
    p.add_argument("--config", default=None, help="pipeline YAML config (default: configs/inference.yaml)")
    p.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N (default: the config's)")
    p.add_argument("--random_weights", action="store_true", help="random networks: exercises the page")
    p.add_argument("--out_dir", default="outputs/app", help="uploads, outputs and stage cache [outputs/app]")
    p.add_argument(
        "--share", action="store_true", help="also make a public Gradio share link (off by default)"
    )
    p.add_argument("--max_queue", type=int, default=20, help="requests that may wait in the queue [20]")
    p.add_argument(
        "--max_upload_mb", type=float, default=50.0, help="largest upload, refused before it is stored [50]"
    )
    p.add_argument(
        "--auth",
        default=os.environ.get("MODITALKER_APP_AUTH"),
        metavar="USER:PASS",
        help="ask for this login (Gradio's); default: $MODITALKER_APP_AUTH, else no login",
    )
    p.add_argument("--keep_hours", type=float, default=DAY / 3600, help="delete files older than this [24]")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    # Ctrl-C (SIGINT) stops the server even when the launching shell ignored it, as a shell does for a
    # command it starts in the background: Python then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 1 or args.keep_hours <= 0:
        raise UserError("--max_queue must be >= 1 and --keep_hours > 0")
    if not args.max_upload_mb > 0:
        raise UserError(f"--max_upload_mb must be > 0, got {args.max_upload_mb}")
    auth = parse_auth(args.auth)
    folders = AppFolders(Path(args.out_dir)).check()  # created by PageJob once the settings are checked
    prepare_environment(folders)
    job = PageJob(
        folders,
        config=args.config,
        device=args.device,
        random_weights=args.random_weights,
        overrides=tuple(args.overrides),
        max_age=args.keep_hours * 3600,
        max_upload_mb=args.max_upload_mb,
    )
    removed = clean_old(folders, job.max_age)
    print(f"app folder {folders.root.resolve()} ({len(removed)} old item(s) removed)", flush=True)
    if job.random_weights:
        print("WARNING: --random_weights: the page makes no real talking heads", file=sys.stderr, flush=True)
    warning = host_warning(args.host, auth is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    demo = build_app(job)
    serve(
        demo,
        job,
        host=args.host,
        port=args.port,
        share=args.share,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        auth=auth,
    )


if __name__ == "__main__":
    cli_main(main)
