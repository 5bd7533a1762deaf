"""The scheduler's decisions, replayed on a simulated clock (no sockets, deterministic)."""
import random

import pytest

from kubecash.broker.scheduler import NS, WAKE_CREDIT_NS, DeviceScheduler, LimitBucket, expected_shares

Q = 10_000_000  # 10 ms quantum


def simulate(sched, kernel_ns, seconds, wants=None, now=0, on_tick=None):
    """Every tenant saturates with kernels of kernel_ns[t]; returns used ns per tenant."""
    for t in kernel_ns:
        if wants is None or t in wants:
            sched.want(t, now)
    end = now + int(seconds * NS)
    start_used = {t: e.used_ns for t, e in sched.entities.items()}
    while now < end:
        if on_tick:
            on_tick(now)
        g = sched.next_grant(now)
        if g is None:
            wait = sched.ns_until_next_eligible(now)
            now += int(wait) if wait else 1_000_000
            continue
        used = 0
        t = g.entity.tenant
        while used < g.quantum_ns:          # the executor runs whole kernels until the quantum is spent
            used += kernel_ns[t]
        now += used
        sched.release(t, g.lease, used, used // kernel_ns[t], True, now)
    return {t: e.used_ns - start_used[t] for t, e in sched.entities.items()}, now


def make(quotas, now=0):
    s = DeviceScheduler("cpu0", Q)
    s.created_ns = now
    for t, (w, lim, klass) in quotas.items():
        s.add(t, w, klass, LimitBucket(lim, Q, last_ns=now))
    return s


def test_weights_one_to_three():
    s = make({"a": (100, None, "batch"), "b": (300, None, "batch")})
    used, _ = simulate(s, {"a": 3_000_000, "b": 7_000_000}, 10)
    share_a = used["a"] / sum(used.values())
    assert share_a == pytest.approx(0.25, abs=0.01)


def test_eight_random_weights():
    rng = random.Random(5)
    quotas = {f"t{i}": (rng.randint(1, 1000), None, "batch") for i in range(8)}
    s = make(quotas)
    used, _ = simulate(s, {t: rng.randint(1, 20) * 1_000_000 for t in quotas}, 30)
    total = sum(used.values())
    want = expected_shares({t: (w, lim) for t, (w, lim, _) in quotas.items()})
    assert max(abs(used[t] / total - want[t]) for t in quotas) < 0.01


@pytest.mark.parametrize("limit, seconds, kernel", [(0.1, 10, 3_000_000), (0.001, 60, 1_000_000),
                                                    (0.0001, 600, 1_000_000)])
def test_limit_alone_is_a_hard_cap(limit, seconds, kernel):
    s = make({"a": (100, limit, "batch")})
    used, now = simulate(s, {"a": kernel}, seconds)
    assert used["a"] / now == pytest.approx(limit, rel=0.05)


def test_limit_with_weights_redistributes_the_rest():
    s = make({"a": (300, None, "batch"), "b": (100, None, "batch"), "c": (100, 0.1, "batch")})
    used, now = simulate(s, {"a": 2_000_000, "b": 2_000_000, "c": 2_000_000}, 20)
    want = expected_shares({"a": (300, None), "b": (100, None), "c": (100, 0.1)})
    for t in used:
        assert used[t] / now == pytest.approx(want[t], abs=0.01)


def test_idle_tenant_never_blocks_others():
    s = make({"a": (100, None, "batch"), "idle": (10000, None, "batch")})
    used, now = simulate(s, {"a": 1_000_000, "idle": 1_000_000}, 1, wants={"a"})
    assert used["idle"] == 0 and used["a"] == pytest.approx(now, rel=0.01)


def test_latency_tenant_preempts_batch_and_goes_first():
    s = make({"batch": (100, None, "batch"), "lat": (100, None, "latency")})
    s.want("batch", 0)
    g = s.next_grant(0)
    assert g.entity.tenant == "batch"
    assert s.want("lat", 1000) is True             # holder must stop at its next kernel
    s.release("batch", g.lease, 5_000_000, 1, True, 5_000_000)
    assert s.next_grant(5_000_000).entity.tenant == "lat"


def test_woken_tenant_does_not_bank_idle_time():
    s = make({"a": (100, None, "batch"), "b": (100, None, "batch")})
    used, now = simulate(s, {"a": 1_000_000, "b": 1_000_000}, 5, wants={"a"})
    used2, _ = simulate(s, {"a": 1_000_000, "b": 1_000_000}, 2, now=now)
    assert used2["b"] / sum(used2.values()) == pytest.approx(0.5, abs=0.02)


def test_live_weight_change_applies_within_a_period():
    s = make({"a": (100, None, "batch"), "b": (100, None, "batch")})
    _, now = simulate(s, {"a": 1_000_000, "b": 1_000_000}, 2)
    s.entities["b"].weight = 400
    used, _ = simulate(s, {"a": 1_000_000, "b": 1_000_000}, 1, now=now)
    assert used["b"] / sum(used.values()) == pytest.approx(0.8, abs=0.02)


def test_expected_shares_water_filling():
    assert expected_shares({"a": (300, None), "b": (100, None), "c": (100, 0.1)}) == \
        pytest.approx({"a": 0.675, "b": 0.225, "c": 0.1})
    assert expected_shares({"a": (100, 0.2)}) == {"a": 0.2}


def test_executor_reports_are_held_to_the_lease_the_broker_saw():
    """An executor runs tenant code: it cannot report less than half the time it kept the
    device, nor more than the lease lasted; honest reports stand."""
    s = make({"a": (100, None, "batch")})
    e = s.entities["a"]
    s.want("a", 0)
    g = s.next_grant(0)
    s.release("a", g.lease, 0, 1, True, 50_000_000)              # kept it 50 ms, claims 0
    assert e.used_ns == 25_000_000
    g = s.next_grant(50_000_000)
    s.release("a", g.lease, 10 * NS, 1, True, 60_000_000)        # claims 10 s of a 10 ms lease
    assert e.used_ns == 25_000_000 + 10_000_000
    g = s.next_grant(60_000_000)
    s.release("a", g.lease, 9_500_000, 1, True, 70_000_000)      # honest: 9.5 ms of 10 ms
    assert e.used_ns == 35_000_000 + 9_500_000


def test_a_burst_of_wakers_does_not_lock_out_who_ran_alone():
    """16 tenants wake at once while `a` (which ran alone for 5 s) holds the device, then all
    saturate. Each waker keeps at most WAKE_CREDIT_NS of lag behind the device's forward-only
    minimum virtual time; placed relative to the lowest runnable one instead, each would go
    WAKE_CREDIT_NS below the last and `a` would wait about 50 ms * (1 + 2 + ... + 16) = 6.8 s."""
    names = ["a"] + [f"w{i}" for i in range(16)]
    s = make({t: (100, None, "batch") for t in names})
    kernels = dict.fromkeys(names, 1_000_000)
    _, now = simulate(s, kernels, 5, wants={"a"})
    g = s.next_grant(now)                   # `a` holds the device as the others wake
    assert g.entity.tenant == "a"
    for t in names[1:]:
        s.want(t, now)
    floor = s.entities["a"].vtime - WAKE_CREDIT_NS
    assert all(s.entities[t].vtime >= floor for t in names[1:])
    now += Q
    s.release("a", g.lease, Q, 10, True, now)
    grants, next_grant = [now], s.next_grant

    def recording(t_now):                   # when `a` gets the device
        g = next_grant(t_now)
        if g is not None and g.entity.tenant == "a":
            grants.append(t_now)
        return g
    s.next_grant = recording
    used, _ = simulate(s, kernels, 3, now=now, wants=set())
    waits = [b - a for a, b in zip(grants, grants[1:], strict=False)]
    # Before its next grant `a` waits out the wakers' credit (16 of them, 50 ms each, plus the
    # quantum it had just run); then round-robin: 17 quanta.
    assert waits and waits[0] <= 16 * (WAKE_CREDIT_NS + Q) + 2 * Q, [w / 1e6 for w in waits]
    assert max(waits[1:]) <= 17 * Q + Q
    assert used["a"] / sum(used.values()) == pytest.approx(1 / 17, abs=0.02)


def test_an_uncontended_lease_renews_and_a_contended_one_does_not():
    """renew: the holder's quantum is charged as a release would charge it, and it goes on
    while no one else may run; someone runnable, a limit or a drain ends that."""
    s = make({"a": (100, None, "batch"), "b": (100, None, "batch"), "capped": (100, 0.5, "batch")})
    s.want("a", 0)
    g = s.next_grant(0)
    assert s.renew("a", g.lease, Q, 10, Q) is True
    assert s.holder.tenant == "a" and s.lease == g.lease and s.lease_start == Q
    assert s.entities["a"].used_ns == Q and s.entities["a"].grants == 1
    assert s.renew("a", g.lease + 1, Q, 1, 2 * Q) is None         # stale: nothing charged
    assert s.renew("b", g.lease, Q, 1, 2 * Q) is None
    assert s.entities["a"].used_ns == Q
    s.want("b", 2 * Q)                                              # b may run: a must release
    assert s.contended(2 * Q)
    assert s.renew("a", g.lease, Q, 10, 3 * Q) is False
    assert s.entities["a"].used_ns == 2 * Q
    s.release("a", g.lease, 0, 0, True, 3 * Q)
    assert s.next_grant(3 * Q).entity.tenant == "b"
    s.release("b", s.lease, Q, 1, False, 4 * Q)
    s.want("capped", 4 * Q)
    g = s.next_grant(4 * Q)
    assert g.entity.tenant == "capped"
    assert s.renew("capped", g.lease, g.quantum_ns, 1, 4 * Q + g.quantum_ns) is False   # a limit
    s.release("capped", g.lease, 0, 0, True, 5 * Q)
    g = s.next_grant(6 * Q)
    s.draining = True
    assert s.renew(g.entity.tenant, g.lease, Q, 1, 7 * Q) is False
