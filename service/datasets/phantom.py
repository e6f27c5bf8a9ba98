"""A breast-ultrasound phantom: anatomy and lesions in, a speckled B-mode image out.

Real breast data (BUSI) cannot be downloaded here, so tests, the demo and the shipped
model learn from images built the way a scanner forms them:

1. an echogenicity map in dB: skin / subcutaneous fat (with Cooper's ligaments) /
   fibroglandular tissue / retromammary fat / pectoral muscle (striated), with wavy
   boundaries and low-frequency texture;
2. lesions drawn from the sonographic BI-RADS descriptors (shape, orientation, margin,
   echo pattern, posterior features, calcifications), see :func:`sample_lesion`;
3. depth attenuation partly undone by time-gain compensation, plus a focal zone;
4. speckle: the scatterer amplitudes times complex Gaussian noise, blurred by an
   anisotropic point-spread function (FFT), whose envelope is Rayleigh distributed;
5. log compression to a display dynamic range and 8 bits.

Geometry is in fractions of the image size, so any size renders the same anatomy.
Everything random comes from the ``numpy.random.Generator`` passed in: same
generator state, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from service.datasets.records import CLASSES

NORMAL, BENIGN, MALIGNANT = (CLASSES.index(name) for name in ("normal", "benign", "malignant"))

#: Echogenicity of each tissue relative to the skin line, in dB (scatter intensity).
_SKIN_DB = 6.0
_RETRO_FAT_DB = -17.0
_ANECHOIC_DB = -45.0
#: The echo level shown as white: bright speckle of the skin line just saturates.
_DISPLAY_TOP_DB = 11.0


@dataclass(frozen=True)
class Anatomy:
    """One breast's layers (depths as fractions of the image height) and scanner gain."""

    skin: float
    fat: float
    gland: float
    muscle: float
    wave: float
    fat_db: float
    gland_db: float
    muscle_db: float
    ligaments: float
    attenuation_db: float
    tgc_db: float
    focus: float
    dynamic_range_db: float
    gain_db: float


@dataclass(frozen=True)
class Scanner:
    """How a probe and its preset differ from the one the phantom's defaults describe.

    What a probe swap changes: a lower centre frequency makes the point-spread
    function, hence the speckle grain, larger (``speckle_scale``); the new preset
    brings its own display dynamic range and overall gain (added to each
    patient's). The default changes nothing."""

    speckle_scale: float = 1.0
    dynamic_range_db: float = 0.0
    gain_db: float = 0.0


#: The scanner of the training images (and of every caller that names none).
DEFAULT_SCANNER = Scanner()


@dataclass(frozen=True)
class Lesion:
    """One focal lesion; the fields are the BI-RADS ultrasound descriptors made numeric.

    ``width``/``height`` are full axes as fractions of the image size; ``harmonics``
    and ``phases`` perturb the radius (irregular / lobulated margin); ``spicules``
    rows are (angle, length, angular width); ``margin_px`` is the edge blur
    (circumscribed vs indistinct); ``halo_db`` an echogenic rim outside the margin;
    ``posterior_db`` enhancement (> 0) or shadowing (< 0) below the lesion.
    """

    cx: float
    cy: float
    width: float
    height: float
    tilt: float
    harmonics: np.ndarray
    phases: np.ndarray
    spicules: np.ndarray
    echo_db: float
    heterogeneity_db: float
    margin_px: float
    capsule_db: float
    halo_db: float
    halo_px: float
    posterior_db: float
    edge_shadow_db: float
    calcifications: int


@dataclass(frozen=True)
class Mimic:
    """A normal structure that can look lesion-like (fat lobule or duct); no mask."""

    cx: float
    cy: float
    width: float
    height: float
    contrast_db: float


