"""mtls-fleet's broker: a mutual-TLS accept loop and an MQTT 3.1.1 session engine of its own.

Every connection must present a client certificate from the fleet CA; its identity (CN and
SPIFFE URI), tier and environment decide what it may do; revocations apply live.
"""

from broker.acl import TopicRights, filter_covers, topic_matches
from broker.config import BrokerSettings, RevocationPolicy
from broker.launcher import LaunchedBroker, broker_command, launched_broker, listening_port
from broker.outcomes import Outcome
from broker.policy import DEFAULT_POLICY, AccessPolicy, PolicyError, load_policy, rights_for
from broker.server import FleetBroker
from broker.tls import BrokerError
from fleet.store.crls import CrlState, load_crl

__all__ = [
    "DEFAULT_POLICY",
    "AccessPolicy",
    "BrokerError",
    "BrokerSettings",
    "CrlState",
    "FleetBroker",
    "LaunchedBroker",
    "Outcome",
    "PolicyError",
    "RevocationPolicy",
    "TopicRights",
    "broker_command",
    "filter_covers",
    "launched_broker",
    "listening_port",
    "load_crl",
    "load_policy",
    "rights_for",
    "topic_matches",
]
