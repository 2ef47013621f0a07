"""Byte-level BPE training (GPT-2 style) and export as a Hugging Face tokenizer.json.

Vocabulary layout (ids):
  0..255                 the 256 byte symbols, id == byte value (symbol = GPT-2 bytes_to_unicode char)
  256..                  merged tokens, in the order the merges created them
  vocab_size - S ..      added special tokens (S of them), in the order given
Training: text is split with the GPT-2 regex (tools/reference/hf_tokenizer.GPT2_PATTERN), pieces are
counted, and the most frequent adjacent symbol pair is merged repeatedly.  Ties break on the
smaller (id_a, id_b), so the result is deterministic.
"""

import heapq
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
import hf_tokenizer  # noqa: E402


def count_words(texts):
    counts = Counter()
    for t in texts:
        counts.update(hf_tokenizer.pretokenize(t))
    return counts


def train_bpe(word_counts, num_tokens, log=None, segmentation=None):
    """word_counts: {pretoken (byte-level unicode str): count}.

    Merges until the vocabulary (256 bytes + merged tokens) has num_tokens entries.  Returns
    (tokens, merges): tokens[i] is the string of id i; merges is the list of (a, b) strings in rank
    order.  A merge whose result string already exists (e.g. "ab"+"c" after "a"+"bc") reuses that
    id, as HF's BpeTrainer does, so len(merges) can exceed num_tokens - 256.  If `segmentation` is a
    dict, it receives {word: [token ids]} as the training ended."""
    tokens = [hf_tokenizer.BYTE_TO_UNICODE[b] for b in range(256)]
    tok_id = {t: i for i, t in enumerate(tokens)}
    words = []
    freqs = []
    for w, c in sorted(word_counts.items()):
        words.append([tok_id[ch] for ch in w])
        freqs.append(c)
    pair_count = Counter()
    pair_words = {}
    for wi, syms in enumerate(words):
        f = freqs[wi]
        for a, b in zip(syms, syms[1:]):
            pair_count[(a, b)] += f
            pair_words.setdefault((a, b), set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(tokens) < num_tokens and heap:
        negc, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c <= 0:
            continue
        if -negc != c:  # stale entry; the current count was pushed separately
            continue
        a, b = pair
        new_str = tokens[a] + tokens[b]
        new_id = tok_id.get(new_str)
        if new_id is None:
            new_id = len(tokens)
            tokens.append(new_str)
            tok_id[new_str] = new_id
        merges.append((tokens[a], tokens[b]))
        changed = set()
        for wi in sorted(pair_words.pop(pair, ())):
            syms = words[wi]
            f = freqs[wi]
            # remove this word's old pair contributions
            for p in zip(syms, syms[1:]):
                pair_count[p] -= f
                changed.add(p)
            out = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] += f
                changed.add(p)
                pair_words.setdefault(p, set()).add(wi)
        pair_count.pop(pair, None)
        for p in changed:
            cnt = pair_count.get(p, 0)
            if cnt > 0:
                heapq.heappush(heap, (-cnt, p))
            else:
                pair_count.pop(p, None)
        if log and len(merges) % 250 == 0:
            log("  bpe: %d merges, last %r (count %d)" % (len(merges), new_str, c))
    if segmentation is not None:
        for wi, (w, _) in enumerate(sorted(word_counts.items())):
            segmentation[w] = words[wi]
    return tokens, merges


def build_tokenizer_json(tokens, merges, special_tokens, bos_token, vocab_size):
    """HF tokenizer.json dict.  tokens: id -> string from train_bpe; special_tokens: strings placed
    at the end of the vocab."""
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError("duplicate token %r" % tok)
        vocab[tok] = i
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError("merge %r %r refers to unknown tokens" % (a, b))
    first_special = vocab_size - len(special_tokens)
    if len(vocab) != first_special:
        raise ValueError("vocab has %d entries, expected %d" % (len(vocab), first_special))
    added = []
    for j, s in enumerate(special_tokens):
        vocab[s] = first_special + j
        added.append({"id": first_special + j, "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    bos_id = vocab[bos_token]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": dict(byte_level),
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}},
                               {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}},
                             {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos_token, "type_id": 1}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
                },
            ],
        },
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": ["%s %s" % m for m in merges],
        },
    }


def write_tokenizer_files(out_dir, tokenizer_json, bos_token, eos_token, model_max_length):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, indent=2, ensure_ascii=False)
        f.write("\n")
    added_decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                       "single_word", "special")}
                     for t in tokenizer_json["added_tokens"]}
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_decoder,
        "bos_token": bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "model_max_length": model_max_length,
        "pad_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
