"""
Benchmarks of relaynet against Postfix (see bench/README.md). Not shipped.

A package so that its scripts import each other and L{harness.peers}
without touching C{sys.path}: run them from the checkout's root as modules,
C{python -m bench.run}, C{python -m bench.backlog}, C{python -m bench.accept}
(C{relaynet bench} runs C{bench.run} the same way).
"""
