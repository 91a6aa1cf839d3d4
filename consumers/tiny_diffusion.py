"""A tiny Stable Diffusion pipeline with random weights, built offline from configs.

No small real diffusion weights are packaged, and no model hub is reachable here, so tests,
benchmarks and a first `tollgate up` use this: the real diffusers classes (UNet, VAE, CLIP
text encoder and tokenizer, DDIM scheduler) at the sizes of diffusers' own tests. Its weights
are random: it draws noise, never a picture of the prompt. Point a model's ``source`` at a
real pipeline (a hub id such as ``stabilityai/sdxl-turbo``, or a local directory) for images.
"""

from __future__ import annotations

from pathlib import Path

from consumers.models import save_in_place

_SEED = 0  # the same weights on every build


def build_tiny_diffusion(target: Path) -> Path:
    """Write the tiny pipeline to ``target`` in diffusers' layout (``model_index.json`` and one
    folder per component) unless it is there already; return ``target``."""
    target = Path(target)
    if (target / "model_index.json").exists():
        return target
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    # A byte-level BPE with no merges: every byte is a token (alone, or ending a word), as CLIP's
    # vocabulary starts; a real tokenizer file is not needed to read any prompt.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    ))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return save_in_place(target, pipe.save_pretrained, "model_index.json")
