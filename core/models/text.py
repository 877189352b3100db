"""Text conditioning for Flux.1: CLIP-L pooled vector + T5-XXL token states, or precomputed embeddings.

Flux.1 pipelines encode the prompt twice: CLIP's pooled output (768) feeds the time/text embedding,
T5's last hidden states (512 tokens x 4096) are the joint-attention context. Loaded lazily: only the
worker that computes a job's conditioning pays for the encoders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.models.backbone import Cond

T5_MAX_TOKENS = 512
CLIP_MAX_TOKENS = 77


def load_prompt_embeds(path: str, *, guidance: float | None) -> Cond:
    """Cond from a safetensors file with `prompt_embeds` [S, D] (or [1, S, D]) and
    `pooled_prompt_embeds` [P] (or [1, P]), as FluxPipeline.encode_prompt returns them."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.prompt_embeds {path!r} does not exist")
    tensors = load_file(path)
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(tensors)
    if missing:
        raise ValueError(f"model.prompt_embeds {path!r} lacks {sorted(missing)}; it has {sorted(tensors)}")
    tokens = tensors["prompt_embeds"].float()
    pooled = tensors["pooled_prompt_embeds"].float()
    return Cond(tokens.reshape(-1, tokens.shape[-1]), pooled.reshape(-1), guidance)


class FluxTextEncoder:
    """CLIP + T5 from a diffusers Flux pipeline layout (hub id or local directory)."""

    def __init__(self, source: str, *, dtype: torch.dtype, device: torch.device | str) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.device = torch.device(device)
        self.clip_tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        self.t5_tok = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2")
        self.clip = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
        self.t5 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", torch_dtype=dtype)
        self.clip.to(self.device).eval().requires_grad_(False)
        self.t5.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, prompt: str, *, guidance: float | None, max_tokens: int = T5_MAX_TOKENS) -> Cond:
        clip_ids = self.clip_tok(
            [prompt], padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.t5_tok(
            [prompt], padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        tokens = self.t5(t5_ids, output_hidden_states=False)[0]
        return Cond(tokens[0].float().cpu(), pooled[0].float().cpu(), guidance)
