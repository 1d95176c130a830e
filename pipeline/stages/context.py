"""What every pipeline stage is given: the resolved config, the checked paths, the device, the work
cache, the log and the timings (:class:`StageContext`), and what a cached stage returns
(:class:`StageResult`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from moditalker.config import save_config
from moditalker.constants import FPS
from moditalker.errors import UserError
from moditalker.fileio import remove_path
from moditalker.timing import StageTimer
from pipeline.cache import WorkCache, asset_identity
from pipeline.events import StageEvents, StageLog, StageTimes, Subscribers
from pipeline.models import ModelCache
from pipeline.settings import stage_settings
from pipeline.validate import Inputs

__all__ = ["StageResult", "StageContext", "open_context"]


@dataclass
class StageResult:
    """The arrays a cached stage produced (or reused) and its cache key (part of its successors' keys)."""

    arrays: dict[str, np.ndarray]
    key: str

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


@dataclass
class StageContext:
    """The run-wide state the stages share."""

    cfg: DictConfig
    inputs: Inputs
    assets: dict[str, Path]  # moditalker.assets name -> path
    device: torch.device
    cache: WorkCache
    bfm_dir: Path  # the real BFM's folder, or the synthetic one in the work folder
    n_frames: int  # video frames: the audio's duration at 25 fps
    log: Callable[[str], None]
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # stage -> a remark for the timing report
    models: ModelCache = field(default_factory=ModelCache)  # the networks (warm across runs in the app)
    events: StageEvents = field(default_factory=StageEvents)  # the stages' start, end and progress
    times: StageTimes = field(default_factory=StageTimes)  # one of the subscribers: the timing table

    @property
    def random_weights(self) -> bool:
        return bool(self.cfg.random_weights)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def size(self) -> int:
        return int(self.cfg.size)

    @property
    def ref_frame(self) -> int:
        return int(self.cfg.ref_frame)

    def trained(self, asset: str) -> bool:
        """Whether the network of ``asset`` loads its checkpoint: always without random weights; with
        them only when its path was given explicitly (``assets.atom=...``): trained tiny checkpoints
        then run with random stand-ins for the networks that were not trained."""
        return not self.random_weights or self.cfg.assets.get(asset) is not None

    def model_id(self, asset: str, random: str = "random") -> str:
        """Cache-key identity of a network: ``random`` when it runs with random weights, else its
        checkpoint's."""
        return asset_identity(self.assets[asset]) if self.trained(asset) else random

    def timer(self) -> StageTimer:
        """Times an uncached step into :attr:`timings` (``with ctx.timer()("render"): ...``)."""
        return StageTimer(self.timings, log=self.log)

    def run(
        self, stage: str, parts: Mapping[str, Any], compute: Callable[[Path], Mapping[str, np.ndarray]]
    ) -> StageResult:
        """Run ``stage`` through the work cache. Its key holds ``parts`` (inputs, upstream keys, model
        identities) and the settings the schema assigns to the stage (:func:`stage_settings`)."""
        parts = {**parts, **stage_settings(self.cfg, stage)}
        arrays, key = self.cache.run(stage, parts, compute, self.log, self.events)
        return StageResult(arrays, key)


def open_context(
    cfg: DictConfig,
    inputs: Inputs,
    assets: dict[str, Path],
    n_frames: int,
    seconds: float,
    *,
    log: Callable[[str], None],
    progress: bool,
    models: ModelCache | None = None,
    events: StageEvents | None = None,
) -> StageContext:
    """Resolve the device, open the work folder (with the run's config in it) and, with random
    weights, write the synthetic BFM there. ``models``: the network cache (None: a fresh one).
    The stages' events go to the log's lines (:class:`StageLog`), the timing table (:class:`StageTimes`)
    and ``events``."""
    from moditalker.device import resolve_device

    device = resolve_device(cfg.device)
    log(f"audio {inputs.audio}: {seconds:.2f} s -> {n_frames} frames at {FPS} fps; device {device}")
    cache = WorkCache(inputs.work_dir)
    if (inputs.work_dir / "config.yaml").is_dir():
        raise UserError(f"{inputs.work_dir / 'config.yaml'} is a folder; the run writes its config there")
    save_config(cfg, inputs.work_dir / "config.yaml")
    if cfg.random_weights:
        from data.face3d import synthetic_bfm_problem, write_synthetic_bfm

        bfm_dir = inputs.work_dir / "synthetic_bfm"
        problem = synthetic_bfm_problem(bfm_dir) if bfm_dir.exists() else "absent"
        if problem is not None:  # the work folder's own: made again from the seed
            if problem != "absent":
                log(f"warning: {bfm_dir}: {problem}; writing the synthetic face model again")
            remove_path(bfm_dir)
            write_synthetic_bfm(bfm_dir, seed=int(cfg.seed))
    else:
        bfm_dir = assets["bfm_front"].parent
    models = ModelCache() if models is None else models
    times = StageTimes()
    subscribers = Subscribers(StageLog(log), times, events)
    return StageContext(
        cfg,
        inputs,
        assets,
        device,
        cache,
        bfm_dir,
        n_frames,
        log,
        progress,
        models=models,
        events=subscribers,
        times=times,
    )
