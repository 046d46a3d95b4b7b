"""Counts in words, as the console and the runs' tags print them."""
from trainers.words import counted


def test_counts_pluralise_the_last_word_of_the_noun():
    assert [counted(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert counted(1, "box") == "1 box" and counted(3, "degenerate box") == "3 degenerate boxes"
    assert counted(2, "search") == "2 searches" and counted(1, "search") == "1 search"
    assert counted(2, "complete run") == "2 complete runs"
    assert counted(2, "epoch") == "2 epochs" and counted(3, "batch") == "3 batches"  # "epoches" was printed