@dataclass(frozen=True)
class Patient:
    """Everything that stays the same between the views of one synthetic patient."""

    label: int
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    mimics: tuple[Mimic, ...]


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    skin = rng.uniform(0.025, 0.045)
    fat = skin + rng.uniform(0.10, 0.30)
    gland = fat + rng.uniform(0.25, 0.45)
    return Anatomy(
        skin=skin,
        fat=fat,
        gland=gland,
        muscle=gland + rng.uniform(0.03, 0.08),
        wave=rng.uniform(0.01, 0.04),
        fat_db=rng.uniform(-20.0, -15.0),
        gland_db=rng.uniform(-8.0, -4.0),
        muscle_db=rng.uniform(-14.0, -10.0),
        ligaments=rng.uniform(4.0, 9.0),
        attenuation_db=rng.uniform(12.0, 22.0),
        tgc_db=rng.uniform(6.0, 16.0),
        focus=rng.uniform(0.35, 0.65),
        dynamic_range_db=rng.uniform(40.0, 48.0),
        gain_db=rng.uniform(-2.0, 3.0),
    )


def sample_lesion(rng: np.random.Generator, label: int, anatomy: Anatomy, scale: float = 1.0) -> Lesion:
    """Sample a lesion whose descriptors follow its class, with deliberate overlap.

    Benign (fibroadenoma, cyst): oval/round, parallel (wider than tall),
    circumscribed, homogeneous hypo- or anechoic, posterior enhancement.
    Malignant (carcinoma): irregular or spiculated, non-parallel (taller than wide),
    indistinct margin with an echogenic halo, heterogeneous, posterior shadowing,
    microcalcifications. About a quarter of lesions are atypical: each descriptor
    group is then drawn from the other class with probability one half (the BI-RADS
    3/4a grey zone), and sizes overlap, so the task is learnable but not trivial.
    """
    atypical = rng.random() < 0.25

    def malignant_look() -> bool:
        """One descriptor group's look: its class's, or a coin flip when atypical."""
        if atypical and rng.random() < 0.5:
            return label != MALIGNANT
        return label == MALIGNANT

    # Per descriptor group: does this lesion look malignant in it?
    tall, irregular, heterogeneous, shadowing = (malignant_look() for _ in range(4))
    size = np.exp(rng.uniform(np.log(0.09), np.log(0.36))) * scale
    if tall:  # orientation: non-parallel
        aspect = rng.uniform(0.85, 1.5)
    else:
        aspect = rng.uniform(0.4, 0.85) if rng.random() < 0.85 else rng.uniform(0.85, 1.0)
    width = size / np.sqrt(aspect)
    height = size * np.sqrt(aspect)

    harmonics = np.zeros(10, np.float32)
    phases = rng.uniform(0, 2 * np.pi, 10).astype(np.float32)
    spicules = np.zeros((0, 3), np.float32)
    if irregular:  # shape and margin: irregular, angular, spiculated
        harmonics[2:] = rng.uniform(0.02, 0.11, 8) / np.sqrt(np.arange(2, 10) / 2)
        if rng.random() < 0.55:
            n = int(rng.integers(5, 15))
            spicules = np.stack(
                [
                    rng.uniform(0, 2 * np.pi, n),
                    rng.uniform(0.2, 0.7, n),
                    rng.uniform(0.08, 0.16, n),
                ],
                axis=1,
            ).astype(np.float32)
        margin_px = rng.uniform(1.2, 3.0)
        halo_db = rng.uniform(3.0, 9.0) if rng.random() < 0.7 else 0.0
        capsule_db = 0.0
    else:  # oval / round, circumscribed, sometimes gently lobulated
        harmonics[2:4] = rng.uniform(0.0, 0.05, 2)
        if rng.random() < 0.2:
            harmonics[2:4] += rng.uniform(0.04, 0.10, 2)
        margin_px = rng.uniform(0.5, 1.5)
        halo_db = 0.0
        capsule_db = rng.uniform(0.0, 6.0)

    cyst = not heterogeneous and label == BENIGN and rng.random() < 0.3
    if cyst:
        echo_db, heterogeneity_db = _ANECHOIC_DB + rng.uniform(0, 8), 0.5
    elif heterogeneous:  # echo pattern: heterogeneous, markedly hypoechoic to fat
        echo_db, heterogeneity_db = anatomy.fat_db - rng.uniform(5.0, 14.0), rng.uniform(3.0, 7.0)
    else:  # homogeneous, hypoechoic to fat (fibroadenoma)
        echo_db, heterogeneity_db = anatomy.fat_db - rng.uniform(3.0, 10.0), rng.uniform(0.5, 2.5)
    if rng.random() < 0.12:  # a subtle lesion, only a little darker than the gland: hard case
        echo_db = anatomy.gland_db - rng.uniform(6.0, 12.0)

    if shadowing:  # posterior features
        posterior_db = -rng.uniform(5.0, 16.0) if rng.random() < 0.75 else rng.uniform(-2.0, 3.0)
    else:
        posterior_db = rng.uniform(2.0, 8.0) if rng.random() < 0.75 else rng.uniform(-2.0, 1.0)
    if cyst:
        posterior_db = rng.uniform(6.0, 10.0)
    edge_shadow_db = -rng.uniform(4.0, 9.0) if not irregular and rng.random() < 0.3 else 0.0

    margin_y = height / 2 + 0.02
    top, bottom = anatomy.fat - 0.03 + margin_y, min(anatomy.gland, 0.85) - margin_y
    cy = rng.uniform(top, max(top, bottom))
    return Lesion(
        cx=rng.uniform(0.2, 0.8),
        cy=cy,
        width=width,
        height=height,
        tilt=rng.uniform(-0.3, 0.3),
        harmonics=harmonics,
        phases=phases,
        spicules=spicules,
        echo_db=echo_db,
        heterogeneity_db=heterogeneity_db,
        margin_px=margin_px,
        capsule_db=capsule_db,
        halo_db=halo_db,
        halo_px=rng.uniform(2.0, 6.0),
        posterior_db=posterior_db,
        edge_shadow_db=edge_shadow_db,
        calcifications=int(rng.integers(2, 9)) if heterogeneous and rng.random() < 0.4 else 0,
    )


