"""A tiny random Qwen2-VL, built here with no download: what `transformers serve` loads in the tests.

DESIGN.md's recipe: a Qwen2VLConfig with a text side of hidden size 64 and 2 layers and a 1-layer vision
side; a byte-level BPE tokenizer trained on a few sentences with Qwen2-VL's special tokens; the family's
real chat template; Qwen2VLImageProcessor with small ``min_pixels``/``max_pixels`` (a few image tokens).
The folder is under 1 MB; ``AutoProcessor`` and ``AutoModelForImageTextToText`` load it offline.

    python -m dfk8s.testing.tiny_vlm DIR      # build it from a shell (bench/vlm_local.py does)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: Qwen2-VL's chat template, as its tokenizer_config.json ships it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

_SENTENCES = [
    "A photo of a cat sitting on a red sofa next to a window.",
    "What are the key characteristics of this image? Describe it in detail.",
    "You are a helpful assistant. Answer the question about the picture.",
    "A dog runs across the green field under a blue sky with white clouds.",
    "The quick brown fox jumps over the lazy dog, 0123456789.",
]


def build_tiny_vlm(folder: Path) -> Path:
    """Write the tiny model, tokenizer, processor and chat template into ``folder``; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2TokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab = len(tokenizer)

    config = Qwen2VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": True},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    # Random weights keep picking one token; a special, blank or partial-UTF-8 one decodes to nothing
    # (or U+FFFD), and an empty answer is an error record. Only printable ASCII words stay: answers are
    # readable text.
    def readable(token_id: int) -> bool:
        text = tokenizer.decode([token_id])
        return bool(text.strip()) and text.isascii() and text.isprintable()

    model.generation_config.suppress_tokens = [i for i in range(vocab)
                                               if i in ids.values() or not readable(i)]
    model.save_pretrained(folder)

    # 56x56 to 112x112 pixels: 4 to 16 patches, 1 to 4 image tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def size_of(folder: Path) -> int:
    """Bytes in ``folder`` (the tests check the model stays tiny)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


if __name__ == "__main__":
    built = build_tiny_vlm(Path(sys.argv[1]))
    print(json.dumps({"folder": str(built), "bytes": size_of(built)}))
