"""Masked language modelling inputs: whole-word masking of 15% of the words, 80/10/10 (BERT, Uni-Perceiver)."""

import random

IGNORE = -100  # label of positions that are not predicted


def word_starts(tokens: list[str]) -> list[bool]:
    """Which tokens begin a word, for both BPE conventions: byte-level ``Ġword`` (a leading space marker) and CLIP's
    ``word</w>`` (an end-of-word marker)."""
    if any(t.endswith("</w>") for t in tokens):
        starts, previous_ended = [], True
        for token in tokens:
            starts.append(previous_ended)
            previous_ended = token.endswith("</w>")
        return starts
    return [i == 0 or token.startswith("Ġ") for i, token in enumerate(tokens)]


def mask_whole_words(ids: list[int], starts: list[bool], maskable: list[bool], rng: random.Random, mask_id: int,
                     random_ids: list[int], probability: float = 0.15) -> tuple[list[int], list[int]]:
    """Chooses ``round(probability * words)`` whole words (at least one) among the maskable tokens; each token of a
    chosen word becomes ``mask_id`` (80%), a random token (10%) or stays (10%).

    Returns ``(input ids, labels)``; labels hold the original id where a prediction is due, ``IGNORE`` elsewhere.
    """
    words: list[list[int]] = []
    for position, (start, ok) in enumerate(zip(starts, maskable)):
        if not ok:
            continue
        if start or not words or words[-1][-1] != position - 1:
            words.append([position])
        else:
            words[-1].append(position)
    inputs, labels = list(ids), [IGNORE] * len(ids)
    if not words:
        return inputs, labels
    for word in rng.sample(words, max(1, round(probability * len(words)))):
        for position in word:
            labels[position] = ids[position]
            draw = rng.random()
            if draw < 0.8:
                inputs[position] = mask_id
            elif draw < 0.9:
                inputs[position] = rng.choice(random_ids)
    return inputs, labels
