"""The CIFAR-10-C corruptions whose randomness has spatial structure: glass blur, motion blur, snow,
fog and elastic transform, for any (B, C, H, W) float batch (snow: C = 1 or 3), vectorized over
the batch.

Each function has the signature of the other corruptions, ``f(x, c, gen)``: ``x`` (B, C, H, W)
float in [0, 1], ``c`` one severity's entry of
:data:`attrefine_fast.corruptions.SEVERITY_PARAMS` and ``gen`` a CPU ``torch.Generator`` (None:
the global RNG) that draws every random number, per image: a blur angle, a fractal, a
displacement field, glass blur's pixel moves. The results are unclipped (``corrupt`` clips them).

They follow the algorithms of the benchmark's reference implementation, written here in torch:
ImageMagick's motion blur becomes a one-sided Gaussian along a line of integer pixel offsets,
glass blur's sequential pixel moves run as independent groups, and values stay float (the
reference truncates to 8 bits between steps and at the end). Glass blur's moves are what the
reference's code does, not what it reads as: its ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an
(H, W, 3) array assigns from views, so pixel (h, w) receives a copy of its neighbour and the
neighbour stays (a swap of whole pixels would carry pixels further and change more of them).
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey, as the reference's RGB-to-grey conversion


def _uniform(shape, gen, low: float, high: float) -> torch.Tensor:
    """float64 draws from U(low, high) on the CPU, from ``gen``."""
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low


def _edge_index(n: int, pad: int, mode: str, device) -> torch.Tensor:
    """Indices of a length-n axis padded by ``pad`` on each side, any pad: "replicate" repeats the
    edge value, "reflect" mirrors about the edge (dcba|abcd|dcba), as scipy's mode="reflect"."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    i = i % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_filter(x: torch.Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "replicate") -> torch.Tensor:
    """Separable Gaussian blur of each channel of x: (B, C, H, W), radius int(truncate * sigma + 0.5)
    as scipy and scikit-image, so also for kernels wider than the image; sigma 0 returns x."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return x
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = (k / k.sum()).tolist()
    for dim, n in ((-2, x.shape[-2]), (-1, x.shape[-1])):
        padded = x.index_select(dim, _edge_index(n, radius, mode, x.device))
        # In-place sums of shifted slices: 3x faster on the CPU than conv2d over B * C planes
        # (27 vs 93 ms for 1000x3x32x32 at sigma 0.4, one thread).
        x = padded.narrow(dim, 0, n) * k[0]
        for i in range(1, len(k)):
            x.add_(padded.narrow(dim, i, n), alpha=k[i])
    return x


def _motion_blur(x: torch.Tensor, radius: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick's motion blur: each pixel becomes the weighted mean of the 2 * ceil(radius) + 1
    pixels on a ray from it at ``angles`` (B,) degrees (x right, y down), weights exp(-i^2 / 2 sigma^2)
    for the i-th pixel along the ray, offsets rounded to whole pixels, edge pixels repeated."""
    width = 2 * math.ceil(radius) + 1
    steps = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(steps**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).tolist()
    theta = torch.deg2rad(angles.double())[:, None]
    ox = torch.ceil(steps * torch.cos(theta) - 0.5).long()  # (B, width), each within +-(width - 1)
    oy = torch.ceil(steps * torch.sin(theta) - 0.5).long()
    b, c, h, w = x.shape
    pad = width - 1
    padded = x[:, :, _edge_index(h, pad, "replicate", x.device)][..., _edge_index(w, pad, "replicate", x.device)]
    padded = padded.reshape(b, c, -1)
    pw = w + 2 * pad
    # Each tap is one gather from the padded image at a per-image flat offset: one gather, not one
    # along rows then one along columns (159 vs 306 ms for 1000x3x32x32 at radius 9, one thread).
    base = ((torch.arange(h)[:, None] + pad) * pw + torch.arange(w) + pad).flatten().to(x.device)
    shifts = (oy * pw + ox).to(x.device)
    out = x * weights[0]
    for i in range(1, width):
        index = base[None, :] + shifts[:, i, None]
        out.add_(padded.gather(2, index[:, None, :].expand(b, c, h * w)).view(b, c, h, w), alpha=weights[i])
    return out


def motion_blur(x, c, gen):
    radius, sigma = c
    return _motion_blur(x, radius, sigma, _uniform(x.shape[0], gen, -45.0, 45.0))


