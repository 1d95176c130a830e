"""Benchmarks: consumers of the pipeline's stages, like :mod:`evaluation`.

* :mod:`benchmarks.inference` (``scripts/benchmark.sh``): the chain HuBERT -> AToM -> align -> MToV
  in the original's call pattern and the fast path, timed per stage; :mod:`benchmarks.prepare`
  builds its networks and inputs, :mod:`benchmarks.run` measures one mode, :mod:`benchmarks.report`
  writes the table;
* :mod:`benchmarks.training` (``scripts/benchmark_training.sh``): MToV diffusion training steps from
  frames vs from the latent cache;
* :mod:`benchmarks.options`: what their command lines share (``--threads``, the ``--json`` report).
"""
