"""MToV.generate.stream_video: generate_video batch by batch (conditions asked per batch), resumable
after any finished batch with exactly the frames of an uninterrupted stream, and a bounded cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moditalker.fileio import REPO_ROOT
from MToV.generate import ClipLatentCache, SamplingOptions, StreamState, generate_video, stream_video
from MToV.loading import load_mtov

TINY = str(REPO_ROOT / "configs" / "mtov_tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    m = load_mtov(None, None, None, config=TINY, random_weights=True)
    g = torch.Generator().manual_seed(5)
    for p in m.unet.parameters():  # eps != 0, as in test_mtov_sample
        if p.abs().sum() == 0:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _video(models, t: int, seed: int = 0, pattern=(0, 1, 2)):
    """Landmark clips all distinct; masked clip i a copy of clip ``pattern[i % len(pattern)]`` (as a
    reference video played back and forth repeats clips), so the latent cache is used across batches."""
    clip, size = models.clip_frames, models.resolution
    rng = np.random.default_rng(seed)
    lv = np.zeros((t, 3, size, size), np.uint8)
    lv[:, :, rng.integers(0, size, 20), rng.integers(0, size, 20)] = 255
    for i in range(t):  # every frame distinct: its index in rows 0 and 1
        lv[i, :, 0, i % size] = lv[i, :, 1, i // size] = 255
    masked = rng.integers(0, 256, (t, 3, size, size), dtype=np.uint8)
    masked[:, :, size // 2 :] = 0
    ident = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    for i in range(t):
        j = pattern[i // clip % len(pattern)] * clip + i % clip
        masked[i] = masked[j]
    return lv, masked, ident


def _stream(models, lv, masked, ident, calls=None, **kw):
    def conditions(start, stop):
        if calls is not None:
            calls.append((start, stop))
        return lv[start:stop], masked[start:stop]

    resume = kw.pop("resume", None)
    options = SamplingOptions(**{"sampling_timesteps": 8, "seed": 2, **kw})
    batches: list = []
    n = stream_video(
        models, conditions, len(lv), ident, options, on_batch=batches.append, progress=False, resume=resume
    )
    assert n == sum(len(b.frames) for b in batches)
    return batches


def test_stream_is_generate_video_batch_by_batch(models):
    clip = models.clip_frames
    t = 5 * clip + 3
    lv, masked, ident = _video(models, t)
    calls: list[tuple[int, int]] = []
    batches = list(_stream(models, lv, masked, ident, calls, batch_size=2))
    assert calls == [(0, 2 * clip), (2 * clip, 4 * clip), (4 * clip, t)]  # asked once per batch, in order
    assert [(b.index, b.start, len(b.frames)) for b in batches] == [
        (0, 0, 2 * clip),
        (1, 2 * clip, 2 * clip),
        (2, 4 * clip, clip + 3),
    ]
    whole = generate_video(
        models, lv, masked, ident, batch_size=2, sampling_timesteps=8, progress=False, seed=2
    )
    np.testing.assert_array_equal(np.concatenate([b.frames for b in batches]), whole)
    np.testing.assert_array_equal(batches[2].landmarks, lv[4 * clip :])
    assert all(b.carry is None for b in batches)
    # the masked clips of batch 1 (3 = 0) were partly encoded in batch 0: only clip 2 is new there
    assert [len(b.encoded["rgb"][0]) for b in batches] == [2, 1, 1]
    assert [len(b.encoded["ldmk"][0]) for b in batches] == [2, 2, 2]
    assert batches[0].encoded["rgb"][1].shape[0] == 2 and batches[0].encoded["rgb"][1].dtype == np.float32


@pytest.mark.parametrize(
    "kw", [dict(batch_size=2), dict(batch_size=1, latent_capacity=2), dict(use_last_as_reference=True)]
)
def test_resume_after_any_batch_gives_the_same_frames(models, kw):
    """A stream restarted after k finished batches (their carry and encoded latents replayed) yields the
    remaining batches bit for bit, whatever k: a killed run that resumes makes the same video."""
    clip = models.clip_frames
    # masked clips A B A C B A C: with room for 2, A is dropped when C comes and encoded again later
    lv, masked, ident = _video(models, 7 * clip - 2, seed=1, pattern=(0, 1, 0, 2, 1, 0, 2))
    full = list(_stream(models, lv, masked, ident, **kw))
    for k in range(1, len(full)):
        calls: list[tuple[int, int]] = []
        state = StreamState(k, full[k - 1].carry, [b.encoded for b in full[:k]])
        rest = list(_stream(models, lv, masked, ident, calls, resume=state, **kw))
        assert [b.index for b in rest] == [b.index for b in full[k:]]
        assert calls[0][0] == full[k].start  # the finished batches' conditions are not built again
        for a, b in zip(rest, full[k:]):
            assert a.start == b.start and np.array_equal(a.frames, b.frames), (k, a.index)
            # the cache state was restored: the same clips are encoded as in the uninterrupted stream
            assert {n: keys for n, (keys, _) in a.encoded.items()} == {
                n: keys for n, (keys, _) in b.encoded.items()
            }, (k, a.index)
    if kw.get("use_last_as_reference"):
        assert all(b.carry is not None and b.carry.dtype == np.float32 for b in full)


def test_latent_cache_capacity_is_first_in_first_out():
    encoded: list[int] = []

    def extract(ae, x):
        encoded.append(x.shape[0])
        return x.flatten(1)[:, :2].clone()

    ae = object()
    cache = ClipLatentCache(extract, capacity=2)
    clips = torch.arange(5.0)[:, None, None].expand(5, 1, 3)
    keys = [b"a", b"b", b"a", b"c", b"d"]
    out = cache(ae, clips, keys)
    assert encoded == [4] and torch.equal(out[2], out[0])  # a, b, c, d encoded once each
    assert [k for _, k in cache.latents] == [b"c", b"d"]  # the two newest are kept
    assert [k for _, k, _ in cache.take_added()] == [b"a", b"b", b"c", b"d"] and cache.take_added() == []
    cache(ae, clips[:2], [b"d", b"a"])  # d is kept, a was dropped: encoded again
    assert encoded == [4, 1] and [k for _, k in cache.latents] == [b"d", b"a"]
    replay = ClipLatentCache(extract, capacity=2)
    replay.restore(ae, [b"a", b"b", b"c", b"d"], torch.zeros(4, 2))
    replay.restore(ae, [b"a"], torch.zeros(1, 2))
    assert [k for _, k in replay.latents] == [k for _, k in cache.latents]
