"""Golden rewrite cases for hindsight-logging analysis and propagation (flordb_build.rewrite).

Each propagation case is (old version, today's version, expected old version after propagation) as
dedented inline strings, in the style of libcst's codemod tests: the expected text is compared exactly,
so comments, blank lines and formatting of the old version are part of what is checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import FrozenInstanceError
from textwrap import dedent

import pytest

from flordb_build.errors import FlorBuildError, RewriteError
from flordb_build.rewrite import (
    NotPlaced,
    Placed,
    Position,
    PropagationResult,
    analyze_script,
    classify,
    deepest,
    propagate,
    propagate_project,
)
from tests.conftest import Project


def code(text: str) -> str:
    """Dedent an inline script."""
    return dedent(text).lstrip("\n")


def assert_propagates(
    old: str, today: str, expected: str, placed: Iterable[tuple[str, Position]], names: Iterable[str] | None = None
) -> PropagationResult:
    """Propagate, compare the rewritten old version exactly, and check it is now complete."""
    result = propagate(code(today), code(old), names)
    assert result.not_placed == (), result.not_placed
    assert result.source == code(expected)
    assert [(p.name, p.position) for p in result.placed] == list(placed)
    # the line reported is the line of that flor.log call in the rewritten source
    lines = result.source.splitlines()
    for p in result.placed:
        assert f'"{p.name}"' in lines[p.line - 1]
    # a second propagation finds nothing left to do, and the rewritten version still parses
    again = propagate(code(today), result.source, names)
    assert again.placed == () and again.source == result.source
    return result


def assert_refuses(old: str, today: str, name: str, reason_part: str) -> PropagationResult:
    """Propagate and check ``name`` is reported (with the reason) and the old source is untouched."""
    result = propagate(code(today), code(old))
    assert [p.name for p in result.placed if p.name == name] == []
    reasons = [n.reason for n in result.not_placed if n.name == name]
    assert len(reasons) == 1, result.not_placed
    assert reason_part in reasons[0]
    if not result.placed:
        assert result.source == code(old)
    return result


# -- the three-version training script of the issue ------------------------------------------------

OLD_TRAIN = """
import flordb_build as flor

state = {"w": 0}
# the main loop
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        state["w"] += epoch  # version 1 updates by epoch
    # validation
    flor.log("val", state["w"])
flor.log("final", state["w"])
"""


def test_log_after_the_nested_loop_goes_into_the_epoch_loop() -> None:
    today = """
    import flordb_build as flor

    state = {"w": 0}
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += step
        flor.log("w2", state["w"] * 2)
        flor.log("val", state["w"])
    flor.log("final", state["w"])
    """
    expected = """
    import flordb_build as flor

    state = {"w": 0}
    # the main loop
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += epoch  # version 1 updates by epoch
        flor.log("w2", state["w"] * 2)
        # validation
        flor.log("val", state["w"])
    flor.log("final", state["w"])
    """
    result = assert_propagates(OLD_TRAIN, today, expected, [("w2", Position.VALIDATION)])
    assert "flor.loop 'epoch'" in result.placed[0].anchor
    assert result.depth is Position.VALIDATION and result.changed


def test_log_after_the_main_loop_is_a_suffix() -> None:
    today = """
    import flordb_build as flor

    state = {"w": 0}
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += step * 2
        flor.log("val", state["w"])
    flor.log("final", state["w"])
    flor.log("fin2", state["w"] + 1)
    """
    expected = OLD_TRAIN + 'flor.log("fin2", state["w"] + 1)\n'
    assert_propagates(OLD_TRAIN, today, expected, [("fin2", Position.SUFFIX)])


def test_both_statements_of_the_issue_land_and_the_depth_is_the_deepest() -> None:
    today = """
    import flordb_build as flor

    state = {"w": 0}
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += 1
        flor.log("val", state["w"])
        flor.log("w2", state["w"] * 2)
    flor.log("final", state["w"])
    flor.log("fin2", state["w"] + 1)
    """
    result = propagate(code(today), code(OLD_TRAIN))
    assert {(p.name, p.position) for p in result.placed} == {
        ("w2", Position.VALIDATION), ("fin2", Position.SUFFIX)
    }
    assert result.depth is Position.VALIDATION
    assert classify(result.source, "w2") is Position.VALIDATION
    assert classify(result.source, "fin2") is Position.SUFFIX


def test_log_inside_the_nested_loop_is_a_range() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            grad = step * 0.5
            w -= grad
        flor.log("val", w)
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            grad = step * 0.5
            flor.log("grad", grad)
            w -= 2 * grad
        flor.log("val", w)
    """
    expected = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            grad = step * 0.5
            flor.log("grad", grad)
            w -= grad
        flor.log("val", w)
    """
    result = assert_propagates(old, today, expected, [("grad", Position.RANGE)])
    assert result.depth is Position.RANGE


# -- loops renamed or moved ------------------------------------------------------------------------

RENAMED_TODAY = """
import flordb_build as flor

