"""The fault-injecting proxy lives in the product now (``nearstore bench
faults`` drives it); the tests import it from here as before."""

from nearstore.bench.faultproxy import READ_PIECE, Event, FaultProxy, Rule

__all__ = ["READ_PIECE", "Event", "FaultProxy", "Rule"]
