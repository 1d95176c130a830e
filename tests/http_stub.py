"""A local HTTP server standing in for Google Drive and the video host (the tests never reach the network).

``StubServer.files`` maps a URL path (``/abc``) to its bytes; a path in ``cut_once`` is answered once with
its full Content-Length but only half of the bytes before the connection closes (an interrupted download;
``cut_nth[path] = n`` does that to the n-th GET of the path only, e.g. after a client's probing request);
``Range: bytes=N-`` requests get a 206 with the rest of the file. Every request is logged in ``requests``
as ``(path, range header or None)``.

What the stand-in serves in place of real weights: :func:`torch_bytes` (an object as ``torch.save``
writes it), :func:`zero_state` / :func:`module_state` / :func:`official_like` (state_dicts with the real
keys and shapes whose tensors are zero-stride views of one value: a few KB on disk, full shapes once
loaded); :func:`tiny_hubert` / :func:`save_tiny_hubert` a HuBERT of the real layout at toy size.
"""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def torch_bytes(obj: Any) -> bytes:
    """``obj`` as ``torch.save`` writes it to a file."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tiny_hubert() -> Any:
    """A ``transformers.HubertModel`` of HuBERT's layout at toy size (16 wide, one layer), standing in
    for facebook/hubert-large-ls960-ft."""
    from transformers import HubertConfig, HubertModel

    return HubertModel(
        HubertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            conv_dim=(4,) * 7,
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
        )
    )


def save_tiny_hubert(folder: Any) -> None:
    """:func:`tiny_hubert` and a feature extractor saved in ``folder`` as a HuBERT model folder."""
    from transformers import Wav2Vec2FeatureExtractor

    tiny_hubert().save_pretrained(folder)
    Wav2Vec2FeatureExtractor().save_pretrained(folder)


def zero_state(shapes: dict[str, Any], dtypes: dict[str, Any] | None = None) -> dict:
    """``{key: zeros of shape}`` as zero-stride views (float32 unless ``dtypes`` names another)."""
    import torch

    out = {}
    for key, shape in shapes.items():
        one = torch.zeros(1, dtype=(dtypes or {}).get(key, torch.float32))
        out[key] = one.expand(shape) if len(shape) else one[0]
    return out


def module_state(module: Any) -> dict:
    """``module``'s state_dict keys, shapes and dtypes as zero-stride views."""
    state = module.state_dict()
    return zero_state({k: v.shape for k, v in state.items()}, {k: v.dtype for k, v in state.items()})


def official_like(layout: str) -> dict:
    """A state_dict with the keys and shapes of an official checkpoint (moditalker/official_layouts.json)."""
    from moditalker.asset_content import official_layouts

    return zero_state(official_layouts()[layout])


class StubServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self.cut_once: set[str] = set()
        self.cut_nth: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                stub.requests.append((path, rng))
                data = stub.files.get(path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                part = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", stub.content_types.get(path, "application/octet-stream"))
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                stub.gets[path] = stub.gets.get(path, 0) + 1
                if path in stub.cut_once or stub.cut_nth.get(path) == stub.gets[path]:
                    stub.cut_once.discard(path)
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # clients that hang up early
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
