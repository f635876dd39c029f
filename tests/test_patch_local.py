"""Patch-local image tokenizers (fluid_cli/stages/patch_local.py): each cell encoded alone, latents
in the whole image's layout, and the loader honouring a tokenizer directory's cell size."""

from __future__ import annotations

import json

import pytest
import torch

from fluid_cli.stages.patch_local import PatchLocal, fold, unfold


def test_fold_unfold_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    cells = fold(x, 2)
    assert cells.shape == (8, 3, 4, 4)
    assert torch.equal(cells[1], x[0, :, 0:4, 4:8])  # row-major: image 0, top-right cell
    assert torch.equal(cells[6], x[1, :, 4:8, 0:4])  # image 1, bottom-left cell
    assert torch.equal(unfold(cells, 2), x)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 8], layers_per_block=1,
        norm_num_groups=1, mid_block_add_attention=False, sample_size=16, latent_channels=4,
    ).eval()  # fmt: skip


def test_a_cell_only_changes_its_own_latents():
    """The point of patch-local encoding: a cell's latents depend on its pixels alone, so editing one
    cell leaves every other cell's latents bit-identical (same shapes, same process), and latents
    keep the whole image's layout (B, C, H/4, W/4)."""
    model = PatchLocal(_tiny_vae(), 16)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, :16, 16:] = -1.0  # repaint the top-right cell only
    with torch.no_grad():
        a, b = model.encode(x).latent_dist.mean, model.encode(y).latent_dist.mean
    assert a.shape == (1, 4, 8, 8)
    # (1, 8, 8) latent positions that differ beyond rounding: identical cells are encoded once, so
    # the two images' cells go through the encoder in differently composed batches
    changed = ((a - b).abs() > 1e-5).any(dim=1)
    assert changed[0, :4, 4:].all() and not changed[0, 4:].any() and not changed[0, :4, :4].any()
    with torch.no_grad():
        img = model.decode(a).sample
    assert img.shape == (1, 3, 32, 32)
    whole = torch.zeros(1, 4, 8, 8)
    whole[..., :4, :4] = a[..., :4, :4]
    with torch.no_grad():  # decoding is local too: a cell's pixels come from its own latents
        part = model.decode(whole).sample
    assert torch.allclose(part[..., :16, :16], img[..., :16, :16], atol=1e-5)


def test_loader_wraps_a_tokenizer_that_records_its_cell(tmp_path, monkeypatch):
    from fluid_cli.stages import pretrained as pt

    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    p = pt.resolve_image_tokenizer(str(tmp_path / "vae"))
    assert p.patch == 0 and not isinstance(pt.load_image_tokenizer(p), PatchLocal)
    (tmp_path / "vae" / "fluid-tokenizer.json").write_text(json.dumps({"patch": 16}))
    p = pt.resolve_image_tokenizer(str(tmp_path / "vae"))
    model = pt.load_image_tokenizer(p)
    assert p.patch == 16 and isinstance(model, PatchLocal) and model.config.latent_channels == 4
    with pytest.raises(ValueError, match="multiple"):
        model.encode(torch.zeros(1, 3, 24, 24))
    # a relative directory is recorded absolute: `fluid sample` decodes from any working directory
    monkeypatch.chdir(tmp_path)
    assert pt.resolve_image_tokenizer("vae").id == str((tmp_path / "vae").resolve())


def test_identical_cells_are_encoded_once_with_the_same_result():
    """Deduplicated encoding equals encoding every cell (to float rounding: the batch differs)."""
    vae = _tiny_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x[:, :, 16:, :] = 0.25  # four identical plain cells
    x[1, :, :16, :16] = x[0, :, :16, :16]  # and one repeated across images
    with torch.no_grad():
        got = PatchLocal(vae, 16).encode(x).latent_dist
        want = unfold(vae.encode(fold(x, 2)).latent_dist.parameters, 2)
    assert torch.allclose(got.parameters, want, rtol=1e-5, atol=1e-6)
