"""Image -> latent encoders for the prepare job, and the matching decoders for sample grids.

Images come in as float tensors (N, C, H, W) in [-1, 1] at the target resolution (see
`center_crop_resize` for how files get there). Two encoders, one table (`ENCODERS[name]`):
- "pixel": identity; the "latent" is the image itself (scaling factor 1).
- "sd-vae": Stable Diffusion's AutoencoderKL (diffusers) loaded from a local path; latents are the
  posterior sample (or mean) times 0.18215, as in LDM/DiT. Decode divides by it again.
Each entry validates an `EncoderSpec`, plans the latent shape without loading weights, builds the
encoder, writes the manifest's `encoder` record, and rebuilds a decoder from that record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

SD_VAE_SCALE = 0.18215


def center_crop_resize(img: Image.Image, size: int) -> np.ndarray:
    """ADM-style preprocessing -> uint8 (size, size, C).

    Halve with a box filter while the short side is at least 2 * size (cheap anti-aliasing before
    the final resample), bicubic-resize so the short side is `size`, then take the centre square."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))),
                     resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class PixelEncoder:
    """Identity encoder: the stored record is the [-1, 1] image itself."""

    name = "pixel"
    scaling_factor = 1.0

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(image_shape)  # type: ignore[return-value]

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images.float()  # (N, C, H, W)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1, 1)


