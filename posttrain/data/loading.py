"""Reading rows from what `datasets.load_dataset` takes, with clear errors.

A source is a file (.jsonl/.json/.parquet/.csv, optionally compressed .gz/.bz2/.xz), a glob of
such files, a hub-style dataset directory (split files such as data/train-*.parquet or
test.jsonl, or a README.md whose `configs:` name subsets), a `save_to_disk` directory, or a hub
id ("org/name"). A source has named splits: a file or glob has one, "train".

JSONL is read line by line first so that a malformed line is reported by file and line
number (the `datasets` JSON reader only says that parsing failed somewhere); the files of a
glob or of a dataset directory are read the same way, one by one.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import datasets
import datasets.data_files
import yaml

from posttrain import hub
from posttrain.errors import UserError, one_line

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# Splits an eval set is read from when data.eval_split is not set, in order of preference.
EVAL_SPLITS = ("test", "validation", "valid", "eval", "dev")


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file, row or column."""


# Columns the trainers read as text. CSV has no types, so a column of digits (answers such as
# "42" or "007") would be inferred as integers; these are read as strings instead. Parquet
# stores types: a numeric text column there is cast to strings.
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "text", "answer")


def _json_problem(e: json.JSONDecodeError) -> str:
    # Some messages end in " at" ("Unterminated string starting at"): say the column once.
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _open_text(path: Path):
    """A text handle on `path`, decompressed by its last suffix (.gz, .bz2, .xz)."""
    opener = COMPRESSIONS.get(path.suffix)
    return opener(path, "rt") if opener else path.open()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open_text(path) as f:
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
    with _open_text(path) as f:
        text = f.read()
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


