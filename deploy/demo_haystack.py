#!/usr/bin/env python3
"""The quickstart's long-context job: a haystack of filler sentences with facts ("needles")
planted at chosen depths, and a question about one of them. When the trained needle model's
generator (tools/train_needle/needle_data.py) is present it writes the documents, so the
model is asked in the format it was trained on; otherwise the same format is written here.
  demo_haystack.py --tokens N --seed S --dir OUT   -> OUT/haystack.txt, question.txt, answer.txt"""
import argparse
import random
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, required=True, help="document length in bytes (= tokens of a byte tokenizer)")
parser.add_argument("--seed", type=int, default=7)
parser.add_argument("--needles", type=int, default=4)
parser.add_argument("--dir", required=True)
args = parser.parse_args()
if args.tokens < 200:
    sys.exit(f"--tokens: at least 200 (got {args.tokens})")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools/train_needle"))
try:
    import needle_data as data
    source = "tools/train_needle/needle_data.py"
except ImportError:
    data = None
    source = "deploy/demo_haystack.py"

rng = random.Random(args.seed)
# One fact at every depth from a tenth to nine tenths; the question asks the middle one.
depths = [0.1 + 0.8 * i / max(args.needles - 1, 1) for i in range(args.needles)]
if data is not None:
    prompt, answer, keys, codes = data.make_document(rng, args.tokens, args.needles, 1, depths=depths)
    question = data.question_text(keys)
else:
    colors = ["red", "blue", "green", "black", "white", "golden", "silver", "purple"]
    things = ["vault", "door", "locker", "safe", "gate", "box", "cabinet", "drawer"]
    keys = rng.sample([f"{c} {t}" for c in colors for t in things], args.needles)
    codes = [str(rng.randrange(10000, 100000)) for _ in keys]
    asked = rng.randrange(args.needles)
    question = f"\nQuestion: What is the access code of the {keys[asked]}?\nAnswer:"
    answer = f" {codes[asked]}."
    subjects = ["The old farmer", "A young teacher", "The quiet river", "My neighbour", "The baker", "A grey cat"]
    verbs = ["walks past", "looks at", "waits near", "thinks of", "talks to", "watches"]
    objects = ["the bridge", "the harbour", "the green hills", "the long road", "a quiet garden", "the lake"]
    needles = [f"The access code of the {k} is {c}. " for k, c in zip(keys, codes)]
    budget = args.tokens - len(question) - sum(len(n) for n in needles)
    parts, size = [], 0
    while size < budget:
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}. "
        parts.append(sentence)
        size += len(sentence)
    for depth, needle in sorted(zip(depths, needles), reverse=True):
        parts.insert(round(depth * len(parts)), needle)
    prompt = "".join(parts).rstrip() + question

assert prompt.endswith(question)
out = Path(args.dir)
out.mkdir(parents=True, exist_ok=True)
(out / "haystack.txt").write_text(prompt[: len(prompt) - len(question)])
(out / "question.txt").write_text(question)
(out / "answer.txt").write_text(answer.strip())
print(f"{len(prompt)} bytes, {args.needles} facts, asking for one ({source})")
