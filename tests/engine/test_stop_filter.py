"""Stop strings cut the output without ever letting part of one through."""

from __future__ import annotations

from api.generation import StopFilter


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    stop_filter = StopFilter(stops)
    out = []
    for piece in pieces:
        out.append(stop_filter.feed(piece))
        if stop_filter.stopped:
            return "".join(out), True
    return "".join(out) + stop_filter.flush(), False


def test_no_stops_passes_everything_through() -> None:
    assert run([], ["ab", "cd"]) == ("abcd", False)


def test_stop_inside_one_piece() -> None:
    assert run(["cd"], ["abcdef"]) == ("ab", True)


def test_stop_split_across_pieces_is_held_back_not_leaked() -> None:
    stop_filter = StopFilter(["END"])
    assert stop_filter.feed("abcE") == "abc"
    assert stop_filter.feed("N") == ""
    assert stop_filter.feed("D tail") == ""
    assert stop_filter.stopped


def test_held_text_released_when_it_is_not_a_stop() -> None:
    stop_filter = StopFilter(["END"])
    assert stop_filter.feed("abE") == "ab"
    assert stop_filter.feed("x") == "Ex"
    assert not stop_filter.stopped


def test_held_text_flushed_at_the_end() -> None:
    assert run(["END"], ["abEN"]) == ("abEN", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["xyz", "c"], ["abcdxyz"]) == ("ab", True)


def test_empty_stop_strings_are_ignored() -> None:
    assert run([""], ["abc"]) == ("abc", False)


def test_the_stop_string_met_is_reported() -> None:
    split = StopFilter(["xyz", "END"])
    assert split.feed("abE") == "ab" and split.matched is None  # held back: it may begin "END"
    assert split.feed("ND") == "" and split.stopped and split.matched == "END"
    earliest = StopFilter(["d", "bc"])
    assert earliest.feed("abcd") == "a" and earliest.matched == "bc"
    tie = StopFilter(["bcd", "bc"])
    assert tie.feed("abcd") == "a" and tie.matched == "bcd", "the first listed of those that start at the cut"
