"""Hostile callers: requests no coordinator or SDK of ours would send, each checked on the
databases."""
