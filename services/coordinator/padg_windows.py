"""Which instance of a macro instance should have its PaDG prefill window open, under which epoch, and which
`PrefillWindow` orders bring the instances there. Pure: no I/O, no clock; `now` is an argument.

The coordinator's intent is `active` + `epoch`. An activation bumps the epoch and orders the new instance
open and the previous one closed. Instances report their window state (`prefill_window`, `window_epoch`) in
every status, so lost orders, a coordinator that took over, or an instance that restarted are all repaired
the same way: a report that disagrees with the intent gets the order again (at most once per
`resend_interval` per instance; orders are idempotent because instances ignore epochs below their last).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.messages import InstanceStatus

RESEND_INTERVAL = 1.0  # seconds between two identical orders to one instance


@dataclass(frozen=True, slots=True)
class WindowOrder:
    """Send PrefillWindow(active=`open`, epoch=`epoch`) to `instance_id`."""

    instance_id: str
    open: bool
    epoch: int


@dataclass
class WindowBook:
    epoch: int = 0  # the latest activation's epoch (persisted; only grows)
    active: str | None = None
    opened_at: float | None = None  # unix seconds, when `active`'s window opened
    opened: dict[str, int] = field(default_factory=dict)  # instance → windows it opened
    resend_interval: float = RESEND_INTERVAL
    # instance → (order, when sent): what was last sent, so reports that predate it do not repeat it
    _sent: dict[str, tuple[WindowOrder, float]] = field(default_factory=dict)
    # instances whose first report after a takeover gets the current order whatever it says
    _unconfirmed: set[str] = field(default_factory=set)

    def activate(self, instance_id: str, previous: str | None, now: float) -> list[WindowOrder]:
        """The dispatcher moved the activation: new epoch; open `instance_id`, close `previous`."""
        self.epoch += 1
        self.active, self.opened_at = instance_id, now
        self.opened[instance_id] = self.opened.get(instance_id, 0) + 1
        orders = [WindowOrder(instance_id, True, self.epoch)]
        if previous is not None and previous != instance_id:
            orders.append(WindowOrder(previous, False, self.epoch))
        for order in orders:
            self._sent[order.instance_id] = (order, now)
        return orders

    def restored(self, active: str | None) -> None:
        """A coordinator took over with this persisted state: re-send the open order to `active` as soon as
        it reports (same epoch: an instance that applied it already ignores nothing and changes nothing)."""
        self.active = active
        if active is not None:
            self._unconfirmed.add(active)

    def deactivated(self) -> None:
        """The activated instance left; nothing is active until the next activation."""
        self.active, self.opened_at = None, None

    def forget(self, instance_id: str) -> None:
        self._sent.pop(instance_id, None)
        self._unconfirmed.discard(instance_id)

    def adopt(self, status: InstanceStatus) -> bool:
        """An instance applied a higher epoch than we know (Redis lost a write, or an older coordinator
        sent it just before dying): continue above it. True when the epoch changed."""
        if status.window_epoch > self.epoch:
            self.epoch = status.window_epoch
            return True
        return False

    def correction(self, status: InstanceStatus, now: float) -> WindowOrder | None:
        """The order to send after this member's report, if its window disagrees with the intent."""
        instance_id = status.instance_id
        if status.prefill_window is None:  # not a padg-policy instance: it has no window to steer
            return None
        should_open = instance_id == self.active
        if instance_id in self._unconfirmed:
            self._unconfirmed.discard(instance_id)
            return self._order(WindowOrder(instance_id, should_open, self.epoch), now)
        if should_open:
            wrong = not status.prefill_window or status.window_epoch < self.epoch
        else:
            wrong = status.prefill_window
        if not wrong:
            return None
        order = WindowOrder(instance_id, should_open, self.epoch)
        last = self._sent.get(instance_id)
        if last is not None and last[0].open == should_open and now - last[1] < self.resend_interval:
            return None  # the same was sent recently (maybe under an older epoch): this report predates it
        return self._order(order, now)

    def _order(self, order: WindowOrder, now: float) -> WindowOrder:
        self._sent[order.instance_id] = (order, now)
        return order
