"""checkpointer: the checkpoint stream both agents share, and the primary agent.

The stream: protocol.py (the sans-I/O epoch protocol of both roles), wire.py with frames.py,
messages.py and schema.py (frames, the session guard, the control messages), codec.py (page
batches and the epoch digest). What both agents run on: runtime.py, launch.py, config.py,
security.py, cluster.py (agent processes) and faults.py (kill points). The primary: agent.py
over triggers.py, snapshot.py, pipeline.py, sync.py, output.py, control.py and stats.py.
"""
