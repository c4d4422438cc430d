"""FLUX.1-dev text2image throughput: DataFlow-MM's settings against dfk8s's, on random weights.

No download: the models are built from FLUX.1-dev's published configs (a 12B transformer with 19 double and
38 single blocks, the 16-channel VAE, a T5-XXL encoder and CLIP-L) with random weights, straight on the
GPUs, and the tokenizers are small local ones (that changes tokenization, not the cost: prompts are padded
to 77 CLIP and ``--max-sequence-length`` T5 tokens either way). Speed does not depend on the weights.

Two settings over the same prompts, one pipeline per GPU in both:

* ``dataflow``: DataFlow-MM's LocalImageGenServing: float16, ``enable_attention_slicing()``, every batch of
  ``--dataflow-batch-size`` prompts split round-robin over the GPUs and awaited as a whole before the next.
* ``ours``: the dfk8s ``diffusers`` serving's own code (``DiffusersServing.run``): bfloat16, no attention
  slicing, each GPU taking whole batches of ``--batch-size`` as it frees up (the worker's loop), per-row
  generators, PNG encoding; ``--compile`` adds ``torch.compile`` of the transformer.

Both encode every image as PNG. Each setting gets warm-up rounds, then ``--iterations`` timed rounds of
``--images`` prompts with ``torch.cuda.synchronize`` around them; images/s is taken from the median round.

    python bench/flux_gpu.py                          # all visible GPUs, 512x512, 20 steps
    python bench/flux_gpu.py --batch-size 8 --compile --json result.json
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

def ours_setup(pipes: list, args) -> tuple[DiffusersServing, dict]:
    for pipe in pipes:
        pipe.to(torch.bfloat16)
        if hasattr(pipe, "disable_attention_slicing"):
            pipe.disable_attention_slicing()
        if args.compile:
            pipe.transformer.compile(mode=args.compile_mode, fullgraph=args.fullgraph)
    serving = DiffusersServing.with_pipelines(
        pipes, pipeline="text2image", steps=args.steps, guidance=args.guidance, height=args.height,
        width=args.width, batch_size=args.batch_size, dtype="bfloat16",
        max_sequence_length=args.max_sequence_length)
    return serving, {"dtype": "bfloat16", "compile": args.compile and args.compile_mode}


def ours_round(serving: DiffusersServing, prompts: list[str], args, seed: int) -> int:
    """The worker's loop: ``concurrency`` batches in flight, each GPU taking the next batch when free."""
    requests = [Request(f"r{seed}-{i}", [Message("user", p)], seed=seed * 100_003 + i)
                for i, p in enumerate(prompts)]
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
    for k in range(args.warmup):
        started = time.perf_counter()
        run_round(prompts, -1 - k)
        synchronize(devices)
        log.info("%s: warm-up %d took %.2fs", name, k + 1, time.perf_counter() - started)
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
            "peak_memory_gib": peak_memory_gib(devices)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random FLUX on the CPU (64x64, 2 steps): a smoke test")
    parser.add_argument("--gpus", type=int, help="GPUs to use (default: all visible)")
    parser.add_argument("--height", type=int, help="image height (512; 64 with --tiny)")
    parser.add_argument("--width", type=int, help="image width (512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, help="inference steps (20; 2 with --tiny)")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="ours: prompts per pipeline call")
    parser.add_argument("--dataflow-batch-size", type=int, default=4,
                        help="DataFlow-MM: prompts per batch, split across the GPUs (its default: 4)")
    parser.add_argument("--images", type=int,
                        help="prompts per timed round (default: 2 x GPUs x the larger batch size)")
    parser.add_argument("--iterations", type=int, default=3, help="timed rounds per setting")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (compilation, autotuning)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the transformer")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode (default: max-autotune-no-cudagraphs)")
    parser.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    parser.add_argument("--only", choices=("dataflow", "ours"), help="measure one setting only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    small = args.tiny
    args.height = args.height or (64 if small else 512)
    args.width = args.width or (64 if small else 512)
    args.steps = args.steps or (2 if small else 20)
    for name in ("batch_size", "dataflow_batch_size", "iterations", "steps", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")  # random fp16 weights
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to()
    if args.tiny:
        devices = ["cpu"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --tiny for the CPU smoke test", file=sys.stderr)
            return 2
        count = torch.cuda.device_count() if args.gpus is None else min(args.gpus, torch.cuda.device_count())
        devices = [f"cuda:{i}" for i in range(count)]
        torch.backends.cuda.matmul.allow_tf32 = True
    args.images = args.images or 2 * len(devices) * max(args.batch_size, args.dataflow_batch_size)
    configs = TINY if args.tiny else FLUX_DEV

    tokenizers = tiny_flux.build_tokenizers()
    # One pipeline per device, built in float16 (DataFlow-MM's) and cast to bfloat16 for ours afterwards:
    # one copy of the weights per GPU at a time. One after another: the default dtype is process-wide.
    pipes = [build_pipeline(configs, d, torch.float16, tokenizers) for d in devices]

    names = [torch.cuda.get_device_name(d) if d.startswith("cuda") else platform.processor() or "cpu"
             for d in devices]
    report = {"device": names,
              "gpus": len(devices) if not args.tiny else 0, "tiny": args.tiny,
              "height": args.height, "width": args.width, "steps": args.steps,
              "batch_size": args.batch_size, "dataflow_batch_size": args.dataflow_batch_size,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "python": platform.python_version()},
              "results": {}}
    if args.only in (None, "dataflow"):
        settings = dataflow_setup(pipes)
        try:
            result = measure("dataflow", lambda prompts, _seed: dataflow_round(pipes, prompts, args), devices,
                             args)
        except torch.OutOfMemoryError as exc:
            result = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        report["results"]["dataflow"] = {**settings, **result}
    if args.only in (None, "ours"):
        serving, settings = ours_setup(pipes, args)
        try:
            result = measure("ours", lambda prompts, seed: ours_round(serving, prompts, args, seed), devices,
                             args)
        except torch.OutOfMemoryError as exc:
            result = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        report["results"]["ours"] = {**settings, **result}

    results = report["results"]
    title = "FLUX.1-dev" + (" (tiny, CPU)" if args.tiny else "")
    print(f"\n{title}, {args.width}x{args.height}, {args.steps} steps, "
          f"{len(devices)} device(s): {', '.join(sorted(set(report['device'])))}")
    for name, result in results.items():
        if "error" in result:
            print(f"  {name:9s} {result['error']}")
            continue
        extra = f", peak {result['peak_memory_gib']} GiB" if result.get("peak_memory_gib") else ""
        print(f"  {name:9s} {result['images_per_second']:8.3f} images/s  (median {result['median_seconds']}s "
              f"for {result['images_per_round']} images, {result['dtype']}{extra})")
    both = [results.get(n, {}).get("images_per_second") for n in ("ours", "dataflow")]
    if all(both):
        report["ratio_ours_over_dataflow"] = round(both[0] / both[1], 3)
        print(f"  ratio     {report['ratio_ours_over_dataflow']:.3f}x (ours / DataFlow-MM)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
