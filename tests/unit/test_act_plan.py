"""The pure two-way planner: its decision table, the reference's rules, the safety net, and a
Hypothesis state machine in which both sides converge and no item is lost."""

from __future__ import annotations

import datetime as dt
import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from serversync.core.plan import Op, Plan, Policy, Side, Status, Version, plan

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(hours=1)


def v(h: str, **kw: object) -> Version:
    return Version(h, **kw)  # type: ignore[arg-type]


def test_unchanged_does_nothing() -> None:
    assert plan({"x": Status("a", "s")}, {"x": v("a")}, {"x": v("s")}).actions == ()


@pytest.mark.parametrize(("app", "server", "op"), [
    ({"x": v("a2")}, {"x": v("s")}, Op.PUT_SERVER),
    ({"x": v("a")}, {"x": v("s2")}, Op.PUT_APP),
    ({}, {"x": v("s")}, Op.DELETE_SERVER),
    ({"x": v("a")}, {}, Op.DELETE_APP),
    ({}, {}, Op.FORGET),
])
def test_one_sided_changes(app: dict[str, Version], server: dict[str, Version], op: Op) -> None:
    result = plan({"x": Status("a", "s"), "y": Status("b", "t")},
                  {**app, "y": v("b")}, {**server, "y": v("t")})
    assert result.ops() == {"x": op}
    assert result.conflicts == ()


def test_new_items_go_to_the_other_side() -> None:
    assert plan({}, {"a": v("1")}, {"s": v("2")}).ops() == {"a": Op.PUT_SERVER, "s": Op.PUT_APP}


def test_same_content_on_both_sides_is_linked_not_a_conflict() -> None:
    result = plan({"x": Status("a", "s")}, {"x": v("a2")}, {"x": v("s2")}, equal=lambda i: True)
    assert result.ops() == {"x": Op.LINK} and result.conflicts == ()
    assert plan({}, {"x": v("a")}, {"x": v("s")}, equal=lambda i: True).ops() == {"x": Op.LINK}


@pytest.mark.parametrize(("policy", "app_time", "server_time", "winner"), [
    (Policy.APPLICATION_WINS, T0, T1, Side.APP),
    (Policy.SERVER_WINS, T1, T0, Side.SERVER),
    (Policy.NEWEST_WINS, T0, T1, Side.SERVER),
    (Policy.NEWEST_WINS, T1, T0, Side.APP),
    (Policy.NEWEST_WINS, T0, T0, Side.APP),
    (Policy.NEWEST_WINS, None, T0, Side.SERVER),
])
def test_conflict_policies(policy: Policy, app_time: dt.datetime | None,
                           server_time: dt.datetime | None, winner: Side) -> None:
    result = plan({"x": Status("a", "s")}, {"x": v("a2", modified=app_time)},
                  {"x": v("s2", modified=server_time)}, policy=policy)
    assert [c.winner for c in result.conflicts] == [winner]
    assert result.ops() == {"x": Op.PUT_SERVER if winner is Side.APP else Op.PUT_APP}


def test_delete_against_change() -> None:
    status = {"x": Status("a", "s"), "y": Status("b", "t")}
    app, server = {"y": v("b")}, {"y": v("t")}  # "y" keeps the safety net out of the way

    def ops(a: dict[str, Version], s: dict[str, Version], **kw: object) -> dict[str, Op]:
        result = plan(status, {**app, **a}, {**server, **s}, **kw)  # type: ignore[arg-type]
        assert len(result.conflicts) == 1
        return result.ops()

    # changed on the server, deleted in the application
    changed = {"x": v("s2", modified=T0)}
    assert ops({}, changed, policy=Policy.APPLICATION_WINS) == {"x": Op.DELETE_SERVER}
    assert ops({}, changed, policy=Policy.SERVER_WINS) == {"x": Op.PUT_APP}
    # newest wins: the application's tombstone time against the server's edit
    assert ops({}, {"x": v("s2", modified=T1)}, policy=Policy.NEWEST_WINS,
               app_deleted_at={"x": T0}) == {"x": Op.PUT_APP}
    assert ops({}, changed, policy=Policy.NEWEST_WINS,
               app_deleted_at={"x": T1}) == {"x": Op.DELETE_SERVER}
    # a server delete has no time: under newest-wins the application's edit survives
    assert ops({"x": v("a2", modified=T0)}, {}, policy=Policy.NEWEST_WINS) == {"x": Op.PUT_SERVER}
    assert ops({"x": v("a2")}, {}, policy=Policy.SERVER_WINS) == {"x": Op.DELETE_APP}


