"""Build a tiny random Llama with a locally trained tokenizer (no hub), loadable by vLLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

# A little English for the tokenizer and for prompts. Any local text would do.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Machine learning models are trained on large amounts of text. Quantization stores weights in fewer bits.
FP8 numbers have a sign, four exponent bits and three mantissa bits. The largest value is four hundred
and forty eight. Rounding to nearest even keeps the error unbiased. The server answers requests over
HTTP. Paris is the capital of France. Water boils at one hundred degrees. The cat sat on the mat.
In the beginning there was only the command line, and the command line was good.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 128 448 2026. Punctuation: , . ; : ! ? ( ) [ ] { } " '
""" * 20

PROMPTS = [
    "The quick brown fox",
    "Quantization stores weights in",
    "Paris is the capital of",
    "FP8 numbers have a sign, four exponent bits and",
    "In the beginning there was only the command line, and the command line was good. Machine learning",
]


def build_tiny_llama(
    out: str | os.PathLike,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.08,
) -> Path:
    """Write config.json, model.safetensors (bf16) and tokenizer files to ``out``.

    ``init_std`` is larger than Llama's 0.02 so the random model's next-token distributions are
    peaked rather than uniform: log-prob comparisons then notice weight errors.
    Sizes are deliberately not multiples of 64 everywhere (intermediate 688) to exercise odd K/N.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    real_vocab = tok.get_vocab_size()

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 5 may write only rope_parameters; vLLM 0.32 reads rope_theta.
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data.setdefault("rope_theta", 10000.0)
    data["torch_dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(data, indent=2))
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(sys.argv[1]))


LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def fake_quant_copy(src: Path, dst: Path, strategy: str = "tensor", skip: tuple[str, ...] = ()) -> Path:
    """Copy of a checkpoint whose linear weights are replaced by dequantize(quantize(w)) per
    numerics.py, stored in the original 16-bit dtype: the FP8 model simulated in plain
    weights, for comparing the plugin's engine against the same math run by vLLM's bf16 path.
    (Storing the dequantized values in bf16 rounds them once more, by <= 2^-9 relative.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    from fp8_backend import numerics

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name.endswith(LINEAR_SUFFIXES) and not name.endswith(skip):
                if strategy == "tensor":
                    q, s = numerics.quantize_per_tensor(t.float())
                else:
                    q, s = numerics.quantize_per_channel(t.float())
                tensors[name] = numerics.dequantize(q, s).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    return dst
