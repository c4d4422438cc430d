"""FLUX.1-dev text2image throughput: DataFlow-MM's settings against dfk8s's, on random weights.

No download: the models are built from FLUX.1-dev's published configs (a 12B transformer with 19 double and
38 single blocks, the 16-channel VAE, a T5-XXL encoder and CLIP-L) with random weights, straight on the
GPUs, and the tokenizers are small local ones (that changes tokenization, not the cost: prompts are padded
to 77 CLIP and ``--max-sequence-length`` T5 tokens either way). Speed does not depend on the weights.

Cases over the same prompts, one pipeline per GPU in each, each in a fresh process of its own (an empty
inductor cache, so compilation is timed as a new pod meets it):

* ``dataflow``: DataFlow-MM's LocalImageGenServing: float16, ``enable_attention_slicing()``, every batch of
  ``--dataflow-batch-size`` prompts split round-robin over the GPUs and awaited as a whole before the next.
* ``eager``: the dfk8s ``diffusers`` serving's own code (``DiffusersServing.run``) with ``--no-compile``:
  bfloat16, each GPU taking whole batches of ``--batch-size`` as it frees up, per-row generators, PNGs.
* ``fast``: dfk8s's default on CUDA: fused QKV and regional compilation (lossless). It publishes the
  compiled artifacts to a compile cache.
* ``warm-start``: ``fast`` again in a new process with an empty inductor cache and that compile cache:
  what the next pod of a cluster meets. Its warm-up is the time from model loaded to full speed.
* ``step-cache``: ``fast`` plus First Block Cache at ``--step-cache`` (lossy).
* ``fp8``: ``fast`` plus torchao fp8 (lossy; compute capability 8.9+, else reported as unavailable).

``--pipeline imageedit`` runs FLUX.1-Kontext-dev (the same components) on a generated input image at the
output size. Each case gets warm-up rounds (timed apart: that is the compile), then ``--iterations`` timed
rounds of ``--images`` prompts with ``torch.cuda.synchronize`` around them; images/s and s/image come
from the median round, and every case is compared with ``eager`` and ``dataflow`` from the same run.

    python bench/flux_gpu.py                          # all visible GPUs, 512x512, 20 steps, every case
    python bench/flux_gpu.py --height 1024 --width 1024 --steps 28 --json result.json
    python bench/flux_gpu.py --pipeline imageedit --cases eager,fast,step-cache
    python bench/flux_gpu.py --tiny                   # the same code on a tiny CPU model (a smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from dfk8s.servings.base import Message, Request  # noqa: E402
from dfk8s.servings.diffusers_flux import DiffusersServing, encode_png  # noqa: E402
from dfk8s.testing import tiny_flux  # noqa: E402

log = logging.getLogger("flux_gpu")

#: FLUX.1-dev's published component configs (black-forest-labs/FLUX.1-dev, */config.json).
FLUX_DEV = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611,
             shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
             mid_block_add_attention=True),
    # openai/clip-vit-large-patch14, text tower
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    clip_vocab_size=49408,
    # google/t5-v1_1-xxl, encoder
    t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
            dropout_rate=0.0),
    t5_vocab_size=32128,
)
TINY = dict(transformer=tiny_flux.TRANSFORMER_CONFIG, vae=tiny_flux.VAE_CONFIG, clip=tiny_flux.CLIP_CONFIG,
            clip_vocab_size=None, t5=tiny_flux.T5_CONFIG, t5_vocab_size=None)

PROMPTS = ["a fox darting between snow-covered pines at dusk",
           "a kite surfer riding emerald waves under a cloudy sky",
           "a bowl of fruit on a wooden table, soft window light",
           "an old lighthouse on a rocky coast at golden hour",
           "a red vintage car parked on a rainy street at night", "a macro photo of a dragonfly on a reed"]


@contextlib.contextmanager
def default_device_dtype(device: str, dtype: torch.dtype):
    """Build modules straight on ``device`` in ``dtype`` (no fp32 copy in host memory first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(configs: dict, device: str, dtype: torch.dtype, tokenizers):
    from diffusers import FluxPipeline

    started = time.perf_counter()
    with default_device_dtype(device, dtype), torch.no_grad():
        components = tiny_flux.build_flux_components(
            configs["transformer"], configs["vae"], configs["clip"], configs["t5"], tokenizers=tokenizers,
            clip_vocab_size=configs["clip_vocab_size"], t5_vocab_size=configs["t5_vocab_size"])
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for name in ("transformer", "text_encoder_2", "text_encoder", "vae")
                 for p in getattr(pipe, name).parameters())
    log.info("built a random FLUX pipeline on %s (%s, %.3fB parameters) in %.1fs", device, dtype,
             params / 1e9, time.perf_counter() - started)
    return pipe


