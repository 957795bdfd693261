"""Fuzz `load_task` with malformed files: it returns a valid Task or raises DataError, nothing else.

Each generated split file starts valid and gets at most one fault (a broken line, a wrong type,
a missing key, a bad label, truncation, invalid UTF-8, spliced bytes, bad quoting). Files
without a fault must load, and give back exactly the texts and labels that were written.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upcycle.data import SPLITS, Task, TaskSource, load_task
from upcycle.errors import DataError

CLASSES = ["neg", "pos", "mid"]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Example = (text as written, label as written, expected label id).
valid_texts = st.text(min_size=1, max_size=12).filter(str.strip)
valid_labels = st.one_of(
    st.sampled_from([(name, i) for i, name in enumerate(CLASSES)]),
    st.integers(min_value=0, max_value=2).map(lambda i: (i, i)),
    st.integers(min_value=0, max_value=2).map(lambda i: (str(i), i)),
)
bad_texts = st.sampled_from(["", " ", "\t\n", None, 7, ["x"], "\ud800"])
bad_labels = st.one_of(
    st.sampled_from(["unknown", "", "Neg", "neg ", "1.0", "0x1", "\u0661", " 9 ", "9" * 30]),
    st.sampled_from([-1, 3, True, 1.0, None, [0], {"id": 0}]),
    st.floats(allow_nan=True),
    st.integers(min_value=10**20, max_value=10**40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)
examples = st.lists(st.tuples(valid_texts, valid_labels), min_size=1, max_size=4)


@st.composite
def byte_fault(draw, data: bytes) -> bytes:
    """Truncate `data`, or splice invalid UTF-8 or random bytes into it."""
    position = draw(st.integers(min_value=0, max_value=len(data)))
    kind = draw(st.sampled_from(["truncate", "bad-utf8", "splice", "random"]))
    if kind == "truncate":
        return data[:position]
    if kind == "bad-utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"]))
        return data[:position] + bad + data[position:]
    if kind == "splice":
        return data[:position] + draw(st.binary(min_size=1, max_size=12)) + data[position:]
    return draw(st.binary(max_size=200))


@st.composite
def broken_json_line(draw) -> str:
    """A JSONL line that is malformed, not an object, lacks a key or has a bad value."""
    kind = draw(st.sampled_from(["text", "label", "missing", "other", "raw", "cut"]))
    record = {"text": draw(valid_texts), "label": draw(valid_labels)[0]}
    if kind == "text":
        record["text"] = draw(bad_texts)
    elif kind == "label":
        record["label"] = draw(bad_labels)
    elif kind == "missing":
        del record[draw(st.sampled_from(["text", "label"]))]
    elif kind == "other":
        return json.dumps(draw(json_values))
    elif kind == "raw":
        return draw(st.text(min_size=1, max_size=30).filter(str.strip))
    line = json.dumps(record)
    if kind == "cut":
        return line[: draw(st.integers(min_value=1, max_value=len(line) - 1))]
    return line


@st.composite
def jsonl_file(draw) -> tuple[bytes, list[tuple[str, int]] | None]:
    """Return file bytes and the expected (text, label id) pairs, or None after a fault."""
    rows = draw(examples)
    lines = [
        json.dumps({"text": text, "label": label, "id": i}, ensure_ascii=draw(st.booleans()))
        for i, (text, (label, _)) in enumerate(rows)
    ]
    # Blank lines, CRLF line ends and a byte order mark are accepted layout, not faults.
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "  ", "\r"])))
    separator = draw(st.sampled_from(["\n", "\r\n"]))
    bom = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf"]))
    expected = [(text, label_id) for text, (_, label_id) in rows]

    fault = draw(st.sampled_from(["none", "none", "none", "line", "line", "bytes"]))
    if fault == "line":
        lines.insert(draw(st.integers(0, len(lines))), draw(broken_json_line()))
        expected = None
    data = bom + separator.join(lines).encode("utf-8", errors="surrogatepass")
    if fault == "bytes":
        return draw(byte_fault(data)), None
    return data, expected


HEADERS = [["text", "label"], ["label", "text"], ["id", "text", "label"]]
BAD_HEADERS = [["text"], ["text", "text", "label"], ["sentence", "label"], []]


@st.composite
def delimited_file(draw, delimiter: str) -> tuple[bytes, list[tuple[str, int]] | None]:
    """Return CSV or TSV bytes and the expected (text, label id) pairs, or None after a fault."""
    rows = draw(examples)
    header = draw(st.sampled_from(HEADERS))
    fault = draw(st.sampled_from(["none", "none", "none", "row", "header", "quote", "bytes"]))
    if fault == "header":
        header = draw(st.sampled_from(BAD_HEADERS))

    buffer = io.StringIO()
    # csv.writer quotes a field holding "\r" only when "\r" is part of the line terminator,
    # so LF line ends come with quoting of every field.
    line_end, quoting = draw(st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL)]))
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=line_end, quoting=quoting)
    writer.writerow(header)
    for i, (text, (label, _)) in enumerate(rows):
        values = {"text": text, "label": label, "id": i}
        writer.writerow([values.get(column, "") for column in header])
        if draw(st.integers(min_value=0, max_value=5)) == 0:
            buffer.write("\n")
    if fault == "row":
        width = len(header)
        kind = draw(st.sampled_from(["short", "long", "text", "label"]))
        text, label = draw(valid_texts), draw(valid_labels)[0]
        if kind == "text":
            text = draw(st.sampled_from(["", " ", "\t"]))
        elif kind == "label":
            label = draw(st.sampled_from(["unknown", "-1", "3", "", "1.0", "9" * 30]))
        values = {"text": text, "label": label, "id": 0}
        row = [values.get(column, "") for column in header]
        if kind == "short":
            row = row[: width - 1]
        elif kind == "long":
            row = [*row, "extra"]
        writer.writerow(row)
    content = buffer.getvalue()
    if fault == "quote":
        position = draw(st.integers(min_value=0, max_value=len(content)))
        snippet = draw(st.sampled_from(['"unclosed', 'a"b', '"', delimiter * 2]))
        content = content[:position] + snippet + content[position:]

    data = content.encode("utf-8", errors="surrogatepass")
    if fault == "bytes":
        return draw(byte_fault(data)), None
    expected = [(text, label_id) for text, (_, label_id) in rows]
    return data, expected if fault == "none" else None


labels_files = st.one_of(
    st.just((json.dumps(CLASSES).encode(), True)),
    st.just((json.dumps(CLASSES).encode(), True)),
    st.just((json.dumps(CLASSES).encode(), True)),
    json_values.map(lambda value: (json.dumps(value).encode(), False)),
    st.binary(max_size=40).map(lambda data: (data, False)),
    st.sampled_from([b'["neg", "neg"]', b'["neg"]', b'["neg", ""]', b"[", b'["\\ud800", "b"]']).map(
        lambda data: (data, False)
    ),
)


def check_task(task: Task) -> None:
    assert task.num_classes >= 2
    assert len(set(task.class_names)) == task.num_classes
    for split in SPLITS:
        data = task.splits[split]
        assert len(data) > 0
        assert len(data.texts) == len(data.labels)
        assert all(isinstance(text, str) and text.strip() for text in data.texts)
        assert all(type(label) is int and 0 <= label < task.num_classes for label in data.labels)


def load_and_check(
    files: dict[str, bytes], expected: dict[str, list | None], *, valid: bool, **fields: object
) -> None:
    """Load `files` as one task; only DataError may escape, and valid files must round-trip."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fuzz"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        source = TaskSource(name="fuzz", **fields)
        try:
            task = load_task(source, data_root=Path(tmp))
        except DataError:
            assert not valid or any(rows is None for rows in expected.values())
            return
    check_task(task)
    for split, rows in expected.items():
        if rows is not None and valid:
            assert task.splits[split].texts == [text for text, _ in rows]
            assert task.splits[split].labels == [label for _, label in rows]


