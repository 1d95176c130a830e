"""How the web page (:mod:`pipeline.app`) names and serves its results without giving out a path of
the server.

Gradio copies a returned file into its upload cache and hands the caller that copy's absolute path
(in the file reference's ``path`` and in its ``url``, ``/gradio_api/file=/srv/.../uploads/<hash>/x.mp4``).
The page's result videos are named instead by their place in the app folder, ``runs/<id>/<file>``:
:func:`result_video` gives Gradio that name in place of the cache copy, and :class:`ServeResults`
(ASGI middleware) turns a request for ``file=runs/<id>/<file>`` into Gradio's own file route for the
file in ``--out_dir/runs``, so Gradio's login and allowed-path checks still apply.

Import this module only after :func:`pipeline.app.prepare_environment` (it imports Gradio).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import gradio as gr

__all__ = ["RESULT_NAME", "public_name", "server_path", "result_video", "ServeResults"]

#: a result's public name: ``runs/<run id>/<file name>`` (no folder of the server, no ``..``)
RESULT_NAME = re.compile(r"runs/(?!\.)[\w.-]+/(?!\.)[\w.-]+")
#: a request for a result by that name (Gradio's file route and its older form)
_ROUTE = re.compile(r"^(?P<prefix>(?:/gradio_api)?/file=)(?P<name>runs/.*)$")


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
    """ASGI middleware: a request for ``/gradio_api/file=runs/<id>/<file>`` (also percent-encoded, and
    ``/file=...``) goes on to Gradio as the same route for that file's path in ``runs``; a ``runs/...``
    name that is not a result name gets 404. Everything else passes unchanged."""

    def __init__(self, app: Any, runs: Path) -> None:
        self.app, self.runs = app, Path(runs)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            match = _ROUTE.match(unquote(scope.get("path", "")))
            if match:
                path = server_path(match.group("name"), self.runs)
                if path is None:
                    from starlette.responses import PlainTextResponse

                    await PlainTextResponse("no such result", status_code=404)(scope, receive, send)
                    return
                target = match.group("prefix") + str(path)
                scope = dict(scope, path=target, raw_path=quote(target, safe="/=").encode())
        await self.app(scope, receive, send)
