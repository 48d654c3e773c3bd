#!/usr/bin/env python3
"""Synthetic needle-in-a-haystack documents for the needle-llama model (training and the
accuracy harness share this file, so the model is evaluated on the distribution it was
trained on, only longer).

A document is filler prose with facts ("needles") planted at random sentence boundaries,
followed by one question about one or several of them and the answer:

    <filler> The access code of the blue vault is 48213. <filler> ...
    Question: What is the access code of the blue vault?
    Answer: 48213.

Several facts: "What are the access codes of the blue vault and the red door?" ->
"Answer: 48213, 99120." (the order of the question). Everything is bytes-level text: the
runtime's byte tokenizer maps each byte to its id, BOS is 256 and EOS 257.

Standard library only (the CPU machine has no numpy/torch); `random.Random(seed)` makes
every document reproducible from (seed, index).
"""
import random

BOS, EOS, PAD = 256, 257, 258  # byte tokenizer specials <s>, </s>, <unk> (see make_model.cpp)
VOCAB = 259

COLORS = ["red", "blue", "green", "black", "white", "golden", "silver", "purple", "orange", "grey", "brown", "pink"]
THINGS = ["vault", "door", "locker", "safe", "gate", "box", "cabinet", "drawer", "chest", "room", "tower", "garage"]

# Filler: plain sentences from a small grammar. No digits, no "code", so a needle is the only
# place an answer can come from.
_SUBJECTS = ["the old farmer", "a young teacher", "the quiet river", "my neighbour", "the tall tree", "a small bird",
             "the baker", "the children", "an old sailor", "the village", "the morning train", "a grey cat",
             "the wind", "her brother", "the market", "a tired horse", "the doctor", "the painter"]
_VERBS = ["walks past", "looks at", "waits near", "sings about", "thinks of", "runs toward", "sleeps beside",
          "talks to", "carries", "remembers", "follows", "paints", "watches", "finds", "leaves"]
_OBJECTS = ["the bridge", "a wooden cart", "the harbour", "the green hills", "an empty field", "the long road",
            "the bakery", "a quiet garden", "the stone wall", "the narrow street", "the evening sky", "the lake",
            "a basket of apples", "the station", "the forest", "the church bell", "the fishing boats"]
_TAILS = ["", "", "", " every morning", " in the rain", " after lunch", " without a word", " for a while",
          " again and again", " before sunset", " with great care", " in the spring"]


def filler_sentence(rng):
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
    return s[0].upper() + s[1:] + " "


def needle_sentence(key, code):
    return f"The access code of the {key} is {code}. "


def question_text(keys):
    if len(keys) == 1:
        return f"\nQuestion: What is the access code of the {keys[0]}?\nAnswer:"
    names = ", ".join(f"the {k}" for k in keys[:-1]) + f" and the {keys[-1]}"
    return f"\nQuestion: What are the access codes of {names}?\nAnswer:"


def answer_text(codes):
    return " " + ", ".join(codes) + "."


def random_facts(rng, n):
    keys = rng.sample([f"{c} {t}" for c in COLORS for t in THINGS], n)
    codes = [f"{rng.randrange(10000, 100000)}" for _ in range(n)]
    return keys, codes


def haystack(rng, n_bytes):
    parts, size = [], 0
    while size < n_bytes:
        s = filler_sentence(rng)
        parts.append(s)
        size += len(s)
    return parts


def make_document(rng, length, n_needles, n_asked, depths=None):
    """A document of about `length` tokens (BOS + bytes of prompt + answer).

    Returns (prompt, answer, keys_asked, codes_asked). `depths`, when given, places needle i
    at that fraction of the filler (0 = start, 1 = end); otherwise depths are uniform.
    """
    keys, codes = random_facts(rng, n_needles)
    asked = rng.sample(range(n_needles), n_asked)
    q = question_text([keys[i] for i in asked])
    a = answer_text([codes[i] for i in asked])
    needles = [needle_sentence(k, c) for k, c in zip(keys, codes)]
    budget = length - 1 - len(q) - len(a) - sum(len(s) for s in needles)
    parts = haystack(rng, max(budget, 0))
    # Trim the filler to the budget at a sentence boundary (at least one sentence stays).
    size = sum(len(p) for p in parts)
    while len(parts) > 1 and size > budget:
        size -= len(parts.pop())
    if depths is None:
        depths = [rng.random() for _ in needles]
    slots = sorted(((min(max(d, 0.0), 1.0), i) for i, d in enumerate(depths)), reverse=True)
    for depth, i in slots:  # insert deepest first so earlier indices stay valid
        parts.insert(round(depth * len(parts)), needles[i])
    prompt = "".join(parts).rstrip() + q
    return prompt, a, [keys[i] for i in asked], [codes[i] for i in asked]


def encode(text):
    return list(text.encode("utf-8"))


def training_example(rng, max_len):
    """(tokens, answer_mask): BOS + prompt + answer + EOS, at most max_len tokens, length
    uniform so that facts sit at every distance from the question."""
    while True:
        length = rng.randrange(max(96, max_len // 6), max_len + 1)
        n = rng.choice([1, 1, 2, 3, 4])
        n_asked = min(rng.choice([1, 1, 1, 2, 3]) if n > 1 else 1, n)
        prompt, answer, _, _ = make_document(rng, length - 1, n, n_asked)
        p, a = encode(prompt), encode(answer)
        tokens = [BOS] + p + a + [EOS]
        if len(tokens) <= max_len:  # rare overflow (many facts in a short document): draw again
            break
    mask = [0] * (1 + len(p)) + [1] * (len(a) + 1)
    return tokens, mask


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="print sample documents and the generator's speed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--write-docs", metavar="FILE", help="write --count documents (prompt + answer), one after another")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if args.write_docs:
        with open(args.write_docs, "w") as f:
            for _ in range(args.count):
                n = rng.choice([1, 2, 3, 4])
                prompt, answer, _, _ = make_document(rng, args.len - 2, n, rng.randint(1, min(n, 3)))
                f.write(prompt + answer + "\n\n")
        raise SystemExit(0)
    for _ in range(args.count):
        tokens, mask = training_example(rng, args.len)
        text = bytes(t for t in tokens if t < 256).decode()
        answer = bytes(t for t, m in zip(tokens, mask) if m and t < 256).decode()
        print(f"--- {len(tokens)} tokens, answer {answer!r}\n{text}\n")
    t0 = time.time()
    n = 2000
    for _ in range(n):
        training_example(rng, args.len)
    print(f"{n / (time.time() - t0):.0f} examples/s")
