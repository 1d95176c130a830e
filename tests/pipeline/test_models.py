"""pipeline.models: the warm-network cache (keys, reuse, reload on a changed checkpoint, bounds) and
that a pipeline run passed a cache asks it for every network."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.models import ModelCache, identity


class Net:
    """A stand-in network that records its builds."""

    built: list[tuple] = []

    def __init__(self, checkpoint=None, *, device="cpu", seed=0, config=None):
        Net.built.append((checkpoint, str(device), seed, config))
        self.checkpoint, self.device, self.seed = checkpoint, device, seed


@pytest.fixture(autouse=True)
def _reset():
    Net.built = []


def test_same_call_builds_once(tmp_path):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"weights")
    cache = ModelCache()
    a = cache.load("net", Net, str(ckpt), device=torch.device("cpu"), config={"layers": 2})
    b = cache.load("net", Net, Path(ckpt), device=torch.device("cpu"), config={"layers": 2})
    assert a is b and len(Net.built) == 1
    assert cache.loads == {"net": 1} and cache.hits == {"net": 1} and len(cache) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"device": "meta"},  # another device
        {"seed": 1},  # another random init
        {"config": {"layers": 3}},  # another model size
    ],
)
def test_any_argument_changes_the_key(tmp_path, change):
    cache = ModelCache()
    base = {"device": "cpu", "seed": 0, "config": {"layers": 2}}
    first = cache.load("net", Net, None, **base)
    second = cache.load("net", Net, None, **(base | change))
    assert first is not second and cache.loads["net"] == 2 and cache.hits["net"] == 0


def test_a_replaced_checkpoint_is_loaded_again(tmp_path):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"old")
    cache = ModelCache()
    first = cache.load("net", Net, str(ckpt))
    ckpt.write_bytes(b"new weights")  # other size and mtime
    later = time.time() + 5
    os.utime(ckpt, (later, later))
    assert cache.load("net", Net, str(ckpt)) is not first
    assert cache.loads["net"] == 2


def test_kinds_are_separate_and_bounded():
    cache = ModelCache(per_kind=1)
    a0 = cache.load("a", Net, None, seed=0)
    b0 = cache.load("b", Net, None, seed=0)
    assert cache.kinds() == {"a": 1, "b": 1}
    a1 = cache.load("a", Net, None, seed=1)  # replaces a0, b0 stays
    assert a1 is not a0 and cache.kinds() == {"a": 1, "b": 1}
    assert cache.load("b", Net, None, seed=0) is b0
    assert cache.load("a", Net, None, seed=0) is not a0  # a0 was dropped: built again
    assert cache.loads == {"a": 3, "b": 1}
    with pytest.raises(ValueError):
        ModelCache(per_kind=0)


def test_identity_of_arguments(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"123")
    ident = identity(str(f))
    assert ident.startswith("asset:") and str(f.resolve()) in ident and ":3:" in ident  # path, size, mtime
    assert identity("no/such/file.pt") == "no/such/file.pt"
    assert identity("") == "" and identity(".") == "."  # never a walk of the working folder
    assert identity(torch.device("cpu")) == "cpu" and identity(torch.bfloat16) == "torch.bfloat16"
    assert identity({"a": (1, 2.5, None, True)}) == {"a": [1, 2.5, None, True]}

    def detector(frames):
        return None

    assert (
        identity(detector)
        == f"callable:{__name__}.test_identity_of_arguments.<locals>.detector@{id(detector)}"
    )


def test_concurrent_requests_build_once():
    cache = ModelCache()
    gate = threading.Barrier(4)
    got = []

    def slow_build():
        time.sleep(0.05)
        return object()

    def worker():
        gate.wait()
        got.append(cache.load("slow", slow_build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(g) for g in got}) == 1 and cache.loads["slow"] == 1 and cache.hits["slow"] == 3
