#!/usr/bin/env python3
"""GPT-2's byte-level BPE in Python, for tests/unit/test_gpt2_tokenizer.cpp: the encoder of openai/gpt-2's
src/encoder.py (bytes_to_unicode, the pre-tokenizer pattern through the `regex` module, bpe() by merge
rank), with Hugging Face's handling of "<|endoftext|>". It shares no code with Titanax.

  gpt2_bpe_reference.py OUT_DIR
      learns up to 300 merges on a small multilingual text (the most frequent adjacent pair first, ties by the
      pair's spelling), writes OUT_DIR/vocab.json (the 256 bytes in encoder.py's order, the merges in
      order, "<|endoftext|>" last) and OUT_DIR/merges.txt ("#version: 0.2", then one pair per line), and
      OUT_DIR/cases.json: [{"text": ..., "ids": [...]}] for test strings the learned merges and the
      pattern's corners (contractions, digits, whitespace runs, non-Latin scripts, emoji) exercise.
"""
import json
import sys

import regex as re

PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs])), bs


BYTE_ENCODER, BYTE_ORDER = bytes_to_unicode()
BYTE_DECODER = {v: k for k, v in BYTE_ENCODER.items()}


def spell(token_bytes):
    return "".join(BYTE_ENCODER[b] for b in token_bytes)


def learn_merges(text, count):
    words = {}
    for w in PATTERN.findall(text):
        key = tuple(spell(w.encode("utf-8")))
        words[key] = words.get(key, 0) + 1
    merges = []
    for _ in range(count):
        pairs = {}
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def get_pairs(word):
    return set(zip(word, word[1:]))


def bpe(token, ranks):
    """encoder.py's Encoder.bpe: merge the lowest-ranked pair, every occurrence, until none has a rank."""
    word = tuple(token)
    pairs = get_pairs(word)
    if not pairs:
        return word
    while True:
        bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if bigram not in ranks:
            break
        first, second = bigram
        new_word = []
        i = 0
        while i < len(word):
            try:
                j = word.index(first, i)
            except ValueError:
                new_word.extend(word[i:])
                break
            new_word.extend(word[i:j])
            i = j
            if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                new_word.append(first + second)
                i += 2
            else:
                new_word.append(word[i])
                i += 1
        word = tuple(new_word)
        if len(word) == 1:
            break
        pairs = get_pairs(word)
    return word


def encode(text, encoder, ranks):
    ids = []
    for k, part in enumerate(text.split(EOT)):  # Hugging Face: the special token's text is its id
        if k:
            ids.append(encoder[EOT])
        for token in PATTERN.findall(part):
            ids.extend(encoder[t] for t in bpe(spell(token.encode("utf-8")), ranks))
    return ids


def load(folder):
    """The encoder (vocab.json) and merge ranks (merges.txt) of a GPT-2 tokenizer folder, as encoder.py's get_encoder."""
    with open(folder + "/vocab.json", encoding="utf-8") as f:
        encoder = json.load(f)
    with open(folder + "/merges.txt", encoding="utf-8") as f:
        merges = [tuple(l.rstrip("\n").split(" ")) for l in f if l.strip() and not l.startswith("#version")]
    return encoder, {m: i for i, m in reversed(list(enumerate(merges)))}


def decode(ids, encoder):
    """The bytes of ids (encoder.py's decode without the final UTF-8 decoding)."""
    decoder = {v: k for k, v in encoder.items()}
    return b"".join(decoder[i].encode() if decoder[i] == EOT else bytes(BYTE_DECODER[c] for c in decoder[i]) for i in ids)


TRAIN = """The jury said it did not find that many of the city's voters were unhappy. They'll say they've
seen it, and we'd agree: I'm sure you're right, isn't it? In 1961 there were 3,500 votes; in 2024, 12345 more.
Über die Straße gehen Käufer. Ça coûte très cher, naïve café! Привет, как дела? Это тест. 東京は日本の首都です。
数字：１２３、四五六。 Emoji 😀😀 and more 🎉 here. Tabs\tand   spaces   and
newlines\n\nagain. The the the quick brown fox jumps over the lazy dog. """ * 3

CASES = [
    "Hello world",
    "The jury said it did not find that many voters were unhappy.",
    "They'll say they've seen it; we'd agree. I'm sure you're right, isn't it? DON'T SHOUT",
    "In 1961 there were 3,500 votes and 12345678901 more, ²½ and Ⅻ.",
    "Über die Straße: Käufer zahlen 5€. Ça coûte très cher, naïve café!",
    "Привет, как дела? 東京は日本の首都です。数字：１２３、四五六。",
    "Emoji 😀😀🎉 and a flag 🇫🇷, zero\u200bwidth, no\u00a0break.",
    "Bonjour\u00a0! Ça va\u00a0? Oui\u3000\u3000«\u202fmerci\u202f»",  # Unicode spaces before punctuation
    "  leading spaces, trailing ones   ",
    "tabs\tand\t\tmore\ttabs and\nnewlines\n\n\n  indented\r\nwindows",
    "\n",
    " ",
    "",
    "a<|endoftext|>b",
    "<|endoftext|>The end.<|endoftext|>",
    "x" * 50 + " the the the",
    "''''s 's 't 're 've 'm 'll 'd ''",
    "abc123 a1a1 !a!a \n \n\n x",
    "東京は日本の首都です" * 300 + "数字" * 7 + "aaaaaaaaaaaaaaaaaaaaaaaaaaaaa",  # long unspaced runs: one pre-token each
]


def main():
    out = sys.argv[1]
    merges = learn_merges(TRAIN, 300)
    # Traps: merges across boundaries the pattern must keep (NBSP | "!", letter | digit, "!" | letter,
    # space | newline). The reference never applies them; a pre-tokenizer that failed to split there would.
    nbsp = spell("\u00a0".encode())
    for a, b in ((nbsp[0], nbsp[1]), (nbsp, "!"), ("a", "1"), ("!", "a"), (spell(b" "), spell(b"\n"))):
        if (a, b) not in merges:
            merges.append((a, b))
    vocab = [BYTE_ENCODER[b] for b in BYTE_ORDER] + [a + b for a, b in merges] + [EOT]
    encoder = {}
    for t in vocab:
        encoder.setdefault(t, len(encoder))
    ranks = {m: i for i, m in enumerate(merges)}
    with open(out + "/vocab.json", "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(out + "/merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(a + " " + b + "\n")
    cases = []
    for text in CASES:
        ids = encode(text, encoder, ranks)
        assert decode(ids, encoder) == text.encode("utf-8"), text
        cases.append({"text": text, "ids": ids})
    assert any(len(c["ids"]) < len(c["text"].encode("utf-8")) for c in cases), "no merge applied"
    with open(out + "/cases.json", "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main()