@FUZZ
@given(st.lists(jsonl_file(), min_size=3, max_size=3))
def test_fuzz_jsonl(generated):
    files = {f"{split}.jsonl": data for split, (data, _) in zip(SPLITS, generated, strict=True)}
    expected = {split: rows for split, (_, rows) in zip(SPLITS, generated, strict=True)}
    load_and_check(files, expected, valid=True, format="jsonl", labels=CLASSES)


@FUZZ
@given(st.lists(jsonl_file(), min_size=3, max_size=3), labels_files)
def test_fuzz_folder(generated, labels_file):
    files = {f"{split}.jsonl": data for split, (data, _) in zip(SPLITS, generated, strict=True)}
    expected = {split: rows for split, (_, rows) in zip(SPLITS, generated, strict=True)}
    labels_data, labels_valid = labels_file
    files["labels.json"] = labels_data
    load_and_check(files, expected, valid=labels_valid, format="folder")


@FUZZ
@given(st.lists(delimited_file(","), min_size=3, max_size=3))
def test_fuzz_csv(generated):
    files = {f"{split}.csv": data for split, (data, _) in zip(SPLITS, generated, strict=True)}
    expected = {split: rows for split, (_, rows) in zip(SPLITS, generated, strict=True)}
    load_and_check(files, expected, valid=True, format="csv", labels=CLASSES)


@FUZZ
@given(st.lists(delimited_file("\t"), min_size=3, max_size=3))
def test_fuzz_tsv(generated):
    files = {f"{split}.tsv": data for split, (data, _) in zip(SPLITS, generated, strict=True)}
    expected = {split: rows for split, (_, rows) in zip(SPLITS, generated, strict=True)}
    load_and_check(files, expected, valid=True, format="tsv", labels=CLASSES)
