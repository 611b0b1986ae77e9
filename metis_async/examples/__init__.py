"""Example federations and learners used by the demo, the tests and the benchmarks."""
