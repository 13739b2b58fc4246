"""The router's channel to its expert workers: the epoch's group, each worker's link, the monitor that watches
them, failover."""
