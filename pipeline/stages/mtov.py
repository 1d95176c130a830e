"""Stage 7, ``mtov``: the aligned landmarks -> MToV -> SxS frames, streamed in batches of 16-frame clips.

Nothing of the video's length is held in memory: the conditions of a batch (its landmark dots, timed
as ``render``, and its masked reference frames, read by index from the memory-mapped reference) are
made when the batch is generated (:func:`MToV.generate.stream_video`), and its frames go to the work
cache and to the mp4 encoders (:class:`pipeline.stages.output.VideoSink`) before the next batch.

Each finished batch is stored atomically under the stage's usual key (:class:`BatchStore`), so a run
killed halfway resumes at the first missing batch when the same command is run again, and makes the
same frames as a run that was never interrupted: the noise is per clip, the batches keep their
boundaries, and the condition-latent cache is restored from the latents each batch stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from moditalker.errors import check_space
from moditalker.timing import StageTimer
from pipeline.cache import StageRecord
from pipeline.settings import stage_config, stage_settings
from pipeline.stages.batches import BatchStore
from pipeline.stages.context import StageContext, StageResult
from pipeline.stages.output import VideoSink

if TYPE_CHECKING:
    from MToV.loading import MToVModels, PrecisionPlan

__all__ = ["run", "MODEL_ASSETS", "LATENT_CLIPS"]

MODEL_ASSETS = ("autoencoder_rgb", "autoencoder_motion", "diffusion_model")
LATENT_CLIPS = 256  #: condition latents kept per autoencoder (repeated clips are not encoded again)
#: work-folder bytes per stored pixel byte: the raw frames, their latents (~3 %) and the temp mp4s
BYTES_PER_PIXEL_STORED = 1.15
DEFAULT_RADIUS = 3  #: the landmark dots' radius of the output's landmark video (data.motion_align)


def _encoded_arrays(encoded: dict[str, tuple[list[bytes], np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for name, (keys, latents) in encoded.items():
        out[f"{name}_keys"] = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1)
        out[f"{name}_latents"] = latents
    return out


def _encoded_from(arrays: dict[str, np.ndarray]) -> dict[str, tuple[list[bytes], np.ndarray]]:
    names = [k[: -len("_keys")] for k in arrays if k.endswith("_keys")]
    return {n: ([bytes(k) for k in arrays[f"{n}_keys"]], arrays[f"{n}_latents"]) for n in names}


def run(ctx: StageContext, ref: StageResult, al: StageResult, sink: VideoSink) -> None:
    """Generate (or read back) the ``n_frames`` frames, batch by batch, into ``sink``."""
    from data.imageops import mask_below_nose
    from data.motion_align import pingpong_indices, render_landmarks
    from MToV.calibration import resolve_plan
    from MToV.conditions import condition_settings
    from MToV.loading import model_config

    cfg, size, n = ctx.cfg, ctx.size, ctx.n_frames
    ctx.events.started("mtov")
    frames = ref["frames"]  # [N, S, S, 3], memory-mapped
    idx = pingpong_indices(len(frames), n)  # as in the align stage
    aligned, posed = al["aligned_lm68"], al["reference_posed_lm68"]
    timer = StageTimer(ctx.timings)

    # the network's landmark dots are drawn as its trainers drew them (MToV.dataset): at the model's
    # size R with its data.landmark_radius, the coordinates scaled from the S x S crop; the output's
    # landmark video keeps S and the default radius
    model_cfg = model_config(stage_config(cfg.mtov.config))
    cond_size, radius = condition_settings(model_cfg)
    same_dots = (cond_size, radius) == (size, DEFAULT_RADIUS)

    def dots(start: int, stop: int, at: int = size, r: int = DEFAULT_RADIUS) -> np.ndarray:
        with timer("render"):
            return render_landmarks(aligned[start:stop], (size, size), size=at, radius=r)  # [n, 3, at, at]

    def conditions(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        landmarks = dots(start, stop, cond_size, radius)
        with timer("render"):
            sel = idx[start:stop]
            masked = mask_below_nose(frames[sel], posed[sel]).transpose(0, 3, 1, 2)
        return landmarks, np.ascontiguousarray(masked)

    def to_sink(batch_frames: np.ndarray, start: int, landmarks: np.ndarray | None = None) -> None:
        if not same_dots:  # the network's dots are not the output's
            landmarks = None
        if landmarks is None and sink.wants_landmarks:
            landmarks = dots(start, start + len(batch_frames))
        sink.add(batch_frames, landmarks)

    # + every mtov.* setting and ref_frame (pipeline.settings.stage_settings)
    models_id = [ctx.model_id(k) for k in MODEL_ASSETS] if ctx.trained(MODEL_ASSETS[0]) else "random"
    parts = {"align": al.key, "reference": ref.key, "models": models_id, **stage_settings(cfg, "mtov")}
    if not same_dots:  # a model below S (or another radius) sees its own dots: the full-size key stays
        parts["condition"] = {"size": cond_size, "radius": radius}
    loaded: list = []

    def models():  # loaded once, when needed: by the calibration (first run on a machine) or to generate
        if not loaded:
            loaded.append(_load_models(ctx))
        return loaded[0]

    # auto on the CPU: what was measured faster on this machine (MToV.calibration), read back or timed now
    choice = resolve_plan(
        str(cfg.mtov.precision),
        models,
        ctx.device,
        model_cfg,
        cache_file=cfg.mtov.get("calibration_file"),
        recalibrate=bool(cfg.mtov.get("recalibrate", False)),
        log=lambda line: ctx.log(f"[mtov] {line}"),
    )
    plan = choice.plan
    # int8 frames differ from bf16/fp32 ones, and a measured "auto" may pick any of them: those get their
    # own key (the other keys stay as they were)
    if plan.autoencoders == "int8" or choice.source in ("measured", "cache"):
        parts["arithmetic"] = plan.per_network()
    store = BatchStore(ctx.cache, "mtov", parts, log=ctx.log)
    if store.complete and (problem := store.problem()) is not None:
        store.reopen(problem)  # checked before it is trusted: the damaged batches are made again
    t0, before = time.perf_counter(), {k: ctx.timings.get(k, 0.0) for k in ("render", "write")}
    generated = 0
    if store.complete:
        for start, batch_frames in _stored(store):
            to_sink(batch_frames, start)
    else:
        generated = _generate(ctx, store, frames, conditions, to_sink, models(), plan)
    seconds = time.perf_counter() - t0 - sum(ctx.timings.get(k, 0.0) - v for k, v in before.items())
    if "render" in ctx.timings:  # the landmark dots: a part of this stage, timed on its own
        ctx.events.finished("render", cached=False, seconds=ctx.timings["render"])
    ctx.cache.finish(StageRecord("mtov", store.key, store.entry, generated == 0, seconds), ctx.events)
    arithmetic = f"autoencoders {plan.autoencoders}, UNet {plan.unet}" + (
        f", auto {choice.source}" if choice.source != "fixed" else ""
    )
    ctx.notes["mtov"] = f"({generated} of {n} frames generated, {n - generated} reused; {arithmetic})"


def _stored(store: BatchStore) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, uint8 [n, 3, S, S] frames) of a complete entry, batch by batch."""
    old = store.entry / "frames.npy"  # an entry of the layout before batches: all frames in one file
    if old.is_file():
        video = np.load(old, mmap_mode="r")
        for start in range(0, len(video), 64):
            yield start, np.asarray(video[start : start + 64])
        return
    for i in range(store.count()):
        arrays = store.load(i, ("frames", "start"))
        yield int(arrays["start"]), arrays["frames"]


