"""chat/engine/routing.py: consistent hashing with bounded load, and round-robin, without any server."""

import threading
from collections import Counter

import pytest

from chat.engine.routing import HOME_LOAD_FACTOR, Router, affinity_key, conversation_key
from chat.engine.upstream import UpstreamPool, _digest

LABELS = ["http://a:8080", "http://b:8080", "http://c:8080"]


def test_the_same_key_gets_the_same_order_every_time_and_in_another_router():
    first, second = Router(LABELS), Router(LABELS)
    for index in range(50):
        key = f"character {index}"
        assert first.order(key, [0, 0, 0]) == first.order(key, [0, 0, 0]) == second.order(key, [0, 0, 0])


def test_every_order_names_each_upstream_once():
    router = Router(LABELS)
    for index in range(50):
        assert sorted(router.order(f"k{index}", [0, 0, 0])) == [0, 1, 2]


def test_keys_spread_over_all_upstreams_roughly_evenly():
    shares = Counter(Router(LABELS).preference(f"persona {index}")[0] for index in range(3000))
    assert set(shares) == {0, 1, 2}
    assert max(shares.values()) < 1.5 * 1000


def test_removing_an_upstream_moves_only_the_keys_it_held():
    before, after = Router(LABELS), Router(LABELS[:2])
    keys = [f"persona {index}" for index in range(600)]
    for key in keys:
        first = LABELS[before.preference(key)[0]]
        if first != LABELS[2]:
            assert LABELS[after.preference(key)[0]] == first


def test_an_upstream_at_capacity_is_passed_over_for_the_next_on_the_ring():
    router = Router(LABELS)
    key = "a busy character"
    preferred = router.preference(key)
    in_flight = [0, 0, 0]
    in_flight[preferred[0]] = 5  # capacity with 6 in flight (5 + the new one): ceil(1.25 * 6 / 3) = 3
    order = router.order(key, in_flight)
    assert order[0] == preferred[1]
    assert order[-1] == preferred[0]  # still a failover candidate


def test_bounded_load_keeps_every_upstream_within_the_factor_of_the_mean():
    router = Router(LABELS, load_factor=1.25)
    in_flight = [0, 0, 0]
    for _ in range(60):  # one hot key: everything wants the same upstream
        in_flight[router.order("the only character", in_flight)[0]] += 1
    assert max(in_flight) <= 1.25 * (sum(in_flight) / 3) + 1
    assert sum(in_flight) == 60


def test_round_robin_takes_turns_and_ignores_the_key():
    router = Router(LABELS, policy="round_robin")
    firsts = [router.order("same key", [0, 0, 0])[0] for _ in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2]


def test_the_affinity_key_is_the_start_of_the_prompt():
    persona = "You are Captain Vera, " * 40
    assert affinity_key(persona + "user: hi") == affinity_key(persona + "user: tell me more")
    assert affinity_key("short prompt") == "short prompt"


