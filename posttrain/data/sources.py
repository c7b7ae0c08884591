"""Which sources a recipe's data section names, and how a mixture of them is drawn.

`data.train_path` is one source or a list of {path, weight, split, subset}; a mixture is
`datasets.interleave_datasets` over the sources with probabilities = the normalised weights,
seeded with train.seed, stopping when the first source runs out ("first_exhausted": no row is
repeated, and a source's expected share of the result is its weight). Tokenising trainers mix
the encoded examples of each source (so sources may differ in format); RL trainers mix the
prompt rows.
"""

from __future__ import annotations

import datasets

from posttrain.data.loading import DataError, Source
from posttrain.errors import one_line


def train_sources(data) -> list[Source]:
    """The training sources of a `DataConfig`: one path, or a weighted mixture."""
    if isinstance(data.train_path, str):
        return [Source(data.train_path, data.train_split, data.subset)]
    if not data.train_path:
        raise DataError("data.train_path is an empty list: give at least one {path, weight}")
    return [
        Source(
            item.path,
            item.split or data.train_split,
            item.subset or data.subset,
            item.weight,
            key=f"data.train_path[{i}].path",
            split_key=f"data.train_path[{i}].split",
        )
        for i, item in enumerate(data.train_path)
    ]


def eval_source(data) -> Source | None:
    """Held-out rows: data.eval_path, or the train source's data.eval_split when only that is set."""
    path = data.eval_path
    if not path:
        if not data.eval_split:
            return None
        if not isinstance(data.train_path, str):
            raise DataError("data.eval_split without data.eval_path needs a single data.train_path")
        path = data.train_path
    return Source(
        path,
        data.eval_split,
        data.subset,
        role="eval",
        key="data.eval_path",
        split_key="data.eval_split",
    )


def describe(sources: list[Source]) -> str:
    """`a.jsonl`, or `a.jsonl (0.7) + b.jsonl (0.3)` for a mixture, for log lines."""
    if len(sources) == 1:
        return str(sources[0])
    total = sum(s.weight for s in sources)
    return " + ".join(f"{s} ({s.weight / total:.2g})" for s in sources)


def mix(parts: list[datasets.Dataset], sources: list[Source], seed: int) -> datasets.Dataset:
    """A weighted mixture: `datasets.interleave_datasets` with probabilities = the normalised
    weights, seeded with train.seed, stopping when the first source runs out (no row is
    repeated; a source's share of the result is its weight)."""
    if len(parts) == 1:
        return parts[0]
    total = sum(s.weight for s in sources)
    try:
        return datasets.interleave_datasets(
            parts,
            probabilities=[s.weight / total for s in sources],
            seed=seed,
            stopping_strategy="first_exhausted",
        )
    except ValueError as e:
        raise DataError(
            f"data.train_path: the mixture's sources ({describe(sources)}) do not share columns "
            f"and types: {one_line(str(e))}"
        ) from None
