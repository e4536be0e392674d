"""Every text and prompt the evaluations feed a model, built in one place.

- `english_text`: real English prose (the Python reference documentation), the perplexity
  corpus, the passkey haystack, the fidelity harness's capture text and the benchmarks' documents.
- `encode` / `chat_ids`: text to token ids, raw or through the chat template.
- `NEEDLE_HEAD`, `NEEDLE`, `NEEDLE_QUESTION`: the passkey prompt around a haystack.
- `LIBRARY_SYSTEM`, `LIBRARY_SYSTEM_LONG`: the live-server tests' and benchmarks' system prompts.
- `make_chats` / `next_user_turn`: the multi-turn agreement chats (procedurally generated facts).

Only the tokenizer is called here: no model, no transformers import.
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch


def english_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of real English prose from every Python install.

    The source is ``pydoc_data.topics.topics`` (the text of the Python reference
    documentation), its values joined in sorted key order, whitespace collapsed.
    """
    from pydoc_data.topics import topics

    parts: list[str] = []
    total = 0
    for key in sorted(topics):
        chunk = re.sub(r"\s+", " ", topics[key]).strip()
        if not chunk:
            continue
        parts.append(chunk)
        total += len(chunk) + 1
        if total >= min_chars:
            break
    text = " ".join(parts)
    if len(text) < min_chars:
        raise ValueError(f"min_chars={min_chars} exceeds the {len(text)} characters available")
    return text


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [n] of ``text``, no special tokens added."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids [1, n] of ``messages`` with the chat template and the assistant prompt appended."""
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return enc["input_ids"]


# ---------------------------------------------------------------------------------------------
# Passkey retrieval: a ChatML prompt written out, so the haystack can be tokenized in pieces
# ---------------------------------------------------------------------------------------------

NEEDLE_HEAD = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Read the following text and remember the secret passkey hidden in it.\n\n"
)
NEEDLE = " The secret passkey is {key}. Remember it: the secret passkey is {key}. "
NEEDLE_QUESTION = (
    "\n\nWhat is the secret passkey? Answer with the number.<|im_end|>\n"
    "<|im_start|>assistant\nThe secret passkey is"
)


# ---------------------------------------------------------------------------------------------
# System prompts of the live-server tests and benchmarks (a chat's turns reuse them)
# ---------------------------------------------------------------------------------------------

LIBRARY_SYSTEM = (
    "You are a helpful assistant for the Harbor Street Library. The library opens at 9 am and "
    "closes at 8 pm on weekdays; on Saturdays it opens at 10 am and closes at 4 pm; it is "
    "closed on Sundays. Members may borrow up to 12 books at a time for three weeks. Late "
    "returns cost 25 cents per book per day. There is a quiet reading room on the second "
    "floor and a children's corner with picture books. Answer briefly."
)
LIBRARY_SYSTEM_LONG = (
    "You are a helpful assistant for the Harbor Street Library. The library opens at 9 am and "
    "closes at 8 pm on weekdays; on Saturdays it opens at 10 am and closes at 4 pm; it is "
    "closed on Sundays. Members may borrow up to 12 books at a time for three weeks. Late "
    "returns cost 25 cents per book per day. There is a quiet reading room on the second "
    "floor and a children's corner with picture books. The library also lends laptops for use "
    "inside the building, runs a book club on the first Tuesday of every month, and offers "
    "free wifi to every visitor. Answer briefly."
)


# ---------------------------------------------------------------------------------------------
# Multi-turn agreement chats
# ---------------------------------------------------------------------------------------------

_PLACES = [
    ("library", "Harbor Street Library"),
    ("hotel", "Blue Pine Hotel"),
    ("clinic", "Riverside Dental Clinic"),
    ("bakery", "Golden Crust Bakery"),
    ("gym", "Summit Fitness Club"),
    ("museum", "Museum of Old Maps"),
    ("school", "Maple Grove Music School"),
    ("garage", "Northside Car Repair"),
    ("cafe", "Little Owl Cafe"),
    ("bookshop", "Lantern Bookshop"),
]
_NAMES = ["Maria Lopez", "Tom Becker", "Aisha Khan", "Liam Walsh", "Yuki Tanaka", "Omar Haddad"]
_NAMES += ["Nina Petrova", "Sam Carter", "Elena Rossi", "David Chen", "Grace Miller", "Ravi Patel"]
_COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
_WORDS = ["sunflower", "harbor", "maple", "comet", "violet", "granite", "falcon", "meadow"]
_WORDS += ["lantern", "cobalt", "willow", "saffron"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def make_chats(n: int, turns: int = 2, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` chats: a system prompt of ~12 random facts (~300 tokens) and ``turns`` questions."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        kind, place = _PLACES[i % len(_PLACES)]
        f = {
            "open": rng.randint(6, 10),
            "close": rng.randint(4, 10),
            "manager": rng.choice(_NAMES),
            "password": rng.choice(_WORDS) + str(rng.randint(10, 99)),
            "floor": rng.randint(2, 9),
            "room": rng.choice(_COLORS),
            "phone": rng.randint(100, 999),
            "year": rng.randint(1900, 2015),
            "day": rng.choice(_DAYS),
            "parking": rng.randint(5, 90),
            "price": rng.randint(3, 60),
            "staff": rng.randint(4, 40),
        }
        facts = [
            (f"It opens at {f['open']} am and closes at {f['close']} pm every weekday.",
             "What time does it open in the morning?"),
            (f"The manager is {f['manager']}, who has worked here for many years.",
             "Who is the manager?"),
            (f"The Wi-Fi password is {f['password']}, and it is the same in every room.",
             "What is the Wi-Fi password?"),
            (f"The meeting room is on floor {f['floor']}, next to the elevators.",
             "On which floor is the meeting room?"),
            (f"The main door is painted {f['room']}, so visitors can find it easily.",
             "What color is the main door?"),
            (f"The phone extension for the front desk is {f['phone']}.",
             "What is the phone extension of the front desk?"),
            (f"The {kind} was founded in {f['year']} by two friends.",
             f"In which year was the {kind} founded?"),
            (f"Every {f['day']} the staff holds a short meeting in the morning.",
             "On which day does the staff meet?"),
            (f"There are {f['parking']} parking spaces behind the building.",
             "How many parking spaces are there?"),
            (f"A monthly membership costs {f['price']} dollars.",
             "How much does a monthly membership cost?"),
            (f"The {kind} has {f['staff']} people on its staff.",
             "How many people work on the staff?"),
        ]  # fmt: skip
        rng.shuffle(facts)
        system = (
            f"You are the friendly assistant of the {place}, a {kind} in a small town. Visitors "
            "ask you short questions and you answer briefly and politely, using only the facts "
            "below. If you do not know something, say so. Facts: "
            + " ".join(s for s, _ in facts)
            + f" The {place} is proud to serve the town, and the staff is always happy to help "
            "visitors with any question they may have about the services offered here. Please "
            "keep every answer to one short sentence, do not invent new facts, and do not repeat "
            "the question back to the visitor; when a visitor greets you, greet them back warmly "
            "before answering, and thank them for visiting at the end of the conversation."
        )
        questions = [q for _, q in facts[:turns]]
        chats.append((system, questions))
    return chats


def next_user_turn(question: str) -> str:
    """ChatML text after a closed assistant answer: the next user message, the assistant prompt."""
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
