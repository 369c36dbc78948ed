"""The dashboard: static pages that `vitalproof serve` serves at ``/ui/``.

Plain HTML and ES modules, no build step of their own; the one library they use (uPlot, for
the charts) comes from npm and is copied into ``static/vendor`` at build time (``make web``),
so a page never loads anything from another origin. Every figure a page shows comes from the
service's API under the same consent check and audit as any other client's request.
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
#: What ``make web`` vendors from node_modules; the chart pages say so if it is missing.
VENDORED = ("vendor/uPlot.iife.min.js", "vendor/uPlot.min.css")


def missing_vendored() -> list[str]:
    """Vendored files that are not there (an install without ``make web``)."""
    return [name for name in VENDORED if not (STATIC / name).is_file()]
