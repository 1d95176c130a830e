"""The web app started in-process for the app tests (tiny config, random weights, a free port), and a
record of every outgoing connection the process makes while it runs.

A test module makes its fixture with ``with running_app(folder) as server: yield server`` (one server
per module; a conftest.py under tests/pipeline would shadow tests/conftest.py for the modules that
import it by name)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "inference_tiny.yaml")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class AppServer:
    url: str
    job: object  # webapp.job.PageJob
    demo: object  # gradio.Blocks
    inputs: dict[str, Path]
    connections: list[str] = field(default_factory=list)  # host of every connect / name lookup

    def outside(self) -> list[str]:
        """Hosts other than this machine that the process tried to reach."""
        return sorted({h for h in self.connections if h not in LOOPBACK and not h.startswith("/")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(root: Path) -> Iterator[AppServer]:
    """The app on 127.0.0.1:<free port> with its folder under ``root``, and as inputs the bundled speech,
    a 1 s reference video, a photo and a 2 s cut of the speech."""
    from data.sample_data import write_reference_image, write_reference_video, write_speech
    from webapp.app import build_app, prepare_environment, serve
    from webapp.job import AppFolders, PageJob

    d = root / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    inputs = {
        "speech": write_speech(d / "speech.wav"),
        "speech2s": write_speech(d / "speech2s.wav", seconds=2.0),
        "video": write_reference_video(d / "ref.mp4", seconds=1.0),
        "photo": write_reference_image(d / "face.png"),
    }
    names = ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "HF_HUB_OFFLINE")
    names += ("HF_HUB_DISABLE_TELEMETRY",)
    saved_env = {k: os.environ.get(k) for k in names}
    saved = socket.socket.connect, socket.getaddrinfo
    server = AppServer("", None, None, inputs)

    def connect(sock, address):  # record, then connect as usual
        server.connections.append(str(address[0] if isinstance(address, tuple) else address))
        return saved[0](sock, address)

    def getaddrinfo(host, *args, **kwargs):
        server.connections.append(str(host))
        return saved[1](host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks; two threads only spin on a busy 2-core machine
    try:
        folders = AppFolders(root / "out").create()
        prepare_environment(folders)
        job = PageJob(folders, config=TINY, device="cpu", random_weights=True)
        server.job = job
        server.demo = build_app(job)
        server.url = serve(server.demo, job, port=free_port(), block=False, quiet=True)
        yield server
    finally:
        if server.demo is not None:
            server.demo.close()
        torch.set_num_threads(threads)
        socket.socket.connect, socket.getaddrinfo = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
