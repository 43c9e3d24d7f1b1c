"""User data: `megads preprocess` (JSONL / text -> PREFIX.bin/.idx), and training on a weighted blend of
preprocessed datasets (data.datasets): the sampler, the checks against the tokenizer and model, the CLI."""

import json

import numpy as np
import pytest
import tokenizers
import torch
import yaml
from tokenizers import decoders, models, pre_tokenizers, trainers

from megads.cli import main as cli_main
from megads.config import ConfigError, load_config
from megads.data import (BPETokenizer, ByteTokenizer, IndexedDataset, IndexedDatasetWriter, load_tokenizer,
                         tokenizer_file_digest, train_bpe_tokenizer)
from megads.data import preprocess as preprocess_module
from megads.data.prepared import DatasetError
from megads.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from megads.train.data import BlendedData
from test_train import TINY, read_metrics

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, 日本語 and emoji 🙂",
    "def f(x):\n    return x + 1\n",
    "a line that mentions <|endoftext|> literally",
    "pack my box with five dozen liquor jugs",
]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """The project's own byte-level BPE, saved as megads saves it (vocabulary under TINY's 512)."""
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    BPETokenizer(train_bpe_tokenizer(SENTENCES * 20, vocab_size=400)).save(path)
    return path


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    """A tokenizer.json from elsewhere: its end of document is "</s>" (id 1), not <|endoftext|>."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(SENTENCES * 20, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_jsonl(path, records):
    """`records`: dicts (one JSON line each) or raw bytes lines."""
    with open(path, "wb") as file:
        for record in records:
            file.write(record if isinstance(record, bytes) else json.dumps(record).encode())
            file.write(b"\n")
    return path


def documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- preprocess


MALFORMED = [
    (b"not json at all", "not JSON"),
    ({"txt": "wrong key"}, "no 'text' field"),
    ({"text": 5}, "'text' is int, not a string"),
    (b'{"text": "bad byte \xff here"}', "not UTF-8"),
    (b"", "blank line"),
    (b'["text"]', "not a JSON object"),
    (b'{"text": "\\ud800"}', "lone surrogate"),
]


def test_jsonl_malformed_lines_are_reported_with_line_numbers(tmp_path, bpe_file):
    records, expected_bad = [], []
    for i, sentence in enumerate(SENTENCES * 2):
        records.append({"text": sentence, "id": i})
        if i < len(MALFORMED):
            records.append(MALFORMED[i][0])
            expected_bad.append((len(records), MALFORMED[i][1]))
    records.append({"text": ""})  # an empty document: skipped and counted, not malformed
    source = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "out" / "ds"

    with pytest.raises(PreprocessError, match=rf"7 malformed lines .*the first: {source}:2: not JSON"):
        preprocess([str(source)], str(prefix), str(bpe_file), log=quiet)
    assert not (tmp_path / "out" / "ds.bin").exists() and not (tmp_path / "out" / "ds.idx").exists()
    assert leftovers(tmp_path / "out") == []

    lines = []
    report = preprocess([str(source)], str(prefix), str(bpe_file),
                        PreprocessOptions(skip_malformed=True, max_reported=5), log=lines.append)
    assert report.malformed_count == 7
    assert [(m.path, m.line) for m in report.malformed] == [(str(source), n) for n, _ in expected_bad[:5]]
    for m, (_, reason) in zip(report.malformed, expected_bad):
        assert reason in m.reason
    listing = "\n".join(lines)
    assert f"{source}:4: no 'text' field" in listing and "... and 2 more" in listing
    assert report.empty_documents == 1 and report.documents == 2 * len(SENTENCES)
    tokenizer = load_tokenizer(bpe_file)
    assert documents(prefix) == [tokenizer.encode(s) + [tokenizer.eos_id] for s in SENTENCES * 2]
    made = IndexedDataset(prefix).metadata
    assert made["tokenizer"] == {"file": "bpe.json", "sha256": tokenizer_file_digest(bpe_file),
                                 "vocab_size": tokenizer.vocab_size, "eod_token": "<|endoftext|>", "eod_id": 0}
    assert made["malformed_skipped"] == 7 and made["documents"] == 10
    assert made["max_token_id"] == max(max(d) for d in documents(prefix))


def test_json_key_option_and_a_byte_order_mark(tmp_path, bpe_file):
    source = write_jsonl(tmp_path / "in.jsonl", [b"\xef\xbb\xbf" + json.dumps({"content": SENTENCES[0]}).encode()]
                         + [{"content": s} for s in SENTENCES[1:]])
    preprocess([str(source)], str(tmp_path / "ds"), str(bpe_file), PreprocessOptions(json_key="content"), log=quiet)
    assert len(documents(tmp_path / "ds")) == len(SENTENCES)


def test_text_files_one_document_per_file_or_per_line(tmp_path, bpe_file):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text(SENTENCES[0] + "\n" + SENTENCES[1])
    (corpus / "sub" / "c.md").write_text(SENTENCES[2])
    (corpus / "a.txt").write_text("")  # an empty document, skipped and counted
    (corpus / ".hidden").write_text("left out")
    tokenizer = load_tokenizer(bpe_file)
    eod = tokenizer.eos_id

    report = preprocess([str(corpus)], str(tmp_path / "files"), str(bpe_file), log=quiet)
    assert (report.documents, report.empty_documents) == (2, 1)
    assert documents(tmp_path / "files") == [tokenizer.encode(SENTENCES[0] + "\n" + SENTENCES[1]) + [eod],
                                             tokenizer.encode(SENTENCES[2]) + [eod]]

    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"first line\r\n\nsecond line\nbad \xfe byte\nlast line without newline")
    with pytest.raises(PreprocessError, match=rf"{lines}:4: not UTF-8 \(byte 0xfe"):
        preprocess([str(lines)], str(tmp_path / "lines"), str(bpe_file), PreprocessOptions(document_per_line=True),
                   log=quiet)
    report = preprocess([str(lines)], str(tmp_path / "lines"), str(bpe_file),
                        PreprocessOptions(document_per_line=True, skip_malformed=True), log=quiet)
    assert (report.documents, report.empty_documents, report.malformed_count) == (3, 1, 1)
    assert documents(tmp_path / "lines") == [tokenizer.encode(t) + [eod] for t in
                                             ("first line", "second line", "last line without newline")]

    bad_file = corpus / "sub" / "d.txt"
    bad_file.write_bytes(b"fine\nstill fine\nnot \xc3(\n")
    with pytest.raises(PreprocessError, match=rf"{bad_file}:3: not UTF-8"):
        preprocess([str(corpus)], str(tmp_path / "files"), str(bpe_file), log=quiet)


def test_a_tokenizer_json_from_elsewhere_with_its_own_end_of_document(tmp_path, hf_file, bpe_file):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": s} for s in SENTENCES])
    with pytest.raises(PreprocessError, match=r"has no token '<\|endoftext\|>'.*--eod-token"):
        preprocess([str(source)], str(tmp_path / "ds"), str(hf_file), log=quiet)
    preprocess([str(source)], str(tmp_path / "ds"), str(hf_file), PreprocessOptions(eod_token="</s>"), log=quiet)
    tokenizer = tokenizers.Tokenizer.from_file(str(hf_file))
    assert documents(tmp_path / "ds") == [tokenizer.encode(s).ids + [1] for s in SENTENCES]
    made = IndexedDataset(tmp_path / "ds").metadata["tokenizer"]
    assert (made["eod_token"], made["eod_id"], made["vocab_size"]) == ("</s>", 1, tokenizer.get_vocab_size())
    assert made["sha256"] == tokenizer_file_digest(hf_file) != tokenizer_file_digest(bpe_file)
    with pytest.raises(PreprocessError, match="Tokenizer file .*missing.json does not exist"):
        preprocess([str(source)], str(tmp_path / "ds"), str(tmp_path / "missing.json"), log=quiet)


def test_parallel_workers_give_the_same_bytes(tmp_path, bpe_file):
    """Small tasks cut the line files mid-way; any number of workers writes the bytes one worker does, and
    malformed lines keep their line numbers across task boundaries."""
    rng = np.random.default_rng(0)
    inputs = []
    for n in range(3):
        records = [{"text": " ".join(rng.choice(SENTENCES, size=3))} for _ in range(60)]
        records[37 + n] = b"{broken"
        inputs.append(str(write_jsonl(tmp_path / f"part{n}.jsonl", records)))
    (tmp_path / "notes.txt").write_text(SENTENCES[4])
    inputs.append(str(tmp_path / "notes.txt"))
    runs = {}
    for name, options in (("one", PreprocessOptions(skip_malformed=True)),
                          ("two", PreprocessOptions(skip_malformed=True, workers=2, task_bytes=700))):
        report = preprocess(inputs, str(tmp_path / name), str(bpe_file), options, log=quiet)
        runs[name] = report
    assert [str(m) for m in runs["two"].malformed] == [str(m) for m in runs["one"].malformed] == [
        f"{inputs[n]}:{38 + n}: not JSON: Expecting property name enclosed in double quotes (column 2)"
        for n in range(3)]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()
    assert runs["two"].documents == 3 * 59 + 1


def test_an_interrupted_preprocess_leaves_the_previous_dataset(tmp_path, bpe_file, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": s} for s in SENTENCES * 10])
    prefix = tmp_path / "ds"
    preprocess([str(source)], str(prefix), str(bpe_file), log=quiet)
    before = {suffix: (tmp_path / f"ds{suffix}").read_bytes() for suffix in (".bin", ".idx")}

    run_task, calls = preprocess_module._run_task, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_task(task)

    monkeypatch.setattr(preprocess_module, "_run_task", interrupted)
    write_jsonl(source, [{"text": s} for s in SENTENCES * 20])
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(source)], str(prefix), str(bpe_file), PreprocessOptions(task_bytes=200), log=quiet)
    assert leftovers(tmp_path) == []
    assert {suffix: (tmp_path / f"ds{suffix}").read_bytes() for suffix in (".bin", ".idx")} == before


def test_progress_lines(tmp_path, bpe_file):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": s} for s in SENTENCES * 4])
    lines = []
    preprocess([str(source)], str(tmp_path / "ds"), str(bpe_file),
               PreprocessOptions(task_bytes=100, progress_every_s=0), log=lines.append)
    progress = [line for line in lines if "MB/s" in line]
    assert len(progress) > 3
    assert progress[-1].startswith(f"preprocess: {4 * len(SENTENCES)} documents, ")
    assert " tokens, " in progress[-1] and "(100%)" in progress[-1]


def test_cli_preprocess(tmp_path, bpe_file, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": s} for s in SENTENCES] + [b"oops"])
    args = ["preprocess", str(source), "--output", str(tmp_path / "ds"), "--tokenizer", str(bpe_file)]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("megads preprocess: 1 malformed line in the input") and f"{source}:6" in err
    assert len(err.strip().splitlines()) == 1
    assert cli_main(args + ["--skip-malformed", "--workers", "2"]) == 0
    assert len(documents(tmp_path / "ds")) == len(SENTENCES)
    assert cli_main(["preprocess", str(tmp_path / "nope.jsonl"), "--output", "x", "--tokenizer", str(bpe_file)]) == 1
    assert capsys.readouterr().err.strip() == f"megads preprocess: Input {tmp_path / 'nope.jsonl'} does not exist."


# ----------------------------------------------------------------------------- training on a blend


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, bpe_file):
    """Prefixes of two preprocessed datasets: prose from JSONL, and code one line a document."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(1)
    prose = write_jsonl(root / "prose.jsonl", [{"text": " ".join(rng.choice(SENTENCES[:2] + SENTENCES[4:], 4))}
                                               for _ in range(120)])
    code = root / "code.txt"
    code.write_text("\n".join(f"def f{i}(x):    return x * {i} + {i % 7}" for i in range(200)))
    preprocess([str(prose)], str(root / "prose"), str(bpe_file), log=quiet)
    preprocess([str(code)], str(root / "code"), str(bpe_file), PreprocessOptions(document_per_line=True), log=quiet)
    return root / "prose", root / "code"