def synchronize(devices: list[str]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


def reset_peak_memory(devices: list[str]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(devices: list[str]) -> float | None:
    peaks = [torch.cuda.max_memory_allocated(d) for d in devices if d.startswith("cuda")]
    return round(max(peaks) / 2 ** 30, 2) if peaks else None


# -- DataFlow-MM's settings -------------------------------------------------------------------------------

def dataflow_setup(pipes: list) -> dict:
    """What LocalImageGenServing.load_model does after loading: float16 and attention slicing."""
    processors_before = type(next(iter(pipes[0].transformer.attn_processors.values()))).__name__
    for pipe in pipes:
        pipe.to(torch.float16)
        if hasattr(pipe, "enable_attention_slicing"):
            pipe.enable_attention_slicing()
    processors_after = type(next(iter(pipes[0].transformer.attn_processors.values()))).__name__
    # In the diffusers releases we know, no FLUX component has set_attention_slice: it is a no-op here.
    return {"dtype": "float16", "attention_slicing_changed_processors": processors_before != processors_after}


def dataflow_round(pipes: list, prompts: list[str], args) -> int:
    """generate_from_input: batches of dataflow_batch_size, each split round-robin across the GPUs."""
    done = 0

    def on_pipe(pipe, chunk):
        out = pipe(prompt=chunk, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, num_images_per_prompt=1,
                   max_sequence_length=args.max_sequence_length)
        return [encode_png(img) for img in out.images]  # DataFlow-MM saves every image too

    with ThreadPoolExecutor(max_workers=len(pipes)) as pool:
        for start in range(0, len(prompts), args.dataflow_batch_size):
            batch = prompts[start:start + args.dataflow_batch_size]
            chunks = [batch[i::len(pipes)] for i in range(len(pipes))]
            futures = [pool.submit(on_pipe, pipe, chunk) for pipe, chunk in zip(pipes, chunks, strict=True)
                       if chunk]
            done += sum(len(f.result()) for f in futures)
    return done


# -- dfk8s's settings ---------------------------------------------------------------------------------------

#: case -> the serving's speed options
SPEED = {"eager": dict(compile=False), "fast": dict(compile=True), "warm-start": dict(compile=True),
         "step-cache": dict(compile=True, step_cache=None), "fp8": dict(compile=True, fp8=True)}
CASES = ("dataflow", "eager", "fast", "warm-start", "step-cache", "fp8")


def ours_setup(pipes: list, case: str, args) -> tuple[DiffusersServing, dict]:
    for pipe in pipes:
        pipe.to(torch.bfloat16)
    speed = dict(SPEED[case])
    if "step_cache" in speed:
        speed["step_cache"] = args.step_cache
    serving = DiffusersServing.with_pipelines(
        pipes, pipeline=args.pipeline, steps=args.steps, guidance=args.guidance, height=args.height,
        width=args.width, batch_size=args.batch_size, dtype="bfloat16",
        max_sequence_length=args.max_sequence_length, max_area=args.height * args.width,
        auto_resize=False, **speed)
    return serving, {"dtype": "bfloat16", **serving.speed.describe()}


def input_png(args) -> bytes:
    """Kontext's input: a smooth generated picture at the output size (the cost does not depend on it)."""
    from PIL import Image

    gradient = Image.linear_gradient("L").resize((args.width, args.height))
    return encode_png(Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))))


