"""How the web page (:mod:`webapp.app`) names and serves its files without giving out a path of
the server.

Gradio names every file it hands a caller by its absolute path: a returned file is copied into its
upload cache (``--out_dir/uploads``) and comes back as that copy's path (the file reference's ``path``,
and its ``url`` ``/gradio_api/file=/srv/.../uploads/<hash>/x.mp4``); an upload is answered with the
stored copy's path, which the caller sends back as the input; the page's configuration lists the
bundled examples by their cached copies. Here the page's files are named by their place in the app
folder instead:

* the result videos as ``runs/<id>/<file>``: :func:`result_video` gives Gradio that name in place of
  the cache copy;
* uploads (and the examples' copies) as ``uploads/<hash>/<file>``: :class:`ServeResults` replaces the
  upload folder's path by ``uploads`` in Gradio's JSON and HTML answers (not in the files it serves),
  and a ``uploads/...`` name in a JSON request's file reference by the path again;
* :class:`ServeResults` turns a request for ``file=runs/...`` or ``file=uploads/...`` into Gradio's own
  file route for that path, so Gradio's login and allowed-path checks still apply.

Import this module only after :func:`webapp.app.prepare_environment` (it imports Gradio).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import gradio as gr

__all__ = ["RESULT_NAME", "public_name", "server_path", "upload_path", "result_video", "ServeResults"]

#: a result's public name: ``runs/<run id>/<file name>`` (no folder of the server, no ``..``)
RESULT_NAME = re.compile(r"runs/(?!\.)[\w.-]+/(?!\.)[\w.-]+")
#: a request for a result by that name (Gradio's file route and its older form)
_ROUTE = re.compile(r"^(?P<prefix>(?:/gradio_api)?/file=)(?P<name>(?:runs|uploads)/.*)$")
#: the largest JSON request whose file references are renamed (larger ones pass unread; the page's
#: own limit refuses them before)
MAX_JSON_BYTES = 1024 * 1024


def public_name(path: str | Path, runs: Path) -> str | None:
    """``runs/<id>/<file>`` for a file directly in a run folder under ``runs``; None otherwise."""
    try:
        rel = Path(path).resolve().relative_to(runs.resolve())
    except ValueError:
        return None
    name = f"runs/{rel.as_posix()}"
    return name if len(rel.parts) == 2 and RESULT_NAME.fullmatch(name) else None


def server_path(name: str, runs: Path) -> Path | None:
    """The file a public name stands for (None: not a result name)."""
    if not RESULT_NAME.fullmatch(name):
        return None
    _, run, file = name.split("/")
    return runs.resolve() / run / file


def upload_path(name: str, uploads: Path) -> Path | None:
    """The path an ``uploads/<...>/<file>`` name stands for in ``uploads`` (None: not such a name)."""
    parts = name.split("/")
    if parts[0] != "uploads" or len(parts) < 3 or any(p in ("", ".", "..") for p in parts[1:]):
        return None
    return uploads.resolve().joinpath(*parts[1:])


def result_video(runs: Path, **kwargs: Any) -> gr.Video:
    """A ``gr.Video`` (``kwargs`` as for it) whose value, a file in ``runs``, reaches the caller as
    ``runs/<id>/<file>`` (reference ``path``, and ``url`` ``/gradio_api/file=runs/<id>/<file>``) instead
    of the absolute path of a copy in Gradio's cache; anything else is cached as ``gr.Video`` does.
    (Gradio's two cache methods are replaced on this one component: a subclass of a Gradio component
    would make Gradio write a type-stub file next to this module.)"""
    video = gr.Video(**kwargs)
    move, async_move = video.move_resource_to_block_cache, video.async_move_resource_to_block_cache

    def named(path: str | Path | None) -> str | None:
        return None if path is None else public_name(path, runs)

    def move_resource_to_block_cache(path: str | Path | None) -> str | None:
        return named(path) or move(path)

    async def async_move_resource_to_block_cache(path: str | Path | None) -> str | None:
        return named(path) or await async_move(path)

    video.move_resource_to_block_cache = move_resource_to_block_cache
    video.async_move_resource_to_block_cache = async_move_resource_to_block_cache
    return video


class ServeResults:
    """ASGI middleware (``runs``: the app folder's ``runs``; its ``uploads`` lies beside it):

    * a request for ``/gradio_api/file=runs/<id>/<file>`` or ``file=uploads/<...>/<file>`` (also
      percent-encoded, and ``/file=...``) goes on to Gradio as the same route for that file's path; a
      ``runs/`` or ``uploads/`` name that is neither gets 404;
    * a JSON request's file references named ``uploads/...`` (``{"path": "uploads/..."}``) reach Gradio
      with the path in the upload folder;
    * in Gradio's JSON and HTML answers (not the files it serves) the upload folder's path is replaced
      by ``uploads``."""

    def __init__(self, app: Any, runs: Path) -> None:
        self.app, self.runs = app, Path(runs)
        self.uploads = self.runs.parent / "uploads"
        folder = str(self.uploads.resolve())
        self.hide = [(f.encode() + b"/", b"uploads/") for f in (folder, quote(folder))]
        self.hide += [(folder.encode(), b"uploads")]

    def _named(self, name: str) -> Path | None:
        if name.startswith("uploads/"):
            return upload_path(name, self.uploads)
        return server_path(name, self.runs)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        match = _ROUTE.match(unquote(scope.get("path", "")))
        if match:
            path = self._named(match.group("name"))
            if path is None:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("no such file", status_code=404)(scope, receive, send)
                return
            target = match.group("prefix") + str(path)
            scope = dict(scope, path=target, raw_path=quote(target, safe="/=").encode())
            await self.app(scope, receive, send)  # a file: served as it is
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if (
            scope.get("method") == "POST"
            and headers.get(b"content-type", b"").startswith(b"application/json")
            and length.isdigit()
            and int(length) <= MAX_JSON_BYTES
        ):
            scope, receive = await self._named_inputs(scope, receive)
        await self.app(scope, receive, self._hiding(send))

    async def _named_inputs(self, scope: dict, receive: Any) -> tuple[dict, Any]:
        """The request with its ``uploads/...`` file references as paths (its body read and replayed)."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return scope, receive
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        todo, changed = [data], False
        while todo:
            item = todo.pop()
            if isinstance(item, dict):
                name = item.get("path")
                path = upload_path(name, self.uploads) if isinstance(name, str) else None
                if path is not None:
                    item["path"], changed = str(path), True
                todo.extend(item.values())
            elif isinstance(item, list):
                todo.extend(item)
        if changed:
            body = json.dumps(data).encode()
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return scope, replay

    def _hiding(self, send: Any) -> Any:
        """``send`` that replaces the upload folder's path in JSON and HTML answers."""
        start, chunks = None, []

        async def hiding(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                kind = headers.get(b"content-type", b"")
                if (
                    kind.startswith((b"application/json", b"text/html"))
                    and b"content-encoding" not in headers
                ):
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                for folder, name in self.hide:
                    body = body.replace(folder, name)
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        return hiding
