"""One label list for the whole federation.

A site's "cardiology" must be id 3 at every site, also at a site that has no
cardiology notes at all, so ids come from the federation's list (run config
``labels`` or the demo dataset's own list), never from what a site happens to
see locally. A label outside the list is an error, not a new class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedlora.errors import DataError


@dataclass(frozen=True)
class LabelSpace:
    """The federation's ordered label names."""

    names: tuple[str, ...]
    #: Free-text answers (a causal LM's summaries): one placeholder "label".
    free_text: bool = False

    def __post_init__(self) -> None:
        if len(self.names) < 2 and not (self.free_text and len(self.names) == 1):
            raise DataError(
                f"a label list needs at least 2 labels, got {list(self.names)}; "
                "set labels='a,b,...' in the run config"
            )
        if len(set(self.names)) != len(self.names):
            raise DataError(f"label list has duplicates: {list(self.names)}")

    @classmethod
    def of(cls, names: Iterable[str]) -> LabelSpace:
        """Build from any iterable of names (kept in the given order)."""
        return cls(tuple(str(n) for n in names))

    @classmethod
    def open_ended(cls) -> LabelSpace:
        """The label space of free-text instruction data (no label list)."""
        return cls(("response",), free_text=True)

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, values: Sequence[object], source: str, column: str) -> list[int]:
        """Map label values to ids, naming the first unknown one and the fix."""
        index = {name: i for i, name in enumerate(self.names)}
        ids: list[int] = []
        for row, value in enumerate(values):
            key = str(value).strip()
            if key not in index:
                raise DataError(
                    f"{source}: row {row} has label {key!r} in column '{column}', which "
                    f"is not in the federation's label list ({', '.join(self.names)}); "
                    "fix the row or ask the operator to add the label to 'labels'"
                )
            ids.append(index[key])
        return ids
