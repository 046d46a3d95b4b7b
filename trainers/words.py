"""Counts in words for messages a person reads: 1 box, 3 boxes, 1 search, 2 searches, 2 epochs."""

# Words whose plural the spelling rule below gets wrong: "epoch" ends in a "ch" said as "k".
PLURALS = {"epoch": "epochs"}


def counted(n: int, noun: str) -> str:
    """n of a noun, in words. A phrase pluralises its last word: counted(2, "complete run") is "2 complete runs"."""
    if n == 1:
        return f"{n} {noun}"
    head, _, last = noun.rpartition(" ")
    plural = PLURALS.get(last) or last + ("es" if last.endswith(("ch", "sh", "s", "x")) else "s")
    return f"{n} {head + ' ' if head else ''}{plural}"
