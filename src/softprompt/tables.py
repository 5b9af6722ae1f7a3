"""Reading JSON lines, CSV and TSV files into ``Example`` rows, with validation that reports every
bad row at once, each by its ``source`` ("path:line"), so every later error points back at the file.

:func:`read_examples` goes in three steps: the file split into rows and its header found
(:func:`_read_table`), the text and label columns chosen (:func:`_choose_columns`), and each row
checked and turned into examples (:func:`_examples`). Datasets, splits and sampling are in
:mod:`softprompt.data`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.errors import DataError, MissingFileError, UsageError

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "sentence", "question", "input", "content")
LABEL_COLUMNS = ("label", "labels", "class", "category")
TARGET_COLUMNS = ("target", "targets", "output", "ref", "reference", "references", "response", "completion",
                  "summary", "label")  # fmt: skip
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


@dataclass
class Example:
    """One row of data. ``label`` is None for unlabelled (prediction) inputs."""

    text: str
    label: str | None
    source: str
    """Where the row came from, "path:line" (1-based, header counted), for error messages."""
    target: str | None = None
    """Reference output for generation tasks (unused by classification)."""


def _reference_list(label: Any) -> list | None:
    """A generation target that holds several references: a JSON list, or a CSV cell of one."""
    if isinstance(label, str) and label.lstrip().startswith("["):
        try:
            parsed = json.loads(label)
        except ValueError:
            return None  # a target that happens to start with "["
        return parsed if isinstance(parsed, list) else None
    return label if isinstance(label, list) else None


def make_example(
    text: Any,
    label: Any,
    source: str,
    labelled: bool,
    strip: bool,
    where: tuple[str, str],
    lists: bool = False,
) -> Example | list[Example] | str:
    """Validate one row; return an Example, or the problem as a string starting with ``source``.
    With ``lists`` (generation targets), a list of references gives one Example per reference."""
    refs = _reference_list(label) if lists and labelled else None
    if refs is not None:
        if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            return f"{source}: the references ({where[1]}) must be a non-empty list of non-empty strings, got {label!r}"
        made = [make_example(text, r, source, labelled, strip, where) for r in refs]
        return made[0] if isinstance(made[0], str) else made
    if not isinstance(text, str):
        return f"{source}: text ({where[0]}) must be a string, got {type(text).__name__} {text!r}"
    text = text.strip()
    if strip:  # e.g. TREC: "dist How far is it ...": the first word is a fine label, not text
        parts = text.split(None, 1)
        text = parts[1].strip() if len(parts) == 2 else ""
    if not text:
        extra = " after dropping its first word (strip_prefix_word=True)" if strip else ""
        return f"{source}: empty text ({where[0]}){extra}; write the text or remove the row"
    if not labelled:
        return Example(text=text, label=None, source=source)
    if isinstance(label, int | float):
        label = str(label)
    if label is None or (isinstance(label, str) and not label.strip()):
        return f"{source}: missing label ({where[1]}); add one, or pass labelled=False for unlabelled inputs"
    if not isinstance(label, str):
        return f"{source}: label ({where[1]}) must be a string or number, got {type(label).__name__}"
    return Example(text=text, label=label.strip(), source=source)


def _detect_format(path: Path, format: str | None) -> str:
    if format is not None:
        fmt = {"json": "jsonl"}.get(format.lower().lstrip("."), format.lower().lstrip("."))
        if fmt not in ("jsonl", "csv", "tsv"):
            raise UsageError(f"format={format!r} is not supported; use 'jsonl', 'csv' or 'tsv'")
        return fmt
    if path.suffix.lower() not in FORMATS:
        raise UsageError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}; name it "
            ".jsonl/.json, .csv or .tsv/.txt, or pass format='jsonl', 'csv' or 'tsv'"
        )
    return FORMATS[path.suffix.lower()]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise MissingFileError(f"data file not found: {path} (looked in {path.resolve().parent})")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FORMATS)[:5]
        raise MissingFileError(
            f"{path} is a folder, not a data file; point at a .jsonl, .csv or .tsv file"
            + (f" (it holds {', '.join(inside)})" if inside else "")
        )
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is dropped, not read as text
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        # A UTF-16 byte-order mark (Excel's "Unicode text"); else Windows-1252 / Latin-1 (Excel's
        # "CSV"), where accents and curly quotes are single bytes.
        guess = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "cp1252"
        start = raw.rfind(b"\n", 0, e.start) + 1
        shown = raw[start : start + 60].split(b"\n")[0].decode("utf-8", "replace").rstrip("\r")
        raise DataError(
            [f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}) in {shown!r}"],
            f"save the file as UTF-8 (e.g. `iconv -f {guess} -t utf-8 in > out`, or in a spreadsheet "
            "choose 'CSV UTF-8'); it was probably written as " + guess + ".",
        ) from None


Row = tuple[int, int, Any]  # (first line, last line, CSV/TSV fields or a JSON object/array)


def _split_rows(path: Path, text: str, fmt: str) -> tuple[list[Row], list[tuple[int, str]], list[int]]:
    """Parse the file into rows, problems (JSON lines that do not parse) and blank line numbers."""
    rows, problems, blank = [], [], []
    if fmt == "csv":  # quoted fields may span lines: let the csv module find the rows
        reader, end = csv.reader(io.StringIO(text, newline="")), 0
        limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # long texts are fine
        try:
            for fields in reader:
                start, end = end + 1, reader.line_num
                if "".join(fields).strip():
                    rows.append((start, end, fields))
                else:
                    blank.append(start)
        except csv.Error as e:  # after this, positions are unreliable: report it alone
            raise DataError(
                [f"{path}:{end + 1}: CSV parse error: {e}"], "fix the quoting on that line."
            ) from None
        finally:
            csv.field_size_limit(limit)  # the limit is the process's: leave it as it was
        return rows, problems, blank
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the empty string after the final newline is not a line
    for i, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            blank.append(i)
        elif fmt == "tsv":  # no quoting: quotes in SST-2 / AG News texts are plain characters
            rows.append((i, i, line.split("\t")))
        else:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                message = f"not valid JSON ({e.msg}, column {e.colno}); write one object per line"
                problems.append((i, f"{path}:{i}: {message}"))
                continue
            if isinstance(value, dict | list):
                rows.append((i, i, value))
            else:
                problems.append(
                    (i, f"{path}:{i}: expected a JSON object, got {type(value).__name__} {value!r}")
                )
    return rows, problems, blank


def _resolve_column(
    column: str | int | None,
    names: list[str] | None,
    first: list[str],
    width: int,
    known: tuple[str, ...],
    what: str,
    path: Path,
    keys: bool,
    guess: bool = True,
) -> tuple[Any, str | None]:
    """(column, problem): a JSON key (``keys``) or a 0-based index into the row's fields.

    Without ``column``, the first of the ``known`` names is taken; failing that, column 0 for the
    text and the last column for the label (``guess``), or a problem naming what was looked for.
    ``first`` is the first row, shown when a named column is asked of a file without a header."""
    if isinstance(column, str) and column.isdigit() and column not in (names or []):
        column = int(column)  # "1" from a command line means index 1 unless a column is named "1"
    if column is None:
        column = next((n for k in known for n in names or [] if n.strip().lower() == k), None)
        if column is None and (keys or not guess):
            kind = "key" if keys else "column"
            return None, f"{path}: no {what} {kind} (looked for {', '.join(known)}); found {names}"
        if column is None:
            column = 0 if what == "text" else max(width - 1, 0)
    if isinstance(column, str):
        if names is None:
            return None, (
                f"{path}: no {what} column {column!r}: the file has no header row naming it (the first "
                f"row is {first}); pass a 0-based index, or has_header=True if that row is a header"
            )
        if column not in names:
            return None, f"{path}: no {what} column {column!r}; there are {names}"
        return (column if keys else names.index(column)), None
    if keys:
        return None, f"{path}: {what} column {column} is an index, but rows are JSON objects: give the key"
    if width and not 0 <= column < width:
        return None, f"{path}: {what} column index {column} is out of range; rows have {width} column(s)"
    return column, None


def _log_guess(
    path: Path,
    given: str | int | None,
    column: int | None,
    names: list[str] | None,
    first: list[str],
    known: tuple[str, ...],
    what: str,
) -> None:
    """Say which column was taken by position when none was given or named as expected, and why."""
    if given is not None or column is None or (names and names[column].lower() in known):
        return
    place = "first" if column == 0 else "last"
    if names:
        why = f"no {what} column is named {', '.join(known)} (header: {names})"
        chosen = f"the {place} column, {names[column]!r}"
    else:
        why = f"no header row (the first row, {first}, names no known column)"
        chosen = f"column {column}, the {place} column"
    logger.warning("%s: %s, so the %s is %s; pass %s_column= to choose", path, why, what, chosen, what)


def _runaway_quote(lines: list[str], row: Row, width: int, label: int | None, labels: set[str]) -> bool:
    """Whether a CSV row read from several lines is a quote left open rather than a multi-line field.

    A properly closed quote is followed by a comma or the line's end (a strict parse accepts the
    row), and the lines inside a real multi-line text are text, not rows ending in a known label."""
    start, end, fields = row
    try:
        list(csv.reader(io.StringIO("".join(lines[start - 1 : end]), newline=""), strict=True))
    except csv.Error:
        return True
    if label is None or width < 2:
        return False
    for piece in (p for field in fields for p in re.split(r"\r\n|\r|\n", field)):
        parsed = next(csv.reader([piece]), [])
        if len(parsed) == width and parsed[label].strip() in labels:
            return True
    return False


def read_examples(
    path: str | Path,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    format: str | None = None,
    has_header: bool | None = None,
    strip_prefix_word: bool = False,
    labelled: bool = True,
    label_names: tuple[str, ...] = LABEL_COLUMNS,
    guess_label_column: bool = True,
    label_role: str = "label",
) -> list[Example]:
    """Read examples from a JSON-lines, CSV or TSV file, reporting every bad row in one ``DataError``.

    Args:
        path: The file. Its extension picks the format (.jsonl/.json, .csv, .tsv/.txt) unless
            ``format`` is given.
        text_column: Column name (header / JSON key) or 0-based index of the text. Default: the
            first of text, sentence, question, input, content that exists, else column 0 (a
            warning says so). A named column the file lacks is a ``DataError`` listing the columns.
        label_column: Likewise for the label. Default: label, labels, class, category, else the
            last column (with a warning). Labels are always strings (JSON ``0`` becomes ``"0"``).
        format: "jsonl", "csv" or "tsv" to override the extension.
        has_header: Whether the first CSV/TSV row names the columns. Default: yes when it holds a
            known column name or one of the named columns.
        strip_prefix_word: Drop the first word of each text (TREC lines start with a fine label).
        labelled: False for prediction inputs: labels are None and no label column is needed.
        label_names: The names looked for when ``label_column`` is not given (generation targets:
            :data:`TARGET_COLUMNS`).
        guess_label_column: Without a named or known label column, take the last column (True)
            or report the missing column (False).
        label_role: What the label column holds, for messages ("label", or "target" for generation;
            a target may be a list of references, in JSON or a CSV cell holding a JSON list: each
            reference becomes an Example with the same text and source).

    Raises:
        FileNotFoundError: The file does not exist, or is a folder (``MissingFileError``).
        DataError: The file is empty or not UTF-8, or some rows do not parse (a CSV quote left
            open is reported at the line where it opened), have empty text or lack a label.
    """
    path = Path(path)
    text = _read_text(path)  # first: a missing file is the problem to report, not its extension
    fmt = _detect_format(path, format)
    table = _read_table(path, text, fmt, has_header, (text_column, label_column), label_names)
    tc, lc = _choose_columns(
        table, text_column, label_column if labelled else None, labelled, label_names, label_role,
        guess_label_column,
    )  # fmt: skip
    examples = _examples(table, text, tc, lc, strip_prefix_word, label_role)
    if table.blank:
        logger.warning("%s: skipped %d blank line(s): %s", path, len(table.blank), table.blank[:10])
    labels = Counter(e.label for e in examples)
    if len(labels) <= 50:  # a class distribution; many distinct "labels" are generation targets
        logger.info("read %d examples from %s (%s; labels: %s)", len(examples), path, fmt, dict(labels))
    else:
        logger.info(
            "read %d examples from %s (%s; %d distinct labels)", len(examples), path, fmt, len(labels)
        )
    return examples


@dataclass
class _Table:
    """A data file split into rows, before columns are chosen: ``rows`` are ``(first line, last
    line, fields)`` (a dict per JSON line), ``problems`` the rows that did not parse, ``names`` the
    header's column names (or JSON keys), ``width`` the expected number of fields per row."""

    path: Path
    fmt: str
    rows: list
    problems: list
    blank: list
    names: list[str] | None
    keys: bool  # JSON keys name the columns
    width: int
    shown: list[str]  # the first row's fields, shortened for messages

    def where(self, c: str | int) -> str:
        return f"key {c!r}" if self.keys else f"column {self.names[c]!r}" if self.names else f"column {c}"