def test_the_affinity_key_is_the_whole_first_system_message_behind_a_long_shared_site_prompt():
    site = "House rules for every character of this site. " * 40  # longer than the prompt prefix alone
    vera = [{"role": "system", "content": site + "You are Vera."}, {"role": "user", "content": "hi"}]
    ilse = [{"role": "system", "content": site + "You are Ilse."}, {"role": "user", "content": "hi"}]
    later = [vera[0], {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and then?"}]
    assert affinity_key("rendered", vera) != affinity_key("rendered", ilse)
    assert affinity_key("rendered", vera) == affinity_key("other rendering", later)


@pytest.mark.parametrize("options", [{"policy": "random"}, {"load_factor": 0.5}])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        Router(LABELS, **options)


def test_the_pool_counts_a_request_in_flight_under_the_lock_that_chose_its_upstream():
    pool = UpstreamPool([f"http://up{index}:8080" for index in range(3)], routing="affinity")
    (first, *_) = pool.candidates(key="one character", begin=True)
    assert (first.in_flight, first.requests) == (1, 1)
    pool.withdrawn(first)
    assert (first.in_flight, first.requests) == (0, 0)


def test_a_burst_of_one_key_from_many_threads_stays_within_the_bound():
    pool = UpstreamPool([f"http://up{index}:8080" for index in range(3)], routing="affinity")
    start = threading.Barrier(48)

    def choose():
        start.wait()
        pool.candidates(key="the same persona", begin=True)  # none ends: every choice sees the ones before

    threads = [threading.Thread(target=choose) for _ in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loads = [upstream.in_flight for upstream in pool.upstreams]
    assert sum(loads) == 48
    assert max(loads) <= pool.router.capacity([48 - 1, 0, 0], factor=HOME_LOAD_FACTOR)  # one key: its home's bound
    assert max(loads) < 48  # the bound held: without the shared count every thread would pick the same one


def test_a_key_in_flight_stays_on_its_upstream_up_to_its_home_bound_while_new_keys_are_bounded():
    pool = UpstreamPool([f"http://up{index}:8080" for index in range(3)], routing="affinity")
    for index in range(30):  # a busy pool: 30 requests of other keys, spread by the 1.25 x bound
        pool.candidates(key=f"persona {index}", begin=True)
    assert max(u.in_flight for u in pool.upstreams) <= pool.router.capacity([30 - 1, 0, 0])
    home = pool.candidates(key="popular persona", begin=True)[0]
    beyond_the_bound = 0
    for _ in range(11):
        loads = [upstream.in_flight for upstream in pool.upstreams]
        stays = home.in_flight < pool.router.capacity(loads, factor=HOME_LOAD_FACTOR)
        beyond_the_bound += stays and home.in_flight >= pool.router.capacity(loads)
        assert (pool.candidates(key="popular persona", begin=True)[0] is home) == stays
    assert beyond_the_bound  # where a new key would have gone elsewhere, this one stayed with its prefix
    for _ in range(12):
        pool.settled("popular persona", home)
    assert "popular persona" not in pool._homes  # none open: the next one is routed afresh


def test_with_slots_a_new_key_passes_over_an_upstream_whose_slots_hold_other_open_keys():
    router = Router(LABELS)
    key = next(f"persona {n}" for n in range(100) if router.preference(f"persona {n}")[0] == 0)
    preferred = router.preference(key)
    assert router.order(key, [4, 4, 4], keys_at=[4, 1, 1], key_capacity=4)[0] == preferred[1]  # 0's 4 slots are taken
    assert router.order(key, [4, 4, 4], keys_at=[3, 1, 1], key_capacity=4)[0] == 0  # room in its own
    assert router.order(key, [4, 4, 4], keys_at=[4, 4, 4], key_capacity=4)[0] == 0  # no room anywhere: its own
    assert router.order(key, [4, 4, 4], keys_at=[4, 1, 1])[0] == 0  # without slots: the hash and the load only


def test_a_key_sent_off_its_hash_goes_back_to_where_it_last_ran():
    pool = UpstreamPool([f"http://up{index}:8080" for index in range(3)], routing="affinity", slots=1)
    key = next(f"persona {n}" for n in range(100) if pool.router.preference(f"persona {n}")[0] == 0)
    other = next(f"persona {n}" for n in range(100) if pool.router.preference(f"persona {n}")[0] == 0
                 and f"persona {n}" != key)
    own = pool.upstreams[0]
    assert pool.candidates(key=other, begin=True)[0] is own  # its one slot holds another open key...
    away = pool.candidates(key=key, begin=True)[0]
    assert away is not own  # ...so this key went to an upstream with room
    pool.settled(key, away)
    pool.ended(away, seconds=0.1, error=False)
    pool.settled(other, own)
    pool.ended(own, seconds=0.1, error=False)
    assert pool.candidates(key=key, begin=True)[0] is away  # its prompt is cached there, not on its hash's upstream


def test_placements_keep_a_short_digest_of_each_key_however_long_the_system_message():
    pool = UpstreamPool([f"http://up{index}:8080" for index in range(3)], routing="affinity")
    long_sheet = affinity_key("", [{"role": "system", "content": "x" * 200_000}])
    first = pool.candidates(key=long_sheet, begin=True)[0]
    pool.settled(long_sheet, first)
    pool.ended(first, seconds=0.1, error=False)
    assert all(len(placement) <= 32 for placement in pool._placed)  # not 200 KB per key a client sends
    assert pool.candidates(key=long_sheet, begin=True)[0] is first  # and it still finds its way back


def test_a_conversations_next_turn_goes_back_to_the_upstream_its_last_turn_ran_on():
    pool = UpstreamPool([f"http://up{index}:8080" for index in range(3)], routing="affinity")
    sheet = [{"role": "system", "content": "You are Captain Mara."}]
    key = affinity_key("", sheet)
    first_turn = sheet + [{"role": "user", "content": "Hello, captain!"}]
    conversation = conversation_key(first_turn)
    first = pool.candidates(key=key, conversation=conversation, begin=True)[0]
    pool.settled(key, first)
    pool.ended(first, seconds=0.1, error=False)
    # Meanwhile the character's requests moved to another upstream (bounded load, a full upstream).
    elsewhere = next(upstream for upstream in pool.upstreams if upstream is not first)
    pool._placed[_digest(key)] = pool.upstreams.index(elsewhere)
    assert pool.candidates(key=key, begin=True)[0] is elsewhere  # a new conversation follows the character...
    second_turn = first_turn + [{"role": "assistant", "content": "Ahoy."}, {"role": "user", "content": "Tides?"}]
    assert conversation_key(second_turn) == conversation
    assert pool.candidates(key=key, conversation=conversation, begin=True)[0] is first  # ...this one its history
    assert conversation_key(sheet + [{"role": "user", "content": "Another chat"}]) != conversation
    assert conversation_key([{"role": "assistant", "content": "hi"}]) is None
