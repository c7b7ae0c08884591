"""Reading rows from local files, saved `datasets` directories or hub ids, with clear errors.

JSONL is read line by line first so that a malformed line is reported by file and line
number (the `datasets` JSON reader only says that parsing failed somewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from posttrain.errors import UserError, one_line

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file, row or column."""


# Columns the trainers read as text. CSV has no types, so a column of digits (answers such as
# "42" or "007") would be inferred as integers; these are read as strings instead. Parquet
# stores types: a numeric text column there is cast to strings.
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "text", "answer")


def _json_problem(e: json.JSONDecodeError) -> str:
    # Some messages end in " at" ("Unterminated string starting at"): say the column once.
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON line: {_json_problem(e)}"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_json(path: Path) -> list[dict]:
    """A .json file: one array of objects, or JSON lines under a .json name (as datasets allows)."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several documents: JSON lines
            return _read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {_json_problem(e)}") from None
    if isinstance(data, dict):
        return _read_jsonl(path)  # a single object on one line is one JSON-lines row
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a JSON array of objects (or JSON lines), got no rows")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    return data


def _mixed_types(rows: list[dict]) -> str:
    """Where a column first changes type (pyarrow needs one type per column), for the error."""
    first: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows, start=1):
        for key, value in row.items():
            if value is None:
                continue
            kind = type(value).__name__
            seen = first.setdefault(key, (i, kind))
            if seen[1] != kind:
                return (
                    f"row {i}: column {key!r} is {kind} {value!r}, but row {seen[0]} has {seen[1]}"
                )
    return "a column mixes types"


def _from_rows(path: Path, rows: list[dict]) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except (TypeError, ValueError, ArithmeticError) as e:  # pyarrow's type errors
        raise DataError(
            f"{path}: rows do not share one schema: {_mixed_types(rows)} ({one_line(str(e))})"
        ) from None


def _text_features(features: datasets.Features) -> datasets.Features | None:
    """`features` with the text columns as strings; None when they already are."""
    wanted = {
        name: datasets.Value("string")
        for name in TEXT_COLUMNS
        if isinstance(features.get(name), datasets.Value) and features[name].dtype != "string"
    }
    return datasets.Features({**features, **wanted}) if wanted else None


def _read_csv(path: Path) -> datasets.Dataset:
    """A CSV with its text columns read as text: when inference made one numeric, the file is
    read again with those columns declared as strings (`features`), so "007" stays "007"."""
    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    features = _text_features(ds.features)
    if features is None:
        return ds
    return datasets.load_dataset("csv", data_files=str(path), split="train", features=features)


def _read_parquet(path: Path) -> datasets.Dataset:
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    features = _text_features(ds.features)
    return ds if features is None else ds.cast(features)


def load_rows(path: str | Path, split: str = "train") -> datasets.Dataset:
    """Load a data set from a file, a `save_to_disk` directory, or a hub id."""
    text = str(path)
    p = Path(text)
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(text)
        except FileNotFoundError:
            raise DataError(
                f"{p}: a directory, but not one written by datasets.save_to_disk"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{p}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if p.suffix in EXTENSIONS or p.exists():
        if not p.is_file():
            raise DataError(f"data file not found: {p}")
        if p.suffix in (".jsonl", ".json"):
            return _from_rows(p, _read_jsonl(p) if p.suffix == ".jsonl" else _read_json(p))
        builder = EXTENSIONS.get(p.suffix)
        if builder is None:
            raise DataError(f"{p}: unsupported file type (expected {', '.join(EXTENSIONS)})")
        try:
            return _read_csv(p) if builder == "csv" else _read_parquet(p)
        except Exception as e:  # the builders raise many types; report them in one form
            raise DataError(f"{p}: could not be read as {builder}: {one_line(str(e))}") from None
    if "/" in text and not text.startswith((".", "/")):
        # Looks like a hub id ("org/name"): works where the network allows.
        try:
            return datasets.load_dataset(text, split=split)
        except Exception as e:
            raise DataError(
                f"{text}: not a local file and not loadable from the hub: {e}"
            ) from None
    raise DataError(f"data file not found: {p}")


def require_columns(ds: datasets.Dataset, columns: list[str], source: str, expected: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column {', '.join(repr(m) for m in missing)}; expected {expected} "
            f"(found: {', '.join(ds.column_names)})"
        )