state = {"w": 0}
for epoch in flor.loop("ep", range(3)):
    for step in flor.loop("step", range(4)):
        state["w"] += step
    flor.log("w2", state["w"] * 2)
    flor.log("val", state["w"])
"""


def test_renamed_loop_with_another_header_is_reported_not_guessed() -> None:
    old = """
    import flordb_build as flor

    state = {"w": 0}
    for e in flor.loop("epoch", range(5)):
        for step in flor.loop("step", range(4)):
            state["w"] += step
        flor.log("val", state["w"])
    """
    assert_refuses(old, RENAMED_TODAY, "w2", "flor.loop 'ep' does not exist in the old version")


def test_renamed_loop_with_the_same_header_is_anchored_by_that_header() -> None:
    old = """
    import flordb_build as flor

    state = {"w": 0}
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += 1
        flor.log("val", state["w"])
    """
    expected = """
    import flordb_build as flor

    state = {"w": 0}
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += 1
        flor.log("w2", state["w"] * 2)
        flor.log("val", state["w"])
    """
    result = assert_propagates(old, RENAMED_TODAY, expected, [("w2", Position.VALIDATION)])
    assert "today's 'ep'" in result.placed[0].anchor


def test_renamed_loop_matching_two_old_headers_is_ambiguous() -> None:
    old = """
    import flordb_build as flor

    for i in flor.loop("a", range(3)):
        flor.log("x", i)
    for i in flor.loop("b", range(3)):
        flor.log("y", i)
    """
    today = """
    import flordb_build as flor

    for i in flor.loop("c", range(3)):
        flor.log("x", i)
        flor.log("z", i * 2)
    """
    assert_refuses(old, today, "z", "rename is ambiguous")


def test_loop_moved_into_an_extracted_function_still_aligns_by_loop_name() -> None:
    today = """
    import flordb_build as flor


    def train(state):
        for epoch in flor.loop("epoch", range(3)):
            for step in flor.loop("step", range(4)):
                state["w"] += step
            flor.log("w2", state["w"] * 2)
            flor.log("val", state["w"])
        return state


    state = train({"w": 0})
    flor.log("final", state["w"])
    """
    # today's statement reads `state`, a parameter today and a global in the old version: both define it
    expected = """
    import flordb_build as flor

    state = {"w": 0}
    # the main loop
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += epoch  # version 1 updates by epoch
        flor.log("w2", state["w"] * 2)
        # validation
        flor.log("val", state["w"])
    flor.log("final", state["w"])
    """
    assert_propagates(OLD_TRAIN, today, expected, [("w2", Position.VALIDATION)])


def test_statement_in_a_function_the_old_version_also_has_is_placed_inside_it() -> None:
    old = """
    import flordb_build as flor


    def train(state, epochs):
        for epoch in flor.loop("epoch", range(epochs)):
            state["w"] += 1
        flor.log("final", state["w"])
        return state


    train({"w": 0}, 3)
    """
    today = """
    import flordb_build as flor


    def train(state, epochs):
        flor.log("epochs", epochs)
        for epoch in flor.loop("epoch", range(epochs)):
            state["w"] += 2
        flor.log("final", state["w"])
        flor.log("fin2", state["w"] + 1)
        return state


    if __name__ == "__main__":
        train({"w": 0}, 3)
    """
    expected = """
    import flordb_build as flor


    def train(state, epochs):
        flor.log("epochs", epochs)
        for epoch in flor.loop("epoch", range(epochs)):
            state["w"] += 1
        flor.log("final", state["w"])
        flor.log("fin2", state["w"] + 1)
        return state


    train({"w": 0}, 3)
    """
    result = assert_propagates(old, today, expected, [("epochs", Position.PREFIX), ("fin2", Position.SUFFIX)])
    assert all("function 'train'" in p.anchor for p in result.placed)


def test_statement_in_a_function_the_old_version_lacks_is_reported() -> None:
    today = """
    import flordb_build as flor


    def train(state):
        for epoch in flor.loop("epoch", range(3)):
            for step in flor.loop("step", range(4)):
                state["w"] += step
            flor.log("val", state["w"])
        flor.log("fin2", state["w"] + 1)
        return state


    state = train({"w": 0})
    flor.log("final", state["w"])
    """
    assert_refuses(OLD_TRAIN, today, "fin2", "enclosing function 'train' does not exist in the old version")


# -- comments, neighbours, dependencies ------------------------------------------------------------

def test_methods_elif_branches_and_block_starts_align() -> None:
    old = """
    import flordb_build as flor


    class Trainer:
        def fit(self, n):
            for epoch in flor.loop("epoch", range(n)):
                if epoch == 0:
                    print("first")
                elif epoch == 1:
                    print("second")
                else:
                    self.step()
            print("done")

        def step(self):
            pass


    Trainer().fit(3)
    """
    today = """
    import flordb_build as flor


    class Trainer:
        def fit(self, n):
            for epoch in flor.loop("epoch", range(n)):
                flor.log("start", epoch)
                if epoch == 0:
                    print("first")
                elif epoch == 1:
                    print("second")
                    flor.log("second", epoch)
                else:
                    self.step()
            print("done")
            flor.log("n", n)

        def step(self):
            flor.log("stepping", 1)


    Trainer().fit(3)
    """
    result = propagate(code(today), code(old))
    assert [(p.name, p.position) for p in result.placed] == [
        ("start", Position.VALIDATION), ("second", Position.VALIDATION), ("n", Position.SUFFIX)
    ]
    assert "(elif epoch == 1)" in result.placed[1].anchor
    assert "function 'Trainer.fit'" in result.placed[2].anchor
    # the old step() body is `pass`: nothing in today's block anchors the new line, so it is reported
    assert [(n.name, "only new statements" in n.reason) for n in result.not_placed] == [("stepping", True)]
    assert result.source == code(today).replace('        flor.log("stepping", 1)', "        pass")


def test_comments_around_the_anchor_survive() -> None:
    old = """
    import flordb_build as flor  # recorder

    # ---- setup ----
    w = 0  # weight

    for epoch in flor.loop("epoch", range(2)):  # main loop
        # inner
        for step in flor.loop("step", range(2)):
            w += 1  # update

        # --- after the nested loop ---
        flor.log("val", w)  # per epoch
        # end of epoch body

    # tail
    print(w)
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(2)):
        for step in flor.loop("step", range(2)):
            w += 2
        # hindsight: twice the weight
        flor.log("w2", w * 2)
        flor.log("val", w)
    print(w)
    """
    expected = """
    import flordb_build as flor  # recorder

    # ---- setup ----
    w = 0  # weight

    for epoch in flor.loop("epoch", range(2)):  # main loop
        # inner
        for step in flor.loop("step", range(2)):
            w += 1  # update
        # hindsight: twice the weight
        flor.log("w2", w * 2)

        # --- after the nested loop ---
        flor.log("val", w)  # per epoch
        # end of epoch body

    # tail
    print(w)
    """
    assert_propagates(old, today, expected, [("w2", Position.VALIDATION)])


def test_anchor_statement_that_appears_twice_is_reported() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        print(w)
        w += 1
        print("done")
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("w", w)
        w = w * 3
    """
    assert_refuses(old, today, "w", "appears 2 times in the old block")


