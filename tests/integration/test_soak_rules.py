"""Self-tests of the soak's verdicts (tests/integration/soak_chaos.py, `make soak`), without
servers: a soak that cannot fail proves nothing. Its loss, duplication and growth rules are
checked here on made-up samples and clients."""

import random

from soak_chaos import SoakClient, growth_verdicts


def samples(rss, fds=None, pg=None, every=10):
    fds = fds or [96] * len(rss)
    pg = pg or [5] * len(rss)
    return [{"t_s": i * every, "worker_rss_kb": r, "worker_fds": f, "pg_connections": p}
            for i, (r, f, p) in enumerate(zip(rss, fds, pg))]


def verdicts(s, warmup=30):
    return {k: ok for k, _, _, _, ok in growth_verdicts(s, warmup)}


def test_flat_or_noisy_resources_pass():
    rnd = random.Random(1)
    rss = [20000] * 3 + [26800 + rnd.randint(-200, 200) for _ in range(60)]
    fds = [30] * 3 + [95 + rnd.randint(-6, 6) for _ in range(60)]
    pg = [1] * 3 + [5] * 30 + [None] + [5] * 29  # a sample during a PostgreSQL restart
    assert verdicts(samples(rss, fds, pg)) == {"worker_rss_kb": True, "worker_fds": True,
                                               "pg_connections": True}


def test_growth_fails():
    # A leak of 100 kB a sample (10 s): 4 MB between the thirds' medians.
    leak = samples([26000 + 100 * i for i in range(63)])
    assert verdicts(leak)["worker_rss_kb"] is False
    fd_leak = samples([26000] * 63, fds=[95 + i for i in range(63)])
    assert verdicts(fd_leak)["worker_fds"] is False
    pg_leak = samples([26000] * 63, pg=[5] * 30 + [7] * 33)
    assert verdicts(pg_leak)["pg_connections"] is False


def test_what_happens_before_the_warm_up_does_not_count():
    s = samples([100] * 30 + [26000] * 40)
    assert verdicts(s, warmup=300)["worker_rss_kb"] is True
    assert verdicts(s, warmup=0)["worker_rss_kb"] is False


def test_too_few_samples_fail():
    assert set(verdicts(samples([26000] * 5), warmup=0).values()) == {False}


def client(ids=("c00",)):
    return SoakClient(0, ids[0], 1, random.Random(0), ids[1:])


def test_a_gap_below_the_newest_id_is_lost_and_a_repeat_is_duplicated():
    c = client()
    truth = {"c00": [1, 2, 3, 5, 8], "c01": [4, 6]}
    c.got = [(1, 0), (3, 0), (5, 0)]
    c.account(truth, known_to=8)
    assert (c.lost, c.dup, c.disorder) == ([2], 0, 0)
    c.got += [(5, 0), (8, 0), (7, 0)]
    c.account(truth, known_to=8)
    assert (c.lost, c.dup, c.disorder) == ([2], 1, 1)


def test_positions_not_yet_read_from_the_table_are_not_judged():
    c = client(("c00", "c01"))
    c.got = [(1, 0), (4, 0), (9, 0)]
    truth = {"c00": [1], "c01": [4]}
    c.account(truth, known_to=4)
    assert c.lost == [] and c.checked_to == 4
    truth["c00"].append(6)  # read later: committed below the client's newest id, never got
    c.account(truth, known_to=9)
    assert c.lost == [6]
