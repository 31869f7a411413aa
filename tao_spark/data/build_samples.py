"""Build the bundled sample prompt log: synthetic, written by this project, the same bytes on every run.

    python -m tao_spark.data.build_samples    # rewrites prompts.jsonl and arithmetic_answers.json beside this file

Three tasks, one JSON object per line (``{"id", "task", "prompt"}`` or ``{"id", "task", "messages"}``):

- ``instruct``: a writing request plus one or two constraints a program checks without labels (IFEval-style);
  the phrasings are the ones ``tao_spark.rewards.verifiers.parse_constraints`` reads back.
- ``arithmetic``: a short sum or word problem whose answer is one number. The answers go to
  ``arithmetic_answers.json`` for tests and benchmarks only: the prompt log stays label-free, and training never
  reads that file.
- ``support``: help-desk questions about the fictional product Acme Cloud, some with a pasted policy snippet.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, NamedTuple

from tao_spark.rewards.verifiers import Constraint

SEED = 20240611
HERE = Path(__file__).resolve().parent
COUNTS = {"instruct": 180, "arithmetic": 90, "support": 90}


class Sample(NamedTuple):
    """One prompt plus what the builder knows about it; only ``record()`` is written to the prompt log."""

    id: str
    task: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    constraints: tuple[Constraint, ...] = ()
    answer: int | None = None

    def record(self) -> dict[str, Any]:
        body = {"prompt": self.prompt} if self.messages is None else {"messages": self.messages}
        return {"id": self.id, "task": self.task, **body}

    def text(self) -> str:
        """The prompt as rewards see it: the system turn (if any), a blank line, the user turn."""
        if self.messages is None:
            return self.prompt or ""
        return "\n\n".join(m["content"] for m in self.messages)


# --- instruct ----------------------------------------------------------------------------------------------------

_REQUESTS: dict[str, list[str]] = {
    "Write a short product description for {}.": [
        "a stainless steel water bottle", "a foldable electric bicycle", "a solar phone charger",
        "a hand-made ceramic mug", "noise-cancelling headphones", "a smart garden planter", "a wool winter scarf",
        "a cast iron skillet", "a kids' coding robot", "a standing desk", "a bamboo toothbrush",
        "a travel backpack with a laptop sleeve", "a herbal tea sampler",
    ],
    "Explain {} to a ten-year-old.": [
        "how rainbows form", "why the sky is blue", "what electricity is", "how vaccines work",
        "why we have seasons", "what a computer program is", "how bees make honey", "what gravity does",
        "how the internet sends messages", "why leaves change color in autumn", "what recycling is",
        "how airplanes stay in the air",
    ],
    "Give tips for {}.": [
        "staying focused while working from home", "saving money on groceries", "sleeping better",
        "learning a new language", "keeping houseplants alive", "running a first 5k race",
        "preparing for a job interview", "packing light for a trip", "starting a vegetable garden",
        "reducing screen time", "making new friends in a new city", "cooking healthy meals on a budget",
    ],
    "Write a short email to {}.": [
        "a landlord asking to fix a leaking tap", "a teacher explaining a missed homework deadline",
        "a colleague thanking them for their help on a project", "a customer apologizing for a late delivery",
        "a neighbor inviting them to a street party", "a manager asking for a day off next Friday",
        "a client confirming a meeting time", "a friend congratulating them on a new job",
        "a gym cancelling a membership", "a bookshop asking whether a book is in stock",
    ],
    "Summarize the benefits of {}.": [
        "regular exercise", "drinking enough water", "reading every day", "public libraries",
        "learning to play an instrument", "walking to work", "keeping a journal", "composting at home",
        "taking short breaks at work", "volunteering", "cycling in cities", "eating more vegetables",
    ],
    "Describe {} for someone who has never been there.": [
        "a busy farmers market", "a quiet mountain lake", "a night train across the desert",
        "a small seaside town in winter", "a rainforest at dawn", "a crowded football stadium",
        "an old city library", "a lighthouse on a rocky coast", "a snowy forest cabin", "a spice market",
    ],
    "Write a short poem about {}.": [
        "the ocean", "a rainy afternoon", "an old friend", "the first day of spring", "city lights at night",
        "a cup of morning coffee", "the moon", "a lost umbrella", "autumn leaves", "a long road trip",
    ],
    "Write the opening of a story about {}.": [
        "a robot who learns to paint", "a girl who finds a map in her attic", "a dragon afraid of the dark",
        "a baker who can taste memories", "two strangers stuck in an elevator", "a cat that runs a hotel",
        "a lighthouse keeper who receives a letter", "an astronaut returning home", "a talking tree",
        "a detective who hates puzzles",
    ],
    "Explain how {} works.": [
        "a refrigerator", "a credit score", "solar power", "a bicycle gear system", "compound interest",
        "a search engine", "the water cycle", "a heat pump", "an electric car battery", "a password manager",
        "noise-cancelling headphones", "a 3D printer",
    ],
    "Compare {}.": [
        "cats and dogs as pets", "trains and planes for short trips", "paper books and e-readers",
        "renting and buying a home", "tea and coffee", "running and swimming for fitness",
        "city life and country life", "online classes and classroom classes", "laptops and tablets for students",
        "electric cars and petrol cars",
    ],
    "Write a motivational message for {}.": [
        "students before their final exams", "a team that just missed a deadline", "someone starting a new job",
        "a friend training for a marathon", "volunteers at a food bank", "new parents", "a nervous public speaker",
        "a small business owner in a slow month", "someone learning to code", "a retiring nurse",
    ],
    "Give advice to someone who wants to {}.": [
        "start a podcast", "adopt a rescue dog", "move abroad", "write a novel", "change careers",
        "become a better listener", "wake up earlier", "learn to cook", "start investing", "get into photography",
    ],
    "Write a short announcement for {}.": [
        "a community clean-up day", "a new coffee shop opening", "an office moving to a new building",
        "a school science fair", "a charity bake sale", "a software update", "a library's new opening hours",
        "a neighborhood book swap", "a summer music festival", "a company hackathon",
    ],
    "Write a brief review of {}.": [
        "a family-run pizza place", "a pair of running shoes", "a museum of natural history", "a budget hotel",
        "a language-learning app", "a board game for four players", "a city bike-sharing service",
        "a wireless keyboard", "a weekend cooking class", "a botanical garden",
    ],
    "Write a thank-you note to {}.": [
        "a mentor who helped with a career change", "a nurse who cared for a relative", "a bus driver",
        "a coach after a winning season", "a neighbor who watered the plants", "a teacher at the end of the year",
        "a volunteer firefighter", "a grandmother for a birthday gift", "a host after a dinner party",
        "a colleague who covered a shift",
    ],
    "Suggest a plan for {}.": [
        "a rainy weekend at home", "a first week at a new school", "a birthday party for a seven-year-old",
        "cleaning out a garage", "a day trip to the seaside", "studying for a driving test",
        "a picnic in the park", "a team lunch for twelve people", "learning to swim as an adult",
        "a quiet evening to recharge", "a family game night", "a week of packed lunches",
        "a tidy home office", "a beginner's first month at the gym",
    ],
    "Write a short biography of {}.": [
        "a fictional inventor of the umbrella", "an imaginary chef who opened a floating restaurant",
        "a made-up explorer who mapped an underground river", "a fictional librarian who saved a town's archive",
        "an invented musician who played only at sunrise", "a fictional gardener who grew the largest pumpkin",
        "an imaginary pilot who delivered mail to islands", "a made-up scientist who studied clouds",
    ],
}

_WORDS = ["sunlight", "journey", "balance", "patience", "harmony", "adventure", "quality", "future", "gentle",
          "bright", "simple", "community", "energy", "careful", "reliable", "friendly", "calm", "progress"]
_KEYS = ["summary", "answer", "title", "tips", "description", "reason", "message", "steps"]
_STARTS = ["Here is", "Sure", "My answer", "In short", "Great question", "Dear reader", "To begin", "Let me explain"]
_ENDS = ["Is there anything else I can help with?", "Thank you for reading.", "That is all.", "Hope this helps!",
         "Have a great day.", "Let me know if you have any questions."]

# Relative frequency of each constraint kind, set from measured headroom of SmolLM2-135M-Instruct (data/README.md):
# DPO on best-vs-worst of 4 learns from kinds the model meets in some samples but not greedily (include_word,
# max_words, json_key, word_count), little from kinds it always meets (title) or almost never does (lowercase,
# uppercase, quotes). Those stay at a low weight so every kind the checker knows appears in the log.
KIND_WEIGHTS = {
    "include_word": 3.0, "max_words": 3.0, "json_key": 3.0, "word_count": 3.0, "no_commas": 2.0, "bullets": 2.0,
    "starts_with": 2.0, "ends_with": 1.0, "title": 1.0, "lowercase": 0.3, "uppercase": 0.3, "quotes": 0.3,
}
TWO_CONSTRAINTS = 0.3  # share of instruct prompts with two constraints; each second one roughly halves compliance

# Pairs a prompt never asks for together: contradictory, or awkward enough that no answer sensibly meets both.
_CLASHES = {frozenset(p) for p in [
    ("lowercase", "uppercase"), ("json_key", "bullets"), ("json_key", "quotes"), ("json_key", "starts_with"),
    ("json_key", "ends_with"), ("json_key", "uppercase"), ("json_key", "title"), ("quotes", "starts_with"),
    ("quotes", "ends_with"), ("quotes", "bullets"), ("lowercase", "starts_with"), ("lowercase", "ends_with"),
    ("uppercase", "starts_with"), ("uppercase", "ends_with"), ("include_word", "word_count"),
]}


def _constraint(kind: str, rng: random.Random) -> Constraint:
    if kind in ("include_word", "word_count"):
        return Constraint(kind, rng.choice(_WORDS), rng.randint(2, 3) if kind == "word_count" else 0)
    if kind == "max_words":
        return Constraint(kind, n=rng.randint(20, 60))
    if kind == "bullets":
        return Constraint(kind, n=rng.randint(2, 4))
    if kind in ("json_key", "starts_with", "ends_with"):
        return Constraint(kind, rng.choice({"json_key": _KEYS, "starts_with": _STARTS, "ends_with": _ENDS}[kind]))
    return Constraint(kind)


def _phrase(c: Constraint, rng: random.Random) -> str:
    """One of the sentences that state ``c``; every one is read back by ``parse_constraints``."""
    options = {
        "include_word": [f'Include the word "{c.text}" in your answer.',
                         f'Your answer must contain the word "{c.text}".'],
        "max_words": [f"Answer in at most {c.n} words.", f"Use no more than {c.n} words.",
                      f"Keep it to {c.n} words or fewer."],
        "no_commas": ["Do not use any commas in your answer.", "Your response must not contain any commas."],
        "bullets": [f'Answer with exactly {c.n} markdown bullet points, such as "- first point".',
                    f"Format your answer as exactly {c.n} markdown bullet points."],
        "json_key": [f'Answer in JSON: a single JSON object with the key "{c.text}".',
                     f'Format your entire answer as a JSON object that has the key "{c.text}".'],
        "starts_with": [f'Start your answer with "{c.text}".', f'Begin your response with the words "{c.text}".'],
        "ends_with": [f'End your answer with the exact phrase "{c.text}"',
                      f'Finish your response with the exact phrase "{c.text}" and say nothing after it.'],
        "lowercase": ["Write your entire answer in lowercase letters; no capitals at all.",
                      "Use only lowercase letters in your response."],
        "uppercase": ["Write your entire answer in capital letters.", "Use only capital letters in your response."],
        "quotes": ["Wrap your entire answer in double quotation marks.",
                   "Put your whole response inside double quotation marks."],
        "title": ["Include a title wrapped in double angular brackets, such as <<my title>>.",
                  "Give your answer a title in double angular brackets, like <<a title>>."],
        "word_count": [f'Mention the word "{c.text}" at least {c.n} times.',
                       f'The word "{c.text}" should appear at least {c.n} times.'],
    }[c.kind]
    return rng.choice(options)


def _pick_kinds(rng: random.Random) -> list[str]:
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    first = rng.choices(kinds, weights)[0]
    if rng.random() >= TWO_CONSTRAINTS:
        return [first]
    rest = [(k, w) for k, w in zip(kinds, weights, strict=True) if k != first and frozenset((first, k)) not in _CLASHES]
    return [first, rng.choices([k for k, _ in rest], [w for _, w in rest])[0]]


def _instruct(n: int, rng: random.Random) -> list[Sample]:
    requests = [t.format(f) for t, fillers in _REQUESTS.items() for f in fillers]
    rng.shuffle(requests)
    samples = []
    for i, request in enumerate(requests[:n]):
        constraints = tuple(_constraint(k, rng) for k in _pick_kinds(rng))
        sentences = [_phrase(c, rng) for c in constraints]
        sid = f"instruct-{i:04d}"
        if i % 10 == 0:
            # Chat form: the first constraint sits in the system turn, as an operator's standing rule would.
            messages = [{"role": "system", "content": f"You are a helpful writing assistant. {sentences[0]}"},
                        {"role": "user", "content": " ".join([request, *sentences[1:]])}]
            samples.append(Sample(sid, "instruct", messages=messages, constraints=constraints))
        else:
            samples.append(Sample(sid, "instruct", prompt=" ".join([request, *sentences]), constraints=constraints))
    return samples


# --- arithmetic --------------------------------------------------------------------------------------------------

_ASKS = ["Give the final answer as a number.", "Answer with a single number.",
         "Think step by step, then state the final numeric answer."]
_NAMES = ["Tom", "Maria", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Jonas", "Sofia", "Diego", "Mei", "Sam"]


def _problem(rng: random.Random) -> tuple[str, int]:
    """A question and its answer; the operands are chosen so that every answer is a whole number."""
    name = rng.choice(_NAMES)
    kind = rng.randrange(12)
    if kind == 0:
        a, b = rng.randint(11, 99), rng.randint(3, 49)
        return f"What is {a} * {b}?", a * b
    if kind == 1:
        a, b, c = rng.randint(100, 999), rng.randint(10, 499), rng.randint(10, 99)
        return f"What is {a} + {b} - {c}?", a + b - c
    if kind == 2:
        a, b, c = rng.randint(3, 19), rng.randint(3, 19), rng.randint(2, 60)
        return f"Compute {a} * {b} + {c}.", a * b + c
    if kind == 3:
        boxes, each = rng.randint(3, 25), rng.choice([4, 6, 8, 12])
        return (f"A bakery sells {boxes} boxes of muffins with {each} muffins in each box. "
                "How many muffins does it sell?"), boxes * each
    if kind == 4:
        a, b, c = rng.randint(20, 90), rng.randint(2, 19), rng.randint(2, 30)
        return (f"{name} has {a} marbles, gives {b} to a friend and then buys {c} more. "
                f"How many marbles does {name} have now?"), a - b + c
    if kind == 5:
        speed, hours = rng.choice([40, 45, 60, 75, 80, 90, 120]), rng.randint(2, 7)
        return f"A train travels at {speed} km per hour for {hours} hours. How many kilometers does it travel?", \
            speed * hours
    if kind == 6:
        price, off = rng.choice(range(20, 201, 20)), rng.choice([10, 20, 25, 50])
        return (f"A jacket costs ${price}. It is on sale for {off}% off. What is the sale price in dollars?",
                price * (100 - off) // 100)
    if kind == 7:
        people, share = rng.randint(2, 8), rng.randint(8, 45)
        return (f"{people} friends split a restaurant bill of ${people * share} equally. "
                "How many dollars does each person pay?"), share
    if kind == 8:
        w, h = rng.randint(3, 30), rng.randint(3, 30)
        return f"A rectangle is {w} cm wide and {h} cm long. What is its area in square centimeters?", w * h
    if kind == 9:
        p, x = rng.choice([5, 10, 15, 20, 25, 50]), rng.choice(range(20, 401, 20))
        return f"What is {p}% of {x}?", p * x // 100
    if kind == 10:
        per_cake, cakes, wanted = rng.randint(2, 4), rng.randint(2, 3), rng.randint(4, 9)
        return (f"A recipe needs {per_cake * cakes} cups of flour for {cakes} cakes. "
                f"How many cups of flour are needed for {wanted} cakes?"), per_cake * wanted
    pages, days = rng.randint(12, 40), rng.randint(3, 14)
    return f"{name} reads {pages} pages every day for {days} days. How many pages does {name} read in total?", \
        pages * days


def _arithmetic(n: int, rng: random.Random) -> list[Sample]:
    samples: list[Sample] = []
    seen: set[str] = set()
    while len(samples) < n:
        question, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        prompt = f"{question} {rng.choice(_ASKS)}"
        sid = f"arithmetic-{len(samples):04d}"
        if len(samples) % 10 == 0:
            messages = [{"role": "system", "content": "You are a careful math tutor."},
                        {"role": "user", "content": prompt}]
            samples.append(Sample(sid, "arithmetic", messages=messages, answer=answer))
        else:
            samples.append(Sample(sid, "arithmetic", prompt=prompt, answer=answer))
    return samples


# --- support -----------------------------------------------------------------------------------------------------

_POLICIES: dict[str, tuple[str, list[str]]] = {
    "Refund policy": (
        "Acme Cloud refunds annual plans in full within 30 days of purchase. After 30 days, annual plans are "
        "refunded pro rata for the unused months, minus a processing fee of 5%. Monthly plans are not refunded, "
        "but you can cancel at any time and keep access until the end of the billing month.",
        ["I bought the annual plan three weeks ago and it is not what I need. Can I get my money back?",
         "I'm on a monthly plan and want to cancel today. Do I lose access right away?",
         "We paid for a year in January and want to stop in June. How does the refund work?",
         "Is there any fee if I ask for a refund after two months on an annual plan?",
         "Can I get a refund for last month on my monthly subscription?"]),
    "Password reset": (
        "To reset your Acme Cloud password, click 'Forgot password' on the sign-in page and enter your account "
        "email. The reset link is valid for 60 minutes. If you use single sign-on, reset your password with your "
        "identity provider instead; Acme Cloud never stores SSO passwords.",
        ["My reset link says it has expired. What happened?",
         "Our company signs in with Okta. Why doesn't the reset email arrive?",
         "I forgot my password and no longer have access to my old work email. What can I do?",
         "How long do I have to use the password reset link?"]),
    "Data retention": (
        "Deleted files stay in the Trash for 30 days and can be restored by any workspace admin. After 30 days "
        "they are purged permanently. Workspaces on the Enterprise plan can extend retention to 365 days in "
        "Settings > Compliance. Audit logs are kept for 1 year on all paid plans.",
        ["I deleted a folder by mistake last week. Can I still get it back?",
         "Our auditors need deleted files kept for a full year. Is that possible?",
         "Who is allowed to restore files from the Trash?",
         "How long are audit logs kept on the Team plan?",
         "A file was deleted two months ago. Can support recover it?"]),
    "Storage quotas": (
        "The Free plan includes 5 GB of storage per workspace. The Team plan includes 1 TB shared across the "
        "workspace, and the Enterprise plan has no fixed limit. When a workspace is over its quota, uploads are "
        "paused but existing files stay available for download.",
        ["We just went over our storage limit on the Free plan. Will our files be deleted?",
         "Is the 1 TB on the Team plan per person or for the whole workspace?",
         "Why can't I upload anything today? Downloads still work fine.",
         "Does the Enterprise plan have a storage cap?"]),
    "Team seats": (
        "Admins can add seats at any time from Billing > Seats; new seats are charged pro rata for the rest of "
        "the billing period. Removing a seat takes effect at the next renewal. Guest accounts are free, can only "
        "see folders shared with them, and cannot create new projects.",
        ["We hired two people mid-month. Do we pay for the whole month for them?",
         "I removed a user yesterday. Why is the seat still on our invoice?",
         "Can a guest account create its own project?",
         "Do guest users count as paid seats?"]),
    "API rate limits": (
        "The Acme Cloud API allows 600 requests per minute per access token on paid plans and 60 per minute on "
        "the Free plan. Requests over the limit get HTTP status 429 with a Retry-After header. Bulk endpoints "
        "count as one request regardless of how many items they contain.",
        ["Our integration keeps getting error 429. What does it mean and how should we handle it?",
         "Does a bulk upload of 500 items count as 500 requests?",
         "Would upgrading from Free raise our API limit?",
         "Is the rate limit per user or per token?"]),
    "Backups": (
        "Acme Cloud takes a snapshot of every workspace every 6 hours and keeps snapshots for 14 days. Admins can "
        "restore the whole workspace to any snapshot from Settings > Backups; restoring replaces current data, so "
        "export anything recent first. Single files are restored from version history instead.",
        ["Someone overwrote an important spreadsheet this morning. Should I restore a backup?",
         "How often are backups taken, and how far back can I go?",
         "If I restore yesterday's snapshot, what happens to the files we added today?",
         "Can I restore a workspace to how it was three weeks ago?"]),
    "Two-factor authentication": (
        "Two-factor authentication (2FA) can be turned on by each user under Profile > Security, and admins can "
        "require it for the whole workspace. Supported methods are authenticator apps and hardware security keys; "
        "SMS codes are not supported. Each user gets ten one-time recovery codes when 2FA is enabled.",
        ["I lost my phone with the authenticator app. How do I get into my account?",
         "Can I receive 2FA codes by text message?",
         "How can I make sure everyone in my workspace uses 2FA?",
         "Do hardware keys work with Acme Cloud?"]),
    "Plan changes": (
        "Upgrades take effect immediately and the price difference is charged pro rata. Downgrades take effect at "
        "the end of the current billing period. When downgrading to Free, workspaces above 5 GB become read-only "
        "until enough files are removed.",
        ["If I downgrade today, when does the cheaper price start?",
         "We have 40 GB of files. What happens if we move to the Free plan?",
         "Will I be charged the full price if I upgrade halfway through the month?",
         "Can I switch from Team to Enterprise and back later?"]),
    "Support hours": (
        "Acme Cloud support answers chat and email from 8:00 to 20:00 CET, Monday to Friday. Enterprise customers "
        "also have a 24/7 phone line for outages. Status updates for incidents are posted on status.acme.example "
        "as soon as an incident is confirmed.",
        ["The service seems down and it's Sunday night. Who can I contact?",
         "Do you offer phone support on the Team plan?",
         "Where can I check whether there is an ongoing outage?",
         "What time does chat support open in the morning?"]),
    "Account deletion": (
        "Workspace owners can delete a workspace from Settings > General > Delete workspace. Deletion is final "
        "after a 7-day grace period, during which the owner can cancel it. All files, comments and audit logs are "
        "then erased and cannot be recovered, including by Acme Cloud support.",
        ["I clicked delete on our workspace by accident an hour ago. Is everything gone?",
         "If we delete our workspace, will support keep a copy of our data?",
         "Who is allowed to delete a workspace?"]),
    "Data regions": (
        "New workspaces can choose to store data in the EU (Frankfurt) or the US (Virginia). The region is fixed "
        "when the workspace is created; moving an existing workspace requires a migration that Enterprise "
        "customers can request through their account manager.",
        ["We are a German company. Can our files stay in the EU?",
         "Can I move my existing workspace from the US region to the EU region myself?",
         "Which data regions does Acme Cloud offer?"]),
}

_HELPDESK = [
    "How do I share a folder with someone outside my company in Acme Cloud?",
    "The Acme Cloud desktop app says 'sync paused'. How do I get it syncing again?",
    "I can't find the button to invite new team members. Where is it?",
    "How do I change the email address on my Acme Cloud account?",
    "Our invoices need our VAT number on them. How do I add it?",
    "Files I upload from my phone show up blurry in Acme Cloud. Is the app compressing them?",
    "Can I use Acme Cloud offline on a plane?",
    "How do I transfer ownership of a workspace to a colleague who is taking over?",
    "A shared link I sent to a client stopped working. What could cause that?",
    "What is the difference between a workspace admin and a workspace owner?",
    "How do I export all of my files before I leave my job?",
    "Acme Cloud is very slow for me today. What can I check on my side?",
    "I got an email saying someone signed in to my account from another country. What should I do?",
    "Is there a way to see who edited a document last?",
    "How do I turn off the email notifications I get for every comment?",
    "Can I connect Acme Cloud to our Slack workspace?",
    "Why does the upload fail for a video file but work for small documents?",
    "How do I restore an older version of a presentation?",
    "My colleague can see a folder but cannot edit anything in it. How do I fix that?",
    "We are switching from another cloud storage service. What is the easiest way to move our files over?",
    "Is Acme Cloud suitable for storing customer health records?",
    "The mobile app keeps logging me out. Is this a known problem?",
    "How do I set up single sign-on with Microsoft Entra ID?",
    "Can I password-protect a shared link?",
    "I was charged twice this month. Who do I contact?",
    "How can I see how much storage each project uses?",
    "Is there a dark mode in the Acme Cloud web app?",
    "What happens to my files if my credit card payment fails?",
    "Can I recover a comment thread that a colleague deleted?",
    "How do I let a contractor access one project for three months only?",
    "Does Acme Cloud scan uploaded files for viruses?",
    "Can two people edit the same spreadsheet at the same time?",
    "I want to close my personal account but keep my work account. Is that possible?",
    "Our IT team wants a list of the IP addresses Acme Cloud uses. Where can we find it?",
    "How do I rename a workspace?",
    "Can I pay for Acme Cloud by bank transfer instead of a credit card?",
    "Why does a file show a red warning icon in the desktop app?",
    "How do I add a custom domain to our shared links?",
    "Is there a student discount for Acme Cloud?",
    "How do I stop a folder on my laptop from syncing?",
    "Can I get an invoice for a payment I made last year?",
    "Our new employee never received the invitation email. What should we try?",
    "How do I move a project from one workspace to another?",
    "Can I see a history of who downloaded a shared file?",
    "Does Acme Cloud have an app for Linux?",
]

_SUPPORT_SYSTEM = ("You are the support assistant for Acme Cloud, a file storage and collaboration service. "
                   "Be friendly and precise, and say so when you do not know.")


def _support(n: int, rng: random.Random) -> list[Sample]:
    asks: list[tuple[str | None, str | None, str]] = [
        (title, doc, q) for title, (doc, questions) in _POLICIES.items() for q in questions]
    asks += [(None, None, q) for q in _HELPDESK]
    rng.shuffle(asks)
    samples = []
    for i, (title, doc, question) in enumerate(asks[:n]):
        user = question if doc is None else (
            f"{title} (Acme Cloud help center):\n\n{doc}\n\nCustomer question: {question}")
        sid = f"support-{i:04d}"
        if i % 6 == 0:
            messages = [{"role": "system", "content": _SUPPORT_SYSTEM}, {"role": "user", "content": user}]
            samples.append(Sample(sid, "support", messages=messages))
        else:
            samples.append(Sample(sid, "support", prompt=user))
    return samples


# --- output ------------------------------------------------------------------------------------------------------

def build_samples(seed: int = SEED) -> list[Sample]:
    """All samples, in prompt-log order (tasks interleaved by a seeded shuffle, as a real log would be)."""
    rng = random.Random(seed)
    samples = (_instruct(COUNTS["instruct"], rng) + _arithmetic(COUNTS["arithmetic"], rng)
               + _support(COUNTS["support"], rng))
    rng.shuffle(samples)
    return samples


def write_samples(out_dir: Path = HERE, seed: int = SEED) -> list[Path]:
    """Write ``prompts.jsonl`` and ``arithmetic_answers.json`` to ``out_dir``; returns their paths."""
    samples = build_samples(seed)
    prompts, answers = out_dir / "prompts.jsonl", out_dir / "arithmetic_answers.json"
    lines = "".join(json.dumps(s.record(), ensure_ascii=False) + "\n" for s in samples)
    prompts.write_text(lines, encoding="utf-8", newline="\n")
    by_id = {s.id: s.answer for s in sorted(samples, key=lambda s: s.id) if s.answer is not None}
    answers.write_text(json.dumps(by_id, indent=1) + "\n", encoding="utf-8", newline="\n")
    return [prompts, answers]


def main() -> None:
    for path in write_samples():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