def test_repeated_anchor_is_resolved_by_the_other_neighbour() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        print(w)
        w += 1
        w = w * 3
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("w", w)
        w = w * 3
    """
    expected = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        print(w)
        w += 1
        flor.log("w", w)
        w = w * 3
    """
    assert_propagates(old, today, expected, [("w", Position.VALIDATION)])


def test_neighbours_that_are_apart_in_the_old_version_are_reported() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        w = min(w, 10)
        print(w)
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("w", w)
        print(w)
    """
    assert_refuses(old, today, "w", "not adjacent in the old version")


def test_statement_reading_a_variable_the_old_version_lacks_is_reported() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("val", w)
    """
    today = """
    import flordb_build as flor

    w = 0
    momentum = 0.9
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("val", w)
        flor.log("m", momentum * w)
    """
    assert_refuses(old, today, "m", "reads 'momentum'")


def test_statement_reading_a_name_another_new_statement_binds_is_placed() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("val", w)
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("val", w)
        sq = flor.log("sq", w * w)
        flor.log("sq2", [sq * k for k in range(2)])
    """
    expected = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
        flor.log("val", w)
        sq = flor.log("sq", w * w)
        flor.log("sq2", [sq * k for k in range(2)])
    """
    assert_propagates(old, today, expected, [("sq", Position.VALIDATION), ("sq2", Position.VALIDATION)])


