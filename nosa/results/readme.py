"""Generated sections of the README: a marked region (`<!-- NAME:start -->` ... `<!-- NAME:end -->`) is
rewritten from committed result files, so figures in the README are never typed by hand."""

from __future__ import annotations


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(readme: str, name: str, body: str) -> None:
    """Rewrite the README's `name` section with body; everything outside the markers stays as it is."""
    start, end = section_markers(name)
    with open(readme) as f:
        text = f.read()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme} needs exactly one {start} ... {end} section to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(head + start + "\n" + body + "\n" + end + tail)
