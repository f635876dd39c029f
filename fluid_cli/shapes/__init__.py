"""The embedded shapes benchmark: a small procedurally drawn world on which every stage runs for real,
with no GPU and no downloads (see docs/shapes.md).

- render.py:       palette, shape masks, the renderer and GenEval's position rule
- prompts.py:      GenEval's prompt templates and metadata, the fixed train / held-out split
- generator.py:    `fluid shapes-data`: webdataset tars + held-out prompts
- detector.py:     the exact rule-based detector (shape, colour, box, mask from pixels)
- geneval.py:      shapes-GenEval: the detector plugged into GenEval's rules
- tokenizers.py:   `fluid train-tokenizer vae|vq`: diffusers AutoencoderKL / VQModel
- quality.py:      PSNR and shapes-GenEval of a tokenizer's reconstructions
- text_encoder.py: `fluid train-tokenizer t5`: a frozen T5 encoder + SentencePiece tokenizer
"""
