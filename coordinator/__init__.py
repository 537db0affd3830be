"""The twopc coordinator daemon: presumed-abort two-phase commit over the participant agents.

``engine`` holds the protocol (states, decisions, recovery) and imports no grpc and no database
driver; ``decision_log`` makes decisions durable; ``agents``, ``pipeline`` and ``phase2`` are its
gRPC clients of the agents; ``servicer`` is its gRPC face to clients; ``daemon`` wires them up.
It shares only the ``twopc`` package's common code with the agent, never the agent itself.
"""
