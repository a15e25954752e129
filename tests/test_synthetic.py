"""The demo world: tokenizer round trip, conflicting domains, the base shape, data files."""

import pytest
from transformers import AutoTokenizer

from loramix import synthetic
from loramix.data import load_rows


def test_tokenizer_round_trips_and_decodes_without_spaces(tmp_path):
    tok = synthetic.build_tokenizer(["reverse", "sort"])
    text = "reverse Hello, World! 123 ~\n="
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[0]) == "reverse"  # the cue is one token
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.padding_side == "left" and again.pad_token == "<pad>"


def test_every_printable_character_has_its_own_token():
    import string

    tok = synthetic.build_tokenizer([])
    for c in set(string.printable) - set("\x0b\x0c\r"):
        assert tok.convert_ids_to_tokens(tok(c, add_special_tokens=False)["input_ids"]) == [c]


def test_domains_conflict_on_the_same_input():
    outputs = {task: synthetic.TASKS[task]("world") for task in ("reverse", "sort", "rotate", "shift", "swap")}
    assert outputs == {"reverse": "dlrow", "sort": "dlorw", "rotate": "orldw", "shift": "xpsme", "swap": "owlrd"}


def test_rows_are_seeded_and_written_as_jsonl(tmp_path):
    rows = synthetic.make_rows("sort", 20, seed=3)
    assert rows == synthetic.make_rows("sort", 20, seed=3) != synthetic.make_rows("sort", 20, seed=4)
    assert all(r["prompt"].startswith("sort ") and r["prompt"].endswith("=") for r in rows)
    info = synthetic.write_demo_data(tmp_path, ["sort", "reverse"], train_size=10, eval_size=5)
    assert [d["name"] for d in info["domains"]] == ["sort", "reverse"]
    assert len(load_rows(info["domains"][0]["eval"])) == 5
    with pytest.raises(ValueError, match="unknown demo task 'nope'"):
        synthetic.make_rows("nope", 1, 0)


def test_base_is_sized_to_the_tokenizer():
    tok = synthetic.build_tokenizer(["reverse"])
    base = synthetic.build_base(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    assert base.config.vocab_size == len(tok) and base.config.tie_word_embeddings
