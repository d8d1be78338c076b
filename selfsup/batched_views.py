"""Views made on the training device: one call augments a whole uint8 batch with per-sample parameters.

The counterpart of `transforms.MultiView` for `data.augment_on: device`: the DataLoader only decodes
images to a fixed-size uint8 tensor (`UInt8Images`), and `BatchedViews` turns the batch into the
method's views before its forward. Same presets, overrides and option checks as transforms.py (it
reads the resolved options of `build_views`), and each parameter is drawn as torchvision v2 draws
it per image (RandomResizedCrop's 10 tries, ColorJitter's random op order, ...), so both paths give
the same view statistics.

Written by hand in plain torch: kornia.augmentation 0.9 was measured on this pipeline (SimCLR
recipe, 256 x 32 px, one CPU thread: ~2.7k images/s, about half our rate) and draws one jitter
order per batch and crops by warping without antialiasing. Here all views of a batch are one set of
samples (per-sample options, so asymmetric recipes too); a crop + resize (+ flip) is two batched
matmuls with torchvision's antialiased bilinear weights, the blur two more, and nothing waits for
the device (no host syncs), so on a GPU the views are queued behind the previous step.
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

__all__ = ["ViewParams", "BatchedViews", "UInt8Images", "build_batched_views"]

_TRIES = 10  # RandomResizedCrop's attempts before it falls back to a centre crop
# uniform draws per sample: 2 x 10 crop tries, top, left, flip, jitter, 4 factors, 4 order keys,
# grayscale, blur, sigma, solarize
_DRAWS = 2 * _TRIES + 2 + 1 + 1 + 4 + 4 + 4
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing
_CPU_CHUNK_BYTES = 1 << 19  # views made at once on a CPU: each op's tensors stay in the core's L2 (~2x faster)
_PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


@dataclass
class ViewParams:
    """Random parameters of N = B x V samples (image b's view v is sample b * V + v), as torchvision draws them per image."""

    top: torch.Tensor  # [N] int64, crop box in input pixels
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor  # [N] bool
    jitter: torch.Tensor  # [N] bool: colour jitter applied
    factors: torch.Tensor  # [N, 4] brightness, contrast, saturation, hue (identity where the view turns one off)
    order: torch.Tensor  # [N, 4] int64: permutation of the 4 jitter ops (0..3 in the order above)
    grayscale: torch.Tensor  # [N] bool
    blur: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N] float
    solarize: torch.Tensor  # [N] bool

    def view(self, v: int, num_views: int) -> ViewParams:
        """The parameters of view v alone: [B] entries."""
        return ViewParams(**{k: t[v::num_views] for k, t in vars(self).items()})

    def rows(self, start: int, stop: int) -> ViewParams:
        """Samples start..stop (image-major: images start // V .. stop // V)."""
        return ViewParams(**{k: t[start:stop] for k, t in vars(self).items()})


