"""The coordinator's protocol logic: transactions, decisions, recovery. No grpc, no database
driver: agents are reached through ``ParticipantPort`` and decisions go to a ``DecisionLog``."""
