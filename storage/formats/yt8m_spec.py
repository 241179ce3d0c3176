"""YouTube-8M as the project reads it: sizes, quantization and the two levels, in one place.

Facts from ../shared/reference/yt8m_reference.md (section 2; top_k from sections 4 and 5), checked
against it by tests/test_yt8m_spec.py. Pure Python with neither numpy nor torch imported, so DAG files
and the CLI can import it cheaply; the two quantization functions work on the arrays they are given
through those arrays' own operators and methods.
"""

from typing import NamedTuple

from storage.errors import VtagError

RGB_DIM = 1024  # uint8 values a frame (frame level) or float32 means a video (video level)
AUDIO_DIM = 128
NUM_CLASSES = 3862  # the 2nd edition's vocabulary: labels are 0..3861
MAX_FRAMES = 300  # Google's readers cap a video here (one frame a second)
TOP_K = 20  # GAP@20, and the labels a video keeps in Google's inference CSV
# Google's ids are 4 characters (test split) to 11 (YouTube ids); the catalogue's columns are this wide, and
# decoders refuse a longer id: SQLite would store it as is and PostgreSQL refuse it mid-transaction.
MAX_ID_LENGTH = 32
# Text with a NUL byte: PostgreSQL's text types refuse it mid-transaction, SQLite stores it; every input that
# reaches a text column (ids, vocabulary fields, query parameters) is refused on both, with this reason.
NUL_REFUSED = "PostgreSQL cannot store one, so neither database takes it"

# Google's feature extractor clips features to [QUANTIZE_MIN, QUANTIZE_MAX] and spreads them over 0..255.
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0
QUANTIZE_LEVELS = 255
# utils.py Dequantize: x = q * 4/255 + 4/512 - 2. The 4/512 is just under half a step (4/255), so every
# level dequantizes to a value that quantizes back to it.
DEQUANTIZE_SCALE = (QUANTIZE_MAX - QUANTIZE_MIN) / QUANTIZE_LEVELS
DEQUANTIZE_OFFSET = (QUANTIZE_MAX - QUANTIZE_MIN) / 512 + QUANTIZE_MIN


def quantize(features):
    """Float features (a numpy float array, any shape) -> uint8 levels of the same shape:
    q = round((clip(x, -2, 2) + 2) * 255 / 4), ties to even, computed in the array's own dtype."""
    clipped = features.clip(QUANTIZE_MIN, QUANTIZE_MAX)
    return ((clipped - QUANTIZE_MIN) * float(QUANTIZE_LEVELS) / (QUANTIZE_MAX - QUANTIZE_MIN)).round().astype("uint8")


def dequantize(levels):
    """Quantized levels given as floats -> features in about [-2, 2], x = q * 4/255 + (4/512 - 2).

    `levels`: a number, or a float array: convert uint8 first (`q.astype(np.float32)`, `q.float()` for a
    torch tensor, on the device it is on); the arithmetic keeps that dtype, so float32 in, float32 out.
    """
    return levels * DEQUANTIZE_SCALE + DEQUANTIZE_OFFSET


class Feature(NamedTuple):
    """One modality of a level: its name in the records, the Parquet column and the batch, and its width."""

    name: str
    dim: int


class Level:
    """What one level's records, Parquet files and batches hold. Use FRAME and VIDEO, or level_spec(name)."""

    name: str
    rgb: Feature
    audio: Feature
    # True: a video is up to MAX_FRAMES quantized uint8 vectors a modality, padded to a batch's longest
    # with a mask; False: one float32 vector a modality.
    per_frame: bool
    columns: tuple[str, ...]  # the Parquet layout's columns, in schema order
    model_inputs: tuple[str, ...]  # the batch entries the level's model takes, in its forward's order

    @property
    def features(self) -> tuple[Feature, Feature]:
        """(rgb, audio): the order of every feature pair in records, columns, batches and models."""
        return self.rgb, self.audio

    @property
    def feature_names(self) -> tuple[str, str]:
        return self.rgb.name, self.audio.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FrameLevel(Level):
    """One SequenceExample a video: feature lists `rgb` and `audio`, one bytes value a frame."""

    name = "frame"
    rgb = Feature("rgb", RGB_DIM)
    audio = Feature("audio", AUDIO_DIM)
    per_frame = True
    columns = ("id", "labels", "num_frames", "rgb", "audio")
    model_inputs = ("rgb", "audio", "mask")


class VideoLevel(Level):
    """One Example a video: float lists `mean_rgb` and `mean_audio`, the means of its dequantized frames."""

    name = "video"
    rgb = Feature("mean_rgb", RGB_DIM)
    audio = Feature("mean_audio", AUDIO_DIM)
    per_frame = False
    columns = ("id", "labels", "mean_rgb", "mean_audio")
    model_inputs = ("mean_rgb", "mean_audio")


FRAME, VIDEO = FrameLevel(), VideoLevel()
_BY_NAME = {FRAME.name: FRAME, VIDEO.name: VIDEO}
LEVELS = tuple(_BY_NAME)  # ("frame", "video")


class UnknownLevelError(VtagError, ValueError):
    pass


def level_spec(name: str) -> Level:
    """The level called `name`; UnknownLevelError (a ValueError) naming it for anything else."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name, which is no level either
        raise UnknownLevelError(f"unknown YouTube-8M level {name!r}: it is frame or video") from None
