"""`switchboard make-demo-model DIR`: a tiny Llama checkpoint with random fp16 weights.

It has everything a real checkpoint has (config.json, model.safetensors, a byte-level BPE
tokenizer.json trained here with `tokenizers`, tokenizer_config.json with a chat template), so it
loads through exactly the code path a downloaded model takes. Weights come from a fixed seed:
the same directory every time, so its (meaningless) output is reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_NAME = "switchboard-demo"
SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Hermes/Qwen style tools: described in the first system turn (or one of their own), called as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, answered in <tool_response> turns.
# Without tools it writes exactly what it always has.
CHAT_TEMPLATE = (
    "{%- macro tools_block() -%}\n"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    "{%- endmacro -%}\n"
    "{{ bos_token }}{% set ns = namespace(tools_at=-1) %}{% if tools %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.tools_at = loop.index0 %}{% break %}{% endif %}{% endfor %}"
    "{% if ns.tools_at == -1 %}<|system|>\n{{ tools_block() }}<|end|>\n{% endif %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "<|user|>\n<tool_response>\n{{ m['content'] }}\n</tool_response><|end|>\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if loop.index0 == ns.tools_at %}{{ '\\n\\n' }}{{ tools_block() }}{% endif %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] %}{% for call in m['tool_calls'] %}"
    "{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": '
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ call.function.arguments | tojson }}{% endif %}}\n</tool_call>"
    "{% endfor %}{% endif %}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = """Switchboard routes each request to the least busy worker that serves the model.
It refuses honestly and fast when the fleet is full, with a Retry-After the client can trust.
The registry owns worker records; capacity follows the registry; heartbeats carry the load.
Workers run exllamav2 on GPUs, transformers on CPUs, or a simulator for tests and benchmarks.
A gap in the event sequence triggers a snapshot, so no state is ever silently lost.
The quick brown fox jumps over the lazy dog. 0123456789, punctuation: !?;:'"()[]{}<>/@#$%&*+-=
"""


def train_tokenizer(vocab_size: int = 1024) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return tokenizer


def make_demo_model(
    directory: Path, *, seed: int = 0, hidden_size: int = 512, layers: int = 2
) -> Path:
    """Write the checkpoint into directory (created); return it. Needs torch and transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))  # type: ignore[attr-defined]
    vocab = tokenizer.get_vocab_size()  # type: ignore[attr-defined]
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL}  # type: ignore[attr-defined]
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "</s>",
                "model_max_length": 2048,
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
                "added_tokens_decoder": {
                    str(i): {
                        "content": t,
                        "special": True,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "single_word": False,
                    }
                    for t, i in ids.items()
                },
            },
            indent=2,
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"})
    )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["</s>"],
        tie_word_embeddings=False,
        dtype="float16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def is_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))
