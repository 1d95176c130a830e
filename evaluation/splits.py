"""The HDTF test split shipped with the code (``evaluation/hdtf_test_ids.txt``: the 98 held-out clip ids
of the original MoDiTalker, whose ``MToV/text_folders/train_id.txt`` lists them despite its name).

The generating protocols (``python -m evaluation --protocol hdtf_selfrecon`` and ``cross_identity
--pairs auto``) use it when no ``--split_file`` is given; MToV training takes it as
``data.split_file=evaluation/hdtf_test_ids.txt`` (the listed ids are held out, ``data.split_mode=heldout``).
"""

from __future__ import annotations

from pathlib import Path

from moditalker.errors import UserError
from moditalker.fileio import require_file

__all__ = ["HDTF_TEST_SPLIT", "auto_pairs", "hdtf_test_ids", "read_ids", "read_pairs"]

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


# ----------------------------------------------------------------------------- split and pairs files
def _lines(path: str | Path, what: str) -> list[tuple[int, list[str]]]:
    path = require_file(path, what)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from exc
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if words:
            out.append((i, words))
    if not out:
        raise UserError(f"{what} {path} lists nothing (one entry per line, # comments)")
    return out


def read_ids(path: str | Path) -> list[str]:
    """The ids of a split file: one per line, blank lines and ``#`` comments ignored."""
    ids: list[str] = []
    for i, words in _lines(path, "split file"):
        if len(words) != 1:
            raise UserError(f"line {i} of split file {path} holds {len(words)} words; put one id per line")
        if words[0] in ids:
            raise UserError(f"line {i} of split file {path}: id {words[0]} is listed twice")
        ids.append(words[0])
    return ids


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``(audio_id, ref_id)`` per line of a pairs file (``#`` comments)."""
    pairs: list[tuple[str, str]] = []
    for i, words in _lines(path, "pairs file"):
        if len(words) != 2:
            raise UserError(
                f"line {i} of pairs file {path}: expected 'audio_id ref_id', got {' '.join(words)!r}"
            )
        if words[0] == words[1]:
            raise UserError(
                f"line {i} of pairs file {path} pairs {words[0]} with itself; cross_identity needs two ids "
                "(self-driven videos are --protocol hdtf_selfrecon)"
            )
        if tuple(words) in pairs:
            raise UserError(f"line {i} of pairs file {path}: the pair {' '.join(words)} is listed twice")
        pairs.append((words[0], words[1]))
    return pairs


def auto_pairs(ids: list[str]) -> list[tuple[str, str]]:
    """Each id's audio with the next id's reference (the last with the first)."""
    if len(ids) < 2:
        raise UserError(f"--pairs auto needs at least two test ids, the split file lists {len(ids)}")
    return [(a, ids[(i + 1) % len(ids)]) for i, a in enumerate(ids)]