def test_completion_survives_a_lost_conflict() -> None:
    status = {"x": Status("a", "s")}
    result = plan(status, {"x": v("a2")}, {"x": v("s2", completed=True)},
                  policy=Policy.APPLICATION_WINS)
    assert result.actions[0].op is Op.PUT_SERVER and result.actions[0].complete
    result = plan(status, {"x": v("a2", completed=True)}, {"x": v("s2")},
                  policy=Policy.SERVER_WINS)
    assert result.actions[0].op is Op.PUT_APP and result.actions[0].complete


def test_deletes_of_past_appointments_are_not_propagated() -> None:
    status = {"x": Status("a", "s"), "y": Status("b", "t")}
    result = plan(status, {"y": v("b")}, {"x": v("s", past=True), "y": v("t")})
    assert result.ops() == {"x": Op.KEEP_SERVER_ONLY}
    result = plan(status, {"x": v("a", past=True), "y": v("b")}, {"y": v("t")})
    assert result.ops() == {"x": Op.KEEP_APP_ONLY}
    # afterwards the kept copy is left alone, and forgotten once it goes too
    kept = {"x": Status(None, "s")}
    assert plan(kept, {}, {"x": v("s2", past=True)}).actions == ()
    assert plan(kept, {}, {}, allow_emptied=True).ops() == {"x": Op.FORGET}


def test_sync_filter_exit() -> None:
    status = {"x": Status("a", "s"), "y": Status("b", "t")}
    app = {"x": v("a", in_filter=False), "y": v("b")}
    server = {"x": v("s"), "y": v("t")}
    assert plan(status, app, server).actions == ()  # held
    assert plan(status, app, server, remove_unfiltered=True).ops() == {"x": Op.DELETE_SERVER}
    # an unlinked record outside the filter never imports the server copy with its UID
    assert plan({}, {"x": v("a", in_filter=False)}, {"x": v("s")}).actions == ()


def test_safety_net_refuses_to_mirror_an_emptied_side() -> None:
    status = {str(i): Status(f"a{i}", f"s{i}") for i in range(3)}
    app = {str(i): v(f"a{i}") for i in range(3)}
    server = {str(i): v(f"s{i}") for i in range(3)}
    assert plan(status, app, {}) == Plan(refused=Side.SERVER)
    assert plan(status, {}, server) == Plan(refused=Side.APP)
    unfiltered = {k: v(x.hash, in_filter=False) for k, x in app.items()}
    assert plan(status, unfiltered, server, remove_unfiltered=True) == Plan(refused=Side.APP)
    assert len(plan(status, app, {}, allow_emptied=True).actions) == 3
    # not emptied: one item left on the server
    assert plan(status, app, {"0": v("s0")}).refused is None


# ---------------------------------------------------------------- the state machine


