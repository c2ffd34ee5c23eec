"""Write lensunlearn/data/assets/generic_texts.jsonl: everyday texts the embedded model writes itself.

The unlearning presets need a retain corpus that holds none of the facts they evaluate, and
perplexity needs held-out text that no corpus holds; both must work offline. This script asks the
embedded SmolLM2-135M-Instruct for short texts on everyday topics (cooking, sports, weather,
hobbies, software, animals, ...; no geography, chemistry or other fact domain), samples with a
fixed seed, keeps whole sentences, and drops every text that names a subject or an answer of a
fact domain (`lensunlearn.data.facts.fact_mentions`). `lensunlearn.data.facts.generic_texts` splits the
file into a retain and a held-out part.

    .venv/bin/python scripts/make_generic_corpus.py [--overwrite]

It takes about 5 minutes on 2 CPU cores. Sampling runs in batches, so another torch version or
thread count may write other texts; the shipped file is the reference, not this script's output.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from lensunlearn.core.atomic import write_jsonl_atomic
from lensunlearn.data.facts import GENERIC_FILE, fact_mentions
from lensunlearn.modeling.loading import load_model

TOPICS = (
    "baking bread at home", "making fresh pasta", "brewing a good cup of coffee", "making tea", "cooking rice",
    "a vegetable soup recipe", "making pancakes for breakfast", "a simple salad", "grilling vegetables",
    "baking chocolate chip cookies", "making a fruit smoothie", "packing a healthy lunch", "cooking for a crowd",
    "keeping knives sharp", "storing leftovers safely", "a weekend football match", "learning to play basketball",
    "training for a long-distance run", "swimming lessons for adults", "riding a bicycle to work",
    "a morning yoga routine", "learning to play chess", "a tennis match", "playing table tennis",
    "rock climbing at an indoor gym", "stretching after exercise", "a rainy afternoon", "a snowy morning",
    "a hot summer day", "a thunderstorm at night", "the first frost of the season", "a windy day at the beach",
    "checking the weather forecast before a walk", "knitting a scarf", "growing tomatoes in a garden",
    "caring for houseplants", "watching birds in the backyard", "taking photographs of flowers",
    "painting with watercolors", "learning to play the guitar", "practising the piano", "singing in a choir",
    "a family board game night", "doing a jigsaw puzzle", "folding paper cranes", "building a birdhouse",
    "sewing a button back on a shirt", "making pottery on a wheel", "flying a kite", "keeping a diary",
    "reading a novel before bed", "visiting the local library", "writing a short story",
    "learning to program in Python", "debugging a program that crashes", "using version control for code",
    "writing unit tests", "organising files on a computer", "backing up photos", "choosing a strong password",
    "keyboard shortcuts that save time", "using a spreadsheet to plan a budget", "designing a simple website",
    "fixing a slow laptop", "learning to type faster", "a text editor for programmers",
    "reviewing a colleague's code", "walking a dog", "a cat that likes to nap in the sun", "keeping a pet rabbit",
    "caring for goldfish in an aquarium", "a horse on a farm", "bees visiting flowers", "squirrels storing nuts",
    "owls hunting at night", "frogs in a garden pond", "butterflies in a meadow", "training a puppy",
    "cleaning the kitchen", "doing the laundry", "moving to a new apartment", "planning a birthday party",
    "a picnic in the park", "camping in a tent", "going on a hike", "fishing at a quiet lake",
    "commuting by bus", "fixing a flat bicycle tyre", "changing the oil in a car", "a good night's sleep",
    "a calm morning routine", "meditation for beginners", "a visit to the dentist", "getting a haircut",
    "choosing comfortable shoes", "packing a backpack for school", "helping a child with homework",
    "studying for an exam", "managing time at work", "working from home", "running a short meeting",
    "giving a talk in front of people", "making new friends", "helping a neighbour", "volunteering at a food bank",
    "a movie night with friends", "listening to podcasts", "a magic trick for children", "recycling at home",
    "composting kitchen scraps", "saving energy at home", "a first aid kit for the house", "saving money each month",
)
PROMPTS = (
    "Write a short paragraph about {topic}.",
    "Give a few practical tips about {topic}.",
    "Describe a typical day that involves {topic}.",
    "Explain {topic} to a beginner in a few sentences.",
)
SENTENCE_END = re.compile(r"(?<!\d)[.!?](?=\s|$)")  # not "1." of a list


def whole_sentences(text: str) -> str:
    """The text up to its last full stop, on one line: sampling stops mid-sentence."""
    text = " ".join(text.replace("*", "").replace("#", "").split())
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                             repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=GENERIC_FILE)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_chars", type=int, default=120, help="drop shorter texts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"{args.out} exists: pass --overwrite to replace it", file=sys.stderr)
        return 1
    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    jobs = [(topic, template.format(topic=topic)) for topic in TOPICS for template in PROMPTS]
    rows, dropped, short, start = [], 0, 0, time.time()
    for first in range(0, len(jobs), args.batch):
        part = jobs[first:first + args.batch]
        texts = generate(model, tokenizer, [p for _, p in part], args.max_new_tokens, args.seed + first)
        for index, ((topic, _), raw) in enumerate(zip(part, texts), first):
            text = whole_sentences(raw)
            if len(text) < args.min_chars:
                short += 1
            elif fact_mentions(text):
                dropped += 1
            else:
                rows.append({"id": f"generic:{index:04d}", "topic": topic, "text": text})
        print(f"{first + len(part)}/{len(jobs)} prompts, {len(rows)} kept, {dropped} naming a fact, {short} too short, "
              f"{time.time() - start:.0f} s", file=sys.stderr)
    write_jsonl_atomic(args.out, rows)
    print(f"wrote {len(rows)} texts ({args.out.stat().st_size / 1024:.0f} KiB) to {args.out}; dropped {dropped} that "
          f"name a fact and {short} shorter than {args.min_chars} characters; {torch.get_num_threads()} threads, "
          f"{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
