"""Flags shared by ``dfk8s run`` and ``dfk8s submit``, declared once (users script against these names)."""

from __future__ import annotations

import click

from dfk8s.cli._common import s3_endpoint_option
from dfk8s.pipelines import PIPELINES
from dfk8s.run.spec import DEFAULT_SAVE_INTERVAL, SERVING_OPTION_NAMES
from dfk8s.servings import API_DEFAULTS, ENGINE_HANG_SECONDS, ENGINE_TIMEOUT, SERVINGS


def _apply(options):
    def decorator(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorator


def _model_defaults() -> str:
    """Each serving's default model, for --model's help (from the servings registry)."""
    out = []
    for name, info in SERVINGS.items():
        models = {info.defaults_for(p).get("model") for p in info.pipelines} - {None}
        if len(models) == 1:
            out.append(f"{name} {models.pop()}")
        elif models:
            each = [f"{info.defaults_for(p)['model']} for {p}" for p in info.pipelines
                    if info.defaults_for(p).get("model")]
            out.append(f"{name} " + " / ".join(each))
    return "; ".join(out)


PIPELINE_OPTIONS = [
    click.option("--pipeline", "-p", type=click.Choice(sorted(PIPELINES)),
                 help="What to do with each row (not needed to resume: run.json knows it)."),
    click.option("--input", "-i", "input_", metavar="PATH|S3URI",
                 help="Manifest: JSONL, a JSON array or Parquet, local or s3://; or a folder or glob of them "
                      "(read in sorted file order); or a folder of images, one row each (not needed to "
                      "resume)."),
    click.option("--run-id", help="Resume this run, or give a new run this id."),
    click.option("--serving", type=click.Choice(sorted(SERVINGS)),
                 help="Backend; default: openai-chat for caption/vqa, diffusers for text2image/imageedit."),
    click.option("--model", help="API model name, or a hub name / local folder for diffusers, vllm and "
                                  "transformers (default: "
                                  + _model_defaults() + ")."),
    click.option("--input-key", help="Conversation key (default: conversations, then conversation); a plain "
                                      "string column (e.g. LAION's caption) is a one-turn prompt."),
    click.option("--image-key", help="Input image key (default: images, then image); it may hold paths, "
                                      "s3://, http(s):// or data: URIs, or image bytes (Parquet binary)."),
    click.option("--prompt", metavar="TEXT",
                 help="The user turn for rows without a conversation (a folder of images, a table of URLs)."),
    click.option("--limit", type=click.IntRange(min=1), help="Plan only the manifest's first N rows."),
    click.option("--sample", type=click.IntRange(min=1),
                 help="Plan a uniform random sample of N rows (drawn with --seed), kept in input order."),
    click.option("--output-key", help="Key the result is written to (default per pipeline)."),
    click.option("--id-key", help="Row key holding a unique id (default: the row's position)."),
    click.option("--image-root", type=click.Path(file_okay=False),
                 help="Folder relative image paths are taken from (default: the manifest's folder)."),
    click.option("--shards", type=click.IntRange(min=1), help="Split into exactly N shards."),
    click.option("--rows-per-shard", type=click.IntRange(min=1),
                 help="Rows per shard. Default: sized to the work, about 4 shards per worker (run) or pod "
                      "(submit), none under ~10 s of work locally or ~5 min on Kubernetes at the serving's "
                      "estimated rate (--max-concurrency / its latency estimate), at most 50,000 rows."),
    click.option("--save-interval", type=click.IntRange(min=1), default=DEFAULT_SAVE_INTERVAL,
                 show_default=True,
                 help="Checkpoint a part every N finished rows."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Run seed; each row's seed derives from it and the row id."),
    s3_endpoint_option,
    click.option("--image-timeout", type=click.FloatRange(min=0, min_open=True),
                 help="Seconds to fetch one http(s) image (default 30)."),
    click.option("--allow-private-image-hosts", is_flag=True, default=False,
                 help="Let workers fetch images from loopback, private and link-local addresses (on-premise "
                      "hosts); by default such URLs fail with BlockedAddress."),
    click.option("--allow-image-network", "allowed_image_networks", metavar="CIDR", multiple=True,
                 help="Allow image URLs in this network only (repeatable), e.g. 10.20.0.0/16."),
    click.option("--image-fetch", type=click.Choice(["worker", "provider"]),
                 help="Who fetches http(s) images: the worker (default; checked like local files) or, for "
                      "openai-chat, the provider (URLs are passed to the API as image URLs)."),
]

API_OPTIONS = [
    click.option("--api-url", envvar="DF_BASE_URL",
                 help="OpenAI-compatible or Gemini base URL (default: $DF_BASE_URL, else the vendor's). "
                      "The key comes from $DF_API_KEY (or $OPENAI_API_KEY / $GEMINI_API_KEY)."),
    click.option("--system-prompt", help="System prompt (caption default: DataFlow-MM's)."),
    click.option("--temperature", type=float, help="Sampling temperature, passed through."),
    click.option("--max-tokens", type=click.IntRange(min=1), help="Answer length limit, passed through."),
    click.option("--max-concurrency", type=click.IntRange(min=1),
                 help="API requests in flight per worker (default per serving: "
                      + ", ".join(f"{n} {s.defaults['max_concurrency']}" for n, s in SERVINGS.items()
                                  if s.is_api) + ")."),
    click.option("--rpm", type=click.FloatRange(min=0, min_open=True),
                 help="Requests per minute for the whole run (split across workers)."),
    click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                 help="Seconds before a request is abandoned and retried (default "
                      f"{API_DEFAULTS['timeout']:g})."),
    click.option("--max-retries", type=click.IntRange(min=0),
                 help="Retries of a 429/5xx/timeout before the row gets an error record (default "
                      f"{API_DEFAULTS['max_retries']})."),
    click.option("--client", type=click.Choice(["fast", "sdk"]),
                 help="openai-chat / gemini-images request path: fast (aiohttp + orjson, the same wire "
                      "requests at a fraction of the CPU; the default) or sdk (the vendor's SDK)."),
]

ENGINE_OPTIONS = [
    click.option("--max-model-len", type=click.IntRange(min=16),
                 help="vllm / transformers: longest prompt plus answer, in tokens (default: the model's)."),
    click.option("--gpu-memory-utilization", type=click.FloatRange(min=0, max=1, min_open=True),
                 help="vllm: the share of each GPU's memory the engine takes (vLLM's default 0.9)."),
    click.option("--engine-arg", "engine_args", metavar="KEY=VALUE", multiple=True,
                 help="vllm / transformers: passed to the engine as --KEY VALUE (repeatable; KEY alone is a "
                      "switch), e.g. --engine-arg max-num-seqs=64."),
    click.option("--engine-timeout", type=click.FloatRange(min=1), metavar="S",
                 help="vllm / transformers: seconds the engine may take to become ready (weights load, "
                      f"warm-up) before the worker fails, retryably (default {ENGINE_TIMEOUT:g})."),
    click.option("--engine-hang-seconds", type=click.FloatRange(min=1), metavar="S",
                 help="vllm / transformers: with rows in flight and no answer for S seconds, the engine is "
                      f"stopped and the shard retried (default {ENGINE_HANG_SECONDS:g})."),
]

IMAGE_OPTIONS = [
    click.option("--steps", type=click.IntRange(min=1), help="diffusers: inference steps."),
    click.option("--guidance", type=float, help="diffusers: guidance scale."),
    click.option("--height", type=click.IntRange(min=16), help="diffusers: image height."),
    click.option("--width", type=click.IntRange(min=16), help="diffusers: image width."),
    click.option("--batch-size", type=click.IntRange(min=1), help="diffusers: prompts per batch."),
    click.option("--images-per-prompt", type=click.IntRange(min=1), help="Images generated per row."),
    click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
                 help="diffusers: weights dtype (default bfloat16)."),
    click.option("--cpu-offload/--no-cpu-offload", default=None, help="diffusers: offload to CPU."),
    click.option("--max-area", type=click.IntRange(min=64 * 64),
                 help="diffusers imageedit: output pixel budget (default: Kontext's 1024*1024)."),
    click.option("--auto-resize/--no-auto-resize", default=None,
                 help="diffusers imageedit: snap the input to Kontext's preferred resolutions (default on)."),
    click.option("--max-sequence-length", type=click.IntRange(min=1),
                 help="diffusers: T5 prompt tokens (default 512; FLUX.1-schnell needs <= 256)."),
    click.option("--compile/--no-compile", default=None,
                 help="diffusers: the lossless fast path (fused QKV projections, regional torch.compile, "
                      "compiled once per cluster and kept in $DFK8S_COMPILE_CACHE). Default: on with a CUDA "
                      "GPU, off on a CPU."),
    click.option("--step-cache", type=click.FloatRange(min=0, max=1, min_open=True), metavar="THRESHOLD",
                 help="diffusers, lossy: First Block Cache at THRESHOLD (0.35: ~2x faster, slightly "
                      "different images). Recorded in run.json and shown in the report. Default: off."),
    click.option("--fp8/--no-fp8", default=None,
                 help="diffusers, lossy: fp8 weights and activations (torchao), on GPUs of compute "
                      "capability 8.9+ (Ada, Hopper, Blackwell). Recorded and shown. Default: off."),
    click.option("--size", help="OpenAI images: size, e.g. 1024x1024."),
    click.option("--quality", help="OpenAI images: quality (standard/hd, low/medium/high)."),
    click.option("--response-format", type=click.Choice(["b64_json", "url"]),
                 help="OpenAI images (dall-e models): how images come back (default b64_json)."),
    click.option("--mask", metavar="PNG|S3URI",
                 help="OpenAI image edits: a PNG mask (alpha = area to edit), applied to every row."),
    click.option("--aspect-ratio", help="Gemini images: aspect ratio, e.g. 16:9."),
    click.option("--image-size", help="Gemini images: image size (1K, 2K, 4K) where supported."),
]