def _read_table(
    path: Path, text: str, fmt: str, has_header: bool | None, named: tuple, label_names
) -> _Table:
    """Split ``text`` into rows and find its header; refuses an empty file or a single JSON array."""
    if not text.strip():
        raise DataError([f"{path}: the file is empty"], "point at a file with data.")
    if fmt == "jsonl" and text.lstrip().startswith("[") and "\n" in text.strip():
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON lines of arrays: not one document
        if isinstance(whole, list):
            raise DataError(
                [f"{path}: this is one JSON array, not JSON lines"], "write one JSON object per line."
            )
    rows, problems, blank = _split_rows(path, text, fmt)
    names, keys, shown = None, False, []
    if fmt == "jsonl":
        first = next((r for _, _, r in rows if isinstance(r, dict)), None)
        names, keys = (list(first), True) if first is not None else (None, False)
    elif rows:
        first_row = [f.strip() for f in rows[0][2]]
        shown = [f if len(f) <= 30 else f[:27] + "..." for f in first_row]  # for messages
        if has_header is None:
            columns = {c for c in named if isinstance(c, str) and not c.isdigit()}
            has_header = any(f.lower() in TEXT_COLUMNS + label_names or f in columns for f in first_row)
        names, rows = (first_row, rows[1:]) if has_header else (None, rows)
    if not rows and not problems:
        raise DataError([f"{path}: the file has no data rows"], "point at a file with data.")
    # Without a header the most common width is the expected one, so the odd rows are the ones reported.
    width = len(names) if names else Counter(len(r) for _, _, r in rows).most_common(1)[0][0] if rows else 0
    return _Table(path, fmt, rows, problems, blank, names, keys, width, shown)


