"""A fake OpenAI / Gemini API server that speaks the real wire formats and injects faults on demand.

Users run it for trials (``python -m dfk8s.testing.fake_api --port 8000``; the chart's ``fakeApi``
deploys it); tests and benchmarks point the real ``openai`` and ``google-genai`` SDKs at it.

Modules: ``server`` (the aiohttp app, its faults and counters, OpenAI's endpoints, the CLI), ``gemini``
(Gemini's request and reply shapes), ``batch`` (the OpenAI and Gemini batch APIs), ``_wire`` (what they
share: the knobs, fault triggers, image checks).
"""

from dfk8s.testing.fake_api._wire import FakeConfig
from dfk8s.testing.fake_api.server import FakeAPI, main

__all__ = ["FakeAPI", "FakeConfig", "main"]
