"""Token windows of a text file: what every accuracy figure of the project is computed on."""

from __future__ import annotations

import os
from pathlib import Path


def load_articles(path: str | os.PathLike) -> list[str]:
    """The texts of a UTF-8 file, one per block separated by a blank line."""
    text = Path(path).read_text(encoding="utf-8")
    return [a.strip() for a in text.split("\n\n") if a.strip()]


def make_windows(token_lists, n_windows: int = 40, window_len: int = 512, bos_id: int | None = None,
                 per_article: int = 1, groups: list | None = None) -> list[list[int]]:
    """First ``window_len`` tokens of each list that has that many (BOS counted in, if given),
    for the first ``n_windows`` such lists, in order. Raises if there are too few.

    ``per_article`` > 1: up to that many consecutive, non-overlapping windows of each such list
    (its tokens 0..L-1, L..2L-1, ...; BOS only before the first), so more text is scored without
    reaching further into the file. ``groups``, if a list, receives for every window the ordinal
    of its list among the lists with >= ``window_len`` tokens (0 for the first such list): windows
    of one article share it, for standard errors over articles."""
    if per_article < 1:
        raise ValueError(f"per_article: expected >= 1, found {per_article}")
    out = []
    n_long = 0
    for toks in token_lists:
        toks = ([bos_id] if bos_id is not None else []) + list(toks)
        if len(toks) < window_len:
            continue
        for j in range(min(per_article, len(toks) // window_len)):
            out.append(toks[j * window_len:(j + 1) * window_len])
            if groups is not None:
                groups.append(n_long)
            if len(out) == n_windows:
                return out
        n_long += 1
    raise ValueError(f"only {len(out)} windows of {window_len} tokens ({per_article} per text at most) in "
                     f"{n_long} long-enough texts; {n_windows} windows asked")


def text_windows(tokenizer, path, n_windows: int = 40, window_len: int = 512, bos: bool = False,
                 per_article: int = 1, groups: list | None = None) -> list[list[int]]:
    """Token windows of a text file with a Hugging Face tokenizer, WITHOUT special tokens (BOS
    only with ``bos``): see :func:`make_windows`."""
    toks = (tokenizer(a, add_special_tokens=False)["input_ids"] for a in load_articles(path))
    return make_windows(toks, n_windows, window_len, tokenizer.bos_token_id if bos else None, per_article, groups)


def token_windows(model: str, path, n_windows: int, window_len: int, per_article: int = 1,
                  groups: list | None = None) -> list[list[int]]:
    """:func:`text_windows` of the text file ``path`` with the tokenizer of the model directory
    ``model`` (no BOS)."""
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum": we cut windows
    tok = transformers.AutoTokenizer.from_pretrained(model)
    return text_windows(tok, path, n_windows, window_len, per_article=per_article, groups=groups)


def scored_windows(model: str, path, n_windows: int, window_len: int,
                   per_article: int = 1) -> tuple[list[list[int]], list[int], int]:
    """The token windows of the accuracy reports, the article (ordinal among long-enough
    articles) of each, and how many long articles calibration must skip: every one a window comes
    from, and at least 40, so that runs with up to 40 windows calibrate identically."""
    groups: list[int] = []
    windows = token_windows(model, path, n_windows, window_len, per_article, groups)
    return windows, groups, max(groups[-1] + 1, 40)


def calibration_text(model: str, path, skip_long: int, window_len: int, max_chars: int = 200_000) -> str:
    """Articles of the text file ``path`` after the ``skip_long``-th article with >= ``window_len``
    tokens (so after every article a scored window can come from), up to ``max_chars``
    characters. Raises ValueError if there are fewer such articles or under 10,000 characters
    after them."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    arts = load_articles(path)
    n_long = 0
    for i, a in enumerate(arts):
        if len(tok(a, add_special_tokens=False)["input_ids"]) >= window_len:
            n_long += 1
            if n_long == skip_long:
                rest = "\n\n".join(arts[i + 1:])[:max_chars]
                if len(rest) < 10_000:
                    raise ValueError(f"{path}: only {len(rest)} characters after the scored articles; "
                                     "expected at least 10,000 for calibration")
                return rest
    raise ValueError(f"{path}: expected at least {skip_long} articles of >= {window_len} tokens, found {n_long}")