def _choose_columns(
    table: _Table, text_column, label_column, labelled: bool, label_names, label_role: str, guess_label: bool
) -> tuple[str | int, str | int | None]:
    """The text and label columns (by name or position), or one ``DataError`` naming what is wrong."""
    names, shown, width, path, keys = table.names, table.shown, table.width, table.path, table.keys
    tc, p1 = _resolve_column(text_column, names, shown, width, TEXT_COLUMNS, "text", path, keys)
    lc, p2 = (None, None)
    if labelled:
        args = (names, shown, width, label_names, label_role, path, keys, guess_label)
        lc, p2 = _resolve_column(label_column, *args)
    if labelled and p1 is None and p2 is None and tc == lc:
        p2 = f"{path}: the text and the label are both column {tc!r}; " + (
            "rows have one column: pass labelled=False for unlabelled inputs"
            if width == 1
            else "choose the label with label_column="
        )
    if p1 or p2:
        hint = (
            f"choose the columns with --text_column and --{label_role}_column (a name or a 0-based "
            f"index; text_column= and {label_role}_column= in Python)."
        )
        raise DataError([*(m for _, m in table.problems), *(p for p in (p1, p2) if p)], hint)
    if not keys and width > 1:  # a column taken by position may be the wrong one: say which, and why
        _log_guess(path, text_column, tc, names, shown, TEXT_COLUMNS, "text")
        if labelled:
            _log_guess(path, label_column, lc, names, shown, label_names, label_role)
    return tc, lc