def test_wrapping_an_existing_statement_replaces_it_instead_of_running_it_twice() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        loss = abs(w - 5)  # distance to the target
        w += 1
    """
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        loss = flor.log("loss", abs(w - 5))
        w += 2
    """
    expected = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        loss = flor.log("loss", abs(w - 5))  # distance to the target
        w += 1
    """
    result = assert_propagates(old, today, expected, [("loss", Position.VALIDATION)])
    assert "wrapping" in result.placed[0].anchor


def test_a_block_holding_only_new_logs_is_inserted_whole_under_the_with_anchor() -> None:
    old = """
    import contextlib

    import flordb_build as flor

    w = 0
    with contextlib.suppress(KeyError):
        for epoch in flor.loop("epoch", range(4)):
            w += 1
        flor.log("final", w)
    """
    today = """
    import contextlib

    import flordb_build as flor

    w = 0
    with contextlib.suppress(KeyError):
        for epoch in flor.loop("epoch", range(4)):
            w += 1
            if epoch % 2 == 0:
                flor.log("even_w", w)
        flor.log("final", w)
        flor.log("fin2", w + 1)
    """
    expected = """
    import contextlib

    import flordb_build as flor

    w = 0
    with contextlib.suppress(KeyError):
        for epoch in flor.loop("epoch", range(4)):
            w += 1
            if epoch % 2 == 0:
                flor.log("even_w", w)
        flor.log("final", w)
        flor.log("fin2", w + 1)
    """
    result = assert_propagates(
        old, today, expected, [("even_w", Position.VALIDATION), ("fin2", Position.SUFFIX)]
    )
    assert "with contextlib.suppress(KeyError)" in result.placed[1].anchor


def test_enclosing_with_block_missing_in_the_old_version_is_reported() -> None:
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(4)):
        w += 1
    flor.log("final", w)
    """
    today = """
    import contextlib

    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(4)):
        w += 1
    with contextlib.suppress(KeyError):
        flor.log("final", w)
        flor.log("fin2", w + 1)
    """
    assert_refuses(old, today, "fin2", "enclosing block `with contextlib.suppress(KeyError)` has no counterpart")


def test_a_log_sharing_its_line_with_other_code_is_reported() -> None:
    today = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1; flor.log("w", w)
    """
    old = """
    import flordb_build as flor

    w = 0
    for epoch in flor.loop("epoch", range(3)):
        w += 1
    """
    assert_refuses(old, today, "w", "line of its own")


def test_placement_that_would_change_prefix_into_suffix_is_refused() -> None:
    old = """
    import flordb_build as flor


    def setup():
        data = [1, 2, 3]
        return data


    for epoch in flor.loop("epoch", range(3)):
        pass
    data = setup()
    """
    today = """
    import flordb_build as flor


    def setup():
        data = [1, 2, 3]
        flor.log("n", len(data))
        return data


    data = setup()
    for epoch in flor.loop("epoch", range(3)):
        pass
    """
    # setup() aligns, but the old version calls it after the main loop
    assert_refuses(old, today, "n", "today it runs in the prefix")


def test_neighbours_that_moved_around_the_main_loop_are_reported() -> None:
    old = """
    import flordb_build as flor

    for epoch in flor.loop("epoch", range(3)):
        pass
    data = [1, 2, 3]
    """
    today = """
    import flordb_build as flor

    data = [1, 2, 3]
    flor.log("n", len(data))
    total = sum(data)
    for epoch in flor.loop("epoch", range(3)):
        pass
    """
    # after `data = ...` (its neighbour) but before the loop (which the old version runs first)
    assert_refuses(old, today, "n", "come in another order in the old block")


def test_names_filter_already_logged_and_unchanged_source() -> None:
    today = """
    import flordb_build as flor

    state = {"w": 0}
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += epoch  # version 1 updates by epoch
        flor.log("val", state["w"])
        flor.log("w2", state["w"] * 2)
    flor.log("final", state["w"])
    flor.log("fin2", state["w"] + 1)
    """
    only_fin2 = propagate(code(today), code(OLD_TRAIN), ["fin2", "val"])
    assert [p.name for p in only_fin2.placed] == ["fin2"]
    assert only_fin2.already_logged == ("val",)
    assert "w2" not in only_fin2.source
    nothing = propagate(code(today), code(OLD_TRAIN), ["val"])
    assert nothing.source == code(OLD_TRAIN) and not nothing.changed and nothing.depth is None
    with pytest.raises(RewriteError, match="does not log 'nope'"):
        propagate(code(today), code(OLD_TRAIN), ["nope"])


def test_unparsable_version_is_a_rewrite_error() -> None:
    with pytest.raises(RewriteError, match="Could not parse the old version at line 2"):
        propagate(code(OLD_TRAIN), "x = 1\nfor for\n")
    assert issubclass(RewriteError, FlorBuildError)


def test_results_are_frozen() -> None:
    result = propagate(code(OLD_TRAIN), code(OLD_TRAIN))
    with pytest.raises(FrozenInstanceError):
        result.source = ""  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        Placed("a", Position.PREFIX, 1, "x").line = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        NotPlaced("a", "why").reason = ""  # type: ignore[misc]


# -- analysis and classification -------------------------------------------------------------------

ANALYSED = """
import flordb_build as flor
from flordb_build import log as L

