"""mtls-fleet's broker: an amqtt core behind our own mutual-TLS accept loop.

Every connection must present a client certificate from the fleet CA; its identity (CN and
SPIFFE URI), tier and environment decide what it may do; revocations apply live.
"""

from broker.acl import TopicRights, filter_covers, rights_for, topic_matches
from broker.config import BrokerSettings, RevocationPolicy
from broker.outcomes import Outcome
from broker.server import FleetBroker
from broker.tls import BrokerError, CrlState, load_crl

__all__ = [
    "BrokerError",
    "BrokerSettings",
    "CrlState",
    "FleetBroker",
    "Outcome",
    "RevocationPolicy",
    "TopicRights",
    "filter_covers",
    "load_crl",
    "rights_for",
    "topic_matches",
]
