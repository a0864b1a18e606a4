"""scenarios: what runs on top of the agents: the guests (the kvstore service, registered as a
guest spec), the failover drill colo-drill and the tuning tool colo-tune.
"""