state = {"w": 0}
flor.log("pre", 1)


def evaluate(s):
    for b in flor.loop("batch", range(2)):
        flor.log("batch_loss", b)
    return s["w"]


def train(s):
    flor.log("lr", 0.1)
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            s["w"] += 1
            L("loss", s["w"])
        flor.log("val", evaluate(s))
    else:
        flor.log("done", 1)
    flor.log("fin_in", 1)


def unused():
    flor.log("dead", 1)


if __name__ == "__main__":
    flor.log("before_call", 1)
    train(state)
    flor.log("final", state["w"])
"""


def test_analysis_finds_loops_main_loop_and_positions_through_functions() -> None:
    analysis = analyze_script(code(ANALYSED))
    # `batch` is outermost in its own function but runs inside the epoch loop: not the main loop
    assert analysis.main_loop is not None
    assert (analysis.main_loop.name, analysis.main_loop.function) == ("epoch", "train")
    assert [(lp.name, lp.depth, lp.parent) for lp in analysis.loops] == [
        ("batch", 0, None), ("epoch", 0, None), ("step", 1, "epoch")
    ]
    assert {site.name: site.position for site in analysis.logs} == {
        "pre": Position.PREFIX,
        "batch_loss": Position.RANGE,
        "lr": Position.PREFIX,
        "loss": Position.RANGE,
        "val": Position.VALIDATION,
        "done": Position.SUFFIX,
        "fin_in": Position.SUFFIX,
        "dead": None,
        "before_call": Position.PREFIX,
        "final": Position.SUFFIX,
    }
    loss = next(site for site in analysis.logs if site.name == "loss")
    assert (loss.loops, loss.function, loss.line) == (("epoch", "step"), "train", 19)
    assert "dead" in analysis.names


def test_classify_uses_the_deepest_site_and_explains_failures() -> None:
    source = code(ANALYSED) + 'flor.log("val", 0)\n'
    assert classify(source, "val") is Position.VALIDATION
    assert classify(source, "final") is Position.SUFFIX
    with pytest.raises(RewriteError, match="does not log 'missing'"):
        classify(source, "missing")
    with pytest.raises(RewriteError, match="never references by name"):
        classify(source, "dead")


@pytest.mark.parametrize(
    "imports, loop, log",
    [
        ("import flordb_build", "flordb_build.loop", "flordb_build.log"),
        ("import flordb_build as fb", "fb.loop", "fb.log"),
        ("from flordb_build import loop, log", "loop", "log"),
        ("from flordb_build import loop as L, log as G", "L", "G"),
        ("from flordb_build import *", "loop", "log"),
    ],
)
def test_every_import_spelling_is_recognised(imports: str, loop: str, log: str) -> None:
    source = f"{imports}\nfor e in enumerate({loop}('epoch', range(2))):\n    {log}('x', e)\n{log}('y', 1)\n"
    analysis = analyze_script(source)
    assert analysis.main_loop is not None and analysis.main_loop.name == "epoch"
    assert [(s.name, s.position) for s in analysis.logs] == [("x", Position.VALIDATION), ("y", Position.SUFFIX)]


def test_calls_on_other_modules_are_not_flor_calls() -> None:
    source = "import other as flor\nfor e in flor.loop('epoch', range(2)):\n    flor.log('x', e)\n"
    analysis = analyze_script(source)
    assert analysis.loops == () and analysis.logs == () and analysis.main_loop is None


def test_script_without_a_loop_is_all_prefix() -> None:
    assert classify("import flordb_build as flor\nx = 1\nflor.log('x', x)\n", "x") is Position.PREFIX


def test_depth_orders_scans_from_prefix_to_range() -> None:
    ordered = [Position.PREFIX, Position.SUFFIX, Position.VALIDATION, Position.RANGE]
    assert sorted(Position, key=lambda p: p.depth) == ordered
    assert deepest([Position.SUFFIX, Position.PREFIX]) is Position.SUFFIX
    assert deepest([Position.RANGE, Position.VALIDATION]) is Position.RANGE
    assert deepest([]) is None
    assert Position("validation") is Position.VALIDATION


# -- the rewritten old versions run, each with its own code -----------------------------------------

VERSION = """
import flordb_build as flor

