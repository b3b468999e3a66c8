"""A deterministic labelled instruction set for the scenario classifier: templates x topics per scenario.

Built from the same forms as prompts/seed_examples.yaml, with topics filled in, so a test (or
`python tests/scenario_instructions.py OUT.jsonl`) has a few hundred labelled instructions without a
model. Templates are shared by the train and held-out rows, so accuracy on it is optimistic for real
instructions; it measures whether training works, not how well routing transfers.
"""

from __future__ import annotations

import json
import random
import sys

TOPICS = ["Python generators", "list comprehensions", "exceptions", "dictionaries", "recursion", "unit tests",
          "the garbage collector", "decorators", "virtual environments", "string formatting", "sorting",
          "file handling", "type hints", "closures", "the import system", "regular expressions"]

TEMPLATES = {
    "close_qa": ["In which year was {t} first added to Python?", "What is the default behaviour of {t} in Python 3?",
                 "Which built-in module provides {t}?", "What exact keyword introduces {t}?",
                 "How many arguments does the main function for {t} take?"],
    "open_qa": ["What should a beginner keep in mind about {t}?", "Why do many developers find {t} confusing?",
                "What are the trade-offs of relying on {t}?", "How would you decide whether to use {t} in a project?",
                "What are good habits when working with {t}?"],
    "math_qa": ["A script processes {n} files about {t} in 3 seconds each. How many minutes does it take?",
                "If a list about {t} doubles in size {n} times starting from 1 item, how many items does it hold?",
                "Solve for x: {n}x + 7 = 3x + {m}.", "What is {n} multiplied by {m}, minus {n}?",
                "A loop over {t} runs {n} times per call and is called {m} times. How many iterations in total?"],
    "creative_writing": ["Write a short poem about {t}.", "Write a haiku about {t}.",
                         "Tell a bedtime story in which {t} is the hero.", "Write a limerick about {t}.",
                         "Compose song lyrics about falling in love with {t}."],
    "informative_writing": ["Write a short email to a colleague explaining why {t} matters.",
                            "Draft a memo for the team about adopting {t}.",
                            "Write a project status report on migrating to {t}.",
                            "Write a product description for a course on {t}.",
                            "Prepare meeting notes summarising the decision about {t}."],
    "rewriting": ["Rewrite this sentence in a formal tone: 'honestly {t} just blows up sometimes'.",
                  "Paraphrase the following: '{t} are handy but people misuse them a lot.'",
                  "Make this paragraph shorter: 'When we talk about {t}, there are many many things to say.'",
                  "Correct the grammar in: '{t} is the things that we uses every days.'",
                  "Rewrite for a child: 'The semantics of {t} are subtle and context-dependent.'"],
    "translation": ["Translate into French: 'I enjoy learning about {t}.'",
                    "Translate into German: 'Our team relies on {t} every day.'",
                    "Translate into Spanish: 'The documentation about {t} is clear.'",
                    "Translate this into Japanese: 'Please read the chapter on {t}.'",
                    "How do you say 'the tutorial on {t} starts tomorrow' in Italian?"],
    "reading_comprehension": ["Read the passage below and answer: what does it say about {t}?\nPassage: "
                              "'{t} were introduced to simplify code; critics say they hide control flow.'",
                              "Extract every date mentioned in this text: 'Work on {t} began on 3 May 2001 "
                              "and ended on 9 June 2004.'",
                              "According to the paragraph, why did the team drop {t}? Paragraph: 'The team "
                              "dropped {t} because the tests became slow.'",
                              "From the text, list the people involved: 'Ana and Bo reviewed the {t} patch.'",
                              "Summarise the main claim of this excerpt: '{t} reduce bugs when used with care.'"],
    "role_playing": ["You are a patient tutor. A student asks you why {t} behave the way they do. Respond in character.",
                     "Pretend you are a pirate captain explaining {t} to your crew.",
                     "Act as a job interviewer and ask me three questions about {t}.",
                     "Play the role of a grumpy senior engineer reviewing my code that uses {t}.",
                     "Imagine you are Ada Lovelace seeing {t} for the first time. Stay in character."],
    "programming": ["Write a Python function that demonstrates {t}.", "Fix the bug in this code that uses {t}: "
                    "`def f(x): return x +`", "Implement a class in Python that wraps {t} with logging.",
                    "Write unit tests in pytest for a helper built on {t}.",
                    "Write a Python script that benchmarks {t} and prints the result."],
}


def labelled_instructions(per_scenario: int = 40, seed: int = 0, templates: slice = slice(None)) -> list[dict]:
    """`per_scenario` distinct {instruction, scenario} rows per scenario, the same for the same seed.

    `templates` picks each scenario's templates (e.g. slice(0, 4) to train, slice(4, 5) to test on
    forms the classifier never saw)."""
    rng = random.Random(seed)
    rows = []
    for scenario, all_templates in TEMPLATES.items():
        combos = [(tpl, topic) for tpl in all_templates[templates] for topic in TOPICS]
        rng.shuffle(combos)
        for k, (tpl, topic) in enumerate(combos[:per_scenario]):
            rows.append({"instruction": tpl.format(t=topic, n=3 + k % 9, m=11 + k % 7), "scenario": scenario})
    return rows


if __name__ == "__main__":
    # python tests/scenario_instructions.py OUT.jsonl [PER_SCENARIO] [FIRST_TEMPLATE:END_TEMPLATE]
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    pick = slice(*(int(x) if x else None for x in sys.argv[3].split(":"))) if len(sys.argv) > 3 else slice(None)
    with open(out, "w") as f:
        for row in labelled_instructions(n, templates=pick):
            f.write(json.dumps(row) + "\n")
