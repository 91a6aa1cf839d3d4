"""A tiny vision-language model with random weights, built offline from configs.

No small real vision-language weights are packaged and no model hub is reachable here, so
tests use this: the real transformers classes of Llava (a CLIP vision tower, a projector, a
Llama text model) at toy sizes, around a real tokenizer (SmolLM2's, from the chat model's
weights) with an ``<image>`` token added, and a processor whose chat template places images.
Its weights are random: it answers with arbitrary words. Point a model's ``source`` at real
weights (a hub id such as ``llava-hf/llava-interleave-qwen-0.5b-hf`` or
``HuggingFaceTB/SmolVLM-256M-Instruct``, or a local directory) for real answers.
"""

from __future__ import annotations

from pathlib import Path

from consumers.models import save_in_place

_SEED = 0  # the same weights on every build
IMAGE_SIDE, PATCH = 32, 8  # each image becomes (32 / 8)^2 = 16 image tokens
# ChatML, as SmolLM2's own template, with a message's images (as ``<image>``) ahead of its text.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vision(target: Path, tokenizer_dir: str) -> Path:
    """Write the tiny model and its processor to ``target`` unless they are there already; return ``target``."""
    target = Path(target)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(_SEED)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIDE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", chat_template=_CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)  # CLIP's class token

    def save(directory: Path) -> None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)

    return save_in_place(target, save, "config.json")