state = {{"w": 0}}
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        state["w"] += {update}
    flor.log("val", state["w"])
flor.log("final", state["w"])
"""

TODAY = """
import flordb_build as flor

state = {"w": 0}
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        state["w"] += step * epoch
    flor.log("w2", state["w"] * 2)
    flor.log("val", state["w"])
flor.log("final", state["w"])
flor.log("fin2", state["w"] + 1)
"""


def test_propagated_versions_log_what_their_own_code_computes(project: Project) -> None:
    import flordb_build as flor

    updates = ["1", "epoch", "step + 2"]
    for number, update in enumerate(updates):
        result = propagate(code(TODAY), code(VERSION.format(update=update)))
        assert {p.name for p in result.placed} == {"w2", "fin2"} and result.not_placed == ()
        project.write(f"train_v{number}.py", result.source)
        project.run(f"train_v{number}.py")
    frame = flor.dataframe("val", "w2")
    assert len(frame) == 9
    assert (frame["w2"] == 2 * frame["val"]).all()
    # three versions, three different trajectories: each ran its own update, not today's
    assert frame.groupby("filename")["val"].max().to_dict() == {
        "train_v0.py": 12, "train_v1.py": 12, "train_v2.py": 42,
    }
    finals = flor.dataframe("final", "fin2")
    assert len(finals) == 3 and (finals["fin2"] == finals["final"] + 1).all()


# -- issue 13: alignment by tree mapping, calls through classes, refactored blocks -------------------

def test_a_neighbour_whose_literal_changed_still_anchors_the_statement() -> None:
    old = """
    import flordb_build as flor

    for batch in flor.loop("step", range(3)):
        loss = step(model, batch, lr=0.1)
    """
    today = """
    import flordb_build as flor

    for batch in flor.loop("step", range(3)):
        loss = step(model, batch, lr=0.05)
        flor.log("loss_now", loss)
    """
    expected = """
    import flordb_build as flor

    for batch in flor.loop("step", range(3)):
        loss = step(model, batch, lr=0.1)
        flor.log("loss_now", loss)
    """
    result = assert_propagates(old, today, expected, [("loss_now", Position.VALIDATION)])
    assert "old: `loss = step(model, batch, lr=0.1)`" in result.placed[0].anchor


def test_an_edited_enclosing_block_and_renamed_variables_still_map() -> None:
    old = """
    import flordb_build as flor

    best_val_loss = None
    for epoch in flor.loop("epoch", range(10)):
        val_loss = 1.0 / (epoch + 1)
        if not best_val_loss or val_loss < best_val_loss:
            best_val_loss = val_loss
        else:
            lr = 4.0
        print(val_loss)
    """
    today = """
    import flordb_build as flor

    best_val_loss = None
    for epoch in flor.loop("epoch", range(10)):
        val_loss = 2.0 / (epoch + 1)
        if not best_val_loss or val_loss <= best_val_loss:
            best_val_loss = val_loss
            flor.log("improved", epoch)
        else:
            lr = 2.0
        flor.log("vl", val_loss)
        print(val_loss)
    """
    expected = """
    import flordb_build as flor

    best_val_loss = None
    for epoch in flor.loop("epoch", range(10)):
        val_loss = 1.0 / (epoch + 1)
        if not best_val_loss or val_loss < best_val_loss:
            best_val_loss = val_loss
            flor.log("improved", epoch)
        else:
            lr = 4.0
        flor.log("vl", val_loss)
        print(val_loss)
    """
    result = assert_propagates(
        old, today, expected, [("improved", Position.VALIDATION), ("vl", Position.VALIDATION)]
    )
    assert "`if not best_val_loss or val_loss < best_val_loss`" in result.placed[0].anchor


def test_two_equally_similar_old_neighbours_are_reported_not_guessed() -> None:
    old = """
    import flordb_build as flor

    for epoch in flor.loop("epoch", range(3)):
        a = f(epoch, 1)
        print(epoch)
        a = f(epoch, 2)
    """
    today = """
    import flordb_build as flor

    for epoch in flor.loop("epoch", range(3)):
        a = f(epoch, 3)
        flor.log("a", a)
        b = 0
    """
    assert_refuses(old, today, "a", "appears 2 times in the old block")


NET_OLD = """
import torch
import flordb_build as flor


