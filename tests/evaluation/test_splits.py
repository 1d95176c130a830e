"""The HDTF test split ships with the code and is the protocols' default."""

from __future__ import annotations

from collections import Counter

import pytest

from evaluation import protocols
from evaluation.evaluate import build_parser
from evaluation.splits import HDTF_TEST_SPLIT, hdtf_test_ids
from moditalker.errors import UserError
from MToV.dataset import read_split_file


def test_the_shipped_split_is_the_originals_98_test_ids():
    ids = hdtf_test_ids()
    assert len(ids) == 98 and len(set(ids)) == 98
    assert Counter(i.split("_")[0] for i in ids) == {"RD": 60, "WDA": 21, "WRA": 17}
    assert ids[:2] == ["RD_Radio46_000", "RD_Radio43_000"] and ids[-1] == "WRA_LisaMurkowski0_000"
    # every RD clip of the original evaluation, e.g. RD_Radio34_000..009 and RD_Radio11_001
    assert {f"RD_Radio34_{k:03d}" for k in range(10)} <= set(ids) and "RD_Radio11_001" in ids
    # both readers (evaluation, MToV training's data.split_file) read the same ids
    assert protocols.read_ids(HDTF_TEST_SPLIT) == ids == read_split_file(HDTF_TEST_SPLIT)


def test_protocols_default_to_it(tmp_path):
    for extra in ([], ["--pairs", "auto"]):
        protocol = "cross_identity" if extra else "hdtf_selfrecon"
        args = build_parser().parse_args(
            ["--protocol", protocol, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), *extra]
        )
        protocols._check_flags(args)
        assert args.split_file == str(HDTF_TEST_SPLIT)


def test_test_ids_missing_from_the_download_are_named_and_skipped(tmp_path, capsys):
    """HDTF videos leave the host over time: the default split evaluates the ids that are there."""
    args = build_parser().parse_args(
        ["--protocol", "hdtf_selfrecon", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]
    )
    protocols._check_flags(args)
    have = {i: tmp_path / f"{i}.mp4" for i in ("RD_Radio43_000", "WDA_JackyRosen_000", "RD_Other_000")}
    jobs = protocols.make_jobs(args, have)
    assert [j.name for j in jobs] == ["RD_Radio43_000", "WDA_JackyRosen_000"]  # the split's order
    err = capsys.readouterr().err
    assert "warning: 96 of the 98 HDTF test ids have no video" in err and "RD_Radio46_000" in err
    own = tmp_path / "split.txt"  # a split file of one's own must be complete
    own.write_text("RD_Radio43_000\nRD_Radio46_000\n")
    args.split_file = str(own)
    with pytest.raises(UserError, match="1 id\\(s\\) of split file"):
        protocols.make_jobs(args, have)
