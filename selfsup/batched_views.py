"""Views made on the training device: one call augments a whole uint8 batch with per-sample parameters.

The counterpart of `transforms.MultiView` for `data.augment_on: device`: the DataLoader only decodes
images to a fixed-size uint8 tensor (`UInt8Images`), and `BatchedViews` turns the batch into the
method's views before its forward. Same presets, overrides and option checks as transforms.py (it
reads the resolved options of `build_views`), and each parameter is drawn as torchvision v2 draws
it per image (RandomResizedCrop's 10 tries, ColorJitter's random op order, ...), so both paths give
the same view statistics.

Written by hand in plain torch: kornia.augmentation 0.9 was measured on this pipeline (SimCLR
recipe, 256 x 32 px, one CPU thread: ~2.7k images/s, ours is faster) and draws one jitter order
per batch and crops by warping without antialiasing; here a crop + resize (+ flip) is two batched
matmuls with torchvision's antialiased bilinear weights, and the blur two more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from selfsup.transforms import _blur_kernel_size, _plain, _stats, _to_channels, build_views

__all__ = ["ViewParams", "BatchedView", "BatchedViews", "UInt8Images", "build_batched_views"]

_TRIES = 10  # RandomResizedCrop's attempts before it falls back to a centre crop
# uniform draws per sample and view: 2 x 10 crop tries, top, left, flip, jitter, 4 factors,
# 4 order keys, grayscale, blur, sigma, solarize
_DRAWS = 2 * _TRIES + 2 + 1 + 1 + 4 + 4 + 4
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing


@dataclass
class ViewParams:
    """Random parameters of one view for a batch, one entry per sample (what torchvision draws per image)."""

    top: torch.Tensor  # [B] int64, crop box in input pixels
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B] bool: colour jitter applied
    factors: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue
    order: torch.Tensor  # [B, 4] int64: permutation of the 4 jitter ops (0..3 in the order above)
    grayscale: torch.Tensor  # [B] bool
    blur: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] float
    solarize: torch.Tensor  # [B] bool

    def select(self, index: torch.Tensor) -> ViewParams:
        return ViewParams(**{k: v[index] for k, v in vars(self).items()})


class BatchedView:
    """One view's chain for a batch: crop + resize + flip -> jitter -> grayscale -> blur -> solarize -> normalize."""

    def __init__(self, p: dict[str, Any], image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.p = dict(p)
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        # torchvision's own range checks and (min, max) resolution of the jitter strengths
        jitter = v2.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])
        ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
        self.jitter_enabled = [r is not None for r in ranges]
        self.jitter_ranges = [r if r is not None else (v, v) for r, v in zip(ranges, _IDENTITY)]
        self.blur_size = _blur_kernel_size(image_size)
        v2.GaussianBlur(self.blur_size, sigma=p["blur_sigma"])  # validates sigma

    # -- parameters ------------------------------------------------------------------------------

    def sample(self, batch: int, height: int, width: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> ViewParams:
        """Per-sample parameters, distributed as torchvision v2 draws them for one image of this size."""
        p = self.p
        u = torch.rand(batch, _DRAWS, generator=generator, device=device)  # all draws of this view at once
        top, left, h, w = self._crop_boxes(u[:, : 2 * _TRIES + 2].double(), height, width)
        rest = u[:, 2 * _TRIES + 2:]  # [B, 14]
        lo = rest.new_tensor([r[0] for r in self.jitter_ranges])
        hi = rest.new_tensor([r[1] for r in self.jitter_ranges])
        sigma_lo, sigma_hi = p["blur_sigma"]
        return ViewParams(
            top=top, left=left, height=h, width=w,
            flip=rest[:, 0] < p["flip_p"],
            jitter=rest[:, 1] < p["jitter_p"],
            factors=lo + (hi - lo) * rest[:, 2:6],
            order=rest[:, 6:10].argsort(dim=1),  # a uniform random permutation, like torch.randperm(4)
            grayscale=rest[:, 10] < p["grayscale_p"],
            blur=rest[:, 11] < p["blur_p"],
            sigma=sigma_lo + (sigma_hi - sigma_lo) * rest[:, 12],
            solarize=rest[:, 13] < p["solarize_p"],
        )

    def _crop_boxes(self, u: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """RandomResizedCrop.make_params for every sample: the first of 10 tries that fits, else a centre crop."""
        (s_lo, s_hi), (r_lo, r_hi) = self.p["crop_scale"], self.p["crop_ratio"]
        area = height * width
        target = area * (s_lo + (s_hi - s_lo) * u[:, :_TRIES])  # [B, T]
        log_lo, log_hi = math.log(r_lo), math.log(r_hi)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _TRIES: 2 * _TRIES])
        w = torch.sqrt(target * aspect).round()  # round half to even, like Python's round
        h = torch.sqrt(target / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [B, T]
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first try that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        top = torch.floor(u[:, 2 * _TRIES] * (height - h + 1)).clamp(max=height - h)
        left = torch.floor(u[:, 2 * _TRIES + 1] * (width - w + 1)).clamp(max=width - w)
        # fallback: the largest centred crop whose ratio lies in crop_ratio
        ratio = width / height
        if ratio < min(r_lo, r_hi):
            fw, fh = width, int(round(width / min(r_lo, r_hi)))
        elif ratio > max(r_lo, r_hi):
            fw, fh = int(round(height * max(r_lo, r_hi))), height
        else:
            fw, fh = width, height
        ok = fits.any(dim=1)
        h = torch.where(ok, h, fh)
        w = torch.where(ok, w, fw)
        top = torch.where(ok, top, (height - fh) // 2)
        left = torch.where(ok, left, (width - fw) // 2)
        return top.long(), left.long(), h.long(), w.long()

    # -- the view ----------------------------------------------------------------------------------

    def apply(self, images: torch.Tensor, prm: ViewParams) -> torch.Tensor:
        """uint8 images [B, C, H, W] -> normalized float32 views [B, C, S, S] under the given parameters.

        In between, x is a [B, C, H, W] view of [B, H, C, W] storage, so the row and column matmuls of
        the crop and the blur are plain bmm over it without copies.
        """
        b, c, height, width = images.shape
        size = self.image_size
        # crop + antialiased resize (+ flip) as x' = Wy @ x @ Wx^T; ToDtype's 1/255 folded into Wy
        wy = _resize_weights(prm.top, prm.height, height, size, scale=1.0 / 255.0)  # [B, S, H]
        wx = _resize_weights(prm.left, prm.width, width, size, flip=prm.flip)  # [B, S, W]
        x = images.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)  # [B, H, C, W]
        x = _separable(x.permute(0, 2, 1, 3), wy, wx)  # [B, C, S, S]
        if self.p["jitter_p"] > 0 and any(self.jitter_enabled):
            x = self._color_jitter(x, prm)
        if self.p["grayscale_p"] > 0 and c == 3:
            x = torch.where(prm.grayscale[:, None, None, None], _gray(x), x)
        if self.p["blur_p"] > 0:
            kernel = _blur_matrix(prm.sigma, self.blur_size, size, identity=~prm.blur)  # [B, S, S]
            x = _separable(x, kernel, kernel)
        if self.p["solarize_p"] > 0:
            solarize = prm.solarize[:, None, None, None] & (x >= self.p["solarize_threshold"])
            x = torch.where(solarize, 1.0 - x, x)
        scale = 1.0 / x.new_tensor(self.std)[None, :, None, None]
        out = torch.empty(b, c, size, size, device=x.device)
        return torch.addcmul(-x.new_tensor(self.mean)[None, :, None, None] * scale, x, scale, out=out)  # (x - mean) / std

    def _color_jitter(self, x: torch.Tensor, prm: ViewParams) -> torch.Tensor:
        """ColorJitter with each sample's own factors and op order.

        Brightness, contrast and saturation are all x' = clamp(f x + (1 - f) ref) with ref = 0, the mean
        grey level or the grey image, so each of the 4 rounds is one blend with a per-sample ref; samples
        whose op in this round is hue (or that are not jittered) blend with f = 1, which is exact identity.
        """
        channels = x.shape[1]
        enabled = torch.tensor(self.jitter_enabled, device=x.device)
        if channels == 1:  # torchvision: saturation and hue leave 1-channel images alone
            enabled[2:] = False
        identity = x.new_tensor(_IDENTITY)
        factors = torch.where(prm.jitter[:, None] & enabled, prm.factors, identity)  # [B, 4]
        for k in range(4):
            op = prm.order[:, k]  # [B]
            ratio = torch.where(op == 3, 1.0, factors.gather(1, op[:, None])[:, 0])[:, None, None, None]
            gray = _gray(x)  # [B, 1, H, W]
            ref = torch.where((op == 1)[:, None, None, None], gray.mean(dim=(1, 2, 3), keepdim=True),
                              gray * (op == 2)[:, None, None, None])  # brightness: 0
            x = torch.addcmul(ref * (1.0 - ratio), x, ratio).clamp_(0.0, 1.0)  # exactly x where ratio = 1
            if channels == 3 and self.jitter_enabled[3]:
                hue = ((op == 3) & prm.jitter).nonzero()[:, 0]
                if hue.numel():
                    x.index_copy_(0, hue, _adjust_hue(x.index_select(0, hue), factors[hue, 3]))
        return x


class BatchedViews:
    """Device-side MultiView: `(uint8 images [B, C, H, W], labels)` -> `(num_views x [B, C, S, S], labels)`."""

    def __init__(self, views: Sequence[BatchedView], in_chans: int, params: list[dict]) -> None:
        self.views = list(views)
        self.in_chans = in_chans
        self.params = params

    @property
    def num_views(self) -> int:
        return len(self.views)

    def sample(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[ViewParams]:
        b, _, h, w = images.shape
        return [view.sample(b, h, w, generator=generator, device=images.device) for view in self.views]

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.in_chans:
            raise TypeError(
                f"batched views take uint8 images [B, {self.in_chans}, H, W], got {images.dtype} {tuple(images.shape)}; "
                "with data.augment_on=device the dataset must yield UInt8Images' output"
            )
        return [view.apply(images, prm) for view, prm in zip(self.views, self.sample(images, generator))]

    def __call__(self, batch: Any, generator: torch.Generator | None = None) -> Any:
        images, *rest = batch
        return (self.make_views(images, generator), *rest)

    def __repr__(self) -> str:
        return f"BatchedViews(in_chans={self.in_chans}, views={self.params})"


def build_batched_views(
    preset: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int = 3,
    num_views: int | None = None,
    **overrides: Any,
) -> BatchedViews:
    """Same arguments and checks as `transforms.build_views`, for uint8 batches on any device."""
    resolved = build_views(preset, image_size=image_size, mean=mean, std=std, in_chans=in_chans,
                           num_views=num_views, **overrides).params
    mean, std = _stats(mean, std, in_chans)
    return BatchedViews([BatchedView(p, image_size, mean, std) for p in resolved], in_chans, resolved)


class UInt8Images:
    """Loader side of the device path: any image -> uint8 [in_chans, size, size] (shorter side resized, centre crop).

    Images already of that size pass through untouched, so 32 px datasets reach the device as stored.
    """

    def __init__(self, size: int, in_chans: int = 3) -> None:
        self.size = size
        self.in_chans = in_chans

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        x = _to_channels(image, self.in_chans)
        if x.dtype != torch.uint8:
            raise TypeError(f"data.augment_on=device needs uint8 images, got {x.dtype}; use data.augment_on=workers")
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.center_crop(F.resize(x, self.size, antialias=True), [self.size, self.size])
        return _plain(x).contiguous()

    def __repr__(self) -> str:
        return f"UInt8Images(size={self.size}, in_chans={self.in_chans})"


# ---------------------------------------------------------------------------------------------


def _resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, *,
                    flip: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """[B, out, in] weights of torchvision's antialiased bilinear resize of the crop [start, start + length).

    Output pixel k samples the crop at centre (k + 0.5) * step with a triangle filter whose support
    widens with the downscale factor (aten's _upsample_bilinear2d_aa); pixels outside the crop get 0.
    A flipped sample's pixel k takes the centre of pixel out - 1 - k.
    """
    step = (length.float() / out_size)[:, None, None]  # [B, 1, 1] crop pixels per output pixel
    support = step.clamp(min=1.0)  # triangle half-width in crop pixels (1 when upscaling)
    k = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]  # [1, out, 1]
    if flip is not None:
        k = torch.where(flip[:, None, None], out_size - 1 - k, k)  # [B, out, 1]
    centre = (k + 0.5) * step
    pixel = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :] + 0.5
    pixel = pixel - start.float()[:, None, None]  # input pixel centres in crop coordinates: [B, 1, in]
    weights = (1.0 - (pixel - centre).abs() / support).clamp_(min=0.0)  # [B, out, in]
    weights = weights * ((pixel > 0) & (pixel < length.float()[:, None, None]))
    return weights * (scale / weights.sum(dim=-1, keepdim=True))


def _separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ x @ cols^T per sample and channel: x [B, C, H, W], rows [B, R, H], cols [B, K, W] -> [B, C, R, K].

    Two plain bmm over x's [B, H, C, W] storage (free when x is a view of it, as `apply` keeps it).
    """
    b, c, h, w = x.shape
    r = rows.shape[1]
    y = torch.bmm(rows, x.permute(0, 2, 1, 3).reshape(b, h, c * w))  # [B, R, C*W]
    y = torch.bmm(y.view(b, r * c, w), cols.transpose(1, 2))  # [B, R*C, K]
    return y.view(b, r, c, -1).permute(0, 2, 1, 3)  # [B, C, R, K] over [B, R, C, K] storage


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 1, H, W] luma as torchvision computes it (the image itself when C == 1)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b)[:, None]


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation by `shift` (fraction of a turn, per sample) in HSV; x: [N, 3, H, W] in [0, 1].

    HSV -> RGB in closed form, channel n in (5, 3, 1) for (R, G, B): v - chroma * clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6 (written clamp(2 - |k - 2|, 0, 1)); the hue h is Pillow's (and torchvision's), piecewise in the largest channel.
    """
    minc, maxc = torch.aminmax(x, dim=1)  # [N, H, W]
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, 1.0)
    r, g, b = x.unbind(dim=1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))  # in [-1, 5)
    n = x.new_tensor([5.0, 3.0, 1.0])[None, :, None, None]
    k = n + hue[:, None] + 6.0 * shift[:, None, None, None]  # rotated hue + channel offset, in [-3, 13)
    k = k - 6.0 * torch.floor(k * (1.0 / 6.0))  # mod 6
    return maxc[:, None] - chroma[:, None] * (2.0 - (k - 2.0).abs()).clamp_(0.0, 1.0)  # = clamp(min(k, 4 - k), 0, 1)


def _blur_matrix(sigma: torch.Tensor, size: int, n: int, identity: torch.Tensor) -> torch.Tensor:
    """[B, n, n] matrices of torchvision's Gaussian blur along one axis (kernel `size`, reflect padding), one
    sigma per sample; the identity where `identity` is set, so x' = K @ x @ K^T blurs only the chosen samples.
    """
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, size, device=sigma.device)
    kernel = torch.softmax(-(grid[None, :] / sigma[:, None]).pow(2), dim=1)  # [B, k]
    # output pixel i reads input pixel reflect(i + t - size // 2) with weight kernel[t]
    source = torch.arange(n, device=sigma.device)[:, None] + torch.arange(size, device=sigma.device)[None, :] - size // 2
    source = source.abs()  # reflect at 0 ...
    source = torch.where(source > n - 1, 2 * (n - 1) - source, source)  # ... and at n - 1: [n, k]
    b = sigma.shape[0]
    matrix = kernel.new_zeros(b, n, n).scatter_add_(2, source.expand(b, n, size), kernel[:, None, :].expand(b, n, size))
    eye = torch.eye(n, device=sigma.device).expand(b, n, n)
    return torch.where(identity[:, None, None], eye, matrix)
