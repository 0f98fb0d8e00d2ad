"""Reliability and security campaigns against a real `superweights serve` on loopback (issue 12).

Each campaign is a module run as `python -m reliability.<name>` (load, cancel, fuzz, faults, security): it starts
its own server, measures, and writes JSON under reliability/results/. `python -m reliability.report` renders
every JSON into reliability/RESULTS.md and the plots. tests/test_reliability.py runs short versions of each.
Any command that starts an engine runs under `flock /tmp/engine.lock` on the shared 2-core machine.
"""
