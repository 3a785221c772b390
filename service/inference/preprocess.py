"""Image bytes -> the model's input tensor, exactly as the training side prepares an image:
decode with Pillow, apply the EXIF orientation, convert to the model's colour mode, normalize the
ink where the metadata asks (stepnet.preprocessing, the function training uses), resize the
shorter side (bilinear), centre-crop, scale to [0, 1], normalize with the metadata's mean and std.

Runs in a thread pool (Pillow releases the GIL while decoding and resizing). Untrusted bytes are
refused early: the pixel count is read from the header before anything is decoded. A decode
within the limit still holds about 12 bytes per pixel at its peak (the decoded image and its
converted copies), which return_memory_to_the_os() makes sure goes back to the OS afterwards.
"""

import ctypes
import io
import logging
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

from service.core.errors import ImageTooLarge, InvalidImage, ServiceError
from service.repository.model_json import Preprocessing
from stepnet.preprocessing import normalize_ink

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")    # JPEG covers MPO (phone cameras)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter
LARGE_ALLOCATION = 4 << 20      # Pillow allocates images in blocks of up to 16 MiB
INK_HEADROOM = 8                # the ink is found at up to 8x the resize: it may fill little of the picture
log = logging.getLogger(__name__)
Image.init()                    # import the decoders now, not on the first request
Image.MAX_IMAGE_PIXELS = None   # the limit is STEPNET_MAX_IMAGE_PIXELS, checked below before decoding


class Preprocessor:
    """The pre-processing of one model, with its normalization folded into one multiply-add."""

    def __init__(self, spec: Preprocessing, max_pixels: int):
        self.spec, self.max_pixels = spec, max_pixels
        mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        self._scale = (1.0 / (255.0 * std))[:, None, None]      # (C, 1, 1): x/255 then (x - mean)/std
        self._offset = (-mean / std)[:, None, None]

    def __call__(self, data: bytes) -> np.ndarray:
        """(C, crop, crop) float32."""
        try:
            image = self._decode(data)
        except ServiceError:
            raise
        except Exception as exc:     # whatever untrusted bytes make a decoder raise is the client's
            raise InvalidImage(f"cannot decode the image: {exc}") from None
        pixels = np.asarray(image)                              # uint8 (H, W) or (H, W, 3)
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out = np.empty(chw.shape, np.float32)                   # (C, H, W), C-contiguous
        np.multiply(chw, self._scale, out=out)
        out += self._offset
        return out

    def _decode(self, data: bytes) -> Image.Image:
        spec = self.spec
        try:
            image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)   # reads the header only
        except Image.UnidentifiedImageError:
            raise InvalidImage(f"not an image in a supported format ({', '.join(FORMATS)})") from None
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit "
                                f"is {self.max_pixels} (STEPNET_MAX_IMAGE_PIXELS)")
        if width < 1 or height < 1:
            raise InvalidImage(f"the image is {width}x{height}")
        if image.format in ("JPEG", "MPO"):   # the decoder scales down by up to 8x (DCT): far less work
            target = spec.resize * (INK_HEADROOM if spec.ink_normalization is not None else 1)
            factor = target / min(width, height)
            image.draft(spec.colour_mode, (max(1, round(width * factor)), max(1, round(height * factor))))
        image.load()                 # decodes; raises on truncated data
        source_format = image.format
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        image = _to_mode(image, spec.colour_mode, source_format)
        if spec.ink_normalization is not None:
            image = _normalize_ink(image, spec.resize * INK_HEADROOM, spec.ink_normalization.margin)
        return _resize_and_crop(image, spec.resize, spec.crop)


def _normalize_ink(image: Image.Image, side: int, margin: float) -> Image.Image:
    """normalize_ink on at most about side x side pixels: a larger image is first reduced by an
    integer box filter (as the JPEG draft does), so that a 16 Mpx scan costs what a phone
    thumbnail does in time and memory (normalize_ink needs a mask the size of its input)."""
    factor = int(math.sqrt(image.width * image.height) // side)
    if factor > 1:
        image = image.reduce(factor)
    return Image.fromarray(normalize_ink(np.asarray(image), margin))


def _to_mode(image: Image.Image, mode: str, source_format: str | None) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB". 16-bit images keep their full range (Pillow's own convert
    clips them); 32-bit integer and float images (modes I and F, from TIFF), whose writers store
    8-bit, 16-bit or physical values alike, are scaled by their real range, from min(0, lowest)
    to the highest value; transparent pixels count as black, the digits' background."""
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and source_format == "PNG"):   # older Pillow
        image = Image.fromarray(np.rint(np.asarray(image, np.float32) / 257.0).clip(0, 255).astype(np.uint8))
    elif image.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, np.float64), posinf=0.0, neginf=0.0)
        low, high = min(0.0, float(values.min())), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(np.rint((values - low) * scale).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size)
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image if image.mode == mode else image.convert(mode)


def _resize_and_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """torchvision's Resize(resize) then CenterCrop(crop), on a Pillow image (the training path)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resize * long / short)
    size = (resize, new_long) if width <= height else (new_long, resize)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))   # pads with zeros where crop > size


def return_memory_to_the_os() -> None:
    """Serve large allocations (decoded images) from mmap, so that freeing them returns them to the
    OS. glibc otherwise raises its mmap threshold to the size of the first large block freed and
    keeps later ones in its heaps: RSS then stays at the peak of the largest decodes seen (measured
    in docs/hardening.md). Other C libraries: nothing to do, logged at debug level."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; large allocations are left to the C library")
        return
    if mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed; decoded images may stay in the heap")
