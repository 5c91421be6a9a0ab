"""The kernel: what every other layer stands on and which imports nothing of ours above it.

Errors, device identity, keys, durations, atomic files, configuration, bounded JSON, the
broker's reason vocabulary, the MQTT API's wire format, and the one builder of SSL contexts
(:mod:`fleet.kernel.tls`).
"""
