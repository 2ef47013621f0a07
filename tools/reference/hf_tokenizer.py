"""Reference encoder/decoder for byte-level BPE Hugging Face tokenizer.json files (GPT-2 style).

Pure Python plus the `regex` module (for \\p{L} / \\p{N}).  Handles: model type BPE with vocab +
merges (merges as "a b" strings or ["a", "b"] pairs), pre_tokenizer ByteLevel (use_regex, optional
add_prefix_space) alone or inside a Sequence, decoder ByteLevel, added_tokens (matched literally in
the input before pre-tokenization, like HF does for special tokens), and a post_processor
TemplateProcessing (alone or inside a Sequence) for add_special_tokens=True.

It does not implement normalizers, Split pre-tokenizers with other patterns, byte_fallback,
dropout, or continuing_subword_prefix; load() raises on those.
"""

import json

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
_PAT = regex.compile(GPT2_PATTERN)


def pretokenize(text):
    """GPT-2 regex split, each piece mapped bytes -> unicode chars."""
    return ["".join(BYTE_TO_UNICODE[b] for b in piece.encode("utf-8")) for piece in _PAT.findall(text)]


def bpe_merge(symbols, ranks):
    """Applies merges by rank (lowest first, leftmost first on ties) to a list of symbols."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = None
        best_rank = None
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best = r, (symbols[i], symbols[i + 1])
        if best is None:
            break
        merged = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


class Tokenizer:
    def __init__(self, tj):
        model = tj["model"]
        if model.get("type") != "BPE":
            raise ValueError("only BPE models are supported")
        for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ValueError("unsupported BPE option %s" % key)
        if tj.get("normalizer"):
            raise ValueError("normalizers are not supported")
        self.vocab = dict(model["vocab"])
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        merges = []
        for m in model["merges"]:
            a, b = (m.split(" ") if isinstance(m, str) else m)
            merges.append((a, b))
        self.ranks = {m: i for i, m in enumerate(merges)}
        pre = tj.get("pre_tokenizer") or {}
        pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        self.add_prefix_space = False
        for p in pres:
            if p.get("type") != "ByteLevel" or not p.get("use_regex", True):
                raise ValueError("only ByteLevel(use_regex=true) pre-tokenizers are supported")
            self.add_prefix_space = bool(p.get("add_prefix_space", False))
        self.added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        self.added_ids = set(self.added.values())
        for c, i in self.added.items():
            self.id_to_token[i] = c
        self.special_ids = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
        if self.added:
            alts = sorted(self.added, key=lambda s: (-len(s), s))
            self._added_re = regex.compile("|".join(regex.escape(a) for a in alts))
        else:
            self._added_re = None
        self.prefix_ids, self.suffix_ids = [], []
        post = tj.get("post_processor") or {}
        posts = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for p in posts:
            if p.get("type") == "TemplateProcessing":
                seen_a = False
                for piece in p["single"]:
                    if "SpecialToken" in piece:
                        tok = piece["SpecialToken"]["id"]
                        ids = p["special_tokens"][tok]["ids"]
                        (self.suffix_ids if seen_a else self.prefix_ids).extend(ids)
                    else:
                        seen_a = True
        self._cache = {}

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def _encode_word(self, word):
        ids = self._cache.get(word)
        if ids is None:
            ids = [self.vocab[s] for s in bpe_merge(list(word), self.ranks)]
            self._cache[word] = ids
        return ids

    def encode_ordinary(self, text):
        """Text -> ids, no added-token matching, no template."""
        if self.add_prefix_space and text and not text[0].isspace():
            text = " " + text
        out = []
        for w in pretokenize(text):
            out.extend(self._encode_word(w))
        return out

    def encode(self, text, add_special_tokens=True):
        out = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                out.extend(self.encode_ordinary(text[pos:m.start()]) if m.start() > pos else [])
                out.append(self.added[m.group(0)])
                pos = m.end()
        if pos < len(text):
            out.extend(self.encode_ordinary(text[pos:]))
        if add_special_tokens:
            out = self.prefix_ids + out + self.suffix_ids
        return out

    def decode(self, ids, skip_special_tokens=False):
        parts = []
        buf = bytearray()
        for i in ids:
            tok = self.id_to_token[i]
            if i in self.added_ids:
                if buf:
                    parts.append(buf.decode("utf-8", errors="replace"))
                    buf = bytearray()
                if not (skip_special_tokens and i in self.special_ids):
                    parts.append(tok)
                continue
            buf.extend(UNICODE_TO_BYTE[c] for c in tok)
        if buf:
            parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)
