"""Fault injection: the TCP fault proxy, fault schedules, and ``twopc chaos``, which runs a
workload against a playground while it breaks things on purpose and then checks the invariants."""