def sample_mimics(rng: np.random.Generator, anatomy: Anatomy) -> tuple[Mimic, ...]:
    """Fat lobules in the fat layer and ducts in the gland: normal, yet lesion-like."""
    mimics = []
    for _ in range(int(rng.poisson(1.0))):
        w = rng.uniform(0.08, 0.22)
        mimics.append(
            Mimic(
                cx=rng.uniform(0.1, 0.9),
                cy=rng.uniform(anatomy.skin + 0.04, anatomy.fat),
                width=w,
                height=w * rng.uniform(0.35, 0.7),
                contrast_db=-rng.uniform(2.0, 5.0),
            )
        )
    if rng.random() < 0.3:
        mimics.append(
            Mimic(
                cx=rng.uniform(0.2, 0.8),
                cy=rng.uniform(anatomy.fat + 0.05, anatomy.gland - 0.05),
                width=rng.uniform(0.2, 0.45),
                height=rng.uniform(0.02, 0.05),
                contrast_db=-rng.uniform(6.0, 12.0),
            )
        )
    return tuple(mimics)


def sample_patient(rng: np.random.Generator, label: int) -> Patient:
    """One synthetic patient: anatomy, lesion(s) for benign/malignant (sometimes a
    second, smaller one, written as BUSI's ``_mask_1``), and normal mimics."""
    anatomy = sample_anatomy(rng)
    lesions: list[Lesion] = []
    if label != NORMAL:
        lesions.append(sample_lesion(rng, label, anatomy))
        if rng.random() < 0.15:
            second = sample_lesion(rng, label, anatomy, scale=0.55)
            first = lesions[0]
            # Keep the second lesion beside the first, not on top of it.
            side = 1.0 if first.cx < 0.5 else -1.0
            cx = first.cx + side * (first.width / 2 + second.width / 2 + 0.05)
            lesions.append(replace(second, cx=float(np.clip(cx, 0.08, 0.92))))
    return Patient(label=label, anatomy=anatomy, lesions=tuple(lesions), mimics=sample_mimics(rng, anatomy))