def _load_models(ctx: StageContext) -> MToVModels:
    """The MToV networks of this run (``ctx.models`` keeps them between runs)."""
    from MToV.loading import load_mtov

    trained = ctx.trained(MODEL_ASSETS[0])  # all three or none (pipeline.validate.check_assets)
    return ctx.models.load(
        "mtov",
        load_mtov,
        *(str(ctx.assets[k]) if trained else None for k in MODEL_ASSETS),
        config=stage_config(ctx.cfg.mtov.config),
        device=ctx.device,
        random_weights=not trained,
    )


def _generate(
    ctx: StageContext,
    store: BatchStore,
    frames: np.ndarray,
    conditions: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    to_sink: Callable[..., None],
    models: MToVModels,
    plan: PrecisionPlan,
) -> int:
    """Resume or start the batches of ``store`` with ``models`` in ``plan``'s arithmetic; returns the
    number of frames generated."""
    from MToV.generate import ClipBatch, SamplingOptions, StreamState, stream_video

    cfg, n = ctx.cfg, ctx.n_frames
    clip = models.clip_frames
    step = 1 if cfg.mtov.use_last_as_reference else int(cfg.mtov.batch_size)
    n_batches = -(-((n + clip - 1) // clip) // step)
    done = store.open({"n_frames": n, "clip_frames": clip, "clips_per_batch": step})
    first = min(n, done * step * clip)
    # the frames still to make are stored raw in the work folder (and encoded into the mp4s there):
    # checked before the first of them is generated
    size = int(cfg.size)
    check_space(store.partial, (n - first) * 3 * size * size * BYTES_PER_PIXEL_STORED, store.partial)
    if done:
        ctx.log(
            f"[mtov] resuming {store.partial.name}: {done} of {n_batches} batches ({first} of {n} frames) "
            f"already done, continuing at frame {first}"
        )
    carry = None
    for i in range(done):  # the finished batches go to the mp4 first
        arrays = store.load(i, ("frames", "start", "carry"))
        to_sink(arrays["frames"], int(arrays["start"]))
        carry = arrays.get("carry")
    encoded = (
        _encoded_from(store.load(i, ("rgb_keys", "rgb_latents", "ldmk_keys", "ldmk_latents")))
        for i in range(done)
    )
    ctx.events.progress("mtov", first, n)
    generated = 0

    def on_batch(batch: ClipBatch) -> None:
        nonlocal generated
        arrays = {"frames": batch.frames, "start": np.int64(batch.start), **_encoded_arrays(batch.encoded)}
        if batch.carry is not None:
            arrays["carry"] = batch.carry
        store.save(batch.index, arrays)
        to_sink(batch.frames, batch.start, batch.landmarks)
        generated += len(batch.frames)
        ctx.events.progress("mtov", batch.start + len(batch.frames), n)  # the log's line every 30 s

    options = SamplingOptions.from_config(cfg.mtov, precision=plan, latent_capacity=LATENT_CLIPS)
    ident = np.ascontiguousarray(frames[ctx.ref_frame].transpose(2, 0, 1))
    resume = StreamState(done, carry, encoded)
    stream_video(
        models, conditions, n, ident, options, on_batch=on_batch, progress=ctx.progress, resume=resume
    )
    store.finish()
    return generated