def _visit_groups(h: int, w: int, delta: int):
    """The reference visits rows h - delta .. delta + 1 and in each the columns w - delta .. delta + 1,
    backwards, and copies into each pixel the one up to ``delta`` rows and columns away. Two visits
    that can touch the same pixel are less than 2 * delta rows and columns apart, so ordering the
    visits by 2 * delta * row + column keeps every such pair in the reference's order, and visits
    with equal keys touch disjoint pixels: each key's copies run at once. Returns the flat visit
    indices per key, highest key first, and each visit's rank in the reference's order."""
    rows = torch.arange(max(h - delta, delta), delta, -1)  # empty for images of 2 * delta or fewer rows
    cols = torch.arange(max(w - delta, delta), delta, -1)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    rank = torch.arange(rr.numel()).view_as(rr)
    key = 2 * delta * rr + cc
    groups = []
    for k in key.unique(sorted=True).flip(0).tolist():
        sel = key == k
        groups.append(((rr[sel] * w + cc[sel]), rank[sel]))
    return groups


def local_copies(source: torch.Tensor, h: int, w: int, delta: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """One pass of the reference's pixel moves, in place on ``source`` and returned: each visited
    pixel takes the pixel (dy, dx) away, as it is at that point of the pass.

    Args:
        source: (H * W, B) int64; ``source[p, b]``: the input pixel of image b now at pixel p.
        dy, dx: (visits, B) int64 in [-delta, delta), one per visit in the reference's order
            (rows, then columns, from the bottom right); visits = (H - 2 delta)(W - 2 delta).
    """
    moves = [oy * w + ox for oy in range(-delta, delta) for ox in range(-delta, delta) if oy or ox]
    offsets = (dy * w + dx).to(source.device)
    for pos, rank in _visit_groups(h, w, delta):
        pos, rank = pos.to(source.device), rank.to(source.device)
        move = offsets.index_select(0, rank)  # (n, B)
        arriving = source.index_select(0, pos)
        for m in moves:
            arriving = torch.where(move == m, source.index_select(0, pos + m), arriving)
        source.index_copy_(0, pos, arriving)
    return source


def glass_blur(x, c, gen):
    sigma, delta, passes = c
    b, ch, h, w = x.shape
    x = gaussian_filter(x, sigma)
    visits = max(h - 2 * delta, 0) * max(w - 2 * delta, 0)
    # Move pixel indices, not pixels, with the images along the fast axis: each group of moves
    # reads and writes whole contiguous rows (measured on the swaps these copies replaced, which
    # wrote twice as much: 1000 32x32 images, two passes, one thread, 120 ms against 330 ms with
    # the images first).
    source = torch.arange(h * w, device=x.device)[:, None].repeat(1, b)
    for _ in range(passes):
        # The reference draws offsets with numpy's randint(-delta, delta): the high end is excluded.
        dy, dx = torch.randint(-delta, delta, (2, visits, b), generator=gen)
        local_copies(source, h, w, delta, dy, dx)
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, ch)
    pixels = pixels[(source.T + torch.arange(0, b * h * w, h * w, device=x.device)[:, None]).flatten()]
    return gaussian_filter(pixels.reshape(b, h, w, ch).permute(0, 3, 1, 2), sigma)


def _zoom_matrix(n: int, zoom: float) -> torch.Tensor:
    """(n, n) linear interpolation of the reference's zoom along an axis of length n: crop the
    centre ceil(n / zoom) pixels, stretch them to round(crop * zoom) with the end pixels' centres
    kept in place (scipy's zoom, order 1), and keep the centre n."""
    crop = math.ceil(n / zoom)
    stretched = round(crop * zoom)
    step = (crop - 1) / max(stretched - 1, 1)
    pos = (n - crop) // 2 + (torch.arange(n, dtype=torch.float64) + (stretched - n) // 2) * step
    lo = pos.floor().long().clamp(0, n - 1)
    frac = pos - lo
    m = torch.zeros(n, n, dtype=torch.float64)
    m[torch.arange(n), lo] += 1 - frac
    m[torch.arange(n), (lo + 1).clamp(max=n - 1)] += frac
    return m


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """The reference's clipped zoom of each (H, W) plane: magnified about the centre by ``zoom``
    (bilinear), cropped to the same size."""
    if zoom == 1:
        return x
    rows = _zoom_matrix(x.shape[-2], zoom).to(x.device, x.dtype)
    cols = _zoom_matrix(x.shape[-1], zoom).to(x.device, x.dtype)
    return rows @ x @ cols.T


