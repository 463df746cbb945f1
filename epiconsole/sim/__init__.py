"""The embedded simulated lab: a meter on a pseudo-terminal, SSH servers on loopback for the DGX and the
four Pis, and an HTTP API like dllama-api, all driven by one documented physics model (physics.py) and
one shared state (state.py). The real drivers run unchanged against it. Everything it produces is
labelled simulated.
"""