class TwoSides(RuleBasedStateMachine):
    """Both sides edited at random between syncs; after every sync they hold the same items,
    and an item disappears only if some side deleted it."""

    def __init__(self) -> None:
        super().__init__()
        self.app: dict[str, tuple[str, dt.datetime]] = {}
        self.server: dict[str, tuple[str, dt.datetime]] = {}
        self.status: dict[str, Status] = {}
        self.deleted: set[str] = set()  # deleted by someone since it was created
        self.clock = itertools.count(1)
        self.ids = itertools.count()
        self.policy = Policy.APPLICATION_WINS
        self.synced = True

    def _now(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=next(self.clock))

    @rule(policy=st.sampled_from(list(Policy)))
    def set_policy(self, policy: Policy) -> None:
        self.policy = policy

    @rule(side=st.sampled_from(["app", "server"]), content=st.sampled_from("abc"))
    def create(self, side: str, content: str) -> None:
        ident = f"i{next(self.ids)}"
        getattr(self, side)[ident] = (content, self._now())
        self.synced = False

    @rule(side=st.sampled_from(["app", "server"]), pick=st.integers(0, 50),
          content=st.sampled_from("abcd"))
    def edit(self, side: str, pick: int, content: str) -> None:
        items: dict[str, tuple[str, dt.datetime]] = getattr(self, side)
        if items:
            ident = sorted(items)[pick % len(items)]
            items[ident] = (content, self._now())
            self.synced = False

    @rule(side=st.sampled_from(["app", "server"]), pick=st.integers(0, 50))
    def delete(self, side: str, pick: int) -> None:
        items: dict[str, tuple[str, dt.datetime]] = getattr(self, side)
        if items:
            ident = sorted(items)[pick % len(items)]
            del items[ident]
            self.deleted.add(ident)
            self.synced = False

    @rule(crash_after=st.none() | st.integers(0, 5))
    def sync(self, crash_after: int | None) -> None:
        """Run a plan; ``crash_after`` applies only that many actions (a crash mid-sync)."""
        result = plan(self.status, {k: Version(c, m) for k, (c, m) in self.app.items()},
                      {k: Version(c, m) for k, (c, m) in self.server.items()},
                      policy=self.policy, allow_emptied=True,
                      equal=lambda i: self.app[i][0] == self.server[i][0])
        actions = result.actions if crash_after is None else result.actions[:crash_after]
        for action in actions:
            i = action.ident
            if action.op is Op.PUT_SERVER:
                self.server[i] = self.app[i]
            elif action.op is Op.PUT_APP:
                self.app[i] = self.server[i]
            elif action.op is Op.DELETE_SERVER:
                del self.server[i]
            elif action.op is Op.DELETE_APP:
                del self.app[i]
            if action.op in (Op.DELETE_SERVER, Op.DELETE_APP, Op.FORGET):
                self.status.pop(i, None)
            else:
                self.status[i] = Status(self.app[i][0], self.server[i][0])
        self.synced = crash_after is None

    @precondition(lambda self: self.synced)
    @invariant()
    def converged(self) -> None:
        assert {k: c for k, (c, _) in self.app.items()} == \
            {k: c for k, (c, _) in self.server.items()}
        assert set(self.status) == set(self.app)

    @precondition(lambda self: self.synced)
    @invariant()
    def stable(self) -> None:
        again = plan(self.status, {k: Version(c, m) for k, (c, m) in self.app.items()},
                     {k: Version(c, m) for k, (c, m) in self.server.items()},
                     policy=self.policy, equal=lambda i: self.app[i][0] == self.server[i][0])
        assert again.actions == ()


class NothingLost(TwoSides):
    """Like TwoSides, tracking every identity: one never deleted on either side survives."""

    def __init__(self) -> None:
        super().__init__()
        self.created: set[str] = set()

    @rule(side=st.sampled_from(["app", "server"]), content=st.sampled_from("abc"))
    def create(self, side: str, content: str) -> None:
        ident = f"i{next(self.ids)}"
        self.created.add(ident)
        getattr(self, side)[ident] = (content, self._now())
        self.synced = False

    @precondition(lambda self: self.synced)
    @invariant()
    def survivors(self) -> None:
        assert self.created - self.deleted <= set(self.app)


TestTwoSides = TwoSides.TestCase
TestTwoSides.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestNothingLost = NothingLost.TestCase
TestNothingLost.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
