"""Fixtures that render the dfk8s chart offline (helm-python-sdk) and validate what comes out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from dfk8s.kube.versions import SUPPORTED_KUBERNETES  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "dfk8s"
RELEASE = "demo"
NAMESPACE = "batch"
FULLNAME = "demo-dfk8s"

#: Values that switch every optional part on, for tests that want all objects.
ALL_ON = {
    "seaweedfs": {"enabled": True},
    "fakeApi": {"enabled": True},
    "modelCache": {"enabled": True},
    "secret": {
        "create": True,
        "apiKey": "sk-x",
        "awsAccessKeyId": "id",
        "awsSecretAccessKey": "key",
        "hfToken": "hf",
    },
}


class Rendered:
    """One render of the chart: objects by template file, and NOTES.txt."""

    def __init__(self, manifests: dict[str, str]):
        self.raw = manifests
        self.notes = ""
        self.by_template: dict[str, list[dict]] = {}
        for path, text in manifests.items():
            template = path.split("/templates/", 1)[1]
            if template == "NOTES.txt":
                self.notes = text
                continue
            objects = [doc for doc in yaml.safe_load_all(text) if doc]
            if objects:
                self.by_template[template] = objects

    @property
    def objects(self) -> list[dict]:
        return [obj for objs in self.by_template.values() for obj in objs]

    def one(self, template: str) -> dict:
        """The single object a template rendered (fails when it rendered none or several)."""
        objects = self.by_template.get(template, [])
        assert len(objects) == 1, f"{template} rendered {len(objects)} objects"
        return objects[0]

    def has(self, template: str) -> bool:
        return template in self.by_template

    def find(self, kind: str, name: str) -> dict:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise AssertionError(
            f"no {kind} {name} in {[(o['kind'], o['metadata']['name']) for o in self.objects]}"
        )


@pytest.fixture(autouse=True)
def _cached_schemas(k8s_schema_cache):
    """Every test here validates objects: read each schema file once."""


@pytest.fixture(scope="session")
def all_on() -> dict:
    """Values that switch every optional part on."""
    return ALL_ON


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def chart():
    loaded = helm_python.Chart.load(str(CHART_DIR))
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def render(chart):
    """Render the chart with values; returns a :class:`Rendered`."""

    def _render(values: dict | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
        return Rendered(chart.render(values or {}, name=name, namespace=namespace))

    return _render


@pytest.fixture(scope="session")
def validate():
    """Strictly validate objects against the oldest and newest supported Kubernetes versions."""

    def _validate(objects: list[dict]) -> None:
        assert objects, "nothing to validate"
        for obj in objects:
            for version in SUPPORTED_KUBERNETES:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = ".".join(str(part) for part in exc.path)
                    name = f"{obj['kind']}/{obj['metadata']['name']}"
                    raise AssertionError(
                        f"{name} invalid for Kubernetes {version} at {where}: {exc.message}"
                    ) from None

    return _validate
