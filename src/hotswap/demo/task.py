"""The demo's tasks: short digit prompts with a verifiable one-digit answer.

A prompt is text such as `4812=`; the completion earns reward 1 when its first non-space character is
the right digit, else 0. A random policy over the built-in 14-token vocabulary scores about 1/14; the
tasks differ in what the policy must learn:

- `last`  (default): answer the prompt's last digit (`4812=` -> `2`): copy a token at a fixed offset.
- `first`: answer the first digit (`4812=` -> `4`).
- `max`:   answer the largest digit (`4812=` -> `8`): attend to every digit; "always 9" already scores ~0.34.
- `sum`:   answer the last digit of a sum (`7+5=` -> `2`): a 100-entry table; needs more steps and a wider model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

TASKS: dict[str, tuple[int, str, Callable[[list[int]], int], str]] = {
    # name: (number of digits, separator between digits, answer, description)
    "last": (4, "", lambda d: d[-1], "answer the last digit (4812= -> 2)"),
    "first": (4, "", lambda d: d[0], "answer the first digit (4812= -> 4)"),
    "max": (4, "", max, "answer the largest digit (4812= -> 8)"),
    "sum": (2, "+", lambda d: sum(d) % 10, "answer the last digit of the sum (7+5= -> 2)"),
}


@dataclass(frozen=True, slots=True)
class Problem:
    prompt: str
    answer: str


@dataclass(slots=True)
class DigitTask:
    name: str = "last"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {sorted(TASKS)}")
        self._rng = random.Random(self.seed)

    def sample(self, n: int) -> list[Problem]:
        """`n` fresh problems (a seeded stream: the same seed gives the same problems)."""
        num_digits, sep, answer, _ = TASKS[self.name]
        out = []
        for _ in range(n):
            digits = [self._rng.randrange(10) for _ in range(num_digits)]
            out.append(Problem(prompt=sep.join(map(str, digits)) + "=", answer=str(answer(digits))))
        return out

    @property
    def description(self) -> str:
        return TASKS[self.name][3]

    @staticmethod
    def reward(completion: str, problem: Problem) -> float:
        """1.0 when the completion's first non-space character is the answer, else 0.0."""
        text = completion.lstrip()
        return 1.0 if text[:1] == problem.answer else 0.0
