"""`fluid encode-text`: captions -> frozen T5 encoder hidden states, as sharded safetensors.

Kind "text-embeddings": one ragged bfloat16 field `hidden` of shape (tokens, D) per record, with no
padding (tokens = the attention mask's sum, at most --max-length, EOS included), the caption kept in
the shard's JSONL rows with its untruncated token count. The empty caption's states are stored once
as `null-text.safetensors` (the unconditional input of classifier-free guidance). For image sources,
records whose image is missing or does not decode are skipped as `fluid tokenize` skips them, so the
two artifacts hold the same keys. See docs/data-format.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fluid_cli.settings import EncodeTextSettings
from fluid_cli.shards import FieldSpec, Manifest, ShardInfo, atomic_write_bytes
from fluid_cli.stages import pretrained as pt
from fluid_cli.stages.image_tokenize import check_image
from fluid_cli.stages.sharding import ShardOutput
from fluid_cli.stages.sources import Record, problem

log = logging.getLogger(__name__)
NULL_TEXT = "null-text.safetensors"


class TextEncoderStage:
    """Encodes shards of caption records with one frozen T5 encoder (loaded on first use)."""

    kind = "text-embeddings"

    def __init__(
        self,
        p: pt.Pretrained,
        max_length: int,
        batch_size: int,
        device: str,
        check_images: bool,
        model=None,
        tokenizer=None,
    ):
        self.p, self.max_length, self.batch_size = p, max_length, max(1, batch_size)
        self.device_name, self.check_images = device, check_images
        self._model, self._tokenizer = model, tokenizer
        self.dim = int(p.config["d_model"])
        self.fields = {"hidden": FieldSpec("bfloat16", [-1, self.dim], ragged=True)}
        self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))

    def prepare(self) -> None:
        if self._model is None:
            self._model, self._tokenizer = pt.load_text_encoder(self.p)
            device = pt.pick_device(self.device_name)
            # bf16 on accelerators (T5 overflows in fp16); fp32 on the CPU, where bf16 is slow
            self._model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
            log.info("loaded T5 encoder %s on %s", self.p.id, device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[list[torch.Tensor], list[int]]:
        """Per caption: hidden states (len, D) bf16 on the CPU, and its untruncated token count.
        A caption that occurs several times is encoded once (the shapes world's 10K records hold
        ~1.3K distinct captions; a web crawl's repeats, "image", "untitled", ... likewise)."""
        distinct = list(dict.fromkeys(captions))
        if len(distinct) < len(captions):
            states, counted = self.encode(distinct)
            at = {c: i for i, c in enumerate(distinct)}
            return [states[at[c]].clone() for c in captions], [counted[at[c]] for c in captions]
        self.prepare()
        tok, model = self._tokenizer, self._model
        counts = [len(ids) for ids in tok(captions, truncation=False)["input_ids"]]
        # batch captions of similar length together (less padding); results go back in input order
        order = sorted(range(len(captions)), key=lambda i: counts[i])
        out: list[torch.Tensor | None] = [None] * len(captions)
        dev = next(model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = tok(
                [captions[i] for i in idx],
                max_length=self.max_length,
                truncation=True,
                padding="longest",
                return_tensors="pt",
            )
            hidden = model(
                input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev)
            ).last_hidden_state
            for j, i in enumerate(idx):
                out[i] = hidden[j, : int(enc.attention_mask[j].sum())].to("cpu", torch.bfloat16).clone()
        return out, counts  # type: ignore[return-value]

    def encode_shard(self, records: list[Record], advance: Callable[[int], None]) -> ShardOutput:
        usable = [problem(r, need_image=self.check_images) for r in records]
        if self.check_images:  # decode the images (in threads) so corrupt ones are skipped as tokenize does
            checks = self._pool.map(lambda r, why: why or check_image(r.image), records, usable)
            usable = list(checks)
        good = [r for r, why in zip(records, usable, strict=True) if not why]
        skipped = [r.skipped(why) for r, why in zip(records, usable, strict=True) if why]
        advance(len(skipped))
        hidden: list[torch.Tensor] = []
        counts: list[int] = []
        for start in range(0, len(good), self.batch_size * 8):  # progress in steps; sorting works per step
            chunk = good[start : start + self.batch_size * 8]
            h, c = self.encode([r.caption for r in chunk])
            hidden += h
            counts += c
            advance(len(chunk))
        rows = [{"caption": r.caption, "tokens": n} for r, n in zip(good, counts, strict=True)]
        return ShardOutput([r.key for r in good], {"hidden": hidden}, skipped, rows)

    def manifest(
        self, shards: list[ShardInfo], skipped: list[dict], out_dir: Path, producer: dict
    ) -> Manifest:
        null = out_dir / NULL_TEXT
        if not null.is_file():
            from safetensors.torch import save

            h, _ = self.encode([""])
            atomic_write_bytes(null, save({"hidden": h[0].contiguous()}, metadata={"caption": ""}))
        truncated = 0
        for s in shards:  # counted from the rows, so shards written by earlier runs count too
            with open(out_dir / Path(s.file).with_suffix(".jsonl"), encoding="utf-8") as f:
                truncated += sum(json.loads(line)["tokens"] > self.max_length for line in f if line.strip())
        if truncated:
            log.info(
                "%d captions were longer than --max-length %d and were truncated", truncated, self.max_length
            )
        attrs = {
            "text_dim": self.dim,
            "max_length": self.max_length,
            "encoder": self.p.id,
            "tokenizer": self.p.id,
            "truncated": truncated,
        }
        return Manifest(self.kind, self.fields, attrs, shards, producer, skipped, {"null_text": NULL_TEXT})


def run_encode_text(settings: EncodeTextSettings) -> bool:
    """The `fluid encode-text` stage. True when the artifact is complete (manifest written)."""
    from fluid_cli.errors import FluidError
    from fluid_cli.stages.sharding import resolve_split, run_sharded
    from fluid_cli.stages.sources import RecordSource, expand_sources

    t, split = settings, settings.sharding
    if t.max_length < 1:
        raise FluidError("--max-length must be at least 1")
    rank, world = resolve_split(split.num_shards, split.shard_index)
    files = expand_sources(list(t.sources), allow_prompts=True)
    check_images = t.check_images and any(f.kind != "prompts" for f in files)
    p = pt.resolve_text_encoder(t.encoder)
    stage = TextEncoderStage(p, t.max_length, t.batch_size, t.device, check_images)
    recorded = {
        "stage": "encode-text",
        "model_id": t.encoder,
        "max_length": t.max_length,
        "check_images": check_images,
        "coco_caption": t.coco_caption,
        "sources": [f.path if f.path == "-" else os.path.abspath(f.path) for f in files],
        "images_dir": os.path.abspath(t.images_dir) if t.images_dir else None,
    }
    source = RecordSource(files, t.images_dir, need_images=check_images, coco_caption=t.coco_caption)
    return run_sharded(Path(t.out), source, stage, recorded, split.records_per_shard, rank, world, "captions")
