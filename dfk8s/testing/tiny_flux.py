"""A tiny random FLUX / FLUX Kontext pipeline built from configs, for tests and smoke tests (no hub).

``build_tiny_flux(folder)`` writes a ~1 MB diffusers pipeline folder (``model_index.json`` plus one
sub-folder per component) that ``FluxPipeline.from_pretrained(folder)`` opens offline, so the serving's
real loading code runs against it. The components have the real classes and wiring of FLUX.1-dev
(guidance embedding, CLIP pooled + T5 sequence conditioning, a 16x-packed latent path) but are a few
thousand parameters: 64x64 with 2 steps takes well under a second on a CPU.

Usage (also from the command line: ``python -m dfk8s.testing.tiny_flux DIR [--kind kontext]``)::

    from dfk8s.testing.tiny_flux import build_tiny_flux
    folder = build_tiny_flux("/tmp/tiny-flux")                  # text2image
    folder = build_tiny_flux("/tmp/tiny-kontext", kind="kontext")  # imageedit

    dfk8s run -p text2image --model /tmp/tiny-flux --steps 2 --height 64 --width 64 --dtype float32 ...

Kontext on these components needs ``max_area=4096`` and ``auto_resize=False`` (serving options), or the
pipeline scales to 1024x1024 and the tiny model spends minutes on it.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Component configs, exactly as in DESIGN.md ("What runs where in tests").
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                          pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
VAE_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  latent_channels=1, layers_per_block=1, norm_num_groups=1, use_quant_conv=False,
                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
#: FLUX.1-dev's scheduler config (dynamic shifting is required by the Kontext pipeline's ``mu``).
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096)

_T5_SENTENCES = [
    "a fox darting between snow-covered pines at dusk",
    "a kite surfer riding emerald waves under a cloudy sky",
    "change the horse's colour to black and make the sky red",
    "a photo of a cat sitting on a wooden table next to a blue vase",
    "turn the car into a bright yellow taxi in the rain",
    "an old lighthouse on a rocky coast, oil painting, golden hour",
    "replace the background with a quiet street at night",
    "a bowl of fruit: apples, pears, grapes and one orange",
]
_CLIP_WORDS = ["a", "the", "of", "on", "and", "to", "in", "at", "with", "photo", "cat", "dog", "fox", "sky",
               "red", "blue", "black", "change", "make", "image"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _write_clip_tokenizer(folder: Path) -> int:
    """Write a small CLIP BPE vocab (byte alphabet + a few words) and load it; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in _CLIP_WORDS:  # merge each word left to right: "c a", "ca t</w>"
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def _write_t5_spm(folder: Path) -> None:
    """Train a tiny unigram sentencepiece model (T5's pad=0, eos=1, unk=2 layout) into ``spiece.model``."""
    import io

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_T5_SENTENCES * 4), model_writer=model,
                                   vocab_size=96, hard_vocab_limit=False, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())


#: Tiny text encoders: CLIP's hidden size is the transformer's pooled_projection_dim, T5's d_model its
#: joint_attention_dim. Vocabulary sizes and special ids come from the tokenizers.
CLIP_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                   max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32, feed_forward_proj="gated-gelu")


def build_tokenizers():
    """Make the CLIP and T5 tokenizers locally (a small BPE vocab, a sentencepiece model trained here).

    Returns:
        ``(clip_tokenizer, t5_tokenizer)`` with ``model_max_length`` 77 and 512, as FLUX uses them.

    """
    import tempfile

    from transformers import CLIPTokenizer, T5Tokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-flux-tok-") as tmp:
        _write_clip_tokenizer(Path(tmp) / "clip")
        clip = CLIPTokenizer.from_pretrained(Path(tmp) / "clip", model_max_length=77)
        _write_t5_spm(Path(tmp) / "t5")
        t5 = T5Tokenizer.from_pretrained(Path(tmp) / "t5", model_max_length=512)
    return clip, t5


def build_flux_components(transformer: dict, vae: dict, clip: dict, t5: dict, *, tokenizers=None,
                          clip_vocab_size: int | None = None, t5_vocab_size: int | None = None,
                          seed: int = 0) -> dict:
    """Build random-weight FLUX components from configs: the keyword arguments of ``FluxPipeline(...)``.

    Built in the current default device and dtype (``torch.device(...)`` / ``torch.set_default_dtype``),
    so a caller can build large models straight on a GPU. Each model is seeded with ``seed``.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = tokenizers or build_tokenizers()
    torch.manual_seed(seed)
    transformer_model = FluxTransformer2DModel(**transformer)
    torch.manual_seed(seed)
    vae_model = AutoencoderKL(**vae)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **clip, vocab_size=max(clip_vocab_size or 0, len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(T5Config(
        **t5, vocab_size=max(t5_vocab_size or 0, len(tokenizer_2), 128), is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae_model,
                text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, transformer=transformer_model, image_encoder=None,
                feature_extractor=None)


def build_tiny_flux(folder, kind: str = "flux") -> Path:
    """Build a tiny random FLUX (``kind="flux"``) or FLUX Kontext (``"kontext"``) pipeline into ``folder``.

    The result is deterministic (seeded) and saved with ``save_pretrained``; load it with
    ``FluxPipeline.from_pretrained(folder)`` / ``FluxKontextPipeline.from_pretrained(folder)`` or hand it to
    the ``diffusers`` serving as ``model``.

    Args:
        folder: Where to write the pipeline (created; existing files are overwritten).
        kind: ``flux`` (FLUX.1-dev layout, text2image) or ``kontext`` (FLUX.1-Kontext-dev, imageedit).

    Returns:
        The folder, as a Path.

    """
    from diffusers import FluxKontextPipeline, FluxPipeline

    if kind not in ("flux", "kontext"):
        raise ValueError(f"kind must be 'flux' or 'kontext', not {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components = build_flux_components(TRANSFORMER_CONFIG, VAE_CONFIG, CLIP_CONFIG, T5_CONFIG)
    cls = FluxKontextPipeline if kind == "kontext" else FluxPipeline
    cls(**components).save_pretrained(folder, safe_serialization=True)
    return folder


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random FLUX / FLUX Kontext pipeline folder.")
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=("flux", "kontext"), default="flux")
    args = parser.parse_args(argv)
    print(build_tiny_flux(args.folder, args.kind))


if __name__ == "__main__":
    _main()
