"""The stages of :func:`pipeline.inference.run_inference`, one module each, in run order:

1. :mod:`~pipeline.stages.reference`  reference video -> 25 fps -> centre crop 256x256 (or one photo),
   stored as a memory-mapped array;
2. :mod:`~pipeline.stages.landmarks`  FAN 68-point 2D landmarks of the reference frames;
3. :mod:`~pipeline.stages.recon`      Deep3DFaceRecon 257 3DMM coefficients of the reference frames;
4. :mod:`~pipeline.stages.hubert`     audio -> 16 kHz -> HuBERT features (50 Hz);
5. :mod:`~pipeline.stages.atom`       AToM -> frontal 3D landmarks for the whole audio;
6. :mod:`~pipeline.stages.align`      frontal landmarks re-posed onto the reference frames, dot video;
7. :mod:`~pipeline.stages.mtov`       MToV -> 256x256 frames, streamed in batches of 16-frame clips, each
   batch stored as it is finished (:mod:`~pipeline.stages.batches`: a killed run resumes there)
   and encoded at once into
8. :mod:`~pipeline.stages.output`     the mp4 with the input audio and the preview (open while MToV
   runs, renamed into place when complete), the config, timings.

Each takes the shared :class:`~pipeline.stages.context.StageContext` and its predecessors'
:class:`~pipeline.stages.context.StageResult`; stages 1-7 are cached in the work folder as
``<stage>-<hash>/`` (:mod:`pipeline.cache`) under a key of their inputs, upstream keys, model
identities and the settings :func:`pipeline.settings.stage_settings` assigns them.
"""

from pipeline.stages import align, atom, batches, hubert, landmarks, mtov, output, recon, reference
from pipeline.stages.context import StageContext, StageResult, open_context

__all__ = [
    "StageContext",
    "StageResult",
    "open_context",
    "reference",
    "landmarks",
    "recon",
    "hubert",
    "atom",
    "align",
    "batches",
    "mtov",
    "output",
]
