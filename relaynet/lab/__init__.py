"""
Lab topologies: describe a relay network in one TOML file, run it as real
processes on loopback, drive it, trace messages hop by hop and break it.
"""
