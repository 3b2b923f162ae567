"""Problems found in the input data, collected rather than raised one at a time.

``validate`` reports every problem at once; training raises them together before it starts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from kubetune.errors import InvalidInputError, StorageAccessError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input. ``storage`` problems (missing, denied) mean exit code 3."""

    kind: str
    message: str
    storage: bool = False


class ProblemLog:
    """Collects every problem, keeping the first ``cap`` messages of each kind and counting the rest."""

    def __init__(self, cap: int = 50) -> None:
        self.cap = cap
        self.counts: Counter[str] = Counter()
        self.shown: dict[str, list[Problem]] = {}
        self.storage_problems = 0

    def add(self, kind: str, message: str, *, storage: bool = False) -> None:
        self.counts[kind] += 1
        self.storage_problems += storage
        shown = self.shown.setdefault(kind, [])
        if len(shown) < self.cap:
            shown.append(Problem(kind, message, storage))

    def add_error(self, error: InvalidInputError | StorageAccessError, kind: str | None = None) -> None:
        storage = isinstance(error, StorageAccessError)
        self.add(kind or ("storage" if storage else "invalid-input"), str(error), storage=storage)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def has_storage_problems(self) -> bool:
        return self.storage_problems > 0

    def problems(self) -> list[Problem]:
        return [p for problems in self.shown.values() for p in problems]

    def __bool__(self) -> bool:
        return self.total > 0

    def summary(self, limit: int = 5) -> str:
        """The first ``limit`` problems and how many more there are, as one message."""
        problems = self.problems()
        text = "; ".join(p.message for p in problems[:limit])
        more = self.total - min(limit, len(problems))
        return f"{text} (and {more} more problems)" if more > 0 else text

    def raise_if_any(self) -> None:
        if not self:
            return
        error = StorageAccessError if self.has_storage_problems else InvalidInputError
        raise error(self.summary())