COST_OPTIONS = [
    click.option("--max-cost", type=click.FloatRange(min=0), metavar="USD",
                 help="Budget: refuse to start when the estimate is over it, and stop (resumably) when the "
                      "run's actual spend passes it."),
    click.option("--prices", metavar="FILE", type=click.Path(dir_okay=False),
                 help="Price table (YAML) for the estimate and the spend (default: the dated table shipped "
                      "in dfk8s, dfk8s/cost/prices.yaml)."),
    click.option("--api-mode", type=click.Choice(["sync", "batch"]),
                 help="sync (default): one request per row now. batch: each shard is one provider batch "
                      "at half the price, results within 24 h (OpenAI Batch API: caption, vqa, text2image; "
                      "Gemini Batch Mode: text2image, imageedit)."),
    click.option("--batch-poll-seconds", type=click.FloatRange(min=0.01), metavar="S",
                 help="Batch mode: longest wait between polls of a batch (default 60; polls start fast "
                      "and back off)."),
    click.option("--max-image-side", type=click.IntRange(min=16), metavar="PX",
                 help="caption, vqa, edits: downscale an input image whose longer side is over PX before it "
                      "is sent (aspect and format kept; the row keeps its path). Default: off."),
]

#: ``dfk8s run`` and ``dfk8s submit``.
shared_run_options = _apply(PIPELINE_OPTIONS + API_OPTIONS + ENGINE_OPTIONS + IMAGE_OPTIONS + COST_OPTIONS)
local_run_options = shared_run_options
#: ``dfk8s retry``: the serving options a retry may change (only those given count as changes).
retry_serving_options = _apply([PIPELINE_OPTIONS[3], PIPELINE_OPTIONS[4], PIPELINE_OPTIONS[-1]] + API_OPTIONS
                               + ENGINE_OPTIONS + IMAGE_OPTIONS)


