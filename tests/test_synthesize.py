"""Parsing the synthesizer's output: numbered instructions and quiz question/answer pairs."""

from __future__ import annotations

from themis_ray.stages.synthesize import parse_instructions, parse_quiz

A = "Explain what a Python generator is and when to use one."
B = "Write a short poem about list comprehensions."
C = "Summarise the difference between a tuple and a list."


def test_numbered_with_dots_and_parens():
    text = f"1. {A}\n2) {B}\n3.   {C}   "
    assert parse_instructions(text, 500) == [A, B, C]


def test_bullets():
    text = f"- {A}\n* {B}\n• {C}"
    assert parse_instructions(text, 500) == [A, B, C]


def test_markdown_bold_numbers():
    text = f"**1.** {A}\n**2.** {B}"
    assert parse_instructions(text, 500) == [A, B]


def test_stray_text_around_the_list_is_ignored():
    text = f"Sure! Here are three instructions:\n\n1. {A}\n\n2. {B}\nI hope these help.\n3. {C}\n"
    assert parse_instructions(text, 500) == [A, B, C]


def test_duplicates_are_dropped_ignoring_case_and_spacing():
    text = f"1. {A}\n2. {A.upper()}\n3. {'  '.join(A.split())}\n4. {B}"
    assert parse_instructions(text, 500) == [A, B]


def test_too_short_and_too_long_are_dropped():
    long = "Describe " + "very " * 30 + "carefully."
    short = "Be brief."  # 9 characters
    text = f"1. {short}\n2. {A}\n3. {long}\n4. {'x' * 15}\n5. {'y' * 14}"
    assert len(long) > 100
    assert parse_instructions(text, 100) == [A, "x" * 15]
    assert parse_instructions(text, len(long)) == [A, long, "x" * 15]


def test_unnumbered_answer_is_one_instruction():
    assert parse_instructions(f"  {A}  \n", 500) == [A]
    assert parse_instructions("   \n  ", 500) == []
    assert parse_instructions("Too short", 500) == []


def test_numbers_need_a_space_and_at_most_two_digits():
    # "3.14 is pi" is not an item; "100. x" is not a list number
    text = f"1. {A}\n3.14159 is the value of pi to five places.\n100. {B}"
    assert parse_instructions(text, 500) == [A]


def test_parse_quiz_plain():
    assert parse_quiz("Question: What is 2 + 2?\nAnswer: 4") == ("What is 2 + 2?", "4")


def test_parse_quiz_case_whitespace_and_fullwidth_colon():
    assert parse_quiz("QUESTION :  Name a prime.\n\nanswer：  7  ") == ("Name a prime.", "7")


def test_parse_quiz_multiline_question_with_passage():
    text = 'Intro.\nQuestion: Read this:\n"""\nCats sleep.\n"""\nWhat do cats do?\nAnswer: They sleep.'
    assert parse_quiz(text) == ('Read this:\n"""\nCats sleep.\n"""\nWhat do cats do?', "They sleep.")


def test_parse_quiz_markdown_bold_labels():
    assert parse_quiz("**Question:** What is 2 + 2?\n**Answer:** 4") == ("What is 2 + 2?", "4")


def test_parse_quiz_missing_parts():
    assert parse_quiz("What is 2 + 2? The answer is 4.") is None
    assert parse_quiz("Question: What is 2 + 2?") is None
    assert parse_quiz("Answer: 4") is None
