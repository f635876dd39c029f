"""The two ends of `fluid sample`: prompts -> T5 states, and image tokens -> RGB pixels.

Text: the checkpoint's T5 encoder (transformers T5EncoderModel + AutoTokenizer, from the hub id or
directory named in its config), or a precomputed `fluid encode-text` artifact (--text-embeddings),
whose records are matched to the prompts by caption. Prompts are padded to the encoder's max length
in every batch, so a prompt's states do not depend on the other prompts.
Images: the checkpoint's image tokenizer: AutoencoderKL (latents / scaling_factor + shift_factor ->
decode), VQModel (codes -> codebook entries -> decode), or "synthetic" (`fluid synth-data`): the
first 3 latent channels, or the code's digits, as RGB, nearest-upsampled to the data's resolution.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from fluid_cli.errors import FluidError
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.tokens import unpatchify
from fluid_cli.sampling.prompts import Prompt

log = logging.getLogger(__name__)
ENCODE_BATCH = 32


def _fit(hidden: torch.Tensor, text_len: int, where: str, why: str) -> torch.Tensor:
    if hidden.shape[0] > text_len:
        log.warning("%s: %s; truncated to the model's %d text tokens", where, why, text_len)
    return hidden[:text_len]


def embed_from_artifact(path: str, prompts: list[Prompt], mcfg: ModelConfig) -> dict[int, torch.Tensor]:
    """prompt index -> (tokens, D) states of the record whose caption is the prompt; others warned."""
    from fluid_cli.artifact import Artifact

    art = Artifact.open(path, "text-embeddings", what="--text-embeddings")
    if int(art.attrs.get("text_dim", -1)) != mcfg.text_dim:
        raise FluidError(
            f"--text-embeddings {path} holds {art.attrs.get('text_dim')}-wide states but the model was trained "
            f"on {mcfg.text_dim}-wide ones; encode the prompts with the checkpoint's text encoder"
        )
    where: dict[str, tuple[int, int]] = {}
    for shard in range(len(art.shard_files)):
        for row, rec in enumerate(art.rows(shard)):
            where.setdefault(str(rec.get("caption", "")).strip(), (shard, row))
    out = {}
    for p in prompts:
        loc = where.get(p.text)
        if loc is None:
            log.warning("%s: prompt not in %s (encode it with `fluid encode-text`); skipped", p.where, path)
            continue
        out[p.index] = _fit(
            art.get(*loc)["hidden"], mcfg.text_len, p.where, "embedding is longer than the model's text"
        )
    return out


def embed_live(
    encoder: str, prompts: list[Prompt], mcfg: ModelConfig, device: torch.device
) -> dict[int, torch.Tensor]:
    """prompt index -> (tokens, D) bf16 T5 states (as `fluid encode-text` stores them)."""
    from fluid_cli.stages import pretrained as pt

    if encoder == "synthetic":
        raise FluidError(
            "this run was trained on synthetic text embeddings (`fluid synth-data`): pass --text-embeddings "
            "DIR (e.g. the synth-data OUT/text), whose captions are the prompts"
        )
    p = pt.resolve_text_encoder(encoder)
    if int(p.config.get("d_model", -1)) != mcfg.text_dim:
        raise FluidError(
            f"text encoder {encoder} is {p.config.get('d_model')} wide, the model expects {mcfg.text_dim}"
        )
    model, tok = pt.load_text_encoder(p)
    # bf16 on accelerators (T5 overflows in fp16); fp32 on the CPU, where bf16 is slow
    model.to(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    texts = [q.text for q in prompts]
    for q, ids in zip(prompts, tok(texts, truncation=False)["input_ids"], strict=True):
        if len(ids) > mcfg.text_len:
            log.warning(
                "%s: prompt is %d tokens, over the encoder's max length %d; truncated",
                q.where,
                len(ids),
                mcfg.text_len,
            )
    out = {}
    with torch.no_grad():
        for a in range(0, len(prompts), ENCODE_BATCH):
            chunk = prompts[a : a + ENCODE_BATCH]
            enc = tok([q.text for q in chunk], max_length=mcfg.text_len, truncation=True,
                      padding="max_length", return_tensors="pt")  # fmt: skip
            mask = enc.attention_mask.to(device)
            hidden = model(input_ids=enc.input_ids.to(device), attention_mask=mask).last_hidden_state
            for j, q in enumerate(chunk):
                out[q.index] = hidden[j, : int(enc.attention_mask[j].sum())].to("cpu", torch.bfloat16)
    return out


def text_batch(
    states: list[torch.Tensor], text_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, D) float32 states zero-padded to the model's text length, and the (B, S) mask."""
    D = states[0].shape[-1]
    text = torch.zeros(len(states), text_len, D)
    mask = torch.zeros(len(states), text_len, dtype=torch.bool)
    for i, h in enumerate(states):
        text[i, : h.shape[0]] = h.float()
        mask[i, : h.shape[0]] = True
    return text.to(device), mask.to(device)