class BatchedViews:
    """Device-side MultiView: `(uint8 images [B, C, H, W], labels)` -> `(num_views x [B, C, S, S], labels)`.

    Each view's chain: crop + resize + flip -> jitter -> grayscale -> blur -> solarize -> normalize,
    with the options of that view (transforms.py's resolved `params`) for its samples.
    """

    def __init__(self, params: list[dict[str, Any]], image_size: int, mean: Sequence[float], std: Sequence[float],
                 in_chans: int) -> None:
        self.params = [dict(p) for p in params]
        self.image_size, self.in_chans = image_size, in_chans
        self.mean, self.std = list(mean), list(std)
        self.blur_size = _blur_kernel_size(image_size)
        self.jitter_ranges = []  # per view: 4 (min, max) factor ranges, identity for the ops it turns off
        for p in self.params:  # torchvision's own option checks
            jitter = v2.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])
            ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
            if in_chans == 1:  # torchvision: saturation and hue leave 1-channel images alone
                ranges[2:] = [None, None]
            self.jitter_ranges.append([r if r is not None else (i, i) for r, i in zip(ranges, _IDENTITY)])
            v2.GaussianBlur(self.blur_size, sigma=p["blur_sigma"])
        # ops no view uses are left out, as in the per-image pipeline
        self.jitter_on = any(p["jitter_p"] > 0 and r != [(i, i) for i in _IDENTITY]
                             for p, r in zip(self.params, self.jitter_ranges))
        self.hue_on = self.jitter_on and any(r[3] != (0.0, 0.0) for r in self.jitter_ranges)
        self.grayscale_on = in_chans == 3 and any(p["grayscale_p"] > 0 for p in self.params)
        self.blur_on = any(p["blur_p"] > 0 for p in self.params)
        self.solarize_on = any(p["solarize_p"] > 0 for p in self.params)
        self._tables: dict[tuple, dict[str, torch.Tensor]] = {}
        self._apply = self.apply

    @property
    def num_views(self) -> int:
        return len(self.params)

    # -- parameters ------------------------------------------------------------------------------

    def _table(self, device: torch.device, height: int, width: int) -> dict[str, torch.Tensor]:
        """Per-view options as [V, ...] tensors on `device` (made once: no host-to-device copy per batch)."""
        key = (str(device), height, width)
        if key not in self._tables:
            rows = {
                "scale": [p["crop_scale"] for p in self.params],
                "log_ratio": [(math.log(p["crop_ratio"][0]), math.log(p["crop_ratio"][1])) for p in self.params],
                "fallback": [_fallback_crop(p["crop_ratio"], height, width) for p in self.params],
                "probability": [[p[k] for k in _PROBABILITIES] for p in self.params],
                "factor_low": [[r[0] for r in ranges] for ranges in self.jitter_ranges],
                "factor_high": [[r[1] for r in ranges] for ranges in self.jitter_ranges],
                "hue_on": [ranges[3] != (0.0, 0.0) for ranges in self.jitter_ranges],
                "sigma": [p["blur_sigma"] for p in self.params],
                "threshold": [p["solarize_threshold"] for p in self.params],
            }
            table = {k: torch.tensor(v, device=device) for k, v in rows.items()}
            table["identity"] = torch.tensor(_IDENTITY, device=device)
            table["scale_by"] = 1.0 / torch.tensor(self.std, device=device)[None, :, None, None]
            table["shift_by"] = -torch.tensor(self.mean, device=device)[None, :, None, None] * table["scale_by"]
            self._tables[key] = table
        return self._tables[key]

    def sample(self, batch: int, height: int, width: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> ViewParams:
        """Parameters of every view of `batch` images of this size, distributed as torchvision v2 draws them."""
        t = {k: v.repeat(batch, *([1] * (v.ndim - 1))) for k, v in self._table(torch.device(device), height, width).items()
             if k in ("scale", "log_ratio", "fallback", "probability", "factor_low", "factor_high", "sigma")}  # [N, ...]
        u = torch.rand(batch * self.num_views, _DRAWS, generator=generator, device=device)  # all draws at once
        top, left, h, w = _crop_boxes(u[:, : 2 * _TRIES + 2].double(), t["scale"], t["log_ratio"], t["fallback"],
                                      height, width)
        rest = u[:, 2 * _TRIES + 2:]  # [N, 14]
        events = rest[:, [0, 1, 10, 11, 13]] < t["probability"]  # flip, jitter, grayscale, blur, solarize
        sigma = t["sigma"][:, 0] + (t["sigma"][:, 1] - t["sigma"][:, 0]) * rest[:, 12]
        return ViewParams(
            top=top, left=left, height=h, width=w, flip=events[:, 0], jitter=events[:, 1],
            factors=t["factor_low"] + (t["factor_high"] - t["factor_low"]) * rest[:, 2:6],
            order=rest[:, 6:10].argsort(dim=1),  # a uniform random permutation, like torch.randperm(4)
            grayscale=events[:, 2], blur=events[:, 3], sigma=sigma, solarize=events[:, 4],
        )

    # -- the views ---------------------------------------------------------------------------------

    def apply(self, images: torch.Tensor, prm: ViewParams) -> torch.Tensor:
        """uint8 images [B, C, H, W] -> normalized float32 views [V, B, C, S, S] under the given parameters.

        Samples are image-major (N = B x V): the crop's row matmul makes all views of an image in one bmm
        from the shared uint8 image; after it x is a contiguous [N, C, S, S].
        """
        b, c, height, width = images.shape
        v, size = self.num_views, self.image_size
        table = self._table(images.device, height, width)
        # crop + antialiased resize (+ flip) as x' = Wy @ x @ Wx^T; ToDtype's 1/255 folded into Wy
        wy = _resize_weights(prm.top, prm.height, height, size, scale=1.0 / 255.0)  # [N, S, H]
        wx = _resize_weights(prm.left, prm.width, width, size, flip=prm.flip)  # [N, S, W]
        x = images.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)  # [B, H, C, W]
        x = torch.bmm(wy.view(b, v * size, height), x.view(b, height, c * width))  # [B, V*S, C*W]: all views' rows
        x = x.view(b * v, size, c, width).transpose(1, 2).contiguous()  # [N, C, S, W]
        x = torch.bmm(x.view(b * v, c * size, width), wx.transpose(1, 2)).view(b * v, c, size, size)  # [N, C, S, S]
        if self.jitter_on:
            x = self._color_jitter(x, prm, table)
        if self.grayscale_on:
            x = torch.where(prm.grayscale[:, None, None, None], _gray(x), x)
        if self.blur_on:
            kernel = _blur_matrix(prm.sigma, self.blur_size, size, identity=~prm.blur)  # [N, S, S]
            x = kernel[:, None] @ x @ kernel[:, None].transpose(-1, -2)  # [N, C, S, S]
        if self.solarize_on:
            threshold = table["threshold"].repeat(b)[:, None, None, None]
            x = torch.where(prm.solarize[:, None, None, None] & (x >= threshold), 1.0 - x, x)
        x = x.reshape(b, v, c, size, size).transpose(0, 1)  # [V, B, C, S, S]
        out = torch.empty(v, b, c, size, size, device=x.device)  # each view a contiguous [B, C, S, S]
        return torch.addcmul(table["shift_by"], x, table["scale_by"], out=out)  # (x - mean) / std

    def _color_jitter(self, x: torch.Tensor, prm: ViewParams, table: dict[str, torch.Tensor]) -> torch.Tensor:
        """ColorJitter with each sample's own factors and op order, as 6 blends around one hue rotation.

        Brightness, contrast and saturation are x' = clamp(f x + (1 - f) ref) with ref = 0, the mean grey
        level or the grey image. A sample's ops before its hue run in blends 0-2 and those after it in
        blends 3-5; a blend with f = 1 (op "3" below) is exactly the identity, so no sample waits on another.
        """
        factors = torch.where(prm.jitter[:, None], prm.factors, table["identity"])  # [N, 4]
        if self.hue_on:
            hue_at = (prm.order == 3).to(torch.uint8).argmax(dim=1, keepdim=True)  # [N, 1]
            steps = torch.arange(4, device=x.device)
            before = torch.where(steps[:3] < hue_at, prm.order[:, :3], 3)  # [N, 3]
            after = torch.where(steps[1:] > hue_at, prm.order[:, 1:], 3)  # [N, 3]
            ops = torch.cat([before, after], dim=1)  # [N, 6]
        else:
            ops = prm.order  # [N, 4]: the hue ops are identity
        ratios = torch.where(ops == 3, 1.0, factors.gather(1, ops.clamp(max=2)))  # [N, R]
        contrast, saturation = ops == 1, (ops == 2).to(x.dtype)
        for k in range(ops.shape[1]):
            if self.hue_on and k == 3:  # hue rotation between the two halves
                rotate = (prm.jitter & table["hue_on"].repeat(x.shape[0] // self.num_views))[:, None, None, None]
                x = torch.where(rotate, _adjust_hue(x, factors[:, 3]), x)
            gray = _gray(x)  # [N, 1, S, S]
            ref = torch.where(contrast[:, k, None, None, None], gray.mean(dim=(1, 2, 3), keepdim=True),
                              gray * saturation[:, k, None, None, None])  # brightness: 0
            ratio = ratios[:, k, None, None, None]
            x = torch.addcmul(ref * (1.0 - ratio), x, ratio).clamp_(0.0, 1.0)  # exactly x where ratio = 1
        return x

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.in_chans:
            raise TypeError(
                f"batched views take uint8 images [B, {self.in_chans}, H, W], got {images.dtype} {tuple(images.shape)}; "
                "with data.augment_on=device the dataset must yield UInt8Images' output"
            )
        b, c, h, w = images.shape
        v, size = self.num_views, self.image_size
        prm = self.sample(b, h, w, generator=generator, device=images.device)
        # a CPU works through cache-sized chunks (the ops stream their tensors); a GPU takes the batch at once
        chunk = b if images.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // (4 * v * c * size * size))
        if chunk >= b:
            return list(self._apply(images, prm).unbind(0))
        out = torch.empty(v, b, c, size, size, device=images.device)
        for start in range(0, b, chunk):
            stop = min(start + chunk, b)
            out[:, start:stop] = self._apply(images[start:stop], prm.rows(start * v, stop * v))
        return list(out.unbind(0))

    def compile(self) -> BatchedViews:
        """Fuse `apply`'s elementwise chains with torch.compile (train.compile): far fewer kernel launches
        on a GPU, ~2.5x on a CPU core. Shapes are static per batch size; the sampling stays eager."""
        self._apply = torch.compile(self.apply, dynamic=False)
        return self

    def __call__(self, batch: Any, generator: torch.Generator | None = None) -> Any:
        images, *rest = batch
        return (self.make_views(images, generator), *rest)

    def __repr__(self) -> str:
        return f"BatchedViews(in_chans={self.in_chans}, image_size={self.image_size}, views={self.params})"


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
    """Same arguments and checks as `transforms.build_views`, for uint8 batches on any device (views of several
    sizes, i.e. multi-crop: a `multicrop.MultiSizeViews` with the same interface)."""
    resolved = build_views(preset, image_size=image_size, mean=mean, std=std, in_chans=in_chans,
                           num_views=num_views, **overrides).params
    mean, std = _stats(mean, std, in_chans)
    if any(p["crop_size"] != resolved[0]["crop_size"] for p in resolved):  # multi-crop: views of several sizes
        from selfsup.multicrop import MultiSizeViews

        return MultiSizeViews(resolved, mean, std, in_chans)
    return BatchedViews(resolved, resolved[0]["crop_size"], mean, std, in_chans)


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


def _fallback_crop(ratio: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback: the largest centred crop (top, left, h, w) whose ratio lies in `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_boxes(u: torch.Tensor, scale: torch.Tensor, log_ratio: torch.Tensor, fallback: torch.Tensor,
                height: int, width: int) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop.make_params for every sample: the first of 10 tries that fits, else the fallback.

    u: [N, 22] uniforms (float64, as torchvision computes the box in Python floats); scale, log_ratio: [N, 2].
    """
    area = height * width
    target = area * (scale[:, :1] + (scale[:, 1:] - scale[:, :1]) * u[:, :_TRIES])  # [N, T]
    aspect = torch.exp(log_ratio[:, :1] + (log_ratio[:, 1:] - log_ratio[:, :1]) * u[:, _TRIES: 2 * _TRIES])
    w = torch.sqrt(target * aspect).round()  # round half to even, like Python's round
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [N, T]
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = torch.floor(u[:, 2 * _TRIES] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[:, 2 * _TRIES + 1] * (width - w + 1)).clamp(max=width - w)
    box = torch.stack([top, left, h, w], dim=1)  # [N, 4]
    return torch.where(fits.any(dim=1, keepdim=True), box, fallback.to(box.dtype)).long().unbind(1)


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


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 1, H, W] luma, as torchvision's rgb_to_grayscale computes it (x itself when C == 1)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (r * _GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2])[:, None]


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
    n = (5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype))[None, :, None, None]  # 5, 3, 1
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
