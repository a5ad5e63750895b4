"""The hidden tastes of simulated users: response text -> probability of a thumbs-up.

A taste measures how far an answer meets it (``degree``, 0 to 1); the probability of a thumbs-up is
``P_MISS + (P_MET - P_MISS) * degree``, so a taste is soft: a user now and then likes an answer that misses it
(0.1) and dislikes one that meets it (0.9 gives a thumbs-down one time in ten), as real users do. Each taste can
be met in many ways (words, layout, length), so a policy has to learn a style, not one token.

A user shown two answers prefers one through a Bradley–Terry link on the same hidden scale: with
u = logit(P(up)), P(a ≻ b) = σ(u_a − u_b), so the comparison and the thumb express one taste.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

P_MET = 0.9
P_MISS = 0.1

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_LIST_ITEM = re.compile(r"(?m)^[ \t]*(?:[-*•]|\d{1,2}[.)])[ \t]+\S")
_NUMBER = re.compile(
    r"\d|\b(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty|hundred|"
    r"thousand|million|billion|half|twice|dozen)\b", re.IGNORECASE)
_ENTHUSIASM = re.compile(
    r"!|\b(?:amazing|awesome|wonderful|fantastic|exciting|excited|love|lovely|great|brilliant|delightful|"
    r"thrilling|incredible|enjoy|fun)\b", re.IGNORECASE)
CONCISE_MAX_WORDS = 40


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def concise(text: str) -> float:
    """A complete answer (it ends a sentence rather than being cut off) of at most 40 words."""
    complete = text.rstrip().endswith((".", "!", "?", ")", '"'))
    return 1.0 if complete and 0 < word_count(text) <= CONCISE_MAX_WORDS else 0.0


def numbers(text: str) -> float:
    """Something concrete: a number, in digits or in words ("three", "a dozen", "twice")."""
    return 1.0 if _NUMBER.search(text) else 0.0


def listed(text: str) -> float:
    """A list: two or more bullet or numbered lines meet it, one such line half meets it."""
    return min(len(_LIST_ITEM.findall(text)), 2) / 2


def enthusiastic(text: str) -> float:
    """Two or more marks of enthusiasm (exclamation marks, words like "amazing", "love", "fun"); one half meets it."""
    return min(len(_ENTHUSIASM.findall(text)), 2) / 2


def p_prefers(p_up_a: float, p_up_b: float) -> float:
    """P(a ≻ b) = σ(logit p_up_a − logit p_up_b) for answers of probabilities ``p_up_a`` and ``p_up_b`` of a
    thumbs-up; tastes keep P(up) within [P_MISS, P_MET], so both logits are finite."""
    return 1 / (1 + math.exp(_logit(p_up_b) - _logit(p_up_a)))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class Preference:
    name: str
    description: str
    degree: Callable[[str], float] | None  # None: the rating ignores the text

    def p_up(self, text: str) -> float:
        """The probability that a user with this taste gives ``text`` a thumbs-up."""
        if self.degree is None:
            return 0.5
        return P_MISS + (P_MET - P_MISS) * self.degree(text)


PREFERENCES: dict[str, Preference] = {p.name: p for p in [
    Preference("concise", concise.__doc__, concise),
    Preference("numbers", numbers.__doc__, numbers),
    Preference("list", listed.__doc__, listed),
    Preference("enthusiastic", enthusiastic.__doc__, enthusiastic),
    Preference("random", "A thumbs-up with probability 0.5 whatever the answer: no taste to learn.", None),
]}
