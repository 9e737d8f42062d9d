"""``first serve``: the gateway shared by a whole facility. Its app and door, the policy for each caller (groups,
quotas, accounting), metrics, and the state its processes or replicas share (SQLite on one host, Redis and
PostgreSQL across hosts). Nothing outside this package needs it, so a gateway inside Jupyter never loads it."""
