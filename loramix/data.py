"""Domain data: JSONL / Parquet / ``datasets`` folders -> tokenised, prompt-masked examples.

Each row has a prompt and a completion (field names configurable). The model sees
``prompt + completion + eos``; the loss covers only ``completion + eos`` (prompt labels are -100).
Bad data is an error that names the file, the row and the problem; nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IGNORE = -100


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


def load_rows(path: str | Path, prompt_field: str = "prompt", completion_field: str = "completion") -> list[dict]:
    """Read ``{prompt, completion}`` rows from a ``.jsonl``/``.json``/``.parquet`` file or a ``save_to_disk`` folder.

    Raises:
        DataError: missing path, unknown format, empty file, bad JSON, missing or non-string fields.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist. Check `data.domains[].train/eval`.")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DataError(f"{str(path)!r} is a folder but not a `datasets.save_to_disk` dataset.")
        import datasets  # slow import, only for `datasets` inputs

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{str(path)!r} holds splits {list(ds)}; point at one split's folder.")
        rows = ds.to_list()
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only for parquet inputs

        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    else:
        raise DataError(
            f"{str(path)!r}: unknown format {path.suffix!r}; use .jsonl, .json, .parquet or a datasets folder."
        )
    if not rows:
        raise DataError(f"{str(path)!r} has no rows.")
    for i, row in enumerate(rows, 1):
        for field in (prompt_field, completion_field):
            if field not in row:
                raise DataError(f"{str(path)!r} row {i}: missing field {field!r} (has {sorted(row)}).")
            if not isinstance(row[field], str):
                raise DataError(
                    f"{str(path)!r} row {i}: field {field!r} must be a string, got {type(row[field]).__name__}."
                )
        if not row[completion_field]:
            raise DataError(f"{str(path)!r} row {i}: field {completion_field!r} is empty; there is nothing to learn.")
    return [{"prompt": r[prompt_field], "completion": r[completion_field]} for r in rows]


def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{str(path)!r}: a .json file must be a list of objects.")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{str(path)!r} row {i}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{str(path)!r} row {i}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    domain: int = 0
    prompt_len: int = 0


def bos_ids(tokenizer) -> list[int]:
    """``[bos]``, or ``[]`` for tokenizers without one."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt laid out as :func:`tokenize_rows` lays out training prompts: BOS + tokens, no EOS."""
    return bos_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_rows(rows: Sequence[dict], tokenizer, max_length: int, domain: int = 0, source: str = "") -> list[Example]:
    """Tokenise rows into prompt-masked examples; over-long rows are an error naming the row."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    bos = bos_ids(tokenizer)
    eos = [tokenizer.eos_token_id]
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions), 1):
        ids = bos + p + c + eos
        if len(ids) > max_length:
            raise DataError(
                f"{source or 'data'} row {i}: {len(ids)} tokens exceed `data.max_length` = {max_length}. "
                "Raise max_length or shorten the row."
            )
        n_prompt = len(bos) + len(p)
        out.append(Example(ids, [IGNORE] * n_prompt + c + eos, domain, n_prompt))
    return out


def load_domain(
    path, tokenizer, max_length: int, domain: int = 0, prompt_field="prompt", completion_field="completion"
):
    """:func:`load_rows` + :func:`tokenize_rows` for one domain file."""
    rows = load_rows(path, prompt_field, completion_field)
    return rows, tokenize_rows(rows, tokenizer, max_length, domain, source=repr(str(path)))


def prompt_mask(batch: dict) -> torch.Tensor:
    """``[batch, seq]`` positions of real prompt tokens: routing may look only at what inference sees."""
    return batch["attention_mask"] * (batch["labels"] == IGNORE).long()


def collate(examples: Sequence[Example], pad_id: int, *, prompt_only: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch (left padding, so prompts end at the same position for generation).

    Args:
        prompt_only: keep only the prompt tokens (router features, generation).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``[batch, seq]`` and ``domain`` ``[batch]``.
    """
    seqs = [e.input_ids[: e.prompt_len] if prompt_only else e.input_ids for e in examples]
    labs = [e.labels[: e.prompt_len] if prompt_only else e.labels for e in examples]
    return pad_left(seqs, labs, pad_id) | {"domain": torch.tensor([e.domain for e in examples], dtype=torch.long)}


def pad_left(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token and label lists into ``input_ids``, ``attention_mask``, ``labels`` ``[batch, seq]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labs = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        labs[i, width - len(s) :] = torch.as_tensor(lab)
        mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labs}


def batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    steps: int | None = None,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches, reshuffled every epoch, deterministic in ``seed``; ``start`` skips steps (resume)."""
    if not examples:
        raise DataError("no training examples.")
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    step = 0
    while steps is None or step < steps:
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=g).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        if step >= start:
            yield collate([examples[i] for i in chunk], pad_id)
        step += 1
