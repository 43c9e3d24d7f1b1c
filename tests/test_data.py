"""Tests for the megads.data pre-training pipeline."""

import numpy as np
import pytest
import torch

from megads.data import (
    Blend,
    BlendedSampler,
    BlendedWindows,
    ByteTokenizer,
    BPETokenizer,
    CorruptDatasetError,
    GlobalBatchSampler,
    IndexedDataset,
    IndexedDatasetWriter,
    IndexPermutation,
    PackedWindows,
    build_or_load_corpus,
    iter_documents,
    load_tokenizer,
    micro_batches,
    stdlib_source_files,
    text_files_in,
    train_bpe_tokenizer,
)

SMALL_CORPUS_BYTES = 200_000
SAMPLES = [
    "def f(x):\n    return x + 1  # plain ASCII\n",
    "héllo wörld, 日本語, emoji 🙂, tabs\tand  double  spaces\r\n",
    "a file that mentions <|endoftext|> literally",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    documents = iter_documents(stdlib_source_files(SMALL_CORPUS_BYTES))
    return BPETokenizer(train_bpe_tokenizer(documents, vocab_size=1000))


@pytest.fixture(params=["bpe", "byte"])
def tokenizer(request, bpe):
    return bpe if request.param == "bpe" else ByteTokenizer()


# --- corpus -----------------------------------------------------------------


def test_stdlib_source_files_are_sorted_and_bounded():
    files = stdlib_source_files(SMALL_CORPUS_BYTES)
    sizes = [f.stat().st_size for f in files]
    # Taken in order until the total reaches max_bytes: the last file crosses it.
    assert sum(sizes[:-1]) < SMALL_CORPUS_BYTES <= sum(sizes)
    assert files == stdlib_source_files(SMALL_CORPUS_BYTES)
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts)


def test_text_files_in(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ["z.txt", "b/c.md", "a.py", "skip.bin"]:
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in text_files_in(tmp_path)] == ["a.py", "b/c.md", "z.txt"]
    assert text_files_in(tmp_path / "z.txt") == [tmp_path / "z.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        text_files_in(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        text_files_in(tmp_path / "missing")


# --- tokenizer --------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_vocab_and_eos(tokenizer):
    assert tokenizer.eos_id == 0
    assert tokenizer.vocab_size <= 1000
    for text in SAMPLES[:3]:
        ids = tokenizer.encode(text)
        # eos never comes from text, even text that spells it out.
        assert 0 < min(ids) and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode([tokenizer.eos_id]) == "<|endoftext|>"


def test_bpe_vocab_bound():
    documents = iter_documents(stdlib_source_files(SMALL_CORPUS_BYTES))
    assert train_bpe_tokenizer(documents, vocab_size=300).get_vocab_size() == 300
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(["abc"], vocab_size=256)


def test_bpe_compresses_better_than_bytes(bpe):
    text = SAMPLES[0] * 10
    assert len(bpe.encode(text)) < 0.6 * len(ByteTokenizer().encode(text))


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert type(loaded) is type(tokenizer)
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)


# --- indexed dataset ----------------------------------------------------------


def _write(prefix, documents, dtype=np.uint16):
    writer = IndexedDatasetWriter(prefix, dtype)
    for doc in documents:
        writer.add_document(doc)
    writer.finalize()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_round_trip(tmp_path, dtype):
    documents = [[1, 2, 3], [], [65535 if dtype == np.uint16 else 100_000], list(range(50))]
    _write(tmp_path / "ds", documents, dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no .tmp left
    dataset = IndexedDataset(tmp_path / "ds")
    assert len(dataset) == len(documents)
    assert [dataset[i].tolist() for i in range(len(dataset))] == documents
    assert dataset[-1].tolist() == documents[-1]
    assert dataset.tokens.dtype == dtype
    assert dataset.tokens.tolist() == [t for doc in documents for t in doc]
    with pytest.raises(IndexError):
        dataset[len(documents)]


def test_indexed_rejects_ids_that_do_not_fit(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "ds", np.uint16)
    with pytest.raises(ValueError, match="token ids must be in"):
        writer.add_document([70_000])


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda b: b[:-4], "ds.idx", "truncated"),
        (lambda b: b[:10], "ds.idx", "too short"),
        (lambda b: b"XXXXXXXX" + b[8:], "ds.idx", "bad magic"),
        (lambda b: b[:-2], "ds.bin", "truncated"),
    ],
)
def test_indexed_corruption_is_reported_with_file_name(tmp_path, damage, file, message):
    _write(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    path = tmp_path / file
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptDatasetError, match=message) as error:
        IndexedDataset(tmp_path / "ds")
    assert str(path) in str(error.value)