def blend_overrides(tmp_path, bpe_file, prefixes, weights=(0.7, 0.3), *extra):
    datasets = [{"path": str(p), "weight": w} for p, w in zip(prefixes, weights)]
    return TINY + [f"data.datasets={json.dumps(datasets)}", f"data.tokenizer_file={bpe_file}",
                   f"train.output_dir={tmp_path / 'run'}", *extra]


def test_a_global_batch_is_the_same_under_dp_1_and_2_and_after_resume(tmp_path, bpe_file, two_datasets):
    cfg = load_config(None, blend_overrides(tmp_path, bpe_file, two_datasets))
    data = BlendedData.build(cfg, None, quiet)
    assert data.description.startswith("a blend of 2 datasets of 32-token windows: prose (70% of samples")
    resumed = BlendedData.build(cfg, None, quiet)  # a new process: no state carried over
    for step in (0, 1, 17, 1000):
        whole = torch.cat([inputs for inputs, _ in data.micro_batches(step, 0, 1, 2)])
        gathered = torch.cat([inputs for rank in (0, 1) for inputs, _ in data.micro_batches(step, rank, 2, 2)])
        again = torch.cat([inputs for inputs, _ in resumed.micro_batches(step, 0, 1, 4)])
        assert torch.equal(whole, gathered) and torch.equal(whole, again)
        assert whole.shape == (4, 32)


