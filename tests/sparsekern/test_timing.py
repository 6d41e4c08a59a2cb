"""sparsekern.timing's stopping rule and busy flag on a fake clock: each candidate "takes" the
scripted seconds it is given, so the rule is tested exactly and no test depends on real time."""
import itertools
import statistics

import pytest

from sparsekern import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def candidate(self, seconds):
        """A fn whose calls take the given seconds in turn (the last one repeats)."""
        durations = itertools.chain(seconds, itertools.repeat(seconds[-1]))
        calls = []

        def fn():
            calls.append(None)
            self.now += next(durations)
        fn.calls = calls
        return fn


def no_schedstat():
    return None


def run(clock, fns, **kw):
    kw.setdefault("schedstat", no_schedstat)
    return timing.measure(fns, clock=clock, **kw)


def test_a_steady_ratio_stops_at_min_rounds():
    clock = FakeClock()
    dense, sparse = clock.candidate([2.0]), clock.candidate([1.0])
    m = run(clock, {"dense": dense, "sparse": sparse}, warmup=2, max_rounds=20, min_rounds=5)
    assert m.rounds == 5 and m.stable
    assert m.seconds == {"dense": 2.0, "sparse": 1.0}
    assert len(dense.calls) == len(sparse.calls) == 2 + 5  # warm-up, then one call per round


def test_window_needs_enough_rounds_before_it_can_settle():
    clock = FakeClock()
    m = run(clock, {"a": clock.candidate([1.0]), "b": clock.candidate([1.0])}, warmup=0,
            max_rounds=20, min_rounds=1, window=3)
    assert m.rounds == 4 and m.stable  # window + 1 estimates


def test_measuring_goes_on_until_the_ratio_settles():
    """Sparse is slowed down every other round for its first 8 rounds (a neighbour), then
    steady: the running-median ratio swings for a while, and the rule waits until it stayed
    within 3% over 4 estimates."""
    clock = FakeClock()
    sparse_times = [3.0, 1.0] * 4 + [1.0] * 100
    fns = {"dense": clock.candidate([2.0]), "sparse": clock.candidate(sparse_times)}
    m = run(clock, fns, warmup=0, max_rounds=50, min_rounds=5, tolerance=0.03, window=3)
    assert m.stable and m.seconds["sparse"] == 1.0
    # replay the rule by hand: the ratio estimates are dense median / sparse running median
    ratios = [2.0 / statistics.median(sparse_times[:r]) for r in range(1, 51)]
    first = next(r for r in range(5, 51)  # round r: estimates of rounds r-3..r
                 if max(ratios[r - 4:r]) / min(ratios[r - 4:r]) - 1 <= 0.03)
    assert m.rounds == first > 8


def test_a_ratio_that_never_settles_stops_at_the_cap_and_says_so():
    clock = FakeClock()
    fns = {"dense": clock.candidate([1.0]), "sparse": clock.candidate([0.5, 2.0] * 50)}
    m = run(clock, fns, warmup=0, max_rounds=12, min_rounds=5, tolerance=0.01)
    assert m.rounds == 12 and not m.stable


def test_every_candidate_must_settle():
    """A steady peer does not end the measurement while another candidate still moves."""
    clock = FakeClock()
    fns = {"dense": clock.candidate([1.0]), "steady": clock.candidate([0.5]),
           "moving": clock.candidate([0.5, 2.0] * 50)}
    m = run(clock, fns, warmup=0, max_rounds=10, min_rounds=2, tolerance=0.01)
    assert m.rounds == 10 and not m.stable


def test_a_single_candidate_settles_on_its_own_median():
    clock = FakeClock()
    m = run(clock, {"only": clock.candidate([1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0])}, warmup=0,
            max_rounds=30, min_rounds=1)
    # running medians 1, 1.25, 1, 1, 1, 1: the last 4 agree from round 6 on
    assert m.stable and m.seconds["only"] == 1.0 and m.rounds == 6


def test_fixed_rounds_when_min_equals_max():
    clock = FakeClock()
    fns = {"dense": clock.candidate([1.0]), "sparse": clock.candidate([0.5, 2.0] * 50)}
    m = run(clock, fns, warmup=1, max_rounds=3, min_rounds=3)
    assert m.rounds == 3 and not m.stable  # fewer than window + 1 rounds never settle


@pytest.mark.parametrize("before, after, share", [
    ({"1": (100, 0), "2": (50, 10)}, {"1": (200, 0), "2": (150, 10)}, 0.0),
    ({"1": (100, 0)}, {"1": (160, 40), "3": (40, 60)}, 100 / 200),  # thread 3 is new
])
def test_cpu_wait_share(before, after, share):
    assert timing.cpu_wait_share(before, after) == pytest.approx(share)


def test_busy_from_the_threads_waiting_for_a_cpu():
    readings = iter([{"1": (0, 0)}, {"1": (700, 300)}])  # waited 30% of its runnable time
    clock = FakeClock()
    m = run(clock, {"a": clock.candidate([1.0])}, warmup=0, max_rounds=2,
            schedstat=lambda: next(readings))
    assert m.cpu_wait == pytest.approx(0.3) and m.busy is True
    assert m.record() == {"rounds": 2, "stable": False, "load_average": m.load_average,
                          "cpu_wait": m.cpu_wait, "busy": True}


def test_busy_rule():
    assert timing.is_busy(0.05, 100.0) is False  # the measured wait decides where it exists
    assert timing.is_busy(timing.BUSY_WAIT_FRACTION + 0.01, 0.0) is True
    cpus = timing.os.cpu_count()
    assert timing.is_busy(None, cpus + 0.5) is True and timing.is_busy(None, cpus - 0.5) is False
    assert timing.is_busy(None, None) is None


def test_this_process_schedstat_is_read_on_linux():
    reading = timing.thread_schedstat()
    if reading is None:
        pytest.skip("no /proc/self/task/*/schedstat on this platform: busy falls back to the "
                    "load average")
    assert all(on_cpu >= 0 and waiting >= 0 for on_cpu, waiting in reading.values())


@pytest.mark.parametrize("kw, name", [({"warmup": -1}, "warmup"),
                                      ({"min_rounds": 0}, "min_rounds"),
                                      ({"min_rounds": 9, "max_rounds": 3}, "min_rounds"),
                                      ({"tolerance": 0}, "tolerance"),
                                      ({"window": 0}, "window")])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        timing.measure({"a": lambda: None}, **kw)
    with pytest.raises(ValueError, match="fns"):
        timing.measure({})
