"""The offline demo world: a character tokenizer, a tiny Llama, and conflicting domains.

Every domain maps the same kind of input (a short lowercase word) to a different output, and a
cue word at the start of the prompt names the domain::

    prompt: "reverse hello="   completion: "olleh"
    prompt: "sort hello="      completion: "ehllo"

so one LoRA cannot serve all domains well without knowing which one it is in, while a router
can. The base model is pre-trained on the same format with the identity (``copy``) so experts
adapt a model that already knows the format.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _rotate(s: str) -> str:
    return s[1:] + s[:1]


def _shift(s: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


def _swap(s: str) -> str:
    pairs = [s[i : i + 2][::-1] for i in range(0, len(s), 2)]
    return "".join(pairs)


# Domain name -> transformation. `copy` is what the base learns in pre-training.
TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "rotate": _rotate,
    "shift": _shift,
    "swap": _swap,
}


def build_tokenizer(cue_words: list[str] = tuple(TASKS)) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over printable ASCII, with cue words as single tokens.

    Round-trips through ``save_pretrained``/``from_pretrained``; decodes without spaces. The
    default cue words are the demo tasks, fixed, so adding a domain never changes the base;
    any other domain name is simply spelled out in characters.
    """
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL.values())}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL)
    fast.add_tokens(list(cue_words))  # whole-word tokens: the domain cue is one symbol
    return fast


def build_base(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size=128,
    intermediate_size=256,
    num_layers=4,
    num_heads=4,
    max_length=64,
) -> LlamaForCausalLM:
    """A tiny Llama (tied embeddings) sized to the tokenizer."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max(2 * max_length, 128),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def make_rows(task: str, n: int, seed: int, min_len: int = 4, max_len: int = 8) -> list[dict]:
    """``n`` prompt/completion rows of one task over random lowercase words."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose from {sorted(TASKS)}.")
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
        rows.append({"prompt": f"{task} {word}=", "completion": TASKS[task](word)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def write_demo_data(out_dir: str | Path, tasks: list[str], train_size: int = 4000, eval_size: int = 200) -> dict:
    """Write ``<task>.train.jsonl`` and ``<task>.eval.jsonl`` per task; returns the domains list."""
    out_dir = Path(out_dir)
    domains = []
    for task in tasks:
        train = write_jsonl(make_rows(task, train_size, seed=0), out_dir / f"{task}.train.jsonl")
        evals = write_jsonl(make_rows(task, eval_size, seed=1), out_dir / f"{task}.eval.jsonl")
        domains.append({"name": task, "train": str(train), "eval": str(evals)})
    return {"domains": domains}


def demo_artifact(
    path,
    *,
    recipe: str = "moa",
    top_k: int = 1,
    experts=("reverse", "sort", "shift"),
    seed: int = 0,
    router_steps=30,
    hidden_size: int = 64,
    num_layers: int = 2,
    router_kwargs: dict | None = None,
):
    """A saved mixture on the demo world in seconds, for tests and serving benchmarks: the char
    tokenizer (``path/tokenizer``), an untrained small Llama (``<path>-base``), random experts
    with B != 0 (``<path>-adapters/<name>``) and a MoA/MoLE/MoDULA router trained for a few
    steps on cue-worded prompts, so prompts route by their cue word. An untrained base ends greedy
    answers wherever EOS happens to win, which moved with every router change; here it never
    wins, so tests and the serving benchmark decode the lengths they ask for."""
    from peft import LoraConfig, get_peft_model  # demo_artifact only; the tokenizer/base builders need no PEFT

    from loramix import data, router_training  # demo_artifact only: these modules import this one's builders
    from loramix.config import RouterConfig  # demo_artifact only: these modules import this one's builders
    from loramix.model import MixtureModel  # demo_artifact only: these modules import this one's builders

    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    base = build_base(
        tokenizer, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=num_layers, num_heads=4
    ).eval()
    with torch.no_grad():  # EOS's logit is 0, never the largest of ~100 random ones: answers run to max_tokens
        base.get_output_embeddings().weight[tokenizer.eos_token_id].zero_()
    adapters = {}
    for i, name in enumerate(experts):
        torch.manual_seed(seed + i + 1)
        peft_model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:
                    p.mul_(4.0)
        peft_model.save_pretrained(str(path.parent / f"{path.name}-adapters" / name))
        adapters[name] = str(path.parent / f"{path.name}-adapters" / name)
        base = peft_model.unload()
    base.save_pretrained(str(path.parent / f"{path.name}-base"))
    mm = MixtureModel.from_adapters(base, adapters, router=recipe, top_k=top_k, **(router_kwargs or {}))
    torch.manual_seed(seed + 100)  # a briefly trained router, so prompts route by their cue word
    rows = [e for i, n in enumerate(experts) for e in data.tokenize_rows(make_rows(n, 64, seed), tokenizer, 32, i)]
    it = data.batches(rows, 32, tokenizer.pad_token_id, seed=seed, steps=router_steps)
    router_training.train_router(
        RouterConfig(steps=router_steps, lr=2e-2, warmup_ratio=0), mm, it, report=lambda m, c=None: None
    )
    mm.eval()
    mm.save_pretrained(path, base_path=str((path.parent / f"{path.name}-base").resolve()))
    tokenizer.save_pretrained(str(path / "tokenizer"))
    return path