def _examples(table: _Table, text: str, tc, lc, strip_prefix_word: bool, label_role: str) -> list[Example]:
    """One :class:`Example` per good row (several for a list of references); every bad row reported
    at once, in line order. ``lc`` None: unlabelled inputs."""
    labelled, width, rows, problems = lc is not None, table.width, table.rows, list(table.problems)
    sep = {"tsv": "tab", "csv": "comma"}.get(table.fmt)
    lines, seen = [], set()
    if table.fmt == "csv" and any(
        end > start for start, end, _ in rows
    ):  # a multi-line field, or a stray quote
        lines = io.StringIO(text, newline="").readlines()  # the lines as the csv module counts them
        seen = {r[lc].strip() for s, e, r in rows if s == e and len(r) == width} if labelled else set()
    examples = []
    for start, end, row in rows:
        source = f"{table.path}:{start}"
        if end > start and sep == "comma" and _runaway_quote(lines, (start, end, row), width, lc, seen):
            message = (
                f"the quote opened on this line is not closed where its field ends, so the row spans "
                f"lines {start}-{end}; check the quote: close it right after the field, and double any "
                'quote character inside a quoted field ("")'
            )
            problems.append((start, f"{source}: {message}"))
            continue
        if sep and len(row) != width:
            span = f" (the row spans lines {start}-{end}: an unclosed quote?)" if end > start else ""
            fix = "removed" if sep == "tab" else "inside double quotes"
            message = f"expected {width} {sep}-separated columns, found {len(row)}{span}; a {sep} in a text must be {fix}"
            problems.append((start, f"{source}: {message}"))
            continue
        missing = [c for c in (tc, lc if labelled else tc) if not _has(row, c)]
        if missing:
            problems.append(
                (
                    start,
                    f"{source}: no {table.where(missing[0])} in this row ({list(row) if table.keys else row})",
                )
            )
            continue
        label = row[lc] if labelled else None
        ex = make_example(
            row[tc], label, source, labelled, strip_prefix_word,
            (table.where(tc), table.where(lc) if labelled else ""), lists=label_role == "target",
        )  # fmt: skip
        if isinstance(ex, str):
            problems.append((start, ex))
        else:
            examples.extend(ex) if isinstance(ex, list) else examples.append(ex)
    if problems:
        raise DataError([m for _, m in sorted(problems, key=lambda p: p[0])])
    return examples


def _has(row: dict | list, column: str | int) -> bool:
    if isinstance(row, dict):
        return isinstance(column, str) and column in row
    return isinstance(column, int) and 0 <= column < len(row)
