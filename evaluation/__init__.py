"""Evaluation of generated talking-head videos against real ones (``python -m evaluation``).

Modules: :mod:`evaluation.protocol` (pairing, 25 fps / 256x256 streaming, length checks),
:mod:`evaluation.metrics` (PSNR, SSIM, LPIPS, FID, FVD, LMD, LSE, CSIM, CPBD),
:mod:`evaluation.frechet` (Frechet distance, streaming Gaussian statistics),
:mod:`evaluation.weights` (assets and network loaders), :mod:`evaluation.i3d`,
:mod:`evaluation.syncnet`, :mod:`evaluation.arcface` (networks written here),
:mod:`evaluation.evaluate` (the CLI and the report), :mod:`evaluation.protocols` (the generating
protocols: self-reconstruction and cross-identity through the pipeline) and :mod:`evaluation.clips`
(their inputs and real clips).
"""
