"""replica: the replica agent. It stages each epoch (standby.py), commits it atomically, acks it,
and takes over when the primary is gone (failover.py: the standby memory becomes a running guest).
"""
