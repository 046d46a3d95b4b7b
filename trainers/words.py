"""Counts in words for messages a person reads: 1 box, 3 boxes, 1 search, 2 searches."""


def counted(n: int, noun: str) -> str:
    """n of a noun, in words. A phrase pluralises its last word: counted(2, "complete run") is "2 complete runs"."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}" + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")
