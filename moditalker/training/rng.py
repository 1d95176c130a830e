"""Random-number states for exact resume: save every generator a training step draws from (Python,
NumPy, torch CPU, CUDA) and restore them, and seed them all from (seed, epoch) at an epoch start so
the shuffle order of an epoch does not depend on how the run got there."""

from __future__ import annotations

import random
import sys

import numpy as np
import torch


def rng_state() -> dict:
    """The current states of Python's, NumPy's and torch's global generators (CUDA too, when present),
    as tensors, lists and numbers (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {  # plain tensors, lists and numbers only: checkpoints are read with weights_only=True
        "python": list(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU seen at the save: a machine that sees fewer restores those it has (setting
        # the state of a GPU that does not exist fails)
        saved, here = len(state["cuda"]), torch.cuda.device_count()
        if saved != here:
            print(
                f"warning: the random states were saved where {saved} GPU(s) were visible and {here} are "
                "now; the GPUs' random draws will not repeat the saved run's",
                file=sys.stderr,
                flush=True,
            )
        for index, cuda_state in enumerate(state["cuda"][:here]):
            torch.cuda.set_rng_state(cuda_state, index)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``SeedSequence``): e.g. (run seed, epoch)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_to_json(state: dict) -> dict:
    """:func:`rng_state`'s states as JSON values (lists of numbers), for a record such as trainer.json."""
    out = {
        "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
        "numpy": [state["numpy"][0], state["numpy"][1].tolist(), *state["numpy"][2:]],
        "torch": state["torch"].tolist(),
    }
    if "cuda" in state:
        out["cuda"] = [s.tolist() for s in state["cuda"]]
    return out


def rng_from_json(data: object) -> dict | None:
    """The states :func:`rng_to_json` wrote (for :func:`set_rng_state`), or None where ``data`` is not
    such a record (a hand-edited or foreign file)."""
    try:
        version, internal, gauss = data["python"]
        kind, keys, pos, has_gauss, cached = data["numpy"]
        state = {
            "python": [int(version), [int(i) for i in internal], gauss if gauss is None else float(gauss)],
            "numpy": [
                str(kind),
                torch.tensor(keys, dtype=torch.int64),
                int(pos),
                int(has_gauss),
                float(cached),
            ],
            "torch": torch.tensor(data["torch"], dtype=torch.uint8),
        }
        if "cuda" in data:
            state["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in data["cuda"]]
        random.Random().setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        np.random.RandomState().set_state(
            (kind, state["numpy"][1].numpy().astype(np.uint32), pos, has_gauss, cached)
        )
        torch.Generator().set_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
        return None
    return state