class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(4, width)

    def reparameterize(self, h):
        return h * 2

    def forward(self, x):
        h = self.fc(x)
        return self.reparameterize(h)


model = Net(8).to("cpu")
for epoch in flor.loop("epoch", range(2)):
    for x in flor.loop("step", [torch.ones(4)]):
        y = model(x)
"""


def test_statements_in_methods_are_reached_through_instances_and_self() -> None:
    today = NET_OLD.replace(
        "        self.fc = torch.nn.Linear(4, width)\n",
        "        self.fc = torch.nn.Linear(4, width)\n        flor.log(\"width\", width)\n",
    ).replace(
        "        return h * 2\n", "        flor.log(\"h_norm\", h.norm().item())\n        return h * 2\n"
    ).replace(
        "        h = self.fc(x)\n", "        h = self.fc(x)\n        flor.log(\"h_mean\", h.mean().item())\n"
    )
    result = assert_propagates(NET_OLD, today, today, [
        ("width", Position.PREFIX), ("h_norm", Position.RANGE), ("h_mean", Position.RANGE),
    ])
    assert [p.anchor.split(",")[0] for p in result.placed] == [
        "function 'Net.__init__'", "function 'Net.reparameterize'", "function 'Net.forward'",
    ]


def test_an_attribute_store_named_like_a_function_does_not_pick_the_main_loop() -> None:
    source = code("""
    import flordb_build as flor


    class Search:
        def fit(self, n):
            for epoch in flor.loop("epoch", range(n)):
                flor.log("acc", epoch)


    search = Search()
    search.fit(3)
    for trial in flor.loop("trial", range(2)):
        search.fit = None
    """)
    analysis = analyze_script(source)
    assert analysis.main_loop is not None and analysis.main_loop.name == "epoch"
    assert classify(source, "acc") is Position.VALIDATION


def test_a_same_named_method_of_another_class_is_not_a_call_site() -> None:
    source = code("""
    import flordb_build as flor


    class Layer:
        def train(self, x):
            for i in flor.loop("epoch", range(2)):
                x = x + i
            return x


    class Net:
        def __init__(self):
            self.layers = [Layer(), Layer()]

        def train(self, x):
            for i, layer in flor.loop("layer", enumerate(self.layers)):
                x = layer.train(x)
                flor.log("x", x)


    net = Net()
    flor.log("n_layers", len(net.layers))
    net.train(1)
    flor.log("done", 1)
    """)
    analysis = analyze_script(source)
    assert analysis.main_loop is not None and analysis.main_loop.name == "layer"
    assert {s.name: s.position for s in analysis.logs} == {
        "x": Position.VALIDATION, "n_layers": Position.PREFIX, "done": Position.SUFFIX,
    }


CLIP_OLD = """
import torch
import flordb_build as flor

model = torch.nn.Linear(2, 1)
for epoch in flor.loop("epoch", range(2)):
    loss = model(torch.ones(2)).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    model.zero_grad()
"""


def test_a_line_rewritten_to_log_its_value_replaces_the_old_line() -> None:
    today = CLIP_OLD.replace(
        "    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)\n",
        '    flor.log("grad_norm", torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())\n',
    )
    result = assert_propagates(CLIP_OLD, today, today, [("grad_norm", Position.VALIDATION)])
    assert "wrapping `torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`" in result.placed[0].anchor
    # an edited version of that line (another max_norm) is no longer the value logged: not wrapped
    edited = today.replace(", 1.0).item()", ", 2.0).item()")
    refused = propagate(code(edited), code(CLIP_OLD))
    assert refused.placed == () and "not adjacent" in refused.not_placed[0].reason


SAMPLE_OLD = """
import flordb_build as flor

model = Model()
for epoch in flor.loop("epoch", range(3)):
    train(epoch)
    with torch.no_grad():
        sample = model.decode(torch.zeros(4))
        save_image(sample, "sample.png")
    test(epoch)