def snow(x, c, gen):
    loc, scale, zoom, threshold, radius, sigma, keep = c
    b, ch, h, w = x.shape
    if ch not in (1, 3):
        raise ValueError(f"snow needs 1 or 3 channels, got {ch}")
    flakes = torch.randn((b, 1, h, w), generator=gen, dtype=torch.float64).to(x.device, x.dtype) * scale + loc
    flakes = clipped_zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    flakes = _motion_blur(flakes, radius, sigma, _uniform(b, gen, -135.0, -45.0))
    # Whiten the scene towards 1.5 * grey + 0.5; a 1-channel image is its own grey.
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = x if ch == 1 else (x * luma).sum(1, keepdim=True)
    x = keep * x + (1 - keep) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


def plasma_fractal(batch: int, size: int, decay: float, gen) -> torch.Tensor:
    """(batch, size, size) float64 heightmaps in [0, 1] by the diamond-square algorithm on a torus,
    size a power of two: each level sets the midpoints of the current squares, then of their edges,
    to the mean of their four neighbours plus uniform noise whose range shrinks by ``decay`` per level."""
    m = torch.zeros(batch, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def jittered(total: torch.Tensor) -> torch.Tensor:
        # As the reference: noise U(-wibble, wibble) scaled by wibble again, so wibble^2 in all.
        return total / 4 + wibble * _uniform(total.shape, gen, -wibble, wibble)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        around = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = jittered(around + around.roll(-1, 2))
        centres = m[:, half::step, half::step]
        # Edge midpoints on corner rows: the centres above and below, the corners left and right.
        m[:, ::step, half::step] = jittered(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        # Edge midpoints on corner columns: the centres left and right, the corners above and below.
        m[:, half::step, ::step] = jittered(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp(min=1e-300)


def fog(x, c, gen):
    thickness, decay = c
    b, _, h, w = x.shape
    size = 1 << max(1, (max(h, w) - 1).bit_length())  # the smallest power of two >= H and W
    haze = plasma_fractal(b, size, decay, gen)[:, None, :h, :w].to(x.device, x.dtype)
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    # Add the haze, then scale so the image's brightest value before it stays the maximum possible.
    return (x + thickness * haze) * peak / (peak + thickness)


def _pixel_grid(points_y: torch.Tensor, points_x: torch.Tensor, h: int, w: int, align_corners: bool) -> torch.Tensor:
    """grid_sample's grid (B, H, W, 2) for sampling at pixel coordinates (row y, column x)."""
    if align_corners:
        gx, gy = 2 * points_x / max(w - 1, 1) - 1, 2 * points_y / max(h - 1, 1) - 1
    else:
        gx, gy = (2 * points_x + 1) / w - 1, (2 * points_y + 1) / h - 1
    return torch.stack([gx, gy], dim=-1)


def elastic_transform(x, c, gen):
    b, ch, h, w = x.shape
    side = min(h, w)  # the table is in units of the image side (32 at CIFAR)
    alpha, sigma, shift = (v * side for v in c)
    dtype = torch.float64
    # A random affine map: three points around the centre each moved by up to `shift` pixels.
    cx, cy, s = w // 2, h // 2, max(1, side // 3)
    src = torch.tensor([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=dtype)
    dst = src + _uniform((b, 3, 2), gen, -shift, shift)
    # The inverse map, dst -> src, tells each output pixel where to read: [dst | 1] @ A = src.
    ones = torch.ones(b, 3, 1, dtype=dtype)
    inverse = torch.linalg.solve(torch.cat([dst, ones], dim=2), src.expand(b, 3, 2))  # (B, 3, 2)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    pix = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1).reshape(1, h * w, 3)
    read = (pix @ inverse).reshape(b, h, w, 2)
    # Mirrored about the edge pixels' centres (OpenCV's BORDER_REFLECT_101, as the reference).
    grid = _pixel_grid(read[..., 1], read[..., 0], h, w, align_corners=True).to(x.device, x.dtype)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    # Then a smooth random displacement field: uniform noise blurred by sigma, times alpha pixels.
    field = gaussian_filter(_uniform((b, 2, h, w), gen, -1.0, 1.0), sigma, truncate=3.0, mode="reflect") * alpha
    grid = _pixel_grid(yy + field[:, 1], xx + field[:, 0], h, w, align_corners=False).to(x.device, x.dtype)
    # Mirrored about the image border (scipy's mode="reflect", as the reference).
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


FUNCTIONS = {
    "glass_blur": glass_blur, "motion_blur": motion_blur, "snow": snow, "fog": fog,
    "elastic_transform": elastic_transform,
}
