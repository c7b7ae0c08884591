"""Reading rows from local files, saved `datasets` directories or hub ids, with clear errors.

JSONL is read line by line first so that a malformed line is reported by file and line
number (the `datasets` JSON reader only says that parsing failed somewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, row or column."""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


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
        if p.suffix == ".jsonl":
            rows = _read_jsonl(p)
            try:
                return datasets.Dataset.from_list(rows)
            except (TypeError, ValueError, ArithmeticError) as e:  # pyarrow's type errors
                raise DataError(
                    f"{p}: rows do not share one schema (a column mixes types, e.g. strings and "
                    f"message lists): {e}"
                ) from None
        builder = EXTENSIONS.get(p.suffix)
        if builder is None:
            raise DataError(f"{p}: unsupported file type (expected {', '.join(EXTENSIONS)})")
        try:
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # the builders raise many types; report them in one form
            raise DataError(f"{p}: could not be read as {builder}: {e}") from None
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
