"""The web app, started once in-process for the app tests (tiny config, random weights, a free port),
and a record of every outgoing connection the process makes while it runs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "inference_tiny.yaml")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class AppServer:
    url: str
    job: object  # pipeline.app_job.Job
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


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The app on 127.0.0.1:<free port>, with the bundled speech, a 1 s reference video, a photo and a
    2 s cut of the speech as inputs."""
    from pipeline.app import build_app, prepare_environment, serve
    from pipeline.app_job import AppFolders, Job
    from pipeline.sample_data import write_reference_image, write_reference_video, write_speech

    root = tmp_path_factory.mktemp("app")
    d = tmp_path_factory.mktemp("app_inputs")
    inputs = {
        "speech": write_speech(d / "speech.wav"),
        "speech2s": write_speech(d / "speech2s.wav", seconds=2.0),
        "video": write_reference_video(d / "ref.mp4", seconds=1.0),
        "photo": write_reference_image(d / "face.png"),
    }
    names = ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
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
    try:
        folders = AppFolders(root / "out").create()
        prepare_environment(folders)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny networks; two threads only spin on a busy 2-core machine
        job = Job(folders, config=TINY, device="cpu", random_weights=True)
        demo = build_app(job)
        server.url = serve(demo, job, port=free_port(), block=False, quiet=True)
        server.job, server.demo = job, demo
        yield server
        demo.close()
        torch.set_num_threads(threads)
    finally:
        socket.socket.connect, socket.getaddrinfo = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
