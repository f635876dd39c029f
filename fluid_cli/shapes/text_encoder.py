"""`fluid train-tokenizer t5`: a small offline T5 text encoder for the shapes world.

The paper conditions on a frozen T5-XXL. Here: a transformers `T5EncoderModel(T5Config(...))` with
T5 v1.1's layout (gated-GELU feed-forward, RMS norms, relative position buckets) at a tiny width,
randomly initialised from the seed and never trained (frozen, as the paper's), plus a SentencePiece
unigram tokenizer (T5's kind) trained on every training caption of the shapes world. Both are saved
with `save_pretrained` into one directory, so `fluid encode-text --encoder DIR` and `fluid sample`
load them with `T5EncoderModel.from_pretrained` / `AutoTokenizer.from_pretrained`, offline.

transformers 5's `T5Tokenizer(vocab_file=...)` ignores the file, so the tokenizer is built from
the trained model's (piece, score) list with T5's special ids (pad 0, </s> 1, <unk> 2).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from fluid_cli.errors import FluidError
from fluid_cli.shapes.prompts import TAGS, caption, train_specs


def training_captions() -> list[str]:
    """Every caption the shapes generator can write for training (held-out ones excluded)."""
    return [caption(s) for tag in TAGS for s in train_specs(tag)]


def train_sentencepiece(captions: list[str], vocab_size: int = 128) -> list[tuple[str, float]]:
    """(piece, score) of a unigram model with T5's special ids. The caption language has 32
    words, so the vocabulary is a soft limit: SentencePiece stops at what the text supports.

    Each word is also given as a sentence of its own ("photo photo"): the unigram trainer seeds
    its pieces from maximal repeats, and in templated captions a word that is always followed by
    the same text ("photo" by " of") is no maximal repeat, so it would be spelt out in letters."""
    import sentencepiece as spm

    words = sorted({w for c in captions for w in c.split()})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions + [f"{w} {w}" for w in words]),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def build_text_encoder(
    out: Path,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    vocab_size: int = 128,
    captions: list[str] | None = None,
) -> dict:
    """Train the tokenizer (on `captions`, by default every shapes training caption), initialise the
    encoder, save both to `out`; returns a small report (also written as out/fluid-text-encoder.json)."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    if width % heads:
        raise FluidError(f"--width {width} must be a multiple of --heads {heads}")
    captions = training_captions() if captions is None else captions
    vocab = train_sentencepiece(captions, vocab_size)
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=width,
        d_kv=width // heads,
        d_ff=2 * width,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (the family of the paper's T5-XXL)
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)  # the frozen random encoder is a function of the seed
    model = T5EncoderModel(config).eval()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
    unk = sum(ids.count(tokenizer.unk_token_id) for ids in tokenizer(captions)["input_ids"])
    report = {
        "kind": "t5",
        "vocab_size": len(vocab),
        "d_model": width,
        "layers": layers,
        "heads": heads,
        "params": sum(p.numel() for p in model.parameters()),
        "captions": len(captions),
        "max_caption_tokens": max(lengths),
        "unk_tokens": unk,
        "seed": seed,
    }
    (out / "fluid-text-encoder.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
