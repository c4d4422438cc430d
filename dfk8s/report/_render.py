"""Render report.html with jinja2, autoescaping everything (user text is never markup).

The page carries its CSS and JavaScript inline and fetches nothing: a Content-Security-Policy allows only
that exact script and style (by hash), images, and no connections at all.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).parent


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from dfk8s.report._links import short_ref

    env.filters["short_ref"] = short_ref
    return env


@lru_cache(maxsize=1)
def _assets() -> tuple[str, str]:
    return (_HERE / "report.css").read_text(encoding="utf-8"), (_HERE / "report.js").read_text(
        encoding="utf-8"
    )


def render(page: dict, cards) -> bytes:
    """Render the page facts and the (linked) cards into report.html's bytes."""
    from dfk8s.report._links import content_digest

    css, js = _assets()
    csp = (
        "default-src 'none'; img-src file: data: http: https:; "
        f"style-src 'sha256-{content_digest(css.encode())}'; "
        f"script-src 'sha256-{content_digest(js.encode())}'; "
        "base-uri 'none'; form-action 'none'"
    )
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(**{**page, "cards": cards}, css=css, js=js, csp=csp)
    )
    return html.encode("utf-8")
