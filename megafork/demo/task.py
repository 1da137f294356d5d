"""The demo's synthetic verifiable math task: short arithmetic chains answered as "Answer: X".

    from megafork.demo.task import ArithmeticTask
    task = ArithmeticTask(difficulty=2)
    problems = task.sample(100, seed=0)        # list[Problem(prompt, answer)]
    problems[0].prompt, problems[0].response   # "Compute 47+8.\n", "Answer: 55"

The difficulty knob sets how many operands a chain has and how many digits each operand has.
Answers are always non-negative integers, so `megafork.rewards` verifies them exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# difficulty -> (operands, digits per operand, operators). Level 2 is the demo's default: two-digit
# sums need a carry, which a 2-layer model learns only partially in a short warm start.
LEVELS: dict[int, tuple[int, int, str]] = {
    1: (2, 1, "+"),
    2: (2, 2, "+"),
    3: (3, 2, "+"),
    4: (3, 2, "+-"),
    5: (4, 3, "+-"),
}


@dataclass(frozen=True)
class Problem:
    """One task instance. `response` is the reference completion in the DAPO answer format."""

    expression: str
    answer: str

    @property
    def prompt(self) -> str:
        return f"Compute {self.expression}.\n"

    @property
    def response(self) -> str:
        return f"Answer: {self.answer}"

    def as_row(self) -> dict:
        """The row shape `megafork.data` reads: {"prompt": str, "answer": str}."""
        return {"prompt": self.prompt, "answer": self.answer}


@dataclass(frozen=True)
class ArithmeticTask:
    """A family of arithmetic chains; `difficulty` picks a level from LEVELS.

    Attributes:
        difficulty: 1 (one-digit sums) to 5 (four 3-digit operands with + and -).
    """

    difficulty: int = 2

    def __post_init__(self):
        if self.difficulty not in LEVELS:
            raise ValueError(f"ArithmeticTask.difficulty: expected one of {sorted(LEVELS)}, found {self.difficulty!r}")

    @property
    def level(self) -> tuple[int, int, str]:
        return LEVELS[self.difficulty]

    def make(self, rng: random.Random) -> Problem:
        """Draw one problem. Subtractions are redrawn until the result is non-negative."""
        operands, digits, ops = self.level
        hi = 10**digits - 1
        while True:
            nums = [rng.randint(0, hi) for _ in range(operands)]
            signs = [rng.choice(ops) for _ in range(operands - 1)]
            value = nums[0]
            for sign, n in zip(signs, nums[1:]):
                value = value + n if sign == "+" else value - n
            if value >= 0:
                break
        expr = str(nums[0]) + "".join(s + str(n) for s, n in zip(signs, nums[1:]))
        return Problem(expression=expr, answer=str(value))

    def sample(self, count: int, seed: int) -> list[Problem]:
        """`count` problems drawn from a private RNG seeded with `seed` (duplicates possible).

        Args:
            count: number of problems.
            seed: RNG seed; the same seed gives the same list.
        """
        rng = random.Random(seed)
        return [self.make(rng) for _ in range(count)]

    def split(self, train: int, heldout: int, seed: int) -> tuple[list[Problem], list[Problem]]:
        """Disjoint train / held-out problem lists (held-out expressions never appear in train).

        Args:
            train: number of training problems.
            heldout: number of held-out problems.
            seed: RNG seed.
        """
        rng = random.Random(seed)
        held: dict[str, Problem] = {}
        guard = 0
        while len(held) < heldout:
            p = self.make(rng)
            held.setdefault(p.expression, p)
            guard += 1
            if guard > 100 * heldout:
                raise ValueError(f"ArithmeticTask(difficulty={self.difficulty}) has fewer than {heldout} distinct problems")
        rows: list[Problem] = []
        while len(rows) < train:
            p = self.make(rng)
            if p.expression not in held:
                rows.append(p)
        return rows, list(held.values())

    def corpus(self, count: int = 2000, seed: int = 0) -> list[str]:
        """Texts the task tokenizer is trained on: prompts and reference responses, kept apart so
        no merge spans the prompt/response boundary."""
        out: list[str] = []
        for p in self.sample(count, seed):
            out += [p.prompt, p.response]
        return out
