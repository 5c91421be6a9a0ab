"""The control plane (``fleet serve``): HTTP CRL and OCSP, the MQTT certificate service, the
admin API and its client, and CRL synchronisation for brokers. Imports the store and kernel only.
"""
