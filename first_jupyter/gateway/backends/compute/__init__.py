"""Everything Globus Compute: the backend that sends requests as tasks, the two ways tasks are sent (the service,
the engine run in-process), their errors, the scheduler's view of a cluster, streams returned by callbacks, and
the endpoint configuration ``first endpoint config`` writes."""
