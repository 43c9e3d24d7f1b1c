"""`megads preprocess`: text files -> a tokenized indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Inputs are JSONL files (one document per line, its text under a key, ``text`` by default) or plain
text files (one document per file, or per line). Documents are tokenized with a tokenizer file (the
project's byte-level BPE or byte tokenizer as saved by megads, or any Hugging Face
``tokenizer.json``), each followed by the end-of-document token, and written with
:class:`~megads.data.indexed.IndexedDatasetWriter`, whose index records which tokenizer made them
(megads.data.prepared) so that training can refuse a dataset made by another.

The work is cut into tasks that do not depend on the number of workers (byte ranges of a line
file, groups of whole files), tasks run in worker processes and their results are written in task
order: any ``--workers`` gives the same bytes. A line that cannot be a document (not UTF-8, not
JSON, no text field, text not a string) is counted and listed with its file and line number; it
is an error unless the caller chose to skip such lines. Nothing is published until everything
has been read: an interrupted or failed run leaves no ``PREFIX.bin`` / ``PREFIX.idx``.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from megads.errors import RunFailure

from .indexed import IndexedDatasetWriter, dtype_for_vocab
from .prepared import preprocess_metadata
from .tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer, tokenizer_file_digest

InputFormat = Literal["auto", "jsonl", "text"]
# Suffixes read as JSONL under format "auto"; every other file is plain text.
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
# Documents tokenized per encode_batch call: enough for the Rust tokenizer's threads to share,
# few enough that one batch's ids stay small in memory.
_ENCODE_BATCH = 256


class PreprocessError(RunFailure):
    """Preprocessing cannot run or finish: one sentence naming the file or option."""


@dataclass(frozen=True)
class PreprocessOptions:
    input_format: InputFormat = "auto"
    json_key: str = "text"
    document_per_line: bool = False  # plain text files: every line is a document
    eod_token: Optional[str] = None  # the tokenizer's end-of-document token; None: <|endoftext|>
    workers: int = 1
    skip_malformed: bool = False
    max_reported: int = 20  # malformed lines listed by file and line number (all are counted)
    # Input bytes per task: small enough that a few megabytes keep several workers busy and progress
    # lines come often, large enough that sending a task and its tokens back costs little.
    task_bytes: int = 2**20
    progress_every_s: float = 5.0


@dataclass(frozen=True)
class Malformed:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class PreprocessReport:
    prefix: str
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty_documents: int = 0  # empty texts and empty lines: no document, not an error
    malformed_count: int = 0
    malformed: list[Malformed] = field(default_factory=list)  # the first max_reported
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the work, cut into tasks


@dataclass(frozen=True)
class _Task:
    """A byte range [start, end) of one line file (kind jsonl / lines: the lines that start in it), or
    whole text files (kind files)."""

    kind: Literal["jsonl", "lines", "files"]
    paths: tuple[str, ...]
    start: int = 0
    end: int = 0


@dataclass
class _TaskResult:
    tokens: np.ndarray  # every document's ids, eod after each, concatenated
    lengths: np.ndarray  # tokens per document (eod included)
    lines: int  # lines read (line kinds): where the next task of the file starts counting
    input_bytes: int
    empty_documents: int
    malformed: list[Malformed]  # line kinds: line numbers relative to the task's first line
    malformed_count: int


def input_files(inputs: list[str]) -> list[pathlib.Path]:
    """The files to read: each input file as given, each directory's files (recursively, hidden ones
    left out) sorted by relative path."""
    if not inputs:
        raise PreprocessError("megads preprocess needs at least one input file or directory.")
    files: list[pathlib.Path] = []
    for name in inputs:
        path = pathlib.Path(name)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            if not found:
                raise PreprocessError(f"Input directory {path} holds no files.")
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        else:
            raise PreprocessError(f"Input {path} does not exist.")
    return files


def plan_tasks(files: list[pathlib.Path], options: PreprocessOptions) -> list[_Task]:
    """The tasks, in output order; they depend on the files and options.task_bytes, never on the workers."""
    tasks: list[_Task] = []
    whole_files: list[str] = []
    whole_bytes = 0
    for path in files:
        size = path.stat().st_size
        jsonl = options.input_format == "jsonl" or (options.input_format == "auto" and path.suffix in JSONL_SUFFIXES)
        if jsonl or options.document_per_line:
            if whole_files:  # keep the output in input order
                tasks.append(_Task("files", tuple(whole_files)))
                whole_files, whole_bytes = [], 0
            kind = "jsonl" if jsonl else "lines"
            for start in range(0, size, options.task_bytes):
                tasks.append(_Task(kind, (str(path),), start, min(start + options.task_bytes, size)))
            continue
        whole_files.append(str(path))
        whole_bytes += size
        if whole_bytes >= options.task_bytes:
            tasks.append(_Task("files", tuple(whole_files)))
            whole_files, whole_bytes = [], 0
    if whole_files:
        tasks.append(_Task("files", tuple(whole_files)))
    return tasks


def _lines_in_range(path: str, start: int, end: int) -> Iterator[bytes]:
    """The lines of `path` that start in [start, end), without their line ending."""
    with open(path, "rb") as file:
        position = start
        if start > 0:
            # The line holding byte start - 1 belongs to the previous range (if that byte is a
            # newline, this reads just it, and the line at `start` is ours).
            file.seek(start - 1)
            position = start - 1 + len(file.readline())
        while position < end:
            line = file.readline()
            if not line:
                return
            position += len(line)
            yield line.rstrip(b"\n").removesuffix(b"\r")


def _decode(data: bytes) -> tuple[Optional[str], str]:
    """(text, "") or (None, why it is not UTF-8)."""
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 (byte 0x{data[err.start]:02x} at position {err.start} of the line)"


def _document_of_json_line(line: bytes, key: str) -> tuple[Optional[str], str]:
    """(text, "") or (None, why the line is malformed)."""
    if not line.strip():
        return None, "blank line, not JSON"
    text, problem = _decode(line)
    if text is None:
        return None, problem
    try:
        record = json.loads(text)
    except ValueError as err:
        return None, f"not JSON: {getattr(err, 'msg', err)} (column {getattr(err, 'colno', '?')})"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    if key not in record:
        return None, f"no {key!r} field"
    value = record[key]
    if not isinstance(value, str):
        return None, f"{key!r} is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")  # JSON may spell lone surrogates (\ud800), which no tokenizer takes
    except UnicodeEncodeError:
        return None, f"{key!r} holds a lone surrogate, not valid Unicode"
    return value, ""


def _read_task(task: _Task, options: PreprocessOptions) -> tuple[list[str], _TaskResult]:
    """The task's documents, and its counts (tokens not yet filled in)."""
    documents: list[str] = []
    malformed: list[Malformed] = []
    result = _TaskResult(np.empty(0, np.int32), np.empty(0, np.int64), 0, 0, 0, malformed, 0)

    def reject(path: str, line: int, reason: str) -> None:
        result.malformed_count += 1
        if len(malformed) < options.max_reported:
            malformed.append(Malformed(path, line, reason))

    if task.kind == "files":
        for path in task.paths:
            data = pathlib.Path(path).read_bytes()
            result.input_bytes += len(data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                line = data.count(b"\n", 0, err.start) + 1
                column = err.start - (data.rfind(b"\n", 0, err.start) + 1)
                reject(path, line, f"not UTF-8 (byte 0x{data[err.start]:02x} at position {column} of the line)")
                continue
            if text:
                documents.append(text)
            else:
                result.empty_documents += 1
        return documents, result

    (path,) = task.paths
    result.input_bytes = task.end - task.start
    for number, line in enumerate(_lines_in_range(path, task.start, task.end), start=1):
        result.lines = number
        if number == 1 and task.start == 0:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write first
        if task.kind == "jsonl":
            text, problem = _document_of_json_line(line, options.json_key)
        else:
            text, problem = _decode(line)
        if text is None:
            reject(path, number, problem)
        elif text:
            documents.append(text)
        else:
            result.empty_documents += 1
    return documents, result


# ----------------------------------------------------------------------------- workers

_worker_tokenizer: Optional[Tokenizer] = None
_worker_options: Optional[PreprocessOptions] = None


def _start_worker(tokenizer_path: str, options: PreprocessOptions, parallel: bool) -> None:
    global _worker_tokenizer, _worker_options
    if parallel:
        # Each worker tokenizes on one core: the Rust tokenizer's own threads in every worker
        # would oversubscribe the machine.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path, options.eod_token)
    _worker_options = options


def _run_task(task: _Task) -> _TaskResult:
    tokenizer, options = _worker_tokenizer, _worker_options
    documents, result = _read_task(task, options)
    ids: list[list[int]] = []
    for start in range(0, len(documents), _ENCODE_BATCH):
        for document_ids in tokenizer.encode_batch(documents[start:start + _ENCODE_BATCH]):
            document_ids.append(tokenizer.eos_id)
            ids.append(document_ids)
    result.lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    result.tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(result.lengths.sum()))
    return result