def test_training_on_a_blend_through_the_cli(tmp_path, bpe_file, two_datasets, capsys):
    config = tmp_path / "blend.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"datasets": [{"path": str(two_datasets[0]), "weight": 0.7},
                              {"path": str(two_datasets[1]), "weight": 0.3}],
                 "tokenizer_file": str(bpe_file)},
        "train": {"max_steps": 3, "eval_every": 2, "output_dir": str(tmp_path / "run")}}))
    assert cli_main(["train", str(config), "--set", *TINY, f"train.output_dir={tmp_path / 'run'}"]) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "valid_loss" in records[1] and np.isfinite(records[1]["valid_loss"])
    assert "a blend of 2 datasets" in capsys.readouterr().out

    missing = tmp_path / "gone"
    assert cli_main(["train", str(config), "--set", *TINY, f"train.output_dir={tmp_path / 'run2'}",
                     f"data.datasets=[{{path: {missing}}}]"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"megads train: configuration error: data.datasets[0].path names {missing}, but {missing}.idx does not "
        f"exist (make it with megads preprocess).")


def test_bad_datasets_are_one_sentence_naming_the_file_and_field(tmp_path, bpe_file, two_datasets):
    prose, code = two_datasets

    def build(prefixes, *extra, tokenizer=bpe_file, weights=(0.7, 0.3)):
        cfg = load_config(None, blend_overrides(tmp_path, tokenizer, prefixes, weights, *extra))
        return BlendedData.build(cfg, None, quiet)

    copy = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"copy{suffix}").write_bytes((code.parent / f"code{suffix}").read_bytes())

    (tmp_path / "copy.bin").rename(tmp_path / "away.bin")
    with pytest.raises(ConfigError, match=rf"^data.datasets\[1\].path names {copy}, but {copy}.bin does not exist"):
        build([prose, copy])
    (tmp_path / "away.bin").write_bytes((tmp_path / "away.bin").read_bytes()[:-6])
    (tmp_path / "away.bin").rename(tmp_path / "copy.bin")
    with pytest.raises(DatasetError, match=rf"^data.datasets\[1\].path: {copy}.bin: size is .* truncated"):
        build([prose, copy])

    other_tokenizer = tmp_path / "byte.json"
    ByteTokenizer().save(other_tokenizer)
    with pytest.raises(ConfigError, match=rf"^data.datasets\[0\].path: {prose}.idx was made by another tokenizer "
                                          rf"\(bpe.json, vocabulary \d+, .*than data.tokenizer_file {other_tokenizer}"):
        build([prose, code], tokenizer=other_tokenizer)

    with pytest.raises(ConfigError, match=rf"^data.datasets\[0\].path: {prose}.idx holds token ids up to \d+ from a "
                                          rf"vocabulary of \d+, but model.vocab_size is 256"):
        build([prose, code], "model.vocab_size=256")

    with pytest.raises(ConfigError, match=r"^data.tokenizer_file .*missing.json does not exist"):
        build([prose, code], tokenizer=tmp_path / "missing.json")

    with pytest.raises(ConfigError, match=r"^data.datasets\[1\].weight must be a positive number, got -0.3"):
        build([prose, code], weights=(0.7, -0.3))

    with pytest.raises(ConfigError, match=rf"^data.datasets\[0\].path \({prose}\): .*shorter than one window"):
        build([prose, code], "train.seq_length=100000", "model.max_position_embeddings=200000")

    # an index written without a record of its tokenizer (e.g. the corpus cache's)
    with IndexedDatasetWriter(tmp_path / "plain", np.uint16) as writer:
        writer.add_document(list(range(100)))
        writer.finalize()
    with pytest.raises(ConfigError, match=r"plain.idx does not record which tokenizer made it"):
        build([prose, tmp_path / "plain"])
