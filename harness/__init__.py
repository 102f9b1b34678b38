"""
The test and benchmark harness of relaynet: not shipped.

Helpers that C{tests/} and C{bench/} share, kept out of the C{relaynet}
package so that they do not ship in the wheel (setup.cfg names only
C{relaynet.*} and C{twisted.plugins}):

  - L{harness.peers}: private real Postfix instances, Postfix's C{smtp-sink}
    and C{smtp-source}, on loopback only;
  - L{harness.nodeproc}: a relaynet node as a real C{twistd -n relaynet}
    subprocess (start, wait for the greeting, C{kill -9}, restart) and small
    SMTP helpers for tests.

It is importable from the root of a source checkout (pytest adds the root,
see C{pythonpath} in pyproject.toml; benchmarks run as C{python -m bench.run}
from there). The harness may import C{relaynet}; C{relaynet} never imports
the harness.
"""
