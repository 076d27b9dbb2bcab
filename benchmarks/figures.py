"""The footer every benchmark plot carries: the command that made it, so a figure can be redone."""

from __future__ import annotations

from pathlib import Path


def save_with_command(fig, path: str | Path, command: str, top: float = 1.0) -> None:
    """Write `fig` to `path` with `command` in small print along its bottom edge."""
    fig.text(0.01, 0.01, command, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, top))
    fig.savefig(path, dpi=120)