def ours_round(serving: DiffusersServing, prompts: list[str], args, seed: int) -> int:
    """The worker's loop: ``concurrency`` batches in flight, each GPU taking the next batch when free."""
    from dfk8s.servings.base import ImageInput

    images = [ImageInput(input_png(args), "image/png", "mem:input")] if args.pipeline == "imageedit" else []
    requests = [Request(f"r{seed}-{i}", [Message("user", p, tuple(images))], images=images,
                        seed=seed * 100_003 + i) for i, p in enumerate(prompts)]
    batches = [requests[i:i + serving.batch_size] for i in range(0, len(requests), serving.batch_size)]

    async def main():
        slots = asyncio.Semaphore(serving.concurrency)

        async def one(batch):
            async with slots:
                return await serving.run(batch)

        results = await asyncio.gather(*(one(b) for b in batches))
        return [r for batch in results for r in batch]

    results = asyncio.run(main())
    failed = [r for r in results if not getattr(r, "images", None)]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, first: {failed[0]}")
    return sum(len(r.images) for r in results)


# -- measuring ----------------------------------------------------------------------------------------------

def measure(name: str, run_round, devices: list[str], args) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] + f", variation {i}" for i in range(args.images)]
    warmup = []
    for k in range(args.warmup):
        started = time.perf_counter()
        run_round(prompts, -1 - k)
        synchronize(devices)
        warmup.append(round(time.perf_counter() - started, 3))
        log.info("%s: warm-up %d took %.2fs", name, k + 1, warmup[-1])
    reset_peak_memory(devices)
    seconds = []
    for k in range(args.iterations):
        synchronize(devices)
        started = time.perf_counter()
        images = run_round(prompts, k)
        synchronize(devices)
        seconds.append(time.perf_counter() - started)
        if images != len(prompts):
            raise RuntimeError(f"{name}: {images} images for {len(prompts)} prompts")
        log.info("%s: round %d: %d images in %.2fs", name, k + 1, images, seconds[-1])
    median = statistics.median(seconds)
    return {"images_per_round": len(prompts), "seconds": [round(s, 3) for s in seconds],
            "median_seconds": round(median, 3), "images_per_second": round(len(prompts) / median, 4),
            "seconds_per_image": round(median / len(prompts), 4), "warmup_seconds": warmup,
            "peak_memory_gib": peak_memory_gib(devices)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random FLUX on the CPU (64x64, 2 steps): a smoke test")
    parser.add_argument("--pipeline", choices=("text2image", "imageedit"), default="text2image",
                        help="text2image (FLUX.1-dev) or imageedit (FLUX.1-Kontext-dev)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated cases, in this order (default: {','.join(CASES)})")
    parser.add_argument("--gpus", type=int, help="GPUs to use (default: all visible)")
    parser.add_argument("--height", type=int, help="image height (512; 64 with --tiny)")
    parser.add_argument("--width", type=int, help="image width (512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, help="inference steps (20; 4 with --tiny)")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="dfk8s: prompts per pipeline call")
    parser.add_argument("--dataflow-batch-size", type=int, default=4,
                        help="DataFlow-MM: prompts per batch, split across the GPUs (its default: 4)")
    parser.add_argument("--images", type=int,
                        help="prompts per timed round (default: 2 x GPUs x the larger batch size)")
    parser.add_argument("--iterations", type=int, default=3, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the compile)")
    parser.add_argument("--step-cache", type=float, default=0.35, help="step-cache: the threshold (0.35)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    small = args.tiny
    args.height = args.height or (64 if small else 512)
    args.width = args.width or (64 if small else 512)
    args.steps = args.steps or (4 if small else 20)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in args.cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}: choose from {', '.join(CASES)}")
    for name in ("batch_size", "dataflow_batch_size", "iterations", "steps", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def devices_for(args) -> list[str] | None:
    if args.tiny:
        return ["cpu"]
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count() if args.gpus is None else min(args.gpus, torch.cuda.device_count())
    return [f"cuda:{i}" for i in range(count)]


def run_case(args) -> dict:
    """One case in this process: build the pipelines, set them up, measure."""
    from diffusers import FluxKontextPipeline

    from dfk8s.errors import SpecError

    devices = devices_for(args)
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True
    configs = TINY if args.tiny else FLUX_DEV
    tokenizers = tiny_flux.build_tokenizers()
    # Built in float16 (DataFlow-MM's), cast to bfloat16 for dfk8s's cases. One device after another: the
    # default dtype is process-wide.
    started = time.perf_counter()
    pipes = [build_pipeline(configs, d, torch.float16, tokenizers) for d in devices]
    if args.pipeline == "imageedit":
        pipes = [FluxKontextPipeline(**pipe.components) for pipe in pipes]
        for pipe in pipes:
            pipe.set_progress_bar_config(disable=True)
    built = round(time.perf_counter() - started, 1)
    try:
        if args.case == "dataflow":
            if args.pipeline == "imageedit":
                return {"error": "DataFlow-MM has no local Kontext serving to compare with"}
            settings = dataflow_setup(pipes)
            run_round = lambda prompts, _seed: dataflow_round(pipes, prompts, args)  # noqa: E731
        else:
            try:
                serving, settings = ours_setup(pipes, args.case, args)
            except SpecError as exc:  # fp8 where it cannot run
                return {"error": f"unavailable: {exc}"}
            run_round = lambda prompts, seed: ours_round(serving, prompts, args, seed)  # noqa: E731
        result = measure(args.case, run_round, devices, args)
        if args.case != "dataflow":
            result["compile_report"] = serving.speed_report()
        return {**settings, **result, "build_seconds": built}
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}


def main(argv=None) -> int:
    import os
    import subprocess
    import tempfile

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")  # random fp16 weights
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to()
    devices = devices_for(args)
    if devices is None:
        print("no CUDA GPU: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    args.images = args.images or 2 * len(devices) * max(args.batch_size, args.dataflow_batch_size)
    if args.case:  # a child: one case, its result as JSON
        args.json.write_text(json.dumps(run_case(args)))
        return 0

    names = [torch.cuda.get_device_name(d) if d.startswith("cuda") else platform.processor() or "cpu"
             for d in devices]
    report = {"device": names, "gpus": len(devices) if not args.tiny else 0, "tiny": args.tiny,
              "pipeline": args.pipeline, "height": args.height, "width": args.width, "steps": args.steps,
              "batch_size": args.batch_size, "dataflow_batch_size": args.dataflow_batch_size,
              "images_per_round": args.images,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "python": platform.python_version()},
              "results": {}}
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as scratch:
        compile_cache = Path(scratch) / "compile-cache"  # fast publishes into it, warm-start loads it
        for case in args.cases:
            out = Path(scratch) / f"{case}.json"
            env = {**os.environ, "DFK8S_COMPILE_CACHE": str(compile_cache),
                   "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / f"inductor-{case}")}  # a new pod's
            started = time.perf_counter()
            child = subprocess.run([sys.executable, __file__, *child_argv, "--case", case, "--json", str(out),
                                    "--images", str(args.images)], env=env, check=False)
            result = json.loads(out.read_text()) if out.is_file() else \
                {"error": f"the case's process exited {child.returncode}"}
            result["process_seconds"] = round(time.perf_counter() - started, 1)
            report["results"][case] = result

    results = report["results"]
    title = ("FLUX.1-Kontext-dev" if args.pipeline == "imageedit" else "FLUX.1-dev") + \
        (" (tiny, CPU: these figures mean nothing for a GPU)" if args.tiny else "")
    print(f"\n{title}, {args.width}x{args.height}, {args.steps} steps, {len(devices)} device(s): "
          f"{', '.join(sorted(set(names)))}; {args.images} images per round")
    base = {n: results.get(n, {}).get("images_per_second") for n in ("eager", "dataflow")}
    for name, result in results.items():
        if "error" in result:
            print(f"  {name:11s} {result['error']}")
            continue
        ratios = "".join(f"  {result['images_per_second'] / base[n]:5.2f}x {n}" for n in ("eager", "dataflow")
                         if base[n] and n != name)
        for n in ("eager", "dataflow"):
            if base[n] and n != name:
                result[f"ratio_over_{n}"] = round(result["images_per_second"] / base[n], 3)
        warm = f"warm-up {sum(result['warmup_seconds']):.1f}s" if result.get("warmup_seconds") else ""
        print(f"  {name:11s} {result['images_per_second']:8.3f} images/s  {result['seconds_per_image']:7.3f} "
              f"s/image  {warm}{ratios}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
