"""Build a tiny chat model on disk with no download.

Tests and an offline first run need a real engine serving a real model, but this machine (and many compute
nodes) cannot reach a model hub. The model built here has random weights, so its answers are noise; what
matters is that it is a genuine Hugging Face checkpoint with a byte-level BPE tokenizer and a chat template,
so an OpenAI-compatible engine loads and serves it exactly like a downloaded one.

Run as ``python -m first_jupyter.remote.tiny_model OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TINY_MODEL_MARKER = "first_jupyter_tiny_model.json"

_CORPUS = (
    "FIRST runs inference on the hot nodes of your own cluster.",
    "Globus Compute carries each request to an endpoint, and vLLM answers it.",
    "Hello! How can I help you with your notebook today?",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Scientists chat with models, embed documents and submit batches of prompts.",
    "system user assistant: {} [] () <> = + - * / , . ; ? !",
)

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def build_tiny_model(out_dir: Path, *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """Write a randomly initialised Llama-style causal LM with its tokenizer to ``out_dir``.

    Idempotent: a directory that already holds a complete tiny model is left as it is, so a first run pays
    the few seconds once.
    """
    out_dir = Path(out_dir)
    if (out_dir / TINY_MODEL_MARKER).is_file():
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # special-token names, not secrets
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",  # noqa: S106
    )
    fast.chat_template = _CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    (out_dir / TINY_MODEL_MARKER).write_text(
        json.dumps({"random_weights": True, "note": "answers from this model are random tokens"}) + "\n"
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight chat model for offline use.")
    parser.add_argument("out_dir", type=Path, help="directory to write the model to")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
