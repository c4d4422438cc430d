"""The chart README's values table is generated from the `# --` comments in values.yaml.

Run ``python tests/charts/test_readme.py`` to rewrite the table after changing values.yaml.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "dfk8s"
BEGIN = "<!-- values-table:begin -->"
END = "<!-- values-table:end -->"
_KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):")
_DOC_RE = re.compile(r"^ *# -- ?(?P<text>.*)$")


def documented_values(text: str) -> dict[str, str]:
    """Map each dotted key preceded by a `# --` comment to that comment."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: str | None = None
    for line in text.splitlines():
        doc = _DOC_RE.match(line)
        if doc:
            pending = doc.group("text").strip()
            continue
        key = _KEY_RE.match(line)
        if not key:
            if not line.strip().startswith("#"):
                pending = None if line.strip() == "" else pending
            continue
        indent = len(key.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.group("key")))
        if pending is not None:
            docs[".".join(name for _, name in stack)] = pending
            pending = None
    return docs


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def values_rows(values: dict, docs: dict[str, str], prefix: str = "") -> tuple[list[str], list[str]]:
    """Table rows for every documented value, and the dotted keys of undocumented leaves."""
    rows: list[str] = []
    missing: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in docs:
            default = json.dumps(value, separators=(",", ":"))
            rows.append(f"| `{path}` | {_type_name(value)} | `{default}` | {docs[path]} |")
        elif isinstance(value, dict) and value:
            sub_rows, sub_missing = values_rows(value, docs, prefix=f"{path}.")
            rows += sub_rows
            missing += sub_missing
        else:
            missing.append(path)
    return rows, missing


def render_table() -> str:
    text = (CHART / "values.yaml").read_text()
    rows, _ = values_rows(yaml.safe_load(text), documented_values(text))
    return "\n".join(
        ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|", *rows]
    )


def test_should_document_every_value_when_values_yaml_is_read():
    text = (CHART / "values.yaml").read_text()
    _, missing = values_rows(yaml.safe_load(text), documented_values(text))
    assert missing == [], f"values without a `# --` comment: {missing}"


def test_should_list_every_value_in_readme_when_the_table_is_regenerated():
    readme = (CHART / "README.md").read_text()
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == render_table(), "README values table is stale: run python tests/charts/test_readme.py"


if __name__ == "__main__":
    path = CHART / "README.md"
    readme = path.read_text()
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{tail}")
    sys.exit(0)