def test_indexed_metadata_round_trip_and_damage(tmp_path):
    made = {"made_by": "a test", "tokenizer": {"sha256": "ab" * 32, "vocab_size": 300}, "note": "é"}
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        writer.add_documents(np.array([5, 6, 7, 8]), np.array([3, 1]))
        writer.add_document([9])
        assert (writer.document_count, writer.token_count, writer.max_token_id) == (3, 5, 9)
        writer.finalize(made)
    dataset = IndexedDataset(tmp_path / "ds")
    assert dataset.metadata == made
    assert [dataset[i].tolist() for i in range(3)] == [[5, 6, 7], [8], [9]]
    _write(tmp_path / "plain", [[1]])
    assert IndexedDataset(tmp_path / "plain").metadata == {}  # format 1, as the corpus cache writes it
    idx = tmp_path / "ds.idx"
    original = idx.read_bytes()
    idx.write_bytes(original[:32] + b"x" + original[33:])  # the JSON text starts at byte 32
    with pytest.raises(CorruptDatasetError, match=f"{idx}: the metadata block is not a JSON object"):
        IndexedDataset(tmp_path / "ds")
    idx.write_bytes(original[:24] + (10**9).to_bytes(8, "little") + original[32:])
    with pytest.raises(CorruptDatasetError, match="longer than the file"):
        IndexedDataset(tmp_path / "ds")


def test_indexed_writer_publishes_nothing_on_error(tmp_path):
    _write(tmp_path / "ds", [[1, 2, 3]])
    before = (tmp_path / "ds.bin").read_bytes(), (tmp_path / "ds.idx").read_bytes()
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
            writer.add_document([4, 5])
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temporary file left
    assert ((tmp_path / "ds.bin").read_bytes(), (tmp_path / "ds.idx").read_bytes()) == before


# --- cached corpus ----------------------------------------------------------


def test_build_or_load_corpus_caches_and_rebuilds(tmp_path):
    logs = []
    tokenizer, dataset = build_or_load_corpus("stdlib", 1000, "bpe", SMALL_CORPUS_BYTES, tmp_path, logs.append)
    assert len(logs) == 1 and "built corpus" in logs[0]
    files = stdlib_source_files(SMALL_CORPUS_BYTES)
    assert len(dataset) == len(files)
    first_text = next(iter_documents(files[:1]))
    assert dataset[0][-1] == tokenizer.eos_id  # every document ends with eos
    assert tokenizer.decode(dataset[0].tolist()) == first_text + "<|endoftext|>"

    tokenizer2, dataset2 = build_or_load_corpus("stdlib", 1000, "bpe", SMALL_CORPUS_BYTES, tmp_path, logs.append)
    assert len(logs) == 2 and "cached corpus" in logs[1]
    assert np.array_equal(dataset2.tokens, dataset.tokens)
    assert tokenizer2.encode(first_text) == tokenizer.encode(first_text)

    build_or_load_corpus("stdlib", 1000, "bpe", SMALL_CORPUS_BYTES // 2, tmp_path, logs.append)
    assert len(logs) == 3 and "built corpus" in logs[2]
    # Two entries, and no staging directory left behind.
    assert len(list(tmp_path.iterdir())) == 2


def test_build_or_load_corpus_user_files_byte_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document")
    (corpus / "b.md").write_text("second, ünïcode")
    logs = []
    tokenizer, dataset = build_or_load_corpus(str(corpus), 512, "byte", 10_000, tmp_path / "cache", logs.append)
    assert [tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))] == [
        "first document<|endoftext|>",
        "second, ünïcode<|endoftext|>",
    ]
    # Editing an input gives a new cache entry rather than stale tokens.
    (corpus / "a.txt").write_text("first document, edited")
    _, dataset = build_or_load_corpus(str(corpus), 512, "byte", 10_000, tmp_path / "cache", logs.append)
    assert tokenizer.decode(dataset[0].tolist()) == "first document, edited<|endoftext|>"
    assert [line.split()[1] for line in logs] == ["built", "built"]


# --- packing and sampling -----------------------------------------------------


def test_packed_windows():
    windows = PackedWindows(np.arange(50, dtype=np.uint16), seq_length=7)
    assert len(windows) == 6  # 50 // 8, the remainder is dropped
    assert windows[1].dtype == torch.long
    assert windows[1].tolist() == list(range(8, 16))
    with pytest.raises(ValueError, match="shorter than one window"):
        PackedWindows(np.arange(7), seq_length=7)


def test_packed_windows_split():
    train, valid = PackedWindows(np.arange(100), seq_length=9).split(0.2)
    assert (len(train), len(valid)) == (8, 2)
    assert valid[0].tolist() == list(range(80, 90))
    with pytest.raises(ValueError, match="too few"):
        PackedWindows(np.arange(10), seq_length=9).split(0.5)


def test_sampler_is_a_function_of_seed_and_step():
    a = GlobalBatchSampler(num_windows=10, global_batch_size=4, seed=1)
    b = GlobalBatchSampler(num_windows=10, global_batch_size=4, seed=1)
    # A fresh sampler asked for a late step agrees with one that walked there.
    walked = [a.indices(step) for step in range(8)]
    assert b.indices(7) == walked[7]
    assert GlobalBatchSampler(10, 4, seed=2).indices(0) != walked[0]


