"""Throwaway local clusters: MariaDB instances, agents and a coordinator on one machine, for the
demo, tests and fault harnesses."""
