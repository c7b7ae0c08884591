"""Tokenising a data set once: `datasets.map` with `num_proc`, cached on disk, main process first.

Each data family (sft, preference, kto) gives a batch function that runs its per-row encoder
(data/encoding.py) over the rows of a batch; this module runs it through `Dataset.map`, so the
rows and masks are exactly those of the per-row encoder (tests/test_data_loading.py checks).

The cache file lives in the datasets cache (HF_DATASETS_CACHE/posttrain-tokenized) under a
fingerprint of: the rows (datasets' own fingerprint of the loaded split), the tokenizer (its
vocabulary and merges, special tokens and chat template), the settings that change tokens
(format, max_length, truncation side, ...) and the source of the encoding modules, so a change
to any of them tokenises again. Under several processes the main process tokenises and writes
the file while the others wait (`accelerator.main_process_first`), then they read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from posttrain.data.loading import Source
from posttrain.data.sources import mix

# Modules whose code decides the tokens: part of the cache key.
_ENCODING_MODULES = ("chat.py", "encoding.py", "preference.py", "kto.py", "tokenized.py")


@dataclass(frozen=True)
class MapOptions:
    """How to run the tokenisation map (data.num_proc, data.cache, the accelerator's barrier)."""

    num_proc: int = 1
    cache: bool = True
    main_process_first: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext
    )
    seed: int = 0
    """Seeds a mixture's interleaving (train.seed)."""

    @classmethod
    def from_config(cls, cfg, accelerator=None) -> MapOptions:
        first = accelerator.main_process_first if accelerator is not None else None
        return cls(
            num_proc=cfg.data.num_proc,
            cache=cfg.data.cache,
            main_process_first=first or contextlib.nullcontext,
            seed=cfg.train.seed,
        )


def _code_fingerprint() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _ENCODING_MODULES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that decides token ids (not where it was loaded from)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    for name in ("add_bos_token", "add_eos_token", "eos_token_id", "bos_token_id"):
        h.update(f"{name}={getattr(tokenizer, name, None)}".encode())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "posttrain-tokenized"


def encode_rows(
    rows: datasets.Dataset,
    batch_fn: Callable,
    fn_kwargs: dict,
    settings: dict,
    options: MapOptions,
    desc: str,
    features: datasets.Features,
) -> datasets.Dataset:
    """`rows.map(batch_fn)` (batched, with row indices), cached under a fingerprint of the rows,
    the tokenizer in fn_kwargs and `settings` (the values that change the tokens)."""
    key = json.dumps(
        {
            "rows": rows._fingerprint,
            "tokenizer": tokenizer_fingerprint(fn_kwargs["tokenizer"]),
            "code": _code_fingerprint(),
            "function": batch_fn.__qualname__,
            **settings,
        },
        sort_keys=True,
        default=str,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    kwargs = dict(
        batched=True,
        with_indices=True,
        fn_kwargs=fn_kwargs,
        remove_columns=rows.column_names,
        num_proc=min(options.num_proc, len(rows))
        if options.num_proc > 1 and len(rows) > 1
        else None,
        new_fingerprint=fingerprint,
        desc=desc,
        features=features,
    )
    if options.cache and datasets.is_caching_enabled():
        path = cache_dir() / f"{fingerprint}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        with options.main_process_first():
            return rows.map(
                batch_fn, cache_file_name=str(path), load_from_cache_file=True, **kwargs
            )
    return rows.map(batch_fn, keep_in_memory=True, **kwargs)


def encoded_chunks(rows: datasets.Dataset, encode: Callable, limit: int | None):
    """Encoded rows, for a caller that may stop after `limit` examples: the first `limit` rows,
    then (only if the caller asks, having too few) the rest. `encode(rows, offset)` gets the
    index of the first row, so row numbers in errors stay those of the file."""
    if limit is None or limit >= len(rows):
        yield encode(rows, 0)
        return
    yield encode(rows.select(range(limit)), 0)
    yield encode(rows.select(range(limit, len(rows))), limit)


def kept_rows(
    rows: datasets.Dataset, encode: Callable, limit: int | None, skip_reasons: tuple[str, ...]
) -> tuple[list[dict], dict[str, int], int]:
    """The encoded rows whose `status` is "ok" (at most `limit`), the count of the others per
    status (each one of `skip_reasons`), and how many rows were truncated (kept or not)."""
    skipped = dict.fromkeys(skip_reasons, 0)
    truncated = 0
    kept: list[dict] = []
    for chunk in encoded_chunks(rows, encode, limit):
        for e in chunk.to_list():
            if limit is not None and len(kept) >= limit:
                break
            truncated += e["truncated"]
            if e["status"] != "ok":
                skipped[e["status"]] += 1
                continue
            kept.append(e)
        if limit is not None and len(kept) >= limit:
            break
    return kept, skipped, truncated


def as_sources(path: str | Source | list[Source]) -> list[Source]:
    """A data argument (a path, a Source, or a mixture's list of them) as a list of Sources."""
    paths = path if isinstance(path, list) else [path]
    return [p if isinstance(p, Source) else Source(str(p)) for p in paths]


def summed_skips(parts: list) -> dict[str, int]:
    """The per-reason skip counts of several encoded sources, added up."""
    return {k: sum(p.skipped[k] for p in parts) for k in parts[0].skipped}


def mixed(per_source: list[list], sources: list[Source], seed: int) -> list:
    """The examples of several sources interleaved as loading.mix does (seeded, weighted)."""
    if len(per_source) == 1:
        return per_source[0]
    index = [
        datasets.Dataset.from_dict({"part": [k] * len(part), "index": list(range(len(part)))})
        for k, part in enumerate(per_source)
    ]
    order = mix(index, sources, seed)
    return [per_source[k][i] for k, i in zip(order["part"], order["index"])]
