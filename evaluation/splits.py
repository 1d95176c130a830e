"""The HDTF test split shipped with the code (``evaluation/hdtf_test_ids.txt``: the 98 held-out clip ids
of the original MoDiTalker, whose ``MToV/text_folders/train_id.txt`` lists them despite its name).

The generating protocols (``python -m evaluation --protocol hdtf_selfrecon`` and ``cross_identity
--pairs auto``) use it when no ``--split_file`` is given; MToV training takes it as
``data.split_file=evaluation/hdtf_test_ids.txt`` (the listed ids are held out, ``data.split_mode=heldout``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HDTF_TEST_SPLIT", "hdtf_test_ids"]

#: the shipped split file (one id per line, ``#`` comments)
HDTF_TEST_SPLIT = Path(__file__).with_name("hdtf_test_ids.txt")


def hdtf_test_ids() -> list[str]:
    """The 98 test ids, in the original order (``{subset}_{video}_{clip:03d}``, e.g. ``RD_Radio34_003``)."""
    ids = []
    for line in HDTF_TEST_SPLIT.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids
