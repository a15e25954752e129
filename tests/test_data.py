"""Domain data: three formats in, prompt-masked tensors out; bad data named by file and row."""

import json

import pytest
import torch

from loramix.data import IGNORE, DataError, batches, collate, load_domain, load_rows, tokenize_rows
from loramix.synthetic import build_tokenizer

ROWS = [{"prompt": "sort dcba=", "completion": "abcd"}, {"prompt": "reverse xyz=", "completion": "zyx"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["sort", "reverse"])


def write(tmp_path, fmt):
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), p)
    else:
        import datasets

        p = tmp_path / "d_ds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
def test_formats_load_the_same_rows(tmp_path, fmt):
    assert load_rows(write(tmp_path, fmt)) == ROWS


def test_custom_field_names(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "sort ba=", "answer": "ab"}) + "\n")
    assert load_rows(p, "question", "answer") == [{"prompt": "sort ba=", "completion": "ab"}]


def test_labels_mask_the_prompt(tok):
    (ex,) = tokenize_rows(ROWS[:1], tok, 32)
    assert tok.decode(ex.input_ids, skip_special_tokens=True) == "sort dcba=abcd"
    assert ex.labels[: ex.prompt_len] == [IGNORE] * ex.prompt_len
    assert ex.labels[ex.prompt_len :] == ex.input_ids[ex.prompt_len :]
    assert ex.input_ids[-1] == tok.eos_token_id and ex.input_ids[0] == tok.bos_token_id
    assert tok.decode(ex.input_ids[1 : ex.prompt_len]) == "sort dcba="


def test_collate_left_pads(tok):
    exs = tokenize_rows(ROWS, tok, 32, domain=1)
    b = collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape == (2, max(len(e.input_ids) for e in exs))
    short = b["attention_mask"][1]
    assert short[0] == 0 and short[-1] == 1  # left padding
    assert torch.equal(b["domain"], torch.tensor([1, 1]))
    p = collate(exs, tok.pad_token_id, prompt_only=True)
    assert (p["labels"] == IGNORE).all() and p["input_ids"].shape[1] == max(e.prompt_len for e in exs)


def test_batches_are_deterministic_and_resumable(tok):
    exs = tokenize_rows(ROWS * 5, tok, 32)
    a = [b["input_ids"] for b in batches(exs, 3, 0, seed=1, steps=6)]
    b = [b["input_ids"] for b in batches(exs, 3, 0, seed=1, steps=6, start=4)]
    assert len(a) == 6 and len(b) == 2
    assert all(torch.equal(x, y) for x, y in zip(a[4:], b))


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "has no rows"),
        ('{"prompt": "a"}\n', r"row 1: missing field 'completion'"),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n',
            r"row 2: field 'prompt' must be a string",
        ),
        ('{"prompt": "a", "completion": ""}\n', r"row 1: field 'completion' is empty"),
        ('{"prompt": "a", "completion": "b"}\nnot json\n', r"row 2: not valid JSON"),
        ("[1, 2]\n", r"row 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        load_rows(p)
    assert "bad.jsonl" in str(err.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        load_rows(tmp_path / "x.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a `datasets.save_to_disk` dataset"):
        load_rows(tmp_path / "folder")


def test_over_length_row_is_an_error(tmp_path, tok):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"prompt": "sort " + "a" * 40 + "=", "completion": "a"}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl' row 1: 46 tokens exceed `data.max_length` = 32"):
        load_domain(p, tok, 32)