def resolve_device(device: str | None) -> torch.device:
    """None or "auto" -> cuda when available, else cpu; anything else -> torch.device(device)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_vae(path: str, device: str | None = None, dtype: torch.dtype = torch.float32):
    """AutoencoderKL from a local diffusers folder (config.json + weights), a pipeline folder with a
    vae/ subfolder, or a single .safetensors/.ckpt file. Never downloads."""
    from diffusers import AutoencoderKL

    if not path:
        raise ValueError("--vae-path is required for the sd-vae encoder (a local AutoencoderKL folder)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vae-path {path}: no such file or directory")
    try:
        if os.path.isdir(path):
            sub = "vae" if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")) else None
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True, torch_dtype=dtype)
        else:
            vae = AutoencoderKL.from_single_file(path, local_files_only=True, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - rewrapped with the path and the fix
        raise ValueError(
            f"--vae-path {path}: could not load an AutoencoderKL ({type(exc).__name__}: {exc}). Pass a "
            "folder saved with AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)"
        ) from exc
    return vae.to(resolve_device(device)).eval().requires_grad_(False)


class SDVAEEncoder:
    """SD-VAE latents: (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) * 0.18215.

    vae_path: local weights (see load_vae). sample: "sample" draws from the posterior (as DiT's
    feature extraction does; seeded by the caller's generator so re-runs are identical) or "mean".
    """

    name = "sd-vae"

    def __init__(self, vae_path: str, *, device: str | None = None, sample: str = "sample",
                 scaling_factor: float = SD_VAE_SCALE, vae: Any = None) -> None:
        if sample not in ("sample", "mean"):
            raise ValueError(f"vae sample mode must be 'sample' or 'mean', got {sample!r}")
        self.vae_path, self.sample_mode, self.scaling_factor = vae_path, sample, float(scaling_factor)
        self.vae = vae if vae is not None else load_vae(vae_path, device)
        self.device = next(self.vae.parameters()).device
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"resolution {h}x{w} is not a multiple of the VAE's downsampling factor {self.factor}")
        return (self.latent_channels, h // self.factor, w // self.factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.device, torch.float32)  # (N, C, H, W)
        if x.shape[1] == 1:  # grayscale sources (digits): the VAE wants RGB
            x = x.expand(-1, 3, -1, -1)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if self.sample_mode == "sample" else dist.mean
        return (z * self.scaling_factor).float().cpu()  # (N, 4, H/8, W/8)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1).cpu()  # (N, 3, H, W)

    def make_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


@dataclass(frozen=True)
class EncoderSpec:
    """What to build: name in `ENCODERS` ("pixel", "sd-vae"); vae_path/device/sample only for sd-vae."""

    name: str = "pixel"
    vae_path: str | None = None
    device: str | None = None
    sample: str = "sample"

    def __post_init__(self) -> None:
        if self.name not in ENCODERS:
            raise ValueError(f"encoder {self.name!r} unknown; use {_names()}")
        ENCODERS[self.name].check(self)


@dataclass(frozen=True)
class EncoderKind:
    """One encoder kind.

    check(spec): raise ValueError for a spec this kind cannot build. latent_shape(spec, image_shape
    (C, H, W)) -> the stored (C', H', W'), without loading weights (a Ray driver plans shards with it).
    build(spec) -> the encoder (encode/decode/latent_shape; `make_generator` if it samples).
    record(spec) -> the manifest's `encoder` record (the only place that writes it).
    decoder(record, device) -> an encoder that decodes latents the record describes.
    """

    check: Callable[[EncoderSpec], None]
    latent_shape: Callable[[EncoderSpec, tuple[int, int, int]], tuple[int, int, int]]
    build: Callable[[EncoderSpec], Any]
    record: Callable[[EncoderSpec], dict[str, Any]]
    decoder: Callable[[dict[str, Any], str | None], Any]


def _names() -> str:
    return " or ".join(repr(n) for n in ENCODERS)


# -- pixel ----------------------------------------------------------------------------------------
def _pixel_check(spec: EncoderSpec) -> None:
    pass


def _pixel_latent_shape(spec: EncoderSpec, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    return image_shape


def _pixel_record(spec: EncoderSpec) -> dict[str, Any]:
    return {"name": PixelEncoder.name, "scaling_factor": PixelEncoder.scaling_factor}


# -- sd-vae ---------------------------------------------------------------------------------------
def _sd_vae_check(spec: EncoderSpec) -> None:
    if not spec.vae_path:
        raise ValueError("encoder 'sd-vae' needs vae_path (--vae-path): a local AutoencoderKL folder")


def _sd_vae_latent_shape(spec: EncoderSpec, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    # Read the VAE's config only (no weights) so a Ray driver does not load the model.
    from diffusers import AutoencoderKL

    path = spec.vae_path or ""
    sub = "vae" if os.path.isdir(os.path.join(path, "vae")) and not os.path.exists(os.path.join(path, "config.json")) else None
    try:
        cfg = AutoencoderKL.load_config(path, subfolder=sub, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--vae-path {path}: no AutoencoderKL config.json there ({exc})") from exc
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    _, h, w = image_shape
    if h % f:
        raise ValueError(f"--resolution {h} must be a multiple of the VAE downsampling factor {f}")
    return (int(cfg["latent_channels"]), h // f, w // f)


def _sd_vae_build(spec: EncoderSpec) -> SDVAEEncoder:
    return SDVAEEncoder(spec.vae_path or "", device=spec.device, sample=spec.sample)


def _sd_vae_record(spec: EncoderSpec) -> dict[str, Any]:
    return {"name": SDVAEEncoder.name, "scaling_factor": SD_VAE_SCALE, "vae_path": spec.vae_path,
            "sample": spec.sample}


def _sd_vae_decoder(record: dict[str, Any], device: str | None) -> SDVAEEncoder:
    return build_encoder(EncoderSpec("sd-vae", record.get("vae_path"), device))


ENCODERS: dict[str, EncoderKind] = {
    "pixel": EncoderKind(check=_pixel_check, latent_shape=_pixel_latent_shape, build=lambda spec: PixelEncoder(),
                         record=_pixel_record, decoder=lambda record, device: PixelEncoder()),
    "sd-vae": EncoderKind(check=_sd_vae_check, latent_shape=_sd_vae_latent_shape, build=_sd_vae_build,
                          record=_sd_vae_record, decoder=_sd_vae_decoder),
}


_CACHE: dict[EncoderSpec, Any] = {}


def build_encoder(spec: EncoderSpec):
    """Build (once per process: Ray workers reuse it across tasks) the encoder `spec` names."""
    if spec not in _CACHE:
        _CACHE[spec] = ENCODERS[spec.name].build(spec)
    return _CACHE[spec]


def encoder_record(spec: EncoderSpec) -> dict[str, Any]:
    """The manifest's `encoder` record for a dataset encoded with `spec`."""
    return ENCODERS[spec.name].record(spec)


def planned_latent_shape(spec: EncoderSpec, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent shape `spec` turns images of `image_shape` into, without loading any weights."""
    return ENCODERS[spec.name].latent_shape(spec, image_shape)


def decode_latents(latents: torch.Tensor, encoder: dict[str, Any], device: str | None = None) -> torch.Tensor:
    """Latents from a dataset (manifest['encoder'] describes how they were made) -> images in [-1, 1].
    Used by sample grids."""
    name = encoder.get("name")
    if not isinstance(name, str) or name not in ENCODERS:
        raise ValueError(f"manifest encoder name {name!r} unknown; expected {_names()}")
    return ENCODERS[name].decoder(encoder, device).decode(latents)