def _results(tasks: list[_Task], tokenizer_path: str, options: PreprocessOptions) -> Iterator[_TaskResult]:
    """Every task's result, in task order."""
    if options.workers == 1:
        _start_worker(tokenizer_path, options, parallel=False)
        yield from map(_run_task, tasks)
        return
    # fork: workers inherit the imported modules (spawn would re-import torch in each).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(options.workers, _start_worker, (tokenizer_path, options, True)) as pool:
        yield from pool.imap(_run_task, tasks)


# ----------------------------------------------------------------------------- the whole run


def _load_tokenizer(path: pathlib.Path, eod_token: Optional[str]) -> Tokenizer:
    if not path.is_file():
        raise PreprocessError(f"Tokenizer file {path} does not exist.")
    try:
        return load_tokenizer(path, eod_token)
    except ValueError as err:
        advice = "" if eod_token else " (name the tokenizer's end-of-document token with --eod-token, e.g. '</s>')"
        raise PreprocessError(f"Tokenizer file {path} cannot be used: {err}{advice}.") from None
    except Exception as err:  # tokenizers raises its own exception type for a file it cannot parse
        raise PreprocessError(f"Tokenizer file {path} is not a tokenizer megads can load ({err}).") from None


def preprocess(inputs: list[str], output_prefix: str, tokenizer_path: str,
               options: PreprocessOptions = PreprocessOptions(), log: Callable[[str], None] = print
               ) -> PreprocessReport:
    """Tokenize `inputs` into `output_prefix`.bin/.idx; PreprocessError on malformed lines unless
    options.skip_malformed (either way they are counted, and the first ones listed, in the report)."""
    if options.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {options.workers}.")
    if options.task_bytes < 1:
        raise PreprocessError(f"task_bytes must be at least 1, got {options.task_bytes}.")
    tokenizer_file = pathlib.Path(tokenizer_path)
    tokenizer = _load_tokenizer(tokenizer_file, options.eod_token)
    files = input_files(inputs)
    tasks = plan_tasks(files, options)
    total_bytes = sum(path.stat().st_size for path in files)
    report = PreprocessReport(output_prefix)
    started = last_progress = time.monotonic()
    line_base: dict[str, int] = {}  # lines of a line file read by its earlier tasks

    def progress(final: bool = False) -> str:
        seconds = max(time.monotonic() - started, 1e-9)
        share = f" ({100 * report.input_bytes / total_bytes:.0f}%)" if total_bytes else ""
        return (f"preprocess: {report.documents:,} documents, {report.tokens:,} tokens, "
                f"{report.input_bytes / 1e6:,.1f} of {total_bytes / 1e6:,.1f} MB{share}, "
                f"{report.input_bytes / 1e6 / seconds:,.1f} MB/s" + (f", {seconds:.1f}s" if final else ""))

    pathlib.Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    log(f"preprocess: {len(files)} files ({total_bytes / 1e6:,.1f} MB) in {len(tasks)} tasks on "
        f"{options.workers} worker{'s' if options.workers > 1 else ''}, tokenizer {tokenizer_file} "
        f"(vocabulary {tokenizer.vocab_size}, end of document id {tokenizer.eos_id}) -> {output_prefix}.bin/.idx")
    with IndexedDatasetWriter(output_prefix, dtype_for_vocab(tokenizer.vocab_size)) as writer:
        for task, result in zip(tasks, _results(tasks, str(tokenizer_file), options)):
            writer.add_documents(result.tokens, result.lengths)
            base = line_base.get(task.paths[0], 0) if task.kind != "files" else 0
            line_base[task.paths[0]] = base + result.lines
            room = options.max_reported - len(report.malformed)
            report.malformed += [Malformed(m.path, m.line + base, m.reason) for m in result.malformed[:room]]
            report.malformed_count += result.malformed_count
            report.documents += result.lengths.size
            report.tokens += result.tokens.size
            report.input_bytes += result.input_bytes
            report.empty_documents += result.empty_documents
            if time.monotonic() - last_progress >= options.progress_every_s:
                log(progress())
                last_progress = time.monotonic()
        report.seconds = time.monotonic() - started
        if report.malformed_count:
            listed = "\n".join(f"  {m}" for m in report.malformed)
            more = report.malformed_count - len(report.malformed)
            log(f"preprocess: {report.malformed_count} malformed line{'s' if report.malformed_count > 1 else ''}"
                f"{' (skipped)' if options.skip_malformed else ''}:\n{listed}" + (f"\n  ... and {more} more" if more else ""))
            if not options.skip_malformed:
                raise PreprocessError(
                    f"{report.malformed_count} malformed line{'s' if report.malformed_count > 1 else ''} in the input "
                    f"(the first: {report.malformed[0]}); nothing was written (--skip-malformed writes the rest).")
        if report.documents == 0:
            raise PreprocessError(f"The input ({len(files)} files) holds no documents; nothing was written.")
        metadata = preprocess_metadata(tokenizer_file, tokenizer_file_digest(tokenizer_file), tokenizer.vocab_size,
                                       options.eod_token or EOS_TOKEN, tokenizer.eos_id, writer.max_token_id)
        metadata.update(documents=report.documents, tokens=report.tokens, input_files=len(files),
                        input_bytes=report.input_bytes, malformed_skipped=report.malformed_count,
                        empty_documents_skipped=report.empty_documents)
        writer.finalize(metadata)
    log(progress(final=True) + (f"; {report.empty_documents:,} empty documents skipped" if report.empty_documents
                                else "") + f" -> {output_prefix}.bin/.idx")
    return report