def given_flags(ctx: click.Context) -> set[str]:
    """Names of the parameters set on the command line (not defaults, not environment variables).

    ``input_`` is named ``input``, as the :class:`dfk8s.plan.launch.RunRequest` field it fills: a resume
    refuses the given ones that differ from run.json.
    """
    from click.core import ParameterSource

    return {"input" if name == "input_" else name for name in ctx.params
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


def run_request_from_flags(output: str, flags: dict):
    """Build a :class:`dfk8s.plan.launch.RunRequest` from the shared flags."""
    from dfk8s.plan.launch import RunRequest

    return RunRequest(
        pipeline=flags["pipeline"], output=output, input=flags.get("input_"), run_id=flags.get("run_id"),
        serving=flags.get("serving"),
        options={name: list(flags[name]) if isinstance(flags.get(name), tuple) else flags.get(name)
                 for name in SERVING_OPTION_NAMES if flags.get(name) is not None and flags.get(name) != ()},
        input_key=flags.get("input_key"), image_key=flags.get("image_key"),
        output_key=flags.get("output_key"), id_key=flags.get("id_key"), image_root=flags.get("image_root"),
        shards=flags.get("shards"), rows_per_shard=flags.get("rows_per_shard"),
        save_interval=flags.get("save_interval") or DEFAULT_SAVE_INTERVAL, seed=flags.get("seed") or 0,
        endpoint_url=flags.get("s3_endpoint"), max_cost=flags.get("max_cost"), prices=flags.get("prices"),
        limit=flags.get("limit"), sample=flags.get("sample"))