def jitter_view(patient: Patient, rng: np.random.Generator) -> Patient:
    """Another view of the same breast: probe moved and turned a little, so views of
    one patient are alike but not duplicates (what group splitting must respect)."""
    anatomy = patient.anatomy
    shift = rng.uniform(-0.02, 0.02)
    anatomy = replace(
        anatomy,
        skin=anatomy.skin + rng.uniform(-0.005, 0.005),
        fat=anatomy.fat + shift,
        gland=anatomy.gland + shift,
        muscle=anatomy.muscle + shift,
        gain_db=anatomy.gain_db + rng.uniform(-1.5, 1.5),
        focus=anatomy.focus + rng.uniform(-0.05, 0.05),
    )
    lesions = tuple(
        replace(
            lesion,
            cx=lesion.cx + rng.uniform(-0.08, 0.08),
            cy=lesion.cy + shift + rng.uniform(-0.02, 0.02),
            width=lesion.width * rng.uniform(0.85, 1.15),
            height=lesion.height * rng.uniform(0.9, 1.1),
            tilt=lesion.tilt + rng.uniform(-0.15, 0.15),
            phases=lesion.phases + rng.uniform(-0.4, 0.4, lesion.phases.shape).astype(np.float32),
        )
        for lesion in patient.lesions
    )
    return replace(patient, anatomy=anatomy, lesions=lesions)


