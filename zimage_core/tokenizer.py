"""The Qwen byte-level BPE tokenizer (through the ``tokenizers`` library); prompts are cut at 512 tokens.
The template a prompt is wrapped in lives in templates.py.

The Qwen vocabulary ships inside the package (``qwen_tokenizer/``, Apache-2.0, from Qwen/Qwen3-4B), so the
standalone command runs with ComfyUI's split files on a machine without ComfyUI or an HF folder. It ships as
``merges.txt.xz`` alone: a byte-level BPE vocabulary is its 256 byte symbols then one token per merge, in order
(``byte_level_vocab``), so vocab.json (2.7 MB) is derived, and the merges compress from 1.7 MB to 0.6 MB.
"""

from __future__ import annotations

import json
import logging
import lzma
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import ZImageError
from .templates import TEMPLATE

log = logging.getLogger("zimage")

MAX_TOKENS = 512
PAD_ID = 151643  # <|endoftext|>
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_NEEDED = ("vocab.json", "merges.txt")
_BUNDLED_MERGES = "merges.txt.xz"  # the package's form: the merges alone, compressed
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen_tokenizer")


def _has_files(folder: str | None) -> bool:
    isfile = lambda n: os.path.isfile(os.path.join(folder, n))  # noqa: E731
    return bool(folder) and (isfile("tokenizer.json") or all(map(isfile, _NEEDED)) or isfile(_BUNDLED_MERGES))


def read_merges(folder: str) -> list[tuple[str, str]]:
    """The merge rules of ``merges.txt`` (or the package's ``merges.txt.xz``), in order."""
    plain = os.path.join(folder, "merges.txt")
    f = open(plain, encoding="utf-8") if os.path.isfile(plain) else lzma.open(plain + ".xz", "rt", encoding="utf-8")
    merges = []
    with f:
        for line in f:
            line = line.rstrip("\r\n")
            if line and not line.startswith("#version"):
                a, b = line.split(" ")
                merges.append((a, b))
    return merges


def byte_level_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """GPT-2's (and Qwen's) byte-level BPE vocabulary: ids 0–255 are the byte symbols in ``bytes_to_unicode`` order
    (printable bytes as themselves, the others from U+0100 on), then each merge's result, in merge order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    vocab = {chr(b): i for i, b in enumerate(printable)}
    vocab.update({chr(256 + i): len(printable) + i for i in range(len(rest))})
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    return vocab


def find_tokenizer_dir(explicit: str | None = None, model_path: str | None = None) -> str:
    """Explicit path → ``tokenizer/`` of an HF model folder → ``ZIMAGE_TOKENIZER`` → the copy in this package."""
    if explicit:
        if _has_files(explicit):
            return explicit
        if _has_files(os.path.join(explicit, "tokenizer")):
            return os.path.join(explicit, "tokenizer")
        raise ZImageError(f"Tokenizer folder {explicit} has no tokenizer.json or vocab.json + merges.txt.")
    if model_path:
        base = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
        for cand in (os.path.join(base, "tokenizer"), os.path.join(os.path.dirname(base), "tokenizer")):
            if _has_files(cand):
                return cand
    env = os.environ.get("ZIMAGE_TOKENIZER")
    if env:
        if not _has_files(env):
            raise ZImageError(f"ZIMAGE_TOKENIZER={env} has no tokenizer.json or vocab.json + merges.txt; fix or unset it.")
        return env
    if not _has_files(BUNDLED):
        raise ZImageError(f"The Qwen tokenizer files that ship with this package are missing from {BUNDLED}; reinstall it.")
    return BUNDLED


def build_tokenizer(folder: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to transformers' Qwen2Tokenizer for the same files; damaged files are named."""
    try:
        return _build(folder)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise ZImageError(f"The tokenizer files in {folder} are damaged ({type(e).__name__}: {str(e)[:160]}). "
                          "Download them again, or leave the tokenizer unset to use the copy in this package.") from None


def _build(folder: str) -> Tokenizer:
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        try:
            tok = Tokenizer.from_file(tj)
        except Exception as e:  # the Rust parser's own message says what is wrong
            raise ZImageError(f"{tj} is not a readable tokenizer file ({e}). Download it again.") from None
        # save_pretrained after a padded call stores padding/truncation in the file; diffusers' encode_prompt
        # pads to 512 and keeps only the attended tokens, so the prompt's own tokens are what counts
        tok.no_padding()
        tok.no_truncation()
        return tok
    merges = read_merges(folder)
    vocab_path = os.path.join(folder, "vocab.json")
    if os.path.isfile(vocab_path):
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    else:  # the package's copy: the merges alone
        vocab = byte_level_vocab(merges)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    added = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            added = json.load(f).get("added_tokens_decoder") or {}
    if not added:  # the bare vocabulary: at least the end-of-text and chat markers
        added = {str(PAD_ID + i): {"content": c, "special": True} for i, c in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    for idx in sorted(added, key=int):
        a = added[idx]
        token = AddedToken(a["content"], single_word=a.get("single_word", False), lstrip=a.get("lstrip", False),
                           rstrip=a.get("rstrip", False), normalized=a.get("normalized", False), special=a.get("special", False))
        (tok.add_special_tokens if a.get("special") else tok.add_tokens)([token])
        if tok.token_to_id(a["content"]) != int(idx):
            raise ZImageError(f"{folder}: added token {a['content']!r} got id {tok.token_to_id(a['content'])}, expected {idx}.")
    return tok


class PromptTokenizer:
    """Prompt strings → token id lists in Z-Image's chat template, cut at ``max_tokens`` with a warning."""

    def __init__(self, folder: str, max_tokens: int = MAX_TOKENS):
        self.folder, self.max_tokens = folder, max_tokens
        self.tok = build_tokenizer(folder)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def __call__(self, prompts: list[str], template: str = TEMPLATE) -> tuple[list[list[int]], list[int]]:
        """Token ids per prompt (inside ``template``) and how many tokens each lost to the limit."""
        out, dropped = [], []
        for p in prompts:
            ids = self.ids(template.format(p))
            cut = max(0, len(ids) - self.max_tokens)
            if cut:
                log.warning(
                    "Prompt is %d tokens long with the template; Z-Image reads at most %d, so the last %d tokens "
                    "were dropped (…%r).", len(ids), self.max_tokens, cut, self.tok.decode(ids[self.max_tokens:])[:60]
                )
            out.append(ids[: self.max_tokens])
            dropped.append(cut)
        return out, dropped
