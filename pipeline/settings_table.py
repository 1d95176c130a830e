"""The inference settings as text: ``python -m pipeline.settings [--markdown]`` prints every setting of
:mod:`pipeline.settings`'s schema (its key, flag, default, allowed values and help); docs/inference.md
holds the Markdown table, kept equal by tests/test_docs.py."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.settings import SETTINGS, Setting


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def _default_text(s: Setting) -> str:
    value = s.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _allowed_text(s: Setting) -> str:
    text = s.kind
    if s.check is not None:  # "an integer >= 1"; "one of auto, bf16" alone
        wanted = s.check.wanted
        text = f"{text} {wanted}" if wanted.startswith((">", "<", "in ")) else wanted
    if s.nullable and not s.free_form:
        text += ", or null"
    return text


def markdown_table() -> str:
    """Every setting as a Markdown table: key, flag, default, allowed values, help (docs/inference.md)."""
    lines = [
        "| setting | flag | default | allowed | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS.values():
        flag = f"`--{s.flag}`" if s.flag else ""
        default = _cell(_default_text(s))
        lines.append(f"| `{s.key}` | {flag} | `{default}` | {_cell(_allowed_text(s))} | {_cell(s.help)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.settings", description="Print the settings of python -m pipeline.inference."
    )
    parser.add_argument("--markdown", action="store_true", help="as a Markdown table (docs/inference.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
    else:
        for s in SETTINGS.values():
            print(f"{s.key} = {_default_text(s)}    # {s.help}")
    return 0