class ImageDecoder:
    """tokens (B, L, C) or (B, L) -> uint8 RGB (B, H, W, 3), by the checkpoint's image tokenizer."""

    def __init__(self, image_attrs: dict, mcfg: ModelConfig, device: torch.device):
        self.attrs, self.mcfg, self.device = image_attrs, mcfg, device
        self.kind = image_attrs.get("tokenizer_class")
        if self.kind not in ("AutoencoderKL", "VQModel", "synthetic"):
            raise FluidError(
                f"checkpoint's image tokenizer class {self.kind!r} is not AutoencoderKL, VQModel or synthetic"
            )
        self._model = None

    def _load(self):
        if self._model is None and self.kind != "synthetic":
            from fluid_cli.stages import pretrained as pt

            p = pt.resolve_image_tokenizer(self.attrs["tokenizer"])
            self._model = pt.load_image_tokenizer(p).to(self.device)  # fp32: the SD VAE is unstable in fp16
        return self._model

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> np.ndarray:
        c = self.mcfg
        if c.continuous:
            latents = unpatchify(tokens.float(), c.token_grid, c.latent_channels, c.patch)  # (B, C, H, W)
        else:
            latents = tokens.reshape(tokens.shape[0], *c.token_grid)  # (B, h, w) codes
        if self.kind == "synthetic":
            rgb = self._synthetic(latents)
        elif self.kind == "AutoencoderKL":
            vae = self._load()
            shift = self.attrs.get("shift_factor")
            z = latents / float(self.attrs.get("scaling_factor") or 1.0) + (
                float(shift) if shift is not None else 0.0
            )
            rgb = (vae.decode(z.to(self.device)).sample.float() + 1.0) / 2.0
        else:
            rgb = (self._vq(latents) + 1.0) / 2.0
        rgb = (rgb.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return rgb.permute(0, 2, 3, 1).cpu().numpy()

    def _vq(self, codes: torch.Tensor) -> torch.Tensor:
        vq = self._load()
        B, h, w = codes.shape
        dim = int(vq.config.get("vq_embed_dim") or vq.config["latent_channels"])
        flat = codes.reshape(-1).to(self.device)
        if vq.config.get("lookup_from_codebook"):
            return vq.decode(flat, force_not_quantize=True, shape=(B, h, w, dim)).sample.float()
        z_q = vq.quantize.get_codebook_entry(flat, (B, h, w, dim))  # (B, dim, h, w)
        return vq.decode(z_q, force_not_quantize=True).sample.float()

    def _synthetic(self, latents: torch.Tensor) -> torch.Tensor:
        """A viewable picture of synthetic tokens (no decoder exists for them)."""
        if self.mcfg.continuous:  # synth-data latents are ~N(0,1): [-2, 2] -> [0, 1]
            x = latents[:, :3]
            x = torch.cat([x, x[:, -1:].expand(-1, 3 - x.shape[1], -1, -1)], dim=1) if x.shape[1] < 3 else x
            x = (x + 2.0) / 4.0
        else:  # code = hi * base + lo (synth-data: two 8-level channels): R = hi, G = lo, B = code
            V = max(2, self.mcfg.vocab_size)
            base = max(2, math.ceil(math.sqrt(V)))
            codes = latents.float()
            x = torch.stack(
                [(codes // base) / (base - 1), (codes % base) / (base - 1), codes / (V - 1)], dim=1
            )
        size = int(self.attrs.get("resolution") or 8 * x.shape[-1])
        return F.interpolate(x, size=(size, size), mode="nearest")
