"""Loading the frozen pretrained models of the data stages: a diffusers image tokenizer (AutoencoderKL
or VQModel, told apart by the `_class_name` of its config) for `fluid tokenize`, and a transformers
T5 encoder with its own tokenizer for `fluid encode-text`.

Models are named by a hub id or a local directory and loaded with `from_pretrained`. The config is
resolved first with huggingface_hub alone (local dir, then the HF cache, then the hub unless
HF_HUB_OFFLINE), so a missing model fails in a second with one line saying how to supply it, before
torch, diffusers or transformers are imported.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from fluid_cli.errors import FluidError

IMAGE_TOKENIZER_CLASSES = ("AutoencoderKL", "VQModel")
_PIPELINE_COMPONENTS = ("vae", "vqvae", "vq_model", "vqgan")  # where a pipeline keeps its tokenizer
T5_MODEL_TYPES = ("t5", "mt5")


@dataclass(frozen=True)
class Pretrained:
    """A resolved model: where from_pretrained finds it, and its config."""

    id: str
    subfolder: str | None
    class_name: str
    config: dict
    patch: int = 0  # image tokenizers: cell side each cell is encoded alone at (0: whole image)


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a directory
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _missing(what: str, name: str) -> FluidError:
    return FluidError(
        f"{what} {name!r} is not available offline: it is neither a local directory nor in the Hugging Face "
        f"cache; pass a directory saved with save_pretrained, or run `huggingface-cli download {name}` on a "
        "machine with hub access and copy its ~/.cache/huggingface here"
    )


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or not _hub_reachable()


@functools.cache
def _hub_reachable() -> bool:
    """One quick TCP connect: without a network, huggingface_hub would retry for ~45 s per file."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _hub_json(what: str, repo: str, filename: str, subfolder: str | None) -> dict | None:
    """A JSON file of a hub repo: from the cache, else (online) the hub. None: the repo lacks it."""
    from huggingface_hub import errors as hfe
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo, filename, subfolder=subfolder, local_files_only=True)
        return json.loads(Path(path).read_text())
    except hfe.HFValidationError:
        raise FluidError(f"{what} {repo!r} is neither a local directory nor a valid hub id") from None
    except (hfe.LocalEntryNotFoundError, OSError):
        if _offline():
            return None
    try:
        return json.loads(Path(hf_hub_download(repo, filename, subfolder=subfolder)).read_text())
    except hfe.LocalEntryNotFoundError:  # the hub could not be reached after all
        raise _missing(what, repo) from None
    except (hfe.EntryNotFoundError, hfe.RemoteEntryNotFoundError):
        return None
    except (hfe.RepositoryNotFoundError, hfe.GatedRepoError):
        raise FluidError(f"{what} {repo!r}: no such (or no accessible) repository on the hub") from None
    except Exception:  # no network: connection errors come in many types
        raise _missing(what, repo) from None


def _read_json(what: str, name: str, filename: str, subfolder: str | None = None) -> dict | None:
    local = Path(name).expanduser()
    if local.is_dir():
        p = local / (subfolder or "") / filename
        return json.loads(p.read_text()) if p.is_file() else None
    if _looks_like_path(name):
        raise FluidError(
            f"{what} directory {name} does not exist; pass a directory saved with save_pretrained or a hub id"
        )
    return _hub_json(what, name, filename, subfolder)


def _not_found(what: str, name: str, files: str) -> FluidError:
    if Path(name).expanduser().is_dir():
        return FluidError(f"{what} directory {name} holds no {files}: it is not a saved model")
    return _missing(what, name) if _offline() else FluidError(f"{what} {name!r} has no {files} on the hub")


def resolve_image_tokenizer(name: str) -> Pretrained:
    """Find the AutoencoderKL / VQModel config of `name` (a model dir/id, or a pipeline's vae/vqvae)."""
    what = "image tokenizer"
    config, subfolder = _read_json(what, name, "config.json"), None
    if config is None:
        index = _read_json(what, name, "model_index.json")
        if index is None:
            raise _not_found(what, name, "config.json or model_index.json")
        subfolder = next((c for c in _PIPELINE_COMPONENTS if c in index), None)
        if subfolder is None:
            raise FluidError(
                f"{what} {name}: its pipeline has no {' / '.join(_PIPELINE_COMPONENTS)} component"
            )
        config = _read_json(what, name, "config.json", subfolder)
        if config is None:
            raise _not_found(what, name, f"{subfolder}/config.json")
    cls = config.get("_class_name")
    if cls not in IMAGE_TOKENIZER_CLASSES:
        raise FluidError(
            f"{what} {name}: class {cls!r} is not supported; use a diffusers AutoencoderKL or VQModel"
        )
    return Pretrained(_where(name), subfolder, cls, config, _patch(name, subfolder))


def _where(name: str) -> str:
    """A local directory as an absolute path, a hub id as given: the artifacts record it, and later
    stages (`fluid sample` decoding, live prompt encoding) must find it from any working directory."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else name


def _patch(name: str, subfolder: str | None) -> int:
    """The patch-local cell size a shapes tokenizer records in its fluid-tokenizer.json (local
    directories only: hub tokenizers encode whole images)."""
    path = Path(name).expanduser() / (subfolder or "") / "fluid-tokenizer.json"
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text()).get("patch") or 0)
    except (ValueError, TypeError, AttributeError) as e:
        raise FluidError(f"{path} is not a valid fluid-tokenizer.json ({e}); retrain the tokenizer") from None


def resolve_text_encoder(name: str) -> Pretrained:
    what = "text encoder"
    config = _read_json(what, name, "config.json")
    if config is None:
        raise _not_found(what, name, "config.json")
    if config.get("model_type") not in T5_MODEL_TYPES:
        raise FluidError(f"text encoder {name}: model_type {config.get('model_type')!r} is not a T5 encoder")
    return Pretrained(_where(name), None, "T5EncoderModel", config)


def _load_error(what: str, p: Pretrained, e: Exception) -> FluidError:
    if _offline() and not Path(p.id).expanduser().is_dir():
        return _missing(what, p.id)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return FluidError(f"could not load {what} {p.id}: {first}")


def load_image_tokenizer(p: Pretrained):
    """The diffusers model in eval mode (fp32: the SD VAE is unstable in fp16)."""
    import diffusers

    cls = getattr(diffusers, p.class_name)
    try:
        # low_cpu_mem_usage=False: without `accelerate` diffusers otherwise warns on every load
        model = cls.from_pretrained(p.id, subfolder=p.subfolder, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise _load_error("image tokenizer", p, e) from None
    if p.patch:
        from fluid_cli.stages.patch_local import PatchLocal

        model = PatchLocal(model, p.patch)
    return model.eval().requires_grad_(False)


def load_text_encoder(p: Pretrained):
    """(T5EncoderModel, its tokenizer), frozen."""
    from transformers import AutoTokenizer, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one on stderr
    try:
        tokenizer = AutoTokenizer.from_pretrained(p.id)
        model = T5EncoderModel.from_pretrained(p.id)
    except (OSError, ValueError) as e:
        raise _load_error("text encoder", p, e) from None
    return model.eval().requires_grad_(False), tokenizer


def pick_device(name: str):
    """backend.resolve_device (auto = xla, cuda, mps or cpu); under torchrun each process takes its
    LOCAL_RANK's accelerator."""
    from fluid_cli.backend import resolve_device

    return resolve_device(name, int(os.environ.get("LOCAL_RANK", "0")))
