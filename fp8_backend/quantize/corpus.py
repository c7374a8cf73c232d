"""Calibration texts: a user file, or a small default English corpus shipped here.

A user file is read whole (one text per line or running text alike); the tokenized stream is
cut into ``num_samples`` windows of ``seq_len`` tokens, so short lines and long documents both
work. Static scales only need typical activation ranges, not a large corpus.
"""

from __future__ import annotations

from pathlib import Path

from .options import QuantizeError

DEFAULT_CORPUS = """\
The history of science is the study of the development of science and scientific knowledge.
A computer is a machine that can be programmed to carry out sequences of arithmetic or logical operations.
The river flows through the valley, past farms and small towns, before it reaches the sea.
In mathematics, a prime number is a natural number greater than one that is not a product of two smaller numbers.
She opened the window and the cool morning air filled the room with the smell of rain.
The committee will meet on Tuesday to discuss the budget for the next fiscal year.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))
Photosynthesis converts light energy into chemical energy that fuels the activities of living organisms.
The recipe calls for two cups of flour, one egg, a pinch of salt and a cup of warm milk.
Neural networks are trained by gradient descent, adjusting weights to reduce a loss function.
Q: What is the capital of Japan? A: The capital of Japan is Tokyo.
The orchestra played the symphony's final movement with remarkable energy and precision.
Quantization maps floating point values to a small set of numbers, trading precision for memory and speed.
1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987.
The old lighthouse stood on the cliff, its lamp guiding ships through the stormy night.
"""


def load_texts(path: str | None) -> str:
    """The calibration text: the file at ``path`` (UTF-8), or :data:`DEFAULT_CORPUS`."""
    if path is None:
        return DEFAULT_CORPUS
    p = Path(path)
    if not p.is_file():
        raise QuantizeError(f"calib: expected a text file, found no file at {str(p)!r}")
    data = p.read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    nul = b"\x00" in data
    if nul or bad > 0.01 * max(1, len(text)):
        raise QuantizeError(
            f"calib: expected a UTF-8 text file, found binary data in {str(p)!r} "
            f"({bad} of {len(text)} characters are not UTF-8{', and NUL bytes' if nul else ''})"
        )
    if not text.strip():
        raise QuantizeError(f"calib: expected calibration text, found an empty file {str(p)!r}")
    return text


def token_windows(tokenizer, text: str, num_samples: int, seq_len: int) -> list[list[int]]:
    """Up to ``num_samples`` windows of ``seq_len`` token ids from ``text``; the text is repeated
    when it is shorter than num_samples * seq_len tokens (a small corpus still fills the batch)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise QuantizeError("calib: expected text that tokenizes to at least one token, found none")
    need = num_samples * seq_len
    stream = (ids * (need // len(ids) + 1))[:need] if len(ids) < need else ids[:need]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)][:num_samples]