def render(
    patient: Patient, rng: np.random.Generator, size: int = 256, scanner: Scanner = DEFAULT_SCANNER
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Form the B-mode image of ``patient`` as ``scanner`` shows it: uint8 size x
    size, plus one bool mask per lesion. The scanner draws nothing from ``rng``, so
    one generator state gives the same breast and speckle on any scanner."""
    if size < 32:
        raise ValueError(f"image size {size} is too small for a phantom (minimum 32 pixels)")
    if scanner.speckle_scale <= 0 or patient.anatomy.dynamic_range_db + scanner.dynamic_range_db <= 0:
        raise ValueError(f"scanner {scanner} needs a positive speckle scale and dynamic range")
    px = size / 256.0  # scale of pixel-sized features (PSF, margins) relative to 256
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    echo_db = _tissue_db(patient.anatomy, rng, y, x, size, px)
    for mimic in patient.mimics:
        d = _ellipse_distance(x, y, mimic.cx, mimic.cy, mimic.width, mimic.height, size)
        echo_db += mimic.contrast_db * _sigmoid(-d / (3.0 * px))
    masks = []
    for lesion in patient.lesions:
        echo_db, mask = _add_lesion(echo_db, lesion, rng, y, x, size, px)
        masks.append(mask)
    anatomy = replace(
        patient.anatomy,
        gain_db=patient.anatomy.gain_db + scanner.gain_db,
        dynamic_range_db=patient.anatomy.dynamic_range_db + scanner.dynamic_range_db,
    )
    echo_db += _gain_db(anatomy, y)
    envelope = _speckle(echo_db, rng, px * scanner.speckle_scale)
    return _log_compress(envelope, anatomy), masks


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def _gaussian_transfer(shape: tuple[int, int], sigma_y: float, sigma_x: float, real: bool) -> np.ndarray:
    """Fourier transform of a unit-sum Gaussian (rfft layout when ``real``)."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = (np.fft.rfftfreq if real else np.fft.fftfreq)(shape[1]).astype(np.float32)[None, :]
    return np.exp(-2 * np.pi**2 * ((sigma_y * fy) ** 2 + (sigma_x * fx) ** 2))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_y: float, sigma_x: float) -> np.ndarray:
    """Low-passed white noise, zero mean, unit std. Broad fields are made at a coarser
    grid and resized bilinearly: the same look for a fraction of the FFT work."""
    factor = max(1, int(min(sigma_y, sigma_x) // 2))
    coarse = (-(-shape[0] // factor), -(-shape[1] // factor))
    transfer = _gaussian_transfer(coarse, sigma_y / factor, sigma_x / factor, real=True)
    noise = rng.standard_normal(coarse, dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=coarse).astype(np.float32)
    if factor > 1:
        resized = Image.fromarray(field, mode="F").resize(shape[::-1], Image.Resampling.BILINEAR)
        field = np.asarray(resized, dtype=np.float32)
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def _boundary(rng: np.random.Generator, x: np.ndarray, depth: float, amplitude: float) -> np.ndarray:
    """A gently undulating layer boundary: depth + a few random sinusoids across x."""
    freqs = rng.uniform(0.5, 2.5, 3).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    weights = rng.dirichlet(np.ones(3)).astype(np.float32)
    wave = sum(w * np.sin(2 * np.pi * f * x + p) for w, f, p in zip(weights, freqs, phases, strict=True))
    return (depth + amplitude * wave).astype(np.float32)


def _tissue_db(
    anatomy: Anatomy, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, px: float
) -> np.ndarray:
    """The layered background echogenicity (dB) with texture, ligaments and striations."""
    edge = 1.5 / size
    row = x[:1]  # boundaries depend on x only: compute one row, broadcast down
    b_skin = _boundary(rng, row, anatomy.skin, anatomy.wave * 0.2)
    b_fat = _boundary(rng, row, anatomy.fat, anatomy.wave)
    b_gland = _boundary(rng, row, anatomy.gland, anatomy.wave * 1.5)
    b_muscle = _boundary(rng, row, anatomy.muscle, anatomy.wave)
    texture = _smooth_field(rng, y.shape, 6.0 * px, 10.0 * px)
    lines = _smooth_field(rng, y.shape, 12.0 * px, 18.0 * px)
    ligament = np.exp(-((lines / 0.08) ** 2)) * anatomy.ligaments
    fat = anatomy.fat_db + 2.0 * texture + ligament
    gland = anatomy.gland_db + 3.0 * texture + 0.5 * ligament
    stripes = np.cos(2 * np.pi * (y * size / (10.0 * px) + 0.3 * texture + 3.0 * x * anatomy.wave))
    muscle = anatomy.muscle_db + 9.0 * np.maximum(stripes, 0.0) ** 2 - 4.0
    layers = [(b_skin, fat), (b_fat, gland), (b_gland, np.full_like(y, _RETRO_FAT_DB)), (b_muscle, muscle)]
    echo = np.full_like(y, _SKIN_DB)
    for boundary, tissue in layers:
        weight = _sigmoid((y - boundary) / edge)
        echo = echo * (1 - weight) + tissue * weight
    return echo.astype(np.float32)


def _ellipse_distance(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, width: float, height: float, size: int
) -> np.ndarray:
    """Approximate signed distance (pixels) to an axis-aligned ellipse; < 0 inside."""
    a, b = width * size / 2, height * size / 2
    rho = np.sqrt(((x - cx) * size / a) ** 2 + ((y - cy) * size / b) ** 2)
    return (rho - 1.0) * np.sqrt(a * b)


def _lesion_window(lesion: Lesion, size: int, px: float) -> tuple[slice, slice]:
    """The rows and columns the lesion, its blurred margin and halo can reach, so the
    per-pixel margin maths runs on a small window instead of the whole image."""
    spike = float(lesion.spicules[:, 1].max()) if len(lesion.spicules) else 0.0
    reach = (
        max(lesion.width, lesion.height) * size / 2 * (1 + lesion.harmonics.sum() + spike)
        + (6 * lesion.margin_px + 3 * lesion.halo_px + 4) * px
    )
    cy, cx = lesion.cy * size, lesion.cx * size
    return (
        slice(max(0, int(cy - reach)), min(size, int(cy + reach) + 1)),
        slice(max(0, int(cx - reach)), min(size, int(cx + reach) + 1)),
    )


def _lesion_distance(lesion: Lesion, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Signed distance (pixels, approximate) to the lesion margin: an ellipse whose
    radius is perturbed by harmonics (lobulation/irregularity) and spikes (spicules)."""
    dx, dy = (x - lesion.cx) * size, (y - lesion.cy) * size
    c, s = np.cos(lesion.tilt), np.sin(lesion.tilt)
    u, v = c * dx + s * dy, -s * dx + c * dy
    a, b = lesion.width * size / 2, lesion.height * size / 2
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    phi = np.arctan2(v / b, u / a)
    return (rho - _radius(lesion, phi)) * np.float32(np.sqrt(a * b))


def _radius(lesion: Lesion, phi: np.ndarray) -> np.ndarray:
    """The margin's radius (1 = the ellipse) at polar angle ``phi`` of the unit-circle
    frame: harmonics lobulate it, spicules spike it."""
    radius = np.ones_like(phi)
    for k in np.flatnonzero(lesion.harmonics):
        radius += lesion.harmonics[k] * np.cos(k * phi + lesion.phases[k])
    for angle, length, spread in lesion.spicules:
        gap = np.mod(phi - angle + np.pi, 2 * np.pi) - np.pi
        radius += length * np.exp(-((gap / spread) ** 2))
    return radius


def lesion_outline(lesion: Lesion, size: int, points: int = 4096) -> np.ndarray:
    """The lesion's true margin as ``points`` (x, y) points in pixels of a ``size``
    image, where pixel (row r, column c) is the point (c, r): its mask holds exactly
    the pixels inside. What a measurement on the mask is judged against."""
    phi = np.linspace(-np.pi, np.pi, points, endpoint=False, dtype=np.float32)
    radius = _radius(lesion, phi)
    a, b = lesion.width * size / 2, lesion.height * size / 2
    u, v = a * radius * np.cos(phi), b * radius * np.sin(phi)
    c, s = np.cos(lesion.tilt), np.sin(lesion.tilt)
    return np.stack([lesion.cx * size + c * u - s * v, lesion.cy * size + s * u + c * v], axis=1).astype(np.float64)


def _add_lesion(
    echo_db: np.ndarray, lesion: Lesion, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int, px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one lesion into the echo map (in place) and return it with the lesion's mask."""
    window = _lesion_window(lesion, size, px)
    d = _lesion_distance(lesion, y[window], x[window], size)
    mask = np.zeros(echo_db.shape, bool)
    mask[window] = d < 0
    inside = _sigmoid(-d / (lesion.margin_px * px))
    local = echo_db[window]
    interior = lesion.echo_db + lesion.heterogeneity_db * _smooth_field(rng, d.shape, 2.5 * px, 3.0 * px)
    local[...] = local * (1 - inside) + interior * inside
    if lesion.capsule_db:
        local += lesion.capsule_db * np.exp(-((d / (1.2 * px)) ** 2))
    if lesion.halo_db:
        outside = np.maximum(d, 0.0)
        local += lesion.halo_db * np.exp(-((outside / (lesion.halo_px * px)) ** 2)) * (1 - inside)
    if lesion.calcifications:
        rows, cols = np.nonzero(d < 0)
        if rows.size:
            pick = rng.integers(0, rows.size, lesion.calcifications)
            local[rows[pick], cols[pick]] = rng.uniform(4.0, 10.0, pick.size)
    echo_db += _posterior_db(lesion, mask, y, size, px)
    return echo_db, mask


def _posterior_db(lesion: Lesion, mask: np.ndarray, y: np.ndarray, size: int, px: float) -> np.ndarray:
    """Enhancement or shadowing in the columns behind the lesion, strongest where the
    lesion is thickest, starting at its back wall and fading with depth; plus thin
    lateral edge shadows (refraction at a smooth capsule)."""
    thickness = mask.sum(axis=0).astype(np.float32)
    cols = np.flatnonzero(thickness)
    if cols.size == 0:
        return np.zeros_like(y)
    back = size - 1 - np.argmax(mask[::-1], axis=0)
    back = np.interp(np.arange(size), cols, back[cols]).astype(np.float32) / size
    kernel = np.exp(-0.5 * (np.arange(-8, 9) / (2.5 * px)) ** 2)
    profile = np.convolve(np.sqrt(thickness / thickness.max()), kernel / kernel.sum(), mode="same")
    depth_below = y - back[None, :]
    fade = _sigmoid(depth_below * size / (2.0 * px)) * np.exp(-np.maximum(depth_below, 0) / 0.6)
    effect = lesion.posterior_db * profile[None, :] * fade
    if lesion.edge_shadow_db:
        xs = np.arange(size, dtype=np.float32)
        edges = sum(np.exp(-0.5 * ((xs - c) / (1.5 * px)) ** 2) for c in (cols[0], cols[-1]))
        effect += lesion.edge_shadow_db * edges[None, :] * fade
    return effect.astype(np.float32)


def _gain_db(anatomy: Anatomy, y: np.ndarray) -> np.ndarray:
    """Round-trip attenuation with depth, partly compensated by TGC, and a focal zone."""
    focal = 2.0 * np.exp(-(((y - anatomy.focus) / 0.15) ** 2))
    return (anatomy.tgc_db - anatomy.attenuation_db) * y + focal + anatomy.gain_db


def _fft2(x: np.ndarray) -> np.ndarray:
    """Forward 2-D FFT through the inverse one: fft2(x) = N conj(ifft2(conj(x))).
    numpy 2's forward complex64 FFT runs several times slower than its inverse here."""
    return np.conj(np.fft.ifft2(np.conj(x))) * np.float32(x.size)


def _speckle(echo_db: np.ndarray, rng: np.random.Generator, px: float, looks: int = 2) -> np.ndarray:
    """Envelope of scatterers (amplitude from the echo map) convolved with the PSF.

    The PSF is Gaussian, shorter axially than laterally as a linear probe's is, with
    unit energy so the mean intensity equals the echo map. ``looks`` independent
    speckle patterns are averaged in intensity, as spatial compounding (standard on
    breast scanners) does; it makes the speckle finer-grained and less contrasted."""
    amplitude = np.power(np.float32(10.0), echo_db / np.float32(20.0))
    sigma_y, sigma_x = 1.1 * px, 2.2 * px
    transfer = _gaussian_transfer(echo_db.shape, sigma_y, sigma_x, real=False)
    # A unit-sum Gaussian of std s has energy 1 / (2 sqrt(pi) s) per axis; complex
    # noise has variance 2: scale so the mean intensity equals the echo map.
    transfer *= np.float32(np.sqrt(4.0 * np.pi * sigma_y * sigma_x / 2.0))
    intensity = np.zeros(echo_db.shape, np.float32)
    for _ in range(looks):
        noise = rng.standard_normal((2, *echo_db.shape), dtype=np.float32)
        scatter = amplitude * (noise[0] + np.complex64(1j) * noise[1])
        intensity += np.abs(np.fft.ifft2(_fft2(scatter) * transfer)) ** 2
    return np.sqrt(intensity / looks).astype(np.float32)


def _log_compress(envelope: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Log-compress the envelope into the display dynamic range, 8 bits."""
    db = 20.0 * np.log10(envelope + 1e-6)
    scaled = (db - (_DISPLAY_TOP_DB - anatomy.dynamic_range_db)) / anatomy.dynamic_range_db
    return np.clip(np.round(255.0 * scaled), 0, 255).astype(np.uint8)
