"""Shared infrastructure of the MoDiTalker reimplementation: errors and the CLI wrapper, configs,
atomic files, devices, checkpoint loading, timing, the asset registry and the training helpers.

It imports nothing from AToM, MToV, data or pipeline; they all build on it.
"""
