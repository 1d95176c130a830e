"""data.synthetic.write_world: an existing world is kept unless --overwrite, which leaves nothing of it."""

from __future__ import annotations

import pytest

from data.synthetic import write_world
from moditalker.errors import UserError


def test_overwrite_leaves_nothing_of_the_old_world(tmp_path):
    out = tmp_path / "world"
    write_world(out, seed=1, n_train=2, n_heldout=1, size=32, seconds=(1.0, 1.2), progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        write_world(out, seed=2, n_train=1, n_heldout=1, size=32, progress=False)
    new = write_world(
        out, seed=2, n_train=1, n_heldout=1, size=32, seconds=(1.0, 1.2), overwrite=True, progress=False
    )
    ids = set(new["train_ids"]) | set(new["heldout_ids"])
    assert ids and all(i.startswith("syn2_") for i in ids)
    meta = {p.stem for p in (out / "hdtf" / "meta").iterdir()}
    frames = {p.name for p in (out / "hdtf" / "frames").iterdir()}
    atom = {p.stem for p in (out / "atom").rglob("*.npz")}
    assert meta == frames == ids and atom and all(a.startswith("syn2_") for a in atom)