@dataclass(frozen=True)
class Source:
    """One place rows come from, with the recipe keys to name in its errors."""

    path: str
    split: str = ""
    """A named split; "" picks by `role` (train: "train"; eval: test/validation/...)."""
    subset: str = ""
    """The dataset config name (hub ids and directories whose README.md lists configs)."""
    weight: float = 1.0
    """Share of a mixture (normalised over the sources)."""
    role: str = "train"
    key: str = "data.train_path"
    split_key: str = "data.train_split"

    def __str__(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else self.path


def _format_suffix(p: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of a file name: data.jsonl.gz -> (".jsonl", ".gz")."""
    compression = p.suffix if p.suffix in COMPRESSIONS else ""
    base = Path(p.name[: len(p.name) - len(compression)]) if compression else p
    return base.suffix, compression


def read_file(p: Path) -> datasets.Dataset:
    """One data file, its rows checked (JSON lines by line number, CSV text columns as text)."""
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    ext, compression = _format_suffix(p)
    if ext == ".jsonl":
        return _from_rows(p, _read_jsonl(p))
    if ext == ".json":
        return _from_rows(p, _read_json(p))
    builder = EXTENSIONS.get(ext)
    if builder is None or (builder == "parquet" and compression):
        kinds = ", ".join(EXTENSIONS)
        raise DataError(
            f"{p}: unsupported file type (expected {kinds}; json/csv may end in .gz, .bz2, .xz)"
        )
    try:
        return _read_csv(p) if builder == "csv" else _read_parquet(p)
    except Exception as e:  # the builders raise many types; report them in one form
        raise DataError(f"{p}: could not be read as {builder}: {one_line(str(e))}") from None


def _read_files(files: list[Path], where: str) -> datasets.Dataset:
    parts = [read_file(f) for f in files]
    if len(parts) == 1:
        return parts[0]
    for f, part in zip(files[1:], parts[1:]):
        if part.features != parts[0].features:
            raise DataError(
                f"{where}: {f} has columns {dict(part.features)} but {files[0]} has "
                f"{dict(parts[0].features)}; the files of one split must share columns and types"
            )
    return datasets.concatenate_datasets(parts)


def _readme_configs(p: Path) -> list[str]:
    """Config names listed in a dataset directory's README.md YAML header (`configs:`)."""
    readme = p / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return []
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list):
        return []
    return [str(c.get("config_name", "default")) for c in configs if isinstance(c, dict)]


def _data_dir_splits(p: Path) -> dict[str, list[Path]]:
    """Split -> files of a hub-style directory, by datasets' own naming rules (train.jsonl,
    data/train-00000-of-00002.parquet, train/shard_0.csv, one file for a lone "train", ...)."""
    try:
        patterns = datasets.data_files.get_data_patterns(str(p))
    except FileNotFoundError:
        raise DataError(
            f"{p}: a directory with no data files (.jsonl, .json, .parquet, .csv), and not one "
            "written by datasets.save_to_disk"
        ) from None
    splits = {}
    for split, split_patterns in patterns.items():
        found = datasets.data_files.DataFilesList.from_patterns(split_patterns, base_path=str(p))
        files = [Path(f) for f in found if _format_suffix(Path(f))[0] in EXTENSIONS]
        if files:
            splits[split] = sorted(files)
    if not splits:
        raise DataError(f"{p}: a directory with no .jsonl, .json, .parquet or .csv files")
    return splits


def pick_split(names: list[str], source: Source) -> str:
    """The split `source` asks for, or by default "train" (train role) / the first of
    EVAL_SPLITS (eval role) / the only one there is."""
    if source.split:
        if source.split in names:
            return source.split
        raise DataError(
            f"{source.path}: no split {source.split!r} (has {', '.join(names)}); "
            f"set {source.split_key} to one of them"
        )
    for name in ("train",) if source.role == "train" else EVAL_SPLITS:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise DataError(
        f"{source.path}: which split? it has {', '.join(names)}; set {source.split_key}"
    )


def _no_subset(source: Source, what: str) -> None:
    if source.subset:
        raise DataError(
            f"{source.path}: data.subset={source.subset!r} names a dataset config, but {what} has "
            "none (configs exist on hub ids and on directories whose README.md lists `configs:`)"
        )


def _load_from_disk(p: Path, source: Source) -> datasets.Dataset:
    _no_subset(source, "a save_to_disk directory")
    loaded = datasets.load_from_disk(str(p))
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[pick_split(list(loaded), source)]
    pick_split(["train"], source)
    return loaded


def _load_configured_dir(p: Path, source: Source, configs: list[str]) -> datasets.Dataset:
    if source.subset and source.subset not in configs:
        raise DataError(
            f"{p}: no subset {source.subset!r} (README.md lists {', '.join(configs)}); "
            "set data.subset to one of them"
        )
    try:
        loaded = datasets.load_dataset(str(p), name=source.subset or None)
    except Exception as e:
        raise DataError(f"{p}: could not be loaded as a dataset: {one_line(str(e))}") from None
    return loaded[pick_split(list(loaded), source)]


def _load_hub(text: str, source: Source) -> datasets.Dataset:
    hub.require_hub(text, "file or directory", DataError)
    name = source.subset or None
    try:
        split = source.split or pick_split(datasets.get_dataset_split_names(text, name), source)
        return datasets.load_dataset(text, name=name, split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{text}: not a local file and not loadable from the hub: {one_line(str(e))}"
            f"{hub.offline_hint()}"
        ) from None


def load_rows(path: str | Path | Source, split: str = "", subset: str = "") -> datasets.Dataset:
    """The rows of one split of a source (see the module docstring for what a source is)."""
    source = path if isinstance(path, Source) else Source(str(path), split, subset)
    text = source.path
    if not text.strip():
        raise DataError(
            f"{source.key} is empty: set it to a data file (.jsonl, .json, .parquet, .csv), a "
            "glob such as data/*.jsonl, a dataset directory or a hub id"
        )
    p = Path(text).expanduser()
    if glob.has_magic(text) and not p.exists():
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{text}: no files match this pattern")
        _no_subset(source, "a glob")
        pick_split(["train"], source)
        return _read_files(files, text)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return _load_from_disk(p, source)
        configs = _readme_configs(p)
        if configs:
            return _load_configured_dir(p, source, configs)
        _no_subset(source, "this directory")
        splits = _data_dir_splits(p)
        split_name = pick_split(list(splits), source)
        return _read_files(splits[split_name], f"{p}[{split_name}]")
    if _format_suffix(p)[0] in EXTENSIONS or p.exists():
        _no_subset(source, "a file")
        pick_split(["train"], source)
        return read_file(p)
    if "/" in text and not text.startswith((".", "/", "~")):
        return _load_hub(text, source)  # looks like a hub id ("org/name")
    raise DataError(f"data file not found: {p}")


def require_columns(ds: datasets.Dataset, columns: list[str], source: str, expected: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column {', '.join(repr(m) for m in missing)}; expected {expected} "
            f"(found: {', '.join(ds.column_names)})"
        )
