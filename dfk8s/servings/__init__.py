"""Servings registry: name -> class, imported lazily so a caption worker never imports torch."""

from __future__ import annotations

import importlib

from dfk8s.errors import SpecError
from dfk8s.servings.base import ImageInput, Message, Request, Response, RowError, Serving

#: Serving name -> "module:Class".
SERVINGS: dict[str, str] = {
    "openai-chat": "dfk8s.servings.openai_chat:OpenAIChatServing",
    "openai-images": "dfk8s.servings.openai_images:OpenAIImagesServing",
    "gemini-images": "dfk8s.servings.gemini_images:GeminiImagesServing",
    "diffusers": "dfk8s.servings.diffusers_flux:DiffusersServing",
    "echo": "dfk8s.servings.echo:EchoServing",
}


def serving_class(name: str) -> type[Serving]:
    """Return the serving class registered under ``name``.

    Raises:
        SpecError: Unknown serving, or its extra is not installed.
    """
    try:
        target = SERVINGS[name]
    except KeyError:
        raise SpecError(f"unknown serving {name!r}; choose one of {', '.join(sorted(SERVINGS))}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = "gpu" if name == "diffusers" else "api"
        raise SpecError(f"serving {name!r} needs the '{extra}' extra: pip install 'dfk8s[{extra}]' "
                        f"({exc.name} is missing)") from None
    return getattr(module, cls_name)


def build_serving(spec) -> Serving:
    """Build the serving a run spec names."""
    return serving_class(spec.serving).from_spec(spec)


__all__ = ["SERVINGS", "ImageInput", "Message", "Request", "Response", "RowError", "Serving",
           "build_serving", "serving_class"]