def test_sampler_covers_each_epoch_exactly_once():
    sampler = GlobalBatchSampler(num_windows=12, global_batch_size=4, seed=0)
    epoch0 = [sampler.indices(step) for step in range(3)]
    epoch1 = [sampler.indices(step) for step in range(3, 6)]
    assert sorted(i for batch in epoch0 for i in batch) == list(range(12))
    assert sorted(i for batch in epoch1 for i in batch) == list(range(12))
    assert epoch0 != epoch1  # a fresh permutation each epoch


def test_sampler_batch_straddles_epochs():
    sampler = GlobalBatchSampler(num_windows=10, global_batch_size=4, seed=3)
    stream = [i for step in range(5) for i in sampler.indices(step)]  # 20 = two epochs
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert len(sampler.indices(2)) == 4  # positions 8..11 cross the epoch boundary


def test_micro_batches_shard_the_global_batch():
    windows = PackedWindows(np.arange(1000), seq_length=7)
    sampler = GlobalBatchSampler(len(windows), global_batch_size=12, seed=0)
    step = 5
    shards = [micro_batches(windows, sampler, step, rank, 3, 2) for rank in range(3)]
    inputs, labels = [], []
    for shard in shards:
        assert len(shard) == 2
        for input_ids, label_ids in shard:
            assert input_ids.shape == label_ids.shape == (2, 7)
            assert torch.equal(input_ids[:, 1:], label_ids[:, :-1])
            inputs.append(input_ids)
            labels.append(label_ids)
    expected = torch.stack([windows[i] for i in sampler.indices(step)])
    assert torch.equal(torch.cat(inputs), expected[:, :-1])
    assert torch.equal(torch.cat(labels), expected[:, 1:])


def test_micro_batches_divisibility_error():
    windows = PackedWindows(np.arange(1000), seq_length=7)
    sampler = GlobalBatchSampler(len(windows), global_batch_size=12, seed=0)
    with pytest.raises(ValueError, match="global_batch_size 12 is not divisible by dp_size 4 \\* micro_batch_size 2"):
        micro_batches(windows, sampler, 0, 0, 4, 2)


# --- blending several datasets ---------------------------------------------


def test_index_permutation_is_a_seeded_bijection():
    for n in (1, 2, 3, 10, 257, 4096, 10_001):
        assert sorted(IndexPermutation(n, (1, 0, 0))(np.arange(n)).tolist()) == list(range(n))
    first, again, other = (IndexPermutation(1000, key)(np.arange(1000)) for key in ((7, 0, 0), (7, 0, 0), (7, 0, 1)))
    assert (first == again).all() and (first != other).any()
    assert IndexPermutation(10**12, (1,))(np.array([0, 10**12 - 1])).max() < 10**12  # no table of 10^12 entries
    with pytest.raises(IndexError):
        IndexPermutation(5, (1,))([5])


def test_blend_proportions_are_the_weights():
    blend = Blend([0.7, 0.2, 0.1])
    for n in range(1, 2000):
        counts = blend.counts(n)
        assert sum(counts) == n and all(abs(c - w * n) < 1.5 for c, w in zip(counts, blend.weights))
    # each dataset's samples are its 0th, 1st, 2nd, ... in stream order
    located = [blend.locate(g) for g in range(500)]
    for dataset in range(3):
        picks = [j for d, j in located if d == dataset]
        assert picks == list(range(len(picks)))
    sampler = BlendedSampler(Blend([3, 1]), [50, 7], global_batch_size=8, seed=5)
    drawn = [d for step in range(250) for d, _ in sampler.indices(step)]
    assert drawn.count(0) / len(drawn) == pytest.approx(0.75, abs=0.005)
    with pytest.raises(ValueError, match="positive"):
        Blend([1.0, 0.0])


def test_sampler_visits_each_window_once_per_epoch():
    sampler = BlendedSampler(Blend([0.5, 0.5]), [40, 10], global_batch_size=10, seed=3)
    picks = [pair for step in range(8) for pair in sampler.indices(step)]  # 80 samples: 40 of each dataset
    assert sorted(w for d, w in picks if d == 0) == list(range(40))
    assert sorted(w for d, w in picks if d == 1) == sorted(list(range(10)) * 4)



def test_blended_micro_batches_shard_the_global_batch():
    windows = BlendedWindows([PackedWindows(np.arange(100), 4), PackedWindows(np.arange(1000, 1030), 4)])
    sampler = BlendedSampler(Blend([0.6, 0.4]), [len(w) for w in windows.datasets], global_batch_size=8, seed=0)
    for step in (0, 3, 50):
        whole = torch.cat([x for x, _ in micro_batches(windows, sampler, step, 0, 1, 4)])
        gathered = torch.cat([x for rank in range(4) for x, _ in micro_batches(windows, sampler, step, rank, 4, 2)])
        assert torch.equal(whole, gathered)
        assert ((whole >= 1000).sum(dim=1) % 4 == 0).all()  # each window lies in one dataset