"""


def test_a_block_refactored_into_a_function_places_into_the_inline_block() -> None:
    today = """
    import flordb_build as flor


    def sample_images():
        with torch.no_grad():
            sample = model.decode(torch.zeros(4))
            flor.log("sample_mean", sample.mean().item())
            save_image(sample, "sample.png")


    model = Model()
    for epoch in flor.loop("epoch", range(3)):
        train(epoch)
        sample_images()
        test(epoch)
    """
    expected = """
    import flordb_build as flor

    model = Model()
    for epoch in flor.loop("epoch", range(3)):
        train(epoch)
        with torch.no_grad():
            sample = model.decode(torch.zeros(4))
            flor.log("sample_mean", sample.mean().item())
            save_image(sample, "sample.png")
        test(epoch)
    """
    assert_propagates(SAMPLE_OLD, today, expected, [("sample_mean", Position.VALIDATION)])
    # the function's statements must map one to one: an extra line there leaves nothing to inline
    other = code(today).replace('        save_image(sample, "sample.png")\n', '        save_image(sample, "s.png")\n        show()\n')
    refused = propagate(other, code(SAMPLE_OLD))
    assert refused.placed == ()
    assert "function 'sample_images' does not exist" in refused.not_placed[0].reason


def test_a_refactored_function_body_must_not_read_its_parameters_inline() -> None:
    old = """
    import flordb_build as flor

    for epoch in flor.loop("epoch", range(3)):
        sample = decode(epoch)
        save(sample)
    """
    today = """
    import flordb_build as flor


    def sample_images(epoch):
        sample = decode(epoch)
        flor.log("e", epoch)
        save(sample)


    for epoch in flor.loop("epoch", range(3)):
        sample_images(epoch + 1)
    """
    assert_refuses(old, today, "e", "a parameter of 'sample_images'")


MODEL_OLD = """
import torch.nn as nn


class RNNModel(nn.Module):
    def __init__(self, ntoken, nhid):
        super().__init__()
        self.decoder = nn.Linear(nhid, ntoken)
        self.init_weights(0.1)

    def init_weights(self, initrange):
        self.decoder.weight.data.uniform_(-initrange, initrange)

    def forward(self, x):
        out = self.decoder(x)
        return out
"""

MAIN_OLD = """
import torch
import flordb_build as flor

import data
from model import RNNModel

corpus = data.load()
model = RNNModel(10, 4)
for epoch in flor.loop("epoch", range(2)):
    for x in flor.loop("batch", corpus):
        loss = model(x).sum()
    flor.log("loss", loss.item())
flor.log("done", 1)
"""


def test_statements_in_the_project_modules_are_placed_and_classified_by_their_callers() -> None:
    model_today = code(MODEL_OLD).replace(
        "        self.decoder.weight.data.uniform_(-initrange, initrange)\n",
        "        self.decoder.weight.data.uniform_(-initrange, initrange)\n"
        '        flor.log("init_dec_norm", self.decoder.weight.norm().item())\n',
    ).replace("        out = self.decoder(x)\n", '        out = self.decoder(x)\n        flor.log("out_mean", out.mean().item())\n')
    model_today = "import flordb_build as flor\n" + model_today
    main_today = code(MAIN_OLD).replace('flor.log("done", 1)', 'flor.log("done", 1)\nflor.log("n_tokens", 10)')
    today = {"main.py": main_today, "model.py": model_today, "data.py": "def load():\n    return [1]\n"}
    old = {"main.py": code(MAIN_OLD), "model.py": "import flordb_build as flor\n" + code(MODEL_OLD),
           "data.py": today["data.py"]}
    # one module at a time, the helper module's statements are in functions nothing there calls
    alone = propagate(today["model.py"], old["model.py"])
    assert alone.placed == () and all("never references" in n.reason for n in alone.not_placed)
    result = propagate_project(today, old)
    assert [(path, p.name, p.position) for path, p in result.placed] == [
        ("main.py", "n_tokens", Position.SUFFIX),
        ("model.py", "init_dec_norm", Position.PREFIX),
        ("model.py", "out_mean", Position.RANGE),
    ]
    assert result.refused == () and result.depth is Position.RANGE
    assert result.sources["model.py"] == model_today
    assert result.sources["main.py"] == main_today
    assert "function 'RNNModel.init_weights'" in result.placed[1][1].anchor
    # a module the old version lacks is reported, not skipped
    newer = propagate_project({**today, "extra.py": 'import flordb_build as flor\nflor.log("x", 1)\n'}, old)
    assert [(path, n.name) for path, n in newer.refused] == [(None, "x")]
    assert "'extra.py' does not exist in the old version" in newer.refused[0][1].reason


def test_an_old_version_without_a_final_newline_gets_the_statement_on_a_line_of_its_own() -> None:
    old = code(OLD_TRAIN).rstrip("\n")  # as `git show` output arrives once stripped
    today = code(OLD_TRAIN) + 'flor.log("fin2", state["w"] + 1)\n'
    result = propagate(today, old)
    assert result.source == code(OLD_TRAIN) + 'flor.log("fin2", state["w"] + 1)'
    assert [(p.name, p.line) for p in result.placed] == [("fin2", 11)]
